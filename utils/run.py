"""The body of ``train.py``: compose -> instantiate -> (validate untrained) -> fit -> test -> summary.

Kept out of ``train.py`` so the entry point stays thin and tests can call it with a
composed config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("medmark")


class EpochClock(pl.Callback):
    """Wall time of each training epoch (its validation included), for ``summary.json``."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None


def _reset_peak_memory(device: torch.device) -> None:
    """Start this run's peak-memory count (a Hydra multirun runs every job in one process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets VmHWM, the peak resident set size of this process
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_memory(device: torch.device) -> tuple[float | None, str]:
    """(MiB, kind): CUDA ``max_memory_allocated`` on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1), "cuda_max_allocated"
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1), "cpu_peak_rss"
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return round(peak / (2**20 if os.uname().sysname == "Darwin" else 1024), 1), "cpu_peak_rss_process"
    except (ImportError, AttributeError):
        return None, "unknown"


def _finish_wandb(trainer: pl.Trainer) -> None:
    """Close this run's W&B run, so the next job of a multirun (same process) starts its own."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def instantiate_list(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-like group; ``null`` entries skipped."""
    objects = []
    for name, spec in (group or {}).items():
        if spec is not None and "_target_" in spec:
            log.debug("instantiating %s", name)
            objects.append(instantiate(spec))
    return objects


def redacted_config(cfg: DictConfig) -> dict:
    """Resolved config as plain dict, with every key listed in ``secret_keys`` replaced by a hash.

    This is what loggers (W&B config) receive: secrets never leave the owner kit.
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    for dotted in cfg.get("secret_keys") or []:
        node = plain
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict) and parts[-1] in node and node[parts[-1]] is not None:
            digest = hashlib.sha256(json.dumps(node[parts[-1]], sort_keys=True).encode()).hexdigest()[:16]
            node[parts[-1]] = f"<secret sha256:{digest}>"
    return plain


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value) if math.isfinite(float(value)) else None
    return dict(sorted(out.items()))


def format_summary(summary: dict[str, Any]) -> str:
    """A few human lines: the monitored metric (best, untrained), test metrics, where outputs are."""
    monitor = summary.get("monitor") or ""
    lines = [f"== {summary['task']} run finished in {summary['seconds']} s"]
    if summary.get("best_score") is not None:
        line = f"best {monitor}: {summary['best_score']:.4f}"
        untrained = (summary.get("untrained") or {}).get(monitor)
        if untrained is not None:
            line += f"  (untrained model: {untrained:.4f})"
        lines.append(line)
    if summary.get("test"):
        lines.append("test: " + ", ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in summary["test"].items()
                                          if v is not None and "/loss" not in k))
    lines.append(f"outputs: {summary['output_dir']} (summary.json, checkpoints/, figures/)")
    return "\n".join(lines)


def run_training(cfg: DictConfig) -> float | None:
    """Train/test as configured; write ``summary.json``; return ``cfg.optimized_metric``'s best value."""
    started = time.time()
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.method, backbone=cfg.backbone, loss=cfg.loss, _recursive_=False)
    if cfg.get("init_weights"):
        module.load_model_weights(cfg.init_weights)
    callbacks = instantiate_list(cfg.get("callbacks"))
    epoch_clock = EpochClock()
    callbacks.append(epoch_clock)
    loggers = instantiate_list(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    public_config = redacted_config(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(public_config))

    # Bad data stops the run here, before any training, naming the files at fault. Only the
    # first process reads ahead; under torchrun the others meet it inside fit() after
    # Lightning's own prepare_data barrier (they must not generate data concurrently).
    if trainer.local_rank == 0 and trainer.node_rank == 0:
        datamodule.prepare_data()
        datamodule.setup("fit")
    for logger in trainer.loggers:
        logger.log_hyperparams(public_config)

    summary: dict[str, Any] = {"task": cfg.data.task, "output_dir": str(output_dir)}
    if datamodule.splits:
        summary["data"] = {"root": str(datamodule.dataset_root()),
                           **{f"num_{name}": len(split) for name, split in datamodule.splits.items()}}
    device = trainer.strategy.root_device
    _reset_peak_memory(device)
    if cfg.get("eval_untrained"):
        summary["untrained"] = _numbers(trainer.validate(module, datamodule=datamodule, verbose=False)[0])
    fit_started = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_seconds = time.time() - fit_started

    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint else ""
    summary.update(
        {
            "monitor": cfg.get("optimized_metric"),
            "best_score": float(checkpoint.best_model_score) if checkpoint and checkpoint.best_model_score is not None else None,
            "best_checkpoint": best_path or None,
            "last_checkpoint": str(Path(checkpoint.dirpath) / "last.ckpt") if checkpoint and checkpoint.save_last else None,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "fit": _numbers(trainer.callback_metrics),
        }
    )
    if cfg.get("test"):
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None, verbose=False)
        summary["test"] = _numbers(results[0]) if results else {}
    summary["seconds"] = round(time.time() - started, 1)
    network = getattr(module, "model", module)
    peak_mib, peak_kind = _peak_memory(device)
    summary["resources"] = {
        "num_parameters": sum(p.numel() for p in network.parameters()),
        "num_trainable_parameters": sum(p.numel() for p in network.parameters() if p.requires_grad),
        "num_parameters_module": sum(p.numel() for p in module.parameters()),  # + generator, references, LPIPS...
        "fit_seconds": round(fit_seconds, 1),
        "epochs_timed": len(epoch_clock.seconds),
        "seconds_per_epoch": (round(sum(epoch_clock.seconds) / len(epoch_clock.seconds), 2)
                              if epoch_clock.seconds else None),
        "peak_memory_mib": peak_mib,
        "peak_memory_kind": peak_kind,
        "device": str(device),
    }

    if trainer.is_global_zero:
        path = output_dir / "summary.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
        print(format_summary(summary), flush=True)
    _finish_wandb(trainer)
    metric = cfg.get("optimized_metric")
    if metric is None:
        return None
    return summary["best_score"] if summary["best_score"] is not None else summary["fit"].get(metric)
