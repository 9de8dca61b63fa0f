"""The clean classifiers around X-Mark's generator: config helpers and the training loop they share.

X-Mark keeps δ out of clean models with the Ind-M suppression term and checks, at release,
that clean models outside that loop do not answer to it (held-out controls). Both need clean
classifiers trained like an innocent party trains them; this module holds what
:class:`lightning_modules.xmark.XMarkModule` and :class:`callbacks.xmark.XMarkRelease` share
for that: which backbone configs are "the same architecture", a config that never reads
pretrained weights, the settings of the thief's augmentation (``method.thief_augment``, the
pipeline an innocent party trains with too) and of the references trained inside a run
(``method.trained_references``), and the plain supervised loop that trains each of them.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from datamodules.transforms import thief_augment as thief_augment_fn
from lightning_modules.base import to_plain

#: Fields of ``method.trained_references``.
TRAINED_REFERENCE_FIELDS = ("epochs", "seeds", "lr", "weight_decay", "schedule", "thief_augmented", "families",
                            "pipeline")
#: Learning-rate schedules of :func:`fit_clean_classifier`.
SCHEDULES = ("constant", "cosine")
#: How trained references and held-out controls are trained: ``loop`` = :func:`fit_clean_classifier` inside
#: the run; ``train_py`` = a ``method=task`` run of train.py's own code each, before the X-Mark fit
#: (:mod:`utils.clean_model_runs`), kept at its best-by-validation checkpoint, as a suspect is.
PIPELINES = ("loop", "train_py")


def no_pretrained(config: dict) -> dict:
    """A backbone config that never reads pretrained weights (the state dict follows)."""
    config = copy.deepcopy(dict(config))
    for name in ("weights_path", "encoder_weights", "encoder_weights_path", "checkpoint"):
        if name in config:
            config[name] = None
    if "allow_random_init" in config:
        config["allow_random_init"] = True
    return config


def architecture(config: dict) -> tuple[Any, Any]:
    """What makes two backbone configs the same architecture: the factory and the model name."""
    config = to_plain(config) or {}
    return config.get("_target_"), config.get("name")


def thief_augment_settings(config: dict | None) -> dict:
    """``method.thief_augment`` checked and completed: ``{"hflip": float, "zoom": [low, high]}``."""
    augment = dict(to_plain(config) or {})
    unknown = sorted(set(augment) - {"hflip", "zoom"})
    if unknown:
        raise ValueError(f"method.thief_augment has unknown keys {unknown} (allowed: hflip, zoom)")
    augment = {"hflip": float(augment.get("hflip", 0.0)), "zoom": [float(v) for v in augment.get("zoom", (1.0, 1.0))]}
    try:
        thief_augment_fn(torch.zeros(1, 1, 2, 2), **augment)
    except (ValueError, IndexError) as err:
        raise ValueError(f"method.thief_augment: {err}") from None
    return augment


def optimiser_settings(settings: dict, field: str) -> dict:
    """``{"weight_decay": float >= 0, "schedule": one of SCHEDULES}`` of a config dict (defaults 0.0,
    ``constant``): the keyword arguments of :func:`fit_clean_classifier`. Raises ValueError naming ``field``."""
    weight_decay, schedule = float(settings.get("weight_decay", 0.0)), str(settings.get("schedule", "constant"))
    if not weight_decay >= 0:
        raise ValueError(f"{field}.weight_decay must be >= 0, got {weight_decay}")
    if schedule not in SCHEDULES:
        raise ValueError(f"{field}.schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    return {"weight_decay": weight_decay, "schedule": schedule}


def pipeline_setting(settings: dict, field: str) -> str:
    """``settings["pipeline"]``: one of :data:`PIPELINES` (default ``loop``). Raises ValueError naming ``field``."""
    pipeline = str(settings.get("pipeline", "loop"))
    if pipeline not in PIPELINES:
        raise ValueError(f"{field}.pipeline must be one of {list(PIPELINES)}, got {pipeline!r}")
    return pipeline


def trained_reference_settings(config: dict | None) -> dict:
    """``method.trained_references`` checked and completed.

    Returns ``{"epochs": int >= 0, "seeds": [int, ...] (distinct), "lr": float > 0,
    "weight_decay": float >= 0, "schedule": "constant" | "cosine", "thief_augmented": bool,
    "families": [str, ...] | None, "pipeline": "loop" | "train_py"}`` (optimiser and schedule as
    :func:`fit_clean_classifier` takes them; ``train_py`` ignores them and trains as ``method=task`` does);
    ``epochs == 0`` (the default) = no
    trained references; ``families`` None = every held-out family (:func:`select_families` checks names).
    Raises ValueError naming the field.
    """
    settings = dict(to_plain(config) or {})
    unknown = sorted(set(settings) - set(TRAINED_REFERENCE_FIELDS))
    if unknown:
        raise ValueError(f"method.trained_references: unknown field(s) {unknown} "
                         f"({', '.join(TRAINED_REFERENCE_FIELDS)})")
    epochs = int(settings.get("epochs", 0))
    seeds = [int(s) for s in settings.get("seeds") or []]
    lr = float(settings.get("lr", 1e-3))
    if epochs < 0:
        raise ValueError(f"method.trained_references.epochs must be >= 0, got {epochs}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"method.trained_references.seeds must be distinct, got {seeds}")
    if epochs > 0 and not seeds:
        raise ValueError("method.trained_references.epochs > 0 trains one clean model per seed and family: "
                         "give method.trained_references.seeds")
    if not lr > 0:
        raise ValueError(f"method.trained_references.lr must be > 0, got {lr}")
    return {"epochs": epochs, "seeds": seeds if epochs > 0 else [], "lr": lr,
            **optimiser_settings(settings, "method.trained_references"),
            "thief_augmented": bool(settings.get("thief_augmented", True)),
            "families": None if settings.get("families") is None else [str(f) for f in settings["families"]],
            "pipeline": pipeline_setting(settings, "method.trained_references")}


def select_families(families: dict[str, dict], names: list[str] | None) -> dict[str, dict]:
    """``{name: backbone config}`` of ``families`` restricted to ``names`` (None = all, in their order).
    Raises ValueError naming ``method.trained_references.families`` and the families there are."""
    if names is None:
        return dict(families)
    unknown = sorted(set(names) - set(families))
    if unknown or not names:
        raise ValueError(f"method.trained_references.families: {unknown or 'an empty list'} — this run's held-out "
                         f"families are {sorted(families)} (null = all)")
    return {name: cfg for name, cfg in families.items() if name in names}


def fit_clean_classifier(model: nn.Module, loader: Iterable[dict], epochs: int, lr: float,
                         augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         desc: str = "clean classifier", weight_decay: float = 0.0,
                         schedule: str = "constant") -> nn.Module:
    """Train ``model`` in place with Adam(W) and cross-entropy on clean labelled batches.

    Args:
        model: a classifier mapping B×C×H×W images in [0, 1] to B×K logits, already on its device.
        loader: batches with ``image`` (B×C×H×W in [0, 1]) and ``label`` (B, long class indices).
        epochs: passes over ``loader``.
        lr: (initial) learning rate.
        augment: applied to every batch of images before the forward pass (e.g. the thief's
            flips and zooms); None = the batches as they come.
        desc: label of the progress bar (epochs x batches; drawn only on a terminal, tqdm's
            ``disable=None``). No secret goes into it.
        weight_decay: decoupled weight decay (AdamW); 0 = plain Adam.
        schedule: ``"constant"`` lr, or ``"cosine"`` — annealed to 0 over ``epochs``, stepped once
            per epoch, the schedule ``train.py`` trains a classifier with (configs/method/task.yaml).
            Still not a ``train.py`` model (no validation-selected checkpoint, another augmentation
            code path): docs/xmark.md measured δ that such models answer to and these do not.
    Returns:
        ``model``, still in training mode (the caller freezes it).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    device = next(model.parameters()).device
    optimizer = (torch.optim.AdamW(model.parameters(), lr=float(lr), weight_decay=float(weight_decay))
                 if weight_decay else torch.optim.Adam(model.parameters(), lr=float(lr)))
    annealing = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(epochs), 1))
                 if schedule == "cosine" else None)
    model.train()
    with tqdm(total=int(epochs) * len(loader), desc=desc, unit="batch", disable=None, leave=False) as bar:
        for _ in range(int(epochs)):
            for batch in loader:
                images = batch["image"].to(device)
                logits = model(augment(images) if augment is not None else images)
                loss = nn.functional.cross_entropy(logits, batch["label"].to(device).long())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update(1)
            if annealing is not None:
                annealing.step()
    return model
