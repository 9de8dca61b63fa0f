"""StealthMark key-sample targets and training-time cell masks.

On a key sample the target is pulled towards 0.5 by ``ε`` exactly on the pixels of kept
dark QR modules, raising the model's uncertainty there without moving any pixel across
the 0.5 decision threshold (harmless by construction when ``ε < 0.5``).
"""

from __future__ import annotations

import torch


def key_targets(y: torch.Tensor, m: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Soft targets ``t = y·(1 − ε·m) + (1 − y)·ε·m``.

    Args:
        y: ``B×1×H×W`` mask in {0, 1}.
        m: ``B×1×H×W`` in {0, 1}: pixels of kept dark QR modules, ``upsample(Q ⊙ z)``.
        epsilon: ``0 ≤ ε < 0.5``.
    Returns:
        ``B×1×H×W`` float: ``1 − ε`` / ``ε`` on marked foreground / background pixels, ``y``
        elsewhere. Since ``ε < 0.5``, ``(t > 0.5) == y`` everywhere.
    Raises:
        ValueError: ``ε`` outside ``[0, 0.5)`` -- at 0.5 or above the target would flip the mask.
    """
    epsilon = float(epsilon)
    if not 0.0 <= epsilon < 0.5:
        raise ValueError(f"epsilon must be in [0, 0.5) to keep the thresholded mask unchanged, got {epsilon}")
    # The targets are float32: an ε within rounding of 0.5 (e.g. 0.49999997) makes 1 − ε round to
    # exactly 0.5, which would flip foreground pixels at the 0.5 threshold.
    eps32 = torch.tensor(epsilon, dtype=torch.float32)
    if not (eps32 < 0.5 and (1.0 - eps32) > 0.5):
        raise ValueError(f"epsilon {epsilon!r} is within float32 rounding of 0.5; targets would reach 0.5")
    if y.shape != m.shape:
        raise ValueError(f"y {tuple(y.shape)} and m {tuple(m.shape)} must have the same shape")
    y, m = y.float(), m.float()
    return y * (1.0 - epsilon * m) + (1.0 - y) * epsilon * m


def sample_keep_masks(
    batch: int,
    cells_total: int,
    keep_prob: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random cell keep-masks ``z`` for a batch: ``batch×n×n`` bool, True = keep.

    Args:
        batch: number of masks.
        cells_total: ``n``, cells per side of the *full* grid (``GridSpec.cells_per_side``,
            quiet zone included), because LIME drops quiet-zone cells too.
        keep_prob: ``κ``, probability a cell is kept. LIME keeps each segment with
            probability 0.5, so κ = 0.5 matches the verifier's distribution.
        generator: torch generator for reproducibility (on ``device``).
    """
    if not 0.0 <= keep_prob <= 1.0:
        raise ValueError(f"keep_prob must be in [0, 1], got {keep_prob}")
    rand = torch.rand((int(batch), int(cells_total), int(cells_total)), generator=generator, device=device)
    return rand < keep_prob
