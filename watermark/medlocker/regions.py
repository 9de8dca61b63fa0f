"""Lesion regions the visible mark must never touch, and where a logo may go instead.

Two ways to get the protected region (docs/medlocker.md):

- MedLocker: connected components of a lesion mask (segmentation model output or
  ground truth) -> dilated bounding boxes -> :func:`region_from_boxes`.
- MIAD-MARK: the surrogate's Grad-CAM map thresholded at ``T / 255`` with
  ``T in {110, 130, 150, 170}`` -> :func:`region_from_saliency`. The CAM itself is
  computed elsewhere (grad-cam package); this module only thresholds it.

:func:`allowed_positions` then lists every top-left position at which a logo lies
fully inside the image and shares no pixel with the region.

Boxes are ``(x0, y0, x1, y1)`` with *exclusive* ends, as in numpy slicing:
``region[y0:y1, x0:x1]``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.signal import fftconvolve
from skimage.measure import label, regionprops

Box = tuple[int, int, int, int]

# MIAD-MARK's Grad-CAM thresholds (out of 255) from the paper's ablation.
MIADMARK_THRESHOLDS = (110, 130, 150, 170)


def _as_bool_2d(a, name: str) -> np.ndarray:
    arr = np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a)
    arr = np.squeeze(arr) if arr.ndim > 2 else arr
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D H x W array, got shape {arr.shape}")
    return arr.astype(bool)


def boxes_from_mask(lesion_mask, dilation_px: int = 0, min_area_px: int = 1) -> list[Box]:
    """Dilated bounding boxes of the connected lesion components (MedLocker).

    Args:
        lesion_mask: bool/{0,1} ``H x W`` (singleton leading dims are squeezed).
        dilation_px: margin added on every side of each box, clipped to the image, so
            the mark also keeps away from the lesion's immediate surroundings.
        min_area_px: components smaller than this (pixels) are ignored -- only for
            deliberately discarding segmentation speckle; the default keeps everything.

    Returns:
        Boxes ``(x0, y0, x1, y1)``, exclusive ends, sorted by ``(y0, x0)``; 8-connectivity.
    """
    if dilation_px < 0:
        raise ValueError(f"dilation_px must be >= 0, got {dilation_px}")
    m = _as_bool_2d(lesion_mask, "lesion_mask")
    H, W = m.shape
    boxes = []
    for prop in regionprops(label(m, connectivity=2)):
        if prop.area < min_area_px:
            continue
        r0, c0, r1, c1 = prop.bbox  # exclusive ends
        boxes.append((max(0, c0 - dilation_px), max(0, r0 - dilation_px),
                      min(W, c1 + dilation_px), min(H, r1 + dilation_px)))
    return sorted(boxes, key=lambda b: (b[1], b[0], b[3], b[2]))


def region_from_boxes(boxes, H: int, W: int) -> np.ndarray:
    """Union of boxes ``(x0, y0, x1, y1)`` (exclusive ends) as a bool ``H x W`` region."""
    region = np.zeros((H, W), dtype=bool)
    for box in boxes:
        x0, y0, x1, y1 = (int(v) for v in box)
        if x1 < x0 or y1 < y0:
            raise ValueError(f"box {box} is not (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1")
        region[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    return region


def region_from_saliency(cam, threshold_255: int = 130, dilation_px: int = 0) -> np.ndarray:
    """MIAD-MARK's lesion region: pixels whose Grad-CAM value is at least ``T / 255``.

    Args:
        cam: float ``H x W`` saliency in [0, 1] (singleton leading dims are squeezed).
        threshold_255: ``T`` in 0..255; the paper uses 110, 130, 150 or 170. Lower
            ``T`` protects a larger region.
        dilation_px: optional square dilation of the result (0 = none).

    Returns:
        bool ``H x W``: True where ``cam * 255 >= T``.
    """
    if isinstance(threshold_255, bool) or int(threshold_255) != threshold_255 or not 0 <= threshold_255 <= 255:
        raise ValueError(f"threshold_255 must be an integer in 0..255, got {threshold_255!r}")
    c = np.asarray(cam.detach().cpu().numpy() if hasattr(cam, "detach") else cam, dtype=np.float64)
    c = np.squeeze(c) if c.ndim > 2 else c
    if c.ndim != 2:
        raise ValueError(f"cam must be a 2-D H x W map, got shape {c.shape}")
    if not np.isfinite(c).all() or c.min() < 0.0 or c.max() > 1.0:
        raise ValueError("cam must be finite and in [0, 1] (normalise the Grad-CAM map first)")
    region = c * 255.0 >= int(threshold_255)
    if dilation_px > 0:
        region = ndimage.binary_dilation(region, structure=np.ones((2 * dilation_px + 1,) * 2, dtype=bool))
    return region


def allowed_positions(region, logo_footprint_shape) -> np.ndarray:
    """Top-left positions where a logo fits fully inside the image without touching ``region``.

    Args:
        region: bool ``H x W`` protected (lesion) region.
        logo_footprint_shape: either ``(h, w)`` -- the logo's bounding rectangle must avoid
            the region -- or a bool ``h x w`` mask (e.g. ``logo.logo_mask(logo, scale)``) --
            only the logo's opaque pixels must avoid it, which permits more positions for
            sparse logos such as QR codes.

    Returns:
        bool ``(H - h + 1) x (W - w + 1)``; entry ``[y, x]`` is True iff the logo at top-left
        ``(x, y)`` overlaps no region pixel. Empty (a zero dimension) if the logo is larger
        than the image.
    """
    reg = _as_bool_2d(region, "region")
    H, W = reg.shape
    if isinstance(logo_footprint_shape, tuple) and len(logo_footprint_shape) == 2 \
            and all(isinstance(v, (int, np.integer)) for v in logo_footprint_shape):
        h, w = (int(v) for v in logo_footprint_shape)
        mask = None
    else:
        mask = _as_bool_2d(logo_footprint_shape, "logo_footprint_shape")
        h, w = mask.shape
    if h < 1 or w < 1:
        raise ValueError(f"logo footprint must be at least 1 x 1, got {h} x {w}")
    if h > H or w > W:
        return np.zeros((max(0, H - h + 1), max(0, W - w + 1)), dtype=bool)

    if mask is None or mask.all():
        # Summed-area table: region pixels inside every h x w window in O(H W).
        sat = np.zeros((H + 1, W + 1), dtype=np.int64)
        sat[1:, 1:] = reg.astype(np.int64).cumsum(0).cumsum(1)
        counts = sat[h:, w:] - sat[:-h, w:] - sat[h:, :-w] + sat[:-h, :-w]
        return counts == 0
    if not mask.any():
        return np.ones((H - h + 1, W - w + 1), dtype=bool)
    # Cross-correlation of region with the mask via FFT (O(HW log HW)); counts are integers,
    # so anything above 0.5 is a real overlap and float round-off cannot flip the decision.
    counts = fftconvolve(reg.astype(np.float64), mask[::-1, ::-1].astype(np.float64), mode="valid")
    return counts < 0.5



def fit_mark_all(lesion_mask, base_region, logo_masks: dict, dilations, order: str = "scale_first") -> list[tuple]:
    """Every rung of the fallback ladder at which a mark fits without touching the region, in ladder order.

    The region is ``base_region`` (e.g. a thresholded Grad-CAM) ∪ the lesion boxes of
    ``lesion_mask`` dilated by a margin ``d``. The rungs are the pairs (scale, margin) of
    ``logo_masks`` (``{scale: bool mask}``, largest first) × ``dilations`` (largest first):
    ``order="scale_first"`` keeps the logo's size as long as possible and shrinks the margin
    only as far as the mark needs to fit -- (s1, d1), (s1, d2), ..., (s2, d1), ...;
    ``order="margin_first"`` keeps the margin and shrinks the logo first. The lesion pixels
    are in every region of the ladder (a box at margin 0 still contains its component).

    Args:
        lesion_mask: bool ``H x W`` or None (no annotation: only ``base_region`` counts).
        base_region: bool ``H x W``.
        logo_masks: ``{scale: logo_mask(logo, scale)}``.
        dilations: box margins, e.g. ``[2, 1, 0]``.
        order: ``scale_first`` | ``margin_first``.

    Returns:
        ``[(region, allowed, scale, d), ...]`` for every rung with at least one allowed
        position (empty when nothing fits).
    """
    if order not in ("scale_first", "margin_first"):
        raise ValueError(f"order must be 'scale_first' or 'margin_first', got {order!r}")
    base = _as_bool_2d(base_region, "base_region")
    H, W = base.shape
    dilations = [int(d) for d in dilations]
    if not dilations:
        raise ValueError("dilations must name at least one margin")
    regions = {}
    for d in dilations:
        region = base.copy()
        if lesion_mask is not None:
            region |= region_from_boxes(boxes_from_mask(lesion_mask, d), H, W)
        regions[d] = region
    rungs = ([(s, d) for s in logo_masks for d in dilations] if order == "scale_first" else
             [(s, d) for d in dilations for s in logo_masks])
    out = []
    for s, d in rungs:
        allowed = allowed_positions(regions[d], logo_masks[s])
        if allowed.any():
            out.append((regions[d], allowed, float(s), d))
    return out


def fit_mark(lesion_mask, base_region, logo_masks: dict, dilations, order: str = "margin_first") -> tuple:
    """The first rung of :func:`fit_mark_all`: ``(region, allowed, scale, d)``; when nothing fits,
    ``(region at dilations[0], None, None, dilations[0])``."""
    rungs = fit_mark_all(lesion_mask, base_region, logo_masks, dilations, order)
    if rungs:
        return rungs[0]
    base = _as_bool_2d(base_region, "base_region")
    region = base.copy()
    if lesion_mask is not None:
        region |= region_from_boxes(boxes_from_mask(lesion_mask, int(list(dilations)[0])), *base.shape)
    return region, None, None, int(list(dilations)[0])
