"""Train any medmark objective from configs.

    python train.py experiment=task_seg_synthetic
    python train.py experiment=task_cls_synthetic trainer=ddp_cpu
    python train.py -m experiment=task_seg_synthetic backbone=unet_resnet34,sam_tiny

Also ``medmark train ...`` (medmark/cli.py). Exit codes: 0 done, 2 bad input (dataset, config
-- Hydra's own errors included --, missing weights) with a message naming the file or key at
fault. In a multirun (``-m``) a job with bad input is recorded as failed (its ``job.json``
and the comparison row say why) and the other jobs still run; the multirun then exits non-zero.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import utils.resolvers  # noqa: F401  (registers ${len:...})
from datamodules.samples import DatasetError
from medmark import CONFIG_DIR
from medmark.cli import run_hydra_main
from utils.run import run_training

log = logging.getLogger("medmark")


class JobInputError(RuntimeError):
    """Bad input in one job of a multirun: an ``Exception`` (not ``SystemExit``), so Hydra's
    launcher records this job as failed and goes on with the others."""


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


_TASK_RAN: list[bool] = []  # set once the task function is entered (cli() maps Hydra's earlier errors to 2)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    _TASK_RAN.append(True)
    try:
        OmegaConf.resolve(cfg)  # fail on a bad key before anything is built
        return run_training(cfg)
    except (DatasetError, FileNotFoundError, ValueError, OmegaConfBaseException, InstantiationException) as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        print(f"error: {exc}", file=sys.stderr)
        if _in_multirun():
            raise JobInputError(f"{type(exc).__name__}: {exc}") from exc
        sys.exit(2)


def cli(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``python train.py ...`` / ``medmark train ...``: the exit code (Hydra's own errors -> 2)."""
    return run_hydra_main(main, argv, prog, task_ran=lambda: bool(_TASK_RAN))


if __name__ == "__main__":
    sys.exit(cli())
