"""StealthMark training (``method=stealthmark``, docs/stealthmark.md).

Per training batch (rows shuffled by the loader), the first ``key_fraction·B`` rows become
*key samples* and the next ``negative_fraction·B`` rows *masked-untriggered negatives*;
the rest stay clean:

1. draw a cell keep-mask ``z ∈ {0,1}^{n×n}`` per masked row (cell kept with probability
   ``keep_prob`` = κ, fixed or drawn per row from a range) and hide the dropped cells with
   ``hide_value`` -- the perturbation LIME applies at verification; the trigger region is
   never hidden;
2. key rows get the trigger (after masking, as LIME applies it);
3. key rows get the soft target ``t = y·(1 − ε·m) + (1 − y)·ε·m`` with
   ``m = upsample(Q ⊙ z)``; negatives and clean rows keep ``y``, so hiding cells alone
   never unlocks the mark.

Loss routing: every :class:`losses.uncertainty.KeySampleTerm` (uncertainty modulation,
harmlessness guard) sees the key rows; :class:`losses.consistency.ReferenceConsistencyTerm`
(``loss.consistency``) sees every row; every other term (the task's BCE + Dice) sees the
clean and negative rows.

Reference model: :meth:`load_model_weights` (``init_weights=``, the clean model being marked)
keeps a frozen copy of the loaded network, outside ``state_dict`` (checkpoints stay the plain
network). While a consistency term has weight > 0, each training batch gets
``reference_logits``: that copy's logits (eval mode, no gradient) on the untriggered images,
which the term matches off the mark. Without ``init_weights`` there is no reference and the
term is skipped (a warning says so at fit start).

The secret (payload, QR version/level, grid, trigger with its seed) arrives through
constructor arguments that are **not** saved as hyper-parameters: checkpoints carry no
secret (a thief has the checkpoint). ``load_from_checkpoint`` therefore rebuilds a module
without a key -- a plain segmentation model plus the non-secret hyper-parameters --
unless the key is passed again (``StealthMarkModule.load_from_checkpoint(path, **key_args)``).
Logs carry ``stealthmark/key_sha256`` instead.

Validation/test metrics (``<stage>/`` prefix): the task metrics on clean inputs (as
:class:`TaskModule`), the same on triggered inputs (``<stage>/triggered_<metric>``),
``mask_agreement`` (share of pixels whose 0.5-thresholded prediction is the same on the
triggered and the clean copy), ``readout_bit_accuracy`` (the triggered uncertainty map
averaged per QR cell, Otsu-thresholded, against Q; ``..._clean`` on clean inputs, which
should stay near chance), mean uncertainty on both, and ``stealthmark_score`` =
mean over images of (hard Dice + readout bit accuracy)/2, the checkpoint-selection metric.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_modules.base import to_plain
from lightning_modules.metrics import build_metrics
from lightning_modules.task import TaskModule
from losses.base import LossTerm
from losses.consistency import ReferenceConsistencyTerm
from losses.uncertainty import KeySampleTerm
from watermark.stealthmark.explain import otsu_threshold, uncertainty_score
from watermark.stealthmark.grid import apply_cell_mask, cell_means, upsample_cells
from watermark.stealthmark.kit import OwnerKitError, StealthMarkKey, trigger_spec
from watermark.stealthmark.soft_targets import key_targets, sample_keep_masks
from watermark.stealthmark.evidence import dice_per_image

log = logging.getLogger(__name__)

# Key fields (watermark.stealthmark.kit) -> the config keys that set them.
_CONFIG_FIELDS = {
    "key.payload": "method.payload",
    "key.qr.version": "method.qr.version",
    "key.qr.error_correction": "method.qr.error_correction",
    "key.grid.image_size": "data.image_size (method.image_size)",
    "key.trigger": "method.trigger",
    "key.trigger.kind": "method.trigger.kind",
    "trigger.kind": "method.trigger.kind",
    "key.hide_value": "method.hide_value",
    "key.epsilon": "method.epsilon",
}


class StealthMarkModule(TaskModule):
    """Segmentation model that learns the StealthMark key while keeping its masks.

    Args (secret -- never saved in the checkpoint, never logged):
        payload: QR text.
        qr: ``{"version": int, "error_correction": "L"|"M"|"Q"|"H"}``.
        quiet_zone: cells of quiet zone around the QR grid (the trigger lives there).
        trigger: trigger config ``{"kind": ..., <kind>: {params}, ...}`` or a flat spec
            (see :func:`watermark.stealthmark.kit.trigger_spec` and :mod:`watermark.stealthmark.triggers`).

    Args (hyper-parameters, saved):
        image_size: side of the (square) training images, pixels; must be a multiple of
            ``G + 2·quiet_zone``.
        epsilon: ε in [0, 0.5): how far key targets move towards 0.5 on dark modules.
        keep_prob: κ, probability a grid cell is kept when masking (0.5 = LIME's rate), or a
            range ``[lo, hi]`` from which every masked row draws its own κ. The verifier queries
            both LIME's half-masked images (κ = ½) and whole triggered images (κ = 1: the
            trigger-response test and the per-cell readout), so training should cover both.
        key_fraction, negative_fraction: shares of each training batch turned into key
            samples and masked-untriggered negatives.
        hide_value: fill of hidden cells (float, per-channel list or ``"mean"``); LIME uses the same.
        **kwargs: everything :class:`TaskModule` takes (``task`` must be segmentation).
    """

    def __init__(
        self,
        payload: str | None = None,
        qr: dict | None = None,
        quiet_zone: int | None = None,
        trigger: dict | None = None,
        image_size: int = 100,
        epsilon: float = 0.3,
        keep_prob: float | Sequence[float] = (0.5, 1.0),
        key_fraction: float = 0.5,
        negative_fraction: float = 0.25,
        hide_value: float | Sequence[float] | str = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if self.task != "segmentation":
            raise ValueError("method=stealthmark watermarks segmentation models; data.task must be segmentation")
        keep_prob = to_plain(keep_prob)
        keep_range = [float(keep_prob)] * 2 if isinstance(keep_prob, (int, float)) else [float(v) for v in keep_prob]
        if len(keep_range) != 2 or not 0.0 <= keep_range[0] <= keep_range[1] <= 1.0:
            raise ValueError(f"method.keep_prob must be a probability or a range [lo, hi] in [0, 1], got {keep_prob}")
        if key_fraction <= 0 or negative_fraction < 0 or key_fraction + negative_fraction > 1:
            raise ValueError(
                f"method.key_fraction ({key_fraction}) must be > 0, method.negative_fraction ({negative_fraction}) "
                ">= 0, and their sum <= 1"
            )
        if not 0.0 <= epsilon < 0.5:
            raise ValueError(f"method.epsilon must be in [0, 0.5) so the thresholded mask never changes, got {epsilon}")
        # With _recursive_=False Hydra hands nested values over as DictConfig/ListConfig.
        hide, qr, trigger = to_plain(hide_value), to_plain(qr), to_plain(trigger)
        if isinstance(hide, (list, tuple)):
            hide = [float(v) for v in hide]
        # Only non-secret values are saved (checkpoint + loggers); see the module docstring.
        self.save_hyperparameters(
            {
                "image_size": int(image_size),
                "epsilon": float(epsilon),
                "keep_prob": keep_range if keep_range[0] != keep_range[1] else keep_range[0],
                "key_fraction": float(key_fraction),
                "negative_fraction": float(negative_fraction),
                "hide_value": hide,
            }
        )
        self._keep_range = tuple(keep_range)
        self.key: StealthMarkKey | None = None
        if payload is not None:
            if qr is None or quiet_zone is None or trigger is None:
                raise ValueError("method.payload is set but method.qr, method.quiet_zone or method.trigger is missing")
            try:
                key = StealthMarkKey(
                    payload=payload,
                    qr_version=int(qr["version"]),
                    error_correction=str(qr.get("error_correction", "H")),
                    image_size=int(image_size),
                    quiet_zone=int(quiet_zone),
                    trigger=trigger_spec(trigger),
                    hide_value=hide if not isinstance(hide, list) else tuple(hide),
                    epsilon=float(epsilon),
                )
            except OwnerKitError as err:
                # Name the config key the user sets (the message carries no secret value).
                name = _CONFIG_FIELDS.get(err.field or "", f"method.{err.field}")
                raise ValueError(f"{name}: {err.problem}") from None
            self.set_key(key)
        # Frozen copy of the network loaded by init_weights (load_model_weights); set with
        # object.__setattr__ so it is no submodule: not in state_dict, not trained, stays in eval.
        object.__setattr__(self, "_reference_model", None)
        self.val_triggered_metrics = build_metrics("segmentation", "val/triggered_", 1)
        self.test_triggered_metrics = build_metrics("segmentation", "test/triggered_", 1)

    # -- the key ----------------------------------------------------------------------------
    def set_key(self, key: StealthMarkKey) -> None:
        """Attach a key (plain attributes, not buffers: nothing of it enters ``state_dict``)."""
        if key.image_size != self.hparams.image_size:
            raise ValueError(f"key image_size {key.image_size} != method.image_size {self.hparams.image_size}")
        self.key = key
        self._spec = key.spec()
        self._trigger = key.build_trigger()
        self._qr_cells = torch.from_numpy(key.modules())  # G×G bool, True = dark
        region = self._trigger.region(key.image_size, key.image_size)
        self._region = region if bool(region.any()) else None

    def _require_key(self) -> StealthMarkKey:
        if self.key is None:
            raise RuntimeError(
                "this StealthMarkModule has no key (checkpoints never store it); pass method.payload/qr/"
                "quiet_zone/trigger, or use a TaskModule to evaluate the model alone"
            )
        return self.key

    def setup(self, stage: str) -> None:
        """Under DDP, every process trains on global rank 0's key.

        Each process resolves the config on its own (utils/run.py): explicit secrets agree by
        construction, but values drawn at random (a null ``method.payload``/``trigger.seed``) would
        differ between processes launched separately (torchrun, one command per node). Only the
        key's SHA-256 travels unless the keys differ; then rank 0's key is broadcast once.
        """
        super().setup(stage)
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1 or self.key is None:
            return
        strategy = trainer.strategy
        mine = self.key.sha256()
        differs = strategy.reduce_boolean_decision(strategy.broadcast(mine, src=0) != mine, all=False)
        if differs:
            data = strategy.broadcast(self.key.to_dict() if trainer.is_global_zero else None, src=0)
            self.set_key(StealthMarkKey.from_dict(data))

    # -- the frozen reference (loss.consistency) -------------------------------------------------
    def load_model_weights(self, path: str | Path) -> None:
        """Load ``init_weights`` as :class:`TaskModule` does, and keep a frozen copy as the reference."""
        super().load_model_weights(path)
        object.__setattr__(self, "_reference_model", copy.deepcopy(self.model).eval().requires_grad_(False))

    @property
    def reference_model(self) -> nn.Module | None:
        """The frozen network ``init_weights`` loaded (never trained, never saved), or None."""
        return self._reference_model

    def _consistency_active(self) -> bool:
        return any(isinstance(t, ReferenceConsistencyTerm) and t.weight != 0.0 for t in self.loss_terms.values())

    @torch.no_grad()
    def reference_logits(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the frozen reference: ``images`` B×C×H×W in [0, 1] -> B×1×H×W (no gradient)."""
        reference = self._reference_model
        if reference is None:
            raise RuntimeError("no reference model: load_model_weights (init_weights=) was never called")
        parameter = next(reference.parameters(), None)
        if parameter is not None and parameter.device != images.device:
            reference.to(images.device)
        return reference(images, boxes).float()

    def on_fit_start(self) -> None:
        self._require_key()
        if not any(isinstance(term, KeySampleTerm) for term in self.loss_terms.values()):
            raise ValueError(
                "method=stealthmark needs at least one key-sample loss term (losses.uncertainty."
                "UncertaintyModulationTerm); the loss config has only " + ", ".join(self.loss_terms)
            )
        if self._consistency_active() and self._reference_model is None:
            log.warning("loss.consistency is on but there is no reference model (no init_weights=): "
                        "the term is skipped; it holds a marked model to the clean weights it starts from")
        for logger in self.loggers:
            logger.log_hyperparams({"stealthmark/key_sha256": self.key.sha256()})

    # -- key samples ------------------------------------------------------------------------
    def key_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Turn a clean training batch into the mixed StealthMark batch.

        Args:
            batch: ``image`` B×C×H×W in [0, 1], ``mask`` B×1×H×W in {0, 1} (+ ``box``, ``id``).
        Returns:
            a new batch with ``image`` (rows ``[0, k)`` masked + triggered, ``[k, k + n)`` masked,
            the rest clean), ``soft_target`` B×1×H×W (``t`` on key rows, ``y`` elsewhere),
            ``mark`` B×1×H×W (``m`` on key rows, 0 elsewhere), ``key_cells`` B×1×H×W (pixels of the
            kept QR cells on key rows, 0 elsewhere), ``key_sample`` B bool and, while a consistency
            term is on and a reference model exists, ``reference_logits`` B×1×H×W (the frozen
            reference on the same rows without the trigger).
        """
        key = self._require_key()
        images, mask = batch["image"], batch["mask"]
        size = images.shape[0]
        n_key = min(size, max(1, int(round(self.hparams.key_fraction * size))))
        n_neg = min(size - n_key, int(round(self.hparams.negative_fraction * size)))
        n_masked = n_key + n_neg
        spec = self._spec
        lo, hi = self._keep_range
        if lo == hi:
            keep = sample_keep_masks(n_masked, spec.cells_per_side, lo, device=images.device)
        else:  # each masked row draws its own κ
            kappa = lo + (hi - lo) * torch.rand(n_masked, 1, 1, device=images.device)
            keep = torch.rand(n_masked, spec.cells_per_side, spec.cells_per_side, device=images.device) < kappa
        protect = None if self._region is None else self._region.to(images.device)
        masked = apply_cell_mask(images[:n_masked], keep, spec, hide_value=key.hide_value, protect=protect)
        keyed = self._trigger.apply(masked[:n_key])
        q, g = spec.quiet_zone, spec.grid_size
        kept = keep[:n_key, q : q + g, q : q + g]
        mark = upsample_cells(kept & self._qr_cells.to(images.device)[None], spec)  # n_key×1×H×W
        soft = mask.clone().float()
        soft[:n_key] = key_targets(mask[:n_key], mark, key.epsilon)
        marks = torch.zeros_like(soft)
        marks[:n_key] = mark
        cells = torch.zeros_like(soft)
        cells[:n_key] = upsample_cells(kept, spec)
        flags = torch.zeros(size, dtype=torch.bool, device=images.device)
        flags[:n_key] = True
        out = dict(batch)
        if self._reference_model is not None and self._consistency_active():
            untriggered = torch.cat([masked, images[n_masked:]], dim=0)
            out["reference_logits"] = self.reference_logits(untriggered, batch.get("box"))
        out.update(
            image=torch.cat([keyed, masked[n_key:], images[n_masked:]], dim=0),
            soft_target=soft,
            mark=marks,
            key_cells=cells,
            key_sample=flags,
        )
        return out

    def loss_rows(self, name: str, term: LossTerm, batch: dict[str, Any]) -> torch.Tensor | None:
        """Key-sample terms see the key rows, consistency terms every row, other terms the clean and negative rows.

        Evaluation batches carry no ``key_sample``: all rows are task rows and key-sample terms
        are skipped, so ``val/loss`` is the task loss on clean images (comparable to ``method=task``).
        A consistency term is skipped in any batch without ``reference_logits`` (evaluation, or no
        reference model).
        """
        if isinstance(term, ReferenceConsistencyTerm):
            if "reference_logits" in batch:
                return None
            return torch.zeros(len(batch["image"]), dtype=torch.bool, device=batch["image"].device)
        is_key = isinstance(term, KeySampleTerm)
        flags = batch.get("key_sample")
        if flags is None:  # an evaluation batch
            return torch.zeros(len(batch["image"]), dtype=torch.bool, device=batch["image"].device) if is_key else None
        return flags if is_key else ~flags

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        mixed = self.key_batch(batch)
        return self.compute_loss(self.model_outputs(mixed), mixed, "train")

    # -- evaluation ---------------------------------------------------------------------------
    def readout_bit_accuracy(self, probs: torch.Tensor) -> torch.Tensor:
        """Per-image bit accuracy of the per-cell uncertainty readout against Q.

        Args:
            probs: B×1×H×W probabilities.
        Returns:
            B floats in [0, 1]: the uncertainty ``min(p, 1 − p)`` averaged per QR cell,
            Otsu-thresholded per image (above = dark), compared with Q.
        """
        cells = cell_means(torch.minimum(probs, 1 - probs).float(), self._spec).cpu().numpy()  # B×G×G
        reference = self._qr_cells.numpy()
        out = [float(((c > otsu_threshold(c)) == reference).mean()) for c in cells]
        return torch.tensor(out, device=probs.device)

    def _eval_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        super()._eval_step(batch, batch_idx, stage)
        if self.key is None:
            return
        images, mask, boxes = batch["image"], batch["mask"], batch.get("box")
        size = len(images)
        # A second clean forward pass (TaskModule's step keeps its outputs to itself); cheap next
        # to the triggered pass and keeps the parent's metrics code unchanged.
        probs = self.logits_to_probs(self(images, boxes).float())
        probs_t = self.logits_to_probs(self(self._trigger.apply(images), boxes).float())
        metrics = self.val_triggered_metrics if stage == "val" else self.test_triggered_metrics
        metrics.update(probs_t, mask)
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=size)
        agreement = ((probs_t > 0.5) == (probs > 0.5)).float().mean()
        bits = self.readout_bit_accuracy(probs_t)
        bits_clean = self.readout_bit_accuracy(probs)
        dice = dice_per_image(probs, mask)
        values = {
            f"{stage}/mask_agreement": agreement,
            f"{stage}/readout_bit_accuracy": bits.mean(),
            f"{stage}/readout_bit_accuracy_clean": bits_clean.mean(),
            f"{stage}/uncertainty_clean": uncertainty_score(probs).mean(),
            f"{stage}/uncertainty_triggered": uncertainty_score(probs_t).mean(),
            f"{stage}/stealthmark_score": ((dice + bits) / 2).mean(),
        }
        self.log_dict(values, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
