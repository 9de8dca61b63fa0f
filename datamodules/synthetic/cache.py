"""The registry of synthetic generators and the cache that generates each dataset once, atomically.

:func:`ensure_synthetic` keeps a dataset in ``data_dir/<name>_<hash of parameters>/`` and
marks it complete with :data:`MARKER_NAME`, written last; generation goes to a temporary
sibling renamed into place, so an interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.synthetic.common import log
from datamodules.synthetic.cxr import generate_synthetic_cxr
from datamodules.synthetic.dr import generate_synthetic_dr
from datamodules.synthetic.fundus import generate_synthetic_fundus
from datamodules.synthetic.polyp import generate_synthetic_polyp

#: Bump when a generator's output changes, so cached datasets are regenerated.
GENERATOR_VERSION = 1
#: Completion marker inside a finished dataset folder (records the parameters).
MARKER_NAME = ".medmark_synthetic.json"

GENERATORS: dict[str, Callable[..., Path]] = {
    "synthetic_polyp": generate_synthetic_polyp,
    "synthetic_fundus": generate_synthetic_fundus,
    "synthetic_cxr": generate_synthetic_cxr,
    "synthetic_dr": generate_synthetic_dr,
}


def _plain(value: Any) -> Any:
    """Config values (OmegaConf containers, tuples, numpy scalars) as JSON-able builtins."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (isinstance(value, Sequence) and not isinstance(value, (str, bytes))):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"synthetic data option of type {type(value).__name__} is not a plain value: {value!r}")


def synthetic_params(name: str, num_images: int, image_size: int, seed: int, **options: Any) -> dict[str, Any]:
    """The parameters that identify a synthetic dataset (what the folder hash covers)."""
    return {
        "name": name,
        "num_images": int(num_images),
        "image_size": int(image_size),
        "seed": int(seed),
        "options": _plain(dict(sorted(options.items()))),
        "generator_version": GENERATOR_VERSION,
    }


def synthetic_dir(name: str, data_dir: Path, num_images: int, image_size: int, seed: int, **options: Any) -> Path:
    """``data_dir/<name>_<hash>``: where :func:`ensure_synthetic` keeps this dataset."""
    params = synthetic_params(name, num_images, image_size, seed, **options)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return Path(data_dir) / f"{name}_{digest}"


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(final: Path) -> None:
    """Delete this dataset's temp folders left by dead generator processes on this host.

    Temp folders of live processes, or of other hosts (shared file systems), are left
    alone: their owner may still finish and rename them.
    """
    host = socket.gethostname()
    prefix = f".{final.name}.partial-"
    for partial in final.parent.glob(prefix + "*"):
        # <prefix><host>-<pid>-<token>; split from the right, host names may contain "-".
        parts = partial.name[len(prefix):].rsplit("-", 2)
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            log.info("removing %s, left by an interrupted generation", partial)
            shutil.rmtree(partial, ignore_errors=True)


def ensure_synthetic(name: str, data_dir: Path, num_images: int, image_size: int, seed: int, **options: Any) -> Path:
    """Generate synthetic dataset ``name`` once and return the folder to point its reader at.

    The dataset lives in ``data_dir/<name>_<short hash of all parameters>/`` and counts
    as complete only when it holds :data:`MARKER_NAME`, written last. Generation goes to a
    temporary sibling (``.<name>_<hash>.partial-<host>-<pid>-<token>``) that is renamed into
    place at the end, so an interrupted run never leaves a folder that looks complete,
    and two processes racing for the same dataset both end up with one complete copy.
    """
    if name not in GENERATORS:
        raise ValueError(f"unknown synthetic dataset {name!r}; known: {sorted(GENERATORS)}")
    params = synthetic_params(name, num_images, image_size, seed, **options)
    final = synthetic_dir(name, data_dir, num_images, image_size, seed, **options)
    marker = _read_marker(final)
    if marker is not None:
        log.info("synthetic %s: reusing %s", name, final)
        return final / marker.get("root", ".")

    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(final)
    partial = final.parent / f".{final.name}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    log.info("synthetic %s: generating %d images of %d px into %s", name, num_images, image_size, final)
    try:
        root = GENERATORS[name](partial, int(num_images), int(image_size), int(seed), **params["options"])
        relative = Path(os.path.relpath(root, partial)).as_posix()
        (partial / MARKER_NAME).write_text(json.dumps({**params, "root": relative}, indent=2, sort_keys=True) + "\n")
        if final.exists() and _read_marker(final) is None:
            shutil.rmtree(final)  # an incomplete folder (e.g. copied by hand): replace it
        try:
            partial.rename(final)
        except OSError:
            if _read_marker(final) is None:  # not a lost race: a real error
                raise
            log.info("synthetic %s: another process finished %s first", name, final)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return final / relative
