"""Segment Anything (SAM) as a fine-tunable medmark segmentation model.

Built from segment-anything's own modules (``ImageEncoderViT``, ``PromptEncoder``,
``MaskDecoder``, ``TwoWayTransformer``, ``Sam``), with the same hyper-parameters as
its ``sam_model_registry``. The wrapper turns SAM into a batched, differentiable
``forward(images, boxes=None) -> logits``:

    [0,1] B x C x H x W --(grey->RGB, square bilinear resize to img_size,
    SAM pixel normalisation)--> image_encoder --> prompt_encoder (no prompt, or a box
    per image rescaled to the encoder frame) --> mask_decoder --> low-res logits
    --(bilinear)--> B x 1 x H x W

Variants: ``vit_b`` / ``vit_l`` / ``vit_h`` need the official checkpoint on disk
(random weights only with ``allow_random_init=True``, e.g. for throughput benchmarks);
``tiny`` is a few-layer SAM with random weights for tests and CPU smoke runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import Tensor, nn

from .weights import describe_key_mismatch, load_state_dict_file, resolve_local_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamSpec:
    """Architecture of one SAM variant (full-size values copied from segment_anything/build_sam.py)."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    checkpoint_name: str | None = None


SAM_SPECS: dict[str, SamSpec] = {
    "vit_b": SamSpec(768, 12, 12, (2, 5, 8, 11), checkpoint_name="sam_vit_b_01ec64.pth"),
    "vit_l": SamSpec(1024, 24, 16, (5, 11, 17, 23), checkpoint_name="sam_vit_l_0b3195.pth"),
    "vit_h": SamSpec(1280, 32, 16, (7, 15, 23, 31), checkpoint_name="sam_vit_h_4b8939.pth"),
    # Tiny: 2 ViT blocks of width 64 on 8x8-pixel patches (8x8 tokens at 64 px), one windowed
    # and one global block so the relative-position code paths of the real model are exercised;
    # a 32-wide two-way transformer decoder. ~0.2 M parameters; forward of 2x3x64x64 is a few ms.
    "tiny": SamSpec(
        encoder_embed_dim=64,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        image_size=64,
        patch_size=8,
        window_size=4,
        prompt_embed_dim=32,
        mask_in_chans=4,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    ),
}

# SAM's pixel statistics, in 0-255 units (segment_anything/build_sam.py).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def _build_sam_module(spec: SamSpec, image_size: int) -> Sam:
    """Instantiate segment-anything's ``Sam`` for ``spec`` at encoder resolution ``image_size``."""
    embed_hw = image_size // spec.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.encoder_depth,
            embed_dim=spec.encoder_embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=spec.encoder_num_heads,
            patch_size=spec.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.encoder_global_attn_indexes,
            window_size=spec.window_size,
            out_chans=spec.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_embed_dim,
            image_embedding_size=(embed_hw, embed_hw),
            input_image_size=(image_size, image_size),
            mask_in_chans=spec.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=spec.prompt_embed_dim,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_num_heads,
            ),
            transformer_dim=spec.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )


def _resize_position_tables(state: dict[str, Tensor], target: dict[str, Tensor]) -> list[str]:
    """Fit a checkpoint's position tables to another encoder resolution, in place.

    ``image_encoder.pos_embed`` (1 x h x w x C) is resized bicubically over (h, w); the
    relative-position tables of global-attention blocks (L x C, L = 2*tokens-1) are resized
    linearly along L, exactly as SAM itself does at run time in ``get_rel_pos``. This lets a
    1024-px checkpoint fine-tune at e.g. 256 px (4x4 fewer tokens, ~16x cheaper attention).
    """
    resized = []
    for name, want in target.items():
        have = state.get(name)
        if have is None or have.shape == want.shape:
            continue
        if name.endswith("pos_embed") and have.ndim == 4:
            grid = have.permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=want.shape[1:3], mode="bicubic", align_corners=False)
            state[name] = grid.permute(0, 2, 3, 1).to(have.dtype)
            resized.append(name)
        elif (name.endswith("rel_pos_h") or name.endswith("rel_pos_w")) and have.ndim == 2:
            table = have.t().unsqueeze(0).float()  # 1 x C x L
            table = F.interpolate(table, size=want.shape[0], mode="linear", align_corners=False)
            state[name] = table.squeeze(0).t().to(have.dtype)
            resized.append(name)
    return resized


def _load_sam_checkpoint(sam: Sam, path: str) -> list[str]:
    """Load a SAM checkpoint strictly, resizing position tables if the resolution differs."""
    state = load_state_dict_file(path)
    target = sam.state_dict()
    resized = _resize_position_tables(state, target)
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as err:
        missing = sorted(set(target) - set(state))
        unexpected = sorted(set(state) - set(target))
        raise RuntimeError(
            f"SAM checkpoint '{path}' does not match the requested variant: "
            f"{describe_key_mismatch(missing, unexpected)}. Check that backbone.variant matches the file "
            f"(vit_b/vit_l/vit_h). Original error: {err}"
        ) from err
    return resized


class SamSegmenter(nn.Module):
    """SAM behind medmark's pixel contract; fully differentiable w.r.t. its inputs.

    Args:
        sam: a segment-anything ``Sam``.
        in_channels: 1 (grey, repeated to RGB inside) or 3.
        prompt_mode: ``"none"`` (no prompt: one mask per image) or ``"box"``.
        multimask: ask the decoder for SAM's 3 candidate masks and keep, per image, the one
            with the highest predicted IoU (otherwise SAM's single-mask output token).

    ``forward(images, boxes=None)``:
        images: B x in_channels x H x W, float in [0, 1].
        boxes: B x 4 (x0, y0, x1, y1) in input-pixel coordinates; used only in box mode,
            where ``None`` means the full-image box (0, 0, W-1, H-1).
        returns: logits B x 1 x H x W.
    """

    task = "segmentation"

    def __init__(self, sam: Sam, in_channels: int = 3, prompt_mode: str = "none", multimask: bool = False) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"SAM takes grey (1) or RGB (3) images, got in_channels={in_channels}")
        if prompt_mode not in ("none", "box"):
            raise ValueError(f"prompt_mode must be 'none' or 'box', got '{prompt_mode}'")
        self.sam = sam
        self.input_channels = int(in_channels)
        self.prompt_mode = prompt_mode
        self.multimask = bool(multimask)
        self.image_size = int(sam.image_encoder.img_size)

    def preprocess(self, images: Tensor) -> Tensor:
        """[0, 1] B x C x H x W -> SAM encoder input B x 3 x S x S (S = ``image_size``)."""
        if images.ndim != 4 or images.shape[1] != self.input_channels:
            raise ValueError(
                f"expected images of shape B x {self.input_channels} x H x W in [0, 1], got {tuple(images.shape)}"
            )
        x = images.expand(-1, 3, -1, -1) if self.input_channels == 1 else images
        if x.shape[-2:] != (self.image_size, self.image_size):
            # Square resize (not SAM's long-side resize + pad): medical slices are mostly square and
            # this keeps every encoder token on image content. antialias avoids aliasing when shrinking.
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        # SAM's mean/std are in 0-255 units; our pixels are in [0, 1].
        return (x * 255.0 - self.sam.pixel_mean) / self.sam.pixel_std

    def _encoder_boxes(self, boxes: Tensor | None, batch: int, height: int, width: int, ref: Tensor) -> Tensor:
        """Boxes B x 4 in input pixels -> B x 4 in the S x S encoder frame."""
        if boxes is None:
            boxes = ref.new_tensor([0.0, 0.0, width - 1.0, height - 1.0]).expand(batch, 4)
        if boxes.shape != (batch, 4):
            raise ValueError(f"boxes must be B x 4 = ({batch}, 4) (x0, y0, x1, y1), got {tuple(boxes.shape)}")
        scale = ref.new_tensor([self.image_size / width, self.image_size / height] * 2)
        return boxes.to(ref.dtype) * scale

    def forward(self, images: Tensor, boxes: Tensor | None = None) -> Tensor:
        batch, _, height, width = images.shape
        embeddings = self.sam.image_encoder(self.preprocess(images))  # B x D x h x w
        prompt_boxes = (
            self._encoder_boxes(boxes, batch, height, width, embeddings) if self.prompt_mode == "box" else None
        )
        image_pe = self.sam.prompt_encoder.get_dense_pe()
        low_res = []
        # segment-anything's MaskDecoder repeats the image embedding once per prompt of a single
        # image (repeat_interleave over the prompt batch), so images must be decoded one at a time.
        for i in range(batch):
            sparse, dense = self.sam.prompt_encoder(
                points=None,
                boxes=None if prompt_boxes is None else prompt_boxes[i : i + 1],
                masks=None,
            )
            masks, iou = self.sam.mask_decoder(
                image_embeddings=embeddings[i : i + 1],
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=self.multimask,
            )
            if self.multimask:
                best = iou.argmax(dim=1)
                masks = masks[torch.arange(masks.shape[0], device=masks.device), best].unsqueeze(1)
            low_res.append(masks)
        logits = torch.cat(low_res, dim=0)  # B x 1 x 4h x 4w
        return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)


def build_sam_model(
    variant: str = "vit_b",
    checkpoint: str | None = None,
    prompt_mode: str = "none",
    image_size: int | None = None,
    freeze_image_encoder: bool = False,
    freeze_prompt_encoder: bool = True,
    multimask: bool = False,
    in_channels: int = 3,
    allow_random_init: bool = False,
) -> SamSegmenter:
    """Build a fine-tunable SAM segmentation model (offline).

    Args:
        variant: ``"vit_b"``, ``"vit_l"``, ``"vit_h"`` (official architectures) or ``"tiny"``.
        checkpoint: local SAM state dict (e.g. ``sam_vit_b_01ec64.pth`` or a MedSAM-style
            fine-tune of the same variant). Required for full-size variants unless
            ``allow_random_init``; optional for ``tiny``.
        prompt_mode: ``"none"`` or ``"box"`` (see :class:`SamSegmenter`).
        image_size: encoder resolution S (multiple of the patch size: 16, or 8 for tiny);
            ``None`` = native (1024; 64 for tiny). With a checkpoint of another resolution the
            position tables are interpolated.
        freeze_image_encoder / freeze_prompt_encoder: set ``requires_grad=False`` on those parts.
            Gradients still flow *through* them to the input images (needed for pixel-space
            triggers and adversarial watermarks), so they are not run under ``no_grad``.
        multimask: see :class:`SamSegmenter`.
        in_channels: 1 (grey, repeated inside) or 3.
        allow_random_init: permit a full-size variant without a checkpoint (benchmarks only).

    Returns:
        :class:`SamSegmenter` with ``forward(images B x C x H x W in [0, 1], boxes B x 4 | None)``
        -> logits B x 1 x H x W.
    """
    if variant not in SAM_SPECS:
        raise ValueError(f"unknown SAM variant '{variant}', choose from {sorted(SAM_SPECS)}")
    spec = SAM_SPECS[variant]
    size = spec.image_size if image_size is None else int(image_size)
    if size <= 0 or size % spec.patch_size:
        raise ValueError(f"image_size must be a positive multiple of {spec.patch_size} for '{variant}', got {size}")

    what = f"SAM {variant} checkpoint (backbone.checkpoint)"
    if checkpoint is None and spec.checkpoint_name is not None and not allow_random_init:
        # Checked before the (slow, large) construction so a misconfigured run fails at once.
        raise FileNotFoundError(
            f"{what}: no checkpoint given. Full-size SAM needs its pretrained weights: download "
            f"{spec.checkpoint_name} from the segment-anything release page on a machine with internet access, "
            f"put it under paths.weights_dir (or set backbone.checkpoint=/path/to/{spec.checkpoint_name}). "
            "Pass allow_random_init=True only for throughput benchmarks."
        )
    weights_file = resolve_local_weights(checkpoint, what)

    sam = _build_sam_module(spec, size)
    if weights_file is not None:
        resized = _load_sam_checkpoint(sam, str(weights_file))
        log.info("loaded SAM %s from %s (position tables resized: %s)", variant, weights_file, resized)
    elif spec.checkpoint_name is not None:
        log.warning("SAM %s built with RANDOM weights (allow_random_init=True)", variant)

    for part, frozen in ((sam.image_encoder, freeze_image_encoder), (sam.prompt_encoder, freeze_prompt_encoder)):
        part.requires_grad_(not frozen)
    sam.mask_decoder.requires_grad_(True)

    model = SamSegmenter(sam, in_channels=in_channels, prompt_mode=prompt_mode, multimask=multimask)
    model.variant = variant
    model.weights_source = None if weights_file is None else str(weights_file)
    return model
