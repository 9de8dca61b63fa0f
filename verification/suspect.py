"""A suspect model behind the one interface verification uses: ``predict(images) -> probs``.

:class:`CheckpointSuspect` rebuilds the network of a medmark Lightning checkpoint (any
method: its ``hyper_parameters.backbone`` config + the ``model.*`` weights), so a stolen
StealthMark checkpoint, a fine-tuned copy or a clean model all load the same way. Every
image passed to :meth:`CheckpointSuspect.predict` counts as one query.

The other suspect kinds (TorchScript, ONNX, HTTP endpoint) and the factory that picks one
from a path or URL live in :mod:`verification.adapters` (``open_suspect``).

Suspect files come from someone else: they are read by :mod:`models.safe_reader`
(``torch.load(weights_only=True)``, no pickled code runs) and the network is built by calling
a factory from its exact-name table directly (no Hydra ``instantiate``: nothing nested in the
file's config is ever built). ``factories`` (``verify.py suspect_factories=[...]``) only *adds*
operator-trusted factories of the verifier's own code (e.g. a test network); see
:mod:`models.safe_reader`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.safe_reader import ModelFileError, file_sha256, load_model_checkpoint, read_checkpoint

__all__ = ["CheckpointSuspect", "SuspectError", "build_suspect_model", "file_sha256"]


class SuspectError(ModelFileError):
    """The suspect file cannot be used; the message names the file (and field). A ``ValueError``."""


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """Kept for old callers: :func:`models.safe_reader.read_checkpoint` raising :class:`SuspectError`."""
    return read_checkpoint(path, SuspectError)


def build_suspect_model(
    path: str | Path, factories: tuple[str, ...] = (), task: str | None = "segmentation"
) -> tuple[nn.Module, dict[str, Any]]:
    """Network and hyper-parameters of a medmark Lightning checkpoint (weights loaded, CPU, eval mode).

    Args:
        path: the checkpoint.
        factories: operator-trusted factories *added* to :data:`models.safe_reader.FACTORIES`
            (exact names, or ``module.`` for the functions / ``nn.Module`` classes that module
            defines); ``models.`` adds nothing.
        task: the task the checkpoint must have been trained for (``segmentation`` for
            StealthMark, ``classification`` for X-Mark); ``None`` accepts the checkpoint's own
            (``hyper_parameters.task``, default segmentation).
    Returns:
        ``(model, hparams)``; ``hparams["backbone"]`` is the validated config.
    Raises:
        SuspectError: missing/corrupt file, no ``hyper_parameters.backbone``, a factory outside
            the table, a nested / Hydra-special config entry, a checkpoint of another task, or
            weights that do not fit the network (file and key path named).
    """
    return load_model_checkpoint(path, task=task, factories=tuple(factories), error=SuspectError)


class CheckpointSuspect:
    """``predict(images B×C×H×W float [0,1]) -> probabilities`` of a checkpoint's model.

    Segmentation (default): sigmoid, B×1×H×W. Classification (``task="classification"``):
    softmax over the K classes, B×K (rows sum to 1). ``task=None`` takes the checkpoint's own
    ``hyper_parameters.task`` (as ``python -m verification.serve`` does).

    Attributes:
        model: the network (an attack may modify it in place before verification).
        queries: images predicted so far.
        hparams: the checkpoint's hyper-parameters (non-secret by construction).
        kind: ``"checkpoint"`` (see :meth:`identity`).
    """

    kind = "checkpoint"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 factories: tuple[str, ...] = (), task: str | None = "segmentation"):
        if task not in ("segmentation", "classification", None):
            raise ValueError(f"task must be segmentation or classification, got {task!r}")
        self.path = Path(path)
        self.factories = tuple(factories)  # operator-trusted extras, reused to build a distillation student
        self.model, self.hparams = build_suspect_model(self.path, self.factories, task=task)
        self.task = task or str(self.hparams.get("task", "segmentation"))
        if self.task not in ("segmentation", "classification"):
            raise SuspectError(f"{self.path}: field 'hyper_parameters.task' is {self.task!r}; expected "
                               "segmentation or classification")
        self.device = torch.device(device)
        self.model.to(self.device)
        self.queries = 0
        self._sha256: str | None = None

    def identity(self) -> dict[str, Any]:
        """``{kind, path, sha256, task, backbone}`` of the file (the hash is computed once)."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        backbone = self.hparams.get("backbone") or {}
        return {"kind": self.kind, "path": str(self.path), "sha256": self._sha256, "task": self.task,
                "backbone": backbone.get("name") or backbone.get("_target_")}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        if self.task == "classification":
            logits = self.model(images.to(self.device, torch.float32))
        else:
            logits = self.model(images.to(self.device, torch.float32), None)
        self.queries += int(images.shape[0])
        if not bool(torch.isfinite(logits).all()):  # NaN/inf is bad input (exit 2), never evidence
            raise SuspectError(f"{self.path}: the model returned non-finite logits (NaN/inf) for "
                               f"{int(images.shape[0])} images")
        if self.task == "classification":
            return torch.softmax(logits.float(), dim=1).cpu()
        return torch.sigmoid(logits.float()).cpu()
