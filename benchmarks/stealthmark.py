"""StealthMark overheads, measured side by side in one process; prints JSON.

1. Training time per sample of ``method=stealthmark`` vs ``method=task`` with the same
   backbone, data and batch size (goal ≤ 1.10×). The two objectives run in alternating
   rounds of ``--steps`` optimiser steps, so a load change on a shared machine hits both;
   the first ``--warmup`` steps of each round are not timed.
2. LIME verification time vs bare batched forward passes of the *same* perturbed images
   (goal ≤ 1.3×): one LIME explanation per image (``--lime-samples``), the batches LIME sends
   are recorded, then sent again straight to the model.
3. With ``--compare-precision P`` (e.g. ``bf16-mixed``): ``method=stealthmark`` seconds per
   training step at ``trainer.precision=32-true`` vs ``P``, alternating rounds as in 1. No goal:
   it tells whether this machine's CPU or GPU gains from mixed precision (docs/stealthmark.md §4).

    python benchmarks/stealthmark.py                    # the stealthmark_synthetic experiment
    python benchmarks/stealthmark.py --backbone sam_tiny --steps 10
    python benchmarks/stealthmark.py --compare-precision bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

import utils.resolvers  # noqa: E402,F401
from benchmarks._timing import StepTimer  # noqa: E402
from utils.hardware import cpu_bf16_is_native, cpu_capability  # noqa: E402
from watermark.stealthmark import explain  # noqa: E402
from watermark.stealthmark.evidence import quiet_lime  # noqa: E402


def compose_cfg(method: str, args: argparse.Namespace, tmp: Path):
    overrides = [
        f"experiment={args.experiment}", f"method={method}", "logger=none",
        f"paths.root_dir={ROOT}", f"paths.output_dir={tmp / method}", f"paths.log_dir={tmp / 'logs'}",
        f"data.batch_size={args.batch_size}", f"data.synthetic.num_images={args.num_images}",
        "trainer.accelerator=cpu" if args.device == "cpu" else "trainer.accelerator=auto",
    ]
    if args.backbone:
        overrides.append(f"backbone={args.backbone}")
    if args.data_dir:
        overrides.append(f"paths.data_dir={args.data_dir}")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    from utils.run import resolve_secrets

    resolve_secrets(cfg)  # the secret defaults are null: draw throwaway ones (nothing is written)
    return cfg


def time_training(cfg, datamodule, steps: int, warmup: int, precision: str = "32-true") -> list[float]:
    """Seconds per step of ``steps`` steps after ``warmup`` untimed ones (fresh module each round)."""
    module = instantiate(cfg.method, backbone=cfg.backbone, loss=cfg.loss, _recursive_=False)
    timer = StepTimer()
    trainer = pl.Trainer(max_steps=steps + warmup, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer], accelerator=cfg.trainer.accelerator, devices=1, precision=precision)
    trainer.fit(module, datamodule=datamodule)
    return timer.times[warmup:]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="stealthmark_synthetic")
    parser.add_argument("--backbone", default=None, help="backbone config (default: the experiment's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-images", type=int, default=96, help="synthetic images generated for the benchmark")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lime-samples", type=int, default=1500)
    parser.add_argument("--lime-target", default="triggered", choices=("triggered", "contrast"),
                        help="what LIME explains (verify.lime_target)")
    parser.add_argument("--lime-surrogate", default="per_cell", choices=("per_cell", "joint"),
                        help="LIME's local model (verify.lime_surrogate)")
    parser.add_argument("--lime-images", type=int, default=1)
    parser.add_argument("--lime-batch-size", type=int, default=250)
    parser.add_argument("--device", default="cpu", choices=["cpu", "auto"])
    parser.add_argument("--data-dir", default=os.environ.get("MEDMARK_DATA_DIR"))
    parser.add_argument("--compare-precision", default=None, metavar="PRECISION",
                        help="also time stealthmark training at this trainer.precision vs 32-true (e.g. bf16-mixed)")
    return parser.parse_args()


def median_step_times(runs: dict, datamodule, args: argparse.Namespace) -> tuple[dict[str, float], int]:
    """Median seconds per training step of each named ``(cfg, precision)`` run, in alternating rounds.

    Every round times each run once (``--steps`` after ``--warmup``), so a load change on a
    shared machine hits all of them. Returns the medians by name and the steps timed per run.
    """
    per_step: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (cfg, precision) in runs.items():
            per_step[name] += time_training(cfg, datamodule, args.steps, args.warmup, precision)
    return {name: statistics.median(t) for name, t in per_step.items()}, min(len(t) for t in per_step.values())


def compare_training(cfgs: dict, datamodule, args: argparse.Namespace) -> dict:
    """1. training seconds per sample of ``task`` vs ``stealthmark``, alternating rounds (median)."""
    medians, timed = median_step_times({m: (cfgs[m], "32-true") for m in ("task", "stealthmark")}, datamodule, args)
    train = {f"{m}_s_per_sample": t / args.batch_size for m, t in medians.items()}
    train["ratio"] = train["stealthmark_s_per_sample"] / train["task_s_per_sample"]
    train["goal"] = 1.10
    train["steps_timed_per_method"] = timed
    return train


def compare_precision(cfg, datamodule, args: argparse.Namespace) -> dict:
    """3. stealthmark training seconds per step at 32-true vs ``--compare-precision``, alternating rounds (median)."""
    runs = {"baseline": (cfg, "32-true"), "compared": (cfg, args.compare_precision)}
    medians, timed = median_step_times(runs, datamodule, args)
    return {
        "s_per_step": {"32-true": medians["baseline"], args.compare_precision: medians["compared"]},
        "speedup": medians["baseline"] / medians["compared"],
        "steps_timed_per_precision": timed,
    }


def compare_lime(module, datamodule, device: torch.device, args: argparse.Namespace) -> dict:
    """2. LIME seconds per image vs bare forward passes of the same perturbed images."""
    key = module.key
    dataset = datamodule.dataset("val")
    lime_times, forward_times = [], []
    for i in range(args.lime_images):
        image = dataset[i]["image"]
        recorded: list[torch.Tensor] = []

        def predict(x: torch.Tensor) -> torch.Tensor:
            recorded.append(x)
            return module.predict_probs(x.to(device)).cpu()

        start = time.perf_counter()
        with quiet_lime():
            explain.lime_cell_weights(predict, image.permute(1, 2, 0).numpy(), key.spec(),
                                      trigger=key.build_trigger(), num_samples=args.lime_samples,
                                      batch_size=args.lime_batch_size, hide_value=key.hide_value, seed=i,
                                      target=args.lime_target, surrogate=args.lime_surrogate)
        lime_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for x in recorded:
            explain.uncertainty_score(module.predict_probs(x.to(device)).cpu())
        forward_times.append(time.perf_counter() - start)
    return {
        "num_samples": args.lime_samples,
        "target": args.lime_target,
        "surrogate": args.lime_surrogate,
        "images": args.lime_images,
        "lime_s_per_image": statistics.mean(lime_times),
        "forward_s_per_image": statistics.mean(forward_times),
        "ratio": sum(lime_times) / sum(forward_times),
        "goal": 1.3,
    }


def main() -> None:
    args = parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    pl.seed_everything(0, verbose=False)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cfgs = {m: compose_cfg(m, args, tmp) for m in ("task", "stealthmark")}
        datamodule = instantiate(cfgs["task"].data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        train = compare_training(cfgs, datamodule, args)
        precision = compare_precision(cfgs["stealthmark"], datamodule, args) if args.compare_precision else None
        cfg = cfgs["stealthmark"]
        module = instantiate(cfg.method, backbone=cfg.backbone, loss=cfg.loss, _recursive_=False).eval()
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu")
        module.to(device)
        lime = compare_lime(module, datamodule, device, args)

    report = {
        "benchmark": "stealthmark",
        "experiment": args.experiment,
        "backbone": {k: v for k, v in cfg.backbone.items() if k in ("_target_", "arch", "encoder_name", "variant")},
        "image_size": int(cfg.data.image_size),
        "batch_size": args.batch_size,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_load_1min": os.getloadavg()[0],
        "cpu_capability": cpu_capability(),   # AVX2 / AVX512 ...: bf16 is emulated without AVX-512 or AMX
        "cpu_bf16_native": cpu_bf16_is_native(),
        "train": train,
        "lime": lime,
    }
    if precision is not None:
        report["precision"] = precision
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
