"""X-Mark's conditional watermark generator (docs/methods/xmark.md, "Generator").

A small residual U-Net G(x, s) -> r reads the image and its saliency map (EigenCAM of the
surrogate, :mod:`watermark.xmark.saliency`) and emits a residual r; the perturbation is

    δ = ε · tanh(r)            (optionally · s, "gated" by saliency)
    x_w = clip(x + δ, 0, 1)

so ``|δ| ≤ ε`` holds by construction -- no projection step, no penalty to tune -- and
``|x_w − x| ≤ |δ|`` because clipping only moves a pixel back towards x. The generator is
a plain ``nn.Module`` (no Lightning), pixels in [0, 1] as everywhere in medmark.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .weights import describe_key_mismatch, load_state_dict_file, resolve_local_weights

log = logging.getLogger(__name__)


def _groups(channels: int, max_groups: int = 8) -> int:
    """Largest group count ≤ ``max_groups`` that divides ``channels`` (GroupNorm needs a divisor)."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class ResidualBlock(nn.Module):
    """conv3×3-GN-SiLU-conv3×3-GN + skip (1×1 conv when the width changes), then SiLU.

    GroupNorm, not BatchNorm: the generator trains with small per-GPU batches and its output
    must not depend on which other images share the batch (release marks images one by one).
    SiLU rather than ReLU so no unit is dead at initialisation.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return self.act(h + self.skip(x))


class ConditionalUNetGenerator(nn.Module):
    """Saliency-conditioned residual U-Net producing an L∞-bounded perturbation.

    Args:
        in_channels: C of the images (1 for grey X-rays, 3 for RGB).
        saliency_channels: channels of the conditioning map (1 for EigenCAM); 0 makes the
            generator unconditional (``saliency`` is then ignored and may be ``None``).
        base_width: channels of the first level; level k has ``base_width · 2^k``.
        depth: number of 2× down-samplings (the U-Net has ``depth + 1`` resolutions).
        epsilon: L∞ budget ε in [0, 1] pixel units (default 8/255).
        gate_with_saliency: multiply δ by the saliency map, so the mark lives where the
            surrogate looks and vanishes where s = 0 (needs ``saliency_channels == 1``).

    ``forward(images, saliency)``:
        images: B×C×H×W float in [0, 1]; saliency: B×S×H×W float in [0, 1] (S =
        ``saliency_channels``). Any H, W: inputs are padded (replicate) to a multiple of
        ``2^depth`` and the outputs cropped back.

    Returns:
        dict with ``delta`` (B×C×H×W, ``ε·tanh(r)`` [``·s``]; ``|delta| ≤ ε`` exactly in
        floating point: ``|tanh| ≤ 1``, ``s ≤ 1`` and ε is rounded down to the dtype),
        ``marked`` (B×C×H×W, ``clip(x + delta, 0, 1)``, so ``|marked − x| ≤ |delta|``) and
        ``residual`` (r, B×C×H×W, unbounded; for diagnostics/regularisers).

    The output convolution starts near zero (N(0, 1e-3²) weights, zero bias): δ starts at
    ~1e-3·ε, i.e. the marked image starts as the image, yet every layer receives a
    (small) gradient from the first step -- an exactly-zero init would freeze all layers
    but the last one for that step.
    """

    def __init__(
        self,
        in_channels: int = 1,
        saliency_channels: int = 1,
        base_width: int = 16,
        depth: int = 3,
        epsilon: float = 8 / 255,
        gate_with_saliency: bool = False,
    ) -> None:
        super().__init__()
        if in_channels < 1 or saliency_channels < 0 or base_width < 1 or depth < 0:
            raise ValueError(
                f"invalid generator shape: in_channels={in_channels}, saliency_channels={saliency_channels}, "
                f"base_width={base_width}, depth={depth}"
            )
        if not 0.0 <= float(epsilon) <= 1.0:
            raise ValueError(f"epsilon is an L∞ budget in [0, 1] pixel units, got {epsilon}")
        if gate_with_saliency and saliency_channels != 1:
            raise ValueError("gate_with_saliency needs a single-channel saliency map (saliency_channels=1)")
        self.in_channels = int(in_channels)
        self.saliency_channels = int(saliency_channels)
        self.depth = int(depth)
        self.epsilon = float(epsilon)
        self.gate_with_saliency = bool(gate_with_saliency)

        widths = [base_width * 2**k for k in range(depth + 1)]
        self.stem = ResidualBlock(in_channels + saliency_channels, widths[0])
        self.downs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(widths[k], widths[k], 3, stride=2, padding=1),  # learned 2× down-sampling
                ResidualBlock(widths[k], widths[k + 1]),
            )
            for k in range(depth)
        )
        self.bottleneck = ResidualBlock(widths[-1], widths[-1])
        # Decoder level k fuses the up-sampled level k+1 with the encoder skip of level k.
        self.ups = nn.ModuleList(ResidualBlock(widths[k + 1] + widths[k], widths[k]) for k in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], in_channels, 1)
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)

    def _check_inputs(self, images: Tensor, saliency: Tensor | None) -> Tensor | None:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images of shape B×{self.in_channels}×H×W in [0, 1], got {tuple(images.shape)}"
            )
        if self.saliency_channels == 0:
            return None
        if saliency is None:
            raise ValueError("this generator is saliency-conditioned: pass a B×1×H×W saliency map in [0, 1]")
        expected = (images.shape[0], self.saliency_channels, *images.shape[-2:])
        if tuple(saliency.shape) != expected:
            raise ValueError(f"saliency must have shape {expected} (matching the images), got {tuple(saliency.shape)}")
        return saliency.to(images.dtype)

    def residual(self, images: Tensor, saliency: Tensor | None = None) -> Tensor:
        """The raw U-Net output r (B×C×H×W, unbounded) for images/saliency as in :meth:`forward`."""
        saliency = self._check_inputs(images, saliency)
        # Centre the inputs: [0, 1] -> [-1, 1] keeps the first layer's activations balanced.
        h = images * 2 - 1
        if saliency is not None:
            h = torch.cat([h, saliency * 2 - 1], dim=1)
        height, width = h.shape[-2:]
        multiple = 2**self.depth
        pad_h, pad_w = (-height) % multiple, (-width) % multiple
        if pad_h or pad_w:
            h = F.pad(h, (0, pad_w, 0, pad_h), mode="replicate")

        h = self.stem(h)
        skips = [h]
        for down in self.downs:
            h = down(h)
            skips.append(h)
        h = self.bottleneck(skips.pop())
        for up in self.ups:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = up(torch.cat([h, skip], dim=1))
        return self.head(h)[..., :height, :width]

    def _epsilon_as(self, like: Tensor) -> Tensor:
        # ε rounded *down* to the tensor's dtype (float32(8/255) is a hair above 8/255), so
        # |δ| ≤ ε holds for the configured value itself, not just for its float32 neighbour.
        eps = torch.tensor(self.epsilon, dtype=like.dtype, device=like.device)
        if float(eps) > self.epsilon:
            eps = torch.nextafter(eps, torch.zeros_like(eps))
        return eps

    def forward(self, images: Tensor, saliency: Tensor | None = None) -> dict[str, Tensor]:
        r = self.residual(images, saliency)
        delta = self._epsilon_as(r) * torch.tanh(r)
        if self.gate_with_saliency:
            # s in [0, 1] only shrinks δ, so the budget still holds.
            delta = delta * saliency.to(delta.dtype).clamp(0, 1)
        marked = (images + delta).clamp(0.0, 1.0)
        return {"delta": delta, "marked": marked, "residual": r}

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, saliency_channels={self.saliency_channels}, depth={self.depth}, "
            f"epsilon={self.epsilon:.6g}, gate_with_saliency={self.gate_with_saliency}"
        )


def build_generator(weights_path: str | None = None, weights_prefix: str = "", **cfg) -> ConditionalUNetGenerator:
    """Build a :class:`ConditionalUNetGenerator` from config keys, optionally with local weights.

    Args:
        weights_path: a local generator checkpoint (state dict, ``.safetensors`` or a torch /
            Lightning checkpoint); ``None`` = fresh initialisation. Loaded strictly: a
            generator of another shape is an error, never a partial load.
        weights_prefix: key prefix to select and strip, e.g. ``"generator."`` for a Lightning
            checkpoint of the X-Mark objective.
        **cfg: :class:`ConditionalUNetGenerator` arguments (``in_channels``, ``epsilon``, ...).
    """
    generator = ConditionalUNetGenerator(**cfg)
    weights_file = resolve_local_weights(weights_path, "X-Mark generator checkpoint (generator.weights_path)")
    if weights_file is not None:
        state = load_state_dict_file(weights_file)
        if weights_prefix:
            state = {k[len(weights_prefix):]: v for k, v in state.items() if k.startswith(weights_prefix)}
        target = generator.state_dict()
        missing = sorted(set(target) - set(state))
        unexpected = sorted(set(state) - set(target))
        if missing or unexpected:
            raise RuntimeError(
                f"generator weights in '{weights_file}' (prefix {weights_prefix!r}) do not fit "
                f"ConditionalUNetGenerator({generator.extra_repr()}): {describe_key_mismatch(missing, unexpected)}"
            )
        mismatched = [
            f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items() if state[k].shape != v.shape
        ]
        if mismatched:
            shown = "; ".join(mismatched[:5]) + (f"; ... ({len(mismatched) - 5} more)" if len(mismatched) > 5 else "")
            raise RuntimeError(
                f"generator weights in '{weights_file}' do not fit ConditionalUNetGenerator({generator.extra_repr()}): "
                f"shape mismatch (file vs model) for {shown}. Use the generator config the checkpoint was trained with."
            )
        generator.load_state_dict(state)
        log.info("loaded generator weights from %s", weights_file)
    return generator
