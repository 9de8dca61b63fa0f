"""Signed per-image certificates for visible watermarks (MedLocker / MIAD-MARK).

A certificate is a JSON object:

.. code-block:: text

    {"format": "medmark-image-certificate", "version": 1,
     "owner_id": str, "method": str, "created_at": ISO-8601 UTC str,
     "entries": [ {image_id, original_sha256, protected_sha256, logo_sha256,
                   x, y, alpha, scale, delta_sha256 | null, threshold | null,
                   [delta_scope: "footprint" (default) | "image"],
                   [polarity: "dark" (default) | "light"], ...}, ...],
     "signature": base64(Ed25519 signature)}

The signature covers :func:`canonical_bytes` -- the certificate without its
``signature`` field, serialised as JSON with sorted keys, ``(",", ":")`` separators,
ASCII only, NaN/Infinity rejected -- so pretty-printing or key order in the stored
file never matters, while any change to a value does.

Ownership of one image is shown when (1) :func:`verify_certificate` accepts the
signature under the owner's public key and (2) :func:`rerender_check` finds that
the entry's parameters turn the original into the stored protected image *bit for
bit*. Protected images are stored as uint8 PNG (lossless) produced by
:func:`watermark.medlocker.logo.render_protected` (float64 numpy, round half up to uint8);
``rerender_check`` re-runs exactly that renderer.

Private keys are PKCS#8 PEM (optionally password-encrypted) written with mode 0o600;
they are never printed or logged by this module.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import os
import re
import stat
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from watermark.medlocker.logo import POLARITIES, render_protected

CERT_FORMAT = "medmark-image-certificate"
CERT_VERSION = 1
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class CertificateFormatError(ValueError):
    """A certificate (or an entry of it) is structurally malformed; the message names the field."""


# -------------------------------------------------------------------------------- keys


def generate_owner_keys(password: bytes | None = None) -> tuple[bytes, bytes]:
    """New Ed25519 owner key pair as ``(private_pem, public_pem)``.

    The private key is PKCS#8 PEM, encrypted with ``password`` when one is given; the
    public key is SubjectPublicKeyInfo PEM (safe to publish).
    """
    key = Ed25519PrivateKey.generate()
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem, public_pem


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> Path:
    """Write ``data`` to ``path`` atomically: a reader sees the old file or the new one, never a part.

    The bytes go to a temporary file in the same folder, created with ``mode`` from the start
    (``os.open(..., O_CREAT | O_EXCL, mode)``: a private file is never readable by others, not even
    for an instant), flushed and fsynced; ``os.replace`` then puts it in place and the folder is
    fsynced so the rename survives a crash. If anything fails, the old file is left untouched and
    the temporary file removed.

    Args:
        path: destination file; its folder is created if missing.
        data: the complete new contents.
        mode: permission bits of the new file (0o600 for secrets, 0o644 for files meant to be shared).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.tmp-{os.getpid()}-{os.urandom(6).hex()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits of a shared file's mode; never adds any to 0o600
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(p.parent, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the rename is still atomic
        return p
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return p


def write_secret_file(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` readable by the owner only (0o600), atomically replacing any old file.

    The file is created with 0o600 from the start (no window in which it is world
    readable); an old file with wider permissions is replaced, not reused (:func:`atomic_write`).
    """
    return atomic_write(path, data, 0o600)


def warn_if_exposed(path: str | os.PathLike) -> None:
    """Warn (without reading the secret) when a secret file is readable by group/others."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        warnings.warn(f"secret file {path} has permissions {oct(mode)}; run `chmod 600 {path}`", stacklevel=3)


def save_private_key(path: str | os.PathLike, private_pem: bytes) -> Path:
    """Save a private-key PEM with permissions 0o600."""
    return write_secret_file(path, private_pem)


def save_public_key(path: str | os.PathLike, public_pem: bytes) -> Path:
    """Save a public-key PEM (0o644: it is meant to be shared)."""
    return atomic_write(path, public_pem, 0o644)


def load_private_key(source: str | os.PathLike | bytes | Ed25519PrivateKey,
                     password: bytes | None = None) -> Ed25519PrivateKey:
    """Ed25519 private key from a key object, PEM bytes, or a PEM file path."""
    if isinstance(source, Ed25519PrivateKey):
        return source
    if isinstance(source, (bytes, bytearray)):
        pem = bytes(source)
    else:
        warn_if_exposed(source)
        pem = Path(source).read_bytes()
    try:
        key = serialization.load_pem_private_key(pem, password=password)
    except (ValueError, TypeError) as e:
        # Do not echo the PEM; say what is wrong.
        raise ValueError(f"could not load the private key (not PEM, wrong password, or corrupted): "
                         f"{type(e).__name__}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"private key must be Ed25519, got {type(key).__name__}")
    return key


def owner_signing_key(owner_dir: str | os.PathLike, private_key: str | os.PathLike | None = None,
                      field: str = "private_key", public_name: str = "owner_public_key.pem"
                      ) -> tuple[Ed25519PrivateKey, Path, Path]:
    """The owner's Ed25519 signing key for an owner kit: loaded, or created once and kept.

    ``private_key`` given: that PEM file (it must exist). Otherwise ``<owner_dir>/owner_private_key.pem``
    is reused when present (a re-run keeps its identity) or created (0o600). The public key is
    (re)written to ``<owner_dir>/<public_name>`` so verifiers find it beside the kit.

    Returns:
        ``(key, private_path, public_path)``.
    Raises:
        FileNotFoundError: ``private_key`` names a missing file (message names ``field``).
    """
    owner_dir = Path(owner_dir)
    private_path = Path(private_key) if private_key else owner_dir / "owner_private_key.pem"
    if private_path.is_file():
        key = load_private_key(private_path)
    elif private_key:
        raise FileNotFoundError(f"{field}: {private_path} does not exist")
    else:
        private_pem, _public_pem = generate_owner_keys()
        save_private_key(private_path, private_pem)
        key = load_private_key(private_pem)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    public_path = save_public_key(owner_dir / public_name, public_pem)
    return key, private_path, public_path


def load_public_key(source: str | os.PathLike | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    """Ed25519 public key from a key object, PEM bytes, or a PEM file path."""
    if isinstance(source, Ed25519PublicKey):
        return source
    pem = bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as e:
        raise ValueError(f"could not load the public key (not a PEM public key): {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"public key must be Ed25519, got {type(key).__name__}")
    return key


# ------------------------------------------------------------------------------ hashes


def sha256_array(arr) -> str:
    """SHA-256 (hex) of an array's exact content: dtype, shape and C-order bytes.

    Two arrays hash equal iff they have the same dtype (including byte order), shape
    and bytes -- so a uint8 image and the same values as float32 hash differently,
    as do a 1 x 64 and a 64 x 1 array. Torch tensors are hashed via ``.cpu().numpy()``.
    """
    if hasattr(arr, "detach"):
        arr = arr.detach().cpu().numpy()
    a = np.ascontiguousarray(np.asarray(arr))
    if a.dtype == object:
        raise ValueError("sha256_array needs a numeric array, got dtype=object")
    h = hashlib.sha256()
    h.update(f"medmark-array-v1|{a.dtype.str}|{','.join(map(str, a.shape))}|".encode("ascii"))
    h.update(a.tobytes(order="C"))
    return h.hexdigest()


# ------------------------------------------------------------------------ certificates

# field -> (allowed JSON types, may be None)
ENTRY_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "image_id": ((str,), False),
    "original_sha256": ((str,), False),
    "protected_sha256": ((str,), False),
    "logo_sha256": ((str,), False),
    "x": ((int,), False),
    "y": ((int,), False),
    "alpha": ((float, int), False),
    "scale": ((float, int), False),
    "delta_sha256": ((str,), True),
    "threshold": ((int, float), True),
}
DELTA_SCOPES = ("footprint", "image")
_HASH_FIELDS = ("original_sha256", "protected_sha256", "logo_sha256", "delta_sha256")
_TOP_SCHEMA: dict[str, type] = {"format": str, "version": int, "owner_id": str, "method": str,
                                "created_at": str, "entries": list}


def _check_entry(entry: Any, where: str) -> None:
    """Structural check of one entry (presence and JSON types); raises CertificateFormatError."""
    if not isinstance(entry, dict):
        raise CertificateFormatError(f"{where} must be an object, got {type(entry).__name__}")
    for field, (types, nullable) in ENTRY_SCHEMA.items():
        if field not in entry:
            raise CertificateFormatError(f"{where}.{field} is missing")
        v = entry[field]
        if v is None and nullable:
            continue
        if isinstance(v, bool) or not isinstance(v, types):
            raise CertificateFormatError(f"{where}.{field} must be {' or '.join(t.__name__ for t in types)}"
                                         f"{' or null' if nullable else ''}, got {type(v).__name__}")
    for field in _HASH_FIELDS:
        v = entry[field]
        if v is not None and not _HEX64.match(v):
            raise CertificateFormatError(f"{where}.{field} must be 64 lowercase hex characters (SHA-256)")
    # optional: where δ was added -- the mark's footprint (default) or the whole image (MIAD-MARK's
    # δ-only fallback when no mark fits; δ is zero on the lesion region). Signed like every field.
    if entry.get("delta_scope", "footprint") not in DELTA_SCOPES:
        raise CertificateFormatError(f"{where}.delta_scope must be one of {DELTA_SCOPES}, got "
                                     f"{entry.get('delta_scope')!r}")
    # optional: the mark's polarity -- the logo as is (dark, default) or its colours inverted (light)
    if entry.get("polarity", "dark") not in POLARITIES:
        raise CertificateFormatError(f"{where}.polarity must be one of {POLARITIES}, got {entry.get('polarity')!r}")


def _check_certificate(cert: Any, need_signature: bool) -> None:
    if not isinstance(cert, dict):
        raise CertificateFormatError(f"certificate must be a JSON object, got {type(cert).__name__}")
    for field, t in _TOP_SCHEMA.items():
        if field not in cert:
            raise CertificateFormatError(f"certificate field '{field}' is missing")
        if isinstance(cert[field], bool) or not isinstance(cert[field], t):
            raise CertificateFormatError(f"certificate field '{field}' must be {t.__name__}, "
                                         f"got {type(cert[field]).__name__}")
    if cert["format"] != CERT_FORMAT:
        raise CertificateFormatError(f"certificate field 'format' must be {CERT_FORMAT!r}, got {cert['format']!r}")
    if cert["version"] != CERT_VERSION:
        raise CertificateFormatError(f"certificate field 'version' {cert['version']} is not supported "
                                     f"(this code reads version {CERT_VERSION})")
    for i, e in enumerate(cert["entries"]):
        _check_entry(e, f"entries[{i}]")
    if need_signature:
        if "signature" not in cert:
            raise CertificateFormatError("certificate field 'signature' is missing (unsigned certificate)")
        if not isinstance(cert["signature"], str):
            raise CertificateFormatError(f"certificate field 'signature' must be a base64 string, "
                                         f"got {type(cert['signature']).__name__}")


def _normalise_entry(entry: dict, i: int) -> dict:
    e = dict(entry)
    for f in ("x", "y"):
        v = e.get(f)
        if isinstance(v, (np.integer, float, np.floating)) and not isinstance(v, bool) and float(v) == int(v):
            e[f] = int(v)
    for f in ("alpha", "scale"):
        v = e.get(f)
        if isinstance(v, (int, np.integer, np.floating)) and not isinstance(v, bool):
            e[f] = float(v)
    if isinstance(e.get("threshold"), (np.integer, np.floating)):
        e["threshold"] = e["threshold"].item()
    _check_entry(e, f"entries[{i}]")
    if not 0.0 <= e["alpha"] <= 1.0:
        raise CertificateFormatError(f"entries[{i}].alpha must be in [0, 1], got {e['alpha']}")
    if not e["scale"] > 0:
        raise CertificateFormatError(f"entries[{i}].scale must be > 0, got {e['scale']}")
    return e


def build_certificate(owner_id: str, entries: list[dict], method: str, created_at: str | None = None) -> dict:
    """Assemble an (unsigned) certificate from per-image parameter records.

    Args:
        owner_id: the claimant (person, lab, institution).
        entries: one dict per protected image with at least the fields of
            :data:`ENTRY_SCHEMA` (extra JSON-serialisable fields are kept and signed).
            Numpy scalars are converted; ``x, y`` must be integers, ``alpha`` in [0, 1],
            ``scale > 0``, hashes from :func:`sha256_array`.
        method: e.g. ``"medlocker"`` or ``"miadmark"``.
        created_at: ISO-8601 timestamp; default: now, UTC, seconds.

    Returns:
        Certificate dict (see module docstring) without ``signature``.
    """
    if not isinstance(owner_id, str) or not owner_id:
        raise CertificateFormatError("owner_id must be a non-empty string")
    if not isinstance(method, str) or not method:
        raise CertificateFormatError("method must be a non-empty string")
    norm = [_normalise_entry(e, i) for i, e in enumerate(entries)]
    ids = [e["image_id"] for e in norm]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise CertificateFormatError(f"entries have duplicate image_id values: {dup[:5]}")
    cert = {
        "format": CERT_FORMAT,
        "version": CERT_VERSION,
        "owner_id": owner_id,
        "method": method,
        "created_at": created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "entries": norm,
    }
    canonical_bytes(cert)  # fail now, not at signing time, on non-JSON extras or NaN
    return cert


def canonical_bytes(cert: dict) -> bytes:
    """The signed byte string: JSON of ``cert`` minus ``signature``, sorted keys, compact, ASCII."""
    body = {k: v for k, v in cert.items() if k != "signature"}
    try:
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as e:
        raise CertificateFormatError(f"certificate is not plain JSON (numbers must be finite): {e}") from None


def sign_certificate(cert: dict, private_key) -> dict:
    """Return a copy of ``cert`` with ``signature`` = base64(Ed25519 over :func:`canonical_bytes`).

    ``private_key``: an ``Ed25519PrivateKey``, PEM bytes, or a PEM file path. An existing
    signature is replaced.
    """
    _check_certificate(cert, need_signature=False)
    key = load_private_key(private_key)
    signed = copy.deepcopy({k: v for k, v in cert.items() if k != "signature"})
    signed["signature"] = base64.b64encode(key.sign(canonical_bytes(signed))).decode("ascii")
    return signed


def verify_certificate(cert: dict, public_key) -> bool:
    """True iff ``cert`` carries a valid Ed25519 signature by ``public_key`` over its content.

    Returns False -- never raises -- for a signature that does not verify: any changed
    field, a signature by another key, an altered or non-canonical base64 signature.
    Raises :class:`CertificateFormatError` (naming the field) only for malformed input:
    not an object, a missing field, a field of the wrong JSON type, an unsupported
    format/version, or a signature that is not base64 at all.
    """
    _check_certificate(cert, need_signature=True)
    key = load_public_key(public_key)
    sig_text = cert["signature"]
    try:
        sig = base64.b64decode(sig_text, validate=True)
    except (binascii.Error, ValueError):
        raise CertificateFormatError("certificate field 'signature' is not valid base64") from None
    # base64 has slack bits in its last character: insist on the canonical encoding so
    # that every change to the stored text counts as a change.
    if base64.b64encode(sig).decode("ascii") != sig_text:
        return False
    try:
        key.verify(sig, canonical_bytes(cert))
    except InvalidSignature:
        return False
    return True


def save_certificate(path: str | os.PathLike, cert: dict) -> Path:
    """Write a certificate as indented JSON (the signature does not depend on formatting), atomically, 0o644."""
    return atomic_write(path, (json.dumps(cert, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8"), 0o644)


MAX_CERTIFICATE_BYTES = 64 << 20  # 64 MiB: far above a 100k-image certificate file


def load_certificate(path: str | os.PathLike) -> dict:
    """Read a certificate JSON file; a file that is not JSON raises CertificateFormatError naming it."""
    path = Path(path)
    # certificates are published and pass through the accused party: bound what is read
    if path.stat().st_size > MAX_CERTIFICATE_BYTES:
        raise CertificateFormatError(f"{path} is larger than {MAX_CERTIFICATE_BYTES} bytes; refusing to read it")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CertificateFormatError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise CertificateFormatError(f"{path}: a certificate is a JSON object, got {type(doc).__name__}")
    return doc


# --------------------------------------------------------------------------- rerender


def rerender_check(entry: dict, original, protected, logo, delta=None) -> bool:
    """True iff the entry's parameters reproduce ``protected`` from ``original`` bit for bit.

    Checks, in order (False at the first mismatch):

    1. ``sha256_array`` of ``original``, ``protected``, ``logo`` (and ``delta``; an entry
       with ``delta_sha256 = None`` requires ``delta is None``) equal the entry's hashes;
    2. :func:`watermark.medlocker.logo.render_protected` ``(original, logo, x, y, alpha, scale,
       delta, delta_scope, polarity)`` -- float64 numpy, delta on the footprint only, clip, ``floor(v*255+0.5)``
       to uint8 -- equals ``protected`` exactly.

    Args:
        entry: one certificate entry (structure-checked; malformed raises).
        original, protected: uint8 ``H x W x C`` or ``H x W`` arrays as stored (PNG).
        logo: the RGBA logo asset (``h x w x 4`` float in [0, 1]) whose hash is certified.
        delta: MIAD-MARK's perturbation (same shape as the image), or None.
    """
    _check_entry(entry, "entry")
    original, protected = np.asarray(original), np.asarray(protected)
    if sha256_array(original) != entry["original_sha256"]:
        return False
    if sha256_array(protected) != entry["protected_sha256"]:
        return False
    if sha256_array(logo) != entry["logo_sha256"]:
        return False
    if (delta is None) != (entry["delta_sha256"] is None):
        return False
    if delta is not None and sha256_array(delta) != entry["delta_sha256"]:
        return False
    if original.dtype != np.uint8 or protected.dtype != np.uint8 or original.shape != protected.shape:
        return False
    try:
        rendered = render_protected(original, logo, entry["x"], entry["y"], entry["alpha"], entry["scale"], delta,
                                    delta_scope=entry.get("delta_scope", "footprint"),
                                    polarity=entry.get("polarity", "dark"))
    except ValueError:
        return False  # e.g. out-of-range alpha or mis-shaped delta: the parameters cannot render it
    return bool(np.array_equal(rendered, protected))
