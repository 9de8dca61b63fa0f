"""MedLocker / MIAD-MARK: visible adversarial watermarks that mislead unauthorised diagnosis AI.

``method=medlocker`` and ``method=miadmark`` (METHODS.md §3) share this module:

* **fit** trains the surrogate exactly like ``method=task`` (the ``task_terms`` loss terms,
  e.g. cross-entropy), unless ``surrogate_checkpoint`` gives a trained ``method=task``
  checkpoint (then run with ``trainer.max_epochs=0``). The surrogate is ``self.model``.
* **test** protects every test image. Per batch:

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
     the surrogate's prediction on *that* image, and on it after removal attempts
     (median filter, JPEG, inpainting of the footprint).

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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from verification.adapters import open_suspect
from lightning_modules.base import to_plain
from lightning_modules.task import TaskModule
from models.safe_reader import ModelFileError, load_model_checkpoint
from watermark.medlocker.blackbox_search import QueryCounter, SearchConfig, blackbox_search, quantise
from watermark.medlocker.footprint_pgd import pgd_on_footprint
from watermark.medlocker.logo import POLARITIES, composite, composite_soft, footprint, logo_mask, polarise, render_protected, \
    render_qr_logo, render_text_logo
from watermark.medlocker.regions import boxes_from_mask, fit_mark_all, region_from_boxes, region_from_saliency
from watermark.medlocker.removal_attacks import inpaint_footprint, jpeg, median_filter

log = logging.getLogger("medmark.medlocker")

VARIANTS = ("medlocker", "miadmark")
REGION_SOURCES = ("lesion_mask", "gradcam")


class ClassifierLoadError(ModelFileError):
    """A classifier checkpoint cannot be used; the message names the file and field (a ``ValueError``)."""


def load_classifier_checkpoint(path: str | Path, factories: tuple[str, ...] = ()) -> tuple[nn.Module, dict]:
    """Network + hyper-parameters of a medmark *classification* Lightning checkpoint (CPU, eval).

    Read by :func:`models.safe_reader.load_model_checkpoint` (``weights_only=True``; the backbone
    is built from the exact-name factory table, never with Hydra; ``factories`` only adds
    operator-trusted ones). A checkpoint that stores no task counts as classification.

    Raises:
        ClassifierLoadError: missing/corrupt/foreign file or refused config (file and field named).
    """
    return load_model_checkpoint(path, task="classification", factories=tuple(factories),
                                 default_task="classification", error=ClassifierLoadError)


class ClassifierSuspect:
    """``predict(images B×C×H×W in [0, 1]) -> softmax B×K`` of a classification checkpoint; counts queries."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", factories: tuple[str, ...] = ()):
        self.path = Path(path)
        self.model, self.hparams = load_classifier_checkpoint(self.path, tuple(factories))
        self.device = torch.device(device)
        self.model.to(self.device)
        self.queries = 0

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        self.model.eval()
        self.queries += int(images.shape[0])
        return torch.softmax(self.model(images.to(self.device, torch.float32)).float(), dim=1).cpu()


def build_logo(spec: dict, image_size: int) -> np.ndarray:
    """The RGBA mark (float32 ``h x w x 4`` in [0, 1]) for square images of side ``image_size``.

    ``spec``: ``kind`` (qr | text), ``text``, ``size_fraction`` (logo height / image side),
    ``rgb`` (mark colour), ``error_correction`` (QR).
    """
    size = max(4, int(round(float(spec["size_fraction"]) * image_size)))
    if spec["kind"] == "qr":
        return render_qr_logo(str(spec["text"]), size, error_correction=spec.get("error_correction", "L"),
                              dark_rgb=tuple(spec["rgb"]))
    if spec["kind"] == "text":
        return render_text_logo(str(spec["text"]), size, rgb=tuple(spec["rgb"]))
    raise ValueError(f"method.logo.kind must be 'qr' or 'text', got {spec['kind']!r}")


def self_list(value, default: list[str]) -> list[str]:
    return list(value) if value else list(default)


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def to_uint8_hwc(image: Tensor) -> np.ndarray:
    """C×H×W float [0, 1] -> H×W×C uint8 by ``floor(v * 255 + 0.5)`` (exact for v = k / 255)."""
    return np.floor(image.detach().double().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


def from_uint8_hwc(array: np.ndarray) -> Tensor:
    """H×W×C uint8 -> C×H×W float32 in [0, 1]."""
    return torch.from_numpy(np.array(array, dtype=np.uint8, copy=True)).permute(2, 0, 1).float() / 255.0


class MedLockerModule(TaskModule):
    """Surrogate training (fit) + visible adversarial protection of the test split (test).

    Args:
        variant: ``medlocker`` (mark only) or ``miadmark`` (mark + δ on its footprint).
        logo: see :func:`build_logo`.
        alpha_range: ``[min, max]`` opacity of the mark.
        scale: logo scale (nearest neighbour) -- the logo size is set by ``logo.size_fraction``.
        region: ``sources`` (subset of lesion_mask, gradcam), ``dilation_px`` (box margin),
            ``threshold_255`` (Grad-CAM T), ``cam_dilation_px``.
        search: ``whitebox`` or ``blackbox``.
        placement: white-box ``restarts``, ``steps``, ``position_lr`` (px/step), ``alpha_lr``, ``seed``.
        delta: ``epsilon`` (L∞, pixel units; 0 = off), ``steps``, ``step_size`` (null = auto).
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
        removal: ``median_k``, ``jpeg_quality``, ``inpaint_radius`` of the removal attempts.
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
        if variant not in VARIANTS:
            raise ValueError(f"method.variant must be one of {VARIANTS}, got {variant!r}")
        if search not in ("whitebox", "blackbox"):
            raise ValueError(f"method.search must be 'whitebox' or 'blackbox', got {search!r}")
        bad = set(region.get("sources", [])) - set(REGION_SOURCES)
        if not region.get("sources") or bad:
            raise ValueError(f"method.region.sources must be a non-empty subset of {REGION_SOURCES}, got "
                             f"{region.get('sources')}")
        lo, hi = (float(v) for v in alpha_range)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"method.alpha_range must satisfy 0 < min <= max <= 1, got {alpha_range}")
        self.task_terms = list(task_terms or ["ce"])
        self.placement_terms = list(placement_terms or ["adversarial", "overlap"])
        for name in self.task_terms + self.placement_terms:
            if name not in self.loss_terms:
                raise ValueError(f"loss term {name!r} (method.task_terms / placement_terms) is not in the loss "
                                 f"config ({sorted(self.loss_terms)})")
        self.save_hyperparameters({
            "variant": variant, "logo": dict(logo), "alpha_range": [lo, hi], "region": dict(region),
            "placement": dict(placement), "delta": dict(delta), "blackbox": dict(blackbox), "removal": dict(removal),
            "search": search, "scale": float(scale), "task_terms": self_list(task_terms, ["ce"]),
            "placement_terms": self_list(placement_terms, ["adversarial", "overlap"]),
            "surrogate_checkpoint": surrogate_checkpoint, "ensemble_checkpoints": list(ensemble_checkpoints or []),
            "fallback": dict(fallback),
        })
        self.variant = variant
        self.search = search
        self.logo_spec = dict(logo)
        self.alpha_range = (lo, hi)
        self.logo_scale = float(scale)
        self.region_cfg = dict(region)
        self.placement_cfg = dict(placement)
        self.delta_cfg = dict(delta)
        self.blackbox_cfg = dict(blackbox)
        self.removal_cfg = dict(removal)
        scales = [float(v) for v in fallback.get("scales", [])]
        if any(not v > 0 for v in scales):
            raise ValueError(f"method.fallback.scales must be > 0, got {scales}")
        self.scale_ladder = [self.logo_scale] + [v for v in scales if v != self.logo_scale]
        dil = int(region.get("dilation_px", 0))
        min_dil = int(fallback.get("min_dilation_px", dil))
        if not 0 <= min_dil:
            raise ValueError(f"method.fallback.min_dilation_px must be >= 0, got {min_dil}")
        self.dilation_ladder = list(range(dil, min(min_dil, dil) - 1, -1))
        self.delta_only = bool(fallback.get("delta_only", False))
        self.ladder_order = str(fallback.get("order", "scale_first"))
        if self.ladder_order not in ("scale_first", "margin_first"):
            raise ValueError(f"method.fallback.order must be scale_first or margin_first, got {self.ladder_order!r}")
        self.max_candidates = max(1, int(fallback.get("candidates", 1)))
        self.widen_delta = bool(fallback.get("widen_delta", False))
        self.polarities = [str(v) for v in (fallback.get("polarities") or ["dark"])]
        if set(self.polarities) - set(POLARITIES) or len(set(self.polarities)) != len(self.polarities):
            raise ValueError(f"method.fallback.polarities must be distinct values of {POLARITIES}, got "
                             f"{self.polarities}")
        self.ensemble: list[nn.Module] = []  # not submodules: never saved in this module's checkpoint
        self.ensemble_paths = list(ensemble_checkpoints or [])
        self.records: list[dict] = []
        self._logo_cache: dict[int, np.ndarray] = {}
        self._blackbox_oracle: Any = None
        if surrogate_checkpoint:
            surrogate, _ = load_classifier_checkpoint(surrogate_checkpoint)
            try:
                self.model.load_state_dict(surrogate.state_dict(), strict=True)
            except RuntimeError as err:
                raise ValueError(f"method.surrogate_checkpoint={surrogate_checkpoint}: its network does not match "
                                 f"the backbone config ({str(err)[:200]})") from None
            log.info("surrogate loaded from %s", surrogate_checkpoint)

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
            model, _ = load_classifier_checkpoint(path)
            self.ensemble.append(model.to(self.device).eval())
        suspect = self.blackbox_cfg.get("suspect")
        self._blackbox_oracle = None
        if self.search == "blackbox" and suspect:
            # any adapter: checkpoint, TorchScript, ONNX or an HTTP endpoint, seen only through predict()
            self._blackbox_oracle = open_suspect(str(suspect), task="classification", device=self.device,
                                                 http=self.blackbox_cfg.get("http"),
                                                 num_classes=int(self.hparams.num_classes))
            log.info("black-box search queries %s", getattr(self._blackbox_oracle, "kind", "suspect"))

    def surrogates(self) -> list[nn.Module]:
        return [self.model] + self.ensemble

    def ensemble_logits(self, images: Tensor) -> list[Tensor]:
        return [m(images) for m in self.surrogates()]

    def lesion_parts(self, batch: dict[str, Any]) -> tuple[list[np.ndarray | None], np.ndarray, list[int | None]]:
        """Per image: the lesion mask (bool H×W, None when not a source / not annotated), the
        Grad-CAM region (bool B×H×W, all False when not a source) and the CAM threshold used."""
        images = batch["image"]
        B, _, H, W = images.shape
        sources = self.region_cfg["sources"]
        masks: list[np.ndarray | None] = [None] * B
        thresholds: list[int | None] = [None] * B
        if "lesion_mask" in sources:
            if "lesion_mask" not in batch:
                raise ValueError("method.region.sources includes lesion_mask but the data has no lesion masks "
                                 "(use sources: [gradcam], i.e. MIAD-MARK's Grad-CAM region)")
            has = batch.get("has_lesion_mask", torch.ones(B, dtype=torch.bool))
            for b in range(B):
                if not bool(has[b]):
                    if "gradcam" not in sources:
                        raise ValueError(f"image {batch['id'][b]} has no lesion annotation; an unannotated image "
                                         "is not known to be lesion-free (add gradcam to method.region.sources)")
                    continue
                masks[b] = batch["lesion_mask"][b, 0].cpu().numpy() > 0.5
        cam_region = np.zeros((B, H, W), dtype=bool)
        if "gradcam" in sources:
            cams = self.gradcam(images, batch["label"])
            t = int(self.region_cfg["threshold_255"])
            for b in range(B):
                cam_region[b] = region_from_saliency(cams[b], t, int(self.region_cfg.get("cam_dilation_px", 0)))
                thresholds[b] = t
        return masks, cam_region, thresholds

    def lesion_regions(self, batch: dict[str, Any]) -> tuple[np.ndarray, list[int | None]]:
        """Bool B×H×W lesion regions (union of the configured sources, full box margin) and the CAM threshold."""
        masks, cam_region, thresholds = self.lesion_parts(batch)
        _, _, H, W = batch["image"].shape
        region = cam_region.copy()
        for b, m in enumerate(masks):
            if m is not None:
                region[b] |= region_from_boxes(boxes_from_mask(m, int(self.region_cfg.get("dilation_px", 0))), H, W)
        return region, thresholds

    def plan_regions(self, batch: dict[str, Any], logo: np.ndarray) -> list[dict]:
        """Per image, the rungs (logo scale, box margin) of the fallback ladder at which the mark fits.

        Scales go from ``scale`` through ``fallback.scales``, margins from ``region.dilation_px``
        down to ``fallback.min_dilation_px``, in ``fallback.order`` (``scale_first``: the margin
        is shrunk only as far as the full-size mark needs; see
        :func:`watermark.medlocker.regions.fit_mark_all`). Returns dicts ``rungs`` (list of ``region``,
        ``allowed``, ``scale``, ``dilation_px``), the first rung's fields flat (``region``,
        ``allowed``, ``scale``, ``dilation_px``), ``kind`` (``mark`` | ``delta_only`` | ``none``)
        and ``threshold``. The lesion pixels are inside every region of the ladder.
        """
        masks, cam_region, thresholds = self.lesion_parts(batch)
        B, _, H, W = batch["image"].shape
        use_delta = self.variant == "miadmark" and self.search == "whitebox" and float(self.delta_cfg["epsilon"]) > 0
        logo_masks = {s: logo_mask(logo, s) for s in self.scale_ladder}
        plans = []
        for b in range(B):
            rungs = [{"region": r, "allowed": a, "scale": sc, "dilation_px": d} for r, a, sc, d in
                     fit_mark_all(masks[b], cam_region[b], logo_masks, self.dilation_ladder, self.ladder_order)]
            if rungs:
                plan = {**rungs[0], "kind": "mark"}
            else:  # δ-only keeps the full margin: it is not bound to a logo's shape
                d = self.dilation_ladder[0]
                region = cam_region[b].copy()
                if masks[b] is not None:
                    region |= region_from_boxes(boxes_from_mask(masks[b], d), H, W)
                kind = "delta_only" if use_delta and self.delta_only and not region.all() else "none"
                plan = {"region": region, "allowed": None, "scale": self.logo_scale, "dilation_px": d, "kind": kind}
            plan["rungs"] = rungs
            plan["threshold"] = thresholds[b]
            plans.append(plan)
        return plans

    def gradcam(self, images: Tensor, labels: Tensor) -> np.ndarray:
        """Grad-CAM of the surrogate for the true class, B×H×W float in [0, 1] (grad-cam package)."""
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        from watermark.xmark.saliency import default_target_layer

        modes = {m: m.training for m in self.model.modules()}
        cam = GradCAM(model=self.model, target_layers=[default_target_layer(self.model)])
        try:
            # grad-cam hands activations to NumPy: fp32 even under bf16/fp16 autocast (trainer.precision)
            with torch.enable_grad(), torch.autocast(images.device.type, enabled=False):
                maps = cam(input_tensor=images.detach().float(),
                           targets=[ClassifierOutputTarget(int(y)) for y in labels])
        finally:
            cam.activations_and_grads.release()
            for m, training in modes.items():
                m.training = training
        maps = np.nan_to_num(np.asarray(maps, dtype=np.float64))
        return np.clip(maps, 0.0, 1.0)

    def _nearest_allowed(self, allowed: np.ndarray, x: float, y: float) -> tuple[int, int]:
        coords = np.argwhere(allowed)
        i = int(((coords - np.array([y, x])) ** 2).sum(1).argmin())
        return int(coords[i, 1]), int(coords[i, 0])

    def _per_image_terms(self, outputs: dict, batch: dict) -> Tensor:
        total = 0.0
        for name in self.placement_terms:
            term = self.loss_terms[name]
            if term.weight != 0.0:
                total = total + term.weight * term.per_image(outputs, batch)
        return total

    def soft_footprint(self, logo: np.ndarray, B: int, H: int, W: int, tx, ty, z, scales=None) -> Tensor:
        """``alpha * A`` of the translated logo, B×1×H×W (differentiable)."""
        white = logo.copy()
        white[..., :3] = 1.0
        zeros = torch.zeros(B, 1, H, W, device=self.device)
        return composite_soft(zeros, white, tx, ty, z, self.logo_scale if scales is None else scales)

    def place_whitebox(self, images: Tensor, labels: Tensor, region: np.ndarray, allowed: list[np.ndarray],
                       logo: np.ndarray, scales: list[float] | None = None) -> list[dict]:
        """Optimise ``(x, y, alpha)`` per image (logo scale ``scales[b]``); one dict per image (x, y, alpha, score)."""
        cfg = self.placement_cfg
        B, _, H, W = images.shape
        scales = [self.logo_scale] * B if scales is None else [float(v) for v in scales]
        scale_t = torch.tensor(scales, device=self.device, dtype=images.dtype)
        sizes = [logo_mask(logo, sc).shape for sc in scales]
        x_lo = torch.tensor([-w / 2 for _, w in sizes], device=self.device)
        x_hi = torch.tensor([W - w / 2 for _, w in sizes], device=self.device)
        y_lo = torch.tensor([-h / 2 for h, _ in sizes], device=self.device)
        y_hi = torch.tensor([H - h / 2 for h, _ in sizes], device=self.device)
        lo, hi = self.alpha_range
        zlo, zhi = _logit(lo), _logit(hi)
        rng = np.random.default_rng(int(cfg.get("seed", 0)))
        batch = {"label": labels, "lesion_region": torch.from_numpy(region).unsqueeze(1).to(self.device)}
        best: list[dict | None] = [None] * B
        for _restart in range(int(cfg["restarts"])):
            starts = [np.argwhere(a)[rng.integers(0, int(a.sum()))] for a in allowed]
            tx = torch.tensor([float(s[1]) for s in starts], device=self.device, requires_grad=True)
            ty = torch.tensor([float(s[0]) for s in starts], device=self.device, requires_grad=True)
            z = torch.full((B,), _logit((lo + hi) / 2), device=self.device, requires_grad=True)
            opt = torch.optim.Adam([{"params": [tx, ty], "lr": float(cfg["position_lr"])},
                                    {"params": [z], "lr": float(cfg["alpha_lr"])}])
            with torch.enable_grad():
                for _step in range(int(cfg["steps"])):
                    opt.zero_grad()
                    marked = composite_soft(images, logo, tx, ty, z, scale_t)
                    outputs = {"ensemble_logits": self.ensemble_logits(marked),
                               "soft_footprint": self.soft_footprint(logo, B, H, W, tx, ty, z, scale_t)}
                    self._per_image_terms(outputs, batch).sum().backward()
                    opt.step()
                    with torch.no_grad():
                        z.clamp_(zlo, zhi)
                        tx.copy_(torch.maximum(torch.minimum(tx, x_hi), x_lo))
                        ty.copy_(torch.maximum(torch.minimum(ty, y_hi), y_lo))
            # snap to the nearest region-free integer position, re-check exactly (uint8 grid)
            snapped = [self._nearest_allowed(allowed[b], float(tx[b]), float(ty[b])) for b in range(B)]
            alphas = [round(float(torch.sigmoid(z[b])), 4) for b in range(B)]
            with torch.no_grad():
                exact = quantise(composite(images, logo, [s[0] for s in snapped], [s[1] for s in snapped], alphas,
                                           scales))
                logits = self.ensemble_logits(exact)
                ce = torch.stack([F.cross_entropy(lg.float(), labels, reduction="none") for lg in logits]).mean(0)
                fooled = logits[0].argmax(1) != labels
            for b in range(B):
                score = (bool(fooled[b]), float(ce[b]))
                if best[b] is None or score > best[b]["score"]:
                    best[b] = {"x": snapped[b][0], "y": snapped[b][1], "alpha": alphas[b], "score": score}
        return best  # type: ignore[return-value]

    def place_blackbox(self, images: Tensor, labels: Tensor, allowed: list[np.ndarray],
                       logo: np.ndarray, scales: list[float] | None = None) -> list[dict]:
        predict = self._blackbox_oracle.predict if self._blackbox_oracle is not None else \
            (lambda x: torch.softmax(self.model(x.to(self.device)).float(), 1))
        fields = {k: v for k, v in self.blackbox_cfg.items() if k not in ("suspect", "http")}
        fields["alpha_range"] = tuple(self.alpha_range)
        scales = [self.logo_scale] * images.shape[0] if scales is None else [float(v) for v in scales]
        out = []
        for b in range(images.shape[0]):
            config = SearchConfig(**{**fields, "seed": int(fields.get("seed", 0)) + len(self.records) + b})
            counter = QueryCounter(predict)
            res = blackbox_search(counter, images[b], int(labels[b]), logo, allowed[b], config, scales[b])
            out.append({"x": res.x, "y": res.y, "alpha": round(res.alpha, 4), "queries": res.queries,
                        "blackbox_success": res.success})
        return out

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images, labels, ids = batch["image"], batch["label"], list(batch["id"])
        B, C, H, W = images.shape
        if H != W:
            raise ValueError(f"MedLocker/MIAD-MARK expects square images (data.image_size), got {H}x{W}")
        logo = self.logo_for(H)
        plans = self.plan_regions(batch, logo)
        todo = [b for b in range(B) if plans[b]["kind"] == "mark"]
        delta_only = [b for b in range(B) if plans[b]["kind"] == "delta_only"]
        placements: list[dict | None] = [None] * B
        if todo and self.search == "blackbox":  # the first rung only: one query budget per image
            sub = torch.tensor(todo, device=images.device)
            found = self.place_blackbox(images[sub], labels[sub], [plans[b]["allowed"] for b in todo],
                                        polarise(logo, self.polarities[0]),
                                        [plans[b]["scale"] for b in todo])
            for b, p in zip(todo, found):
                placements[b] = p
        use_delta = self.variant == "miadmark" and self.search == "whitebox" and float(self.delta_cfg["epsilon"]) > 0
        seed0 = int(self.placement_cfg.get("seed", 0)) + 1009 * batch_idx

        logos = {pol: polarise(logo, pol) for pol in POLARITIES}

        def run_delta(idx: list[int], xs, ys, alphas, scs, supports: list[np.ndarray], seed: int, pols=None):
            """PGD δ on ``supports`` for the images ``idx`` marked at (xs, ys, alphas, scs) in polarities
            ``pols`` (default dark); δ and (fooled, CE)."""
            sub = torch.tensor(idx, device=images.device)
            pols = pols or ["dark"] * len(idx)
            marked = torch.cat([composite(images[b:b + 1], logos[pol], x_, y_, a_, s_)
                                for b, x_, y_, a_, s_, pol in zip(idx, xs, ys, alphas, scs, pols)])
            fps = torch.from_numpy(np.stack(supports)).to(images.device)

            def loss_fn(x: Tensor) -> Tensor:
                return torch.stack([F.cross_entropy(lg.float(), labels[sub], reduction="none")
                                    for lg in self.ensemble_logits(x)]).mean(0)

            delta = pgd_on_footprint(loss_fn, marked, fps, float(self.delta_cfg["epsilon"]),
                                     int(self.delta_cfg["steps"]), self.delta_cfg.get("step_size"),
                                     generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                logits = self.ensemble_logits(quantise(marked + delta))
                ce = torch.stack([F.cross_entropy(lg.float(), labels[sub], reduction="none") for lg in logits]).mean(0)
                fooled = logits[0].argmax(1) != labels[sub]
            return delta, [(bool(fooled[j]), float(ce[j])) for j in range(len(idx))]

        if todo and self.search == "whitebox":
            # the first rung; an image it does not fool tries the next rungs (up to fallback.candidates),
            # keeping the best result (fooled first, then higher CE) -- for MIAD-MARK judged after δ.
            # Then the next polarity (fallback.polarities): its rungs for the images still not fooled,
            # kept only if they fool the surrogate (otherwise the first polarity's best stays).
            for i_pol, pol in enumerate(self.polarities):
                for k in range(self.max_candidates):
                    idx = [b for b in todo if len(plans[b]["rungs"]) > k and
                           (placements[b] is None or not placements[b]["score"][0])]
                    if not idx:
                        break
                    rungs = [plans[b]["rungs"][k] for b in idx]
                    sub = torch.tensor(idx, device=images.device)
                    found = self.place_whitebox(images[sub], labels[sub], np.stack([r["region"] for r in rungs]),
                                                [r["allowed"] for r in rungs], logos[pol], [r["scale"] for r in rungs])
                    if use_delta:
                        delta, scores = run_delta(idx, [p["x"] for p in found], [p["y"] for p in found],
                                                  [p["alpha"] for p in found], [r["scale"] for r in rungs],
                                                  [footprint(H, W, logo, p["x"], p["y"], r["scale"])
                                                   for p, r in zip(found, rungs)], seed0 + k + 31 * i_pol,
                                                  [pol] * len(idx))
                        for j, p in enumerate(found):
                            p["score"], p["delta"] = scores[j], delta[j]
                    for b, p, r in zip(idx, found, rungs):
                        better = placements[b] is None or (p["score"] > placements[b]["score"] if i_pol == 0
                                                           else p["score"][0] and not placements[b]["score"][0])
                        if better:
                            placements[b] = {**p, "rung": k, "polarity": pol}
                            plans[b].update({key: r[key] for key in ("region", "allowed", "scale", "dilation_px")})
        region = np.stack([p["region"] for p in plans])
        thresholds = [p["threshold"] for p in plans]
        scales = [p["scale"] for p in plans]
        scopes = ["footprint"] * B
        pols = [self.polarities[0] if p is None else p.get("polarity", self.polarities[0]) for p in placements]
        if use_delta and self.widen_delta:
            # opt-in: an image the mark + footprint δ does not fool gets δ on its whole lesion-free area (mark kept)
            idx = [b for b in todo if not placements[b]["score"][0]]
            if idx:
                delta, scores = run_delta(idx, [placements[b]["x"] for b in idx], [placements[b]["y"] for b in idx],
                                          [placements[b]["alpha"] for b in idx], [scales[b] for b in idx],
                                          [~region[b] for b in idx], seed0 + 97, [pols[b] for b in idx])
                for j, b in enumerate(idx):
                    if scores[j] > placements[b]["score"]:
                        placements[b].update({"score": scores[j], "delta": delta[j]})
                        scopes[b] = "image"
        if delta_only:  # no mark fits: δ over the lesion-free area (alpha 0 draws nothing)
            delta, scores = run_delta(delta_only, [0] * len(delta_only), [0] * len(delta_only),
                                      [0.0] * len(delta_only), [self.logo_scale] * len(delta_only),
                                      [~region[b] for b in delta_only], seed0 + 53, [pols[b] for b in delta_only])
            for j, b in enumerate(delta_only):
                placements[b] = {"x": 0, "y": 0, "alpha": 0.0, "score": scores[j], "delta": delta[j]}
                scopes[b] = "image"
        deltas: dict[int, np.ndarray] = {b: p["delta"].permute(1, 2, 0).detach().cpu().numpy().astype(np.float32)
                                         for b, p in enumerate(placements) if p is not None and "delta" in p}
        mark_fps = {b: footprint(H, W, logo, placements[b]["x"], placements[b]["y"], scales[b]) for b in todo}

        originals = [to_uint8_hwc(images[b]) for b in range(B)]
        protected, fps_all, visible_all = [], [], []
        for b in range(B):
            p = placements[b]
            if p is None:
                protected.append(originals[b].copy())
                fps_all.append(np.zeros((H, W), dtype=bool))
                visible_all.append(np.zeros((H, W), dtype=bool))
                continue
            scope = scopes[b]
            protected.append(render_protected(originals[b], logo, p["x"], p["y"], p["alpha"], scales[b],
                                              deltas.get(b), delta_scope=scope, polarity=pols[b]))
            visible = mark_fps.get(b, np.zeros((H, W), dtype=bool))
            visible_all.append(visible)
            # everything the protection may change (restore data): the mark, or δ's lesion-free support
            fps_all.append(visible if scope == "footprint" else ~region[b])
        prot_t = torch.stack([from_uint8_hwc(a) for a in protected]).to(images.device)
        views = {
            "clean": images,
            "protected": prot_t,
            "median": median_filter(prot_t, int(self.removal_cfg["median_k"])),
            "jpeg": jpeg(prot_t, int(self.removal_cfg["jpeg_quality"])),
            # the attacker inpaints what they can see: the mark (nothing for δ-only images)
            "inpaint": inpaint_footprint(prot_t, torch.from_numpy(np.stack(visible_all)),
                                         int(self.removal_cfg["inpaint_radius"])),
        }
        preds = {name: self.model(v).argmax(1) for name, v in views.items()}
        lesion = batch["lesion_mask"][:, 0].cpu().numpy() > 0.5 if "lesion_mask" in batch else np.zeros((B, H, W), bool)
        for b in range(B):
            p = placements[b]
            diff = np.abs(protected[b].astype(np.int16) - originals[b].astype(np.int16)).max(axis=2)
            mse = float(((protected[b].astype(np.float64) - originals[b]) ** 2).mean())
            self.records.append({
                "id": ids[b], "label": int(labels[b]), "protected_ok": p is not None,
                "placement": plans[b]["kind"], "dilation_px": int(plans[b]["dilation_px"]),
                "rung": None if p is None else p.get("rung", 0), "rungs_fitting": len(plans[b]["rungs"]),
                "delta_scope": scopes[b], "polarity": pols[b],
                "x": None if p is None else int(p["x"]), "y": None if p is None else int(p["y"]),
                "alpha": None if p is None else float(p["alpha"]), "scale": float(scales[b]),
                "threshold": thresholds[b], "delta": deltas.get(b), "original": originals[b],
                "protected": protected[b], "footprint": fps_all[b], "mark_footprint": visible_all[b],
                "region": region[b],
                "queries": None if p is None else p.get("queries"),
                "overlap_px": int((fps_all[b] & region[b]).sum()),
                "changed_in_region_px": int((diff[region[b]] > 0).sum()),
                "lesion_max_change": int(diff[lesion[b]].max()) if lesion[b].any() else 0,
                "psnr": float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse),
                **{f"pred_{k}": int(v[b]) for k, v in preds.items()},
            })
        n = float(B)
        for name, pred in preds.items():
            self.log(f"test/acc_{name}", (pred == labels).float().mean(), batch_size=B)
        self.log("test/success_rate", (preds["protected"] != labels).float().mean(), batch_size=B)
        self.log("test/protected_fraction", sum(p is not None for p in placements) / n, batch_size=B)
        self.log("test/mark_fraction", len(todo) / n, batch_size=B)
        done = [b for b in range(B) if placements[b] is not None]
        if done:
            k = len(done)
            if todo:
                self.log("test/alpha", sum(placements[b]["alpha"] for b in todo) / len(todo), batch_size=len(todo))
            self.log("test/overlap_px", float(sum(self.records[-B + b]["overlap_px"] for b in done)), batch_size=k,
                     reduce_fx="sum")
            self.log("test/lesion_max_change", float(max(self.records[-B + b]["lesion_max_change"] for b in done)),
                     batch_size=k, reduce_fx="max")
            psnrs = [self.records[-B + b]["psnr"] for b in done if math.isfinite(self.records[-B + b]["psnr"])]
            if psnrs:
                self.log("test/psnr", sum(psnrs) / len(psnrs), batch_size=len(psnrs))
            if self.search == "blackbox" and todo:
                self.log("test/queries_per_image", sum(placements[b]["queries"] for b in todo) / len(todo),
                         batch_size=len(todo))
        if batch_idx == 0:
            n_panel = min(int(self.hparams.panel_size), B)
            self.panel = {"original": images[:n_panel].cpu(), "protected": prot_t[:n_panel].cpu(),
                          "region": torch.from_numpy(region[:n_panel]), "id": ids[:n_panel],
                          "label": labels[:n_panel].cpu(), "pred_clean": preds["clean"][:n_panel].cpu(),
                          "pred_protected": preds["protected"][:n_panel].cpu()}
