"""verify.py as a user runs it: exit codes 0 / 1 / 2, report.json, attacks, bad input named.

Uses the tiny StealthMark run of test_stealthmark.py (trained once per pytest process) and
a clean twin trained with ``method=task`` on the same config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, read_summary
from test_stealthmark import PAYLOAD, TINY_STEALTHMARK, marked_run, train_run

pytestmark = pytest.mark.slow

REPORT_KEYS = {"method", "verified", "p_value", "response_p_value", "qr_p_value", "asr", "decoded", "bit_accuracy",
               "queries", "seconds", "readout", "task", "attack", "thresholds", "figures"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("verify_cli")
    marked_dir, _ = marked_run(base)
    # the clean twin: same data, backbone and schedule settings, method=task (no key arguments)
    clean = [o for o in TINY_STEALTHMARK if not o.startswith(("method.payload", "method.trigger"))]
    clean_dir, _ = train_run(base, "clean", clean + ["method=task", "trainer.max_epochs=6"])
    return base, marked_dir, clean_dir


def verify(base: Path, secret: Path, suspect: Path | str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "verify.py"), f"secret={secret}", f"suspect={suspect}", f"out={out}",
           f"paths.data_dir={base / 'data'}", f"paths.log_dir={base / 'logs'}",
           # CPU-sized: LIME at its minimum sample count, a smaller Monte Carlo null
           "verify.num_images=12", "verify.num_lime_images=2", "verify.num_samples=1323", "verify.batch_size=500",
           "verify.null_k=999", "suspect_factories=[models.,test_stealthmark.]", *extra]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_marked_model_verifies_with_exit_0_and_a_complete_report(runs):
    base, marked_dir, _ = runs
    out = base / "report_marked"
    # channel 2 from the per-cell readout: the tiny test model is not trained long enough for LIME
    # at its minimum sample count (test_stealthmark.py says why); the clean twin below uses LIME
    proc = verify(base, marked_dir / "owner" / "secret.json", read_summary(marked_dir)["best_checkpoint"], out,
                  "verify.qr_evidence=readout")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["verified"] and report["method"] == "stealthmark"
    assert report["response_p_value"] < 1e-6 and report["qr_p_value"] == pytest.approx(1 / 1000)
    assert report["bit_accuracy"] > 0.65 and report["decoded"][0]["id"]
    assert report["queries"] == 2 * 12 and report["qr"]["evidence"] == "readout"
    assert report["p_value"] == max(report["response_p_value"], report["qr_p_value"])
    assert (out / "report.md").read_text().startswith("# StealthMark ownership verification")
    figures = [Path(f) for f in report["figures"]]
    assert any(f.name == "qr_null.png" for f in figures) and all(f.is_file() for f in figures)
    assert "VERIFIED" in proc.stdout and PAYLOAD not in proc.stdout + proc.stderr  # the payload is for the report only


def test_clean_twin_is_not_verified_exit_1(runs):
    base, marked_dir, clean_dir = runs
    out = base / "report_clean"
    proc = verify(base, marked_dir / "owner" / "secret.json", read_summary(clean_dir)["best_checkpoint"], out)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert not report["verified"] and report["asr"] == 0.0 and report["qr"]["evidence"] == "lime"
    assert report["response_p_value"] >= 0.01 and report["qr_p_value"] >= 0.01
    assert report["queries"] == 2 * 12 + 2 * 1323
    assert report["readout"]["decoded_triggered"] == 0 and report["readout"]["decoded_clean"] == 0
    assert "NOT VERIFIED" in proc.stdout


def test_attacks_run_before_verification(runs):
    base, marked_dir, _ = runs
    secret, best = marked_dir / "owner" / "secret.json", read_summary(marked_dir)["best_checkpoint"]
    proc = verify(base, secret, best, base / "pruned", "attack=prune", "attack.amount=0.3",
                  "verify.qr_evidence=readout")
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    attack = json.loads((base / "pruned" / "report.json").read_text())["attack"]
    assert attack["name"] == "prune" and attack["sparsity"] == pytest.approx(0.3, abs=1e-3)
    proc = verify(base, secret, best, base / "finetuned", "attack=finetune", "attack.max_batches=2",
                  "verify.qr_evidence=readout")
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    attack = json.loads((base / "finetuned" / "report.json").read_text())["attack"]
    assert attack["name"] == "finetune" and attack["steps"] == 2


def test_bad_input_exits_2_naming_the_file_and_field(runs, tmp_path):
    base, marked_dir, _ = runs
    secret = marked_dir / "owner" / "secret.json"
    best = read_summary(marked_dir)["best_checkpoint"]
    broken = json.loads(secret.read_text())
    broken["key"]["qr"]["version"] = "one"
    bad_secret = tmp_path / "tampered_secret.json"
    bad_secret.write_text(json.dumps(broken))
    proc = verify(base, bad_secret, best, tmp_path / "r1")
    assert proc.returncode == 2
    assert "tampered_secret.json" in proc.stderr and "key.qr.version" in proc.stderr

    proc = verify(base, tmp_path / "no_such_secret.json", best, tmp_path / "r2")
    assert proc.returncode == 2 and "no_such_secret.json" in proc.stderr

    proc = verify(base, secret, tmp_path / "no_such.ckpt", tmp_path / "r3")
    assert proc.returncode == 2 and "no_such.ckpt" in proc.stderr

    proc = verify(base, secret, best, tmp_path / "r4", "data.image_size=75")
    assert proc.returncode == 2 and "data.image_size=50" in proc.stderr

    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "verify.py"), f"suspect={best}", f"out={tmp_path / 'r5'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "secret" in proc.stderr

    # LIME settings are checked before the suspect is loaded: the key is named, nothing is written
    proc = verify(base, secret, best, tmp_path / "r6", "verify.num_samples=99")  # per-cell floor: 100
    assert proc.returncode == 2 and "verify.num_samples must be at least 100" in proc.stderr
    assert not (tmp_path / "r6" / "report.json").exists() and "load suspect" not in proc.stdout + proc.stderr


def test_lime_settings_are_refused_below_the_floor_of_their_surrogate(runs):
    from omegaconf import OmegaConf

    from verification.protocols import BadInput
    from verification.stealthmark import check_lime_settings
    from watermark.stealthmark.kit import read_secret

    _, marked_dir, _ = runs
    _, key = read_secret(marked_dir / "owner" / "secret.json")

    def check(**verify_settings):
        settings = {"qr_evidence": "lime", "lime_surrogate": "per_cell", "num_samples": 1500, **verify_settings}
        check_lime_settings(OmegaConf.create({"verify": settings}), key)

    check(num_samples=100)  # the per-cell floor itself is accepted
    with pytest.raises(BadInput, match="verify.num_samples must be at least 100 with verify.lime_surrogate=per_cell"):
        check(num_samples=99)
    floor = 3 * key.grid_size**2  # joint ridge: more samples than the G² unknowns
    check(lime_surrogate="joint", num_samples=floor)
    with pytest.raises(BadInput, match=f"at least {floor} with verify.lime_surrogate=joint .* got {floor - 1}"):
        check(lime_surrogate="joint", num_samples=floor - 1)
    with pytest.raises(BadInput, match="verify.lime_surrogate must be one of"):
        check(lime_surrogate="ridge")
    check(qr_evidence="readout", num_samples=1)  # the per-cell readout runs no LIME
