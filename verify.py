"""Verify ownership: a suspect (model or images) + the owner kit's secret -> report + exit code.

    python verify.py secret=<run>/owner/secret.json suspect=<checkpoint> out=<dir>   # StealthMark
    python verify.py ... attack=prune attack.amount=0.3                               # robustness

The secret's ``method`` field picks the protocol (``utils/verification.PROTOCOLS``); each
writes ``<out>/report.json``, ``<out>/report.md`` and figures. Exit codes: 0 ownership
verified, 1 not verified, 2 bad input or error (the message names the file or field).
Secrets (payloads, keys) are never printed.
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
from lightning_modules.suspect import SuspectError
from utils.verification import EXIT_BAD_INPUT, BadInput, run_protocol
from watermark.owner_kit import OwnerKitError

log = logging.getLogger("medmark")


@hydra.main(version_base="1.3", config_path="configs", config_name="verify.yaml")
def main(cfg: DictConfig) -> None:
    try:
        OmegaConf.resolve(cfg)
        code = run_protocol(cfg)
    except (OwnerKitError, SuspectError, BadInput, DatasetError, FileNotFoundError, ValueError,
            OmegaConfBaseException, InstantiationException) as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    sys.exit(code)


if __name__ == "__main__":
    main()
