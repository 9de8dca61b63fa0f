"""The multirun comparison (utils/comparison.py): table builder on fake job folders, the Hydra
callback's bookkeeping, and a real two-backbone ``train.py -m`` (slow)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, TINY_SEG
from utils.comparison import ComparisonCallback, main, redact_overrides, write_comparison


def _summary(dice: float, params: int, **extra) -> dict:
    return {
        "task": "segmentation", "monitor": "val/dice", "best_score": dice, "epochs": 1, "seconds": 12.5,
        "fit": {"val/dice": dice, "val/loss": 0.9, **extra.get("fit", {})},
        "test": {"test/dice": dice - 0.01, "test/iou": dice / 2, "test/loss": 0.8, "test/loss/bce": 0.4},
        "resources": {"num_parameters": params, "seconds_per_epoch": 3.25, "peak_memory_mib": 812.0,
                      "peak_memory_kind": "cpu_peak_rss"},
    }


def _job(root: Path, num: int, overrides: list[str], summary: dict | None = None, job: dict | None = None) -> Path:
    d = root / str(num)
    d.mkdir(parents=True)
    (d / "job.json").write_text(json.dumps({"num": num, "overrides": overrides, "choices": {
        "backbone": next(o.split("=")[1] for o in overrides if o.startswith("backbone=")), "method": "task"},
        **(job or {"status": "completed"})}))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    return d


@pytest.fixture
def fake_sweep(tmp_path) -> Path:
    root = tmp_path / "multi"
    base = ["experiment=task_seg_synthetic", "trainer.max_epochs=1"]
    _job(root, 0, base + ["backbone=unet_resnet18"], _summary(0.61, 14_328_209))
    marked = _job(root, 1, base + ["backbone=sam_tiny"],
                  _summary(0.42, 1_200_000, fit={"val/wm_readout_bit_accuracy": 0.93, "val/wm_response_log10p": -4.2}))
    (marked / "owner").mkdir()
    (marked / "owner" / "secret.json").write_text("{}")
    (marked / "release.json").write_text(json.dumps({"proxy": {"wsr": 0.8, "p_value": 1e-5},
                                                     "control": {"ref": {"wsr": 0.1}}, "psnr_mean": 41.0}))
    _job(root, 2, base + ["backbone=vgg16"], None, {"status": "failed", "error": "ValueError: no such backbone"})
    silent = root / "3"  # killed before Hydra's on_job_end: no job.json, no summary; the log says why
    silent.mkdir()
    (silent / "train.log").write_text("[2026-01-01 00:00:00,000][medmark][INFO] - start\n"
                                      "[2026-01-01 00:00:01,000][medmark][ERROR] - InstantiationException: Error "
                                      "in call to target 'x':\nTypeError('bad kwarg')\nfull_key: method\n")
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_table_has_one_row_per_job_and_failed_runs_do_not_crash_it(fake_sweep):
    rows, markdown = write_comparison(fake_sweep)
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed"]
    assert [r["label"] for r in rows[:3]] == ["backbone=unet_resnet18", "backbone=sam_tiny", "backbone=vgg16"]
    assert rows[2]["error"] == "ValueError: no such backbone"
    assert "TypeError('bad kwarg')" in rows[3]["error"] and "InstantiationException" in rows[3]["error"]
    with open(fake_sweep / "comparison.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 4
    first, second = table[0], table[1]
    assert first["test/dice"] == "0.6" and first["num_parameters"] == "14328209"
    assert first["seconds_per_epoch"] == "3.25" and first["peak_memory_kind"] == "cpu_peak_rss"
    assert "test/loss" not in table[0] and "test/loss/bce" not in table[0]
    # watermark evidence where the run has some, empty where it has none
    assert second["wm/wm_readout_bit_accuracy"] == "0.93" and second["wm/release_proxy_wsr"] == "0.8"
    assert second["wm/owner_kit"] == "yes" and first["wm/wm_readout_bit_accuracy"] == ""
    assert table[2]["status"] == "failed" and table[2]["best_score"] == ""
    assert "| failed |" in markdown and (fake_sweep / "comparison.md").read_text().count("\n| ") == 5
    png = fake_sweep / "comparison.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_rebuilds_and_rejects_a_non_sweep(fake_sweep, tmp_path, capsys):
    assert not (fake_sweep / "comparison.csv").exists()
    assert main([str(fake_sweep), "--no-plot"]) == 0
    assert (fake_sweep / "comparison.csv").is_file() and not (fake_sweep / "comparison.png").exists()
    assert "backbone=sam_tiny" in capsys.readouterr().out
    assert main([str(tmp_path / "nowhere")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert main([]) == 2


def test_secret_overrides_are_hidden_in_job_records_and_multirun_yaml(tmp_path):
    secret = ["method.payload", "method.trigger"]
    assert redact_overrides(["method.payload=OWNER42", "+method.trigger.seed=7", "method.epsilon=0.3"], secret) == \
        ["method.payload=<secret>", "+method.trigger.seed=<secret>", "method.epsilon=0.3"]
    sweep_dir, job_dir = tmp_path / "multi", tmp_path / "multi" / "0"
    job_dir.mkdir(parents=True)
    (sweep_dir / "multirun.yaml").write_text(OmegaConf.to_yaml({
        "method": {"payload": "OWNER42", "trigger": {"seed": 7}, "epsilon": 0.3},
        "hydra": {"overrides": {"task": ["method.payload=OWNER42", "backbone=sam_tiny,unet_resnet18"]},
                  "job": {"override_dirname": "backbone=sam_tiny,unet_resnet18,method.payload=OWNER42"}}}))
    config = OmegaConf.create({
        "secret_keys": secret,
        "hydra": {"mode": "MULTIRUN", "sweep": {"dir": str(sweep_dir)},
                  "runtime": {"output_dir": str(job_dir),
                              "choices": {"backbone": "sam_tiny", "hydra/launcher": "basic"}},
                  "job": {"num": 0}, "overrides": {"task": ["method.payload=OWNER42", "backbone=sam_tiny"]}}})
    from hydra.types import RunMode

    config.hydra.mode = RunMode.MULTIRUN
    callback = ComparisonCallback()
    callback.on_job_start(config=config)
    assert "OWNER42" not in (sweep_dir / "multirun.yaml").read_text()
    saved = OmegaConf.load(sweep_dir / "multirun.yaml")
    assert saved.method.epsilon == 0.3 and saved.method.trigger == "<secret>"
    assert saved.hydra.job.override_dirname == "backbone=sam_tiny,unet_resnet18,method.payload=<secret>"
    job = json.loads((job_dir / "job.json").read_text())
    assert job["overrides"] == ["method.payload=<secret>", "backbone=sam_tiny"] and job["status"] == "running"
    assert job["choices"] == {"backbone": "sam_tiny"}

    class Return:  # hydra.core.utils.JobReturn's fields the callback reads
        class status:  # noqa: N801
            name = "FAILED"
        _return_value = RuntimeError("boom")

    callback.on_job_end(config=config, job_return=Return())
    job = json.loads((job_dir / "job.json").read_text())
    assert job["status"] == "failed" and job["error"] == "RuntimeError: boom"
    rows = list(csv.DictReader(open(sweep_dir / "comparison.csv")))
    assert rows[0]["status"] == "failed" and "boom" in rows[0]["error"]


def test_a_plain_run_is_left_alone(tmp_path):
    from hydra.types import RunMode

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "runtime": {"output_dir": str(tmp_path)}}})
    config.hydra.mode = RunMode.RUN
    ComparisonCallback().on_job_start(config=config)
    ComparisonCallback().on_job_end(config=config, job_return=None)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_two_backbone_multirun_writes_the_comparison(tmp_path):
    sweep_dir = tmp_path / "multi"
    overrides = [o for o in TINY_SEG if not o.startswith("logger=")]
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *overrides, "backbone=unet_resnet18,sam_tiny",
           "logger=none", "eval_untrained=false", f"paths.data_dir={tmp_path / 'data'}",
           f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(sweep_dir / "comparison.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["backbone"] for r in rows] == ["unet_resnet18", "sam_tiny"]
    assert [r["label"] for r in rows] == ["backbone=unet_resnet18", "backbone=sam_tiny"]
    assert all(r["status"] == "ok" for r in rows)
    for row in rows:
        assert 0.0 <= float(row["best_score"]) <= 1.0 and float(row["test/dice"]) >= 0.0
        assert int(row["num_parameters"]) > 0 and float(row["seconds_per_epoch"]) > 0
        assert float(row["peak_memory_mib"]) > 0 and row["peak_memory_kind"] in ("cpu_peak_rss", "cuda_max_allocated")
    assert rows[0]["num_parameters"] != rows[1]["num_parameters"]
    assert (sweep_dir / "comparison.png").is_file() and (sweep_dir / "comparison.md").is_file()
    assert "comparison of 2 runs" in proc.stdout and "| backbone=sam_tiny |" in proc.stdout
    for num in ("0", "1"):
        assert json.loads((sweep_dir / num / "job.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_multirun_and_secret_overrides_are_not_printed(tmp_path):
    sweep_dir = tmp_path / "multi"
    overrides = [o for o in TINY_SEG if not o.startswith("logger=")]
    # job 0: bad input (exit 2 in a plain run); job 1 must still run. `note` is declared secret.
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *overrides, "data.on_bad_sample=bogus,error",
           "+note=OWNER-SECRET-42", "secret_keys=[note]", "logger=none", "eval_untrained=false",
           f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0, "a multirun with a failed job must not exit 0"
    failed = json.loads((sweep_dir / "0" / "job.json").read_text())
    done = json.loads((sweep_dir / "1" / "job.json").read_text())
    assert failed["status"] == "failed" and "data.on_bad_sample" in failed["error"]
    assert done["status"] == "completed" and (sweep_dir / "1" / "summary.json").is_file()
    with open(sweep_dir / "comparison.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert "note=<secret>" in proc.stdout + proc.stderr  # the launcher's "#0 : ..." line, redacted
    assert "OWNER-SECRET-42" not in proc.stdout + proc.stderr
