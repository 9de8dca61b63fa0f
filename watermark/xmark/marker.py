"""The X-Mark marker: G + the surrogate that gives its saliency, its file format, marking and queries.

:class:`XMarkMarker` is what the owner keeps (``owner/generator.pt``) to mark images and to
verify; :func:`mark_native` marks one stored image at its native resolution within ε after
8-bit rounding (:func:`mark_native_unit`: the float target of an image stored at a higher bit depth,
e.g. DICOM); :func:`query_pairs` queries a classifier on paired clean/marked images.
Reading a marker file back goes through the safe model reader
(:func:`models.xmark_marker.load_marker`), which builds the networks this module only holds.

Framework-free: torch/NumPy, no Lightning, nothing of the project outside :mod:`watermark`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from watermark.certificates import write_secret_file
from watermark.kit_io import file_sha256
from watermark.xmark.saliency import default_target_layer, eigencam_saliency

MARKER_FORMAT = "medmark-xmark-marker"
MARKER_VERSION = 1


class XMarkMarker(nn.Module):
    """What the owner keeps to mark images and to verify: G plus the surrogate that gives s.

    ``mark(images)``: images B×C×H×W float in [0, 1] (at the generator's ``image_size``)
    -> dict ``saliency`` B×1×H×W in [0, 1], ``delta`` B×C×H×W in [−ε, ε], ``marked``
    B×C×H×W in [0, 1] (``clip(x + δ)``). Deterministic: GroupNorm generator, eval surrogate.

    ``generator`` is a :class:`models.generator.ConditionalUNetGenerator` (``generator(x, s)`` ->
    ``{"delta", "marked"}``, attributes ``epsilon`` and ``saliency_channels``); ``surrogate`` a
    classifier whose last conv block gives EigenCAM.

    Saved by :meth:`save` as one ``torch.save`` dict of plain tensors/containers (read back
    with ``weights_only=True`` by :func:`models.xmark_marker.load_marker`): generator config +
    state, surrogate backbone config + state.
    """

    def __init__(self, generator: nn.Module, surrogate: nn.Module | None,
                 generator_config: dict, surrogate_config: dict | None, image_size: int,
                 sign_correction: bool = True) -> None:
        super().__init__()
        if generator.saliency_channels and surrogate is None:
            raise ValueError("a saliency-conditioned generator needs its surrogate")
        self.generator = generator.eval()
        self.surrogate = surrogate.eval() if surrogate is not None else None
        self.generator_config = dict(generator_config)
        self.surrogate_config = dict(surrogate_config) if surrogate_config is not None else None
        self.image_size = int(image_size)
        self.sign_correction = bool(sign_correction)

    @property
    def epsilon(self) -> float:
        return self.generator.epsilon

    @torch.no_grad()
    def saliency(self, images: Tensor) -> Tensor | None:
        """EigenCAM of the surrogate's last conv block, B×1×H×W in [0, 1] (None if unconditioned)."""
        if not self.generator.saliency_channels:
            return None
        return eigencam_saliency(self.surrogate, default_target_layer(self.surrogate), images, self.sign_correction)

    @torch.no_grad()
    def mark(self, images: Tensor, saliency: Tensor | None = None) -> dict[str, Tensor]:
        self.eval()
        if saliency is None:
            saliency = self.saliency(images)
        out = self.generator(images, saliency)
        return {"saliency": saliency if saliency is not None else torch.zeros_like(images[:, :1]),
                "delta": out["delta"], "marked": out["marked"]}

    def save(self, path: str | Path) -> Path:
        """Write the marker file; returns its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        bundle = {
            "format": MARKER_FORMAT,
            "version": MARKER_VERSION,
            "image_size": self.image_size,
            "sign_correction": self.sign_correction,
            "generator_config": self.generator_config,
            "generator_state": {k: v.detach().cpu() for k, v in self.generator.state_dict().items()},
            "surrogate_config": self.surrogate_config,
            "surrogate_state": None if self.surrogate is None else
            {k: v.detach().cpu() for k, v in self.surrogate.state_dict().items()},
        }
        buffer = io.BytesIO()
        torch.save(bundle, buffer)
        # The generator is the owner's secret: 0o600 from creation, written atomically.
        return write_secret_file(path, buffer.getvalue())


def marker_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a marker file's bytes."""
    return file_sha256(path)


# ------------------------------------------------------------------------ marking & queries


@torch.no_grad()
def native_delta(marker: XMarkMarker, native: Tensor, channels: int) -> Tensor:
    """δ for one image at its native resolution.

    Args:
        native: K×H×W float in [0, 1], K = 1 (grey) or 3 (RGB), as stored.
        channels: C the generator sees (1: an RGB image is turned grey first; 3: a grey image is
            repeated on 3 channels and the 3 channels' δ averaged).

    The image is resized (antialiased bilinear, as the data module does) to the marker's
    ``image_size``, δ is computed there and up-sampled (bilinear) back to H×W. Returns a float
    tensor within [−ε, ε]: 3×H×W for an RGB image with a 3-channel generator, else 1×H×W (the
    same δ on every stored channel).
    """
    if native.shape[0] == 3 and channels == 1:
        grey = (native * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    elif native.shape[0] == 1 and channels == 3:
        grey = native.expand(3, -1, -1)
    elif native.shape[0] == channels:
        grey = native
    else:
        raise ValueError(f"cannot mark a {native.shape[0]}-channel image with a {channels}-channel generator")
    size = marker.image_size
    x = TF.resize(grey, [size, size], antialias=True).clamp(0, 1)[None]
    delta = marker.mark(x)["delta"][0]
    if tuple(delta.shape[-2:]) != tuple(native.shape[-2:]):
        delta = F.interpolate(delta[None], size=native.shape[-2:], mode="bilinear", align_corners=False)[0]
    if native.shape[0] == 1 and delta.shape[0] == 3:
        delta = delta.mean(0, keepdim=True)
    return delta


@torch.no_grad()
def mark_native(marker: XMarkMarker, pixels: np.ndarray, channels: int) -> np.ndarray:
    """Mark one image file's pixels at their native resolution, exactly within ε after 8-bit rounding.

    Args:
        marker: the released marker (G + surrogate).
        pixels: H×W (grey) or H×W×3 uint8 array, as read from the source file.
        channels: C the generator sees (1: grey; an RGB file gets the same δ on every channel).

    δ comes from :func:`native_delta`; the result is rounded to uint8 with the integer difference
    clamped to ``floor(255·ε)``, so ``max |x_w − x| ≤ ε`` holds exactly for the stored file.
    Returns an array of the same shape and dtype as ``pixels``.
    """
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"expected an H×W or H×W×3 uint8 image, got {pixels.dtype} {pixels.shape}")
    native = torch.from_numpy(np.ascontiguousarray(pixels)).float() / 255.0
    native = native[None] if native.ndim == 2 else native.permute(2, 0, 1)
    delta = native_delta(marker, native, channels)
    limit = int(np.floor(255.0 * marker.epsilon + 1e-9))
    original = native * 255.0
    steps = torch.round((native + delta).clamp(0, 1) * 255.0) - original  # delta broadcasts over RGB
    marked = (original + steps.clamp(-limit, limit)).round().clamp(0, 255).to(torch.uint8)
    out = marked[0] if pixels.ndim == 2 else marked.permute(1, 2, 0)
    return out.numpy()


@torch.no_grad()
def mark_native_unit(marker: XMarkMarker, unit: np.ndarray, channels: int) -> np.ndarray:
    """The marked target of one grey image given as float values in [0, 1] (e.g. a DICOM file as
    the data module reads it, before any 8-bit rounding).

    Args:
        unit: H×W float array in [0, 1].
        channels: C the generator sees.

    Returns ``clip(x + δ, 0, 1)`` as an H×W float64 array, ``|result − x| ≤ ε`` everywhere up to float64
    rounding (one ulp: x + ε − x can exceed ε by 2e-17); the file
    writer (e.g. :func:`datamodules.dicom.write_grey_dicom`) rounds it to what the file can store.
    """
    if unit.ndim != 2:
        raise ValueError(f"expected an H×W grey image, got shape {unit.shape}")
    native = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))[None]
    delta = native_delta(marker, native, channels)[0].double().clamp(-marker.epsilon, marker.epsilon)
    return (torch.from_numpy(np.asarray(unit, dtype=np.float64)) + delta).clamp(0, 1).numpy()


@torch.no_grad()
def query_pairs(predict, images: Tensor, marked: Tensor, target_class: int,
                batch_size: int = 64) -> dict[str, np.ndarray]:
    """Query a classifier on paired clean / marked images.

    Args:
        predict: ``predict(B×C×H×W [0, 1]) -> B×K probabilities``.
        images, marked: N×C×H×W in [0, 1], paired by index.
    Returns:
        ``p_benign`` (N, P(y_t | x)), ``p_marked`` (N, P(y_t | x_w)), ``pred_marked`` (N, argmax
        on x_w), ``pred_benign`` (N).
    """
    outs = {"p_benign": [], "p_marked": [], "pred_benign": [], "pred_marked": []}
    for start in range(0, len(images), batch_size):
        for name, batch in (("benign", images[start:start + batch_size]), ("marked", marked[start:start + batch_size])):
            probs = predict(batch).float()
            outs[f"p_{name}"].append(probs[:, target_class].cpu())
            outs[f"pred_{name}"].append(probs.argmax(1).cpu())
    return {k: torch.cat(v).numpy().astype(np.float64 if k.startswith("p_") else np.int64) for k, v in outs.items()}
