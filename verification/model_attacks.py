"""Removal attacks a thief may run on a stolen model before (or while) deploying it.

Used by ``verify.py attack=...`` (dispatch and validation: :mod:`verification.attacks`) and by the
robustness study (``benchmarks/robustness.py``): the suspect is modified, or wrapped, then
verified as usual. Pure PyTorch (no Lightning), framework-free like the rest of ``watermark/``.

Model attacks (need the weights, an ``nn.Module``):

* :func:`prune_global_l1` -- global L1 unstructured pruning of every conv / linear weight,
  made permanent (the pruned weights are plain zeros afterwards, no masks or hooks).
* :func:`finetune` -- a few epochs of plain supervised training on clean data with the task's
  loss (segmentation: BCE + soft Dice; classification: cross-entropy), AdamW.
* :func:`quantize_int8` -- dynamic int8 quantisation of ``nn.Linear`` layers
  (``torch.ao.quantization.quantize_dynamic``: int8 weights, activations quantised on the
  fly) and, because dynamic quantisation covers only Linear/LSTM and a UNet is all
  convolutions, weight-only int8 *fake* quantisation of conv weights (per output channel,
  symmetric, round trip to float). The record lists every layer that changed.
* :func:`distill` -- knowledge distillation of the suspect's *outputs* into a fresh student
  (only queries of the teacher; soft targets: BCE on probability maps for segmentation, KL
  on class probabilities for classification).

Query-time attacks (no weights needed): :class:`QueryTransform` (JPEG, resize down/up,
Gaussian noise, crop + resize back) applied to every image the verifier sends, through
:class:`TransformedSuspect`, a suspect with the same ``predict``/``queries`` interface.

Model conventions: segmentation networks are called ``model(images, None) -> logits
B×1×H×W`` (the second argument is SAM's optional boxes), classifiers ``model(images) ->
logits B×K``; images are B×C×H×W float in [0, 1] (normalisation is inside the model).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from verification.progress import progress

TASKS = ("segmentation", "classification")
_PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task


def forward_logits(model: nn.Module, images: torch.Tensor, task: str) -> torch.Tensor:
    """Logits of ``model`` on ``images``: B×1×H×W (segmentation) or B×K (classification)."""
    if _check_task(task) == "segmentation":
        return model(images, None)
    return model(images)


# ----------------------------------------------------------------------------- pruning


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, "weight")`` for every conv (1/2/3-d, transposed) and linear layer."""
    return [(m, "weight") for m in model.modules()
            if isinstance(m, _PRUNABLE) and isinstance(getattr(m, "weight", None), nn.Parameter)]


def prune_global_l1(model: nn.Module, amount: float) -> dict[str, Any]:
    """Zero the ``amount`` share of all conv/linear weights with the smallest ``|w|``, permanently.

    Args:
        model: modified in place.
        amount: share in [0, 1) of the pooled weights to zero.
    Returns:
        ``{"amount", "num_tensors", "num_weights", "sparsity"}`` -- ``sparsity`` is the share
        of those weights that are zero afterwards.
    """
    amount = float(amount)
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"attack.amount must be in [0, 1), got {amount}")
    params = prunable_weights(model)
    if not params:
        raise ValueError("the model has no conv/linear weights to prune")
    if amount > 0:
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
        for module, name in params:
            prune.remove(module, name)  # bake the mask into the weight: no reparametrisation left
    total = sum(m.weight.numel() for m, _ in params)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in params)
    return {"amount": amount, "num_tensors": len(params), "num_weights": total, "sparsity": zeros / total}


# ----------------------------------------------------------------------------- losses / fine-tuning


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE + (1 − soft Dice) of B×1×H×W logits against {0,1} (or soft) masks (the task loss)."""
    mask = mask.float()
    probs = torch.sigmoid(logits)
    inter = (probs * mask).flatten(1).sum(1)
    dice = (2 * inter + 1.0) / (probs.flatten(1).sum(1) + mask.flatten(1).sum(1) + 1.0)
    return F.binary_cross_entropy_with_logits(logits, mask) + (1.0 - dice).mean()


def task_loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
    """The task's loss on a clean batch: BCE + soft Dice against ``mask``, or CE against ``label``."""
    if _check_task(task) == "segmentation":
        return segmentation_loss(logits.float(), batch["mask"].to(logits.device))
    return F.cross_entropy(logits.float(), batch["label"].to(logits.device).long())


def _train_loop(model: nn.Module, batches: Iterable, step_loss: Callable[[Mapping], torch.Tensor], epochs: int,
                lr: float, weight_decay: float, max_batches: int | None, device: torch.device) -> dict[str, Any]:
    """AdamW (constant lr) over ``epochs`` passes; per-epoch mean losses."""
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps, first, last, epoch_losses = 0, None, None, []
    for _ in progress(range(int(epochs)), desc="attack training", unit="epoch"):
        total, count = 0.0, 0
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            loss = step_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            value = float(loss.detach())
            first = value if first is None else first
            last = value
            total, count = total + value, count + 1
        epoch_losses.append(total / count if count else None)
    model.eval()
    return {"steps": steps, "first_loss": first, "last_loss": last, "epoch_losses": epoch_losses}


def finetune(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    epochs: int = 1,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    task: str = "segmentation",
) -> dict[str, Any]:
    """Fine-tune a model on clean data with its task loss, in place.

    Args:
        model: segmentation ``forward(images, boxes) -> logits B×1×H×W`` or classification
            ``forward(images) -> logits B×K``.
        batches: re-iterable source of ``{"image", "mask"}`` / ``{"image", "label"}`` batches (a
            DataLoader), one pass per epoch.
        epochs, lr, weight_decay: AdamW schedule (constant learning rate).
        max_batches: per-epoch cap (None = all).
        seed: torch seed of the attack (dropout, loader shuffling).
        task: ``segmentation`` (BCE + soft Dice) or ``classification`` (cross-entropy).
    Returns:
        ``{"epochs", "steps", "first_loss", "last_loss", "epoch_losses", "seconds"}``.
    """
    _check_task(task)
    if epochs < 0 or lr <= 0:
        raise ValueError(f"finetune needs epochs >= 0 and lr > 0, got epochs={epochs}, lr={lr}")
    torch.manual_seed(seed)
    started = time.perf_counter()
    device = torch.device(device)

    def step_loss(batch: Mapping) -> torch.Tensor:
        return task_loss(forward_logits(model, batch["image"].to(device), task), batch, task)

    stats = _train_loop(model, batches, step_loss, epochs, lr, weight_decay, max_batches, device)
    return {"epochs": int(epochs), **stats, "seconds": round(time.perf_counter() - started, 3)}


# ----------------------------------------------------------------------------- quantisation


def fake_quantize_(weight: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-output-channel symmetric round trip of ``weight`` (dim 0 = channels), in place.

    ``scale_c = max|w_c| / (2^(bits−1) − 1)``, ``w ← round(w / scale_c)·scale_c``: at most
    ``2^bits − 1`` distinct values per channel (255 for int8). Returns ``weight``.
    """
    if not 2 <= int(bits) <= 16:
        raise ValueError(f"attack.bits must be in 2..16, got {bits}")
    qmax = 2 ** (int(bits) - 1) - 1
    with torch.no_grad():
        flat = weight.reshape(weight.shape[0], -1)
        scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny) / qmax
        flat.copy_((flat / scale).round().clamp(-qmax, qmax) * scale)
    return weight


def quantize_int8(model: nn.Module, linear: bool = True, conv: bool = True, bits: int = 8) -> tuple[nn.Module, dict]:
    """Int8 quantisation as a deployment would do it; returns ``(model, record)``.

    * ``linear``: ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, qint8)`` --
      Linear weights stored as packed int8 (``weight().dtype == torch.qint8``), activations
      quantised per batch at run time. CPU kernels only: the model must run on the CPU.
      Dynamic quantisation covers only Linear/LSTM layers, so on a conv net it does ~nothing;
    * ``conv``: every conv weight is fake-quantised in place (:func:`fake_quantize_`,
      per output channel, symmetric, ``bits`` bits) -- what weight-only int8 storage does to
      the numbers the network computes with.

    The model is modified in place where possible (the returned object is the one to use).
    ``record``: ``{"linear_quantized": [names], "conv_fake_quantized": [names],
    "num_linear", "num_conv", "bits", "conv_mean_abs_change", "backend"}``.
    """
    model = model.cpu().eval()
    conv_names, changes = [], []
    if conv:
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.conv._ConvNd) and isinstance(getattr(module, "weight", None), nn.Parameter):
                before = module.weight.detach().clone()
                fake_quantize_(module.weight.data, bits)
                conv_names.append(name)
                changes.append(float((module.weight.detach() - before).abs().mean()))
    linear_names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    backend = None
    if linear and linear_names:
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
            model = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
        backend = torch.backends.quantized.engine
    return model, {
        "linear_quantized": linear_names if linear else [],
        "conv_fake_quantized": conv_names,
        "num_linear": len(linear_names) if linear else 0,
        "num_conv": len(conv_names),
        "bits": int(bits),
        "conv_mean_abs_change": sum(changes) / len(changes) if changes else 0.0,
        "backend": backend,
    }


# ----------------------------------------------------------------------------- distillation


def distillation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, task: str) -> torch.Tensor:
    """Soft-target loss: BCE(sigmoid(s), p_t) per pixel (segmentation) or KL(p_t ‖ softmax(s))."""
    teacher_probs = teacher_probs.to(student_logits.device, torch.float32)
    if _check_task(task) == "segmentation":
        if teacher_probs.shape[-2:] != student_logits.shape[-2:]:
            teacher_probs = F.interpolate(teacher_probs, size=student_logits.shape[-2:], mode="bilinear",
                                          align_corners=False)
        return F.binary_cross_entropy_with_logits(student_logits.float(), teacher_probs.clamp(0, 1))
    return F.kl_div(F.log_softmax(student_logits.float(), dim=1), teacher_probs.clamp_min(0), reduction="batchmean")


def distill(
    student: nn.Module,
    teacher: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[Mapping[str, torch.Tensor]],
    task: str = "segmentation",
    epochs: int = 5,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``student`` (in place) to reproduce ``teacher``'s probabilities on the batches' images.

    Args:
        student: a freshly initialised network (the thief's own).
        teacher: ``images B×C×H×W [0,1] -> probabilities`` (the suspect's ``predict``: black box;
            ground-truth masks/labels are never used).
        batches: re-iterable ``{"image", ...}`` batches (a DataLoader), one pass per epoch.
        task: ``segmentation`` (BCE to the probability map) or ``classification`` (KL).
    Returns:
        ``{"epochs", "steps", "first_loss", "last_loss", "epoch_losses", "teacher_queries", "seconds"}``.
    """
    _check_task(task)
    if epochs < 1 or lr <= 0:
        raise ValueError(f"distill needs epochs >= 1 and lr > 0, got epochs={epochs}, lr={lr}")
    torch.manual_seed(seed)
    started = time.perf_counter()
    device = torch.device(device)
    queries = 0

    def step_loss(batch: Mapping) -> torch.Tensor:
        nonlocal queries
        images = batch["image"]
        with torch.no_grad():
            target = torch.as_tensor(teacher(images)).detach().float()
        queries += int(images.shape[0])
        return distillation_loss(forward_logits(student, images.to(device), task), target, task)

    stats = _train_loop(student, batches, step_loss, epochs, lr, weight_decay, max_batches, device)
    return {"epochs": int(epochs), **stats, "teacher_queries": queries,
            "seconds": round(time.perf_counter() - started, 3)}


class ModuleSuspect:
    """A plain ``nn.Module`` behind the suspect interface (the distilled student).

    ``predict(images) -> probabilities`` (sigmoid B×1×H×W or softmax B×K, CPU float32);
    ``queries`` counts images; ``identity()`` describes where the network came from.
    """

    kind = "module"

    def __init__(self, model: nn.Module, task: str, device: str | torch.device = "cpu",
                 identity: Mapping[str, Any] | None = None, hparams: Mapping[str, Any] | None = None):
        self.model = model.eval()
        self.task = _check_task(task)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.queries = 0
        self.hparams = dict(hparams or {})
        self._identity = dict(identity or {})

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "task": self.task, **self._identity}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        logits = forward_logits(self.model, images.to(self.device, torch.float32), self.task).float()
        self.queries += int(images.shape[0])
        probs = torch.sigmoid(logits) if self.task == "segmentation" else torch.softmax(logits, dim=1)
        return probs.cpu()


# ----------------------------------------------------------------------------- query-time transforms


def jpeg_round_trip(images: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG-compress and decode each image of B×C×H×W [0, 1] at ``quality`` (1..100); C ∈ {1, 3}.

    The one JPEG codec of the project (:func:`watermark.medlocker.removal_attacks.jpeg`, OpenCV,
    uint8 rounding half up); returns float32 on the input's device.
    """
    from watermark.medlocker.removal_attacks import jpeg

    quality = int(quality)
    if not 1 <= quality <= 100:
        raise ValueError(f"attack.quality must be in 1..100, got {quality}")
    channels = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"JPEG needs 1 or 3 channels, got {channels}")
    return jpeg(images.detach().float(), quality)


def resize_round_trip(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Downsample B×C×H×W by ``factor`` in (0, 1] (antialiased bilinear), then back up to H×W."""
    factor = float(factor)
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"attack.factor must be in (0, 1], got {factor}")
    h, w = images.shape[-2:]
    small = (max(1, round(h * factor)), max(1, round(w * factor)))
    down = F.interpolate(images.float(), size=small, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


def gaussian_noise(images: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``clip(x + σ·N(0, 1), 0, 1)`` with a seeded generator (CPU)."""
    sigma = float(sigma)
    if sigma < 0:
        raise ValueError(f"attack.sigma must be >= 0, got {sigma}")
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float32)
    return (images.float() + sigma * noise.to(images.device)).clamp(0, 1)


def crop_box(size: tuple[int, int], fraction: float, mode: str = "center",
             generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a crop keeping ``fraction`` of each side."""
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"attack.fraction must be in (0, 1], got {fraction}")
    h, w = size
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    if mode == "center":
        return (h - ch) // 2, (w - cw) // 2, ch, cw
    if mode == "random":
        top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
        return top, left, ch, cw
    raise ValueError(f"attack.mode must be center or random, got {mode!r}")


class QueryTransform:
    """A transform the thief's deployment applies to every incoming image.

    ``QueryTransform(name, **params)`` with ``name`` ∈ ``jpeg`` (``quality``), ``resize``
    (``factor``), ``noise`` (``sigma``, ``seed``), ``crop`` (``fraction``, ``mode`` center|random,
    ``seed``). ``apply(images) -> (images', undo)``: ``images'`` has the input's shape;
    ``undo`` maps a segmentation answer back onto the input's pixel grid (crop: the crop's
    probabilities pasted back in place, 0 outside -- the deployment answers for the whole
    image) or is ``None``.
    """

    NAMES = ("jpeg", "resize", "noise", "crop")

    def __init__(self, name: str, quality: int = 75, factor: float = 0.5, sigma: float = 0.01,
                 fraction: float = 0.9, mode: str = "center", seed: int = 0):
        if name not in self.NAMES:
            raise ValueError(f"attack.name must be one of {self.NAMES} for a query transform, got {name!r}")
        self.name = name
        self.params: dict[str, Any] = {
            "jpeg": {"quality": int(quality)},
            "resize": {"factor": float(factor)},
            "noise": {"sigma": float(sigma), "seed": int(seed)},
            "crop": {"fraction": float(fraction), "mode": str(mode), "seed": int(seed)},
        }[name]
        self.generator = torch.Generator().manual_seed(int(seed))
        # validate now, not at the first query
        probe = torch.zeros(1, 1, 8, 8)
        if name == "jpeg":
            jpeg_round_trip(probe, quality)
        elif name == "resize":
            resize_round_trip(probe, factor)
        elif name == "noise":
            gaussian_noise(probe, sigma, torch.Generator())
        else:
            crop_box((8, 8), fraction, mode, torch.Generator())
        self.calls = 0

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}

    def apply(self, images: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None]:
        self.calls += 1
        if self.name == "jpeg":
            return jpeg_round_trip(images, self.params["quality"]), None
        if self.name == "resize":
            return resize_round_trip(images, self.params["factor"]), None
        if self.name == "noise":
            return gaussian_noise(images, self.params["sigma"], self.generator), None
        h, w = images.shape[-2:]
        top, left, ch, cw = crop_box((h, w), self.params["fraction"], self.params["mode"], self.generator)
        crop = images[..., top:top + ch, left:left + cw].float()
        out = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)

        def undo(probs: torch.Tensor) -> torch.Tensor:
            back = F.interpolate(probs.float(), size=(ch, cw), mode="bilinear", align_corners=False).clamp(0, 1)
            full = torch.zeros(probs.shape[0], probs.shape[1], h, w, dtype=back.dtype)
            full[..., top:top + ch, left:left + cw] = back
            return full

        return out, undo

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.apply(images)[0]


class TransformedSuspect:
    """``suspect`` behind a deployment that transforms every query with ``transform``.

    Same interface as the wrapped suspect: ``predict(images)`` (transform -> the suspect's
    ``predict`` -> for segmentation, the answer mapped back onto the input grid), ``queries``
    (the wrapped suspect's count), ``task``, ``kind``, ``model`` (the wrapped one's, or
    ``None``), ``identity()`` (the wrapped identity + ``query_transform``). Other attributes
    (``device``, ``hparams``, ``path``) are the wrapped suspect's.
    """

    def __init__(self, suspect: Any, transform: QueryTransform):
        self.suspect = suspect
        self.transform = transform

    def __getattr__(self, name: str) -> Any:
        if name in ("suspect", "transform"):  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.suspect, name)

    @property
    def queries(self) -> int:
        return int(self.suspect.queries)

    @property
    def model(self) -> nn.Module | None:
        return getattr(self.suspect, "model", None)

    def identity(self) -> dict[str, Any]:
        base = self.suspect.identity() if hasattr(self.suspect, "identity") else {"kind": getattr(self.suspect, "kind", "?")}
        return {**base, "query_transform": self.transform.describe()}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        transformed, undo = self.transform.apply(images)
        probs = self.suspect.predict(transformed)
        if undo is not None and probs.dim() == 4:
            probs = undo(probs)
        return probs
