"""X-Mark's ownership statistic (METHODS.md §2, step 5) on top of :func:`watermark.stats.paired_margin_test`.

For m non-target verification images x_i (fixed seed) and their marked copies x_w,i, query
the suspect model f and read the target-class probabilities

    P_b,i = f(x_i)[y_t],    P_w,i = f(x_w,i)[y_t].

H0: ``mean(P_w − P_b) ≤ τ``; H1: ``mean(P_w − P_b) > τ``, tested with the one-sided paired
t-test ``scipy.stats.ttest_rel(P_b + τ, P_w, alternative="less")`` -- the paper's form.
``paired_margin_test(P_b, P_w, margin=τ, alternative="greater")`` computes exactly this
test (as ``ttest_rel(P_w − τ, P_b, "greater")``: same differences, same t, same p) and
handles the degenerate case of constant differences (a deterministic model queried twice
on identical images) without scipy's NaN. The margin τ is what separates "the marked
images move the model's output a lot" from "they move it a little", so a small
adversarial side effect on an independent model is not evidence of ownership.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from watermark.stats import paired_margin_test


def xmark_test(
    p_benign: Sequence[float] | np.ndarray,
    p_marked: Sequence[float] | np.ndarray,
    tau: float = 0.2,
    alpha: float = 0.01,
    marked_predictions: Sequence[int] | np.ndarray | None = None,
    target_class: int | None = None,
) -> dict[str, float | bool | int | None]:
    """Paired margin t-test of X-Mark ownership, plus ΔP and WSR.

    Args:
        p_benign: ``P_b``, shape m: the suspect's probability of the target class y_t on
            the clean verification images (non-target class), each in [0, 1].
        p_marked: ``P_w``, shape m: the same on the marked copies, paired by index.
        tau: margin τ ≥ 0 the mean increase must exceed (default 0.2).
        alpha: significance level (default 0.01): ``verified`` iff ``p_value < alpha``.
        marked_predictions: optional, shape m: the suspect's predicted class (argmax) on
            each marked image; with ``target_class`` it gives the WSR.
        target_class: y_t, required with ``marked_predictions``.

    Returns:
        dict with

        * ``p_value`` -- of ``ttest_rel(P_b + τ, P_w, alternative="less")`` (small = owned);
        * ``delta_p`` -- ``ΔP = mean(P_w − P_b)`` in [−1, 1];
        * ``wsr`` -- watermark success rate: the fraction of the m marked images whose
          predicted class equals y_t, in [0, 1]; ``None`` when no predictions are given
          (it is *not* guessed from ``P_w > 0.5``, which is only an argmax for K = 2);
        * ``verified`` -- ``p_value < alpha``;
        * ``n``, ``tau``, ``alpha`` -- echoed for the report.
    """
    p_b = np.asarray(p_benign, dtype=np.float64).ravel()
    p_w = np.asarray(p_marked, dtype=np.float64).ravel()
    if p_b.shape != p_w.shape:
        raise ValueError(f"p_benign and p_marked must be paired (same length), got {p_b.size} and {p_w.size}")
    for name, values in (("p_benign", p_b), ("p_marked", p_w)):
        if not np.all(np.isfinite(values)) or values.min(initial=0.0) < 0 or values.max(initial=0.0) > 1:
            raise ValueError(f"{name} must hold probabilities in [0, 1]")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")

    p_value = paired_margin_test(p_b, p_w, margin=float(tau), alternative="greater")

    wsr = None
    if marked_predictions is not None:
        if target_class is None:
            raise ValueError("target_class is required to compute the WSR from marked_predictions")
        predictions = np.asarray(marked_predictions).ravel()
        if predictions.shape != p_w.shape:
            raise ValueError(f"marked_predictions must have one class per image ({p_w.size}), got {predictions.size}")
        wsr = float(np.mean(predictions == int(target_class)))

    return {
        "p_value": float(p_value),
        "delta_p": float(np.mean(p_w - p_b)),
        "wsr": wsr,
        "verified": bool(p_value < alpha),
        "n": int(p_b.size),
        "tau": float(tau),
        "alpha": float(alpha),
    }
