"""TorchScript suspects: an operator allow-list checked before loading and before the first forward."""

from __future__ import annotations

import json
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from verification.adapters.base import (
    METADATA_NAME,
    SuspectOperatorError,
    _check_task,
    _check_images,
    logits_to_probs,
    _metadata_task,
    _first_line,
    _exported_from,
)
from verification.suspect import SuspectError, file_sha256


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
