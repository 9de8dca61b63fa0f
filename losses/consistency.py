"""Consistency with a frozen reference model (StealthMark: keep the masks, move only the mark).

When a model is watermarked by fine-tuning from weights it already has (``init_weights=``),
its own starting point is the best description of the masks it must keep. This term holds
the trained model's per-pixel probabilities to the frozen starting model's probabilities on
the *untriggered* version of each training image, everywhere except on the pixels that carry
the mark (the QR support of key rows, where the uncertainty term moves the target on purpose).

Batch keys the term reads (filled by :meth:`lightning_modules.stealthmark.StealthMarkModule.key_batch`):

* ``reference_logits`` -- B×1×H×W logits of the frozen reference model on the untriggered image
  (key rows: the same cell-masked image without the trigger; other rows: the row's image);
* ``<support_key>`` (default ``mark``) -- B×1×H×W in {0, 1}: pixels excluded from the term
  (the kept dark QR modules of key rows; 0 on every other row).

``outputs["logits"]`` is B×1×H×W.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from losses.base import LossTerm


def bernoulli_kl_from_logits(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel KL(Bernoulli(σ(reference)) ‖ Bernoulli(σ(logits))), ≥ 0, exactly 0 where the logits agree.

    Args:
        reference_logits, logits: tensors of the same shape (any), real-valued logits.
    Returns:
        tensor of that shape, in nats.
    """
    log_r, log_not_r = F.logsigmoid(reference_logits), F.logsigmoid(-reference_logits)
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    return log_r.exp() * (log_r - log_p) + log_not_r.exp() * (log_not_r - log_not_p)


class ReferenceConsistencyTerm(LossTerm):
    """Mean Bernoulli KL between the frozen reference's and the model's probabilities off the mark.

    Zero when the model's logits equal the reference's on every pixel outside the support,
    positive otherwise; pixels inside the support (``batch[support_key] = 1``) never contribute.
    The StealthMark objective feeds it every row of a training batch and skips it in evaluation
    (no reference there); with no reference model (no ``init_weights``) it is not computed.

    Args:
        weight: term weight.
        reference_key: batch key of the reference logits (B×1×H×W).
        support_key: batch key of the excluded pixels (B×1×H×W, {0, 1}).
    """

    def __init__(self, weight: float = 1.0, reference_key: str = "reference_logits", support_key: str = "mark"):
        super().__init__(weight)
        self.reference_key = reference_key
        self.support_key = support_key

    def compute(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        logits = outputs["logits"].float()
        reference = batch[self.reference_key].to(logits.dtype)
        if reference.shape != logits.shape:
            raise ValueError(f"{self.reference_key} has shape {tuple(reference.shape)}, logits {tuple(logits.shape)}")
        outside = 1.0 - batch[self.support_key].to(logits.dtype)
        kl = bernoulli_kl_from_logits(reference, logits)
        return (kl * outside).sum() / outside.sum().clamp_min(1.0)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, support_key={self.support_key!r}"
