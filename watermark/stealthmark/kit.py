"""The StealthMark owner kit: ``owner/secret.json`` and the signed ``owner/certificate.json``.

``secret.json`` holds everything needed to verify a suspect and nothing else::

    {"format": "medmark-stealthmark-secret", "version": 1, "method": "stealthmark",
     "key": {"payload": str,                                   # the QR text
             "qr": {"version": 1..40, "error_correction": "L"|"M"|"Q"|"H"},
             "grid": {"grid_size": G = 4·version + 17, "image_size": H, "quiet_zone": q},
             "trigger": {"kind": "patch"|"text"|"border"|"noise"|"warp", ...seeded params},
             "hide_value": float | [float per channel] | "mean",
             "epsilon": ε in [0, 0.5)},
     "verification": {"split": str, "ids": [str, ...], "data": {data-module config}},
     "thresholds": {"alpha": (0, 1), "response_margin": ≥ 0, "min_decoded": int ≥ 1},
     "model": {"checkpoint": str | null, "last_checkpoint": str | null},
     "created_at": ISO-8601 UTC}

It is written with permissions 0o600. ``certificate.json`` is a signed ownership claim
(Ed25519, :mod:`watermark.certificates`): owner id, method, SHA-256 of the secret document
and of its key, SHA-256 of the model weights and of the checkpoint file, a hash of the
training set's sample list, and the time. The certificate commits to the secret without
revealing it, so it can be published (or timestamped) before any dispute.

Every reader raises :class:`OwnerKitError` naming the file and the field at fault.
Framework-free: imports no Lightning.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from watermark import certificates
from watermark.kit_io import (
    OwnerKitError,
    canonical_json,
    certificate_envelope,
    check_header,
    document_sha256,
    plain,
    read_json_document,
    require_alpha,
    require_data_config,
    require_fields,
    require_type,
    sign_and_save_certificate,
    write_json_secret,
)
from watermark.stealthmark.grid import GridSpec
from watermark.stealthmark.qr import EC_LEVELS, grid_size, qr_modules
from watermark.stealthmark.triggers import TRIGGERS, Trigger, build_trigger, trigger_fits_quiet_zone

SECRET_FORMAT = "medmark-stealthmark-secret"
SECRET_VERSION = 1
METHOD = "stealthmark"


# ----------------------------------------------------------------------------- the key


def trigger_spec(config: Mapping[str, Any]) -> dict:
    """Resolve a trigger config into a spec for :func:`watermark.stealthmark.triggers.build_trigger`.

    Configs keep one parameter block per kind so that ``method.trigger.kind=noise`` alone
    switches the trigger::

        {"kind": "patch", "patch": {"size": 8, ...}, "noise": {"amplitude": 0.03, ...}, ...}
        -> {"kind": "patch", "size": 8, ...}

    When the config has a block for its kind, that block alone gives the parameters (other
    top-level keys, such as a shared ``seed`` the blocks interpolate, are not parameters). A
    flat spec (``{"kind": "patch", "size": 8}``, as stored in ``secret.json``) is returned
    unchanged, minus any blocks of other kinds.
    """
    config = plain(dict(config))
    kind = config.get("kind")
    if kind not in TRIGGERS:
        raise OwnerKitError(None, "trigger.kind", f"must be one of {sorted(TRIGGERS)}, got {kind!r}")
    if kind in config:
        block = config[kind] or {}
        if not isinstance(block, Mapping):
            raise OwnerKitError(None, f"trigger.{kind}", f"must be a mapping of {kind} parameters")
        return {"kind": kind, **block}
    return {"kind": kind, **{k: v for k, v in config.items() if k not in TRIGGERS and k != "kind"}}



@dataclass(frozen=True)
class StealthMarkKey:
    """The secret that training embeds and verification needs.

    Attributes:
        payload: QR text (must fit ``qr_version`` at ``error_correction``).
        qr_version, error_correction: QR version 1..40 and level ``L|M|Q|H``.
        image_size: ``H``, side of the square images the model sees (pixels).
        quiet_zone: ``q``, grid cells of quiet zone on every side (the trigger lives there).
        trigger: trigger spec ``{"kind": ..., ...}`` (:func:`watermark.stealthmark.triggers.build_trigger`).
        hide_value: fill of hidden cells (float, per-channel floats or ``"mean"``), shared by
            training's cell masking and LIME.
        epsilon: ``ε``, how far key-sample targets move towards 0.5 on dark modules.

    ``repr`` shows a hash only, so a key that ends up in a log line reveals nothing.
    """

    payload: str = field(repr=False)
    qr_version: int = field(repr=False)
    error_correction: str = field(repr=False)
    image_size: int = field(repr=False)
    quiet_zone: int = field(repr=False)
    trigger: dict = field(repr=False)
    hide_value: float | tuple[float, ...] | str = field(repr=False, default=0.0)
    epsilon: float = field(repr=False, default=0.3)

    def __post_init__(self) -> None:
        # Validate everything once, here, so a bad config fails at construction with the
        # field named, not deep inside training.
        where = "key"
        if not isinstance(self.payload, str) or not self.payload:
            raise OwnerKitError(None, f"{where}.payload", "must be a non-empty string")
        if str(self.error_correction).upper() not in EC_LEVELS:
            raise OwnerKitError(None, f"{where}.qr.error_correction",
                                f"must be one of {sorted(EC_LEVELS)}, got {self.error_correction!r}")
        object.__setattr__(self, "error_correction", str(self.error_correction).upper())
        try:
            grid_size(self.qr_version)
        except (ValueError, TypeError) as err:
            raise OwnerKitError(None, f"{where}.qr.version", str(err)) from None
        try:
            self.modules()
        except ValueError:
            raise OwnerKitError(None, f"{where}.payload",
                                f"a payload of {len(self.payload)} characters does not fit QR version "
                                f"{self.qr_version} at error correction {self.error_correction}") from None
        try:
            spec = self.spec()
        except ValueError as err:
            raise OwnerKitError(None, f"{where}.grid.image_size", str(err)) from None
        if not isinstance(self.trigger, Mapping):
            raise OwnerKitError(None, f"{where}.trigger",
                                f"must be a mapping with 'kind', got {type(self.trigger).__name__}")
        object.__setattr__(self, "trigger", plain(dict(self.trigger)))
        if self.trigger.get("kind") not in TRIGGERS:
            raise OwnerKitError(None, f"{where}.trigger.kind",
                                f"must be one of {sorted(TRIGGERS)}, got {self.trigger.get('kind')!r}")
        try:
            trigger = self.build_trigger()
            fits = trigger_fits_quiet_zone(trigger, spec)
        except ValueError as err:
            raise OwnerKitError(None, f"{where}.trigger", str(err)) from None
        if not fits:
            raise OwnerKitError(None, f"{where}.trigger",
                                f"the {trigger.kind} trigger covers QR cells; it must lie in the quiet zone "
                                f"({spec.quiet_zone} cell(s) of {spec.cell_px} px on each side)")
        hide = self.hide_value
        if isinstance(hide, (list, tuple)):
            object.__setattr__(self, "hide_value", tuple(float(v) for v in hide))
        elif isinstance(hide, str):
            if hide != "mean":
                raise OwnerKitError(None, f"{where}.hide_value", f"must be a number, a list or 'mean', got {hide!r}")
        elif isinstance(hide, (int, float)) and not isinstance(hide, bool):
            object.__setattr__(self, "hide_value", float(hide))
        else:
            raise OwnerKitError(None, f"{where}.hide_value", f"must be a number, a list or 'mean', got {hide!r}")
        eps = self.epsilon
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0.0 <= eps < 0.5:
            raise OwnerKitError(None, f"{where}.epsilon", f"must be a number in [0, 0.5), got {self.epsilon!r}")

    # -- derived objects ----------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        """``G = 4·version + 17``, QR modules per side."""
        return grid_size(self.qr_version)

    def spec(self) -> GridSpec:
        """The cell grid laid over the image (QR + quiet zone)."""
        return GridSpec(grid_size=self.grid_size, image_size=int(self.image_size), quiet_zone=int(self.quiet_zone))

    def modules(self) -> np.ndarray:
        """``G×G`` bool QR modules of the payload (True = dark)."""
        return qr_modules(self.payload, version=int(self.qr_version), error_correction=self.error_correction)

    def build_trigger(self) -> Trigger:
        return build_trigger(self.trigger)

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        hide = list(self.hide_value) if isinstance(self.hide_value, tuple) else self.hide_value
        return {
            "payload": self.payload,
            "qr": {"version": int(self.qr_version), "error_correction": self.error_correction},
            "grid": {"grid_size": self.grid_size, "image_size": int(self.image_size),
                     "quiet_zone": int(self.quiet_zone)},
            "trigger": dict(self.trigger),
            "hide_value": hide,
            "epsilon": float(self.epsilon),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str | os.PathLike | None = None,
                  prefix: str = "key") -> StealthMarkKey:
        """Inverse of :meth:`to_dict`; errors name ``path`` and the field (``key.qr.version``...)."""
        require_type(data, prefix, Mapping, path)
        for name in ("payload", "qr", "grid", "trigger", "hide_value", "epsilon"):
            if name not in data:
                raise OwnerKitError(path, f"{prefix}.{name}", "is missing")
        qr, grid = data["qr"], data["grid"]
        require_type(qr, f"{prefix}.qr", Mapping, path)
        require_type(grid, f"{prefix}.grid", Mapping, path)
        for name, types in (("version", int), ("error_correction", str)):
            if name not in qr:
                raise OwnerKitError(path, f"{prefix}.qr.{name}", "is missing")
            require_type(qr[name], f"{prefix}.qr.{name}", types, path)
        for name in ("image_size", "quiet_zone"):
            if name not in grid:
                raise OwnerKitError(path, f"{prefix}.grid.{name}", "is missing")
            require_type(grid[name], f"{prefix}.grid.{name}", int, path)
        if "grid_size" in grid and grid["grid_size"] != 4 * qr["version"] + 17:
            raise OwnerKitError(path, f"{prefix}.grid.grid_size",
                                f"{grid['grid_size']} does not match QR version {qr['version']} "
                                f"({4 * qr['version'] + 17} modules)")
        require_type(data["payload"], f"{prefix}.payload", str, path)
        require_type(data["epsilon"], f"{prefix}.epsilon", (int, float), path)
        try:
            return cls(
                payload=data["payload"],
                qr_version=qr["version"],
                error_correction=qr["error_correction"],
                image_size=grid["image_size"],
                quiet_zone=grid["quiet_zone"],
                trigger=data["trigger"],
                hide_value=data["hide_value"],
                epsilon=data["epsilon"],
            )
        except OwnerKitError as err:
            # Re-raise with the file named and the field under the caller's prefix.
            field_name = err.field.replace("key", prefix, 1) if err.field else None
            raise OwnerKitError(path, field_name, err.problem) from None

    def sha256(self) -> str:
        """SHA-256 of the canonical JSON of the key: what logs carry instead of the key."""
        return hashlib.sha256(canonical_json(self.to_dict())).hexdigest()


# ----------------------------------------------------------------------------- secret.json


def build_secret(
    key: StealthMarkKey,
    verification_ids: list[str],
    verification_split: str,
    data_config: Mapping[str, Any],
    thresholds: Mapping[str, Any],
    checkpoint: str | None = None,
    last_checkpoint: str | None = None,
    created_at: str | None = None,
) -> dict:
    """Assemble (and validate) the ``secret.json`` document.

    Args:
        key: the embedded key.
        verification_ids: sample ids of the owner's verification images (in order).
        verification_split: data split they come from (``test`` by default: never trained on,
            never used to select the checkpoint).
        data_config: the data-module config (``_target_`` + arguments) that serves them.
        thresholds: ``alpha``, ``response_margin``, ``min_decoded`` -- pre-registered here,
            before any suspect is seen.
        checkpoint, last_checkpoint: the owner's selected and last checkpoints.
    """
    doc = {
        "format": SECRET_FORMAT,
        "version": SECRET_VERSION,
        "method": METHOD,
        "key": key.to_dict(),
        "verification": {"split": str(verification_split), "ids": [str(i) for i in verification_ids],
                         "data": plain(dict(data_config))},
        "thresholds": plain(dict(thresholds)),
        "model": {"checkpoint": checkpoint, "last_checkpoint": last_checkpoint},
        "created_at": created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    validate_secret(doc)
    return doc


def validate_secret(doc: Any, path: str | os.PathLike | None = None) -> StealthMarkKey:
    """Check a secret document field by field; return its key.

    Raises:
        OwnerKitError: naming ``path`` and the first field at fault.
    """
    check_header(doc, path, (("format", str), ("version", int), ("method", str), ("key", Mapping),
                             ("verification", Mapping), ("thresholds", Mapping), ("model", Mapping),
                             ("created_at", str)), SECRET_FORMAT, SECRET_VERSION, METHOD, "a StealthMark secret")
    key = StealthMarkKey.from_dict(doc["key"], path)

    ver = doc["verification"]
    require_fields(ver, (("split", str), ("ids", list), ("data", Mapping)), path, "verification.")
    if not all(isinstance(i, str) for i in ver["ids"]):
        raise OwnerKitError(path, "verification.ids", "must be a list of strings")
    require_data_config(ver, path)

    th = doc["thresholds"]
    require_fields(th, (("alpha", (int, float)), ("response_margin", (int, float)), ("min_decoded", int)), path,
                   "thresholds.")
    require_alpha(th, path)
    if th["response_margin"] < 0:
        raise OwnerKitError(path, "thresholds.response_margin", f"must be >= 0, got {th['response_margin']}")
    if th["min_decoded"] < 1:
        raise OwnerKitError(path, "thresholds.min_decoded", f"must be >= 1, got {th['min_decoded']}")
    for name in ("checkpoint", "last_checkpoint"):
        value = doc["model"].get(name)
        if value is not None and not isinstance(value, str):
            raise OwnerKitError(path, f"model.{name}", f"must be a string or null, got {type(value).__name__}")
    return key


def secret_sha256(doc: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a whole secret document."""
    return document_sha256(doc)


def write_secret(path: str | os.PathLike, doc: Mapping[str, Any]) -> Path:
    """Validate and write ``secret.json`` readable by the owner only (0o600)."""
    validate_secret(doc, path)
    return write_json_secret(path, doc)


def read_secret(path: str | os.PathLike) -> tuple[dict, StealthMarkKey]:
    """Read and validate ``secret.json``; return ``(document, key)``.

    Raises:
        OwnerKitError: missing/unreadable file, invalid JSON, or a bad field (all named).
    """
    doc = read_json_document(path, "the owner kit's secret.json")
    key = validate_secret(doc, Path(path))
    return doc, key


# ----------------------------------------------------------------------------- hashes


def weights_sha256(state_dict: Mapping[str, Any]) -> str:
    """SHA-256 over a state dict's names and exact tensor contents (sorted by name).

    Independent of how the checkpoint file was written (optimizer state, callbacks, pickle
    details), so a re-saved copy of the same weights hashes the same.
    """
    h = hashlib.sha256(b"medmark-weights-v1")
    for name in sorted(state_dict):
        h.update(name.encode("utf-8") + b"\0" + certificates.sha256_array(state_dict[name]).encode("ascii"))
    return h.hexdigest()


def sample_list_sha256(entries: list[tuple[str, str]]) -> str:
    """SHA-256 of a dataset's sorted ``(id, file name)`` list: which samples trained the model."""
    return hashlib.sha256(canonical_json(sorted([list(e) for e in entries]))).hexdigest()


# ----------------------------------------------------------------------------- certificate.json


def build_model_certificate(
    owner_id: str,
    secret_doc: Mapping[str, Any],
    key: StealthMarkKey,
    model: Mapping[str, Any],
    dataset: Mapping[str, Any],
    created_at: str | None = None,
) -> dict:
    """An unsigned ownership claim for a StealthMark model.

    Uses the certificate envelope of :mod:`watermark.certificates` (``format``, ``version``,
    ``owner_id``, ``method``, ``created_at``, ``entries`` -- empty here: no per-image records)
    with the model claim as extra signed fields:

    * ``secret_sha256`` / ``key_sha256`` -- commitments to ``secret.json`` and to its key;
    * ``model`` -- ``{"weights_sha256", "checkpoint_sha256", "checkpoint"}``;
    * ``dataset`` -- ``{"layout", "num_train", "samples_sha256"}``.
    """
    return {**certificate_envelope(owner_id, METHOD, secret_doc, created_at),
            "key_sha256": key.sha256(), "model": plain(dict(model)), "dataset": plain(dict(dataset))}


def write_certificate(path: str | os.PathLike, cert: Mapping[str, Any], private_key) -> Path:
    """Sign ``cert`` with the owner's Ed25519 key (object, PEM bytes or file) and write it."""
    return sign_and_save_certificate(path, cert, private_key)


def read_certificate(path: str | os.PathLike) -> dict:
    """Read a StealthMark certificate; structure errors name the file and field."""
    p = Path(path)
    if not p.is_file():
        raise OwnerKitError(p, None, "file not found (expected the owner kit's certificate.json)")
    try:
        cert = certificates.load_certificate(p)
    except certificates.CertificateFormatError as err:
        raise OwnerKitError(p, None, str(err)) from None
    if not isinstance(cert, dict):
        raise OwnerKitError(p, None, f"must contain a JSON object, got {type(cert).__name__}")
    require_fields(cert, (("owner_id", str), ("method", str), ("secret_sha256", str), ("key_sha256", str),
                          ("model", Mapping), ("dataset", Mapping), ("signature", str)), p)
    if cert["method"] != METHOD:
        raise OwnerKitError(p, "method", f"must be {METHOD!r}, got {cert['method']!r}")
    return cert


def check_certificate(cert: Mapping[str, Any], public_key, secret_doc: Mapping[str, Any] | None = None) -> dict:
    """Checks a verifier runs on a certificate.

    Returns:
        ``{"signature_valid": bool, "secret_matches": bool | None}``: the Ed25519 signature
        verifies under ``public_key``, and (when ``secret_doc`` is given) the certificate
        commits to exactly that secret document.
    """
    try:
        valid = certificates.verify_certificate(dict(cert), public_key)
    except certificates.CertificateFormatError:
        valid = False
    matches = None if secret_doc is None else cert.get("secret_sha256") == secret_sha256(secret_doc)
    return {"signature_valid": bool(valid), "secret_matches": matches}
