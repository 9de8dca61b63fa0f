"""LightningDataModules shared by every dataset preset.

A preset (``configs/data/<name>.yaml``) names a reader (``layout``), a folder (``root``)
and the options of the task. The module

1. optionally generates a synthetic dataset in the same on-disk layout (``synthetic``),
2. reads the list of samples with the layout's reader,
3. checks every sample up front (files readable, mask size equal to image size) and
   applies ``on_bad_sample`` (``error``: stop before training and name the files;
   ``skip``: drop them and log which),
4. splits by group (patient/video/volume) where the dataset does not define a split,
5. serves batches ``{"image": B×C×H×W float [0,1], "mask": B×1×H×W float {0,1} | "label":
   B long, "id": list[str], "box": B×4 (segmentation), "lesion_mask": optional}``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from tqdm.auto import tqdm

from datamodules.readers import read_dataset
from datamodules.samples import SPLITS, BadSampleError, DatasetError, Sample
from datamodules.transforms import build_transforms

log = logging.getLogger("medmark.data")


def _writable(arr: np.ndarray) -> np.ndarray:
    # PIL hands out read-only views; torch wants memory it may write to.
    arr = np.ascontiguousarray(arr)
    return arr if arr.flags.writeable else arr.copy()


def to_float_image(arr: np.ndarray, channels: int) -> torch.Tensor:
    """H×W or H×W×C array (uint8 [0,255] or float [0,1]) -> float C×H×W in [0, 1]."""
    x = torch.from_numpy(_writable(arr))
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float().clamp(0, 1)
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)[:3]
    if x.shape[0] == channels:
        return x
    if channels == 1:  # ITU-R 601 luma, the usual RGB -> grey weights
        weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        return (x * weights).sum(0, keepdim=True)
    return x.expand(channels, -1, -1).clone()


def box_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Tight (x0, y0, x1, y1) box of a 1×H×W mask in pixels; the full image if empty.

    Used as the SAM box prompt: like the SAM papers' box-prompt evaluation, the box
    comes from the ground truth.
    """
    h, w = mask.shape[-2:]
    ys, xs = torch.nonzero(mask.reshape(h, w) > 0.5, as_tuple=True)
    if len(ys) == 0:
        return torch.tensor([0.0, 0.0, float(w - 1), float(h - 1)])
    return torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()


class SampleDataset(Dataset):
    """Map-style dataset over :class:`Sample` objects (see module docstring for items)."""

    def __init__(self, samples: list[Sample], transform, channels: int, on_bad_sample: str):
        self.samples = samples
        # Where only some images have lesion annotations (IDRiD), the others get an empty
        # mask plus has_lesion_mask=False, so batches collate and nobody mistakes
        # "not annotated" for "lesion-free".
        self.any_lesion_mask = any(s.lesion_mask is not None for s in samples)
        self.transform = transform
        self.channels = channels
        self.on_bad_sample = on_bad_sample

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for offset in range(len(self.samples)):
            sample = self.samples[(index + offset) % len(self.samples)]
            try:
                return self._load(sample)
            except BadSampleError as exc:
                # Header checks cannot see every truncated file; the policy applies here too.
                if self.on_bad_sample == "error":
                    raise
                log.warning("skipping bad sample %s: %s", sample.id, exc)
        raise DatasetError("every sample of this split failed to load")

    def _load(self, sample: Sample) -> dict[str, Any]:
        image = tv_tensors.Image(to_float_image(sample.image.read(), self.channels))
        extras: dict[str, tv_tensors.Mask] = {}
        if sample.mask is not None:
            extras["mask"] = self._read_mask(sample.mask, image, sample)
        if sample.lesion_mask is not None:
            extras["lesion_mask"] = self._read_mask(sample.lesion_mask, image, sample)
        image, extras = self.transform(image, extras)
        item: dict[str, Any] = {"image": image.as_subclass(torch.Tensor), "id": sample.id}
        for key, value in extras.items():
            item[key] = value.as_subclass(torch.Tensor).float()
        if self.any_lesion_mask:
            item["has_lesion_mask"] = "lesion_mask" in item
            item.setdefault("lesion_mask", torch.zeros(1, *item["image"].shape[-2:]))
        if "mask" in item:
            item["box"] = box_from_mask(item["mask"])
        if sample.label is not None:
            item["label"] = torch.tensor(sample.label, dtype=torch.long)
        return item

    @staticmethod
    def _read_mask(source, image: torch.Tensor, sample: Sample) -> tv_tensors.Mask:
        mask = source.read()
        if tuple(mask.shape[:2]) != tuple(image.shape[-2:]):
            raise BadSampleError(
                source.path,
                f"mask size {tuple(mask.shape[:2])} differs from image size "
                f"{tuple(image.shape[-2:])} of {sample.image.path}",
            )
        return tv_tensors.Mask(torch.from_numpy(_writable(mask)).unsqueeze(0).to(torch.uint8))


class MedicalImageDataModule(LightningDataModule):
    """Data module of one dataset preset.

    Args:
        task: ``segmentation`` (batches carry ``mask`` B×1×H×W in {0,1} and ``box`` B×4)
            or ``classification`` (batches carry ``label`` B, long).
        classes: ordered class names (classification); ``label`` indexes this list.
        num_classes: must equal ``len(classes)`` (1 for segmentation); configs derive it.
        layout: reader name (``datamodules/readers``), e.g. ``kvasir_seg``, ``chexpert``.
        root: dataset folder as downloaded. Ignored when ``synthetic`` is set.
        image_size: side of the square images served (pixels).
        channels: 1 (grey) or 3 (RGB) channels served to the model.
        val_fraction, test_fraction: share of groups carved out when the dataset does not
            define that split itself.
        split_seed: seed of the split draw (independent of the training seed).
        on_bad_sample: ``error`` (default) or ``skip`` (drop, and log which).
        validate: ``header`` (open every file, compare sizes), ``full`` (decode every
            file) or ``none``.
        augment: keyword arguments of :func:`build_transforms` for the training split.
        synthetic: ``{name, num_images, image_size, seed, ...}`` to generate the dataset in
            its real layout under ``data_dir`` on first use.
        reader_options: extra options passed to the reader (``finding``, ``target``...).
        batch_size, eval_batch_size: per process (DDP); eval defaults to ``batch_size``.
        num_workers, pin_memory, persistent_workers, prefetch_factor: DataLoader options
            (``persistent_workers`` and ``prefetch_factor`` apply only with ``num_workers > 0``;
            ``prefetch_factor: null`` = PyTorch's default of 2 batches per worker).
    """

    def __init__(
        self,
        task: str,
        layout: str,
        classes: list[str] | None = None,
        num_classes: int | None = None,
        root: str | None = None,
        image_size: int = 128,
        channels: int = 3,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        on_bad_sample: str = "error",
        validate: str = "header",
        augment: dict | None = None,
        synthetic: dict | None = None,
        data_dir: str | None = None,
        reader_options: dict | None = None,
    ):
        super().__init__()
        if task not in ("segmentation", "classification"):
            raise ValueError(f"data.task must be 'segmentation' or 'classification', got {task!r}")
        if task == "classification" and (classes is None or len(classes) < 2):
            raise ValueError(f"data.classes needs at least two class names for classification, got {classes}")
        expected = len(classes) if task == "classification" else 1
        if num_classes is not None and num_classes != expected:
            raise ValueError(f"data.num_classes={num_classes} but data.classes has {expected} entries")
        self.task = task
        self.classes = list(classes) if classes is not None else None
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"data.on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        if validate not in ("header", "full", "none"):
            raise ValueError(f"data.validate must be 'header', 'full' or 'none', got {validate!r}")
        if root is None and synthetic is None:
            raise ValueError("data.root is required (the dataset folder) unless data.synthetic is set")
        self.layout = layout
        self.root = root
        self.image_size = image_size
        self.channels = channels
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        # Both only mean something with worker processes (DataLoader refuses them otherwise).
        self.persistent_workers = persistent_workers and num_workers > 0
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.on_bad_sample = on_bad_sample
        self.validate = validate
        self.augment = dict(augment or {})
        self.synthetic = dict(synthetic) if synthetic else None
        self.data_dir = data_dir
        self.reader_options = dict(reader_options or {})
        self.splits: dict[str, list[Sample]] = {}
        self._synthetic_root: Path | None = None

    # -- reading ---------------------------------------------------------------------------
    def dataset_root(self) -> Path:
        """The folder the reader reads (generating synthetic data if needed)."""
        if self.synthetic is None:
            return Path(self.root)
        if self._synthetic_root is None:
            from datamodules.synthetic import ensure_synthetic

            if self.data_dir is None:
                raise ValueError("data.data_dir is required for synthetic data")
            options = dict(self.synthetic)
            self._synthetic_root = ensure_synthetic(options.pop("name"), Path(self.data_dir), **options)
        return self._synthetic_root

    def prepare_data(self) -> None:
        # Runs on one process per node before setup: the place to write synthetic data.
        self.dataset_root()

    def read_samples(self) -> list[Sample]:
        return read_dataset(self.layout, self.dataset_root(), **self._reader_kwargs())

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else 1

    def _reader_kwargs(self) -> dict:
        if self.task == "classification":
            return {"classes": self.classes, **self.reader_options}
        return dict(self.reader_options)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        samples = self.check_samples(self.read_samples())
        self.splits = self.split_samples(samples)
        for name in SPLITS:
            if not self.splits[name]:
                raise DatasetError(
                    f"{self.dataset_root()}: the {name} split is empty "
                    f"({len(samples)} usable samples; check data.val_fraction/test_fraction)"
                )
        if self.task == "classification":
            present = {s.label for s in self.splits["train"]}
            if len(present) < 2:
                raise DatasetError(
                    f"{self.dataset_root()}: the train split has only class(es) "
                    f"{[self.classes[i] for i in sorted(present)]}"
                )
        log.info("data %s: %s", self.layout, {k: len(v) for k, v in self.splits.items()})

    def check_samples(self, samples: list[Sample]) -> list[Sample]:
        """Open every file before training; apply ``on_bad_sample`` to the failures."""
        if self.validate == "none":
            return samples
        bad: list[tuple[Sample, BadSampleError]] = []
        good: list[Sample] = []
        full = self.validate == "full"
        for sample in tqdm(samples, desc=f"checking {self.layout}", disable=len(samples) < 500, leave=False):
            try:
                self._check_one(sample, full)
                good.append(sample)
            except BadSampleError as exc:
                bad.append((sample, exc))
        if bad:
            lines = "\n".join(f"  {exc}" for _, exc in bad[:20])
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            if self.on_bad_sample == "error":
                raise DatasetError(
                    f"{len(bad)} bad sample(s) in {self.dataset_root()} "
                    f"(set data.on_bad_sample=skip to drop them):\n{lines}{more}"
                )
            log.warning("skipping %d bad sample(s):\n%s%s", len(bad), lines, more)
        return good

    @staticmethod
    def _check_one(sample: Sample, full: bool) -> None:
        size = tuple(sample.image.read().shape[:2]) if full else sample.image.size()
        for source in (sample.mask, sample.lesion_mask):
            if source is None:
                continue
            other = tuple(source.read().shape[:2]) if full else source.size()
            if other != size:
                raise BadSampleError(
                    source.path, f"mask size {other} differs from image size {size} of {sample.image.path}"
                )

    def split_samples(self, samples: list[Sample]) -> dict[str, list[Sample]]:
        """Keep dataset-defined splits; carve missing val/test by group from the training pool.

        The pool is every sample tagged ``train`` or untagged. Groups (patients...) move
        as a whole, so no group ends up in two splits.
        """
        unknown = {s.split for s in samples} - set(SPLITS) - {None}
        if unknown:
            raise DatasetError(f"reader {self.layout!r} produced unknown splits {sorted(unknown)}")
        splits: dict[str, list[Sample]] = {name: [s for s in samples if s.split == name] for name in ("val", "test")}
        pool = [s for s in samples if s.split in (None, "train")]
        groups = sorted({s.group or s.id for s in pool})
        order = np.random.default_rng(self.split_seed).permutation(len(groups))
        assignment: dict[str, str] = {}
        start = 0
        for name, share in (("val", self.val_fraction), ("test", self.test_fraction)):
            if splits[name] or share <= 0:
                continue
            count = max(1, int(round(share * len(groups))))  # a requested split is never silently empty
            for i in order[start:start + count]:
                assignment[groups[i]] = name
            start += count
        splits["train"] = []
        for sample in pool:
            splits[assignment.get(sample.group or sample.id, "train")].append(sample)
        return {name: splits[name] for name in SPLITS}

    # -- loaders ---------------------------------------------------------------------------
    def dataset(self, split: str, train_transforms: bool | None = None) -> SampleDataset:
        """The dataset of ``split`` ('train'/'val'/'test'); augmentation only for train."""
        if not self.splits:
            self.setup()
        train = split == "train" if train_transforms is None else train_transforms
        transform = build_transforms(self.image_size, train=train, **(self.augment if train else {}))
        return SampleDataset(self.splits[split], transform, self.channels, self.on_bad_sample)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            prefetch_factor=self.prefetch_factor,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
