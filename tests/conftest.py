"""Shared fixtures: config composition and running train.py on tiny budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import utils.resolvers  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

os.environ.setdefault("WANDB_MODE", "disabled")


def worker_threads(workers: int, cpus: int) -> int:
    """torch threads for each of ``workers`` pytest-xdist workers on ``cpus`` CPUs: an equal share, at least 1.
    Every worker at torch's default (one thread per CPU) would run workers × CPUs threads on the CPUs."""
    return max(1, cpus // max(1, workers))


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS reports one, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Set before torch starts its thread pool in this worker; train.py / verify.py subprocesses inherit it.
# A value the user exported wins.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(worker_threads(int(os.environ["PYTEST_XDIST_WORKER_COUNT"]),
                                                                 usable_cpus())))


def compose_config(overrides: list[str], tmp_path: Path, config_name: str = "train"):
    """Compose a real config; paths point into ``tmp_path`` (no Hydra run dir needed)."""
    base = [
        f"paths.root_dir={ROOT}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.output_dir={tmp_path / 'run'}",
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=config_name, overrides=base + list(overrides))


def synthetic_datamodule(overrides: list[str], tmp_path: Path):
    """(resolved data config dict, its data module generated and set up) of a composed config;
    the synthetic data is written under ``tmp_path``."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(compose_config(overrides, tmp_path).data, resolve=True)
    datamodule = instantiate(data)
    datamodule.prepare_data()
    datamodule.setup()
    return data, datamodule


# Tiny but real: the experiment configs, shrunk. Shared by the end-to-end tests.
TINY_SEG = [
    "experiment=task_seg_synthetic",
    "data.synthetic.num_images=24",
    "data.synthetic.image_size=48",
    "data.image_size=32",
    "data.batch_size=4",
    "trainer.max_epochs=1",
    "logger=none",
]
TINY_CLS = [
    "experiment=task_cls_synthetic",
    "backbone=small_cnn",
    "data.synthetic.num_images=48",
    "data.synthetic.image_size=32",
    "data.image_size=32",
    "data.batch_size=8",
    "trainer.max_epochs=1",
    "logger=none",
]


def run_train(overrides: list[str], tmp_path: Path, run_name: str = "run", timeout: int = 600,
              env: dict | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    """Run ``python train.py`` in a subprocess (as a user would); return (process, run dir)."""
    run_dir = tmp_path / run_name
    cmd = [
        sys.executable, str(ROOT / "train.py"), *overrides,
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.run.dir={run_dir}",
    ]
    full_env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    return proc, run_dir


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture
def tiny_seg() -> list[str]:
    return list(TINY_SEG)


@pytest.fixture
def tiny_cls() -> list[str]:
    return list(TINY_CLS)
