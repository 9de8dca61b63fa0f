"""Fundus photographs (optic disc, cup, macula, vessels), shared by the REFUGE and APTOS generators."""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from datamodules.synthetic.common import _blob, _fine_noise, _grid, _smooth_noise, _soft_inside


def _draw_vessels(rng: np.random.Generator, size: int, disc: tuple[float, float]) -> np.ndarray:
    """Vessel density (float H×W in [0, 1]): trees that leave the optic disc.

    Two arcades (superior/inferior) curve around the macula plus a few nasal branches;
    each segment narrows and occasionally forks, like real retinal vasculature.
    """
    canvas = np.zeros((size, size), np.float32)
    scale = 16  # cv2 sub-pixel precision: coordinates in 1/16 px
    temporal = 1.0 if disc[1] < 0.5 else -1.0  # the macula lies away from the image centre side
    stack: list[tuple[float, float, float, float, float, int]] = []
    for up in (-1.0, 1.0):
        base = math.atan2(up * 0.9, temporal * 0.6)
        stack.append((disc[0], disc[1], base + rng.normal(0, 0.2), 0.010 + 0.004 * rng.random(), -up * temporal, 0))
        stack.append((disc[0], disc[1], math.atan2(up, -temporal * 0.8) + rng.normal(0, 0.3), 0.007, 0.0, 0))
    for _ in range(int(rng.integers(1, 3))):
        stack.append((disc[0], disc[1], math.atan2(rng.normal(0, 0.5), -temporal), 0.005, 0.0, 1))
    step = 0.02
    segments = 0
    while stack and segments < 400:
        y, x, angle, width, bend, depth = stack.pop()
        length = int(rng.integers(12, 30)) if depth == 0 else int(rng.integers(6, 18))
        points = [(x, y)]
        for _ in range(length):
            angle += bend * rng.uniform(0.02, 0.08) + rng.normal(0, 0.12)
            x += step * math.cos(angle)
            y += step * math.sin(angle)
            points.append((x, y))
            if (x - 0.5) ** 2 + (y - 0.5) ** 2 > 0.5**2:
                break
            if depth < 3 and rng.random() < 0.07:
                side = 1 if rng.random() < 0.5 else -1
                stack.append((y, x, angle + side * rng.uniform(0.4, 0.9), width * 0.7, bend * 0.5, depth + 1))
        segments += 1
        thickness = max(1, int(round(width * size)))
        pts = (np.array(points) * size * scale).astype(np.int32)
        intensity = float(np.clip(0.6 + 30 * width, 0.6, 1.0))
        cv2.polylines(canvas, [pts], False, intensity, thickness, cv2.LINE_AA, 4)
        width *= 0.85
    return np.clip(cv2.GaussianBlur(canvas, (0, 0), 0.5), 0, 1)


def _render_fundus(
    rng: np.random.Generator, size: int, cup_to_disc: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """A fundus photograph and its anatomy.

    Returns (image float H×W×3 in [0, 1], disc mask, cup mask, field-of-view mask, geometry
    dict with the disc centre/radius and the fundus circle, in normalised units).
    """
    yy, xx = _grid(size)
    px = 1.0 / size
    center = (0.5 + rng.normal(0, 0.01), 0.5 + rng.normal(0, 0.01))
    fov_r = rng.uniform(0.44, 0.49)
    r = np.sqrt((yy - center[0]) ** 2 + (xx - center[1]) ** 2) / fov_r
    fov = r < 1.0

    # Orange-red background, darker towards the periphery, with choroidal mottling.
    base = np.array([rng.uniform(0.75, 0.95), rng.uniform(0.28, 0.42), rng.uniform(0.08, 0.16)], np.float32)
    shade = (1.0 - rng.uniform(0.25, 0.45) * r**2) * (1.0 + rng.uniform(0.04, 0.1) * _smooth_noise(rng, size, 5))
    image = base[None, None, :] * shade[..., None]
    image *= (1.0 + 0.02 * _fine_noise(rng, size, 1.0))[..., None]

    # Optic disc on the nasal side, macula (dark, fovea darker) on the temporal side.
    side = 1.0 if rng.random() < 0.5 else -1.0  # left/right eye
    disc = (center[0] + rng.normal(0, 0.03), center[1] + side * rng.uniform(0.17, 0.24))
    disc_r = rng.uniform(0.07, 0.095)
    macula = (disc[0] + rng.normal(0, 0.02), disc[1] - side * rng.uniform(0.25, 0.3))
    mac = np.exp(-((yy - macula[0]) ** 2 + (xx - macula[1]) ** 2) / (2 * 0.06**2))
    image *= (1.0 - rng.uniform(0.2, 0.35) * mac)[..., None]

    vessels = _draw_vessels(rng, size, disc)
    vessel_colour = np.array([0.5, 0.08, 0.05], np.float32) * rng.uniform(0.8, 1.1)
    image = image * (1 - 0.85 * vessels[..., None]) + vessel_colour * 0.85 * vessels[..., None]

    # Disc: slightly tall ellipse, yellow-orange and bright; cup: paler and brighter still.
    rho_disc = _blob(yy, xx, disc, (disc_r * rng.uniform(1.0, 1.12), disc_r), rng.normal(0, 0.2), rng, 0.04)
    cup_offset = (rng.normal(0, 0.1) * disc_r, -side * rng.uniform(0.0, 0.15) * disc_r)
    cup_r = cup_to_disc * disc_r
    rho_cup = _blob(
        yy, xx, (disc[0] + cup_offset[0], disc[1] + cup_offset[1]), (cup_r * rng.uniform(1.0, 1.1), cup_r * 0.95),
        rng.normal(0, 0.2), rng, 0.05,
    )
    disc_mask = (rho_disc < 1.0) & fov
    # The cup lies within the disc with a rim of at least one pixel, even at small sizes.
    inner_disc = cv2.erode(disc_mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    cup_mask = (rho_cup < 1.0) & inner_disc
    disc_alpha = _soft_inside(rho_disc, 2.0 * px / disc_r)
    cup_alpha = _soft_inside(rho_cup, 3.0 * px / cup_r) * disc_alpha
    disc_colour = np.array([1.0, rng.uniform(0.62, 0.75), rng.uniform(0.3, 0.45)], np.float32)
    cup_colour = np.array([1.0, rng.uniform(0.88, 0.95), rng.uniform(0.65, 0.8)], np.float32)
    disc_layer = disc_colour * (1 - 0.6 * vessels[..., None]) + vessel_colour * 0.6 * vessels[..., None]
    image = image * (1 - disc_alpha[..., None]) + disc_layer * disc_alpha[..., None]
    image = image * (1 - 0.85 * cup_alpha[..., None]) + cup_colour * 0.85 * cup_alpha[..., None]

    image *= rng.uniform(0.85, 1.1)
    image += 0.01 * rng.standard_normal(image.shape).astype(np.float32)
    image *= _soft_inside(r, 2.0 * px / fov_r)[..., None]  # black outside the field of view
    geometry = {"center": center, "fov_r": fov_r, "disc": disc, "disc_r": disc_r}
    return np.clip(image, 0, 1), disc_mask, cup_mask, fov, geometry
