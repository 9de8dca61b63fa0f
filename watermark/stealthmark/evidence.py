"""Black-box StealthMark verification (docs/stealthmark.md), framework-free.

The verifier talks to the suspect only through ``predict(images B×C×H×W in [0,1]) ->
probabilities B×1×H×W`` and counts every image it sends. Two channels:

1. **Trigger response.** Per image, ``g = mean over pixels of min(p, 1 − p)`` on the clean
   and on the triggered copy; one-sided paired t-test with a margin τ
   (``H1: mean(g_trig − g_clean) > τ``), p-value ``response_p_value``.
2. **QR payload.** For each LIME image: LIME explains ``g`` of the triggered image over the
   training grid's cells (trigger kept, batched queries) -> ``G×G`` weights -> Otsu
   threshold -> function-pattern repair -> OpenCV decode; per image the decoded text and
   the bit accuracy against the owner's Q. ASR = share of LIME images decoding to the
   payload. ``qr_p_value``: Monte Carlo test of the agreement (Pearson) of the *mean* weight
   map with Q against K ≥ 10⁴ QR codes of random payloads of the same version/level
   (``p = (1 + #≥)/(1 + K)``): no independence between cells is assumed.

Verdict: ``response_p_value < α`` and (``#decoded ≥ min_decoded`` or ``qr_p_value < α``);
``p_value = max(response_p_value, qr_p_value)`` (an intersection-union test: both channels
must reject). Every number comes from the suspect's answers to inputs the verifier built,
so a model without the mark fails -- unlike the official code, whose explanation picture
is fixed by the verifier's own perturbations.

A cheaper second view of channel 2, the *per-cell readout* (the triggered uncertainty map
averaged per cell, thresholded, decoded; one query per image), is always reported, on
triggered and on clean images (an unmarked or untriggered input decodes nothing).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from watermark.stealthmark import explain
from watermark.stealthmark.grid import cell_means
from watermark.stealthmark.kit import StealthMarkKey
from watermark.stealthmark.qr import (
    bit_accuracy,
    decode_with_repair,
    qr_modules,
    random_payload_grids,
    render_grid,
    repair_function_patterns,
)
from watermark.stats import monte_carlo_qr_pvalue, paired_margin_test

log = logging.getLogger("medmark.verify")

PredictFn = Callable[[torch.Tensor], torch.Tensor]
QR_EVIDENCE = ("lime", "readout")


class NonFiniteOutput(ValueError):
    """The suspect answered with NaN/inf or values outside [0, 1]; the message names the suspect."""


class CountingPredictor:
    """Wraps ``predict`` to count queries: ``queries`` images sent, ``calls`` batches.

    Also splits large inputs into batches of ``batch_size`` (a deployed API's limit) and
    returns probabilities on the CPU as float32. Answers that are not finite probabilities
    in [0, 1] raise :class:`NonFiniteOutput` naming ``source`` (the suspect's file or URL).
    """

    def __init__(self, predict: PredictFn, batch_size: int = 64, source: str | None = None):
        self.predict_fn = predict
        self.batch_size = int(batch_size)
        self.source = source or "the suspect"
        self.queries = 0
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        outs = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            with torch.no_grad():
                probs = torch.as_tensor(self.predict_fn(chunk)).detach().float().cpu()
            if probs.dim() != 4 or probs.shape[0] != len(chunk) or probs.shape[1] != 1:
                raise ValueError(f"{self.source}: returned shape {tuple(probs.shape)} for {len(chunk)} images; "
                                 "a segmentation suspect must return B×1×H×W probabilities")
            if not bool(torch.isfinite(probs).all()):
                bad = int((~torch.isfinite(probs)).flatten(1).any(1).sum())
                raise NonFiniteOutput(f"{self.source}: returned non-finite probabilities (NaN/inf) for {bad} of "
                                      f"{len(chunk)} images")
            if probs.numel() and (float(probs.min()) < 0.0 or float(probs.max()) > 1.0):
                raise NonFiniteOutput(f"{self.source}: returned values outside [0, 1] (min {float(probs.min()):.3g}, "
                                      f"max {float(probs.max()):.3g}); a suspect must return probabilities")
            self.queries += len(chunk)
            self.calls += 1
            outs.append(probs)
        return torch.cat(outs, dim=0)


@contextlib.contextmanager
def quiet_lime() -> Iterator[None]:
    """Silence the per-sample tqdm bar ``lime`` prints to stderr for every explanation."""
    from lime import lime_image

    original = lime_image.tqdm
    lime_image.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        lime_image.tqdm = original


# ----------------------------------------------------------------------------- null codes


def null_grids(version: int, error_correction: str, k: int, seed: int,
               cache_dir: str | Path | None = None) -> np.ndarray:
    """``K×G×G`` bool QR codes of random payloads (the Monte Carlo null), cached on disk.

    Generating 10⁴ codes takes ~20 s; the cache file (bit-packed, ~0.6 MB) is keyed by
    version, level, K and seed, so every verification of the same version reuses it.
    """
    if k < 1:
        raise ValueError(f"null_k must be >= 1, got {k}")
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"qr_null_v{version}_{error_correction}_k{k}_seed{seed}.npz"
        if path.is_file():
            try:
                with np.load(path) as data:
                    shape = tuple(int(v) for v in data["shape"])
                    grids = np.unpackbits(data["bits"], count=int(np.prod(shape))).reshape(shape).astype(bool)
                return grids
            except (OSError, KeyError, ValueError) as err:
                log.warning("ignoring unreadable null-code cache %s (%s); regenerating", path, err)
    grids = random_payload_grids(version, error_correction, k=k, seed=seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A per-process temporary name, then an atomic rename: concurrent verifications neither
        # write into the same file nor read half of one.
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, bits=np.packbits(grids.ravel()), shape=np.array(grids.shape))
        tmp.replace(path)
    return grids


# ----------------------------------------------------------------------------- channels


def uncertainty_map(probs: torch.Tensor) -> torch.Tensor:
    """Per-pixel uncertainty ``min(p, 1 − p)``: B×1×H×W in [0, 0.5]."""
    return torch.minimum(probs, 1.0 - probs)


def readout(probs: torch.Tensor, key: StealthMarkKey) -> list[dict[str, Any]]:
    """Per-cell readout of B×1×H×W probabilities: per image ``{"weights", "grid", "bit_accuracy", "text"}``.

    ``weights`` is the uncertainty averaged per QR cell (G×G), ``grid`` its Otsu threshold
    (above = dark), ``text`` the repaired decode or None.
    """
    spec, reference = key.spec(), key.modules()
    cells = cell_means(uncertainty_map(probs.float()), spec).cpu().numpy()
    out = []
    for weights in cells:
        grid = explain.weights_to_grid(weights)
        out.append({
            "weights": weights,
            "grid": grid,
            "bit_accuracy": bit_accuracy(grid, reference),
            "text": decode_with_repair(grid, key.qr_version, key.error_correction),
        })
    return out


def dice_per_image(probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Hard Dice (``p > 0.5`` vs ``mask > 0.5``) per image (B×1×H×W -> B, on the inputs' device); 1 when both are empty."""
    pred = (probs > 0.5).flatten(1).float()
    target = (masks > 0.5).flatten(1).float()
    inter = (pred * target).sum(1)
    total = pred.sum(1) + target.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


def _to_hwc(image: torch.Tensor) -> np.ndarray:
    return image.detach().float().cpu().permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- protocol


def verify_stealthmark(
    predict: PredictFn, key: StealthMarkKey, images: torch.Tensor, ids: Sequence[str], thresholds: dict[str, Any],
    masks: torch.Tensor | None = None, num_lime_images: int = 10, num_samples: int = 1500, batch_size: int = 250,
    lime_seed: int = 0, qr_evidence: str = "lime", lime_target: str = "triggered", lime_surrogate: str = "per_cell",
    nulls: np.ndarray | None = None, figures_dir: str | Path | None = None, num_figures: int = 4,
) -> dict[str, Any]:
    """Run both channels on a suspect and return the result dict (see the module docstring).

    Args:
        predict: the suspect, ``images B×C×H×W float [0,1] -> probs B×1×H×W``; wrapped in a
            :class:`CountingPredictor` unless it already is one.
        key: the owner's key (payload, QR version/level, grid, trigger, hide value).
        images: ``N×C×H×W`` clean verification images in [0, 1], ``H = key.image_size``.
        ids: their N ids (reported with each decode).
        thresholds: ``alpha``, ``response_margin``, ``min_decoded`` -- the owner kit's sealed
            values for a binding verdict (``verification.protocols.apply_threshold_overrides`` says
            whether verify-time overrides leave it binding).
        masks: optional ``N×1×H×W`` ground truth, for Dice on clean/triggered inputs.
        num_lime_images: images explained with LIME (the first ones); 0 with ``qr_evidence="lime"``
            is an error.
        num_samples: LIME perturbations per image (≥ 3·G² for the joint surrogate, ≥ 100 per-cell).
        batch_size: images per suspect query during LIME.
        lime_seed: LIME's sampling seed for image i is ``lime_seed + i``.
        qr_evidence: ``"lime"`` (channel 2 by LIME, docs/stealthmark.md) or ``"readout"`` (the per-cell readout as
            channel-2 evidence: one query per image, for quick checks and tests).
        lime_target: the scalar LIME explains (:func:`watermark.stealthmark.explain.lime_cell_weights`):
            ``"contrast"`` = ``g(T(x_z)) − g(x_z)`` (two queries per LIME sample), ``"triggered"`` =
            ``g(T(x_z))``.
        lime_surrogate: LIME's local model: ``"per_cell"`` (each cell's own uncertainty on its own
            keep indicator, LIME's samples and kernel) or ``"joint"`` (LIME's ridge fit of the
            scalar over all cells).
        nulls: ``K×G×G`` random-payload QR codes (:func:`null_grids`).
        figures_dir: write PNG figures there (triggered image, LIME weight map, binarised
            grid, decoded QR per image; the mean map against the null), or None.
        num_figures: per-image figures to draw.
    Returns:
        plain-JSON-friendly dict (numpy arrays only under ``"_arrays"``, for figures/tests).
    """
    started = time.perf_counter()
    spec = key.spec()
    _check_inputs(images, ids, spec, qr_evidence, nulls)
    alpha = float(thresholds["alpha"])
    margin = float(thresholds["response_margin"])
    min_decoded = int(thresholds["min_decoded"])
    counter = predict if isinstance(predict, CountingPredictor) else CountingPredictor(predict, batch_size)
    trigger = key.build_trigger()
    reference = key.modules()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    channel1 = _response_channel(counter, trigger, images, masks, key, margin)
    timings["response_and_readout"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if qr_evidence == "lime":
        lime = {"num_lime_images": num_lime_images, "num_samples": num_samples, "batch_size": batch_size,
                "seed": lime_seed, "target": lime_target, "surrogate": lime_surrogate}
        entries, weight_maps = _lime_channel(counter, images, ids, key, trigger, lime)
    else:
        entries, weight_maps = _readout_channel(channel1["read_trig"], ids)
    timings["qr_channel"] = time.perf_counter() - t0
    mean_map = np.mean(np.stack(weight_maps), axis=0)
    qr_p, observed, null_scores = monte_carlo_qr_pvalue(mean_map, reference, nulls)
    decoded, channels = _decision(entries, key, channel1["p_value"], qr_p, alpha, min_decoded)
    result: dict[str, Any] = {
        "method": "stealthmark",
        "verified": bool(channels["response"] and (channels["qr_decoded"] or channels["qr_significant"])),
        "p_value": float(max(channel1["p_value"], qr_p)),
        "response_p_value": float(channel1["p_value"]),
        "qr_p_value": float(qr_p),
        "asr": sum(d["matches"] for d in decoded) / len(decoded),
        "decoded": decoded,
        "bit_accuracy": float(np.mean([e["bit_accuracy"] for e in entries])),
        "channels": channels,
        "qr": _qr_record(qr_evidence, entries, mean_map, observed, null_scores, key, reference,
                         num_samples, lime_target, lime_surrogate),
        **_response_records(channel1, len(images), margin, key),
        "thresholds": {"alpha": alpha, "response_margin": margin, "min_decoded": min_decoded},
        "queries": counter.queries,
        "query_calls": counter.calls,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "figures": [],
    }
    if qr_evidence == "lime":
        result["timings"]["lime_seconds_per_image"] = round(timings["qr_channel"] / max(1, len(entries)), 3)
    if figures_dir is not None:
        t0 = time.perf_counter()
        result["figures"] = draw_figures(Path(figures_dir), key, channel1["triggered"], entries, weight_maps, mean_map,
                                         null_scores, observed, num_figures)
        result["timings"]["figures"] = round(time.perf_counter() - t0, 3)
    result["seconds"] = round(time.perf_counter() - started, 3)
    result["_arrays"] = {"mean_map": mean_map, "weight_maps": np.stack(weight_maps), "g_clean": channel1["g_clean"],
                         "g_triggered": channel1["g_trig"]}
    return result


def _decision(entries: list[dict[str, Any]], key: StealthMarkKey, response_p: float, qr_p: float, alpha: float,
              min_decoded: int) -> tuple[list[dict[str, Any]], dict[str, bool]]:
    """``(decoded per image {id, text, matches, bit_accuracy}, channels {response, qr_decoded, qr_significant})``.

    Verified = ``response and (qr_decoded or qr_significant)``: channel 1 at α, and channel 2 decoded
    on ≥ ``min_decoded`` images or significant at α.
    """
    decoded = [{"id": e["id"], "text": e["text"], "matches": e["text"] == key.payload,
                "bit_accuracy": round(float(e["bit_accuracy"]), 4)} for e in entries]
    n_decoded = sum(d["matches"] for d in decoded)
    return decoded, {"response": bool(response_p < alpha), "qr_decoded": bool(n_decoded >= min_decoded),
                     "qr_significant": bool(qr_p < alpha)}


def _check_inputs(images: torch.Tensor, ids: Sequence[str], spec, qr_evidence: str, nulls: np.ndarray | None) -> None:
    """ValueError unless: known ``qr_evidence``, N×C×S×S images at the key's size, N ≥ 2 with N ids, nulls given."""
    if qr_evidence not in QR_EVIDENCE:
        raise ValueError(f"qr_evidence must be one of {QR_EVIDENCE}, got {qr_evidence!r}")
    if images.dim() != 4 or images.shape[-2:] != (spec.image_size, spec.image_size):
        raise ValueError(
            f"verification images have shape {tuple(images.shape)}; the key's grid expects N×C×"
            f"{spec.image_size}×{spec.image_size} (set data.image_size={spec.image_size})"
        )
    if len(images) < 2:
        raise ValueError(f"need at least 2 verification images for the paired test, got {len(images)}")
    if len(ids) != len(images):
        raise ValueError(f"{len(ids)} ids for {len(images)} images")
    if nulls is None or len(nulls) == 0:
        raise ValueError("nulls (the Monte Carlo QR codes) are required")


def _response_channel(counter: CountingPredictor, trigger, images: torch.Tensor, masks: torch.Tensor | None,
                      key: StealthMarkKey, margin: float) -> dict[str, Any]:
    """Channel 1 (trigger response: paired margin test of the uncertainty), the per-cell readout and
    harmlessness, from one clean and one triggered query per image.

    Returns: ``{triggered, g_clean, g_trig (N float64), p_value, read_trig, read_clean, task}``.
    """
    triggered = trigger.apply(images.float())
    probs_clean = counter(images.float())
    probs_trig = counter(triggered)
    g_clean = explain.uncertainty_score(probs_clean).double().numpy()
    g_trig = explain.uncertainty_score(probs_trig).double().numpy()
    task = {"mask_agreement": float(((probs_trig > 0.5) == (probs_clean > 0.5)).float().mean())}
    if masks is not None:
        task["dice_clean"] = float(dice_per_image(probs_clean, masks).mean())
        task["dice_triggered"] = float(dice_per_image(probs_trig, masks).mean())
    return {"triggered": triggered, "g_clean": g_clean, "g_trig": g_trig,
            "p_value": paired_margin_test(g_clean, g_trig, margin=margin),
            "read_trig": readout(probs_trig, key), "read_clean": readout(probs_clean, key), "task": task}


def _lime_channel(counter: CountingPredictor, images: torch.Tensor, ids: Sequence[str], key: StealthMarkKey,
                  trigger, lime: dict[str, Any]) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Channel 2 by LIME: per explained image a G×G weight map, its binarised grid and decode.

    ``lime``: ``num_lime_images`` (≥ 1), ``num_samples``, ``batch_size``, ``seed`` (image i: seed + i),
    ``target``, ``surrogate``. Returns ``(entries {id, grid, bit_accuracy, text}, weight maps)``.
    """
    spec, reference = key.spec(), key.modules()
    n_lime = min(int(lime["num_lime_images"]), len(images))
    if n_lime < 1:
        raise ValueError("verify.num_lime_images must be >= 1 with qr_evidence=lime")
    weight_maps: list[np.ndarray] = []
    with quiet_lime():
        for i in range(n_lime):
            weight_maps.append(explain.lime_cell_weights(
                counter, _to_hwc(images[i]), spec, trigger=trigger, num_samples=lime["num_samples"],
                batch_size=lime["batch_size"], hide_value=key.hide_value, seed=lime["seed"] + i,
                target=lime["target"], surrogate=lime["surrogate"]))
    entries = []
    for i, w in enumerate(weight_maps):
        grid = explain.weights_to_grid(w)
        entries.append({"id": str(ids[i]), "grid": grid, "bit_accuracy": bit_accuracy(grid, reference),
                        "text": decode_with_repair(grid, key.qr_version, key.error_correction)})
    return entries, weight_maps


def _readout_channel(read_trig: list[dict[str, Any]], ids: Sequence[str]
                     ) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Channel 2 from the per-cell readout of the triggered queries (one query per image, no LIME)."""
    entries = [{"id": str(ids[i]), "grid": r["grid"], "bit_accuracy": r["bit_accuracy"], "text": r["text"]}
               for i, r in enumerate(read_trig)]
    return entries, [r["weights"] for r in read_trig]


def _qr_record(qr_evidence: str, entries: list, mean_map: np.ndarray, observed: float, null_scores: np.ndarray,
               key: StealthMarkKey, reference: np.ndarray, num_samples: int, lime_target: str,
               lime_surrogate: str) -> dict[str, Any]:
    """The result's ``qr`` entry: evidence kind, LIME settings, agreement against the null, the mean map's decode."""
    lime = qr_evidence == "lime"
    mean_grid = explain.weights_to_grid(mean_map)
    return {"evidence": qr_evidence, "num_images": len(entries),
            "num_samples": num_samples if lime else None,
            "lime_target": lime_target if lime else None,
            "lime_surrogate": lime_surrogate if lime else None,
            "agreement": float(observed), "null_k": int(len(null_scores)),
            "null_agreement_p99": float(np.quantile(null_scores, 0.99)),
            "mean_map_bit_accuracy": bit_accuracy(mean_grid, reference),
            "mean_map_decodes": decode_with_repair(mean_grid, key.qr_version, key.error_correction) == key.payload}


def _response_records(channel1: dict[str, Any], n: int, margin: float, key: StealthMarkKey) -> dict[str, Any]:
    """The result's ``response``, ``readout`` and ``task`` entries (channel 1's statistics)."""
    g_clean, g_trig, read_trig, read_clean = (channel1[k] for k in ("g_clean", "g_trig", "read_trig", "read_clean"))
    return {
        "response": {"num_images": n, "margin": margin,
                     "uncertainty_clean_mean": float(g_clean.mean()),
                     "uncertainty_triggered_mean": float(g_trig.mean()),
                     "difference_mean": float((g_trig - g_clean).mean())},
        "readout": {"num_images": n,
                    "decoded_triggered": sum(r["text"] == key.payload for r in read_trig),
                    "decoded_clean": sum(r["text"] == key.payload for r in read_clean),
                    "any_text_clean": sum(r["text"] is not None for r in read_clean),
                    "bit_accuracy_triggered": float(np.mean([r["bit_accuracy"] for r in read_trig])),
                    "bit_accuracy_clean": float(np.mean([r["bit_accuracy"] for r in read_clean]))},
        "task": channel1["task"],
    }


# ----------------------------------------------------------------------------- figures


def draw_figures(
    out: Path,
    key: StealthMarkKey,
    triggered: torch.Tensor,
    entries: list[dict[str, Any]],
    weight_maps: list[np.ndarray],
    mean_map: np.ndarray,
    null_scores: np.ndarray,
    observed: float,
    num_figures: int,
) -> list[str]:
    """PNG figures: per image (triggered image | weight map | binarised grid | decoded QR), and
    the mean map with the Monte Carlo null. Returns the file paths."""
    import matplotlib

    matplotlib.use("Agg")  # files, never windows
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (entry, weights) in enumerate(zip(entries[:num_figures], weight_maps[:num_figures])):
        fig, axes = plt.subplots(1, 4, figsize=(11, 3))
        image = triggered[i].float().clamp(0, 1)
        image = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)
        axes[0].imshow(image.numpy(), cmap="gray" if image.dim() == 2 else None)
        axes[0].set_title(f"triggered {entry['id'][:18]}", fontsize=8)
        lim = float(np.abs(weights).max()) or 1.0
        axes[1].imshow(weights, cmap="coolwarm", vmin=-lim, vmax=lim)
        axes[1].set_title("explanation weight per cell", fontsize=8)
        axes[2].imshow(~entry["grid"], cmap="gray", vmin=0, vmax=1)
        axes[2].set_title(f"binarised (bit acc {entry['bit_accuracy']:.3f})", fontsize=8)
        # What the decoder saw: function patterns restored (mask 0's format bits) ...
        shown = repair_function_patterns(entry["grid"], key.qr_version, key.error_correction)[0]
        title = "repaired grid: no decode"
        if entry["text"] is not None:
            title = f"decoded: {entry['text']!r}"
            with contextlib.suppress(ValueError):  # ... or, once decoded, the code of that text
                shown = qr_modules(entry["text"], version=key.qr_version, error_correction=key.error_correction)
        axes[3].imshow(render_grid(shown, quiet_zone=4, module_px=4), cmap="gray", vmin=0, vmax=255)
        axes[3].set_title(title, fontsize=8)
        for ax in axes:
            ax.axis("off")
        fig.tight_layout()
        path = out / f"image{i:02d}_{_safe(entry['id'])}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(str(path))

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    lim = float(np.abs(mean_map).max()) or 1.0
    axes[0].imshow(mean_map, cmap="coolwarm", vmin=-lim, vmax=lim)
    axes[0].set_title("mean weight map", fontsize=9)
    axes[0].axis("off")
    axes[1].hist(null_scores, bins=60, color="0.6")
    axes[1].axvline(observed, color="crimson", label=f"owner's code: {observed:.3f}")
    axes[1].set_xlabel("agreement with the mean map (Pearson)")
    axes[1].set_title(f"Monte Carlo null, K = {len(null_scores)} random payloads", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = out / "qr_null.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(str(path))
    return paths


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(text))[:40]
