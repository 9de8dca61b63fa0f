"""The 8-bit grid a stored image lives on: quantisation and uint8 <-> float conversions.

A published image is an 8-bit PNG, so every method judges its marked images on that grid:
``v -> floor(v * 255 + 0.5) / 255`` (round half up; exact for ``v = k / 255``). Framework-free
(torch + NumPy only); shared by the methods' cores in :mod:`watermark`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["from_uint8_hwc", "quantise", "to_uint8_hwc"]


def quantise(images: Tensor) -> Tensor:
    """Round to the uint8 grid a stored PNG has: ``floor(v * 255 + 0.5) / 255`` (v clipped to [0, 1]).

    Any shape (e.g. B×C×H×W) -> the same shape, values multiples of 1/255 in [0, 1].
    """
    return torch.floor(images.clamp(0, 1) * 255.0 + 0.5) / 255.0


def to_uint8_hwc(image: Tensor) -> np.ndarray:
    """C×H×W float [0, 1] -> H×W×C uint8 (C-contiguous) by ``floor(v * 255 + 0.5)`` (exact for v = k / 255)."""
    a = image.detach().to("cpu", torch.float64).clamp(0, 1).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(np.floor(a * 255.0 + 0.5).astype(np.uint8))


def from_uint8_hwc(array: np.ndarray, like: Tensor | None = None) -> Tensor:
    """H×W×C (or H×W) uint8 -> C×H×W float in [0, 1] (``v / 255``).

    float32 on the CPU, or ``like``'s device and dtype when given.
    """
    a = np.array(array, dtype=np.uint8, copy=True)
    if a.ndim == 2:
        a = a[..., None]
    out = torch.from_numpy(a).permute(2, 0, 1).float() / 255.0
    return out if like is None else out.to(like.device, like.dtype)
