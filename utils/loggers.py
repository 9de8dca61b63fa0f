"""Experiment loggers. W&B is the default and must never block a run.

With no credentials (no ``WANDB_API_KEY``, no ``api.wandb.ai`` entry in ``~/.netrc``)
or ``WANDB_MODE=offline`` the run logs offline — no prompt — and says how to sync.
``WANDB_MODE=disabled`` turns W&B off entirely (tests).

Whatever the experiment logger, a training run also logs to CSV (``<run>/csv/metrics.csv``,
:func:`with_csv_logger`) and ends by plotting it into ``<run>/figures/curves.png`` (:func:`plot_curves`).
"""

from __future__ import annotations

import csv
import logging
import math
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger("medmark")


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _goes_offline(offline: bool | None, save_dir: str) -> bool:
    """``offline`` as given, or (None) whether W&B must log offline: ``WANDB_MODE`` or no credentials."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if offline is None:
        offline = mode in ("offline", "dryrun") or not wandb_credentials_present()
    os.environ.setdefault("WANDB_SILENT", "true")  # wandb's banners go to stdout otherwise
    if offline and mode != "disabled":
        log.warning(
            "W&B is logging offline (no credentials or WANDB_MODE=offline). "
            "To upload later: `wandb sync %s/wandb/offline-run-*`", save_dir
        )
    return bool(offline)


def build_wandb_logger(save_dir: str, project: str, offline: bool | None = None, **kwargs) -> WandbLogger:
    """A :class:`WandbLogger` that goes offline by itself when it cannot log online."""
    from lightning.pytorch.loggers import WandbLogger

    offline = _goes_offline(offline, save_dir)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(save_dir=save_dir, project=project, offline=offline, **kwargs)


def start_wandb_run(save_dir: str, project: str, offline: bool | None = None, log_model: Any = None,
                    _target_: str | None = None, **init_kwargs):
    """A plain ``wandb.init`` run (no Trainer: ``verify.py logger=wandb``) from the same ``logger.wandb``
    config as :func:`build_wandb_logger`, offline by itself likewise. ``log_model`` and ``_target_``
    (keys of that config meant for the Lightning logger) are ignored; ``init_kwargs`` go to ``wandb.init``
    (``name``, ``group``, ``tags``, ``job_type``, ``config``, ``id``...)."""
    import wandb

    offline = _goes_offline(offline, save_dir)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return wandb.init(dir=save_dir, project=project, mode="offline" if offline else "online",
                      **{k: v for k, v in init_kwargs.items() if v is not None})


# ----------------------------------------------------------------------------- W&B run id
#
# <run>/wandb_run_id.txt keeps the run's W&B id, so that a resumed run (ckpt_path=) continues the same
# W&B run (resume="allow") instead of starting a new one.

WANDB_RUN_ID_FILE = "wandb_run_id.txt"


def _read_run_id(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if text and all(c.isalnum() or c in "-_" for c in text) else None


def keep_wandb_run_id(wandb_cfg: Any, output_dir: str | Path, ckpt_path: str | None, write: bool = True) -> str | None:
    """Fix ``wandb_cfg.id`` (the ``logger.wandb`` config, changed in place) and record it in
    ``<output_dir>/wandb_run_id.txt``; returns the id.

    The id is, first found: ``wandb_cfg.id`` when set; a W&B sweep agent's ``WANDB_RUN_ID``; on resume
    (``ckpt_path``) the id saved in this run folder or in the checkpoint's run folder
    (``<ckpt_path>/../../wandb_run_id.txt``), with ``resume: allow`` so W&B continues that run; else a
    new one. ``write=False`` (other processes than global rank 0) records nothing. With
    ``WANDB_MODE=disabled`` (no W&B run at all) nothing is changed or written and None is returned.
    """
    from omegaconf import open_dict

    if os.environ.get("WANDB_MODE", "").lower() == "disabled":
        return None

    output_dir = Path(output_dir)
    run_id = wandb_cfg.get("id") or os.environ.get("WANDB_RUN_ID") or None
    if run_id is None and ckpt_path:
        candidates = [output_dir / WANDB_RUN_ID_FILE, Path(ckpt_path).resolve().parent.parent / WANDB_RUN_ID_FILE]
        run_id = next((found for found in map(_read_run_id, candidates) if found), None)
        if run_id is None:
            log.warning("resume: no W&B run id in %s; this run starts a new W&B run",
                        " or ".join(str(c) for c in candidates))
        else:
            log.info("resume: continuing W&B run %s", run_id)
    resume = run_id is not None and bool(ckpt_path)
    if run_id is None:  # W&B's own format: 8 characters of [a-z0-9]
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    with open_dict(wandb_cfg):
        wandb_cfg.id = str(run_id)
        if resume:
            wandb_cfg.resume = "allow"
    if write:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / WANDB_RUN_ID_FILE).write_text(f"{run_id}\n", encoding="ascii")
    return str(run_id)


# ----------------------------------------------------------------------------- CSV + curves
#
# Every training run keeps a CSV log next to whatever experiment logger it has (W&B, none):
# <output_dir>/csv/metrics.csv, plotted at the end of the run into <output_dir>/figures/curves.png.

CSV_LOGGER_NAME = "csv"
CURVES_FILE = "figures/curves.png"


def with_csv_logger(loggers: list, save_dir: str | Path) -> list:
    """``loggers`` plus a :class:`CSVLogger` writing ``<save_dir>/csv/metrics.csv`` (unless one is there)."""
    from lightning.pytorch.loggers import CSVLogger

    if any(isinstance(logger, CSVLogger) for logger in loggers):
        return list(loggers)
    return [*loggers, CSVLogger(save_dir=str(save_dir), name=CSV_LOGGER_NAME, version="")]


def metrics_csv_of(loggers: list) -> Path | None:
    """The ``metrics.csv`` of the first CSV logger among ``loggers`` (None: no CSV logger)."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in loggers:
        if isinstance(logger, CSVLogger):
            return Path(logger.log_dir) / "metrics.csv"
    return None


def read_epoch_curves(metrics_csv: str | Path) -> dict[str, dict[int, float]]:
    """Per-epoch series ``{column: {epoch: value}}`` of a Lightning ``metrics.csv``.

    Test metrics (``test/*``) are left out; a ``*_step`` column is left out when its ``*_epoch``
    twin exists and is otherwise averaged over the epoch; every other column keeps the epoch's
    last logged value (so a validation of the untrained model logged before epoch 0 is replaced
    by epoch 0's). Non-numeric and non-finite cells are skipped.
    """
    with open(metrics_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = [c for c in (rows[0].keys() if rows else []) if c not in ("epoch", "step") and not c.startswith("test/")]
    columns = [c for c in columns if not (c.endswith("_step") and c.removesuffix("_step") + "_epoch" in columns)]
    series: dict[str, dict[int, list[float]]] = {c: {} for c in columns}
    for row in rows:
        try:
            epoch = int(float(row.get("epoch") or ""))
        except ValueError:
            continue
        for column in columns:
            try:
                value = float(row.get(column) or "")
            except ValueError:
                continue
            if math.isfinite(value):
                series[column].setdefault(epoch, []).append(value)
    curves = {}
    for column, per_epoch in series.items():
        if per_epoch:
            reduce = (lambda v: sum(v) / len(v)) if column.endswith("_step") else (lambda v: v[-1])
            curves[column.removesuffix("_epoch")] = {epoch: reduce(values) for epoch, values in sorted(per_epoch.items())}
    return curves


def plot_curves(metrics_csv: str | Path, out_png: str | Path) -> Path | None:
    """Plot per-epoch losses, validation metrics in [0, 1] and other validation metrics (one panel each,
    empty ones left out) from ``metrics_csv`` into ``out_png``.

    Returns the PNG path, or None when the CSV holds no per-epoch value (nothing is written then).
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: figures are files
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = read_epoch_curves(metrics_csv)
    losses = {k: v for k, v in curves.items() if "loss" in k}
    metrics = {k: v for k, v in curves.items() if k.startswith("val/") and "loss" not in k}
    unit = {k: v for k, v in metrics.items() if all(0.0 <= x <= 1.0 for x in v.values())}  # dice, accuracy...
    other = {k: v for k, v in metrics.items() if k not in unit}  # distances (hd95 in pixels), counts...
    panels = [(title, group) for title, group in (("losses", losses), ("validation metrics", unit),
                                                  ("validation metrics (other scales)", other)) if group]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, group) in zip(axes[0], panels):
        for name, points in sorted(group.items()):
            ax.plot(list(points), list(points.values()), marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
