"""X-Mark's clean references and held-out controls trained by train.py itself (``pipeline: train_py``).

Measured (docs/xmark.md, "A proxy that does not learn the mark..."): the Ind-M suppression term keeps δ
out of clean models trained the way its references were trained, and a held-out control only sees a leak
into models trained the way it was. References and controls trained by the run's own loop (Adam, last
epoch, the thief's augmentation as a batch op) let innocent ResNet18s trained by ``train.py`` (AdamW,
cosine schedule, per-sample torchvision augmentation, best-by-validation checkpoint) answer to δ while
every control failed. Here each reference and each held-out control is a ``method=task`` run of
:func:`utils.run.run_training` -- the code a suspect is trained with -- made before the X-Mark fit;
their best checkpoints are appended to ``method.reference_checkpoints`` and
``callbacks.xmark_release.control_checkpoints``, which read them through :mod:`models.safe_reader`.

Each run gets its own folder ``<run>/clean_models/<role>_<family>[_thief_augment]_seed<s>/`` (its
``summary.json``, ``checkpoints/``); a folder whose run finished is reused, so a resumed X-Mark run does
not train them again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_modules.base import to_plain
from lightning_modules.xmark_clean_models import pipeline_setting, select_families

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: Top-level keys of the X-Mark run that a clean ``method=task`` run must not inherit.
NOT_INHERITED = ("method", "loss", "callbacks", "logger", "ckpt_path", "init_weights", "secret_file", "hydra")

log = logging.getLogger("medmark.clean_model_runs")


def suspect_augment(thief_augment: dict | None) -> dict:
    """``data.augment`` of a run trained with the thief's augmentation, as suspects are
    (``benchmarks/xmark_matrix.py``: ``hflip`` p and ``RandomAffine(scale=zoom)`` per sample).

    Args:
        thief_augment: ``{"hflip": p, "zoom": [low, high]}`` (``method.thief_augment``), or None = none.
    Returns:
        ``{"hflip": p}`` plus ``{"scale": [low, high]}`` unless the zoom is [1, 1]; ``{"hflip": 0.0}`` for None.
    """
    if thief_augment is None:
        return {"hflip": 0.0}
    augment: dict[str, Any] = {"hflip": float(thief_augment["hflip"])}
    zoom = [float(v) for v in thief_augment["zoom"]]
    if zoom != [1.0, 1.0]:
        augment["scale"] = zoom
    return augment


def task_run_config(cfg: DictConfig, backbone: dict, seed: int, epochs: int, augment: dict,
                    output_dir: Path) -> DictConfig:
    """The config of one clean ``method=task`` classification run derived from the X-Mark run's ``cfg``.

    The data (the clean source, its splits, image size, batch size), trainer and paths are the X-Mark
    run's; the method, loss and checkpoint callback are ``configs/method/task.yaml``,
    ``configs/loss/classification.yaml`` and ``configs/callbacks/default.yaml``'s ``model_checkpoint``
    (AdamW, cosine over ``epochs``, best by the validation metric of ``monitor_metrics``), as a suspect
    trained by ``train.py`` has them. No logger, no test, no X-Mark callback: none of the run's secrets
    is in it.
    """
    base = OmegaConf.to_container(cfg, resolve=True)
    run = {key: value for key, value in base.items() if key not in NOT_INHERITED}
    run["paths"] = {**run["paths"], "output_dir": str(output_dir)}
    run["data"] = {**run["data"], "augment": dict(augment)}
    run["trainer"] = {**run["trainer"], "max_epochs": int(epochs), "max_steps": -1,
                      "default_root_dir": str(output_dir)}
    checkpoint = OmegaConf.load(CONFIGS / "callbacks" / "default.yaml").model_checkpoint
    run.update(method=OmegaConf.load(CONFIGS / "method" / "task.yaml"),
               loss=OmegaConf.load(CONFIGS / "loss" / "classification.yaml"),
               callbacks={"model_checkpoint": checkpoint}, logger=None, backbone=dict(backbone), seed=int(seed),
               test=False, eval_untrained=False, secret_keys=[], task_name=f"{base.get('task_name')}_clean_model",
               optimized_metric=base["monitor_metrics"][run["data"]["task"]], monitor_mode="max")
    return OmegaConf.create(run)


def clean_model_plan(cfg: DictConfig) -> list[dict]:
    """The clean runs that ``cfg`` asks train.py to make before the fit: one dict per run with ``role``
    (``reference`` | ``control``), ``name`` (its folder), ``backbone`` (config), ``seed``, ``epochs``,
    ``augment`` (``data.augment``). Empty unless ``method.trained_references.pipeline`` or
    ``callbacks.xmark_release.heldout_control.pipeline`` is ``train_py``.

    The families and augmentations are the ones the in-run loop would train (the module's
    :meth:`~lightning_modules.xmark.XMarkModule.heldout_families` and ``heldout_augmentations``, the
    callback's :meth:`~callbacks.xmark.XMarkRelease.heldout_families`), read off a module and callback
    built from ``cfg`` (checked as the run checks them; shared seeds are refused here, before any training).
    """
    references = to_plain(OmegaConf.select(cfg, "method.trained_references", default=None)) or {}
    held = to_plain(OmegaConf.select(cfg, "callbacks.xmark_release.heldout_control", default=None)) or {}
    wanted = {"reference": pipeline_setting(references, "method.trained_references") == "train_py",
              "control": pipeline_setting(held, "callbacks.xmark_release.heldout_control") == "train_py"}
    if not any(wanted.values()):
        return []
    module = instantiate(cfg.method, backbone=cfg.backbone, loss=cfg.loss, _recursive_=False)
    release = instantiate(cfg.callbacks.xmark_release) if OmegaConf.select(cfg, "callbacks.xmark_release") else None
    settings = module.hparams.trained_references
    if release is not None:
        release.refuse_shared_seeds(settings)
    augmentations = module.heldout_augmentations()
    plan = []
    if wanted["reference"] and settings["epochs"] > 0:
        augment = augmentations.get("+thief_augment") if settings["thief_augmented"] else None
        for seed in settings["seeds"]:
            for family, backbone in select_families(module.heldout_families(), settings["families"]).items():
                plan.append({"role": "reference", "name": f"reference_{family}_seed{seed}", "backbone": backbone,
                             "seed": seed, "epochs": settings["epochs"], "augment": suspect_augment(augment)})
    control = release.heldout_control if release is not None else {"epochs": 0}
    if wanted["control"] and control["epochs"] > 0:
        families = {name: backbone or module.surrogate_config for name, backbone in
                    release.heldout_families(module).items()}
        for seed in control["seeds"]:
            for family, backbone in families.items():
                for suffix, augment in (augmentations if control["thief_augmented"] else {"": None}).items():
                    plan.append({"role": "control", "name": f"control_{family}{suffix.replace('+', '_')}_seed{seed}",
                                 "backbone": backbone, "seed": seed, "epochs": control["epochs"],
                                 "augment": suspect_augment(augment)})
    return plan


def run_checkpoint(summary: dict) -> str | None:
    """The best (else last) checkpoint a ``train.py`` run's ``summary.json`` names (None = neither)."""
    return summary.get("best_checkpoint") or summary.get("last_checkpoint")


def finished_run(folder: Path) -> dict | None:
    """The ``summary.json`` of a ``train.py`` run that finished in ``folder`` and whose checkpoint
    (:func:`run_checkpoint`) is still there; None otherwise (also shared by ``benchmarks/xmark_matrix.py``)."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    checkpoint = run_checkpoint(summary)
    return summary if checkpoint and Path(checkpoint).is_file() else None


def finished_checkpoint(folder: Path) -> str | None:
    """:func:`run_checkpoint` of :func:`finished_run` (None when the run did not finish)."""
    summary = finished_run(folder)
    return run_checkpoint(summary) if summary is not None else None


def train_clean_models_first(cfg: DictConfig,
                             before_training: Callable[[], None] | None = None) -> dict[str, list[str]]:
    """Train every run of :func:`clean_model_plan` (or reuse a finished one) and add its best checkpoint
    to ``cfg`` in place: references to ``method.reference_checkpoints``, controls to
    ``callbacks.xmark_release.control_checkpoints`` (after the ones given). ``before_training`` is called
    once before the first run that must be trained (e.g. to refuse an owner kit the run would replace).

    Returns:
        ``{"reference_checkpoints": [path, ...], "control_checkpoints": [path, ...]}`` (empty lists = nothing
        to do).
    Raises:
        ValueError: a run to train under a multi-process launch (``WORLD_SIZE`` > 1: the ranks would train
            them side by side before any process group exists) -- train them first, or list checkpoints.
    """
    from utils.run import run_training  # utils.run calls this module

    added: dict[str, list[str]] = {"reference_checkpoints": [], "control_checkpoints": []}
    plan = clean_model_plan(cfg)
    root = Path(cfg.paths.output_dir) / "clean_models"
    for index, item in enumerate(plan):
        folder = root / item["name"]
        checkpoint = finished_checkpoint(folder)
        if checkpoint is not None:
            log.info("clean model %d/%d: %s finished before, reused: %s", index + 1, len(plan), item["name"],
                     checkpoint)
        else:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError(f"pipeline: train_py would train {folder} in every process of this multi-process "
                                 "launch: train the clean models first (method=task runs, docs/xmark.md) and list "
                                 "their checkpoints in method.reference_checkpoints / "
                                 "callbacks.xmark_release.control_checkpoints")
            if before_training is not None:
                before_training()
                before_training = None
            started = time.time()
            log.info("clean model %d/%d: %s, %d epochs by train.py (method=task)", index + 1, len(plan),
                     item["name"], item["epochs"])
            run_training(task_run_config(cfg, item["backbone"], item["seed"], item["epochs"], item["augment"], folder))
            checkpoint = finished_checkpoint(folder)
            if checkpoint is None:
                raise RuntimeError(f"{folder}: the clean {item['role']} run finished without a checkpoint")
            log.info("clean model %s trained in %.0f s -> %s", item["name"], time.time() - started, checkpoint)
        added[f"{item['role']}_checkpoints"].append(checkpoint)
    if added["reference_checkpoints"]:
        cfg.method.reference_checkpoints = [*cfg.method.reference_checkpoints, *added["reference_checkpoints"]]
    if added["control_checkpoints"]:
        release = cfg.callbacks.xmark_release
        release.control_checkpoints = [*(release.control_checkpoints or []), *added["control_checkpoints"]]
    return added
