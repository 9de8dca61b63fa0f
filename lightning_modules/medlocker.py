"""MedLocker / MIAD-MARK: visible adversarial watermarks that mislead unauthorised diagnosis AI.

``method=medlocker`` and ``method=miadmark`` (docs/medlocker.md) share this module:

* **fit** trains the surrogate exactly like ``method=task`` (the ``task_terms`` loss terms,
  e.g. cross-entropy), unless ``surrogate_checkpoint`` gives a trained ``method=task``
  checkpoint (then run with ``trainer.max_epochs=0``). The surrogate is ``self.model``.
* **test** protects every test image. Per batch, the steps of
  :mod:`watermark.medlocker.protect` (``plan -> place -> perturb -> render``):

  1. the lesion region, from the lesion masks (dilated bounding boxes, MedLocker) and/or
     the surrogate's Grad-CAM thresholded at ``T/255`` (MIAD-MARK);
  2. the placement ``(x, y, alpha)``: *white-box* -- Adam on a continuous translation
     (``grid_sample``) and ``alpha = sigmoid(logit)`` minimising the loss terms
     ``placement_terms`` (``-CE`` over the surrogate ensemble + lesion-overlap penalty),
     several restarts, snapped to the nearest region-free integer position and
     re-checked exactly; or *black-box* -- the basin-hopping evolution search
     (:mod:`watermark.medlocker.blackbox_search`) against the surrogate (or ``blackbox.suspect``)
     seen only through its probabilities, counting queries;
  3. MIAD-MARK only: δ by PGD, L∞ ``delta.epsilon``, confined to the mark's footprint;
  4. the stored image: :func:`watermark.medlocker.logo.render_protected` (uint8, bit-exact), then
     the surrogate's (and each ``removal.judges`` classifier's) prediction on *that* image, and on
     it after removal attempts (median filter, JPEG, inpainting of the footprint, the thief's
     learned remover when ``removal.learned.steps > 0``).

  Metrics are logged as ``test/...``; the per-image records (``self.records``) are
  written to disk by :class:`callbacks.medlocker.ProtectionExport` (protected images,
  signed certificates, encrypted restore data, owner kit).

Images are protected at the resolution they are served at, which must be their stored
resolution (``data.image_size`` = the files' size): the stored protected PNG must
differ from the stored original only on the mark. The export checks this bit for bit.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_modules.base import to_plain
from lightning_modules.task import TaskModule
from models.safe_reader import ModelFileError, load_model_checkpoint
from verification.adapters import open_suspect
from watermark.imageio import from_uint8_hwc, to_uint8_hwc  # noqa: F401  (re-exported for old importers)
from watermark.medlocker.learned_remover import RemoverConfig, train_remover
from watermark.medlocker.protect import REGION_SOURCES, VARIANTS, Surrogates, build_logo, check_method, \
    image_records, lesion_parts, perturb_fallbacks, place, plan, protection_settings, removal_views, render, \
    surrogate_gradcam

log = logging.getLogger("medmark.medlocker")

__all__ = ["REGION_SOURCES", "VARIANTS", "ClassifierLoadError", "MedLockerModule"]


class ClassifierLoadError(ModelFileError):
    """A classifier checkpoint cannot be used; the message names the file and field (a ``ValueError``)."""


# how this module reads a classification checkpoint with the one safe reader
CLASSIFIER = {"task": "classification", "default_task": "classification", "error": ClassifierLoadError}


class MedLockerModule(TaskModule):
    """Surrogate training (fit) + visible adversarial protection of the test split (test).

    Args:
        variant: ``medlocker`` (mark only) or ``miadmark`` (mark + δ on its footprint).
        logo: see :func:`watermark.medlocker.protect.build_logo`.
        alpha_range: ``[min, max]`` opacity of the mark.
        scale: logo scale (nearest neighbour) -- the logo size is set by ``logo.size_fraction``.
        region: ``sources`` (subset of lesion_mask, gradcam), ``dilation_px`` (box margin),
            ``threshold_255`` (Grad-CAM T), ``cam_dilation_px``.
        search: ``whitebox`` or ``blackbox``.
        placement: white-box ``restarts``, ``steps``, ``position_lr`` (px/step), ``alpha_lr``, ``seed``.
        delta: ``epsilon`` (L∞, pixel units; 0 = off), ``steps``, ``step_size`` (null = auto), ``eot``
            (removal-aware δ, :mod:`watermark.medlocker.removal_eot`: weights ``median``, ``blur``,
            ``jpeg``, ``inpaint`` of the removal attacks in the PGD loss, ``blur_sigma``, ``ring_px`` --
            δ's support grown around the mark, off the lesion region; all 0 = the plain PGD).
            Used only by ``miadmark`` with the white-box search.
        blackbox: :class:`watermark.medlocker.blackbox_search.SearchConfig` fields, plus ``suspect``
            (a model reached only through queries, instead of the surrogate: any suspect adapter
            of :func:`verification.adapters.open_suspect` -- ``.ckpt``, TorchScript, ONNX or an
            ``http(s)://`` URL; null = the surrogate) and ``http`` (the HTTP adapter's options:
            timeout, retries, query_budget, ...).
        fallback: what to do for an image whose lesion region leaves no room for the mark at
            ``scale`` with ``region.dilation_px``: ``scales`` -- smaller logo scales;
            ``min_dilation_px`` -- the lesion boxes' margin may shrink one pixel at a time down to
            this (the lesion pixels themselves are never released); ``order`` -- ``scale_first``
            (keep the logo's size, shrink the margin only as far as it needs) or ``margin_first``;
            ``candidates`` -- the white-box search tries up to this many fitting rungs (scale,
            margin) for an image the first one does not fool and keeps the best (MIAD-MARK: judged
            after δ); ``widen_delta`` (opt-in, default off) -- MIAD-MARK: an image still not fooled
            gets δ on its whole lesion-free area, the mark kept (``delta_scope: image``); ``polarities`` --
            the mark's polarities (``dark``: the logo as is; ``light``: its colours inverted, same footprint)
            the white-box search tries, in order: an image no rung of the first polarity fools tries the
            next polarity's rungs, which replace the first only if they fool the surrogate (certificate
            field ``polarity``, signed); ``delta_only`` -- MIAD-MARK with δ: if still no position fits, δ (same
            PGD, same ε) acts on the whole lesion-free area instead of a mark's footprint
            (certificate field ``delta_scope: image``). Images that still cannot be protected
            keep their original pixels and are reported.
        task_terms: loss terms that train the surrogate; placement_terms: the placement's.
        surrogate_checkpoint: a trained ``method=task`` checkpoint loaded into ``self.model``.
        ensemble_checkpoints: further surrogates (any architecture) in the white-box ensemble.
        removal: ``median_k``, ``jpeg_quality``, ``inpaint_radius`` of the removal attempts; ``learned``
            (:class:`watermark.medlocker.learned_remover.RemoverConfig`: the thief's U-Net remover, trained
            at test start on the train split with the thief's own logos; ``steps`` 0 = off) and ``judges``
            (classifier checkpoints never optimised against, judged on every view: transfer).
        **kwargs: :class:`TaskModule` arguments (must be ``task=classification``).
    """

    def __init__(
        self,
        variant: str,
        logo: dict,
        alpha_range: list[float],
        region: dict,
        placement: dict,
        delta: dict,
        blackbox: dict,
        removal: dict,
        search: str = "whitebox",
        scale: float = 1.0,
        task_terms: list[str] | None = None,
        placement_terms: list[str] | None = None,
        surrogate_checkpoint: str | None = None,
        ensemble_checkpoints: list[str] | None = None,
        fallback: dict | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        fallback = to_plain(fallback) or {}
        logo, alpha_range, region, placement, delta, blackbox, removal = (
            to_plain(v) for v in (logo, alpha_range, region, placement, delta, blackbox, removal))
        task_terms, placement_terms, ensemble_checkpoints = (
            to_plain(v) for v in (task_terms, placement_terms, ensemble_checkpoints))
        if self.task != "classification":
            raise ValueError("method.task must be classification for MedLocker / MIAD-MARK")
        lo, hi = check_method(variant, search, region, alpha_range)
        self.task_terms = list(task_terms or ["ce"])
        self.placement_terms = list(placement_terms or ["adversarial", "overlap"])
        for name in self.task_terms + self.placement_terms:
            if name not in self.loss_terms:
                raise ValueError(f"loss term {name!r} (method.task_terms / placement_terms) is not in the loss "
                                 f"config ({sorted(self.loss_terms)})")
        self.save_hyperparameters({
            "variant": variant, "logo": dict(logo), "alpha_range": [lo, hi], "region": dict(region),
            "placement": dict(placement), "delta": dict(delta), "blackbox": dict(blackbox), "removal": dict(removal),
            "search": search, "scale": float(scale), "task_terms": list(self.task_terms),
            "placement_terms": list(self.placement_terms),
            "surrogate_checkpoint": surrogate_checkpoint, "ensemble_checkpoints": list(ensemble_checkpoints or []),
            "fallback": dict(fallback),
        })
        self.settings = protection_settings(variant, search, (lo, hi), scale, region, placement, delta, blackbox,
                                            fallback, removal)
        self.remover_config = RemoverConfig.from_dict(removal["learned"])
        self.remover: nn.Module | None = None  # the thief's, trained at test start; never saved
        self.judge_paths = [str(v) for v in removal.get("judges") or []]
        self.judges: list[nn.Module] = []
        self.variant, self.search, self.logo_spec = variant, search, dict(logo)
        self.removal_cfg = dict(removal)
        self.ensemble: list[nn.Module] = []  # not submodules: never saved in this module's checkpoint
        self.ensemble_paths = list(ensemble_checkpoints or [])
        self.records: list[dict] = []
        self._logo_cache: dict[int, np.ndarray] = {}
        self._blackbox_oracle: Any = None
        if surrogate_checkpoint:
            self._load_surrogate(surrogate_checkpoint)

    def _load_surrogate(self, path: str) -> None:
        """Weights of a trained ``method=task`` checkpoint into ``self.model`` (same backbone config)."""
        surrogate, _ = load_model_checkpoint(path, **CLASSIFIER)
        try:
            self.model.load_state_dict(surrogate.state_dict(), strict=True)
        except RuntimeError as err:
            raise ValueError(f"method.surrogate_checkpoint={path}: its network does not match "
                             f"the backbone config ({str(err)[:200]})") from None
        log.info("surrogate loaded from %s", path)

    # -- surrogate training: only the task terms ----------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.compute_loss(self.model_outputs(batch), batch, "train", terms=self.task_terms)

    def _eval_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        outputs = self.model_outputs(batch)
        self.compute_loss(outputs, batch, stage, terms=self.task_terms)
        probs = self.logits_to_probs(outputs["logits"].float())
        self.val_metrics.update(probs, batch["label"])
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True, batch_size=len(probs))
        if batch_idx == 0:
            n = self.hparams.panel_size
            self.panel = {"image": batch["image"][:n].detach().cpu(), "probs": probs[:n].detach().cpu(),
                          "target": batch["label"][:n].detach().cpu(), "id": list(batch["id"][:n])}

    # -- protection ----------------------------------------------------------------------------------
    def logo_for(self, image_size: int) -> np.ndarray:
        if image_size not in self._logo_cache:
            self._logo_cache[image_size] = build_logo(self.logo_spec, image_size)
        return self._logo_cache[image_size]

    def on_test_start(self) -> None:
        if self._trainer is not None and self.trainer.world_size > 1:
            raise ValueError("protection (trainer.test) runs on one process: the export needs every image's record; "
                             "train the surrogate with DDP, then protect with trainer.devices=1")
        self.records = []
        self.ensemble = []
        for path in self.ensemble_paths:
            model, _ = load_model_checkpoint(path, **CLASSIFIER)
            self.ensemble.append(model.to(self.device).eval())
        self.judges = [load_model_checkpoint(p, **CLASSIFIER)[0].to(self.device).eval() for p in self.judge_paths]
        self.remover = self._train_remover() if self.remover_config.steps > 0 else None
        suspect = self.settings.blackbox.get("suspect")
        self._blackbox_oracle = None
        if self.search == "blackbox" and suspect:
            # any adapter: checkpoint, TorchScript, ONNX or an HTTP endpoint, seen only through predict()
            self._blackbox_oracle = open_suspect(str(suspect), task="classification", device=self.device,
                                                 http=self.settings.blackbox.get("http"),
                                                 num_classes=int(self.hparams.num_classes))
            log.info("black-box search queries %s", getattr(self._blackbox_oracle, "kind", "suspect"))

    def _train_remover(self) -> nn.Module:
        """The thief's learned remover (:func:`train_remover`) on the train split's clean images."""
        datamodule = self.trainer.datamodule
        if datamodule is None or not datamodule.splits.get("train"):
            raise ValueError("method.removal.learned.steps > 0 needs the data's train split (the thief's own images)")

        def batches():
            return (b["image"].to(self.device) for b in datamodule.train_dataloader())

        first = next(iter(batches()))
        with torch.enable_grad(), torch.inference_mode(False):
            remover = train_remover(batches, first.shape[1], first.shape[-1], self.remover_config,
                                    int(self.removal_cfg["inpaint_radius"]), device=self.device)
        log.info("learned remover trained (%d steps)", self.remover_config.steps)
        return remover

    def surrogates(self) -> Surrogates:
        """The surrogate ensemble (``self.model`` first), the placement loss terms and the black-box oracle."""
        models = [self.model] + self.ensemble

        def per_image_loss(outputs: dict, batch: dict) -> Tensor:
            total = 0.0
            for name in self.placement_terms:
                term = self.loss_terms[name]
                if term.weight != 0.0:
                    total = total + term.weight * term.per_image(outputs, batch)
            return total

        predict = self._blackbox_oracle.predict if self._blackbox_oracle is not None else \
            (lambda x: torch.softmax(self.model(x.to(self.device)).float(), 1))
        return Surrogates(ensemble_logits=lambda x: [m(x) for m in models], per_image_loss=per_image_loss,
                          predict=predict, device=self.device)

    def plan_regions(self, batch: dict[str, Any], logo: np.ndarray) -> list[dict]:
        """:func:`watermark.medlocker.protect.plan` of the batch (lesion masks and/or the surrogate's Grad-CAM)."""
        parts = lesion_parts(batch, self.settings.region, lambda x, y: surrogate_gradcam(self.model, x, y))
        return plan(parts, logo, self.settings)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images, labels = batch["image"], batch["label"]
        B, C, H, W = images.shape
        if H != W:
            raise ValueError(f"MedLocker/MIAD-MARK expects square images (data.image_size), got {H}x{W}")
        logo = self.logo_for(H)
        surrogates = self.surrogates()
        seed0 = int(self.settings.placement.get("seed", 0)) + 1009 * batch_idx
        plans = self.plan_regions(batch, logo)
        placements = place(images, labels, plans, logo, self.settings, surrogates, seed0, len(self.records))
        scopes, pols = perturb_fallbacks(images, labels, plans, placements, logo, self.settings, surrogates, seed0)
        rendered = render(images, logo, plans, placements, scopes, pols)
        views = removal_views(images, rendered, self.removal_cfg, self.remover)
        preds = {name: self.model(v).argmax(1) for name, v in views.items()}
        records = image_records(batch, plans, placements, scopes, pols, rendered, preds)
        for j, judge in enumerate(self.judges):  # classifiers never optimised against (transfer)
            for name, v in views.items():
                pred = judge(v).argmax(1)
                self.log(f"test/judge{j}_acc_{name}", (pred == labels).float().mean(), batch_size=B)
                for r, p in zip(records, pred):
                    r[f"judge{j}_pred_{name}"] = int(p)
        self.records.extend(records)
        self._log_protection(records, placements, preds, labels)
        if batch_idx == 0:
            n_panel = min(int(self.hparams.panel_size), B)
            self.panel = {"original": images[:n_panel].cpu(), "protected": rendered["protected_tensor"][:n_panel].cpu(),
                          "region": torch.from_numpy(np.stack([p["region"] for p in plans[:n_panel]])),
                          "id": list(batch["id"])[:n_panel], "label": labels[:n_panel].cpu(),
                          "pred_clean": preds["clean"][:n_panel].cpu(),
                          "pred_protected": preds["protected"][:n_panel].cpu()}

    def _log_protection(self, records: list[dict], placements: list[dict | None], preds: dict[str, Tensor],
                        labels: Tensor) -> None:
        """``test/...`` metrics of one batch: accuracy per view, success and protected fractions, alpha,
        overlap, lesion change, PSNR and (black-box) queries per image."""
        B = len(records)
        todo = [b for b in range(B) if records[b]["placement"] == "mark"]
        for name, pred in preds.items():
            self.log(f"test/acc_{name}", (pred == labels).float().mean(), batch_size=B)
        self.log("test/success_rate", (preds["protected"] != labels).float().mean(), batch_size=B)
        self.log("test/protected_fraction", sum(p is not None for p in placements) / float(B), batch_size=B)
        self.log("test/mark_fraction", len(todo) / float(B), batch_size=B)
        done = [r for r, p in zip(records, placements) if p is not None]
        if not done:
            return
        if todo:
            self.log("test/alpha", sum(placements[b]["alpha"] for b in todo) / len(todo), batch_size=len(todo))
        self.log("test/overlap_px", float(sum(r["overlap_px"] for r in done)), batch_size=len(done), reduce_fx="sum")
        self.log("test/lesion_max_change", float(max(r["lesion_max_change"] for r in done)), batch_size=len(done),
                 reduce_fx="max")
        psnrs = [r["psnr"] for r in done if math.isfinite(r["psnr"])]
        if psnrs:
            self.log("test/psnr", sum(psnrs) / len(psnrs), batch_size=len(psnrs))
        if self.search == "blackbox" and todo:
            self.log("test/queries_per_image", sum(placements[b]["queries"] for b in todo) / len(todo),
                     batch_size=len(todo))
