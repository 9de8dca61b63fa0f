"""Cell geometry shared by StealthMark training and LIME verification.

The QR grid (``G×G`` modules) is laid over a square ``H×H`` image with ``q`` cells of
quiet zone on every side, so the image is divided into ``n×n`` cells, ``n = G + 2q``,
each ``cell_px = H / n`` pixels wide. Cell ``(i, j)`` of the full grid covers pixels
``[i·cell_px, (i+1)·cell_px) × [j·cell_px, (j+1)·cell_px)``; QR module ``(r, c)`` is full-grid
cell ``(r + q, c + q)``. Training drops cells with ``apply_cell_mask`` and LIME drops the
same cells (its segments are ``cell_index_map``), so the model learns exactly the
perturbation the verifier will apply. Trigger pixels live in quiet-zone cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GridSpec:
    """QR grid laid over a square image.

    Attributes:
        grid_size: ``G``, QR modules per side (``4·version + 17``).
        image_size: ``H``, image height = width in pixels.
        quiet_zone: ``q``, cells of quiet zone on each side (0 allowed).
    """

    grid_size: int
    image_size: int
    quiet_zone: int = 0

    def __post_init__(self) -> None:
        if self.grid_size < 1 or self.image_size < 1 or self.quiet_zone < 0:
            raise ValueError(f"invalid GridSpec {self}: sizes must be positive and quiet_zone >= 0")
        if self.image_size % self.cells_per_side:
            n = self.cells_per_side
            nearest = n * max(1, round(self.image_size / n))
            raise ValueError(
                f"image_size {self.image_size} is not divisible by grid_size + 2*quiet_zone = "
                f"{self.grid_size} + 2*{self.quiet_zone} = {n} cells; pick an image size "
                f"that is a multiple of {n} (e.g. {nearest})"
            )

    @property
    def cells_per_side(self) -> int:
        """``n = G + 2q``: cells per side of the full grid (QR + quiet zone)."""
        return self.grid_size + 2 * self.quiet_zone

    @property
    def cell_px(self) -> int:
        """Pixels per cell side, ``H / n``."""
        return self.image_size // self.cells_per_side

    @property
    def qr_pixel_slice(self) -> slice:
        """Pixel rows (= columns) covered by the QR modules, quiet zone excluded."""
        start = self.quiet_zone * self.cell_px
        return slice(start, start + self.grid_size * self.cell_px)

    def quiet_zone_mask(self) -> np.ndarray:
        """``H×W`` bool, True on pixels of quiet-zone cells."""
        out = np.ones((self.image_size, self.image_size), dtype=bool)
        out[self.qr_pixel_slice, self.qr_pixel_slice] = False
        return out


def _check_spatial(tensor: torch.Tensor, spec: GridSpec, name: str) -> None:
    if tensor.shape[-2:] != (spec.image_size, spec.image_size):
        raise ValueError(f"{name} has spatial size {tuple(tensor.shape[-2:])}, GridSpec expects {spec.image_size}²")


def cell_index_map(spec: GridSpec) -> np.ndarray:
    """Segment id per pixel, ``H×W`` int64: cell ``(i, j)`` of the full grid has id ``i·n + j``.

    Ids run 0..n²−1 (quiet-zone cells included), which is what LIME's ``data_labels``
    assumes: it uses the feature column index directly as the segment id.
    """
    n, px = spec.cells_per_side, spec.cell_px
    ids = np.arange(n * n, dtype=np.int64).reshape(n, n)
    return np.kron(ids, np.ones((px, px), dtype=np.int64))


def upsample_cells(cells: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """QR cell values into image pixels.

    Args:
        cells: ``B×G×G`` (bool or float).
    Returns:
        ``B×1×H×W`` float, each QR cell's value over its pixels, quiet zone 0.
    """
    if cells.dim() != 3 or cells.shape[-2:] != (spec.grid_size, spec.grid_size):
        raise ValueError(f"cells must be B×{spec.grid_size}×{spec.grid_size}, got {tuple(cells.shape)}")
    q = spec.quiet_zone
    padded = F.pad(cells.float(), (q, q, q, q))
    return expand_cells(padded, spec)


def expand_cells(full_cells: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """Full-grid cell values (``B×n×n``, quiet zone included) into ``B×1×H×W`` pixels (same dtype)."""
    px = spec.cell_px
    return full_cells.repeat_interleave(px, dim=-2).repeat_interleave(px, dim=-1).unsqueeze(1)


def cell_means(prob_map: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """Mean of a ``B×1×H×W`` map over each QR cell: ``B×G×G`` (the direct per-cell readout)."""
    _check_spatial(prob_map, spec, "prob_map")
    pooled = F.avg_pool2d(prob_map.float(), kernel_size=spec.cell_px)  # B×1×n×n
    q, g = spec.quiet_zone, spec.grid_size
    return pooled[:, 0, q : q + g, q : q + g]


def apply_cell_mask(
    images: torch.Tensor,
    keep: torch.Tensor,
    spec: GridSpec,
    hide_value: float | str | Sequence[float] = 0.0,
    protect: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace dropped cells by ``hide_value``: the same perturbation LIME applies.

    Args:
        images: ``B×C×H×W`` in [0, 1].
        keep: ``B×n×n`` bool over the full grid (quiet zone included); False = drop.
        spec: the grid.
        hide_value: a float, a per-channel sequence of C floats, or ``"mean"`` (each image's
            own per-channel mean, computed before masking).
        protect: optional ``B×1×H×W`` (or ``H×W``) bool, pixels never replaced (the trigger
            region).
    Returns:
        ``B×C×H×W`` new tensor.
    """
    _check_spatial(images, spec, "images")
    n = spec.cells_per_side
    if keep.shape != (images.shape[0], n, n):
        raise ValueError(
            f"keep must be {images.shape[0]}×{n}×{n} (full grid incl. quiet zone), got {tuple(keep.shape)}"
        )
    keep_px = expand_cells(keep.to(device=images.device, dtype=torch.bool), spec)  # B×1×H×W
    if protect is not None:
        protect = protect.to(device=images.device, dtype=torch.bool)
        keep_px = keep_px | (protect if protect.dim() == 4 else protect[None, None])
    if isinstance(hide_value, str):
        if hide_value != "mean":
            raise ValueError(f"hide_value must be a number, a per-channel sequence or 'mean', got {hide_value!r}")
        fill = images.mean(dim=(2, 3), keepdim=True)
    elif isinstance(hide_value, (int, float)):
        fill = torch.full_like(images[:, :, :1, :1], float(hide_value))
    else:
        fill = torch.as_tensor(list(hide_value), dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        if fill.shape[1] != images.shape[1]:
            raise ValueError(f"hide_value has {fill.shape[1]} channels, images have {images.shape[1]}")
    return torch.where(keep_px, images, fill.expand_as(images))
