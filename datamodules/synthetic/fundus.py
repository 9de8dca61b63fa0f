"""Fundus photographs with optic disc/cup masks, written in the REFUGE layout (``synthetic_fundus``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.synthetic.common import _STREAM_IMAGE, _STREAM_PLAN, _check_counts, _progress, _rng, _save, _to_uint8
from datamodules.synthetic.retina import _render_fundus


def _refuge_mask(disc: np.ndarray, cup: np.ndarray) -> np.ndarray:
    """REFUGE coding: 255 background, 128 disc rim, 0 cup."""
    mask = np.full(disc.shape, 255, np.uint8)
    mask[disc] = 128
    mask[cup & disc] = 0
    return mask


def generate_synthetic_fundus(
    out_dir: Path,
    num_images: int,
    image_size: int,
    seed: int,
    *,
    num_val: int | None = None,
    glaucoma_fraction: float = 0.5,
    jpeg_quality: int = 95,
) -> Path:
    """Fundus photographs with optic disc/cup masks, in the REFUGE layout.

    ``num_images`` training images go to ``Training400/{Glaucoma,Non-Glaucoma}/`` (names
    ``g0001.jpg`` / ``n0001.jpg``, numbered per class) with masks in
    ``Annotation-Training400/Disc_Cup_Masks/<class>/<id>.bmp`` (8-bit: 0 cup, 128 disc
    rim, 255 background). ``num_val`` further images (default 20 % of ``num_images``)
    go to ``REFUGE-Validation400/V0001.jpg`` with masks in
    ``REFUGE-Validation400-GT/Disc_Cup_Masks/V0001.bmp``; 0 writes no validation set.
    Glaucoma cases (``glaucoma_fraction``; the real set has 10 %, we default to balanced
    classes) have a vertical cup-to-disc ratio of 0.6-0.85, the others 0.25-0.5.
    Returns ``out_dir``.
    """
    _check_counts(num_images, image_size, 32, "synthetic_fundus")
    if not 0.0 <= glaucoma_fraction <= 1.0:
        raise ValueError(f"synthetic_fundus: glaucoma_fraction must be in [0, 1], got {glaucoma_fraction}")
    out_dir = Path(out_dir)
    num_val = int(round(0.2 * num_images)) if num_val is None else int(num_val)
    if num_val < 0:
        raise ValueError(f"synthetic_fundus: num_val must be >= 0, got {num_val}")

    plan_rng = _rng(seed, _STREAM_PLAN)
    glaucoma = plan_rng.random(num_images + num_val) < glaucoma_fraction
    counters = {True: 0, False: 0}
    with _progress(num_images + num_val, "synthetic_fundus") as bar:
        for index in range(num_images + num_val):
            rng = _rng(seed, _STREAM_IMAGE, index)
            is_glaucoma = bool(glaucoma[index])
            cdr = rng.uniform(0.6, 0.85) if is_glaucoma else rng.uniform(0.25, 0.5)
            image, disc, cup, _, _ = _render_fundus(rng, image_size, cdr)
            if index < num_images:
                counters[is_glaucoma] += 1
                folder = "Glaucoma" if is_glaucoma else "Non-Glaucoma"
                name = f"{'g' if is_glaucoma else 'n'}{counters[is_glaucoma]:04d}"
                image_path = out_dir / "Training400" / folder / f"{name}.jpg"
                mask_path = out_dir / "Annotation-Training400" / "Disc_Cup_Masks" / folder / f"{name}.bmp"
            else:
                name = f"V{index - num_images + 1:04d}"
                image_path = out_dir / "REFUGE-Validation400" / f"{name}.jpg"
                mask_path = out_dir / "REFUGE-Validation400-GT" / "Disc_Cup_Masks" / f"{name}.bmp"
            _save(_to_uint8(image), image_path, quality=jpeg_quality)
            _save(_refuge_mask(disc, cup), mask_path)
            bar.update()
    return out_dir
