"""Task metrics (torchmetrics), DDP-synchronised by torchmetrics itself.

Segmentation: Dice and IoU per image (mean over images), pixel AUROC (binned, so memory
stays constant), HD95. Classification: accuracy, balanced accuracy (macro recall), AUROC.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import ndimage
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy, MulticlassAUROC, MulticlassRecall
from torchmetrics.segmentation import DiceScore, MeanIoU

# We pass `average` explicitly; torchmetrics warns about its future default regardless.
warnings.filterwarnings("ignore", message="DiceScore metric currently defaults")


def hd95_per_image(pred: np.ndarray, target: np.ndarray) -> float | None:
    """95th-percentile symmetric Hausdorff distance (pixels) between two H×W bool masks.

    Returns None when the target is empty (undefined, excluded from the mean) and the
    image diagonal when the target is not empty but the prediction is (a miss is the
    worst case, not a free pass).
    """
    if not target.any():
        return None
    if not pred.any():
        return float(np.hypot(*target.shape))
    pred_border = pred ^ ndimage.binary_erosion(pred)
    target_border = target ^ ndimage.binary_erosion(target)
    to_target = ndimage.distance_transform_edt(~target_border)[pred_border]
    to_pred = ndimage.distance_transform_edt(~pred_border)[target_border]
    return float(max(np.percentile(to_target, 95), np.percentile(to_pred, 95)))


class HausdorffDistance95(Metric):
    """Mean HD95 over images with a non-empty target. Inputs B×1×H×W, probabilities or {0,1}."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        pred_np = (preds.detach() > self.threshold).cpu().numpy()
        target_np = (target.detach() > 0.5).cpu().numpy()
        for p, t in zip(pred_np, target_np):
            value = hd95_per_image(p.reshape(p.shape[-2:]), t.reshape(t.shape[-2:]))
            if value is not None:
                self.total += value
                self.count += 1

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"))
        return (self.total / self.count).float()


class SegmentationMetrics(MetricCollection):
    """``update(probs B×1×H×W in [0,1], mask B×1×H×W {0,1})``."""

    def __init__(self, prefix: str, threshold: float = 0.5, auroc_bins: int = 200):
        super().__init__(
            {
                "dice": DiceScore(num_classes=1, average="micro", aggregation_level="samplewise", input_format="one-hot"),
                "iou": MeanIoU(num_classes=1, input_format="one-hot"),
                "auroc": BinaryAUROC(thresholds=auroc_bins),
                "hd95": HausdorffDistance95(threshold=threshold),
            },
            prefix=prefix,
            compute_groups=False,
        )
        self.threshold = threshold

    def update(self, probs: torch.Tensor, mask: torch.Tensor) -> None:  # type: ignore[override]
        hard = (probs > self.threshold).long()
        target = (mask > 0.5).long()
        self["dice"].update(hard, target)
        self["iou"].update(hard, target)
        self["auroc"].update(probs.flatten(), target.flatten())
        self["hd95"].update(probs, mask)


class ClassificationMetrics(MetricCollection):
    """``update(probs B×K softmax, label B long)``."""

    def __init__(self, prefix: str, num_classes: int):
        super().__init__(
            {
                "accuracy": MulticlassAccuracy(num_classes=num_classes, average="micro"),
                "balanced_accuracy": MulticlassRecall(num_classes=num_classes, average="macro"),
                "auroc": MulticlassAUROC(num_classes=num_classes, average="macro"),
            },
            prefix=prefix,
        )


def build_metrics(task: str, prefix: str, num_classes: int) -> MetricCollection:
    if task == "segmentation":
        return SegmentationMetrics(prefix)
    return ClassificationMetrics(prefix, num_classes)


def target_class_response(model: torch.nn.Module, marked: torch.Tensor, clean: torch.Tensor,
                          target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How a classifier answers a dataset mark on images of other classes: ``(WSR, ΔP)``.

    ``marked``, ``clean``: B×C×H×W in [0, 1], the same images with and without the mark. WSR (in
    [0, 1]) is the share of marked images classified as ``target``; ΔP (in [-1, 1]) is the mean rise
    of the softmax probability of ``target`` from the clean to the marked image.
    """
    probs_marked = torch.softmax(model(marked), 1)
    probs_clean = torch.softmax(model(clean), 1)
    wsr = (probs_marked.argmax(1) == target).float().mean()
    return wsr, (probs_marked[:, target] - probs_clean[:, target]).mean()
