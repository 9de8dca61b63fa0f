"""Removal attacks a thief may run on a stolen segmentation model before deploying it.

Used by ``verify.py attack=...`` for the robustness study: the suspect is modified in place,
then verified as usual. Pure PyTorch (no Lightning), framework-free like the rest of
``watermark/``.

* :func:`prune_global_l1` -- global L1 unstructured pruning of every conv / linear weight,
  made permanent (the pruned weights are plain zeros afterwards, no masks or hooks).
* :func:`finetune` -- a few epochs of plain supervised training on clean data
  (BCE + soft Dice, AdamW).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

_PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, "weight")`` for every conv (1/2/3-d, transposed) and linear layer."""
    return [(m, "weight") for m in model.modules()
            if isinstance(m, _PRUNABLE) and isinstance(getattr(m, "weight", None), nn.Parameter)]


def prune_global_l1(model: nn.Module, amount: float) -> dict[str, Any]:
    """Zero the ``amount`` share of all conv/linear weights with the smallest ``|w|``, permanently.

    Args:
        model: modified in place.
        amount: share in [0, 1) of the pooled weights to zero.
    Returns:
        ``{"amount", "num_tensors", "num_weights", "sparsity"}`` -- ``sparsity`` is the share
        of those weights that are zero afterwards.
    """
    amount = float(amount)
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"attack.amount must be in [0, 1), got {amount}")
    params = prunable_weights(model)
    if not params:
        raise ValueError("the model has no conv/linear weights to prune")
    if amount > 0:
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
        for module, name in params:
            prune.remove(module, name)  # bake the mask into the weight: no reparametrisation left
    total = sum(m.weight.numel() for m, _ in params)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in params)
    return {"amount": amount, "num_tensors": len(params), "num_weights": total, "sparsity": zeros / total}


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE + (1 − soft Dice) of B×1×H×W logits against {0,1} masks (the task loss)."""
    mask = mask.float()
    probs = torch.sigmoid(logits)
    inter = (probs * mask).flatten(1).sum(1)
    dice = (2 * inter + 1.0) / (probs.flatten(1).sum(1) + mask.flatten(1).sum(1) + 1.0)
    return F.binary_cross_entropy_with_logits(logits, mask) + (1.0 - dice).mean()


def finetune(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    epochs: int = 1,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Fine-tune a segmentation model on clean data, in place.

    Args:
        model: ``forward(images B×C×H×W [0,1], boxes) -> logits B×1×H×W``.
        batches: re-iterable source of ``{"image", "mask"}`` batches (a DataLoader), one pass per epoch.
        epochs, lr, weight_decay: AdamW schedule (constant learning rate).
        max_batches: per-epoch cap (None = all).
        seed: torch seed of the attack (dropout, loader shuffling).
    Returns:
        ``{"epochs", "steps", "first_loss", "last_loss", "seconds"}``.
    """
    if epochs < 0 or lr <= 0:
        raise ValueError(f"finetune needs epochs >= 0 and lr > 0, got epochs={epochs}, lr={lr}")
    torch.manual_seed(seed)
    started = time.perf_counter()
    device = torch.device(device)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps, first, last = 0, None, None
    for _ in range(int(epochs)):
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            logits = model(batch["image"].to(device), None)
            loss = segmentation_loss(logits.float(), batch["mask"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            value = float(loss.detach())
            first = value if first is None else first
            last = value
    model.eval()
    return {"epochs": int(epochs), "steps": steps, "first_loss": first, "last_loss": last,
            "seconds": round(time.perf_counter() - started, 3)}
