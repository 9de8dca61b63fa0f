"""A learned removal attack: a small U-Net a thief trains to take visible marks off images.

The thief has clean images of his own and his own logos (QR codes of his own payloads, never
the owner's asset), so he can make (marked, clean) pairs himself: each clean image gets one of
his logos at a random position, opacity and polarity, plus a random L∞ perturbation on the
logo's footprint standing in for MIAD-MARK's δ (δ-less MedLocker when ``delta_epsilon`` is 0).
The U-Net (``segmentation_models_pytorch.Unet``, no pretrained weights) sees the marked image,
the mark's footprint (a thief sees where the mark is, as the inpainting attack assumes) and the
OpenCV inpainting of that footprint, and predicts the clean image as a correction of the
inpainting: ``clean ≈ clip(inpaint(marked) + U(marked, inpaint(marked), footprint))`` -- its
output head starts at zero, so the untrained remover is exactly the inpainting attack, and
training teaches it what inpainting leaves (δ around the mark, the fill's errors).

Applied to the owner's protected images with their visible marks' footprints, it is one more
removal attempt of the attack suite (``method.removal.learned``). Images are ``B x C x H x W``
float in [0, 1]; footprints bool ``B x H x W``. Framework-free (torch + smp).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from watermark.imageio import quantise
from watermark.medlocker.logo import POLARITIES, composite, footprint, polarise, render_qr_logo
from watermark.medlocker.removal_attacks import inpaint_footprint


@dataclass(frozen=True)
class RemoverConfig:
    """``method.removal.learned``: ``steps`` (Adam steps; 0 = attack off), ``batch_size``, ``lr``,
    ``encoder`` (smp encoder name, no weights), ``encoder_depth``, ``decoder_channels``,
    ``num_logos`` (thief's QR logos), ``logo_fractions`` ([min, max] logo side / image side),
    ``alpha_range``, ``delta_epsilon`` (the stand-in δ's L∞ radius), ``seed``."""

    steps: int
    batch_size: int
    lr: float
    encoder: str
    encoder_depth: int
    decoder_channels: tuple[int, ...]
    num_logos: int
    logo_fractions: tuple[float, float]
    alpha_range: tuple[float, float]
    delta_epsilon: float
    seed: int

    @classmethod
    def from_dict(cls, cfg: dict, prefix: str = "method.removal.learned") -> RemoverConfig:
        """From the config dict; ``ValueError`` naming ``<prefix>.<field>`` (``method.removal.learned``
        in a protection run, ``removal.learned`` in ``verify.py``) on a missing, malformed or bad value."""
        def field(name: str, convert):
            try:
                return convert(cfg[name])
            except (KeyError, TypeError, ValueError) as err:
                what = "is missing" if isinstance(err, KeyError) else f"is malformed: {cfg.get(name)!r}"
                raise ValueError(f"{prefix}.{name} {what}") from None

        def numbers(convert):  # a list of numbers, never a string's characters
            def parse(v):
                if isinstance(v, str):
                    raise TypeError("a string, not a list")
                return tuple(convert(x) for x in v)
            return parse

        out = cls(steps=field("steps", int), batch_size=field("batch_size", int), lr=field("lr", float),
                  encoder=field("encoder", str), encoder_depth=field("encoder_depth", int),
                  decoder_channels=field("decoder_channels", numbers(int)), num_logos=field("num_logos", int),
                  logo_fractions=field("logo_fractions", numbers(float)),
                  alpha_range=field("alpha_range", numbers(float)),
                  delta_epsilon=field("delta_epsilon", float), seed=field("seed", int))
        checks = {"steps": out.steps >= 0, "batch_size": out.batch_size >= 1, "lr": 0 < out.lr < float("inf"),
                  "encoder_depth": out.encoder_depth >= 1, "seed": out.seed >= 0,
                  "num_logos": out.num_logos >= 1, "delta_epsilon": out.delta_epsilon >= 0,
                  "decoder_channels": len(out.decoder_channels) == out.encoder_depth,
                  "logo_fractions": len(out.logo_fractions) == 2 and 0 < out.logo_fractions[0] <= out.logo_fractions[1] < 1,
                  "alpha_range": len(out.alpha_range) == 2 and 0 < out.alpha_range[0] <= out.alpha_range[1] <= 1}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{prefix}.{name} is out of range: {cfg[name]!r}")
        return out


def thief_logos(config: RemoverConfig, image_size: int) -> list[np.ndarray]:
    """The thief's own RGBA QR logos (``h x w x 4`` in [0, 1]): payloads ``thief-<seed>-<i>``, sizes
    spread over ``logo_fractions`` of the image side (at least 21 px, a QR code's module count)."""
    lo, hi = config.logo_fractions
    sizes = np.linspace(lo, hi, config.num_logos)
    return [render_qr_logo(f"thief-{config.seed}-{i}", max(21, int(round(f * image_size))), error_correction="L")
            for i, f in enumerate(sizes)]


def make_pairs(clean: Tensor, logos: list[np.ndarray], config: RemoverConfig, rng: np.random.Generator
               ) -> tuple[Tensor, Tensor]:
    """The thief's training pairs: ``(marked B×C×H×W on the uint8 grid, footprint bool B×H×W)`` for
    ``clean`` B×C×H×W in [0, 1] -- one random logo per image at a random position / opacity /
    polarity, plus uniform noise in ±``delta_epsilon`` on its footprint."""
    B, C, H, W = clean.shape
    marked, fps = [], []
    for b in range(B):
        logo = polarise(logos[int(rng.integers(len(logos)))], POLARITIES[int(rng.integers(len(POLARITIES)))])
        h, w = logo.shape[:2]
        x, y = int(rng.integers(0, max(1, W - w + 1))), int(rng.integers(0, max(1, H - h + 1)))
        alpha = float(rng.uniform(*config.alpha_range))
        m = composite(clean[b:b + 1], logo, x, y, alpha)
        fp = torch.from_numpy(footprint(H, W, logo, x, y)).to(clean.device)
        noise = torch.from_numpy(rng.uniform(-1, 1, size=(1, C, H, W)).astype(np.float32)).to(clean)
        m = (m + config.delta_epsilon * noise * fp).clamp(0, 1)
        marked.append(quantise(m))
        fps.append(fp)
    return torch.cat(marked), torch.stack(fps)


class LearnedRemover(nn.Module):
    """``forward(images B×C×H×W in [0, 1], footprints bool B×H×W) -> B×C×H×W in [0, 1]``: a U-Net
    correction of the inpainting (``inpaint_radius`` px, Telea) of the footprints."""

    def __init__(self, channels: int, config: RemoverConfig, inpaint_radius: int):
        super().__init__()
        import segmentation_models_pytorch as smp

        self.unet = smp.Unet(encoder_name=config.encoder, encoder_weights=None, encoder_depth=config.encoder_depth,
                             decoder_channels=config.decoder_channels, in_channels=2 * channels + 1,
                             classes=channels)
        self.inpaint_radius = int(inpaint_radius)
        self.multiple = 2 ** config.encoder_depth
        head = self.unet.segmentation_head[0]  # zero residual at the start: the untrained remover is the identity
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)

    def forward(self, images: Tensor, footprints: Tensor) -> Tensor:
        B, C, H, W = images.shape
        base = inpaint_footprint(images.detach(), footprints, self.inpaint_radius)
        x = torch.cat([images, base, footprints.reshape(B, 1, H, W).to(images.dtype)], 1)
        pad_h, pad_w = (-H) % self.multiple, (-W) % self.multiple
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return (base + self.unet(x)[..., :H, :W]).clamp(0, 1)


def train_remover(clean_batches, channels: int, image_size: int, config: RemoverConfig, inpaint_radius: int,
                  on_step=None, device: torch.device | str = "cpu") -> LearnedRemover:
    """Train the thief's remover for ``config.steps`` Adam steps (L1 to the clean image).

    Args:
        clean_batches: a callable returning a fresh iterable of the thief's clean images,
            B×C×H×W float in [0, 1] (cycled until ``steps`` batches have been drawn).
        channels: C; image_size: the images' side (logo sizes follow it).
        inpaint_radius: the radius of the inpainting the remover corrects (``method.removal.inpaint_radius``).
        on_step: optional ``on_step(step, loss)`` called after each step (1-based; a progress bar).
        device: where the remover is built and trained: the device of the images ``clean_batches`` gives.
    """
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    logos = thief_logos(config, image_size)
    model = LearnedRemover(channels, config, inpaint_radius).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    model.train()
    step, pool = 0, torch.empty(0)
    while step < config.steps:
        drawn = 0
        for images in clean_batches():
            pool = torch.cat([pool.to(images), images]) if len(pool) else images
            while len(pool) >= config.batch_size and step < config.steps:
                clean, pool = pool[:config.batch_size], pool[config.batch_size:]
                marked, fps = make_pairs(clean, logos, config, rng)
                loss = F.l1_loss(model(marked, fps), clean)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                if on_step is not None:
                    on_step(step, float(loss.detach()))
            drawn += len(images)
            if step >= config.steps:
                break
        if drawn == 0:
            raise ValueError("the learned remover's training images are empty")
    return model.eval()


def apply_remover(model: LearnedRemover, images: Tensor, footprints: Tensor, batch_size: int = 64) -> Tensor:
    """The attack: ``model`` on ``images`` (B×C×H×W in [0, 1]) with the visible marks' ``footprints``
    (bool B×H×W), rounded to the uint8 grid like any stored image. Images without a mark get
    the remover too (a thief runs it on whatever he has)."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            out.append(quantise(model(images[i:i + batch_size].to(device), footprints[i:i + batch_size].to(device))))
    return torch.cat(out).to(images)
