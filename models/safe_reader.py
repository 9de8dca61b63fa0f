"""One safe reader for every model file that comes from someone else.

A medmark checkpoint stores the network's *config* (``hyper_parameters.backbone``: a factory
name in ``_target_`` plus keyword arguments) next to its weights. Handing that config to Hydra's
``instantiate`` would build *any* nested ``_target_`` it contains (``builtins.open(<file>, "w")``,
``torch.load`` of pickle bytes, ``os.system`` reached through a dotted path such as
``models.weights.os.system``). This module never does that:

* :func:`read_model_file` / :func:`read_checkpoint`: ``torch.load(weights_only=True)`` on the CPU
  (no pickled code runs), with a named error for a missing, corrupt or foreign file.
* :data:`FACTORIES`: an explicit table ``exact dotted name -> factory function`` of the public
  model factories of :mod:`models` (the names ``configs/backbone/*.yaml`` store, and their
  defining-module spellings). A stored ``_target_`` must be a key of this table -- no prefix
  match, no import of a name read from a file.
* :func:`validate_config`: every other key must be a plain identifier (no ``_args_``,
  ``_partial_``, ``_recursive_``, ``_convert_``, nested ``_target_`` or any ``_``-key) and its
  value a JSON scalar (``str``/``int``/``float``/``bool``/``None``) or a flat list of scalars;
  strings with ``${`` (OmegaConf interpolations) are refused too. Pretrained-weight keys
  (:data:`PRETRAINED_OFF`) are forced off: the file's own weights replace them.
* :func:`build_model`: the validated config, called *directly* (``factory(**kwargs)``).
* :func:`load_model_checkpoint`: the whole prologue every loader shares (read, check task,
  build, load ``model.*`` weights strictly) -> ``(model in eval mode on the CPU, hparams)``.

Operator-trusted extra factories (``factories``): the verifier's own config/CLI (``verify.py
suspect_factories=[...]``, ``--factories`` of ``verification.serve`` / ``verification.export``) may add
factories of their own code, e.g. a custom test network. An entry is either an exact dotted name
(``my_pkg.nets.TinyNet``) or a module followed by a dot (``my_pkg.nets.``), which admits
``my_pkg.nets.<Name>`` for a single identifier ``Name`` (no further dots, no leading ``_``) that
is a function or an ``nn.Module`` class *defined in* that module. The module imported is always
the operator's, never one named by the file. ``models.`` is accepted and adds nothing (the table
already holds the factories of :mod:`models`).

Every refusal is a :class:`ModelFileError` (a ``ValueError``) whose message names the file and
the key path (``<file>: field 'hyper_parameters.backbone.encoder' ...``). Loaders that have
their own error type (``SuspectError``, ``ClassifierLoadError``, ``MarkerError``) subclass it and
pass it as ``error=`` so their callers keep catching what they caught before.
"""

from __future__ import annotations

import importlib
import inspect
import keyword
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from models.classification import build_timm_classifier
from models.generator import build_generator
from models.sam import build_sam_model
from models.segmentation import build_smp_model
from watermark.kit_io import file_sha256  # re-exported: a model file's identity in reports

__all__ = [
    "FACTORIES",
    "HYDRA_KEYS",
    "PRETRAINED_OFF",
    "ModelFileError",
    "build_model",
    "file_sha256",
    "load_model_checkpoint",
    "model_state",
    "read_checkpoint",
    "read_model_file",
    "validate_config",
    "validate_kwargs",
]


class ModelFileError(ValueError):
    """A model file (checkpoint, marker bundle) cannot be used; the message names the file and field."""


# Exact dotted factory name (as a checkpoint stores it in `_target_`) -> the function it means.
FACTORIES: Mapping[str, Callable[..., nn.Module]] = MappingProxyType({
    "models.build_smp_model": build_smp_model,
    "models.segmentation.build_smp_model": build_smp_model,
    "models.build_sam_model": build_sam_model,
    "models.sam.build_sam_model": build_sam_model,
    "models.build_timm_classifier": build_timm_classifier,
    "models.classification.build_timm_classifier": build_timm_classifier,
    "models.generator.build_generator": build_generator,
})

# Keys that would make a factory read pretrained weights from disk -> the value forced instead
# (the file's own weights replace them; the verifier's machine need not have those files).
PRETRAINED_OFF: Mapping[str, Any] = MappingProxyType({
    "encoder_weights": None, "encoder_weights_path": None, "checkpoint": None, "weights_path": None,
    "pretrained": False, "weights_dir": None,
})

# Hydra's instantiate keys: refused anywhere in a stored config (`_target_` only as the factory).
HYDRA_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")

_SCALARS = (str, int, float, bool, type(None))


# ----------------------------------------------------------------------------- reading


def read_model_file(path: str | Path, what: str = "checkpoint",
                    error: type[ModelFileError] = ModelFileError) -> dict[str, Any]:
    """The dict stored in a ``torch.save`` file, read with ``weights_only=True`` on the CPU.

    Args:
        path: the file.
        what: what the file should be, for messages (``checkpoint``, ``marker (generator) file``).
        error: the :class:`ModelFileError` subclass to raise.
    Raises:
        error: missing file, unreadable / unsafe pickle, or not a dict (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for foreign / corrupt / unsafe files
        first = (str(err).splitlines() or [""])[0][:200]
        raise error(f"{path}: not a readable PyTorch {what} ({type(err).__name__}: {first})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: not a {what} (holds a {type(obj).__name__}, expected a dict)")
    return obj


def read_checkpoint(path: str | Path, error: type[ModelFileError] = ModelFileError) -> dict[str, Any]:
    """A Lightning checkpoint as a dict with a ``state_dict`` mapping (``weights_only=True``, CPU).

    Raises:
        error: missing / corrupt / not-a-dict file, or no ``state_dict`` mapping (file named).
    """
    checkpoint = read_model_file(path, "checkpoint", error)
    if not isinstance(checkpoint.get("state_dict"), Mapping):
        raise error(f"{Path(path)}: not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def model_state(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The network's weights: ``state_dict`` entries ``model.*`` without that prefix (and ``_orig_mod.``)."""
    # torch.compile(module) wraps the network; its weights carry an _orig_mod. prefix.
    return {name[len("model."):].replace("_orig_mod.", ""): tensor
            for name, tensor in checkpoint["state_dict"].items() if str(name).startswith("model.")}


# ----------------------------------------------------------------------------- validating


def _is_identifier(name: Any) -> bool:
    return isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name) and not name.startswith("_")


def _check_scalar(value: Any, where: str, source: str, error: type[ModelFileError]) -> None:
    if not isinstance(value, _SCALARS):
        raise error(f"{source}: field '{where}' is a {type(value).__name__}; only numbers, strings, booleans, "
                    "null and flat lists of them are read from a model file")
    if isinstance(value, float) and not math.isfinite(value):
        raise error(f"{source}: field '{where}' is {value!r}; expected a finite number")
    if isinstance(value, str) and "${" in value:
        raise error(f"{source}: field '{where}' holds an interpolation ('${{...}}'); refused in a model file")


def validate_kwargs(config: Mapping[str, Any], source: str | Path, where: str,
                    error: type[ModelFileError] = ModelFileError) -> dict[str, Any]:
    """Keyword arguments read from a file, checked: identifier keys, scalar / flat-list values.

    Args:
        config: the stored mapping (without ``_target_``).
        source: the file, for messages.
        where: the key path of ``config`` in the file (``hyper_parameters.backbone``).
    Returns:
        a new plain dict (lists as lists).
    Raises:
        error: a Hydra key (``_args_``, ``_partial_``, ``_recursive_``, ``_convert_``, a nested
            ``_target_``) or other non-identifier key, a nested mapping, a list holding a mapping
            or a list, a non-finite number, an interpolation string; the message names
            ``<source>`` and ``<where>.<key>``.
    """
    if not isinstance(config, Mapping):
        raise error(f"{source}: field '{where}' is a {type(config).__name__}, expected a mapping")
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{where}.{key}"
        if key in HYDRA_KEYS or (isinstance(key, str) and key.startswith("_")):
            raise error(f"{source}: field '{path}': key {key!r} is refused in a model file (no Hydra "
                        "instantiate options are honoured)")
        if not _is_identifier(key):
            raise error(f"{source}: field '{where}' has key {key!r}; only plain argument names are allowed")
        if isinstance(value, Mapping):
            raise error(f"{source}: field '{path}' is a nested mapping; refused in a model file (nothing "
                        "nested is built from a file)")
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    raise error(f"{source}: field '{path}[{i}]' is a mapping inside a list; refused in a "
                                "model file")
                _check_scalar(item, f"{path}[{i}]", str(source), error)
            out[key] = list(value)
            continue
        _check_scalar(value, path, str(source), error)
        out[key] = value
    return out


def _import(module_name: str) -> Any:
    """The operator-named module, or None when it cannot be imported."""
    try:
        return importlib.import_module(module_name)
    except ImportError:
        return None


def _operator_factory(target: str, factories: Sequence[str]) -> Callable[..., nn.Module] | None:
    """The operator-trusted factory ``target`` names (see the module docstring), else None."""
    for entry in factories:
        entry = str(entry)
        if entry in ("models.", "models"):
            continue  # the table already holds the models package's factories
        if entry.endswith("."):
            if not target.startswith(entry):
                continue
            module_name, name = entry[:-1], target[len(entry):]
            if not _is_identifier(name):
                continue  # `module.sub.attr` paths are never followed
            obj = getattr(_import(module_name), name, None)
            if getattr(obj, "__module__", None) != module_name:
                continue  # only what the module itself defines, not what it imports
            if inspect.isfunction(obj) or (inspect.isclass(obj) and issubclass(obj, nn.Module)):
                return obj
        elif entry == target:
            module_name, _, name = entry.rpartition(".")
            obj = getattr(_import(module_name), name, None) if module_name else None
            if callable(obj):
                return obj
    return None


def validate_config(config: Any, source: str | Path, where: str = "hyper_parameters.backbone",
                    factories: Sequence[str] = (), no_pretrained: bool = True,
                    error: type[ModelFileError] = ModelFileError) -> tuple[Callable[..., nn.Module], dict[str, Any]]:
    """``(factory, kwargs)`` of a stored model config, or a named refusal.

    Args:
        config: ``{_target_: <exact factory name>, <name>: <scalar or flat list>, ...}``.
        source: the file it was read from (messages).
        where: its key path in the file (messages).
        factories: operator-trusted extra factories (module docstring); the table always applies.
        no_pretrained: force :data:`PRETRAINED_OFF` (and ``allow_random_init=True``).
    Raises:
        error: no ``_target_``, a ``_target_`` outside the table (and ``factories``), or a bad key /
            value (:func:`validate_kwargs`).
    """
    if not isinstance(config, Mapping) or "_target_" not in config:
        raise error(f"{source}: field '{where}' is missing or has no '_target_' (not a medmark model config)")
    target = config["_target_"]
    factory = FACTORIES.get(target) if isinstance(target, str) else None
    if factory is None and isinstance(target, str):
        factory = _operator_factory(target, factories)
    if factory is None:
        known = ", ".join(sorted(FACTORIES))
        raise error(f"{source}: field '{where}._target_' = {target!r} is not a trusted model factory (one of "
                    f"{known}{', or the operator-trusted ' + ', '.join(map(str, factories)) if factories else ''});"
                    " refusing to build it")
    kwargs = validate_kwargs({k: v for k, v in config.items() if k != "_target_"}, source, where, error)
    if no_pretrained:
        for name, value in PRETRAINED_OFF.items():
            if name in kwargs:
                kwargs[name] = value
        if "allow_random_init" in kwargs:
            kwargs["allow_random_init"] = True  # the file's weights are loaded right after
    return factory, kwargs


def build_model(config: Mapping[str, Any], source: str | Path, where: str = "hyper_parameters.backbone",
                factories: Sequence[str] = (), error: type[ModelFileError] = ModelFileError) -> nn.Module:
    """The network a stored config describes, built by calling its factory directly (no Hydra).

    Pretrained-weight keys are forced off (:data:`PRETRAINED_OFF`); load the file's weights next.

    Raises:
        error: a refused config (:func:`validate_config`) or a factory that fails on its arguments.
    """
    factory, kwargs = validate_config(config, source, where, factories, True, error)
    try:
        model = factory(**kwargs)
    except Exception as err:
        raise error(f"{source}: cannot build field '{where}' ({type(err).__name__}: {str(err)[:300]})") from None
    if not isinstance(model, nn.Module):
        raise error(f"{source}: field '{where}._target_' built a {type(model).__name__}, not a torch module")
    return model


def config_of(config: Mapping[str, Any], source: str | Path, where: str = "hyper_parameters.backbone",
              factories: Sequence[str] = (), no_pretrained: bool = True,
              error: type[ModelFileError] = ModelFileError) -> dict[str, Any]:
    """The validated config as a plain dict ``{_target_, **kwargs}`` (safe to store or to rebuild from)."""
    _, kwargs = validate_config(config, source, where, factories, no_pretrained, error)
    return {"_target_": config["_target_"], **kwargs}


# ----------------------------------------------------------------------------- loading


def load_model_checkpoint(
    path: str | Path,
    task: str | None = "segmentation",
    factories: Sequence[str] = (),
    default_task: str = "segmentation",
    error: type[ModelFileError] = ModelFileError,
) -> tuple[nn.Module, dict[str, Any]]:
    """Network and hyper-parameters of a medmark Lightning checkpoint (weights loaded, CPU, eval).

    Args:
        path: the checkpoint (``torch.load(weights_only=True)``).
        task: the task it must be for (``segmentation`` / ``classification``); ``None`` accepts
            its own ``hyper_parameters.task``.
        factories: operator-trusted extra factories (module docstring).
        default_task: the task of a checkpoint that stores none.
        error: the :class:`ModelFileError` subclass to raise.
    Returns:
        ``(model, hparams)``; ``hparams["backbone"]`` is the *validated* config (pretrained keys
        off), so rebuilding from it is safe.
    Raises:
        error: missing / corrupt / foreign file, no ``hyper_parameters.backbone``, a refused
            config, a checkpoint of another task, or weights that do not fit (file and field named).
    """
    path = Path(path)
    checkpoint = read_checkpoint(path, error)
    hparams = checkpoint.get("hyper_parameters") or {}
    if not isinstance(hparams, Mapping):
        raise error(f"{path}: field 'hyper_parameters' is a {type(hparams).__name__}, expected a mapping")
    backbone = hparams.get("backbone")
    if not isinstance(backbone, Mapping) or "_target_" not in backbone:
        raise error(f"{path}: field 'hyper_parameters.backbone' is missing (not a medmark checkpoint)")
    found = hparams.get("task", default_task)
    if task is not None and found != task:
        raise error(f"{path}: field 'hyper_parameters.task' is {found!r}; this needs a {task} model")
    config = config_of(backbone, path, "hyper_parameters.backbone", factories, True, error)
    model = build_model(config, path, "hyper_parameters.backbone", factories, error)
    try:
        model.load_state_dict(model_state(checkpoint), strict=True)
    except Exception as err:  # RuntimeError (shapes / names), TypeError (non-tensor values)
        raise error(f"{path}: field 'state_dict' does not fit its backbone config: {str(err)[:500]}") from None
    return model.eval(), {**hparams, "backbone": config}
