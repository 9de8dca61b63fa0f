"""Segmentation readers on tiny copies of the real on-disk layouts (docs/data.md).

Each fixture writes a handful of small, non-square images (so a swapped H/W shows) in
the exact folder, file-name, CSV and mask conventions of the download: JPEG masks for
Kvasir-SEG, 0/128/255 BMPs for REFUGE, MJPG ``.avi`` videos and chord tracings for
EchoNet-Dynamic, ``.nii.gz`` volumes for ACDC, multi-lesion masks for BUSI... The
foreground drawn into each mask is known, so the tests check the mask content, not only
its values.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from skimage.draw import polygon as draw_polygon

from datamodules.readers import read_dataset
from datamodules.readers import segmentation
from datamodules.samples import BadSampleError, DatasetLayoutError

H, W = 40, 48  # non-square on purpose: a transposed image or mask changes shape


# --------------------------------------------------------------------------------------
# Writing helpers
# --------------------------------------------------------------------------------------
def disc(cy: int, cx: int, radius: int, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    """Boolean H×W disc of ``radius`` pixels centred at (cy, cx)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def box(y0: int, y1: int, x0: int, x1: int, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    """Boolean H×W rectangle [y0, y1) × [x0, x1)."""
    out = np.zeros(shape, dtype=bool)
    out[y0:y1, x0:x1] = True
    return out


def write_rgb(path: Path, seed: int, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    """A random RGB uint8 image (format from the extension); returns the pixels written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def write_mask(path: Path, foreground: np.ndarray, on: int = 255, off: int = 0) -> None:
    """A grey mask: ``on`` where ``foreground``, ``off`` elsewhere (format from extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(foreground, on, off).astype(np.uint8)).save(path)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def by_id(samples):
    return {sample.id: sample for sample in samples}


def check_contract(samples, image_dtype=np.uint8) -> None:
    """What every reader promises: unique ids, readable sources, sizes that agree with
    the pixels, images of the stated dtype/range, masks uint8 in {0, 1}."""
    ids = [sample.id for sample in samples]
    assert len(ids) == len(set(ids)), "sample ids must be unique"
    for sample in samples:
        image, mask = sample.image.read(), sample.mask.read()
        assert image.dtype == image_dtype, sample.id
        if image_dtype == np.float32:
            assert 0.0 <= image.min() and image.max() <= 1.0, sample.id
        assert mask.dtype == np.uint8 and mask.ndim == 2, sample.id
        assert set(np.unique(mask)) <= {0, 1}, sample.id
        assert mask.shape == image.shape[:2], sample.id
        assert sample.image.size() == image.shape[:2] == sample.mask.size(), sample.id
        assert sample.split in (None, "train", "val", "test"), sample.id


def agreement(mask: np.ndarray, expected: np.ndarray) -> float:
    """Fraction of pixels where the binary ``mask`` equals ``expected``."""
    return float((mask.astype(bool) == expected).mean())


# --------------------------------------------------------------------------------------
# Kvasir-SEG
# --------------------------------------------------------------------------------------
KVASIR_IDS = ("cju0qkwl35piu0993l0dewei2", "cju0qoxqj9q6s0835b43399p4", "cju0roawvklrq0799vmjorwfv")


def kvasir_foreground(index: int) -> np.ndarray:
    return box(5 + 3 * index, 25 + 3 * index, 8 + 4 * index, 30 + 4 * index)


@pytest.fixture
def kvasir_root(tmp_path: Path) -> Path:
    base = tmp_path / "Kvasir-SEG"
    boxes = {}
    for index, image_id in enumerate(KVASIR_IDS):
        write_rgb(base / "images" / f"{image_id}.jpg", seed=index)
        write_mask(base / "masks" / f"{image_id}.jpg", kvasir_foreground(index))  # JPEG: grey noise near 0/255
        if index < 2:  # the real JSON does not have to list every image
            boxes[image_id] = {"height": H, "width": W, "bbox": [
                {"label": "polyp", "xmin": 8 + 4 * index, "ymin": 5 + 3 * index, "xmax": 30 + 4 * index, "ymax": 25 + 3 * index}
            ]}
    write_text(base / "kavsir_bboxes.json", json.dumps(boxes))
    return tmp_path


def test_kvasir_reads_images_masks_and_boxes(kvasir_root: Path):
    samples = read_dataset("kvasir_seg", kvasir_root)
    assert [s.id for s in samples] == sorted(KVASIR_IDS)
    check_contract(samples)
    for index, image_id in enumerate(KVASIR_IDS):
        sample = by_id(samples)[image_id]
        assert sample.split is None and sample.group is None
        assert sample.image.read().shape == (H, W, 3)
        # JPEG ringing may flip a pixel or two at the box edge, never the box itself.
        assert agreement(sample.mask.read(), kvasir_foreground(index)) > 0.99
    assert by_id(samples)[KVASIR_IDS[0]].meta["bboxes"] == [[8, 5, 30, 25]]
    assert by_id(samples)[KVASIR_IDS[1]].meta["bboxes"] == [[12, 8, 34, 28]]
    assert "bboxes" not in by_id(samples)[KVASIR_IDS[2]].meta


def test_kvasir_accepts_the_dataset_folder_itself_and_no_bbox_file(kvasir_root: Path):
    (kvasir_root / "Kvasir-SEG" / "kavsir_bboxes.json").unlink()
    samples = read_dataset("kvasir_seg", kvasir_root / "Kvasir-SEG")
    assert [s.id for s in samples] == sorted(KVASIR_IDS)
    assert all("bboxes" not in s.meta for s in samples)


def test_kvasir_missing_masks_folder_is_a_layout_error(kvasir_root: Path):
    for path in (kvasir_root / "Kvasir-SEG" / "masks").iterdir():
        path.unlink()
    (kvasir_root / "Kvasir-SEG" / "masks").rmdir()
    with pytest.raises(DatasetLayoutError, match="masks"):
        read_dataset("kvasir_seg", kvasir_root)


def test_corrupt_and_truncated_images_raise_bad_sample_naming_the_file(kvasir_root: Path):
    images = kvasir_root / "Kvasir-SEG" / "images"
    garbage, truncated = images / f"{KVASIR_IDS[0]}.jpg", images / f"{KVASIR_IDS[1]}.jpg"
    garbage.write_bytes(b"this is not a JPEG" * 20)
    truncated.write_bytes(truncated.read_bytes()[:200])
    samples = by_id(read_dataset("kvasir_seg", kvasir_root))  # listing does not decode
    for path, image_id in ((garbage, KVASIR_IDS[0]), (truncated, KVASIR_IDS[1])):
        with pytest.raises(BadSampleError) as info:
            samples[image_id].image.read()
        assert info.value.path == path and str(path) in str(info.value)
    samples[KVASIR_IDS[2]].image.read()  # the intact one still reads


# --------------------------------------------------------------------------------------
# PraNet split
# --------------------------------------------------------------------------------------
def pranet_foreground(index: int) -> np.ndarray:
    return disc(20, 10 + 6 * index, 6)


@pytest.fixture
def pranet_root(tmp_path: Path) -> Path:
    for n in (1, 2, 10):
        write_rgb(tmp_path / "TrainDataset" / "image" / f"{n}.png", seed=n)
        write_mask(tmp_path / "TrainDataset" / "mask" / f"{n}.png", pranet_foreground(n % 4))
    for index, subset in enumerate(segmentation.PRANET_TEST_SUBSETS):
        for n in (1, 2):  # every subset restarts at 1: ids must still be unique
            write_rgb(tmp_path / "TestDataset" / subset / "images" / f"{n}.png", seed=100 + 10 * index + n)
            write_mask(tmp_path / "TestDataset" / subset / "masks" / f"{n}.png", pranet_foreground(index))
    return tmp_path


def test_pranet_reads_train_and_all_test_subsets(pranet_root: Path):
    samples = read_dataset("pranet", pranet_root)
    assert len(samples) == 3 + 2 * 5
    check_contract(samples)
    train = [s for s in samples if s.split == "train"]
    assert [s.id for s in train] == ["train/1", "train/2", "train/10"]  # numeric order
    test = [s for s in samples if s.split == "test"]
    assert {s.meta["subset"] for s in test} == set(segmentation.PRANET_TEST_SUBSETS)
    assert "CVC-300/1" in by_id(samples) and "Kvasir/1" in by_id(samples)
    for index, subset in enumerate(segmentation.PRANET_TEST_SUBSETS):
        mask = by_id(samples)[f"{subset}/2"].mask.read()
        assert np.array_equal(mask.astype(bool), pranet_foreground(index))
    assert np.array_equal(by_id(samples)["train/10"].mask.read().astype(bool), pranet_foreground(2))


def test_pranet_test_subsets_option(pranet_root: Path):
    samples = read_dataset("pranet", pranet_root, test_subsets=["Kvasir", "CVC-300"])
    assert sorted({s.meta["subset"] for s in samples if s.split == "test"}) == ["CVC-300", "Kvasir"]
    assert len(read_dataset("pranet", pranet_root, test_subsets=[])) == 3


def test_pranet_missing_requested_subset_is_named(pranet_root: Path):
    with pytest.raises(DatasetLayoutError, match="Kvasir-Extra"):
        read_dataset("pranet", pranet_root, test_subsets=["Kvasir", "Kvasir-Extra"])


# --------------------------------------------------------------------------------------
# REFUGE
# --------------------------------------------------------------------------------------
DISC_RADIUS, CUP_RADIUS = 14, 6


def refuge_mask(cy: int, cx: int) -> np.ndarray:
    """REFUGE grey levels: 255 background, 128 disc rim, 0 cup."""
    grey = np.full((H, W), 255, dtype=np.uint8)
    grey[disc(cy, cx, DISC_RADIUS)] = 128
    grey[disc(cy, cx, CUP_RADIUS)] = 0
    return grey


@pytest.fixture
def refuge_root(tmp_path: Path) -> Path:
    masks = tmp_path / "Annotation-Training400" / "Disc_Cup_Masks"
    for folder, prefix in (("Glaucoma", "g"), ("Non-Glaucoma", "n")):
        for n in (1, 2):
            name = f"{prefix}{n:04d}"
            write_rgb(tmp_path / "Training400" / folder / f"{name}.jpg", seed=n + (10 if prefix == "g" else 0))
            path = masks / folder / f"{name}.bmp"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(refuge_mask(20, 22 + n)).save(path)
    val_gt = tmp_path / "REFUGE-Validation400-GT" / "Disc_Cup_Masks"
    for n, subfolder in ((1, ""), (2, "Glaucoma")):  # flat in some releases, by class in others
        write_rgb(tmp_path / "REFUGE-Validation400" / f"V{n:04d}.jpg", seed=50 + n)
        path = val_gt / subfolder / f"V{n:04d}.bmp"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(refuge_mask(19, 24)).save(path)
    return tmp_path


def test_refuge_disc_and_cup_targets(refuge_root: Path):
    discs = by_id(read_dataset("refuge", refuge_root))
    cups = by_id(read_dataset("refuge", refuge_root, target="cup"))
    assert sorted(discs) == ["V0001", "V0002", "g0001", "g0002", "n0001", "n0002"]
    check_contract(list(discs.values()))
    check_contract(list(cups.values()))
    assert {s.split for s in discs.values()} == {"train", "val"}
    assert [i for i, s in discs.items() if s.split == "val"] == ["V0001", "V0002"]
    for image_id in discs:
        disc_mask, cup_mask = discs[image_id].mask.read(), cups[image_id].mask.read()
        assert np.all(disc_mask >= cup_mask), "the cup lies inside the disc"
        assert disc_mask.sum() > 3 * cup_mask.sum() > 0
    # Exact geometry on one sample: disc = cup ∪ rim, cup = grey 0 only.
    assert np.array_equal(discs["g0002"].mask.read().astype(bool), disc(20, 24, DISC_RADIUS))
    assert np.array_equal(cups["g0002"].mask.read().astype(bool), disc(20, 24, CUP_RADIUS))


def test_refuge_glaucoma_meta(refuge_root: Path):
    samples = by_id(read_dataset("refuge", refuge_root))
    assert samples["g0001"].meta["glaucoma"] is True
    assert samples["n0002"].meta["glaucoma"] is False
    assert samples["V0002"].meta["glaucoma"] is True  # from the GT class subfolder
    assert "glaucoma" not in samples["V0001"].meta  # flat GT: unknown, not guessed


def test_refuge_without_validation_and_bad_target(refuge_root: Path):
    for path in sorted((refuge_root / "REFUGE-Validation400").iterdir()):
        path.unlink()
    (refuge_root / "REFUGE-Validation400").rmdir()
    assert {s.split for s in read_dataset("refuge", refuge_root)} == {"train"}
    with pytest.raises(ValueError, match="rim"):
        read_dataset("refuge", refuge_root, target="rim")


# --------------------------------------------------------------------------------------
# EchoNet-Dynamic
# --------------------------------------------------------------------------------------
EH, EW, FRAMES = 48, 56, 10
ECHO_VIDEOS = {"0X1A2B3C": "TRAIN", "0X4D5E6F": "VAL", "0X7A8B9C": "TEST"}
ED_FRAME, ES_FRAME = 2, 7


def frame_grey(frame: int) -> int:
    return 20 * frame + 10


def lv_tracing(half_width: float) -> list[tuple[float, float, float, float]]:
    """Long axis then horizontal chords of a bullet-shaped ventricle (x1 left, x2 right).

    Narrow at the apex (top), wide at the mitral plane (bottom), and off-centre: no
    symmetry that would hide a wrongly ordered outline.
    """
    rows = [(28.0, 6.0, 28.0, 42.0)]  # long axis: apex to mitral plane
    for y in np.linspace(9.0, 39.0, 16):
        r = half_width * np.sqrt(max(0.0, 1 - ((y - 24.0) / 18.0) ** 2)) * (0.5 + 0.5 * (y - 9.0) / 30.0)
        rows.append((26.0 - r, float(y), 29.0 + 1.3 * r, float(y)))
    return rows


def lv_polygon(rows) -> tuple[np.ndarray, np.ndarray]:
    chords = np.asarray(rows[1:])
    return np.r_[chords[:, 0], chords[::-1, 2]], np.r_[chords[:, 1], chords[::-1, 3]]


@pytest.fixture
def echonet_root(tmp_path: Path) -> Path:
    videos = tmp_path / "Videos"
    videos.mkdir()
    listing = ["FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split"]
    tracings = ["FileName,X1,Y1,X2,Y2,Frame"]
    for index, (name, split) in enumerate(ECHO_VIDEOS.items()):
        writer = cv2.VideoWriter(str(videos / f"{name}.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 50, (EW, EH))
        assert writer.isOpened()
        for frame in range(FRAMES):  # constant grey per frame: tells which frame was read
            writer.write(np.full((EH, EW, 3), frame_grey(frame), dtype=np.uint8))
        writer.release()
        # FileList may carry the extension or not; VolumeTracings always does.
        listed = f"{name}.avi" if index == 1 else name
        listing.append(f"{listed},55.5,20.1,45.2,{EH},{EW},50,{FRAMES},{split}")
        # The ES tracing comes first in the file, as in the real CSV.
        for frame, half_width in ((ES_FRAME, 8.0), (ED_FRAME, 14.0)):
            tracings += [f"{name}.avi,{x1:.4f},{y1:.4f},{x2:.4f},{y2:.4f},{frame}" for x1, y1, x2, y2 in lv_tracing(half_width)]
    write_text(tmp_path / "FileList.csv", "\n".join(listing) + "\n")
    write_text(tmp_path / "VolumeTracings.csv", "\n".join(tracings) + "\n")
    return tmp_path


def test_echonet_one_sample_per_traced_frame(echonet_root: Path):
    samples = read_dataset("echonet", echonet_root)
    assert len(samples) == 2 * len(ECHO_VIDEOS)
    check_contract(samples)
    expected_split = {"TRAIN": "train", "VAL": "val", "TEST": "test"}
    for sample in samples:
        name = sample.group
        assert sample.id in (f"{name}/{ED_FRAME}", f"{name}/{ES_FRAME}")
        assert sample.split == expected_split[ECHO_VIDEOS[name]]
        image = sample.image.read()
        assert image.shape == (EH, EW, 3)
        # The requested frame, not the first one: MJPG keeps a flat grey within a few levels.
        assert abs(float(image.mean()) - frame_grey(sample.meta["frame"])) < 6
        assert sample.meta["phase"] == ("ED" if sample.meta["frame"] == ED_FRAME else "ES")
        assert sample.meta["EF"] == pytest.approx(55.5)
    assert {s.group for s in samples} == set(ECHO_VIDEOS)


def test_echonet_mask_is_the_traced_ventricle(echonet_root: Path):
    samples = by_id(read_dataset("echonet", echonet_root))
    name = next(iter(ECHO_VIDEOS))
    for frame, half_width in ((ED_FRAME, 14.0), (ES_FRAME, 8.0)):
        mask = samples[f"{name}/{frame}"].mask.read()
        xs, ys = lv_polygon(lv_tracing(half_width))
        shoelace = 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
        assert mask.sum() == pytest.approx(shoelace, rel=0.15)
        rows, cols = draw_polygon(np.rint(ys), np.rint(xs), (EH, EW))
        expected = np.zeros((EH, EW), dtype=bool)
        expected[rows, cols] = True
        assert np.array_equal(mask.astype(bool), expected)
        assert mask[24, 28] == 1 and mask[24, 2] == 0 and mask[2, 28] == 0
    assert samples[f"{name}/{ED_FRAME}"].mask.read().sum() > 1.5 * samples[f"{name}/{ES_FRAME}"].mask.read().sum()


def test_echonet_size_comes_from_filelist_without_opening_the_video(echonet_root: Path, monkeypatch):
    samples = read_dataset("echonet", echonet_root)

    def no_video(*args, **kwargs):
        raise AssertionError("size() must not open the video")

    monkeypatch.setattr(segmentation.cv2, "VideoCapture", no_video)
    assert all(s.image.size() == (EH, EW) == s.mask.size() for s in samples)


def test_echonet_missing_column_names_csv_and_column(echonet_root: Path):
    csv = echonet_root / "FileList.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(",".join(line.split(",")[:-1]) for line in lines) + "\n")  # drop Split
    with pytest.raises(DatasetLayoutError, match="Split") as info:
        read_dataset("echonet", echonet_root)
    assert "FileList.csv" in str(info.value)
    tracings = echonet_root / "VolumeTracings.csv"
    tracings.write_text(tracings.read_text().replace("Frame", "FrameIndex", 1))
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetLayoutError, match="VolumeTracings.csv.*Frame"):
        read_dataset("echonet", echonet_root)


def test_echonet_unreadable_video_and_frame_are_bad_samples(echonet_root: Path):
    name = next(iter(ECHO_VIDEOS))
    video = echonet_root / "Videos" / f"{name}.avi"
    video.write_bytes(b"not a video" * 50)
    samples = by_id(read_dataset("echonet", echonet_root))
    with pytest.raises(BadSampleError, match=f"frame {ED_FRAME}") as info:
        samples[f"{name}/{ED_FRAME}"].image.read()
    assert info.value.path == video
    # A frame past the end of the video: caught by size() from NumberOfFrames...
    other = list(ECHO_VIDEOS)[1]
    tracings = echonet_root / "VolumeTracings.csv"
    extra = [f"{other}.avi,{x1},{y1},{x2},{y2},25" for x1, y1, x2, y2 in lv_tracing(10.0)]
    tracings.write_text(tracings.read_text() + "\n".join(extra) + "\n")
    samples = by_id(read_dataset("echonet", echonet_root))
    with pytest.raises(BadSampleError, match="frame 25"):
        samples[f"{other}/25"].image.size()
    # ...and by read() when the video is shorter than its listing claims.
    with pytest.raises(BadSampleError, match="frame 25"):
        segmentation.VideoFrame(echonet_root / "Videos" / f"{other}.avi", 25, EH, EW).read()


def test_echonet_traced_video_missing_from_filelist_is_a_bad_sample(echonet_root: Path):
    csv = echonet_root / "FileList.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:-1]) + "\n")  # drop the TEST video's row
    samples = by_id(read_dataset("echonet", echonet_root))
    name = list(ECHO_VIDEOS)[-1]
    with pytest.raises(BadSampleError, match=f"{name}.*not listed"):
        samples[f"{name}/{ED_FRAME}"].image.size()
    samples[f"{list(ECHO_VIDEOS)[0]}/{ED_FRAME}"].image.size()  # the listed ones are fine


# --------------------------------------------------------------------------------------
# ACDC
# --------------------------------------------------------------------------------------
AX, AY, AZ = 24, 20, 4  # NIfTI volumes are X×Y×Z; slices are X×Y


def acdc_labels() -> np.ndarray:
    """Ground truth: RV (1) in slices 0–2, myocardium ring (2) and LV (3) in slices 1–2, slice 3 empty."""
    gt = np.zeros((AX, AY, AZ), dtype=np.uint8)
    for z in range(3):
        gt[2:8, 2:8, z] = 1
    for z in (1, 2):
        gt[:, :, z][disc(13, 11, 6, (AX, AY))] = 2
        gt[:, :, z][disc(13, 11, 3, (AX, AY))] = 3
    return gt


def acdc_intensities(seed: int) -> np.ndarray:
    """Volume whose slice 0 is half as bright as the others (per-volume scaling keeps that),
    with one hot voxel (percentile clipping keeps it from squashing the range)."""
    volume = np.random.default_rng(seed).uniform(100, 900, (AX, AY, AZ)).astype(np.float32)
    volume[:, :, 0] *= 0.5
    volume[0, 0, 3] = 50_000.0
    return volume


def write_nifti(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(data, np.eye(4)).to_filename(str(path))


@pytest.fixture
def acdc_root(tmp_path: Path) -> Path:
    segmentation._normalised_volume.cache_clear()
    segmentation._label_volume.cache_clear()
    patients = {"training": ("patient001", "patient002"), "testing": ("patient101",)}
    seed = 0
    for folder, names in patients.items():
        for name in names:
            directory = tmp_path / folder / name
            write_text(directory / "Info.cfg", "ED: 1\nES: 12\nGroup: DCM\nHeight: 184.0\nNbFrame: 30\nWeight: 95.0\n")
            write_nifti(directory / f"{name}_4d.nii.gz", np.zeros((AX, AY, AZ, 2), dtype=np.float32))  # no _gt: ignored
            for frame in (1, 12):
                seed += 1
                write_nifti(directory / f"{name}_frame{frame:02d}.nii.gz", acdc_intensities(seed))
                write_nifti(directory / f"{name}_frame{frame:02d}_gt.nii.gz", acdc_labels())
    return tmp_path


def test_acdc_one_sample_per_slice_grouped_by_patient(acdc_root: Path):
    samples = read_dataset("acdc", acdc_root)
    assert len(samples) == 3 * 2 * AZ
    check_contract(samples, image_dtype=np.float32)
    assert {s.group for s in samples if s.split == "train"} == {"patient001", "patient002"}
    assert {s.group for s in samples if s.split == "test"} == {"patient101"}
    sample = by_id(samples)["patient001_frame12_slice02"]
    assert sample.image.read().shape == (AX, AY) and sample.image.size() == (AX, AY)
    assert sample.meta == {"frame": 12, "phase": "ES", "pathology": "DCM", "slice": 2}
    assert by_id(samples)["patient002_frame01_slice00"].meta["phase"] == "ED"


def test_acdc_label_selection_and_skip_empty(acdc_root: Path):
    gt = acdc_labels()
    lv = by_id(read_dataset("acdc", acdc_root))
    rv_myo = by_id(read_dataset("acdc", acdc_root, labels=[1, 2]))
    for z in range(AZ):
        key = f"patient001_frame01_slice{z:02d}"
        assert np.array_equal(lv[key].mask.read(), (gt[:, :, z] == 3).astype(np.uint8))
        assert np.array_equal(rv_myo[key].mask.read(), np.isin(gt[:, :, z], [1, 2]).astype(np.uint8))
    kept = read_dataset("acdc", acdc_root, skip_empty=True)
    assert {s.meta["slice"] for s in kept} == {1, 2}  # LV only in slices 1–2
    assert {s.meta["slice"] for s in read_dataset("acdc", acdc_root, labels=[1], skip_empty=True)} == {0, 1, 2}
    with pytest.raises(ValueError, match="labels"):
        read_dataset("acdc", acdc_root, labels=[7])


def test_acdc_normalises_per_volume_and_caches_the_volume(acdc_root: Path):
    samples = [s for s in read_dataset("acdc", acdc_root) if s.id.startswith("patient002_frame12_")]
    slices = [s.image.read() for s in samples]
    volume = np.stack(slices, axis=2)
    assert volume.min() == 0.0 and volume.max() == 1.0
    # Per-volume scale: the half-bright slice 0 stays darker than the others.
    assert slices[0].mean() < 0.6 * slices[1].mean()
    # The hot voxel is clipped to 1 rather than setting the scale (it would leave ~0.01 means).
    assert slices[3][0, 0] == 1.0 and slices[1].mean() > 0.4
    info = segmentation._normalised_volume.cache_info()
    assert info.misses == 1 and info.hits == len(slices) - 1


def test_acdc_unreadable_volumes_are_bad_samples(acdc_root: Path):
    image = acdc_root / "training" / "patient001" / "patient001_frame01.nii.gz"
    image.write_bytes(b"\x1f\x8b garbage, not a NIfTI volume")
    gt = acdc_root / "training" / "patient002" / "patient002_frame12_gt.nii.gz"
    gt.write_bytes(b"garbage")
    samples = by_id(read_dataset("acdc", acdc_root))
    with pytest.raises(BadSampleError) as info:
        samples["patient001_frame01_slice00"].image.size()
    assert info.value.path == image
    with pytest.raises(BadSampleError):
        samples["patient001_frame01_slice00"].image.read()
    # The unreadable ground truth cannot be sliced: it stays one sample that names the file.
    with pytest.raises(BadSampleError) as info:
        samples["patient002_frame12"].mask.size()
    assert info.value.path == gt


def test_acdc_without_training_or_testing_is_a_layout_error(tmp_path: Path):
    (tmp_path / "something_else").mkdir()
    with pytest.raises(DatasetLayoutError, match="training"):
        read_dataset("acdc", tmp_path)


# --------------------------------------------------------------------------------------
# ISIC 2018 Task 1
# --------------------------------------------------------------------------------------
ISIC_TRAIN = ("ISIC_0000000", "ISIC_0000001", "ISIC_0000003")


@pytest.fixture
def isic_root(tmp_path: Path) -> Path:
    inputs, truth = tmp_path / "ISIC2018_Task1-2_Training_Input", tmp_path / "ISIC2018_Task1_Training_GroundTruth"
    for index, name in enumerate(ISIC_TRAIN):
        write_rgb(inputs / f"{name}.jpg", seed=index)
        write_rgb(inputs / f"{name}_superpixels.png", seed=index)  # Task 2 superpixel maps some copies carry
        write_mask(truth / f"{name}_segmentation.png", disc(20, 24, 5 + 3 * index))
    for folder in (inputs, truth):  # shipped with the real download
        write_text(folder / "LICENSE.txt", "CC-BY-NC")
        write_text(folder / "ATTRIBUTION.txt", "ISIC archive")
    write_rgb(tmp_path / "ISIC2018_Task1-2_Validation_Input" / "ISIC_0012255.jpg", seed=9)
    write_mask(tmp_path / "ISIC2018_Task1_Validation_GroundTruth" / "ISIC_0012255_segmentation.png", disc(10, 10, 4))
    return tmp_path


def test_isic2018_pairs_inputs_with_segmentations(isic_root: Path):
    samples = read_dataset("isic2018", isic_root)
    assert [s.id for s in samples] == [*ISIC_TRAIN, "ISIC_0012255"]
    check_contract(samples)
    assert [s.split for s in samples] == [None, None, None, "val"]
    for index, name in enumerate(ISIC_TRAIN):
        assert np.array_equal(by_id(samples)[name].mask.read().astype(bool), disc(20, 24, 5 + 3 * index))


# --------------------------------------------------------------------------------------
# BUSI
# --------------------------------------------------------------------------------------
@pytest.fixture
def busi_root(tmp_path: Path) -> Path:
    base = tmp_path / "Dataset_BUSI_with_GT"
    for n in (1, 2, 10):
        write_rgb(base / "benign" / f"benign ({n}).png", seed=n)
        write_mask(base / "benign" / f"benign ({n})_mask.png", box(4, 14, 4, 14))
    write_mask(base / "benign" / "benign (2)_mask_1.png", box(24, 34, 30, 44))  # a second lesion
    write_rgb(base / "malignant" / "malignant (1).png", seed=20)
    write_mask(base / "malignant" / "malignant (1)_mask.png", disc(20, 24, 9))
    write_rgb(base / "normal" / "normal (1).png", seed=30)
    write_mask(base / "normal" / "normal (1)_mask.png", np.zeros((H, W), dtype=bool))
    return tmp_path


def test_busi_reads_classes_and_unions_lesion_masks(busi_root: Path):
    samples = read_dataset("busi", busi_root)
    assert [s.id for s in samples] == ["benign (1)", "benign (2)", "benign (10)", "malignant (1)", "normal (1)"]
    check_contract(samples)
    assert [s.meta["class"] for s in samples] == ["benign"] * 3 + ["malignant", "normal"]
    samples = by_id(samples)
    assert np.array_equal(samples["benign (2)"].mask.read().astype(bool), box(4, 14, 4, 14) | box(24, 34, 30, 44))
    assert np.array_equal(samples["benign (1)"].mask.read().astype(bool), box(4, 14, 4, 14))
    assert samples["normal (1)"].mask.read().sum() == 0
    assert np.array_equal(samples["malignant (1)"].mask.read().astype(bool), disc(20, 24, 9))


def test_busi_classes_option(busi_root: Path):
    assert {s.meta["class"] for s in read_dataset("busi", busi_root, classes=["malignant", "normal"])} == {
        "malignant", "normal"}
    assert len(read_dataset("busi", busi_root / "Dataset_BUSI_with_GT", classes="benign")) == 3
    with pytest.raises(DatasetLayoutError, match="tumour"):
        read_dataset("busi", busi_root, classes=["tumour"])


def test_busi_lesion_masks_of_different_sizes_are_bad(busi_root: Path):
    write_mask(busi_root / "Dataset_BUSI_with_GT" / "benign" / "benign (2)_mask_1.png", np.ones((10, 10), bool))
    sample = by_id(read_dataset("busi", busi_root))["benign (2)"]
    with pytest.raises(BadSampleError, match=r"benign \(2\)_mask_1.png"):
        sample.mask.size()


# --------------------------------------------------------------------------------------
# CVC-ClinicDB
# --------------------------------------------------------------------------------------
@pytest.fixture
def cvc_root(tmp_path: Path) -> Path:
    for n in (1, 2, 10):
        write_rgb(tmp_path / "Original" / f"{n}.tif", seed=n)
        suffix = ".png" if n == 2 else ".tif"  # some copies mix formats
        write_mask(tmp_path / "Ground Truth" / f"{n}{suffix}", disc(20, 8 + 3 * n, 5))
    return tmp_path


def test_cvc_clinicdb_reads_tif_and_png_masks(cvc_root: Path):
    samples = read_dataset("cvc_clinicdb", cvc_root)
    assert [s.id for s in samples] == ["1", "2", "10"]
    check_contract(samples)
    for n in (1, 2, 10):
        sample = by_id(samples)[str(n)]
        assert sample.image.read().shape == (H, W, 3)
        assert np.array_equal(sample.mask.read().astype(bool), disc(20, 8 + 3 * n, 5))
    assert by_id(samples)["2"].mask.path.suffix == ".png"


# --------------------------------------------------------------------------------------
# Generic images/ + masks/
# --------------------------------------------------------------------------------------
@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    for index, name in enumerate(("case_a", "case_b")):
        write_rgb(tmp_path / "images" / f"{name}.jpg", seed=index)
        write_mask(tmp_path / "masks" / f"{name}_mask.png", box(5, 20, 5 + 10 * index, 25 + 10 * index))
        write_mask(tmp_path / "masks01" / f"{name}.png", box(5, 20, 5, 25), on=1)  # stored as 0/1
    write_text(tmp_path / "images" / "README.txt", "not an image")
    return tmp_path


def test_seg_folder_mask_name_rule(folder_root: Path):
    samples = read_dataset("seg_folder", folder_root, mask_name="{stem}_mask.png")
    assert [s.id for s in samples] == ["case_a", "case_b"]  # README.txt ignored
    check_contract(samples)
    for index, sample in enumerate(samples):
        assert np.array_equal(sample.mask.read().astype(bool), box(5, 20, 5 + 10 * index, 25 + 10 * index))
    assert len(read_dataset("seg_folder", folder_root, image_glob="*_b.jpg", mask_name="{stem}_mask.png")) == 1


def test_seg_folder_zero_one_masks_need_threshold_zero(folder_root: Path):
    kwargs = dict(masks_dir="masks01", mask_name="{stem}.png")
    assert all(s.mask.read().sum() == 0 for s in read_dataset("seg_folder", folder_root, **kwargs))
    samples = read_dataset("seg_folder", folder_root, mask_threshold=0, **kwargs)
    assert all(np.array_equal(s.mask.read().astype(bool), box(5, 20, 5, 25)) for s in samples)


# --------------------------------------------------------------------------------------
# Missing masks, every image-file layout
# --------------------------------------------------------------------------------------
# (layout, fixture, options, sample id whose mask is deleted, mask path relative to root)
MISSING_MASK_CASES = [
    ("kvasir_seg", "kvasir_root", {}, KVASIR_IDS[1], f"Kvasir-SEG/masks/{KVASIR_IDS[1]}.jpg"),
    ("pranet", "pranet_root", {}, "CVC-ColonDB/2", "TestDataset/CVC-ColonDB/masks/2.png"),
    ("refuge", "refuge_root", {}, "n0002", "Annotation-Training400/Disc_Cup_Masks/Non-Glaucoma/n0002.bmp"),
    ("refuge", "refuge_root", {}, "V0001", "REFUGE-Validation400-GT/Disc_Cup_Masks/V0001.bmp"),
    ("isic2018", "isic_root", {}, "ISIC_0000001", "ISIC2018_Task1_Training_GroundTruth/ISIC_0000001_segmentation.png"),
    ("busi", "busi_root", {}, "malignant (1)", "Dataset_BUSI_with_GT/malignant/malignant (1)_mask.png"),
    ("cvc_clinicdb", "cvc_root", {}, "10", "Ground Truth/10.tif"),
    ("seg_folder", "folder_root", {"mask_name": "{stem}_mask.png"}, "case_b", "masks/case_b_mask.png"),
]


@pytest.mark.parametrize(
    "layout, fixture, options, sample_id, mask", MISSING_MASK_CASES, ids=[f"{c[0]}-{c[3]}" for c in MISSING_MASK_CASES]
)
def test_missing_mask_is_listed_and_named_by_size(request, layout, fixture, options, sample_id, mask):
    root = request.getfixturevalue(fixture)
    (root / mask).unlink()
    samples = by_id(read_dataset(layout, root, **options))  # listing does not raise
    with pytest.raises(BadSampleError) as info:
        samples[sample_id].mask.size()
    assert info.value.path == root / mask
    assert str(root / mask) in str(info.value)
    others = [s for i, s in samples.items() if i != sample_id]
    assert all(s.mask.size() == s.image.size() for s in others)
