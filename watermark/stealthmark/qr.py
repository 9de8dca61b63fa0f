"""QR payloads for StealthMark: module grids, function-pattern repair and OpenCV decoding.

A *grid* here is a ``G×G`` boolean numpy array of QR modules without quiet zone,
``True`` = dark module, ``G = 4·version + 17``. Grids come from the ``qrcode``
package (encoding) and go back through OpenCV's ``QRCodeDetector`` (decoding).

Why repair exists (docs/methods/stealthmark.md): a grid read from a model's uncertainty is ~98% correct,
but OpenCV fails on such grids because errors in the *function patterns* (finders,
timing, format info) break detection before Reed-Solomon can correct anything. The
verifier knows version and error-correction level from the owner's secret, so it can
restore every payload-independent cell and try the 8 possible format words (one per
mask pattern); data-cell errors are left to Reed-Solomon.
"""

from __future__ import annotations

import string
from functools import lru_cache

import cv2
import numpy as np
import qrcode
from qrcode import constants as qr_constants
from qrcode import exceptions as qr_exceptions
from qrcode import util as qr_util

# ISO/IEC 18004 error-correction level indicators (2 bits) -- identical to qrcode's constants.
EC_LEVELS: dict[str, int] = {
    "L": qr_constants.ERROR_CORRECT_L,  # 0b01
    "M": qr_constants.ERROR_CORRECT_M,  # 0b00
    "Q": qr_constants.ERROR_CORRECT_Q,  # 0b11
    "H": qr_constants.ERROR_CORRECT_H,  # 0b10
}

_FORMAT_GENERATOR = 0b10100110111  # BCH(15,5) generator x^10+x^8+x^5+x^4+x^2+x+1
_FORMAT_XOR_MASK = 0x5412  # keeps the format word from being all-zero


def _ec_bits(error_correction: str) -> int:
    """Map ``"L"|"M"|"Q"|"H"`` (case-insensitive) to its 2-bit indicator."""
    key = str(error_correction).upper()
    if key not in EC_LEVELS:
        raise ValueError(f"error_correction must be one of {sorted(EC_LEVELS)}, got {error_correction!r}")
    return EC_LEVELS[key]


def grid_size(version: int) -> int:
    """Modules per side of a QR code of ``version`` (1..40): ``4·version + 17``."""
    if not 1 <= int(version) <= 40:
        raise ValueError(f"QR version must be in 1..40, got {version}")
    return 4 * int(version) + 17


def qr_modules(payload: str, version: int | None = None, error_correction: str = "H") -> np.ndarray:
    """Encode ``payload`` as a QR module grid.

    Args:
        payload: text to encode.
        version: QR version 1..40; ``None`` picks the smallest that fits.
        error_correction: ``"L" | "M" | "Q" | "H"``.

    Returns:
        ``G×G`` bool array (True = dark), no quiet zone; mask pattern chosen by qrcode's
        penalty rule, as any QR generator would.

    Raises:
        ValueError: the payload does not fit the fixed ``version`` at this level.
    """
    code = qrcode.QRCode(version=version, error_correction=_ec_bits(error_correction), border=0)
    code.add_data(payload)
    try:
        code.make(fit=version is None)
    except qr_exceptions.DataOverflowError as err:
        raise ValueError(
            f"payload of {len(payload)} characters does not fit QR version {version} "
            f"at error correction {error_correction}"
        ) from err
    return np.array(code.get_matrix(), dtype=bool)


# ----------------------------------------------------------------------------- format info


def format_bits(error_correction: str, mask: int) -> int:
    """15-bit format word: BCH(15,5) of (EC level bits, mask) XOR 0x5412.

    Bit ``i`` (LSB = 0) goes to the cells listed at index ``i`` by ``format_info_cells``.
    """
    if not 0 <= int(mask) <= 7:
        raise ValueError(f"mask pattern must be in 0..7, got {mask}")
    data = (_ec_bits(error_correction) << 3) | int(mask)
    remainder = data << 10
    # Polynomial long division over GF(2): clear bits from the top down to degree < 10.
    for shift in range(4, -1, -1):
        if remainder & (1 << (10 + shift)):
            remainder ^= _FORMAT_GENERATOR << shift
    return ((data << 10) | remainder) ^ _FORMAT_XOR_MASK


def format_info_cells(size: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The two copies of the format word: ``(vertical, horizontal)``, 15 ``(row, col)`` each.

    Index ``i`` holds bit ``i`` of ``format_bits``; the layout is the one qrcode writes
    (checked against its output in the tests): the vertical copy runs down column 8
    (skipping the timing row 6, lower part next to the bottom-left finder), the horizontal
    copy along row 8 (right part next to the top-right finder, skipping timing column 6).
    """
    vertical = [(i, 8) if i < 6 else (i + 1, 8) if i < 8 else (size - 15 + i, 8) for i in range(15)]
    horizontal = [(8, size - 1 - i) if i < 8 else (8, 7) if i == 8 else (8, 14 - i) for i in range(15)]
    return vertical, horizontal


def write_format_bits(grid: np.ndarray, error_correction: str, mask: int) -> np.ndarray:
    """Copy of ``grid`` (G×G bool) with both format-word copies set for ``(level, mask)``."""
    out = np.array(grid, dtype=bool, copy=True)
    bits = format_bits(error_correction, mask)
    for copy_cells in format_info_cells(out.shape[0]):
        for i, (r, c) in enumerate(copy_cells):
            out[r, c] = bool((bits >> i) & 1)
    return out


# ----------------------------------------------------------------------------- function patterns


def function_pattern_mask(version: int) -> np.ndarray:
    """Cells that carry no data: ``G×G`` bool, True on function patterns.

    Finders with their separators (8×8 at three corners), timing row and column 6,
    alignment patterns (5×5, except where they would overlap a finder), the format
    info areas on row/column 8, version info blocks (6×3, version ≥ 7) and the dark
    module at ``(G − 8, 8)``.
    """
    size = grid_size(version)
    mask = np.zeros((size, size), dtype=bool)
    mask[:8, :8] = mask[:8, -8:] = mask[-8:, :8] = True  # finders + separators
    mask[6, :] = mask[:, 6] = True  # timing
    centres = qr_util.pattern_position(version)
    finder_centres = {(6, 6), (6, centres[-1] if centres else 0), (centres[-1] if centres else 0, 6)}
    for r in centres:
        for c in centres:
            if (r, c) not in finder_centres:
                mask[r - 2 : r + 3, c - 2 : c + 3] = True
    mask[8, :9] = mask[:9, 8] = True  # format info around the top-left finder
    mask[8, -8:] = True  # format info next to the top-right finder
    mask[-8:, 8] = True  # format info next to the bottom-left finder + dark module (G-8, 8)
    if version >= 7:
        mask[:6, -11:-8] = mask[-11:-8, :6] = True  # version info
    return mask


@lru_cache(maxsize=64)
def _reference_function_cells(version: int, error_correction: str) -> np.ndarray:
    """Function-pattern cells of a real QR code of this version/level (read-only array).

    Every function cell except the format words is payload independent, so the grid of
    an empty payload at mask 0 serves as the reference; format words are rewritten later.
    """
    code = qrcode.QRCode(version=version, error_correction=_ec_bits(error_correction), border=0, mask_pattern=0)
    code.add_data("", optimize=0)
    code.make(fit=False)
    grid = np.array(code.get_matrix(), dtype=bool)
    grid.setflags(write=False)
    return grid


def repair_function_patterns(grid: np.ndarray, version: int, error_correction: str) -> list[np.ndarray]:
    """Restore the payload-independent function patterns; one candidate per mask pattern.

    Args:
        grid: ``G×G`` bool read-out (True = dark), ``G = 4·version + 17``.
        version, error_correction: from the owner's secret.

    Returns:
        8 ``G×G`` bool grids; candidate ``k`` has finders, separators, timing, alignment,
        version info and the dark module copied from a reference QR code, and the format
        words of mask pattern ``k``. Data cells are left as read.
    """
    grid = np.asarray(grid, dtype=bool)
    size = grid_size(version)
    if grid.shape != (size, size):
        raise ValueError(f"grid of shape {grid.shape} does not match QR version {version} ({size}×{size})")
    fixed = function_pattern_mask(version)
    repaired = np.where(fixed, _reference_function_cells(version, str(error_correction).upper()), grid)
    return [write_format_bits(repaired, error_correction, mask) for mask in range(8)]


# ----------------------------------------------------------------------------- decoding


def render_grid(grid: np.ndarray, quiet_zone: int = 4, module_px: int = 8) -> np.ndarray:
    """Render a ``G×G`` bool grid as a uint8 image (dark = 0, light = 255) with quiet zone.

    Returns: ``((G + 2·quiet_zone)·module_px)²`` uint8 array.
    """
    cells = np.where(np.asarray(grid, dtype=bool), 0, 255).astype(np.uint8)
    cells = np.pad(cells, int(quiet_zone), constant_values=255)
    return np.kron(cells, np.ones((int(module_px), int(module_px)), dtype=np.uint8))


def decode_grid(grid: np.ndarray, quiet_zone: int = 4, module_px: int = 8) -> str | None:
    """Decode a ``G×G`` bool grid with OpenCV's ``QRCodeDetector``; None when it fails."""
    image = render_grid(grid, quiet_zone=quiet_zone, module_px=module_px)
    try:
        text, _points, _straight = cv2.QRCodeDetector().detectAndDecode(image)
    except cv2.error:
        return None
    return text or None


def decode_with_repair(grid: np.ndarray, version: int, error_correction: str) -> str | None:
    """Decode ``grid`` as is, then each of the 8 repaired candidates; first success wins."""
    text = decode_grid(grid)
    if text is not None:
        return text
    for candidate in repair_function_patterns(grid, version, error_correction):
        text = decode_grid(candidate)
        if text is not None:
            return text
    return None


def bit_accuracy(grid: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of cells where two equally shaped bool grids agree, in [0, 1]."""
    grid, reference = np.asarray(grid, dtype=bool), np.asarray(reference, dtype=bool)
    if grid.shape != reference.shape:
        raise ValueError(f"grid shape {grid.shape} != reference shape {reference.shape}")
    return float((grid == reference).mean())


# ----------------------------------------------------------------------------- Monte Carlo null

# Lower-case letters and digits never form alphanumeric runs, so the whole payload is one
# byte-mode segment and its length alone decides whether it fits.
_NULL_ALPHABET = np.array(list(string.ascii_lowercase + string.digits))


def byte_capacity(version: int, error_correction: str) -> int:
    """Maximum byte-mode payload length for this version/level."""
    grid_size(version)
    bits = qr_util.BIT_LIMIT_TABLE[_ec_bits(error_correction)][version]
    header = 4 + qr_util.length_in_bits(qr_util.MODE_8BIT_BYTE, version)
    return (bits - header) // 8


def random_payload_grids(
    version: int, error_correction: str, k: int, seed: int, length: int | None = None
) -> np.ndarray:
    """QR codes of ``k`` random payloads at a fixed version/level: the Monte Carlo null.

    Payloads are random lower-case/digit strings of ``length`` characters (default: the
    byte capacity, so no padding codewords are shared between codes); masks are chosen
    by qrcode's penalty rule, as for the owner's code. They share every function pattern
    with the owner's code, which is what makes the null honest about finder agreement.

    Returns: ``k×G×G`` bool array.
    """
    capacity = byte_capacity(version, error_correction)
    length = capacity if length is None else int(length)
    if not 1 <= length <= capacity:
        raise ValueError(f"length must be in 1..{capacity} for version {version}/{error_correction}, got {length}")
    rng = np.random.default_rng(seed)
    size = grid_size(version)
    out = np.empty((int(k), size, size), dtype=bool)
    ec = _ec_bits(error_correction)
    for i in range(int(k)):
        payload = "".join(rng.choice(_NULL_ALPHABET, size=length))
        code = qrcode.QRCode(version=version, error_correction=ec, border=0)
        code.add_data(payload, optimize=0)
        code.make(fit=False)
        out[i] = np.array(code.get_matrix(), dtype=bool)
    return out
