"""``verify.py attack=...``: build the operator's attack from its config, run it on the suspect, measure what is left.

    python verify.py secret=... suspect=... out=... attack=prune attack.amount=0.5
    python verify.py ... attack=jpeg attack.quality=50 attack.quality_split=test   # + the thief's Dice / BA

Each ``configs/attack/<name>.yaml`` names its attack class with ``_target_`` (in
:mod:`verification.attacks.catalog`) and carries its defaults; :func:`build_attack` instantiates
the operator's composed ``cfg.attack`` with :func:`hydra.utils.instantiate` -- the constructor
checks every value (a bad one is a :class:`~verification.protocols.BadInput` naming
``attack.<field>`` -> exit 2). One entry point for every protocol (StealthMark: segmentation,
X-Mark: classification): :func:`apply_attack` ``(cfg_attack, suspect, datamodule, task) ->
(suspect, record)``. The suspect to verify is the same object modified in place (weight
attacks), a new one (``quantize`` may swap modules; ``distill``: the student) or a
:class:`~verification.model_attacks.TransformedSuspect` (query-time transforms).

Attacks (``configs/attack/<name>.yaml``; algorithms in :mod:`verification.model_attacks`):

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
noise         no       sigma ∈ [0, 1], seed
crop          no       fraction ∈ (0, 1], mode center|random, seed
============  =======  ============================================================================

\\* ``distill`` queries the suspect only; the student's architecture is ``attack.backbone``
(a ``configs/backbone`` name or a config with ``_target_``) or, when null, the suspect's own
backbone config (a checkpoint suspect's ``hyper_parameters.backbone``), freshly initialised.

Every attack config also has ``name`` (the report's label; must match the ``_target_``) and
``quality_split`` (null = skip): after the attack, the suspect's task quality on that clean split
-- Dice (segmentation) or balanced accuracy (classification) -- goes into ``record["quality"]``
(:func:`task_quality`; its queries are counted by the suspect).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from verification.attacks.catalog import ATTACK_CLASSES, Attack, NoAttack, needs_weights
from verification.attacks.data import attack_loader, balanced_accuracy, task_quality
from verification.attacks.student import build_student
from verification.protocols import BadInput

__all__ = ["ATTACKS", "Attack", "apply_attack", "attack_loader", "balanced_accuracy", "build_attack",
           "build_student", "needs_weights", "task_quality"]

ATTACKS = tuple(cls.name for cls in ATTACK_CLASSES)  # the names configs/attack/ offers (messages)
COMMON = ("_target_", "name", "quality_split")       # keys every attack config has besides its parameters


def _attack_class(attack: Mapping[str, Any]) -> type[Attack]:
    """The :class:`Attack` subclass ``attack._target_`` names (located, not yet called)."""
    from hydra.utils import get_class

    target = attack.get("_target_")
    if target is None:
        raise BadInput(f"attack._target_ is missing (attack.name={attack.get('name')!r}): pick an attack with "
                       f"attack=<name>, one of {', '.join(ATTACKS)} (configs/attack/<name>.yaml)")
    try:
        cls = get_class(str(target))
    except Exception:  # noqa: BLE001 - hydra wraps import errors in several types
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, Attack) and hasattr(cls, "name")):
        raise BadInput(f"attack._target_={target!r} is not an attack class of verification.attacks.catalog "
                       f"(configs/attack/ offers {', '.join(ATTACKS)})")
    if attack.get("name", cls.name) != cls.name:
        raise BadInput(f"attack.name must be {cls.name!r} for attack._target_={target}, got {attack['name']!r}")
    return cls


def build_attack(cfg_attack: Mapping[str, Any] | DictConfig | None) -> tuple[Attack, str | None]:
    """The operator's attack object and its ``quality_split``, every value checked.

    Args:
        cfg_attack: ``cfg.attack`` as composed from ``configs/attack/<name>.yaml`` + overrides
            (``_target_``, ``name``, ``quality_split`` and the attack's parameters); ``None`` = none.
    Raises:
        BadInput: no or a foreign ``_target_``, a parameter the attack does not have or lacks, or
            a value out of range -- the message names ``attack.<field>``.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if cfg_attack is None:
        return NoAttack(), None
    attack = OmegaConf.to_container(cfg_attack, resolve=True) if isinstance(cfg_attack, DictConfig) else dict(cfg_attack)
    cls = _attack_class(attack)
    fields = cls.fields()
    unknown = sorted(set(attack) - set(COMMON) - set(fields))
    if unknown:
        raise BadInput(f"attack.{unknown[0]} is not a parameter of attack={cls.name} "
                       f"(it takes {', '.join(sorted([*fields, 'quality_split']))})")
    missing = [f for f in fields if f not in attack]
    if missing:
        raise BadInput(f"attack.{missing[0]} is missing (attack={cls.name} takes {', '.join(fields)}; "
                       f"configs/attack/{cls.name}.yaml carries them)")
    split = attack.get("quality_split")
    if split is not None and not isinstance(split, str):
        raise BadInput(f"attack.quality_split must be a split name (train/val/test) or null, got {split!r}")
    params = {f: attack[f] for f in fields}
    try:
        return instantiate({"_target_": attack["_target_"], **params}, _recursive_=False, _convert_="all"), split
    except InstantiationException as err:  # Hydra wraps the constructor's BadInput naming the field
        if isinstance(err.__cause__, BadInput):
            raise err.__cause__ from None
        raise


def apply_attack(cfg_attack: Mapping[str, Any] | DictConfig | None, suspect: Any, datamodule,
                 task: str) -> tuple[Any, dict[str, Any]]:
    """Run ``cfg_attack`` on ``suspect``; return ``(suspect to verify, record for the report)``.

    Args:
        cfg_attack: ``cfg.attack`` (see :func:`build_attack` and the module docstring).
        suspect: any suspect adapter (``predict``, ``queries``, ``model`` or ``None``).
        datamodule: the verifier's data module (fine-tuning / distillation data, quality split).
        task: ``segmentation`` (StealthMark) or ``classification`` (X-Mark).
    Returns:
        the suspect to verify and ``{"name", **parameters, **statistics, "seconds"[, "quality"]}``.
    Raises:
        BadInput: bad values (``attack.<field>`` named), or a weight attack on a suspect without
            weights (``attack=<name> needs the suspect's weights``).
    """
    attack, quality_split = build_attack(cfg_attack)
    started = time.perf_counter()
    suspect, stats = attack.run(suspect, datamodule, task)
    record: dict[str, Any] = {"name": attack.name, **attack.parameters(), **stats}
    record["seconds"] = round(time.perf_counter() - started, 3)
    if quality_split:
        record["quality"] = task_quality(suspect, datamodule, task, split=quality_split)
    return suspect, record
