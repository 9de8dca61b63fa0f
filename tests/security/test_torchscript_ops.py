"""A TorchScript suspect may compute on tensors and nothing else (verification/adapters.py).

Hostile archives are scripted at run time into ``tmp_path``: a forward that maps a verifier
file with ``torch.from_file(..., shared=True)`` and overwrites it, a forward that writes with
``torch.save``, a ``__setstate__`` (run by ``torch.jit.load`` itself) that writes, a forward
that prints. Each must be refused with :class:`SuspectOperatorError` (a ``SuspectError``:
``verify.py`` exits 2) naming the file and the operator, *before* any of its code runs: the
victim file keeps its bytes and mtime and no sentinel file appears. A normal convolutional
export still loads and predicts.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Tuple

import pytest
import torch
from torch import Tensor, nn

from verification.adapters import (
    SuspectError,
    SuspectOperatorError,
    TorchScriptSuspect,
    check_torchscript_ops,
    open_suspect,
)

VICTIM_BYTES = b"owner secret: do not touch\n"


def _script_and_save(module: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), str(path), _extra_files={"medmark.json": '{"task": "segmentation"}'})
    return path


class MapsAFile(nn.Module):
    """forward maps ``path`` shared and overwrites it (the reported attack)."""

    def __init__(self, path: str, size: int):
        super().__init__()
        self.path, self.size = path, size

    def forward(self, images: Tensor) -> Tensor:
        mapped = torch.from_file(self.path, shared=True, size=self.size, dtype=torch.uint8)
        mapped.fill_(65)
        return images[:, :1] * 0 + mapped.float().sum() * 0


class SavesAFile(nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, images: Tensor) -> Tensor:
        torch.save(images, self.path)
        return images[:, :1]


class SavesOnLoad(nn.Module):
    """``__setstate__`` runs inside ``torch.jit.load``: before any graph could be inspected."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.scale = torch.ones(1)

    @torch.jit.export
    def __getstate__(self) -> Tuple[Tensor, str, bool]:
        return self.scale, self.path, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[Tensor, str, bool]) -> None:
        self.scale, self.path, self.training = state[0], state[1], state[2]
        torch.save(self.scale, self.path)

    def forward(self, images: Tensor) -> Tensor:
        return images[:, :1] * self.scale


class Prints(nn.Module):
    def forward(self, images: Tensor) -> Tensor:
        print("leak", images.sum())
        return images[:, :1]


class Helper(nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, x: Tensor) -> Tensor:
        return x

    @torch.jit.export
    def stash(self, x: Tensor) -> Tensor:
        torch.save(x, self.path)
        return x


class CallsAHelperInABranch(nn.Module):
    """The write sits in another submodule's exported method, called inside ``if``/``for``."""

    def __init__(self, path: str):
        super().__init__()
        self.helper = Helper(path)

    def forward(self, images: Tensor) -> Tensor:
        if images.sum() > -1:
            for _ in range(1):
                images = self.helper.stash(images)
        return images[:, :1]


class TinyUNet(nn.Module):
    """Conv encoder/decoder with a skip: images B×3×H×W in [0, 1] -> logits B×1×H×W."""

    def __init__(self):
        super().__init__()
        self.mean = nn.Parameter(torch.full((1, 3, 1, 1), 0.5), requires_grad=False)
        self.down = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.head = nn.Conv2d(8 + 3, 1, 1)

    def forward(self, images: Tensor) -> Tensor:
        x = images - self.mean
        y = self.up(torch.relu(self.mid(self.down(x))))
        return self.head(torch.cat([y, x], dim=1))


@pytest.fixture()
def victim(tmp_path):
    path = tmp_path / "owner_secret.json"
    path.write_bytes(VICTIM_BYTES)
    old = os.stat(path).st_mtime_ns - 10_000_000_000  # 10 s in the past: any write would move it
    os.utime(path, ns=(old, old))
    return path


def _assert_untouched(path: Path, mtime_ns: int) -> None:
    assert path.read_bytes() == VICTIM_BYTES
    assert os.stat(path).st_mtime_ns == mtime_ns


def test_from_file_shared_is_refused_before_forward_and_the_file_is_untouched(victim, tmp_path):
    mtime = os.stat(victim).st_mtime_ns
    archive = _script_and_save(MapsAFile(str(victim), len(VICTIM_BYTES)), tmp_path / "evil.pt")
    with pytest.raises(SuspectOperatorError) as info:
        open_suspect(archive, task="segmentation")
    message = str(info.value)
    assert "from_file" in message and str(archive) in message
    assert isinstance(info.value, SuspectError)  # verify.py: exit 2
    _assert_untouched(victim, mtime)


@pytest.mark.parametrize("make", [SavesAFile, SavesOnLoad, CallsAHelperInABranch], ids=lambda m: m.__name__)
def test_writes_are_refused_and_nothing_is_written(make, tmp_path):
    sentinel = tmp_path / "written_by_suspect.pt"
    archive = _script_and_save(make(str(sentinel)), tmp_path / "evil.pt")
    assert not sentinel.exists()
    with pytest.raises(SuspectOperatorError, match=r"save") as info:
        TorchScriptSuspect(archive, task="segmentation")
    assert str(archive) in str(info.value)
    assert not sentinel.exists()


def test_print_is_refused(tmp_path):
    archive = _script_and_save(Prints(), tmp_path / "prints.pt")
    with pytest.raises(SuspectOperatorError, match=r"print"):
        TorchScriptSuspect(archive, task="segmentation")


@pytest.mark.parametrize("make", [MapsAFile, SavesAFile, CallsAHelperInABranch, Prints],
                         ids=lambda m: m.__name__)
def test_graph_walker_alone_names_the_operator(make, victim):
    """The post-load check on its own (second line of defence): every method, submodule and block."""
    module = make(str(victim), len(VICTIM_BYTES)) if make is MapsAFile else make() if make is Prints \
        else make(str(victim))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(module)
    expected = {MapsAFile: "aten::from_file", SavesAFile: "aten::save", CallsAHelperInABranch: "aten::save",
                Prints: "prim::Print"}[make]
    with pytest.raises(SuspectOperatorError) as info:
        check_torchscript_ops(scripted, "suspect.pt")
    assert expected in str(info.value) and "suspect.pt" in str(info.value)


def test_a_normal_convolutional_export_is_accepted_and_predicts(tmp_path):
    torch.manual_seed(0)
    model = TinyUNet().eval()
    archive = _script_and_save(model, tmp_path / "unet.pt")
    suspect = open_suspect(archive, task="segmentation")
    images = torch.rand(2, 3, 16, 16)
    probs = suspect.predict(images)
    assert probs.shape == (2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(probs, torch.sigmoid(model(images)), atol=1e-5)
    # traced graphs (verification.export's fallback) pass too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, images)
    torch.jit.save(traced, str(tmp_path / "traced.pt"), _extra_files={"medmark.json": '{"task": "segmentation"}'})
    assert open_suspect(tmp_path / "traced.pt", task="segmentation").predict(images).shape == (2, 1, 16, 16)


def test_dynamic_int8_quantized_export_is_accepted(tmp_path):
    """``quantized::`` kernels are tensor computation (an int8-attacked classifier, exported)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(quantized), str(tmp_path / "int8.pt"),
                       _extra_files={"medmark.json": '{"task": "classification"}'})
    probs = open_suspect(tmp_path / "int8.pt", task="classification").predict(torch.rand(3, 3, 8, 8))
    assert probs.shape == (3, 4) and torch.allclose(probs.sum(1), torch.ones(3), atol=1e-4)


class NaNLogits(nn.Module):
    def forward(self, images: Tensor) -> Tensor:
        return images[:, :1] * float("nan")


class InfLogits(nn.Module):
    def forward(self, images: Tensor) -> Tensor:
        return images[:, :1] * 0 + float("inf")  # sigmoid(inf) = 1 would hide it


@pytest.mark.parametrize("make", [NaNLogits, InfLogits], ids=lambda m: m.__name__)
def test_non_finite_logits_are_refused_naming_the_file(make, tmp_path):
    from verification.adapters import NonFiniteOutputError
    archive = _script_and_save(make(), tmp_path / "nonfinite.pt")
    suspect = open_suspect(archive, task="segmentation")
    with pytest.raises(NonFiniteOutputError, match="non-finite") as info:
        suspect.predict(torch.rand(2, 3, 8, 8))
    assert str(archive) in str(info.value)


def _onnx_add_model(weight_location: str | None):
    """images B×1×2×2 + W (1×1×2×2 float32) -> logits; W embedded, or in an external file."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    weight = numpy_helper.from_array(np.zeros((1, 1, 2, 2), np.float32), "W")
    if weight_location is not None:
        weight.ClearField("raw_data")
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", weight_location), ("offset", "0"), ("length", "16")):
            entry = weight.external_data.add()
            entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["images", "W"], ["logits"])], "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 1, 2, 2])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_onnx_external_data_pointing_at_a_verifier_file_is_refused(victim, tmp_path):
    """ONNX keeps its own foreign-file check: no tensor may live in an external file."""
    import onnx
    suspect_dir = tmp_path / "suspect"
    suspect_dir.mkdir()
    evil = suspect_dir / "evil.onnx"
    onnx.save(_onnx_add_model(f"../{victim.name}"), str(evil))
    with pytest.raises(SuspectError, match=r"external file") as info:
        open_suspect(evil, task="segmentation")
    assert str(evil) in str(info.value) and "'W'" in str(info.value)
    clean = suspect_dir / "clean.onnx"
    onnx.save(_onnx_add_model(None), str(clean))
    probs = open_suspect(clean, task="segmentation").predict(torch.zeros(1, 1, 2, 2))
    assert torch.allclose(probs, torch.full((1, 1, 2, 2), 0.5))
