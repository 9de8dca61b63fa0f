"""Robustness study: does the ownership evidence survive the thief's removal attacks, and what
task quality is left to the thief? (docs/robustness.md)

    python benchmarks/robustness.py secret=<run>/owner/secret.json suspect=<marked.ckpt> out=<dir>
    python benchmarks/robustness.py secret=... suspect=... preset=full                 # LIME evidence (slow)
    python benchmarks/robustness.py secret=... suspect=... attacks=none,prune_0.5,jpeg_50 distill.epochs=10
    python benchmarks/robustness.py secret=... suspect=... verify.num_images=20 finetune.lr=1e-3

For each entry of the attack grid it runs ``verify.py``'s protocol in-process
(``attack=<name> attack.<field>=<value> attack.quality_split=test``), so every number is what
``verify.py`` would report, and collects per attack:

* the watermark evidence -- StealthMark: verified, p, response p, QR p, ASR / decoded, bit
  accuracy (and the per-cell readout); X-Mark: verified, p, ΔP, WSR;
* the task quality left to the thief on the clean test split -- Dice (segmentation) or balanced
  accuracy (classification) -- of the attacked suspect (``verification.attacks.task_quality``).

Writes ``<out>/robustness.json``, ``robustness.md`` (table), ``robustness.png`` (−log10 p and
quality per attack) and each verification's report under ``<out>/<entry>/``.

Grid (``attacks=`` picks entries by name, comma-separated; default all): none, finetune_1ep,
finetune_3ep, prune_0.1/0.3/0.5/0.7, quantize, distill, jpeg_90/75/50, resize_0.5/0.75,
noise_0.01/0.03, crop_0.9. ``<attack>.<field>=v`` changes that attack's parameter in every entry
(``finetune.lr=1e-3``); ``verify.*`` / ``data.*`` go to every verification.

Presets: ``preset=quick`` (default) -- fits in ~10 CPU-minutes for the synthetic StealthMark
UNet: StealthMark channel 2 from the per-cell readout (``verify.qr_evidence=readout``, one query
per image instead of LIME's thousands) on ``verify.num_images=10`` images, distillation for 3
epochs; X-Mark without the separate benign-accuracy pass (the study measures it itself).
``preset=full`` -- the verification as configured (LIME, 20 images; hours on a CPU).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._study import ROOT as _ROOT, evidence, fmt, neg_log10, parse_args, run_verify  # noqa: E402
from verification.protocols import secret_method  # noqa: E402

# entry -> (attack config, parameters)
GRID: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    **{f"finetune_{n}ep": ("finetune", {"epochs": n}) for n in (1, 3)},
    **{f"prune_{v}": ("prune", {"amount": v}) for v in (0.1, 0.3, 0.5, 0.7)},
    "quantize": ("quantize", {}),
    "distill": ("distill", {}),
    **{f"jpeg_{q}": ("jpeg", {"quality": q}) for q in (90, 75, 50)},
    **{f"resize_{v}": ("resize", {"factor": v}) for v in (0.5, 0.75)},
    **{f"noise_{v}": ("noise", {"sigma": v}) for v in (0.01, 0.03)},
    "crop_0.9": ("crop", {"fraction": 0.9}),
}
ATTACK_NAMES = sorted({a for a, _ in GRID.values()})
PRESETS: dict[str, dict[str, list[str]]] = {
    "quick": {
        "stealthmark": ["verify.qr_evidence=readout", "verify.num_images=10", "verify.num_figures=0"],
        "xmark": ["verify.benign_accuracy=false", "verify.num_figures=0"],
        "distill": ["attack.epochs=3"],
    },
    "full": {"stealthmark": [], "xmark": ["verify.benign_accuracy=false"], "distill": []},
}
QUALITY_DROP = 0.05  # "task quality within 5 points" of the unattacked suspect
USAGE = __doc__


def grid_overrides(entry: str, preset: dict, per_attack: dict[str, list[str]]) -> list[str]:
    """``attack=<name>`` + the entry's parameters, the preset's, then the user's (last one wins per key)."""
    attack, params = GRID[entry]
    items = [f"attack.{k}={v}" for k, v in params.items()] + preset.get(attack, []) + per_attack.get(attack, [])
    merged = {item.split("=", 1)[0]: item for item in items}
    return [f"attack={attack}", *merged.values()]


def render_markdown(doc: dict) -> str:
    method, rows = doc["method"], doc["rows"]
    metric = doc["quality_metric"] or "quality"
    lines = [
        f"# Robustness of the {method} evidence",
        "",
        f"- suspect: `{doc['suspect']}`",
        f"- secret: sha256 `{doc['secret_sha256'][:16]}…`; preset `{doc['preset']}` "
        f"(`{' '.join(doc['verify_overrides']) or 'verify as configured'}`)",
        f"- task quality: {metric} on the clean `{doc['quality_split']}` split; unattacked "
        f"{fmt(doc['baseline_quality'])}; 'kept' = within {QUALITY_DROP * 100:.0f} points",
        f"- {doc['seconds']:.0f} s in all",
        "",
    ]
    if method == "stealthmark":
        lines += ["| attack | verified | p | response p | QR p | ASR | decoded | bit acc. | readout | "
                  f"{metric} | Δ{metric} | kept | survives |", "|---" * 13 + "|"]
        for r in rows:
            e = r["evidence"]
            lines.append(
                f"| {r['entry']} | {fmt(e.get('verified'))} | {fmt(e.get('p_value'))} | {fmt(e.get('response_p_value'))} "
                f"| {fmt(e.get('qr_p_value'))} | {fmt(e.get('asr'), 2)} | {e.get('decoded', '—')} "
                f"| {fmt(e.get('bit_accuracy'))} | {e.get('readout_decoded', '—')} | {fmt(r['quality'])} "
                f"| {fmt(r['quality_drop'])} | {fmt(r['quality_kept'])} | {fmt(r['survives'])} |")
    else:
        lines += [f"| attack | verified | p | ΔP | WSR | {metric} | Δ{metric} | kept | survives |",
                  "|---" * 9 + "|"]
        for r in rows:
            e = r["evidence"]
            lines.append(
                f"| {r['entry']} | {fmt(e.get('verified'))} | {fmt(e.get('p_value'))} | {fmt(e.get('delta_p'))} "
                f"| {fmt(e.get('wsr'), 2)} | {fmt(r['quality'])} | {fmt(r['quality_drop'])} "
                f"| {fmt(r['quality_kept'])} | {fmt(r['survives'])} |")
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["", "Errors (exit 2):", ""] + [f"- {r['entry']}: {r['error']}" for r in errors]
    lines += [
        "",
        f"Survives = verified **and** task quality within {QUALITY_DROP * 100:.0f} points of the unattacked suspect "
        "(an attack that destroys the model is no removal). Δ = attacked − unattacked.",
        "",
        f"Survived: {', '.join(doc['survived']) or 'none'}. Broken while quality kept: "
        f"{', '.join(doc['broken_quality_kept']) or 'none'}.",
        "",
        "![robustness](robustness.png)",
        "",
    ]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    names = [r["entry"] for r in rows]
    x = list(range(len(rows)))
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 0.55 * len(rows) + 2), 6.2), sharex=True)
    ax = axes[0]
    logp = [max(neg_log10(r["evidence"].get("p_value")), 0.05) for r in rows]  # p ≈ 1 stays visible
    colors = ["tab:green" if r["evidence"].get("verified") else ("tab:grey" if r.get("error") else "tab:red")
              for r in rows]
    ax.bar(x, logp, color=colors)
    if doc.get("alpha"):
        ax.axhline(neg_log10(doc["alpha"]), color="black", ls="--", lw=1, label=f"α = {doc['alpha']:g}")
        ax.legend(fontsize=8)
    ax.set_ylabel("−log10 p (verdict)")
    ax.set_title(f"{doc['method']}: evidence after each attack (green = verified)", fontsize=10)
    ax = axes[1]
    quality = [r["quality"] if r["quality"] is not None else 0.0 for r in rows]
    ax.bar(x, quality, color=["tab:blue" if r["quality_kept"] else "tab:orange" for r in rows])
    if doc["baseline_quality"] is not None:
        ax.axhline(doc["baseline_quality"] - QUALITY_DROP, color="black", ls="--", lw=1,
                   label=f"unattacked − {QUALITY_DROP:g}")
        ax.legend(fontsize=8)
    ax.set_ylabel(doc["quality_metric"] or "quality")
    ax.set_ylim(0, 1)
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class UsageError(Exception):
    """A bad command line; the message is printed after ``error:`` and the CLI exits 2."""


def read_options(argv: list[str]) -> tuple[dict, list[str], list[str], dict[str, list[str]], str]:
    """Options, grid entries, verify.py overrides, per-attack overrides and the secret's method.

    Raises:
        UsageError: a missing secret= / suspect=, unknown preset or grid entry, an unreadable
            secret, or a method the study does not verify.
    """
    known = {"secret": None, "suspect": None, "out": "logs/robustness", "attacks": "all", "preset": "quick",
             "device": "cpu", "quality_split": "test"}
    options, extra = parse_args(argv, known, USAGE)
    if not options["secret"] or not options["suspect"]:
        raise UsageError(f"secret= and suspect= are required\n{USAGE}")
    if options["preset"] not in PRESETS:
        raise UsageError(f"preset must be one of {sorted(PRESETS)}, got {options['preset']!r}")
    entries = list(GRID) if options["attacks"] in ("all", "") else [e.strip() for e in options["attacks"].split(",")]
    unknown = [e for e in entries if e not in GRID]
    if unknown:
        raise UsageError(f"attacks= has unknown entries {unknown}; the grid is {', '.join(GRID)}")
    verify_over, per_attack = [], {}
    for item in extra:
        key = item.split("=", 1)[0]
        head = key.split(".", 1)[0]
        if head in ATTACK_NAMES and "." in key:
            per_attack.setdefault(head, []).append("attack." + item.split(".", 1)[1])
        else:
            verify_over.append(item)
    os.environ.setdefault("WANDB_MODE", "disabled")
    try:
        method = secret_method(options["secret"])
    except ValueError as err:
        raise UsageError(str(err)) from None
    if method not in ("stealthmark", "xmark"):
        raise UsageError(f"the robustness study verifies models (stealthmark, xmark); the secret is {method}")
    return options, entries, verify_over, per_attack, method


def run_grid(entries: list[str], common: list[str], preset: dict, per_attack: dict[str, list[str]],
             quality_over: list[str], out: Path, method: str) -> list[dict]:
    """``verify.py`` once per grid entry (in-process, report under ``out/<entry>``); one row each."""
    rows: list[dict] = []
    for entry in entries:
        over = common + grid_overrides(entry, preset, per_attack) + quality_over
        print(f"\n=== {entry}: verify.py {' '.join(o for o in over if not o.startswith('secret='))}", flush=True)
        t0 = time.time()
        code, report, error = run_verify(over, out / entry)
        attack = (report or {}).get("attack") or {}
        quality = (attack.get("quality") or {})
        rows.append({
            "entry": entry, "attack": GRID[entry][0], "parameters": GRID[entry][1], "exit_code": code, "error": error,
            "evidence": evidence(report, method), "quality": quality.get("value"),
            "quality_metric": quality.get("metric"),
            "attack_record": {k: v for k, v in attack.items() if k not in ("quality",)},
            "report": str(out / entry / "report.json") if report else None, "seconds": round(time.time() - t0, 1),
        })
        print(f"=== {entry}: exit {code}, {json.dumps({**rows[-1]['evidence'], 'quality': rows[-1]['quality']})} "
              f"({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def judge_rows(rows: list[dict]) -> tuple[Any, Any]:
    """Adds ``quality_drop``, ``quality_kept`` and ``survives`` to each row (against the ``none``
    entry); returns the unattacked quality and the test level alpha of its report."""
    base = next((r for r in rows if r["entry"] == "none"), None)
    baseline = base["quality"] if base else None
    for r in rows:
        q = r["quality"]
        r["quality_drop"] = (q - baseline) if (q is not None and baseline is not None) else None
        r["quality_kept"] = bool(q is not None and baseline is not None and q >= baseline - QUALITY_DROP)
        r["survives"] = bool(r["evidence"].get("verified") and r["quality_kept"])
    alpha = None
    if base and base.get("report"):
        rep = json.loads(Path(base["report"]).read_text())
        alpha = (rep.get("thresholds") or {}).get("alpha") or rep.get("alpha")
    return baseline, alpha


def main(argv: list[str] | None = None) -> int:
    try:
        options, entries, verify_over, per_attack, method = read_options(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    task = "segmentation" if method == "stealthmark" else "classification"
    preset = PRESETS[options["preset"]]
    out = Path(options["out"])
    out = out if out.is_absolute() else (_ROOT / out)
    out.mkdir(parents=True, exist_ok=True)
    user_keys = {o.split("=", 1)[0] for o in verify_over}
    common = [f"secret={Path(options['secret']).resolve()}", f"suspect={options['suspect']}",
              f"device={options['device']}", *[o for o in preset[method] if o.split("=", 1)[0] not in user_keys],
              *verify_over]
    quality_over = [f"attack.quality_split={options['quality_split']}"] if options["quality_split"] != "none" else []
    started = time.time()
    rows = run_grid(entries, common, preset, per_attack, quality_over, out, method)
    baseline, alpha = judge_rows(rows)
    secret_doc = json.loads(Path(options["secret"]).read_text())
    from watermark.stealthmark.kit import secret_sha256

    doc = {
        "benchmark": "robustness",
        "method": method,
        "task": task,
        "secret": str(Path(options["secret"]).resolve()),
        "secret_sha256": secret_sha256(secret_doc),
        "suspect": str(options["suspect"]),
        "preset": options["preset"],
        "verify_overrides": [*preset[method], *verify_over],
        "per_attack_overrides": per_attack,
        "alpha": alpha,
        "quality_split": options["quality_split"],
        "quality_metric": next((r["quality_metric"] for r in rows if r["quality_metric"]), None),
        "baseline_quality": baseline,
        "quality_drop_allowed": QUALITY_DROP,
        "rows": rows,
        "survived": [r["entry"] for r in rows if r["survives"] and r["entry"] != "none"],
        "broken_quality_kept": [r["entry"] for r in rows if r["quality_kept"] and not r["evidence"].get("verified")],
        "seconds": round(time.time() - started, 1),
        "torch_threads": __import__("torch").get_num_threads(),
    }
    (out / "robustness.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "robustness.md").write_text(render_markdown(doc))
    plot(doc, out / "robustness.png")
    print(f"\nrobustness: {out / 'robustness.md'} ({doc['seconds']:.0f} s); survived: {', '.join(doc['survived']) or 'none'}",
          flush=True)
    return 0 if all(r["exit_code"] in (0, 1) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
