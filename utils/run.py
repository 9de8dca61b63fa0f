"""The body of ``train.py``: compose -> instantiate -> (validate untrained) -> fit -> test -> summary.

Kept out of ``train.py`` so the entry point stays thin and tests can call it with a
composed config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("medmark")


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
    if cfg.get("eval_untrained"):
        summary["untrained"] = _numbers(trainer.validate(module, datamodule=datamodule, verbose=False)[0])
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

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

    if trainer.is_global_zero:
        path = output_dir / "summary.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
        print(format_summary(summary), flush=True)
    metric = cfg.get("optimized_metric")
    if metric is None:
        return None
    return summary["best_score"] if summary["best_score"] is not None else summary["fit"].get(metric)
