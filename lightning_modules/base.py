"""Shared base of every objective: a model, a set of weighted loss terms, an optimiser.

The model and the loss terms are given as *configs* (``backbone``, ``loss`` groups) and
built here, so a checkpoint carries everything needed to rebuild its module:
``Module.load_from_checkpoint(path)`` works without Hydra. The total loss is
``sum(term.weight * term(outputs, batch))`` and every term is logged on its own as
``<stage>/loss/<name>``; callbacks may change ``term.weight`` while training.
"""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch import LightningModule
from omegaconf import DictConfig, OmegaConf
from torch import nn

from losses.base import LossTerm


def to_plain(config: Any) -> Any:
    """DictConfig -> plain containers (resolved); anything else unchanged."""
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return config


def build_loss_terms(loss: dict | DictConfig | None) -> nn.ModuleDict:
    """Instantiate ``{name: {_target_: ..., weight: ...}}``; ``null`` entries are dropped."""
    terms = nn.ModuleDict()
    for name, spec in (to_plain(loss) or {}).items():
        if spec is None:
            continue
        term = instantiate(spec)
        if not isinstance(term, LossTerm):
            raise TypeError(f"loss.{name}: {spec.get('_target_')} is not a losses.LossTerm")
        terms[name] = term
    if not terms:
        raise ValueError("no loss terms configured (the `loss` config group is empty)")
    return terms


class ObjectiveModule(LightningModule):
    """Base LightningModule: builds ``self.model`` and ``self.loss_terms`` from configs.

    Args:
        backbone: model config (``configs/backbone``), instantiated with Hydra.
        loss: loss-term configs (``configs/loss``).
        optimizer: optimiser config without ``params`` (e.g. ``{_target_: torch.optim.AdamW, lr: 1e-3}``).
        scheduler: optional LR-scheduler config without ``optimizer``; ``scheduler_interval``
            ``epoch`` or ``step``.
        compile: wrap the model in ``torch.compile`` (GPU speed option).
    """

    def __init__(
        self,
        backbone: dict,
        loss: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        scheduler_interval: str = "epoch",
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(
            {
                "backbone": to_plain(backbone),
                "loss": to_plain(loss),
                "optimizer": to_plain(optimizer),
                "scheduler": to_plain(scheduler),
                "scheduler_interval": scheduler_interval,
                "compile": compile,
            }
        )
        self.model = instantiate(self.hparams.backbone)
        self.loss_terms = build_loss_terms(self.hparams.loss)
        if compile:
            self.model = torch.compile(self.model)

    def loss_weights(self) -> dict[str, float]:
        return {name: term.weight for name, term in self.loss_terms.items()}

    def compute_loss(
        self, outputs: dict[str, Any], batch: dict[str, Any], stage: str, terms: list[str] | None = None
    ) -> torch.Tensor:
        """Weighted sum of the (selected) terms; logs each term and the total."""
        batch_size = len(batch["image"]) if "image" in batch else None
        total = None
        for name, term in self.loss_terms.items():
            if terms is not None and name not in terms:
                continue
            if term.weight == 0.0:
                continue
            value = term(outputs, batch)
            self.log(f"{stage}/loss/{name}", value.detach(), on_step=stage == "train", on_epoch=True,
                     batch_size=batch_size, sync_dist=stage != "train")
            total = term.weight * value if total is None else total + term.weight * value
        if total is None:
            raise ValueError(f"every loss term has weight 0 at stage {stage}")
        self.log(f"{stage}/loss", total.detach(), on_step=stage == "train", on_epoch=True, prog_bar=True,
                 batch_size=batch_size, sync_dist=stage != "train")
        return total

    def on_train_epoch_start(self) -> None:
        # Logged here rather than by LearningRateMonitor, which refuses to run without a logger.
        for i, group in enumerate(self.optimizers().optimizer.param_groups if hasattr(self.optimizers(), "optimizer")
                                  else self.optimizers().param_groups):
            self.log(f"lr/group{i}", group["lr"], on_step=False, on_epoch=True)

    def configure_optimizers(self):
        optimizer = instantiate(self.hparams.optimizer, params=[p for p in self.parameters() if p.requires_grad])
        if not self.hparams.scheduler:
            return optimizer
        scheduler = instantiate(self.hparams.scheduler, optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval}}
