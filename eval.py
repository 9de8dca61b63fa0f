"""Evaluate a trained checkpoint on one split: metrics + figures, no training.

    python eval.py experiment=task_seg_synthetic ckpt_path=<run>/checkpoints/last.ckpt
    python eval.py experiment=task_seg_synthetic ckpt_path=<ckpt> split=val
    medmark evaluate ...                                              # the same (medmark/cli.py)

Config: configs/eval.yaml (train.yaml + ``ckpt_path``, ``split``). Writes ``<run>/summary.json``
and ``<run>/figures/`` (utils/evaluate.py). Exit codes: 0 done, 2 bad input (config, checkpoint,
data) with a message naming the file or key at fault.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import utils.resolvers  # noqa: F401  (registers ${len:...})
from datamodules.samples import DatasetError
from medmark import CONFIG_DIR
from medmark.cli import EXIT_BAD_INPUT, run_hydra_main
from utils.evaluate import evaluate

log = logging.getLogger("medmark")

_TASK_RAN: list[bool] = []  # set once the task function is entered (cli() maps Hydra's earlier errors to 2)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    _TASK_RAN.append(True)
    try:
        OmegaConf.resolve(cfg)
        evaluate(cfg)
    except (DatasetError, FileNotFoundError, ValueError, OmegaConfBaseException, InstantiationException) as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


def cli(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``python eval.py ...`` / ``medmark evaluate ...``: the exit code (Hydra's own errors -> 2)."""
    return run_hydra_main(main, argv, prog, task_ran=lambda: bool(_TASK_RAN))


if __name__ == "__main__":
    sys.exit(cli())
