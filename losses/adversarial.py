"""Loss terms of the visible adversarial watermark (MedLocker / MIAD-MARK, docs/medlocker.md).

Both terms are minimised with respect to the mark's *placement* (translation ``tx, ty``
through ``grid_sample`` and opacity ``alpha = sigmoid(logit)``), never with respect to a
network's weights; the surrogates are frozen.

``outputs`` keys they read (built by :class:`lightning_modules.medlocker.MedLockerModule`):

- ``ensemble_logits``: list of B×K logits, one per surrogate, of the *marked* images;
- ``soft_footprint``: B×1×H×W float in [0, 1], ``alpha * A`` of the mark after the
  differentiable translation (what the mark covers, with its opacity).

``batch`` keys: ``label`` (B, long) and ``lesion_region`` (B×1×H×W bool/float: the
region the mark must not touch).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from losses.base import LossTerm


class AdversarialPlacementTerm(LossTerm):
    """Untargeted adversarial term: ``-CE(f_m(x_w), y)`` averaged over the surrogate ensemble.

    Args:
        weight: term weight.
        max_ce: the per-image CE is clipped at this value before negation (None = no
            clipping). Clipping stops an already fooled image from dominating the batch
            mean; its gradient then goes to zero, which is the intended "stop on success".
        reduction: ``mean`` (scalar) or ``none`` (per image, ``B``) -- the placement
            optimiser uses ``none`` to rank restarts per image.
    """

    def __init__(self, weight: float = 1.0, max_ce: float | None = 10.0, reduction: str = "mean"):
        super().__init__(weight)
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        self.max_ce = max_ce
        self.reduction = reduction

    def per_image(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        """``(B,)`` negative ensemble-mean cross-entropy of the true label."""
        logits = outputs.get("ensemble_logits")
        if not logits:
            raise ValueError("outputs['ensemble_logits'] must be a non-empty list of B x K logits")
        label = batch["label"]
        ce = torch.stack([F.cross_entropy(lg.float(), label, reduction="none") for lg in logits]).mean(0)
        if self.max_ce is not None:
            ce = ce.clamp(max=float(self.max_ce))
        return -ce

    def compute(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        value = self.per_image(outputs, batch)
        return value.mean() if self.reduction == "mean" else value


class LesionOverlapTerm(LossTerm):
    """Penalty on the mark covering the lesion region: ``sum(alpha A * region) / sum(A)``.

    The value is the share of the mark's (opacity-weighted) mass that lies on the lesion
    region, in [0, 1] per image; 0 means the soft mark avoids the region entirely. The
    placement is additionally projected onto region-free integer positions afterwards, so
    this term steers the optimiser and the projection guarantees the constraint.

    Args:
        weight: term weight (default large: the constraint matters more than the attack).
        reduction: ``mean`` or ``none`` (per image).
    """

    def __init__(self, weight: float = 10.0, reduction: str = "mean"):
        super().__init__(weight)
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        self.reduction = reduction

    def per_image(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        fp = outputs["soft_footprint"]
        region = batch["lesion_region"].to(fp.dtype)
        if fp.shape != region.shape:
            raise ValueError(f"soft_footprint {tuple(fp.shape)} and lesion_region {tuple(region.shape)} differ")
        mass = fp.flatten(1).sum(1).clamp_min(1e-6)
        return (fp * region).flatten(1).sum(1) / mass

    def compute(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        value = self.per_image(outputs, batch)
        return value.mean() if self.reduction == "mean" else value
