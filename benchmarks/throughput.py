"""Training throughput of every method next to plain task training, in one process; prints JSON.

For each backbone (``--backbones``, config names under ``configs/backbone``) and each method
(``--methods``) that fits it (segmentation: ``task``, ``stealthmark``; classification:
``task``, ``xmark``, ``medlocker``, ``miadmark``) the real LightningModule is built from the
configs (``method=<m> data=<synthetic preset> backbone=<b>``) and driven by a Lightning
Trainer, exactly as ``train.py`` drives it, with the precision / channels_last / compile
options given here. Every method is measured next to plain ``method=task`` training of the
*same* backbone and data (same image size, batch size, precision, speed options) in the
same process, so the ratios compare like with like.

Per (backbone, method), two passes over ``--warmup`` untimed + ``--steps`` timed steps:

1. **compute**: batches are synthetic in-memory tensors already on the device (a few real
   samples of the synthetic dataset, collated once), so nothing waits on data:
   ``samples_per_s``, ``step_ms_median``, ``peak_memory_mib``, ``gpu_util_percent``.
2. **with the DataLoader**: the real DataModule's train loader with ``--num-workers``
   worker processes (default: the ``data.num_workers`` default of ``configs/data/_common.yaml``,
   i.e. what a real dataset preset uses). ``data_loading.share`` = time the training loop
   waited on the loader iterator ÷ wall time of the timed steps (0 = the workers keep up; near
   1 = the GPU/CPU starves waiting for images).

What a "step" is: ``task``, ``stealthmark``, ``xmark`` = one training step (forward, losses,
backward, optimiser; X-Mark: a proxy update every step and a generator update every
``method.proxy_steps`` steps, with EigenCAM computed uncached -- its first-epoch cost);
``medlocker`` / ``miadmark`` = protecting one batch (``test_step``: lesion region, white-box
placement optimisation with restarts, exact render, removal-attempt checks; MIAD-MARK adds
Grad-CAM and PGD δ). ``throughput_ratio_to_task`` = method samples/s ÷ task-training
samples/s (< 1: slower); ``time_ratio_to_task`` is its inverse (seconds per sample, the
convention of benchmarks/stealthmark.py).

Peak memory: on a GPU ``torch.cuda.max_memory_allocated`` of the compute pass; on a CPU the
peak resident set size of this process (Linux ``VmHWM``, reset per pass; DataLoader workers
are separate processes and not included) -- ``settings.memory_kind`` says which. GPU
utilisation is sampled every 0.1 s during the timed steps (pynvml, else ``nvidia-smi``);
``null`` on a CPU. CUDA timings are taken between ``torch.cuda.synchronize()`` calls.

Models are randomly initialised (full-size SAM with ``allow_random_init``; nothing is
downloaded): timings only. StealthMark needs an image size that is a multiple of its QR grid
(25 for version 1 + 2 cells of quiet zone), so it and its task baseline run at the largest
such size not above ``--image-size`` (reported as ``image_size``).

A method that fails records its error in the JSON; the run goes on. Use `--steps` >= 2 (and a
warm-up) for a meaningful data-loading share.

    python benchmarks/throughput.py                                   # CPU defaults, ~2 min
    python benchmarks/throughput.py --device cuda --precision bf16-mixed --channels-last \\
        --image-size 512 --batch-size 16 --backbones unet_resnet34
    python benchmarks/throughput.py --device cuda --precision bf16-mixed --image-size 1024 \\
        --batch-size 2 --backbones sam_vit_b --methods task,stealthmark
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

import utils.resolvers  # noqa: E402,F401
from benchmarks._timing import StepTimer, sync as _sync  # noqa: E402,F401

# method -> (task kind, phase, data preset, extra overrides of the method run only)
METHODS: dict[str, dict[str, Any]] = {
    "task": {"kinds": ("segmentation", "classification"), "phase": "fit", "overrides": []},
    "stealthmark": {"kinds": ("segmentation",), "phase": "fit", "data": "synthetic_polyp", "overrides": []},
    "xmark": {
        "kinds": ("classification",), "phase": "fit", "data": "synthetic_cxr",
        # generator training from the first step (no surrogate warm-up), EigenCAM uncached, LPIPS on
        # a random AlexNet (no weights file needed; the cost is the same).
        "overrides": ["method.warmup_steps=0", "method.saliency_cache_dir=null", "loss.lpips.random_backbone=true",
                      "loss.lpips.backbone_weights_path=null", "data.augment.hflip=0.0"],
    },
    "medlocker": {"kinds": ("classification",), "phase": "test", "data": "synthetic_dr",
                  "overrides": ["method.search=whitebox"]},
    "miadmark": {"kinds": ("classification",), "phase": "test", "data": "synthetic_dr",
                 "overrides": ["method.search=whitebox"]},
}
TASK_DATA = {"segmentation": "synthetic_polyp", "classification": "synthetic_cxr"}
LOSS = {"segmentation": "segmentation", "classification": "classification"}
SEGMENTATION_FACTORIES = ("models.build_smp_model", "models.build_sam_model")


# ------------------------------------------------------------------------------ measurement
class InMemoryBatches:
    """``length`` batches cycling over a small pool of device-resident batches (no loading at all)."""

    def __init__(self, pool: list[dict[str, Any]], length: int) -> None:
        self.pool, self.length = pool, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for i in range(self.length):
            yield self.pool[i % len(self.pool)]


class TimedLoader:
    """Wraps a DataLoader; records (start, end) of every ``next()`` on its iterator."""

    def __init__(self, loader, length: int) -> None:
        self.loader, self.length = loader, length
        self.waits: list[tuple[float, float]] = []

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        served = 0
        while served < self.length:  # re-iterate (a new epoch of workers) if the split is short
            iterator = iter(self.loader)
            while served < self.length:
                start = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                self.waits.append((start, time.perf_counter()))
                served += 1
                yield batch


class GpuUtilSampler:
    """Polls GPU utilisation (%) in a thread: pynvml if importable, else ``nvidia-smi``."""

    def __init__(self, device: torch.device, interval: float = 0.1) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._query = None
        if device.type != "cuda":
            return
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        index = device.index or 0
        ident = visible if visible and (device.index or 0) == 0 else str(index)
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = (pynvml.nvmlDeviceGetHandleByIndex(int(ident)) if ident.isdigit()
                      else pynvml.nvmlDeviceGetHandleByUUID(ident))
            self._query = lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            self._query()
            self.source = "pynvml"
            return
        except Exception:  # no pynvml, or no NVML access: fall back to the CLI
            self._query = None
        if shutil.which("nvidia-smi"):
            def query() -> float:
                out = subprocess.run(["nvidia-smi", f"--id={ident}", "--query-gpu=utilization.gpu",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
                return float(out.stdout.strip().splitlines()[0])
            try:
                query()
                self._query, self.source = query, "nvidia-smi"
            except Exception:
                self._query = None

    def __enter__(self) -> "GpuUtilSampler":
        if self._query is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter(), self._query()))
            except Exception:
                pass
            self._stop.wait(self.interval)

    def summary(self, start: float, end: float) -> dict[str, Any] | None:
        if self.source is None:
            return None
        values = [u for t, u in self.samples if start <= t <= end]
        if not values:
            return {"mean": None, "max": None, "samples": 0}
        return {"mean": round(statistics.mean(values), 1), "max": max(values), "samples": len(values)}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: 5 resets VmHWM (the peak RSS) of this process
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    with contextlib.suppress(ImportError, AttributeError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (2**20 if platform.system() == "Darwin" else 1024), 1)
    return None


def memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda_max_memory_allocated (compute pass)"
    if Path("/proc/self/clear_refs").exists():
        return "cpu_peak_rss: VmHWM of this process, reset before each compute pass (DataLoader workers excluded)"
    return "cpu_peak_rss: ru_maxrss of this process since start (not resettable here; an upper bound)"


# ------------------------------------------------------------------------------ configs
def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    from utils.run import resolve_secrets

    resolve_secrets(cfg)  # the secret defaults are null: draw throwaway ones (nothing is written)
    OmegaConf.resolve(cfg)
    return cfg


def backbone_kind(name: str) -> str:
    spec = OmegaConf.load(ROOT / "configs" / "backbone" / f"{name}.yaml")
    return "segmentation" if spec.get("_target_") in SEGMENTATION_FACTORIES else "classification"


def backbone_overrides(name: str, image_size: int) -> list[str]:
    """Random weights, never a download; SAM's encoder at the benchmark's image size."""
    spec = OmegaConf.load(ROOT / "configs" / "backbone" / f"{name}.yaml")
    out = [f"backbone={name}"]
    if "allow_random_init" in spec:
        out += ["backbone.checkpoint=null", "backbone.allow_random_init=true"]
        if "image_size" in spec:
            out.append(f"backbone.image_size={image_size}")
    for key in ("encoder_weights", "encoder_weights_path", "weights_path"):
        if key in spec:
            out.append(f"backbone.{key}=null")
    return out


def stealthmark_size(base: list[str], image_size: int) -> tuple[int, list[str], str]:
    """(size, overrides, note): the largest multiple of the QR grid <= ``image_size``, and a patch
    trigger shrunk to the quiet zone where small cells leave it too little room."""
    cfg = compose_cfg(base + ["method=stealthmark"])
    quiet = int(cfg.method.quiet_zone)
    grid = 4 * int(cfg.method.qr.version) + 17 + 2 * quiet
    size = (image_size // grid) * grid
    if size == 0:
        raise ValueError(f"--image-size {image_size} is smaller than the StealthMark grid ({grid} px)")
    note = f"image size {size}: the largest multiple of the QR grid ({grid} cells) <= {image_size}"
    overrides = []
    zone = quiet * (size // grid)
    if cfg.method.trigger.kind == "patch" and int(cfg.method.trigger.patch.size) > zone:
        overrides.append(f"method.trigger.patch.size={zone}")
        note += f"; patch trigger {zone} px (the quiet zone)"
    return size, overrides, note


def num_images_for(args: argparse.Namespace) -> int:
    """Enough images that one epoch of the train split (~70 %) covers warm-up + timed steps."""
    needed = max(args.warmup + args.steps, args.protect_warmup + args.protect_steps) * args.batch_size
    return max(args.min_images, math.ceil(needed / 0.65) + 4)


# ------------------------------------------------------------------------------ runs
def make_trainer(args: argparse.Namespace, device: torch.device, timer: StepTimer, batches: int) -> pl.Trainer:
    # One epoch of exactly `batches` batches (not max_steps: with manual optimisation, X-Mark's two
    # optimisers make global_step count optimiser steps, not batches).
    return pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=args.precision,
        max_epochs=1, limit_train_batches=batches, limit_val_batches=0, limit_test_batches=batches,
        num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        inference_mode=False, callbacks=[timer], benchmark=True if args.cudnn_benchmark else None,
        log_every_n_steps=max(1, batches),
    )


def drive(module, phase: str, loader, total: int, args: argparse.Namespace, device: torch.device) -> StepTimer:
    timer = StepTimer(device)
    trainer = make_trainer(args, device, timer, total)
    if phase == "fit":
        trainer.fit(module, train_dataloaders=loader)
    else:
        trainer.test(module, dataloaders=loader, verbose=False)
    if len(timer.ends) < total:
        raise RuntimeError(f"only {len(timer.ends)} of {total} steps ran")
    return timer


def budget(phase: str, args: argparse.Namespace) -> tuple[int, int]:
    """(warm-up, timed) batches of a pass: protection batches take far longer than training steps."""
    if phase == "test":
        return args.protect_warmup, args.protect_steps
    return args.warmup, args.steps


def window(timer: StepTimer, warmup: int, first: float | None = None) -> tuple[float, float, list[float]]:
    """(start, end, step bodies) of the timed steps. A step's wall time runs from the end of the
    previous batch (fetching the next batch, transfer, hooks) to its own end; the first step with
    no warm-up starts at ``first`` (its first fetch) or at its own start."""
    start = timer.ends[warmup - 1] if warmup > 0 else (first if first is not None else timer.starts[0])
    bodies = [e - s for s, e in zip(timer.starts[warmup:], timer.ends[warmup:])]
    return start, timer.ends[-1], bodies


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def measure(cfg, phase: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Both passes (compute, then with the DataLoader) of one method config."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    dataset = datamodule.dataset("train", train_transforms=False)
    bs = int(cfg.data.batch_size)
    pool = [to_device(default_collate([dataset[(b * bs + i) % len(dataset)] for i in range(bs)]), device)
            for b in range(args.pool_batches)]
    module = instantiate(cfg.method, backbone=cfg.backbone, loss=cfg.loss, _recursive_=False)
    warmup, timed = budget(phase, args)
    timed_samples = timed * bs

    # 1. compute: in-memory, device-resident batches
    gc_collect(device)
    reset_peak_memory(device)
    with GpuUtilSampler(device) as sampler:
        timer = drive(module, phase, InMemoryBatches(pool, warmup + timed), warmup + timed, args, device)
    start, end, steps = window(timer, warmup)
    out: dict[str, Any] = {
        "samples_per_s": round(timed_samples / (end - start), 3),
        "steps_timed": timed,
        "step_ms_median": round(statistics.median(steps) * 1000, 2),
        "step_ms_min": round(min(steps) * 1000, 2),
        "peak_memory_mib": peak_memory_mib(device),
        "gpu_util_percent": sampler.summary(start, end),
    }

    # 2. the real DataModule's loader (worker processes, pinning, prefetching as configured)
    try:
        loader = TimedLoader(datamodule.train_dataloader(), warmup + timed)
        with GpuUtilSampler(device) as sampler:
            timer = drive(module, phase, loader, warmup + timed, args, device)
        start, end, _ = window(timer, warmup, first=loader.waits[0][0])
        # the waits for the timed batches (Lightning fetches one batch ahead, so the wait for batch i
        # falls in the gap before step i - 1: in steady state the same total)
        waited = sum(e - s for s, e in loader.waits[warmup:warmup + timed])
        out["data_loading"] = {
            "samples_per_s": round(timed_samples / (end - start), 3),
            "share": round(waited / (end - start), 4),
            "wait_ms_per_step": round(waited / timed * 1000, 2),
            "num_workers": datamodule.num_workers,
            "pin_memory": datamodule.pin_memory,
            "persistent_workers": datamodule.persistent_workers,
            "prefetch_factor": datamodule.prefetch_factor,
            "gpu_util_percent": sampler.summary(start, end),
        }
    except Exception as exc:  # keep the compute figures
        out["data_loading"] = error_record(exc)
    del module, pool
    gc_collect(device)
    return out


def gc_collect(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_record(exc: BaseException) -> dict[str, Any]:
    tail = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"error": f"{type(exc).__name__}: {exc}"[:1500], "traceback_tail": "".join(tail)[-1500:]}


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--channels-last", action="store_true", help="speed.channels_last=true")
    parser.add_argument("--compile", action="store_true", help="speed.compile=true")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="Trainer(benchmark=True)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per pass")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps before them (compilation, cuDNN autotuning, worker start-up)")
    parser.add_argument("--protect-steps", type=int, default=2,
                        help="timed batches of medlocker/miadmark protection per pass (each is a whole optimisation)")
    parser.add_argument("--protect-warmup", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backbones", default="unet_resnet18,small_cnn",
                        help="comma-separated configs/backbone names (segmentation and/or classification)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {list(METHODS)}")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers of the data-loading pass (default: configs/data/_common.yaml)")
    parser.add_argument("--pool-batches", type=int, default=2, help="distinct in-memory batches of the compute pass")
    parser.add_argument("--min-images", type=int, default=32, help="smallest synthetic dataset generated")
    parser.add_argument("--data-dir", default=None, help="where synthetic data is generated/reused (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for every run, e.g. data.pin_memory=true (repeatable)")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    if min(args.steps, args.protect_steps, args.batch_size) < 1 or min(args.warmup, args.protect_warmup) < 0:
        parser.error("--steps, --protect-steps, --batch-size >= 1; --warmup, --protect-warmup >= 0")
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    return args


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def common_overrides(args: argparse.Namespace, tmp: Path) -> list[str]:
    """The Hydra overrides every measured run shares (paths, batch, workers, speed, precision, extras)."""
    data_dir = Path(args.data_dir) if args.data_dir else tmp / "data"
    return [
        "logger=none", f"paths.root_dir={ROOT}", f"paths.data_dir={data_dir}", f"paths.log_dir={tmp / 'logs'}",
        f"paths.output_dir={tmp / 'run'}", f"data.batch_size={args.batch_size}",
        f"data.eval_batch_size={args.batch_size}", f"data.num_workers={args.num_workers}",
        f"data.synthetic.num_images={num_images_for(args)}",
        f"speed.channels_last={str(args.channels_last).lower()}", f"speed.compile={str(args.compile).lower()}",
        f"speed.compile_mode={args.compile_mode}", f"speed.compile_backend={args.compile_backend}",
        f"trainer.precision={args.precision}", *args.override,
    ]


def run_settings(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The report's ``settings``: device, precision, sizes, versions, load and units."""
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
        "compile_mode": args.compile_mode if args.compile else None,
        "compile_backend": args.compile_backend if args.compile else None,
        "cudnn_benchmark": args.cudnn_benchmark,
        "image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
        "warmup": args.warmup, "protect_steps": args.protect_steps, "protect_warmup": args.protect_warmup,
        "num_workers": args.num_workers, "overrides": args.override,
        "torch": torch.__version__, "lightning": lightning.__version__, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "cpu_load_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "memory_kind": memory_kind(device),
        "gpu_util_source": GpuUtilSampler(device).source,
        "weights": "random initialisation (timings only)",
        "units": {"samples_per_s": "training samples/s (medlocker/miadmark: images protected/s)",
                  "throughput_ratio_to_task": "method samples/s / task samples/s (same backbone, data, size)",
                  "time_ratio_to_task": "1 / throughput_ratio_to_task (s per sample, method / task)",
                  "data_loading.share": "time waiting on the DataLoader iterator / wall time of the timed steps"},
    }


def measure_method(backbone: str, kind: str, method: str, entry: dict[str, Any], common: list[str],
                   baselines: dict[str, dict[str, Any]], args: argparse.Namespace, device: torch.device) -> None:
    """Measure ``method`` on ``backbone`` into ``entry``, with its ratio to the (cached) ``method=task``
    baseline of the same overrides; raises what the measurement raises."""
    spec = METHODS[method]
    data = spec.get("data") or TASK_DATA[kind]
    size = args.image_size
    base = common + [f"data={data}", f"loss={LOSS[kind]}"]
    extra = list(spec["overrides"])
    if method == "stealthmark":
        size, more, entry["note"] = stealthmark_size(base + backbone_overrides(backbone, args.image_size),
                                                     args.image_size)
        extra += more
    base += [f"data.image_size={size}", f"data.synthetic.image_size={args.image_size}"]
    base += backbone_overrides(backbone, args.image_size)
    entry.update({"data": data, "image_size": size})
    key = json.dumps(base)
    if key not in baselines:
        try:
            baselines[key] = measure(compose_cfg(base + ["method=task"]), "fit", args, device)
        except Exception as exc:
            baselines[key] = error_record(exc)
    baseline = baselines[key]
    if method == "task":
        result = baseline
    else:
        result = measure(compose_cfg(base + [f"method={method}"] + extra), spec["phase"], args, device)
    entry.update(result)
    if "samples_per_s" in baseline and "samples_per_s" in result:
        ratio = result["samples_per_s"] / baseline["samples_per_s"]
        entry["throughput_ratio_to_task"] = round(ratio, 4)
        entry["time_ratio_to_task"] = round(1 / ratio, 4)
        entry["task_samples_per_s"] = baseline["samples_per_s"]
        entry["task_data_loading_share"] = baseline.get("data_loading", {}).get("share")
    elif "error" in baseline:
        entry["task_error"] = baseline["error"]


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    device = pick_device(args.device)
    if args.num_workers is None:
        args.num_workers = int(OmegaConf.load(ROOT / "configs" / "data" / "_common.yaml").num_workers)
    common = common_overrides(args, tmp)
    report: dict[str, Any] = {"benchmark": "throughput", "settings": run_settings(args, device), "results": {}}
    methods = args.methods.split(",")
    baselines: dict[str, dict[str, Any]] = {}
    started = time.time()
    for backbone in [b for b in args.backbones.split(",") if b]:
        per_backbone: dict[str, Any] = {}
        report["results"][backbone] = per_backbone
        try:
            kind = backbone_kind(backbone)
        except Exception as exc:  # unknown backbone config
            per_backbone["error"] = error_record(exc)["error"]
            continue
        per_backbone["task"] = None  # keeps "task" first in the JSON
        for method in methods:
            spec = METHODS[method]
            if kind not in spec["kinds"]:
                per_backbone[method] = {"skipped": f"{method} needs a {' or '.join(spec['kinds'])} backbone; "
                                                  f"{backbone} is a {kind} model"}
                continue
            entry: dict[str, Any] = {"task": kind, "phase": spec["phase"]}
            per_backbone[method] = entry
            try:
                measure_method(backbone, kind, method, entry, common, baselines, args, device)
            except Exception as exc:
                entry.update(error_record(exc))
        if per_backbone.get("task") is None:
            del per_backbone["task"]
    report["seconds"] = round(time.time() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.threads:
        torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)
    stdout = sys.stdout
    with tempfile.TemporaryDirectory(prefix="medmark-throughput-") as tmp, contextlib.redirect_stdout(sys.stderr):
        report = run(args, Path(tmp))  # anything printed on the way goes to stderr: stdout is the JSON
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text, file=stdout, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
