"""Readers: one function per on-disk dataset layout (docs/data.md).

A reader has the signature ``reader(root: Path, **options) -> list[Sample]`` and is
registered by name with :func:`register_reader`; the data module config selects it with
``data.layout``. Readers check the layout up front and raise
:class:`~datamodules.samples.DatasetLayoutError` naming the missing folder, CSV or column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from datamodules.samples import DatasetLayoutError, Sample

Reader = Callable[..., list[Sample]]
READERS: dict[str, Reader] = {}


def register_reader(name: str) -> Callable[[Reader], Reader]:
    def deco(fn: Reader) -> Reader:
        if name in READERS:
            raise ValueError(f"reader {name!r} registered twice")
        READERS[name] = fn
        return fn

    return deco


def read_dataset(layout: str, root: str | Path, **options) -> list[Sample]:
    """Read the dataset at ``root`` with the reader registered as ``layout``."""
    _import_all()
    if layout not in READERS:
        raise DatasetLayoutError(f"unknown data.layout {layout!r}; known: {sorted(READERS)}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: dataset folder not found (data.root)")
    samples = READERS[layout](root, **options)
    if not samples:
        raise DatasetLayoutError(f"{root}: no samples found for layout {layout!r}")
    return samples


def _import_all() -> None:
    # Imported lazily so that registering happens once, without import cycles.
    from datamodules.readers import classification, segmentation  # noqa: F401
