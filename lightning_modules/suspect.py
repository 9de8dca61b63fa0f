"""A suspect model behind the one interface verification uses: ``predict(images) -> probs``.

:class:`CheckpointSuspect` rebuilds the network of a medmark Lightning checkpoint (any
method: its ``hyper_parameters.backbone`` config + the ``model.*`` weights), so a stolen
StealthMark checkpoint, a fine-tuned copy or a clean model all load the same way. Every
image passed to :meth:`CheckpointSuspect.predict` counts as one query.

The other suspect kinds (TorchScript, ONNX, HTTP endpoint) and the factory that picks one
from a path or URL live in :mod:`lightning_modules.adapters` (``open_suspect``).

Suspect files come from someone else: the checkpoint is read with
``torch.load(weights_only=True)`` (no pickled code runs) and only model factories from
trusted modules (``models.`` by default; ``verify.py suspect_factories=[...]``) may be
instantiated from its config.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

# Config keys that would make the factory read pretrained weights from disk; the checkpoint's
# own weights replace them anyway, and the verifier's machine need not have those files.
_NO_PRETRAINED = {"encoder_weights": None, "encoder_weights_path": None, "checkpoint": None, "weights_path": None}


class SuspectError(ValueError):
    """The suspect file cannot be used; the message names the file (and field)."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (the suspect's identity in reports)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SuspectError(f"{path}: suspect checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for foreign / corrupt / unsafe files
        raise SuspectError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: "
                           f"{str(err).splitlines()[0][:200]})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise SuspectError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def build_suspect_model(
    path: str | Path, factories: tuple[str, ...] = ("models.",), task: str | None = "segmentation"
) -> tuple[nn.Module, dict[str, Any]]:
    """Network and hyper-parameters of a medmark Lightning checkpoint (weights loaded, CPU, eval mode).

    Args:
        path: the checkpoint.
        factories: module prefixes whose ``_target_`` may be instantiated (the checkpoint's config
            names its own factory; anything else could run arbitrary code).
        task: the task the checkpoint must have been trained for (``segmentation`` for
            StealthMark, ``classification`` for X-Mark); ``None`` accepts the checkpoint's own
            (``hyper_parameters.task``, default segmentation).
    Raises:
        SuspectError: missing/corrupt file, no ``hyper_parameters.backbone``, a factory outside
            ``factories``, a checkpoint of another task, or weights that do not fit the network.
    """
    path = Path(path)
    checkpoint = _read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    backbone = hparams.get("backbone")
    if not isinstance(backbone, dict) or "_target_" not in backbone:
        raise SuspectError(f"{path}: field 'hyper_parameters.backbone' is missing (not a medmark checkpoint)")
    target = str(backbone["_target_"])
    if not target.startswith(tuple(factories)):
        raise SuspectError(f"{path}: field 'hyper_parameters.backbone._target_' = {target!r} is not a trusted "
                           f"model factory ({', '.join(p + '*' for p in factories)}); refusing to instantiate it")
    found = hparams.get("task", "segmentation")
    if task is not None and found != task:
        raise SuspectError(f"{path}: field 'hyper_parameters.task' is {found!r}; this verification needs a "
                           f"{task} model")
    config = copy.deepcopy(backbone)
    for name, value in _NO_PRETRAINED.items():
        if name in config:
            config[name] = value
    if "allow_random_init" in config:
        config["allow_random_init"] = True  # weights come from the checkpoint right below
    try:
        model = instantiate(config)
    except Exception as err:
        raise SuspectError(f"{path}: cannot build hyper_parameters.backbone ({type(err).__name__}: {err})") from None
    state = {}
    for name, tensor in checkpoint["state_dict"].items():
        if name.startswith("model."):
            # torch.compile wraps the network; its weights carry an _orig_mod. prefix.
            state[name[len("model."):].replace("_orig_mod.", "")] = tensor
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SuspectError(f"{path}: field 'state_dict' does not fit its backbone config: {str(err)[:500]}") from None
    return model.eval(), hparams


class CheckpointSuspect:
    """``predict(images B×C×H×W float [0,1]) -> probabilities`` of a checkpoint's model.

    Segmentation (default): sigmoid, B×1×H×W. Classification (``task="classification"``):
    softmax over the K classes, B×K (rows sum to 1). ``task=None`` takes the checkpoint's own
    ``hyper_parameters.task`` (as ``python -m utils.serve`` does).

    Attributes:
        model: the network (an attack may modify it in place before verification).
        queries: images predicted so far.
        hparams: the checkpoint's hyper-parameters (non-secret by construction).
        kind: ``"checkpoint"`` (see :meth:`identity`).
    """

    kind = "checkpoint"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 factories: tuple[str, ...] = ("models.",), task: str | None = "segmentation"):
        if task not in ("segmentation", "classification", None):
            raise ValueError(f"task must be segmentation or classification, got {task!r}")
        self.path = Path(path)
        self.model, self.hparams = build_suspect_model(self.path, tuple(factories), task=task)
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
            self.queries += int(images.shape[0])
            return torch.softmax(logits.float(), dim=1).cpu()
        logits = self.model(images.to(self.device, torch.float32), None)
        self.queries += int(images.shape[0])
        return torch.sigmoid(logits.float()).cpu()
