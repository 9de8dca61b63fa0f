"""False-positive study: K independently trained UNMARKED models must give 0 ownership claims at α,
and the marked model must not verify under another owner's secret (docs/robustness.md, Ind-M / Ind-W).

    python benchmarks/false_positives.py secret=<run>/owner/secret.json out=<dir>             # K=10
    python benchmarks/false_positives.py secret=... K=4 backbones=own,unet_resnet34 epochs=2
    python benchmarks/false_positives.py secret=<xmark run>/owner/secret.json suspect=<Mal.ckpt> backbones=small_cnn

1. **Unmarked models** (Ind-M): K runs of ``method=task`` (plain training, no watermark) on the
   secret's own data (``verification.data``: the StealthMark training data / the X-Mark clean
   source dataset), seeds ``seed0, seed0+1, ...`` and backbones cycled from ``backbones=`` (``own`` =
   the marked model's backbone config from its checkpoint; other names = ``configs/backbone``
   files). Each is verified against the secret with ``verify.py``'s protocol (in-process).
   Budget (CPU): ``epochs=1`` (default) of the full training split, ``train_batches=`` caps the
   batches per epoch; the image size stays the secret's (StealthMark's grid is laid over it).
   On the synthetic StealthMark UNet (100 px, 280 images): ~30–60 s per model on 2 cores, so
   K=10 takes ~10 min. Such short training is a *weak* null (barely trained models have few
   reasons to respond to anything); ``epochs=8`` gives models as good as the owner's clean twin.
2. **Another owner's secret** (Ind-W): the marked model (``suspect=``, default the secret's
   ``model.checkpoint``) verified against a freshly generated secret. StealthMark: the same
   kit with another payload and another trigger seed (``other_owner``) and, as a diagnostic of
   channel 2 alone, another payload under the owner's trigger (``other_payload_same_trigger``).
   X-Mark: a generator of the same architecture with fresh random weights (``verify.watermark``;
   a stand-in for another owner's trained generator -- pass ``other=<generator.pt>`` for a real one).

3. **MedLocker / MIAD-MARK** (``secret=`` of a protection run): here an ownership claim is a
   *certificate verification* -- the Ed25519 signature under the owner's public key and a bit-exact
   re-render of each presented image from its original (``verify.py mode=certificate``) -- not a
   statistical test, so the honest analogue of "K unmarked models" is K image sets the owner did
   NOT protect, each checked against the owner's certificate and public key: the clean originals;
   ``K - 6`` other owners (own Ed25519 key, own QR logo, own δ, the same renderer and even the same
   placements -- their images vs the owner's certificate, and their certificate under the owner's
   key); the owner's own parameters perturbed and re-rendered (x+1, y+1, α ± 2/255, another δ: the
   nearest impostors); and ``others=<secret.json>,...`` -- real protection runs with their own keys.
   Reported per set: verdict, per-image false claims (an image bit-identical to the certified one is
   not an impostor and is counted apart), and the smallest margin (pixels differing from the
   certified image, largest grey-level difference). Ind-W: another owner's secret against the
   owner's protected images, and the owner's certificate under another owner's public key; the
   owner's own secret against its images is the positive control (must verify).

       python benchmarks/false_positives.py secret=<miadmark run>/owner/secret.json K=12 \
           others=<medlocker run>/owner/secret.json,<blackbox run>/owner/secret.json out=<dir>

   No training is involved (seconds). ``.png`` is not written for these methods (no p-values).

Writes ``<out>/false_positives.json``, ``.md`` and ``.png`` (histogram of the unmarked models'
p-values, α and the Ind-W p-values marked). Presets as in ``benchmarks/robustness.py``:
``preset=quick`` (default; StealthMark channel 2 from the per-cell readout) or ``preset=full``.
"""

from __future__ import annotations

import copy
import json
import os
import random
import string
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._study import ROOT as _ROOT, evidence, fmt, neg_log10, parse_args, run_verify  # noqa: E402
from verification.protocols import secret_method  # noqa: E402

PRESETS = {
    "quick": {"stealthmark": ["verify.qr_evidence=readout", "verify.num_figures=0"],
              "xmark": ["verify.benign_accuracy=false", "verify.num_figures=0"]},
    "full": {"stealthmark": [], "xmark": []},
}
USAGE = __doc__


# ----------------------------------------------------------------------------- unmarked models


def suspect_factories(verify_over: list[str]) -> tuple[str, ...]:
    """The operator's ``suspect_factories=[...]`` among the verify.py overrides, composed from
    ``configs/verify.yaml`` as verify.py reads it (``()`` when not given)."""
    from hydra import compose, initialize_config_dir

    given = [o for o in verify_over if o.split("=", 1)[0].lstrip("+") == "suspect_factories"]
    with initialize_config_dir(config_dir=str(_ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="verify", overrides=given)
    return tuple(cfg.suspect_factories)


def _checkpoint_backbone(path: str | Path, factories: tuple[str, ...]) -> dict:
    """The marked model's backbone config, validated by :mod:`models.safe_reader` (exact factory
    table plus the operator's ``factories``, scalar arguments only): it comes from a file and is
    then instantiated by training."""
    from models.safe_reader import ModelFileError, config_of, read_checkpoint

    try:
        checkpoint = read_checkpoint(path)
        backbone = (checkpoint.get("hyper_parameters") or {}).get("backbone")
        if not isinstance(backbone, dict):
            raise SystemExit(f"error: {path}: no hyper_parameters.backbone to copy (pass backbones=<names>)")
        # pretrained keys kept: the unmarked twins start like the marked model did
        return config_of(backbone, path, "hyper_parameters.backbone", factories=factories, no_pretrained=False)
    except ModelFileError as err:
        raise SystemExit(f"error: {err}") from None


def train_unmarked(data: dict, backbone: str, own_backbone: dict | None, seed: int, run_dir: Path, epochs: int,
                   train_batches: int | None, device: str) -> dict:
    """One ``method=task`` run in-process; returns its summary.json."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from utils.run import run_training

    task = data.get("task", "segmentation")
    overrides = [
        "method=task", f"loss={task}", "logger=none", f"seed={seed}", f"trainer.max_epochs={epochs}",
        "trainer.accelerator=cpu" if device == "cpu" else "trainer.accelerator=auto",
        "callbacks.validation_panels=null", "test=false", "+trainer.enable_progress_bar=false",
        f"paths.root_dir={_ROOT}", f"paths.output_dir={run_dir}", f"paths.log_dir={run_dir.parent / 'logs'}",
    ]
    if train_batches:
        overrides.append(f"trainer.limit_train_batches={train_batches}")
    if backbone != "own":
        overrides.append(f"backbone={backbone}")
    with initialize_config_dir(config_dir=str(_ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.data = OmegaConf.create({**data, "num_workers": 0, "persistent_workers": False})
        if backbone == "own":
            cfg.backbone = OmegaConf.create(copy.deepcopy(own_backbone))
    OmegaConf.resolve(cfg)
    run_training(cfg)
    return json.loads((run_dir / "summary.json").read_text())


# ----------------------------------------------------------------------------- another owner's secret


def other_stealthmark_secrets(doc: dict, out: Path, seed: int) -> dict[str, Path]:
    """Fresh StealthMark secrets of 'another owner': other payload (+ other trigger seed)."""
    from watermark.stealthmark.kit import write_secret

    rng = random.Random(seed)
    payload = doc["key"]["payload"]
    while True:
        other = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(len(payload)))
        if other != payload:
            break
    secrets = {}
    same_trigger = copy.deepcopy(doc)
    same_trigger["key"]["payload"] = other
    secrets["other_payload_same_trigger"] = same_trigger
    other_owner = copy.deepcopy(same_trigger)
    trigger = other_owner["key"]["trigger"]
    if "seed" in trigger:  # a trigger kind without a seed keeps its pattern; the payload still differs
        trigger["seed"] = rng.randrange(1, 2**31 - 1)
    secrets["other_owner"] = other_owner
    paths = {}
    for name, secret in secrets.items():
        path = out / name / "secret.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_secret(path, secret)
        paths[name] = path
    return paths


def other_xmark_generator(doc: dict, secret_path: Path, out: Path, seed: int) -> Path:
    """A generator of the owner's architecture with fresh random weights (another owner's mark)."""
    import torch

    from models.xmark_marker import load_marker
    from watermark.xmark.marker import XMarkMarker
    from models.generator import ConditionalUNetGenerator
    from watermark.xmark.kit import marker_path

    marker = load_marker(marker_path(doc, secret_path))
    torch.manual_seed(seed)
    generator = ConditionalUNetGenerator(**marker.generator_config)
    other = XMarkMarker(generator, marker.surrogate, marker.generator_config, marker.surrogate_config,
                        marker.image_size, marker.sign_correction)
    return other.save(out / "other_owner" / "generator.pt")


# ----------------------------------------------------------------------------- report


def evidence_details(e: dict, method: str) -> str:
    """The method's secondary evidence of one verification, for a table cell."""
    if method == "stealthmark":
        return (f"response p {fmt(e.get('response_p_value'))}, QR p {fmt(e.get('qr_p_value'))}, decoded "
                f"{e.get('decoded', '—')}")
    return f"ΔP {fmt(e.get('delta_p'))}, WSR {fmt(e.get('wsr'), 2)}"


def render_markdown(doc: dict) -> str:
    alpha = doc["alpha"]
    lines = [
        f"# False positives of the {doc['method']} verification",
        "",
        f"- secret: sha256 `{doc['secret_sha256'][:16]}…`; α = {alpha:g}; preset `{doc['preset']}`",
        f"- budget per unmarked model: {doc['budget']['epochs']} epoch(s), "
        f"{doc['budget']['train_batches'] or 'all'} batches/epoch, image size {doc['budget']['image_size']}",
        f"- **{doc['false_claims']} false ownership claim(s) among {doc['K']} unmarked models** "
        f"(smallest p = {fmt(doc['smallest_p'])})",
        f"- {doc['seconds']:.0f} s in all",
        "",
        "## Unmarked models (Ind-M)",
        "",
        f"| model | backbone | seed | {doc['quality_metric']} | exit | verified | p | details |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in doc["models"]:
        e = m["evidence"]
        details = evidence_details(e, doc["method"])
        lines.append(f"| {m['name']} | {m['backbone']} | {m['seed']} | {fmt(m['quality'])} | {m['exit_code']} "
                     f"| {fmt(e.get('verified'))} | {fmt(e.get('p_value'))} | {details} |")
    lines += ["", "## Another owner's secret against the marked model (Ind-W)", ""]
    if doc["ind_w"]:
        lines += ["| control | exit | verified | p | details |", "|---|---|---|---|---|"]
        for c in doc["ind_w"]:
            e = c["evidence"]
            details = evidence_details(e, doc["method"])
            lines.append(f"| {c['name']} | {c['exit_code']} | {fmt(e.get('verified'))} | {fmt(e.get('p_value'))} "
                         f"| {details} |")
        lines += ["", "`other_payload_same_trigger` keeps the owner's trigger, so channel 1 (trigger response) "
                  "passes by design; it checks that channel 2 (the payload) does not accept a foreign payload."
                  if doc["method"] == "stealthmark" else ""]
    else:
        lines.append(doc.get("ind_w_note") or "not run")
    lines += ["", "![false positives](false_positives.png)", ""]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 3.6))
    values = [neg_log10(m["evidence"].get("p_value")) for m in doc["models"] if m["evidence"]]
    top = max([neg_log10(doc["alpha"]) + 1, *values, *[neg_log10(c["evidence"].get("p_value"))
                                                        for c in doc["ind_w"] if c["evidence"]]])
    bins = np.linspace(0, top, 25)
    ax.hist(values, bins=bins, color="tab:blue", alpha=0.8, label=f"unmarked models (K={doc['K']})")
    ax.axvline(neg_log10(doc["alpha"]), color="black", ls="--", lw=1, label=f"α = {doc['alpha']:g}")
    for c in doc["ind_w"]:
        if c["evidence"]:
            ax.axvline(neg_log10(c["evidence"]["p_value"]), color="tab:red", lw=1.5, alpha=0.8)
            ax.text(neg_log10(c["evidence"]["p_value"]), ax.get_ylim()[1] * 0.9, c["name"], rotation=90,
                    fontsize=7, va="top", ha="right", color="tab:red")
    ax.set_xlabel("−log10 p (right of α = an ownership claim)")
    ax.set_ylabel("models")
    ax.set_title(f"{doc['method']}: p-values of models that are not the owner's "
                 f"({doc['false_claims']} false claims)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- MedLocker / MIAD-MARK

MEDLOCKER_METHODS = ("medlocker", "miadmark")
# the owner's own parameters, slightly changed and re-rendered from the originals (near misses)
PERTURBATIONS = ("x+1", "y+1", "alpha+2/255", "alpha-2/255", "delta_changed")


def _perturbed_params(entry: dict, delta, kind: str, rng):
    """``(x, y, alpha, scale, delta)`` of the owner's entry changed by ``kind`` (module docstring)."""
    import numpy as np

    x, y, alpha, scale = entry["x"], entry["y"], float(entry["alpha"]), float(entry["scale"])
    d = None if delta is None else np.array(delta, dtype=np.float32, copy=True)
    support = None if d is None else (d != 0)
    mark = entry.get("placement", "mark") != "delta_only"
    if kind in ("x+1", "y+1"):
        if mark:
            x, y = (x + 1, y) if kind == "x+1" else (x, y + 1)
        elif d is not None:  # no mark to move: move δ by one pixel, kept on its own support
            d = np.roll(d, 1, axis=1 if kind == "x+1" else 0) * support
    elif kind.startswith("alpha"):
        step = 2 / 255 * (1 if kind == "alpha+2/255" else -1)
        if mark:
            alpha = min(1.0, max(0.0, alpha + step)) if 0.0 <= alpha + step <= 1.0 else alpha - step
        elif d is not None:
            d = d * 0.5
    elif kind == "delta_changed":
        if d is not None:  # another δ of the same size: signs flipped at random
            d = d * np.where(rng.random(d.shape) < 0.5, -1.0, 1.0).astype(np.float32)
        elif mark:
            alpha = alpha - 1 / 255 if alpha - 1 / 255 >= 0 else alpha + 1 / 255
    return x, y, alpha, scale, d


def _image_margin(presented, certified) -> tuple[int, int]:
    """(pixels that differ, largest difference in grey levels) between two uint8 images."""
    import numpy as np

    if presented.shape != certified.shape:
        return int(np.prod(certified.shape[:2])), 255
    diff = np.abs(presented.astype(np.int16) - certified.astype(np.int16))
    diff = diff.max(axis=2) if diff.ndim == 3 else diff
    return int((diff > 0).sum()), int(diff.max())


class CertificateChecks:
    """The owner's protection run as the certificate checks see it (module docstring, part 3).

    Attributes:
        doc: the owner's secret; out: the study folder; entries: the certificate's entries;
        logo: RGBA h×w×4; originals / certified: image id -> uint8 H×W×C (the unprotected file /
        the owner's protected file); delta_of: image id -> δ (float32 H×W×C) or None.
    """

    def __init__(self, secret: Path, doc: dict, out: Path, verify_over: list[str]):
        import numpy as np

        from callbacks.medlocker import safe_name
        from verification.medlocker import _load_npz, _read_image
        from watermark.certificates import load_certificate

        self.secret, self.doc, self.out = secret, doc, out
        self.entries = load_certificate(doc["certificates"])["entries"]
        self.logo = np.load(doc["logo"], allow_pickle=False)
        deltas = _load_npz(doc.get("deltas"))
        self.root, self.prot_dir = Path(doc["dataset_root"]), Path(doc["protected_dir"])
        self.originals = {e["image_id"]: _read_image(self.root / e["protected_path"]) for e in self.entries}
        self.certified = {e["image_id"]: _read_image(self.prot_dir / e["protected_path"]) for e in self.entries}
        self.delta_of = {e["image_id"]: deltas.get(safe_name(e["image_id"])) if e["delta_sha256"] else None
                         for e in self.entries}
        self.common = [f"secret={secret}", "mode=certificate", *verify_over]

    def check(self, name: str, kind: str, images: Path, presented: dict, extra: list[str] | None = None,
              secret_over: Path | None = None, impostors: bool = True) -> dict:
        """One verify.py certificate check. An image claim = a valid signature AND a bit-exact re-render;
        with ``impostors`` only images that differ from the certified one count (an identical image is the
        owner's); without (Ind-W), every claim counts: the images are the owner's, the secret is not."""
        certified = self.certified
        over = ([f"secret={secret_over}"] if secret_over else []) + [o for o in self.common if not (
            secret_over and o.startswith("secret="))] + [f"images={images}", *(extra or [])]
        code, report, error = run_verify(over, self.out / "verify" / name)
        rows = {r["id"]: r for r in (report or {}).get("images", [])}
        margins = [_image_margin(presented[i], certified[i]) for i in presented if i in certified]
        identical = sum(m[0] == 0 for m in margins)
        signature_ok = bool((report or {}).get("signature_valid"))
        passed = signature_ok * sum(bool(r.get("rerender")) for i, r in rows.items() if i in presented and (
            not impostors or _image_margin(presented[i], certified[i])[0] > 0))
        differing = [m for m in margins if m[0] > 0]
        return {"name": name, "kind": kind, "exit_code": code, "error": error,
                "verified": bool((report or {}).get("verified")), "signature_valid": (report or {}).get(
                    "signature_valid"), "images": len(presented), "identical_to_certified": identical,
                "false_image_claims": passed, "rerender_passed": (report or {}).get("rerender_passed"),
                "min_pixels_differing": min((m[0] for m in differing), default=None),
                "min_max_level_difference": min((m[1] for m in differing), default=None)}

    def write_set(self, name: str, images: dict) -> Path:
        """The presented images as PNGs in the dataset layout under ``out/sets/<name>``."""
        from callbacks.medlocker import save_png

        folder = self.out / "sets" / name
        for e in self.entries:
            if e["image_id"] in images:
                save_png(folder / e["protected_path"], images[e["image_id"]])
        return folder


def other_owner_kit(ctx: CertificateChecks, i: int, rng) -> tuple[str, Path, Path, dict]:
    """Another owner's kit: own Ed25519 key pair, own QR logo, own δ (signs flipped at random), the
    owner's placements and renderer; written under ``out/others/<name>``. Returns name, kit folder,
    images folder and image id -> uint8 image."""
    import numpy as np

    from callbacks.medlocker import safe_name
    from watermark.certificates import (build_certificate, generate_owner_keys, save_certificate, save_private_key,
                                        save_public_key, sha256_array, sign_certificate)
    from watermark.medlocker.logo import render_protected, render_qr_logo

    name = f"other_owner_{i + 1}"
    folder = ctx.out / "others" / name
    private_pem, public_pem = generate_owner_keys()
    save_private_key(folder / "owner_private_key.pem", private_pem)
    save_public_key(folder / "public_key.pem", public_pem)
    other_logo = render_qr_logo(f"other-{i + 1}", ctx.logo.shape[0], error_correction="L")
    images, other_entries, other_deltas = {}, [], {}
    for e in ctx.entries:
        image_id = e["image_id"]
        d = ctx.delta_of[image_id]
        if d is not None:
            d = (d * np.where(rng.random(d.shape) < 0.5, -1.0, 1.0)).astype(np.float32)
            other_deltas[safe_name(image_id)] = d
        scope = e.get("delta_scope", "footprint")
        img = render_protected(ctx.originals[image_id], other_logo, e["x"], e["y"], e["alpha"], e["scale"], d,
                               delta_scope=scope)
        images[image_id] = img
        other_entries.append({**{f: e[f] for f in ("image_id", "x", "y", "alpha", "scale", "threshold",
                                                  "protected_path")},
                              "original_sha256": sha256_array(ctx.originals[image_id]),
                              "protected_sha256": sha256_array(img), "logo_sha256": sha256_array(other_logo),
                              "delta_sha256": None if d is None else sha256_array(d), "delta_scope": scope})
    other_cert = sign_certificate(build_certificate(f"other-owner-{i + 1}", other_entries, ctx.doc["method"]),
                                  private_pem)
    save_certificate(folder / "certificates.json", other_cert)
    np.save(folder / "logo.npy", other_logo)
    if other_deltas:
        np.savez_compressed(folder / "deltas.npz", **other_deltas)
    images_dir = ctx.write_set(name, images)
    other_secret = {**ctx.doc, "owner_id": f"other-owner-{i + 1}", "certificates": str(folder / "certificates.json"),
                    "public_key": str(folder / "public_key.pem"), "logo": str(folder / "logo.npy"),
                    "deltas": str(folder / "deltas.npz") if other_deltas else None, "protected_dir": str(images_dir),
                    "private_key_file": str(folder / "owner_private_key.pem"), "master_key_file": None}
    (folder / "secret.json").write_text(json.dumps(other_secret, indent=2) + "\n")
    return name, folder, images_dir, images


def impostor_sets(ctx: CertificateChecks, options: dict, k: int, rng) -> tuple[list[dict], list[tuple]]:
    """The checks of image sets the owner did not protect: other owners (their images vs the owner's
    certificate, their certificate under the owner's key), the clean originals, the owner's parameters
    perturbed and re-rendered, and ``others=`` real runs. Returns the set rows and the other owners."""
    from verification.medlocker import _read_image
    from watermark.certificates import load_certificate
    from watermark.medlocker.logo import render_protected

    runs = [o for o in (options.get("others") or "").split(",") if o]
    sets: list[dict] = []
    others = []
    for i in range(max(1, k - 1 - len(PERTURBATIONS) - len(runs))):
        name, folder, images_dir, images = other_owner_kit(ctx, i, rng)
        others.append((name, folder, images_dir))
        print(f"=== {name}: another owner's key and logo", flush=True)
        sets.append(ctx.check(name, "another owner's images vs the owner's certificate", images_dir, images))
        sets[-1]["signature_check"] = ctx.check(f"{name}_signature", "another owner's kit (its certificate "
                                                "re-renders its images) under the owner's public key", images_dir,
                                                images, [f"public_key={ctx.doc['public_key']}"],
                                                secret_over=folder / "secret.json")
    print("=== clean originals", flush=True)
    sets.append(ctx.check("clean_originals", "the unprotected originals", ctx.root, ctx.originals))
    for kind in PERTURBATIONS:  # the nearest impostors
        images = {}
        for e in ctx.entries:
            x, y, alpha, scale, d = _perturbed_params(e, ctx.delta_of[e["image_id"]], kind, rng)
            images[e["image_id"]] = render_protected(ctx.originals[e["image_id"]], ctx.logo, x, y, alpha, scale, d,
                                                     delta_scope=e.get("delta_scope", "footprint"))
        name = f"perturbed_{kind.replace('/', '_')}"
        print(f"=== {name}", flush=True)
        sets.append(ctx.check(name, f"the owner's parameters with {kind}, re-rendered", ctx.write_set(name, images),
                              images))
    for other in runs:  # other real protection runs (their own keys)
        other_doc = json.loads(Path(other).read_text())
        other_root = Path(other_doc["protected_dir"])
        other_cert = load_certificate(other_doc["certificates"])
        images = {e["image_id"]: _read_image(other_root / e["protected_path"]) for e in other_cert["entries"]
                  if e["image_id"] in ctx.certified}
        name = f"other_run_{Path(other).resolve().parents[1].name}"
        print(f"=== {name}", flush=True)
        sets.append(ctx.check(name, "images of another protection run (its own keys)", other_root, images))
        sets[-1]["signature_check"] = ctx.check(f"{name}_signature", "that run's kit under the owner's public key",
                                                other_root, images, [f"public_key={ctx.doc['public_key']}"],
                                                secret_over=Path(other))
    return sets, others


def medlocker_result(ctx: CertificateChecks, sets: list[dict], ind_w: list[dict], control: dict,
                     started: float) -> dict:
    """``false_positives.json`` of the certificate study: claims per set and per image, foreign
    signatures accepted, the smallest margins, Ind-W claims and the owner's control."""
    claims = sum(s["false_image_claims"] for s in sets) + sum(s.get("signature_check", {}).get(
        "false_image_claims", 0) for s in sets)
    set_claims = sum(s["verified"] for s in sets) + sum(bool(s.get("signature_check", {}).get("verified"))
                                                        for s in sets)
    forged_sigs = sum(bool(s["signature_check"]["signature_valid"]) for s in sets if "signature_check" in s)
    margins = [s["min_pixels_differing"] for s in sets if s["min_pixels_differing"] is not None]
    levels = [s["min_max_level_difference"] for s in sets if s["min_max_level_difference"] is not None]
    return {
        "benchmark": "false_positives", "method": ctx.doc["method"], "secret": str(ctx.secret), "K": len(sets),
        "images_per_set": len(ctx.entries), "claim": "certificate: Ed25519 signature under the owner's public key "
        "and a bit-exact re-render of every presented image from its original",
        "sets": sets, "false_claims": set_claims, "false_image_claims": claims,
        "foreign_signatures_accepted": forged_sigs,
        "smallest_margin_pixels": min(margins) if margins else None,
        "smallest_margin_levels": min(levels) if levels else None,
        "ind_w": ind_w, "ind_w_false_claims": sum(c["verified"] for c in ind_w) + sum(c["false_image_claims"]
                                                                                      for c in ind_w),
        "owner_control": control, "seconds": round(time.time() - started, 1),
        "failed_runs": sum(s["exit_code"] == 2 for s in sets + ind_w),
    }


def medlocker_false_positives(options: dict, secret: Path, doc: dict, out: Path, verify_over: list[str]) -> int:
    """MedLocker / MIAD-MARK: an ownership claim is a certificate verification (module docstring, part 3)."""
    import numpy as np

    from verification.medlocker import read_secret

    read_secret(str(secret))
    k, seed0 = int(options["K"]), int(options["seed0"])
    rng = np.random.default_rng(seed0)
    started = time.time()
    ctx = CertificateChecks(secret, doc, out, verify_over)
    sets, others = impostor_sets(ctx, options, k, rng)
    # Ind-W: another owner's secret against the owner's protected set; positive control: the owner's own
    ind_w = []
    if others:
        name, folder, _ = others[0]
        ind_w.append(ctx.check("ind_w_other_secret", "another owner's secret (certificate + public key) vs the "
                               "owner's protected images", ctx.prot_dir, ctx.certified,
                               secret_over=folder / "secret.json", impostors=False))
        ind_w.append(ctx.check("ind_w_other_public_key", "the owner's certificate under another owner's public key",
                               ctx.prot_dir, ctx.certified, [f"public_key={folder / 'public_key.pem'}"],
                               impostors=False))
    control = ctx.check("owner_control", "the owner's secret vs the owner's protected images (must verify)",
                        ctx.prot_dir, ctx.certified, impostors=False)
    result = medlocker_result(ctx, sets, ind_w, control, started)
    (out / "false_positives.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "false_positives.md").write_text(render_medlocker_markdown(result))
    print(f"\nfalse positives ({doc['method']}): {result['false_claims']}/{len(sets)} sets verified, "
          f"{result['false_image_claims']} image claims among {len(sets) * len(ctx.entries)} images; foreign "
          f"signatures accepted {result['foreign_signatures_accepted']}; smallest margin "
          f"{result['smallest_margin_pixels']} px / {result['smallest_margin_levels']} grey levels; Ind-W claims "
          f"{result['ind_w_false_claims']}; owner control verified={control['verified']}; "
          f"{out / 'false_positives.md'}", flush=True)
    ok = result["failed_runs"] == 0 and control["verified"]
    return 0 if ok else 1


def render_medlocker_markdown(doc: dict) -> str:
    def row(s: dict) -> str:
        sig = s.get("signature_check")
        return (f"| {s['name']} | {s['kind']} | {s['exit_code']} | {fmt(s['verified'])} | "
                f"{fmt(s['signature_valid'])} | {s['false_image_claims']}/{s['images']} | "
                f"{s['identical_to_certified']} | {fmt(s['min_pixels_differing'])} | "
                f"{fmt(s['min_max_level_difference'])} | "
                f"{'—' if sig is None else ('accepted' if sig['signature_valid'] else 'rejected')} |")

    header = ["| set | what | exit | verified | signature | image claims | identical | min px differing | "
              "min max level diff | their certificate, owner's key |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines = [f"# False positives of the {doc['method']} certificate check", "",
             f"- claim = {doc['claim']}",
             f"- **{doc['false_claims']} of {doc['K']} image sets not protected by the owner verified; "
             f"{doc['false_image_claims']} image claims among {doc['K'] * doc['images_per_set']} images; "
             f"{doc['foreign_signatures_accepted']} foreign certificates accepted under the owner's key**",
             f"- smallest margin: {fmt(doc['smallest_margin_pixels'])} pixels differing from the certified image "
             f"(largest difference at least {fmt(doc['smallest_margin_levels'])} grey levels)",
             f"- owner control (own secret, own images): verified = {fmt(doc['owner_control']['verified'])}, "
             f"{doc['owner_control']['rerender_passed']}/{doc['owner_control']['images']} re-rendered",
             f"- {doc['seconds']:.0f} s", "", "## Image sets not protected by the owner", "", *header,
             *[row(s) for s in doc["sets"]], "", "## Another owner's secret against the owner's images (Ind-W)", "",
             *header, *[row(s) for s in doc["ind_w"]], ""]
    return "\n".join(lines)


class UsageError(Exception):
    """A bad command line or secret; the message is printed after ``error:`` and the CLI exits 2."""


def read_options(argv: list[str]) -> tuple[dict, list[str], Path, str]:
    """Options, verify.py overrides, the secret's path and method.

    Raises:
        UsageError: no secret=, an unknown preset, a non-integer K / seed0 / epochs / train_batches,
            an unreadable secret or a method the study does not cover.
    """
    known = {"secret": None, "K": "10", "out": "logs/false_positives", "backbones": "own", "seed0": "1000",
             "epochs": "1", "train_batches": "", "preset": "quick", "device": "cpu", "suspect": None,
             "other": None, "ind_w": "true", "others": ""}
    options, verify_over = parse_args(argv, known, USAGE)
    if not options["secret"]:
        raise UsageError(f"secret= is required\n{USAGE}")
    if options["preset"] not in PRESETS:
        raise UsageError(f"preset must be one of {sorted(PRESETS)}")
    os.environ.setdefault("WANDB_MODE", "disabled")
    secret = Path(options["secret"]).resolve()
    try:
        method = secret_method(secret)
        for name in ("K", "seed0", "epochs"):
            options[name] = int(options[name])
        options["train_batches"] = int(options["train_batches"]) if options["train_batches"] else None
    except ValueError as err:
        raise UsageError(str(err)) from None
    if method not in ("stealthmark", "xmark", *MEDLOCKER_METHODS):
        raise UsageError(f"the false-positive study covers stealthmark, xmark, medlocker and miadmark; the secret is "
                         f"{method}")
    return options, verify_over, secret, method


def owner_model(method: str, doc: dict, secret: Path, options: dict, verify_over: list[str]
                ) -> tuple[float, str | None, Any, dict | None, list[str]]:
    """The checked secret's test level alpha (``verify.alpha=`` wins), the marked model, its
    ``secret_sha256`` function, the ``own`` backbone config (when ``backbones=`` names it) and the backbones.

    Raises:
        UsageError: ``backbones=own`` without a marked model to copy it from.
    """
    if method == "stealthmark":
        from watermark.stealthmark.kit import read_secret, secret_sha256

        read_secret(secret)
        marked = options["suspect"] or doc["model"].get("checkpoint")
    else:
        from watermark.xmark.kit import read_xmark_secret, secret_sha256

        read_xmark_secret(secret)
        marked = options["suspect"]
    alpha = float(doc["thresholds"]["alpha"])
    for item in verify_over:
        if item.startswith("verify.alpha="):
            alpha = float(item.split("=", 1)[1])
    backbones = [b.strip() for b in options["backbones"].split(",") if b.strip()]
    own = None
    if "own" in backbones:
        if not marked:
            raise UsageError("backbones=own needs the marked model (suspect=<ckpt>) to copy its backbone")
        own = _checkpoint_backbone(marked, suspect_factories(verify_over))
    return alpha, marked, secret_sha256, own, backbones


def unmarked_models(data: dict, backbones: list[str], own: dict | None, common: list[str], options: dict,
                    out: Path, method: str) -> list[dict[str, Any]]:
    """Ind-M: K ``method=task`` runs (seeds ``seed0 + i``, backbones cycled), each verified; one row each."""
    models: list[dict[str, Any]] = []
    for i in range(options["K"]):
        seed, backbone = options["seed0"] + i, backbones[i % len(backbones)]
        name = f"unmarked_{i:02d}"
        run_dir = out / "models" / name
        print(f"\n=== {name}: method=task backbone={backbone} seed={seed} epochs={options['epochs']}", flush=True)
        t0 = time.time()
        try:
            summary = train_unmarked(data, backbone, own, seed, run_dir, options["epochs"], options["train_batches"],
                                     options["device"])
        except Exception as err:  # a failed run is reported, the study goes on
            models.append({"name": name, "backbone": backbone, "seed": seed, "exit_code": 2, "evidence": {},
                           "quality": None, "error": f"training: {type(err).__name__}: {err}"})
            continue
        checkpoint = summary.get("best_checkpoint") or summary.get("last_checkpoint")
        train_seconds = time.time() - t0
        code, report, error = run_verify([*common, f"suspect={checkpoint}"], out / "verify" / name)
        models.append({"name": name, "backbone": backbone, "seed": seed, "checkpoint": checkpoint,
                       "quality": summary.get("best_score"), "exit_code": code, "error": error,
                       "evidence": evidence(report, method), "train_seconds": round(train_seconds, 1),
                       "seconds": round(time.time() - t0, 1)})
        print(f"=== {name}: exit {code}, p={models[-1]['evidence'].get('p_value')}", flush=True)
    return models


def another_owner(method: str, doc: dict, secret: Path, marked: str | None, common: list[str], preset: list[str],
                  verify_over: list[str], options: dict, out: Path) -> tuple[list[dict], str | None]:
    """Ind-W: the marked model against another owner's secret (StealthMark) / generator (X-Mark);
    returns the rows and a note when skipped."""
    ind_w: list[dict] = []
    if options["ind_w"].lower() not in ("true", "1", "yes"):
        return ind_w, None
    if not marked:
        return ind_w, "skipped: no marked model (pass suspect=<marked model .ckpt>)"
    if method == "stealthmark":
        others = ({"other_owner": Path(options["other"])} if options["other"] else
                  other_stealthmark_secrets(doc, out / "ind_w", options["seed0"] + 7919))
        for name, path in others.items():
            over = [f"secret={path}", f"suspect={marked}", f"device={options['device']}", *preset, *verify_over]
            code, report, error = run_verify(over, out / "ind_w" / name / "report")
            ind_w.append({"name": name, "exit_code": code, "error": error, "evidence": evidence(report, method)})
    else:
        generator = (Path(options["other"]) if options["other"] else
                     other_xmark_generator(doc, secret, out / "ind_w", options["seed0"] + 7919))
        code, report, error = run_verify([*common, f"suspect={marked}", f"verify.watermark={generator}"],
                                         out / "ind_w" / "other_owner" / "report")
        ind_w.append({"name": "other_owner", "exit_code": code, "error": error, "evidence": evidence(report, method)})
    return ind_w, None


def main(argv: list[str] | None = None) -> int:
    try:
        options, verify_over, secret, method = read_options(sys.argv[1:] if argv is None else argv)
        doc = json.loads(secret.read_text())
        out = Path(options["out"])
        out = out if out.is_absolute() else (_ROOT / out)
        out.mkdir(parents=True, exist_ok=True)
        if method in MEDLOCKER_METHODS:
            return medlocker_false_positives(options, secret, doc, out, verify_over)
        data = dict(doc["verification"]["data"])
        alpha, marked, secret_sha256, own, backbones = owner_model(method, doc, secret, options, verify_over)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    k, seed0 = options["K"], options["seed0"]
    user_keys = {o.split("=", 1)[0] for o in verify_over}
    preset = [o for o in PRESETS[options["preset"]][method] if o.split("=", 1)[0] not in user_keys]
    common = [f"secret={secret}", f"device={options['device']}", *preset, *verify_over]
    started = time.time()
    models = unmarked_models(data, backbones, own, common, options, out, method)
    ind_w, note = another_owner(method, doc, secret, marked, common, preset, verify_over, options, out)
    pvalues = [m["evidence"]["p_value"] for m in models if m["evidence"]]
    result = {
        "benchmark": "false_positives",
        "method": method,
        "secret": str(secret),
        "secret_sha256": secret_sha256(doc),
        "preset": options["preset"],
        "verify_overrides": [*PRESETS[options["preset"]][method], *verify_over],
        "alpha": alpha,
        "K": k,
        "budget": {"epochs": options["epochs"], "train_batches": options["train_batches"],
                   "image_size": data.get("image_size"), "backbones": backbones,
                   "seeds": [seed0 + i for i in range(k)]},
        "quality_metric": "val/dice" if data.get("task", "segmentation") == "segmentation" else "val/balanced_accuracy",
        "models": models,
        "false_claims": sum(bool(m["evidence"].get("verified")) for m in models),
        "claims_at_alpha": sum(p < alpha for p in pvalues),
        "smallest_p": min(pvalues) if pvalues else None,
        "failed_runs": sum(m["exit_code"] == 2 for m in models),
        "marked_model": marked,
        "ind_w": ind_w,
        "ind_w_false_claims": sum(bool(c["evidence"].get("verified")) for c in ind_w),
        "ind_w_note": note,
        "seconds": round(time.time() - started, 1),
    }
    (out / "false_positives.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "false_positives.md").write_text(render_markdown(result))
    plot(result, out / "false_positives.png")
    print(f"\nfalse positives: {result['false_claims']}/{k} unmarked models verified (smallest p "
          f"{fmt(result['smallest_p'])}); Ind-W claims {result['ind_w_false_claims']}/{len(ind_w)}; "
          f"{out / 'false_positives.md'}", flush=True)
    return 0 if result["failed_runs"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
