"""X-Mark suspect matrix: releases × suspect architectures × seeds, Mal and Ind-M each (docs/xmark.md).

For every release (an X-Mark run folder: ``release.json``, ``released/``, ``owner/secret.json``)
and every suspect architecture (a ``configs/backbone`` name) and seed, two suspects are trained
like a thief would (``experiment=task_cls_synthetic``, best-by-validation checkpoint, the thief's
usual augmentation: horizontal flip 0.5 and a random zoom to a 0.9 crop, then the resize):

* **Mal** on the release (``<run>/released``);
* **Ind-M** on the clean source the release was made from (``release.json`` ``source``);

and each is checked with the real verification protocol of ``verify.py``
(:func:`benchmarks._study.run_verify` -> :mod:`verification.xmark`; the hypothesis test is not
re-implemented here). An Ind-M suspect is trained once per clean source (and its contents) and settings and verified
against each release's own secret (``--work`` keeps suspects between runs). Per cell: ΔP, p, WSR,
benign balanced accuracy (clean test split) and the verdict. Writes into ``--out``:
``xmark_matrix.json`` (every cell + a per-architecture summary), ``xmark_matrix.md`` (table) and
``xmark_matrix.png`` (heat map of ΔP, verdicts annotated); prints the JSON. Without ``--release``
it first trains a small release of its own (32 px synthetic data).

    python benchmarks/xmark_matrix.py                           # own small release, small CNN + ResNet18, 1 seed
    python benchmarks/xmark_matrix.py --tiny --out /tmp/m      # seconds: the smoke test
    python benchmarks/xmark_matrix.py --release /tmp/h5/ens --release /tmp/h5/single \\
        --archs small_cnn resnet18 resnet34 vgg16_bn efficientnet_b0 --seeds 42 7 1 --epochs 15 \\
        --out docs/figures                                      # the full study
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from benchmarks._study import evidence, fmt, run_verify  # noqa: E402
import utils.resolvers  # noqa: E402,F401
from utils.clean_model_runs import finished_run, run_checkpoint  # noqa: E402

SCENARIOS = ("mal", "indm")

# The small release the benchmark trains when no --release is given (32 px synthetic chest X-rays,
# single small-CNN proxy, step budget); --tiny shrinks it further. Seeds are fixed: a benchmark
# release is not a secret.
OWN_RELEASE = [
    "experiment=xmark_synthetic", "logger=none", "test=false", "callbacks.validation_panels=null",
    "data.synthetic.image_size=32", "data.image_size=32", "loss.lpips=null",
    "callbacks.xmark_release.seed=20260401", "callbacks.xmark_release.verification.seed=20260402",
]
OWN_RELEASE_SIZE = {"default": ["data.synthetic.num_images=400", "method.warmup_steps=40",
                                "method.generator_steps=40", "method.proxy_steps=2",
                                "method.generator_optimizer.lr=3e-3",
                                "callbacks.xmark_release.heldout_control.seeds=[1]",
                                "callbacks.xmark_release.heldout_control.epochs=6"],
                    "tiny": ["data.synthetic.num_images=160", "data.batch_size=16", "method.warmup_steps=10",
                             "method.generator_steps=10", "method.proxy_steps=1", "method.mark_fraction=1.0",
                             "method.generator.base_width=8", "method.generator.depth=2",
                             "method.generator.epsilon=0.0627450980392157", "method.generator_optimizer.lr=0.005",
                             "callbacks.xmark_release.heldout_control.epochs=0",
                             "callbacks.xmark_release.verification.num_images=30", "callbacks.xmark_panels=null"]}
# The thief's usual pipeline: resize (always), horizontal flip, random zoom to a 0.9 crop (scale 1/0.9).
THIEF_AUGMENT = ["data.augment.hflip=0.5", "+data.augment.scale=[1.0,1.111]"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", action="extend", nargs="+", default=[],
                        help="X-Mark run folder(s): --release A B or --release A --release B; "
                             "none = train a small release first")
    parser.add_argument("--archs", nargs="+", default=["small_cnn", "resnet18"], help="configs/backbone names")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--epochs", type=int, default=8, help="suspect training epochs (best-by-validation kept)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="suspect learning rate (null = the task's)")
    parser.add_argument("--arch-lr", action="append", default=[], metavar="ARCH=LR",
                        help="learning rate of one architecture's suspects, e.g. vgg16_bn=1e-4 (repeatable)")
    parser.add_argument("--image-size", type=int, default=None, help="suspect/query size (null = the marking size)")
    parser.add_argument("--no-augment", action="store_true", help="suspects without the thief's augmentation")
    parser.add_argument("--out", default=str(ROOT / "logs" / "xmark_matrix"), help="folder of JSON/MD/PNG")
    parser.add_argument("--work", default=None,
                        help="folder of suspect runs (default: a temporary folder); a suspect trained to the end "
                             "there with the same settings is reused, so an Ind-M suspect serves every release "
                             "of its source")
    parser.add_argument("--tiny", action="store_true", help="smoke mode: tiny release, one small CNN, 2 epochs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.tiny:
        args.archs, args.seeds, args.epochs = ["small_cnn"], [0], 2
    try:
        args.arch_lr = {k: float(v) for k, v in (item.split("=", 1) for item in args.arch_lr)}
    except ValueError:
        parser.error(f"--arch-lr takes ARCH=LR, got {args.arch_lr}")
    return args


def compose_train(overrides: list[str], output_dir: Path, data_dir: Path):
    """The composed ``configs/train.yaml`` with paths inside the benchmark's work folder."""
    base = [f"paths.root_dir={ROOT}", f"paths.output_dir={output_dir}", f"paths.data_dir={data_dir}",
            f"paths.log_dir={output_dir.parent / 'logs'}"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=base + list(overrides))


def train(overrides: list[str], output_dir: Path, data_dir: Path) -> dict[str, Any]:
    """One ``train.py`` run in-process; its ``summary.json``."""
    from utils.run import run_training

    run_training(compose_train(overrides, output_dir, data_dir))
    return json.loads((output_dir / "summary.json").read_text())


def own_release(work: Path, tiny: bool) -> Path:
    run = work / "release"
    started = time.time()
    train(OWN_RELEASE + OWN_RELEASE_SIZE["tiny" if tiny else "default"], run, work / "data")
    print(f"[xmark_matrix] own release trained in {time.time() - started:.0f} s -> {run}", file=sys.stderr, flush=True)
    return run


def suspect_overrides(args: argparse.Namespace, arch: str, seed: int, root: Path, image_size: int) -> list[str]:
    overrides = ["experiment=task_cls_synthetic", f"backbone={arch}", "data=chexpert", "data.synthetic=null",
                 f"data.root={root}", f"data.image_size={image_size}", f"data.batch_size={args.batch_size}",
                 f"trainer.max_epochs={args.epochs}", f"seed={seed}", "logger=none", "test=false",
                 "eval_untrained=false", "callbacks.validation_panels=null"]
    overrides += ["data.augment.hflip=0.0"] if args.no_augment else THIEF_AUGMENT
    lr = args.arch_lr.get(arch, args.lr)
    if lr is not None:
        overrides.append(f"method.optimizer.lr={lr}")
    return overrides


def data_fingerprint(root: Path) -> str:
    """A hash of what a suspect's training reads from ``root``: every CSV's bytes and every other
    file's relative path, size and modification time.

    A source relabelled, re-exported or extended in place gets new suspects; a copy of it (new
    modification times) costs a retrain, never a stale reuse. Stat calls only for the images, and
    :func:`main` takes it once per folder and run (``fingerprints``), not once per matrix cell.
    """
    digest = hashlib.sha256()
    files = sorted(path for path in root.rglob("*") if path.is_file()) if root.is_dir() else []
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        if path.suffix.lower() == ".csv":
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            stat = path.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        digest.update(b"\0")
    return digest.hexdigest()


def suspect_folder(scenario: str, arch: str, seed: int, root: Path, fingerprint: str, overrides: list[str],
                   release: Path) -> str:
    """The work folder's name of one suspect, a key of everything its training depends on.

    An Ind-M suspect depends only on the clean source (its path and ``fingerprint``, the folder's
    :func:`data_fingerprint`) and the training settings, so every release made from one source shares
    it (trained once, verified against each release's own secret); a Mal suspect also on the release itself (its
    ``release.json``, so a release re-made into the same folder gets new suspects). The key is a
    hash: no secret goes into it.
    """
    identity = {"root": str(root), "data": fingerprint, "overrides": overrides}
    if scenario == "mal":
        identity["release"] = hashlib.sha256((release / "release.json").read_bytes()).hexdigest()
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return f"{scenario}_{arch}_s{seed}_{key}"


def run_cell(args, release: Path, arch: str, seed: int, scenario: str, work: Path,
             fingerprints: dict[Path, str] | None = None) -> dict[str, Any]:
    """Train one suspect (or reuse the one trained alike in ``work``) and verify it; the cell's numbers
    (never the secret's ids). ``fingerprints``: training folder -> :func:`data_fingerprint`, filled as
    folders are met; share one dict across the cells of one run (None: taken afresh for this cell)."""
    report = json.loads((release / "release.json").read_text())
    root = Path(report["release_dir"]) if scenario == "mal" else Path(report["source"])
    secret = release / "owner" / "secret.json"
    marking_size = int(json.loads(secret.read_text())["marker"]["image_size"])
    size = int(args.image_size or marking_size)
    name = f"{release.name}_{arch}_s{seed}_{scenario}"
    overrides = suspect_overrides(args, arch, seed, root, size)
    fingerprints = {} if fingerprints is None else fingerprints
    if root not in fingerprints:
        fingerprints[root] = data_fingerprint(root)
    folder = work / "suspects" / suspect_folder(scenario, arch, seed, root, fingerprints[root], overrides, release)
    started = time.time()
    summary = finished_run(folder)  # a suspect trained to the end before
    reused = summary is not None
    if not reused:
        summary = train(overrides, folder, work / "data")
    train_seconds = time.time() - started
    checkpoint = run_checkpoint(summary)
    overrides = [f"secret={secret}", f"suspect={checkpoint}", f"paths.data_dir={work / 'data'}", "quiet=true",
                 "verify.num_figures=0"]
    if args.image_size:
        overrides.append(f"data.image_size={size}")
    code, doc, error = run_verify(overrides, work / "verify" / name)
    cell = {"release": release.name, "arch": arch, "seed": seed, "scenario": scenario, "exit_code": code,
            "train_seconds": round(train_seconds, 1), "suspect_reused": reused, "error": error,
            **evidence(doc, "xmark")}
    if doc is not None:
        cell.update({"benign_accuracy": doc.get("benign_accuracy"), "control_fails": doc.get("control_fails")})
    print(f"[xmark_matrix] {name}: " + ", ".join(f"{k}={fmt(cell.get(k))}" for k in
          ("verified", "p_value", "delta_p", "wsr", "benign_accuracy", "train_seconds", "suspect_reused")),
          file=sys.stderr, flush=True)
    return cell


def _mean_se(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return float(np.mean(values)), se


def summarise(cells: list[dict]) -> list[dict]:
    """Per release × architecture: Mal verified / runs, Ind-M false claims, mean benign BA (± s.e.)."""
    rows = []
    for release in dict.fromkeys(c["release"] for c in cells):
        for arch in dict.fromkeys(c["arch"] for c in cells if c["release"] == release):
            group = [c for c in cells if c["release"] == release and c["arch"] == arch]
            mal = [c for c in group if c["scenario"] == "mal"]
            ind = [c for c in group if c["scenario"] == "indm"]
            mal_ba, mal_se = _mean_se([c.get("benign_accuracy") for c in mal])
            ind_ba, ind_se = _mean_se([c.get("benign_accuracy") for c in ind])
            rows.append({
                "release": release, "arch": arch,
                "mal_verified": sum(bool(c.get("verified")) for c in mal), "mal_runs": len(mal),
                "mal_goal_met": sum(bool(c.get("verified")) and (c.get("delta_p") or 0) >= 0.5
                                    and (c.get("wsr") or 0) >= 0.9 and (c.get("p_value") or 1) < 1e-3 for c in mal),
                "indm_false_claims": sum(bool(c.get("verified")) for c in ind), "indm_runs": len(ind),
                "mal_ba_mean": mal_ba, "mal_ba_se": mal_se, "indm_ba_mean": ind_ba, "indm_ba_se": ind_se,
                "ba_cost_points": None if mal_ba is None or ind_ba is None else round(100 * (ind_ba - mal_ba), 2),
            })
    return rows


def markdown(doc: dict) -> str:
    lines = ["# X-Mark suspect matrix", "",
             f"Suspects: {doc['settings']['epochs']} epochs, batch {doc['settings']['batch_size']}, "
             f"augmentation: {doc['settings']['augmentation']}; τ/α as sealed in each release's secret. "
             "Verdict = the suspect's test passes and every recorded control fails (verify.py).", "",
             "| release | suspect | seed | scenario | ΔP | p | WSR | benign BA | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in doc["cells"]:
        verdict = "error" if c.get("error") else ("VERIFIED" if c.get("verified") else "not verified")
        lines.append(f"| {c['release']} | {c['arch']} | {c['seed']} | {'Mal' if c['scenario'] == 'mal' else 'Ind-M'} "
                     f"| {fmt(c.get('delta_p'), 2)} | {fmt(c.get('p_value'))} | {fmt(c.get('wsr'), 2)} "
                     f"| {fmt(c.get('benign_accuracy'))} | {verdict} |")
    lines += ["", "| release | suspect | Mal verified | Mal at the goal (p<1e-3, ΔP≥0.5, WSR≥0.9) | Ind-M false claims "
              "| Mal BA (± s.e.) | Ind-M BA (± s.e.) | BA cost (points) |", "|---|---|---|---|---|---|---|---|"]
    for r in doc["summary"]:
        lines.append(f"| {r['release']} | {r['arch']} | {r['mal_verified']}/{r['mal_runs']} | "
                     f"{r['mal_goal_met']}/{r['mal_runs']} | {r['indm_false_claims']}/{r['indm_runs']} | "
                     f"{fmt(r['mal_ba_mean'])} ± {fmt(r['mal_ba_se'])} | {fmt(r['indm_ba_mean'])} ± "
                     f"{fmt(r['indm_ba_se'])} | {fmt(r['ba_cost_points'], 1)} |")
    lines += ["", f"Wall time: {doc['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def heat_map(doc: dict, path: Path) -> None:
    """One panel per release: rows = suspect architectures, columns = (scenario, seed); colour = ΔP."""
    cells = doc["cells"]
    releases = list(dict.fromkeys(c["release"] for c in cells))
    fig, axes = plt.subplots(len(releases), 1, figsize=(1.2 + 0.9 * max(2, len({(c["scenario"], c["seed"]) for c in cells})),
                                                         0.6 + 0.55 * len({c["arch"] for c in cells}) * 1.0 * len(releases)
                                                         + 0.6 * len(releases)), squeeze=False)
    image = None
    for ax, release in zip(axes[:, 0], releases):
        group = [c for c in cells if c["release"] == release]
        archs = list(dict.fromkeys(c["arch"] for c in group))
        cols = list(dict.fromkeys((c["scenario"], c["seed"]) for c in sorted(group, key=lambda c: c["scenario"] != "mal")))
        grid = np.full((len(archs), len(cols)), np.nan)
        for c in group:
            i, j = archs.index(c["arch"]), cols.index((c["scenario"], c["seed"]))
            grid[i, j] = c.get("delta_p", np.nan) if c.get("delta_p") is not None else np.nan
            mark = "✓" if c.get("verified") else ("!" if c.get("error") else "✗")
            ax.text(j, i, f"{mark}\n{fmt(c.get('delta_p'), 2)}", ha="center", va="center", fontsize=7)
        image = ax.imshow(grid, cmap="RdYlGn", vmin=-0.2, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(cols)), [f"{'Mal' if s == 'mal' else 'Ind-M'}\nseed {seed}" for s, seed in cols],
                      fontsize=7)
        ax.set_yticks(range(len(archs)), archs, fontsize=7)
        ax.set_title(f"release {release}: ΔP (✓ verified, ✗ not)", fontsize=8)
    fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.8, label="ΔP")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    torch.set_num_threads(int(args.threads))
    started = time.time()
    out = Path(args.out)
    for release in args.release:
        missing = [n for n in ("release.json", "owner/secret.json") if not (Path(release) / n).is_file()]
        if missing:
            print(f"error: --release {release}: missing {', '.join(missing)} (not an X-Mark run folder)", file=sys.stderr)
            return 2
    # training and verification print their progress: to stderr, so that stdout is the JSON alone
    with tempfile.TemporaryDirectory(prefix="xmark_matrix_") as tmp, contextlib.redirect_stdout(sys.stderr):
        work = Path(args.work) if args.work else Path(tmp)
        releases = [Path(r) for r in args.release] or [own_release(work, args.tiny)]
        fingerprints: dict[Path, str] = {}  # the training folders do not change during a run
        cells = [run_cell(args, release, arch, seed, scenario, work, fingerprints)
                 for release in releases for arch in args.archs for seed in args.seeds for scenario in args.scenarios]
        doc = {
            "benchmark": "xmark_matrix",
            "settings": {"releases": [str(r) for r in releases], "archs": args.archs, "seeds": args.seeds,
                         "scenarios": args.scenarios, "epochs": args.epochs, "batch_size": args.batch_size,
                         "lr": args.lr, "arch_lr": args.arch_lr, "image_size": args.image_size, "tiny": args.tiny, "threads": args.threads,
                         "augmentation": "none (hflip 0)" if args.no_augment else "hflip 0.5, zoom to a 0.9 crop, resize"},
            "releases": {r.name: {k: v for k, v in json.loads((r / "release.json").read_text()).items()
                                  if k in ("num_marked", "fraction", "psnr_mean", "psnr_min", "linf_255", "epsilon",
                                           "linf_within_epsilon", "control", "proxies", "heldout_architectures")}
                         for r in releases if (r / "release.json").is_file()},
            "cells": cells,
            "summary": summarise(cells),
            "seconds": round(time.time() - started, 1),
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "xmark_matrix.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "xmark_matrix.md").write_text(markdown(doc))
    heat_map(doc, out / "xmark_matrix.png")
    print(json.dumps(doc, indent=1))
    return 1 if any(c.get("error") for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
