"""Joint image/mask transforms (torchvision transforms v2).

Images are ``tv_tensors.Image`` float C×H×W in [0, 1]; masks are ``tv_tensors.Mask``
1×H×W. v2 applies geometric ops to both (nearest for masks) and photometric ops to the
image only, so one pipeline serves segmentation and classification.

:func:`random_rescale` is a batch augmentation on B×C×H×W tensors (differentiable): a
random down/up-sampling, as a suspect pipeline that resizes its inputs would do.
:func:`thief_augment` is the same kind of batch op for the training augmentation a thief
usually applies to a released dataset (horizontal flip, zoom about the centre).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2


def build_transforms(
    image_size: int | tuple[int, int],
    train: bool,
    hflip: float = 0.5,
    vflip: float = 0.0,
    rotate_degrees: float = 0.0,
    scale: tuple[float, float] | None = None,
    brightness: float = 0.0,
    contrast: float = 0.0,
) -> v2.Compose:
    """Resize to ``image_size`` (H, W) always; augment only when ``train``.

    The defaults are deliberately mild: watermark triggers and perturbations live in
    pixel space, and heavy colour augmentation of clean data is a choice for configs.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    ops: list = [v2.Resize(size, antialias=True)]
    if train:
        if hflip > 0:
            ops.append(v2.RandomHorizontalFlip(hflip))
        if vflip > 0:
            ops.append(v2.RandomVerticalFlip(vflip))
        if rotate_degrees > 0 or scale is not None:
            ops.append(v2.RandomAffine(degrees=rotate_degrees, scale=tuple(scale) if scale else None))
        if brightness > 0 or contrast > 0:
            ops.append(v2.ColorJitter(brightness=brightness, contrast=contrast))
    ops.append(v2.ToDtype(torch.float32, scale=False))
    return v2.Compose(ops)


def random_rescale(
    x: Tensor,
    scale_range: tuple[float, float] = (0.5, 1.0),
    generator: torch.Generator | None = None,
    mode: str = "bilinear",
) -> Tensor:
    """Down-sample by a random factor and up-sample back: a differentiable resize "attack".

    One factor s ~ U(scale_range) per call (the whole batch), as a suspect pipeline that
    resizes its inputs would do. x (B×C×H×W) -> resized to ``max(1, round(s·H)) ×
    max(1, round(s·W))`` with anti-aliasing (like PIL's resize) -> back to H×W; output
    B×C×H×W, clamped to [0, 1] (bicubic can overshoot). Gradients flow to x.

    Args:
        x: B×C×H×W in [0, 1].
        scale_range: (low, high) with 0 < low ≤ high ≤ 1; (1, 1) returns x unchanged.
        generator: torch generator for a reproducible factor (CPU generator).
        mode: ``"bilinear"`` or ``"bicubic"``.
    """
    low, high = float(scale_range[0]), float(scale_range[1])
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"scale_range must satisfy 0 < low <= high <= 1, got {scale_range}")
    scale = low + (high - low) * float(torch.rand((), generator=generator))
    height, width = x.shape[-2:]
    small = (max(1, round(scale * height)), max(1, round(scale * width)))
    if small == (height, width):
        return x
    down = F.interpolate(x, size=small, mode=mode, align_corners=False, antialias=True)
    return F.interpolate(down, size=(height, width), mode=mode, align_corners=False).clamp(0.0, 1.0)


def thief_augment(
    x: Tensor,
    hflip: float = 0.5,
    zoom: tuple[float, float] | list[float] = (1.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """The usual training augmentation of a classifier, on a batch and differentiable.

    Per image, independently: a horizontal flip with probability ``hflip``, then a zoom about
    the centre by ``z ~ U(zoom)`` (the central ``H/z × W/z`` region resampled bilinearly to
    ``H × W``). That is what :func:`build_transforms` does with ``hflip`` and ``scale=zoom``
    (``RandomHorizontalFlip`` + ``RandomAffine(scale=...)``) to one image, done here to a batch
    of marked images so that gradients reach the generator that made them.

    Args:
        x: B×C×H×W float (any range; zoom interpolates, so values stay within x's range).
        hflip: probability in [0, 1] that an image is mirrored left-right.
        zoom: (low, high) with 1 ≤ low ≤ high; (1, 1) = no zoom.
        generator: CPU torch generator for reproducible draws.
    Returns:
        B×C×H×W, same dtype and device; ``x`` itself when ``hflip == 0`` and ``zoom == (1, 1)``.
    """
    low, high = float(zoom[0]), float(zoom[1])
    if not 0.0 <= float(hflip) <= 1.0:
        raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
    if not 1.0 <= low <= high:
        raise ValueError(f"zoom must satisfy 1 <= low <= high (a zoom in, like a crop), got {list(zoom)}")
    batch = x.shape[0]
    out = x
    if hflip > 0:
        flip = (torch.rand(batch, generator=generator) < float(hflip)).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    if high > 1.0:
        factor = low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)
        theta = torch.zeros(batch, 2, 3, dtype=x.dtype)
        theta[:, 0, 0] = (1.0 / factor).to(x.dtype)  # output coordinate u samples the input at u / z
        theta[:, 1, 1] = theta[:, 0, 0]
        grid = F.affine_grid(theta.to(x.device), list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out
