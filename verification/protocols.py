"""Shared plumbing of ``verify.py``: exit codes, errors, the secret's method, the protocol registry.

Each method's verification protocol is a module exposing ``run(cfg: DictConfig) -> int``
(an exit code). ``verify.py`` reads only the ``method`` field of ``secret=...`` and hands the
whole config to that method's protocol; the protocol validates the rest of the secret.

Exit codes: 0 verified, 1 not verified, 2 bad input or any error, 3 exploratory (a decision
threshold was changed at verify time from the value sealed in the owner kit: the report says
what the rule gives at the changed thresholds, but it is no ownership verdict).

Sealed thresholds (:func:`apply_threshold_overrides`): the verdict uses the thresholds the owner
kit's secret.json pre-registered. A ``verify.*`` override equal to the sealed value changes
nothing; a smaller (stricter) α keeps the verdict binding; any other change makes the run
exploratory.

Staging (:func:`output_dirs`): ``verify.py`` lets a protocol write into a temporary sibling of
``out=`` (``cfg.stage_dir``) and moves the files into ``out=`` only when the protocol returns a
verdict, so a run that exits 2 leaves nothing in ``out=`` but Hydra's log.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

EXIT_VERIFIED, EXIT_NOT_VERIFIED, EXIT_BAD_INPUT, EXIT_EXPLORATORY = 0, 1, 2, 3

# Thresholds where a smaller value is stricter (fewer false verdicts): lowering one keeps the
# verdict binding. Every other change of a decision threshold is exploratory.
STRICTER_WHEN_SMALLER = frozenset({"alpha"})

# method field of secret.json -> module with run(cfg) -> exit code (imported lazily: a
# StealthMark verification never imports the X-Mark stack and the other way round).
PROTOCOLS: dict[str, str] = {
    "stealthmark": "verification.stealthmark",
    "medlocker": "verification.medlocker",
    "miadmark": "verification.medlocker",
    "xmark": "verification.xmark",
}


class BadInput(ValueError):
    """Bad verification input not covered by a more specific error; names the file/field."""


def secret_method(path: str | Path | None) -> str:
    """The ``method`` field of an owner kit's secret.json, validated against :data:`PROTOCOLS`.

    Raises:
        BadInput: no ``secret=``, missing/unreadable/invalid file, or unknown method (named).
    """
    if path is None:
        raise BadInput("secret= is required: the owner kit's secret.json (e.g. secret=<run>/owner/secret.json)")
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{p}: file not found (expected the owner kit's secret.json)")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(f"{p}: unreadable ({type(err).__name__}: {err})") from None
    except json.JSONDecodeError as err:
        raise BadInput(f"{p}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    method = doc.get("method") if isinstance(doc, dict) else None
    if method not in PROTOCOLS:
        raise BadInput(f"{p}: field 'method' must be one of {sorted(PROTOCOLS)}, got {method!r}")
    return method


def run_protocol(cfg: DictConfig) -> int:
    """Dispatch to the protocol of the secret's method; returns its exit code."""
    module = importlib.import_module(PROTOCOLS[secret_method(cfg.get("secret"))])
    return int(module.run(cfg))


def require(cfg: DictConfig, *names: str) -> None:
    """Raise :class:`BadInput` naming the first of ``names`` that is missing (null) in ``cfg``."""
    for name in names:
        if OmegaConf.select(cfg, name) is None:
            raise BadInput(f"{name}= is required for this verification (method/mode of the secret)")


def data_config(secret_data: dict, overrides: DictConfig, secret_path: str, field: str = "verification.data") -> dict:
    """A data config stored in a secret with the non-null ``data.*`` overrides applied."""
    config = dict(secret_data)
    for name, value in OmegaConf.to_container(overrides, resolve=True).items():
        if value is not None:
            config[name] = value
    if config.get("_target_") not in DATA_MODULES:
        raise BadInput(f"{secret_path}: field '{field}._target_' must be one of {sorted(DATA_MODULES)}")
    _refuse_nested_targets(config, secret_path, field, top=True)
    return config


# The data modules a secret may name. The secret is the owner's file, but it travels (copied,
# e-mailed, restored from backups): its data config is rebuilt like any stored config, from an
# exact name, never from a dotted path that Hydra would import.
DATA_MODULES = frozenset({"datamodules.MedicalImageDataModule", "datamodules.base.MedicalImageDataModule"})
_HYDRA_KEYS = frozenset({"_target_", "_args_", "_partial_", "_recursive_", "_convert_"})


def _refuse_nested_targets(node: Any, secret_path: str, where: str, top: bool = False) -> None:
    """Raise :class:`BadInput` naming the key path of any Hydra key below the top level."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _HYDRA_KEYS and not (top and key == "_target_"):
                raise BadInput(f"{secret_path}: field '{where}.{key}' is not allowed (a stored config is data)")
            _refuse_nested_targets(value, secret_path, f"{where}.{key}")
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            _refuse_nested_targets(value, secret_path, f"{where}[{index}]")


def split_samples(datamodule, split: str) -> tuple[Any, dict[str, int]]:
    """``(the clean dataset of split, sample id -> its index)`` for the verification images.

    Raises:
        BadInput: ``split`` is not a split of the data (``verify.split`` named).
    """
    datamodule.prepare_data()
    datamodule.setup()
    if split not in datamodule.splits:
        raise BadInput(f"verify.split={split!r} is not a split of the data ({sorted(datamodule.splits)})")
    dataset = datamodule.dataset(split, train_transforms=False)
    return dataset, {s.id: i for i, s in enumerate(dataset.samples)}


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; anything else unchanged."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ----------------------------------------------------------------------------- sealed thresholds


@dataclass
class ThresholdRules:
    """Decision thresholds of one verification: sealed in the owner kit vs used now.

    Attributes:
        sealed: the owner kit's pre-registered thresholds (``{name: value}``).
        used: the thresholds the decision uses (sealed, with the verify-time overrides).
        changed: ``{name: {"sealed": x, "used": y}}`` of every override that makes the run
            exploratory (empty = binding).
        stricter: ``{name: {"sealed": x, "used": y}}`` of overrides that only make the test
            stricter (α lowered): recorded, binding.
    """

    sealed: dict[str, Any]
    used: dict[str, Any]
    changed: dict[str, dict[str, Any]] = field(default_factory=dict)
    stricter: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def exploratory(self) -> bool:
        return bool(self.changed)

    def record(self) -> dict[str, Any]:
        """The report.json fields: ``exploratory``, ``changed_thresholds``, ``stricter_thresholds``,
        ``sealed_thresholds``."""
        return {"exploratory": self.exploratory, "changed_thresholds": dict(self.changed),
                "stricter_thresholds": dict(self.stricter), "sealed_thresholds": dict(self.sealed)}

    def exit_code(self, verified: bool) -> int:
        """3 when exploratory (never 0), else 0 verified / 1 not verified."""
        if self.exploratory:
            return EXIT_EXPLORATORY
        return EXIT_VERIFIED if verified else EXIT_NOT_VERIFIED


def _same(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    except (TypeError, ValueError):
        return a == b


def apply_threshold_overrides(sealed: Mapping[str, Any], overrides: Mapping[str, Any], secret_path: str | Path
                              ) -> ThresholdRules:
    """Sealed thresholds with the non-null verify-time ``overrides`` applied, and what they change.

    Args:
        sealed: ``{name: value}`` from the owner kit (already validated by its reader).
        overrides: ``{name: value or None}`` from ``verify.*`` (None = the sealed value).
        secret_path: named in errors.
    Raises:
        BadInput: an override that is not a number, or an override of a threshold the secret
            does not seal.
    """
    used = dict(sealed)
    changed: dict[str, dict[str, Any]] = {}
    stricter: dict[str, dict[str, Any]] = {}
    for name, value in overrides.items():
        if value is None:
            continue
        if name not in sealed:
            raise BadInput(f"verify.{name}: {secret_path} seals no threshold {name!r} (it has {sorted(sealed)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise BadInput(f"verify.{name} must be a finite number, got {value!r}")
        if _same(value, sealed[name]):
            continue  # equal to the sealed value: no change
        used[name] = value
        entry = {"sealed": sealed[name], "used": used[name]}
        if name in STRICTER_WHEN_SMALLER and float(value) < float(sealed[name]):
            stricter[name] = entry
        else:
            changed[name] = entry
    return ThresholdRules(sealed=dict(sealed), used=used, changed=changed, stricter=stricter)


def exploratory_banner(rules_record: Mapping[str, Any]) -> str:
    """One line for reports and stdout naming every changed threshold (empty when binding)."""
    changed = rules_record.get("changed_thresholds") or {}
    if not changed:
        return ""
    names = ", ".join(f"{n} {c['sealed']:g} (sealed) -> {c['used']:g}" if isinstance(c["sealed"], (int, float))
                      else f"{n} {c['sealed']} (sealed) -> {c['used']}" for n, c in changed.items())
    return (f"EXPLORATORY — thresholds changed from the owner kit's sealed values: {names}. "
            "This is not an ownership verdict (exit code 3).")


def markdown_threshold_lines(rules_record: Mapping[str, Any]) -> list[str]:
    """report.md lines: the exploratory banner, or a note on stricter thresholds (empty when neither)."""
    lines: list[str] = []
    banner = exploratory_banner(rules_record)
    if banner:
        lines += [f"> **{banner}**", ""]
    stricter = rules_record.get("stricter_thresholds") or {}
    if stricter:
        lines += ["Stricter than sealed (the verdict stays binding): " + ", ".join(
            f"{n} {c['sealed']:g} (sealed) -> {c['used']:g}" for n, c in stricter.items()), ""]
    return lines


# ----------------------------------------------------------------------------- staged output


def output_dirs(cfg: DictConfig) -> tuple[Path, Path]:
    """``(out, stage)``: where the report will be, and where to write it now.

    ``stage`` is ``cfg.stage_dir`` when ``verify.py`` set one (moved into ``out`` on a verdict,
    deleted on exit 2), else ``out`` itself (a protocol called in-process, as tests do).
    """
    out = Path(cfg.out)
    stage = cfg.get("stage_dir")
    return out, Path(stage) if stage else out


def make_stage(out: str | Path) -> Path:
    """A new empty temporary sibling folder of ``out`` (same file system: moves are renames)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def publish_stage(stage: Path, out: Path) -> None:
    """Move everything under ``stage`` into ``out`` (same-named files replaced, folders merged)."""
    out.mkdir(parents=True, exist_ok=True)
    for entry in sorted(stage.iterdir()):
        dest = out / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if dest.is_dir() and not dest.is_symlink():
                publish_stage(entry, dest)
                continue
            if dest.exists() or dest.is_symlink():
                dest.unlink()
        elif dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(entry, dest)


def staged_path(path: str | Path, stage: Path, out: Path) -> str:
    """The final path (under ``out``) of a file written under ``stage``."""
    p = Path(path)
    try:
        return str(out / p.relative_to(stage))
    except ValueError:
        return str(p)
