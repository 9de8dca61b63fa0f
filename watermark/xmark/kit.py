"""The X-Mark owner kit: ``owner/secret.json`` and the signed ``owner/certificate.json``.

``secret.json`` holds everything needed to verify a suspect classifier and nothing else::

    {"format": "medmark-xmark-secret", "version": 1, "method": "xmark",
     "target_class": int y_t, "classes": [str, ...],
     "marker": {"checkpoint": "generator.pt",           # relative to the secret's folder, or absolute
                "sha256": hex of that file, "image_size": H the generator marks at},
     "verification": {"split": str, "ids": [str, ...],  # m non-target images, drawn with `seed`
                      "seed": int, "data": {data-module config}},
     "thresholds": {"tau": τ ≥ 0, "alpha": α in (0, 1)}, "m": int ≥ 2,
     "release": {"fraction": ρ, "marked_ids": [str, ...], "epsilon": ε, "dataset": str},
     "control": {"reference_<i>": {"p_value", "delta_p", "wsr", "verified"}, ...},
     "created_at": ISO-8601 UTC}

``marked_ids`` (which released images carry δ) is secret: with it, an adversary could drop
exactly those files. ``control`` records the owner's own clean reference models queried
with the same protocol at release time (docs/xmark.md: a verdict needs the suspect's
test to pass and the references' to fail). The file is written 0o600.

``certificate.json`` is a signed claim (Ed25519, :mod:`watermark.certificates`): owner id,
method, SHA-256 of the secret document, of the generator file and of the released dataset's
file list, and the time -- it commits to the secret without revealing it.

Every reader raises :class:`watermark.kit_io.OwnerKitError` naming the file and field.
Framework-free: no Lightning, no models.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from watermark.kit_io import (
    OwnerKitError,
    certificate_envelope,
    check_header,
    document_sha256,
    file_sha256,
    plain,
    read_json_document,
    require_alpha,
    require_data_config,
    require_fields,
    sign_and_save_certificate,
    write_json_secret,
)

SECRET_FORMAT = "medmark-xmark-secret"
SECRET_VERSION = 1
METHOD = "xmark"


def build_xmark_secret(
    target_class: int,
    classes: list[str],
    marker_checkpoint: str,
    marker_sha256: str,
    image_size: int,
    verification_ids: list[str],
    verification_split: str,
    verification_seed: int,
    data_config: Mapping[str, Any],
    tau: float,
    alpha: float,
    release: Mapping[str, Any],
    control: Mapping[str, Any] | None = None,
    created_at: str | None = None,
) -> dict:
    """Assemble (and validate) the X-Mark ``secret.json`` document (fields: module docstring)."""
    doc = {
        "format": SECRET_FORMAT,
        "version": SECRET_VERSION,
        "method": METHOD,
        "target_class": int(target_class),
        "classes": [str(c) for c in classes],
        "marker": {"checkpoint": str(marker_checkpoint), "sha256": str(marker_sha256), "image_size": int(image_size)},
        "verification": {"split": str(verification_split), "ids": [str(i) for i in verification_ids],
                         "seed": int(verification_seed), "data": plain(dict(data_config))},
        "thresholds": {"tau": float(tau), "alpha": float(alpha)},
        "m": len(verification_ids),
        "release": plain(dict(release)),
        "control": plain(dict(control or {})),
        "created_at": created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    validate_xmark_secret(doc)
    return doc


def validate_xmark_secret(doc: Any, path: str | os.PathLike | None = None) -> dict:
    """Check an X-Mark secret field by field; return it.

    Raises:
        OwnerKitError: naming ``path`` and the first field at fault.
    """
    check_header(doc, path, (("format", str), ("version", int), ("method", str), ("target_class", int),
                             ("classes", list), ("marker", Mapping), ("verification", Mapping),
                             ("thresholds", Mapping), ("m", int), ("release", Mapping), ("control", Mapping),
                             ("created_at", str)), SECRET_FORMAT, SECRET_VERSION, METHOD, "an X-Mark secret")
    if len(doc["classes"]) < 2 or not all(isinstance(c, str) for c in doc["classes"]):
        raise OwnerKitError(path, "classes", "must be a list of at least two class names")
    if not 0 <= doc["target_class"] < len(doc["classes"]):
        raise OwnerKitError(path, "target_class", f"must index classes (0..{len(doc['classes']) - 1}), "
                                                  f"got {doc['target_class']}")
    marker = doc["marker"]
    require_fields(marker, (("checkpoint", str), ("sha256", str), ("image_size", int)), path, "marker.")
    if marker["image_size"] < 8:
        raise OwnerKitError(path, "marker.image_size", f"must be >= 8 pixels, got {marker['image_size']}")
    ver = doc["verification"]
    require_fields(ver, (("split", str), ("ids", list), ("seed", int), ("data", Mapping)), path, "verification.")
    if len(ver["ids"]) < 2 or not all(isinstance(i, str) for i in ver["ids"]):
        raise OwnerKitError(path, "verification.ids", "must be a list of at least two image ids (strings)")
    require_data_config(ver, path)
    th = doc["thresholds"]
    require_fields(th, (("tau", (int, float)), ("alpha", (int, float))), path, "thresholds.")
    require_alpha(th, path)
    if not 0.0 <= th["tau"] < 1.0:
        raise OwnerKitError(path, "thresholds.tau", f"must be in [0, 1), got {th['tau']}")
    if doc["m"] != len(ver["ids"]):
        raise OwnerKitError(path, "m", f"must equal the number of verification.ids ({len(ver['ids'])}), got {doc['m']}")
    return dict(doc)


def secret_sha256(doc: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a whole secret document (what logs/reports carry)."""
    return document_sha256(doc)


def write_xmark_secret(path: str | os.PathLike, doc: Mapping[str, Any]) -> Path:
    """Validate and write ``secret.json`` readable by the owner only (0o600)."""
    validate_xmark_secret(doc, path)
    return write_json_secret(path, doc)


def read_xmark_secret(path: str | os.PathLike) -> dict:
    """Read and validate an X-Mark ``secret.json``.

    Raises:
        OwnerKitError: missing/unreadable file, invalid JSON, or a bad field (all named).
    """
    return validate_xmark_secret(read_json_document(path, "the owner kit's secret.json"), Path(path))


def marker_path(doc: Mapping[str, Any], secret_path: str | os.PathLike) -> Path:
    """The generator file named by ``marker.checkpoint``, resolved against the secret's folder."""
    p = Path(doc["marker"]["checkpoint"])
    return p if p.is_absolute() else Path(secret_path).parent / p


def folder_sha256(root: str | os.PathLike) -> str:
    """SHA-256 over a folder's sorted (relative path, file SHA-256) list: a released dataset's identity."""
    root = Path(root)
    h = hashlib.sha256(b"medmark-folder-v1")
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(file.relative_to(root).as_posix().encode("utf-8") + b"\0" + file_sha256(file).encode("ascii"))
    return h.hexdigest()


def build_xmark_certificate(
    owner_id: str, secret_doc: Mapping[str, Any], marker_sha256: str, dataset: Mapping[str, Any],
    created_at: str | None = None,
) -> dict:
    """An unsigned ownership claim for a released X-Mark dataset.

    Certificate envelope of :mod:`watermark.certificates` (no per-image entries) plus
    ``secret_sha256``, ``marker_sha256`` (the generator file) and ``dataset``
    (``{"layout", "files_sha256", "num_files"}`` of the released folder).
    """
    return {**certificate_envelope(owner_id, METHOD, secret_doc, created_at),
            "marker_sha256": str(marker_sha256), "dataset": plain(dict(dataset))}


def write_xmark_certificate(path: str | os.PathLike, cert: Mapping[str, Any], private_key) -> Path:
    """Sign ``cert`` with the owner's Ed25519 key (object, PEM bytes or file) and write it."""
    return sign_and_save_certificate(path, cert, private_key)
