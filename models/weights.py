"""Local weight files: find them, read them, fit them to a network.

medmark never downloads weights at run time (docs/models.md: offline by
default). A config either asks for random initialisation (``null``) or names a
file on disk; a named file that is missing is an error that says what was
expected and how to get it -- never a silent fall-back to random weights, which
would quietly turn a "pretrained SAM" experiment into a "random ViT" one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
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


# --------------------------------------------------------------------------------------
# The weights manifest (configs/weights.yaml): which files medmark knows, where they go,
# and the digests they must have. Read by `python -m models.weights_cli` and by
# backbone.pretrained=true of timm classifiers.
# --------------------------------------------------------------------------------------
MANIFEST_PATH = Path(__file__).resolve().parents[1] / "configs" / "weights.yaml"
_HEX = set("0123456789abcdef")
_DIGEST_FIELDS = {"sha256": 64, "sha256_prefix": None, "md5": 32}


class WeightsManifestError(ValueError):
    """The manifest is unusable; the message names the file and the field."""


@dataclass(frozen=True)
class WeightEntry:
    """One known weights file (an entry of ``configs/weights.yaml``'s ``files``)."""

    name: str
    file: str
    url: str
    sha256: str | None = None
    sha256_prefix: str | None = None
    md5: str | None = None
    timm: tuple[str, ...] = ()
    used_by: str = ""

    def digest_text(self) -> str:
        """Short description of what is checked, e.g. ``"sha256 f37072fd..."``."""
        if self.sha256:
            return f"sha256 {self.sha256[:12]}..."
        parts = [f"sha256 {self.sha256_prefix}..."] if self.sha256_prefix else []
        if self.md5:
            parts.append(f"md5 {self.md5[:12]}...")
        return ", ".join(parts)


def load_manifest(path: str | os.PathLike | None = None) -> dict[str, WeightEntry]:
    """Read the weights manifest (default ``configs/weights.yaml``) and check every entry.

    Returns:
        ``{entry name: WeightEntry}`` in file order.

    Raises:
        WeightsManifestError: unreadable YAML, no ``files`` mapping, an entry without ``file``
            or ``url``, a file name with a folder part, or a digest that is not lower-case hex of
            the right length; the message names the manifest and ``files.<name>.<field>``.
    """
    import yaml

    path = Path(path) if path is not None else MANIFEST_PATH
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise WeightsManifestError(f"{path}: unreadable weights manifest ({type(exc).__name__}: {exc})") from exc
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(files, dict) or not files:
        raise WeightsManifestError(f"{path}: field 'files' must be a non-empty mapping of entry name -> file")
    entries: dict[str, WeightEntry] = {}
    for name, spec in files.items():
        where = f"{path}: field files.{name}"
        if not isinstance(spec, dict):
            raise WeightsManifestError(f"{where} must be a mapping")
        unknown = sorted(set(spec) - {"file", "url", "timm", "used_by", *_DIGEST_FIELDS})
        if unknown:
            raise WeightsManifestError(f"{where}: unknown key(s) {unknown}")
        for key in ("file", "url"):
            if not isinstance(spec.get(key), str) or not spec[key]:
                raise WeightsManifestError(f"{where}.{key} is missing or not a string")
        if Path(spec["file"]).name != spec["file"] or spec["file"] in (".", ".."):
            raise WeightsManifestError(f"{where}.file must be a bare file name, got {spec['file']!r}")
        digests = {}
        for key, length in _DIGEST_FIELDS.items():
            value = spec.get(key)
            if value is None:
                continue
            value = str(value)
            if not value or set(value) - _HEX or (length is not None and len(value) != length) or len(value) > 64:
                raise WeightsManifestError(
                    f"{where}.{key} must be lower-case hex" + (f" of {length} digits" if length else "")
                    + f", got {value!r}"
                )
            digests[key] = value
        if not digests:
            raise WeightsManifestError(f"{where} has no digest (one of {sorted(_DIGEST_FIELDS)})")
        timm_names = spec.get("timm") or []
        if isinstance(timm_names, str) or not all(isinstance(n, str) for n in timm_names):
            raise WeightsManifestError(f"{where}.timm must be a list of timm model names")
        entries[str(name)] = WeightEntry(name=str(name), file=spec["file"], url=spec["url"], timm=tuple(timm_names),
                                         used_by=str(spec.get("used_by", "")), **digests)
    return entries


def default_weights_dir() -> Path:
    """``$MEDMARK_WEIGHTS_DIR``, else ``($MEDMARK_ROOT or the working directory)/weights``.

    The same rule as ``paths.weights_dir`` in ``configs/paths/default.yaml``, for code that runs
    outside Hydra (the weights command).
    """
    if os.environ.get("MEDMARK_WEIGHTS_DIR"):
        return Path(os.path.expanduser(os.environ["MEDMARK_WEIGHTS_DIR"]))
    return Path(os.environ.get("MEDMARK_ROOT") or os.getcwd()) / "weights"


def candidate_paths(entry: WeightEntry, weights_dir: str | os.PathLike | None) -> list[Path]:
    """Where ``entry`` is looked for, in order: the weights folder, then the torch hub cache."""
    folder = Path(os.path.expandvars(os.path.expanduser(str(weights_dir)))) if weights_dir else default_weights_dir()
    return [folder / entry.file, Path(torch.hub.get_dir()) / "checkpoints" / entry.file]


def find_local(entry: WeightEntry, weights_dir: str | os.PathLike | None) -> Path | None:
    """The first existing file of :func:`candidate_paths`, or ``None``."""
    return next((p for p in candidate_paths(entry, weights_dir) if p.is_file()), None)


def file_digests(path: str | os.PathLike, chunk: int = 1 << 20) -> tuple[str, str]:
    """``(sha256 hex, md5 hex)`` of a file's bytes, read in chunks."""
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            sha256.update(block)
            md5.update(block)
    return sha256.hexdigest(), md5.hexdigest()


def verify_file(entry: WeightEntry, path: str | os.PathLike) -> str | None:
    """Check a local copy against every digest of ``entry``.

    Returns:
        ``None`` when all match, else a sentence naming the digest that differs (expected
        vs. found).
    """
    sha256, md5 = file_digests(path)
    if entry.sha256 and sha256 != entry.sha256:
        return f"sha256 is {sha256}, expected {entry.sha256}"
    if entry.sha256_prefix and not sha256.startswith(entry.sha256_prefix):
        return f"sha256 is {sha256}, expected it to start with {entry.sha256_prefix}"
    if entry.md5 and md5 != entry.md5:
        return f"md5 is {md5}, expected {entry.md5}"
    return None


def locate_timm_pretrained(
    name: str, weights_dir: str | os.PathLike | None, manifest: str | os.PathLike | None = None
) -> Path:
    """The local ImageNet weights for timm model ``name`` (``backbone.pretrained=true``), offline.

    Looks, in order, at the manifest file for ``name`` in ``weights_dir`` and in the torch hub
    cache (a found manifest file must match its digests), then at timm's own release of the
    model's default tag in the local Hugging Face cache (where smp's encoders are found too).

    Raises:
        FileNotFoundError: nothing found; the message names every path looked at and the
            ``fetch`` command that would put the file in place.
        ValueError: a manifest file is present but its digest differs (a corrupt/partial copy).
    """
    entries = [e for e in load_manifest(manifest).values() if name in e.timm]
    looked: list[str] = []
    for entry in entries:
        for path in candidate_paths(entry, weights_dir):
            looked.append(str(path))
            if path.is_file():
                problem = verify_file(entry, path)
                if problem:
                    raise ValueError(f"pretrained weights for {name}: '{path}' is corrupt or not {entry.file} "
                                     f"({problem}); delete it and fetch it again")
                return path
    hub_id = None
    try:
        import timm

        hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id if timm.models.is_model(name) else None
    except Exception:  # an unknown name or a timm without that tag: nothing more to look at
        hub_id = None
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for file_name in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, file_name)
            looked.append(f"Hugging Face cache {hub_id}/{file_name}")
            if isinstance(found, str):
                return Path(found)
    if entries:
        fetch = (f"Run `python -m models.weights_cli fetch {entries[0].name}` on a machine with internet access "
                 f"(or download {entries[0].url}) and put the file at '{looked[0]}'")
    else:
        fetch = ("configs/weights.yaml has no file for this model; put its timm state dict somewhere and set "
                 "backbone.weights_path= to it")
    raise FileNotFoundError(
        f"backbone.pretrained=true for {name}: no local pretrained weights (medmark never downloads at run "
        f"time). Looked at: {'; '.join(looked) or 'nothing'}. {fetch}; or set backbone.pretrained=false for "
        "an explicit random initialisation."
    )
