"""Visible logo watermarks: rendering, compositing, footprints (MedLocker / MIAD-MARK).

The mark is an RGBA logo ``L`` (h x w x 4, float in [0, 1]; channels R, G, B, A)
blended into an image ``x`` at top-left ``(x, y)`` with opacity ``alpha``:

    x_w = (1 - alpha * A) * x + alpha * A * W          (docs/medlocker.md)

where ``W`` is the logo colour (RGB, or its luma for one-channel images) and ``A``
its alpha channel. Three renderers share that formula:

- :func:`composite` -- torch, integer position, used for batches during training
  and evaluation. Pixels outside the logo's window are copied, so they stay
  bit-identical.
- :func:`composite_soft` -- torch, continuous position and a sigmoid opacity,
  differentiable w.r.t. ``tx``, ``ty``, ``alpha_logit`` (and ``scale``); used by the
  white-box optimiser. Its result is snapped to integers and re-rendered with the
  exact renderers, never stored itself.
- :func:`render_protected` -- the *reference* renderer: numpy float64, then rounded
  to uint8. Protected images are stored as uint8 PNG produced by this function, and
  certificates (``watermark.certificates.rerender_check``) re-run it bit for bit.

Scaling (``scale != 1``) is nearest-neighbour through :func:`scale_logo`, defined by
integer index maps, so every renderer (numpy and torch, CPU and GPU) scales a logo
identically and QR modules keep hard edges. One-channel images receive the logo's
ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B``.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import qrcode
import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R BT.601 luma weights: how an RGB logo is drawn into a grey (C=1) image.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# The mark's polarity: "dark" = the logo asset as is (the owner's QR: dark modules on the image);
# "light" = its colours inverted (RGB -> 1 - RGB, alpha unchanged): the same modules drawn light,
# so the image shows through the light modules -- an inverted (light-on-dark) QR code of the same
# payload, with exactly the same footprint.
POLARITIES = ("dark", "light")

_QR_ERROR_LEVELS = {
    "L": qrcode.constants.ERROR_CORRECT_L,
    "M": qrcode.constants.ERROR_CORRECT_M,
    "Q": qrcode.constants.ERROR_CORRECT_Q,
    "H": qrcode.constants.ERROR_CORRECT_H,
}


# --------------------------------------------------------------------------- rendering


def render_qr_logo(
    text: str,
    size_px: int,
    *,
    error_correction: str = "M",
    dark_rgb: Sequence[float] = (0.0, 0.0, 0.0),
    light_rgb: Sequence[float] = (1.0, 1.0, 1.0),
    light_alpha: float = 0.0,
) -> np.ndarray:
    """Render ``text`` as a QR code logo.

    Args:
        text: payload, typically the owner id or a URL to the owner's certificate.
        size_px: side of the returned square logo in pixels. Each QR module is an
            integer number of pixels (``size_px // n_modules``), so the code is centred
            with a transparent margin when ``size_px`` is not a multiple of the module
            count. Must be at least the module count (21 for the smallest code).
        error_correction: QR error-correction level ``"L" | "M" | "Q" | "H"``.
        dark_rgb: colour of dark modules, RGB in [0, 1]; dark modules are opaque (A = 1).
        light_rgb: colour of light modules, used only when ``light_alpha > 0``.
        light_alpha: opacity of light modules in [0, 1]; 0 (default) means only the dark
            modules are part of the mark, which keeps the footprint small.

    Returns:
        ``float32`` array ``size_px x size_px x 4`` (RGBA) in [0, 1].
    """
    if error_correction not in _QR_ERROR_LEVELS:
        raise ValueError(f"error_correction must be one of {sorted(_QR_ERROR_LEVELS)}, got {error_correction!r}")
    if not 0.0 <= light_alpha <= 1.0:
        raise ValueError(f"light_alpha must be in [0, 1], got {light_alpha}")
    qr = qrcode.QRCode(border=0, error_correction=_QR_ERROR_LEVELS[error_correction])
    qr.add_data(text)
    qr.make(fit=True)
    modules = np.asarray(qr.get_matrix(), dtype=bool)  # n x n, True = dark
    n = modules.shape[0]
    if size_px < n:
        raise ValueError(f"size_px={size_px} is smaller than the QR code's {n} modules for this text; "
                         f"use size_px >= {n} or a shorter text")
    module_px = size_px // n
    dark = np.kron(modules, np.ones((module_px, module_px), dtype=bool))
    side = dark.shape[0]
    off = (size_px - side) // 2

    logo = np.zeros((size_px, size_px, 4), dtype=np.float32)
    block = logo[off:off + side, off:off + side]
    block[..., :3] = np.where(dark[..., None], np.asarray(dark_rgb, np.float32), np.asarray(light_rgb, np.float32))
    block[..., 3] = np.where(dark, 1.0, light_alpha)
    return logo


def render_text_logo(
    text: str,
    size_px: int,
    *,
    rgb: Sequence[float] = (1.0, 1.0, 1.0),
    thickness: int | None = None,
    font: int = cv2.FONT_HERSHEY_SIMPLEX,
) -> np.ndarray:
    """Render ``text`` (e.g. the owner's name) as an anti-aliased logo on a transparent background.

    Args:
        text: the text; must be non-empty.
        size_px: logo height in pixels; the width follows from the text length.
        rgb: text colour, RGB in [0, 1].
        thickness: stroke thickness in pixels (default: about 1/12 of the height).
        font: an OpenCV Hershey font id.

    Returns:
        ``float32`` array ``size_px x w x 4`` (RGBA) in [0, 1]; A is the anti-aliased
        coverage of the glyphs, so the footprint (A > 0) hugs the letters.
    """
    if not text:
        raise ValueError("text must be non-empty")
    if size_px < 4:
        raise ValueError(f"size_px must be >= 4, got {size_px}")
    thickness = max(1, round(size_px / 12)) if thickness is None else int(thickness)
    # Measure at scale 1, then pick the font scale that makes text + descender fit the height.
    (tw, th), base = cv2.getTextSize(text, font, 1.0, thickness)
    margin = thickness + 1
    font_scale = (size_px - 2 * margin) / float(th + base)
    if font_scale <= 0:
        raise ValueError(f"size_px={size_px} is too small for thickness={thickness}")
    (tw, th), base = cv2.getTextSize(text, font, font_scale, thickness)
    width = tw + 2 * margin
    coverage = np.zeros((size_px, width), dtype=np.uint8)
    cv2.putText(coverage, text, (margin, size_px - margin - base), font, font_scale, 255, thickness, cv2.LINE_AA)

    logo = np.zeros((size_px, width, 4), dtype=np.float32)
    logo[..., :3] = np.asarray(rgb, dtype=np.float32)
    logo[..., 3] = coverage.astype(np.float32) / 255.0
    return logo


# ----------------------------------------------------------------------------- helpers


def polarise(logo: np.ndarray | Tensor, polarity: str = "dark") -> np.ndarray | Tensor:
    """The logo drawn in ``polarity`` (:data:`POLARITIES`): ``dark`` returns ``logo`` itself (same
    object); ``light`` returns a copy with ``RGB -> 1 - RGB`` and the alpha channel unchanged (so the
    footprint, ``A > 0``, is identical). Exact in float32/float64 for a {0, 1}-valued colour."""
    if polarity not in POLARITIES:
        raise ValueError(f"polarity must be one of {POLARITIES}, got {polarity!r}")
    _check_logo(logo)
    if polarity == "dark":
        return logo
    out = logo.clone() if isinstance(logo, Tensor) else np.array(logo, copy=True)
    out[..., :3] = 1 - out[..., :3]
    return out


def _check_logo(logo: np.ndarray | Tensor) -> None:
    if logo.ndim != 3 or logo.shape[-1] != 4:
        raise ValueError(f"logo must be h x w x 4 (RGBA), got shape {tuple(logo.shape)}")


def _scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def _nearest_index(n_in: int, n_out: int, scale: float) -> np.ndarray:
    # Output pixel i covers [i, i+1) -> source pixel floor((i + 0.5) / scale). Integer
    # maps make scaling identical across numpy/torch/devices (needed for bit-exact rerender).
    idx = np.floor((np.arange(n_out, dtype=np.float64) + 0.5) / float(scale)).astype(np.int64)
    return np.clip(idx, 0, n_in - 1)


def scale_logo(logo: np.ndarray | Tensor, scale: float = 1.0) -> np.ndarray | Tensor:
    """Nearest-neighbour rescale of an RGBA logo (numpy or torch, h x w x 4 -> h' x w' x 4).

    ``h' = max(1, round(h * scale))`` and likewise ``w'``. ``scale == 1`` returns the
    input unchanged (same object).
    """
    _check_logo(logo)
    if float(scale) == 1.0:
        return logo
    h, w = int(logo.shape[0]), int(logo.shape[1])
    ho, wo = _scaled_size(h, w, float(scale))
    rows, cols = _nearest_index(h, ho, float(scale)), _nearest_index(w, wo, float(scale))
    if isinstance(logo, Tensor):
        r = torch.as_tensor(rows, device=logo.device)
        c = torch.as_tensor(cols, device=logo.device)
        return logo.index_select(0, r).index_select(1, c)
    return logo[rows][:, cols]


def logo_mask(logo: np.ndarray | Tensor, scale: float = 1.0) -> np.ndarray:
    """The logo's own footprint: bool ``h' x w'`` where ``A > 0`` after scaling."""
    scaled = scale_logo(logo, scale)
    a = scaled[..., 3]
    if isinstance(a, Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a) > 0


def _clip_window(H: int, W: int, h: int, w: int, x: int, y: int):
    """Intersect the logo rectangle at (x, y) with the image; returns image and logo slices or None."""
    y0, x0 = max(0, y), max(0, x)
    y1, x1 = min(H, y + h), min(W, x + w)
    if y0 >= y1 or x0 >= x1:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))


def _as_int(v, name: str) -> int:
    if isinstance(v, Tensor):
        v = v.item()
    if isinstance(v, bool) or float(v) != int(v):
        raise ValueError(f"{name} must be an integer pixel position, got {v!r}")
    return int(v)


def _per_image(v, B: int, name: str) -> list:
    """Broadcast a scalar or length-B sequence/tensor to a list of B values."""
    if isinstance(v, Tensor) and v.ndim > 0:
        if v.numel() != B:
            raise ValueError(f"{name} has {v.numel()} values for a batch of {B}")
        return list(v.reshape(-1).unbind(0))
    if isinstance(v, (list, tuple, np.ndarray)):
        if len(v) != B:
            raise ValueError(f"{name} has {len(v)} values for a batch of {B}")
        return list(v)
    return [v] * B


def logo_colour(rgb: Tensor | np.ndarray, channels: int) -> Tensor | np.ndarray:
    """Logo colour for an image with ``channels`` channels: RGB as is (3), BT.601 luma (1).

    ``rgb`` is ``... x 3`` (channels last); returns ``... x channels``.
    """
    if channels == 3:
        return rgb
    if channels == 1:
        r, g, b = rgb[..., 0:1], rgb[..., 1:2], rgb[..., 2:3]
        return LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b
    raise ValueError(f"images must have 1 or 3 channels to receive an RGB logo, got {channels}")


# --------------------------------------------------------------------------- composite


def composite(
    images: Tensor,
    logo: Tensor | np.ndarray,
    x,
    y,
    alpha,
    scale=1.0,
) -> Tensor:
    """Blend an RGBA logo into a batch at integer positions: ``(1 - alpha A) x + alpha A W``.

    Args:
        images: ``B x C x H x W`` float in [0, 1], C in {1, 3}.
        logo: ``h x w x 4`` RGBA in [0, 1] (tensor or numpy array).
        x, y: integer top-left position (column, row) of the (scaled) logo; a scalar or
            one per image (length-B sequence/tensor). Parts outside the image are clipped.
        alpha: opacity in [0, 1]; scalar/0-d tensor or one per image. Gradients flow to a
            tensor ``alpha`` (not to the position; see :func:`composite_soft`).
        scale: logo scale (nearest-neighbour, :func:`scale_logo`); scalar or one per image.

    Returns:
        New ``B x C x H x W`` tensor (same dtype/device); pixels outside each logo window
        are bit-identical copies of the input.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be B x C x H x W, got shape {tuple(images.shape)}")
    _check_logo(logo)
    B, C, H, W = images.shape
    logo_t = torch.as_tensor(logo).to(device=images.device, dtype=images.dtype)
    xs, ys = _per_image(x, B, "x"), _per_image(y, B, "y")
    alphas, scales = _per_image(alpha, B, "alpha"), _per_image(scale, B, "scale")

    out = images.clone()
    for b in range(B):
        s = float(scales[b])
        lg = scale_logo(logo_t, s)
        win = _clip_window(H, W, lg.shape[0], lg.shape[1], _as_int(xs[b], "x"), _as_int(ys[b], "y"))
        if win is None:
            continue
        (iy, ix), (ly, lx) = win
        part = lg[ly, lx]  # h' x w' x 4
        a = alphas[b] * part[..., 3].unsqueeze(0)  # 1 x h' x w'
        col = logo_colour(part[..., :3], C).permute(2, 0, 1)  # C x h' x w'
        out[b, :, iy, ix] = (1 - a) * images[b, :, iy, ix] + a * col
    return out


def composite_soft(
    images: Tensor,
    logo: Tensor | np.ndarray,
    tx,
    ty,
    alpha_logit,
    scale=1.0,
) -> Tensor:
    """Differentiable composite: continuous translation via ``affine_grid``/``grid_sample``.

    The logo is laid on an ``H x W`` canvas at the origin, scaled about the top-left
    image corner by ``scale`` and translated by ``(tx, ty)`` pixels with bilinear
    sampling of the *premultiplied* logo (``A`` and ``A W``), so sub-pixel shifts blend
    edges correctly. Opacity is ``alpha = sigmoid(alpha_logit)``. At integer ``tx, ty``
    and ``scale = 1`` it matches :func:`composite` up to float rounding (~1e-6).

    Args:
        images: ``B x C x H x W`` float in [0, 1], C in {1, 3}.
        logo: ``h x w x 4`` RGBA in [0, 1]; parts beyond ``H x W`` are cropped.
        tx, ty: translation in pixels (x = columns, y = rows); scalars or ``(B,)`` tensors.
            Gradients flow to them.
        alpha_logit: opacity logit, scalar or ``(B,)``; gradients flow to it.
        scale: logo scale (> 0), scalar or ``(B,)`` tensor; differentiable if a tensor.

    Returns:
        ``B x C x H x W`` tensor in [0, 1].
    """
    if images.ndim != 4:
        raise ValueError(f"images must be B x C x H x W, got shape {tuple(images.shape)}")
    _check_logo(logo)
    B, C, H, W = images.shape
    dev, dt = images.device, images.dtype
    lg = torch.as_tensor(logo).to(device=dev, dtype=dt)
    h, w = min(lg.shape[0], H), min(lg.shape[1], W)
    a = lg[:h, :w, 3:4]
    canvas = torch.zeros(1, 4, H, W, device=dev, dtype=dt)
    canvas[0, :3, :h, :w] = (a * lg[:h, :w, :3]).permute(2, 0, 1)  # premultiplied colour
    canvas[0, 3:, :h, :w] = a.permute(2, 0, 1)

    def vec(v) -> Tensor:
        t = torch.as_tensor(v, device=dev, dtype=dt)
        return t.reshape(-1).expand(B) if t.numel() == 1 else t.reshape(B)

    txv, tyv, s = vec(tx), vec(ty), vec(scale)
    # Output pixel centre c (continuous, corner-origin pixels) samples input (c - t) / s.
    # In align_corners=False normalised coords u = 2c/W - 1 this is
    #   u_in = u_out / s + (1/s - 1) - 2 t / (s W).
    theta = torch.zeros(B, 2, 3, device=dev, dtype=dt)
    theta[:, 0, 0] = 1.0 / s
    theta[:, 1, 1] = 1.0 / s
    theta[:, 0, 2] = 1.0 / s - 1.0 - 2.0 * txv / (s * W)
    theta[:, 1, 2] = 1.0 / s - 1.0 - 2.0 * tyv / (s * H)
    grid = F.affine_grid(theta, [B, 4, H, W], align_corners=False)
    moved = F.grid_sample(canvas.expand(B, -1, -1, -1), grid, mode="bilinear",
                          padding_mode="zeros", align_corners=False)
    a_s = moved[:, 3:4]
    aw = logo_colour(moved[:, :3].permute(0, 2, 3, 1), C).permute(0, 3, 1, 2)  # premultiplied, C channels
    alpha = torch.sigmoid(vec(alpha_logit)).view(B, 1, 1, 1)
    # (1 - alpha A) x + alpha (A W), with A W already premultiplied.
    return (1 - alpha * a_s) * images + alpha * aw


# -------------------------------------------------------------------- footprint checks


def footprint(H: int, W: int, logo: np.ndarray | Tensor, x: int, y: int, scale: float = 1.0) -> np.ndarray:
    """Pixels of an ``H x W`` image that the logo at integer ``(x, y)`` touches (``A > 0``).

    Assumes ``alpha > 0`` (with ``alpha == 0`` nothing changes). Returns bool ``H x W``.
    """
    m = logo_mask(logo, scale)
    fp = np.zeros((H, W), dtype=bool)
    win = _clip_window(H, W, m.shape[0], m.shape[1], int(x), int(y))
    if win is not None:
        (iy, ix), (ly, lx) = win
        fp[iy, ix] = m[ly, lx]
    return fp


def overlaps(footprint_mask: np.ndarray | Tensor, region: np.ndarray | Tensor) -> int:
    """Number of pixels in both ``footprint_mask`` and ``region`` (bool ``H x W`` each)."""
    f = footprint_mask.detach().cpu().numpy() if isinstance(footprint_mask, Tensor) else np.asarray(footprint_mask)
    r = region.detach().cpu().numpy() if isinstance(region, Tensor) else np.asarray(region)
    if f.shape != r.shape:
        raise ValueError(f"footprint {f.shape} and region {r.shape} must have the same shape")
    return int(np.count_nonzero(f.astype(bool) & r.astype(bool)))


# ------------------------------------------------------------------ reference renderer


def render_protected(
    original: np.ndarray,
    logo: np.ndarray | Tensor,
    x: int,
    y: int,
    alpha: float,
    scale: float = 1.0,
    delta: np.ndarray | None = None,
    delta_scope: str = "footprint",
    polarity: str = "dark",
) -> np.ndarray:
    """The reference (bit-exact) renderer for stored protected images.

    Pipeline, in this order and nothing else (so a certificate can be re-checked
    anywhere, bit for bit):

    1. ``v = original.astype(float64) / 255``;
    2. logo -> :func:`polarise` (``polarity``: ``dark`` as is, ``light`` RGB -> 1 - RGB), float64,
       nearest-neighbour :func:`scale_logo`, colour via
       :func:`logo_colour` (RGB, or BT.601 luma for grey), ``a = alpha * A``;
    3. on the clipped logo window ``v = (1 - a) * v + a * W`` (elementwise float64);
    4. if ``delta`` is given (MIAD-MARK's perturbation, same shape as ``original``,
       any float dtype, in [0, 1] pixel units): ``v[fp] += delta[fp]`` on the footprint
       ``fp`` = pixels with ``alpha * A > 0`` only (``delta_scope="footprint"``, the
       default), or ``v += delta`` on every pixel (``delta_scope="image"``: MIAD-MARK's
       fallback when no mark fits, δ spread over the lesion-free area; δ is exactly 0
       elsewhere, and ``k/255 + 0`` rounds back to ``k``, so those pixels stay
       bit-identical);
    5. ``clip(v, 0, 1)``, then ``floor(v * 255 + 0.5)`` (round half up) -> uint8.

    Pixels outside the footprint come back equal to ``original`` (k/255*255 rounds to k).

    Args:
        original: uint8 ``H x W x C`` (C in {1, 3}) or ``H x W``.
        logo: ``h x w x 4`` RGBA in [0, 1] (the exact asset whose hash is certified).
        x, y: integer top-left position; alpha: opacity in [0, 1]; scale: > 0.
        delta: optional perturbation, see step 4.
        delta_scope: ``footprint`` or ``image``, see step 4.
        polarity: ``dark`` (the asset as is) or ``light`` (its colours inverted), see step 2.

    Returns:
        uint8 array with the shape of ``original``.
    """
    if delta_scope not in ("footprint", "image"):
        raise ValueError(f"delta_scope must be 'footprint' or 'image', got {delta_scope!r}")
    original = np.asarray(original)
    if original.dtype != np.uint8:
        raise ValueError(f"original must be uint8, got {original.dtype}")
    if original.ndim not in (2, 3) or (original.ndim == 3 and original.shape[2] not in (1, 3)):
        raise ValueError(f"original must be H x W or H x W x C (C in 1, 3), got shape {original.shape}")
    _check_logo(logo)
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = original if original.ndim == 3 else original[..., None]
    H, W, C = img.shape
    lg = logo.detach().cpu().numpy() if isinstance(logo, Tensor) else np.asarray(logo)
    lg = scale_logo(polarise(lg, polarity), float(scale)).astype(np.float64)

    v = img.astype(np.float64) / 255.0
    fp = np.zeros((H, W), dtype=bool)
    win = _clip_window(H, W, lg.shape[0], lg.shape[1], _as_int(x, "x"), _as_int(y, "y"))
    if win is not None:
        (iy, ix), (ly, lx) = win
        part = lg[ly, lx]
        a = float(alpha) * part[..., 3:4]
        col = logo_colour(part[..., :3], C)
        v[iy, ix] = (1.0 - a) * v[iy, ix] + a * col
        fp[iy, ix] = a[..., 0] > 0
    if delta is not None:
        d = np.asarray(delta)
        if d.shape != original.shape:
            raise ValueError(f"delta must have the image's shape {original.shape}, got {d.shape}")
        d = (d if d.ndim == 3 else d[..., None]).astype(np.float64)
        if delta_scope == "image":
            v += d
        else:
            v[fp] += d[fp]
    q = np.floor(np.clip(v, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return q if original.ndim == 3 else q[..., 0]
