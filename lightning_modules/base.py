"""Shared base of every objective: a model, a set of weighted loss terms, an optimiser.

The model and the loss terms are given as *configs* (``backbone``, ``loss`` groups) and
built here, so a checkpoint carries everything needed to rebuild its module:
``Module.load_from_checkpoint(path)`` works without Hydra. The total loss is
``sum(term.weight * term(outputs, batch))`` and every term is logged on its own as
``<stage>/loss/<name>``; callbacks may change ``term.weight`` while training. A module may
give a term only some rows of the batch (:meth:`ObjectiveModule.loss_rows`, e.g. StealthMark's
key samples) and choose the terms summed by default (:meth:`ObjectiveModule.default_loss_terms`).

Speed options (``configs/speed``: ``channels_last``, ``compile``) are applied when a Trainer
sets the module up (:meth:`ObjectiveModule.configure_model`); they are runtime choices, not
hyper-parameters, so they are not saved and never change a checkpoint's weight names.
"""

from __future__ import annotations

from pathlib import Path

from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch import LightningModule
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from losses.base import LossTerm
from models.safe_reader import ModelFileError, model_state, read_checkpoint


SPEED_DEFAULTS: dict[str, Any] = {
    "channels_last": False, "compile": False, "compile_mode": "default", "compile_backend": "inductor",
}


def to_plain(config: Any) -> Any:
    """DictConfig / ListConfig -> plain containers (resolved); anything else unchanged."""
    if isinstance(config, (DictConfig, ListConfig)):
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


def _batch_size(batch: dict[str, Any]) -> int | None:
    return len(batch["image"]) if "image" in batch else None


def select_rows(data: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """Sub-batch: tensors (and lists) whose first dimension is the batch, indexed by bool ``rows`` (B)."""
    size = int(rows.shape[0])
    index = rows.nonzero(as_tuple=True)[0]
    out: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            out[name] = value[rows]
        elif isinstance(value, (list, tuple)) and len(value) == size:
            out[name] = [value[i] for i in index.tolist()]
        else:
            out[name] = value
    return out


class ObjectiveModule(LightningModule):
    """Base LightningModule: builds ``self.model`` and ``self.loss_terms`` from configs.

    Args:
        backbone: model config (``configs/backbone``), instantiated with Hydra.
        loss: loss-term configs (``configs/loss``).
        optimizer: optimiser config without ``params`` (e.g. ``{_target_: torch.optim.AdamW, lr: 1e-3}``).
        scheduler: optional LR-scheduler config without ``optimizer``; ``scheduler_interval``
            ``epoch`` or ``step``.
        speed: runtime speed options (``configs/speed``): ``channels_last`` (NHWC layout for the
            4-D weights of this module and for ``batch["image"]``), ``compile`` (compile
            ``self.model`` in place with ``nn.Module.compile``: the weights keep their names, no
            ``_orig_mod.`` prefix), ``compile_mode``, ``compile_backend``. Not saved.
        compile: legacy alias of ``speed.compile`` (older checkpoints' hyper-parameters carry it).
        lr_multipliers: ``{name fragment: factor}``; parameters whose name contains a fragment
            train at ``factor × lr`` in their own group (first match wins), e.g.
            ``{position_table: 30}`` for a learned position table, ``{image_encoder: 0.1}`` for SAM.
    """

    def __init__(
        self,
        backbone: dict,
        loss: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        scheduler_interval: str = "epoch",
        compile: bool = False,
        lr_multipliers: dict[str, float] | None = None,
        speed: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(
            {
                "backbone": to_plain(backbone),
                "loss": to_plain(loss),
                "optimizer": to_plain(optimizer),
                "scheduler": to_plain(scheduler),
                "scheduler_interval": scheduler_interval,
                "lr_multipliers": {str(k): float(v) for k, v in (to_plain(lr_multipliers) or {}).items()},
            }
        )
        self.model = instantiate(self.hparams.backbone)
        self.loss_terms = build_loss_terms(self.hparams.loss)
        self.speed = {**SPEED_DEFAULTS, **(to_plain(speed) or {})}
        unknown = sorted(set(self.speed) - set(SPEED_DEFAULTS))
        if unknown:
            raise ValueError(f"speed: unknown option(s) {unknown}; known: {sorted(SPEED_DEFAULTS)}")
        if compile:
            self.speed["compile"] = True
        self._speed_applied = False

    # -- speed options ---------------------------------------------------------------------
    def configure_model(self) -> None:
        """Apply ``speed`` once, when a Trainer sets the module up (fit, validate, test)."""
        if self._speed_applied:
            return
        self._speed_applied = True
        if self.speed["channels_last"]:
            # Every 4-D weight/buffer of the module (network, generator, surrogates, LPIPS...);
            # later .to(device) calls preserve the layout.
            self.to(memory_format=torch.channels_last)
        if self.speed["compile"]:
            # In place (nn.Module.compile): self.model stays the same object, state-dict keys and
            # checkpoints stay free of the `_orig_mod.` prefix torch.compile(module) would add.
            self.model.compile(mode=None if self.speed["compile_mode"] in (None, "default") else self.speed["compile_mode"],
                               backend=self.speed["compile_backend"] or "inductor")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.speed["channels_last"] and isinstance(batch, dict):
            image = batch.get("image")
            if isinstance(image, torch.Tensor) and image.ndim == 4:
                batch = {**batch, "image": image.contiguous(memory_format=torch.channels_last)}
        return batch

    def load_model_weights(self, path: str | Path) -> None:
        """Initialise ``self.model`` from the ``model.*`` weights of a Lightning checkpoint (strict).

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a readable checkpoint, or its weights do not fit this model (named).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"init_weights: {path} does not exist")
        # Only the weights are read (models.safe_reader: weights_only=True); the file's stored
        # config is never built -- this module's own backbone config (configs/) is.
        try:
            checkpoint = read_checkpoint(path)
        except ModelFileError as err:
            raise ValueError(f"init_weights: {path} is not a readable PyTorch checkpoint "
                             f"({str(err).removeprefix(f'{path}: ')})") from None
        try:
            self.model.load_state_dict(model_state(checkpoint), strict=True)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"init_weights: the weights in {path} do not fit this backbone: {str(err)[:400]}") from None

    def loss_weights(self) -> dict[str, float]:
        return {name: term.weight for name, term in self.loss_terms.items()}

    def default_loss_terms(self) -> list[str] | None:
        """Names of the terms :meth:`compute_loss` sums when the caller names none; None = all."""
        return None

    def loss_rows(self, name: str, term: LossTerm, batch: dict[str, Any]) -> torch.Tensor | None:
        """Rows of the batch the term ``name`` sees: a B bool mask, or None for all rows (default).

        A term whose mask selects no row is skipped (neither summed nor logged).
        """
        return None

    def compute_loss(
        self, outputs: dict[str, Any], batch: dict[str, Any], stage: str, terms: list[str] | None = None
    ) -> torch.Tensor:
        """Weighted sum of the (selected) terms, each on its rows (:meth:`loss_rows`); logs each term and the total."""
        if terms is None:
            terms = self.default_loss_terms()
        total = None
        for name, term in self.loss_terms.items():
            if terms is not None and name not in terms:
                continue
            if term.weight == 0.0:
                continue
            rows = self.loss_rows(name, term, batch)
            if rows is None:
                term_outputs, term_batch = outputs, batch
            elif bool(rows.any()):
                term_outputs, term_batch = select_rows(outputs, rows), select_rows(batch, rows)
            else:
                continue
            value = term(term_outputs, term_batch)
            self.log(f"{stage}/loss/{name}", value.detach(), on_step=stage == "train", on_epoch=True,
                     batch_size=_batch_size(term_batch), sync_dist=stage != "train")
            total = term.weight * value if total is None else total + term.weight * value
        if total is None:
            raise ValueError(f"every loss term has weight 0 (or no rows) at stage {stage}")
        self.log(f"{stage}/loss", total.detach(), on_step=stage == "train", on_epoch=True, prog_bar=True,
                 batch_size=_batch_size(batch), sync_dist=stage != "train")
        return total

    def on_train_epoch_start(self) -> None:
        # Logged here rather than by LearningRateMonitor, which refuses to run without a logger.
        for i, group in enumerate(self.optimizers().optimizer.param_groups if hasattr(self.optimizers(), "optimizer")
                                  else self.optimizers().param_groups):
            self.log(f"lr/group{i}", group["lr"], on_step=False, on_epoch=True)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters in optimiser groups: the rest, then one group per ``lr_multipliers`` entry.

        Raises:
            ValueError: a multiplier whose name fragment matches no trainable parameter (a typo
                would otherwise silently train everything at the base rate).
        """
        multipliers = self.hparams.get("lr_multipliers") or {}
        base_lr = float(self.hparams.optimizer.get("lr", 1e-3))
        groups: dict[str | None, list[nn.Parameter]] = {None: [], **{k: [] for k in multipliers}}
        for name, param in self.named_parameters():
            if param.requires_grad:
                groups[next((k for k in multipliers if k in name), None)].append(param)
        unused = [k for k in multipliers if not groups[k]]
        if unused:
            raise ValueError(f"method.lr_multipliers: no trainable parameter name contains {unused}")
        out: list[dict[str, Any]] = [{"params": groups[None]}] if groups[None] else []
        out += [{"params": groups[k], "lr": base_lr * multipliers[k], "name": k} for k in multipliers]
        return out

    def configure_optimizers(self):
        # a partial: Hydra would wrap the param-group dicts (holding tensors) in DictConfigs
        optimizer = instantiate(self.hparams.optimizer, _partial_=True)(self.parameter_groups())
        if not self.hparams.scheduler:
            return optimizer
        scheduler = instantiate(self.hparams.scheduler, optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval}}
