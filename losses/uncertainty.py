"""StealthMark loss terms (docs/stealthmark.md): uncertainty modulation and the harmlessness guard.

Both terms act on *key samples* only: images whose grid cells were randomly hidden and
that carry the owner's trigger. The StealthMark objective
(:class:`lightning_modules.stealthmark.StealthMarkModule`) routes rows by term type:
every :class:`KeySampleTerm` sees the key rows of the batch, every other term (the task's
BCE + Dice) sees the remaining rows -- clean samples and cell-masked samples *without*
the trigger, whose target stays the ground-truth mask ``y``.

Batch keys the terms read (key rows only):

* ``mask`` -- ``y``, B×1×H×W in {0, 1};
* ``soft_target`` -- ``t = y·(1 − ε·m) + (1 − y)·ε·m``, B×1×H×W in [0, 1]
  (:func:`watermark.stealthmark.soft_targets.key_targets`), ``m`` = pixels of kept dark QR modules;
* ``mark`` -- ``m``, B×1×H×W in {0, 1};
* ``key_cells`` -- pixels of the kept QR cells (dark and light), B×1×H×W in {0, 1}.

``outputs["logits"]`` is B×1×H×W. A term called with zero rows returns an exact 0 that is
still connected to the graph (so DDP sees every parameter used on every rank).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from losses.base import LossTerm


def _zero_like_graph(t: torch.Tensor) -> torch.Tensor:
    # Exactly 0, yet part of the autograd graph (unused-parameter errors under DDP otherwise).
    return t.sum() * 0.0


class KeySampleTerm(LossTerm):
    """Marker base class: the StealthMark objective feeds this term the key rows only."""


class UncertaintyModulationTerm(KeySampleTerm):
    """Binary cross-entropy of key-sample logits against the soft targets ``t``.

    Minimised at ``p = t``: ``p = 1 − ε`` / ``ε`` on the pixels of kept dark QR modules
    (raising ``min(p, 1 − p)`` there to ``ε``) and ``p = y`` elsewhere, so the model's
    uncertainty -- not its thresholded mask -- carries the QR code.

    Args:
        weight: term weight.
        cell_weight: relative weight, in the pixel mean, of the pixels of *kept QR cells*
            (``batch[cell_key] = 1``: dark modules, target ``t``, and light ones, target ``y``);
            1 = plain mean. The watermark is the contrast between those two kinds of cells at
            fixed positions; the rest of a key image (hidden cells, quiet zone) only repeats the
            task, and with a plain mean it outweighs the QR signal so much that the model learns
            the task long before (if ever) it learns the code.
        target_key, cell_key: batch keys of ``t`` and of the kept-QR-cell map (B×1×H×W, {0, 1}).
    """

    def __init__(self, weight: float = 1.0, cell_weight: float = 1.0, target_key: str = "soft_target",
                 cell_key: str = "key_cells"):
        super().__init__(weight)
        if cell_weight <= 0:
            raise ValueError(f"cell_weight must be > 0, got {cell_weight}")
        self.cell_weight = float(cell_weight)
        self.target_key = target_key
        self.cell_key = cell_key

    def compute(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        logits = outputs["logits"].float()
        if logits.shape[0] == 0:
            return _zero_like_graph(logits)
        target = batch[self.target_key].to(logits.dtype)
        per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if self.cell_weight == 1.0:
            return per_pixel.mean()
        weights = 1.0 + (self.cell_weight - 1.0) * batch[self.cell_key].to(logits.dtype)
        return (per_pixel * weights).sum() / weights.sum()

    def extra_repr(self) -> str:
        return f"weight={self.weight}, cell_weight={self.cell_weight}"


class HarmlessnessGuardTerm(KeySampleTerm):
    """Hinge on key-sample logits of *marked* pixels that come within ``margin`` of 0.5 against ``y``.

    Only marked pixels (``m = 1``) are guarded: they are the pixels the watermark pulls
    towards the threshold; every other key-sample pixel has target ``y`` and is the task's
    business (guarding those too would turn the guard into a second task loss that dwarfs
    the watermark signal while the model is still learning the task).

    With ``ℓ`` the logit and ``δ = logit(0.5 + margin)``, the term is the mean over marked
    pixels of ``relu(δ − (2y − 1)·ℓ)``: 0 while every marked pixel stays ``margin`` away from
    flipping, and a gradient of bounded size (like BCE's) on a pixel about to flip. The soft
    targets sit ``0.5 − ε`` from the threshold, so the guard is inactive at the optimum as
    long as ``margin < 0.5 − ε``.

    Args:
        weight: term weight.
        margin: distance from 0.5 in probability units, in [0, 0.5).
        mask_key, mark_key: batch keys of ``y`` and ``m``.
    """

    def __init__(self, weight: float = 1.0, margin: float = 0.05, mask_key: str = "mask", mark_key: str = "mark"):
        super().__init__(weight)
        if not 0.0 <= margin < 0.5:
            raise ValueError(f"guard margin must be in [0, 0.5), got {margin}")
        self.margin = float(margin)
        self.logit_margin = math.log((0.5 + self.margin) / (0.5 - self.margin))
        self.mask_key = mask_key
        self.mark_key = mark_key

    def compute(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        logits = outputs["logits"].float()
        marked = batch[self.mark_key].to(logits.dtype) if logits.shape[0] else None
        if marked is None or not bool(marked.any()):
            return _zero_like_graph(logits)
        sign = 2.0 * (batch[self.mask_key] > 0.5).to(logits.dtype) - 1.0
        hinge = F.relu(self.logit_margin - sign * logits)
        return (hinge * marked).sum() / marked.sum()

    def extra_repr(self) -> str:
        return f"weight={self.weight}, margin={self.margin}"
