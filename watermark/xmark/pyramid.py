"""Laplacian pyramid in torch (Burt & Adelson), differentiable and exactly invertible.

X-Mark penalises the perturbation δ band by band (docs/xmark.md): its finest bands are
what a human sees as noise and what JPEG/resizing destroy, while the low-pass residual
is free. The decomposition is

    g_0 = x,    g_{k+1} = down(g_k),    band_k = g_k − up(g_{k+1}, size(g_k)),

with ``down`` = 5-tap binomial blur [1, 4, 6, 4, 1]/16 then keep every second pixel and
``up`` = zero insertion then the same blur with gain 2 per axis. Reconstruction runs the
recursion backwards, ``g_k = band_k + up(g_{k+1})``, so it is exact up to float rounding
whatever ``up`` does -- and odd sizes are fine because ``up`` targets the stored size.

Borders use reflect padding: on a zero-inserted signal it keeps the gain of ``up``
exactly 1 at the edges, so a constant (or any content of the low-pass residual alone)
produces all-zero bands. Replicate padding would not (edge pixels would be counted
several times and a constant δ would be "high-frequency" along the border).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_BINOMIAL_5 = (1.0, 4.0, 6.0, 4.0, 1.0)


def _kernel_1d(x: Tensor) -> Tensor:
    k = torch.tensor(_BINOMIAL_5, dtype=x.dtype, device=x.device)
    return k / k.sum()


def _blur(x: Tensor, gain: float = 1.0) -> Tensor:
    """Separable 5-tap binomial blur of B×C×H×W (reflect borders), times ``gain``."""
    channels = x.shape[1]
    k = _kernel_1d(x) * gain ** 0.5  # half of the gain per axis
    kx = k.view(1, 1, 1, 5).expand(channels, 1, 1, 5)
    ky = k.view(1, 1, 5, 1).expand(channels, 1, 5, 1)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="reflect"), kx, groups=channels)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="reflect"), ky, groups=channels)


def pyr_down(x: Tensor) -> Tensor:
    """Blur and subsample: B×C×H×W -> B×C×⌈H/2⌉×⌈W/2⌉. Needs H, W ≥ 3 (reflect padding)."""
    return _blur(x)[..., ::2, ::2]


def pyr_up(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero-insert to ``size`` (H, W) and blur with gain 4: B×C×h×w -> B×C×H×W.

    ``size`` must satisfy ``h == ⌈H/2⌉`` and ``w == ⌈W/2⌉`` (the sizes :func:`pyr_down` produced).
    """
    height, width = int(size[0]), int(size[1])
    if x.shape[-2] != (height + 1) // 2 or x.shape[-1] != (width + 1) // 2:
        raise ValueError(f"cannot up-sample {tuple(x.shape[-2:])} to {(height, width)}: expected half the size")
    up = x.new_zeros(*x.shape[:-2], height, width)
    up[..., ::2, ::2] = x
    # Zero insertion keeps one sample in four: gain 4 (2 per axis) restores the mean.
    return _blur(up, gain=4.0)


def max_levels(height: int, width: int) -> int:
    """Largest ``levels`` that :func:`laplacian_pyramid` accepts for an H×W image."""
    levels, h, w = 0, int(height), int(width)
    while min(h, w) >= 3:
        levels += 1
        h, w = (h + 1) // 2, (w + 1) // 2
    return levels


def laplacian_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """Decompose ``x`` into ``levels`` band-pass images and a low-pass residual.

    Args:
        x: B×C×H×W float tensor (any range; δ in X-Mark is in [−ε, ε]).
        levels: number of band-pass levels, 0 ≤ levels ≤ :func:`max_levels` (H, W).

    Returns:
        ``[band_0, ..., band_{levels−1}, residual]``: ``band_k`` is B×C×H_k×W_k with
        ``H_0 = H`` and ``H_{k+1} = ⌈H_k / 2⌉`` (band_0 is the finest); the residual is
        B×C×H_levels×W_levels. Differentiable; :func:`reconstruct` inverts it.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a B×C×H×W tensor, got shape {tuple(x.shape)}")
    if levels < 0:
        raise ValueError(f"levels must be >= 0, got {levels}")
    limit = max_levels(x.shape[-2], x.shape[-1])
    if levels > limit:
        raise ValueError(
            f"levels={levels} is too many for a {x.shape[-2]}×{x.shape[-1]} image: at most {limit} "
            "(every level that is split must be at least 3×3)"
        )
    pyramid = []
    current = x
    for _ in range(levels):
        low = pyr_down(current)
        pyramid.append(current - pyr_up(low, current.shape[-2:]))
        current = low
    pyramid.append(current)
    return pyramid


def reconstruct(pyramid: list[Tensor]) -> Tensor:
    """Invert :func:`laplacian_pyramid`: ``[band_0, ..., residual]`` -> B×C×H×W (exact up to rounding)."""
    if not pyramid:
        raise ValueError("empty pyramid")
    current = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        current = band + pyr_up(current, band.shape[-2:])
    return current
