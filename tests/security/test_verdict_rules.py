"""Verdict rules of ``verify.py``: sealed thresholds bind, exit codes mean what they say.

* A verify-time change of a decision threshold (α raised, response margin, min_decoded, τ)
  is EXPLORATORY: exit 3 with a banner naming each changed threshold in report.md/.json/.html,
  never exit 0. A smaller α (stricter) and an override equal to the sealed value stay binding.
* X-Mark re-tests the owner's clean controls at the τ/α used, from the per-image
  probabilities stored in the owner kit.
* Exit 2 for every error: Hydra config errors, missing ``out=``/``suspect=``, a suspect that
  raises, NaN outputs (file named) -- and nothing but the log is left in ``out=``.

Built by hand, no training: an owner kit over synthetic polyp data and oracle networks in
real Lightning-checkpoint files (a perfectly marked one, a clean twin, a NaN one, one that
expects 1 channel); for X-Mark a random generator file, a synthetic-CXR kit with recorded
controls and an untrained classifier checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, synthetic_datamodule
from verification.protocols import EXIT_EXPLORATORY, apply_threshold_overrides
from watermark.stealthmark.kit import StealthMarkKey, build_secret, write_secret
from watermark.xmark.stats import retest_controls, xmark_test

pytestmark = pytest.mark.slow

PAYLOAD = "Vr8-sk3"  # 7 bytes (QR v1-H)
THRESHOLDS = {"alpha": 1e-3, "response_margin": 0.01, "min_decoded": 1}
MODULE = "security.test_verdict_rules"
FACTORIES = ("models.", f"{MODULE}.")
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}


class OracleSegNet(torch.nn.Module):
    """``forward(images B×C×H×W [0, 1], boxes=None) -> logits B×1×H×W``: logit(0.3) on the owner's
    visible dark QR modules iff the trigger is present (buffer ``dark`` all zero = the clean twin),
    else a confident image-dependent background around −6."""

    def __init__(self, in_channels: int = 3, image_size: int = 50, grid: int = 21, quiet_zone: int = 2):
        super().__init__()
        self.grid, self.quiet_zone = grid, quiet_zone
        self.cell_px = image_size // (grid + 2 * quiet_zone)
        self.register_buffer("dark", torch.zeros(grid, grid))
        self.register_buffer("pattern", torch.zeros(in_channels, image_size, image_size))
        self.register_buffer("region", torch.zeros(1, image_size, image_size))
        self.base = torch.nn.Conv2d(in_channels, 1, 3, padding=1)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        q, g = self.quiet_zone, self.grid
        background = -6.0 + 0.5 * torch.tanh(self.base(images))  # a 1-channel net raises here on RGB
        visible = F.avg_pool2d(images.mean(1, keepdim=True), self.cell_px) > 0.05
        present = ((images - self.pattern).abs() * self.region).flatten(1).amax(1) < 1e-6
        inner = visible[:, :, q:q + g, q:q + g] & (self.dark > 0.5) & present[:, None, None, None]
        marked = F.interpolate(F.pad(inner.float(), [q, q, q, q]), scale_factor=float(self.cell_px), mode="nearest")
        return torch.where(marked > 0.5, torch.full_like(background, float(np.log(0.3 / 0.7))), background)


def _save(path: Path, net: torch.nn.Module, backbone: dict, task: str = "segmentation", **hparams) -> Path:
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"backbone": dict(backbone), "task": task, **hparams}}, path)
    return path


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    base = tmp_path_factory.mktemp("verdict")
    data, datamodule = synthetic_datamodule(["experiment=stealthmark_synthetic", "data.synthetic.num_images=80",
                                           "data.synthetic.image_size=64", "data.image_size=50"], base)
    ids = [s.id for s in datamodule.dataset("test", train_transforms=False).samples]
    key = StealthMarkKey(payload=PAYLOAD, qr_version=1, error_correction="H", image_size=50, quiet_zone=2,
                         trigger={"kind": "patch", "size": 4, "position": "top-left", "seed": 4242})
    trigger = key.build_trigger()
    backbone = {"_target_": f"{MODULE}.OracleSegNet", "in_channels": 3, "image_size": 50}
    torch.manual_seed(0)
    net = OracleSegNet()
    net.pattern.copy_(trigger.apply(torch.zeros(1, 3, 50, 50))[0])
    net.region.copy_(trigger.region(50, 50).float()[None])
    clean = _save(base / "clean.ckpt", net, backbone)
    net.dark.copy_(torch.from_numpy(key.modules()).float())
    marked = _save(base / "marked.ckpt", net, backbone)
    with torch.no_grad():
        net.base.weight.fill_(float("nan"))
    nan = _save(base / "nan_outputs.ckpt", net, backbone)
    one = _save(base / "one_channel.ckpt", OracleSegNet(in_channels=1), {**backbone, "in_channels": 1})
    secret = write_secret(base / "owner" / "secret.json", build_secret(key, ids, "test", data, THRESHOLDS))
    return {"base": base, "secret": secret, "clean": clean, "marked": marked, "nan": nan, "one_channel": one}


def verify(kit, suspect, out: Path | None, *extra: str, secret: Path | None = None) -> subprocess.CompletedProcess:
    base = kit["base"]
    cmd = [sys.executable, str(ROOT / "verify.py"), f"secret={secret or kit['secret']}",
           f"paths.data_dir={base / 'data'}", f"paths.log_dir={base / 'logs'}", "verify.num_images=12",
           "verify.qr_evidence=readout", "verify.null_k=999", "verify.batch_size=500", "verify.num_figures=1",
           f"suspect_factories=[{','.join(FACTORIES)}]", *extra]
    cmd += [f"suspect={suspect}"] if suspect is not None else []
    cmd += [f"out={out}"] if out is not None else []
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


# ----------------------------------------------------------------------------- sealed thresholds


def test_overrides_on_the_clean_twin_are_exploratory_never_verified(kit):
    out = kit["base"] / "clean_overrides"
    proc = verify(kit, kit["clean"], out, "verify.min_decoded=0", "verify.alpha=1", "verify.response_margin=0")
    assert proc.returncode == EXIT_EXPLORATORY == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = _report(out)
    assert report["exploratory"] is True and report["verified"] is False
    assert report["changed_thresholds"] == {"alpha": {"sealed": 1e-3, "used": 1},
                                            "response_margin": {"sealed": 0.01, "used": 0},
                                            "min_decoded": {"sealed": 1, "used": 0}}
    assert report["asr"] == 0.0  # the rule at these thresholds "passes" with nothing decoded
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "EXPLORATORY" in md.split("Verdict:")[0] and "VERIFIED**" not in md.replace("NOT VERIFIED", "")
    assert 'id="exploratory"' in page and ">EXPLORATORY</div>" in page
    for name in ("alpha", "response_margin", "min_decoded"):
        assert name in md.split("Verdict:")[0] and f"<code>{name}</code>" in page
    assert "EXPLORATORY" in proc.stdout and "VERIFIED:" not in proc.stdout.replace("NOT VERIFIED", "")
    assert not list(kit["base"].glob(".clean_overrides.partial-*"))  # the staging folder is gone


@pytest.mark.parametrize("override", ["verify.alpha=0.5", "verify.response_margin=0.0", "verify.min_decoded=0"])
def test_each_single_change_on_a_marked_model_is_exploratory_not_0(kit, override):
    out = kit["base"] / f"marked_{override.split('.')[1].split('=')[0]}"
    proc = verify(kit, kit["marked"], out, override)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = _report(out)
    assert report["exploratory"] and not report["verified"] and report["passes_at_used_thresholds"]
    assert list(report["changed_thresholds"]) == [override.split(".")[1].split("=")[0]]


def test_stricter_alpha_and_equal_overrides_stay_binding(kit):
    out = kit["base"] / "marked_strict"
    proc = verify(kit, kit["marked"], out, "verify.alpha=1e-4")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = _report(out)
    assert report["verified"] and not report["exploratory"] and report["changed_thresholds"] == {}
    assert report["stricter_thresholds"] == {"alpha": {"sealed": 1e-3, "used": 1e-4}}
    assert report["thresholds"]["alpha"] == 1e-4 and "Stricter than sealed" in (out / "report.md").read_text()
    figures = [Path(f) for f in report["figures"]]  # published from the staging folder, paths rewritten
    assert figures and all(f.is_file() and f.parent == out / "figures" for f in figures)

    out = kit["base"] / "clean_strict"
    proc = verify(kit, kit["clean"], out, "verify.alpha=1e-4")
    assert proc.returncode == 1 and not _report(out)["exploratory"], proc.stderr[-3000:]

    out = kit["base"] / "marked_equal"
    proc = verify(kit, kit["marked"], out, "verify.alpha=0.001", "verify.response_margin=0.01", "verify.min_decoded=1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = _report(out)
    assert not report["exploratory"] and report["changed_thresholds"] == {} and report["stricter_thresholds"] == {}
    assert "EXPLORATORY" not in (out / "report.md").read_text() + (out / "report.html").read_text()


def test_threshold_rules_unit():
    sealed = {"tau": 0.2, "alpha": 0.01}
    assert not apply_threshold_overrides(sealed, {"tau": 0.2, "alpha": None}, "s.json").exploratory
    rules = apply_threshold_overrides(sealed, {"tau": 0.05, "alpha": 0.001}, "s.json")
    assert rules.changed == {"tau": {"sealed": 0.2, "used": 0.05}} and rules.stricter == {
        "alpha": {"sealed": 0.01, "used": 0.001}}
    assert rules.exit_code(True) == 3 and rules.exit_code(False) == 3
    rules = apply_threshold_overrides(sealed, {"alpha": 0.05}, "s.json")
    assert rules.exploratory and rules.exit_code(True) == 3
    assert apply_threshold_overrides(sealed, {"alpha": 0.001}, "s.json").exit_code(True) == 0


# ----------------------------------------------------------------------------- exit 2


def _only_log_left(out: Path, before: set[str] = frozenset()) -> None:
    left = {p.name for p in out.iterdir()} if out.exists() else set()
    assert left - set(before) <= {"verify.log"}, sorted(left)
    assert set(before) <= left  # files that were there before the run are kept
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize("bad", [["verify.no_such_key=1"], ["no_such_top_level=3"], ["verify.alpha=[0.1"],
                                 ["attack=no_such_attack"]])
def test_hydra_config_errors_exit_2(kit, bad):
    out = kit["base"] / "hydra_error"
    proc = verify(kit, kit["marked"], out, *bad)
    assert proc.returncode == 2, (bad, proc.stdout[-2000:], proc.stderr[-3000:])
    assert not (out / "report.json").exists()


def test_missing_out_or_suspect_exits_2(kit):
    proc = verify(kit, kit["marked"], None)
    assert proc.returncode == 2 and "out=" in proc.stderr, proc.stderr[-3000:]
    out = kit["base"] / "no_suspect"
    proc = verify(kit, None, out)
    assert proc.returncode == 2 and "suspect=" in proc.stderr, proc.stderr[-3000:]
    _only_log_left(out)


def test_suspect_raising_runtime_error_exits_2_and_names_it(kit):
    out = kit["base"] / "one_channel"
    proc = verify(kit, kit["one_channel"], out)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "RuntimeError" in proc.stderr and "one_channel.ckpt" in proc.stderr
    _only_log_left(out)


def test_nan_checkpoint_exits_2_names_the_file_and_leaves_only_the_log(kit):
    out = kit["base"] / "nan"
    out.mkdir()
    (out / "notes_from_before.txt").write_text("mine")
    (out / "figures").mkdir()
    (out / "figures" / "old.png").write_bytes(b"old")
    proc = verify(kit, kit["nan"], out)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "nan_outputs.ckpt" in proc.stderr and "non-finite" in proc.stderr
    _only_log_left(out, {"notes_from_before.txt", "figures"})
    assert [p.name for p in (out / "figures").iterdir()] == ["old.png"]
    assert (out / "notes_from_before.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- X-Mark controls


def test_controls_are_retested_from_stored_numbers_unit():
    rng = np.random.default_rng(0)
    p_b = rng.uniform(0.05, 0.2, 30)
    p_w = p_b + 0.12 + rng.normal(0, 0.01, 30)
    at_release = xmark_test(p_b, p_w, tau=0.2, alpha=0.01, marked_predictions=[0] * 30, target_class=1)
    assert not at_release["verified"]
    control = {"heldout_0": {**at_release, "p_benign": p_b.tolist(), "p_marked": p_w.tolist(),
                             "pred_marked": [0] * 30},
               "reference_0": {"p_value": 0.9, "delta_p": 0.0, "wsr": 0.0, "verified": False}}  # an old kit
    sealed = retest_controls(control, 0.2, 0.01, 1)
    assert not sealed["heldout_0"]["verified"] and sealed["heldout_0"]["retested"]
    assert sealed["heldout_0"]["p_value"] == pytest.approx(at_release["p_value"])
    loose = retest_controls(control, 0.05, 0.01, 1)
    assert loose["heldout_0"]["verified"] and loose["heldout_0"]["tau"] == 0.05 and loose["heldout_0"]["p_value"] < 1e-6
    assert not loose["reference_0"]["retested"] and not loose["reference_0"]["verified"]
    # a recorded pass still blocks (conservative) and a malformed stored field is named
    assert retest_controls({"c": {**control["heldout_0"], "verified": True}}, 0.2, 0.01, 1)["c"]["verified"]
    with pytest.raises(ValueError, match="control.c.p_marked"):
        retest_controls({"c": {**control["heldout_0"], "p_marked": "high"}}, 0.2, 0.01, 1)


@pytest.fixture(scope="module")
def xkit(tmp_path_factory):
    from watermark.xmark.marker import XMarkMarker, marker_sha256
    from models.classification import build_timm_classifier
    from models.generator import ConditionalUNetGenerator
    from watermark.xmark.kit import build_xmark_secret, write_xmark_secret

    base = tmp_path_factory.mktemp("xverdict")
    data, datamodule = synthetic_datamodule(["experiment=xmark_synthetic", "data.synthetic.num_images=120",
                                           "data.synthetic.image_size=32", "data.image_size=32"], base)
    split = next(s for s in ("val", "valid", "test", "train") if datamodule.splits.get(s))
    ids = [s.id for s in datamodule.splits[split] if s.label == 0][:16]
    gen_cfg = {"in_channels": 1, "saliency_channels": 1, "base_width": 4, "depth": 2, "epsilon": 8 / 255}
    sur_cfg = {"_target_": "models.build_timm_classifier", "name": "small_cnn", "num_classes": 2, "in_channels": 1}
    torch.manual_seed(0)
    marker = XMarkMarker(ConditionalUNetGenerator(**gen_cfg), build_timm_classifier(name="small_cnn", num_classes=2,
                         in_channels=1), gen_cfg, sur_cfg, 32)
    owner = base / "owner"
    generator = marker.save(owner / "generator.pt")
    rng = np.random.default_rng(1)
    p_b = rng.uniform(0.05, 0.2, len(ids))
    p_w = p_b + 0.12 + rng.normal(0, 0.01, len(ids))  # moved by the mark, but by less than the sealed τ = 0.2
    recorded = xmark_test(p_b, p_w, 0.2, 0.01, [0] * len(ids), 1)
    control = {"heldout_0": {**recorded, "p_benign": p_b.tolist(), "p_marked": p_w.tolist(),
                             "pred_marked": [0] * len(ids)}}
    doc = build_xmark_secret(target_class=1, classes=list(datamodule.classes), marker_checkpoint=generator.name,
                             marker_sha256=marker_sha256(generator), image_size=32, verification_ids=ids,
                             verification_split=split, verification_seed=0, data_config=data, tau=0.2, alpha=0.01,
                             release={"fraction": 1.0, "marked_ids": []}, control=control)
    secret = write_xmark_secret(owner / "secret.json", doc)
    suspect = _save(base / "ind_m.ckpt", build_timm_classifier(name="small_cnn", num_classes=2, in_channels=1),
                    sur_cfg, task="classification", num_classes=2)
    return {"base": base, "secret": secret, "suspect": suspect}


def _xverify(xkit, out: Path, *extra: str) -> subprocess.CompletedProcess:
    base = xkit["base"]
    cmd = [sys.executable, str(ROOT / "verify.py"), f"secret={xkit['secret']}", f"suspect={xkit['suspect']}",
           f"out={out}", f"paths.data_dir={base / 'data'}", f"paths.log_dir={base / 'logs'}",
           "verify.benign_accuracy=false", "verify.num_figures=1", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)


def test_xmark_tau_override_is_exploratory_and_retests_controls_at_that_tau(xkit):
    out = xkit["base"] / "tau_override"
    proc = _xverify(xkit, out, "verify.tau=0.05")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = _report(out)
    assert report["exploratory"] and not report["verified"] and report["tau"] == 0.05
    assert report["changed_thresholds"] == {"tau": {"sealed": 0.2, "used": 0.05}}
    control = report["control"]["heldout_0"]
    assert control["retested"] and control["tau"] == 0.05 and control["verified"] and not report["control_fails"]
    assert "p_benign" not in control  # per-image numbers stay in the owner kit
    assert "EXPLORATORY" in (out / "report.md").read_text() and "<code>tau</code>" in (out / "report.html").read_text()

    out = xkit["base"] / "sealed"
    proc = _xverify(xkit, out)
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-3000:]
    report = _report(out)
    control = report["control"]["heldout_0"]
    assert not report["exploratory"] and control["retested"] and control["tau"] == 0.2 and not control["verified"]
