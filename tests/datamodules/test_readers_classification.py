"""Classification readers on tiny copies of the real on-disk layouts (docs/data.md).

Each fixture writes a handful of 32×32 images plus the CSVs exactly as the downloads
name and format them, including their awkward details (stray header spaces, blank and
uncertain cells, pipe-separated labels, ungradable rows, extension case mismatches).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.readers import read_dataset
from datamodules.samples import BadSampleError, DatasetLayoutError, MaskFile

SIZE = 32


def write_image(path: Path, value: int = 128, mode: str = "RGB") -> None:
    """A SIZE×SIZE image of constant grey ``value`` (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = 3 if mode == "RGB" else 1
    array = np.full((SIZE, SIZE, channels), value, dtype=np.uint8).squeeze()
    Image.fromarray(array, mode).save(path)


def write_mask(path: Path, box: tuple[int, int, int, int], value: int = 255) -> None:
    """A SIZE×SIZE grey mask with ``value`` inside (y0, y1, x0, x1), 0 elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((SIZE, SIZE), dtype=np.uint8)
    y0, y1, x0, x1 = box
    array[y0:y1, x0:x1] = value
    Image.fromarray(array).save(path)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.lstrip("\n"))


def by_id(samples):
    return {sample.id: sample for sample in samples}


def labels_of(samples):
    return {sample.id: sample.label for sample in samples}


# --------------------------------------------------------------------------------------
# CheXpert
# --------------------------------------------------------------------------------------
CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
    "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
    "Pleural Effusion,Pleural Other,Fracture,Support Devices"
)


def chexpert_row(path: str, view: str, no_finding: str, opacity: str, edema: str = "", sex="Female", age="68"):
    """One CSV line; the other 13 findings are blank as in most CheXpert rows."""
    projection = "AP" if view == "Frontal" else ""
    cells = [path, sex, age, view, projection, no_finding, "", "", opacity, "", edema] + [""] * 8
    return ",".join(cells)


@pytest.fixture
def chexpert_root(tmp_path: Path) -> Path:
    """``<tmp>/CheXpert-v1.0-small/{train.csv,valid.csv,train/...,valid/...}``."""
    dataset = tmp_path / "CheXpert-v1.0-small"
    train = [
        # (patient, study, view file, Frontal/Lateral, No Finding, Lung Opacity, Edema)
        ("patient00001", "study1", "view1_frontal", "Frontal", "", "1.0", ""),  # positive
        ("patient00001", "study1", "view2_lateral", "Lateral", "", "1.0", ""),  # lateral: dropped
        ("patient00002", "study1", "view1_frontal", "Frontal", "1.0", "", ""),  # negative (blank finding)
        ("patient00002", "study2", "view1_frontal", "Frontal", "", "1.0", "0.0"),  # positive, same patient
        ("patient00003", "study1", "view1_frontal", "Frontal", "", "-1.0", ""),  # uncertain, nothing else
        ("patient00004", "study1", "view1_frontal", "Frontal", "", "0.0", "1.0"),  # other finding: dropped
        ("patient00005", "study1", "view1_frontal", "Frontal", "1.0", "-1.0", ""),  # uncertain + No Finding
        ("patient00006", "study1", "view1_frontal", "Frontal", "1.0", "0.0", ""),  # negative (explicit 0)
    ]
    valid = [
        ("patient64541", "study1", "view1_frontal", "Frontal", "1.0", "0.0", ""),  # negative, test
        ("patient64542", "study1", "view1_frontal", "Frontal", "", "1.0", ""),  # positive, test
        ("patient64542", "study1", "view2_lateral", "Lateral", "", "1.0", ""),  # lateral: dropped
    ]
    for csv_name, folder, rows in (("train.csv", "train", train), ("valid.csv", "valid", valid)):
        lines = [CHEXPERT_HEADER]
        for patient, study, view_file, view, no_finding, opacity, edema in rows:
            relative = f"CheXpert-v1.0-small/{folder}/{patient}/{study}/{view_file}.jpg"
            write_image(tmp_path / relative, mode="L")
            lines.append(chexpert_row(relative, view, no_finding, opacity, edema))
        write_text(dataset / csv_name, "\n".join(lines) + "\n")
    return tmp_path


CHEXPERT_CLASSES = ["No Finding", "Lung Opacity"]


def test_chexpert_default_ignores_uncertain_and_laterals(chexpert_root: Path):
    samples = read_dataset("chexpert", chexpert_root, classes=CHEXPERT_CLASSES, finding="Lung Opacity")
    assert labels_of(samples) == {
        "train/patient00001/study1/view1_frontal": 1,
        "train/patient00002/study1/view1_frontal": 0,
        "train/patient00002/study2/view1_frontal": 1,
        "train/patient00006/study1/view1_frontal": 0,
        "valid/patient64541/study1/view1_frontal": 0,
        "valid/patient64542/study1/view1_frontal": 1,
    }
    splits = {s.id: s.split for s in samples}
    assert {i for i, split in splits.items() if split == "test"} == {
        "valid/patient64541/study1/view1_frontal", "valid/patient64542/study1/view1_frontal"}
    assert all(split is None for i, split in splits.items() if i.startswith("train/"))
    groups = {s.id: s.group for s in samples}
    assert groups["train/patient00002/study1/view1_frontal"] == groups["train/patient00002/study2/view1_frontal"]
    assert groups["train/patient00002/study1/view1_frontal"] == "patient00002"
    assert all(s.group == s.id.split("/")[1] for s in samples)


def test_chexpert_images_resolve_and_meta(chexpert_root: Path):
    samples = read_dataset("chexpert", chexpert_root, classes=CHEXPERT_CLASSES, finding="Lung Opacity")
    sample = by_id(samples)["train/patient00001/study1/view1_frontal"]
    assert sample.image.path == chexpert_root / "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert sample.image.size() == (SIZE, SIZE)
    assert sample.image.read().shape == (SIZE, SIZE)
    assert sample.meta == {"view": "Frontal", "projection": "AP", "sex": "Female", "age": 68}


def test_chexpert_root_may_be_dataset_folder_or_parent(chexpert_root: Path):
    from_parent = read_dataset("chexpert", chexpert_root, classes=CHEXPERT_CLASSES, finding="Lung Opacity")
    from_dataset = read_dataset(
        "chexpert", chexpert_root / "CheXpert-v1.0-small", classes=CHEXPERT_CLASSES, finding="Lung Opacity"
    )
    assert [(s.id, s.label, s.image.path) for s in from_parent] == [
        (s.id, s.label, s.image.path) for s in from_dataset
    ]


def test_chexpert_uncertain_policies(chexpert_root: Path):
    def read(policy):
        return labels_of(read_dataset("chexpert", chexpert_root, classes=CHEXPERT_CLASSES,
                                      finding="Lung Opacity", uncertain=policy))

    ignore, ones, zeros = read("ignore"), read("ones"), read("zeros")
    uncertain_alone = "train/patient00003/study1/view1_frontal"
    uncertain_normal = "train/patient00005/study1/view1_frontal"
    assert uncertain_alone not in ignore and uncertain_normal not in ignore
    assert ones[uncertain_alone] == 1 and ones[uncertain_normal] == 1
    # zeros: not positive; a negative only where No Finding is 1.
    assert uncertain_alone not in zeros and zeros[uncertain_normal] == 0
    assert (len(ignore), len(ones), len(zeros)) == (6, 8, 7)


def test_chexpert_frontal_only_false_keeps_laterals(chexpert_root: Path):
    samples = read_dataset("chexpert", chexpert_root, classes=CHEXPERT_CLASSES, finding="Lung Opacity",
                           frontal_only=False)
    ids = labels_of(samples)
    assert ids["train/patient00001/study1/view2_lateral"] == 1
    assert ids["valid/patient64542/study1/view2_lateral"] == 1
    assert len(samples) == 8


def test_chexpert_class_order_follows_finding(chexpert_root: Path):
    samples = read_dataset("chexpert", chexpert_root, classes=["Edema", "normal"], finding="Edema")
    labels = labels_of(samples)
    assert labels["train/patient00004/study1/view1_frontal"] == 0  # Edema positive -> index of "Edema"
    assert labels["train/patient00002/study1/view1_frontal"] == 1  # No Finding -> the other class


def test_chexpert_unknown_finding_and_missing_column(chexpert_root: Path):
    with pytest.raises(DatasetLayoutError, match=r"train\.csv.*'Lung Opacty' is not a column"):
        read_dataset("chexpert", chexpert_root, classes=["No Finding", "Lung Opacty"], finding="Lung Opacty")
    csv = chexpert_root / "CheXpert-v1.0-small" / "train.csv"
    csv.write_text(csv.read_text().replace("No Finding,", "Normal,", 1))
    with pytest.raises(DatasetLayoutError, match=r"train\.csv: missing column\(s\) \['No Finding'\]"):
        read_dataset("chexpert", chexpert_root, classes=CHEXPERT_CLASSES, finding="Lung Opacity")


def test_chexpert_bad_label_value_names_row(chexpert_root: Path):
    csv = chexpert_root / "CheXpert-v1.0-small" / "valid.csv"
    lines = csv.read_text().splitlines()
    lines[2] = lines[2].replace(",1.0,", ",2.0,", 1)  # data row 2: Lung Opacity 2.0
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetLayoutError, match=r"valid\.csv, row 2: column 'Lung Opacity' has '2\.0'"):
        read_dataset("chexpert", chexpert_root, classes=CHEXPERT_CLASSES, finding="Lung Opacity")


# --------------------------------------------------------------------------------------
# APTOS 2019
# --------------------------------------------------------------------------------------
APTOS_ROWS = [("000c1434d8d7", 2), ("001639a390f0", 4), ("0024cdab0c1e", 1), ("002c21358ce6", 0), ("005b95c28852", 3)]


@pytest.fixture
def aptos_root(tmp_path: Path) -> Path:
    """``train.csv``, ``train_images/<id>.png``, unlabelled ``test.csv``/``test_images``, ``lesion_masks``."""
    root = tmp_path / "aptos2019"
    write_text(root / "train.csv", "id_code,diagnosis\n" + "".join(f"{c},{g}\n" for c, g in APTOS_ROWS))
    for code, grade in APTOS_ROWS:
        write_image(root / "train_images" / f"{code}.png", value=40 * grade)
        write_mask(root / "lesion_masks" / f"{code}.png", (4, 12, 4 + grade, 20))
    write_text(root / "test.csv", "id_code\n0005cfc8afb6\n")
    write_image(root / "test_images" / "0005cfc8afb6.png")
    return root


def test_aptos_default_grade_classes(aptos_root: Path):
    samples = read_dataset("aptos", aptos_root, classes=["0", "1", "2", "3", "4"])
    assert labels_of(samples) == dict(APTOS_ROWS)  # the unlabelled test set is ignored
    assert all(s.split is None and s.group is None for s in samples)
    assert by_id(samples)["001639a390f0"].image.read().shape == (SIZE, SIZE, 3)


def test_aptos_label_map_to_referable(aptos_root: Path):
    label_map = {0: "no_dr", 1: "no_dr", "2": "referable", 3: "referable", 4: "referable"}
    samples = read_dataset("aptos", aptos_root, classes=["no_dr", "referable"], label_map=label_map)
    assert labels_of(samples) == {code: int(grade >= 2) for code, grade in APTOS_ROWS}


def test_aptos_label_map_none_drops_on_purpose(aptos_root: Path, caplog):
    label_map = {0: "healthy", 1: None, 2: "dr", 3: "dr", 4: "dr"}
    with caplog.at_level(logging.INFO, logger="medmark.data"):
        samples = read_dataset("aptos", aptos_root, classes=["healthy", "dr"], label_map=label_map)
    assert "0024cdab0c1e" not in labels_of(samples) and len(samples) == 4
    assert "dropped 1" in caplog.text


def test_aptos_lesion_masks_when_folder_exists(aptos_root: Path):
    samples = read_dataset("aptos", aptos_root, classes=["0", "1", "2", "3", "4"])
    sample = by_id(samples)["000c1434d8d7"]
    assert isinstance(sample.lesion_mask, MaskFile)
    mask = sample.lesion_mask.read()
    assert set(np.unique(mask)) == {0, 1} and mask.sum() == 8 * (20 - 6)
    for path in (aptos_root / "lesion_masks").iterdir():
        path.unlink()
    (aptos_root / "lesion_masks").rmdir()
    assert all(s.lesion_mask is None for s in read_dataset("aptos", aptos_root, classes=["0", "1", "2", "3", "4"]))


def test_aptos_grade_outside_classes_names_csv_and_row(aptos_root: Path):
    write_text(aptos_root / "train.csv", "id_code,diagnosis\naaa,0\nbbb,1\nccc,7\n")
    with pytest.raises(DatasetLayoutError, match=r"train\.csv, row 3: label '7'.*expected one of \['0', '1', '2', '3', '4'\]"):
        read_dataset("aptos", aptos_root, classes=["0", "1", "2", "3", "4"])


def test_aptos_grade_missing_from_label_map(aptos_root: Path):
    with pytest.raises(DatasetLayoutError, match=r"train\.csv, row 2: grade 4 .*not in label_map"):
        read_dataset("aptos", aptos_root, classes=["a", "b"], label_map={0: "a", 1: "a", 2: "b", 3: "b"})


def test_aptos_missing_column(aptos_root: Path):
    write_text(aptos_root / "train.csv", "id_code,grade\naaa,0\n")
    with pytest.raises(DatasetLayoutError, match=r"train\.csv: missing column\(s\) \['diagnosis'\]"):
        read_dataset("aptos", aptos_root, classes=["0", "1", "2", "3", "4"])


def test_aptos_missing_image_is_a_bad_sample_not_a_listing_error(aptos_root: Path):
    missing = aptos_root / "train_images" / "002c21358ce6.png"
    missing.unlink()
    samples = read_dataset("aptos", aptos_root, classes=["0", "1", "2", "3", "4"])
    assert len(samples) == 5
    with pytest.raises(BadSampleError, match="002c21358ce6.png") as info:
        by_id(samples)["002c21358ce6"].image.size()
    assert info.value.path == missing


# --------------------------------------------------------------------------------------
# IDRiD
# --------------------------------------------------------------------------------------
IDRID_TRAIN = [("IDRiD_001", 3, 2), ("IDRiD_002", 0, 0), ("IDRiD_003", 4, 1)]
IDRID_TEST = [("IDRiD_001", 2, 1), ("IDRiD_002", 0, 0)]


@pytest.fixture
def idrid_root(tmp_path: Path) -> Path:
    """Grading images + label CSVs (stray header spaces, trailing empty columns and rows)
    and a few segmentation ground-truth TIFFs (one OD, which is not a lesion)."""
    root = tmp_path / "IDRiD"
    grading = root / "B. Disease Grading"
    for set_name, csv_name, rows in (
        ("a. Training Set", "a. IDRiD_Disease Grading_Training Labels.csv", IDRID_TRAIN),
        ("b. Testing Set", "b. IDRiD_Disease Grading_Testing Labels.csv", IDRID_TEST),
    ):
        # The real files carry "Risk of macular edema " and empty spreadsheet columns/rows.
        lines = ["Image name , Retinopathy grade,Risk of macular edema ,,"]
        lines += [f"{name},{grade},{edema},," for name, grade, edema in rows]
        lines += [",,,,", ",,,,"]
        write_text(grading / "2. Groundtruths" / csv_name, "\n".join(lines) + "\n")
        for name, _, _ in rows:
            write_image(grading / "1. Original Images" / set_name / f"{name}.jpg")
    gt = root / "A. Segmentation" / "2. All Segmentation Groundtruths"
    write_mask(gt / "a. Training Set" / "1. Microaneurysms" / "IDRiD_001_MA.tif", (0, 4, 0, 4))
    write_mask(gt / "a. Training Set" / "2. Haemorrhages" / "IDRiD_001_HE.tif", (2, 6, 2, 6), value=1)
    write_mask(gt / "a. Training Set" / "5. Optic Disc" / "IDRiD_001_OD.tif", (20, 30, 20, 30))
    write_mask(gt / "a. Training Set" / "5. Optic Disc" / "IDRiD_002_OD.tif", (20, 30, 20, 30))
    write_mask(gt / "b. Testing Set" / "3. Hard Exudates" / "IDRiD_001_EX.tif", (10, 12, 10, 20))
    return root


def test_idrid_retinopathy_labels_and_splits(idrid_root: Path):
    samples = read_dataset("idrid", idrid_root, classes=["0", "1", "2", "3", "4"])
    assert labels_of(samples) == {
        "train/IDRiD_001": 3, "train/IDRiD_002": 0, "train/IDRiD_003": 4,
        "test/IDRiD_001": 2, "test/IDRiD_002": 0,
    }
    assert {s.id: s.split for s in samples} == {
        "train/IDRiD_001": None, "train/IDRiD_002": None, "train/IDRiD_003": None,
        "test/IDRiD_001": "test", "test/IDRiD_002": "test",
    }
    test_image = by_id(samples)["test/IDRiD_001"].image
    assert test_image.path.parent.name == "b. Testing Set" and test_image.size() == (SIZE, SIZE)


def test_idrid_macular_edema_target_with_label_map(idrid_root: Path):
    samples = read_dataset("idrid", idrid_root, classes=["no_risk", "risk"], target="macular_edema",
                           label_map={0: "no_risk", 1: "risk", 2: "risk"})
    assert labels_of(samples) == {
        "train/IDRiD_001": 1, "train/IDRiD_002": 0, "train/IDRiD_003": 1,
        "test/IDRiD_001": 1, "test/IDRiD_002": 0,
    }


def test_idrid_lesion_union_excludes_optic_disc(idrid_root: Path):
    samples = by_id(read_dataset("idrid", idrid_root, classes=["0", "1", "2", "3", "4"]))
    union = samples["train/IDRiD_001"].lesion_mask
    expected = np.zeros((SIZE, SIZE), dtype=np.uint8)
    expected[0:4, 0:4] = 1  # MA (stored as 255)
    expected[2:6, 2:6] = 1  # HE (stored as 1)
    assert union.size() == (SIZE, SIZE)
    np.testing.assert_array_equal(union.read(), expected)
    assert samples["train/IDRiD_002"].lesion_mask is None  # only an optic-disc mask
    assert samples["train/IDRiD_003"].lesion_mask is None
    # The testing set's IDRiD_001 is another image: it gets the testing-set exudate only.
    assert samples["test/IDRiD_001"].lesion_mask.read().sum() == 2 * 10
    without = read_dataset("idrid", idrid_root, classes=["0", "1", "2", "3", "4"], lesion_dir=False)
    assert all(s.lesion_mask is None for s in without)


def test_idrid_grade_outside_classes_and_missing_column(idrid_root: Path):
    with pytest.raises(DatasetLayoutError, match=r"Training Labels\.csv, row 3: label '4'.*\['0', '1', '2', '3'\]"):
        read_dataset("idrid", idrid_root, classes=["0", "1", "2", "3"])
    csv = idrid_root / "B. Disease Grading" / "2. Groundtruths" / "b. IDRiD_Disease Grading_Testing Labels.csv"
    csv.write_text(csv.read_text().replace(" Retinopathy grade", "DR grade"))
    with pytest.raises(DatasetLayoutError, match=r"Testing Labels\.csv: missing column\(s\) \['Retinopathy grade'\]"):
        read_dataset("idrid", idrid_root, classes=["0", "1", "2", "3", "4"])


# --------------------------------------------------------------------------------------
# Messidor-2
# --------------------------------------------------------------------------------------
@pytest.fixture
def messidor_root(tmp_path: Path) -> Path:
    """``messidor_data.csv`` with two ungradable rows; ``IMAGES/`` with a ``.JPG`` case mismatch."""
    root = tmp_path / "messidor-2"
    write_text(root / "messidor_data.csv", """
image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable
20051020_43808_0100_PP.png,0,0,1
20051020_43832_0100_PP.png,2,1,1
IM002385.jpg,4,1,1
IM002386.jpg,,,0
IM002387.jpg,1,0,0
20051020_44598_0100_PP.png,1,0,1
""")
    for name in ("20051020_43808_0100_PP.png", "20051020_43832_0100_PP.png", "IM002385.JPG",
                 "IM002386.JPG", "IM002387.JPG", "20051020_44598_0100_PP.png"):
        write_image(root / "IMAGES" / name)
    return root


def test_messidor2_drops_ungradable_and_logs_count(messidor_root: Path, caplog):
    with caplog.at_level(logging.INFO, logger="medmark.data"):
        samples = read_dataset("messidor2", messidor_root, classes=["0", "1", "2", "3", "4"])
    assert labels_of(samples) == {
        "20051020_43808_0100_PP.png": 0, "20051020_43832_0100_PP.png": 2,
        "IM002385.jpg": 4, "20051020_44598_0100_PP.png": 1,
    }
    assert "dropped 2 (2 ungradable)" in caplog.text
    assert by_id(samples)["IM002385.jpg"].image.path.name == "IM002385.JPG"  # case-blind match
    assert by_id(samples)["IM002385.jpg"].image.size() == (SIZE, SIZE)


def test_messidor2_dme_target_and_lowercase_folder(messidor_root: Path):
    (messidor_root / "IMAGES").rename(messidor_root / "images")
    samples = read_dataset("messidor2", messidor_root, classes=["no_dme", "dme"], target="dme",
                           label_map={0: "no_dme", 1: "dme"})
    assert labels_of(samples) == {
        "20051020_43808_0100_PP.png": 0, "20051020_43832_0100_PP.png": 1,
        "IM002385.jpg": 1, "20051020_44598_0100_PP.png": 0,
    }
    assert all(s.image.path.parent.name == "images" for s in samples)


def test_messidor2_missing_image_folder_and_column(messidor_root: Path):
    csv = messidor_root / "messidor_data.csv"
    original = csv.read_text()
    csv.write_text(original.replace("adjudicated_gradable", "gradable"))
    with pytest.raises(DatasetLayoutError, match=r"messidor_data\.csv: missing column\(s\) \['adjudicated_gradable'\]"):
        read_dataset("messidor2", messidor_root, classes=["0", "1", "2", "3", "4"])
    csv.write_text(original)
    (messidor_root / "IMAGES").rename(messidor_root / "pictures")
    with pytest.raises(DatasetLayoutError, match="IMAGES/ or images/"):
        read_dataset("messidor2", messidor_root, classes=["0", "1", "2", "3", "4"])


# --------------------------------------------------------------------------------------
# ISIC 2019
# --------------------------------------------------------------------------------------
ISIC_HEADER = "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK"
ISIC_ROWS = {
    "ISIC_0000000": "NV", "ISIC_0000001": "NV", "ISIC_0000002": "MEL",
    "ISIC_0000003": "BCC", "ISIC_0000004_downsampled": "SCC",
}


def isic_line(image: str, diagnoses: list[str]) -> str:
    columns = ISIC_HEADER.split(",")[1:]
    return ",".join([image] + ["1.0" if column in diagnoses else "0.0" for column in columns])


@pytest.fixture
def isic_root(tmp_path: Path) -> Path:
    """Ground truth one-hot CSV, metadata with lesion ids (two images of one lesion)."""
    root = tmp_path / "isic2019"
    lines = [ISIC_HEADER] + [isic_line(image, [dx]) for image, dx in ISIC_ROWS.items()]
    write_text(root / "ISIC_2019_Training_GroundTruth.csv", "\n".join(lines) + "\n")
    write_text(root / "ISIC_2019_Training_Metadata.csv", """
image,age_approx,anatom_site_general,lesion_id,sex
ISIC_0000000,55.0,anterior torso,HAM_0000118,female
ISIC_0000001,30.0,anterior torso,HAM_0000118,female
ISIC_0000002,60.0,upper extremity,BCN_0000001,male
ISIC_0000003,,,,
ISIC_0000004_downsampled,70.0,head/neck,,male
""")
    for image in ISIC_ROWS:
        write_image(root / "ISIC_2019_Training_Input" / f"{image}.jpg")
    return root


def test_isic2019_all_classes_and_lesion_groups(isic_root: Path):
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    samples = read_dataset("isic2019", isic_root, classes=classes)
    assert labels_of(samples) == {image: classes.index(dx) for image, dx in ISIC_ROWS.items()}
    groups = {s.id: s.group for s in samples}
    assert groups["ISIC_0000000"] == groups["ISIC_0000001"] == "HAM_0000118"
    assert groups["ISIC_0000002"] == "BCN_0000001"
    assert groups["ISIC_0000003"] is None and groups["ISIC_0000004_downsampled"] is None
    assert by_id(samples)["ISIC_0000002"].meta["age"] == 60
    assert by_id(samples)["ISIC_0000004_downsampled"].image.size() == (SIZE, SIZE)


def test_isic2019_class_subset_drops_and_logs_others(isic_root: Path, caplog):
    with caplog.at_level(logging.INFO, logger="medmark.data"):
        samples = read_dataset("isic2019", isic_root, classes=["NV", "MEL"])
    assert labels_of(samples) == {"ISIC_0000000": 0, "ISIC_0000001": 0, "ISIC_0000002": 1}
    assert "dropped 2" in caplog.text and "BCC" in caplog.text


def test_isic2019_without_metadata_has_no_groups(isic_root: Path):
    (isic_root / "ISIC_2019_Training_Metadata.csv").unlink()
    samples = read_dataset("isic2019", isic_root, classes=["MEL", "NV", "BCC", "SCC"])
    assert len(samples) == 5 and all(s.group is None for s in samples)


def test_isic2019_row_with_two_or_no_diagnoses_is_an_error(isic_root: Path):
    csv = isic_root / "ISIC_2019_Training_GroundTruth.csv"
    lines = [ISIC_HEADER, isic_line("ISIC_0000000", ["NV"]), isic_line("ISIC_0000001", ["NV", "MEL"])]
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetLayoutError, match=r"GroundTruth\.csv, row 2 \(image 'ISIC_0000001'\).*\['MEL', 'NV'\]"):
        read_dataset("isic2019", isic_root, classes=["MEL", "NV"])
    csv.write_text("\n".join([ISIC_HEADER, isic_line("ISIC_0000000", [])]) + "\n")
    with pytest.raises(DatasetLayoutError, match=r"row 1 .*found none"):
        read_dataset("isic2019", isic_root, classes=["MEL", "NV"])


def test_isic2019_class_not_a_column(isic_root: Path):
    with pytest.raises(DatasetLayoutError, match=r"GroundTruth\.csv: missing column\(s\) \['MELANOMA'\]"):
        read_dataset("isic2019", isic_root, classes=["MELANOMA", "NV"])


# --------------------------------------------------------------------------------------
# NIH ChestX-ray14
# --------------------------------------------------------------------------------------
NIH_ROWS = [
    # Image Index, Finding Labels, Follow-up #, Patient ID, images folder
    ("00000001_000.png", "Effusion", 0, 1, "images_001"),
    ("00000001_001.png", "Effusion|Infiltration", 1, 1, "images_001"),
    ("00000002_000.png", "No Finding", 0, 2, "images_001"),
    ("00000003_000.png", "Atelectasis", 0, 3, "images_002"),
    ("00000004_000.png", "No Finding", 0, 4, "images_002"),
    ("00000004_001.png", "Effusion", 1, 4, "images_002"),
    ("00000005_000.png", "Infiltration|Effusion|Mass", 0, 5, "images_002"),
]


@pytest.fixture
def nih_root(tmp_path: Path) -> Path:
    """``Data_Entry_2017_v2020.csv``, ``images_00X/images/*.png``, split lists."""
    root = tmp_path / "nih"
    lines = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
             "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"]
    for name, labels, follow_up, patient, folder in NIH_ROWS:
        lines.append(f"{name},{labels},{follow_up},{patient},58,M,PA,2682,2749,0.143,0.143")
        write_image(root / folder / "images" / name, mode="L")
    write_text(root / "Data_Entry_2017_v2020.csv", "\n".join(lines) + "\n")
    write_text(root / "test_list.txt", "00000004_000.png\n00000004_001.png\n")
    write_text(root / "train_val_list.txt", "".join(f"{row[0]}\n" for row in NIH_ROWS[:4] + NIH_ROWS[6:]))
    return root


def test_nih_cxr14_pipe_labels_splits_and_groups(nih_root: Path):
    samples = read_dataset("nih_cxr14", nih_root, classes=["No Finding", "Effusion"], finding="Effusion")
    assert labels_of(samples) == {
        "00000001_000.png": 1, "00000001_001.png": 1, "00000002_000.png": 0,
        "00000004_000.png": 0, "00000004_001.png": 1, "00000005_000.png": 1,
    }
    assert {s.id for s in samples if s.split == "test"} == {"00000004_000.png", "00000004_001.png"}
    assert all(s.split is None for s in samples if not s.id.startswith("00000004"))
    assert {s.id: s.group for s in samples}["00000001_001.png"] == "1"
    patients_by_split = {}
    for sample in samples:
        patients_by_split.setdefault(sample.split, set()).add(sample.group)
    assert not patients_by_split[None] & patients_by_split["test"]
    image = by_id(samples)["00000004_001.png"].image
    assert image.path == nih_root / "images_002" / "images" / "00000004_001.png"
    assert image.size() == (SIZE, SIZE)
    assert by_id(samples)["00000001_001.png"].meta == {"view": "PA", "sex": "M", "age": 58, "follow_up": 1}


def test_nih_cxr14_exclusive_positives(nih_root: Path):
    samples = read_dataset("nih_cxr14", nih_root, classes=["No Finding", "Effusion"], finding="Effusion",
                           exclusive=True)
    labels = labels_of(samples)
    assert "00000001_001.png" not in labels and "00000005_000.png" not in labels
    assert sorted(i for i, label in labels.items() if label == 1) == ["00000001_000.png", "00000004_001.png"]


def test_nih_cxr14_flat_images_folder(nih_root: Path):
    flat = nih_root / "images"
    flat.mkdir()
    for path in sorted(nih_root.glob("images_*/images/*.png")):
        path.rename(flat / path.name)
    samples = read_dataset("nih_cxr14", nih_root, classes=["No Finding", "Effusion"], finding="Effusion")
    assert all(s.image.path.parent == flat for s in samples)
    assert by_id(samples)["00000001_000.png"].image.size() == (SIZE, SIZE)


def test_nih_cxr14_unknown_finding_and_missing_column(nih_root: Path):
    with pytest.raises(DatasetLayoutError, match=r"Data_Entry_2017_v2020\.csv: finding 'Pleural Thickening'"):
        read_dataset("nih_cxr14", nih_root, classes=["No Finding", "Pleural Thickening"])
    csv = nih_root / "Data_Entry_2017_v2020.csv"
    csv.write_text(csv.read_text().replace("Patient ID", "PatientID"))
    with pytest.raises(DatasetLayoutError, match=r"missing column\(s\) \['Patient ID'\]"):
        read_dataset("nih_cxr14", nih_root, classes=["No Finding", "Effusion"])
