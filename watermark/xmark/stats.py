"""X-Mark's ownership statistic (docs/xmark.md, step 5) on top of :func:`watermark.stats.paired_margin_test`.

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

from collections.abc import Mapping, Sequence
from typing import Any

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


# Per-image fields of a control record (owner kit ``control.<name>``) that let verify re-test the
# control at any τ/α: P_b, P_w (shape m, in [0, 1]) and the predicted class on each x_w.
CONTROL_PER_IMAGE = ("p_benign", "p_marked", "pred_marked")


def retest_controls(
    control: Mapping[str, Mapping[str, Any]], tau: float, alpha: float, target_class: int
) -> dict[str, dict[str, Any]]:
    """The owner's clean controls at the thresholds a verification uses.

    Args:
        control: the owner kit's ``control`` section: ``{name: record}``; a record holds the
            release-time result (``p_value, delta_p, wsr, verified``) and, in kits written since
            the per-image fields were added, ``p_benign``/``p_marked`` (shape m, in [0, 1]) and
            ``pred_marked`` (shape m, class indices).
        tau, alpha: the thresholds of this verification (sealed or exploratory).
        target_class: y_t (for the WSR from ``pred_marked``).

    Returns:
        ``{name: {"p_value", "delta_p", "wsr", "verified", "recorded_verified", "retested",
        "tau", "alpha"}}``. With per-image numbers the control is re-tested with
        :func:`xmark_test` at ``tau``/``alpha`` (``retested: True``); without them (old kits) the
        release-time record is kept (``retested: False``). ``verified`` -- the control *blocks*
        the verdict -- is the re-test's result OR the release-time ``verified`` flag
        (conservative: a control that ever passed blocks).

    Raises:
        ValueError: a malformed per-image field (message names ``control.<name>.<field>``).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, record in control.items():
        if not isinstance(record, Mapping):
            raise ValueError(f"control.{name} must be an object, got {type(record).__name__}")
        recorded = bool(record.get("verified", False))
        entry: dict[str, Any] = {"p_value": record.get("p_value"), "delta_p": record.get("delta_p"),
                                 "wsr": record.get("wsr"), "recorded_verified": recorded, "retested": False,
                                 "tau": record.get("tau"), "alpha": record.get("alpha")}
        if record.get("p_benign") is not None and record.get("p_marked") is not None:
            for field in CONTROL_PER_IMAGE:
                values = record.get(field)
                if values is not None and (not isinstance(values, (list, tuple)) or not all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
                    raise ValueError(f"control.{name}.{field} must be a list of numbers")
            try:
                result = xmark_test(record["p_benign"], record["p_marked"], tau, alpha,
                                    record.get("pred_marked"), target_class if record.get("pred_marked") else None)
            except ValueError as err:
                raise ValueError(f"control.{name}: {err}") from None
            if result["wsr"] is None:
                result["wsr"] = record.get("wsr")
            entry.update({k: result[k] for k in ("p_value", "delta_p", "wsr", "tau", "alpha")},
                         retested=True, retest_verified=result["verified"])
        entry["verified"] = bool(recorded or entry.get("retest_verified", False))
        out[name] = entry
    return out
