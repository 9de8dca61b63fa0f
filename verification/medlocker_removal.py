"""The thief's learned remover as the ``learned`` view of ``verify.py mode=evaluate``.

    python verify.py secret=<run>/owner/secret.json mode=evaluate suspect=<classifier.ckpt> out=<dir> \\
        removal.learned.steps=200

``removal.learned`` (configs/verify.yaml) has the fields of ``method.removal.learned`` of a
protection run (:class:`watermark.medlocker.learned_remover.RemoverConfig`, validated by it:
a bad value exits 2 naming ``removal.learned.<field>``) plus ``num_images``, the most clean
images the thief trains on. ``steps: 0`` leaves the view out.

The thief trains a small U-Net on (marked, clean) pairs he makes himself: his clean images are
the dataset's images (the secret's ``dataset_root``, read with the dataset's own reader) minus
every image being evaluated -- he never sees an original of a protected image -- marked with
*his own* QR logos (:func:`watermark.medlocker.learned_remover.thief_logos`), never the owner's
logo. The trained remover is then applied to the protected images with their visible marks'
footprints (as the inpainting view; a δ-only image has an empty footprint). Seeded by
``removal.learned.seed`` (image draw, logos, pairs, weights): the same settings give the same view.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from verification.progress import Stages, progress
from verification.protocols import BadInput
from watermark.medlocker.learned_remover import RemoverConfig, apply_remover, train_remover

KEY = "removal.learned"
VIEW = "learned"


def learned_settings(cfg: DictConfig) -> tuple[RemoverConfig, int] | None:
    """``(RemoverConfig, num_images)`` of ``cfg.removal.learned``, or None when its ``steps`` is 0
    (the view is off). Every field is checked, on or off: a bad one is a :class:`BadInput`
    naming ``removal.learned.<field>``."""
    block = OmegaConf.select(cfg, KEY) if isinstance(cfg, DictConfig) else (cfg.get("removal") or {}).get("learned")
    if block is None:
        return None
    plain = OmegaConf.to_container(block, resolve=True) if OmegaConf.is_config(block) else block
    if not isinstance(plain, dict):
        raise BadInput(f"{KEY} must be a mapping of the remover's settings, got {type(plain).__name__}")
    try:
        config = RemoverConfig.from_dict(plain, prefix=KEY)
    except ValueError as err:
        raise BadInput(str(err)) from None
    raw = plain.get("num_images")
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise BadInput(f"{KEY}.num_images must be an integer >= 1 (the thief's clean images), got {raw!r}")
    return (config, raw) if config.steps > 0 else None


def _as_chw(image: np.ndarray, channels: int, height: int, width: int) -> torch.Tensor:
    """One dataset image (H×W or H×W×C, uint8 or float in [0, 1]) as C×H×W float in [0, 1] with
    the protected images' channels and size (grey ↔ RGB converted, resized with antialiasing)."""
    a = image[..., None] if image.ndim == 2 else image[..., :3]
    t = torch.from_numpy(np.array(a)).permute(2, 0, 1).float()  # a writable copy
    t = t / 255.0 if image.dtype == np.uint8 else t.clamp(0, 1)
    if t.shape[0] != channels:
        t = t.mean(0, keepdim=True) if channels == 1 else t[:1].expand(channels, -1, -1)
    if t.shape[1:] != (height, width):
        t = F.interpolate(t[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]
    return t.clamp(0, 1)


def thief_images(samples: list, evaluated: set[str], num_images: int, seed: int, shape: tuple[int, int, int],
                 where: str) -> torch.Tensor:
    """The thief's clean images, N×C×H×W in [0, 1]: at most ``num_images`` of ``samples`` (the
    dataset's :class:`datamodules.samples.Sample` list) whose id is not ``evaluated``, drawn with
    ``seed``, in ``shape`` (C, H, W) of the protected images."""
    pool = sorted((s for s in samples if s.id not in evaluated), key=lambda s: s.id)
    if not pool:
        raise BadInput(f"{where}: no images left for the thief's training set ({KEY}) once the "
                       f"{len(evaluated)} evaluated images are set aside")
    order = np.random.default_rng(seed).permutation(len(pool))[:num_images]
    images = []
    for i in progress(sorted(order.tolist()), desc="thief's clean images", unit="img"):
        try:
            images.append(_as_chw(pool[i].image.read(), *shape))
        except Exception as err:  # the dataset's reader raises several types
            raise BadInput(f"{where}: thief's image {pool[i].id} unreadable ({type(err).__name__}: {err})") from None
    return torch.stack(images)


def learned_view(settings: tuple[RemoverConfig, int], protected: torch.Tensor, footprints: np.ndarray,
                 samples: list, evaluated: set[str], inpaint_radius: int, where: str,
                 stages: Stages | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Train the thief's remover and apply it: ``(protected images after it, the report's settings)``.

    Args:
        settings: :func:`learned_settings` (not None).
        protected: B×C×H×W in [0, 1]; footprints: bool B×H×W, the visible marks (empty for δ-only).
        samples, evaluated: the dataset's samples and the ids being evaluated (left out of training).
        inpaint_radius: the radius of the inpainting the remover corrects (the kit's ``removal``).
        where: the dataset named in messages; stages: where the stage line goes.
    """
    config, num_images = settings
    stages = stages or Stages(1)
    started = time.perf_counter()
    with stages("learned remover (the thief's U-Net)") as stage:
        C, H, W = protected.shape[1:]
        clean = thief_images(samples, evaluated, num_images, config.seed, (C, H, W), where)
        bar = progress(total=config.steps, desc="learned remover training", unit="step")
        last = {"loss": float("nan")}

        def on_step(step: int, loss: float) -> None:
            last["loss"] = loss
            bar.update(1)
            bar.set_postfix(l1=f"{loss:.4f}", refresh=False)

        try:
            with torch.enable_grad():
                model = train_remover(lambda: iter(clean.split(config.batch_size)), C, min(H, W), config,
                                      int(inpaint_radius), on_step=on_step, device=clean.device)
        finally:
            bar.close()
        images = apply_remover(model, protected, torch.from_numpy(np.asarray(footprints, dtype=bool)))
        stage.detail = f"{config.steps} steps on {len(clean)} thief images, final L1 {last['loss']:.4f}"
    record = {**dataclasses.asdict(config), "num_images": num_images, "thief_images": len(clean),
              "inpaint_radius": int(inpaint_radius), "final_l1": round(last["loss"], 6),
              "seconds": round(time.perf_counter() - started, 2)}
    return images, record
