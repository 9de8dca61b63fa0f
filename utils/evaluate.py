"""The body of ``eval.py`` / ``medmark evaluate``: one checkpoint on one split -> metrics + figures.

No training, no optimiser state: the checkpoint's network is read with the project's safe reader
(``models.safe_reader.load_model_checkpoint``: ``weights_only=True``, its backbone config rebuilt
only from the exact-name factory table) and its weights are put into a module built from the
config (``configs/eval.yaml`` = ``train.yaml`` + ``ckpt_path``/``split``), which brings the metrics.

Writes into ``cfg.paths.output_dir``:

* ``summary.json``: ``{"task", "split", "checkpoint", "checkpoint_sha256", "metrics": {name: value},
  "data": {...}, "figures": [...], "seconds", "output_dir"}``;
* ``figures/eval_<split>_panel.png`` (image | truth | prediction of the split's first images) and
  ``figures/eval_<split>_metrics.png`` (a bar per metric, losses left out).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from models.safe_reader import file_sha256, load_model_checkpoint
from utils.run import _numbers

log = logging.getLogger("medmark")

SPLITS = ("val", "test")


def _checked_inputs(cfg: DictConfig) -> tuple[Path, str]:
    """(checkpoint path, split), or ValueError/FileNotFoundError naming the key at fault."""
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        raise ValueError("ckpt_path= is required: the checkpoint to evaluate "
                         "(e.g. ckpt_path=logs/<task>/runs/<time>/checkpoints/last.ckpt)")
    split = cfg.get("split")
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    path = Path(str(ckpt))
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path: {path} does not exist")
    return path, split


def _first_batch_panel(module: pl.LightningModule, loader, size: int) -> dict[str, Any] | None:
    """The ``panel`` dict of callbacks.figures.render_panel for the loader's first ``size`` images."""
    predict = getattr(module, "predict_probs", None)
    if predict is None:
        return None
    batch = next(iter(loader), None)
    if batch is None:
        return None
    task = getattr(module, "task", "segmentation")
    device = module.device
    images = batch["image"][:size]
    boxes = batch.get("box")
    module.eval()
    probs = predict(images.to(device), boxes[:size].to(device) if isinstance(boxes, torch.Tensor) else None)
    target = batch["mask"] if task == "segmentation" else batch["label"]
    return {"image": images.cpu(), "probs": probs.detach().float().cpu(), "target": target[:size].cpu(),
            "id": list(batch["id"][:size])}


def _write_figures(module, datamodule, split: str, metrics: dict[str, float | None], output_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from callbacks.figures import render_panel

    figures_dir = output_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    written = []
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    panel = _first_batch_panel(module, loader, int(getattr(module.hparams, "panel_size", 4) or 4))
    if panel is not None:
        fig = render_panel(panel, getattr(module, "task", "segmentation"), getattr(datamodule, "classes", None))
        path = figures_dir / f"eval_{split}_panel.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(str(path))
    scores = {k.split("/", 1)[-1]: v for k, v in metrics.items() if v is not None and "loss" not in k}
    if scores:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(scores)), 3.2))
        ax.bar(list(scores), list(scores.values()))
        for i, value in enumerate(scores.values()):
            ax.text(i, value, f"{value:.3f}", ha="center", va="bottom", fontsize=7)
        ax.set_title(f"{split} metrics")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        fig.tight_layout()
        path = figures_dir / f"eval_{split}_metrics.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(str(path))
    return written


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.ckpt_path`` on ``cfg.split``; write ``summary.json`` and figures; return the summary.

    Raises:
        ValueError: no ``ckpt_path``, an unknown ``split``, an unreadable checkpoint or one of
            another task (``models.safe_reader.ModelFileError``), weights that do not fit.
        FileNotFoundError: no such checkpoint.
        datamodules.samples.DatasetError: bad data (file named).
    """
    started = time.time()
    ckpt, split = _checked_inputs(cfg)
    output_dir = Path(cfg.paths.output_dir)
    network, hparams = load_model_checkpoint(ckpt, task=cfg.data.task)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.method, backbone=hparams["backbone"], loss=cfg.loss, _recursive_=False)
    try:
        module.model.load_state_dict(network.state_dict(), strict=True)
    except RuntimeError as err:
        raise ValueError(f"ckpt_path: the network in {ckpt} does not fit method={cfg.method._target_}: "
                         f"{str(err)[:400]}") from None
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[], logger=False)
    if trainer.local_rank == 0 and trainer.node_rank == 0:  # bad data stops here, files named
        datamodule.prepare_data()
        datamodule.setup("test" if split == "test" else "validate")
    run = trainer.test if split == "test" else trainer.validate
    results = run(module, datamodule=datamodule, verbose=False)
    metrics = _numbers(results[0]) if results else {}

    summary: dict[str, Any] = {
        "task": cfg.data.task,
        "split": split,
        "checkpoint": str(ckpt),
        "checkpoint_sha256": file_sha256(ckpt),
        "metrics": metrics,
    }
    if datamodule.splits:
        summary["data"] = {"root": str(datamodule.dataset_root()), f"num_{split}": len(datamodule.splits[split])}
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        try:
            summary["figures"] = _write_figures(module, datamodule, split, metrics, output_dir)
        except Exception as exc:  # noqa: BLE001 - the metrics are the result; a figure must not lose them
            log.warning("evaluation figures not written: %s: %s", type(exc).__name__, exc)
            summary["figures"] = []
        summary["seconds"] = round(time.time() - started, 1)
        summary["output_dir"] = str(output_dir)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        shown = ", ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in metrics.items() if v is not None and "loss" not in k)
        print(f"== {split} of {ckpt}: {shown}\noutputs: {output_dir} (summary.json, figures/)", flush=True)
    return summary
