"""Joint image/mask transforms (torchvision transforms v2).

Images are ``tv_tensors.Image`` float C×H×W in [0, 1]; masks are ``tv_tensors.Mask``
1×H×W. v2 applies geometric ops to both (nearest for masks) and photometric ops to the
image only, so one pipeline serves segmentation and classification.
"""

from __future__ import annotations

import torch
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
