"""Local weight files: find them, read them, fit them to a network.

medmark never downloads weights at run time (DESIGN.md, "Real parts, offline by
default"). A config either asks for random initialisation (``null``) or names a
file on disk; a named file that is missing is an error that says what was
expected and how to get it -- never a silent fall-back to random weights, which
would quietly turn a "pretrained SAM" experiment into a "random ViT" one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

# Where the well-known files come from, keyed by file name. Used only to make the
# "file not found" message actionable; nothing here is ever fetched.
KNOWN_WEIGHT_SOURCES: dict[str, str] = {
    "sam_vit_b_01ec64.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "sam_vit_l_0b3195.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "sam_vit_h_4b8939.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}


def resolve_local_weights(path: str | os.PathLike | None, what: str, how_to_get: str | None = None) -> Path | None:
    """Check that a weights file named by a config exists, without touching the network.

    Args:
        path: file path from the config (``~`` and ``$VARS`` are expanded), or ``None``
            for "random initialisation, on purpose".
        what: what the file is for, e.g. ``"SAM vit_b checkpoint (backbone.checkpoint)"``;
            it starts the error message.
        how_to_get: instructions for obtaining the file; a default is derived from the
            file name (known SAM checkpoints get their release URL).

    Returns:
        The absolute path of the existing file, or ``None`` when ``path`` is ``None``.

    Raises:
        FileNotFoundError: the path is empty, does not exist or is a directory. The
            message names the expected file, what it is for and how to get it.
    """
    if path is None:
        return None
    raw = str(path)
    resolved = Path(os.path.expandvars(os.path.expanduser(raw))).absolute() if raw else None
    if resolved is not None and resolved.is_file():
        return resolved
    # An empty string usually comes from an unset environment interpolation; treating it
    # as "random init" would be exactly the silent fall-back this function exists to stop.
    problem = "an empty path was given" if resolved is None else (
        f"'{resolved}' is a directory, not a file" if resolved.is_dir() else f"'{resolved}' does not exist"
    )
    if how_to_get is None:
        name = Path(raw).name
        if name in KNOWN_WEIGHT_SOURCES:
            how_to_get = (
                f"Download {name} from the segment-anything release page "
                f"({KNOWN_WEIGHT_SOURCES[name]}) on a machine with internet access, copy it to "
                f"'{resolved}' (or set paths.weights_dir / backbone.checkpoint= to where it is)."
            )
        else:
            how_to_get = (
                "Copy the file there from a machine with internet access, or point the config "
                "key at its real location; use null for an explicit random initialisation."
            )
    raise FileNotFoundError(f"{what}: expected a weights file at '{raw}', but {problem}. {how_to_get}")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch pickle, on the CPU.

    Torch files are read with ``weights_only=True`` (no arbitrary code execution).
    Common wrappers are unwrapped: a Lightning checkpoint's ``state_dict`` or a
    ``{"model": ...}`` / ``{"state_dict": ...}`` dict.

    Returns:
        Mapping from parameter/buffer name to tensor.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"'{path}' does not contain a state dict (a mapping of names to tensors).")
    return dict(obj)


def adapt_input_channels(state_dict: dict[str, Tensor], target: Mapping[str, Tensor]) -> list[str]:
    """Fit RGB first-convolution weights to a network with another input channel count.

    Any 4-D weight whose shape differs from the target's only in the input-channel
    dimension (dim 1) and that has 3 input channels is converted in place with timm's
    rule (1 channel: sum over RGB; k channels: cycle RGB and scale by 3/k) -- the same
    rule smp applies when it loads ImageNet encoders for grey images.

    Args:
        state_dict: weights read from disk (modified in place).
        target: the network's own ``state_dict()`` (for the expected shapes).

    Returns:
        Names of the converted tensors (normally just the stem convolution).
    """
    from timm.models import adapt_input_conv

    adapted = []
    for name, weight in state_dict.items():
        want = target.get(name)
        if want is None or weight.ndim != 4 or want.ndim != 4 or weight.shape == want.shape:
            continue
        same_but_channels = weight.shape[0] == want.shape[0] and weight.shape[2:] == want.shape[2:]
        if same_but_channels and weight.shape[1] == 3:
            state_dict[name] = adapt_input_conv(want.shape[1], weight)
            adapted.append(name)
    return adapted


def describe_key_mismatch(missing: list[str], unexpected: list[str], limit: int = 20) -> str:
    """Human-readable summary of a state-dict mismatch (first ``limit`` keys of each kind)."""

    def fmt(keys: list[str]) -> str:
        shown = ", ".join(keys[:limit])
        return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")

    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {fmt(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {fmt(unexpected)}")
    return "; ".join(parts) if parts else "no key mismatch"
