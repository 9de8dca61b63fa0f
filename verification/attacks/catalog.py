"""The removal attacks ``configs/attack/<name>.yaml`` point at with ``_target_``.

Each class takes exactly the parameters its config file lists (no defaults here: the defaults
live in ``configs/attack/``), checks every value in its constructor -- a bad one is a
:class:`~verification.protocols.BadInput` naming ``attack.<field>`` (exit 2) -- and runs with
``attack.run(suspect, datamodule, task) -> (suspect to verify, record)``. The algorithms live in
:mod:`verification.model_attacks`.
"""

from __future__ import annotations

import abc

import inspect
import math
from typing import Any, ClassVar

import torch

from verification import model_attacks as core
from verification.attacks.data import attack_loader
from verification.attacks.student import build_student
from verification.protocols import BadInput

# ----------------------------------------------------------------------------- value checks


def number(attack: str, field: str, value: Any, lo: float | None = None, hi: float | None = None,
           integer: bool = False, lo_open: bool = False, hi_open: bool = False,
           interval: str | None = None) -> float | int:
    """``value`` of ``attack.<field>`` if it is a finite number (an integer if ``integer``) in the interval.

    Raises:
        BadInput: naming ``attack.<field>``, the interval and ``(attack=<attack>)``.
    """
    ok_type = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
    if integer and isinstance(value, float) and value.is_integer():
        value, ok_type = int(value), True
    where = f"attack.{field}"
    if not ok_type or (isinstance(value, float) and not math.isfinite(value)):
        raise BadInput(f"{where} must be {'an integer' if integer else 'a number'}"
                       f"{' in ' + interval if interval else ''}, got {value!r} (attack={attack})")
    bad = ((lo is not None and (value <= lo if lo_open else value < lo))
           or (hi is not None and (value >= hi if hi_open else value > hi)))
    if bad:
        raise BadInput(f"{where} must be in {interval}, got {value!r} (attack={attack})")
    return value


def boolean(attack: str, field: str, value: Any) -> bool:
    """``value`` of ``attack.<field>`` if it is true or false, else BadInput naming the field."""
    if not isinstance(value, bool):
        raise BadInput(f"attack.{field} must be true or false, got {value!r} (attack={attack})")
    return value


def needs_weights(suspect: Any, name: str) -> torch.nn.Module:
    """The suspect's ``nn.Module`` for a weight attack, else BadInput naming the attack."""
    model = getattr(suspect, "model", None)
    if model is None:
        kind = str(getattr(suspect, "kind", "black-box"))
        raise BadInput(f"attack={name} needs the suspect's weights; a {kind} suspect has none (use a .ckpt "
                       f"suspect, or a query-time attack: {', '.join(core.QueryTransform.NAMES)}; distill needs "
                       "only queries)")
    return model


# ----------------------------------------------------------------------------- attacks


class Attack(abc.ABC):
    """Base: ``name`` (the config's ``name`` and report label), ``parameters()``, ``run(...)``."""

    name: ClassVar[str]

    def __init__(self) -> None:  # an attack without parameters
        pass

    @classmethod
    def fields(cls) -> list[str]:
        """The constructor's parameters, in order (= the keys of the config besides name / quality_split)."""
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def parameters(self) -> dict[str, Any]:
        """The checked values, ``{field: value}`` in constructor order (the report's attack record)."""
        return {field: getattr(self, field) for field in self.fields()}

    @abc.abstractmethod
    def run(self, suspect: Any, datamodule, task: str) -> tuple[Any, dict[str, Any]]:
        """Attack ``suspect``; returns ``(suspect to verify, statistics for the record)``."""


class NoAttack(Attack):
    """``attack=none``: verify the suspect as given."""

    name = "none"

    def run(self, suspect, datamodule, task):
        return suspect, {}


class Prune(Attack):
    """Global L1 unstructured pruning of ``amount`` ∈ [0, 1) of all conv/linear weights, permanently."""

    name = "prune"

    def __init__(self, amount: float):
        self.amount = float(number(self.name, "amount", amount, 0.0, 1.0, hi_open=True, interval="[0, 1)"))

    def run(self, suspect, datamodule, task):
        return suspect, core.prune_global_l1(needs_weights(suspect, self.name), self.amount)


class Quantize(Attack):
    """Dynamic int8 ``linear`` layers and/or ``bits``-bit (2..16) fake-quantised ``conv`` weights; runs on the CPU."""

    name = "quantize"

    def __init__(self, linear: bool, conv: bool, bits: int):
        self.linear, self.conv = boolean(self.name, "linear", linear), boolean(self.name, "conv", conv)
        self.bits = number(self.name, "bits", bits, 2, 16, integer=True, interval="2..16")
        if not (self.linear or self.conv):
            raise BadInput("attack.linear and attack.conv are both false: attack=quantize would change nothing")

    def run(self, suspect, datamodule, task):
        model = needs_weights(suspect, self.name)
        model, stats = core.quantize_int8(model, linear=self.linear, conv=self.conv, bits=self.bits)
        suspect.model = model
        if hasattr(suspect, "device"):
            suspect.device = torch.device("cpu")  # int8 kernels are CPU kernels
        return suspect, {**stats, "device": "cpu"}


class _Training(Attack):
    """The training schedule and data of ``finetune`` / ``distill`` (checked here)."""

    min_epochs: ClassVar[int] = 0

    def _check_training(self, epochs, lr, weight_decay, batch_size, split, data_share, max_batches, seed) -> None:
        name = self.name
        self.epochs = number(name, "epochs", epochs, self.min_epochs, None, integer=True,
                             interval=f"integers >= {self.min_epochs}")
        self.lr = float(number(name, "lr", lr, 0.0, None, lo_open=True, interval="(0, inf)"))
        self.weight_decay = float(number(name, "weight_decay", weight_decay, 0.0, None, interval="[0, inf)"))
        self.batch_size = number(name, "batch_size", batch_size, 1, None, integer=True, interval="integers >= 1")
        if not isinstance(split, str):
            raise BadInput(f"attack.split must be a split name, got {split!r}")
        self.split = split
        self.data_share = float(number(name, "data_share", data_share, 0.0, 1.0, lo_open=True, interval="(0, 1]"))
        self.max_batches = None if max_batches is None else number(
            name, "max_batches", max_batches, 1, None, integer=True, interval="integers >= 1 (or null)")
        self.seed = number(name, "seed", seed, integer=True, interval="integers")

    def loader(self, datamodule):
        return attack_loader(datamodule, self.split, self.data_share, self.batch_size, self.seed)

    def schedule(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "lr": self.lr, "weight_decay": self.weight_decay,
                "max_batches": self.max_batches, "seed": self.seed}


class Finetune(_Training):
    """Fine-tune the suspect's weights on ``data_share`` of the clean ``split`` with the task loss."""

    name = "finetune"

    def __init__(self, epochs: int, lr: float, weight_decay: float, batch_size: int, split: str,
                 data_share: float, max_batches: int | None, seed: int):
        self._check_training(epochs, lr, weight_decay, batch_size, split, data_share, max_batches, seed)

    def run(self, suspect, datamodule, task):
        model = needs_weights(suspect, self.name)
        loader = self.loader(datamodule)
        stats = core.finetune(model, loader, device=getattr(suspect, "device", "cpu"), task=task, **self.schedule())
        return suspect, {**stats, "num_images": len(loader.dataset)}


class Distill(_Training):
    """Distil the suspect's answers into a fresh student (``backbone``: null = the suspect's own config)."""

    name = "distill"
    min_epochs = 1

    def __init__(self, epochs: int, lr: float, weight_decay: float, batch_size: int, split: str,
                 data_share: float, max_batches: int | None, seed: int, backbone: str | dict | None):
        self._check_training(epochs, lr, weight_decay, batch_size, split, data_share, max_batches, seed)
        if backbone is not None and not isinstance(backbone, (str, dict)):
            raise BadInput(f"attack.backbone must be null, a configs/backbone name or a config with _target_, "
                           f"got {backbone!r}")
        self.backbone = backbone

    def run(self, suspect, datamodule, task):
        student, config = build_student({"backbone": self.backbone, "seed": self.seed}, suspect, datamodule)
        loader = self.loader(datamodule)
        device = getattr(suspect, "device", "cpu") if getattr(suspect, "model", None) is not None else "cpu"
        stats = core.distill(student, suspect.predict, loader, task=task, device=device, **self.schedule())
        teacher = suspect.identity() if hasattr(suspect, "identity") else {"kind": getattr(suspect, "kind", "?")}
        record = {**stats, "num_images": len(loader.dataset), "student": config.get("_target_"),
                  "student_backbone": {k: v for k, v in config.items() if isinstance(v, (str, int, float, bool))}}
        attacked = core.ModuleSuspect(student, task, device=device, identity={"distilled_from": teacher},
                                      hparams={"backbone": config, "task": task})
        return attacked, record


class _QueryAttack(Attack):
    """A transform the thief's deployment applies to every query (:class:`~verification.model_attacks.QueryTransform`)."""

    def run(self, suspect, datamodule, task):
        try:
            transform = core.QueryTransform(self.name, **self.parameters())
        except ValueError as err:
            raise BadInput(str(err)) from None
        return core.TransformedSuspect(suspect, transform), {}


class Jpeg(_QueryAttack):
    """JPEG re-encoding of every query at ``quality`` ∈ 1..100."""

    name = "jpeg"

    def __init__(self, quality: int):
        self.quality = number(self.name, "quality", quality, 1, 100, integer=True, interval="1..100")


class Resize(_QueryAttack):
    """Every query downsampled by ``factor`` ∈ (0, 1] (antialiased) and scaled back up."""

    name = "resize"

    def __init__(self, factor: float):
        self.factor = float(number(self.name, "factor", factor, 0.0, 1.0, lo_open=True, interval="(0, 1]"))


class Noise(_QueryAttack):
    """``clip(x + sigma·N(0, 1), 0, 1)`` on every query, ``sigma`` ∈ [0, 1], seeded."""

    name = "noise"

    def __init__(self, sigma: float, seed: int):
        self.sigma = float(number(self.name, "sigma", sigma, 0.0, 1.0, interval="[0, 1]"))
        self.seed = number(self.name, "seed", seed, integer=True, interval="integers")


class Crop(_QueryAttack):
    """Keep ``fraction`` ∈ (0, 1] of each side (``mode`` center | random, seeded), resized back."""

    name = "crop"

    def __init__(self, fraction: float, mode: str, seed: int):
        self.fraction = float(number(self.name, "fraction", fraction, 0.0, 1.0, lo_open=True, interval="(0, 1]"))
        if mode not in ("center", "random"):
            raise BadInput(f"attack.mode must be center or random, got {mode!r}")
        self.mode = mode
        self.seed = number(self.name, "seed", seed, integer=True, interval="integers")


ATTACK_CLASSES: tuple[type[Attack], ...] = (NoAttack, Prune, Quantize, Finetune, Distill, Jpeg, Resize, Noise, Crop)
