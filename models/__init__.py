"""Model factories: every model takes [0, 1] pixels and normalises inside (docs/models.md).

- :func:`build_smp_model`: smp segmentation (UNet, UNet++, DeepLabV3+, ...) -> logits B x 1 x H x W.
- :func:`build_sam_model`: Segment Anything (vit_b/l/h from a local checkpoint, or ``tiny``) -> logits B x 1 x H x W.
- :func:`build_timm_classifier`: timm classifiers (ResNet, VGG, ...) and ``small_cnn`` -> logits B x K.
- :func:`resolve_local_weights`: the offline weights policy (missing file = clear error).
"""

from torch import nn

from .classification import build_timm_classifier
from .sam import build_sam_model
from .segmentation import build_smp_model
from .weights import resolve_local_weights


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters in ``model`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "build_sam_model",
    "build_smp_model",
    "build_timm_classifier",
    "count_parameters",
    "resolve_local_weights",
]
