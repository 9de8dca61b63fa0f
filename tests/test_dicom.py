"""DICOM input (datamodules/dicom.py): pixel transforms on pydicom's own test files, named
refusals of broken/foreign/compressed files, and .dcm layouts through the data module."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from datamodules import DatasetError, MedicalImageDataModule
from datamodules.dicom import check_grey_writable, dicom_size, nearest_stored, read_dicom, write_grey_dicom
from datamodules.samples import BadSampleError, ImageFile

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CT = get_testdata_file("CT_small.dcm")  # MONOCHROME2, signed 16-bit, RescaleIntercept -1024, no window
MR = get_testdata_file("MR_small.dcm")  # MONOCHROME2, WindowCenter/WindowWidth present


def write_dicom(path: Path, pixels: np.ndarray, **fields) -> Path:
    """A single-frame uncompressed grey DICOM file (unsigned 16-bit storage, 12 bits stored)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for name, value in fields.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def modified_copy(src: str, dst: Path, **fields) -> Path:
    ds = pydicom.dcmread(src)
    for name, value in fields.items():
        if value is None:
            delattr(ds, name)
        else:
            setattr(ds, name, value)
    ds.save_as(dst)
    return dst


# --------------------------------------------------------------------------------------
# Pixel transforms
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "SC_rgb_rle.dcm", "JPEG2000.dcm", "693_J2KI.dcm"])
def test_real_files_are_float32_in_unit_range(name):
    path = get_testdata_file(name)
    out = read_dicom(path)
    raw = pydicom.dcmread(path).pixel_array
    assert out.dtype == np.float32 and out.shape == raw.shape
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.max() > out.min()
    assert dicom_size(path) == raw.shape[:2]


def test_image_file_dispatches_on_suffix(tmp_path):
    path = Path(shutil.copy(MR, tmp_path / "scan.DCM"))  # upper-case suffix too
    source = ImageFile(path)
    assert source.size() == (64, 64)
    np.testing.assert_array_equal(source.read(), read_dicom(MR))


def test_monochrome1_is_inverted(tmp_path):
    """MONOCHROME1: the brightest stored value comes out darkest, and x -> 1 - x exactly."""
    mono1 = modified_copy(CT, tmp_path / "m1.dcm", PhotometricInterpretation="MONOCHROME1")
    raw = pydicom.dcmread(CT).pixel_array
    as_m2, as_m1 = read_dicom(CT), read_dicom(mono1)
    np.testing.assert_allclose(as_m1, 1.0 - as_m2, atol=1e-6)
    brightest, darkest = np.unravel_index(raw.argmax(), raw.shape), np.unravel_index(raw.argmin(), raw.shape)
    assert as_m1[brightest] == as_m1.min() and as_m1[darkest] == as_m1.max()
    assert as_m2[brightest] == as_m2.max()


def test_rescale_is_applied_before_the_window(tmp_path):
    """A soft-tissue window in Hounsfield units is right only if the -1024 intercept was applied."""
    windowed = modified_copy(CT, tmp_path / "w.dcm", WindowCenter=40, WindowWidth=400)
    no_intercept = modified_copy(CT, tmp_path / "w0.dcm", WindowCenter=40, WindowWidth=400, RescaleIntercept=0)
    ds = pydicom.dcmread(CT)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    out = read_dicom(windowed)
    # LINEAR window (PS3.3 C.11.2.1.2.1): below c-0.5-(w-1)/2 -> min, above c-0.5+(w-1)/2 -> max
    assert np.all(out[hu <= 40 - 0.5 - 199.5] == 0.0) and np.all(out[hu > 40 - 0.5 + 199.5] == 1.0)
    inside = (hu > -150) & (hu < 230)
    assert inside.any()
    expected = ((hu[inside] - 39.5) / 399 + 0.5)
    np.testing.assert_allclose(out[inside], expected, atol=1e-4)
    assert not np.allclose(read_dicom(no_intercept), out)


def test_without_voi_the_stored_bits_range_maps_to_unit(tmp_path):
    pixels = np.array([[0, 1024], [2048, 4095]])
    out = read_dicom(write_dicom(tmp_path / "x.dcm", pixels))  # 12 bits stored, unsigned
    np.testing.assert_allclose(out, pixels / 4095.0, atol=1e-6)


def test_window_of_a_12_bit_chest_film_monochrome1(tmp_path):
    pixels = np.array([[0, 1000], [2000, 4000]])
    path = write_dicom(tmp_path / "cxr.dcm", pixels, PhotometricInterpretation="MONOCHROME1",
                       WindowCenter=2000, WindowWidth=2001)
    out = read_dicom(path)
    assert out[0, 0] == 1.0 and out[1, 1] == 0.0  # below the window -> white after inversion
    assert abs(out[1, 0] - 0.5) < 1e-3


# --------------------------------------------------------------------------------------
# Named refusals
# --------------------------------------------------------------------------------------
def test_truncated_pixel_data_names_file_and_field(tmp_path):
    data = Path(MR).read_bytes()
    broken = tmp_path / "cut.dcm"
    broken.write_bytes(data[: len(data) - 3000])  # header intact, pixels cut short
    assert dicom_size(broken) == (64, 64)  # the header alone is fine (validate=header)...
    with pytest.raises(BadSampleError, match=r"cut\.dcm.*PixelData.*Explicit VR Little Endian"):
        read_dicom(broken)  # ...the full read is not


def test_truncated_header_is_refused(tmp_path):
    broken = tmp_path / "head.dcm"
    broken.write_bytes(Path(CT).read_bytes()[:300])  # cut inside the file meta / first elements
    with pytest.raises(BadSampleError, match=r"head\.dcm"):
        read_dicom(broken)


def test_non_dicom_with_dcm_suffix_is_refused(tmp_path):
    fake = tmp_path / "photo.dcm"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(fake, format="PNG")
    with pytest.raises(BadSampleError, match=r"photo\.dcm: not a DICOM file"):
        read_dicom(fake)
    with pytest.raises(BadSampleError, match=r"photo\.dcm: not a DICOM file"):
        ImageFile(fake).size()


def test_missing_file_and_missing_pixel_data(tmp_path):
    with pytest.raises(BadSampleError, match="file not found"):
        read_dicom(tmp_path / "absent.dcm")
    with pytest.raises(BadSampleError, match=r"report\.dcm: field PixelData"):
        read_dicom(shutil.copy(get_testdata_file("reportsi.dcm"), tmp_path / "report.dcm"))


def test_multi_frame_is_refused_naming_number_of_frames():
    with pytest.raises(BadSampleError, match="field NumberOfFrames is 15"):
        read_dicom(get_testdata_file("rtdose.dcm"))


def test_compressed_without_decoder_names_the_transfer_syntax():
    from pydicom.pixels import get_decoder

    path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    if get_decoder(pydicom.dcmread(path).file_meta.TransferSyntaxUID).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    for call in (read_dicom, dicom_size):  # refused at the header check already
        with pytest.raises(BadSampleError, match=r"TransferSyntaxUID is JPEG-LS Lossless .*1\.2\.840\.10008\.1\.2\.4\.80"):
            call(path)


def test_decoder_failure_names_the_transfer_syntax():
    """Pillow is installed but cannot decode 12-bit JPEG Extended: the error names the syntax."""
    with pytest.raises(BadSampleError, match=r"JPEG-lossy\.dcm: field PixelData \(transfer syntax JPEG Extended"):
        read_dicom(get_testdata_file("JPEG-lossy.dcm"))


# --------------------------------------------------------------------------------------
# Layouts through the data module
# --------------------------------------------------------------------------------------
CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices"
)


def chexpert_dicom_root(tmp_path: Path, n: int = 8) -> Path:
    dataset = tmp_path / "CheXpert-v1.0-small"
    rng = np.random.default_rng(0)
    lines = [CHEXPERT_HEADER]
    for i in range(n):
        relative = f"CheXpert-v1.0-small/train/patient{i:05d}/study1/view1_frontal.dcm"
        write_dicom(tmp_path / relative, rng.integers(0, 4096, (20, 24)), PhotometricInterpretation="MONOCHROME1",
                    WindowCenter=2048, WindowWidth=4096)
        no_finding, opacity = ("1.0", "") if i % 2 else ("", "1.0")
        lines.append(",".join([relative, "Female", "60", "Frontal", "PA", no_finding, "", "", opacity] + [""] * 10))
    (dataset / "train.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_chexpert_layout_with_dicom_images_loads_a_batch(tmp_path):
    dm = MedicalImageDataModule(task="classification", layout="chexpert", root=str(chexpert_dicom_root(tmp_path)),
                                classes=["No Finding", "Lung Opacity"], image_size=16, channels=1, batch_size=2,
                                num_workers=0, val_fraction=0.25, test_fraction=0.25, validate="full",
                                reader_options={"finding": "Lung Opacity"})
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 16) and batch["image"].dtype.is_floating_point
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].std() > 0.05


def test_chexpert_layout_names_a_broken_dicom_at_setup(tmp_path):
    root = chexpert_dicom_root(tmp_path)
    bad = root / "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.dcm"
    bad.write_bytes(b"\x00" * 200)
    dm = MedicalImageDataModule(task="classification", layout="chexpert", root=str(root),
                                classes=["No Finding", "Lung Opacity"], image_size=16, channels=1,
                                reader_options={"finding": "Lung Opacity"})
    with pytest.raises(DatasetError, match=r"patient00003/study1/view1_frontal\.dcm: not a DICOM file"):
        dm.setup()


def test_segmentation_folder_with_dicom_images_and_png_masks(tmp_path):
    root = tmp_path / "seg"
    for i in range(8):
        pixels = np.full((24, 24), 300)
        pixels[4:12, 6:14] = 3800
        write_dicom(root / "images" / f"case{i}.dcm", pixels)
        mask = np.zeros((24, 24), np.uint8)
        mask[4:12, 6:14] = 255
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "masks" / f"case{i}.png")
    dm = MedicalImageDataModule(task="segmentation", layout="kvasir_seg", root=str(root), image_size=24, channels=3,
                                batch_size=4, num_workers=0, val_fraction=0.25, test_fraction=0.25,
                                augment={"hflip": 0.0})
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 24, 24) and batch["mask"].shape == (4, 1, 24, 24)
    inside = batch["image"][:, 0][batch["mask"][:, 0] > 0]
    outside = batch["image"][:, 0][batch["mask"][:, 0] == 0]
    assert inside.min() > 0.9 and outside.max() < 0.1


# --------------------------------------------------------------------------------------
# End to end: a documented DICOM layout (configs/data/dicom_seg_folder.yaml) trains and verifies
# --------------------------------------------------------------------------------------
def dicom_seg_export(root: Path, n: int = 30, size: int = 50) -> Path:
    """``images/case<i>.dcm`` (16-bit storage, 12 bits stored, MONOCHROME2, a window) and
    ``masks/case<i>.png``: a bright disc on a noisy background, the disc is the mask."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx, r = rng.integers(12, size - 12), rng.integers(12, size - 12), rng.integers(5, 10)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        pixels = rng.normal(900, 120, (size, size)) + 2400 * disc
        write_dicom(root / "images" / f"case{i:02d}.dcm", np.clip(pixels, 0, 4095), WindowCenter=2000, WindowWidth=4000)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray((disc * 255).astype(np.uint8)).save(root / "masks" / f"case{i:02d}.png")
    return root


@pytest.mark.slow
def test_dicom_seg_folder_trains_a_watermark_and_verifies_like_png(tmp_path):
    """train.py (StealthMark, 1 epoch) on ``data=dicom_seg_folder``, then verify.py reads the
    verification images back from the same .dcm files; a corrupted one is named with exit 2."""
    import json
    import os
    import subprocess
    import sys

    root_dir = Path(__file__).resolve().parents[1]
    export = dicom_seg_export(tmp_path / "export")
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(root_dir)}
    paths = [f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}"]
    run = tmp_path / "run"
    train = [sys.executable, str(root_dir / "train.py"), "experiment=stealthmark_synthetic", "data=dicom_seg_folder",
             f"data.root={export}", "data.image_size=50", "data.batch_size=8", "data.num_workers=0",
             "method.trigger.patch.size=4", "trainer.max_epochs=1", "logger=csv", "callbacks.validation_panels=null",
             "callbacks.watermark_check.num_images=2", *paths, f"hydra.run.dir={run}"]
    proc = subprocess.run(train, cwd=root_dir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert Path(summary["best_checkpoint"]).is_file() and "best-epoch" in summary["best_checkpoint"]
    assert 0.0 <= summary["test"]["test/dice"] <= 1.0
    secret = json.loads((run / "owner" / "secret.json").read_text())
    assert secret["verification"]["data"]["layout"] == "seg_folder"
    ids = secret["verification"]["ids"]
    assert ids and all((export / "images" / f"{i}.dcm").is_file() for i in ids)

    def verify(out: Path) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(root_dir / "verify.py"), f"secret={run / 'owner' / 'secret.json'}",
               f"suspect={summary['best_checkpoint']}", f"out={out}", "verify.num_images=4",
               "verify.qr_evidence=readout", "verify.null_k=99", *paths]
        return subprocess.run(cmd, cwd=root_dir, env=env, capture_output=True, text=True, timeout=300)

    proc = verify(tmp_path / "report")
    assert proc.returncode in (0, 1), proc.stderr[-4000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["method"] == "stealthmark" and report["queries"] == 2 * min(4, len(ids))
    assert {d["id"] for d in report["decoded"]} <= set(ids)
    (export / "images" / f"{ids[0]}.dcm").write_bytes(b"\x00" * 200)
    proc = verify(tmp_path / "report_bad")
    assert proc.returncode == 2 and f"{ids[0]}.dcm" in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert not (tmp_path / "report_bad" / "report.json").exists()


# --------------------------------------------------------------------------------------
# Writing marked pixels back into DICOM (the X-Mark release of a DICOM dataset)
# --------------------------------------------------------------------------------------
def _elements_but_pixels(path: Path) -> dict:
    skip = {"PixelData", "SOPInstanceUID"}
    return {e.keyword: e.value for e in pydicom.dcmread(path) if e.keyword not in skip}


@pytest.mark.parametrize("kind", ["window_mono1", "ct_signed_rescale", "mr_window", "mr_rle_compressed"])
def test_written_dicom_reads_back_as_the_target_within_epsilon(tmp_path, kind):
    source = {
        "window_mono1": lambda: write_dicom(tmp_path / "src.dcm", np.random.default_rng(1).integers(0, 4096, (20, 24)),
                                            PhotometricInterpretation="MONOCHROME1", WindowCenter=2048,
                                            WindowWidth=4096),
        "ct_signed_rescale": lambda: Path(CT),
        "mr_window": lambda: Path(MR),
        "mr_rle_compressed": lambda: Path(get_testdata_file("MR_small_RLE.dcm")),
    }[kind]()
    eps = 4 / 255
    before = read_dicom(source).astype(np.float64)
    delta = np.random.default_rng(0).uniform(-eps, eps, before.shape)
    target = np.clip(before + delta, 0, 1)
    out = tmp_path / "marked.dcm"
    reported_before, reported_after = write_grey_dicom(source, out, lambda unit: target, eps)
    after = read_dicom(out).astype(np.float64)
    assert np.abs(after - reported_after).max() < 1e-6 and np.abs(before - reported_before).max() < 1e-6
    assert np.abs(after - before).max() <= eps + 1e-6  # the L∞ bound holds for the stored file
    # the reading moved to the target: only where the VOI clips (or a step is coarse) can it not
    reachable = (target > 0.001) & (target < 0.999)
    step = 1.0 / (2 ** int(pydicom.dcmread(source).BitsStored) - 1) * 40  # ≥ the file's largest reading step
    assert np.median(np.abs(after - target)[reachable]) < step and np.mean(after != before) > 0.5
    # only the pixels (and the instance UID) changed; a compressed source is written uncompressed
    written = pydicom.dcmread(out)
    assert not written.file_meta.TransferSyntaxUID.is_compressed
    assert written.SOPInstanceUID != pydicom.dcmread(source).SOPInstanceUID
    kept = _elements_but_pixels(source)
    assert {k: v for k, v in _elements_but_pixels(out).items() if k in kept} == kept
    # the same source and target give the same bytes (a release can be rebuilt byte for byte)
    write_grey_dicom(source, tmp_path / "again.dcm", lambda unit: target, eps)
    assert (tmp_path / "again.dcm").read_bytes() == out.read_bytes()


def test_nearest_stored_keeps_within_max_change_at_the_exact_bound_and_keeps_ties():
    # 8-bit, no VOI: reading = stored / 255, so the bound is exact in stored steps
    values = np.arange(256)
    table = (values, values / 255.0)
    stored = np.array([[100, 100, 100, 100, 0, 255]])
    current = stored / 255.0
    target = current + np.array([[4, 5, -4, 0.5, -3, 2]]) / 255.0
    chosen = nearest_stored(stored, table, np.clip(target, 0, 1), max_change=4 / 255)
    # +4 steps: exactly the bound, allowed; +5: the closest allowed is +4; 0.5 step: a tie keeps the stored value;
    # below 0 / above 255 there is nothing closer than the stored value's neighbourhood allows
    assert chosen.tolist() == [[104, 104, 96, 100, 0, 255]]


def test_nearest_stored_under_a_clipping_window_and_far_targets():
    # readings saturate at 1.0 from stored 200 up (a window); 0.005 per stored step below
    values = np.arange(256)
    table = (values, np.clip(values / 200.0, 0, 1))
    stored = np.array([[250, 199, 250, 250]])
    chosen = nearest_stored(stored, table, np.array([[0.99, 1.0, 0.9, 1.0]]), max_change=0.05)
    assert chosen[0, 0] == 198  # out of the saturated plateau: reading 0.99 exactly
    assert chosen[0, 1] >= 200  # up onto the plateau: reading 1.0
    assert chosen[0, 2] == 190  # 0.9 is 0.1 away: the closest allowed reading is 0.95
    assert chosen[0, 3] == 250  # already at the target: the stored value is kept, not another of the plateau


def test_colour_or_odd_bit_depth_dicom_is_refused_for_writing_naming_the_field(tmp_path):
    ds = pydicom.dcmread(write_dicom(tmp_path / "grey.dcm", np.zeros((8, 8))))
    ds.set_pixel_data(np.zeros((8, 8, 3), np.uint8), photometric_interpretation="RGB", bits_stored=8)
    ds.save_as(tmp_path / "rgb.dcm", enforce_file_format=True)
    with pytest.raises(BadSampleError, match=r"rgb\.dcm.*PhotometricInterpretation is RGB"):
        check_grey_writable(tmp_path / "rgb.dcm")
    with pytest.raises(BadSampleError, match=r"rgb\.dcm.*PhotometricInterpretation"):
        write_grey_dicom(tmp_path / "rgb.dcm", tmp_path / "out.dcm", lambda unit: unit, 0.1)
    assert not (tmp_path / "out.dcm").exists()
    check_grey_writable(tmp_path / "grey.dcm")  # grey 16-bit: accepted


def chexpert_as_dicom(tmp_path: Path, rgb_label: str | None = None) -> Path:
    """The synthetic CheXpert layout (64 images, 32 px) with every image a 12-bit MONOCHROME1 DICOM file
    with a window (as a PACS exports chest films), ``Path`` in the CSVs pointing at the ``.dcm`` files.
    ``rgb_label``: images whose "Lung Opacity" is this CSV value are written as RGB DICOM instead."""
    import csv

    from datamodules.synthetic.cxr import generate_synthetic_cxr

    jpeg_root = generate_synthetic_cxr(tmp_path / "jpeg", num_images=64, image_size=32, seed=0)
    root = tmp_path / "dicom"
    for name in ("train.csv", "valid.csv"):
        rows = list(csv.DictReader((jpeg_root / "CheXpert-v1.0-small" / name).open()))
        for row in rows:
            grey = np.asarray(Image.open(jpeg_root / row["Path"]).convert("L")).astype(np.int64)
            row["Path"] = row["Path"][: -len(".jpg")] + ".dcm"
            target = root / row["Path"]
            if rgb_label is not None and row["Lung Opacity"] == rgb_label:
                ds = pydicom.dcmread(write_dicom(target, grey))
                ds.set_pixel_data(np.repeat(grey[..., None], 3, 2).astype(np.uint8), "RGB", 8)
                ds.save_as(target, enforce_file_format=True)
            else:  # MONOCHROME1: bright = low values; 8-bit grey g -> stored 4095 - 16 g
                write_dicom(target, 4095 - 16 * grey, PhotometricInterpretation="MONOCHROME1",
                            WindowCenter=2048, WindowWidth=4096)
        with (root / "CheXpert-v1.0-small" / name).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return root


def xmark_on_dicom(root: Path, tmp_path: Path) -> list[str]:
    """A tiny X-Mark run on the CheXpert layout at ``root`` (generator barely trained: the release contract only)."""
    return [
        "experiment=xmark_synthetic", "data=chexpert", f"data.root={root}", "data.synthetic=null",
        "data.image_size=32", "data.batch_size=16", "logger=none", "test=false", "callbacks.validation_panels=null",
        "method.warmup_steps=4", "method.proxy_steps=1", "method.generator_steps=4",
        "method.generator.base_width=8", "method.generator.depth=2", "loss.lpips=null",
        "callbacks.xmark_release.fraction=1.0", "callbacks.xmark_release.verification.num_images=4",
        "callbacks.xmark_release.heldout_control.epochs=0",
        "callbacks.xmark_release.seed=1", "callbacks.xmark_release.verification.seed=2",
        f"paths.output_dir={tmp_path / 'run'}",
    ]


@pytest.mark.slow
def test_xmark_releases_a_chexpert_dicom_dataset_as_dicom_within_epsilon(tmp_path):
    """X-Mark on a CheXpert layout whose images are DICOM: the marked images stay DICOM (every element
    but the pixels kept), read back within ε by the ordinary chexpert preset; the rest and the CSVs
    are byte-identical."""
    from conftest import compose_config
    from hydra.utils import instantiate
    from utils.run import run_training

    source = chexpert_as_dicom(tmp_path)
    run_training(compose_config(xmark_on_dicom(source, tmp_path), tmp_path))
    release = __import__("json").loads((tmp_path / "run" / "release.json").read_text())
    released = Path(release["release_dir"])
    eps = release["epsilon"]
    assert release["num_marked"] > 0 and release["linf_within_epsilon"] and 0 < release["linf"] <= eps
    assert release["psnr_mean"] > 35
    for name in ("train.csv", "valid.csv"):
        assert (released / "CheXpert-v1.0-small" / name).read_bytes() == \
            (source / "CheXpert-v1.0-small" / name).read_bytes()
    marked = set(__import__("json").loads((tmp_path / "run" / "owner" / "secret.json").read_text())
                 ["release"]["marked_ids"])
    dm = instantiate(compose_config(["data=chexpert", f"data.root={released}", "data.image_size=32",
                                     "data.synthetic=null"], tmp_path).data)
    dm.setup()  # the release reads like any CheXpert DICOM folder
    samples = {s.id: Path(s.image.path) for split in dm.splits.values() for s in split}
    assert marked <= samples.keys()
    for sample_id, path in samples.items():
        original = source / path.relative_to(released)
        if sample_id in marked:
            assert path.suffix == ".dcm" and pydicom.dcmread(path).PhotometricInterpretation == "MONOCHROME1"
            change = np.abs(read_dicom(path).astype(np.float64) - read_dicom(original))
            assert change.max() <= eps + 1e-6 and change.max() > 0, sample_id
            assert _elements_but_pixels(path).items() >= {
                k: v for k, v in _elements_but_pixels(original).items() if k != "MediaStorageSOPInstanceUID"}.items()
        else:
            assert path.read_bytes() == original.read_bytes(), sample_id


@pytest.mark.slow
def test_xmark_refuses_a_colour_dicom_it_would_mark_before_training(tmp_path):
    from conftest import compose_config
    from datamodules.samples import DatasetError
    from utils.run import run_training

    source = chexpert_as_dicom(tmp_path, rgb_label="1.0")  # every Lung Opacity (target class) image is RGB
    with pytest.raises(DatasetError, match=r"view1_frontal\.dcm.*PhotometricInterpretation is RGB"):
        run_training(compose_config(xmark_on_dicom(source, tmp_path), tmp_path))
    assert not list((tmp_path / "run").rglob("*.ckpt")) and not (tmp_path / "run" / "released").exists()
