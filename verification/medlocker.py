"""MedLocker / MIAD-MARK protocol behind ``verify.py``: certificates, keyed restore, evaluation.

    python verify.py secret=<run>/owner/secret.json mode=certificate images=<run>/protected out=<dir>
    python verify.py secret=<run>/owner/secret.json mode=restore key=<run>/owner/master_key.hex \\
        images=<run>/protected out=<dir>
    python verify.py secret=<run>/owner/secret.json mode=evaluate suspect=<classifier.ckpt> out=<dir>

Modes (``mode=``):

* ``certificate`` -- the signature of ``certificates.json`` under the owner's public key,
  and, per entry, that its parameters re-render the protected image found in ``images=``
  from the original (``originals=`` or the secret's dataset) bit for bit. Exit 0 when the
  signature and every entry check out, 1 when any fails (report names which), 2 on bad input.
* ``restore`` -- decrypts each image's restore data with ``key=`` (the master key file) and
  writes the exact originals under ``out=`` in the protected images' layout (each file's
  relative path is authenticated with its restore data; never an absolute path, ``..`` or a
  symlink). A hostile index is refused before anything is decrypted; all images are
  restored in memory first: a wrong key or altered data exits 2, names the failing image
  and writes nothing.
* ``evaluate`` -- accuracy of ``suspect=`` (a classification checkpoint) on the originals
  vs the protected images, and on the protected images after removal attempts (median
  filter, JPEG, inpainting of the footprint and, with ``removal.learned.steps > 0``, a thief's
  learned remover: :mod:`verification.medlocker_removal`). Exit 0 (a measurement, not a verdict).

Key material is never printed: reports carry hashes and file names only.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from verification.adapters import open_suspect, suspect_label, suspect_record
from lightning_modules.medlocker import ClassifierLoadError, from_uint8_hwc
from verification.medlocker_removal import VIEW as LEARNED_VIEW, learned_settings, learned_view
from verification.report_html import certificate_check
from verification.progress import Stages, progress
from verification.reports import write_report
from verification.protocols import (EXIT_BAD_INPUT, EXIT_NOT_VERIFIED, EXIT_VERIFIED, BadInput, output_dirs, require,
                                resolve_device)
from watermark.certificates import (
    CertificateFormatError,
    load_certificate,
    load_public_key,
    rerender_check,
    verify_certificate,
)
from watermark.medlocker.keyed_removal import (
    MAX_BLOB_BYTES,
    RestoreError,
    RestoreIndexError,
    blob_version,
    check_destinations,
    check_output_path,
    load_master_key,
    read_restore_index,
    restore,
    restore_destination,
    write_confined,
)
from watermark.medlocker.logo import footprint
from watermark.medlocker.removal_attacks import inpaint_footprint, jpeg, median_filter

SECRET_FORMAT = "medmark-medlocker-secret"
MODES = ("certificate", "restore", "evaluate")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def read_secret(path: str) -> dict:
    """The owner kit's secret.json of a MedLocker / MIAD-MARK run, structure-checked."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise BadInput(f"{p}: unreadable secret ({type(err).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != SECRET_FORMAT:
        raise BadInput(f"{p}: field 'format' must be {SECRET_FORMAT!r}")
    for field in ("method", "ids", "certificates", "restore_dir", "logo", "public_key", "dataset_root"):
        if field not in doc:
            raise BadInput(f"{p}: field '{field}' is missing")
    return doc


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            a = np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img)
    except Exception as err:  # PIL raises several types
        raise BadInput(f"{path}: unreadable image ({type(err).__name__})") from None
    return a[..., None] if a.ndim == 2 else a


def _image_index(folder: Path, what: str) -> dict[str, Path]:
    """``{relative path without suffix -> file}`` and ``{stem -> file}`` of the images under ``folder``."""
    if not folder.is_dir():
        raise BadInput(f"{what}={folder}: folder not found")
    index: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file():
            index.setdefault(str(p.relative_to(folder).with_suffix("")), p)
            index.setdefault(p.stem, p)
    return index


def _find(index: dict[str, Path], rel: str | None, image_id: str) -> Path | None:
    if rel is not None and str(Path(rel).with_suffix("")) in index:
        return index[str(Path(rel).with_suffix(""))]
    return index.get(image_id)


def _load_npz(path: str | None) -> dict[str, np.ndarray]:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{p}: deltas file named in the secret's field 'deltas' not found")
    with np.load(p, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _markdown(title: str, lines: list[str]) -> str:
    return "\n".join([f"# {title}", ""] + lines + [""])


# ------------------------------------------------------------------------------- modes


def check_certificates(cfg: DictConfig, doc: dict) -> int:
    from callbacks.medlocker import safe_name

    require(cfg, "images", "out")
    cert_path = Path(cfg.get("certificates") or doc["certificates"])
    if not cert_path.is_file():
        raise BadInput(f"{cert_path}: certificates file not found (certificates= or the secret's field)")
    try:
        cert = load_certificate(cert_path)
        signature_ok = verify_certificate(cert, load_public_key(cfg.get("public_key") or doc["public_key"]))
    except CertificateFormatError as err:
        raise BadInput(f"{cert_path}: {err}") from None
    logo = np.load(doc["logo"], allow_pickle=False)
    deltas = _load_npz(doc.get("deltas"))
    protected_index = _image_index(Path(cfg.images), "images")
    originals_index = _image_index(Path(cfg.get("originals") or doc["dataset_root"]), "originals")
    rows = []
    for entry in progress(cert["entries"], desc="re-render check", unit="img"):
        image_id = entry["image_id"]
        prot_path = _find(protected_index, entry.get("protected_path"), image_id)
        orig_path = _find(originals_index, entry.get("protected_path"), image_id)
        row = {"id": image_id, "protected": str(prot_path) if prot_path else None, "rerender": False}
        if prot_path is None or orig_path is None:
            row["reason"] = "protected image not found" if prot_path is None else "original image not found"
        else:
            delta = deltas.get(safe_name(image_id)) if entry["delta_sha256"] is not None else None
            row["rerender"] = rerender_check(entry, _read_image(orig_path), _read_image(prot_path), logo, delta)
            if not row["rerender"]:
                row["reason"] = "parameters do not re-render the protected image (pixels or hashes differ)"
        rows.append(row)
    passed = sum(r["rerender"] for r in rows)
    verified = bool(signature_ok and rows and passed == len(rows))
    report = {"mode": "certificate", "verified": verified, "signature_valid": signature_ok,
              "entries": len(rows), "rerender_passed": passed, "certificates": str(cert_path),
              "owner_id": cert.get("owner_id"), "method": cert.get("method"), "images": rows}
    lines = [f"Verdict: **{'VERIFIED' if verified else 'NOT VERIFIED'}**", "",
             f"- signature (Ed25519, owner {cert.get('owner_id')!r}): {'valid' if signature_ok else 'INVALID'}",
             f"- re-rendered bit for bit: {passed}/{len(rows)} images", ""]
    lines += [f"- {r['id']}: {r.get('reason')}" for r in rows if not r["rerender"]]
    out, stage = output_dirs(cfg)  # staged: nothing partial in out= on an error
    write_report(stage, report, _markdown("MedLocker / MIAD-MARK certificate check", lines),
                 "MedLocker / MIAD-MARK certificate check", certificate=certificate_check(cfg.secret))
    print(f"{'VERIFIED' if verified else 'NOT VERIFIED'}: signature {'valid' if signature_ok else 'INVALID'}, "
          f"{passed}/{len(rows)} images re-render bit for bit; report: {out / 'report.json'}", flush=True)
    return EXIT_VERIFIED if verified else EXIT_NOT_VERIFIED


def restore_images(cfg: DictConfig, doc: dict) -> int:
    """``mode=restore``: three phases, each finished before the next starts.

    1. Validate, decrypt nothing: the index (``restore/index.json`` is published data) is read
       defensively (:func:`read_restore_index`: size cap, types, ids of the secret only, safe
       relative paths), every protected image must resolve inside ``images=`` and every blob
       inside the restore folder (no symlinks out), each destination is the blob's
       authenticated one (:func:`restore_destination`), two ids may not share a destination
       (also up to case) and no symlink / non-folder may sit on a destination's path in ``out=``.
    2. Decrypt all in memory; AES-GCM authenticates id, protected image and destination.
    3. Write each original atomically below ``out=`` (:func:`write_confined`).

    Any refusal exits 2 naming the index file (or folder) and the entry; nothing is written.
    """
    require(cfg, "key", "images", "out")
    key_path = Path(cfg.key)
    if not key_path.is_file():
        raise BadInput(f"key={key_path}: file not found")
    try:
        master = load_master_key(key_path)
    except ValueError as err:
        raise BadInput(str(err)) from None
    restore_dir = Path(cfg.get("restore_dir") or doc["restore_dir"])
    index_path = restore_dir / "index.json"
    if not index_path.is_file() and not index_path.is_symlink():
        raise BadInput(f"{index_path}: restore index not found (the secret's field 'restore_dir')")
    ids = doc["ids"]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise BadInput(f"{cfg.secret}: field 'ids' must be a list of strings")
    images_root, out = Path(cfg.images), Path(cfg.out)
    # phase 1: validate everything; nothing is decrypted or written
    try:
        entries = read_restore_index(index_path, allowed_ids=set(ids))
        images_index = _image_index(images_root, "images")
        images_real, restore_real = images_root.resolve(), restore_dir.resolve()
        plan: list[tuple[str, Path, bytes, str, str]] = []  # id, protected file, blob, bound dest, destination
        for entry in entries:
            where = f"{index_path}: entry {entry.image_id!r}"
            prot_path = _find(images_index, entry.protected or None, entry.image_id)
            if prot_path is None:
                raise BadInput(f"images={images_root}: protected image of {entry.image_id} "
                               f"({entry.protected}) not found")
            if not prot_path.resolve().is_relative_to(images_real):
                raise BadInput(f"images={images_root}: {prot_path} (for {where}) is a link to outside images=")
            blob_path = restore_dir / entry.restore_file
            if blob_path.is_symlink() or not blob_path.is_file() or \
                    not blob_path.resolve().is_relative_to(restore_real):
                raise BadInput(f"{blob_path}: restore data of {entry.image_id} not found (or a link; {where})")
            if blob_path.stat().st_size > MAX_BLOB_BYTES:
                raise BadInput(f"{blob_path}: larger than {MAX_BLOB_BYTES} bytes ({where})")
            blob = blob_path.read_bytes()
            try:
                version = blob_version(blob)
                dest = restore_destination(entry.image_id, entry.protected, version)
            except (RestoreError, ValueError) as err:
                raise BadInput(f"{where}: {err}") from None
            bound = entry.protected if version >= 2 else ""
            plan.append((entry.image_id, prot_path, blob, bound, dest))
        check_destinations({image_id: dest for image_id, _, _, _, dest in plan}, str(index_path))
        for image_id, _, _, _, dest in plan:
            try:
                check_output_path(out, dest)
            except RestoreIndexError as err:
                raise BadInput(f"{err} (destination of {index_path}: entry {image_id!r})") from None
        check_output_path(out, "restore_report.json")
    except RestoreIndexError as err:
        raise BadInput(str(err)) from None
    # phase 2: decrypt all in memory; a wrong key or altered data writes nothing
    restored: list[tuple[str, np.ndarray]] = []
    for image_id, prot_path, blob, bound, dest in progress(plan, desc="restore", unit="img"):
        try:
            original = restore(_read_image(prot_path), blob, master, image_id, destination=bound)
        except RestoreError as err:
            print(f"error: restore failed for image {image_id} ({index_path}: entry {image_id!r}): {err}; "
                  f"nothing was written", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
        restored.append((dest, original))
    # phase 3: write below out= only, atomically
    from io import BytesIO

    from PIL import Image

    for dest, original in restored:
        buffer = BytesIO()
        Image.fromarray(original[..., 0] if original.shape[-1] == 1 else original).save(buffer, format="PNG")
        write_confined(out, dest, buffer.getvalue())
    report = {"mode": "restore", "restored": len(restored), "out": str(out), "key_file": key_path.name,
              "files": [dest for dest, _ in restored]}
    write_confined(out, "restore_report.json", (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    print(f"RESTORED: {len(restored)} images bit-exact (AES-GCM authenticated) -> {out}", flush=True)
    return EXIT_VERIFIED


def evaluate_suspect(cfg: DictConfig, doc: dict, stages: Stages | None = None) -> int:
    require(cfg, "suspect", "out")
    learned = learned_settings(cfg)  # removal.learned: checked before anything is loaded
    started = time.time()
    try:
        suspect = open_suspect(cfg.suspect, task="classification", device=resolve_device(cfg.device),
                               factories=tuple(cfg.suspect_factories), http=cfg.get("http"))
    except ClassifierLoadError as err:
        raise BadInput(str(err)) from None
    cert = load_certificate(doc["certificates"])
    logo = np.load(doc["logo"], allow_pickle=False)
    samples = _samples(doc)
    labels = {s.id: s.label for s in samples}
    protected_index = _image_index(Path(cfg.get("images") or doc["protected_dir"]), "images")
    originals_index = _image_index(Path(cfg.get("originals") or doc["dataset_root"]), "originals")
    removal = dict(doc.get("removal") or {"median_k": 3, "jpeg_quality": 75, "inpaint_radius": 3})
    origs, prots, fps, ys, ids = [], [], [], [], []
    for entry in cert["entries"]:
        image_id = entry["image_id"]
        if image_id not in labels:
            raise BadInput(f"{doc['dataset_root']}: no label for image {image_id}")
        p = _find(protected_index, entry.get("protected_path"), image_id)
        o = _find(originals_index, entry.get("protected_path"), image_id)
        if p is None or o is None:
            raise BadInput(f"image {image_id}: {'protected' if p is None else 'original'} file not found")
        prot = _read_image(p)
        origs.append(from_uint8_hwc(_read_image(o)))
        prots.append(from_uint8_hwc(prot))
        # the attacker inpaints the visible mark; a δ-only image (no mark, alpha 0) shows none
        fps.append(np.zeros(prot.shape[:2], dtype=bool) if entry.get("placement") == "delta_only" or
                   float(entry["alpha"]) == 0.0 else
                   footprint(prot.shape[0], prot.shape[1], logo, entry["x"], entry["y"], entry["scale"]))
        ys.append(labels[image_id])
        ids.append(image_id)
    if not ids:
        raise BadInput(f"{doc['certificates']}: no entries")
    y = torch.tensor(ys)
    orig_t, prot_t = torch.stack(origs), torch.stack(prots)
    views = {"clean": orig_t, "protected": prot_t,
             f"median{removal['median_k']}": median_filter(prot_t, int(removal["median_k"])),
             f"jpeg{removal['jpeg_quality']}": jpeg(prot_t, int(removal["jpeg_quality"])),
             "inpaint": inpaint_footprint(prot_t, np.stack(fps), int(removal["inpaint_radius"]))}
    removal_record = {k: removal.get(k) for k in ("median_k", "jpeg_quality", "inpaint_radius")}
    removal_record[LEARNED_VIEW] = None  # steps 0: off
    if learned is not None:
        views[LEARNED_VIEW], removal_record[LEARNED_VIEW] = learned_view(
            learned, prot_t, np.stack(fps), samples, set(ids), int(removal["inpaint_radius"]),
            str(doc["dataset_root"]), stages)
    size = cfg.get("image_size")
    accuracy = {}
    for name, v in progress(views.items(), total=len(views), desc="suspect on views", unit="view"):
        if size:
            v = torch.nn.functional.interpolate(v, size=(int(size), int(size)), mode="bilinear", antialias=True)
        preds = torch.cat([suspect.predict(v[i:i + 64]).argmax(1) for i in range(0, len(v), 64)])
        accuracy[name] = float((preds == y).float().mean())
    backbone = ((getattr(suspect, "hparams", None) or {}).get("backbone") or {}).get("name")
    report = {"mode": "evaluate", "suspect": suspect_record(suspect), "suspect_backbone": backbone,
              "num_images": len(ids), "accuracy": accuracy, "removal": removal_record, "queries": suspect.queries,
              "seconds": round(time.time() - started, 2)}
    lines = [f"Suspect `{suspect_label(report['suspect'])}` ({report['suspect_backbone']}), {len(ids)} images", "",
             "| images | accuracy |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in accuracy.items()]
    if learned is not None:
        r = removal_record[LEARNED_VIEW]
        lines += ["", f"`{LEARNED_VIEW}`: the thief's U-Net remover ({r['encoder']}, {r['steps']} steps, batch "
                  f"{r['batch_size']}, lr {r['lr']}) trained on {r['thief_images']} of the dataset's other images "
                  f"marked with {r['num_logos']} of his own QR logos (seed {r['seed']}), final L1 {r['final_l1']}."]
    out, stage = output_dirs(cfg)  # staged: nothing partial in out= on an error
    write_report(stage, report, _markdown("Accuracy on original vs protected images", lines),
                 "MedLocker / MIAD-MARK: accuracy on original vs protected images",
                 certificate=certificate_check(cfg.secret))
    print("accuracy: " + ", ".join(f"{k}={v:.3f}" for k, v in accuracy.items()) +
          f" ({len(ids)} images); report: {out / 'report.json'}", flush=True)
    return EXIT_VERIFIED


def _samples(doc: dict) -> list:
    """The dataset's samples (id, label, image), read with its own reader (the secret's data config)."""
    from datamodules.readers import read_dataset

    data = doc["data"]
    kwargs = {"classes": data.get("classes"), **(data.get("reader_options") or {})}
    try:
        samples = read_dataset(data["layout"], Path(doc["dataset_root"]), **kwargs)
    except Exception as err:
        raise BadInput(f"{doc['dataset_root']}: cannot read labels ({type(err).__name__}: {err})") from None
    return samples


def run(cfg: DictConfig) -> int:
    """Dispatch on ``cfg.mode``; returns the exit code."""
    require(cfg, "mode")
    mode = str(cfg.mode)
    if mode not in MODES:
        raise BadInput(f"mode must be one of {MODES}, got {mode!r}")
    learned = mode == "evaluate" and learned_settings(cfg) is not None  # (a bad field: exit 2 here, early)
    stages = Stages(3 if learned else 2)  # stage lines with timings in the log (verification/progress.py)
    with stages("read secret"):
        doc = read_secret(cfg.secret)
    with stages(f"mode {mode}"):
        if mode == "certificate":
            return check_certificates(cfg, doc)
        if mode == "restore":
            return restore_images(cfg, doc)
        return evaluate_suspect(cfg, doc, stages)

