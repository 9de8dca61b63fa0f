"""Readers for the segmentation datasets' on-disk layouts (docs/data.md).

Every reader has the signature ``reader(root, **options) -> list[Sample]`` and is
registered under the layout name used by ``data.layout``:

=================  ==========================================================================
``kvasir_seg``     Kvasir-SEG (``Kvasir-SEG/{images,masks}/<id>.jpg``, ``kavsir_bboxes.json``)
``pranet``         PraNet polyp split (``TrainDataset/``, ``TestDataset/<subset>/``)
``refuge``         REFUGE fundus optic disc / cup (``Training400/``, ``REFUGE-Validation400/``)
``echonet``        EchoNet-Dynamic left ventricle (``FileList.csv``, ``VolumeTracings.csv``)
``acdc``           ACDC cardiac MR, one sample per z-slice (``training/``, ``testing/``)
``isic2018``       ISIC 2018 Task 1 lesion boundary
``busi``           Breast ultrasound images (``Dataset_BUSI_with_GT/<class>/``)
``cvc_clinicdb``   CVC-ClinicDB (``Original/``, ``Ground Truth/``)
``seg_folder``     any ``images/`` + ``masks/`` pair with a file-name rule
=================  ==========================================================================

Contract of the samples returned:

- ``image`` reads ``np.uint8`` H×W×3 / H×W in [0, 255] (``np.float32`` H×W in [0, 1] for
  ACDC slices); ``mask`` reads ``np.uint8`` H×W in {0, 1}.
- ``split`` ('train'/'val'/'test') is set only where the dataset itself defines it;
  ``group`` (patient, video) is set where several samples share one, so drawn splits
  never divide it.
- Ids are unique within a dataset; samples come sorted by path (digit runs compared as
  numbers, so ``2.png`` precedes ``10.png``).
- A missing top-level folder, CSV or CSV column raises :class:`DatasetLayoutError` at once.
  A missing or unreadable *per-sample* file does not: the sample is still listed, with its
  source pointing at the expected path, and the data module's validation pass
  (``size()`` / ``read()``) raises the :class:`BadSampleError` naming the file, where the
  ``data.on_bad_sample`` policy decides between stopping and skipping.
"""

from __future__ import annotations

import configparser
import functools
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pandas as pd
from skimage.draw import polygon as draw_polygon

from datamodules.readers import register_reader
from datamodules.samples import BadSampleError, DatasetLayoutError, ImageFile, MaskFile, MaskUnion, Sample, Source

log = logging.getLogger("medmark.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
PRANET_TEST_SUBSETS = ("CVC-300", "CVC-ClinicDB", "CVC-ColonDB", "ETIS-LaribPolypDB", "Kvasir")
REFUGE_CLASSES = ("Glaucoma", "Non-Glaucoma")
# REFUGE masks: 0 = cup, 128 = disc rim, 255 = background. The thresholds sit half-way
# between the levels so that resampled/antialiased masks still split cleanly.
REFUGE_BELOW = {"disc": 200, "cup": 64}
ECHONET_SPLITS = {"TRAIN": "train", "VAL": "val", "TEST": "test"}
ECHONET_FILELIST_COLUMNS = ("FileName", "FrameHeight", "FrameWidth", "Split")
ECHONET_TRACING_COLUMNS = ("FileName", "X1", "Y1", "X2", "Y2", "Frame")
ACDC_LABELS = {"background": 0, "RV": 1, "myocardium": 2, "LV": 3}
BUSI_CLASSES = ("benign", "malignant", "normal")
ISIC2018_SPLITS = (
    # (split, input folder, ground-truth folder); the training set carries no split tag
    # so that the data module can carve val/test from it when the others are absent.
    (None, "ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    ("val", "ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    ("test", "ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
)
NIFTI_CACHE_SIZE = 32  # ACDC frame volumes are ~2–3 MB as float32: 32 of them stay well under 100 MB


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------
def _natural_key(text: str) -> tuple:
    """Sort key comparing digit runs as numbers: ``'2'`` < ``'10'``, ``'a (2)'`` < ``'a (10)'``."""
    # re.split with a capturing group alternates text, digits, text...: types line up by position.
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text))


def _path_key(path: Path) -> tuple:
    return _natural_key(path.as_posix())


def _require_dir(folder: Path, what: str) -> Path:
    if not folder.is_dir():
        raise DatasetLayoutError(f"{folder}: {what} folder not found")
    return folder


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: {what} not found")
    return path


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files (known extensions, no hidden files) under ``folder``, naturally sorted."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted((path for path in candidates if _is_image(path)), key=_path_key)


def _index_by_stem(folder: Path) -> dict[str, list[Path]]:
    """``{stem: [files]}`` of the image files directly in ``folder`` (empty if absent)."""
    index: dict[str, list[Path]] = {}
    if folder.is_dir():
        for path in _list_images(folder):
            index.setdefault(path.stem, []).append(path)
    return index


def _mask_path(index: dict[str, list[Path]], folder: Path, stem: str, suffix: str) -> Path:
    """The mask of ``stem``: ``stem + suffix`` if present, else any image file with that stem.

    When there is none, the expected ``folder / (stem + suffix)`` is returned so that the
    validation pass names the file that should be there.
    """
    found = index.get(stem, [])
    for path in found:
        if path.suffix.lower() == suffix.lower():
            return path
    return found[0] if found else folder / f"{stem}{suffix}"


def _check_unique_ids(samples: list[Sample], where: Path) -> None:
    counts = Counter(sample.id for sample in samples)
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if repeated:
        raise DatasetLayoutError(
            f"{where}: sample id(s) found more than once (e.g. the same name with two extensions): {repeated[:10]}"
        )


def _read_csv(path: Path, required: Sequence[str]) -> pd.DataFrame:
    """Read ``path`` as text cells with stripped headers/cells; check ``required`` columns."""
    _require_file(path, "CSV")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetLayoutError(f"{path}: unreadable CSV ({type(exc).__name__}: {exc})") from exc
    frame.columns = [str(column).strip() for column in frame.columns]
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise DatasetLayoutError(
            f"{path}: missing column(s) {missing}; expected {list(required)}, found {list(frame.columns)}"
        )
    return frame.apply(lambda column: column.str.strip())


def _parse(value: str, kind: type, csv: Path, row: int, column: str):
    """``kind(value)`` or a DatasetLayoutError naming the CSV, the data row (from 1) and column."""
    try:
        return kind(float(value)) if kind is int else kind(value)
    except ValueError:
        raise DatasetLayoutError(f"{csv}, row {row + 1}: column {column!r} = {value!r} is not a number") from None


# --------------------------------------------------------------------------------------
# Sources that are not plain files
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnavailableSource(Source):
    """A source known at listing time to be unusable; every access raises the reason.

    Lets a reader report a per-sample problem (a traced video absent from FileList.csv,
    an unreadable NIfTI header) through the data module's ``on_bad_sample`` policy instead
    of raising while listing.
    """

    path: Path
    reason: str

    def read(self) -> np.ndarray:
        raise BadSampleError(self.path, self.reason)

    def size(self) -> tuple[int, int]:
        raise BadSampleError(self.path, self.reason)


@dataclass(frozen=True)
class VideoFrame(Source):
    """One frame of a video file, read as ``np.uint8`` H×W×3 RGB.

    ``height``/``width`` come from the dataset's file list so that :meth:`size` opens no
    video; ``num_frames`` (when listed) lets :meth:`size` reject a frame past the end.
    """

    path: Path
    frame: int
    height: int
    width: int
    num_frames: int | None = None

    def read(self) -> np.ndarray:
        if not self.path.is_file():
            raise BadSampleError(self.path, f"video not found (frame {self.frame} requested)")
        capture = cv2.VideoCapture(str(self.path))
        try:
            if not capture.isOpened():
                raise BadSampleError(self.path, f"unreadable video: cannot open it to read frame {self.frame}")
            capture.set(cv2.CAP_PROP_POS_FRAMES, self.frame)
            ok, bgr = capture.read()
            count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        finally:
            capture.release()
        if not ok or bgr is None:
            raise BadSampleError(self.path, f"cannot read frame {self.frame} (the video reports {count} frames)")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def size(self) -> tuple[int, int]:
        if not self.path.is_file():
            raise BadSampleError(self.path, f"video not found (frame {self.frame} requested)")
        if self.num_frames is not None and not 0 <= self.frame < self.num_frames:
            raise BadSampleError(self.path, f"frame {self.frame} is outside the {self.num_frames} listed frames")
        return self.height, self.width


@dataclass(frozen=True)
class PolygonMask(Source):
    """A filled polygon rasterised at ``height``×``width``: ``np.uint8`` H×W in {0, 1}.

    ``xs``/``ys`` are vertex coordinates in pixels (column, row), rounded to the nearest
    pixel before filling (as EchoNet-Dynamic's own loader does). ``path`` is the file the
    polygon came from and ``where`` says which part of it, for error messages.
    """

    path: Path
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    height: int
    width: int
    where: str = ""

    def read(self) -> np.ndarray:
        if len(self.xs) < 3:
            raise BadSampleError(self.path, f"{self.where}: tracing has {len(self.xs)} polygon point(s), needs 3")
        rows, cols = draw_polygon(
            np.rint(self.ys).astype(np.int64), np.rint(self.xs).astype(np.int64), shape=(self.height, self.width)
        )
        mask = np.zeros((self.height, self.width), dtype=np.uint8)
        mask[rows, cols] = 1
        return mask

    def size(self) -> tuple[int, int]:
        return self.height, self.width


def _as_volume(data: np.ndarray, path: Path) -> np.ndarray:
    """A 3-D X×Y×Z array; trailing singleton axes (X×Y×Z×1) are dropped."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BadSampleError(path, f"expected a 3-D volume, found shape {data.shape}")
    return data


def _nifti_load(path: Path):
    if not path.is_file():
        raise BadSampleError(path, "file not found")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for unreadable headers
        raise BadSampleError(path, f"unreadable NIfTI ({type(exc).__name__}: {exc})") from exc


def _nifti_shape(path: Path) -> tuple[int, int, int]:
    """X×Y×Z shape from the header alone (no voxel data is decompressed)."""
    shape = _nifti_load(path).shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise BadSampleError(path, f"expected a 3-D volume, found shape {shape}")
    return shape  # type: ignore[return-value]


@functools.lru_cache(maxsize=NIFTI_CACHE_SIZE)
def _normalised_volume(path: str) -> np.ndarray:
    """Intensity volume X×Y×Z as float32 in [0, 1], read-only and cached per path.

    Normalised per *volume*: clipped to its 1st/99th percentiles, then min-max scaled, so
    every slice of one scan shares one scale and a few hot voxels do not squash the range.
    """
    file = Path(path)
    image = _nifti_load(file)
    try:
        volume = _as_volume(image.get_fdata(dtype=np.float32), file)
    except BadSampleError:
        raise
    except Exception as exc:  # truncated gzip, short data block...
        raise BadSampleError(file, f"corrupt NIfTI voxel data ({type(exc).__name__}: {exc})") from exc
    low, high = np.percentile(volume, [1.0, 99.0])
    if high > low:
        volume = np.clip((volume - low) / (high - low), 0.0, 1.0).astype(np.float32)
    else:  # a constant volume has no contrast to keep
        volume = np.zeros_like(volume, dtype=np.float32)
    volume.flags.writeable = False  # shared by every slice reader: guard against in-place edits
    return volume


@functools.lru_cache(maxsize=NIFTI_CACHE_SIZE)
def _label_volume(path: str) -> np.ndarray:
    """Integer label volume X×Y×Z (int16), read-only and cached per path."""
    file = Path(path)
    image = _nifti_load(file)
    try:
        labels = _as_volume(np.asanyarray(image.dataobj), file)
    except BadSampleError:
        raise
    except Exception as exc:
        raise BadSampleError(file, f"corrupt NIfTI voxel data ({type(exc).__name__}: {exc})") from exc
    labels = np.rint(labels).astype(np.int16)
    labels.flags.writeable = False
    return labels


def _check_slice(path: Path, index: int, depth: int) -> None:
    if not 0 <= index < depth:
        raise BadSampleError(path, f"slice {index} is outside the volume's {depth} slices")


@dataclass(frozen=True)
class NiftiSlice(Source):
    """Slice ``index`` along axis 2 of a NIfTI volume: ``np.float32`` X×Y in [0, 1].

    Intensities are normalised per volume (see :func:`_normalised_volume`); the volume is
    loaded once and cached, so reading every slice costs one decompression.
    """

    path: Path
    index: int

    def read(self) -> np.ndarray:
        volume = _normalised_volume(str(self.path))
        _check_slice(self.path, self.index, volume.shape[2])
        return volume[:, :, self.index].copy()

    def size(self) -> tuple[int, int]:
        shape = _nifti_shape(self.path)
        _check_slice(self.path, self.index, shape[2])
        return shape[0], shape[1]


@dataclass(frozen=True)
class NiftiLabelSlice(Source):
    """Slice ``index`` of a NIfTI label volume as ``np.uint8`` X×Y: 1 where the label is in ``labels``."""

    path: Path
    index: int
    labels: tuple[int, ...]

    def read(self) -> np.ndarray:
        volume = _label_volume(str(self.path))
        _check_slice(self.path, self.index, volume.shape[2])
        return np.isin(volume[:, :, self.index], self.labels).astype(np.uint8)

    def size(self) -> tuple[int, int]:
        shape = _nifti_shape(self.path)
        _check_slice(self.path, self.index, shape[2])
        return shape[0], shape[1]


def _pair_samples(
    images: Iterable[Path],
    mask_folder: Path,
    *,
    mask_suffix: str | None = None,
    id_prefix: str = "",
    split: str | None = None,
    meta: dict | None = None,
) -> list[Sample]:
    """Samples for ``images`` whose masks share their stem in ``mask_folder``.

    ``mask_suffix`` is the expected extension (default: the image's own); a mask with the
    same stem and another image extension is accepted, a missing one is pointed at the
    expected path (see module docstring).
    """
    index = _index_by_stem(mask_folder)
    samples = []
    for image in images:
        mask = _mask_path(index, mask_folder, image.stem, mask_suffix or image.suffix)
        samples.append(
            Sample(
                id=f"{id_prefix}{image.stem}",
                image=ImageFile(image),
                mask=MaskFile(mask),
                split=split,
                meta=dict(meta or {}),
            )
        )
    return samples


# --------------------------------------------------------------------------------------
# Kvasir-SEG and the PraNet split
# --------------------------------------------------------------------------------------
def _read_kvasir_bboxes(path: Path) -> dict[str, list[list[int]]]:
    """``{image id: [[xmin, ymin, xmax, ymax], ...]}`` from Kvasir-SEG's bounding-box JSON.

    The file maps each id to ``{"height", "width", "bbox": [{"label", "xmin", "ymin",
    "xmax", "ymax"}, ...]}``.
    """
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        return {
            image_id: [[int(box[key]) for key in ("xmin", "ymin", "xmax", "ymax")] for box in entry.get("bbox", [])]
            for image_id, entry in entries.items()
        }
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DatasetLayoutError(
            f"{path}: unreadable bounding boxes ({type(exc).__name__}: {exc}); expected "
            '{"<id>": {"bbox": [{"xmin", "ymin", "xmax", "ymax"}, ...]}, ...}'
        ) from exc


@register_reader("kvasir_seg")
def read_kvasir_seg(root: Path) -> list[Sample]:
    """Kvasir-SEG: ``Kvasir-SEG/images/<id>.jpg`` + ``Kvasir-SEG/masks/<id>.jpg``.

    ``root`` is the folder holding ``Kvasir-SEG/`` or ``Kvasir-SEG/`` itself. Masks are
    JPEG, so foreground is grey > 127 (compression leaves values near 0 and 255). When
    ``kavsir_bboxes.json`` (the release's spelling) is present its boxes go to
    ``meta['bboxes']`` as ``[[xmin, ymin, xmax, ymax], ...]`` in pixels. No split.
    """
    if (root / "Kvasir-SEG").is_dir():
        base = root / "Kvasir-SEG"
    elif (root / "images").is_dir() or (root / "masks").is_dir():
        base = root
    else:
        raise DatasetLayoutError(f"{root / 'Kvasir-SEG'}: Kvasir-SEG folder not found (nor images/ + masks/ in {root})")
    images = _require_dir(base / "images", "Kvasir-SEG images")
    masks = _require_dir(base / "masks", "Kvasir-SEG masks")
    bboxes: dict[str, list[list[int]]] = {}
    for candidate in (base / "kavsir_bboxes.json", root / "kavsir_bboxes.json", base / "kvasir_bboxes.json"):
        if candidate.is_file():
            bboxes = _read_kvasir_bboxes(candidate)
            break
    samples = _pair_samples(_list_images(images), masks, mask_suffix=".jpg")
    samples = [replace(s, meta={"bboxes": bboxes[s.id]}) if s.id in bboxes else s for s in samples]
    _check_unique_ids(samples, base)
    return samples


def _first_dir(parent: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        if (parent / name).is_dir():
            return parent / name
    raise DatasetLayoutError(f"{parent / names[0]}: {what} folder not found")


@register_reader("pranet")
def read_pranet(root: Path, test_subsets: Sequence[str] | str | None = PRANET_TEST_SUBSETS) -> list[Sample]:
    """PraNet's polyp split: ``TrainDataset/{image,mask}/<n>.png`` (split 'train') and
    ``TestDataset/<subset>/{images,masks}/<n>.png`` (split 'test').

    Args:
        test_subsets: test subsets to read (default all five: CVC-300, CVC-ClinicDB,
            CVC-ColonDB, ETIS-LaribPolypDB, Kvasir); ``[]`` reads the training set only.
            A requested subset without its folder is a :class:`DatasetLayoutError`.

    Ids are ``train/<n>`` and ``<subset>/<n>`` (numbering restarts in every subset);
    ``meta['subset']`` names the origin.
    """
    if isinstance(test_subsets, str):
        test_subsets = [test_subsets]
    test_subsets = list(test_subsets or [])
    train = _require_dir(root / "TrainDataset", "PraNet TrainDataset")
    samples = _pair_samples(
        _list_images(_first_dir(train, ("image", "images"), "PraNet training image")),
        _first_dir(train, ("mask", "masks"), "PraNet training mask"),
        id_prefix="train/",
        split="train",
        meta={"subset": "train"},
    )
    if test_subsets:
        test = _require_dir(root / "TestDataset", "PraNet TestDataset")
        for subset in test_subsets:
            folder = test / subset
            if not folder.is_dir():
                raise DatasetLayoutError(
                    f"{folder}: PraNet test subset {subset!r} not found (requested in test_subsets={test_subsets})"
                )
            samples += _pair_samples(
                _list_images(_first_dir(folder, ("images", "image"), f"PraNet {subset} image")),
                _first_dir(folder, ("masks", "mask"), f"PraNet {subset} mask"),
                id_prefix=f"{subset}/",
                split="test",
                meta={"subset": subset},
            )
    _check_unique_ids(samples, root)
    return samples


# --------------------------------------------------------------------------------------
# REFUGE
# --------------------------------------------------------------------------------------
@register_reader("refuge")
def read_refuge(root: Path, target: str = "disc") -> list[Sample]:
    """REFUGE optic disc / cup.

    Training: ``Training400/{Glaucoma,Non-Glaucoma}/<g|n>NNNN.jpg`` with masks
    ``Annotation-Training400/Disc_Cup_Masks/<same class>/<id>.bmp`` (split 'train').
    Validation, when ``REFUGE-Validation400/`` is present: ``*.jpg`` with masks in
    ``REFUGE-Validation400-GT/Disc_Cup_Masks/`` (flat or in class folders; split 'val').

    Masks hold 0 = cup, 128 = disc rim, 255 = background.

    Args:
        target: ``disc`` (cup ∪ rim: grey < 200) or ``cup`` (grey < 64).

    ``meta['glaucoma']`` (bool) is set where the class folder tells it.
    """
    if target not in REFUGE_BELOW:
        raise ValueError(f"refuge target must be one of {sorted(REFUGE_BELOW)}, got {target!r}")
    below = REFUGE_BELOW[target]

    def mask_file(path: Path) -> MaskFile:
        return MaskFile(path, positive_above=None, positive_below=below)

    images_root = _require_dir(root / "Training400", "REFUGE training image (Training400)")
    masks_root = _require_dir(
        root / "Annotation-Training400" / "Disc_Cup_Masks", "REFUGE training mask (Annotation-Training400/Disc_Cup_Masks)"
    )
    present = [name for name in REFUGE_CLASSES if (images_root / name).is_dir()]
    if not present:
        raise DatasetLayoutError(f"{images_root}: no class folder found (expected {list(REFUGE_CLASSES)})")
    samples: list[Sample] = []
    for name in present:
        index = _index_by_stem(masks_root / name)
        for image in _list_images(images_root / name):
            mask = _mask_path(index, masks_root / name, image.stem, ".bmp")
            samples.append(
                Sample(
                    id=image.stem,
                    image=ImageFile(image),
                    mask=mask_file(mask),
                    split="train",
                    meta={"glaucoma": name == "Glaucoma", "target": target},
                )
            )

    val_images = root / "REFUGE-Validation400"
    if val_images.is_dir():
        val_masks = _require_dir(
            root / "REFUGE-Validation400-GT" / "Disc_Cup_Masks",
            "REFUGE validation mask (REFUGE-Validation400-GT/Disc_Cup_Masks)",
        )
        # Masks are flat in some releases and split by class in others: index both ways.
        masks: dict[str, tuple[Path, bool | None]] = {}
        for path in _list_images(val_masks, recursive=True):
            parent = path.parent.name if path.parent != val_masks else None
            glaucoma = {"Glaucoma": True, "Non-Glaucoma": False}.get(parent) if parent else None
            masks.setdefault(path.stem, (path, glaucoma))
        for image in _list_images(val_images, recursive=True):
            mask, glaucoma = masks.get(image.stem, (val_masks / f"{image.stem}.bmp", None))
            if glaucoma is None and image.parent.name in REFUGE_CLASSES:
                glaucoma = image.parent.name == "Glaucoma"
            meta = {"target": target} if glaucoma is None else {"glaucoma": glaucoma, "target": target}
            samples.append(Sample(id=image.stem, image=ImageFile(image), mask=mask_file(mask), split="val", meta=meta))
    _check_unique_ids(samples, root)
    return samples


# --------------------------------------------------------------------------------------
# EchoNet-Dynamic
# --------------------------------------------------------------------------------------
def _video_stem(name: str) -> str:
    """FileName without ``.avi``: VolumeTracings.csv carries it, FileList.csv may not."""
    return name[:-4] if name.lower().endswith(".avi") else name


def _polygon_area(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Shoelace area in pixels² (used to tell end-diastole from end-systole)."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


@register_reader("echonet")
def read_echonet(root: Path) -> list[Sample]:
    """EchoNet-Dynamic: one sample per traced (video, frame), normally end-diastole and
    end-systole of every video.

    Image: that frame of ``Videos/<FileName>.avi`` (``np.uint8`` H×W×3). Mask: the left
    ventricle polygon of ``VolumeTracings.csv``: the rows of one (file, frame) in file
    order, the first being the long axis; the outline is X1/Y1 of the remaining rows
    followed by their X2/Y2 in reverse. Size comes from FileList.csv (FrameHeight ×
    FrameWidth). ``split`` from the Split column (TRAIN/VAL/TEST), ``group`` = video;
    ``meta`` has ``frame``, ``phase`` ('ED' for the larger of two tracings, 'ES' for the
    smaller) and the FileList numbers that are present (EF, ESV, EDV, FPS, NumberOfFrames).
    """
    filelist_csv = root / "FileList.csv"
    tracings_csv = root / "VolumeTracings.csv"
    filelist = _read_csv(filelist_csv, ECHONET_FILELIST_COLUMNS)
    tracings = _read_csv(tracings_csv, ECHONET_TRACING_COLUMNS)
    videos = _require_dir(root / "Videos", "EchoNet Videos")

    listed: dict[str, dict] = {}
    for row, record in enumerate(filelist.to_dict("records")):
        stem = _video_stem(record["FileName"])
        split = ECHONET_SPLITS.get(record["Split"].upper())
        if split is None:
            raise DatasetLayoutError(
                f"{filelist_csv}, row {row + 1}: Split = {record['Split']!r}, expected one of {list(ECHONET_SPLITS)}"
            )
        info = {
            "split": split,
            "height": _parse(record["FrameHeight"], int, filelist_csv, row, "FrameHeight"),
            "width": _parse(record["FrameWidth"], int, filelist_csv, row, "FrameWidth"),
            "num_frames": None,
            "meta": {},
        }
        if record.get("NumberOfFrames", ""):
            info["num_frames"] = _parse(record["NumberOfFrames"], int, filelist_csv, row, "NumberOfFrames")
        for column in ("EF", "ESV", "EDV", "FPS"):
            if record.get(column, ""):
                info["meta"][column] = _parse(record[column], float, filelist_csv, row, column)
        listed[stem] = info

    # Rows of one (video, frame) keep their file order: the first is the long axis.
    traces: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    for row, record in enumerate(tracings.to_dict("records")):
        key = (_video_stem(record["FileName"]), _parse(record["Frame"], int, tracings_csv, row, "Frame"))
        point = tuple(_parse(record[c], float, tracings_csv, row, c) for c in ("X1", "Y1", "X2", "Y2"))
        traces.setdefault(key, []).append(point)  # type: ignore[arg-type]

    outlines: dict[tuple[str, int], tuple[tuple[float, ...], tuple[float, ...]]] = {}
    for key, rows in traces.items():
        chords = np.asarray(rows[1:], dtype=float).reshape(-1, 4)
        xs = np.concatenate([chords[:, 0], chords[::-1, 2]])
        ys = np.concatenate([chords[:, 1], chords[::-1, 3]])
        outlines[key] = (tuple(xs.tolist()), tuple(ys.tolist()))

    frames_of: dict[str, list[int]] = {}
    for stem, frame in traces:
        frames_of.setdefault(stem, []).append(frame)

    samples: list[Sample] = []
    for stem, frame in sorted(traces, key=lambda key: (_natural_key(key[0]), key[1])):
        video = videos / f"{stem}.avi"
        where = f"{stem}.avi frame {frame}"
        sample_id = f"{stem}/{frame}"
        info = listed.get(stem)
        if info is None:
            # Without its FileList row the video has no split or size: report it per sample.
            broken = UnavailableSource(tracings_csv, f"{where} is traced but {stem} is not listed in {filelist_csv}")
            samples.append(Sample(id=sample_id, image=broken, mask=broken, group=stem, meta={"frame": frame}))
            continue
        xs, ys = outlines[(stem, frame)]
        meta = {"frame": frame, **info["meta"]}
        if info["num_frames"] is not None:
            meta["NumberOfFrames"] = info["num_frames"]
        traced = frames_of[stem]
        if len(traced) == 2:
            areas = {f: _polygon_area(*outlines[(stem, f)]) for f in traced}
            meta["phase"] = "ED" if areas[frame] == max(areas.values()) else "ES"
        samples.append(
            Sample(
                id=sample_id,
                image=VideoFrame(video, frame, info["height"], info["width"], info["num_frames"]),
                mask=PolygonMask(tracings_csv, xs, ys, info["height"], info["width"], where=where),
                split=info["split"],
                group=stem,
                meta=meta,
            )
        )
    untraced = len(set(listed) - set(frames_of))
    if untraced:
        log.info("echonet: %d video(s) of %s have no tracing in %s and give no sample", untraced, filelist_csv, tracings_csv)
    return samples


# --------------------------------------------------------------------------------------
# ACDC
# --------------------------------------------------------------------------------------
_ACDC_FRAME = re.compile(r"^(patient\d+)_frame(\d+)_gt\.nii(\.gz)?$")


def _read_acdc_info(path: Path) -> dict[str, str]:
    """``Info.cfg`` (``ED: 1``, ``ES: 12``, ``Group: DCM``, ...) as a dict; empty if absent."""
    if not path.is_file():
        return {}
    parser = configparser.ConfigParser()
    try:
        parser.read_string("[info]\n" + path.read_text(encoding="utf-8"))
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise DatasetLayoutError(f"{path}: unreadable Info.cfg ({type(exc).__name__}: {exc})") from exc
    return {key: value.strip() for key, value in parser["info"].items()}


@register_reader("acdc")
def read_acdc(root: Path, labels: Sequence[int] | int = (3,), skip_empty: bool = False) -> list[Sample]:
    """ACDC cardiac MR: one sample per z-slice (axis 2) of every frame volume with a
    ``_gt`` file, from ``training/`` (split 'train') and ``testing/`` (split 'test').

    ``root`` is the folder holding ``training/``/``testing/`` (or their parent
    ``database/``). Image: ``np.float32`` X×Y in [0, 1], normalised per volume. Mask:
    ``np.uint8`` X×Y, 1 where the ground-truth label is in ``labels``.

    Args:
        labels: label values counted as foreground (0 background, 1 RV, 2 myocardium,
            3 LV); default ``[3]`` (LV cavity).
        skip_empty: drop slices with no foreground (reads every ground-truth volume now).

    ``group`` = patient (both frames and all slices stay in one split); ``meta`` has
    ``frame``, ``slice``, and from Info.cfg ``phase`` ('ED'/'ES') and ``pathology``.
    A frame whose ground truth cannot be read while listing is still listed (as one
    sample whose sources raise) so that ``on_bad_sample`` decides.
    """
    label_values = tuple(int(v) for v in ([labels] if isinstance(labels, int) else labels))
    unknown = sorted(set(label_values) - set(ACDC_LABELS.values()))
    if not label_values or unknown:
        raise ValueError(f"acdc labels must be a non-empty subset of {ACDC_LABELS}, got {list(label_values)}")
    base = root / "database" if not (root / "training").is_dir() and (root / "database").is_dir() else root
    parts = [(name, split) for name, split in (("training", "train"), ("testing", "test")) if (base / name).is_dir()]
    if not parts:
        raise DatasetLayoutError(f"{base / 'training'}: ACDC training/ (or testing/) folder not found")

    samples: list[Sample] = []
    for folder_name, split in parts:
        for patient_dir in sorted((p for p in (base / folder_name).iterdir() if p.is_dir()), key=_path_key):
            info = _read_acdc_info(patient_dir / "Info.cfg")
            phases = {}
            for phase in ("ED", "ES"):
                if info.get(phase.lower(), "").isdigit():
                    phases[int(info[phase.lower()])] = phase
            for gt in sorted(patient_dir.iterdir(), key=_path_key):
                match = _ACDC_FRAME.match(gt.name)
                if not match:
                    continue
                patient, frame = match.group(1), int(match.group(2))
                image = gt.with_name(gt.name.replace("_gt.nii", ".nii"))
                meta = {"frame": frame}
                if frame in phases:
                    meta["phase"] = phases[frame]
                if "group" in info:
                    meta["pathology"] = info["group"]
                frame_id = f"{patient}_frame{frame:02d}"
                try:
                    depth = _nifti_shape(gt)[2]
                    keep = range(depth)
                    if skip_empty:
                        volume = np.isin(_label_volume(str(gt)), label_values)
                        keep = [z for z in range(depth) if volume[:, :, z].any()]
                except BadSampleError as exc:
                    broken = UnavailableSource(exc.path, exc.reason)
                    samples.append(Sample(id=frame_id, image=broken, mask=broken, split=split, group=patient, meta=meta))
                    continue
                for z in keep:
                    samples.append(
                        Sample(
                            id=f"{frame_id}_slice{z:02d}",
                            image=NiftiSlice(image, z),
                            mask=NiftiLabelSlice(gt, z, label_values),
                            split=split,
                            group=patient,
                            meta={**meta, "slice": z},
                        )
                    )
    _check_unique_ids(samples, base)
    return samples


# --------------------------------------------------------------------------------------
# ISIC 2018, BUSI, CVC-ClinicDB, generic folders
# --------------------------------------------------------------------------------------
_ISIC_IMAGE = re.compile(r"^ISIC_\d+\.(jpe?g|png)$", re.IGNORECASE)


@register_reader("isic2018")
def read_isic2018(root: Path) -> list[Sample]:
    """ISIC 2018 Task 1: ``ISIC2018_Task1-2_Training_Input/ISIC_<7d>.jpg`` +
    ``ISIC2018_Task1_Training_GroundTruth/ISIC_<7d>_segmentation.png``.

    Only ``ISIC_<digits>`` images are read (the folders also hold LICENSE/ATTRIBUTION
    text files). The training set has no split tag; the Validation/Test folders, when
    present together with their ground truth, give splits 'val'/'test'.
    """
    _require_dir(root / ISIC2018_SPLITS[0][1], "ISIC 2018 training input")
    _require_dir(root / ISIC2018_SPLITS[0][2], "ISIC 2018 training ground-truth")
    samples: list[Sample] = []
    for split, input_name, truth_name in ISIC2018_SPLITS:
        images, truth = root / input_name, root / truth_name
        if not images.is_dir():
            continue
        if not truth.is_dir():
            log.info("isic2018: %s has no ground-truth folder %s; its images are not used", images, truth)
            continue
        for image in _list_images(images):
            if _ISIC_IMAGE.match(image.name):
                mask = MaskFile(truth / f"{image.stem}_segmentation.png")
                samples.append(Sample(id=image.stem, image=ImageFile(image), mask=mask, split=split))
    _check_unique_ids(samples, root)
    return samples


_BUSI_MASK = re.compile(r"^(?P<stem>.+)_mask(_\d+)?$")


@register_reader("busi")
def read_busi(root: Path, classes: Sequence[str] | str | None = None) -> list[Sample]:
    """BUSI breast ultrasound: ``Dataset_BUSI_with_GT/<class>/<name> (n).png`` with masks
    ``<name> (n)_mask.png`` and sometimes ``_mask_1.png``, ``_mask_2.png`` (one per
    lesion; the sample's mask is their union).

    ``root`` is the folder holding ``Dataset_BUSI_with_GT/`` or that folder itself.

    Args:
        classes: class folders to read (default all: benign, malignant, normal).

    ``meta['class']`` is the class folder. No split.
    """
    base = root / "Dataset_BUSI_with_GT" if (root / "Dataset_BUSI_with_GT").is_dir() else root
    if isinstance(classes, str):
        classes = [classes]
    wanted = list(classes) if classes is not None else [c for c in BUSI_CLASSES if (base / c).is_dir()]
    if not wanted:
        raise DatasetLayoutError(
            f"{root / 'Dataset_BUSI_with_GT'}: BUSI folder not found (no {list(BUSI_CLASSES)} class folder in {base})"
        )
    samples: list[Sample] = []
    for name in wanted:
        folder = _require_dir(base / name, f"BUSI class {name!r}")
        masks: dict[str, list[Path]] = {}
        images: list[Path] = []
        for path in _list_images(folder):
            match = _BUSI_MASK.match(path.stem)
            if match:
                masks.setdefault(match.group("stem"), []).append(path)
            else:
                images.append(path)
        for image in images:
            parts = masks.get(image.stem) or [folder / f"{image.stem}_mask.png"]
            mask = MaskUnion(tuple(MaskFile(p) for p in parts))
            samples.append(Sample(id=image.stem, image=ImageFile(image), mask=mask, meta={"class": name}))
    _check_unique_ids(samples, base)
    return samples


@register_reader("cvc_clinicdb")
def read_cvc_clinicdb(root: Path) -> list[Sample]:
    """CVC-ClinicDB: ``Original/<n>.tif`` + ``Ground Truth/<n>.tif`` (``.png`` accepted too).

    ``root`` is the folder holding ``Original/`` (or its ``PNG/``/``TIF/`` parent, as in
    some redistributions). No split.
    """
    candidates = [root, root / "TIF", root / "PNG", root / "CVC-ClinicDB"]
    base = next((c for c in candidates if (c / "Original").is_dir()), root)
    images = _require_dir(base / "Original", "CVC-ClinicDB Original")
    masks = _require_dir(base / "Ground Truth", "CVC-ClinicDB 'Ground Truth'")
    samples = _pair_samples(_list_images(images), masks)
    _check_unique_ids(samples, base)
    return samples


@register_reader("seg_folder")
def read_seg_folder(
    root: Path,
    image_glob: str | None = None,
    mask_name: str = "{stem}{suffix}",
    mask_threshold: int = 127,
    images_dir: str = "images",
    masks_dir: str = "masks",
) -> list[Sample]:
    """A generic ``images/`` + ``masks/`` pair.

    Args:
        image_glob: glob under ``images/`` (``**/`` recurses); default every file with a
            known image extension directly in ``images/``.
        mask_name: format string of the mask file name, with ``{stem}`` (image name
            without extension), ``{suffix}`` (its extension, with the dot) and ``{name}``;
            e.g. ``"{stem}_mask.png"``. The mask sits at the image's relative folder under
            ``masks/``.
        mask_threshold: grey level above which a mask pixel is foreground (127 for 0/255
            masks; 0 for masks stored as 0/1).
        images_dir, masks_dir: the two folder names.

    Ids are the image paths relative to ``images/`` without extension. No split.
    """
    images = _require_dir(root / images_dir, "image")
    masks = _require_dir(root / masks_dir, "mask")
    if image_glob is None:
        paths = _list_images(images)
    else:
        paths = sorted((p for p in images.glob(image_glob) if p.is_file()), key=_path_key)
    samples = []
    for image in paths:
        relative = image.relative_to(images)
        try:
            name = mask_name.format(stem=image.stem, suffix=image.suffix, name=image.name)
        except (KeyError, IndexError) as exc:
            raise ValueError(f"seg_folder mask_name {mask_name!r} may only use {{stem}}, {{suffix}}, {{name}}") from exc
        samples.append(
            Sample(
                id=relative.with_suffix("").as_posix(),
                image=ImageFile(image),
                mask=MaskFile(masks / relative.parent / name, positive_above=mask_threshold),
            )
        )
    _check_unique_ids(samples, root)
    return samples
