"""medmark as a package: pyproject, wheel contents, the ``medmark`` command, eval.py, curves.png."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_SEG, read_summary, run_train

ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
COMMANDS = ("train", "verify", "evaluate")


def medmark(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m medmark ...`` (the console script's code, installed or not)."""
    return subprocess.run([sys.executable, "-m", "medmark", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------- pyproject


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_declares_build_backend_script_and_the_pinned_dependencies():
    project = _pyproject()
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    assert project["project"]["scripts"] == {"medmark": "medmark.cli:main"}
    pins = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    test_pins = [p for p in pins if p.split("==")[0] in ("pytest", "pytest-xdist", "hypothesis")]
    assert sorted(project["project"]["optional-dependencies"]["test"]) == sorted(test_pins)
    # requirements.txt is the lock; the package's runtime dependencies are the same pins
    assert sorted(project["project"]["dependencies"]) == sorted(set(pins) - set(test_pins))
    assert "wheel cache" not in (ROOT / "requirements.txt").read_text()  # no machine-specific note


def test_wheel_ships_configs_entry_modules_and_packages_but_no_tests(tmp_path):
    source = tmp_path / "src"  # a copy: the build's build/ and *.egg-info stay out of the checkout
    top_level_skip = {".git", ".venv", "logs", "data", "weights", "wandb", "build", ".hypothesis", ".pytest_cache",
                      "outputs", "multirun", "medmark.egg-info"}

    def skip(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n == "__pycache__" or (Path(folder) == ROOT and n in top_level_skip)}

    shutil.copytree(ROOT, source, ignore=skip)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "wheel"), "-q"], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("medmark-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("train.py", "verify.py", "eval.py", "medmark/cli.py", "utils/run.py", "models/safe_reader.py",
                 "configs/train.yaml", "configs/eval.yaml", "configs/verify.yaml", "configs/paths/default.yaml",
                 "configs/experiment/task_seg_synthetic.yaml", "configs/data/synthetic_polyp.yaml"):
        assert name in names, f"{name} missing from {wheel.name}"
    assert not any(n.startswith(("tests/", "docs/", "benchmarks/")) or "__pycache__" in n for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "medmark = medmark.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# ----------------------------------------------------------------------------- the command


def test_help_lists_the_commands_and_bad_commands_exit_2():
    shown = medmark("--help")
    assert shown.returncode == 0
    for command in COMMANDS:
        assert f"  {command} " in shown.stdout
    assert medmark().returncode == 2  # no command
    unknown = medmark("frobnicate")
    assert unknown.returncode == 2 and "unknown command 'frobnicate'" in unknown.stderr


def test_verify_without_arguments_exits_2_naming_out():
    proc = medmark("verify")
    assert proc.returncode == 2 and "out= is required" in proc.stderr


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_config_error_exits_2_not_hydras_1(command, tmp_path):
    proc = medmark(command, "no_such_key=1", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no_such_key" in proc.stderr
    assert not (tmp_path / "logs").exists()  # nothing ran


def test_installed_console_script_when_the_venv_has_it():
    script = Path(sys.executable).parent / "medmark"
    if not script.exists():
        pytest.skip("medmark is not installed in this environment (make venv / pip install -e . installs it)")
    assert subprocess.run([str(script), "verify"], env=ENV, capture_output=True, timeout=120).returncode == 2
    shown = subprocess.run([str(script), "--help"], env=ENV, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and all(f"  {c} " in shown.stdout for c in COMMANDS)


# ----------------------------------------------------------------------------- train -> curves, eval


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("package_run")
    proc, run_dir = run_train([*TINY_SEG, "trainer.max_epochs=2"], tmp)  # logger=none: CSV is on anyway
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, run_dir


def test_training_run_writes_csv_metrics_and_curves_png(tiny_run):
    _, run_dir = tiny_run
    curves = run_dir / "figures" / "curves.png"
    assert curves.is_file() and curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_summary(run_dir)["curves"] == str(curves)
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val/dice" in header and "train/loss_epoch" in header


def _eval(tmp: Path, *overrides: str, out: Path) -> subprocess.CompletedProcess:
    tiny_data = [o for o in TINY_SEG if o.startswith(("experiment=", "data."))]
    cmd = [sys.executable, str(ROOT / "eval.py"), *tiny_data, *overrides, f"paths.data_dir={tmp / 'data'}",
           f"paths.log_dir={tmp / 'logs'}", f"hydra.run.dir={out}"]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def test_eval_reproduces_the_runs_test_metrics_without_training(tiny_run):
    tmp, run_dir = tiny_run
    trained = read_summary(run_dir)
    out = tmp / "eval_test"
    proc = _eval(tmp, f"ckpt_path={trained['best_checkpoint']}", "split=test", out=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"] == "test" and summary["checkpoint"] == trained["best_checkpoint"]
    # train.py tests the same best checkpoint on the same split: the numbers must agree
    assert summary["metrics"]["test/dice"] == pytest.approx(trained["test"]["test/dice"], abs=1e-5)
    assert {Path(f).name for f in summary["figures"]} == {"eval_test_panel.png", "eval_test_metrics.png"}
    assert all(Path(f).is_file() for f in summary["figures"])
    assert not (out / "checkpoints").exists()  # no training


def test_eval_refuses_missing_foreign_or_absent_checkpoints_with_exit_2(tiny_run):
    tmp, run_dir = tiny_run
    garbage = tmp / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    cases = {
        "none": ([], "ckpt_path= is required"),
        "missing": ([f"ckpt_path={tmp / 'nowhere.ckpt'}"], "nowhere.ckpt"),
        "garbage": ([f"ckpt_path={garbage}"], "garbage.ckpt"),
        "split": ([f"ckpt_path={read_summary(run_dir)['best_checkpoint']}", "split=train"], "split"),
    }
    for name, (overrides, named) in cases.items():
        out = tmp / f"eval_bad_{name}"
        proc = _eval(tmp, *overrides, out=out)
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert named in proc.stderr, (name, proc.stderr[-2000:])
        assert not (out / "summary.json").exists(), name


def test_medmark_train_from_another_directory_puts_data_and_logs_there(tmp_path):
    proc = medmark("train", *TINY_SEG, "test=false", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "run" / "figures" / "curves.png").is_file()
    assert any((tmp_path / "data").iterdir())  # paths.root_dir = the working directory
    assert not (ROOT / "run").exists()


def test_curves_keep_epoch_values_and_skip_test_step_and_garbage_cells(tmp_path):
    from utils.loggers import plot_curves, read_epoch_curves

    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train/loss_step,train/loss_epoch,val/dice,test/dice\n"
                       "0,0,5,,0.1,\n"      # the untrained model's validation, replaced by epoch 0's
                       "0,1,nan,2.0,0.5,\n"
                       "1,2,3,1.0,abc,\n"   # a garbage cell is skipped, not a crash
                       "x,3,,,,0.9\n")      # no epoch: skipped
    assert read_epoch_curves(metrics) == {"train/loss": {0: 2.0, 1: 1.0}, "val/dice": {0: 0.5}}
    only_test = tmp_path / "only_test.csv"
    only_test.write_text("epoch,step,test/dice\n0,5,0.9\n")
    assert plot_curves(only_test, tmp_path / "figures" / "curves.png") is None
    assert not (tmp_path / "figures").exists()  # nothing to plot: nothing written
