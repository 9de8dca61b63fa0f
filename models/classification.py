"""Image classifiers (timm, plus a tiny local CNN) behind medmark's pixel contract.

Every classifier takes images as float tensors in [0, 1] (B x C x H x W), normalises
them inside the model and returns logits B x K. Networks are always created with
``pretrained=False`` inside timm; pretrained weights come only from a local file
(``weights_path``, or with ``pretrained=True`` the ImageNet file named for the model in
``configs/weights.yaml``, found in ``weights_dir``, the torch hub cache or the Hugging Face
cache), so nothing is downloaded at run time.

Small inputs: timm's VGG (``vgg16``/``vgg19``) keeps the torchvision-style 7x7
"fc6" convolution in its ``ConvMlp`` pre-logits, but ConvMlp itself adaptively
pools feature maps smaller than 7x7 *up* to 7x7 before it, so a 64x64 image
(a 2x2 feature map) works without any change and stays weight-compatible with
224-px ImageNet checkpoints. No ``global_pool`` override is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import timm
from torch import Tensor, nn

from .pixels import PixelNormalize
from .weights import (
    adapt_input_channels,
    describe_key_mismatch,
    load_state_dict_file,
    locate_timm_pretrained,
    resolve_local_weights,
)

log = logging.getLogger(__name__)


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU stages (stride 2 from the second), global average pool, linear head.

    A fast classifier for tests and CPU smoke runs (~60 k parameters at width 16).
    Input B x in_chans x H x W (already normalised); output logits B x num_classes.
    """

    # Same attribute timm models expose, so head handling is uniform.
    pretrained_cfg = {"classifier": "head"}

    def __init__(self, num_classes: int = 2, in_chans: int = 3, width: int = 16, drop_rate: float = 0.0) -> None:
        super().__init__()
        chans = [in_chans, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.pool(self.features(x)).flatten(1)))


# Classifiers defined in medmark rather than timm, by name.
LOCAL_CLASSIFIERS: dict[str, type[nn.Module]] = {"small_cnn": SmallCNN}


class ImageClassifier(nn.Module):
    """A classifier network behind the medmark contract.

    ``forward(images)``: images B x C x H x W float in [0, 1] -> logits B x num_classes.
    """

    task = "classification"

    def __init__(self, net: nn.Module, normalize: PixelNormalize, num_classes: int, name: str) -> None:
        super().__init__()
        self.net = net
        self.normalize = normalize
        self.input_channels = normalize.in_channels
        self.num_classes = int(num_classes)
        self.name = name

    def forward(self, images: Tensor) -> Tensor:
        return self.net(self.normalize(images))


def _classifier_prefix(net: nn.Module) -> str | None:
    cfg = getattr(net, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier")
    # Some timm models list several heads (tuple); the first is the main one.
    return classifier[0] if isinstance(classifier, (list, tuple)) else classifier


def _from_torchvision_layout(state: dict, target: dict) -> dict:
    """A torchvision VGG checkpoint (``classifier.0/3/6``) in timm's VGG layout
    (``pre_logits.fc1/fc2`` as convolutions, ``head.fc``), by timm's own conversion; other
    files unchanged (torchvision ResNets already share timm's keys)."""
    if "classifier.0.weight" in state and "pre_logits.fc1.weight" in target:
        from timm.models.vgg import _filter_fn

        return _filter_fn(state)
    return state


def load_classifier_weights(net: nn.Module, path: str) -> dict[str, list[str]]:
    """Load a local state dict into ``net``; keep the network's own head if the file's differs in shape.

    The file must use the network's key layout (timm's ``model.safetensors`` /
    ``pytorch_model.bin``; torchvision ResNet checkpoints share timm's ResNet layout).
    RGB stem weights are adapted to other channel counts (sum for grey).

    Returns:
        ``{"adapted": [...], "reinitialised": [...]}`` -- stem tensors converted, and head tensors
        left at their random initialisation because the file's head has another number of classes.

    Raises:
        RuntimeError: any other missing/unexpected key or shape mismatch (the message lists them).
    """
    state = _from_torchvision_layout(load_state_dict_file(path), net.state_dict())
    target = net.state_dict()
    adapted = adapt_input_channels(state, target)
    reinitialised = []
    prefix = _classifier_prefix(net)
    if prefix:
        for suffix in (".weight", ".bias"):
            key = prefix + suffix
            if key in state and key in target and state[key].shape != target[key].shape:
                # Typical case: ImageNet's 1000-way head vs. a K-way medical task.
                del state[key]
                reinitialised.append(key)
    missing = sorted(set(target) - set(state) - set(reinitialised))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise RuntimeError(
            f"classifier weights in '{path}' do not fit {type(net).__name__}: "
            f"{describe_key_mismatch(missing, unexpected)}"
        )
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches outside the head
        raise RuntimeError(f"classifier weights in '{path}' do not fit {type(net).__name__}: {err}") from err
    if reinitialised:
        log.warning(
            "weights %s: classifier head %s has another number of classes; it keeps its random init", path,
            reinitialised,
        )
    return {"adapted": adapted, "reinitialised": reinitialised}


def build_timm_classifier(
    name: str = "resnet18",
    num_classes: int = 2,
    in_channels: int = 3,
    weights_path: str | None = None,
    pretrained: bool = False,
    weights_dir: str | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    network_channels: int | None = None,
    **timm_kwargs,
) -> ImageClassifier:
    """Build a classifier (any timm model, or ``"small_cnn"``) as a medmark model (offline).

    Args:
        name: timm model name (``resnet18/34/50``, ``vgg16``, ``vgg19``, ``densenet121``,
            ``efficientnet_b0``, ...) or ``"small_cnn"``.
        num_classes: K, the number of logits.
        in_channels: channels of the input images.
        weights_path: local state dict; ``None`` = random init (unless ``pretrained``). A head
            of another size is dropped (random K-way head kept) and reported in
            ``model.weights_report``.
        pretrained: with ``weights_path=None``, load the model's ImageNet weights from a local
            copy (:func:`models.weights.locate_timm_pretrained`: ``configs/weights.yaml``'s file
            in ``weights_dir`` or the torch hub cache, digest-checked, else timm's release in the
            Hugging Face cache); none found is a ``FileNotFoundError`` naming the paths, never a
            download or a silent random init. Not available for ``small_cnn``.
        weights_dir: the local weights folder (``paths.weights_dir``); ``None`` = the
            ``MEDMARK_WEIGHTS_DIR`` / ``./weights`` rule of :func:`models.weights.default_weights_dir`.
        mean, std: normalisation in [0, 1] units; default ImageNet for 3 network channels,
            0.5 / 0.25 otherwise.
        network_channels: channels of the network's stem (default ``in_channels``); 3 with grey
            data repeats the grey channel inside the wrapper.
        **timm_kwargs: forwarded to ``timm.create_model`` (or ``SmallCNN``), e.g. ``drop_rate``.

    Returns:
        :class:`ImageClassifier`: ``forward(images B x in_channels x H x W in [0, 1])`` -> logits B x K.
    """
    normalize = PixelNormalize(in_channels, network_channels, mean, std)
    if weights_path is None and pretrained:
        if name in LOCAL_CLASSIFIERS:
            raise ValueError(f"backbone.pretrained=true: '{name}' is defined in medmark and has no pretrained "
                             "weights; use pretrained=false or a timm model name")
        weights_path = str(locate_timm_pretrained(name, weights_dir))
    weights_file = resolve_local_weights(weights_path, f"classifier weights for {name} (backbone.weights_path)")
    if name in LOCAL_CLASSIFIERS:
        net = LOCAL_CLASSIFIERS[name](num_classes=num_classes, in_chans=normalize.network_channels, **timm_kwargs)
    else:
        net = timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=normalize.network_channels, **timm_kwargs
        )
    report = None
    if weights_file is not None:
        report = load_classifier_weights(net, str(weights_file))
        log.info("loaded %s weights from %s (%s)", name, weights_file, report)
    model = ImageClassifier(net, normalize, num_classes, name)
    model.weights_source = None if weights_file is None else str(weights_file)
    model.weights_report = report
    return model
