"""LIME explanations of a segmentation model's uncertainty over the QR grid (StealthMark channel 2).

The explained scalar is ``g(x) = mean over pixels of min(p, 1 − p)``. LIME perturbs the
image by hiding whole grid cells (its segments are exactly our cells), queries the model in
batches, and fits its weighted ridge regression of ``g`` on the keep indicators; the
coefficient of a QR cell says how much keeping that cell raises the uncertainty. A marked
model, triggered, raises uncertainty exactly on kept *dark* modules (training uses
``m = upsample(Q ⊙ z)`` with Q True on dark), so **positive weight = dark module**.

Everything comes from the model's answers to LIME's own random perturbations: a model
without the mark gives weights unrelated to the owner's QR code (and a model whose
output ignores the image gives all-zero weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import sklearn.metrics
import torch
from lime import lime_image

from watermark.stealthmark.grid import GridSpec, cell_index_map, cell_means

PredictFn = Callable[[torch.Tensor], torch.Tensor]
LIME_TARGETS = ("triggered", "contrast")
LIME_SURROGATES = ("joint", "per_cell")


def uncertainty_score(probs: torch.Tensor) -> torch.Tensor:
    """Per-image uncertainty: mean over pixels (and channels) of ``min(p, 1 − p)``.

    Args:
        probs: ``B×1×H×W`` probabilities in [0, 1] (any ``B×…`` works).
    Returns:
        ``B`` float tensor in [0, 0.5].
    """
    probs = torch.as_tensor(probs).float()
    return torch.minimum(probs, 1.0 - probs).flatten(1).mean(dim=1)


def lime_cell_weights(
    predict_fn: PredictFn,
    image: np.ndarray,
    spec: GridSpec,
    trigger=None,
    num_samples: int = 1500,
    batch_size: int = 250,
    hide_value: float | str | Sequence[float] = 0.0,
    seed: int = 0,
    target: str = "triggered",
    surrogate: str = "per_cell",
) -> np.ndarray:
    """LIME weights of the QR cells for the model's uncertainty on the triggered image.

    Args:
        predict_fn: black-box ``predict(images B×C×H×W float [0,1]) -> probs B×1×H×W``.
        image: the *clean* image, ``H×W×C`` (or ``H×W``) float in [0, 1], ``H = spec.image_size``.
        spec: the grid (QR + quiet zone) whose cells are LIME's features.
        trigger: the owner's trigger (``watermark.stealthmark.triggers``) or None. It is applied to every
            perturbed image *after* LIME hides cells -- the order used in training -- so the
            trigger is always present: for patch/text/border triggers this restores exactly the
            trigger pixels of the triggered original (they live in quiet-zone cells, which LIME
            also hides); noise/warp triggers act on the perturbed image as they did in training.
        num_samples: LIME perturbations (at least :func:`min_lime_samples`: 3·G² for ``joint``,
            more samples than cells; 100 for ``per_cell``).
        batch_size: images per model query.
        hide_value: fill of hidden cells: a float, per-channel floats, or ``"mean"`` (the image's
            per-channel mean; the same as ``apply_cell_mask``). Never LIME's per-segment mean,
            which would not match the training perturbation.
        seed: seeds LIME's perturbation sampling (and its unused segmentation seed).
        target: the explained scalar per perturbed image ``x_z``. ``"triggered"``: ``g(T(x_z))``
            (docs/stealthmark.md). ``"contrast"``: ``g(T(x_z)) − g(x_z)``, the trigger's effect on the same
            perturbed image (two queries per sample). Hiding cells changes the task uncertainty
            too (edges of hidden cells, hidden lesion parts) in a way that depends on the image
            and on which neighbours are hidden; that part is the same with and without the
            trigger, so the contrast cancels it and leaves the mark's response, while a model
            that ignores the trigger gives a contrast of ~0 everywhere. Requires a trigger.
        surrogate: LIME's local linear model. ``"joint"``: LIME's own weighted ridge regression of
            the scalar ``g`` on all cells' keep indicators (``explain_instance``). ``"per_cell"``:
            the same LIME perturbations (``data_labels``) and locality kernel, but each QR cell's
            *own* uncertainty ``u_c`` (the mean of ``min(p, 1 − p)`` over the cell; ``g`` is their
            mean) is explained by its own keep indicator (a kernel-weighted least-squares slope,
            i.e. the weighted mean of ``u_c`` when the cell is kept minus when it is hidden). ``g``
            mixes all cells' answers into one number, so the joint fit's weight of one cell
            carries the noise of every other cell; the per-cell fit reads each summand where it
            arises and needs far fewer samples for the same accuracy (docs/stealthmark.md §4).
    Returns:
        ``G×G`` float64 weights of the QR cells (quiet-zone cells dropped); positive = keeping
        the cell raises uncertainty.
    """
    image = _checked_image(image, spec, num_samples, target, surrogate, trigger)
    segments = cell_index_map(spec)
    hide_color = _hide_color(image, hide_value)
    explained = _explained_values(predict_fn, trigger, target, spec)
    explainer = lime_image.LimeImageExplainer(kernel_width=0.25, feature_selection="none", random_state=seed)
    if surrogate == "per_cell":
        return _per_cell_weights(explainer, image, segments, hide_color, spec,
                                 lambda batch: explained(batch, per_cell=True), num_samples, batch_size)
    return _joint_weights(explainer, image, segments, hide_color, spec,
                          lambda batch: explained(batch, per_cell=False), num_samples, batch_size, seed)


# The per-cell fit estimates one slope per cell from that cell's own kept/hidden samples (about half
# each): a floor against a meaningless fit, not a recommendation. On the demo's marked model 150 and
# 400 samples gave the same per-image bit accuracies as 1500 (docs/stealthmark.md section 4).
PER_CELL_MIN_SAMPLES = 100


def min_lime_samples(spec: GridSpec, surrogate: str) -> int:
    """Fewest LIME samples per image: ``3·G²`` for the joint ridge over all G² cells (more samples
    than unknowns), :data:`PER_CELL_MIN_SAMPLES` for the per-cell fit (one unknown per fit)."""
    return 3 * spec.grid_size**2 if surrogate == "joint" else PER_CELL_MIN_SAMPLES


def _checked_image(image: np.ndarray, spec: GridSpec, num_samples: int, target: str, surrogate: str,
                   trigger) -> np.ndarray:
    """``image`` as ``H×W×C`` float32, after checking it and LIME's settings (ValueError naming the bad one)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[:2] != (spec.image_size, spec.image_size):
        raise ValueError(f"image must be {spec.image_size}×{spec.image_size}×C, got {image.shape}")
    if target not in LIME_TARGETS:
        raise ValueError(f"target must be one of {LIME_TARGETS}, got {target!r}")
    if surrogate not in LIME_SURROGATES:
        raise ValueError(f"surrogate must be one of {LIME_SURROGATES}, got {surrogate!r}")
    floor = min_lime_samples(spec, surrogate)
    if num_samples < floor:
        rule = f"3·G² = {floor} for a {spec.grid_size}² grid" if surrogate == "joint" else str(floor)
        raise ValueError(f"LIME with the {surrogate} surrogate needs at least {rule} samples, got {num_samples}")
    if target == "contrast" and trigger is None:
        raise ValueError("target='contrast' explains the trigger's effect and needs the trigger")
    return image


def _hide_color(image: np.ndarray, hide_value: float | str | Sequence[float]) -> float | np.ndarray:
    """The fill of hidden cells: a float, per-channel floats (C), or the image's per-channel mean (``"mean"``)."""
    if isinstance(hide_value, str):
        if hide_value != "mean":
            raise ValueError(f"hide_value must be a number, per-channel floats or 'mean', got {hide_value!r}")
        return image.mean(axis=(0, 1))
    if isinstance(hide_value, (int, float)):
        return float(hide_value)
    hide_color = np.asarray(hide_value, dtype=np.float32)
    if hide_color.shape != (image.shape[2],):
        raise ValueError(f"hide_value has {hide_color.shape} entries, image has {image.shape[2]} channels")
    return hide_color


def _explained_values(predict_fn: PredictFn, trigger, target: str, spec: GridSpec
                      ) -> Callable[[np.ndarray, bool], np.ndarray]:
    """``explained(batch N×H×W×C, per_cell) -> N`` (``g``) or ``N×G²`` (``u_c``) values of the model's answers.

    The trigger is applied after LIME hid cells; ``target="contrast"`` sends the triggered and the
    untriggered copies in one query and returns their difference.
    """
    def explained(batch: np.ndarray, per_cell: bool) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).permute(0, 3, 1, 2)
        if target == "contrast":  # one query of 2N images: the triggered copies, then the untriggered ones
            x = torch.cat([trigger.apply(x), x])
        elif trigger is not None:
            x = trigger.apply(x)
        with torch.no_grad():
            probs = torch.as_tensor(predict_fn(x)).float().cpu()
        if per_cell:
            values = cell_means(torch.minimum(probs, 1.0 - probs), spec).flatten(1).double().numpy()
        else:
            values = uncertainty_score(probs).double().numpy()
        if target == "contrast":
            values = values[: len(batch)] - values[len(batch):]
        return values

    return explained


def _joint_weights(explainer, image, segments, hide_color, spec: GridSpec, values_fn, num_samples: int,
                   batch_size: int, seed: int) -> np.ndarray:
    """``G×G`` LIME weights from its own weighted ridge fit of ``g`` on every cell's keep indicator."""
    n_features = spec.cells_per_side**2

    def classifier_fn(batch: np.ndarray) -> np.ndarray:
        # LIME hands N×H×W×C perturbed copies and wants N×labels "probabilities";
        # label 1 is the uncertainty g, label 0 its complement.
        g = values_fn(batch)
        return np.stack([1.0 - g, g], axis=1)

    # feature_selection="none": keep every cell in the regression (LIME's "auto" would run an
    # extra ridge fit only to rank them); kernel width is LIME's default for images.
    explanation = explainer.explain_instance(
        image,
        classifier_fn,
        labels=(1,),
        top_labels=None,
        hide_color=hide_color,
        num_features=n_features,
        num_samples=int(num_samples),
        batch_size=int(batch_size),
        segmentation_fn=lambda _img: segments,
        random_seed=seed,
    )
    weights = np.zeros(n_features, dtype=np.float64)
    for feature, weight in explanation.local_exp[1]:
        weights[int(feature)] = weight  # feature index == segment id == i·n + j
    n, q, g = spec.cells_per_side, spec.quiet_zone, spec.grid_size
    return weights.reshape(n, n)[q : q + g, q : q + g].copy()


def _per_cell_weights(explainer, image, segments, hide_color, spec: GridSpec, values_fn, num_samples: int,
                      batch_size: int) -> np.ndarray:
    """``G×G`` per-cell LIME weights: LIME's samples and kernel, each cell's value on its own indicator."""
    fudged = image.copy()
    fudged[:] = hide_color  # what explain_instance does with a hide_color
    # data: S×n² keep indicators (row 0 = the unperturbed image), values: S×G² per-cell uncertainties
    data, values = explainer.data_labels(image, fudged, segments, values_fn, int(num_samples),
                                         batch_size=int(batch_size))
    distances = sklearn.metrics.pairwise_distances(data, data[0].reshape(1, -1), metric="cosine").ravel()
    kernel = explainer.base.kernel_fn(distances)[:, None]  # LIME's locality weights, S×1
    n, q, g = spec.cells_per_side, spec.quiet_zone, spec.grid_size
    qr_features = (np.arange(q, q + g)[:, None] * n + np.arange(q, q + g)[None, :]).ravel()  # feature of QR cell
    kept = data[:, qr_features].astype(np.float64)  # S×G²
    # weighted least squares of values[:, c] on [1, kept[:, c]] -> slope = weighted mean when kept
    # minus weighted mean when hidden (a cell never seen kept or hidden has no evidence: 0)
    w_on, w_off = (kernel * kept).sum(0), (kernel * (1 - kept)).sum(0)
    mean_on = (kernel * kept * values).sum(0) / np.maximum(w_on, 1e-12)
    mean_off = (kernel * (1 - kept) * values).sum(0) / np.maximum(w_off, 1e-12)
    weights = np.where((w_on > 0) & (w_off > 0), mean_on - mean_off, 0.0)
    return weights.reshape(g, g)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of a 1-D sample: the split maximising between-class variance.

    Exact (all split points tried); returns the midpoint between the two classes' nearest
    values. For a constant sample returns that constant.
    """
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size < 2 or v[0] == v[-1]:
        return float(v[0]) if v.size else 0.0
    k = np.arange(1, v.size)  # size of the lower class
    csum = np.cumsum(v)[:-1]
    mu_low = csum / k
    mu_high = (v.sum() - csum) / (v.size - k)
    between = k * (v.size - k) * (mu_low - mu_high) ** 2
    between[v[k - 1] == v[k]] = -1.0  # a split must fall between distinct values
    best = int(np.argmax(between))
    return float((v[best] + v[best + 1]) / 2.0)


def weights_to_grid(weights: np.ndarray, method: str = "otsu") -> np.ndarray:
    """Threshold a ``G×G`` weight map into a QR grid: ``G×G`` bool, True = dark module.

    Polarity: cells whose weight is *above* the threshold raise uncertainty when kept, and
    training raised uncertainty on dark modules (m = Q with Q True for dark), so they are dark.

    Args:
        weights: ``G×G`` floats.
        method: ``"otsu"`` (default; robust when dark and light modules are not 50/50) or
            ``"median"``.
    Returns:
        ``G×G`` bool; all False for a constant map (no evidence of any dark module).
    """
    w = np.asarray(weights, dtype=np.float64)
    if method == "otsu":
        threshold = otsu_threshold(w)
    elif method == "median":
        threshold = float(np.median(w))
    else:
        raise ValueError(f"method must be 'otsu' or 'median', got {method!r}")
    return w > threshold
