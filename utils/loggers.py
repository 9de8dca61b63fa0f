"""Experiment loggers. W&B is the default and must never block a run.

With no credentials (no ``WANDB_API_KEY``, no ``api.wandb.ai`` entry in ``~/.netrc``)
or ``WANDB_MODE=offline`` the run logs offline — no prompt — and says how to sync.
``WANDB_MODE=disabled`` turns W&B off entirely (tests).
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger("medmark")


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def build_wandb_logger(save_dir: str, project: str, offline: bool | None = None, **kwargs) -> WandbLogger:
    """A :class:`WandbLogger` that goes offline by itself when it cannot log online."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if offline is None:
        offline = mode in ("offline", "dryrun") or not wandb_credentials_present()
    os.environ.setdefault("WANDB_SILENT", "true")  # wandb's banners go to stdout otherwise
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(save_dir=save_dir, project=project, offline=offline, **kwargs)
    if offline and mode != "disabled":
        log.warning(
            "W&B is logging offline (no credentials or WANDB_MODE=offline). "
            "To upload later: `wandb sync %s/wandb/offline-run-*`", save_dir
        )
    return logger
