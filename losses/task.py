"""Task losses: what plain training optimises and every watermark objective keeps.

Segmentation terms read ``outputs["logits"]`` (B×1×H×W) against ``batch["mask"]``
(B×1×H×W, {0,1} or soft targets in [0,1]); classification terms read ``outputs["logits"]``
(B×K) against ``batch["label"]`` (B, long). A term can read another target key
(``target_key``), which is how watermark objectives feed soft targets through the same
terms.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from losses.base import LossTerm


class BCETerm(LossTerm):
    """Pixel-wise binary cross-entropy on logits. Supports soft targets in [0, 1]."""

    def __init__(self, weight: float = 1.0, target_key: str = "mask", pos_weight: float | None = None):
        super().__init__(weight)
        self.target_key = target_key
        self.pos_weight = pos_weight

    def compute(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        logits = outputs["logits"]
        target = batch[self.target_key].to(logits.dtype)
        pos_weight = None if self.pos_weight is None else logits.new_tensor(self.pos_weight)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)


def soft_dice(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-image soft Dice of B×1×H×W probabilities vs targets in [0, 1] -> B."""
    dims = tuple(range(1, probs.ndim))
    inter = (probs * target).sum(dims)
    return (2 * inter + smooth) / (probs.sum(dims) + target.sum(dims) + smooth)


class DiceTerm(LossTerm):
    """1 − mean per-image soft Dice (smoothed so empty masks are well defined)."""

    def __init__(self, weight: float = 1.0, target_key: str = "mask", smooth: float = 1.0):
        super().__init__(weight)
        self.target_key = target_key
        self.smooth = smooth

    def compute(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        probs = torch.sigmoid(outputs["logits"].float())
        return 1.0 - soft_dice(probs, batch[self.target_key].float(), self.smooth).mean()


class CrossEntropyTerm(LossTerm):
    """Cross-entropy on B×K logits; optional label smoothing and class weights."""

    def __init__(
        self,
        weight: float = 1.0,
        target_key: str = "label",
        label_smoothing: float = 0.0,
        class_weights: list[float] | None = None,
    ):
        super().__init__(weight)
        self.target_key = target_key
        self.label_smoothing = label_smoothing
        self.class_weights = class_weights

    def compute(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        logits = outputs["logits"]
        weight = None if self.class_weights is None else logits.new_tensor(self.class_weights)
        return F.cross_entropy(logits, batch[self.target_key], weight=weight, label_smoothing=self.label_smoothing)
