"""Suspect adapters: every kind of suspect behind one ``predict(images) -> probabilities``.

Verification talks to a suspect only through :class:`Suspect` (docs/verification.md):

* ``predict(images)``: ``images`` B×C×H×W float32 in [0, 1] (pixel space, as a real API sees
  them) -> probabilities on the CPU: segmentation B×1×h×w (sigmoid of the logits),
  classification B×K (softmax, rows sum to 1). Every image sent counts as one query.
* ``queries`` (images answered so far), ``task`` (``segmentation`` | ``classification``),
  ``kind``, ``model`` (the ``nn.Module`` for attacks that need weights -- a checkpoint's --
  or ``None``; :func:`require_weights` turns ``None`` into a named error) and
  ``identity()`` -> ``{kind, path | url, sha256, ...}`` for the report.

Adapters, picked by :func:`open_suspect` from the ``suspect=`` string:

=====================  ==========================  =========================================
``suspect=``           adapter                     what the file/endpoint must be
=====================  ==========================  =========================================
``http(s)://...``      :class:`HttpSuspect`        POST .npy B×C×H×W -> .npy or JSON probabilities
``*.ckpt``             :class:`CheckpointSuspect`  a medmark Lightning checkpoint
``*.pt, *.ts,          :class:`TorchScriptSuspect` a ``torch.jit.save`` archive: images [0, 1] -> logits
*.torchscript``
``*.onnx``             :class:`OnnxSuspect`        an ONNX graph: images [0, 1] -> logits
=====================  ==========================  =========================================

**Exported-model contract** (TorchScript and ONNX; ``python -m verification.export`` writes both):
the graph takes one input, images B×C×H×W float32 in [0, 1] (the model's intensity
normalisation is inside the graph), and returns **logits**: segmentation B×1×H×W (the
adapter applies a sigmoid), classification B×K (softmax). ``verification.export`` also stores a
small JSON record (``medmark.json``: task, channels, image size, source checkpoint hash); when
present the adapter checks the task against it.

**HTTP contract** (``python -m verification.serve`` is the reference server): ``POST <url>`` with the
images as ``.npy`` bytes (``Content-Type: application/octet-stream``, float32 B×C×H×W);
the answer is ``.npy`` probabilities, or JSON (``{"probabilities": [...]}`` or a bare nested
list). Timeouts, retries with exponential backoff on timeouts / connection errors / 5xx / 429,
a query budget and a 413 "batch too large" answer (the batch is split and re-sent) are
handled here. Anything else -- wrong shape, NaN, values outside [0, 1], rows that do not sum
to 1, a body that is neither JSON nor .npy, HTTP 4xx/5xx after the retries, a timeout -- raises
:class:`SuspectError` with the URL in the message (``verify.py`` exits 2, writes no verdict).
The endpoint is assumed hostile: ``http.timeout_s`` is a *total* deadline per request
(monotonic clock; the socket is shut down when it passes), answers are capped at a size the
request justifies (:meth:`HttpSuspect.answer_size_limit`), redirects are refused
(:class:`RedirectRefusedError`) and a bearer token is sent over ``https://`` only unless
``http.allow_insecure_token`` (:class:`InsecureTokenError`).

Suspect files are foreign input: checkpoints are read with ``weights_only=True``; a
TorchScript archive may only compute on tensors -- its operators are checked against an
allow-list before it is loaded and before its first forward (:func:`check_torchscript_source`,
:func:`check_torchscript_ops`; :class:`SuspectOperatorError`); an ONNX graph runs in
onnxruntime from bytes and may not keep tensors in external files
(:func:`check_onnx_external_data`). NaN/inf from any exported or HTTP suspect raises
:class:`NonFiniteOutputError` naming the file or URL.
Why an allow-list and not a sandbox process: TorchScript has no Python and no I/O except
through registered operators, so the operators are the complete list of a graph's effects; a
sandboxed subprocess (seccomp, no filesystem) would be platform-specific, copy every batch,
and would still need this list to say what a suspect may do.

Modules: :mod:`~verification.adapters.base` (the interface, errors, output checks),
:mod:`~verification.adapters.torchscript`, :mod:`~verification.adapters.onnx_model`,
:mod:`~verification.adapters.http_client`; checkpoints: :mod:`verification.suspect`. This package
re-exports their public names and holds :func:`open_suspect`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from verification.adapters.base import (
    CHECKPOINT_SUFFIXES,
    METADATA_NAME,
    ONNX_SUFFIXES,
    TASKS,
    TORCHSCRIPT_SUFFIXES,
    NonFiniteOutputError,
    Suspect,
    SuspectOperatorError,
    _check_task,
    check_probabilities,
    logits_to_probs,
)
from verification.adapters.http_client import (
    HttpOptions,
    HttpSuspect,
    InsecureTokenError,
    RedirectRefusedError,
    ResponseTooLargeError,
    decode_npy,
    encode_npy,
    is_url,
)
from verification.adapters.onnx_model import OnnxSuspect, check_onnx_external_data
from verification.adapters.torchscript import (
    TORCHSCRIPT_ALLOWED_NAMESPACES,
    TORCHSCRIPT_DENIED_OPS,
    TorchScriptSuspect,
    check_torchscript_ops,
    check_torchscript_source,
)
from verification.suspect import CheckpointSuspect, SuspectError, file_sha256

__all__ = [
    "METADATA_NAME",
    "TASKS",
    "TORCHSCRIPT_ALLOWED_NAMESPACES",
    "TORCHSCRIPT_DENIED_OPS",
    "CheckpointSuspect",
    "HttpOptions",
    "HttpSuspect",
    "InsecureTokenError",
    "NonFiniteOutputError",
    "OnnxSuspect",
    "RedirectRefusedError",
    "ResponseTooLargeError",
    "Suspect",
    "SuspectError",
    "SuspectOperatorError",
    "TorchScriptSuspect",
    "check_onnx_external_data",
    "check_probabilities",
    "check_torchscript_ops",
    "check_torchscript_source",
    "decode_npy",
    "encode_npy",
    "file_sha256",
    "is_url",
    "logits_to_probs",
    "open_suspect",
    "require_weights",
    "suspect_label",
    "suspect_record",
]


def open_suspect(
    spec: str | Path,
    task: str | None = "segmentation",
    device: str | torch.device = "cpu",
    factories: tuple[str, ...] | list[str] = ("models.",),
    http: HttpOptions | Any | None = None,
    num_classes: int | None = None,
) -> Suspect:
    """The adapter for ``spec``: a URL -> HTTP, ``.ckpt`` -> checkpoint, ``.pt/.ts/.torchscript``
    -> TorchScript, ``.onnx`` -> ONNX.

    Args:
        spec: ``verify.py suspect=`` -- a path or an ``http(s)://`` URL.
        task: ``segmentation`` | ``classification``; ``None`` = the file's own (checkpoint
            hyper-parameters, export record); an HTTP suspect needs it.
        device: where local models run (``cpu``, ``cuda``, ``cuda:1``).
        factories: module prefixes a checkpoint's backbone ``_target_`` may name.
        http: :class:`HttpOptions` or a mapping of them (``verify.py http.*``).
        num_classes: classification: the K every answer must have (a checkpoint's
            ``hyper_parameters.num_classes`` is checked by the protocol); ``None`` = any.
    Raises:
        SuspectError: unknown extension, missing/foreign file, wrong task (names the file).
    """
    if spec is None or str(spec).strip() == "":
        raise SuspectError("suspect= is empty: give a checkpoint (.ckpt), TorchScript (.pt/.ts/.torchscript), "
                           "ONNX (.onnx) file or an http(s):// URL")
    text = str(spec)
    _check_task(task, text)
    suspect: Suspect
    if is_url(text):
        options = http if isinstance(http, HttpOptions) else HttpOptions.from_config(http)
        suspect = HttpSuspect(text, task=task or "segmentation", options=options)
    else:
        path = Path(text)
        suffix = path.suffix.lower()
        if suffix in CHECKPOINT_SUFFIXES:
            return CheckpointSuspect(path, device=device, factories=tuple(factories), task=task)
        if suffix in TORCHSCRIPT_SUFFIXES:
            suspect = TorchScriptSuspect(path, device=device, task=task)
        elif suffix in ONNX_SUFFIXES:
            suspect = OnnxSuspect(path, device=device, task=task)
        else:
            known = ", ".join(CHECKPOINT_SUFFIXES + TORCHSCRIPT_SUFFIXES + ONNX_SUFFIXES)
            raise SuspectError(f"{path}: unknown suspect type {suffix or '(no extension)'!r}; expected a Lightning "
                               f"checkpoint, TorchScript or ONNX file ({known}) or an http(s):// URL")
    if num_classes is not None:
        suspect.num_classes = int(num_classes)
    return suspect


def require_weights(suspect: Suspect, attack_name: str) -> nn.Module:
    """The suspect's ``nn.Module`` for an attack that modifies weights, else a named SuspectError."""
    model = getattr(suspect, "model", None)
    if model is None:
        kind = str(getattr(suspect, "kind", "black-box"))
        if kind == "torchscript":
            raise SuspectError(f"attack={attack_name} needs the suspect's weights as an nn.Module; a TorchScript "
                               "suspect is a compiled graph medmark's attacks cannot modify (attack the .ckpt it "
                               "was exported from, or use attack=none)")
        label = {"http": "an HTTP", "onnx": "an ONNX"}.get(kind, f"a {kind}")
        raise SuspectError(f"attack={attack_name} needs the suspect's weights; {label} suspect has none "
                           "(use attack=none, or a checkpoint suspect)")
    return model


def suspect_label(record: Any) -> str:
    """One line for report.md: ``onnx model.onnx (sha256 1a2b3c4d5e6f…)``."""
    if not isinstance(record, dict):
        return str(record)
    where = record.get("url") or record.get("path")
    digest = record.get("sha256")
    return f"{record.get('kind')} {where}" + (f" (sha256 {digest[:16]}…)" if digest else "")


def suspect_record(suspect: Suspect) -> dict[str, Any]:
    """``{kind, path | url, sha256, queries, ...}``: the report's ``suspect`` entry."""
    identity = dict(suspect.identity()) if hasattr(suspect, "identity") else {
        "kind": getattr(suspect, "kind", "checkpoint"), "path": str(getattr(suspect, "path", ""))}
    identity["queries"] = int(suspect.queries)
    return identity
