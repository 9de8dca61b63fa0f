"""StealthMark verification protocol behind ``verify.py`` (docs/stealthmark.md, verification; black box).

    python verify.py secret=<run>/owner/secret.json suspect=<checkpoint> out=<dir>
    python verify.py ... attack=prune attack.amount=0.3
    python verify.py ... attack=finetune attack.epochs=2 verify.num_samples=2000 data.root=/data/Kvasir-SEG

Writes ``<out>/report.json``, ``<out>/report.md`` and ``<out>/figures/``. Exit codes: 0
ownership verified, 1 not verified (at the thresholds sealed in secret.json), 2 bad input (the
message names the file or field), 3 exploratory (``verify.alpha`` raised, ``verify.response_margin``
or ``verify.min_decoded`` changed from the sealed value: a banner names each, no verdict).
The payload is never printed: stdout says whether it was decoded, the report holds the text.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from verification.adapters import open_suspect, suspect_label, suspect_record
from verification.attacks import apply_attack
from verification.progress import QueryBar, Stages
from verification.reports import announce_verdict, write_report
from verification.protocols import (BadInput, apply_threshold_overrides, data_config, markdown_threshold_lines,
                                    output_dirs, require, resolve_device, split_samples,
                                    staged_path)
from watermark.stealthmark.kit import read_secret, secret_sha256
from watermark.stealthmark.evidence import CountingPredictor, null_grids, verify_stealthmark
from watermark.stealthmark.explain import LIME_SURROGATES, min_lime_samples


def verification_images(
    datamodule, doc: dict, cfg: DictConfig, secret_path: str
) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """``(images N×C×H×W, masks N×1×H×W, ids)`` of the verification set, in the secret's order."""
    split = cfg.verify.split or doc["verification"]["split"]
    dataset, index = split_samples(datamodule, split)
    if cfg.verify.images == "secret_ids":
        wanted = [i for i in doc["verification"]["ids"] if i in index]
        if not wanted:
            raise BadInput(
                f"{secret_path}: none of the {len(doc['verification']['ids'])} ids in field 'verification.ids' is in "
                f"split {split!r} of {datamodule.dataset_root()} (verify.images=split verifies on that split's "
                "first images instead)"
            )
        chosen = [index[i] for i in wanted[: cfg.verify.num_images]]
    elif cfg.verify.images == "split":
        chosen = list(range(min(cfg.verify.num_images, len(dataset))))
    else:
        raise BadInput(f"verify.images must be secret_ids or split, got {cfg.verify.images!r}")
    items = [dataset[i] for i in chosen]
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["mask"] for it in items]) if "mask" in items[0] else None
    return images, masks, [it["id"] for it in items]


def render_markdown(report: dict) -> str:
    """A human-readable report.md."""
    verdict = "**VERIFIED** — the suspect carries the owner's mark" if report["verified"] else "**NOT VERIFIED**"
    if report.get("exploratory"):
        verdict = ("**EXPLORATORY** — no ownership verdict; at the changed thresholds the rule "
                   f"{'passes' if report['passes_at_used_thresholds'] else 'fails'}")
    ch, resp, qrc, th = report["channels"], report["response"], report["qr"], report["thresholds"]
    lines = [
        "# StealthMark ownership verification",
        "",
        *markdown_threshold_lines(report),
        f"Verdict: {verdict} (p = {report['p_value']:.3g}, α = {th['alpha']:g}).",
        "",
        f"- suspect: `{suspect_label(report['suspect'])}`",
        f"- attack before verification: `{report['attack']['name']}`",
        f"- secret: sha256 `{report['secret_sha256'][:16]}…`",
        "",
        "| channel | statistic | p-value | passes |",
        "|---|---|---|---|",
        f"| 1 trigger response ({resp['num_images']} images, paired t-test, τ = {resp['margin']:g}) "
        f"| mean uncertainty {resp['uncertainty_clean_mean']:.4f} clean → {resp['uncertainty_triggered_mean']:.4f} "
        f"triggered | {report['response_p_value']:.3g} | {ch['response']} |",
        f"| 2 QR payload ({qrc['evidence']}, {qrc['num_images']} images) | ASR {report['asr']:.2f}, "
        f"bit accuracy {report['bit_accuracy']:.3f}, agreement {qrc['agreement']:.3f} vs null 99% "
        f"{qrc['null_agreement_p99']:.3f} (K = {qrc['null_k']}) | {report['qr_p_value']:.3g} | "
        f"{ch['qr_decoded'] or ch['qr_significant']} |",
        "",
        f"Verdict rule: channel 1 at α, and channel 2 decoded (≥ {th['min_decoded']} image) or at α; "
        "p-value = max of the two channels' p-values.",
        "",
        "## Decoded payload per image",
        "",
        "| image | decoded | matches | bit accuracy |",
        "|---|---|---|---|",
    ]
    for d in report["decoded"]:
        text = d["text"] if d["text"] is not None else "—"
        lines.append(f"| {d['id']} | {text} | {d['matches']} | {d['bit_accuracy']:.3f} |")
    r, t = report["readout"], report["task"]
    lines += [
        "",
        "## Per-cell readout (one query per image)",
        "",
        f"- triggered: {r['decoded_triggered']}/{r['num_images']} decode the payload, "
        f"bit accuracy {r['bit_accuracy_triggered']:.3f}",
        f"- clean (untriggered): {r['decoded_clean']}/{r['num_images']} decode the payload, "
        f"bit accuracy {r['bit_accuracy_clean']:.3f}",
        "",
        "## Harmlessness",
        "",
        f"- mask agreement (triggered vs clean, 0.5 threshold): {t['mask_agreement']:.4%}",
    ]
    if "dice_clean" in t:
        lines.append(f"- Dice on the verification images: clean {t['dice_clean']:.4f}, "
                     f"triggered {t['dice_triggered']:.4f}")
    lines += ["", f"Queries: {report['queries']} images in {report['query_calls']} calls; "
                  f"{report['seconds']:.1f} s.", ""]
    if report["figures"]:
        lines += ["## Figures", ""] + [f"![{Path(p).stem}](figures/{Path(p).name})" for p in report["figures"]] + [""]
    return "\n".join(lines)


def expected_queries(cfg: DictConfig, num_images: int) -> int:
    """Images the suspect will be sent: 2 per verification image, plus LIME's samples (x2 for ``contrast``)."""
    total = 2 * num_images
    if cfg.verify.qr_evidence == "lime":
        per_sample = 2 if cfg.verify.lime_target == "contrast" else 1
        total += min(int(cfg.verify.num_lime_images), num_images) * int(cfg.verify.num_samples) * per_sample
    return total


def check_lime_settings(cfg: DictConfig, key) -> None:
    """BadInput naming the ``verify.*`` key when LIME's settings cannot give evidence for ``key``'s QR grid;
    checked before the suspect is loaded or queried."""
    if cfg.verify.qr_evidence != "lime":
        return
    surrogate = str(cfg.verify.lime_surrogate)
    if surrogate not in LIME_SURROGATES:
        raise BadInput(f"verify.lime_surrogate must be one of {LIME_SURROGATES}, got {surrogate!r}")
    floor = min_lime_samples(key.spec(), surrogate)
    if int(cfg.verify.num_samples) < floor:
        raise BadInput(f"verify.num_samples must be at least {floor} with verify.lime_surrogate={surrogate} "
                       f"(QR grid {key.grid_size}×{key.grid_size}), got {cfg.verify.num_samples}")


def run(cfg: DictConfig) -> int:
    """StealthMark verification of ``cfg.suspect`` against ``cfg.secret``; returns the exit code."""
    require(cfg, "suspect", "out")
    started = time.time()
    out, stage = output_dirs(cfg)
    doc, key = read_secret(cfg.secret)
    # the verdict uses the thresholds sealed in secret.json; a verify-time change other than a
    # smaller α makes the run exploratory (exit 3, banner), never a verdict
    rules = apply_threshold_overrides(
        doc["thresholds"], {n: cfg.verify.get(n) for n in ("alpha", "response_margin", "min_decoded")}, cfg.secret)
    thresholds = rules.used
    if not 0.0 < float(thresholds["alpha"]) <= 1.0:
        raise BadInput(f"verify.alpha must be in (0, 1], got {thresholds['alpha']}")
    if float(thresholds["response_margin"]) < 0:
        raise BadInput(f"verify.response_margin must be >= 0, got {thresholds['response_margin']}")
    if float(thresholds["min_decoded"]) < 0 or not float(thresholds["min_decoded"]).is_integer():
        raise BadInput(f"verify.min_decoded must be an integer >= 0, got {thresholds['min_decoded']}")
    check_lime_settings(cfg, key)
    stages = Stages(5)  # stage lines with timings in the log (verification/progress.py)
    with stages("load suspect") as step:
        datamodule = instantiate(data_config(doc["verification"]["data"], cfg.data, cfg.secret))
        images, masks, ids = verification_images(datamodule, doc, cfg, cfg.secret)
        device = resolve_device(cfg.device)
        suspect = open_suspect(cfg.suspect, task="segmentation", device=device,
                               factories=tuple(cfg.suspect_factories), http=cfg.get("http"))
        # removal attack before verification (verification/attacks.py); weight attacks on a suspect without
        # weights (HTTP / ONNX / TorchScript) are bad input, exit 2
        suspect, attack = apply_attack(cfg.attack, suspect, datamodule, "segmentation")
        step.detail = f"{getattr(suspect, 'kind', 'checkpoint')}, {len(images)} images, attack {attack['name']}"
    with stages("null model") as step:
        nulls = null_grids(key.qr_version, key.error_correction, int(cfg.verify.null_k), int(cfg.verify.null_seed),
                           cfg.verify.cache_dir)
        step.detail = f"{len(nulls)} random QR codes"
    with QueryBar(suspect.predict, expected_queries(cfg, len(images))) as query_bar:
        predictor = CountingPredictor(query_bar, batch_size=int(cfg.verify.batch_size), source=str(cfg.suspect))
        result = verify_stealthmark(
            predictor, key, images, ids, thresholds, masks=masks,
            num_lime_images=int(cfg.verify.num_lime_images), num_samples=int(cfg.verify.num_samples),
            batch_size=int(cfg.verify.batch_size), lime_seed=int(cfg.verify.lime_seed),
            qr_evidence=str(cfg.verify.qr_evidence), lime_target=str(cfg.verify.lime_target),
            lime_surrogate=str(cfg.verify.lime_surrogate), nulls=nulls, figures_dir=stage / "figures",
            num_figures=int(cfg.verify.num_figures),
        )
    result.pop("_arrays")
    timings, n_decoded = result["timings"], sum(d["matches"] for d in result["decoded"])
    stages.record("response test", timings["response_and_readout"], f"{len(images)} images")
    stages.record("LIME" if result["qr"]["evidence"] == "lime" else "QR readout", timings["qr_channel"],
                  f"{n_decoded}/{len(result['decoded'])} decoded")
    report_started = time.perf_counter()
    staged_figures = list(result["figures"])
    report = {
        **result,
        # binding verdict only at the sealed thresholds (or a stricter α)
        "verified": bool(result["verified"] and not rules.exploratory),
        "passes_at_used_thresholds": bool(result["verified"]),
        **rules.record(),
        "figures": [staged_path(f, stage, out) for f in staged_figures],
        "suspect": suspect_record(suspect),
        "secret": str(cfg.secret),
        "secret_sha256": secret_sha256(doc),
        "key_sha256": key.sha256(),
        "attack": attack,
        "suspect_queries": suspect.queries,
        "seconds": round(time.time() - started, 3),
        "config": {"verify": OmegaConf.to_container(cfg.verify, resolve=True), "device": device,
                   "data_overrides": {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
                                      if v is not None}},
    }
    write_report(stage, report, render_markdown(report), "StealthMark ownership verification", staged_figures,
                 redact=[key.payload])
    stages.record("report", time.perf_counter() - report_started + timings.get("figures", 0.0),
                  f"{len(staged_figures)} figures")
    n_dec = sum(d["matches"] for d in report["decoded"])
    return announce_verdict(rules, report, bool(result["verified"]), (
        f"p={report['p_value']:.3g} (response p={report['response_p_value']:.3g}, "
        f"QR p={report['qr_p_value']:.3g}); payload decoded on {n_dec}/{len(report['decoded'])} images "
        f"(ASR {report['asr']:.2f}), bit accuracy {report['bit_accuracy']:.3f}; mask agreement "
        f"{report['task']['mask_agreement']:.4f}; {report['queries']} queries, {report['seconds']:.0f} s"), out)
