"""Synthetic generators: real on-disk layouts, determinism, label rules, caching."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from datamodules.synthetic import (
    CHEXPERT_COLUMNS,
    DR_GRADE_LESION_COUNTS,
    GENERATORS,
    MARKER_NAME,
    dr_grade_from_lesion_count,
    ensure_synthetic,
    generate_synthetic_cxr,
    generate_synthetic_dr,
    generate_synthetic_fundus,
    generate_synthetic_polyp,
    main,
    synthetic_dir,
)

# Small but not degenerate: enough images for both classes/splits, sizes the anatomy fits in.
SMALL = {
    "synthetic_polyp": (6, 48),
    "synthetic_fundus": (8, 64),
    "synthetic_cxr": (14, 48),
    "synthetic_dr": (10, 64),
}


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    """Each dataset generated once with seed 0 (shared by the layout tests)."""
    base = tmp_path_factory.mktemp("synthetic")
    return {name: GENERATORS[name](base / name, n, size, 0) for name, (n, size) in SMALL.items()}


# ---------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SMALL))
def test_same_seed_is_byte_identical_and_other_seed_differs(name, generated, tmp_path):
    n, size = SMALL[name]
    first = _files(generated[name])
    again = _files(GENERATORS[name](tmp_path / "again", n, size, 0))
    other = _files(GENERATORS[name](tmp_path / "other", n, size, 1))
    assert first and first == again
    # Images only: masks can coincide by design (an empty lesion mask of a grade-0 image).
    def images(files):
        return sorted(v for k, v in files.items() if k.endswith((".jpg", ".png")) and "mask" not in k)

    first_images, other_images = images(first), images(other)
    assert len(first_images) == len(other_images)
    assert not set(first_images) & set(other_images), "a different seed must give different images"


def test_generators_do_not_touch_global_rng(tmp_path):
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    generate_synthetic_polyp(tmp_path / "p", 2, 32, 5)
    assert np.random.random() == expected


# ---------------------------------------------------------------------------------------
# Kvasir-SEG
# ---------------------------------------------------------------------------------------
def test_polyp_kvasir_layout_masks_and_boxes(generated):
    root = generated["synthetic_polyp"]
    images = sorted((root / "Kvasir-SEG" / "images").iterdir())
    masks = sorted((root / "Kvasir-SEG" / "masks").iterdir())
    assert len(images) == SMALL["synthetic_polyp"][0]
    assert [p.name for p in images] == [p.name for p in masks]
    boxes = json.loads((root / "kavsir_bboxes.json").read_text())
    assert sorted(boxes) == sorted(p.stem for p in images)
    for image_path, mask_path in zip(images, masks):
        assert image_path.suffix == ".jpg" and len(image_path.stem) == 25 and image_path.stem.isalnum()
        image = np.array(Image.open(image_path))
        mask = np.array(Image.open(mask_path))
        assert image.shape == (48, 48, 3) and mask.shape == (48, 48)
        # JPEG masks are only nearly binary; thresholding at 127 must recover a clean mask.
        binary = mask > 127
        assert 0 < binary.mean() < 0.6
        assert np.mean((mask > 40) & (mask < 215)) < 0.05
        entry = boxes[image_path.stem]
        assert (entry["height"], entry["width"]) == (48, 48)
        assert 1 <= len(entry["bbox"]) <= 2
        ys, xs = np.nonzero(binary)
        assert min(b["xmin"] for b in entry["bbox"]) <= xs.min() + 1
        assert max(b["xmax"] for b in entry["bbox"]) >= xs.max() - 1
        assert min(b["ymin"] for b in entry["bbox"]) <= ys.min() + 1
        assert all(b["label"] == "polyp" and b["xmin"] <= b["xmax"] and b["ymin"] <= b["ymax"] for b in entry["bbox"])


# ---------------------------------------------------------------------------------------
# REFUGE
# ---------------------------------------------------------------------------------------
def test_fundus_refuge_layout_and_mask_coding(generated):
    root = generated["synthetic_fundus"]
    train = sorted((root / "Training400").rglob("*.jpg"))
    val = sorted((root / "REFUGE-Validation400").glob("*.jpg"))
    assert len(train) == 8 and len(val) == round(0.2 * 8)
    assert {p.parent.name for p in train} <= {"Glaucoma", "Non-Glaucoma"}
    assert val[0].name == "V0001.jpg"
    for image_path in train + val:
        prefix = {"Glaucoma": "g", "Non-Glaucoma": "n", "REFUGE-Validation400": "V"}[image_path.parent.name]
        assert image_path.stem[0] == prefix and image_path.stem[1:].isdigit() and len(image_path.stem) == 5
        if image_path.parent.name == "REFUGE-Validation400":
            mask_path = root / "REFUGE-Validation400-GT" / "Disc_Cup_Masks" / f"{image_path.stem}.bmp"
        else:
            masks = root / "Annotation-Training400" / "Disc_Cup_Masks"
            mask_path = masks / image_path.parent.name / f"{image_path.stem}.bmp"
        mask = np.array(Image.open(mask_path))
        assert mask.shape == (64, 64) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) == {0, 128, 255}
        cup, disc = mask == 0, mask <= 128
        # The cup lies inside the disc: no cup pixel touches the background.
        assert not (ndimage.binary_dilation(cup) & (mask == 255)).any()
        assert disc.sum() > cup.sum() > 0


def test_fundus_glaucoma_has_larger_cup(tmp_path):
    root = generate_synthetic_fundus(tmp_path / "f", 12, 96, 3, num_val=0)
    assert not (root / "REFUGE-Validation400").exists()
    ratios: dict[str, list[float]] = {"Glaucoma": [], "Non-Glaucoma": []}
    for mask_path in (root / "Annotation-Training400" / "Disc_Cup_Masks").rglob("*.bmp"):
        mask = np.array(Image.open(mask_path))
        rows_cup = np.nonzero((mask == 0).any(1))[0]
        rows_disc = np.nonzero((mask <= 128).any(1))[0]
        ratios[mask_path.parent.name].append(len(rows_cup) / len(rows_disc))  # vertical CDR
    assert ratios["Glaucoma"] and ratios["Non-Glaucoma"]
    assert min(ratios["Glaucoma"]) > max(ratios["Non-Glaucoma"])


# ---------------------------------------------------------------------------------------
# CheXpert
# ---------------------------------------------------------------------------------------
def test_cxr_chexpert_layout_labels_and_patient_split(generated):
    root = generated["synthetic_cxr"]
    dataset = root / "CheXpert-v1.0-small"
    patients = {}
    n_rows = 0
    for split in ("train", "valid"):
        columns, rows = _read_csv(dataset / f"{split}.csv")
        assert tuple(columns) == CHEXPERT_COLUMNS
        assert rows, f"{split}.csv is empty"
        n_rows += len(rows)
        patients[split] = set()
        for row in rows:
            path = row["Path"]
            assert path.startswith(f"CheXpert-v1.0-small/{split}/patient")
            parts = path.split("/")
            assert parts[3].startswith("study") and parts[4] in ("view1_frontal.jpg", "view2_lateral.jpg")
            image = Image.open(root / path)
            assert image.mode == "L" and image.size == (48, 48)
            patients[split].add(parts[2])
            frontal = row["Frontal/Lateral"] == "Frontal"
            assert frontal == parts[4].endswith("frontal.jpg")
            assert (row["AP/PA"] in ("AP", "PA")) == frontal
            assert row["Sex"] in ("Male", "Female") and 18 <= int(row["Age"]) <= 90
            for column in CHEXPERT_COLUMNS[5:]:
                assert row[column] in ("", "1.0", "0.0", "-1.0")
            if row["Lung Opacity"] in ("1.0", "-1.0"):
                assert row["No Finding"] != "1.0"
            if row["No Finding"] == "1.0":
                assert row["Lung Opacity"] in ("", "0.0")
            if split == "valid":  # like the real valid.csv: fully labelled, no uncertainty
                assert all(row[c] in ("0.0", "1.0") for c in CHEXPERT_COLUMNS[5:])
    assert n_rows == SMALL["synthetic_cxr"][0]
    assert len(list(dataset.rglob("*.jpg"))) == n_rows
    assert patients["train"].isdisjoint(patients["valid"])


def test_cxr_label_mix_and_finding_option(tmp_path):
    root = generate_synthetic_cxr(tmp_path / "c", 120, 24, 7, finding="Edema")
    rows = []
    for split in ("train", "valid"):
        rows += _read_csv(root / "CheXpert-v1.0-small" / f"{split}.csv")[1]
    edema = [r["Edema"] for r in rows]
    positives, negatives = edema.count("1.0"), sum(r["No Finding"] == "1.0" for r in rows)
    assert 0.3 < positives / len(rows) < 0.7 and 0.3 < negatives / len(rows) < 0.7
    lateral = sum(r["Frontal/Lateral"] == "Lateral" for r in rows) / len(rows)
    assert 0.02 < lateral < 0.25
    assert "-1.0" in edema
    # Labels are per study: every view of a study carries the same labels.
    by_study: dict[str, set] = {}
    for r in rows:
        study = r["Path"].rsplit("/", 1)[0]
        by_study.setdefault(study, set()).add(tuple(r[c] for c in CHEXPERT_COLUMNS[5:]))
    assert all(len(v) == 1 for v in by_study.values())
    with pytest.raises(ValueError, match="finding"):
        generate_synthetic_cxr(tmp_path / "bad", 4, 24, 0, finding="Broken Leg")


def test_cxr_positive_images_are_brighter_in_the_lungs(tmp_path):
    """The finding is in the pixels: a positive study shows extra density in a lung field."""
    from datamodules.synthetic.common import _rng
    from datamodules.synthetic.cxr import _render_cxr

    diffs = []
    for i in range(6):
        clean = _render_cxr(_rng(11, 3, i), 64, False, 0.0, False)
        marked = _render_cxr(_rng(11, 3, i), 64, False, 1.0, False)
        diffs.append(float((marked - clean).max()))
    assert min(diffs) > 0.05


# ---------------------------------------------------------------------------------------
# APTOS + lesion masks
# ---------------------------------------------------------------------------------------
def test_dr_grade_rule():
    assert [dr_grade_from_lesion_count(n) for n in (0, 1, 3, 4, 8, 9, 15, 16, 40)] == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    for grade, (low, high) in DR_GRADE_LESION_COUNTS.items():
        assert dr_grade_from_lesion_count(low) == grade == dr_grade_from_lesion_count(high)
    with pytest.raises(ValueError):
        dr_grade_from_lesion_count(-1)


def test_dr_aptos_layout_and_grade_matches_lesion_mask(generated):
    root = generated["synthetic_dr"]
    columns, rows = _read_csv(root / "train.csv")
    assert columns == ["id_code", "diagnosis"]
    assert len(rows) == SMALL["synthetic_dr"][0]
    grades = [int(r["diagnosis"]) for r in rows]
    assert sorted(set(grades)) == [0, 1, 2, 3, 4]  # balanced: 10 images -> every grade twice
    for row in rows:
        code = row["id_code"]
        assert len(code) == 12 and all(c in "0123456789abcdef" for c in code)
        image = Image.open(root / "train_images" / f"{code}.png")
        assert image.mode == "RGB" and image.size == (64, 64)
        mask = np.array(Image.open(root / "lesion_masks" / f"{code}.png"))
        assert set(np.unique(mask).tolist()) <= {0, 255}
        _, count = ndimage.label(mask > 0, structure=np.ones((3, 3)))
        assert dr_grade_from_lesion_count(count) == int(row["diagnosis"]), code


# ---------------------------------------------------------------------------------------
# ensure_synthetic and the CLI
# ---------------------------------------------------------------------------------------
def test_ensure_synthetic_reuses_complete_folder(tmp_path):
    root = ensure_synthetic("synthetic_polyp", tmp_path, 3, 32, 0, max_polyps=1)
    folder = synthetic_dir("synthetic_polyp", tmp_path, 3, 32, 0, max_polyps=1)
    assert root == folder and folder.name.startswith("synthetic_polyp_")
    marker = json.loads((folder / MARKER_NAME).read_text())
    assert marker["num_images"] == 3 and marker["options"] == {"max_polyps": 1}
    image = next((folder / "Kvasir-SEG" / "images").iterdir())
    stamp = image.stat().st_mtime_ns
    os.utime(image, ns=(stamp - 10**9, stamp - 10**9))  # any rewrite would move it forward again
    assert ensure_synthetic("synthetic_polyp", tmp_path, 3, 32, 0, max_polyps=1) == root
    assert image.stat().st_mtime_ns == stamp - 10**9
    # Other parameters -> another folder; nothing left behind but the two datasets.
    other = ensure_synthetic("synthetic_polyp", tmp_path, 3, 32, 1, max_polyps=1)
    assert other != root
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([root.name, other.name])


def test_ensure_synthetic_ignores_incomplete_and_stale_temp_folders(tmp_path):
    folder = synthetic_dir("synthetic_polyp", tmp_path, 2, 32, 0)
    # An interrupted earlier run: a temp sibling of a dead process, and a final folder
    # without its completion marker (e.g. copied by hand).
    stale = tmp_path / f".{folder.name}.partial-{os.uname().nodename}-999999999-deadbeef"
    (stale / "Kvasir-SEG" / "images").mkdir(parents=True)
    (folder / "Kvasir-SEG" / "images").mkdir(parents=True)
    (folder / "Kvasir-SEG" / "images" / "half.jpg").write_bytes(b"")
    root = ensure_synthetic("synthetic_polyp", tmp_path, 2, 32, 0)
    assert (root / MARKER_NAME).is_file()
    assert not (root / "Kvasir-SEG" / "images" / "half.jpg").exists()
    assert len(list((root / "Kvasir-SEG" / "images").glob("*.jpg"))) == 2
    assert not stale.exists()


def test_ensure_synthetic_failure_leaves_nothing_complete(tmp_path):
    with pytest.raises(TypeError):
        ensure_synthetic("synthetic_polyp", tmp_path, 2, 32, 0, not_an_option=1)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="unknown synthetic dataset"):
        ensure_synthetic("synthetic_nope", tmp_path, 2, 32, 0)


def test_cli_writes_dataset(tmp_path, capsys):
    # In-process: a subprocess would spend most of its time importing the datamodules package.
    args = ["--num-images", "2", "--image-size", "32", "--seed", "4"]
    assert main(["synthetic_dr", "--out", str(tmp_path / "dr"), *args]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "dr"
    assert len(_read_csv(tmp_path / "dr" / "train.csv")[1]) == 2
    assert main(["synthetic_cxr", "--out", str(tmp_path), "--num-images", "3", "--image-size", "24", "--cache",
                 "-o", "finding=Pleural Effusion", "-o", "valid_fraction=0.3"]) == 0
    root = Path(capsys.readouterr().out.strip())
    options = json.loads((root / MARKER_NAME).read_text())["options"]
    assert options == {"finding": "Pleural Effusion", "valid_fraction": 0.3}
    assert "Pleural Effusion" in (root / "CheXpert-v1.0-small" / "train.csv").read_text()
    with pytest.raises(SystemExit):
        main(["synthetic_dr", "--out", str(tmp_path / "x"), "--num-images", "2", "--image-size", "8"])
    assert "image_size must be" in capsys.readouterr().err
