"""Readers for the classification datasets' on-disk layouts (docs/data.md).

Every reader has the signature ``reader(root, classes=None, **options) -> list[Sample]``:

- ``classes`` is the ordered class-name list of the config; ``Sample.label`` is the
  index into it (``int`` in ``[0, len(classes))``).
- A CSV row whose label is not in ``classes`` is a :class:`DatasetLayoutError` naming the
  CSV, the row and the value, except rows that the task definition drops on purpose
  (CheXpert/NIH rows that are neither the finding nor "No Finding", ungradable
  Messidor-2 images, ISIC diagnoses outside a class subset, grades a ``label_map`` sends
  to ``None``). Those are counted in a message on the ``medmark.data`` logger.
- Row numbers in messages count data rows from 1 (the header is line 1, so row *n* is
  line *n + 1* of the file).
- ``split`` is set only where the dataset defines one (``'test'`` for CheXpert's
  valid.csv, IDRiD's testing set, NIH's test_list.txt); ``group`` is the patient (or
  lesion) id where the dataset has one, so that drawn splits never divide a patient.
- Images are :class:`ImageFile` sources. A missing image file is not an error here: the
  sample is created anyway and the data module's validation pass (``size()``/``read()``)
  names the file and applies ``data.on_bad_sample``. A missing CSV or image *folder* is a
  layout error raised at once.

CSV cells are read as text (blank = ``""``), with stray spaces stripped from headers and
cells, so ids keep their leading zeros and blanks stay distinguishable from 0.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.readers import register_reader
from datamodules.samples import BadSampleError, DatasetLayoutError, ImageFile, MaskFile, MaskUnion, Sample, Source

log = logging.getLogger("medmark.data")

CHEXPERT_COLUMNS = (
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
    "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)
IDRID_LESIONS = ("MA", "HE", "EX", "SE")  # microaneurysms, haemorrhages, hard/soft exudates; OD is anatomy
NO_FINDING = "No Finding"
UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------
def _where(csv: Path, index: int) -> str:
    """``'<csv>, row n'`` for the data row at 0-based position ``index``."""
    return f"{csv}, row {index + 1}"


def _read_csv(path: Path, required: Iterable[str]) -> pd.DataFrame:
    """Read ``path`` as text cells, strip headers/cells, drop all-blank rows, check columns.

    Returns a DataFrame whose index is the 0-based data row (kept after dropping blank rows,
    so messages still point at the right row).
    """
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: CSV not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetLayoutError(f"{path}: unreadable CSV ({type(exc).__name__}: {exc})") from exc
    frame.columns = [str(column).strip() for column in frame.columns]
    repeated = sorted(name for name, count in Counter(frame.columns).items() if count > 1)
    if repeated:
        raise DatasetLayoutError(f"{path}: column(s) {repeated} appear more than once")
    frame = frame.apply(lambda column: column.str.strip())
    # Spreadsheet exports (IDRiD's label files) end with rows of bare commas: not samples.
    frame = frame[~(frame == "").all(axis=1)]
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise DatasetLayoutError(
            f"{path}: missing column(s) {missing}; found columns {list(frame.columns)}"
        )
    return frame


def _parse_number(value: str, csv: Path, index: int, column: str) -> float:
    """A numeric cell as float; blank -> NaN; anything else is a layout error."""
    if value == "":
        return math.nan
    try:
        return float(value)
    except ValueError:
        raise DatasetLayoutError(
            f"{_where(csv, index)}: column {column!r} has {value!r}, expected a number"
        ) from None


def _parse_grade(value: str, csv: Path, index: int, column: str) -> int:
    """An integer grade cell ("2" or "2.0"); blank or fractional is a layout error."""
    number = _parse_number(value, csv, index, column)
    if math.isnan(number) or number != int(number):
        raise DatasetLayoutError(
            f"{_where(csv, index)}: column {column!r} has {value!r}, expected an integer grade"
        )
    return int(number)


def _normalise_classes(classes: Sequence[str] | None, default: Sequence[str] | None, layout: str) -> list[str]:
    if classes is None:
        if default is None:
            raise ValueError(f"layout {layout!r} needs data.classes")
        return [str(name) for name in default]
    names = [str(name) for name in classes]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"data.classes lists {duplicates} more than once: {names}")
    return names


def _normalise_label_map(label_map: Mapping | None) -> dict[int, str | None] | None:
    """Config ``{grade: class name | None}`` (keys may arrive as "0" or 0) -> ``{int: str|None}``."""
    if label_map is None:
        return None
    out: dict[int, str | None] = {}
    for key, value in dict(label_map).items():
        try:
            grade = int(float(str(key)))
        except ValueError:
            raise ValueError(f"label_map key {key!r} is not an integer grade") from None
        out[grade] = None if value is None else str(value)
    return out


def _class_index(name: str, classes: list[str], csv: Path, index: int, column: str) -> int:
    if name not in classes:
        raise DatasetLayoutError(
            f"{_where(csv, index)}: label {name!r} (column {column!r}) is not in the class list; "
            f"expected one of {classes}"
        )
    return classes.index(name)


def _grade_label(
    grade: int, label_map: dict[int, str | None] | None, classes: list[str], csv: Path, index: int, column: str
) -> int | None:
    """Grade -> class index via ``label_map`` (default: the grade as a string, "0".."4").

    Returns None for a grade the map sends to ``None`` (dropped on purpose by the config).
    """
    if label_map is None:
        return _class_index(str(grade), classes, csv, index, column)
    if grade not in label_map:
        raise DatasetLayoutError(
            f"{_where(csv, index)}: grade {grade} (column {column!r}) is not in label_map "
            f"(keys {sorted(label_map)}); expected classes {classes}"
        )
    name = label_map[grade]
    return None if name is None else _class_index(name, classes, csv, index, column)


def _grade_classes(grades: Iterable[int], label_map: Mapping | None) -> list[str] | None:
    """Default class list for a graded dataset: the grade strings, or None if a map is set."""
    return [str(grade) for grade in grades] if label_map is None else None


class _FileIndex:
    """Names of the files in one folder, listed once, looked up exactly then case-blind.

    Real downloads disagree with their CSVs on extension case (Messidor-2's ``.JPG``);
    a name found in neither way maps to ``folder / name`` so the validation pass names it.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        names = [entry.name for entry in os.scandir(folder) if entry.is_file()] if folder.is_dir() else []
        self.exact = set(names)
        self.lower = {name.lower(): name for name in names}
        self.by_stem: dict[str, str] = {}
        for name in sorted(names):
            self.by_stem.setdefault(Path(name).stem.lower(), name)

    def path(self, name: str) -> Path:
        if name in self.exact:
            return self.folder / name
        return self.folder / self.lower.get(name.lower(), name)

    def path_by_stem(self, stem: str, extension: str) -> Path:
        """``stem + extension`` if present, else any file with that stem (e.g. .jpeg)."""
        preferred = stem + extension
        if preferred in self.exact or preferred.lower() in self.lower:
            return self.path(preferred)
        return self.folder / self.by_stem.get(stem.lower(), preferred)


def _require_dir(folder: Path, what: str) -> Path:
    if not folder.is_dir():
        raise DatasetLayoutError(f"{folder}: {what} folder not found")
    return folder


def _check_unique_ids(samples: list[Sample], where: Path) -> None:
    counts = Counter(sample.id for sample in samples)
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if repeated:
        raise DatasetLayoutError(f"{where}: sample id(s) listed more than once: {repeated[:10]}")


def _log_dropped(layout: str, csv: Path, kept: int, dropped: Counter) -> None:
    if dropped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(dropped.items()))
        log.info("%s: %s: kept %d row(s), dropped %d (%s)", layout, csv, kept, sum(dropped.values()), reasons)


def _rows(frame: pd.DataFrame) -> Iterator[tuple[int, dict[str, str]]]:
    """(0-based data row, {column: cell}) pairs.

    Built from per-column lists: iterrows and to_dict("records") box every cell of
    pandas' string arrays one by one, seconds on CheXpert's 223k rows.
    """
    columns = list(frame.columns)
    cells = [frame[column].tolist() for column in columns]
    for index, row in zip(frame.index.tolist(), zip(*cells)):
        yield index, dict(zip(columns, row))


def _int_or_none(value: str) -> int | None:
    """``"58"``, ``"58.0"`` or NIH's older ``"058Y"`` -> 58; blank, months/days or text -> None."""
    try:
        return int(float(re.sub(r"[Yy]$", "", value)))
    except ValueError:
        return None


# --------------------------------------------------------------------------------------
# Lesion masks (IDRiD segmentation ground truth)
# --------------------------------------------------------------------------------------
_IDRID_LESION_FILE = re.compile(r"^(IDRiD_\d+)_([A-Z]{2})\.tiff?$", re.IGNORECASE)


def _idrid_lesion_index(folder: Path) -> dict[tuple[str, str], list[Path]]:
    """``{(split, lower-case image name): [lesion mask paths]}`` from one rglob over ``folder``.

    The split ('train'/'test') comes from a parent folder named like "a. Training Set" /
    "b. Testing Set", because IDRiD restarts its numbering in each set. The optic disc
    (``_OD``) is anatomy, not a lesion, and is left out.
    """
    index: dict[tuple[str, str], list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        match = _IDRID_LESION_FILE.match(path.name)
        if not match or match.group(2).upper() not in IDRID_LESIONS:
            continue
        parents = " ".join(part.lower() for part in path.relative_to(folder).parts[:-1])
        split = "test" if "testing" in parents else "train" if "training" in parents else None
        if split is None:
            continue
        index.setdefault((split, match.group(1).lower()), []).append(path)
    return index


# --------------------------------------------------------------------------------------
# CheXpert
# --------------------------------------------------------------------------------------
def _binary_classes(classes: Sequence[str] | None, finding: str | None, layout: str) -> tuple[list[str], str, int]:
    """(classes, finding, positive index) of a one-finding-vs-normal task.

    ``classes`` has two names; the positive is the one equal to ``finding``, or the second
    one when neither is (so ``[normal, opacity]`` with ``finding: Lung Opacity`` works).
    ``finding`` defaults to ``classes[1]``.
    """
    if finding is None:
        if classes is None or len(classes) != 2:
            raise ValueError(f"layout {layout!r} needs reader option 'finding' (or data.classes = [negative, finding])")
        finding = str(classes[1])
    names = _normalise_classes(classes, [NO_FINDING, finding], layout)
    if len(names) != 2:
        raise ValueError(f"layout {layout!r} is a two-class task [negative, {finding!r}]; got data.classes={names}")
    positive = names.index(finding) if finding in names else 1
    return names, finding, positive


def _chexpert_dataset_dir(root: Path) -> Path:
    if (root / "train.csv").is_file():
        return root
    candidates = sorted(child for child in root.iterdir() if child.is_dir() and (child / "train.csv").is_file())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DatasetLayoutError(
            f"{root}: no train.csv here nor in a sub-folder (expected e.g. CheXpert-v1.0-small/train.csv)"
        )
    raise DatasetLayoutError(f"{root}: several CheXpert folders with train.csv: {[c.name for c in candidates]}")


def _chexpert_image(dataset_dir: Path, relative: str) -> tuple[str, Path]:
    """(sample id, image path) of a CSV ``Path`` cell.

    ``Path`` starts with the dataset folder's own name (``CheXpert-v1.0-small/train/...``);
    that first part is replaced by the folder actually found, so a renamed folder still
    works. Paths that start at ``train/``/``valid/`` are taken as relative to it.
    """
    # String operations, not PurePath: this runs once per row of a 223k-row CSV.
    parts = relative.replace("\\", "/").split("/")
    if len(parts) > 1 and parts[0] not in ("train", "valid", "test"):
        parts = parts[1:]
    inner = "/".join(parts)
    stem, dot, extension = inner.rpartition(".")
    return (stem if dot and "/" not in extension else inner), dataset_dir / inner


_PATIENT = re.compile(r"patient\d+")


@register_reader("chexpert")
def read_chexpert(
    root: Path,
    classes: Sequence[str] | None = None,
    finding: str | None = None,
    uncertain: str = "ignore",
    frontal_only: bool = True,
) -> list[Sample]:
    """CheXpert as one finding vs No Finding.

    Args:
        root: the dataset folder (holding ``train.csv``) or its parent.
        classes: ``[negative, positive]`` names; the positive is the one equal to
            ``finding`` (else the second). Labels: negative → its index, positive → its index.
        finding: a pathology column, e.g. ``"Lung Opacity"`` (default: ``classes[1]``).
        uncertain: what a −1.0 (uncertain) finding cell means —
            ``ignore`` (default): the row is dropped;
            ``ones``: the finding is positive;
            ``zeros``: the finding is not positive, so the row is a negative only if
            ``No Finding`` is 1.0 and is dropped otherwise.
        frontal_only: keep only ``Frontal/Lateral == Frontal`` rows (default True).

    Rule per row (after the uncertain policy): finding 1.0 → positive; else ``No Finding``
    1.0 → negative; else dropped on purpose (another pathology, or nothing labelled).
    ``train.csv`` rows get split None (the data module carves val by patient),
    ``valid.csv`` rows split 'test'; group is the ``patientNNNNN`` part of the path;
    meta: ``view`` (Frontal/Lateral), ``projection`` (AP/PA), ``sex``, ``age`` (int|None).
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"chexpert option uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
    names, finding, positive = _binary_classes(classes, finding, "chexpert")
    if finding in CHEXPERT_COLUMNS[:6]:
        raise ValueError(f"chexpert option finding must be a pathology column, not {finding!r}")
    negative = 1 - positive
    dataset_dir = _chexpert_dataset_dir(root)
    required = ["Path", NO_FINDING, finding] + (["Frontal/Lateral"] if frontal_only else [])

    samples: list[Sample] = []
    for csv_name, split in (("train.csv", None), ("valid.csv", "test")):
        csv = dataset_dir / csv_name
        if split == "test" and not csv.is_file():
            log.info("chexpert: %s not found; the test split will be drawn from train.csv by patient", csv)
            continue
        frame = _read_csv(csv, [])
        if finding not in frame.columns:
            raise DatasetLayoutError(
                f"{csv}: finding {finding!r} is not a column; findings: "
                f"{[c for c in frame.columns if c not in CHEXPERT_COLUMNS[:6]]}"
            )
        missing = [column for column in required if column not in frame.columns]
        if missing:
            raise DatasetLayoutError(f"{csv}: missing column(s) {missing}; found columns {list(frame.columns)}")
        dropped: Counter = Counter()
        kept = 0
        for index, row in _rows(frame):
            if frontal_only and row["Frontal/Lateral"].lower() != "frontal":
                dropped["lateral"] += 1
                continue
            value = _parse_number(row[finding], csv, index, finding)
            normal = _parse_number(row[NO_FINDING], csv, index, NO_FINDING)
            for column, number in ((finding, value), (NO_FINDING, normal)):
                if not math.isnan(number) and number not in (1.0, 0.0, -1.0):
                    raise DatasetLayoutError(
                        f"{_where(csv, index)}: column {column!r} has {row[column]!r}; expected 1.0, 0.0, -1.0 or blank"
                    )
            if value == -1.0:
                if uncertain == "ignore":
                    dropped["uncertain"] += 1
                    continue
                value = 1.0 if uncertain == "ones" else 0.0
            if value == 1.0:
                label = positive
            elif normal == 1.0:
                label = negative
            else:
                dropped["neither finding nor No Finding"] += 1
                continue
            sample_id, image = _chexpert_image(dataset_dir, row["Path"])
            patient = _PATIENT.search(row["Path"])
            samples.append(
                Sample(
                    id=sample_id,
                    image=ImageFile(image),
                    label=label,
                    split=split,
                    group=patient.group(0) if patient else None,
                    meta={
                        "view": row.get("Frontal/Lateral", ""),
                        "projection": row.get("AP/PA", ""),
                        "sex": row.get("Sex", ""),
                        "age": _int_or_none(row.get("Age", "")),
                    },
                )
            )
            kept += 1
        _log_dropped("chexpert", csv, kept, dropped)
    _check_unique_ids(samples, dataset_dir)
    log.info("chexpert: %d sample(s), classes %s (finding %r, uncertain=%s)", len(samples), names, finding, uncertain)
    return samples


# --------------------------------------------------------------------------------------
# APTOS 2019
# --------------------------------------------------------------------------------------
@register_reader("aptos")
def read_aptos(root: Path, classes: Sequence[str] | None = None, label_map: Mapping | None = None) -> list[Sample]:
    """APTOS 2019 blindness detection: ``train.csv`` (id_code, diagnosis 0–4), ``train_images/``.

    Labels: ``diagnosis`` grade → ``label_map[grade]`` (default: the grade string "0".."4")
    → index in ``classes``; a grade mapped to None is dropped (logged). The unlabelled
    ``test.csv``/``test_images`` are ignored. No patient ids: group None, split None.
    If a ``lesion_masks/`` folder exists (the synthetic generator writes one), every sample
    gets ``lesion_mask = MaskFile(lesion_masks/<id_code>.png)``; a missing mask file is left
    to the validation pass, so masks are present for all samples or none.
    """
    names = _normalise_classes(classes, _grade_classes(range(5), label_map), "aptos")
    grade_map = _normalise_label_map(label_map)
    csv = root / "train.csv"
    frame = _read_csv(csv, ["id_code", "diagnosis"])
    images = _FileIndex(_require_dir(root / "train_images", "APTOS train_images"))
    lesion_dir = root / "lesion_masks"
    lesions = _FileIndex(lesion_dir) if lesion_dir.is_dir() else None

    samples: list[Sample] = []
    dropped: Counter = Counter()
    for index, row in _rows(frame):
        code = row["id_code"]
        if code == "":
            raise DatasetLayoutError(f"{_where(csv, index)}: blank id_code")
        grade = _parse_grade(row["diagnosis"], csv, index, "diagnosis")
        label = _grade_label(grade, grade_map, names, csv, index, "diagnosis")
        if label is None:
            dropped["grade mapped to None by label_map"] += 1
            continue
        samples.append(
            Sample(
                id=code,
                image=ImageFile(images.path_by_stem(code, ".png")),
                label=label,
                lesion_mask=MaskFile(lesions.path_by_stem(code, ".png")) if lesions is not None else None,
                meta={"grade": grade},
            )
        )
    _log_dropped("aptos", csv, len(samples), dropped)
    _check_unique_ids(samples, csv)
    return samples


# --------------------------------------------------------------------------------------
# IDRiD disease grading
# --------------------------------------------------------------------------------------
IDRID_TARGETS = {"retinopathy": ("Retinopathy grade", range(5)), "macular_edema": ("Risk of macular edema", range(3))}


def _find_one(folder: Path, exact: str, pattern: str) -> Path:
    """``folder/exact`` if it exists, else the single match of ``pattern`` in ``folder``."""
    if (folder / exact).exists():
        return folder / exact
    matches = sorted(folder.glob(pattern)) if folder.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    raise DatasetLayoutError(
        f"{folder / exact}: not found" + (f" (several candidates: {[m.name for m in matches]})" if matches else "")
    )


@register_reader("idrid")
def read_idrid(
    root: Path,
    classes: Sequence[str] | None = None,
    target: str = "retinopathy",
    label_map: Mapping | None = None,
    lesion_dir: str | bool | None = None,
) -> list[Sample]:
    """IDRiD disease grading (``B. Disease Grading/``), with optional lesion masks.

    Args:
        root: the IDRiD folder holding ``B. Disease Grading`` (and ``A. Segmentation``).
        classes: class names; default the grade strings ("0".."4" retinopathy, "0".."2"
            macular edema).
        target: ``retinopathy`` (``Retinopathy grade``, 0–4) or ``macular_edema``
            (``Risk of macular edema``, 0–2).
        label_map: ``{grade: class name | None}``, as for APTOS.
        lesion_dir: where to look for ``IDRiD_001_{MA,HE,EX,SE}.tif`` lesion masks —
            None (default): ``A. Segmentation`` if it exists; False: none; a path
            (relative to ``root`` or absolute).

    The training set gets split None, the testing set split 'test'. IDRiD restarts image
    numbering in each set, so ids are ``train/IDRiD_001`` and ``test/IDRiD_001``. IDRiD
    gives no patient ids: group None. ``lesion_mask`` is a :class:`~datamodules.samples.MaskUnion` of the
    lesion files whose name matches the image name within the same set, and None for
    images without any (an unannotated image is not known to be lesion-free).
    """
    if target not in IDRID_TARGETS:
        raise ValueError(f"idrid option target must be one of {sorted(IDRID_TARGETS)}, got {target!r}")
    column, grades = IDRID_TARGETS[target]
    names = _normalise_classes(classes, _grade_classes(grades, label_map), "idrid")
    grade_map = _normalise_label_map(label_map)
    grading = _require_dir(root / "B. Disease Grading", "IDRiD 'B. Disease Grading'")
    originals = grading / "1. Original Images"
    truths = grading / "2. Groundtruths"

    lesions: dict[tuple[str, str], list[Path]] = {}
    if lesion_dir is not False:
        folder = root / "A. Segmentation" if lesion_dir in (None, True) else root / str(lesion_dir)
        if lesion_dir not in (None, True) and not folder.is_dir():
            raise DatasetLayoutError(f"{folder}: lesion_dir folder not found")
        if folder.is_dir():
            lesions = _idrid_lesion_index(folder)

    samples: list[Sample] = []
    for split, set_name, csv_name in (
        (None, "a. Training Set", "a. IDRiD_Disease Grading_Training Labels.csv"),
        ("test", "b. Testing Set", "b. IDRiD_Disease Grading_Testing Labels.csv"),
    ):
        csv = _find_one(truths, csv_name, "*Training*.csv" if split is None else "*Testing*.csv")
        frame = _read_csv(csv, ["Image name", column])
        images = _FileIndex(_require_dir(originals / set_name, "IDRiD images"))
        prefix = "test" if split == "test" else "train"
        dropped: Counter = Counter()
        kept = 0
        for index, row in _rows(frame):
            # The label files give "IDRiD_001"; tolerate an edited copy that adds ".jpg".
            name = re.sub(r"\.(jpe?g|png|tiff?)$", "", row["Image name"], flags=re.IGNORECASE)
            if name == "":
                raise DatasetLayoutError(f"{_where(csv, index)}: blank 'Image name'")
            grade = _parse_grade(row[column], csv, index, column)
            label = _grade_label(grade, grade_map, names, csv, index, column)
            if label is None:
                dropped["grade mapped to None by label_map"] += 1
                continue
            parts = lesions.get((prefix, name.lower()), [])
            samples.append(
                Sample(
                    id=f"{prefix}/{name}",
                    image=ImageFile(images.path_by_stem(name, ".jpg")),
                    label=label,
                    split=split,
                    lesion_mask=MaskUnion(tuple(MaskFile(p, positive_above=0) for p in parts)) if parts else None,
                    meta={"grade": grade, "set": prefix},
                )
            )
            kept += 1
        _log_dropped("idrid", csv, kept, dropped)
    with_lesions = sum(sample.lesion_mask is not None for sample in samples)
    if lesions:
        log.info("idrid: %d of %d image(s) have lesion masks", with_lesions, len(samples))
    _check_unique_ids(samples, grading)
    return samples


# --------------------------------------------------------------------------------------
# Messidor-2
# --------------------------------------------------------------------------------------
MESSIDOR_TARGETS = {"dr_grade": ("adjudicated_dr_grade", range(5)), "dme": ("adjudicated_dme", range(2))}


@register_reader("messidor2")
def read_messidor2(
    root: Path,
    classes: Sequence[str] | None = None,
    target: str = "dr_grade",
    label_map: Mapping | None = None,
) -> list[Sample]:
    """Messidor-2: ``messidor_data.csv`` + ``IMAGES/`` (or ``images/``).

    ``image_id`` includes the extension (matched case-blind against the folder: the
    download mixes ``.png``/``.JPG``). Rows with ``adjudicated_gradable == 0`` or a blank
    target cell are dropped and counted in a log message. ``target``: ``dr_grade`` (0–4)
    or ``dme`` (0–1); ``label_map`` as for APTOS; default classes the grade strings.
    Messidor-2 gives no patient ids in this CSV: group None, split None.
    """
    if target not in MESSIDOR_TARGETS:
        raise ValueError(f"messidor2 option target must be one of {sorted(MESSIDOR_TARGETS)}, got {target!r}")
    column, grades = MESSIDOR_TARGETS[target]
    names = _normalise_classes(classes, _grade_classes(grades, label_map), "messidor2")
    grade_map = _normalise_label_map(label_map)
    csv = root / "messidor_data.csv"
    frame = _read_csv(csv, ["image_id", column, "adjudicated_gradable"])
    folder = next((root / name for name in ("IMAGES", "images") if (root / name).is_dir()), None)
    if folder is None:
        raise DatasetLayoutError(f"{root}: Messidor-2 image folder not found (expected IMAGES/ or images/)")
    images = _FileIndex(folder)

    samples: list[Sample] = []
    dropped: Counter = Counter()
    for index, row in _rows(frame):
        gradable = _parse_number(row["adjudicated_gradable"], csv, index, "adjudicated_gradable")
        if gradable == 0:
            dropped["ungradable"] += 1
            continue
        if row[column] == "":
            dropped[f"blank {column}"] += 1
            continue
        label = _grade_label(_parse_grade(row[column], csv, index, column), grade_map, names, csv, index, column)
        if label is None:
            dropped["grade mapped to None by label_map"] += 1
            continue
        image_id = row["image_id"]
        if image_id == "":
            raise DatasetLayoutError(f"{_where(csv, index)}: blank image_id")
        samples.append(
            Sample(
                id=image_id,
                image=ImageFile(images.path(image_id)),
                label=label,
                meta={"dr_grade": _int_or_none(row.get("adjudicated_dr_grade", "")),
                      "dme": _int_or_none(row.get("adjudicated_dme", ""))},
            )
        )
    # Ungradable images are expected in Messidor-2, but never dropped without a count.
    _log_dropped("messidor2", csv, len(samples), dropped)
    _check_unique_ids(samples, csv)
    return samples


# --------------------------------------------------------------------------------------
# ISIC 2019
# --------------------------------------------------------------------------------------
@register_reader("isic2019")
def read_isic2019(root: Path, classes: Sequence[str] | None = None) -> list[Sample]:
    """ISIC 2019: ``ISIC_2019_Training_GroundTruth.csv`` (image + one-hot columns) and
    ``ISIC_2019_Training_Input/<image>.jpg``.

    Label = the one diagnosis column holding 1.0; a row with none or several is a layout
    error naming the row. ``classes`` (default: every diagnosis column of the CSV) must be
    column names; a subset is allowed and rows of the other diagnoses are dropped (logged).
    Group = ``lesion_id`` from ``ISIC_2019_Training_Metadata.csv`` when that file has the
    column (blank lesion ids → None), else None. Split None. meta: age, sex, site when known.
    """
    csv = root / "ISIC_2019_Training_GroundTruth.csv"
    frame = _read_csv(csv, ["image"])
    diagnoses = [column for column in frame.columns if column != "image"]
    names = _normalise_classes(classes, diagnoses, "isic2019")
    missing = [name for name in names if name not in diagnoses]
    if missing:
        raise DatasetLayoutError(
            f"{csv}: missing column(s) {missing} named in data.classes; diagnosis columns {diagnoses}"
        )
    folder = _require_dir(root / "ISIC_2019_Training_Input", "ISIC_2019_Training_Input")
    # Some archives unpack into a folder of the same name inside itself.
    if (folder / folder.name).is_dir():
        folder = folder / folder.name
    images = _FileIndex(folder)

    metadata: dict[str, dict[str, str]] = {}
    meta_csv = root / "ISIC_2019_Training_Metadata.csv"
    has_lesions = False
    if meta_csv.is_file():
        meta_frame = _read_csv(meta_csv, ["image"])
        has_lesions = "lesion_id" in meta_frame.columns
        metadata = {row["image"]: row for _, row in _rows(meta_frame)}

    samples: list[Sample] = []
    dropped: Counter = Counter()
    for index, row in _rows(frame):
        hot = []
        for column in diagnoses:
            number = _parse_number(row[column], csv, index, column)
            if number not in (0.0, 1.0):
                raise DatasetLayoutError(
                    f"{_where(csv, index)}: column {column!r} has {row[column]!r}; expected 1.0 or 0.0"
                )
            if number == 1.0:
                hot.append(column)
        if len(hot) != 1:
            raise DatasetLayoutError(
                f"{_where(csv, index)} (image {row['image']!r}): expected exactly one diagnosis column = 1, "
                f"found {hot or 'none'}"
            )
        if hot[0] not in names:
            dropped[f"{hot[0]} (not in data.classes)"] += 1
            continue
        info = metadata.get(row["image"], {})
        samples.append(
            Sample(
                id=row["image"],
                image=ImageFile(images.path_by_stem(row["image"], ".jpg")),
                label=names.index(hot[0]),
                group=(info.get("lesion_id") or None) if has_lesions else None,
                meta={"age": _int_or_none(info.get("age_approx", "")), "sex": info.get("sex", ""),
                      "site": info.get("anatom_site_general", "")},
            )
        )
    _log_dropped("isic2019", csv, len(samples), dropped)
    _check_unique_ids(samples, csv)
    return samples


# --------------------------------------------------------------------------------------
# NIH ChestX-ray14
# --------------------------------------------------------------------------------------
def _nih_image_index(root: Path) -> dict[str, Path]:
    """``{file name: path}`` over ``images_0XX/images/*.png`` and a flat ``images/``, globbed once."""
    index: dict[str, Path] = {}
    for pattern in ("images_*/images/*.png", "images_*/*.png", "images/*.png", "images/images/*.png"):
        for path in root.glob(pattern):
            index.setdefault(path.name, path)
    return index


def _read_name_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


@register_reader("nih_cxr14")
def read_nih_cxr14(
    root: Path,
    classes: Sequence[str] | None = None,
    finding: str | None = None,
    exclusive: bool = False,
    csv: str | None = None,
) -> list[Sample]:
    """NIH ChestX-ray14 as one finding vs No Finding.

    Args:
        root: folder with ``Data_Entry_2017*.csv``, ``images_0XX/images/*.png`` (or a flat
            ``images/``), ``test_list.txt`` (and ``train_val_list.txt``).
        classes: ``[negative, positive]``, as for CheXpert.
        finding: a label of ``Finding Labels`` (e.g. ``"Effusion"``; default ``classes[1]``).
        exclusive: when True a positive must carry the finding alone (default False: any
            row whose pipe-separated labels include it).
        csv: the Data_Entry file name, needed only if several match ``Data_Entry_2017*.csv``.

    Negatives are rows labelled exactly ``No Finding``; other rows are dropped on purpose.
    Images named in ``test_list.txt`` get split 'test', the others None. group = Patient ID;
    meta: view, sex, age, follow_up.
    """
    names, finding, positive = _binary_classes(classes, finding, "nih_cxr14")
    negative = 1 - positive
    if csv is not None:
        table = root / csv
    else:
        candidates = sorted(root.glob("Data_Entry_2017*.csv"))
        if not candidates:
            raise DatasetLayoutError(f"{root}: no Data_Entry_2017*.csv found")
        if len(candidates) > 1:
            raise DatasetLayoutError(
                f"{root}: several Data_Entry files {[c.name for c in candidates]}; choose one with reader option csv"
            )
        table = candidates[0]
    frame = _read_csv(table, ["Image Index", "Finding Labels", "Patient ID"])
    label_sets = [frozenset(part.strip() for part in cell.split("|") if part.strip()) for cell in frame["Finding Labels"]]
    known = set().union(*label_sets) if label_sets else set()
    if finding not in known:
        raise DatasetLayoutError(f"{table}: finding {finding!r} does not occur in 'Finding Labels'; labels: {sorted(known)}")
    test_list = root / "test_list.txt"
    test_names = _read_name_list(test_list) if test_list.is_file() else set()
    if not test_list.is_file():
        log.info("nih_cxr14: %s not found; the test split will be drawn by patient", test_list)
    images = _nih_image_index(root)
    fallback = root / "images"

    samples: list[Sample] = []
    dropped: Counter = Counter()
    for (index, row), labels in zip(_rows(frame), label_sets):
        if finding in labels and (not exclusive or labels == {finding}):
            label = positive
        elif labels == {NO_FINDING}:
            label = negative
        else:
            dropped["with the finding among others" if finding in labels else "other findings"] += 1
            continue
        name = row["Image Index"]
        if name == "":
            raise DatasetLayoutError(f"{_where(table, index)}: blank 'Image Index'")
        samples.append(
            Sample(
                id=name,
                image=ImageFile(images.get(name, fallback / name)),
                label=label,
                split="test" if name in test_names else None,
                group=row["Patient ID"] or None,
                meta={"view": row.get("View Position", ""), "sex": row.get("Patient Gender", ""),
                      "age": _int_or_none(row.get("Patient Age", "")),
                      "follow_up": _int_or_none(row.get("Follow-up #", ""))},
            )
        )
    _log_dropped("nih_cxr14", table, len(samples), dropped)
    _check_unique_ids(samples, table)
    return samples
