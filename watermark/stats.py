"""Statistical tests for ownership verification.

* ``paired_margin_test`` -- channel 1 of StealthMark (trigger response) and the X-Mark
  paired test: a one-sided paired t-test that the triggered statistic exceeds the clean one
  by more than a margin.
* ``monte_carlo_qr_pvalue`` -- channel 2 of StealthMark (QR payload): how unusual is the
  agreement of an explanation map with the owner's QR code among QR codes of random
  payloads of the same version? This null makes no independence assumption between cells
  (explanation maps are smooth, and all QR codes share their finder patterns).
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def paired_margin_test(a: np.ndarray, b: np.ndarray, margin: float = 0.0, alternative: str = "greater") -> float:
    """One-sided paired t-test of ``b`` against ``a`` with a margin.

    Args:
        a: per-image statistic on clean inputs, shape ``N``.
        b: the same statistic on the triggered copies of the same images, shape ``N``.
        margin: ``τ ≥ 0``, the effect the alternative must exceed.
        alternative: ``"greater"`` -- H1: ``mean(b − a) > τ`` (trigger raises the statistic,
            e.g. StealthMark's uncertainty; X-Mark's ``ttest_rel(P_b + τ, P_w, "less")`` is this
            test with ``a = P_b``, ``b = P_w``); computed as ``ttest_rel(b − τ, a, "greater")``.
            ``"less"`` -- H1: ``mean(b − a) < −τ`` (trigger lowers it); ``ttest_rel(b + τ, a, "less")``.
    Returns:
        p-value in [0, 1]; small = evidence for H1. Differences that are constant (up to rounding)
        (a deterministic model queried twice) have infinite t: p = 0 when the constant lies
        strictly beyond the margin in the alternative's direction, else 1.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"a and b must be paired samples of equal length >= 2, got {a.size} and {b.size}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if alternative == "greater":
        diff_sample = b - margin
    elif alternative == "less":
        diff_sample = b + margin
    else:
        raise ValueError(f"alternative must be 'greater' or 'less', got {alternative!r}")
    shifted = diff_sample - a
    if np.ptp(shifted) <= 1e-12 * max(1.0, float(np.abs(shifted).max())):
        # Constant up to rounding: scipy would warn about catastrophic cancellation and
        # return ±inf or NaN.
        beyond = shifted[0] > 0 if alternative == "greater" else shifted[0] < 0
        return 0.0 if beyond else 1.0
    p = stats.ttest_rel(diff_sample, a, alternative=alternative).pvalue
    return float(p) if np.isfinite(p) else 1.0


def qr_agreement(weight_map: np.ndarray, grids: np.ndarray, atol: float = 1e-12) -> np.ndarray:
    """Pearson correlation between a weight map and one or more QR grids (as ±1).

    Args:
        weight_map: ``G×G`` floats (positive = dark expected).
        grids: ``G×G`` or ``K×G×G`` bool (True = dark).
        atol: a weight map whose standard deviation is at most ``atol`` carries no
            information; its agreement with everything is 0.
    Returns:
        scalar array (single grid) or ``K`` agreements in [−1, 1].
    """
    w = np.asarray(weight_map, dtype=np.float64)
    g = np.asarray(grids, dtype=bool)
    single = g.ndim == 2
    g = g[None] if single else g
    if g.shape[1:] != w.shape:
        raise ValueError(f"grids of shape {g.shape[1:]} do not match weight map {w.shape}")
    w = w.ravel()
    signs = g.reshape(len(g), -1).astype(np.float64) * 2.0 - 1.0
    w_c = w - w.mean()
    s_c = signs - signs.mean(axis=1, keepdims=True)
    w_norm = np.sqrt((w_c**2).sum())
    s_norm = np.sqrt((s_c**2).sum(axis=1))
    if w.std() <= atol:
        out = np.zeros(len(g))
    else:
        out = (s_c @ w_c) / (w_norm * np.where(s_norm > 0, s_norm, np.inf))
    return out[0] if single else out


def monte_carlo_qr_pvalue(
    weight_map: np.ndarray, owner_grid: np.ndarray, null_grids: np.ndarray
) -> tuple[float, float, np.ndarray]:
    """Monte Carlo p-value of the weight map's agreement with the owner's QR code.

    Args:
        weight_map: ``G×G`` floats, e.g. the mean LIME weight map over verification images.
        owner_grid: ``G×G`` bool, the owner's QR code Q.
        null_grids: ``K×G×G`` bool, QR codes of random payloads of the same version/level
            (``watermark.stealthmark.qr.random_payload_grids``); docs/methods/stealthmark.md uses K = 10⁴.
    Returns:
        ``(p, observed, null_scores)``: ``p = (1 + #{null ≥ observed}) / (1 + K)`` in
        ``[1/(1+K), 1]``, the owner's agreement, and the ``K`` null agreements (Pearson
        correlation of the map with each grid as ±1).
    """
    observed = float(qr_agreement(weight_map, owner_grid))
    null_scores = qr_agreement(weight_map, null_grids)
    if null_scores.ndim != 1 or null_scores.size == 0:
        raise ValueError("null_grids must be a non-empty K×G×G stack")
    p = (1.0 + float(np.sum(null_scores >= observed))) / (1.0 + null_scores.size)
    return p, observed, null_scores
