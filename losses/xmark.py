"""X-Mark loss terms (METHODS.md §2, step 3) and the random-rescale helper.

The X-Mark objective runs the generator on a batch and fills ``outputs`` with:

* ``marked`` -- x_w, B×C×H×W in [0, 1]; ``delta`` -- δ, B×C×H×W in [−ε, ε];
* ``marked_logits`` -- B×K logits of the frozen model the watermark is learnt against
  (the clean surrogate, or the proxy Mal model of the bilevel scheme) on x_w;
* ``reference_marked_logits`` -- list of B×K logits of clean *reference* models on x_w.

``batch`` is the data-module batch (``image`` B×C×H×W in [0, 1], ``label`` B long). Every
term's input keys can be renamed, which is how the objective also evaluates the terms on
a randomly rescaled x_w (:func:`random_rescale`) for scale robustness.

Classes are split by ``target_class`` y_t: *non-target* images (label ≠ y_t) are what the
verification queries; *target-class* images are what the released dataset marks (clean
label). A term whose subset is empty in a batch returns an exact 0 that is still
connected to the graph (so DDP sees the same parameters used on every rank).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losses.base import LossTerm
from models.weights import describe_key_mismatch, load_state_dict_file, resolve_local_weights
from watermark.xmark.pyramid import laplacian_pyramid


def _zero_like_graph(t: Tensor) -> Tensor:
    # Exactly 0, yet part of the autograd graph (unused-parameter errors under DDP otherwise).
    return t.sum() * 0.0


class TargetedCETerm(LossTerm):
    """Cross-entropy pushing marked NON-target images to ``target_class``.

    ``mean over {i: label_i ≠ y_t} of CE(marked_logits_i, y_t)``; 0 when the batch has no
    non-target image. Lower = the model already predicts y_t on the marked images.

    Reads ``outputs[logits_key]`` (B×K) and ``batch[label_key]`` (B, long).
    """

    def __init__(
        self, weight: float = 1.0, target_class: int = 1, logits_key: str = "marked_logits", label_key: str = "label"
    ):
        super().__init__(weight)
        self.target_class = int(target_class)
        self.logits_key = logits_key
        self.label_key = label_key

    def compute(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        logits = outputs[self.logits_key]
        keep = batch[self.label_key].to(logits.device) != self.target_class
        if not bool(keep.any()):
            return _zero_like_graph(logits)
        target = torch.full((int(keep.sum()),), self.target_class, dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits[keep], target)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, target_class={self.target_class}"


class UntargetedSuppressionTerm(LossTerm):
    """Suppress the natural target-class features of marked TARGET-class images (clean label).

    Clean-label logic: a released target-class image keeps its label y_t; if its own
    class evidence is weakened by δ, a model trained on it must lean on the watermark to
    fit y_t -- which is what later makes marked non-target images flip to y_t.

    Choice: ``mean over {i: label_i = y_t} of −log(1 − p_{y_t}(x_w,i))``, i.e. the
    cross-entropy of the binary event "not y_t". Unlike −CE(y_t) (= log p_{y_t}), it is
    bounded below by 0 and its gradient fades as p_{y_t} -> 0, so it cannot run away and
    swamp the other terms; unlike a clipped −CE it has no threshold to tune. Computed
    stably in logit space: ``logsumexp(all logits) − logsumexp(logits without y_t)``.
    0 when the batch has no target-class image.

    Reads ``outputs[logits_key]`` (B×K, K ≥ 2) and ``batch[label_key]`` (B, long).
    """

    def __init__(
        self, weight: float = 1.0, target_class: int = 1, logits_key: str = "marked_logits", label_key: str = "label"
    ):
        super().__init__(weight)
        self.target_class = int(target_class)
        self.logits_key = logits_key
        self.label_key = label_key

    def compute(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        logits = outputs[self.logits_key]
        if logits.shape[1] < 2:
            raise ValueError(f"{type(self).__name__} needs K >= 2 logits, got shape {tuple(logits.shape)}")
        keep = batch[self.label_key].to(logits.device) == self.target_class
        if not bool(keep.any()):
            return _zero_like_graph(logits)
        selected = logits[keep]
        others = torch.cat([selected[:, : self.target_class], selected[:, self.target_class + 1:]], dim=1)
        return (torch.logsumexp(selected, dim=1) - torch.logsumexp(others, dim=1)).mean()

    def extra_repr(self) -> str:
        return f"weight={self.weight}, target_class={self.target_class}"


class IndMSuppressionTerm(LossTerm):
    """Keep clean reference models correct on marked NON-target images (against Ind-M false positives).

    ``mean over references r of mean over {i: label_i ≠ y_t} of CE(reference_marked_logits[r]_i, label_i)``.
    A watermark that flips an *independent* clean model is a transferable adversarial
    perturbation, not a watermark (METHODS.md §2 probe); this term penalises exactly that.
    0 when the batch has no non-target image.

    Reads ``outputs[logits_key]`` (a list/tuple of B×K logits, or one B×K tensor) and
    ``batch[label_key]``.
    """

    def __init__(
        self,
        weight: float = 1.0,
        target_class: int = 1,
        logits_key: str = "reference_marked_logits",
        label_key: str = "label",
    ):
        super().__init__(weight)
        self.target_class = int(target_class)
        self.logits_key = logits_key
        self.label_key = label_key

    def compute(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        references = outputs[self.logits_key]
        if isinstance(references, Tensor):
            references = [references]
        if len(references) == 0:
            raise ValueError(
                f"{type(self).__name__}: outputs[{self.logits_key!r}] is empty -- configure at least one clean "
                "reference model, or remove this term"
            )
        labels = batch[self.label_key].to(references[0].device)
        keep = labels != self.target_class
        if not bool(keep.any()):
            return torch.stack([_zero_like_graph(r) for r in references]).sum()
        return torch.stack([F.cross_entropy(r[keep], labels[keep]) for r in references]).mean()

    def extra_repr(self) -> str:
        return f"weight={self.weight}, target_class={self.target_class}"


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


class LaplacianPenaltyTerm(LossTerm):
    """Band-weighted energy of δ in a Laplacian pyramid (:mod:`watermark.xmark.pyramid`).

    ``Σ_k level_weights[k] · mean(band_k(δ)²)``, k = 0 the finest band; the low-pass
    residual is not penalised, so smooth, low-frequency marks are free while pixel-level
    noise (visible, and fragile under JPEG/resizing) is expensive. Each band's energy is a
    per-pixel mean, so the weights compare bands of different sizes fairly.

    Args:
        levels: number of band-pass levels (≥ 1; δ must be at least 3·2^(levels−1) pixels
            on its shorter side).
        level_weights: ``levels`` non-negative weights; default ``2^−k`` (1, 0.5, 0.25, ...),
            finest weighted most.
        delta_key: ``outputs[delta_key]`` = δ, B×C×H×W.
    """

    def __init__(
        self,
        weight: float = 1.0,
        levels: int = 3,
        level_weights: list[float] | None = None,
        delta_key: str = "delta",
    ):
        super().__init__(weight)
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        level_weights = [2.0**-k for k in range(levels)] if level_weights is None else [float(w) for w in level_weights]
        if len(level_weights) != levels or any(w < 0 or not math.isfinite(w) for w in level_weights):
            raise ValueError(f"level_weights must be {levels} finite non-negative numbers, got {level_weights}")
        self.levels = int(levels)
        self.level_weights = level_weights
        self.delta_key = delta_key

    def compute(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        bands = laplacian_pyramid(outputs[self.delta_key], self.levels)[:-1]
        return sum(w * band.pow(2).mean() for w, band in zip(self.level_weights, bands))

    def extra_repr(self) -> str:
        return f"weight={self.weight}, levels={self.levels}, level_weights={self.level_weights}"


def random_rescale(
    x: Tensor,
    scale_range: tuple[float, float] = (0.5, 1.0),
    generator: torch.Generator | None = None,
    mode: str = "bilinear",
) -> Tensor:
    """Down-sample by a random factor and up-sample back: a differentiable resize "attack".

    One factor s ~ U(scale_range) per call (the whole batch), as a suspect pipeline that
    resizes its inputs would do. x (B×C×H×W) -> resized to ``max(1, round(s·H)) ×
    max(1, round(s·W))`` with anti-aliasing (like PIL's resize) -> back to H×W; output
    B×C×H×W, clamped to [0, 1] (bicubic can overshoot). Gradients flow to x.

    Args:
        x: B×C×H×W in [0, 1].
        scale_range: (low, high) with 0 < low ≤ high ≤ 1; (1, 1) returns x unchanged.
        generator: torch generator for a reproducible factor (CPU generator).
        mode: ``"bilinear"`` or ``"bicubic"``.
    """
    low, high = float(scale_range[0]), float(scale_range[1])
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"scale_range must satisfy 0 < low <= high <= 1, got {scale_range}")
    scale = low + (high - low) * float(torch.rand((), generator=generator))
    height, width = x.shape[-2:]
    small = (max(1, round(scale * height)), max(1, round(scale * width)))
    if small == (height, width):
        return x
    down = F.interpolate(x, size=small, mode=mode, align_corners=False, antialias=True)
    return F.interpolate(down, size=(height, width), mode=mode, align_corners=False).clamp(0.0, 1.0)
