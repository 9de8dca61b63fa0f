"""LightningDataModules for the real datasets' on-disk layouts and synthetic generators."""

from datamodules.base import MedicalImageDataModule
from datamodules.samples import BadSampleError, DatasetError, DatasetLayoutError, Sample

__all__ = [
    "BadSampleError",
    "DatasetError",
    "DatasetLayoutError",
    "MedicalImageDataModule",
    "Sample",
]
