"""Export of a MedLocker / MIAD-MARK protection run: images, certificates, restore data, owner kit.

After ``trainer.test`` the module (:class:`lightning_modules.medlocker.MedLockerModule`) holds
one record per test image. :class:`ProtectionExport` writes, under ``output_dir``::

    protected/                 the protected images in the dataset's own layout: each image at
                               its original relative path (suffix .png, lossless), CSV files at
                               the dataset root keeping only the rows of protected images,
                               lesion masks copied alongside (same relative paths)
    certificates.json          signed (Ed25519) per-image parameters (watermark.certificates)
    restore/<file>.mmrb        encrypted exact residuals, AES-256-GCM, per-image HKDF keys
    restore/index.json         image id -> restore file, protected image path
    deltas.npz                 MIAD-MARK's δ per image (needed to re-render; not secret)
    logo.npy                   the exact RGBA logo asset (its hash is certified)
    protection.json            metrics: accuracy clean / protected / after removal, per image
    figures/medlocker_panel.png  original | lesion region | protected | |difference|
    owner/secret.json          method, ids, data config, paths (no key material)
    owner/public_key.pem       owner's Ed25519 public key (share it)
    owner/owner_private_key.pem, owner/master_key.hex   mode 0600, never logged

Before writing, every original is compared bit for bit with its file on disk: protection
happens at the served resolution, which must be the stored one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

from datamodules.dicom import is_dicom_path  # noqa: E402
from watermark.certificates import (  # noqa: E402
    build_certificate,
    owner_signing_key,
    save_certificate,
    sha256_array,
    sign_certificate,
    write_secret_file,
)
from watermark.medlocker.keyed_removal import encrypt_residual, generate_master_key, load_master_key, save_master_key  # noqa: E402

log = logging.getLogger("medmark.medlocker")

SECRET_FORMAT = "medmark-medlocker-secret"


def safe_name(image_id: str) -> str:
    """Filesystem-safe, collision-free file stem for an image id."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)[-60:].lstrip(".") or "id"
    return f"{readable}-{hashlib.sha1(image_id.encode()).hexdigest()[:10]}"


def save_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 H×W×C (C in 1, 3) array as a lossless PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path, format="PNG")


def read_png(path: Path) -> np.ndarray:
    """Read an image as uint8 H×W×C (grey -> C = 1)."""
    with Image.open(path) as img:
        img.load()
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        a = np.asarray(img)
    return a[..., None] if a.ndim == 2 else a


def _filter_csv(src: Path, dst: Path, keep: set[str]) -> int:
    """Copy ``src`` keeping the header and the rows that name a kept id (cell or file stem)."""
    with open(src, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return 0
    out = [rows[0]] + [r for r in rows[1:] if any(c.strip() in keep or Path(c.strip()).stem in keep for c in r)]
    with open(dst, "w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(out)
    return len(out) - 1


class ProtectionExport(Callback):
    """Write the outputs of a protection run (module docstring).

    Args:
        output_dir: the run folder.
        owner_id: the claimant written into certificates.
        private_key: the owner's Ed25519 PEM; null = create ``owner/owner_private_key.pem``.
        master_key: the owner's 32-byte restore master key file; null = create ``owner/master_key.hex``.
        data: the data config (stored in the secret so verification can find the originals).
        split: the split that was protected (``test``).
        num_panel: images in the figure.
    """

    def __init__(self, output_dir: str, owner_id: str, data: dict, private_key: str | None = None,
                 master_key: str | None = None, split: str = "test", num_panel: int = 4):
        self.output_dir = Path(output_dir)
        self.owner_id = str(owner_id)
        self.private_key = private_key
        self.master_key = master_key
        self.data = OmegaConf.to_container(data, resolve=True) if isinstance(data, DictConfig) else dict(data)
        self.split = split
        self.num_panel = num_panel
        self._checked = False  # the split's pre-check runs once, at the first setup (fit, then test, ...)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # before any training or protection: the export checks the same at the end (check_originals),
        # after every image has been protected
        datamodule = trainer.datamodule
        if self._checked or datamodule is None or self.split not in getattr(datamodule, "splits", {}):
            return
        check_protectable(datamodule.splits[self.split], int(datamodule.image_size), int(datamodule.channels))
        self._checked = True

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        records = getattr(pl_module, "records", None)
        if not records:
            log.warning("no protection records: nothing exported")
            return
        datamodule = trainer.datamodule
        export_protection(self.output_dir, pl_module, records, datamodule, owner_id=self.owner_id,
                          private_key=self.private_key, master_key=self.master_key, data=self.data, split=self.split)
        fig = panel_figure(records[: self.num_panel])
        fig_path = self.output_dir / "figures" / "medlocker_panel.png"
        fig_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(fig_path, dpi=120)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({"test/medlocker_panel": wandb.Image(fig)})
        plt.close(fig)


def _owner_keys(owner_dir: Path, private_key: str | None, master_key: str | None) -> tuple[object, bytes, dict]:
    owner_dir.mkdir(parents=True, exist_ok=True)
    key, private_path, _public_path = owner_signing_key(owner_dir, private_key, field="private_key",
                                                        public_name="public_key.pem")
    paths = {"private_key": str(private_path.resolve())}
    if master_key:
        mk = load_master_key(master_key)
        paths["master_key"] = str(Path(master_key).resolve())
    else:
        mk = generate_master_key()
        paths["master_key"] = str(save_master_key(owner_dir / "master_key.hex", mk).resolve())
    return key, mk, paths


def check_protectable(samples: list, image_size: int, channels: int) -> None:
    """Every image of the split to protect must be what the model is served, bit for bit: an 8-bit file of
    ``image_size`` × ``image_size`` with ``channels`` channels (the exact restore and the lesion guarantee are
    about the stored file). ValueError naming the first file that is not, and what to change."""
    for sample in samples:
        stored = np.asarray(sample.image.read())
        path, stored_channels = sample.image.path, 1 if stored.ndim == 2 else min(stored.shape[2], 3)
        if stored.dtype != np.uint8:
            kind = "a DICOM file" if is_dicom_path(path) else f"{stored.dtype} pixels"
            raise ValueError(f"{path}: {kind}, not an 8-bit image; protection and its exact restore work on 8-bit "
                             "image files (export the images as 8-bit PNG first)")
        if stored.shape[:2] != (image_size, image_size):
            raise ValueError(f"{path}: stored {stored.shape[0]}×{stored.shape[1]}, data.image_size={image_size}; "
                             "protection needs data.image_size equal to the stored image size")
        if stored_channels != channels:
            raise ValueError(f"{path}: {stored_channels} channel(s) stored, data.channels={channels}; protection "
                             "needs the stored channels")


def check_originals(records: list[dict], samples: dict, root: Path, split: str) -> None:
    """Every record's ``original`` (uint8 H×W×C) must be its stored file, bit for bit.

    Raises:
        ValueError: an id not in the split, or a served image that differs from its file (path named).
    """
    for r in records:
        sample = samples.get(r["id"])
        if sample is None:
            raise ValueError(f"image {r['id']} is not in the {split} split of {root}")
        stored = np.asarray(sample.image.read())
        stored = stored[..., None] if stored.ndim == 2 else stored[..., :3]
        if stored.dtype != np.uint8 or stored.shape != r["original"].shape or not np.array_equal(stored, r["original"]):
            raise ValueError(f"{sample.image.path}: the image served to the model ({r['original'].shape}) is not the "
                             f"stored file ({stored.shape}, {stored.dtype}); protection needs data.image_size equal to "
                             "the stored image size (and 8-bit images)")


def write_protected_layout(prot_root: Path, done: list[dict], samples: dict, root: Path) -> dict[str, str]:
    """The protected images (PNG) at their dataset-relative paths under ``prot_root`` (replaced),
    their lesion masks copied alongside, the root CSVs filtered to the protected ids.
    Returns image id -> relative path of its protected PNG."""
    if prot_root.exists():
        shutil.rmtree(prot_root)
    rel_paths: dict[str, str] = {}
    for r in done:
        sample = samples[r["id"]]
        rel = Path(os.path.relpath(sample.image.path, root)).with_suffix(".png")
        rel_paths[r["id"]] = str(rel)
        save_png(prot_root / rel, r["protected"])
        lesion = getattr(sample, "lesion_mask", None)
        lpath = getattr(lesion, "path", None)
        if lpath is not None and Path(lpath).is_file() and str(Path(lpath).resolve()).startswith(str(root.resolve())):
            dst = prot_root / os.path.relpath(lpath, root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lpath, dst)
    keep = {r["id"] for r in done}
    for csv_path in sorted(root.glob("*.csv")):
        _filter_csv(csv_path, prot_root / csv_path.name, keep)
    return rel_paths


def write_restore_data(restore_dir: Path, done: list[dict], master_key: bytes, rel_paths: dict[str, str]) -> None:
    """``restore/<file>.mmrb`` (AES-GCM residual per image, its layout path bound in) and ``index.json``."""
    restore_dir.mkdir(parents=True, exist_ok=True)
    index = {}
    for r in done:
        name = safe_name(r["id"])
        # the restore destination (the layout path) is bound into the blob: a restore never
        # writes where the published index alone says (watermark/medlocker/keyed_removal.py)
        blob = encrypt_residual(r["original"], r["protected"], r["footprint"], master_key, r["id"],
                                destination=Path(rel_paths[r["id"]]).as_posix())
        (restore_dir / f"{name}.mmrb").write_bytes(blob)
        index[r["id"]] = {"restore": f"{name}.mmrb", "protected": Path(rel_paths[r["id"]]).as_posix()}
    (restore_dir / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def certificate_entries(done: list[dict], logo: np.ndarray, rel_paths: dict[str, str]) -> list[dict]:
    """The signed fields of each protected image (hashes of original / protected / logo / δ, placement)."""
    return [{
        "image_id": r["id"], "original_sha256": sha256_array(r["original"]),
        "protected_sha256": sha256_array(r["protected"]), "logo_sha256": sha256_array(logo),
        "x": r["x"], "y": r["y"], "alpha": r["alpha"], "scale": r["scale"],
        "delta_sha256": None if r["delta"] is None else sha256_array(r["delta"]),
        "delta_scope": r.get("delta_scope", "footprint"), "polarity": r.get("polarity", "dark"),
        "placement": r.get("placement", "mark"),
        "dilation_px": r.get("dilation_px"),
        "threshold": r["threshold"], "protected_path": rel_paths[r["id"]],
    } for r in done]


def _count(records: list[dict], key: str, values, marks_only: bool = True) -> dict[str, int]:
    """How many records (marks only: ``placement == mark``) have ``record[key] == value``, per value."""
    return {str(v): sum(r.get(key) == v and (not marks_only or r.get("placement", "mark") == "mark")
                        for r in records) for v in values}


def protection_summary(module, records: list[dict], done: list[dict]) -> dict:
    """``protection.json``: accuracy per view (all / protected only), success rate, placement counts,
    alpha, overlap, lesion change, PSNR (dB), black-box queries, removal settings and per-image rows."""
    n = len(records)
    views = tuple(v for v in ("clean", "protected", "median", "jpeg", "inpaint", "learned")
                  if records and f"pred_{v}" in records[0])
    judges = sorted({k.split("_")[0] for k in (records[0] if records else {}) if k.startswith("judge")})

    def acc(view: str, rs=records) -> float | None:
        return None if not rs else sum(r[f"pred_{view}"] == r["label"] for r in rs) / len(rs)

    queries = [r["queries"] for r in done if r["queries"] is not None]
    marks = [r for r in done if r.get("placement", "mark") == "mark"]
    return {
        "method": module.variant, "search": module.search, "num_images": n, "num_protected": len(done),
        "accuracy": {v: acc(v) for v in views},
        "accuracy_protected_only": {v: acc(v, done) for v in views},
        "accuracy_judges": {j: {v: sum(r[f"{j}_pred_{v}"] == r["label"] for r in records) / n for v in views}
                            for j in judges},
        "success_rate": None if not done else sum(r["pred_protected"] != r["label"] for r in done) / len(done),
        "success_rate_all": sum(r["pred_protected"] != r["label"] for r in records) / n,
        "placements": {k: sum(r.get("placement", "mark") == k for r in records) for k in ("mark", "delta_only",
                                                                                            "none")},
        "scales": {str(s): sum(r["scale"] == s and r.get("placement", "mark") == "mark" for r in records)
                   for s in sorted({r["scale"] for r in records})},
        "dilation_px": _count(records, "dilation_px", sorted({r.get("dilation_px") for r in records
                                                              if r.get("dilation_px") is not None})),
        "polarities": {k: sum(r.get("polarity", "dark") == k and r.get("placement", "mark") == "mark"
                              for r in records) for k in ("dark", "light")},
        "changed_in_region_px": int(sum(r.get("changed_in_region_px", 0) for r in records)),
        "alpha_mean": None if not marks else float(np.mean([r["alpha"] for r in marks])),
        "overlap_px_total": int(sum(r["overlap_px"] for r in records)),
        "lesion_max_change": int(max(r["lesion_max_change"] for r in records)),
        "psnr_mean": float(np.mean([r["psnr"] for r in done if math.isfinite(r["psnr"])] or [float("nan")])),
        "queries_median": float(np.median(queries)) if queries else None,
        "removal": {"median_k": module.removal_cfg["median_k"], "jpeg_quality": module.removal_cfg["jpeg_quality"],
                    "inpaint_radius": module.removal_cfg["inpaint_radius"],
                    "learned_steps": module.remover_config.steps, "judges": module.judge_paths},
        "images": [{k: r.get(k) for k in ("id", "label", "placement", "x", "y", "alpha", "scale", "dilation_px",
                                          "polarity", "queries", "overlap_px", "pred_clean",
                                          "pred_protected", "pred_median", "pred_jpeg", "pred_inpaint", "pred_learned")}
                   for r in records],
    }


def export_protection(out: Path, module, records: list[dict], datamodule, owner_id: str, private_key: str | None,
                      master_key: str | None, data: dict, split: str = "test") -> dict:
    """Write everything listed in the module docstring; returns the protection summary."""
    out = Path(out)
    root = Path(datamodule.dataset_root())
    samples = {s.id: s for s in datamodule.splits[split]}
    logo = module.logo_for(records[0]["original"].shape[0])
    done = [r for r in records if r["protected_ok"]]
    check_originals(records, samples, root, split)  # 1. the originals must be the stored files, bit for bit
    key, mk, key_paths = _owner_keys(out / "owner", private_key, master_key)
    prot_root = out / "protected"  # 2. protected images in the dataset layout (+ CSVs and lesion masks)
    rel_paths = write_protected_layout(prot_root, done, samples, root)
    np.save(out / "logo.npy", logo)  # 3. logo, deltas, restore blobs, certificates
    deltas = {safe_name(r["id"]): r["delta"] for r in done if r["delta"] is not None}
    if deltas:
        np.savez_compressed(out / "deltas.npz", **deltas)
    restore_dir = out / "restore"
    write_restore_data(restore_dir, done, mk, rel_paths)
    cert = sign_certificate(build_certificate(owner_id, certificate_entries(done, logo, rel_paths), module.variant), key)
    save_certificate(out / "certificates.json", cert)
    summary = protection_summary(module, records, done)  # 4. metrics
    (out / "protection.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    # 5. owner kit (no key material inside; the keys are separate 0600 files)
    secret = {
        "format": SECRET_FORMAT, "version": 1, "method": module.variant, "owner_id": owner_id,
        "split": split, "ids": [r["id"] for r in done],
        "data": data,
        "dataset_root": str(root),
        "protected_dir": str(prot_root.resolve()),
        "certificates": str((out / "certificates.json").resolve()),
        "restore_dir": str(restore_dir.resolve()),
        "logo": str((out / "logo.npy").resolve()),
        "deltas": str((out / "deltas.npz").resolve()) if deltas else None,
        "public_key": str((out / "owner" / "public_key.pem").resolve()),
        "private_key_file": key_paths["private_key"],
        "master_key_file": key_paths["master_key"],
        "removal": summary["removal"],
    }
    write_secret_file(out / "owner" / "secret.json", (json.dumps(secret, indent=2) + "\n").encode("utf-8"))
    log.info("protected %d/%d images -> %s (certificates, restore data, owner kit)", len(done), len(records), out)
    return summary


def panel_figure(records: list[dict]):
    """original | lesion region (red) | protected | |protected - original| x4, one row per image."""
    n = len(records)
    fig, axes = plt.subplots(n, 4, figsize=(8, 2.1 * n), squeeze=False)
    for i, r in enumerate(records):
        orig, prot = r["original"], r["protected"]
        grey = orig.shape[-1] == 1
        show = (lambda a: a[..., 0]) if grey else (lambda a: a)
        axes[i, 0].imshow(show(orig), cmap="gray" if grey else None)
        axes[i, 0].set_title(f"{r['id'][:12]} y={r['label']} pred={r['pred_clean']}", fontsize=7)
        overlay = np.repeat(orig, 3, axis=2) if grey else orig.copy()
        overlay[r["region"]] = (0.5 * overlay[r["region"]] + 0.5 * np.array([255, 0, 0])).astype(np.uint8)
        axes[i, 1].imshow(overlay)
        axes[i, 1].set_title("lesion region (no mark)", fontsize=7)
        axes[i, 2].imshow(show(prot), cmap="gray" if grey else None)
        axes[i, 2].set_title(f"protected pred={r['pred_protected']} a={r['alpha']}", fontsize=7)
        diff = np.abs(prot.astype(np.int16) - orig.astype(np.int16)).max(axis=2)
        axes[i, 3].imshow(np.clip(diff * 4, 0, 255), cmap="magma", vmin=0, vmax=255)
        axes[i, 3].set_title("|difference| x4", fontsize=7)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    return fig
