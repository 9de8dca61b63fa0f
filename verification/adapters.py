"""Suspect adapters: every kind of suspect behind one ``predict(images) -> probabilities``.

Verification talks to a suspect only through :class:`Suspect` (DESIGN.md, "Suspect models"):

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
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from verification.suspect import CheckpointSuspect, SuspectError, file_sha256

__all__ = [
    "TASKS",
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
    "open_suspect",
    "require_weights",
    "suspect_label",
    "suspect_record",
]

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


# ----------------------------------------------------------------------------- TorchScript


# Why an allow-list and not a sandbox: a TorchScript archive is code that runs inside the
# verifier's own process, with its permissions (the owner's secret.json, keys, reports). A
# separate sandboxed process (seccomp / no filesystem / no network) would be the stronger
# isolation, but it is platform-specific, costs a copy of every batch and would still need this
# list to say what a suspect may do. The interpreter itself has no Python and no I/O except
# through registered operators, so every effect a graph can have is an operator node: allowing
# only tensor computation (namespaces below) minus a deny-set of the few operators that touch
# files, print, share storage, use the network or change the process's global state closes the
# effects that matter. The archive's code is checked twice: as text before ``torch.jit.load``
# (which runs any ``__setstate__`` the archive defines -- code that would otherwise run before a
# graph could be inspected) and as graphs after it, before the first forward.
TORCHSCRIPT_ALLOWED_NAMESPACES = frozenset({"aten", "prim", "quantized"})
TORCHSCRIPT_DENIED_OPS = frozenset({
    "aten::from_file", "aten::save", "aten::_print", "prim::Print",          # files, stdout
    "aten::set_", "aten::set_data",                                          # storage sharing / aliasing
    "aten::manual_seed", "aten::seed", "aten::set_grad_enabled",             # the verifier's global state
    "aten::_cufft_set_plan_cache_max_size",
    "prim::rpc_async", "prim::rpc_sync", "prim::rpc_remote",                 # network
    "prim::fork", "aten::wait", "prim::awaitable", "prim::awaitable_nowait", "prim::awaitable_wait",
    "prim::PythonOp", "prim::IgnoredPythonOp",                               # Python callbacks
    "prim::CallFunction",                                                    # unresolved call (inlined away normally)
})
# any aten/prim op whose name mentions files, persistence, printing, shared memory or RPC
_DENIED_OP_NAME = re.compile(r"file|save|load|print|pickle|mmap|shm|share|ipc|rpc", re.IGNORECASE)
# the same, as the archive's serialized code spells calls (torch.save(...), ops.aten.from_file(...), print(...))
_DENIED_SOURCE_CALL = re.compile(
    r"\b(from_file|save|load|_load\w*|print|_print|set_|set_data|manual_seed|seed|set_grad_enabled|"
    r"rpc_async|rpc_sync|rpc_remote|_fork|fork|_wait|wait)\s*\(")
_SOURCE_NAMESPACE = re.compile(r"\bops\.(\w+)\.(\w+)")
_MAX_SOURCE_BYTES = 64 << 20  # one code file of an archive (a UNet's is a few hundred kB)


def _op_refusal(kind: str) -> str | None:
    """Why operator ``kind`` (``namespace::name``) is refused, or ``None`` when allowed."""
    namespace, _, name = kind.partition("::")
    if namespace not in TORCHSCRIPT_ALLOWED_NAMESPACES:
        return f"namespace {namespace!r} is not tensor computation (allowed: {sorted(TORCHSCRIPT_ALLOWED_NAMESPACES)})"
    if kind in TORCHSCRIPT_DENIED_OPS or _DENIED_OP_NAME.search(name):
        return "it touches files, prints, shares storage, uses the network or changes the process's global state"
    return None


def check_torchscript_source(path: str | Path) -> None:
    """Refuse an archive whose serialized code calls a denied operator, *before* ``torch.jit.load``.

    ``torch.jit.load`` compiles the archive's ``code/`` and runs ``__setstate__`` methods while
    unpickling, so this textual check is what stands between a hostile archive and load time.
    Raises :class:`SuspectOperatorError` naming the archive, the code file and the call.
    """
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if "/code/" not in f"/{name}" or not name.endswith(".py"):
                continue
            info = archive.getinfo(name)
            if info.file_size > _MAX_SOURCE_BYTES:
                raise SuspectOperatorError(f"{path}: refused before loading: {name} holds {info.file_size} bytes of "
                                           f"code (more than {_MAX_SOURCE_BYTES})")
            text = archive.read(name).decode("utf-8", errors="replace")
            for match in _SOURCE_NAMESPACE.finditer(text):
                why = _op_refusal(f"{match.group(1)}::{match.group(2)}")
                if why:
                    raise SuspectOperatorError(f"{path}: refused before loading: {name} calls operator "
                                               f"{match.group(1)}::{match.group(2)} ({why})")
            match = _DENIED_SOURCE_CALL.search(text)
            if match:
                raise SuspectOperatorError(f"{path}: refused before loading: {name} calls {match.group(1)}(...), "
                                           "an operator that touches files, prints, shares storage, uses the network "
                                           "or changes the process's global state (not tensor computation)")


def _graph_refusals(graph: Any):
    """``(operator kind, source line)`` of every refused node, nested blocks and subgraphs included."""
    stack = [graph.nodes()]
    while stack:
        for node in stack.pop():
            kind = node.kind()
            if _op_refusal(kind):
                yield kind, node.sourceRange().splitlines()[0].strip() if node.sourceRange() else ""
            stack.extend(block.nodes() for block in node.blocks())
            if node.hasAttribute("Subgraph"):
                stack.append(node.g("Subgraph").nodes())


def check_torchscript_ops(module: Any, where: str | Path) -> None:
    """Refuse a loaded ``ScriptModule`` whose code uses an operator outside the allow-list.

    Walks every method (and forward hook) of the module and of all its submodules, each as its
    *inlined* graph (calls into other methods and functions are inlined), into every nested
    ``prim::If`` / ``prim::Loop`` block. Allowed: namespaces ``aten``, ``prim`` (control flow,
    lists, tuples, constants, attributes) and ``quantized`` (int8 kernels), minus
    :data:`TORCHSCRIPT_DENIED_OPS` and names that mention files/printing/sharing/RPC.
    Raises :class:`SuspectOperatorError` naming the file, the method and the operator.
    """
    for module_name, submodule in module.named_modules():
        script = getattr(submodule, "_c", None)
        if script is None:
            continue
        functions = [(name, script._get_method(name)) for name in script._method_names()]
        functions += [(f"hook {getattr(fn, 'name', '?')}", fn)
                      for fn in list(script._get_forward_hooks()) + list(script._get_forward_pre_hooks())]
        for method_name, function in functions:
            graph = getattr(function, "inlined_graph", None) or function.graph
            for kind, line in _graph_refusals(graph):
                qualname = f"{module_name}.{method_name}" if module_name else method_name
                raise SuspectOperatorError(f"{where}: refused: method {qualname} uses operator {kind} "
                                           f"({_op_refusal(kind)}){': ' + line if line else ''}; a suspect may "
                                           "only compute on tensors")


class TorchScriptSuspect:
    """A ``torch.jit.save`` archive: ``forward(images B×C×H×W in [0, 1]) -> logits``.

    Segmentation logits B×1×H×W -> sigmoid; classification B×K -> softmax. The loaded
    ``ScriptModule`` is ``module``; ``model`` is ``None``: medmark's weight attacks work on
    ``nn.Module`` layers (pruning) and call ``forward(images, boxes)`` (fine-tuning), neither of
    which a compiled graph offers -- attack the checkpoint instead.
    """

    kind = "torchscript"
    model = None
    num_classes: int | None = None  # classification: the K every answer must have (set by open_suspect)

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", task: str | None = None):
        _check_task(task, str(path))
        self.path = Path(path)
        if not self.path.is_file():
            raise SuspectError(f"{self.path}: suspect TorchScript file not found")
        if not zipfile.is_zipfile(self.path):
            raise SuspectError(f"{self.path}: not a TorchScript archive (torch.jit.save writes a zip archive)")
        with zipfile.ZipFile(self.path) as archive:
            names = archive.namelist()
        if not any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            hint = " -- it looks like a torch.save file; name a Lightning checkpoint .ckpt" if any(
                n.endswith("data.pkl") for n in names) else ""
            raise SuspectError(f"{self.path}: not a TorchScript archive (no code/ or constants.pkl; export one with "
                               f"python -m verification.export <ckpt> --format torchscript){hint}")
        self.device = torch.device(device)
        check_torchscript_source(self.path)  # torch.jit.load runs __setstate__ code: check the text first
        extra = {METADATA_NAME: ""}
        try:
            with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export (still supported)
                warnings.simplefilter("ignore", FutureWarning)
                self.module = torch.jit.load(str(self.path), map_location=self.device, _extra_files=extra)
        except Exception as err:  # torch raises RuntimeError / ValueError / pickle errors here
            raise SuspectError(f"{self.path}: not a loadable TorchScript archive ({type(err).__name__}: "
                               f"{_first_line(err, 200)})") from None
        try:
            self.metadata = json.loads(extra[METADATA_NAME]) if extra[METADATA_NAME] else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SuspectError(f"{self.path}: extra file {METADATA_NAME} is not valid JSON") from None
        check_torchscript_ops(self.module, self.path)  # before any forward runs
        self.task = _metadata_task(self.metadata, task, str(self.path))
        self.module.eval()
        self.queries = 0
        self._sha256: str | None = None

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        images = _check_images(images)
        try:
            logits = self.module(images.to(self.device))
        except Exception as err:
            raise SuspectError(f"{self.path}: forward failed on images of shape {tuple(images.shape)} "
                               f"({type(err).__name__}: {_first_line(err)})") from None
        if not isinstance(logits, Tensor):
            raise SuspectError(f"{self.path}: forward returned {type(logits).__name__}, expected a logits tensor")
        probs = logits_to_probs(logits, self.task, len(images), str(self.path), self.num_classes)
        self.queries += len(images)
        return probs

    def identity(self) -> dict[str, Any]:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return {"kind": self.kind, "path": str(self.path), "sha256": self._sha256, "task": self.task,
                **_exported_from(self.metadata)}


# ----------------------------------------------------------------------------- ONNX


def _onnx_tensors(graph: Any):
    """Every TensorProto of an ONNX graph: initializers, sparse ones, node attributes, subgraphs."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in g.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("sparse_tensor"):
                    yield attribute.sparse_tensor.values
                    yield attribute.sparse_tensor.indices
                if attribute.HasField("g"):
                    stack.append(attribute.g)
                stack.extend(attribute.graphs)


def check_onnx_external_data(model_bytes: bytes, where: str | Path) -> None:
    """Refuse an ONNX model any of whose tensors lives in an external file.

    External data names a file path that onnxruntime would open and read into the weights
    (``../../owner/secret.json`` works as well as ``weights.bin``): a suspect file must not make
    the verifier read other files. Raises :class:`SuspectError` naming the file and the tensor.
    """
    try:
        import onnx
    except ImportError:
        raise SuspectError(f"{where}: ONNX suspects need the onnx package to be checked (pip install onnx)") from None
    try:
        model = onnx.load_model_from_string(model_bytes)
    except Exception as err:  # protobuf DecodeError and friends
        raise SuspectError(f"{where}: not a loadable ONNX model ({type(err).__name__}: {_first_line(err, 200)})") \
            from None
    graphs = [model.graph] + [g for f in model.functions for n in f.node for a in n.attribute
                              for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)]
    for graph in graphs:
        for tensor in _onnx_tensors(graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
                location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
                raise SuspectError(f"{where}: tensor {tensor.name!r} keeps its data in an external file "
                                   f"({location[:200]!r}); a suspect must be one self-contained .onnx file "
                                   "(onnx.save(model, path, save_as_external_data=False))")


class OnnxSuspect:
    """An ONNX graph run by onnxruntime: one input (name discovered), images [0, 1] -> logits.

    A dynamic batch axis takes each batch whole; a fixed batch size ``n`` gets the images in
    chunks of ``n`` (the last one zero-padded; padded rows are dropped and not counted). A fixed
    spatial size that differs from the images' is a :class:`SuspectError` naming both.
    ``model`` is ``None``: an ONNX suspect offers no weights to attack.
    """

    kind = "onnx"
    model = None
    num_classes: int | None = None

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", task: str | None = None):
        _check_task(task, str(path))
        self.path = Path(path)
        if not self.path.is_file():
            raise SuspectError(f"{self.path}: suspect ONNX file not found")
        try:
            import onnxruntime as ort
        except ImportError:
            raise SuspectError(f"{self.path}: ONNX suspects need onnxruntime (pip install onnxruntime)") from None
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in available:
            index = torch.device(device).index or 0
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        model_bytes = self.path.read_bytes()
        check_onnx_external_data(model_bytes, self.path)
        try:  # from bytes: onnxruntime gets no directory to resolve external-data file names against
            self.session = ort.InferenceSession(model_bytes, sess_options=options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types
            raise SuspectError(f"{self.path}: not a loadable ONNX model ({type(err).__name__}: "
                               f"{_first_line(err, 200)})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise SuspectError(f"{self.path}: the graph has {len(inputs)} inputs ({[i.name for i in inputs]}); the "
                               "suspect contract is one input, images B×C×H×W in [0, 1]")
        self.input_name = inputs[0].name
        self.input_shape = list(inputs[0].shape)
        if len(self.input_shape) != 4:
            raise SuspectError(f"{self.path}: input {self.input_name!r} has shape {self.input_shape}; expected "
                               "B×C×H×W images")
        self.fixed_batch = self.input_shape[0] if isinstance(self.input_shape[0], int) and self.input_shape[0] > 0 \
            else None
        self.providers = self.session.get_providers()
        meta = self.session.get_modelmeta().custom_metadata_map or {}
        try:
            self.metadata = json.loads(meta[METADATA_NAME]) if METADATA_NAME in meta else {}
        except json.JSONDecodeError:
            raise SuspectError(f"{self.path}: metadata {METADATA_NAME} is not valid JSON") from None
        self.task = _metadata_task(self.metadata, task, str(self.path))
        self.queries = 0
        self._sha256: str | None = None

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        try:
            return self.session.run(None, {self.input_name: chunk})[0]
        except Exception as err:
            raise SuspectError(f"{self.path}: onnxruntime failed on input {self.input_name!r} of shape "
                               f"{list(chunk.shape)} (graph input {self.input_shape}; {type(err).__name__}: "
                               f"{_first_line(err)})") from None

    def predict(self, images: Tensor) -> Tensor:
        images = _check_images(images)
        for axis, (want, got) in enumerate(zip(self.input_shape[1:], images.shape[1:]), start=1):
            if isinstance(want, int) and want > 0 and want != got:
                raise SuspectError(f"{self.path}: input {self.input_name!r} has fixed shape {self.input_shape}; the "
                                   f"images are {list(images.shape)} (axis {axis}: {got} != {want}; set "
                                   "data.image_size/channels to the model's)")
        array = images.numpy()
        n = len(array)
        if self.fixed_batch is None:
            outputs = [self._run(array)]
        else:
            outputs = []
            for start in range(0, n, self.fixed_batch):
                chunk = array[start:start + self.fixed_batch]
                real = len(chunk)
                if real < self.fixed_batch:
                    pad = np.zeros((self.fixed_batch - real, *chunk.shape[1:]), dtype=chunk.dtype)
                    chunk = np.concatenate([chunk, pad])
                outputs.append(self._run(np.ascontiguousarray(chunk))[:real])
        logits = torch.from_numpy(np.concatenate(outputs).astype(np.float32, copy=False))
        probs = logits_to_probs(logits, self.task, n, str(self.path), self.num_classes)
        self.queries += n
        return probs

    def identity(self) -> dict[str, Any]:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return {"kind": self.kind, "path": str(self.path), "sha256": self._sha256, "task": self.task,
                "input": {"name": self.input_name, "shape": [d if isinstance(d, int) else str(d)
                                                             for d in self.input_shape]},
                "providers": list(self.providers),
                **_exported_from(self.metadata)}


# ----------------------------------------------------------------------------- HTTP


@dataclass
class HttpOptions:
    """Client settings of :class:`HttpSuspect` (``verify.py http.*``).

    Attributes:
        timeout_s: seconds per request (connect + answer).
        retries: extra attempts after a timeout, a connection error, HTTP 5xx or 429.
        backoff_s: wait before retry i is ``backoff_s * 2**i`` (or the server's ``Retry-After``, capped at 60 s).
        max_queries: the query budget (images sent, retries included); ``None`` = unlimited. A
            batch that would exceed it is not sent: :class:`SuspectError`.
        json: ask for JSON answers (``Accept: application/json``) instead of .npy.
        max_batch: images per request (``None`` = the caller's batches as they come); a 413
            answer with ``max_batch`` in its JSON body lowers it automatically.
        token_env: name of an environment variable holding a bearer token (sent as
            ``Authorization: Bearer ...``; never written to reports or logs).
        allow_insecure_token: send that token over plain ``http://`` too (default: refused,
            only ``https://`` carries it; a loopback test server needs this set).

    ``timeout_s`` is the *total* time of one request (connect, send, headers and the whole
    body) on a monotonic clock, not a per-read socket timeout: a server that drips one byte at
    a time is cut off when it passes.
    """

    timeout_s: float = 30.0
    retries: int = 2
    backoff_s: float = 0.5
    max_queries: int | None = None
    json: bool = False
    max_batch: int | None = None
    token_env: str | None = None
    allow_insecure_token: bool = False

    @classmethod
    def from_config(cls, cfg: Any | None) -> HttpOptions:
        """From a mapping / DictConfig (unknown keys are an error naming ``http.<key>``)."""
        if cfg is None:
            return cls()
        data = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise SuspectError(f"http.{unknown[0]}: unknown option (known: {', '.join(sorted(known))})")
        options = cls(**{k: v for k, v in data.items() if v is not None or k in ("max_queries", "max_batch",
                                                                                  "token_env")})
        if not options.timeout_s or float(options.timeout_s) <= 0:
            raise SuspectError(f"http.timeout_s must be > 0, got {options.timeout_s}")
        if int(options.retries) < 0:
            raise SuspectError(f"http.retries must be >= 0, got {options.retries}")
        if options.max_queries is not None and int(options.max_queries) < 1:
            raise SuspectError(f"http.max_queries must be >= 1 or null, got {options.max_queries}")
        if options.max_batch is not None and int(options.max_batch) < 1:
            raise SuspectError(f"http.max_batch must be >= 1 or null, got {options.max_batch}")
        return options


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """A .npy body (no pickles); ValueError for anything else.

    The header's shape × itemsize must fit the bytes received: a 100-byte body declaring a
    terabyte array is refused before numpy allocates it.
    """
    if not data.startswith(b"\x93NUMPY"):
        raise ValueError("not .npy bytes (no \\x93NUMPY magic)")
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f".npy format version {version} is not supported")
    if dtype.hasobject:
        raise ValueError("object arrays (pickles) are not accepted")
    declared = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if all(d >= 0 for d in shape) else -1
    if declared < 0 or declared > len(data) - stream.tell():
        raise ValueError(f"header declares shape {tuple(shape)} of {dtype} ({declared} bytes) but the body has "
                         f"{len(data) - stream.tell()} bytes after the header")
    return np.load(io.BytesIO(data), allow_pickle=False)


class InsecureTokenError(SuspectError):
    """A bearer token would travel over plain ``http://`` (``http.allow_insecure_token`` is false)."""


class RedirectRefusedError(SuspectError):
    """The endpoint answered a 3xx redirect; redirects are not followed (see :class:`HttpSuspect`)."""


class ResponseTooLargeError(SuspectError):
    """The answer is larger than the request can justify (:meth:`HttpSuspect.answer_size_limit`)."""


class _DeadlinePassed(Exception):
    """Internal: a request ran past its total deadline."""


# Response size: the request fixes how many values an answer may hold (B×K or B×1×H×W); each
# value may take 8 bytes (.npy float64) and JSON text is longer than binary (a double prints as
# up to ~25 characters plus separators and indentation): factor 6 on 8 bytes = 48 bytes a value.
# The headroom covers the .npy header or JSON wrapper.
_BYTES_PER_VALUE = 8
_JSON_OVERHEAD = 6
_RESPONSE_HEADROOM = 64 << 10
_UNKNOWN_CLASSES = 1000      # classification without a known K: at most max(1000, H×W) classes
_ERROR_BODY_BYTES = 4 << 10  # of a 4xx/5xx answer, only this much is read (for the message)
_HEALTH_BYTES = 64 << 10
_READ_CHUNK = 64 << 10


class _Deadline:
    """One request's total deadline: at ``time.monotonic() >= end`` a timer shuts its sockets down.

    Socket timeouts restart on every byte; shutting the socket down is what interrupts a read
    blocked inside ``http.client`` (status line, headers or body) when the total time is up.
    """

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.end = time.monotonic() + self.seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(self.seconds, self.expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shutdown(sock)
        return sock

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def check(self) -> None:
        if self.expired or self.remaining() <= 0:
            self.expire()
            raise _DeadlinePassed

    def cancel(self) -> None:
        self._timer.cancel()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _watched_connection(base: type, deadline: _Deadline) -> type:
    """``base`` (HTTPConnection / HTTPSConnection) whose sockets ``deadline`` can shut down."""

    class Watched(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            create = self._create_connection
            self._create_connection = lambda *a, **k: deadline.watch(create(*a, **k))

    return Watched


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._deadline = deadline

    def http_open(self, req):  # noqa: ANN001 - urllib signature
        return self.do_open(_watched_connection(http.client.HTTPConnection, self._deadline), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._deadline = deadline

    def https_open(self, req):  # noqa: ANN001 - urllib signature
        kwargs: dict[str, Any] = {"context": self._context}
        if hasattr(self, "_check_hostname"):  # Python < 3.12
            kwargs["check_hostname"] = self._check_hostname
        return self.do_open(_watched_connection(http.client.HTTPSConnection, self._deadline), req, **kwargs)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx is refused, never followed: a redirect would carry the bearer token (and the images)
    to whatever origin the endpoint names."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib signature
        if fp is not None:
            fp.close()
        raise RedirectRefusedError(f"{req.full_url}: answered HTTP {code} redirecting to {newurl[:200]!r}; "
                                   "redirects are not followed (the token and images would go to another "
                                   "origin) -- give the final URL as suspect=")


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_DeadlineHTTPHandler(deadline), _DeadlineHTTPSHandler(deadline),
                                       _RefuseRedirects())


def _read_capped(response: Any, limit: int, deadline: _Deadline, where: str, what: str = "answer") -> bytes:
    """The body in chunks: Content-Length checked up front, bytes counted, deadline checked per chunk."""
    length = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise SuspectError(f"{where}: answered a malformed Content-Length {length[:50]!r}") from None
        if declared > limit:
            raise ResponseTooLargeError(f"{where}: {what} of {declared} bytes (Content-Length) exceeds the "
                                        f"{limit} bytes this request can need; not read")
    read = getattr(response, "read1", None) or response.read
    buffer = bytearray()
    while True:
        deadline.check()
        chunk = read(_READ_CHUNK)
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > limit:
            raise ResponseTooLargeError(f"{where}: {what} exceeds the {limit} bytes this request can need; "
                                        f"stopped reading after {len(buffer)} bytes")
    deadline.check()  # an EOF caused by the deadline's shutdown is a timeout, not an answer
    return bytes(buffer)


class HttpSuspect:
    """A model behind an HTTP endpoint (see the module docstring for the wire format).

    ``queries`` counts images answered; ``images_sent`` also counts images of failed attempts
    (what the endpoint's owner would see); ``requests`` counts HTTP requests. ``model`` is
    ``None``: an HTTP suspect offers no weights to attack.

    Hostile endpoints: each request has a *total* deadline (``http.timeout_s``, monotonic
    clock, enforced by shutting the socket down); an answer may be at most
    :meth:`answer_size_limit` bytes (Content-Length checked before reading, bytes counted while
    reading); 3xx redirects are refused, not followed (:class:`RedirectRefusedError`); a bearer
    token is sent only over ``https://`` unless ``http.allow_insecure_token``
    (:class:`InsecureTokenError`); NaN/inf answers raise :class:`NonFiniteOutputError`.
    """

    kind = "http"
    model = None
    num_classes: int | None = None

    def __init__(self, url: str, task: str = "segmentation", options: HttpOptions | None = None):
        _check_task(task, url)
        if task is None:
            raise SuspectError(f"{url}: an HTTP suspect needs the task (segmentation or classification)")
        self.url = url
        self.task = task
        self.options = options or HttpOptions()
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if self.options.token_env and scheme != "https" and not self.options.allow_insecure_token:
            raise InsecureTokenError(f"{url}: http.token_env={self.options.token_env} would send the bearer token "
                                     f"over plain {scheme}:// (readable on the way); use https://, or set "
                                     "http.allow_insecure_token=true for a trusted network (e.g. loopback)")
        self.queries = 0
        self.images_sent = 0
        self.requests = 0
        self.retried = 0
        self.seconds = 0.0
        self.max_batch = int(self.options.max_batch) if self.options.max_batch else None
        self.last_content_type: str | None = None
        self._health: dict | None = None

    # -- wire
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/octet-stream",
                   "Accept": "application/json" if self.options.json else "application/x-npy, application/json;q=0.5",
                   "User-Agent": "medmark-verify"}
        if self.options.token_env:
            token = os.environ.get(self.options.token_env)
            if not token:
                raise SuspectError(f"http.token_env={self.options.token_env}: environment variable is not set")
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def answer_size_limit(self, shape: tuple[int, ...]) -> int:
        """Most bytes an answer to images of ``shape`` (B×C×H×W) may have.

        Values an answer may hold (segmentation B×H×W, classification B×K with K the
        verification's classes, else at most max(1000, H×W)) × 8 bytes × 6 (JSON text) + 64 KiB.
        """
        batch, _, height, width = (int(d) for d in shape)
        per_image = height * width if self.task == "segmentation" else \
            int(self.num_classes or max(_UNKNOWN_CLASSES, height * width))
        return batch * per_image * _BYTES_PER_VALUE * _JSON_OVERHEAD + _RESPONSE_HEADROOM

    def _timed_out(self) -> str:
        return f"timed out after {float(self.options.timeout_s):g} s (http.timeout_s, total per request)"

    def _post(self, body: bytes, n: int, limit: int) -> tuple[bytes, str]:
        """POST with retries; returns ``(body, content type)``; raises SuspectError naming the URL."""
        attempts = int(self.options.retries) + 1
        timeout = float(self.options.timeout_s)
        last = ""
        for attempt in range(attempts):
            budget = self.options.max_queries
            if budget is not None and self.images_sent + n > int(budget):
                raise SuspectError(f"{self.url}: query budget exceeded: sending {n} more images would make "
                                   f"{self.images_sent + n} > http.max_queries={budget} "
                                   f"({self.queries} answered so far)")
            request = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
            self.requests += 1
            self.images_sent += n
            retry_after = None
            started = time.perf_counter()
            deadline = _Deadline(timeout)
            try:
                with _opener(deadline).open(request, timeout=timeout) as response:
                    data = _read_capped(response, limit, deadline, self.url)
                    content_type = response.headers.get("Content-Type", "") or ""
                return data, content_type
            except SuspectError:  # too large, redirect: the endpoint's answer is refused, not retried
                raise
            except urllib.error.HTTPError as err:
                try:
                    text = _excerpt(err.read(_ERROR_BODY_BYTES) if err.fp else b"")
                except Exception:  # noqa: BLE001 - the error body is only for the message
                    text = ""
                if deadline.expired:
                    last = self._timed_out()
                else:
                    if err.code == 413:
                        raise _TooLarge(text) from None
                    last = f"HTTP {err.code} {err.reason}" + (f": {text}" if text else "")
                    if not (err.code >= 500 or err.code == 429):
                        raise SuspectError(f"{self.url}: {last}") from None
                    retry_after = _retry_after(err.headers.get("Retry-After") if err.headers else None)
            except (_DeadlinePassed, TimeoutError, socket.timeout):
                last = self._timed_out()
            except urllib.error.URLError as err:
                reason = err.reason
                if deadline.expired or isinstance(reason, (TimeoutError, socket.timeout)):
                    last = self._timed_out()
                else:
                    last = f"cannot connect ({reason})"
            except (ConnectionError, OSError, ValueError, http.client.HTTPException) as err:
                # resets, incomplete reads, bad URL -- or the deadline's shutdown in the middle of a read
                last = self._timed_out() if deadline.expired else f"{type(err).__name__}: {str(err)[:200]}"
            finally:
                deadline.cancel()
                self.seconds += time.perf_counter() - started
            if attempt + 1 < attempts:
                self.retried += 1
                time.sleep(retry_after if retry_after is not None else float(self.options.backoff_s) * 2 ** attempt)
        raise SuspectError(f"{self.url}: {last} ({attempts} attempt{'s' if attempts > 1 else ''}, "
                           f"http.retries={self.options.retries})")

    def _decode(self, data: bytes, content_type: str, n: int) -> Tensor:
        where = self.url
        if data.startswith(b"\x93NUMPY"):
            try:
                array = decode_npy(data)
            except Exception as err:
                raise SuspectError(f"{where}: answered a corrupt .npy body ({type(err).__name__}: {err})") from None
        else:
            try:
                doc = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                raise SuspectError(f"{where}: answered neither .npy nor JSON (Content-Type {content_type!r}, "
                                   f"{len(data)} bytes: {_excerpt(data)!r})") from None
            if isinstance(doc, dict):
                if "probabilities" not in doc:
                    raise SuspectError(f"{where}: JSON answer has no field 'probabilities' (fields: "
                                       f"{sorted(doc)[:10]})")
                doc = doc["probabilities"]
            try:
                array = np.asarray(doc, dtype=np.float64)
            except (TypeError, ValueError):
                raise SuspectError(f"{where}: JSON field 'probabilities' is not a rectangular array of numbers") \
                    from None
        if array.dtype.kind not in "fiu":
            raise SuspectError(f"{where}: answered an array of dtype {array.dtype}, expected numbers")
        probs = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        return check_probabilities(probs, self.task, n, where, self.num_classes)

    def _predict_batch(self, images: np.ndarray) -> Tensor:
        n = len(images)
        try:
            data, content_type = self._post(encode_npy(images), n, self.answer_size_limit(images.shape))
        except _TooLarge as err:
            limit = _max_batch_hint(str(err))
            if limit is None or limit >= n or limit < 1:
                raise SuspectError(f"{self.url}: HTTP 413 for a batch of {n} images ({err}); set http.max_batch")\
                    from None
            self.max_batch = limit
            return torch.cat([self._predict_batch(images[i:i + limit]) for i in range(0, n, limit)])
        probs = self._decode(data, content_type, n)
        self.last_content_type = content_type
        self.queries += n
        return probs

    def predict(self, images: Tensor) -> Tensor:
        array = _check_images(images).numpy()
        outs, start = [], 0
        while start < len(array):
            step = self.max_batch or len(array)
            outs.append(self._predict_batch(array[start:start + step]))
            start += step
        return torch.cat(outs)

    def health(self) -> dict | None:
        """``GET <base>/health`` of a medmark reference server (``None`` when there is none)."""
        if self._health is None:
            base = self.url.rsplit("/", 1)[0] if self.url.rstrip("/").endswith("/predict") else self.url.rstrip("/")
            timeout = min(float(self.options.timeout_s), 5.0)
            deadline = _Deadline(timeout)
            try:  # same limits as a prediction: total deadline, size cap, no redirects, no token
                with _opener(deadline).open(base + "/health", timeout=timeout) as response:
                    doc = json.loads(_read_capped(response, _HEALTH_BYTES, deadline, base + "/health",
                                                  "/health answer").decode("utf-8"))
                self._health = doc if isinstance(doc, dict) else {}
            except Exception:  # noqa: BLE001 - not every endpoint has /health: identity lacks the model hash
                self._health = {}
            finally:
                deadline.cancel()
        return self._health or None

    def identity(self) -> dict[str, Any]:
        health = self.health() or {}
        return {"kind": self.kind, "url": self.url, "sha256": health.get("sha256"),
                "sha256_source": "the endpoint's /health (self-reported)" if health.get("sha256") else None,
                "task": self.task, "requests": self.requests, "images_sent": self.images_sent,
                "retries": self.retried, "http_seconds": round(self.seconds, 3)}


class _TooLarge(Exception):
    """HTTP 413 (internal: the batch is split)."""


def _excerpt(data: bytes, limit: int = 200) -> str:
    text = data[:limit].decode("utf-8", errors="replace").strip().replace("\n", " ")
    return text + ("…" if len(data) > limit else "")


def _retry_after(value: str | None) -> float | None:
    try:
        return min(max(float(value), 0.0), 60.0) if value is not None else None
    except ValueError:
        return None


def _max_batch_hint(text: str) -> int | None:
    try:
        doc = json.loads(text.rstrip("…"))
        return int(doc["max_batch"]) if isinstance(doc, dict) and "max_batch" in doc else None
    except (ValueError, TypeError, KeyError):
        return None


# ----------------------------------------------------------------------------- factory


def is_url(spec: str) -> bool:
    return str(spec).lower().startswith(("http://", "https://"))


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
