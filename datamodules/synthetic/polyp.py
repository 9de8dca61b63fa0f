"""Colonoscopy frames with polyps, written in the Kvasir-SEG layout (``synthetic_polyp``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.synthetic.common import (
    _STREAM_IDS,
    _STREAM_IMAGE,
    _blob,
    _blob_extent,
    _check_counts,
    _fine_noise,
    _grid,
    _progress,
    _random_ids,
    _rng,
    _save,
    _smooth_noise,
    _soft_inside,
    _to_uint8,
)

_KVASIR_ALPHABET = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))

#: One polyp's geometry: centre (cy, cx), semi-axes (a, b) and the bound of its radius, normalised.
Polyp = tuple[float, float, float, float, float]


def _kvasir_id(rng: np.random.Generator) -> str:
    # Kvasir-SEG ids are 25 lower-case alphanumerics that start with "cj" (cju0qkwl35piu0993l0dewei2).
    return "cj" + "".join(rng.choice(_KVASIR_ALPHABET, size=23))


def _place_polyps(rng: np.random.Generator, max_polyps: int) -> list[Polyp]:
    """1 (or, with ``max_polyps >= 2``, sometimes 2) non-overlapping polyp geometries."""
    polyps: list[Polyp] = []  # cy, cx, a, b, extent
    count = 1 if (max_polyps < 2 or rng.random() < 0.75) else 2
    for _ in range(count):
        for _attempt in range(50):
            a = rng.uniform(0.1, 0.25)
            b = a * rng.uniform(0.7, 1.0)
            irregularity = rng.uniform(0.04, 0.12)
            extent = _blob_extent((a, b), irregularity)
            cy, cx = rng.uniform(0.17, 0.83, size=2)
            if all(math.hypot(cy - y, cx - x) > extent + e + 0.03 for y, x, _, _, e in polyps):
                polyps.append((cy, cx, a, b, extent))
                break
    return polyps


def _render_mucosa(
    rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray, polyps: list[Polyp]
) -> np.ndarray:
    """The bowel wall (float H×W×3): tinted, shaded mucosa, a dark lumen away from the polyps, folds."""
    px = 1.0 / size  # one pixel in normalised units
    # Mucosa: pinkish red, per-image hue/brightness, low-frequency shading.
    base = np.array([rng.uniform(0.70, 0.92), rng.uniform(0.30, 0.50), rng.uniform(0.25, 0.42)], np.float32)
    base *= rng.uniform(0.85, 1.1)
    shade = 1.0 + rng.uniform(0.08, 0.18) * _smooth_noise(rng, size, int(rng.integers(2, 5)))
    tint = rng.uniform(0.02, 0.06) * _smooth_noise(rng, size, int(rng.integers(3, 7)))
    image = base[None, None, :] * shade[..., None]
    image[..., 1] *= 1.0 + tint  # blotchy colour, not just brightness
    image *= (1.0 + rng.uniform(0.01, 0.025) * _fine_noise(rng, size, 0.8))[..., None]

    # Lumen: a dark, blurred hole (often partly out of frame), away from the polyps.
    if rng.random() < 0.8:
        r = rng.uniform(0.1, 0.25)
        for _attempt in range(20):
            cy, cx = rng.uniform(-0.1, 1.1, size=2)
            if all(math.hypot(cy - y, cx - x) > e + 1.5 * r for y, x, _, _, e in polyps):
                dark = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
                image *= (1.0 - rng.uniform(0.5, 0.85) * dark)[..., None]
                break

    # Folds: arcs of large circles, a dark valley with a lit ridge beside it.
    for _ in range(int(rng.integers(1, 4))):
        ang = rng.uniform(0, 2 * math.pi)
        radius = rng.uniform(0.4, 0.9)
        cy = 0.5 + (radius + rng.uniform(-0.35, 0.2)) * math.sin(ang)
        cx = 0.5 + (radius + rng.uniform(-0.35, 0.2)) * math.cos(ang)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - radius
        width = rng.uniform(0.012, 0.03) + px
        valley = np.exp(-((d / width) ** 2))
        ridge = np.exp(-(((d - 1.6 * width) / width) ** 2))
        image *= (1.0 - rng.uniform(0.1, 0.25) * valley + rng.uniform(0.05, 0.15) * ridge)[..., None]
    return image


def _polyp_colour_shift(rng: np.random.Generator) -> np.ndarray:
    """The RGB colour shift (paler/yellower or redder) of this image's polyps, float32 (3,)."""
    if rng.random() < 0.6:
        return np.array([rng.uniform(0.0, 0.08), rng.uniform(0.12, 0.28), rng.uniform(0.08, 0.22)], np.float32)
    return np.array([rng.uniform(0.04, 0.1), rng.uniform(-0.25, -0.12), rng.uniform(-0.2, -0.08)], np.float32)


def _add_distractors(
    rng: np.random.Generator, image: np.ndarray, yy: np.ndarray, xx: np.ndarray, shift: np.ndarray
) -> None:
    """Soft patches with the polyps' colour ``shift`` but no outline/dome/texture (in place)."""
    for _ in range(int(rng.integers(0, 3))):
        cy, cx = rng.uniform(0.1, 0.9, size=2)
        r = rng.uniform(0.06, 0.18)
        patch = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) * rng.uniform(0.4, 0.8)
        image *= 1.0 + patch[..., None] * shift[None, None, :]


def _draw_polyps(
    rng: np.random.Generator,
    image: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    polyps: list[Polyp],
    shift: np.ndarray,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Paint each polyp as a lit, textured dome with a sharp outline; returns (image, one bool mask per polyp)."""
    size = image.shape[0]
    px = 1.0 / size
    masks: list[np.ndarray] = []
    for cy, cx, a, b, _ in polyps:
        rho = _blob(yy, xx, (cy, cx), (a, b), rng.uniform(0, math.pi), rng, rng.uniform(0.04, 0.12))
        alpha = _soft_inside(rho, edge=1.5 * px / min(a, b))
        dome = np.sqrt(np.clip(1.0 - rho * rho, 0.0, 1.0))
        # Light comes from the scope: the top is lit, the rim falls off, plus a side light.
        gy, gx = np.gradient(dome * min(a, b) * size)
        light = rng.uniform(0, 2 * math.pi)
        ly, lx = math.sin(light), math.cos(light)
        lighting = (
            1.0
            + rng.uniform(0.12, 0.25) * dome
            - rng.uniform(0.15, 0.3) * np.clip(1.0 - dome, 0, 1) ** 4
            + rng.uniform(0.1, 0.25) * np.clip(-(gy * ly + gx * lx), -1, 1)
        )
        texture = 1.0 + rng.uniform(0.05, 0.1) * _fine_noise(rng, size, rng.uniform(0.7, 1.4))
        polyp = image * (1.0 + shift * rng.uniform(0.8, 1.2))[None, None, :] * (lighting * texture)[..., None]
        image = image * (1 - alpha[..., None]) + polyp * alpha[..., None]
        masks.append(rho < 1.0)
        # Specular highlight on the dome (wet mucosa reflects the scope's light).
        if rng.random() < 0.7:
            hy, hx = cy + rng.uniform(-0.4, 0.4) * b, cx + rng.uniform(-0.4, 0.4) * a
            hr = rng.uniform(0.008, 0.025) + px
            spot = np.exp(-((yy - hy) ** 2 + (xx - hx) ** 2) / (2 * hr * hr))
            image = image * (1 - spot[..., None]) + 0.97 * spot[..., None]
    return image, masks


def _finish_frame(
    rng: np.random.Generator, image: np.ndarray, yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mucosal highlights, vignetting, the endoscope's black octagonal frame and sensor noise.

    Returns (image float H×W×3 clipped to [0, 1], frame mask bool H×W).
    """
    px = 1.0 / image.shape[0]
    # Specular highlights on the mucosa (distractors: bright, small, everywhere).
    for _ in range(int(rng.integers(1, 6))):
        hy, hx = rng.uniform(0.05, 0.95, size=2)
        hr = rng.uniform(0.004, 0.02) + px
        spot = np.exp(-(((yy - hy) / (hr * rng.uniform(0.5, 2))) ** 2 + ((xx - hx) / hr) ** 2) / 2)
        image = image * (1 - spot[..., None]) + 0.97 * spot[..., None]

    # Vignetting and the black octagonal frame of endoscope images.
    r2 = (yy - 0.5) ** 2 + (xx - 0.5) ** 2
    image *= (1.0 - rng.uniform(0.4, 0.8) * r2)[..., None]
    frame = (np.abs(yy - 0.5) + np.abs(xx - 0.5)) < rng.uniform(0.85, 0.95)
    image *= frame[..., None]
    image += rng.uniform(0.005, 0.015) * rng.standard_normal(image.shape).astype(np.float32)
    return np.clip(image, 0, 1), frame


def _render_polyp(rng: np.random.Generator, size: int, max_polyps: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """One colonoscopy-like RGB frame (float H×W×3 in [0, 1]) and one mask per polyp.

    What makes it non-trivial: the mucosa colour changes from image to image by more than
    the polyp/mucosa difference, and "red patches" with the polyp's colour shift but no
    outline, dome or texture are scattered as distractors, so no global colour threshold
    separates polyps (best single-channel threshold Dice ~0.3). What makes it learnable: a
    polyp is a raised dome (lit top, shaded rim, sharp outline) with its own fine granular
    texture, and it is never hidden in the dark lumen.
    """
    yy, xx = _grid(size)
    # Polyp geometry first, so that the lumen can be kept away from the polyps.
    polyps = _place_polyps(rng, max_polyps)
    image = _render_mucosa(rng, size, yy, xx, polyps)
    shift = _polyp_colour_shift(rng)
    _add_distractors(rng, image, yy, xx, shift)
    image, masks = _draw_polyps(rng, image, yy, xx, polyps, shift)
    image, frame = _finish_frame(rng, image, yy, xx)
    return image, [m & frame for m in masks]


def _bbox(mask: np.ndarray) -> dict[str, Any] | None:
    """The Kvasir-SEG box (label, pixel x/y min/max, inclusive) of a bool mask; None if empty."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    return {
        "label": "polyp", "xmin": int(xs.min()), "ymin": int(ys.min()), "xmax": int(xs.max()), "ymax": int(ys.max())
    }


def generate_synthetic_polyp(
    out_dir: Path,
    num_images: int,
    image_size: int,
    seed: int,
    *,
    max_polyps: int = 2,
    jpeg_quality: int = 90,
) -> Path:
    """Colonoscopy frames with 1-``max_polyps`` polyps, in the Kvasir-SEG layout.

    Writes ``<out>/Kvasir-SEG/images/<id>.jpg`` (RGB), ``<out>/Kvasir-SEG/masks/<id>.jpg``
    (grey JPEG 0/255; readers threshold at > 127 as for the real masks) and
    ``<out>/kavsir_bboxes.json`` (``{id: {"height", "width", "bbox": [{"label": "polyp",
    "xmin", "ymin", "xmax", "ymax"}]}}``, one box per polyp). Images are square,
    ``image_size`` px; generate at the size you train at, since the polyp texture is a
    pixel-scale cue. Returns ``out_dir`` (the reader's root).
    """
    _check_counts(num_images, image_size, 16, "synthetic_polyp")
    out_dir = Path(out_dir)
    images_dir, masks_dir = out_dir / "Kvasir-SEG" / "images", out_dir / "Kvasir-SEG" / "masks"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    ids = _random_ids(_rng(seed, _STREAM_IDS), num_images, _kvasir_id)
    boxes: dict[str, Any] = {}
    with _progress(num_images, "synthetic_polyp") as bar:
        for index, image_id in enumerate(ids):
            image, masks = _render_polyp(_rng(seed, _STREAM_IMAGE, index), image_size, max_polyps)
            union = np.logical_or.reduce(masks) if masks else np.zeros((image_size, image_size), bool)
            _save(_to_uint8(image), images_dir / f"{image_id}.jpg", quality=jpeg_quality)
            _save(union.astype(np.uint8) * 255, masks_dir / f"{image_id}.jpg", quality=jpeg_quality)
            entries = [box for box in (_bbox(m) for m in masks) if box is not None]
            boxes[image_id] = {"height": image_size, "width": image_size, "bbox": entries}
            bar.update()
    (out_dir / "kavsir_bboxes.json").write_text(json.dumps(boxes, indent=1) + "\n")
    return out_dir
