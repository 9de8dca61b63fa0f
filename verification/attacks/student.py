"""The distillation student: a freshly initialised network (``attack=distill``, ``attack.backbone``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from models.safe_reader import PRETRAINED_OFF, ModelFileError, build_model
from verification.protocols import BadInput

ROOT = Path(__file__).resolve().parents[2]


def _backbone_config(attack: Mapping[str, Any], suspect: Any, datamodule) -> dict:
    spec = attack["backbone"]
    if spec is None:
        hparams = getattr(suspect, "hparams", None) or {}
        backbone = hparams.get("backbone") if isinstance(hparams, Mapping) else None
        if not isinstance(backbone, Mapping) or "_target_" not in backbone:
            raise BadInput("attack=distill needs the suspect's weights (its checkpoint's backbone config) or "
                           "attack.backbone (a configs/backbone name, e.g. attack.backbone=unet_resnet18)")
        return copy.deepcopy(dict(backbone))
    if isinstance(spec, str):
        path = ROOT / "configs" / "backbone" / f"{spec}.yaml"
        if not path.is_file():
            raise BadInput(f"attack.backbone={spec!r}: no such file {path}")
        node = OmegaConf.load(path)
        context = OmegaConf.create({"backbone": node, "data": {
            "channels": int(getattr(datamodule, "channels", 3)), "num_classes": int(datamodule.num_classes),
            "image_size": getattr(datamodule, "image_size", None)}, "paths": {"weights_dir": str(ROOT / "weights")}})
        try:
            return OmegaConf.to_container(context.backbone, resolve=True)
        except Exception as err:  # an interpolation the student context cannot fill
            raise BadInput(f"attack.backbone={spec!r}: cannot resolve {path} ({err})") from None
    if "_target_" not in spec:
        raise BadInput("attack.backbone must name a configs/backbone file or be a config with _target_")
    return copy.deepcopy(dict(spec))


def build_student(attack: Mapping[str, Any], suspect: Any, datamodule) -> tuple[torch.nn.Module, dict]:
    """A freshly initialised network for the distillation student; returns ``(model, config)``.

    Args:
        attack: ``{"backbone": None | configs/backbone name | config with _target_, "seed": int}``.
    ``attack.backbone`` null copies the suspect's own ``hyper_parameters.backbone``: that config
    comes from a foreign file, so it is built by :func:`models.safe_reader.build_model` (exact
    factory table plus the suspect's operator-trusted ``factories``; no Hydra). A configs/backbone
    name or a config given on the command line is the verifier's own and is instantiated. Either
    way the pretrained-weight keys (:data:`models.safe_reader.PRETRAINED_OFF`) are forced off.
    """
    from hydra.utils import instantiate

    config = _backbone_config(attack, suspect, datamodule)
    for key, value in PRETRAINED_OFF.items():
        if key in config:
            config[key] = value
    if "allow_random_init" in config:
        config["allow_random_init"] = True
    torch.manual_seed(attack["seed"])
    if attack["backbone"] is None:  # from the suspect's file
        source = str(getattr(suspect, "path", None) or "the suspect")
        factories = tuple(getattr(suspect, "factories", ()))  # the verifier's suspect_factories
        try:
            return build_model(config, source, "hyper_parameters.backbone", factories), config
        except ModelFileError as err:
            raise BadInput(f"attack=distill: {err}") from None
    try:
        return instantiate(config), config
    except Exception as err:
        raise BadInput(f"attack.backbone: cannot build the student {config['_target_']} "
                       f"({type(err).__name__}: {err})") from None
