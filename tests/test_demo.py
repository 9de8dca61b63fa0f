"""`make demo`'s driver (utils/demo_stealthmark.py): what it asks train.py and verify.py to do, and
how it turns their exit codes into its own -- with the two programs replaced by recorders."""

from __future__ import annotations

import json

import pytest

import utils.demo_stealthmark as demo


def _fake_programs(monkeypatch, out, verify_codes: dict[str, int]) -> list[list[str]]:
    """Replace the subprocess runner: training writes summary.json, verification report.json."""
    calls: list[list[str]] = []

    def run(cmd: list[str], what: str) -> int:
        calls.append(cmd)
        args = dict(a.split("=", 1) for a in cmd[2:] if "=" in a)
        if cmd[1] == "train.py":
            run_dir = out / ("clean" if "method=task" in cmd else "marked")
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "summary.json").write_text(json.dumps(
                {"best_checkpoint": str(run_dir / "best.ckpt"), "fit": {"val/dice": 0.8}, "test": {"test/dice": 0.79}}))
            return 0
        name = "clean" if "/clean/" in args["suspect"] else "marked"
        report_dir = out / f"verify_{name}"
        report_dir.mkdir(parents=True, exist_ok=True)
        code = verify_codes[name]
        (report_dir / "report.json").write_text(json.dumps(
            {"verified": code == 0, "p_value": 1e-4 if code == 0 else 1.0, "response_p_value": 1e-20,
             "qr_p_value": 1e-4, "decoded": [{"matches": code == 0}], "task": {"mask_agreement": 0.99}}))
        return code

    monkeypatch.setattr(demo, "_run", run)
    return calls


def test_demo_verifies_ten_lime_images_at_400_samples_with_the_marked_runs_kit(tmp_path, monkeypatch, capsys):
    calls = _fake_programs(monkeypatch, tmp_path, {"marked": 0, "clean": 1})
    assert demo.main(["--out", str(tmp_path), "trainer.precision=32-true"]) == 0
    train_clean, train_marked, verify_clean, verify_marked = calls
    assert "method=task" in train_clean and "trainer.precision=32-true" in train_clean
    assert f"init_weights={tmp_path / 'clean' / 'best.ckpt'}" in train_marked
    assert "trainer.max_epochs=30" in train_marked and "method.scheduler=null" in train_marked
    for cmd in (verify_clean, verify_marked):
        assert cmd[1] == "verify.py"
        assert f"secret={tmp_path / 'marked' / 'owner' / 'secret.json'}" in cmd  # both against the owner's kit
        assert "verify.num_lime_images=10" in cmd and "verify.num_samples=400" in cmd
        assert not [a for a in cmd if a.startswith("trainer.")]  # training overrides stay out of verify.py
    assert "story holds" in capsys.readouterr().out


@pytest.mark.parametrize("codes", [{"marked": 1, "clean": 1}, {"marked": 0, "clean": 0}, {"marked": 0, "clean": 2}])
def test_demo_exits_1_unless_marked_verifies_and_clean_is_refused(tmp_path, monkeypatch, capsys, codes):
    _fake_programs(monkeypatch, tmp_path, codes)
    assert demo.main(["--out", str(tmp_path), "--lime-samples", "1500", "--lime-images", "3"]) == 1
    assert "does NOT hold" in capsys.readouterr().out
