"""Removal-aware δ: the PGD loss as an expectation over the removal attacks a thief would use.

MIAD-MARK's δ (:mod:`watermark.medlocker.footprint_pgd`) maximises the surrogates' cross-entropy
of the true grade on the protected image. Removal-aware, the loss is

    CE(x) + w_median CE(median_k(x)) + w_blur CE(blur_sigma(x)) + w_jpeg CE(JPEG_q(x))
          + w_inpaint CE(inpaint_mark(x))

with the weights of ``method.delta.eot`` (all 0: exactly the plain loss, nothing else is
computed). Each transformation is differentiable or straight-through:

* median ``k x k`` -- :func:`watermark.medlocker.removal_attacks.median_filter` (unfold + median:
  a subgradient through the selected pixel);
* Gaussian blur -- :func:`watermark.medlocker.removal_attacks.gaussian_blur` (a convolution);
* JPEG -- straight-through: forward the real OpenCV JPEG round trip of the attack suite,
  backward identity (:func:`jpeg_straight_through`);
* inpainting of the visible mark -- straight-through: forward the same ``cv2.inpaint`` of the
  mark's footprint as the attack suite; backward through the pixels outside the footprint
  (identity there) and, for the filled pixels, through a differentiable fill of the hole from
  its border (:func:`diffuse_fill`, normalised convolution). A hole is filled from its ring, so
  δ placed on the ring (``method.delta.eot.ring_px``: δ's support is the mark's footprint dilated
  by that many pixels, minus the lesion region) steers what the inpainting paints.

Input diversity (``method.delta.eot.diversity``, a probability; 0 = off): at each loss evaluation,
with that probability, every view above is shrunk to a random size (drawn per view) in
``[diversity_scale · H, H]`` and zero-padded back to ``H x W`` at a random offset before the
surrogates see it (:func:`input_diversity`) -- the transfer-attack recipe for perturbations that
must also fool models they were not optimised against.

Images are ``B x C x H x W`` float in [0, 1]; masks are bool ``B x H x W``. Framework-free.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from watermark.medlocker.removal_attacks import gaussian_blur, inpaint_footprint, jpeg, median_filter

EOT_TRANSFORMS = ("median", "blur", "jpeg", "inpaint")


def check_eot(eot: dict) -> dict:
    """The validated ``method.delta.eot`` block: ``median``, ``blur``, ``jpeg``, ``inpaint`` weights
    (>= 0), ``blur_sigma`` (> 0), ``ring_px`` (integer >= 0), ``diversity`` (probability, default 0) and
    ``diversity_scale`` (in (0, 1], default 0.9). Raises ``ValueError`` naming the field."""
    out = {}
    for name in EOT_TRANSFORMS:
        w = float(eot[name])
        if not w >= 0:
            raise ValueError(f"method.delta.eot.{name} must be a weight >= 0, got {eot[name]!r}")
        out[name] = w
    out["blur_sigma"] = float(eot["blur_sigma"])
    if not out["blur_sigma"] > 0:
        raise ValueError(f"method.delta.eot.blur_sigma must be > 0, got {eot['blur_sigma']!r}")
    ring = eot["ring_px"]
    if int(ring) != ring or int(ring) < 0:
        raise ValueError(f"method.delta.eot.ring_px must be an integer >= 0, got {ring!r}")
    out["ring_px"] = int(ring)
    out["diversity"] = float(eot.get("diversity", 0.0))
    if not 0.0 <= out["diversity"] <= 1.0:
        raise ValueError(f"method.delta.eot.diversity must be a probability in [0, 1], got {eot.get('diversity')!r}")
    out["diversity_scale"] = float(eot.get("diversity_scale", 0.9))
    if not 0.0 < out["diversity_scale"] <= 1.0:
        raise ValueError(f"method.delta.eot.diversity_scale must be in (0, 1], got {eot.get('diversity_scale')!r}")
    return out


def jpeg_straight_through(images: Tensor, quality: int) -> Tensor:
    """Forward: the OpenCV JPEG round trip (:func:`jpeg`); backward: identity. Same shape as ``images``."""
    return images + (jpeg(images.detach(), quality) - images).detach()


def diffuse_fill(images: Tensor, hole: Tensor, iterations: int) -> Tensor:
    """Differentiable fill of ``hole`` (bool B×H×W) from its border by normalised 3×3 convolution.

    Each iteration gives every still-unknown pixel with a known 8-neighbour the mean of its known
    neighbours, then marks it known; pixels outside the hole are returned unchanged. Gradients flow
    from each filled pixel to the known pixels it was averaged from (a linear stand-in for
    ``cv2.inpaint``, which also fills from the border inwards). Pixels still unknown after
    ``iterations`` keep their input values.
    """
    B, C, H, W = images.shape
    known = (~hole).to(images.dtype).reshape(B, 1, H, W)
    values = images * known
    box = torch.ones(1, 1, 3, 3, dtype=images.dtype, device=images.device)
    for _ in range(int(iterations)):
        if bool(known.min() > 0):
            break
        num = F.conv2d(values.reshape(B * C, 1, H, W), box, padding=1).reshape(B, C, H, W)
        den = F.conv2d(known, box, padding=1)
        new = (den > 0).to(images.dtype) * (1 - known)
        values = values + new * num / den.clamp_min(1.0)
        known = known + new
    return values + (1 - known) * images


def inpaint_straight_through(images: Tensor, hole: Tensor, radius: int) -> Tensor:
    """Forward: ``cv2.inpaint`` of ``hole`` (:func:`inpaint_footprint`, Telea, ``radius``), exactly
    the attack suite's; backward: identity off the hole, :func:`diffuse_fill`'s gradient on it
    (so the gradient of a filled pixel reaches the ring around the hole, none reaches the hole's
    own input pixels). ``hole``: bool B×H×W on ``images``' device."""
    if not bool(hole.any()):
        return images
    filled = inpaint_footprint(images.detach(), hole, int(radius))
    soft = diffuse_fill(images, hole, iterations=2 * int(radius) + 1)
    soft = soft + (filled - soft).detach()
    return torch.where(hole.unsqueeze(1), soft, images)


def ring_support(mark_fp: np.ndarray, region: np.ndarray, ring_px: int) -> np.ndarray:
    """δ's support with a ring: the mark's footprint (bool H×W) dilated by ``ring_px`` (square
    ``(2r+1)²`` kernel), minus the lesion ``region`` (bool H×W). ``ring_px`` 0 returns the footprint."""
    if ring_px == 0:
        return mark_fp.copy()
    kernel = np.ones((2 * ring_px + 1, 2 * ring_px + 1), np.uint8)
    grown = cv2.dilate(mark_fp.astype(np.uint8), kernel).astype(bool)
    return grown & ~region


def input_diversity(images: Tensor, scale: float, generator: torch.Generator) -> Tensor:
    """``images`` (B×C×H×W) bilinearly shrunk to ``h x w`` with ``h`` drawn in ``[round(scale·H), H]``
    (``w`` in proportion), then zero-padded back to ``H x W`` at a random offset; differentiable.
    One draw for the whole batch, from ``generator`` (CPU). ``scale`` 1 returns ``images``."""
    H, W = images.shape[-2:]
    low = max(1, int(round(scale * H)))
    h = int(torch.randint(low, H + 1, (1,), generator=generator))
    if h == H:
        return images
    w = max(1, int(round(W * h / H)))
    small = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
    top = int(torch.randint(0, H - h + 1, (1,), generator=generator))
    left = int(torch.randint(0, W - w + 1, (1,), generator=generator))
    return F.pad(small, (left, W - w - left, top, H - h - top))


def eot_loss(per_image_ce: Callable[[Tensor], Tensor], eot: dict, removal: dict, mark_fps: Tensor,
             generator: torch.Generator | None = None) -> Callable[[Tensor], Tensor]:
    """The removal-aware PGD loss ``x -> (B,)``: ``per_image_ce(x)`` plus each transformation's
    ``per_image_ce`` times its weight (transformations of weight 0 are not computed).

    Args:
        per_image_ce: images B×C×H×W in [0, 1] -> per-image loss ``(B,)`` to maximise.
        eot: :func:`check_eot`'s dict; removal: ``median_k``, ``jpeg_quality``, ``inpaint_radius``
            (``method.removal``: the same attacks the protection is judged on).
        mark_fps: bool B×H×W, the visible mark of each image (what a thief inpaints; all False for
            an image without a mark).
        generator: CPU generator of the input-diversity draws (``eot["diversity"] > 0``; None = a
            fresh one seeded 0).
    """
    views: list[tuple[float, Callable[[Tensor], Tensor]]] = []
    if eot["median"] > 0:
        views.append((eot["median"], lambda x: median_filter(x, int(removal["median_k"]))))
    if eot["blur"] > 0:
        views.append((eot["blur"], lambda x: gaussian_blur(x, eot["blur_sigma"])))
    if eot["jpeg"] > 0:
        views.append((eot["jpeg"], lambda x: jpeg_straight_through(x, int(removal["jpeg_quality"]))))
    if eot["inpaint"] > 0:
        views.append((eot["inpaint"], lambda x: inpaint_straight_through(x, mark_fps, int(removal["inpaint_radius"]))))

    p = eot.get("diversity", 0.0)
    draws = generator if generator is not None else torch.Generator().manual_seed(0)

    def loss(x: Tensor) -> Tensor:
        diverse = p > 0 and float(torch.rand((), generator=draws)) < p  # one draw per evaluation (PGD step)
        ce = (lambda v: per_image_ce(input_diversity(v, eot["diversity_scale"], draws))) if diverse else per_image_ce
        total = ce(x)
        for weight, view in views:
            total = total + weight * ce(view(x))
        return total

    return loss
