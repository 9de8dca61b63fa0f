"""DICOM images (``.dcm``) as float32 pixels in [0, 1] (docs/data.md, "DICOM").

:class:`~datamodules.samples.ImageFile` sends every ``.dcm`` / ``.dicom`` path here, so any
classification or segmentation layout whose image files are DICOM works unchanged (masks
stay ordinary PNG files). What is applied, in this order:

1. read with ``pydicom.dcmread`` (a file without the DICOM preamble is refused, never
   ``force``-read); the pixel data must be in ``PixelData`` (no float pixel data), one frame;
2. decode (compressed transfer syntaxes need an installed pydicom plugin; otherwise a named
   error gives the transfer syntax and the packages that would decode it);
3. colour (``SamplesPerPixel == 3``): YBR is converted to RGB by pydicom, ``PALETTE COLOR``
   goes through its LUT; values are divided by the largest stored value -> H×W×3;
4. grey: the modality LUT / ``RescaleSlope`` + ``RescaleIntercept`` (``apply_modality_lut``),
   then the first VOI LUT or window (``WindowCenter``/``WindowWidth``, ``apply_voi_lut``) if
   the file has one, and the result is scaled from that output range to [0, 1]; without a
   VOI the full range the stored bits can hold (``BitsStored``, signed or not, through the
   rescale) is mapped to [0, 1] -- the same for every file of a series, no per-image stretch;
5. ``MONOCHROME1`` (bright = low values) is inverted last (``1 - x``), so bone is bright in
   every output, as in ``MONOCHROME2``.

Every failure is a :class:`~datamodules.samples.BadSampleError` naming the file and, where
one is at fault, the DICOM field.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from datamodules.samples import BadSampleError

DICOM_SUFFIXES = (".dcm", ".dicom")

# Fields without which the pixels cannot be interpreted.
_REQUIRED_FIELDS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel", "PhotometricInterpretation")


def is_dicom_path(path: str | Path) -> bool:
    """Whether ``path`` is read as DICOM (by its extension, case-insensitive)."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES


def _read_dataset(path: Path, header_only: bool):
    """``pydicom.dcmread`` with named errors; ``header_only`` defers the pixel bytes."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not path.is_file():
        raise BadSampleError(path, "file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every odd value; errors are what count
            # defer_size keeps the header read cheap: large values (the pixels) are not loaded.
            return pydicom.dcmread(path, defer_size="256 KB" if header_only else None)
    except InvalidDicomError as exc:
        raise BadSampleError(
            path, f"not a DICOM file (no 'DICM' marker after the 128-byte preamble): {exc}"
        ) from exc
    except Exception as exc:  # truncated headers raise EOFError, struct.error, ValueError...
        raise BadSampleError(path, f"unreadable DICOM header ({type(exc).__name__}: {exc})") from exc


def _transfer_syntax(ds):
    meta = getattr(ds, "file_meta", None)
    return None if meta is None else meta.get("TransferSyntaxUID")


def _check_header(path: Path, ds) -> None:
    """Refuse what cannot become one 2-D image, naming the field."""
    if "PixelData" not in ds:
        other = [name for name in ("FloatPixelData", "DoubleFloatPixelData") if name in ds]
        detail = f" (it has {other[0]}, which medmark does not read)" if other else ""
        raise BadSampleError(path, f"field PixelData (7FE0,0010) is missing: the file holds no image{detail}")
    for name in _REQUIRED_FIELDS:
        if ds.get(name) in (None, ""):
            raise BadSampleError(path, f"field {name} is missing or empty; the pixels cannot be interpreted")
    frames = ds.get("NumberOfFrames")
    try:
        frames = 1 if frames in (None, "") else int(frames)
    except (TypeError, ValueError) as exc:
        raise BadSampleError(path, f"field NumberOfFrames has {frames!r}, not an integer") from exc
    if frames != 1:
        raise BadSampleError(
            path, f"field NumberOfFrames is {frames}: multi-frame DICOM (cine, volumes) is not read as one "
            "image; export the frame(s) you want as single-frame files"
        )
    samples = int(ds.SamplesPerPixel)
    if samples not in (1, 3):
        raise BadSampleError(path, f"field SamplesPerPixel is {samples}; expected 1 (grey) or 3 (colour)")
    syntax = _transfer_syntax(ds)
    if syntax is not None and syntax.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as exc:
            raise BadSampleError(
                path, f"field TransferSyntaxUID is {syntax.name} ({syntax}); pydicom has no decoder for it"
            ) from exc
        if not decoder.is_available:
            needs = "; ".join(decoder.missing_dependencies)
            raise BadSampleError(
                path, f"field TransferSyntaxUID is {syntax.name} ({syntax}), a compressed syntax no installed "
                f"plugin decodes (install one of: {needs}), or decompress the file first (e.g. dcmdjpeg/gdcmconv)"
            )


def dicom_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of a DICOM image from its header, after the checks :func:`read_dicom` makes up front.

    Raises:
        BadSampleError: not DICOM, unreadable header, no ``PixelData``, multi-frame, or a
            compressed transfer syntax without an installed decoder.
    """
    path = Path(path)
    ds = _read_dataset(path, header_only=True)
    _check_header(path, ds)
    return int(ds.Rows), int(ds.Columns)


def _stored_range(ds) -> tuple[float, float]:
    """Smallest and largest value ``BitsStored`` can hold (signed per ``PixelRepresentation``)."""
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _modality_range(ds) -> tuple[float, float]:
    """Output range of the modality transform applied to the stored range."""
    low, high = _stored_range(ds)
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, 2.0**bits - 1
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    ends = (low * slope + intercept, high * slope + intercept)
    return min(ends), max(ends)


def _grey_to_unit(path: Path, ds, stored: np.ndarray) -> np.ndarray:
    """Stored grey values -> modality LUT/rescale -> VOI (if any) -> [0, 1] (float64)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        values = apply_modality_lut(stored, ds).astype(np.float64)
    except Exception as exc:
        raise BadSampleError(
            path, f"fields RescaleSlope/RescaleIntercept/ModalityLUTSequence cannot be applied ({type(exc).__name__}: {exc})"
        ) from exc
    low, high = _modality_range(ds)
    voi_lut = ds.get("VOILUTSequence")
    if voi_lut:
        field = "VOILUTSequence"
        descriptor = voi_lut[0].get("LUTDescriptor")
        low, high = 0.0, 2.0 ** int(descriptor[2]) - 1 if descriptor else float(np.max(voi_lut[0].LUTData))
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        field = "WindowCenter/WindowWidth"  # apply_windowing maps into the modality output range
    else:
        field = None
    if field is not None:
        try:
            values = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float64)
        except Exception as exc:
            raise BadSampleError(path, f"field {field} cannot be applied ({type(exc).__name__}: {exc})") from exc
    if not high > low:
        raise BadSampleError(path, f"fields BitsStored/RescaleSlope give an empty value range [{low}, {high}]")
    return (values - low) / (high - low)


def read_dicom(path: str | Path) -> np.ndarray:
    """One DICOM image as ``np.float32`` in [0, 1]: H×W (grey) or H×W×3 (RGB).

    See the module docstring for the order of the transforms (modality LUT/rescale, VOI
    LUT/window or stored-bits range, MONOCHROME1 inversion).

    Raises:
        BadSampleError: naming the file and the field: not DICOM, unreadable or truncated,
            no ``PixelData``, multi-frame (``NumberOfFrames``), a compressed
            ``TransferSyntaxUID`` without decoder, or pixel data shorter than the header says.
    """
    path = Path(path)
    ds = _read_dataset(path, header_only=False)
    _check_header(path, ds)
    syntax = _transfer_syntax(ds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = ds.pixel_array  # YBR -> RGB by default (pydicom 3)
    except Exception as exc:
        where = f"field PixelData (transfer syntax {syntax.name}, {syntax})" if syntax is not None else "field PixelData"
        raise BadSampleError(path, f"{where} cannot be decoded ({type(exc).__name__}: {str(exc).strip()[:300]})") from exc
    photometric = str(ds.PhotometricInterpretation).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            stored = apply_color_lut(stored, ds)
        except Exception as exc:
            raise BadSampleError(path, f"field RedPaletteColorLookupTableData cannot be applied ({exc})") from exc
        unit = stored.astype(np.float64) / float(np.iinfo(stored.dtype).max)
    elif stored.ndim == 3:
        unit = stored.astype(np.float64) / (2.0 ** int(ds.BitsStored) - 1)
    else:
        unit = _grey_to_unit(path, ds, stored)
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit
    if not np.isfinite(unit).all():
        raise BadSampleError(path, "field PixelData gives non-finite values after the rescale/VOI transforms")
    return np.ascontiguousarray(np.clip(unit, 0.0, 1.0), dtype=np.float32)


# --------------------------------------------------------------------------------------
# Writing back: a grey DICOM file whose pixels read as given values (X-Mark's release)
# --------------------------------------------------------------------------------------
_WRITABLE_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")


def check_grey_writable(path: str | Path) -> None:
    """Refuse (``BadSampleError`` naming the file and field), from the header alone, a DICOM file
    :func:`write_grey_dicom` cannot write marked pixels into: anything :func:`read_dicom` refuses,
    colour (``SamplesPerPixel`` 3 or ``PALETTE COLOR``), or a ``BitsAllocated`` other than 8/16."""
    path = Path(path)
    _check_grey_writable(path, _read_dataset(path, header_only=True))


def _check_grey_writable(path: Path, ds) -> None:
    _check_header(path, ds)
    photometric = str(ds.PhotometricInterpretation).upper()
    if int(ds.SamplesPerPixel) != 1 or photometric not in _WRITABLE_PHOTOMETRIC:
        raise BadSampleError(path, f"field PhotometricInterpretation is {photometric}: marked pixels are written "
                             f"back into grey DICOM only ({' / '.join(_WRITABLE_PHOTOMETRIC)})")
    if int(ds.BitsAllocated) not in (8, 16):
        raise BadSampleError(path, f"field BitsAllocated is {ds.BitsAllocated}; marked pixels are written back "
                             "into 8- or 16-bit DICOM only")


def grey_unit_table(path: Path, ds) -> tuple[np.ndarray, np.ndarray]:
    """``(stored, unit)``: every value ``BitsStored`` can hold (ascending, int64) and what
    :func:`read_dicom` turns it into (float64 in [0, 1]: modality, VOI, ``MONOCHROME1`` inversion)."""
    low, high = _stored_range(ds)
    stored = np.arange(int(low), int(high) + 1, dtype=np.int64)
    unit = _grey_to_unit(path, ds, stored)
    if str(ds.PhotometricInterpretation).upper() == "MONOCHROME1":
        unit = 1.0 - unit
    return stored, np.clip(unit, 0.0, 1.0)


def nearest_stored(stored: np.ndarray, table: tuple[np.ndarray, np.ndarray], target: np.ndarray,
                   max_change: float) -> np.ndarray:
    """Per pixel, the stored value whose reading is closest to ``target``, among those whose reading
    differs from the current one (``stored``'s) by at most ``max_change``; the current value on a tie.

    Args:
        stored: H×W integer pixels as stored.
        table: :func:`grey_unit_table` of the file.
        target: H×W float readings in [0, 1] to approach.
        max_change: the largest change of a reading allowed (X-Mark: ε), in [0, 1] units.

    The readings need not grow with the stored value (``MONOCHROME1``, a negative ``RescaleSlope``):
    the search runs over the file's readings sorted, not over the stored values.
    """
    values, unit = table
    order = np.argsort(unit, kind="stable")
    sorted_unit, sorted_values = unit[order], values[order]
    current = unit[stored.astype(np.int64) - values[0]]
    # the closest allowed reading to a target is the closest to the target clamped to the allowed band; with the
    # clamp, one of the two readings that bracket the target lies between it and the current one: always allowed
    target = np.clip(target, current - max_change, current + max_change)
    right = np.clip(np.searchsorted(sorted_unit, target), 1, len(sorted_unit) - 1)
    candidates = [(stored.astype(np.int64), current)]  # first: kept on a tie
    for index in (right - 1, right):
        candidates.append((sorted_values[index], sorted_unit[index]))
    best_value, best_error = candidates[0][0], np.abs(current - target)
    for value, reading in candidates[1:]:
        error = np.abs(reading - target)
        better = (error < best_error) & (np.abs(reading - current) <= max_change + 1e-12)
        best_value, best_error = np.where(better, value, best_value), np.where(better, error, best_error)
    return best_value


def write_grey_dicom(source: str | Path, target_path: str | Path,
                     mark: Callable[[np.ndarray], np.ndarray], max_change: float) -> tuple[np.ndarray, np.ndarray]:
    """Write a copy of the grey DICOM file ``source`` whose pixels read (through :func:`read_dicom`)
    as close to ``mark(readings)`` as the stored bits allow, no reading changing by more than ``max_change``.

    Only the pixel values change: every other element is kept, except that a compressed file is
    written uncompressed (Explicit VR Little Endian) and the SOP Instance UID becomes a new one derived
    from the old (new pixels are a new instance; the same source gives the same UID every time).

    Args:
        mark: H×W float64 readings of the source in [0, 1] -> H×W target readings in [0, 1]
            (e.g. :func:`watermark.xmark.marker.mark_native_unit`); the file is read once.
        max_change: the largest change of any pixel's reading, in [0, 1] units.

    Returns ``(before, after)``: H×W float64 readings of the source and of the written file.
    Raises ``BadSampleError`` (file and field named) for what :func:`check_grey_writable` refuses.
    """
    from pydicom.uid import generate_uid

    source, target_path = Path(source), Path(target_path)
    ds = _read_dataset(source, header_only=False)
    _check_grey_writable(source, ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stored = ds.pixel_array
    table = grey_unit_table(source, ds)
    values, unit = table
    before = unit[stored.astype(np.int64) - values[0]]
    target = np.asarray(mark(before), dtype=np.float64)
    if target.shape != stored.shape:
        raise ValueError(f"{source}: target is {target.shape}, the image is {stored.shape}")
    marked = nearest_stored(stored, table, target, max_change).astype(stored.dtype)
    ds.set_pixel_data(marked, photometric_interpretation=str(ds.PhotometricInterpretation),
                      bits_stored=int(ds.BitsStored), generate_instance_uid=False)
    new_uid = generate_uid(entropy_srcs=[str(ds.get("SOPInstanceUID", source.name)), "medmark marked pixels"])
    ds.SOPInstanceUID = new_uid
    if getattr(ds, "file_meta", None) is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = new_uid
    target_path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target_path, enforce_file_format=True)
    return before, unit[marked.astype(np.int64) - values[0]]
