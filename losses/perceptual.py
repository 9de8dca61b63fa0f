"""Perceptual loss terms: LPIPS distance between an image and its marked copy, strictly offline.

``batch[image_key]`` = x and ``outputs[marked_key]`` = x_w, both B×C×H×W in [0, 1].
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from losses.base import LossTerm
from models.weights import describe_key_mismatch, load_state_dict_file, resolve_local_weights


# torchvision ImageNet weights that LPIPS's backbones were calibrated with (lpips calls
# torchvision's alexnet/vgg16/squeezenet1_1 with pretrained=True, which downloads these
# into the torch hub cache). Named only to make the error message actionable.
LPIPS_BACKBONE_FILES = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
}


def _lpips_backbone_state(backbone: nn.Module, path: Path) -> dict[str, Tensor]:
    """Map a torchvision classifier state dict onto lpips' sliced backbone.

    lpips splits ``torchvision.<net>().features`` into ``slice1..sliceN`` keeping each
    layer's index, so ``sliceK.<i>.weight`` is torchvision's ``features.<i>.weight``. The file
    may be the torchvision checkpoint (its ``classifier.*`` is ignored), just its
    ``features.*``, or an lpips backbone state dict (``sliceK.*`` / ``net.sliceK.*``).
    """
    state = load_state_dict_file(path)
    wanted = backbone.state_dict()
    mapped: dict[str, Tensor] = {}
    for key in wanted:
        _, rest = key.split(".", 1)  # "slice2.3.weight" -> "3.weight"
        for candidate in (f"features.{rest}", key, f"net.{key}"):
            if candidate in state:
                mapped[key] = state[candidate]
                break
    missing = sorted(set(wanted) - set(mapped))
    if missing:
        raise RuntimeError(
            f"LPIPS backbone weights in '{path}' do not fit lpips' {type(backbone).__name__} "
            f"(expected torchvision 'features.*' keys): {describe_key_mismatch(missing, [])}"
        )
    return mapped


class LPIPSTerm(LossTerm):
    """Perceptual distance LPIPS(x, x_w) (``lpips`` package), strictly offline.

    What ``lpips.LPIPS`` loads, and how this term replaces it:

    * the *backbone* (AlexNet / VGG16 / SqueezeNet ``features``) comes from torchvision with
      ``pretrained=True`` -- a download from download.pytorch.org into the torch hub cache.
      Here the backbone is always built random (``pnet_rand=True``) and then, unless
      ``random_backbone=True``, overwritten from the local ``backbone_weights_path`` (the
      torchvision checkpoint, see :data:`LPIPS_BACKBONE_FILES`).
    * the *linear calibration layers* (``lin0..lin4``) ship inside the package
      (``lpips/weights/v<version>/<net>.pth``); they are read from there with
      ``weights_only=True``, never fetched.

    With neither a file nor ``random_backbone=True`` the constructor raises: a random
    backbone is an explicit choice (tests, smoke runs), never a silent fall-back; its
    values are *not* LPIPS and must not be reported as such.

    Args:
        weight: term weight.
        net: ``"alex"`` (default, as in the LPIPS paper for a loss), ``"vgg"`` or ``"squeeze"``.
        backbone_weights_path: local torchvision ImageNet checkpoint of ``net``.
        random_backbone: use a random backbone on purpose.
        version: LPIPS linear-layer version (``"0.1"``).
        image_key, marked_key: ``batch[image_key]`` = x, ``outputs[marked_key]`` = x_w, both
            B×C×H×W in [0, 1]; grey images are repeated to RGB, then scaled to [−1, 1] as
            lpips expects. Images should be at least 32×32 (AlexNet's strides).

    ``compute`` returns the batch mean of the per-image LPIPS distance (≥ 0, 0 for x_w = x).

    The LPIPS network is frozen and kept *out of* this module's parameters and state dict
    (and pinned to eval mode): it is a fixed metric, so it must not bloat every Lightning
    checkpoint, be picked up by an optimiser, or make a checkpoint unloadable with another
    ``net``. ``.to()`` / ``.cuda()`` / ``.half()`` on the term (or the objective) still move it.
    """

    def __init__(
        self,
        weight: float = 1.0,
        net: str = "alex",
        backbone_weights_path: str | None = None,
        random_backbone: bool = False,
        version: str = "0.1",
        image_key: str = "image",
        marked_key: str = "marked",
    ):
        super().__init__(weight)
        if net not in LPIPS_BACKBONE_FILES:
            raise ValueError(f"net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got {net!r}")
        self.net_name = net
        self.image_key = image_key
        self.marked_key = marked_key
        self.random_backbone = bool(random_backbone)
        backbone_file = self._resolve_backbone(net, backbone_weights_path, self.random_backbone)

        import lpips

        lin_file = Path(lpips.__file__).parent / "weights" / f"v{version}" / f"{net}.pth"
        if not lin_file.is_file():
            raise FileNotFoundError(
                f"LPIPS linear-layer weights '{lin_file}' are missing from the installed lpips package "
                f"(they ship with it); reinstall lpips (pinned in requirements.txt)"
            )
        # pretrained=False: lpips must not torch.load the linear layers itself (we do, safely);
        # pnet_rand=True: torchvision builds the backbone without downloading anything.
        with warnings.catch_warnings():
            # torchvision deprecates the ``pretrained=`` argument lpips passes; harmless here.
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
            metric = lpips.LPIPS(pretrained=False, net=net, version=version, pnet_rand=True, verbose=False)
        lin_state = load_state_dict_file(lin_file)
        missing, unexpected = metric.load_state_dict(lin_state, strict=False)
        # "lins.N.*" alias "linN.*" (the same tensors, listed twice by lpips), which the file holds.
        missing = [k for k in missing if not k.startswith(("net.", "scaling_layer.", "lins."))]
        if missing or unexpected:
            raise RuntimeError(
                f"LPIPS linear weights '{lin_file}' do not fit: {describe_key_mismatch(missing, unexpected)}"
            )
        if backbone_file is not None:
            metric.net.load_state_dict(_lpips_backbone_state(metric.net, backbone_file))
        metric.eval().requires_grad_(False)
        self.backbone_source = "random" if backbone_file is None else str(backbone_file)
        # Plain attribute, not a submodule (see class docstring).
        object.__setattr__(self, "_metric", metric)

    @staticmethod
    def _resolve_backbone(net: str, path: str | None, random_backbone: bool) -> Path | None:
        url = LPIPS_BACKBONE_FILES[net]
        file_name = url.rsplit("/", 1)[-1]
        if random_backbone:
            if path is not None:
                raise ValueError("LPIPSTerm: give either backbone_weights_path or random_backbone=True, not both")
            return None
        if path is None:
            cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
            hint = f" A copy exists in the torch hub cache: '{cached}'." if cached.is_file() else ""
            raise FileNotFoundError(
                f"LPIPSTerm(net={net!r}) needs its ImageNet backbone from a local file, and medmark never downloads: "
                f"set backbone_weights_path (e.g. loss.lpips.backbone_weights_path=$WEIGHTS_DIR/{file_name}) to the "
                f"torchvision checkpoint {file_name} (from {url}, copied from a machine with internet access; "
                f"torchvision keeps it in <torch hub dir>/checkpoints/).{hint} For tests/smoke runs only, "
                "random_backbone=True uses a random backbone (the values are then not LPIPS)."
            )
        how = f"Download {url} on a machine with internet access and copy it there, or fix the path."
        return resolve_local_weights(path, f"LPIPS {net} backbone (backbone_weights_path)", how)

    @property
    def metric(self) -> nn.Module:
        """The frozen ``lpips.LPIPS`` network."""
        return self._metric

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.half() on the objective also move the hidden metric.
        self._metric._apply(fn)
        return super()._apply(fn)

    def train(self, mode: bool = True):
        super().train(mode)
        self._metric.eval()  # lpips' linear layers contain Dropout: never active
        return self

    def distance(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-image LPIPS distance of B×C×H×W images in [0, 1] -> B (differentiable in x and y)."""
        if x.shape != y.shape or x.ndim != 4:
            raise ValueError(f"need two B×C×H×W batches of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"LPIPS needs 1- or 3-channel images, got {x.shape[1]} channels")
        return self._metric(x * 2 - 1, y * 2 - 1).flatten()

    def compute(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        marked = outputs[self.marked_key]
        return self.distance(batch[self.image_key].to(marked.dtype), marked).mean()

    def extra_repr(self) -> str:
        return f"weight={self.weight}, net={self.net_name}, backbone={self.backbone_source}"
