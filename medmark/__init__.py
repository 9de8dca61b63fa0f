"""medmark: ownership protection for medical imaging (model, dataset and image watermarks).

The ``medmark`` command (:mod:`medmark.cli`) runs ``train``, ``verify`` and ``evaluate`` with the
Hydra configs of :data:`CONFIG_DIR`; ``python train.py`` / ``verify.py`` / ``eval.py`` from a
checkout do the same.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

# configs/ sits next to this package: at the checkout's root (source tree, editable install) and
# at the top of site-packages (wheel: pyproject.toml ships configs/**/*.yaml as package data).
CONFIG_DIR: Path = Path(__file__).resolve().parent.parent / "configs"
