"""What every method's owner kit shares: hashes, field checks, ``secret.json`` and certificate I/O.

An owner kit (``owner/secret.json`` + the signed ``owner/certificate.json``) is a JSON document
checked field by field; every reader raises :class:`OwnerKitError` naming the file and the
field at fault. The method-specific fields live in :mod:`watermark.stealthmark.kit` and
:mod:`watermark.xmark.kit`; this module holds what they both do:

* hashes -- :func:`canonical_json` (the bytes hashes are taken over), :func:`file_sha256`,
  :func:`document_sha256` (a whole secret document);
* checks -- :func:`require_type`, :func:`require_fields`, :func:`check_header` (``format``,
  ``version``, ``method``), :func:`require_data_config`, :func:`require_alpha`;
* I/O -- :func:`read_json_document`, :func:`write_json_secret` (0o600, atomic),
  :func:`certificate_envelope`, :func:`sign_and_save_certificate`.

Framework-free: no Lightning, nothing of the project outside :mod:`watermark`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from watermark import certificates

PathLike = str | os.PathLike


class OwnerKitError(ValueError):
    """A malformed owner-kit file; the message names the file and the field."""

    def __init__(self, path: PathLike | None, field: str | None, problem: str):
        self.path = None if path is None else str(path)
        self.field = field
        self.problem = problem
        where = self.path or "owner kit"
        message = f"{where}: field '{field}': {problem}" if field else f"{where}: {problem}"
        super().__init__(message)


# ----------------------------------------------------------------------------- hashes


def canonical_json(obj: Any) -> bytes:
    """Sorted-key, compact, ASCII JSON (NaN rejected): the bytes every hash here is taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def plain(value: Any) -> Any:
    """Numpy scalars / tuples -> JSON types (configs hand over tuples and numpy numbers)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def file_sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 (64 hex characters) of a file's bytes, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def document_sha256(doc: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a whole secret document (what logs/reports/certificates carry)."""
    return hashlib.sha256(canonical_json(plain(dict(doc)))).hexdigest()


# ----------------------------------------------------------------------------- checks


def require_type(value: Any, name: str, types: type | tuple[type, ...], path: PathLike | None) -> None:
    """Type check with JSON-friendly naming; ``bool`` never passes for a number."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        names = " or ".join("object" if t is Mapping else t.__name__ for t in types)
        raise OwnerKitError(path, name, f"must be {names}, got {type(value).__name__}")


def require_fields(section: Mapping[str, Any], fields: Sequence[tuple[str, type | tuple[type, ...]]],
                   path: PathLike | None, prefix: str = "") -> None:
    """Every ``(name, types)`` of ``fields`` is present in ``section`` with that type (``prefix`` names the section)."""
    for name, types in fields:
        if name not in section:
            raise OwnerKitError(path, f"{prefix}{name}", "is missing")
        require_type(section[name], f"{prefix}{name}", types, path)


def check_header(doc: Any, path: PathLike | None, fields: Sequence[tuple[str, type | tuple[type, ...]]],
                 format_name: str, version: int, method: str, what: str) -> None:
    """A JSON object with the top-level ``fields``, and the expected ``format``/``version``/``method``.

    ``what`` names the document in the format error (e.g. ``"an X-Mark secret"``).
    """
    if not isinstance(doc, Mapping):
        raise OwnerKitError(path, None, f"must contain a JSON object, got {type(doc).__name__}")
    require_fields(doc, fields, path)
    if doc["format"] != format_name:
        raise OwnerKitError(path, "format", f"must be {format_name!r} (not {what}?), got {doc['format']!r}")
    if doc["version"] != version:
        raise OwnerKitError(path, "version", f"{doc['version']} is not supported (this code reads {version})")
    if doc["method"] != method:
        raise OwnerKitError(path, "method", f"must be {method!r}, got {doc['method']!r}")


def require_data_config(verification: Mapping[str, Any], path: PathLike | None) -> None:
    """``verification.data`` is a data-module config (has ``_target_``)."""
    if "_target_" not in verification["data"]:
        raise OwnerKitError(path, "verification.data._target_", "is missing (a data-module config is expected)")


def require_alpha(thresholds: Mapping[str, Any], path: PathLike | None) -> None:
    """``thresholds.alpha`` (already type-checked) is a significance level in (0, 1)."""
    if not 0.0 < thresholds["alpha"] < 1.0:
        raise OwnerKitError(path, "thresholds.alpha", f"must be in (0, 1), got {thresholds['alpha']}")


# ----------------------------------------------------------------------------- I/O


def read_json_document(path: PathLike, expected: str) -> Any:
    """The parsed JSON of an owner-kit file (not yet validated).

    Raises:
        OwnerKitError: missing (``expected`` says which file was expected), unreadable or invalid JSON.
    """
    p = Path(path)
    if not p.is_file():
        raise OwnerKitError(p, None, f"file not found (expected {expected})")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise OwnerKitError(p, None, f"unreadable ({type(err).__name__}: {err})") from None
    except json.JSONDecodeError as err:
        raise OwnerKitError(p, None, f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None


def write_json_secret(path: PathLike, doc: Mapping[str, Any]) -> Path:
    """Write an (already validated) secret document, readable by the owner only (0o600, atomic)."""
    data = (json.dumps(plain(dict(doc)), indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    return certificates.write_secret_file(path, data)


def certificate_envelope(owner_id: str, method: str, secret_doc: Mapping[str, Any],
                         created_at: str | None = None) -> dict:
    """The unsigned certificate fields every method shares (no per-image ``entries``).

    Raises:
        OwnerKitError: ``owner_id`` is not a non-empty string.
    """
    if not isinstance(owner_id, str) or not owner_id:
        raise OwnerKitError(None, "owner_id", "must be a non-empty string")
    return {
        "format": certificates.CERT_FORMAT,
        "version": certificates.CERT_VERSION,
        "owner_id": owner_id,
        "method": method,
        "created_at": created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "entries": [],
        "secret_sha256": document_sha256(secret_doc),
    }


def sign_and_save_certificate(path: PathLike, cert: Mapping[str, Any], private_key) -> Path:
    """Sign ``cert`` with the owner's Ed25519 key (object, PEM bytes or file) and write it."""
    signed = certificates.sign_certificate(dict(cert), private_key)
    return certificates.save_certificate(path, signed)
