"""MedLocker / MIAD-MARK transfer matrix: protection runs × suspect classifiers × removal attacks.

Each cell is ``verify.py mode=evaluate`` (the real protocol, in-process): the suspect's accuracy on
the run's original images, on the protected images, and after each removal attack of the run's
suite (median, JPEG, inpainting of the visible mark and, with ``--learned-steps > 0``, the thief's
learned remover). A suspect is labelled ``member`` when its checkpoint (by SHA-256) is the run's
surrogate or one of its ``method.ensemble_checkpoints`` — the models the protection was optimised
against — and ``unseen`` otherwise: only ``unseen`` cells say anything about transfer.

    python benchmarks/medlocker_transfer.py --run <run> [<run> ...] \\
        --suspect vgg16_bn=<ckpt> densenet121=<ckpt> --learned-steps 200 --out <dir>

Writes ``medlocker_transfer.json``, ``.md`` and a ``.png`` heat map (one panel per run) into
``--out`` and prints the JSON; exit 0, 1 when a cell failed, 2 for a bad argument (the run or
checkpoint named). Images: the run's own ``data.*`` settings, as ``verify.py`` reads them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from benchmarks._study import fmt, run_verify  # noqa: E402

GOAL_PROTECTED, GOAL_REMOVAL = 0.10, 0.40  # issue-level goals: white-box protected, after each removal


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", nargs="+", required=True, help="protection run folders (owner/secret.json)")
    parser.add_argument("--suspect", nargs="+", required=True, metavar="NAME=CHECKPOINT",
                        help="suspect classifiers to evaluate, each NAME=path (a .ckpt, TorchScript or ONNX file)")
    parser.add_argument("--learned-steps", type=int, default=200, help="thief's learned remover steps (0 = off)")
    parser.add_argument("--out", required=True, help="folder for the JSON, Markdown and PNG")
    parser.add_argument("--work", default=None,
                        help="folder for the per-cell verify.py outputs, reused by later runs (default: temporary)")
    return parser.parse_args(argv)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def optimised_against(run: Path) -> set[str]:
    """SHA-256 of the checkpoints the run's protection was optimised against (surrogate + ensemble),
    read from the run's ``config.yaml``; files no longer present are left out."""
    config_path = run / "config.yaml"
    method = (yaml.safe_load(config_path.read_text()) or {}).get("method", {}) if config_path.is_file() else {}
    paths = [method.get("surrogate_checkpoint"), *(method.get("ensemble_checkpoints") or [])]
    return {sha256(Path(p)) for p in paths if p and Path(p).is_file()}


def parse_suspects(items: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` items -> {name: path}; ``ValueError`` naming the item that is malformed or missing."""
    suspects: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--suspect {item!r}: expected NAME=CHECKPOINT")
        if name in suspects:
            raise ValueError(f"--suspect {item!r}: the name {name!r} is given twice")
        if not Path(path).is_file():
            raise ValueError(f"--suspect {item!r}: no such file {path}")
        suspects[name] = Path(path)
    return suspects


def run_cell(run: Path, name: str, checkpoint: Path, suspect_hash: str, members: set[str], learned_steps: int,
             work: Path) -> dict[str, Any]:
    """One run × suspect (``suspect_hash``: the checkpoint's SHA-256): the accuracies per view of
    ``verify.py mode=evaluate`` (never the secret)."""
    secret = run / "owner" / "secret.json"
    # the cell's folder is keyed by what its answer depends on: a finished cell is reused from --work
    key = hashlib.sha256(f"{sha256(secret)}:{suspect_hash}:{learned_steps}".encode()).hexdigest()[:12]
    folder = work / f"{run.name}__{name}__{key}"
    reused = (folder / "report.json").is_file()
    if reused:
        code, report, error = 0, json.loads((folder / "report.json").read_text()), None
    else:
        overrides = [f"secret={secret}", "mode=evaluate", f"suspect={checkpoint}",
                     f"removal.learned.steps={learned_steps}", "quiet=true"]
        code, report, error = run_verify(overrides, folder)
    cell = {"run": run.name, "suspect": name, "role": "member" if suspect_hash in members else "unseen",
            "exit_code": code, "error": error, "reused": reused,
            "accuracy": {k: round(float(v), 4) for k, v in ((report or {}).get("accuracy") or {}).items()},
            "num_images": (report or {}).get("num_images")}
    print(f"[medlocker_transfer] {run.name} × {name} ({cell['role']}): "
          + ", ".join(f"{k}={fmt(v)}" for k, v in cell["accuracy"].items()), file=sys.stderr, flush=True)
    return cell


def views(cells: list[dict]) -> list[str]:
    return list(dict.fromkeys(view for c in cells for view in c["accuracy"]))


def markdown(doc: dict) -> str:
    columns = views(doc["cells"])
    lines = ["# MedLocker / MIAD-MARK transfer matrix", "",
             "Accuracy of each suspect on the run's images (`verify.py mode=evaluate`); `member` = the protection "
             f"was optimised against it (white-box), `unseen` = transfer. Goals: protected ≤ {GOAL_PROTECTED} "
             f"white-box, ≤ {GOAL_REMOVAL} after each removal attack.", "",
             "| run | suspect | role | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for c in doc["cells"]:
        values = " | ".join("error" if c["error"] else fmt(c["accuracy"].get(v)) for v in columns)
        lines.append(f"| {c['run']} | {c['suspect']} | {c['role']} | {values} |")
    reused = sum(bool(c.get("reused")) for c in doc["cells"])
    lines += ["", f"Wall time: {doc['seconds']:.0f} s ({reused} of {len(doc['cells'])} cells reused from --work).", ""]
    return "\n".join(lines)


def heat_map(doc: dict, path: Path) -> None:
    """One panel per run (stacked): rows = suspects (role in brackets), columns = views; colour = accuracy."""
    cells, columns = doc["cells"], views(doc["cells"])
    runs = list(dict.fromkeys(c["run"] for c in cells))
    suspects = list(dict.fromkeys(c["suspect"] for c in cells))
    fig, axes = plt.subplots(len(runs), 1, figsize=(2.5 + 0.9 * len(columns), (1.1 + 0.4 * len(suspects)) * len(runs)),
                             squeeze=False, constrained_layout=True)
    image = None
    for ax, run in zip(axes[:, 0], runs):
        grid = np.full((len(suspects), len(columns)), np.nan)
        labels = list(suspects)
        for c in (c for c in cells if c["run"] == run):
            i = suspects.index(c["suspect"])
            labels[i] = f"{c['suspect']} ({c['role']})"
            for j, view in enumerate(columns):
                if c["accuracy"].get(view) is not None:
                    grid[i, j] = c["accuracy"][view]
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
        image = ax.imshow(grid, cmap="RdYlGn_r", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(columns)), columns, fontsize=7, rotation=30)
        ax.set_yticks(range(len(suspects)), labels, fontsize=7)
        ax.set_title(run, fontsize=8)
    fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.6, label="suspect accuracy (lower = better protected)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    runs = [Path(r) for r in args.run]
    missing = [f"{r / 'owner' / 'secret.json'}" for r in runs if not (r / "owner" / "secret.json").is_file()]
    if missing:
        print(f"error: --run: missing {', '.join(missing)} (not a MedLocker/MIAD-MARK run folder)", file=sys.stderr)
        return 2
    if args.learned_steps < 0:
        print(f"error: --learned-steps must be >= 0, got {args.learned_steps}", file=sys.stderr)
        return 2
    try:
        suspects = parse_suspects(args.suspect)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="medlocker_transfer_") as tmp, contextlib.redirect_stdout(sys.stderr):
        work = Path(args.work) if args.work else Path(tmp)
        hashes = {name: sha256(checkpoint) for name, checkpoint in suspects.items()}  # once, not per run
        cells = [run_cell(run, name, checkpoint, hashes[name], members, args.learned_steps, work)
                 for run in runs for members in [optimised_against(run)] for name, checkpoint in suspects.items()]
    doc = {"benchmark": "medlocker_transfer",
           "settings": {"runs": [str(r) for r in runs], "suspects": {k: str(v) for k, v in suspects.items()},
                        "learned_steps": args.learned_steps},
           "cells": cells, "seconds": round(time.time() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "medlocker_transfer.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "medlocker_transfer.md").write_text(markdown(doc))
    heat_map(doc, out / "medlocker_transfer.png")
    print(json.dumps(doc, indent=1))
    return 1 if any(c["error"] for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
