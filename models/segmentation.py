"""Segmentation models from segmentation-models-pytorch (smp), behind medmark's pixel contract.

Every segmentation model in medmark takes images as float tensors in [0, 1]
(B x C x H x W) and returns logits B x 1 x H x W at the input resolution.
Intensity normalisation lives inside the model (:class:`PixelNormalize`), so
triggers, perturbations, logos and black-box queries all operate in pixel space,
as a deployed API would see them.

Weights are never downloaded: smp models are always built with
``encoder_weights=None`` and a pretrained encoder is read from a local file
(``encoder_weights_path``) or, for smp's own ImageNet encoders, from a copy that
is already in the Hugging Face cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pixels import PixelNormalize
from .weights import adapt_input_channels, describe_key_mismatch, load_state_dict_file, resolve_local_weights

log = logging.getLogger(__name__)

# smp options that would break the "one logit map" contract.
_FORBIDDEN_ARCH_KWARGS = {
    "classes": "medmark segmentation models always predict one foreground logit map (classes=1)",
    "activation": "models must return logits; apply sigmoid in the loss/metric, not in the model",
    "aux_params": "an auxiliary classification head changes forward() to return a tuple",
}


class SmpSegmenter(nn.Module):
    """An smp model behind the medmark contract.

    ``forward(images, boxes=None)``: images B x C x H x W float in [0, 1]; ``boxes`` is
    accepted for interface parity with SAM and ignored. Returns logits B x 1 x H x W
    at the input resolution. Inputs whose sides are not multiples of the encoder's
    output stride are padded (edge replication) and the logits cropped back, so any
    image size works.

    ``position_embedding=(C, S)`` appends ``C`` *learned* position channels to the network
    input: a ``C×S×S`` parameter (``position_table``) resized bilinearly to the image, as ViTs
    resize their position tables. A convolutional network otherwise knows absolute position
    only through its padding, which makes a position-bound output -- a StealthMark QR pattern
    of 21×21 cells -- very slow to learn (measured in docs/stealthmark.md §4).
    """

    task = "segmentation"

    def __init__(self, net: nn.Module, normalize: PixelNormalize,
                 position_embedding: Sequence[int] | None = None) -> None:
        super().__init__()
        self.net = net
        self.normalize = normalize
        self.input_channels = normalize.in_channels
        self.position_table = None
        if position_embedding:
            channels, size = (int(v) for v in position_embedding)
            if channels < 1 or size < 2:
                raise ValueError(f"position_embedding must be [channels >= 1, size >= 2], got {list(position_embedding)}")
            self.position_table = nn.Parameter(0.5 * torch.randn(1, channels, size, size))

    def forward(self, images: Tensor, boxes: Tensor | None = None) -> Tensor:
        x = self.normalize(images)
        h, w = x.shape[-2:]
        if self.position_table is not None:
            table = F.interpolate(self.position_table.to(x.dtype), size=(h, w), mode="bilinear", align_corners=False)
            x = torch.cat([x, table.expand(len(x), -1, -1, -1)], dim=1)
        stride = self.net.encoder.output_stride if getattr(self.net, "requires_divisible_input_shape", True) else 1
        pad_h, pad_w = (-h) % stride, (-w) % stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        logits = self.net(x)
        return logits[..., :h, :w]


def _smp_cached_encoder_file(encoder_name: str, encoder_weights: str) -> str | None:
    """Path of smp's pretrained encoder in the local Hugging Face cache, or None.

    smp 0.6 publishes each encoder as ``model.safetensors`` in a pinned revision of an
    ``smp-hub/...`` repository; ``try_to_load_from_cache`` only looks at the disk.
    """
    from huggingface_hub import try_to_load_from_cache

    settings = smp.encoders.encoders[encoder_name]["pretrained_settings"][encoder_weights]
    found = try_to_load_from_cache(settings["repo_id"], "model.safetensors", revision=settings["revision"])
    return found if isinstance(found, str) else None


def _locate_named_encoder_weights(encoder_name: str, encoder_weights: str) -> str:
    """Turn ``encoder_weights="imagenet"`` (etc.) into a local file or a clear error."""
    table = smp.encoders.encoders
    if encoder_name in table and encoder_weights in table[encoder_name]["pretrained_settings"]:
        settings = table[encoder_name]["pretrained_settings"][encoder_weights]
        cached = _smp_cached_encoder_file(encoder_name, encoder_weights)
        if cached is not None:
            return cached
        where = (
            f"Hugging Face repo '{settings['repo_id']}' (revision {settings['revision']}), file model.safetensors"
        )
    else:
        where = f"the '{encoder_weights}' weights of encoder '{encoder_name}'"
    raise FileNotFoundError(
        f"encoder_weights='{encoder_weights}' for encoder '{encoder_name}' was requested, but medmark does not "
        f"download weights at run time and no local copy was found in the Hugging Face cache. Download "
        f"{where} on a machine with internet access and pass its path as encoder_weights_path= "
        "(a torchvision/timm checkpoint of the same network also works), or copy it into the Hugging Face "
        "cache; use encoder_weights=null for random initialisation."
    )


def load_encoder_weights(encoder: nn.Module, path: str) -> list[str]:
    """Load a local encoder state dict strictly (after adapting the stem to the channel count).

    Accepts the encoder's own state dict, smp's hub ``model.safetensors``, a torchvision
    checkpoint of the same backbone (smp encoders drop the classifier head themselves),
    or the state dict of a whole smp model (its ``encoder.`` entries are used).

    Returns:
        names of tensors whose input channels were adapted.

    Raises:
        RuntimeError: keys or shapes do not match; the message lists the missing keys.
    """
    state = load_state_dict_file(path)
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    target = encoder.state_dict()
    adapted = adapt_input_channels(state, target)
    try:
        encoder.load_state_dict(dict(state), strict=True)
    except RuntimeError as err:
        missing = sorted(set(target) - set(state))
        unexpected = sorted(set(state) - set(target))
        raise RuntimeError(
            f"encoder weights in '{path}' do not fit encoder {type(encoder).__name__}: "
            f"{describe_key_mismatch(missing, unexpected)}. (Unexpected classifier-head keys are dropped by "
            f"the encoder itself and are harmless.) Original error: {err}"
        ) from err
    return adapted


def build_smp_model(
    arch: str = "Unet",
    encoder_name: str = "resnet34",
    encoder_weights: str | None = None,
    encoder_weights_path: str | None = None,
    in_channels: int = 3,
    network_channels: int | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    position_embedding: Sequence[int] | None = None,
    **arch_kwargs,
) -> SmpSegmenter:
    """Build any smp architecture as a medmark segmentation model (offline).

    Args:
        arch: smp architecture name (``Unet``, ``UnetPlusPlus``, ``DeepLabV3Plus``, ``FPN``, ...).
        encoder_name: smp encoder name (``resnet18``, ``resnet34``, ``efficientnet-b0``, ``tu-...``).
        encoder_weights: name of smp pretrained weights (e.g. ``"imagenet"``). Only honoured
            from a local copy: ``encoder_weights_path`` if given, else smp's file in the Hugging
            Face cache; otherwise :class:`FileNotFoundError`. ``None`` = random init.
        encoder_weights_path: local encoder state dict (``.pth``/``.pt``/``.safetensors``).
        in_channels: channels of the input images (1 for grey, 3 for RGB).
        network_channels: channels of the network's first conv; default ``in_channels``. Set to 3
            with grey data to repeat the grey channel inside the wrapper (keeps RGB weights unchanged).
        mean, std: normalisation in [0, 1] units; default ImageNet for 3 network channels,
            0.5 / 0.25 otherwise.
        position_embedding: ``[channels, size]`` of a learned position table appended to the
            network input (:class:`SmpSegmenter`); null = none. A pretrained stem is adapted to
            the extra input channels like any other channel count.
        **arch_kwargs: forwarded to the smp architecture (e.g. ``decoder_channels``,
            ``encoder_depth``); ``classes``, ``activation`` and ``aux_params`` are refused.

    Returns:
        :class:`SmpSegmenter`: ``forward(images B x in_channels x H x W in [0, 1], boxes=None)``
        -> logits B x 1 x H x W.
    """
    for key, why in _FORBIDDEN_ARCH_KWARGS.items():
        if key in arch_kwargs:
            raise ValueError(f"build_smp_model does not accept '{key}': {why}.")
    normalize = PixelNormalize(in_channels, network_channels, mean, std)

    if encoder_weights_path is None and encoder_weights is not None:
        encoder_weights_path = _locate_named_encoder_weights(encoder_name, str(encoder_weights))
    weights_file = resolve_local_weights(encoder_weights_path, f"encoder weights for {arch}/{encoder_name}")

    # encoder_weights=None always: smp would otherwise fetch from the Hugging Face hub.
    net = smp.create_model(
        arch,
        encoder_name=encoder_name,
        encoder_weights=None,
        in_channels=normalize.network_channels + (int(position_embedding[0]) if position_embedding else 0),
        classes=1,
        **arch_kwargs,
    )
    if weights_file is not None:
        adapted = load_encoder_weights(net.encoder, str(weights_file))
        log.info("loaded %s encoder weights from %s (input channels adapted: %s)", encoder_name, weights_file, adapted)
    model = SmpSegmenter(net, normalize, position_embedding=position_embedding)
    model.weights_source = None if weights_file is None else str(weights_file)
    return model
