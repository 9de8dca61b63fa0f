"""MedLocker / MIAD-MARK protection of a batch, framework-free: ``plan -> place -> perturb -> render``.

1. :func:`plan` -- per image, the lesion region (lesion-mask boxes and/or the surrogate's
   Grad-CAM, :func:`lesion_parts`) and the fallback ladder of rungs (logo scale, box margin) at
   which the mark fits; ``kind`` ``mark`` | ``delta_only`` | ``none``.
2. :func:`place` -- the mark's ``(x, y, alpha)``: white-box (:func:`place_whitebox`, Adam on a
   continuous translation + opacity over the surrogate ensemble, tried over the rungs and
   polarities) or black-box (:func:`place_blackbox`, the basin-hopping search of
   :mod:`watermark.medlocker.blackbox_search`, queries only).
3. :func:`perturb` -- MIAD-MARK's δ by PGD (L∞ ``delta.epsilon``) on a support (the mark's
   footprint, or the whole lesion-free area); :func:`perturb_fallbacks` applies it to images the
   mark alone does not fool (``fallback.widen_delta``) or cannot carry (``fallback.delta_only``).
4. :func:`render` -- the stored uint8 images (:func:`watermark.medlocker.logo.render_protected`,
   bit-exact) with the footprints a restore must cover.

The surrogates are reached through :class:`Surrogates` (callables), so this module imports no
training framework. Images are ``B×C×H×W`` float in [0, 1]; masks are bool ``H×W``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from watermark.imageio import from_uint8_hwc, quantise, to_uint8_hwc
from watermark.medlocker.blackbox_search import QueryCounter, SearchConfig, blackbox_search
from watermark.medlocker.footprint_pgd import pgd_on_footprint
from watermark.medlocker.learned_remover import apply_remover
from watermark.medlocker.logo import POLARITIES, composite, composite_soft, footprint, logo_mask, polarise, \
    render_protected, render_qr_logo, render_text_logo
from watermark.medlocker.regions import boxes_from_mask, fit_mark_all, region_from_boxes, region_from_saliency
from watermark.medlocker.removal_attacks import inpaint_footprint, jpeg, median_filter
from watermark.medlocker.removal_eot import check_eot, eot_loss, ring_support

VARIANTS = ("medlocker", "miadmark")
REGION_SOURCES = ("lesion_mask", "gradcam")


@dataclass(frozen=True)
class ProtectionSettings:
    """The validated protection config (field meanings: ``MedLockerModule``'s Args)."""

    variant: str
    search: str
    alpha_range: tuple[float, float]
    logo_scale: float
    region: dict
    placement: dict
    delta: dict
    blackbox: dict
    scale_ladder: tuple[float, ...]
    dilation_ladder: tuple[int, ...]
    ladder_order: str
    max_candidates: int
    widen_delta: bool
    delta_only: bool
    polarities: tuple[str, ...]
    removal: dict  # method.removal: the attacks judged on (and, removal-aware, optimised against)
    eot: dict  # method.delta.eot: removal_eot.check_eot's weights, blur_sigma, ring_px

    @property
    def use_delta(self) -> bool:
        """MIAD-MARK's δ is on: variant miadmark, white-box search, ``delta.epsilon > 0``."""
        return self.variant == "miadmark" and self.search == "whitebox" and float(self.delta["epsilon"]) > 0


def check_method(variant: str, search: str, region: dict, alpha_range: Sequence[float]) -> tuple[float, float]:
    """Refuse a bad variant / search / region source / alpha range (``ValueError`` naming the
    ``method.*`` field); returns the alpha range ``(lo, hi)``, ``0 < lo <= hi <= 1``."""
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
    return lo, hi


def protection_settings(variant: str, search: str, alpha_range: tuple[float, float], scale: float, region: dict,
                        placement: dict, delta: dict, blackbox: dict, fallback: dict, removal: dict
                        ) -> ProtectionSettings:
    """:class:`ProtectionSettings` from the checked method config and ``method.fallback``.

    Raises:
        ValueError: a fallback field out of range (``method.fallback.<field>`` named).
    """
    scales = [float(v) for v in fallback.get("scales", [])]
    if any(not v > 0 for v in scales):
        raise ValueError(f"method.fallback.scales must be > 0, got {scales}")
    dil = int(region.get("dilation_px", 0))
    min_dil = int(fallback.get("min_dilation_px", dil))
    if not 0 <= min_dil:
        raise ValueError(f"method.fallback.min_dilation_px must be >= 0, got {min_dil}")
    order = str(fallback.get("order", "scale_first"))
    if order not in ("scale_first", "margin_first"):
        raise ValueError(f"method.fallback.order must be scale_first or margin_first, got {order!r}")
    polarities = [str(v) for v in (fallback.get("polarities") or ["dark"])]
    if set(polarities) - set(POLARITIES) or len(set(polarities)) != len(polarities):
        raise ValueError(f"method.fallback.polarities must be distinct values of {POLARITIES}, got {polarities}")
    return ProtectionSettings(
        variant=variant, search=search, alpha_range=alpha_range, logo_scale=float(scale), region=dict(region),
        placement=dict(placement), delta=dict(delta), blackbox=dict(blackbox),
        scale_ladder=tuple([float(scale)] + [v for v in scales if v != float(scale)]),
        dilation_ladder=tuple(range(dil, min(min_dil, dil) - 1, -1)), ladder_order=order,
        max_candidates=max(1, int(fallback.get("candidates", 1))), widen_delta=bool(fallback.get("widen_delta", False)),
        delta_only=bool(fallback.get("delta_only", False)), polarities=tuple(polarities), removal=dict(removal),
        eot=check_eot(delta["eot"]))


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


@dataclass
class Surrogates:
    """How the protection reaches its models (all callables; no training framework).

    Attributes:
        ensemble_logits: images B×C×H×W -> list of logits B×K, the main surrogate first.
        per_image_loss: ``(outputs, batch) -> B`` placement loss (``outputs``: ``ensemble_logits``,
            ``soft_footprint``; ``batch``: ``label``, ``lesion_region``).
        predict: images -> probabilities B×K, the black-box oracle.
        device: where the placement variables live.
    """

    ensemble_logits: Callable[[Tensor], list[Tensor]]
    per_image_loss: Callable[[dict, dict], Tensor]
    predict: Callable[[Tensor], Tensor]
    device: torch.device


# ------------------------------------------------------------------------------------------- 1. plan


def surrogate_gradcam(model: torch.nn.Module, images: Tensor, labels: Tensor) -> np.ndarray:
    """Grad-CAM of ``model`` for the true class, B×H×W float in [0, 1] (grad-cam package)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from watermark.xmark.saliency import default_target_layer

    modes = {m: m.training for m in model.modules()}
    cam = GradCAM(model=model, target_layers=[default_target_layer(model)])
    try:
        # grad-cam hands activations to NumPy: fp32 even under bf16/fp16 autocast (trainer.precision)
        with torch.enable_grad(), torch.autocast(images.device.type, enabled=False):
            maps = cam(input_tensor=images.detach().float(), targets=[ClassifierOutputTarget(int(y)) for y in labels])
    finally:
        cam.activations_and_grads.release()
        for m, training in modes.items():
            m.training = training
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float64))
    return np.clip(maps, 0.0, 1.0)


def lesion_parts(batch: dict[str, Any], region_cfg: dict, gradcam: Callable[[Tensor, Tensor], np.ndarray]
                 ) -> tuple[list[np.ndarray | None], np.ndarray, list[int | None]]:
    """Per image: the lesion mask (bool H×W, None when not a source / not annotated), the
    Grad-CAM region (bool B×H×W, all False when not a source) and the CAM threshold used.

    ``batch``: ``image`` B×C×H×W, ``label``, ``id``, optional ``lesion_mask`` B×1×H×W in [0, 1]
    and ``has_lesion_mask`` (B bool). ``gradcam(images, labels)`` -> B×H×W in [0, 1].
    """
    images = batch["image"]
    B, _, H, W = images.shape
    sources = region_cfg["sources"]
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
        cams = gradcam(images, batch["label"])
        t = int(region_cfg["threshold_255"])
        for b in range(B):
            cam_region[b] = region_from_saliency(cams[b], t, int(region_cfg.get("cam_dilation_px", 0)))
            thresholds[b] = t
    return masks, cam_region, thresholds


def lesion_regions(parts: tuple[list[np.ndarray | None], np.ndarray, list[int | None]], dilation_px: int
                   ) -> np.ndarray:
    """Bool B×H×W lesion regions of :func:`lesion_parts`: the CAM region united with the lesion
    boxes dilated by ``dilation_px``."""
    masks, cam_region, _ = parts
    _, H, W = cam_region.shape
    region = cam_region.copy()
    for b, m in enumerate(masks):
        if m is not None:
            region[b] |= region_from_boxes(boxes_from_mask(m, int(dilation_px)), H, W)
    return region


def plan(parts: tuple[list[np.ndarray | None], np.ndarray, list[int | None]], logo: np.ndarray,
         settings: ProtectionSettings) -> list[dict]:
    """Per image, the rungs (logo scale, box margin) of the fallback ladder at which the mark fits.

    Scales go from ``scale`` through ``fallback.scales``, margins from ``region.dilation_px``
    down to ``fallback.min_dilation_px``, in ``fallback.order`` (see
    :func:`watermark.medlocker.regions.fit_mark_all`). ``parts``: :func:`lesion_parts`. Returns
    dicts ``rungs`` (list of ``region`` bool H×W, ``allowed`` bool top-left map, ``scale``,
    ``dilation_px``), the first rung's fields flat, ``kind`` (``mark`` | ``delta_only`` |
    ``none``) and ``threshold``. The lesion pixels are inside every region of the ladder.
    """
    masks, cam_region, thresholds = parts
    _, H, W = cam_region.shape
    logo_masks = {s: logo_mask(logo, s) for s in settings.scale_ladder}
    plans = []
    for b in range(len(masks)):
        rungs = [{"region": r, "allowed": a, "scale": sc, "dilation_px": d} for r, a, sc, d in
                 fit_mark_all(masks[b], cam_region[b], logo_masks, list(settings.dilation_ladder),
                              settings.ladder_order)]
        if rungs:
            item = {**rungs[0], "kind": "mark"}
        else:  # δ-only keeps the full margin: it is not bound to a logo's shape
            d = settings.dilation_ladder[0]
            region = cam_region[b].copy()
            if masks[b] is not None:
                region |= region_from_boxes(boxes_from_mask(masks[b], d), H, W)
            kind = "delta_only" if settings.use_delta and settings.delta_only and not region.all() else "none"
            item = {"region": region, "allowed": None, "scale": settings.logo_scale, "dilation_px": d, "kind": kind}
        item["rungs"] = rungs
        item["threshold"] = thresholds[b]
        plans.append(item)
    return plans


# ------------------------------------------------------------------------------------------ 2. place


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def nearest_allowed(allowed: np.ndarray, x: float, y: float) -> tuple[int, int]:
    """The allowed top-left ``(x, y)`` (integers) nearest to ``(x, y)``; ``allowed[y, x]`` bool."""
    coords = np.argwhere(allowed)
    i = int(((coords - np.array([y, x])) ** 2).sum(1).argmin())
    return int(coords[i, 1]), int(coords[i, 0])


def soft_footprint(logo: np.ndarray, B: int, H: int, W: int, tx: Tensor, ty: Tensor, z: Tensor, scales,
                   device: torch.device) -> Tensor:
    """``alpha * A`` of the translated logo, B×1×H×W in [0, 1] (differentiable in tx, ty, z)."""
    white = logo.copy()
    white[..., :3] = 1.0
    zeros = torch.zeros(B, 1, H, W, device=device)
    return composite_soft(zeros, white, tx, ty, z, scales)


def _exact_scores(images: Tensor, labels: Tensor, surrogates: Surrogates) -> list[tuple[bool, float]]:
    """``(fooled, mean ensemble CE)`` per image of already-marked images, judged on the uint8 grid."""
    with torch.no_grad():
        logits = surrogates.ensemble_logits(quantise(images))
        ce = torch.stack([F.cross_entropy(lg.float(), labels, reduction="none") for lg in logits]).mean(0)
        fooled = logits[0].argmax(1) != labels
    return [(bool(fooled[b]), float(ce[b])) for b in range(images.shape[0])]


def _optimise_placement(images: Tensor, labels: Tensor, region: np.ndarray, logo: np.ndarray, scales: list[float],
                        starts: list[np.ndarray], settings: ProtectionSettings, surrogates: Surrogates
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """One white-box restart: Adam on continuous ``(tx, ty)`` (clamped on the image) and the opacity
    logit ``z`` (clamped to ``alpha_range``) from ``starts`` (rows ``(y, x)``); returns ``tx, ty, z`` (B)."""
    cfg, device = settings.placement, surrogates.device
    B, _, H, W = images.shape
    scale_t = torch.tensor(scales, device=device, dtype=images.dtype)
    sizes = [logo_mask(logo, sc).shape for sc in scales]
    x_lo = torch.tensor([-w / 2 for _, w in sizes], device=device)
    x_hi = torch.tensor([W - w / 2 for _, w in sizes], device=device)
    y_lo = torch.tensor([-h / 2 for h, _ in sizes], device=device)
    y_hi = torch.tensor([H - h / 2 for h, _ in sizes], device=device)
    lo, hi = settings.alpha_range
    zlo, zhi = _logit(lo), _logit(hi)
    batch = {"label": labels, "lesion_region": torch.from_numpy(region).unsqueeze(1).to(device)}
    tx = torch.tensor([float(s[1]) for s in starts], device=device, requires_grad=True)
    ty = torch.tensor([float(s[0]) for s in starts], device=device, requires_grad=True)
    z = torch.full((B,), _logit((lo + hi) / 2), device=device, requires_grad=True)
    opt = torch.optim.Adam([{"params": [tx, ty], "lr": float(cfg["position_lr"])},
                            {"params": [z], "lr": float(cfg["alpha_lr"])}])
    with torch.enable_grad():
        for _step in range(int(cfg["steps"])):
            opt.zero_grad()
            marked = composite_soft(images, logo, tx, ty, z, scale_t)
            outputs = {"ensemble_logits": surrogates.ensemble_logits(marked),
                       "soft_footprint": soft_footprint(logo, B, H, W, tx, ty, z, scale_t, device)}
            surrogates.per_image_loss(outputs, batch).sum().backward()
            opt.step()
            with torch.no_grad():
                z.clamp_(zlo, zhi)
                tx.copy_(torch.maximum(torch.minimum(tx, x_hi), x_lo))
                ty.copy_(torch.maximum(torch.minimum(ty, y_hi), y_lo))
    return tx, ty, z


def place_whitebox(images: Tensor, labels: Tensor, region: np.ndarray, allowed: list[np.ndarray], logo: np.ndarray,
                   scales: list[float], settings: ProtectionSettings, surrogates: Surrogates) -> list[dict]:
    """Optimise ``(x, y, alpha)`` per image over ``placement.restarts`` restarts.

    Args:
        images: B×C×H×W in [0, 1]; labels: B class indices; region: bool B×H×W lesion regions;
        allowed: per image the bool top-left map of region-free positions; logo: RGBA h×w×4;
        scales: per image logo scale.
    Returns:
        one dict per image: ``x``, ``y`` (integers, allowed), ``alpha`` (4 decimals), ``score``
        ``(fooled, CE)`` of the exact uint8 render (the best restart: fooled first, then CE).
    """
    B = images.shape[0]
    scales = [float(v) for v in scales]
    rng = np.random.default_rng(int(settings.placement.get("seed", 0)))
    best: list[dict | None] = [None] * B
    for _restart in range(int(settings.placement["restarts"])):
        starts = [np.argwhere(a)[rng.integers(0, int(a.sum()))] for a in allowed]
        tx, ty, z = _optimise_placement(images, labels, region, logo, scales, starts, settings, surrogates)
        # snap to the nearest region-free integer position, re-check exactly (uint8 grid)
        snapped = [nearest_allowed(allowed[b], float(tx[b]), float(ty[b])) for b in range(B)]
        alphas = [round(float(torch.sigmoid(z[b])), 4) for b in range(B)]
        with torch.no_grad():
            marked = composite(images, logo, [s[0] for s in snapped], [s[1] for s in snapped], alphas, scales)
        scores = _exact_scores(marked, labels, surrogates)
        for b in range(B):
            if best[b] is None or scores[b] > best[b]["score"]:
                best[b] = {"x": snapped[b][0], "y": snapped[b][1], "alpha": alphas[b], "score": scores[b]}
    return best  # type: ignore[return-value]


def place_blackbox(images: Tensor, labels: Tensor, allowed: list[np.ndarray], logo: np.ndarray, scales: list[float],
                   settings: ProtectionSettings, predict: Callable[[Tensor], Tensor], seed_offset: int) -> list[dict]:
    """Black-box ``(x, y, alpha)`` per image (:func:`blackbox_search`, ``blackbox.*`` fields, seed
    ``blackbox.seed + seed_offset + b``); dicts ``x``, ``y``, ``alpha``, ``queries``, ``blackbox_success``."""
    fields = {k: v for k, v in settings.blackbox.items() if k not in ("suspect", "http")}
    fields["alpha_range"] = tuple(settings.alpha_range)
    out = []
    for b in range(images.shape[0]):
        config = SearchConfig(**{**fields, "seed": int(fields.get("seed", 0)) + seed_offset + b})
        res = blackbox_search(QueryCounter(predict), images[b], int(labels[b]), logo, allowed[b], config,
                              float(scales[b]))
        out.append({"x": res.x, "y": res.y, "alpha": round(res.alpha, 4), "queries": res.queries,
                    "blackbox_success": res.success})
    return out


def _search_rungs(images: Tensor, labels: Tensor, plans: list[dict], logo: np.ndarray, todo: list[int],
                  placements: list[dict | None], settings: ProtectionSettings, surrogates: Surrogates,
                  seed0: int) -> None:
    """White-box over the ladder, in place: the first rung; an image it does not fool tries the next
    rungs (up to ``fallback.candidates``), keeping the best (fooled first, then higher CE) -- for
    MIAD-MARK judged after δ. Then the next polarity's rungs for the images still not fooled, kept
    only if they fool the surrogate. A kept rung's fields replace the plan's flat fields."""
    H, W = images.shape[-2:]
    logos = {pol: polarise(logo, pol) for pol in POLARITIES}
    for i_pol, pol in enumerate(settings.polarities):
        for k in range(settings.max_candidates):
            idx = [b for b in todo if len(plans[b]["rungs"]) > k and
                   (placements[b] is None or not placements[b]["score"][0])]
            if not idx:
                break
            rungs = [plans[b]["rungs"][k] for b in idx]
            sub = torch.tensor(idx, device=images.device)
            found = place_whitebox(images[sub], labels[sub], np.stack([r["region"] for r in rungs]),
                                   [r["allowed"] for r in rungs], logos[pol], [r["scale"] for r in rungs],
                                   settings, surrogates)
            if settings.use_delta:
                marks = [(p["x"], p["y"], p["alpha"], r["scale"], pol) for p, r in zip(found, rungs)]
                supports = [ring_support(footprint(H, W, logo, p["x"], p["y"], r["scale"]), r["region"],
                                         settings.eot["ring_px"]) for p, r in zip(found, rungs)]
                delta, scores = perturb(images, labels, idx, marks, supports, logo, settings, surrogates,
                                        seed0 + k + 31 * i_pol)
                for j, p in enumerate(found):  # a ring takes δ off the footprint: rendered as scope "image"
                    p["score"], p["delta"] = scores[j], delta[j]
                    p["delta_scope"] = "image" if settings.eot["ring_px"] > 0 else "footprint"
            for b, p, r in zip(idx, found, rungs):
                better = placements[b] is None or (p["score"] > placements[b]["score"] if i_pol == 0
                                                   else p["score"][0] and not placements[b]["score"][0])
                if better:
                    placements[b] = {**p, "rung": k, "polarity": pol}
                    plans[b].update({key: r[key] for key in ("region", "allowed", "scale", "dilation_px")})


def place(images: Tensor, labels: Tensor, plans: list[dict], logo: np.ndarray, settings: ProtectionSettings,
          surrogates: Surrogates, seed0: int, seed_offset: int) -> list[dict | None]:
    """Per image the placement dict (None: no mark placed -- ``kind`` not ``mark``).

    Black-box: the first rung only (one query budget per image), first polarity. White-box:
    :func:`_search_rungs` (MIAD-MARK: with δ, ``delta`` C×H×W in each dict). ``seed0`` seeds δ's
    PGD, ``seed_offset`` the black-box search (images protected before this batch).
    """
    todo = [b for b in range(len(plans)) if plans[b]["kind"] == "mark"]
    placements: list[dict | None] = [None] * len(plans)
    if todo and settings.search == "blackbox":
        sub = torch.tensor(todo, device=images.device)
        found = place_blackbox(images[sub], labels[sub], [plans[b]["allowed"] for b in todo],
                               polarise(logo, settings.polarities[0]), [plans[b]["scale"] for b in todo],
                               settings, surrogates.predict, seed_offset)
        for b, p in zip(todo, found):
            placements[b] = p
    if todo and settings.search == "whitebox":
        _search_rungs(images, labels, plans, logo, todo, placements, settings, surrogates, seed0)
    return placements


# ---------------------------------------------------------------------------------------- 3. perturb


def perturb(images: Tensor, labels: Tensor, idx: list[int], marks: list[tuple], supports: list[np.ndarray],
            logo: np.ndarray, settings: ProtectionSettings, surrogates: Surrogates, seed: int
            ) -> tuple[Tensor, list[tuple[bool, float]]]:
    """MIAD-MARK's δ by PGD for the images ``idx``, each marked at ``marks[j] = (x, y, alpha, scale,
    polarity)`` (alpha 0 draws nothing), δ confined to ``supports[j]`` (bool H×W).

    The PGD loss is the ensemble CE, removal-aware when ``delta.eot`` has non-zero weights
    (:func:`watermark.medlocker.removal_eot.eot_loss`: plus the CE after median / blur / JPEG /
    inpainting of the visible mark, ``method.removal``'s settings).

    Returns:
        δ (len(idx)×C×H×W, ``|δ| <= delta.epsilon``) and per image ``(fooled, mean ensemble CE)``
        of the marked image + δ on the uint8 grid (white-box, no removal).
    """
    sub = torch.tensor(idx, device=images.device)
    logos = {pol: polarise(logo, pol) for pol in POLARITIES}
    marked = torch.cat([composite(images[b:b + 1], logos[pol], x_, y_, a_, s_)
                        for b, (x_, y_, a_, s_, pol) in zip(idx, marks)])
    fps = torch.from_numpy(np.stack(supports)).to(images.device)
    H, W = images.shape[-2:]
    mark_fps = torch.from_numpy(np.stack([footprint(H, W, logo, x_, y_, s_) if a_ > 0 else np.zeros((H, W), bool)
                                          for x_, y_, a_, s_, _ in marks])).to(images.device)

    def ce(x: Tensor) -> Tensor:
        return torch.stack([F.cross_entropy(lg.float(), labels[sub], reduction="none")
                            for lg in surrogates.ensemble_logits(x)]).mean(0)

    loss_fn = eot_loss(ce, settings.eot, settings.removal, mark_fps,  # all weights 0, diversity 0: exactly ce
                       generator=torch.Generator().manual_seed(seed + 7919))
    cfg = settings.delta
    delta = pgd_on_footprint(loss_fn, marked, fps, float(cfg["epsilon"]), int(cfg["steps"]), cfg.get("step_size"),
                             generator=torch.Generator().manual_seed(seed))
    return delta, _exact_scores(marked + delta, labels[sub], surrogates)


def perturb_fallbacks(images: Tensor, labels: Tensor, plans: list[dict], placements: list[dict | None],
                      logo: np.ndarray, settings: ProtectionSettings, surrogates: Surrogates, seed0: int
                      ) -> tuple[list[str], list[str]]:
    """δ on the whole lesion-free area, in place on ``placements``: ``fallback.widen_delta`` (opt-in)
    for a marked image still not fooled (kept if it scores better, mark kept) and ``delta_only``
    plans (no mark fits; alpha 0). Returns per image ``delta_scope`` (footprint | image) and polarity."""
    B = len(plans)
    scopes = [p.get("delta_scope", "footprint") if p is not None else "footprint" for p in placements]
    pols = [settings.polarities[0] if p is None else p.get("polarity", settings.polarities[0]) for p in placements]
    todo = [b for b in range(B) if plans[b]["kind"] == "mark"]
    delta_only = [b for b in range(B) if plans[b]["kind"] == "delta_only"]
    if settings.use_delta and settings.widen_delta:
        idx = [b for b in todo if not placements[b]["score"][0]]
        if idx:
            marks = [(placements[b]["x"], placements[b]["y"], placements[b]["alpha"], plans[b]["scale"], pols[b])
                     for b in idx]
            delta, scores = perturb(images, labels, idx, marks, [~plans[b]["region"] for b in idx], logo, settings,
                                    surrogates, seed0 + 97)
            for j, b in enumerate(idx):
                if scores[j] > placements[b]["score"]:
                    placements[b].update({"score": scores[j], "delta": delta[j]})
                    scopes[b] = "image"
    if delta_only:
        marks = [(0, 0, 0.0, settings.logo_scale, pols[b]) for b in delta_only]
        delta, scores = perturb(images, labels, delta_only, marks, [~plans[b]["region"] for b in delta_only], logo,
                                settings, surrogates, seed0 + 53)
        for j, b in enumerate(delta_only):
            placements[b] = {"x": 0, "y": 0, "alpha": 0.0, "score": scores[j], "delta": delta[j]}
            scopes[b] = "image"
    return scopes, pols


# ----------------------------------------------------------------------------------------- 4. render


def render(images: Tensor, logo: np.ndarray, plans: list[dict], placements: list[dict | None], scopes: list[str],
           pols: list[str]) -> dict[str, Any]:
    """The stored images, exactly: :func:`render_protected` of each placed image (uint8, bit-exact).

    Returns a dict of per-image lists: ``original`` / ``protected`` (uint8 H×W×C), ``delta``
    (float32 H×W×C or None), ``footprint`` (bool H×W: everything the protection may change -- the
    mark, or δ's lesion-free support; what restore data covers), ``mark_footprint`` (bool H×W:
    the visible mark), and ``protected_tensor`` (B×C×H×W in [0, 1], on ``images``' device).
    """
    B, _, H, W = images.shape
    out: dict[str, Any] = {"original": [to_uint8_hwc(images[b]) for b in range(B)], "protected": [], "delta": [],
                           "footprint": [], "mark_footprint": []}
    for b in range(B):
        p, original = placements[b], out["original"][b]
        if p is None:
            none = np.zeros((H, W), dtype=bool)
            out["protected"].append(original.copy())
            out["delta"].append(None)
            out["footprint"].append(none)
            out["mark_footprint"].append(none)
            continue
        delta = p["delta"].permute(1, 2, 0).detach().cpu().numpy().astype(np.float32) if "delta" in p else None
        out["protected"].append(render_protected(original, logo, p["x"], p["y"], p["alpha"], plans[b]["scale"],
                                                 delta, delta_scope=scopes[b], polarity=pols[b]))
        visible = footprint(H, W, logo, p["x"], p["y"], plans[b]["scale"]) if plans[b]["kind"] == "mark" else \
            np.zeros((H, W), dtype=bool)
        out["delta"].append(delta)
        out["mark_footprint"].append(visible)
        out["footprint"].append(visible if scopes[b] == "footprint" else ~plans[b]["region"])
    out["protected_tensor"] = torch.stack([from_uint8_hwc(a) for a in out["protected"]]).to(images.device)
    return out


def removal_views(images: Tensor, rendered: dict[str, Any], removal: dict, remover: Callable | None = None
                  ) -> dict[str, Tensor]:
    """The images a classifier is judged on, each B×C×H×W in [0, 1]: ``clean``, ``protected`` and the
    removal attempts on it -- ``median`` (``removal.median_k``), ``jpeg`` (``jpeg_quality``),
    ``inpaint`` of what an attacker can see, the mark (``inpaint_radius``; nothing for δ-only images)
    and, given the thief's ``remover`` (:class:`watermark.medlocker.learned_remover.LearnedRemover`),
    ``learned``."""
    protected = rendered["protected_tensor"]
    marks = torch.from_numpy(np.stack(rendered["mark_footprint"])).to(protected.device)
    views = {
        "clean": images,
        "protected": protected,
        "median": median_filter(protected, int(removal["median_k"])),
        "jpeg": jpeg(protected, int(removal["jpeg_quality"])),
        "inpaint": inpaint_footprint(protected, marks, int(removal["inpaint_radius"])),
    }
    if remover is not None:
        views["learned"] = apply_remover(remover, protected, marks)
    return views


def image_records(batch: dict[str, Any], plans: list[dict], placements: list[dict | None], scopes: list[str],
                  pols: list[str], rendered: dict[str, Any], preds: dict[str, Tensor]) -> list[dict]:
    """One record per image (what the export writes): placement, certificate fields, the uint8
    original / protected images, footprints, region, quality (``psnr`` dB, ``overlap_px``,
    ``changed_in_region_px``, ``lesion_max_change`` grey levels) and ``pred_<view>`` per removal view."""
    images, labels, ids = batch["image"], batch["label"], list(batch["id"])
    B, _, H, W = images.shape
    lesion = batch["lesion_mask"][:, 0].cpu().numpy() > 0.5 if "lesion_mask" in batch else np.zeros((B, H, W), bool)
    records = []
    for b in range(B):
        p, original, protected = placements[b], rendered["original"][b], rendered["protected"][b]
        region, changeable = plans[b]["region"], rendered["footprint"][b]
        diff = np.abs(protected.astype(np.int16) - original.astype(np.int16)).max(axis=2)
        mse = float(((protected.astype(np.float64) - original) ** 2).mean())
        records.append({
            "id": ids[b], "label": int(labels[b]), "protected_ok": p is not None,
            "placement": plans[b]["kind"], "dilation_px": int(plans[b]["dilation_px"]),
            "rung": None if p is None else p.get("rung", 0), "rungs_fitting": len(plans[b]["rungs"]),
            "delta_scope": scopes[b], "polarity": pols[b],
            "x": None if p is None else int(p["x"]), "y": None if p is None else int(p["y"]),
            "alpha": None if p is None else float(p["alpha"]), "scale": float(plans[b]["scale"]),
            "threshold": plans[b]["threshold"], "delta": rendered["delta"][b], "original": original,
            "protected": protected, "footprint": changeable, "mark_footprint": rendered["mark_footprint"][b],
            "region": region,
            "queries": None if p is None else p.get("queries"),
            "overlap_px": int((changeable & region).sum()),
            "changed_in_region_px": int((diff[region] > 0).sum()),
            "lesion_max_change": int(diff[lesion[b]].max()) if lesion[b].any() else 0,
            "psnr": float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse),
            **{f"pred_{k}": int(v[b]) for k, v in preds.items()},
        })
    return records
