"""A CLI that talks (issue 16, item 3): stage lines with timings, quiet bars, help that helps.

The miniature verification is a real ``verify.py`` run: a hand-made owner kit over synthetic polyps
(no training) and an untrained :class:`TinySegNet` checkpoint as the suspect, with LIME at its
minimum sample count on one image and a 99-code null. It is not verified (exit 1) -- what is
checked is what the run says on the way.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import ROOT, compose_config
from verification import progress
from watermark.stealthmark.kit import StealthMarkKey, build_secret, write_secret

PAYLOAD = "Tk9-cl1"  # 7 bytes (QR v1-H); appears nowhere else
TRIGGER_SEED = 4242
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join(map(str, (ROOT, ROOT / "tests")))}
STAGE = re.compile(r"\[(\d)/(\d)\] (.+?) \.\.\. (\d+\.\d) s$")


class TinySegNet(torch.nn.Module):
    """An untrained suspect: ``forward(images B×C×H×W in [0, 1], boxes=None) -> logits B×1×H×W``."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, 1, 3, padding=1)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(images) - 3.0


@pytest.fixture(scope="module")
def verification_run(tmp_path_factory):
    """``python verify.py`` on the mini kit; returns (out folder, completed process)."""
    base = tmp_path_factory.mktemp("cli_talk")
    cfg = compose_config(["experiment=stealthmark_synthetic", "data.synthetic.num_images=40",
                          "data.synthetic.image_size=64", "data.image_size=50"], base)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    datamodule = instantiate(data)
    datamodule.prepare_data()
    datamodule.setup()
    ids = [s.id for s in datamodule.dataset("test", train_transforms=False).samples]
    key = StealthMarkKey(payload=PAYLOAD, qr_version=1, error_correction="H", image_size=50, quiet_zone=2,
                         trigger={"kind": "patch", "size": 4, "position": "top-left", "seed": TRIGGER_SEED})
    torch.manual_seed(0)
    net = TinySegNet()
    ckpt = base / "suspect.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"backbone": {"_target_": "test_cli_talk.TinySegNet", "in_channels": 3},
                                     "task": "segmentation"}}, ckpt)
    secret = write_secret(base / "owner" / "secret.json", build_secret(
        key, ids, "test", data, {"alpha": 1e-3, "response_margin": 0.01, "min_decoded": 1}, checkpoint=str(ckpt)))
    out = base / "report"
    cmd = [sys.executable, str(ROOT / "verify.py"), f"secret={secret}", f"suspect={ckpt}", f"out={out}",
           f"paths.data_dir={base / 'data'}", f"paths.log_dir={base / 'logs'}", "verify.num_images=4",
           "verify.num_lime_images=1", "verify.num_samples=1323", "verify.batch_size=500", "verify.null_k=99",
           "verify.num_figures=1", "suspect_factories=[models.,test_cli_talk.]"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    return out, proc


@pytest.mark.slow
def test_a_verification_logs_numbered_stage_lines_with_timings(verification_run):
    out, proc = verification_run
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]  # an untrained suspect: not verified
    log_lines = (out / "verify.log").read_text().splitlines()
    stages = [m.groups() for m in (STAGE.search(line) for line in log_lines) if m]
    assert [(i, n) for i, n, _, _ in stages] == [(str(i), "5") for i in range(1, 6)], log_lines
    names = [name for _, _, name, _ in stages]
    assert names[0] == "load suspect: checkpoint, 4 images, attack none"
    assert names[1] == "null model: 99 random QR codes"
    assert names[2] == "response test: 4 images"
    assert re.fullmatch(r"LIME: 0/1 decoded", names[3]), names[3]  # LIME ran on one image; nothing decoded
    assert names[4].startswith("report")
    report = json.loads((out / "report.json").read_text())
    # the LIME stage's time is the QR channel's own time, not a made-up number
    assert float(stages[3][3]) == pytest.approx(report["timings"]["qr_channel"], abs=0.051)
    assert report["queries"] == 2 * 4 + 1323
    # the lines reach the console too (Hydra's console handler), never the payload
    assert "[5/5] report" in proc.stdout + proc.stderr
    assert PAYLOAD not in proc.stdout + proc.stderr + (out / "verify.log").read_text()


@pytest.mark.slow
def test_no_progress_bar_when_stderr_is_not_a_terminal(verification_run):
    _, proc = verification_run
    # tqdm draws with carriage returns and rates ("img/s"); a pipe gets neither
    assert "\r" not in proc.stderr and "img/s" not in proc.stderr and "suspect queries" not in proc.stderr


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_on_a_terminal_and_never_when_quiet(monkeypatch):
    def drawn(quiet: bool, terminal: bool) -> str:
        stream = _Terminal() if terminal else io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        progress.set_quiet(quiet)
        try:
            with progress.QueryBar(lambda x: x, total=30) as predict:
                for _ in range(3):
                    predict(torch.zeros(10, 1))
            list(progress.progress(range(5), desc="images"))
        finally:
            progress.set_quiet(False)
        return stream.getvalue()

    assert "suspect queries" in drawn(quiet=False, terminal=True)
    assert drawn(quiet=True, terminal=True) == ""
    assert drawn(quiet=False, terminal=False) == ""


def test_attack_training_and_task_quality_show_bars_on_a_terminal(monkeypatch):
    from verification.model_attacks import _train_loop

    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    model = torch.nn.Linear(2, 1)
    batches = [{"x": torch.randn(4, 2)} for _ in range(2)]
    record = _train_loop(model, batches, lambda b: model(b["x"]).square().mean(), epochs=2, lr=1e-3,
                         weight_decay=0.0, max_batches=None, device=torch.device("cpu"))
    assert record["steps"] == 4 and "attack training" in stream.getvalue()


def test_quiet_flag_becomes_the_override():
    import verify

    assert verify.quiet_flag(["out=x", "--quiet", "device=cpu"]) == ["out=x", "device=cpu", "quiet=true"]
    assert verify.quiet_flag(["out=x"]) == ["out=x"]
    assert OmegaConf.load(ROOT / "configs" / "verify.yaml").quiet is False  # bars by default (on a terminal)


def _help(module: str, capsys) -> str:
    entry = __import__(module)
    code = entry.cli(["--help"], prog=f"medmark {module}")
    text = capsys.readouterr().out
    assert code == 0, text
    return text


@pytest.mark.parametrize("module", ["train", "eval", "verify"])
def test_help_lists_modes_exit_codes_examples_and_no_internal_preset(module, capsys):
    text = _help(module, capsys)
    assert "Exit codes:" in text and "Examples:" in text and "Most used overrides" in text
    assert "_common" not in text and "_segmentation" not in text and "_classification" not in text
    assert f"python {module}.py" in text
    if module == "verify":
        assert "stealthmark" in text and "xmark" in text and "mode=certificate" in text
        assert ".onnx" in text and "http(s)://" in text and "3  exploratory" in text
        assert "quiet=" in text and "(now false)" in text
    else:
        # every experiment of the config tree is listed as a mode
        for experiment in sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")):
            assert f"  {experiment} " in text
        assert "data: " in text and "synthetic_polyp" in text


@pytest.mark.slow
def test_help_of_the_script_exits_0_and_names_exit_codes():
    proc = subprocess.run([sys.executable, str(ROOT / "verify.py"), "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Exit codes:" in proc.stdout and "python verify.py secret=" in proc.stdout
    assert "_common" not in proc.stdout and "is powered by Hydra" not in proc.stdout
