"""StealthMark triggers in pixel space.

Every trigger is deterministic (fixed seed, no state changed by use) and has
``apply(images) -> images`` on ``B×C×H×W`` tensors in [0, 1] (returns a new tensor,
clipped to [0, 1]) and ``region(H, W) -> H×W`` bool tensor: the pixels it writes, which
cell masking never drops. Overwriting triggers (patch, text, border) have a region and
must sit in quiet-zone cells (docs/methods/stealthmark.md: a trigger over a QR cell corrupts that cell);
global triggers (noise, warp) touch every pixel a little, have an empty region, and are
applied *after* cell masking, as in training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from watermark.stealthmark.grid import GridSpec

Position = str | tuple[int, int]
_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def _corner_origin(position: Position, box_h: int, box_w: int, height: int, width: int, margin: int) -> tuple[int, int]:
    """Top-left pixel ``(row, col)`` of a ``box_h×box_w`` box at a named corner or explicit place."""
    if isinstance(position, str):
        if position not in _CORNERS:
            raise ValueError(f"position must be one of {_CORNERS} or (row, col), got {position!r}")
        row = margin if position.startswith("top") else height - margin - box_h
        col = margin if position.endswith("left") else width - margin - box_w
    else:
        row, col = (int(v) for v in position)
    if row < 0 or col < 0 or row + box_h > height or col + box_w > width:
        raise ValueError(f"a {box_h}×{box_w} trigger at ({row}, {col}) does not fit a {height}×{width} image")
    return row, col


def _colour(value: float | Sequence[float], channels: int, like: torch.Tensor) -> torch.Tensor:
    """A fill value as a ``1×C×1×1`` tensor (a scalar is used for every channel)."""
    values = [float(value)] * channels if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != channels:
        raise ValueError(f"colour has {len(values)} channels, images have {channels}")
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, channels, 1, 1)


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be B×C×H×W, got shape {tuple(images.shape)}")


class PatchTrigger:
    """A fixed random binary patch (each channel 0/1 independently: colour for RGB).

    Args:
        size: patch side in pixels.
        position: a corner name (``"top-left"``, ...) or explicit ``(row, col)`` of its top-left pixel.
        seed: pattern seed; the same seed gives the same pattern for any channel count
            (channel c of a C-channel pattern is channel c of any larger one).
        margin: distance from the corner in pixels (corner positions only).
    """

    kind = "patch"

    def __init__(self, size: int = 8, position: Position = "top-left", seed: int = 0, margin: int = 0):
        self.size, self.seed, self.margin = int(size), int(seed), int(margin)
        self.position = position if isinstance(position, str) else tuple(int(v) for v in position)
        if self.size < 1:
            raise ValueError(f"patch size must be >= 1, got {size}")

    def pattern(self, channels: int) -> torch.Tensor:
        """The ``C×size×size`` float {0, 1} pattern."""
        rng = np.random.default_rng(self.seed)
        return torch.from_numpy(rng.integers(0, 2, size=(channels, self.size, self.size)).astype(np.float32))

    def _origin(self, height: int, width: int) -> tuple[int, int]:
        return _corner_origin(self.position, self.size, self.size, height, width, self.margin)

    def region(self, height: int, width: int) -> torch.Tensor:
        out = torch.zeros(height, width, dtype=torch.bool)
        r, c = self._origin(height, width)
        out[r : r + self.size, c : c + self.size] = True
        return out

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        out = images.clone()
        r, c = self._origin(*images.shape[-2:])
        pattern = self.pattern(images.shape[1]).to(device=images.device, dtype=images.dtype)
        out[:, :, r : r + self.size, c : c + self.size] = pattern
        return out

    def __repr__(self) -> str:
        return f"PatchTrigger(size={self.size}, position={self.position!r}, seed={self.seed}, margin={self.margin})"


class TextTrigger:
    """Text rendered with ``cv2.putText`` (Hershey simplex, no anti-aliasing: binary and exact).

    Args:
        text: the string.
        position: a corner name or explicit ``(row, col)`` of the text box's top-left pixel.
        size: text height in pixels (cap height; the font scale is derived from it).
        value: fill colour, scalar or per channel.
        thickness: stroke thickness in pixels.
        margin: distance from the corner in pixels (corner positions only).
    """

    kind = "text"

    def __init__(
        self,
        text: str = "MM",
        position: Position = "bottom-left",
        size: int = 6,
        value: float | Sequence[float] = 1.0,
        thickness: int = 1,
        margin: int = 1,
    ):
        self.text, self.size, self.thickness, self.margin = str(text), int(size), int(thickness), int(margin)
        self.position = position if isinstance(position, str) else tuple(int(v) for v in position)
        self.value = value if isinstance(value, (int, float)) else tuple(float(v) for v in value)
        if not self.text or self.size < 1:
            raise ValueError("text trigger needs non-empty text and size >= 1")
        font = cv2.FONT_HERSHEY_SIMPLEX
        (_, unit_h), _ = cv2.getTextSize(self.text, font, 1.0, self.thickness)
        self._scale = self.size / unit_h

    def region(self, height: int, width: int) -> torch.Tensor:
        font = cv2.FONT_HERSHEY_SIMPLEX
        (w, h), baseline = cv2.getTextSize(self.text, font, self._scale, self.thickness)
        # Render on a generous canvas, then crop the ink: Hershey glyphs may stick out of the
        # nominal box by a pixel, and the region must be exactly the pixels written.
        pad = 2 * self.thickness + 2
        canvas = np.zeros((h + baseline + 2 * pad, w + 2 * pad), dtype=np.uint8)
        cv2.putText(canvas, self.text, (pad, pad + h), font, self._scale, 255, self.thickness, cv2.LINE_8)
        rows, cols = np.nonzero(canvas)
        ink = canvas[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] > 0
        r, c = _corner_origin(self.position, ink.shape[0], ink.shape[1], height, width, self.margin)
        out = np.zeros((height, width), dtype=bool)
        out[r : r + ink.shape[0], c : c + ink.shape[1]] = ink
        return torch.from_numpy(out)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        where = self.region(*images.shape[-2:]).to(images.device)[None, None]
        colour = _colour(self.value, images.shape[1], images)
        return torch.where(where, colour.expand_as(images), images)

    def __repr__(self) -> str:
        return f"TextTrigger(text={self.text!r}, position={self.position!r}, size={self.size}, value={self.value!r})"


class BorderTrigger:
    """A frame of ``width`` pixels around the image set to ``value`` (scalar or per channel)."""

    kind = "border"

    def __init__(self, width: int = 2, value: float | Sequence[float] = 1.0):
        self.width = int(width)
        self.value = value if isinstance(value, (int, float)) else tuple(float(v) for v in value)
        if self.width < 1:
            raise ValueError(f"border width must be >= 1, got {width}")

    def region(self, height: int, width: int) -> torch.Tensor:
        if 2 * self.width >= min(height, width):
            raise ValueError(f"border of {self.width} px covers the whole {height}×{width} image")
        out = torch.ones(height, width, dtype=torch.bool)
        out[self.width : height - self.width, self.width : width - self.width] = False
        return out

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        where = self.region(*images.shape[-2:]).to(images.device)[None, None]
        colour = _colour(self.value, images.shape[1], images)
        return torch.where(where, colour.expand_as(images), images)

    def __repr__(self) -> str:
        return f"BorderTrigger(width={self.width}, value={self.value!r})"


class NoiseTrigger:
    """Fixed-seed additive uniform noise in ``[−amplitude, amplitude]`` over the whole image, clipped.

    The noise field depends only on ``(seed, C, H, W)``, so every image gets the same one.
    Region: empty (it writes everywhere a little; nothing is protected from masking).
    """

    kind = "noise"

    def __init__(self, amplitude: float = 0.03, seed: int = 0):
        self.amplitude, self.seed = float(amplitude), int(seed)
        if not 0 < self.amplitude <= 1:
            raise ValueError(f"noise amplitude must be in (0, 1], got {amplitude}")

    def field(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The ``C×H×W`` noise field."""
        rng = np.random.default_rng(self.seed)
        noise = rng.uniform(-self.amplitude, self.amplitude, size=(channels, height, width))
        return torch.from_numpy(noise.astype(np.float32))

    def region(self, height: int, width: int) -> torch.Tensor:
        return torch.zeros(height, width, dtype=torch.bool)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        noise = self.field(*images.shape[1:]).to(device=images.device, dtype=images.dtype)
        return (images + noise).clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"NoiseTrigger(amplitude={self.amplitude}, seed={self.seed})"


class WarpTrigger:
    """A fixed smooth displacement field applied with ``grid_sample`` (bilinear, border padding).

    Args:
        strength: largest displacement in pixels.
        seed: field seed.
        control: control points per side; the field is their bicubic interpolation,
            so it is smooth at the scale ``H / control``.
    Region: empty.
    """

    kind = "warp"

    def __init__(self, strength: float = 1.5, seed: int = 0, control: int = 4):
        self.strength, self.seed, self.control = float(strength), int(seed), int(control)
        if self.strength <= 0 or self.control < 2:
            raise ValueError("warp needs strength > 0 and control >= 2")

    def displacement(self, height: int, width: int) -> torch.Tensor:
        """``H×W×2`` displacement (x, y) in grid_sample's normalised coordinates."""
        rng = np.random.default_rng(self.seed)
        coarse = torch.from_numpy(rng.standard_normal((1, 2, self.control, self.control)).astype(np.float32))
        field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)[0]
        field = field / field.abs().amax().clamp_min(1e-12) * self.strength  # pixels, max |d| = strength
        # align_corners=True: pixel centres at -1..1, so one pixel is 2 / (size - 1).
        field[0] *= 2.0 / max(width - 1, 1)
        field[1] *= 2.0 / max(height - 1, 1)
        return field.permute(1, 2, 0)

    def region(self, height: int, width: int) -> torch.Tensor:
        return torch.zeros(height, width, dtype=torch.bool)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        b, _, h, w = images.shape
        ys = torch.linspace(-1.0, 1.0, h)
        xs = torch.linspace(-1.0, 1.0, w)
        base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # H×W×2 as (x, y)
        grid = (base + self.displacement(h, w)).to(device=images.device, dtype=images.dtype)
        out = F.grid_sample(images, grid.expand(b, h, w, 2), mode="bilinear", padding_mode="border", align_corners=True)
        return out.clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"WarpTrigger(strength={self.strength}, seed={self.seed}, control={self.control})"


Trigger = PatchTrigger | TextTrigger | BorderTrigger | NoiseTrigger | WarpTrigger
TRIGGERS: dict[str, type] = {
    cls.kind: cls for cls in (PatchTrigger, TextTrigger, BorderTrigger, NoiseTrigger, WarpTrigger)
}


def build_trigger(spec: Mapping[str, Any]) -> Trigger:
    """Build a trigger from ``{"kind": "patch"|"text"|"border"|"noise"|"warp", **kwargs}``.

    Lists (from YAML/JSON) are accepted wherever a tuple is expected.
    """
    params = dict(spec)
    kind = params.pop("kind", None)
    if kind not in TRIGGERS:
        raise ValueError(f"trigger spec needs kind in {sorted(TRIGGERS)}, got {kind!r}")
    for key in ("position", "value"):
        if key in params and not isinstance(params[key], (str, int, float)):
            params[key] = tuple(params[key])
    try:
        return TRIGGERS[kind](**params)
    except TypeError as err:
        raise ValueError(f"bad parameters for trigger kind {kind!r}: {err}") from err


def trigger_fits_quiet_zone(trigger: Trigger, spec: GridSpec) -> bool:
    """True when the trigger's region touches no QR cell (only quiet-zone cells).

    Global triggers (noise, warp) have an empty region and always pass: they do not
    overwrite cells, and they are applied after masking.
    """
    region = trigger.region(spec.image_size, spec.image_size)
    qr = spec.qr_pixel_slice
    return not bool(region[qr, qr].any())
