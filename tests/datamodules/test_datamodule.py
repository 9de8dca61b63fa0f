"""The shared data module: up-front checks and the bad-sample policy, group splits,
joint image/mask augmentation, batch contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import DatasetError, MedicalImageDataModule
from datamodules.base import SampleDataset, box_from_mask, to_float_image
from datamodules.samples import ImageFile, MaskFile, Sample
from datamodules.transforms import build_transforms


def write_folder_dataset(root, n=12, size=24, mask_size=None):
    """Generic images/ + masks/ layout with a bright square where the mask is 1."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(2, size - 10, 2)
        mask[y:y + 8, x:x + 8] = 255
        img[mask > 0] = 220
        Image.fromarray(img).save(root / "images" / f"case{i:02d}.png")
        ms = mask_size or size
        Image.fromarray(mask).resize((ms, ms), Image.NEAREST).save(root / "masks" / f"case{i:02d}.png")
    return root


def make_dm(root, **kw):
    args = dict(task="segmentation", layout="seg_folder", root=str(root), image_size=16, channels=3,
                batch_size=4, num_workers=0, val_fraction=0.25, test_fraction=0.25)
    args.update(kw)
    return MedicalImageDataModule(**args)


def test_batches_follow_the_contract(tmp_path):
    dm = make_dm(write_folder_dataset(tmp_path / "ds"))
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["mask"].shape == (4, 1, 16, 16)
    assert set(torch.unique(batch["mask"]).tolist()) <= {0.0, 1.0}
    assert batch["box"].shape == (4, 4) and len(batch["id"]) == 4
    # the bright square is where the mask is: mean intensity inside >> outside
    inside = batch["image"].mean(1, keepdim=True)[batch["mask"] > 0.5].mean()
    outside = batch["image"].mean(1, keepdim=True)[batch["mask"] < 0.5].mean()
    assert inside > outside + 0.3


def test_splits_are_disjoint_and_cover_all_samples(tmp_path):
    dm = make_dm(write_folder_dataset(tmp_path / "ds", n=20))
    dm.setup()
    ids = {name: {s.id for s in split} for name, split in dm.splits.items()}
    assert sum(len(v) for v in ids.values()) == 20
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert len(ids["val"]) == 5 and len(ids["test"]) == 5
    other = make_dm(tmp_path / "ds", split_seed=1)
    other.setup()
    assert {s.id for s in other.splits["val"]} != ids["val"]


def test_groups_never_cross_splits():
    samples = [Sample(id=f"p{p}_{k}", image=ImageFile("x.png"), label=p % 2, group=f"patient{p}")
               for p in range(10) for k in range(3)]
    dm = MedicalImageDataModule(task="classification", classes=["a", "b"], layout="x", root=".", validate="none")
    splits = dm.split_samples(samples)
    owner = {}
    for name, split in splits.items():
        for s in split:
            assert owner.setdefault(s.group, name) == name


def test_dataset_defined_splits_are_kept():
    samples = [Sample(id=f"s{i}", image=ImageFile("x.png"), label=0, split="test" if i < 3 else None) for i in range(20)]
    dm = MedicalImageDataModule(task="classification", classes=["a", "b"], layout="x", root=".", val_fraction=0.1)
    splits = dm.split_samples(samples)
    assert {s.id for s in splits["test"]} == {"s0", "s1", "s2"}  # nothing carved on top
    assert len(splits["val"]) == 2 and len(splits["train"]) == 15


def test_corrupt_image_stops_setup_naming_the_file(tmp_path):
    root = write_folder_dataset(tmp_path / "ds")
    (root / "images" / "case03.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match="case03.png"):
        make_dm(root).setup()


def test_mask_of_wrong_size_stops_setup_naming_the_file(tmp_path):
    root = write_folder_dataset(tmp_path / "ds")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "case05.png")
    with pytest.raises(DatasetError, match=r"case05\.png.*mask size"):
        make_dm(root).setup()


def test_skip_policy_drops_bad_samples_and_keeps_the_rest(tmp_path, caplog):
    root = write_folder_dataset(tmp_path / "ds", n=12)
    (root / "images" / "case03.png").write_bytes(b"garbage")
    dm = make_dm(root, on_bad_sample="skip")
    with caplog.at_level("WARNING", logger="medmark.data"):
        dm.setup()
    assert sum(len(s) for s in dm.splits.values()) == 11
    assert "case03.png" in caplog.text


def test_joint_augmentation_moves_image_and_mask_together():
    image = torch.zeros(3, 16, 16)
    image[:, 2:6, 2:6] = 1.0
    mask = (image[:1] > 0.5).to(torch.uint8)
    transform = build_transforms(16, train=True, hflip=1.0, vflip=1.0)
    from torchvision import tv_tensors
    out_image, extras = transform(tv_tensors.Image(image), {"mask": tv_tensors.Mask(mask)})
    assert torch.equal(out_image[0] > 0.5, extras["mask"][0] > 0)
    assert out_image[0, 12, 12] == 1.0 and out_image[0, 3, 3] == 0.0  # it really flipped


def test_channel_conversion_and_box():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    grey = to_float_image(rgb, 1)
    assert grey.shape == (1, 4, 4) and grey.max() == pytest.approx(0.299, abs=1e-3)
    assert to_float_image(np.full((4, 4), 255, np.uint8), 3).shape == (3, 4, 4)
    mask = torch.zeros(1, 8, 8)
    mask[0, 2:5, 3:7] = 1
    assert box_from_mask(mask).tolist() == [3.0, 2.0, 6.0, 4.0]
    assert box_from_mask(torch.zeros(1, 8, 8)).tolist() == [0.0, 0.0, 7.0, 7.0]


def test_runtime_bad_sample_respects_policy(tmp_path):
    good = write_folder_dataset(tmp_path / "ds", n=2)
    truncated = tmp_path / "trunc.png"
    data = (good / "images" / "case00.png").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    samples = [Sample(id="bad", image=ImageFile(truncated), mask=MaskFile(good / "masks" / "case00.png")),
               Sample(id="ok", image=ImageFile(good / "images" / "case01.png"), mask=MaskFile(good / "masks" / "case01.png"))]
    transform = build_transforms(16, train=False)
    strict = SampleDataset(samples, transform, 3, "error")
    with pytest.raises(DatasetError, match="trunc.png"):
        strict[0]
    lenient = SampleDataset(samples, transform, 3, "skip")
    assert lenient[0]["id"] == "ok"


def test_missing_splits_are_carved_from_train_tagged_samples():
    # PraNet/ACDC/REFUGE tag their training images 'train' and define only some other splits
    samples = [Sample(id=f"s{i}", image=ImageFile("x.png"), label=i % 2, split="train" if i < 16 else "test")
               for i in range(20)]
    dm = MedicalImageDataModule(task="classification", classes=["a", "b"], layout="x", root=".", val_fraction=0.25)
    splits = dm.split_samples(samples)
    assert len(splits["test"]) == 4 and all(s.split == "test" for s in splits["test"])
    assert len(splits["val"]) == 4 and len(splits["train"]) == 12
