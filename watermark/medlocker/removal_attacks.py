"""Watermark-removal attempts a thief would make on a visibly marked image.

Used to measure how much of the protection survives (docs/medlocker.md, metrics:
"accuracy after removal attempts"). Every attack takes and returns ``B x C x H x W``
float tensors in [0, 1] (C in {1, 3}, channels RGB), keeps dtype and device, and does
not modify its input. OpenCV-based attacks work on uint8 images, as a thief's tools do;
inputs are rounded to uint8 first.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from watermark.imageio import from_uint8_hwc, to_uint8_hwc


def _check(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"images must be a B x C x H x W tensor with C in (1, 3), got {shape}")


def median_filter(images: Tensor, k: int = 3) -> Tensor:
    """Per-channel ``k x k`` median filter (k odd >= 1), replicate padding like ``cv2.medianBlur``."""
    _check(images)
    if int(k) != k or k < 1 or k % 2 == 0:
        raise ValueError(f"k must be an odd integer >= 1, got {k}")
    if k == 1:
        return images.clone()
    B, C, H, W = images.shape
    r = k // 2
    padded = F.pad(images.reshape(B * C, 1, H, W), (r, r, r, r), mode="replicate")
    patches = F.unfold(padded, kernel_size=k)  # (B C) x k^2 x (H W)
    return patches.median(dim=1).values.reshape(B, C, H, W)


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Per-channel Gaussian blur (kernel radius ``ceil(3 sigma)``, replicate padding); differentiable."""
    _check(images)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    B, C, H, W = images.shape
    r = max(1, int(np.ceil(3 * float(sigma))))
    t = torch.arange(-r, r + 1, dtype=images.dtype, device=images.device)
    g = torch.exp(-(t ** 2) / (2 * float(sigma) ** 2))
    g = g / g.sum()
    x = F.pad(images.reshape(B * C, 1, H, W), (r, r, r, r), mode="replicate")
    x = F.conv2d(F.conv2d(x, g.reshape(1, 1, 1, -1)), g.reshape(1, 1, -1, 1))
    return x.reshape(B, C, H, W)


def jpeg(images: Tensor, quality: int = 75) -> Tensor:
    """JPEG encode/decode round trip with OpenCV at ``quality`` in 1..100 (RGB kept in order)."""
    _check(images)
    if int(quality) != quality or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer in 1..100, got {quality}")
    out = []
    for img in images:
        a = to_uint8_hwc(img)
        # OpenCV codecs assume BGR; swap so chroma subsampling acts on the true colour channels.
        a = cv2.cvtColor(a, cv2.COLOR_RGB2BGR) if a.shape[2] == 3 else a[..., 0]
        ok, buf = cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise RuntimeError("OpenCV failed to JPEG-encode the image")
        flag = cv2.IMREAD_COLOR if a.ndim == 3 else cv2.IMREAD_GRAYSCALE
        d = cv2.imdecode(buf, flag)
        d = cv2.cvtColor(d, cv2.COLOR_BGR2RGB) if d.ndim == 3 else d
        out.append(from_uint8_hwc(d, images))
    return torch.stack(out)


def inpaint_footprint(images: Tensor, footprint, radius: int = 3, method: str = "telea") -> Tensor:
    """Inpaint the mark's footprint with ``cv2.inpaint`` (Telea or Navier-Stokes).

    Args:
        images: ``B x C x H x W`` in [0, 1].
        footprint: bool mask of the pixels to fill: ``H x W`` (same for every image),
            ``B x H x W`` or ``B x 1 x H x W`` (tensor or array).
        radius: inpainting neighbourhood radius in pixels.
        method: ``"telea"`` or ``"ns"``.

    Returns:
        Tensor like ``images``; pixels outside the footprint are the input values,
        unchanged (not re-quantised), so only the footprint is attacked.
    """
    _check(images)
    flags = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}
    if method not in flags:
        raise ValueError(f"method must be 'telea' or 'ns', got {method!r}")
    B, C, H, W = images.shape
    fp = footprint.detach().cpu().numpy() if isinstance(footprint, Tensor) else np.asarray(footprint)
    fp = fp.astype(bool)
    if fp.ndim == 4 and fp.shape[1] == 1:
        fp = fp[:, 0]
    if fp.shape == (H, W):
        fp = np.broadcast_to(fp, (B, H, W))
    if fp.shape != (B, H, W):
        raise ValueError(f"footprint must be H x W, B x H x W or B x 1 x H x W for images {tuple(images.shape)}, "
                         f"got {fp.shape}")
    out = images.clone()
    for b in range(B):
        if not fp[b].any():
            continue
        a = to_uint8_hwc(images[b])
        filled = cv2.inpaint(a if C == 3 else a[..., 0], fp[b].astype(np.uint8) * 255, float(radius), flags[method])
        filled_t = from_uint8_hwc(filled, images)
        m = torch.from_numpy(fp[b].copy()).to(images.device)
        out[b] = torch.where(m.unsqueeze(0), filled_t, images[b])
    return out
