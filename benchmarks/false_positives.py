"""False-positive study: K independently trained UNMARKED models must give 0 ownership claims at α,
and the marked model must not verify under another owner's secret (METHODS.md §4, Ind-M / Ind-W).

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
from utils.verification import secret_method  # noqa: E402

PRESETS = {
    "quick": {"stealthmark": ["verify.qr_evidence=readout", "verify.num_figures=0"],
              "xmark": ["verify.benign_accuracy=false", "verify.num_figures=0"]},
    "full": {"stealthmark": [], "xmark": []},
}
USAGE = __doc__


# ----------------------------------------------------------------------------- unmarked models


def _checkpoint_backbone(path: str | Path) -> dict:
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    backbone = (checkpoint.get("hyper_parameters") or {}).get("backbone")
    if not isinstance(backbone, dict):
        raise SystemExit(f"error: {path}: no hyper_parameters.backbone to copy (pass backbones=<names>)")
    return backbone


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
    from watermark.owner_kit import write_secret

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

    from lightning_modules.xmark import XMarkMarker
    from models.generator import ConditionalUNetGenerator
    from watermark.xmark_kit import marker_path

    marker = XMarkMarker.load(marker_path(doc, secret_path))
    torch.manual_seed(seed)
    generator = ConditionalUNetGenerator(**marker.generator_config)
    other = XMarkMarker(generator, marker.surrogate, marker.generator_config, marker.surrogate_config,
                        marker.image_size, marker.sign_correction)
    return other.save(out / "other_owner" / "generator.pt")


# ----------------------------------------------------------------------------- report


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
        details = (f"response p {fmt(e.get('response_p_value'))}, QR p {fmt(e.get('qr_p_value'))}, decoded "
                   f"{e.get('decoded', '—')}" if doc["method"] == "stealthmark" else
                   f"ΔP {fmt(e.get('delta_p'))}, WSR {fmt(e.get('wsr'), 2)}")
        lines.append(f"| {m['name']} | {m['backbone']} | {m['seed']} | {fmt(m['quality'])} | {m['exit_code']} "
                     f"| {fmt(e.get('verified'))} | {fmt(e.get('p_value'))} | {details} |")
    lines += ["", "## Another owner's secret against the marked model (Ind-W)", ""]
    if doc["ind_w"]:
        lines += ["| control | exit | verified | p | details |", "|---|---|---|---|---|"]
        for c in doc["ind_w"]:
            e = c["evidence"]
            details = (f"response p {fmt(e.get('response_p_value'))}, QR p {fmt(e.get('qr_p_value'))}, decoded "
                       f"{e.get('decoded', '—')}" if doc["method"] == "stealthmark" else
                       f"ΔP {fmt(e.get('delta_p'))}, WSR {fmt(e.get('wsr'), 2)}")
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


def main(argv: list[str] | None = None) -> int:
    known = {"secret": None, "K": "10", "out": "logs/false_positives", "backbones": "own", "seed0": "1000",
             "epochs": "1", "train_batches": "", "preset": "quick", "device": "cpu", "suspect": None,
             "other": None, "ind_w": "true"}
    options, verify_over = parse_args(sys.argv[1:] if argv is None else argv, known, USAGE)
    if not options["secret"]:
        print(f"error: secret= is required\n{USAGE}", file=sys.stderr)
        return 2
    if options["preset"] not in PRESETS:
        print(f"error: preset must be one of {sorted(PRESETS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("WANDB_MODE", "disabled")
    secret = Path(options["secret"]).resolve()
    try:
        method = secret_method(secret)
        k, seed0, epochs = int(options["K"]), int(options["seed0"]), int(options["epochs"])
        train_batches = int(options["train_batches"]) if options["train_batches"] else None
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if method not in ("stealthmark", "xmark"):
        print(f"error: the false-positive study verifies models (stealthmark, xmark); the secret is {method}",
              file=sys.stderr)
        return 2
    doc = json.loads(secret.read_text())
    out = Path(options["out"])
    out = out if out.is_absolute() else (_ROOT / out)
    out.mkdir(parents=True, exist_ok=True)
    data = dict(doc["verification"]["data"])
    if method == "stealthmark":
        from watermark.owner_kit import read_secret, secret_sha256

        read_secret(secret)
        alpha = float(doc["thresholds"]["alpha"])
        marked = options["suspect"] or doc["model"].get("checkpoint")
    else:
        from watermark.xmark_kit import read_xmark_secret, secret_sha256

        read_xmark_secret(secret)
        alpha = float(doc["thresholds"]["alpha"])
        marked = options["suspect"]
    for item in verify_over:
        if item.startswith("verify.alpha="):
            alpha = float(item.split("=", 1)[1])
    backbones = [b.strip() for b in options["backbones"].split(",") if b.strip()]
    own = None
    if "own" in backbones:
        if method == "stealthmark" and marked:
            own = _checkpoint_backbone(marked)
        elif method == "xmark" and marked:
            own = _checkpoint_backbone(marked)
        else:
            print("error: backbones=own needs the marked model (suspect=<ckpt>) to copy its backbone",
                  file=sys.stderr)
            return 2
    user_keys = {o.split("=", 1)[0] for o in verify_over}
    preset = [o for o in PRESETS[options["preset"]][method] if o.split("=", 1)[0] not in user_keys]
    common = [f"secret={secret}", f"device={options['device']}", *preset, *verify_over]

    started = time.time()
    models: list[dict[str, Any]] = []
    for i in range(k):
        seed, backbone = seed0 + i, backbones[i % len(backbones)]
        name = f"unmarked_{i:02d}"
        run_dir = out / "models" / name
        print(f"\n=== {name}: method=task backbone={backbone} seed={seed} epochs={epochs}", flush=True)
        t0 = time.time()
        try:
            summary = train_unmarked(data, backbone, own, seed, run_dir, epochs, train_batches, options["device"])
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

    ind_w: list[dict] = []
    note = None
    if options["ind_w"].lower() in ("true", "1", "yes"):
        if not marked:
            note = "skipped: no marked model (pass suspect=<marked model .ckpt>)"
        elif method == "stealthmark":
            others = ({"other_owner": Path(options["other"])} if options["other"] else
                      other_stealthmark_secrets(doc, out / "ind_w", seed0 + 7919))
            for name, path in others.items():
                over = [f"secret={path}", f"suspect={marked}", f"device={options['device']}", *preset, *verify_over]
                code, report, error = run_verify(over, out / "ind_w" / name / "report")
                ind_w.append({"name": name, "exit_code": code, "error": error, "evidence": evidence(report, method)})
        else:
            generator = (Path(options["other"]) if options["other"] else
                         other_xmark_generator(doc, secret, out / "ind_w", seed0 + 7919))
            code, report, error = run_verify([*common, f"suspect={marked}", f"verify.watermark={generator}"],
                                             out / "ind_w" / "other_owner" / "report")
            ind_w.append({"name": "other_owner", "exit_code": code, "error": error,
                          "evidence": evidence(report, method)})

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
        "budget": {"epochs": epochs, "train_batches": train_batches, "image_size": data.get("image_size"),
                   "backbones": backbones, "seeds": [seed0 + i for i in range(k)]},
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
