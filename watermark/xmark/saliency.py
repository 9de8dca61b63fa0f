"""EigenCAM saliency of a surrogate classifier, and an on-disk cache of the maps.

X-Mark conditions its generator on where the surrogate looks (docs/xmark.md, step 2):
EigenCAM (the ``grad-cam`` package) of the surrogate's last convolutional block, per image,
min-max normalised to [0, 1]. EigenCAM needs no gradients and no target class: the map is
the projection of the block's activations on their first principal component.

The first principal component has an arbitrary sign (SVD gives ±v). grad-cam's ``EigenCAM``
keeps whatever sign LAPACK returns and then clips negatives, so an unlucky sign yields the
*complement* of the salient region. By default we apply the sign correction grad-cam ships
(``get_2d_projection_with_sign_correction``: flip when |min| > |max|, Seg-Eigen-CAM Eq. 13),
so the dominant response is positive; ``sign_correction=False`` gives plain EigenCAM.

Framework-free (no Lightning); works with any ``nn.Module`` that maps B×C×H×W pixels in
[0, 1] to logits, e.g. medmark's ``ImageClassifier`` (duck-typed through its ``net``
attribute, so this module does not import ``models``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Bump when the way maps are computed changes, so old caches are not reused.
_CACHE_FORMAT = "eigencam-v1"


def _eigencam_class(sign_correction: bool):
    from pytorch_grad_cam import EigenCAM
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    if not sign_correction:
        return EigenCAM

    class SignCorrectedEigenCAM(EigenCAM):
        """grad-cam's EigenCAM with the principal component's sign fixed (see module docstring)."""

        def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):
            return get_2d_projection_with_sign_correction(activations)

    return SignCorrectedEigenCAM


def normalise_maps(maps: Tensor, atol: float = 1e-6) -> Tensor:
    """Per-map min-max normalisation of B×1×H×W maps to [0, 1]; (near-)constant maps become 0.

    A constant map carries no location information; mapping it to zeros (not to 0/0 = NaN,
    nor to ones) means "no saliency", which a saliency-gated generator reads as "no mark".
    """
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    out = torch.where(span > atol, (flat - low) / span.clamp_min(atol), torch.zeros_like(flat))
    return out.view_as(maps).clamp_(0.0, 1.0)


def eigencam_saliency(
    model: nn.Module, target_layer: nn.Module, images: Tensor, sign_correction: bool = True
) -> Tensor:
    """EigenCAM maps of ``model`` at ``target_layer`` for a batch of images.

    Args:
        model: classifier taking B×C×H×W pixels in [0, 1] (medmark's pixel contract).
        target_layer: a module inside ``model`` whose output is a B×K×h×w feature map,
            typically :func:`default_target_layer` (model).
        images: B×C×H×W float in [0, 1], on any device (moved to the model's device).
        sign_correction: fix the principal component's sign (module docstring).

    Returns:
        B×1×H×W float32 in [0, 1] on ``images``' device: each map up-sampled (bilinear, by
        grad-cam) to H×W and min-max normalised on its own; constant maps are all zeros.

    The model is run without gradients; its train/eval flags (grad-cam puts it in eval
    mode) are restored afterwards, module by module.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images of shape B×C×H×W in [0, 1], got {tuple(images.shape)}")
    modes = {module: module.training for module in model.modules()}
    cam = _eigencam_class(sign_correction)(model=model, target_layers=[target_layer])
    try:
        with torch.no_grad():
            # targets=None: EigenCAM ignores the class; grad-cam only uses it for the argmax.
            maps = cam(input_tensor=images.detach(), targets=None)
    finally:
        # Always remove the forward hooks (grad-cam's context manager would swallow IndexErrors).
        cam.activations_and_grads.release()
        for module, training in modes.items():
            module.training = training
    maps = torch.as_tensor(np.asarray(maps, dtype=np.float32)).unsqueeze(1)
    return normalise_maps(maps).to(images.device)


_NORM_OR_ACT = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.GELU,
    nn.ELU,
    nn.Hardswish,
    nn.Mish,
)


def _last_conv_block_in(features: nn.Module) -> nn.Module | None:
    """In a VGG-style ``features`` Sequential: the module closing the last conv block.

    That is the last Conv2d followed by its norm/activation modules (conv -> ReLU for VGG,
    conv -> BN -> ReLU for medmark's small CNN), stopping before pooling. Hooking the
    activation rather than the conv also matters for correctness: timm's VGG uses in-place
    ReLUs, which would overwrite a hooked conv output on the CPU (grad-cam stores a view).
    """
    children = list(features.children())
    conv_idx = [i for i, m in enumerate(children) if isinstance(m, nn.Conv2d)]
    if not conv_idx:
        return None
    chosen = children[conv_idx[-1]]
    for module in children[conv_idx[-1] + 1:]:
        if not isinstance(module, _NORM_OR_ACT):
            break
        chosen = module
    return chosen


def default_target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional block of a classifier, for EigenCAM.

    Understands medmark's ``ImageClassifier`` (unwraps ``model.net``) and plain networks:

    * ResNet-style (timm ResNet/ResNeXt/...): ``layer4``;
    * VGG-style (timm VGG, medmark's ``small_cnn``): the conv block closing ``features``
      (the ReLU after the last conv, not timm VGG's ``pre_logits`` 7×7 "fc6" conv);
    * otherwise: the last ``nn.Conv2d`` outside the classifier head.

    Raises:
        ValueError: the model has no convolution to explain (e.g. a ViT); the message says
            to pass ``target_layer`` explicitly.
    """
    net = getattr(model, "net", model)
    layer4 = getattr(net, "layer4", None)
    if isinstance(layer4, nn.Module):
        return layer4
    features = getattr(net, "features", None)
    if isinstance(features, nn.Sequential):
        chosen = _last_conv_block_in(features)
        if chosen is not None:
            return chosen
    cfg = getattr(net, "pretrained_cfg", None) or {}
    head = cfg.get("classifier") or "head"
    heads = tuple(head) if isinstance(head, (list, tuple)) else (head,)
    excluded = tuple(h.split(".")[0] for h in heads) + ("pre_logits", "fc", "classifier")
    last = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d) and name.split(".")[0] not in excluded:
            last = module
    if last is None:
        raise ValueError(
            f"no convolutional layer found in {type(net).__name__} for EigenCAM: X-Mark's saliency needs a CNN "
            "surrogate (ResNet, VGG, ...). Pass target_layer= explicitly for other architectures."
        )
    return last


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (hex) of a module's ``state_dict``: names, dtypes, shapes and raw bytes, in key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # view(uint8) also handles bfloat16 and bool, which numpy cannot represent directly.
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _module_name(model: nn.Module, layer: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is layer:
            return name or "<root>"
    raise ValueError(f"target_layer {type(layer).__name__} is not a submodule of the model")


def _safe_file_stem(image_id: str) -> str:
    # Ids are often relative paths ("patient1/study1/view1.jpg"); keep them readable but
    # filesystem-safe, and add a hash so ids differing only in stripped characters never collide.
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)[-80:].lstrip(".") or "id"
    return f"{readable}-{hashlib.sha1(image_id.encode()).hexdigest()[:12]}"


def _image_digest(image: Tensor) -> str:
    t = image.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(f"{tuple(t.shape)}|".encode() + t.numpy().tobytes()).hexdigest()


class SaliencyCache:
    """EigenCAM maps computed once per (surrogate, target layer, image) and kept on disk.

    Layout: ``cache_dir/<key>/<image id>-<hash>.npz`` with ``key`` = sha256 of the surrogate's
    state-dict fingerprint, the target layer's name, the sign-correction flag and a format
    version (first 16 hex digits); ``<key>/meta.json`` records them for humans. A surrogate
    with other weights therefore lands in another folder: its maps are recomputed, never
    mixed with stale ones. Each ``.npz`` holds the H×W float32 map and a sha256 of the image
    it was computed from, so an id whose pixels changed (other resize, other preprocessing)
    is recomputed too. Unreadable/corrupt files are recomputed with a logged warning.
    Files are written atomically (temp file + rename): several DDP ranks may share the cache.

    The fingerprint is recomputed only when a parameter/buffer changed: every tensor's
    ``_version`` counter (bumped by in-place updates such as optimiser steps and
    ``load_state_dict``) and storage pointer are compared first.

    Args:
        cache_dir: folder for the cache (created).
        model: the surrogate (pixels in [0, 1] -> logits).
        target_layer: module to explain; ``None`` = :func:`default_target_layer` (model).
        sign_correction: see :func:`eigencam_saliency`.

    Attributes ``hits`` / ``misses`` count maps served from disk / computed.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        model: nn.Module,
        target_layer: nn.Module | None = None,
        sign_correction: bool = True,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.model = model
        self.target_layer = default_target_layer(model) if target_layer is None else target_layer
        self.layer_name = _module_name(model, self.target_layer)
        self.sign_correction = bool(sign_correction)
        self.hits = 0
        self.misses = 0
        self._state_token: tuple | None = None
        self._fingerprint: str | None = None

    def _token(self) -> tuple:
        state = self.model.state_dict(keep_vars=True)
        return tuple((name, t.data_ptr(), t._version, tuple(t.shape)) for name, t in state.items())

    @property
    def fingerprint(self) -> str:
        """sha256 of the surrogate's current state dict (cached until a tensor changes)."""
        token = self._token()
        if token != self._state_token or self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
            self._state_token = token
        return self._fingerprint

    @property
    def key_dir(self) -> Path:
        """Folder holding the maps of the current surrogate state and target layer."""
        fingerprint = self.fingerprint
        key = hashlib.sha256(
            f"{_CACHE_FORMAT}|{fingerprint}|{self.layer_name}|sign={int(self.sign_correction)}".encode()
        ).hexdigest()[:16]
        folder = self.cache_dir / key
        meta = folder / "meta.json"
        if not meta.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            self._atomic_write(meta, json.dumps({
                "format": _CACHE_FORMAT,
                "surrogate_sha256": fingerprint,
                "target_layer": self.layer_name,
                "sign_correction": self.sign_correction,
            }, indent=2).encode())
        return folder

    def path_for(self, image_id: str, folder: Path | None = None) -> Path:
        """Cache file of one image id under the current surrogate state (or in ``folder``)."""
        return (self.key_dir if folder is None else folder) / f"{_safe_file_stem(str(image_id))}.npz"

    @staticmethod
    def _atomic_write(path: Path, payload: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _load(self, path: Path, digest: str, size: tuple[int, int]) -> np.ndarray | None:
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                saliency = np.asarray(data["saliency"], dtype=np.float32)
                stored_digest = str(data["image_sha256"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            log.warning("saliency cache file %s is unreadable (%s); recomputing it", path, err)
            return None
        if saliency.shape != size or not np.all(np.isfinite(saliency)) or saliency.min() < 0 or saliency.max() > 1:
            log.warning("saliency cache file %s holds an invalid map (shape %s); recomputing it", path, saliency.shape)
            return None
        if stored_digest != digest:
            log.info("image %s changed since its saliency was cached; recomputing it", path.stem)
            return None
        return saliency

    def _save(self, path: Path, saliency: np.ndarray, digest: str) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, saliency=saliency.astype(np.float32), image_sha256=np.asarray(digest))
        self._atomic_write(path, buffer.getvalue())

    def get(self, images: Tensor, ids: Sequence[str]) -> Tensor:
        """Saliency maps for a batch, from disk when cached, else computed (in one batch) and stored.

        Args:
            images: B×C×H×W float in [0, 1] (the un-augmented images the generator will see).
            ids: B image ids (the data module's ``batch["id"]``).

        Returns:
            B×1×H×W float32 in [0, 1] on ``images``' device.
        """
        if images.ndim != 4 or len(ids) != images.shape[0]:
            raise ValueError(f"need B×C×H×W images and B ids, got {tuple(images.shape)} and {len(ids)} ids")
        size = tuple(images.shape[-2:])
        folder = self.key_dir  # one fingerprint check per batch
        paths = [self.path_for(i, folder) for i in ids]
        digests = [_image_digest(image) for image in images]
        out: list[np.ndarray | None] = [self._load(p, d, size) for p, d in zip(paths, digests)]
        todo = [i for i, m in enumerate(out) if m is None]
        if todo:
            computed = eigencam_saliency(self.model, self.target_layer, images[todo], self.sign_correction)
            for j, i in enumerate(todo):
                out[i] = computed[j, 0].cpu().numpy()
                self._save(paths[i], out[i], digests[i])
        self.hits += len(ids) - len(todo)
        self.misses += len(todo)
        maps = torch.from_numpy(np.stack(out)).unsqueeze(1)
        return maps.to(images.device)

    __call__ = get
