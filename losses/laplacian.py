"""Frequency penalty on a perturbation δ: band energies of its Laplacian pyramid."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from losses.base import LossTerm
from watermark.xmark.pyramid import laplacian_pyramid


class LaplacianPenaltyTerm(LossTerm):
    """Band-weighted energy of δ in a Laplacian pyramid (:mod:`watermark.xmark.pyramid`).

    ``Σ_k level_weights[k] · mean(band_k(δ)²)``, k = 0 the finest band; the low-pass
    residual is not penalised, so smooth, low-frequency marks are free while pixel-level
    noise (visible, and fragile under JPEG/resizing) is expensive. Each band's energy is a
    per-pixel mean, so the weights compare bands of different sizes fairly.

    Args:
        levels: number of band-pass levels (≥ 1; δ must be at least 3·2^(levels−1) pixels
            on its shorter side).
        level_weights: ``levels`` non-negative weights; default ``2^−k`` (1, 0.5, 0.25, ...),
            finest weighted most.
        delta_key: ``outputs[delta_key]`` = δ, B×C×H×W.
    """

    def __init__(
        self,
        weight: float = 1.0,
        levels: int = 3,
        level_weights: list[float] | None = None,
        delta_key: str = "delta",
    ):
        super().__init__(weight)
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        level_weights = [2.0**-k for k in range(levels)] if level_weights is None else [float(w) for w in level_weights]
        if len(level_weights) != levels or any(w < 0 or not math.isfinite(w) for w in level_weights):
            raise ValueError(f"level_weights must be {levels} finite non-negative numbers, got {level_weights}")
        self.levels = int(levels)
        self.level_weights = level_weights
        self.delta_key = delta_key

    def compute(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        bands = laplacian_pyramid(outputs[self.delta_key], self.levels)[:-1]
        return sum(w * band.pow(2).mean() for w, band in zip(self.level_weights, bands))

    def extra_repr(self) -> str:
        return f"weight={self.weight}, levels={self.levels}, level_weights={self.level_weights}"
