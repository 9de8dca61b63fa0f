"""MIAD-MARK's δ: an L∞-bounded PGD perturbation confined to the visible mark's footprint.

Given a marked batch ``x_m`` (B×C×H×W float in [0, 1]) and the footprint of each mark
(B×H×W bool, the pixels with ``alpha * A > 0``), PGD maximises a per-image loss
(e.g. the cross-entropy of the true grade over an ensemble of surrogates) over

    δ  with  |δ| <= ε  (L∞, pixel units),   δ = 0 outside the footprint,
    x_m + δ in [0, 1].

Pixels outside the footprint are never touched, so the lesion region stays bit-identical
once the mark avoids it. The result is meant for :func:`watermark.medlocker.logo.render_protected`
(which adds δ on the footprint, clips and rounds to uint8), so this module returns δ, not
the perturbed image. Framework-free: plain torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def pgd_on_footprint(
    loss_fn: Callable[[Tensor], Tensor],
    marked: Tensor,
    footprint: Tensor,
    epsilon: float,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sign-gradient ascent on ``loss_fn`` restricted to the footprint (PGD, L∞ ball).

    Args:
        loss_fn: maps B×C×H×W images in [0, 1] to a per-image loss ``(B,)`` to *maximise*.
        marked: B×C×H×W float in [0, 1], the images with the mark already blended in.
        footprint: B×H×W (or B×1×H×W) bool/{0,1}; δ is zero outside it.
        epsilon: L∞ radius in pixel units (e.g. 8/255); 0 returns zeros.
        steps: PGD iterations (>= 0).
        step_size: per-step change (default ``2.5 * epsilon / steps``).
        random_start: start from uniform noise in the ball (on the footprint).
        generator: torch RNG for the random start (reproducibility).

    Returns:
        δ, B×C×H×W float32 on ``marked``'s device, ``|δ| <= epsilon``, zero off the
        footprint, and ``marked + δ`` in [0, 1]. Per image, the δ of the step with the
        highest loss is kept (the loss can oscillate under sign steps).
    """
    if marked.ndim != 4:
        raise ValueError(f"marked must be B x C x H x W, got shape {tuple(marked.shape)}")
    if epsilon < 0 or steps < 0:
        raise ValueError(f"epsilon and steps must be >= 0, got {epsilon}, {steps}")
    B, C, H, W = marked.shape
    fp = footprint.reshape(B, 1, H, W).to(device=marked.device, dtype=marked.dtype)
    if fp.shape[0] != B:
        raise ValueError(f"footprint batch {footprint.shape[0]} != images batch {B}")
    x = marked.detach()
    if epsilon == 0 or steps == 0:
        return torch.zeros_like(x)
    step = 2.5 * epsilon / steps if step_size is None else float(step_size)
    low, high = (-x).clamp(min=-epsilon), (1 - x).clamp(max=epsilon)  # keeps x + δ in [0, 1]
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
        delta = ((2 * noise - 1) * epsilon).clamp(low, high) * fp
    else:
        delta = torch.zeros_like(x)
    best = delta.clone()
    best_loss = torch.full((B,), -float("inf"), device=x.device)
    for _ in range(steps + 1):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(x + delta)
            grad, = torch.autograd.grad(loss.sum(), delta)
        with torch.no_grad():
            improved = loss.detach() > best_loss
            best_loss = torch.where(improved, loss.detach(), best_loss)
            best[improved] = delta.detach()[improved]
            delta = (delta.detach() + step * grad.sign()).clamp(low, high) * fp
    return best.detach()
