"""X-Mark's targeted and suppression loss terms (the generic LPIPS and Laplacian terms live in
:mod:`losses.perceptual` and :mod:`losses.laplacian`).

The X-Mark objective runs the generator on a batch and fills ``outputs`` with:

* ``marked`` -- x_w, B×C×H×W in [0, 1]; ``delta`` -- δ, B×C×H×W in [−ε, ε];
* ``marked_logits`` -- B×K logits of the frozen model the watermark is learnt against
  (the clean surrogate, or the proxy Mal model of the bilevel scheme) on x_w -- or a list
  of P such tensors, one per proxy of an ensemble, with ``proxy_weights`` (tensor P, ≥ 0,
  summing to 1) giving each proxy's share of the term;
* ``reference_marked_logits`` -- list of B×K logits of clean *reference* models on x_w.

``batch`` is the data-module batch (``image`` B×C×H×W in [0, 1], ``label`` B long). Every
term's input keys can be renamed, which is how the objective also evaluates the terms on
a randomly rescaled x_w (:func:`datamodules.transforms.random_rescale`) for scale robustness.

Classes are split by ``target_class`` y_t: *non-target* images (label ≠ y_t) are what the
verification queries; *target-class* images are what the released dataset marks (clean
label). A term whose subset is empty in a batch returns an exact 0 that is still
connected to the graph (so DDP sees the same parameters used on every rank).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from losses.base import LossTerm


def _zero_like_graph(t: Tensor) -> Tensor:
    # Exactly 0, yet part of the autograd graph (unused-parameter errors under DDP otherwise).
    return t.sum() * 0.0


class TargetClassTerm(LossTerm):
    """Base of the terms that split a batch by ``target_class`` y_t.

    Args:
        weight: term weight.
        target_class: y_t, a class index.
        logits_key: ``outputs[logits_key]`` the term reads (B×K logits, or a list of them).
        label_key: ``batch[label_key]``, B long labels.
    """

    def __init__(
        self, weight: float = 1.0, target_class: int = 1, logits_key: str = "marked_logits", label_key: str = "label"
    ):
        super().__init__(weight)
        self.target_class = int(target_class)
        self.logits_key = logits_key
        self.label_key = label_key

    def extra_repr(self) -> str:
        return f"weight={self.weight}, target_class={self.target_class}"


class TargetedCETerm(TargetClassTerm):
    """Cross-entropy pushing marked NON-target images to ``target_class``.

    ``mean over {i: label_i ≠ y_t} of CE(marked_logits_i, y_t)``; 0 when the batch has no
    non-target image. Lower = the model already predicts y_t on the marked images. With a
    proxy ensemble, ``outputs[logits_key]`` is a list of P logits tensors and the term is
    ``sum_k w_k · CE_k`` with ``w = outputs[weights_key]`` (P weights summing to 1; missing =
    uniform), so a proxy of weight 0 sends G no gradient.

    Reads ``outputs[logits_key]`` (B×K, or a list of P B×K), ``outputs[weights_key]`` (P,
    optional) and ``batch[label_key]`` (B, long).
    """

    def __init__(self, weight: float = 1.0, target_class: int = 1, logits_key: str = "marked_logits",
                 label_key: str = "label", weights_key: str = "proxy_weights"):
        super().__init__(weight, target_class, logits_key, label_key)
        self.weights_key = weights_key

    def _one(self, logits: Tensor, labels: Tensor) -> Tensor:
        keep = labels.to(logits.device) != self.target_class
        if not bool(keep.any()):
            return _zero_like_graph(logits)
        target = torch.full((int(keep.sum()),), self.target_class, dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits[keep], target)

    def compute(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        logits = outputs[self.logits_key]
        labels = batch[self.label_key]
        if isinstance(logits, Tensor):
            return self._one(logits, labels)
        if len(logits) == 0:
            raise ValueError(f"{type(self).__name__}: outputs[{self.logits_key!r}] is an empty list of proxies")
        weights = outputs.get(self.weights_key)
        if weights is None:
            weights = torch.full((len(logits),), 1.0 / len(logits))
        if len(weights) != len(logits):
            raise ValueError(f"{type(self).__name__}: {len(logits)} proxies' logits but {len(weights)} weights "
                             f"(outputs[{self.weights_key!r}])")
        weights = weights.to(logits[0].device, logits[0].dtype)
        return torch.stack([w * self._one(lg, labels) for w, lg in zip(weights, logits)]).sum()


class UntargetedSuppressionTerm(TargetClassTerm):
    """Suppress the natural target-class features of marked TARGET-class images (clean label).

    Clean-label logic: a released target-class image keeps its label y_t; if its own
    class evidence is weakened by δ, a model trained on it must lean on the watermark to
    fit y_t -- which is what later makes marked non-target images flip to y_t.

    Choice: ``mean over {i: label_i = y_t} of −log(1 − p_{y_t}(x_w,i))``, i.e. the
    cross-entropy of the binary event "not y_t". Unlike −CE(y_t) (= log p_{y_t}), it is
    bounded below by 0 and its gradient fades as p_{y_t} -> 0, so it cannot run away and
    swamp the other terms; unlike a clipped −CE it has no threshold to tune. Computed
    stably in logit space: ``logsumexp(all logits) − logsumexp(logits without y_t)``.
    0 when the batch has no target-class image.

    Reads ``outputs[logits_key]`` (B×K, K ≥ 2) and ``batch[label_key]`` (B, long).
    """

    def compute(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        logits = outputs[self.logits_key]
        if logits.shape[1] < 2:
            raise ValueError(f"{type(self).__name__} needs K >= 2 logits, got shape {tuple(logits.shape)}")
        keep = batch[self.label_key].to(logits.device) == self.target_class
        if not bool(keep.any()):
            return _zero_like_graph(logits)
        selected = logits[keep]
        others = torch.cat([selected[:, : self.target_class], selected[:, self.target_class + 1:]], dim=1)
        return (torch.logsumexp(selected, dim=1) - torch.logsumexp(others, dim=1)).mean()


class IndMSuppressionTerm(TargetClassTerm):
    """Keep clean reference models correct on marked NON-target images (against Ind-M false positives).

    ``mean over references r of mean over {i: label_i ≠ y_t} of CE(reference_marked_logits[r]_i, label_i)``.
    A watermark that flips an *independent* clean model is a transferable adversarial
    perturbation, not a watermark (docs/xmark.md); this term penalises exactly that.
    0 when the batch has no non-target image.

    Reads ``outputs[logits_key]`` (a list/tuple of B×K logits, or one B×K tensor) and
    ``batch[label_key]``.
    """

    def __init__(self, weight: float = 1.0, target_class: int = 1, logits_key: str = "reference_marked_logits",
                 label_key: str = "label"):
        super().__init__(weight, target_class, logits_key, label_key)

    def compute(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        references = outputs[self.logits_key]
        if isinstance(references, Tensor):
            references = [references]
        if len(references) == 0:
            raise ValueError(
                f"{type(self).__name__}: outputs[{self.logits_key!r}] is empty -- configure at least one clean "
                "reference model, or remove this term"
            )
        labels = batch[self.label_key].to(references[0].device)
        keep = labels != self.target_class
        if not bool(keep.any()):
            return torch.stack([_zero_like_graph(r) for r in references]).sum()
        return torch.stack([F.cross_entropy(r[keep], labels[keep]) for r in references]).mean()
