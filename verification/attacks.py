"""``verify.py attack=...``: validate the attack config, run it on the suspect, measure what is left.

    python verify.py secret=... suspect=... out=... attack=prune attack.amount=0.5
    python verify.py ... attack=jpeg attack.quality=50 attack.quality_split=test   # + the thief's Dice / BA

One dispatcher for every protocol (StealthMark: segmentation, X-Mark: classification):
:func:`apply_attack` ``(cfg_attack, suspect, datamodule, task) -> (suspect, record)``. The
algorithms live in :mod:`verification.model_attacks`; this module checks the values (a bad one is a
:class:`~verification.protocols.BadInput` naming ``attack.<field>`` -> exit 2), builds the data
loaders from the verifier's data module and returns the suspect to verify -- the same object
modified in place (weight attacks), a new one (``quantize`` may swap modules; ``distill``:
the student) or a :class:`~verification.model_attacks.TransformedSuspect` (query-time transforms).

Attacks (``configs/attack/<name>.yaml``):

============  =======  ============================================================================
name          weights  parameters
============  =======  ============================================================================
none          --       --
prune         yes      amount ∈ [0, 1)
quantize      yes      linear (dynamic int8), conv (int8 weight fake-quant), bits
finetune      yes      epochs, lr, weight_decay, batch_size, split, data_share ∈ (0, 1], max_batches, seed
distill       no*      epochs, lr, weight_decay, batch_size, split, data_share, max_batches, seed, backbone
jpeg          no       quality ∈ 1..100
resize        no       factor ∈ (0, 1]
noise         no       sigma ≥ 0, seed
crop          no       fraction ∈ (0, 1], mode center|random, seed
============  =======  ============================================================================

\\* ``distill`` queries the suspect only; the student's architecture is ``attack.backbone``
(a ``configs/backbone`` name or a config with ``_target_``) or, when null, the suspect's own
backbone config (a checkpoint suspect's ``hyper_parameters.backbone``), freshly initialised.

Every attack also takes ``quality_split`` (null = skip): after the attack, the suspect's task
quality on that clean split -- Dice (segmentation) or balanced accuracy (classification) -- goes
into ``record["quality"]`` (:func:`task_quality`; its queries are counted by the suspect).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset

from verification.protocols import BadInput
from verification import model_attacks as core

ROOT = Path(__file__).resolve().parents[1]

WEIGHT_ATTACKS = ("prune", "quantize", "finetune")
QUERY_ATTACKS = core.QueryTransform.NAMES
ATTACKS = ("none", *WEIGHT_ATTACKS, "distill", *QUERY_ATTACKS)

# parameter -> default, per attack (the configs/attack files carry the same defaults)
_TRAINING = {"epochs": 1, "lr": 1e-4, "weight_decay": 1e-4, "batch_size": 16, "split": "train",
             "data_share": 1.0, "max_batches": None, "seed": 0}
PARAMETERS: dict[str, dict[str, Any]] = {
    "none": {},
    "prune": {"amount": 0.3},
    "quantize": {"linear": True, "conv": True, "bits": 8},
    "finetune": dict(_TRAINING),
    "distill": {**_TRAINING, "epochs": 5, "lr": 1e-3, "backbone": None},
    "jpeg": {"quality": 75},
    "resize": {"factor": 0.5},
    "noise": {"sigma": 0.01, "seed": 0},
    "crop": {"fraction": 0.9, "mode": "center", "seed": 0},
}
COMMON = {"name": "none", "quality_split": None}

# Backbone config keys that would load pretrained weights from disk (a student starts fresh).
_NO_PRETRAINED = {"encoder_weights": None, "encoder_weights_path": None, "checkpoint": None, "weights_path": None}


# ----------------------------------------------------------------------------- validation


def _number(attack: dict, field: str, lo: float | None = None, hi: float | None = None, integer: bool = False,
            lo_open: bool = False, hi_open: bool = False, interval: str | None = None) -> float | int:
    value = attack[field]
    ok_type = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
    if integer and isinstance(value, float) and value.is_integer():
        value, ok_type = int(value), True
    where = f"attack.{field}"
    if not ok_type or (isinstance(value, float) and not math.isfinite(value)):
        raise BadInput(f"{where} must be {'an integer' if integer else 'a number'}"
                       f"{' in ' + interval if interval else ''}, got {value!r} (attack={attack['name']})")
    bad = ((lo is not None and (value <= lo if lo_open else value < lo))
           or (hi is not None and (value >= hi if hi_open else value > hi)))
    if bad:
        raise BadInput(f"{where} must be in {interval}, got {value!r} (attack={attack['name']})")
    return value


def _bool(attack: dict, field: str) -> bool:
    if not isinstance(attack[field], bool):
        raise BadInput(f"attack.{field} must be true or false, got {attack[field]!r} (attack={attack['name']})")
    return attack[field]


def normalise(cfg_attack: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    """The attack config with defaults filled in and every value checked.

    Raises:
        BadInput: unknown ``attack.name``, a parameter the attack does not have, or a value out
            of range -- the message names ``attack.<field>``.
    """
    if isinstance(cfg_attack, DictConfig):
        cfg_attack = OmegaConf.to_container(cfg_attack, resolve=True)
    attack = dict(cfg_attack or {})
    name = attack.get("name", "none")
    if name not in PARAMETERS:
        raise BadInput(f"attack.name must be one of {', '.join(ATTACKS)}, got {name!r}")
    allowed = {**COMMON, **PARAMETERS[name]}
    unknown = sorted(set(attack) - set(allowed))
    if unknown:
        raise BadInput(f"attack.{unknown[0]} is not a parameter of attack={name} "
                       f"(it takes {', '.join(sorted(set(allowed) - {'name'})) or 'none'})")
    attack = {**allowed, **attack, "name": name}
    if attack["quality_split"] is not None and not isinstance(attack["quality_split"], str):
        raise BadInput(f"attack.quality_split must be a split name (train/val/test) or null, got "
                       f"{attack['quality_split']!r}")
    if name == "prune":
        attack["amount"] = float(_number(attack, "amount", 0.0, 1.0, hi_open=True, interval="[0, 1)"))
    elif name == "quantize":
        _bool(attack, "linear")
        _bool(attack, "conv")
        attack["bits"] = _number(attack, "bits", 2, 16, integer=True, interval="2..16")
        if not (attack["linear"] or attack["conv"]):
            raise BadInput("attack.linear and attack.conv are both false: attack=quantize would change nothing")
    elif name in ("finetune", "distill"):
        attack["epochs"] = _number(attack, "epochs", 1 if name == "distill" else 0, None, integer=True,
                                   interval="integers >= 1" if name == "distill" else "integers >= 0")
        attack["lr"] = float(_number(attack, "lr", 0.0, None, lo_open=True, interval="(0, inf)"))
        attack["weight_decay"] = float(_number(attack, "weight_decay", 0.0, None, interval="[0, inf)"))
        attack["batch_size"] = _number(attack, "batch_size", 1, None, integer=True, interval="integers >= 1")
        attack["data_share"] = float(_number(attack, "data_share", 0.0, 1.0, lo_open=True, interval="(0, 1]"))
        attack["seed"] = _number(attack, "seed", integer=True, interval="integers")
        if attack["max_batches"] is not None:
            attack["max_batches"] = _number(attack, "max_batches", 1, None, integer=True,
                                            interval="integers >= 1 (or null)")
        if not isinstance(attack["split"], str):
            raise BadInput(f"attack.split must be a split name, got {attack['split']!r}")
        if name == "distill" and attack["backbone"] is not None and not isinstance(attack["backbone"], (str, dict)):
            raise BadInput(f"attack.backbone must be null, a configs/backbone name or a config with _target_, "
                           f"got {attack['backbone']!r}")
    elif name == "jpeg":
        attack["quality"] = _number(attack, "quality", 1, 100, integer=True, interval="1..100")
    elif name == "resize":
        attack["factor"] = float(_number(attack, "factor", 0.0, 1.0, lo_open=True, interval="(0, 1]"))
    elif name == "noise":
        attack["sigma"] = float(_number(attack, "sigma", 0.0, 1.0, interval="[0, 1]"))
        attack["seed"] = _number(attack, "seed", integer=True, interval="integers")
    elif name == "crop":
        attack["fraction"] = float(_number(attack, "fraction", 0.0, 1.0, lo_open=True, interval="(0, 1]"))
        if attack["mode"] not in ("center", "random"):
            raise BadInput(f"attack.mode must be center or random, got {attack['mode']!r}")
        attack["seed"] = _number(attack, "seed", integer=True, interval="integers")
    return attack


def needs_weights(suspect: Any, name: str) -> torch.nn.Module:
    """The suspect's ``nn.Module`` for a weight attack, else BadInput naming the attack."""
    model = getattr(suspect, "model", None)
    if model is None:
        kind = str(getattr(suspect, "kind", "black-box"))
        raise BadInput(f"attack={name} needs the suspect's weights; a {kind} suspect has none (use a .ckpt "
                       f"suspect, or a query-time attack: {', '.join(QUERY_ATTACKS)}; distill needs only queries)")
    return model


# ----------------------------------------------------------------------------- data


def attack_loader(datamodule, attack: dict, train_transforms: bool = True) -> DataLoader:
    """Loader over ``attack.data_share`` of ``attack.split`` (a seeded subset), shuffled with ``attack.seed``."""
    datamodule.setup()
    split = attack["split"]
    if split not in datamodule.splits:
        raise BadInput(f"attack.split={split!r} is not a split of the data ({sorted(datamodule.splits)})")
    dataset = datamodule.dataset(split, train_transforms=train_transforms)
    n = len(dataset)
    keep = max(1, int(math.ceil(attack["data_share"] * n)))
    if keep < n:
        order = np.random.default_rng(attack["seed"]).permutation(n)[:keep]
        dataset = Subset(dataset, sorted(int(i) for i in order))
    return DataLoader(dataset, batch_size=attack["batch_size"], shuffle=True,
                      generator=torch.Generator().manual_seed(attack["seed"]), num_workers=0)


def task_quality(suspect: Any, datamodule, task: str, split: str = "test", batch_size: int = 32,
                 max_images: int | None = None) -> dict[str, Any]:
    """The task quality the (attacked) suspect still delivers on a clean split.

    Segmentation: mean per-image Dice of the 0.5-thresholded probability map (as ``test/dice``
    in training: samplewise, micro); classification: balanced accuracy (mean per-class recall
    over the classes present). Queries go through ``suspect.predict`` (counted there).

    Returns:
        ``{"metric": "dice" | "balanced_accuracy", "value", "split", "num_images", "queries"}``.
    """
    datamodule.setup()
    if split not in datamodule.splits:
        raise BadInput(f"attack.quality_split={split!r} is not a split of the data ({sorted(datamodule.splits)})")
    dataset = datamodule.dataset(split, train_transforms=False)
    if max_images is not None and max_images < len(dataset):
        dataset = Subset(dataset, list(range(max_images)))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    sent = 0
    if task == "segmentation":
        from torchmetrics.segmentation import DiceScore

        dice = DiceScore(num_classes=1, average="micro", aggregation_level="samplewise", input_format="one-hot")
        for batch in loader:
            probs = suspect.predict(batch["image"]).float()
            sent += len(batch["image"])
            mask = batch["mask"]
            if probs.shape[-2:] != mask.shape[-2:]:
                probs = torch.nn.functional.interpolate(probs, size=mask.shape[-2:], mode="bilinear",
                                                        align_corners=False)
            dice.update((probs > 0.5).long(), (mask > 0.5).long())
        value, metric = float(dice.compute()), "dice"
    else:
        preds, labels = [], []
        for batch in loader:
            preds.append(suspect.predict(batch["image"]).argmax(1))
            labels.append(batch["label"])
            sent += len(batch["image"])
        pred, label = torch.cat(preds), torch.cat(labels)
        value = float(np.mean([float((pred[label == k] == k).float().mean()) for k in label.unique()]))
        metric = "balanced_accuracy"
    return {"metric": metric, "value": value, "split": split, "num_images": len(dataset), "queries": sent}


# ----------------------------------------------------------------------------- distillation student


def _backbone_config(attack: dict, suspect: Any, datamodule) -> dict:
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


def build_student(attack: dict, suspect: Any, datamodule) -> tuple[torch.nn.Module, dict]:
    """A freshly initialised network for the distillation student; returns ``(model, config)``.

    ``attack.backbone`` null copies the suspect's own ``hyper_parameters.backbone``: that config
    comes from a foreign file, so it is built by :func:`models.safe_reader.build_model` (exact
    factory table plus the suspect's operator-trusted ``factories``; no Hydra). A configs/backbone
    name or a config given on the command line is the verifier's own and is instantiated.
    """
    from hydra.utils import instantiate

    from models.safe_reader import ModelFileError, build_model

    config = _backbone_config(attack, suspect, datamodule)
    for key, value in _NO_PRETRAINED.items():
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


# ----------------------------------------------------------------------------- dispatcher


def apply_attack(cfg_attack: Mapping[str, Any] | DictConfig | None, suspect: Any, datamodule,
                 task: str) -> tuple[Any, dict[str, Any]]:
    """Run ``cfg_attack`` on ``suspect``; return ``(suspect to verify, record for the report)``.

    Args:
        cfg_attack: ``cfg.attack`` (``name`` + parameters; see the module docstring).
        suspect: any suspect adapter (``predict``, ``queries``, ``model`` or ``None``).
        datamodule: the verifier's data module (fine-tuning / distillation data, quality split).
        task: ``segmentation`` (StealthMark) or ``classification`` (X-Mark).
    Raises:
        BadInput: bad values (``attack.<field>`` named), or a weight attack on a suspect without
            weights (``attack=<name> needs the suspect's weights``).
    """
    attack = normalise(cfg_attack)
    name = attack["name"]
    started = time.perf_counter()
    params = {k: v for k, v in attack.items() if k not in ("name", "quality_split")}
    record: dict[str, Any] = {"name": name, **params}
    if name in WEIGHT_ATTACKS:
        model = needs_weights(suspect, name)
        device = getattr(suspect, "device", "cpu")
        if name == "prune":
            record.update(core.prune_global_l1(model, attack["amount"]))
        elif name == "quantize":
            model, stats = core.quantize_int8(model, linear=attack["linear"], conv=attack["conv"], bits=attack["bits"])
            suspect.model = model
            if hasattr(suspect, "device"):
                suspect.device = torch.device("cpu")  # int8 kernels are CPU kernels
            record.update(stats, device="cpu")
        else:
            loader = attack_loader(datamodule, attack)
            stats = core.finetune(model, loader, epochs=attack["epochs"], lr=attack["lr"],
                                  weight_decay=attack["weight_decay"], max_batches=attack["max_batches"],
                                  device=device, seed=attack["seed"], task=task)
            record.update(stats, num_images=len(loader.dataset))
    elif name == "distill":
        student, config = build_student(attack, suspect, datamodule)
        loader = attack_loader(datamodule, attack)
        device = getattr(suspect, "device", "cpu") if getattr(suspect, "model", None) is not None else "cpu"
        stats = core.distill(student, suspect.predict, loader, task=task, epochs=attack["epochs"], lr=attack["lr"],
                             weight_decay=attack["weight_decay"], max_batches=attack["max_batches"], device=device,
                             seed=attack["seed"])
        teacher = suspect.identity() if hasattr(suspect, "identity") else {"kind": getattr(suspect, "kind", "?")}
        record.update(stats, num_images=len(loader.dataset), student=config.get("_target_"),
                      student_backbone={k: v for k, v in config.items() if isinstance(v, (str, int, float, bool))})
        suspect = core.ModuleSuspect(student, task, device=device, identity={"distilled_from": teacher},
                                     hparams={"backbone": config, "task": task})
    elif name in QUERY_ATTACKS:
        try:
            transform = core.QueryTransform(name, **params)
        except ValueError as err:
            raise BadInput(str(err)) from None
        suspect = core.TransformedSuspect(suspect, transform)
    record["seconds"] = round(time.perf_counter() - started, 3)
    if attack["quality_split"]:
        record["quality"] = task_quality(suspect, datamodule, task, split=attack["quality_split"])
    return suspect, record
