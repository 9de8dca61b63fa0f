"""Authorised removal of a visible watermark: an encrypted, bit-exact restore record.

For each protected image the owner stores a *restore blob*: the exact residual
``original - protected`` on the mark's footprint, compressed and encrypted with
AES-256-GCM under a per-image key derived (HKDF-SHA256) from the owner's 32-byte
master key (METHODS.md section 3, "Authorised removal"). An authorised user with the
master key gets the original back bit for bit; anyone else -- or the right key with
the blob of another image, or an altered blob -- gets :class:`RestoreError` and no
pixels.

Blob layout (all integers little-endian)::

    b"MMRB" | version (1 byte) | nonce (12 random bytes) | AES-GCM ciphertext + 16-byte tag

The 5-byte header is authenticated too. Associated data binds the blob to one image::

    header | b"|" | utf-8 image id | b"|" | sha256_array(protected)

so a blob only opens for the very protected image (exact bytes, shape, dtype) and id it
was made for. The plaintext is ``zlib`` of::

    b"MMRS" | H u32 | W u32 | C u8 (0 = H x W image) | n u32
    | packbits(footprint, H*W bits, row-major) | residual int16[n, max(C,1)]

with ``n`` = number of footprint pixels, residuals in row-major footprint order.
Master keys live in files with mode 0o600 and are never printed or logged here.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from watermark.certificates import sha256_array, warn_if_exposed, write_secret_file

KEY_BYTES = 32
NONCE_BYTES = 12
BLOB_MAGIC = b"MMRB"
BLOB_VERSION = 1
_HEADER = BLOB_MAGIC + bytes([BLOB_VERSION])
_PLAIN_MAGIC = b"MMRS"
_PLAIN_HEAD = struct.Struct("<4sIIBI")
# Fixed, public HKDF salt: domain separation from any other use of the master key.
_HKDF_SALT = b"medmark/keyed-removal/hkdf-salt/v1"
_HKDF_INFO_PREFIX = b"medmark/keyed-removal/v1/image-id:"


class RestoreError(Exception):
    """Restoration refused: wrong key, blob for another image, altered or malformed blob."""


def generate_master_key() -> bytes:
    """A fresh random 32-byte master key (``os.urandom``)."""
    return os.urandom(KEY_BYTES)


def _check_key(master_key: bytes) -> bytes:
    if not isinstance(master_key, (bytes, bytearray)) or len(master_key) != KEY_BYTES:
        n = len(master_key) if isinstance(master_key, (bytes, bytearray)) else type(master_key).__name__
        raise ValueError(f"master_key must be {KEY_BYTES} bytes, got {n}")
    return bytes(master_key)


def derive_image_key(master_key: bytes, image_id: str) -> bytes:
    """Per-image 32-byte AES key: HKDF-SHA256(master, salt=fixed, info=version tag + image id)."""
    if not isinstance(image_id, str) or not image_id:
        raise ValueError("image_id must be a non-empty string")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=_HKDF_SALT,
                info=_HKDF_INFO_PREFIX + image_id.encode("utf-8"))
    return hkdf.derive(_check_key(master_key))


def save_master_key(path: str | os.PathLike, master_key: bytes, fmt: str = "hex") -> Path:
    """Write the master key with permissions 0o600, as 64 hex characters + newline or 32 raw bytes."""
    key = _check_key(master_key)
    if fmt == "hex":
        data = key.hex().encode("ascii") + b"\n"
    elif fmt == "raw":
        data = key
    else:
        raise ValueError(f"fmt must be 'hex' or 'raw', got {fmt!r}")
    return write_secret_file(path, data)


def load_master_key(path: str | os.PathLike) -> bytes:
    """Read a master key file written by :func:`save_master_key` (hex or raw, detected)."""
    warn_if_exposed(path)
    data = Path(path).read_bytes()
    text = data.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    if len(data) == KEY_BYTES:
        return data
    raise ValueError(f"{path} is not a master key file: expected {2 * KEY_BYTES} hex characters "
                     f"or {KEY_BYTES} raw bytes, got {len(data)} bytes")


def _aad(image_id: str, protected: np.ndarray) -> bytes:
    return _HEADER + b"|" + image_id.encode("utf-8") + b"|" + sha256_array(protected).encode("ascii")


def _check_image(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {a.dtype}")
    if a.ndim not in (2, 3) or (a.ndim == 3 and not 1 <= a.shape[2] <= 255):
        raise ValueError(f"{name} must be H x W or H x W x C, got shape {a.shape}")
    return a


def encrypt_residual(original, protected, footprint, master_key: bytes, image_id: str) -> bytes:
    """Encrypt the exact residual ``original - protected`` on the footprint.

    Args:
        original, protected: uint8 ``H x W x C`` or ``H x W``, same shape.
        footprint: bool ``H x W``; every pixel where the two differ must be inside it
            (otherwise ValueError -- a restore would not be exact).
        master_key: 32 bytes; image_id: the id the blob is bound to.

    Returns:
        The restore blob (see module docstring), safe to publish alongside the image.
    """
    original, protected = _check_image(original, "original"), _check_image(protected, "protected")
    if original.shape != protected.shape:
        raise ValueError(f"original {original.shape} and protected {protected.shape} differ in shape")
    fp = np.asarray(footprint).astype(bool)
    if fp.shape != original.shape[:2]:
        raise ValueError(f"footprint must be H x W = {original.shape[:2]}, got {fp.shape}")
    o3 = original.reshape(*original.shape[:2], -1).astype(np.int16)
    p3 = protected.reshape(*protected.shape[:2], -1).astype(np.int16)
    outside = (o3 != p3).any(axis=2) & ~fp
    if outside.any():
        raise ValueError(f"original and protected differ at {int(outside.sum())} pixels outside the footprint; "
                         f"pass the footprint of everything the protection changed")
    H, W = fp.shape
    C = original.shape[2] if original.ndim == 3 else 0
    residual = (o3 - p3)[fp]  # n x max(C, 1), row-major footprint order
    plain = (_PLAIN_HEAD.pack(_PLAIN_MAGIC, H, W, C, residual.shape[0])
             + np.packbits(fp.reshape(-1)).tobytes()
             + residual.astype("<i2").tobytes())
    nonce = os.urandom(NONCE_BYTES)
    key = derive_image_key(master_key, image_id)
    ct = AESGCM(key).encrypt(nonce, zlib.compress(plain, 9), _aad(image_id, protected))
    return _HEADER + nonce + ct


def restore(protected, blob: bytes, master_key: bytes, image_id: str) -> np.ndarray:
    """Recover the original image, bit-exact, from the protected image and its restore blob.

    Args:
        protected: uint8 ``H x W x C`` or ``H x W`` -- exactly the image the blob was made for.
        blob: from :func:`encrypt_residual`.
        master_key: the owner's 32-byte master key; image_id: the image's id.

    Returns:
        New uint8 array (the original); ``protected`` is not modified.

    Raises:
        RestoreError: wrong key, blob of another image/id, altered blob or image --
            no pixels are returned in any of these cases.
    """
    protected = _check_image(protected, "protected")
    if not isinstance(blob, (bytes, bytearray)):
        raise RestoreError(f"restore blob must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) < len(_HEADER) + NONCE_BYTES + 16 or blob[:4] != BLOB_MAGIC:
        raise RestoreError("not a medmark restore blob (bad magic or truncated)")
    if blob[4] != BLOB_VERSION:
        raise RestoreError(f"restore blob version {blob[4]} is not supported (expected {BLOB_VERSION})")
    nonce, ct = blob[5:5 + NONCE_BYTES], blob[5 + NONCE_BYTES:]
    key = derive_image_key(master_key, image_id)
    try:
        packed = AESGCM(key).decrypt(nonce, ct, _aad(image_id, protected))
    except InvalidTag:
        raise RestoreError("authentication failed: wrong key or data not for this image "
                           "(or the protected image / restore data was altered)") from None

    # Authenticated from here on; the checks below guard against a buggy writer only.
    try:
        plain = zlib.decompress(packed)
        magic, H, W, C, n = _PLAIN_HEAD.unpack_from(plain)
    except (zlib.error, struct.error) as e:
        raise RestoreError(f"restore record is corrupt: {e}") from None
    shape = (H, W, C) if C else (H, W)
    if magic != _PLAIN_MAGIC or shape != protected.shape:
        raise RestoreError(f"restore record is for an image of shape {shape}, got {protected.shape}")
    off, cc = _PLAIN_HEAD.size, max(C, 1)
    nbits = (H * W + 7) // 8
    if len(plain) != off + nbits + 2 * n * cc:
        raise RestoreError("restore record is inconsistent (length does not match its header)")
    fp = np.unpackbits(np.frombuffer(plain, np.uint8, nbits, off), count=H * W).astype(bool).reshape(H, W)
    residual = np.frombuffer(plain, "<i2", n * cc, off + nbits).reshape(n, cc)
    if int(fp.sum()) != n:
        raise RestoreError("restore record is inconsistent (footprint size does not match residuals)")
    out = protected.reshape(H, W, cc).astype(np.int16)
    out[fp] += residual
    if out.min() < 0 or out.max() > 255:
        raise RestoreError("restore record does not fit this image (values outside 0..255)")
    return out.astype(np.uint8).reshape(protected.shape)
