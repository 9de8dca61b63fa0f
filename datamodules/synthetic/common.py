"""Helpers shared by the synthetic generators: seeded streams, noise, blobs, deterministic writing.

Every generator draws all its randomness from :func:`_rng` (a :class:`numpy.random.Generator`
seeded by ``SeedSequence([seed, stream, index])``, never the global RNGs) and writes with
:func:`_save` (PIL's deterministic encoders), so the same arguments give byte-identical files.
Coordinates are normalised: ``(y, x)`` in [0, 1] over an ``size``×``size`` image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

log = logging.getLogger("medmark.data")

# Independent random streams per purpose, so e.g. ids never share draws with pixels.
_STREAM_IDS, _STREAM_PLAN, _STREAM_IMAGE, _STREAM_VAL_IMAGE = 1, 2, 3, 4


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    """The generator of one image/purpose: independent of every other index and stream."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream, index]))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) coordinates of pixel centres in [0, 1], float32, shape size×size."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(coords, coords, indexing="ij")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise (about ``cells`` bumps across), zero mean, roughly unit std."""
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    field = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


def _fine_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Pixel-scale texture: white noise blurred by ``sigma_px``, zero mean, unit std."""
    noise = rng.standard_normal((size, size)).astype(np.float32)
    if sigma_px > 0:
        noise = cv2.GaussianBlur(noise, (0, 0), sigma_px)
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _blob(
    yy: np.ndarray,
    xx: np.ndarray,
    center: tuple[float, float],
    radii: tuple[float, float],
    angle: float,
    rng: np.random.Generator,
    irregularity: float,
    harmonics: int = 4,
) -> np.ndarray:
    """Normalised radius of an irregular blob: < 1 inside, 1 on the boundary.

    A rotated ellipse whose radius is modulated by a few angular harmonics, so outlines
    are smooth but not elliptical (the shape of polyps, haemorrhages, opacities...).
    """
    dy, dx = yy - center[0], xx - center[1]
    c, s = math.cos(angle), math.sin(angle)
    u, v = (dx * c + dy * s) / radii[1], (-dx * s + dy * c) / radii[0]
    phi = np.arctan2(v, u)
    modulation = np.ones_like(phi)
    for k in range(2, harmonics + 2):
        amp = irregularity * rng.uniform(0.3, 1.0) / (k - 1)
        modulation += amp * np.cos(k * phi + rng.uniform(0, 2 * math.pi))
    return np.sqrt(u * u + v * v) / np.maximum(modulation, 0.3)


def _blob_extent(radii: tuple[float, float], irregularity: float, harmonics: int = 4) -> float:
    """Upper bound of a :func:`_blob`'s radius, for non-overlapping placement."""
    return max(radii) * (1 + irregularity * sum(1.0 / (k - 1) for k in range(2, harmonics + 2)))


def _soft_inside(rho: np.ndarray, edge: float) -> np.ndarray:
    """Alpha of a blob with a soft edge of relative width ``edge`` (0.5 on the boundary)."""
    return np.clip((1.0 - rho) / max(edge, 1e-6) + 0.5, 0.0, 1.0)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] (clipped) -> uint8 by ``v * 255 + 0.5`` truncated; same shape."""
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _save(array: np.ndarray, path: Path, **params: Any) -> None:
    """Write with PIL (deterministic encoders); the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **params)


def _random_ids(rng: np.random.Generator, count: int, make: Callable[[np.random.Generator], str]) -> list[str]:
    """``count`` distinct ids drawn with ``make`` (redrawn on the rare collision)."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < count:
        new = make(rng)
        if new not in seen:
            seen.add(new)
            ids.append(new)
    return ids


def _check_counts(num_images: int, image_size: int, min_size: int, name: str) -> None:
    """Raise ``ValueError`` naming generator ``name`` unless ``num_images >= 1`` and ``image_size >= min_size``."""
    if int(num_images) < 1:
        raise ValueError(f"{name}: num_images must be >= 1, got {num_images}")
    if int(image_size) < min_size:
        raise ValueError(f"{name}: image_size must be >= {min_size} px to draw the anatomy, got {image_size}")


def _progress(total: int, desc: str) -> tqdm:
    """A per-image progress bar; ``disable=None``: a bar on a terminal, silence in CI logs and pytest."""
    return tqdm(total=total, desc=desc, unit="img", disable=None, leave=False)
