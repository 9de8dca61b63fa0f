"""Pixel contract: images enter every model as floats in [0, 1]; normalisation lives inside."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Grey medical images in [0, 1]: centre and spread them to roughly unit scale.
GREY_MEAN = 0.5
GREY_STD = 0.25


def default_normalisation(channels: int) -> tuple[list[float], list[float]]:
    """Default per-channel (mean, std) for a network with ``channels`` inputs.

    3 channels: ImageNet statistics (what pretrained RGB encoders expect);
    anything else: 0.5 / 0.25 per channel (grey or multi-modal images in [0, 1]).
    """
    if channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [GREY_MEAN] * channels, [GREY_STD] * channels


class PixelNormalize(nn.Module):
    """Map [0, 1] pixels to a network's input: optional grey-to-RGB repeat, then (x - mean) / std.

    Args:
        in_channels: channels of the images the model receives (C of the data).
        network_channels: channels the wrapped network consumes. May differ from
            ``in_channels`` only when ``in_channels == 1`` (the grey channel is repeated),
            which lets a grey dataset use an RGB-pretrained network unchanged.
        mean, std: per-network-channel statistics in [0, 1] pixel units; a single value
            is broadcast; ``None`` uses :func:`default_normalisation`.

    Shapes:
        input B x in_channels x H x W in [0, 1]; output B x network_channels x H x W.

    ``mean`` and ``std`` are registered buffers, so they travel with checkpoints and
    move with ``.to(device)``.
    """

    def __init__(
        self,
        in_channels: int,
        network_channels: int | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        network_channels = in_channels if network_channels is None else int(network_channels)
        if network_channels != in_channels and in_channels != 1:
            raise ValueError(
                f"in_channels={in_channels} cannot feed a {network_channels}-channel network: only grey "
                "(1-channel) images are repeated to more channels."
            )
        self.in_channels = int(in_channels)
        self.network_channels = network_channels
        default_mean, default_std = default_normalisation(network_channels)
        mean_t = self._per_channel(default_mean if mean is None else mean, "mean")
        std_t = self._per_channel(default_std if std is None else std, "std")
        if torch.any(std_t <= 0):
            raise ValueError(f"std must be positive, got {std_t.flatten().tolist()}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def _per_channel(self, value: float | Sequence[float], name: str) -> Tensor:
        values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
        if len(values) == 1:
            values = values * self.network_channels
        if len(values) != self.network_channels:
            raise ValueError(f"{name} has {len(values)} values for a {self.network_channels}-channel network")
        return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images of shape B x {self.in_channels} x H x W in [0, 1], got {tuple(images.shape)}"
            )
        if self.network_channels != self.in_channels:
            images = images.expand(-1, self.network_channels, -1, -1)
        return (images - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, network_channels={self.network_channels}"
