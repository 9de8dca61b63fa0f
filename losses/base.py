"""Composable loss terms.

A loss term is an ``nn.Module`` with a mutable ``weight`` and a ``forward(outputs, batch)``
returning a scalar. Objectives (``lightning_modules``) sum ``weight * term`` over the terms
configured in ``configs/loss/*.yaml`` and log each term on its own; callbacks can change
``weight`` during training (warm-up, ramps) without code in the modules.

``outputs`` is the dict the objective builds for a batch, at least ``{"logits": ...}``;
``batch`` is the data-module batch (see docs/data.md, "Batches").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class LossTerm(nn.Module, ABC):
    """Base class of loss terms. Subclasses implement :meth:`compute`."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)

    def forward(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        return self.compute(outputs, batch)

    @abstractmethod
    def compute(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        """Unweighted scalar value of the term for this batch."""

    def extra_repr(self) -> str:
        return f"weight={self.weight}"
