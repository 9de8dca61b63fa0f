"""Shared plumbing of ``verify.py``: exit codes, errors, the secret's method, the protocol registry.

Each method's verification protocol is a module exposing ``run(cfg: DictConfig) -> int``
(an exit code). ``verify.py`` reads only the ``method`` field of ``secret=...`` and hands the
whole config to that method's protocol; the protocol validates the rest of the secret.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

EXIT_VERIFIED, EXIT_NOT_VERIFIED, EXIT_BAD_INPUT = 0, 1, 2

# method field of secret.json -> module with run(cfg) -> exit code (imported lazily: a
# StealthMark verification never imports the X-Mark stack and the other way round).
PROTOCOLS: dict[str, str] = {
    "stealthmark": "utils.verify_stealthmark",
    "medlocker": "utils.verify_advmark",
    "miadmark": "utils.verify_advmark",
    "xmark": "utils.verify_xmark",
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
    if not str(config.get("_target_", "")).startswith("datamodules."):
        raise BadInput(f"{secret_path}: field '{field}._target_' must name a medmark data module")
    return config


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; anything else unchanged."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
