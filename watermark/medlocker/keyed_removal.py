"""Authorised removal of a visible watermark: an encrypted, bit-exact restore record.

For each protected image the owner stores a *restore blob*: the exact residual
``original - protected`` on the mark's footprint, compressed and encrypted with
AES-256-GCM under a per-image key derived (HKDF-SHA256) from the owner's 32-byte
master key (docs/medlocker.md, "How it works"). An authorised user with the
master key gets the original back bit for bit; anyone else -- or the right key with
the blob of another image, or an altered blob -- gets :class:`RestoreError` and no
pixels.

Blob layout (all integers little-endian)::

    b"MMRB" | version (1 byte) | nonce (12 random bytes) | AES-GCM ciphertext + 16-byte tag

The 5-byte header is authenticated too. Associated data binds the blob to one image and
(version 2) to the file it is restored to::

    v2: header | u32 len(id) | utf-8 image id | sha256_array(protected) (64 ascii hex)
        | u32 len(dest) | utf-8 destination
    v1: header | b"|" | utf-8 image id | b"|" | sha256_array(protected)      (read only)

so a blob only opens for the very protected image (exact bytes, shape, dtype), id and
destination it was made for. The destination is a relative POSIX path such as
``train_images/abc.png`` (:func:`check_relative_path`), or ``""``: then, as for every
version-1 blob, the image is restored to ``<id>.png`` (:func:`restore_destination`).
A restore never writes where unauthenticated text (``restore/index.json``, which is
published with the images) says: :func:`read_restore_index` refuses a hostile index
before anything is decrypted and :func:`write_confined` writes only below ``out=``.
The plaintext is ``zlib`` of::

    b"MMRS" | H u32 | W u32 | C u8 (0 = H x W image) | n u32
    | packbits(footprint, H*W bits, row-major) | residual int16[n, max(C,1)]

with ``n`` = number of footprint pixels, residuals in row-major footprint order.
Master keys live in files with mode 0o600 and are never printed or logged here.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass
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
BLOB_VERSION = 2
SUPPORTED_BLOB_VERSIONS = (1, 2)
_HEADER = BLOB_MAGIC + bytes([BLOB_VERSION])
_ID_LEN = struct.Struct("<I")
_PLAIN_MAGIC = b"MMRS"
_PLAIN_HEAD = struct.Struct("<4sIIBI")
# Fixed, public HKDF salt: domain separation from any other use of the master key.
_HKDF_SALT = b"medmark/keyed-removal/hkdf-salt/v1"
_HKDF_INFO_PREFIX = b"medmark/keyed-removal/v1/image-id:"


# Restore index / output confinement limits.
MAX_INDEX_BYTES = 64 * 2**20   # restore/index.json larger than this is refused unread
MAX_BLOB_BYTES = 256 * 2**20   # one .mmrb file
MAX_PATH_DEPTH = 16            # components of a destination path
# One path component: starts with a letter, digit or "_"; then letters, digits, space and
# ._()+,=@~- ; at most 128 characters; no "..", not ending in space or ".". Covers the
# datasets' own names ("1. Original Images/a. Training Set/IDRiD_01", "benign (1)").
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9 ._()+,=@~-]{0,127}")
_BLOB_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\.mmrb")


class RestoreError(Exception):
    """Restoration refused: wrong key, blob for another image, altered or malformed blob."""


class RestoreIndexError(ValueError):
    """A restore index or output tree that is refused before anything is decrypted or written.

    The message names the index file (or ``out=``) and the offending entry / field.
    """


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


def _aad(image_id: str, protected: np.ndarray, destination: str, header: bytes) -> bytes:
    digest = sha256_array(protected).encode("ascii")
    if header[4] == 1:  # legacy blobs: no destination bound (restored to <id>.png)
        return header + b"|" + image_id.encode("utf-8") + b"|" + digest
    ident, dest = image_id.encode("utf-8"), destination.encode("utf-8")
    return header + _ID_LEN.pack(len(ident)) + ident + digest + _ID_LEN.pack(len(dest)) + dest


def check_relative_path(text, what: str = "path") -> str:
    """``text`` if it is a safe relative POSIX path below an output folder, else ValueError.

    Safe: a str of 1..:data:`MAX_PATH_DEPTH` components joined by ``/``, each matching
    ``_COMPONENT`` (no ``..``, no ``.``, no empty component, no backslash, no drive, not
    absolute), at most 1024 characters. The message names ``what`` and the value.
    """
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    if not text or len(text) > 1024:
        raise ValueError(f"{what} must be 1..1024 characters, got {len(text)}")
    if text.startswith("/") or "\\" in text:
        raise ValueError(f"{what} {text!r} must be a relative path with '/' separators")
    parts = text.split("/")
    if len(parts) > MAX_PATH_DEPTH:
        raise ValueError(f"{what} {text!r} has more than {MAX_PATH_DEPTH} components")
    for part in parts:
        if ".." in part or not _COMPONENT.fullmatch(part) or part.endswith((" ", ".")):
            raise ValueError(f"{what} {text!r}: component {part!r} is not a safe file name "
                             f"(letters, digits, space, ._()+,=@~- ; no '..')")
    return text


def restore_destination(image_id: str, destination: str, version: int) -> str:
    """The relative file a blob of ``version`` restores to: its bound ``destination``
    (version 2, non-empty), else ``<image_id>.png``. Validated (:func:`check_relative_path`)."""
    if version >= 2 and destination:
        dest = check_relative_path(destination, "destination")
        if not dest.endswith(".png"):
            raise ValueError(f"destination {dest!r} must end in .png (restored images are lossless PNG)")
        return dest
    return check_relative_path(image_id, "image id") + ".png"


def blob_version(blob: bytes) -> int:
    """Version byte of a restore blob (read without decrypting); RestoreError if not a blob."""
    if not isinstance(blob, (bytes, bytearray)):
        raise RestoreError(f"restore blob must be bytes, got {type(blob).__name__}")
    if len(blob) < len(_HEADER) + NONCE_BYTES + 16 or bytes(blob[:4]) != BLOB_MAGIC:
        raise RestoreError("not a medmark restore blob (bad magic or truncated)")
    if blob[4] not in SUPPORTED_BLOB_VERSIONS:
        raise RestoreError(f"restore blob version {blob[4]} is not supported (expected {SUPPORTED_BLOB_VERSIONS})")
    return int(blob[4])


def _check_image(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {a.dtype}")
    if a.ndim not in (2, 3) or (a.ndim == 3 and not 1 <= a.shape[2] <= 255):
        raise ValueError(f"{name} must be H x W or H x W x C, got shape {a.shape}")
    return a


def encrypt_residual(original, protected, footprint, master_key: bytes, image_id: str,
                     destination: str = "") -> bytes:
    """Encrypt the exact residual ``original - protected`` on the footprint.

    Args:
        original, protected: uint8 ``H x W x C`` or ``H x W``, same shape.
        footprint: bool ``H x W``; every pixel where the two differ must be inside it
            (otherwise ValueError -- a restore would not be exact).
        master_key: 32 bytes; image_id: the id the blob is bound to.
        destination: the relative ``.png`` path (below ``out=``) the image is restored to,
            bound into the associated data; ``""`` = ``<image_id>.png``. ValueError if it or
            the id is not a safe relative path (:func:`check_relative_path`).

    Returns:
        The restore blob (see module docstring), safe to publish alongside the image.
    """
    original, protected = _check_image(original, "original"), _check_image(protected, "protected")
    check_relative_path(image_id, "image id")  # a restore refuses other ids: fail here, not there
    if destination:
        restore_destination(image_id, destination, BLOB_VERSION)
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
    ct = AESGCM(key).encrypt(nonce, zlib.compress(plain, 9), _aad(image_id, protected, destination, _HEADER))
    return _HEADER + nonce + ct


def restore(protected, blob: bytes, master_key: bytes, image_id: str, destination: str = "") -> np.ndarray:
    """Recover the original image, bit-exact, from the protected image and its restore blob.

    Args:
        protected: uint8 ``H x W x C`` or ``H x W`` -- exactly the image the blob was made for.
        blob: from :func:`encrypt_residual`.
        master_key: the owner's 32-byte master key; image_id: the image's id.
        destination: the destination the blob must be bound to (version 2; ignored by
            version-1 blobs, which restore to ``<image_id>.png`` only).

    Returns:
        New uint8 array (the original); ``protected`` is not modified.

    Raises:
        RestoreError: wrong key, blob of another image/id, altered blob or image --
            no pixels are returned in any of these cases.
    """
    protected = _check_image(protected, "protected")
    blob_version(blob)
    blob = bytes(blob)
    if not isinstance(destination, str):
        raise RestoreError(f"destination must be a string, got {type(destination).__name__}")
    nonce, ct = blob[5:5 + NONCE_BYTES], blob[5 + NONCE_BYTES:]
    key = derive_image_key(master_key, image_id)
    try:
        packed = AESGCM(key).decrypt(nonce, ct, _aad(image_id, protected, destination, blob[:5]))
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


# ------------------------------------------------------------------ restore index, confined output


@dataclass(frozen=True)
class IndexEntry:
    """One entry of ``restore/index.json`` (structure-checked; NOT authenticated).

    ``image_id``: the id (a safe relative path, :func:`check_relative_path`);
    ``restore_file``: the blob's file name in the restore folder (one component, ``*.mmrb``);
    ``protected``: the protected image's relative ``.png`` path in ``images=`` -- for
    version-2 blobs also the claimed destination, which decryption then authenticates.
    """

    image_id: str
    restore_file: str
    protected: str


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise RestoreIndexError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def read_json_capped(path: str | os.PathLike, max_bytes: int = MAX_INDEX_BYTES):
    """Parse a JSON file defensively: a regular file (not a symlink), at most ``max_bytes``,
    strict UTF-8, no duplicate object keys. RestoreIndexError names the file otherwise."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except OSError as err:
        raise RestoreIndexError(f"{path}: unreadable ({type(err).__name__})") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise RestoreIndexError(f"{path}: must be a regular file (not a symlink or special file)")
    if st.st_size > max_bytes:
        raise RestoreIndexError(f"{path}: {st.st_size} bytes, more than the {max_bytes}-byte limit")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise RestoreIndexError(f"{path}: more than the {max_bytes}-byte limit")
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as err:
        raise RestoreIndexError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise RestoreIndexError(f"{path}: not valid JSON (line {err.lineno} column {err.colno}: {err.msg})") from None
    except RestoreIndexError as err:
        raise RestoreIndexError(f"{path}: {err}") from None
    except RecursionError:
        raise RestoreIndexError(f"{path}: JSON nested too deeply") from None


def read_restore_index(path: str | os.PathLike, allowed_ids: set[str] | None = None) -> list[IndexEntry]:
    """Read and structure-check ``restore/index.json`` (``{image id: {"restore": file,
    "protected": relative path}}``) before anything is decrypted.

    Refused (RestoreIndexError naming the file and the entry): oversized / non-UTF-8 /
    malformed JSON, duplicate keys, a non-object, no entries, an id that is not a safe
    relative path or not in ``allowed_ids`` (the owner's secret), a missing or non-string
    field, a restore file name that is not one ``*.mmrb`` component, a protected path that
    is not a safe relative ``.png`` path, two ids sharing one restore file.
    """
    path = Path(path)
    doc = read_json_capped(path)
    if not isinstance(doc, dict):
        raise RestoreIndexError(f"{path}: must be a JSON object {{image id: entry}}, got {type(doc).__name__}")
    if not doc:
        raise RestoreIndexError(f"{path}: no entries")
    entries, blobs = [], {}
    for image_id, item in sorted(doc.items()):
        where = f"{path}: entry {image_id!r}"
        try:
            check_relative_path(image_id, "image id")
        except ValueError as err:
            raise RestoreIndexError(f"{where}: {err}") from None
        if allowed_ids is not None and image_id not in allowed_ids:
            raise RestoreIndexError(f"{where}: id is not one of the owner's protected ids (secret's field 'ids')")
        if not isinstance(item, dict):
            raise RestoreIndexError(f"{where}: must be an object, got {type(item).__name__}")
        for field in ("restore", "protected"):
            if field not in item:
                raise RestoreIndexError(f"{where}: field '{field}' is missing")
            if not isinstance(item[field], str):
                raise RestoreIndexError(f"{where}: field '{field}' must be a string, got {type(item[field]).__name__}")
        if not _BLOB_NAME.fullmatch(item["restore"]) or ".." in item["restore"]:
            raise RestoreIndexError(f"{where}: field 'restore' {item['restore']!r} must be one file name ending "
                                    f".mmrb (no separators, no '..')")
        if item["protected"]:
            try:
                restore_destination(image_id, item["protected"], BLOB_VERSION)
            except ValueError as err:
                raise RestoreIndexError(f"{where}: field 'protected': {err}") from None
        if item["restore"].casefold() in blobs:
            raise RestoreIndexError(f"{where}: field 'restore' {item['restore']!r} is also the restore file of "
                                    f"{blobs[item['restore'].casefold()]!r}")
        blobs[item["restore"].casefold()] = image_id
        entries.append(IndexEntry(image_id, item["restore"], item["protected"]))
    return entries


def check_destinations(destinations: dict[str, str], where: str) -> None:
    """Refuse two ids restored to one file (also up to case) or a file that another
    destination needs as a folder. ``destinations``: image id -> relative path."""
    files: dict[str, str] = {}
    for image_id, dest in destinations.items():
        key = dest.casefold()
        if key in files:
            raise RestoreIndexError(f"{where}: entries {files[key]!r} and {image_id!r} restore to the same file "
                                    f"{dest!r} (compared case-insensitively)")
        files[key] = image_id
    for image_id, dest in destinations.items():
        parts = dest.casefold().split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder in files:
                raise RestoreIndexError(f"{where}: entry {image_id!r} needs {folder!r} as a folder, but entry "
                                        f"{files[folder]!r} restores to that file")


def check_output_path(out: str | os.PathLike, rel: str) -> None:
    """Refuse writing ``out/rel`` when any existing part of it below ``out`` is a symlink
    or not a folder, or the destination exists as a symlink or non-regular file."""
    check_relative_path(rel, "destination")
    node = Path(out)
    parts = rel.split("/")
    for i, part in enumerate(parts):
        node = node / part
        try:
            st = os.lstat(node)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise RestoreIndexError(f"out={out}: {node} is a symlink; refusing to write through it")
        last = i == len(parts) - 1
        if last and not stat.S_ISREG(st.st_mode):
            raise RestoreIndexError(f"out={out}: {node} exists and is not a regular file")
        if not last and not stat.S_ISDIR(st.st_mode):
            raise RestoreIndexError(f"out={out}: {node} exists and is not a folder")


def write_confined(out: str | os.PathLike, rel: str, data: bytes) -> Path:
    """Write ``data`` to ``out/rel`` atomically (temp file + ``os.replace``), never leaving
    ``out``: ``rel`` is re-checked, folders are created and opened one by one with
    ``O_NOFOLLOW`` relative to their parent, and the final rename replaces a name in that
    folder (a symlink planted there is replaced, not followed). Returns the path."""
    check_relative_path(rel, "destination")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    *folders, name = rel.split("/")
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    dir_flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | nofollow
    # os.replace uses renameat like os.rename (os.supports_dir_fd lists only the latter)
    if not {os.open, os.mkdir, os.stat, os.rename} <= os.supports_dir_fd:  # pragma: no cover (non-POSIX)
        check_output_path(out, rel)
        target = out.joinpath(*folders, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
        return target
    dfd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for part in folders:
            try:
                os.mkdir(part, 0o755, dir_fd=dfd)
            except FileExistsError:
                pass
            try:
                nfd = os.open(part, dir_flags, dir_fd=dfd)
            except OSError:
                raise RestoreIndexError(f"out={out}: {part!r} in {rel!r} is a symlink or not a folder") from None
            os.close(dfd)
            dfd = nfd
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise RestoreIndexError(f"out={out}: {rel!r} exists and is a symlink or not a regular file")
        except FileNotFoundError:
            pass
        tmp = f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow, 0o644, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
    finally:
        os.close(dfd)
    return out.joinpath(*folders, name)
