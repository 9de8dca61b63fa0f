"""ONNX suspects: onnxruntime runs the graph from bytes; no external tensor data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from verification.adapters.base import (
    METADATA_NAME,
    _check_task,
    _check_images,
    logits_to_probs,
    _metadata_task,
    _first_line,
    _exported_from,
)
from verification.suspect import SuspectError, file_sha256


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
