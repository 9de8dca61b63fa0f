"""What one dataset item is, independent of the on-disk layout it came from.

Every reader (``datamodules/readers/*.py``) turns a dataset folder into a list of
:class:`Sample`. A sample does not hold pixels; it holds *sources* that know how to
read them (an image file, a frame of a video, a slice of a NIfTI volume, a polygon
drawn into a mask...). Keeping reading lazy lets the data module check every file
up front (cheap header reads) before training starts, and name the file at fault.

Conventions of :meth:`Source.read`:
- images: ``np.uint8`` H×W (grey) or H×W×3 (RGB) in [0, 255], or ``np.float32`` in [0, 1];
- masks: ``np.uint8`` H×W with values {0, 1}.
Any failure raises :class:`BadSampleError` naming the file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")


class DatasetError(Exception):
    """Bad input detected while reading a dataset. The message names the file/row."""


class DatasetLayoutError(DatasetError):
    """The folder does not have the expected layout (missing folder, CSV, column...)."""


class BadSampleError(DatasetError):
    """One sample cannot be used (unreadable file, mask size differs from its image...)."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class Source(ABC):
    """Lazy reader of one 2-D array. ``path`` is the file named in error messages."""

    path: Path

    @abstractmethod
    def read(self) -> np.ndarray:
        """Return the array (see module docstring for dtypes); raise BadSampleError."""

    def size(self) -> tuple[int, int]:
        """(H, W) without decoding the pixels where the format allows it."""
        return tuple(self.read().shape[:2])  # type: ignore[return-value]


def _open_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise BadSampleError(path, "file not found")
    try:
        return Image.open(path)
    except Exception as exc:  # PIL raises several types for unreadable files
        raise BadSampleError(path, f"unreadable image ({type(exc).__name__}: {exc})") from exc


def _decode(path: Path, mode: str | None = None) -> np.ndarray:
    img = _open_image(path)
    try:
        img.load()
        if mode is not None and img.mode != mode:
            img = img.convert(mode)
        return np.asarray(img)
    except Exception as exc:
        raise BadSampleError(path, f"corrupt image data ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class ImageFile(Source):
    """An image file: PNG, JPEG, BMP, TIFF read as grey or RGB uint8; DICOM (``.dcm``,
    ``.dicom``) read by :func:`datamodules.dicom.read_dicom` as float32 in [0, 1]."""

    path: Path

    def read(self) -> np.ndarray:
        if self.path.suffix.lower() in (".dcm", ".dicom"):
            from datamodules.dicom import read_dicom

            return read_dicom(self.path)
        img = _open_image(self.path)
        mode = "L" if img.mode in ("L", "I", "I;16", "F", "1") else "RGB"
        arr = _decode(self.path, mode)
        return arr

    def size(self) -> tuple[int, int]:
        if self.path.suffix.lower() in (".dcm", ".dicom"):
            from datamodules.dicom import dicom_size

            return dicom_size(self.path)
        w, h = _open_image(self.path).size
        return h, w


@dataclass(frozen=True)
class MaskFile(Source):
    """A mask image turned binary.

    ``positive_below``/``positive_above`` select foreground grey levels: the default
    (``positive_above=127``) is right for 0/255 masks, JPEG masks included. REFUGE's
    0 = cup, 128 = rim, 255 = background uses ``positive_below``.
    """

    path: Path
    positive_above: int | None = 127
    positive_below: int | None = None

    def read(self) -> np.ndarray:
        arr = _decode(self.path)
        if arr.ndim == 3:
            arr = arr[..., :3].max(axis=2)
        out = np.ones(arr.shape, dtype=bool)
        if self.positive_above is not None:
            out &= arr > self.positive_above
        if self.positive_below is not None:
            out &= arr < self.positive_below
        return out.astype(np.uint8)

    def size(self) -> tuple[int, int]:
        w, h = _open_image(self.path).size
        return h, w


@dataclass(frozen=True)
class Sample:
    """One item. Exactly one of ``mask`` (segmentation) or ``label`` (classification).

    ``split`` is set when the dataset itself defines the split (PraNet's TestDataset,
    CheXpert's valid.csv, EchoNet's Split column...); otherwise the data module draws
    splits. ``group`` (patient, video, volume) is never divided between splits.
    """

    id: str
    image: Source
    mask: Source | None = None
    label: int | None = None
    split: str | None = None
    group: str | None = None
    lesion_mask: Source | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class MaskUnion(Source):
    """Union of binary mask files of one image (BUSI's ``_mask``, ``_mask_1``;
    IDRiD's per-lesion MA/HE/EX/SE TIFFs).

    ``read()`` returns ``np.uint8`` H×W in {0, 1}: 1 where any part is foreground. Parts
    of different sizes raise :class:`BadSampleError` naming the odd file.
    """

    parts: tuple[MaskFile, ...]

    def __post_init__(self):
        if not self.parts:
            raise ValueError("MaskUnion needs at least one mask file")

    @property
    def path(self) -> Path:  # type: ignore[override]
        """The first part: the file named when the union as a whole is at fault."""
        return self.parts[0].path

    def read(self) -> np.ndarray:
        union = self.parts[0].read().copy()
        for part in self.parts[1:]:
            mask = part.read()
            if mask.shape != union.shape:
                raise BadSampleError(part.path, f"mask size {mask.shape} differs from {union.shape} of {self.path}")
            union |= mask
        return union

    def size(self) -> tuple[int, int]:
        first = self.parts[0].size()
        for part in self.parts[1:]:
            if part.size() != first:
                raise BadSampleError(part.path, f"mask size {part.size()} differs from {first} of {self.path}")
        return first
