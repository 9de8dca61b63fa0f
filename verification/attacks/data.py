"""The data an attack trains on (:func:`attack_loader`) and the task quality left after it (:func:`task_quality`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torchmetrics.functional.classification import multiclass_recall

from verification.progress import progress
from verification.protocols import BadInput


def attack_loader(datamodule, split: str, data_share: float, batch_size: int, seed: int,
                  train_transforms: bool = True) -> DataLoader:
    """Loader over ``data_share`` ∈ (0, 1] of ``split`` (a subset seeded by ``seed``), shuffled with ``seed``.

    Raises:
        BadInput: ``split`` is not a split of the data (``attack.split`` named).
    """
    datamodule.setup()
    if split not in datamodule.splits:
        raise BadInput(f"attack.split={split!r} is not a split of the data ({sorted(datamodule.splits)})")
    dataset = datamodule.dataset(split, train_transforms=train_transforms)
    n = len(dataset)
    keep = max(1, int(math.ceil(data_share * n)))
    if keep < n:
        order = np.random.default_rng(seed).permutation(n)[:keep]
        dataset = Subset(dataset, sorted(int(i) for i in order))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed), num_workers=0)


def balanced_accuracy(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Mean per-class recall over the classes present in ``label`` (torchmetrics' per-class recall).

    Args:
        pred, label: N integer class indices each (≥ 0).
    Returns:
        A value in [0, 1]. A class that is predicted but absent from ``label`` does not count
        (``MulticlassRecall(average="macro")`` would count it as a recall of 0).
    """
    num_classes = int(max(int(pred.max()), int(label.max()))) + 1
    recalls = multiclass_recall(pred, label, num_classes=num_classes, average="none")
    present = label.unique()
    return float(recalls[present].double().mean())


def _dice(suspect: Any, loader: DataLoader) -> tuple[float, int]:
    from torchmetrics.segmentation import DiceScore

    dice = DiceScore(num_classes=1, average="micro", aggregation_level="samplewise", input_format="one-hot")
    sent = 0
    for batch in progress(loader, desc="task quality (Dice)", unit="batch"):
        probs = suspect.predict(batch["image"]).float()
        sent += len(batch["image"])
        mask = batch["mask"]
        if probs.shape[-2:] != mask.shape[-2:]:
            probs = torch.nn.functional.interpolate(probs, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        dice.update((probs > 0.5).long(), (mask > 0.5).long())
    return float(dice.compute()), sent


def _balanced_accuracy(suspect: Any, loader: DataLoader) -> tuple[float, int]:
    preds, labels, sent = [], [], 0
    for batch in progress(loader, desc="task quality (balanced accuracy)", unit="batch"):
        preds.append(suspect.predict(batch["image"]).argmax(1))
        labels.append(batch["label"])
        sent += len(batch["image"])
    return balanced_accuracy(torch.cat(preds), torch.cat(labels)), sent


def task_quality(suspect: Any, datamodule, task: str, split: str = "test", batch_size: int = 32,
                 max_images: int | None = None) -> dict[str, Any]:
    """The task quality the (attacked) suspect still delivers on a clean split.

    Segmentation: mean per-image Dice of the 0.5-thresholded probability map (as ``test/dice``
    in training: samplewise, micro); classification: balanced accuracy (:func:`balanced_accuracy`).
    Queries go through ``suspect.predict`` (counted there).

    Returns:
        ``{"metric": "dice" | "balanced_accuracy", "value", "split", "num_images", "queries"}``.
    """
    datamodule.setup()
    if split not in datamodule.splits:
        raise BadInput(f"attack.quality_split={split!r} is not a split of the data ({sorted(datamodule.splits)})")
    dataset = datamodule.dataset(split, train_transforms=False)
    if max_images is not None and max_images < len(dataset):
        dataset = Subset(dataset, list(range(max_images)))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    if task == "segmentation":
        (value, sent), metric = _dice(suspect, loader), "dice"
    else:
        (value, sent), metric = _balanced_accuracy(suspect, loader), "balanced_accuracy"
    return {"metric": metric, "value": value, "split": split, "num_images": len(dataset), "queries": sent}
