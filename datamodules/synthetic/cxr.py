"""Chest radiographs in the CheXpert-v1.0-small layout (``synthetic_cxr``).

Patients -> studies -> views are planned first (:func:`_plan_patients`), each study gets
CheXpert-style labels (:func:`_study_labels`), then every view is rendered from its own
seeded stream (:func:`_render_cxr`) and the ``train.csv``/``valid.csv`` tables are written.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from datamodules.synthetic.common import (
    _STREAM_IMAGE,
    _STREAM_PLAN,
    _blob,
    _check_counts,
    _fine_noise,
    _grid,
    _progress,
    _rng,
    _save,
    _smooth_noise,
    _soft_inside,
    _to_uint8,
)

CHEXPERT_COLUMNS = (
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
    "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)
CHEXPERT_PATHOLOGIES = CHEXPERT_COLUMNS[6:]  # every label column except "No Finding"

_DATASET = "CheXpert-v1.0-small"

#: One image to render: (path, lateral view?, opacity strength in [0, 1], support devices drawn?).
CxrJob = tuple[Path, bool, float, bool]


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------
def _blur(array: np.ndarray, sigma: float, size: int) -> np.ndarray:
    """Gaussian blur with ``sigma`` in normalised units (at least 0.3 px) on a ``size``-px image."""
    return cv2.GaussianBlur(array, (0, 0), max(sigma * size, 0.3))


def _curve_canvas(
    size: int, curves: Sequence[np.ndarray], thickness: Sequence[float], values: Sequence[float]
) -> np.ndarray:
    """Anti-aliased polylines (points in normalised x, y) drawn into a float canvas."""
    canvas = np.zeros((size, size), np.float32)
    scale = 16
    for pts, thick, value in zip(curves, thickness, values):
        cv2.polylines(
            canvas, [(pts * size * scale).astype(np.int32)], False, float(value), max(1, int(round(thick * size))),
            cv2.LINE_AA, 4,
        )
    return canvas


def _opacity_patch(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, air: np.ndarray) -> np.ndarray:
    """Share of the air replaced by fluid/tissue (H×W in [0, 1]): one consolidation.

    Making the lung lose its darkness (rather than adding brightness) lets the finding's
    contrast follow each patient's lung/tissue contrast, as on real radiographs.
    """
    size = air.shape[0]
    # A point well inside a lung field and off the heart shadow, so the patch shows.
    for _ in range(100):
        oy, ox = rng.uniform(0.2, 0.75), rng.uniform(0.1, 0.9)
        if air[min(int(oy * size), size - 1), min(int(ox * size), size - 1)] > 0.7:
            break
    radius = rng.uniform(0.1, 0.2)
    rho = _blob(yy, xx, (oy, ox), (radius * rng.uniform(0.7, 1.3), radius), rng.uniform(0, math.pi), rng, 0.2)
    patch = np.clip(_soft_inside(rho, 0.35) * (1 + 0.3 * _smooth_noise(rng, size, 10)), 0, 1)
    patch = cv2.GaussianBlur(patch, (0, 0), radius * 0.15 * size)
    return rng.uniform(0.7, 1.0) * np.clip(patch, 0, 1)


def _frontal_anatomy(
    rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray, cx: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """AP/PA view: (lungs, spine, heart, bones), each float H×W (lungs/heart in [0, 1])."""
    lungs = np.zeros_like(yy)
    half = rng.uniform(0.15, 0.19)
    for side in (-1.0, 1.0):
        lcx = cx + side * rng.uniform(0.15, 0.19)
        lcy = rng.uniform(0.45, 0.5)
        radii = (rng.uniform(0.25, 0.31), half * rng.uniform(0.9, 1.1))
        rho = _blob(yy, xx, (lcy, lcx), radii, side * rng.uniform(0.0, 0.15), rng, 0.05)
        # Diaphragm: the lung base is a dome; below it, dense abdomen.
        base = lcy + rng.uniform(0.2, 0.26) - 0.15 * ((xx - lcx) / half) ** 2
        lung = _soft_inside(rho, 0.08) * np.clip((base - yy) / 0.02, 0, 1)
        lungs = np.maximum(lungs, lung)
    # Mediastinum and spine between the lungs, heart bulging to the patient's left.
    spine = np.exp(-(((xx - cx) / rng.uniform(0.035, 0.05)) ** 2))
    hy, hh = rng.uniform(0.6, 0.66), rng.uniform(0.11, 0.15)
    hx, hw = cx + rng.uniform(0.04, 0.08), rng.uniform(0.12, 0.17)
    heart_rho = np.sqrt(((yy - hy) / hh) ** 2 + ((xx - hx) / hw) ** 2)
    heart = _soft_inside(heart_rho, 0.15)
    ribs, thick, vals = [], [], []
    t = np.linspace(0, 1, 24)
    for side in (-1.0, 1.0):
        top = rng.uniform(0.2, 0.25)
        gap = rng.uniform(0.055, 0.07)
        for k in range(9):
            y0 = top + k * gap
            x = cx + side * (0.03 + t * rng.uniform(0.28, 0.33))
            y = y0 - 0.05 * np.sin(np.pi * t * 0.9) + 0.12 * t**2
            ribs.append(np.stack([x, y], 1))
            thick.append(rng.uniform(0.012, 0.018))
            vals.append(1.0)
        # Clavicle: from the sternal notch outwards and slightly up.
        x = cx + side * (0.04 + t * 0.25)
        ribs.append(np.stack([x, rng.uniform(0.17, 0.2) - 0.04 * t + 0.03 * t**2], 1))
        thick.append(rng.uniform(0.018, 0.025))
        vals.append(1.4)
    bones = _blur(_curve_canvas(size, ribs, thick, vals), 0.006, size)
    return lungs, spine, heart, bones


def _lateral_anatomy(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cx: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lateral view: one wide lung field, spine behind (image right), heart in front; (lungs, spine, heart, bones)."""
    lcx = cx + rng.uniform(-0.03, 0.03)
    lcy = rng.uniform(0.45, 0.5)
    rho = _blob(yy, xx, (lcy, lcx), (rng.uniform(0.27, 0.32), rng.uniform(0.25, 0.3)), 0.0, rng, 0.05)
    lungs = _soft_inside(rho, 0.08) * np.clip((0.75 - yy + 0.1 * (xx - lcx)) / 0.02, 0, 1)
    spine_x = cx + rng.uniform(0.25, 0.3)
    spine = np.exp(-(((xx - spine_x) / 0.05) ** 2)) * (1 + 0.25 * np.sin(yy * rng.uniform(55, 70)))
    heart = _soft_inside(np.sqrt(((yy - 0.62) / 0.14) ** 2 + ((xx - cx + 0.12) / 0.14) ** 2), 0.15)
    bones = np.zeros_like(yy)
    return lungs, spine, heart, bones


def _draw_devices(rng: np.random.Generator, size: int) -> np.ndarray:
    """ECG leads / lines: 1-3 thin bright curves (float H×W canvas), unrelated to the finding."""
    px = 1.0 / size
    curves = []
    for _ in range(int(rng.integers(1, 4))):
        t = np.linspace(0, 1, 20)
        x0, y0, x1, y1 = rng.uniform(0.1, 0.9, 4)
        bend = rng.normal(0, 0.1)
        curves.append(np.stack([x0 + (x1 - x0) * t + bend * np.sin(np.pi * t), y0 + (y1 - y0) * t], 1))
    return _curve_canvas(size, curves, [1.5 * px] * len(curves), [1.0] * len(curves))


def _expose(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
    """Exposure/processing differences between machines: gamma, window, blur, noise, side marker."""
    image = _blur(np.clip(image, 0, 1).astype(np.float32), 0.003, size)
    image = np.clip(image, 0, 1) ** rng.uniform(0.75, 1.35)
    image = rng.uniform(-0.05, 0.08) + image * rng.uniform(0.8, 1.15)
    image += rng.uniform(0.01, 0.035) * rng.standard_normal(image.shape).astype(np.float32)
    if rng.random() < 0.5:  # the burned-in side marker ("L"/"R") of many radiographs
        my, mx = rng.uniform(0.05, 0.15), rng.choice([0.08, 0.85])
        image[int(my * size) : int((my + 0.05) * size) + 1, int(mx * size) : int((mx + 0.04) * size) + 1] = 0.95
    return np.clip(image, 0, 1)


def _render_cxr(
    rng: np.random.Generator, size: int, lateral: bool, opacity: float, devices: bool
) -> np.ndarray:
    """A chest radiograph (float H×W in [0, 1], bright = dense).

    ``opacity`` in [0, 1] scales the lesion: 0 draws none; a positive finding is a soft,
    brighter, irregular patch confined to a lung field. Anatomy, exposure, contrast and
    noise vary per patient so that global brightness does not give the label away.
    """
    yy, xx = _grid(size)
    body_w, body_h = rng.uniform(0.36, 0.46), rng.uniform(0.5, 0.6)
    cy, cx = 0.55 + rng.normal(0, 0.02), 0.5 + rng.normal(0, 0.02)
    body = _soft_inside(np.sqrt(((yy - cy) / body_h) ** 2 + ((xx - cx) / body_w) ** 2), 0.05)
    soft = rng.uniform(0.45, 0.6)
    image = 0.08 + (soft - 0.08) * body
    if not lateral:
        lungs, spine, heart, bones = _frontal_anatomy(rng, size, yy, xx, cx)
    else:
        lungs, spine, heart, bones = _lateral_anatomy(rng, yy, xx, cx)

    # The heart lies in front of the lungs: little air shows through its shadow.
    air = lungs * (1.0 - rng.uniform(0.6, 0.85) * heart)
    # The finding draws from its own generator: the same patient with and without it.
    finding_rng = np.random.default_rng(rng.integers(2**63))
    if opacity > 0:
        air = air * (1.0 - opacity * _opacity_patch(finding_rng, yy, xx, air))
    lung_dark = rng.uniform(0.55, 0.75)
    lung_texture = 1.0 + 0.08 * _smooth_noise(rng, size, 6) + 0.04 * _fine_noise(rng, size, 1.2)
    image = image * (1 - lung_dark * air * lung_texture)
    image += rng.uniform(0.15, 0.25) * spine * body
    image += rng.uniform(0.03, 0.08) * heart * (1 - 0.5 * spine)
    image += rng.uniform(0.06, 0.12) * bones * body
    if devices:
        image += 0.35 * _draw_devices(rng, size)
    return _expose(rng, image, size)


# --------------------------------------------------------------------------------------
# Planning and labels
# --------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    """A CheXpert label cell: ``1.0``/``0.0``/``-1.0``, blank for "not mentioned"."""
    return "" if value is None else f"{value:.1f}"


def _check_cxr_options(finding: str, fractions: dict[str, float]) -> None:
    """Raise ``ValueError`` naming the bad option (``finding`` not a pathology column, a fraction outside [0, 1))."""
    if finding not in CHEXPERT_PATHOLOGIES:
        raise ValueError(f"synthetic_cxr: finding must be one of {list(CHEXPERT_PATHOLOGIES)}, got {finding!r}")
    for name, value in fractions.items():
        if not 0.0 <= value < 1.0 or (name == "positive_fraction" and value == 0.0):
            raise ValueError(f"synthetic_cxr: {name} must be in [0, 1), got {value}")


def _plan_patients(rng: np.random.Generator, num_images: int, lateral_fraction: float) -> list[list[list[str]]]:
    """Patients -> studies (1-2) -> view kinds (``frontal``, sometimes ``lateral``), ``num_images`` views in all."""
    lateral_per_study = lateral_fraction / (1.0 - lateral_fraction)
    patients: list[list[list[str]]] = []  # patient -> studies -> view kinds
    total = 0
    while total < num_images:
        studies = []
        for _ in range(1 if rng.random() < 0.6 else 2):
            if total >= num_images:
                break
            views = ["frontal"]
            total += 1
            if total < num_images and rng.random() < lateral_per_study:
                views.append("lateral")
                total += 1
            studies.append(views)
        patients.append(studies)
    return patients


def _pick_valid(rng: np.random.Generator, num_patients: int, valid_fraction: float) -> tuple[set[int], int]:
    """(indices of the validation patients, their count): about ``valid_fraction``, at least one train patient."""
    n_valid = int(round(valid_fraction * num_patients)) if num_patients > 1 else 0
    if valid_fraction > 0 and num_patients > 1:
        n_valid = min(max(n_valid, 1), num_patients - 1)
    return set(rng.permutation(num_patients)[:n_valid].tolist()), n_valid


def _study_labels(
    rng: np.random.Generator, split: str, finding: str, positive_fraction: float, uncertain_fraction: float
) -> tuple[dict[str, float | None], float, bool]:
    """One study's labels (column -> 1.0/0.0/-1.0/None), its opacity strength in [0, 1] and whether wires show."""
    draw = rng.random()
    if split == "train" and draw < uncertain_fraction:
        state = "uncertain"
    else:
        state = "positive" if rng.random() < positive_fraction else "negative"
    labels: dict[str, float | None] = {c: None for c in CHEXPERT_COLUMNS[5:]}
    if state == "negative":
        labels["No Finding"] = 1.0
        labels[finding] = 0.0 if rng.random() < 0.3 else None
        for column in CHEXPERT_PATHOLOGIES:
            if column != finding and rng.random() < 0.05:
                labels[column] = 0.0
    else:
        labels[finding] = 1.0 if state == "positive" else -1.0
        for column in CHEXPERT_PATHOLOGIES:
            if column != finding:
                u = rng.random()
                labels[column] = 1.0 if u < 0.08 else -1.0 if u < 0.11 else 0.0 if u < 0.16 else None
    devices = rng.random() < 0.25
    labels["Support Devices"] = 1.0 if devices else labels["Support Devices"] if state != "negative" else None
    if finding == "Support Devices":  # then the label, not chance, decides the wires
        devices = state == "positive"
    if state == "positive":
        strength = 1.0
    elif state == "uncertain" and rng.random() < 0.5:  # half the uncertain ones show a faint patch
        strength = rng.uniform(0.3, 0.6)
    else:
        strength = 0.0
    return labels, strength, devices


def _plan_rows(
    rng: np.random.Generator,
    out_dir: Path,
    patients: list[list[list[str]]],
    valid_ids: set[int],
    n_valid: int,
    finding: str,
    positive_fraction: float,
    uncertain_fraction: float,
) -> tuple[dict[str, list[list[str]]], list[CxrJob]]:
    """The CSV rows of each split and the images to render, patient by patient (train first)."""
    rows: dict[str, list[list[str]]] = {"train": [], "valid": []}
    jobs: list[CxrJob] = []
    numbers = {"train": 0, "valid": 0}
    order = [p for p in range(len(patients)) if p not in valid_ids] + sorted(valid_ids)
    for patient_index in order:
        split = "valid" if patient_index in valid_ids else "train"
        numbers[split] += 1
        # Valid patients are numbered after the training ones, as in the real release.
        number = numbers[split] if split == "train" else len(patients) - n_valid + numbers[split]
        sex = "Female" if rng.random() < 0.45 else "Male"
        age = int(rng.integers(18, 91))
        for study_index, views in enumerate(patients[patient_index], start=1):
            labels, strength, devices = _study_labels(rng, split, finding, positive_fraction, uncertain_fraction)
            ap = "AP" if rng.random() < 0.7 else "PA"
            for view_index, kind in enumerate(views, start=1):
                relative = f"{_DATASET}/{split}/patient{number:05d}/study{study_index}/view{view_index}_{kind}.jpg"
                frontal = kind == "frontal"
                cells = [relative, sex, str(age), "Frontal" if frontal else "Lateral", ap if frontal else ""]
                values = [labels[c] for c in CHEXPERT_COLUMNS[5:]]
                if split == "valid":  # the real valid.csv is fully labelled 0/1
                    values = [0.0 if v is None else v for v in values]
                cells += [_fmt(v) for v in values]
                rows[split].append(cells)
                jobs.append((out_dir / relative, kind == "lateral", strength, devices))
    return rows, jobs


def generate_synthetic_cxr(
    out_dir: Path,
    num_images: int,
    image_size: int,
    seed: int,
    *,
    finding: str = "Lung Opacity",
    positive_fraction: float = 0.5,
    uncertain_fraction: float = 0.05,
    lateral_fraction: float = 0.1,
    valid_fraction: float = 0.15,
    jpeg_quality: int = 95,
) -> Path:
    """Chest radiographs in the CheXpert-v1.0-small layout.

    ``num_images`` image files in all. Patients have 1-2 studies; each study has a frontal
    ``view1_frontal.jpg`` (AP or PA) and, for about ``lateral_fraction`` of the images, a
    ``view2_lateral.jpg``. Labels are per study, as in CheXpert: a positive study has
    ``finding`` = 1.0 and "No Finding" blank and shows a soft opacity in a lung field;
    a negative has "No Finding" = 1.0 and ``finding`` blank or 0.0; ``uncertain_fraction``
    of the training studies have ``finding`` = -1.0 (half of them show a faint opacity).
    Other pathology columns are sparse noise the images do not show, except "Support
    Devices" (drawn as wires). ``valid.csv`` holds ``valid_fraction`` of the patients
    (disjoint from train) and, like the real one, no blanks and no uncertain labels.
    ``Path`` is relative to ``out_dir`` (``CheXpert-v1.0-small/train/patient00001/...``).
    Returns ``out_dir``.
    """
    _check_counts(num_images, image_size, 16, "synthetic_cxr")
    _check_cxr_options(finding, {
        "positive_fraction": positive_fraction, "uncertain_fraction": uncertain_fraction,
        "lateral_fraction": lateral_fraction, "valid_fraction": valid_fraction,
    })
    out_dir = Path(out_dir)
    rng = _rng(seed, _STREAM_PLAN)
    # Plan patients -> studies -> views until the image budget is used up.
    patients = _plan_patients(rng, num_images, lateral_fraction)
    valid_ids, n_valid = _pick_valid(rng, len(patients), valid_fraction)
    rows, jobs = _plan_rows(
        rng, out_dir, patients, valid_ids, n_valid, finding, positive_fraction, uncertain_fraction
    )
    with _progress(len(jobs), "synthetic_cxr") as bar:
        for index, (path, lateral, strength, devices) in enumerate(jobs):
            image = _render_cxr(_rng(seed, _STREAM_IMAGE, index), image_size, lateral, strength, devices)
            _save(_to_uint8(image), path, quality=jpeg_quality)
            bar.update()
    for split in ("train", "valid"):
        with open(out_dir / _DATASET / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(CHEXPERT_COLUMNS)
            writer.writerows(rows[split])
    return out_dir
