"""The suspect interface every adapter implements, its errors and the output checks they share."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from verification.suspect import SuspectError


TASKS = ("segmentation", "classification")
TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript")
ONNX_SUFFIXES = (".onnx",)
CHECKPOINT_SUFFIXES = (".ckpt",)
METADATA_NAME = "medmark.json"  # TorchScript extra file / ONNX metadata key written by verification.export
_PROB_TOLERANCE = 1e-4          # probabilities may leave [0, 1] / rows may miss 1 by this much (float32, JSON)


@runtime_checkable
class Suspect(Protocol):
    """The one interface verification uses (see the module docstring)."""

    kind: str
    task: str
    queries: int
    model: nn.Module | None

    def predict(self, images: Tensor) -> Tensor:
        """``images`` B×C×H×W float [0, 1] -> probabilities (B×1×h×w or B×K), CPU float32."""
        ...

    def identity(self) -> dict[str, Any]:
        """``{kind, path | url, sha256, task, ...}`` (no secrets)."""
        ...


# ----------------------------------------------------------------------------- shared checks


class SuspectOperatorError(SuspectError):
    """A TorchScript suspect uses an operator outside the allow-list (file, process or global state)."""


class NonFiniteOutputError(SuspectError):
    """A suspect answered NaN/inf (logits or probabilities); the message names the file or URL."""


def _check_task(task: str | None, where: str) -> None:
    if task is not None and task not in TASKS:
        raise SuspectError(f"{where}: task must be one of {TASKS}, got {task!r}")


def _check_images(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a B×C×H×W tensor, got {getattr(images, 'shape', type(images))}")
    return images.detach().to("cpu", torch.float32).contiguous()


def _check_classes(probs: Tensor, num_classes: int | None, where: str) -> None:
    if num_classes is not None and probs.dim() == 2 and probs.shape[1] != num_classes:
        raise SuspectError(f"{where}: answers {probs.shape[1]} classes; this verification has {num_classes}")


def logits_to_probs(logits: Tensor, task: str, batch: int, where: str, num_classes: int | None = None) -> Tensor:
    """Shape-check an exported model's logits and turn them into probabilities (CPU float32)."""
    logits = logits.detach().float().cpu()
    if not torch.isfinite(logits).all():
        raise NonFiniteOutputError(f"{where}: returned non-finite logits (NaN/inf) for {batch} images")
    if task == "segmentation":
        if logits.dim() != 4 or logits.shape[0] != batch or logits.shape[1] != 1:
            raise SuspectError(f"{where}: returned logits of shape {tuple(logits.shape)} for {batch} images; a "
                               "segmentation suspect must return B×1×H×W logits")
        probs = torch.sigmoid(logits)
    else:
        if logits.dim() != 2 or logits.shape[0] != batch or logits.shape[1] < 2:
            raise SuspectError(f"{where}: returned logits of shape {tuple(logits.shape)} for {batch} images; a "
                               "classification suspect must return B×K logits (K >= 2)")
        probs = torch.softmax(logits, dim=1)
        _check_classes(probs, num_classes, where)
    if not torch.isfinite(probs).all():
        raise NonFiniteOutputError(f"{where}: returned logits that give non-finite probabilities for {batch} images")
    return probs


def check_probabilities(probs: Tensor, task: str, batch: int, where: str, num_classes: int | None = None) -> Tensor:
    """Validate probabilities received from a black box: shape, finite, in [0, 1], rows sum to 1."""
    shape = tuple(probs.shape)
    if task == "segmentation":
        if probs.dim() != 4 or shape[0] != batch or shape[1] != 1:
            raise SuspectError(f"{where}: answered shape {shape} for {batch} images; a segmentation suspect must "
                               "answer B×1×H×W probabilities")
    elif probs.dim() != 2 or shape[0] != batch or shape[1] < 2:
        raise SuspectError(f"{where}: answered shape {shape} for {batch} images; a classification suspect must "
                           "answer B×K probabilities (K >= 2)")
    if not torch.isfinite(probs).all():
        raise NonFiniteOutputError(f"{where}: answered non-finite values (NaN/inf)")
    lo, hi = float(probs.min()), float(probs.max())
    if lo < -_PROB_TOLERANCE or hi > 1 + _PROB_TOLERANCE:
        raise SuspectError(f"{where}: answered values in [{lo:.4g}, {hi:.4g}], not probabilities in [0, 1] (logits? "
                           "the endpoint must apply its sigmoid/softmax)")
    if task == "classification":
        _check_classes(probs, num_classes, where)
        sums = probs.double().sum(1)
        worst = float((sums - 1).abs().max())
        if worst > 1e-3:
            raise SuspectError(f"{where}: answered classification rows that do not sum to 1 (off by up to "
                               f"{worst:.3g}); expected softmax probabilities")
    return probs.clamp(0, 1)


def _metadata_task(metadata: dict, declared: str | None, where: str) -> str:
    """The task: the caller's, checked against the export record, else the record's."""
    found = metadata.get("task")
    if found is not None and found not in TASKS:
        raise SuspectError(f"{where}: {METADATA_NAME} field 'task' is {found!r}")
    if declared is not None and found is not None and declared != found:
        raise SuspectError(f"{where}: exported for task {found!r} ({METADATA_NAME}); this verification needs a "
                           f"{declared} model")
    task = declared or found
    if task is None:
        raise SuspectError(f"{where}: no task given and the file carries no {METADATA_NAME} record (export it with "
                           "python -m verification.export, or pass the task, e.g. --task segmentation)")
    return task


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err)
    return text.splitlines()[0][:limit] if text else ""


def _exported_from(metadata: dict) -> dict[str, Any]:
    return {"exported_from_sha256": metadata["source_sha256"]} if "source_sha256" in metadata else {}
