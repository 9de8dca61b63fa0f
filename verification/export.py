"""Export a medmark checkpoint as a TorchScript or ONNX suspect file (the adapters' contract).

    python -m verification.export <run>/checkpoints/best.ckpt --format torchscript --out model.pt
    python -m verification.export <run>/checkpoints/best.ckpt --format onnx --out model.onnx --image-size 256

The exported graph takes **images B×C×H×W float32 in [0, 1]** (the model's own intensity
normalisation is inside it, as in the checkpoint) and returns **logits**: segmentation
B×1×H×W, classification B×K -- what :class:`verification.adapters.TorchScriptSuspect`
and :class:`~verification.adapters.OnnxSuspect` expect. The batch axis is dynamic. A
``medmark.json`` record (task, channels, image size, the source checkpoint's sha256) is stored
with the graph (TorchScript extra file / ONNX metadata); it holds nothing secret.

After writing, the export is checked against the checkpoint on random images at two batch
sizes (max |Δ logits| printed; above ``--atol`` it is an error): tracing can bake a batch size
or a data-dependent branch into a graph, and a silently wrong export is worse than none.

Exit codes: 0 written and checked, 2 bad input or a failed check (the message names the file).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from verification.suspect import SuspectError, build_suspect_model, file_sha256

FORMATS = ("torchscript", "onnx")


class ExportWrapper(nn.Module):
    """``forward(images B×C×H×W in [0, 1]) -> logits`` around a checkpoint's network.

    Segmentation networks take ``(images, boxes)``; the wrapper passes ``boxes=None`` (the
    black-box setting: no prompts), so every exported model has a single input.
    """

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self.model = model
        self.segmentation = task == "segmentation"

    def forward(self, images: Tensor) -> Tensor:
        if self.segmentation:
            return self.model(images, None)
        return self.model(images)


def input_geometry(hparams: dict[str, Any], image_size: int | None, channels: int | None) -> tuple[int, int]:
    """``(channels, image size)`` for the example input: the flags, else the checkpoint's config."""
    backbone = hparams.get("backbone") or {}
    data = hparams.get("data") or {}
    c = channels or backbone.get("in_channels") or backbone.get("in_chans") or data.get("channels") or 3
    size = image_size or backbone.get("image_size") or backbone.get("img_size") or data.get("image_size")
    if size is None:
        raise SuspectError("the checkpoint records no image size; pass --image-size N (the size it was trained at)")
    return int(c), int(size)


def _script_or_trace(wrapper: ExportWrapper, example: Tensor) -> tuple[torch.jit.ScriptModule, str]:
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export (still supported)
        warnings.simplefilter("ignore")
        try:
            return torch.jit.script(wrapper), "script"
        except Exception:  # most third-party networks are not scriptable; tracing is the usual route
            pass
        return torch.jit.trace(wrapper, example, check_trace=False), "trace"


def export(checkpoint: str | Path, fmt: str, out: str | Path, image_size: int | None = None,
           channels: int | None = None, factories: tuple[str, ...] = (), opset: int = 17,
           atol: float = 1e-3, seed: int = 0) -> dict[str, Any]:
    """Write ``out`` from ``checkpoint``; return the export record (also printed by the CLI).

    Raises:
        SuspectError: unreadable checkpoint, unknown format, or an export that does not
            reproduce the checkpoint's logits within ``atol`` (names the file).
    """
    if fmt not in FORMATS:
        raise SuspectError(f"--format must be one of {FORMATS}, got {fmt!r}")
    checkpoint, out = Path(checkpoint), Path(out)
    model, hparams = build_suspect_model(checkpoint, tuple(factories), task=None)
    task = str(hparams.get("task", "segmentation"))
    c, size = input_geometry(hparams, image_size, channels)
    wrapper = ExportWrapper(model.eval(), task).eval()
    generator = torch.Generator().manual_seed(seed)
    example = torch.rand(2, c, size, size, generator=generator)
    record = {"format": "medmark-export", "version": 1, "task": task, "channels": c, "image_size": size,
              "input": "images B×C×H×W float32 in [0, 1]", "output": "logits",
              "source": checkpoint.name, "source_sha256": file_sha256(checkpoint)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "torchscript":
            scripted, how = _script_or_trace(wrapper, example)
            record["how"] = how
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.save(scripted, str(out), _extra_files={"medmark.json": json.dumps(record)})
        else:
            record["how"] = f"torch.onnx.export (TorchScript-based, opset {opset})"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapper, (example,), str(out), input_names=["images"], output_names=["logits"],
                                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                                  opset_version=opset, dynamo=False)
            import onnx

            graph = onnx.load(str(out))
            entry = graph.metadata_props.add()
            entry.key, entry.value = "medmark.json", json.dumps(record)
            onnx.save(graph, str(out))
    record["max_abs_diff"] = check_export(wrapper, out, task, c, size, atol, seed)
    record["out"] = str(out)
    record["sha256"] = file_sha256(out)
    return record


def check_export(wrapper: ExportWrapper, out: Path, task: str, channels: int, size: int, atol: float,
                 seed: int) -> float:
    """Max |Δ logits| between the export and the checkpoint at batch sizes 1 and 3."""
    from verification.adapters import OnnxSuspect, TorchScriptSuspect

    suspect = OnnxSuspect(out, task=task) if out.suffix.lower() == ".onnx" else TorchScriptSuspect(out, task=task)
    generator = torch.Generator().manual_seed(seed + 1)
    worst = 0.0
    for batch in (1, 3):
        images = torch.rand(batch, channels, size, size, generator=generator)
        with torch.no_grad():
            logits = wrapper(images).float()
        expected = torch.sigmoid(logits) if task == "segmentation" else torch.softmax(logits, dim=1)
        got = suspect.predict(images)
        if got.shape != expected.shape:
            raise SuspectError(f"{out}: the export answers shape {tuple(got.shape)} for batch {batch}, the checkpoint "
                               f"{tuple(expected.shape)} (a batch size baked in by tracing?)")
        worst = max(worst, float((got - expected).abs().max()))
    if worst > atol:
        raise SuspectError(f"{out}: the export differs from the checkpoint by up to {worst:.3g} in probability "
                           f"(> --atol {atol:g}); the network has a branch tracing cannot capture")
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verification.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="medmark Lightning checkpoint (.ckpt)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output file (.pt/.ts/.torchscript or .onnx)")
    parser.add_argument("--image-size", type=int, default=None, help="example input size (default: the checkpoint's)")
    parser.add_argument("--channels", type=int, default=None, help="input channels (default: the checkpoint's)")
    parser.add_argument("--factories", nargs="+", default=[],
                        help="extra trusted factories for the checkpoint's backbone _target_ (exact names, or "
                             "'module.' for what that module defines); models.safe_reader's table always applies")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--atol", type=float, default=1e-3, help="max |Δ probability| accepted by the check")
    args = parser.parse_args(argv)
    suffixes = {"torchscript": (".pt", ".ts", ".torchscript"), "onnx": (".onnx",)}[args.format]
    if Path(args.out).suffix.lower() not in suffixes:
        print(f"error: --out {args.out}: a {args.format} file must end in {' / '.join(suffixes)} "
              "(open_suspect picks the adapter by extension)", file=sys.stderr)
        return 2
    try:
        record = export(args.checkpoint, args.format, args.out, args.image_size, args.channels,
                        tuple(args.factories), args.opset, args.atol)
    except (SuspectError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: record[k] for k in ("out", "sha256", "task", "channels", "image_size", "how",
                                             "max_abs_diff", "source_sha256")}, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
