"""X-Mark verification protocol behind ``verify.py`` (docs/xmark.md, verification; black box).

    python verify.py secret=<run>/owner/secret.json suspect=<classifier.ckpt> out=<dir>
    python verify.py ... verify.watermark=<other run>/owner/generator.pt   # Ind-W: another generator
    python verify.py ... data.image_size=32                                # suspect trained at half resolution

The m verification images (the secret's non-target ids, never released marked) are marked
at the generator's resolution (``marker.image_size``) with the owner's generator -- or with
``verify.watermark``, a different generator (the Ind-W control) -- quantised to 8 bits as a
PNG would store them, resized to the query size (``data.image_size`` override, default the
marking size) and sent to the suspect in pairs. With P_b = f(x)[y_t], P_w = f(x_w)[y_t]:
one-sided paired t-test ``ttest_rel(P_b + τ, P_w, alternative="less")``; ΔP = mean(P_w − P_b);
WSR = share of x_w classified y_t. Verdict: the suspect's test rejects at α **and** none of
the owner's clean reference models recorded in the secret (``control``) did -- if a clean
model also "verifies", the mark is an adversarial perturbation, not evidence.

Writes ``<out>/report.json`` (``method, verified, p_value, delta_p, wsr, m, tau, alpha,
queries`` + details), ``<out>/report.md`` and ``<out>/figures/`` (paired probability plot,
x vs x_w). Exit codes: 0 verified, 1 not verified (at the τ and α sealed in the secret; a smaller
α stays binding), 2 bad input (file/field named), 3 exploratory (``verify.tau`` or a larger
``verify.alpha``: banner, no verdict). The controls are re-tested at the τ/α used -- sealed or
exploratory -- from the per-image probabilities the kit stores (``control.<name>.p_benign``,
``p_marked``, ``pred_marked``); a kit without them keeps its release-time control verdicts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torchvision.transforms.v2 import functional as TF  # noqa: E402

from verification.adapters import open_suspect, suspect_label, suspect_record  # noqa: E402
from verification.suspect import CheckpointSuspect  # noqa: E402
from models.xmark_marker import load_marker  # noqa: E402
from watermark.imageio import quantise  # noqa: E402
from watermark.xmark.marker import XMarkMarker, marker_sha256, query_pairs  # noqa: E402
from verification.attacks import apply_attack, task_quality  # noqa: E402
from verification.progress import QueryBar, Stages  # noqa: E402
from verification.reports import announce_verdict, write_report  # noqa: E402
from verification.protocols import (  # noqa: E402
    BadInput,
    ThresholdRules,
    apply_threshold_overrides,
    data_config,
    markdown_threshold_lines,
    output_dirs,
    require,
    resolve_device,
    split_samples,
    staged_path,
)
from watermark.xmark.kit import marker_path, read_xmark_secret, secret_sha256  # noqa: E402
from watermark.xmark.stats import retest_controls, xmark_test  # noqa: E402


def verification_images(datamodule, doc: dict, split: str, m: int | None, secret_path: str
                        ) -> tuple[torch.Tensor, list[str], list[int]]:
    """``(images N×C×H×W in [0, 1], ids, labels)`` of the secret's verification ids, in its order."""
    dataset, index = split_samples(datamodule, split)
    ids = list(doc["verification"]["ids"])
    missing = [i for i in ids if i not in index]
    if missing:
        raise BadInput(f"{secret_path}: {len(missing)} of the {len(ids)} ids in field 'verification.ids' are not in "
                       f"split {split!r} of {datamodule.dataset_root()} (first: {missing[0]!r}); point data.root at "
                       "the owner's copy of the source dataset")
    if m is not None:
        if m < 2 or m > len(ids):
            raise BadInput(f"verify.m={m} must be between 2 and the {len(ids)} ids in the secret")
        ids = ids[:m]
    items = [dataset[index[i]] for i in ids]
    return torch.stack([it["image"] for it in items]), ids, [int(it["label"]) for it in items]


def benign_accuracy(suspect: CheckpointSuspect, datamodule, split: str, batch_size: int) -> float:
    """Balanced accuracy of the suspect on the clean ``split`` (queries counted by the suspect)."""
    return float(task_quality(suspect, datamodule, "classification", split=split, batch_size=batch_size)["value"])


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """B×C×H×W -> B×C×size×size, antialiased bilinear (as the data module resizes)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return TF.resize(images, [size, size], antialias=True).clamp(0, 1)


def paired_figure(p_b: np.ndarray, p_w: np.ndarray, tau: float, title: str):
    """Per image: P(y_t) on x (left) and on x_w (right), joined; mean ± the margin τ."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    ax = axes[0]
    for b, w in zip(p_b, p_w):
        ax.plot([0, 1], [b, w], color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot([0, 1], [p_b.mean(), p_w.mean()], color="black", lw=2.5, label="mean")
    ax.plot([0, 1], [p_b.mean(), p_b.mean() + tau], color="tab:red", ls="--", lw=1.2, label=f"mean P_b + τ ({tau:g})")
    ax.set_xticks([0, 1], ["x (clean)", "x_w (marked)"])
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("P(target class)")
    ax.legend(fontsize=7, loc="center left")
    ax.set_title("paired probabilities", fontsize=9)
    ax = axes[1]
    ax.scatter(p_b, p_w, s=10, alpha=0.6)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    ax.plot([0, 1 - tau], [tau, 1], color="tab:red", ls="--", lw=0.8, label="P_w = P_b + τ")
    ax.set_xlabel("P_b = f(x)[y_t]")
    ax.set_ylabel("P_w = f(x_w)[y_t]")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def examples_figure(images: torch.Tensor, marked: torch.Tensor, p_b: np.ndarray, p_w: np.ndarray, epsilon: float):
    """Rows of x | x_w | δ amplified to ±ε, with the suspect's P(y_t) on each."""
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(5.4, 1.8 * n), squeeze=False)
    for i in range(n):
        delta = (marked[i] - images[i])[0]
        for j, (img, title, kw) in enumerate((
            (images[i][0], f"x  P={p_b[i]:.2f}", dict(cmap="gray", vmin=0, vmax=1)),
            (marked[i][0], f"x_w  P={p_w[i]:.2f}", dict(cmap="gray", vmin=0, vmax=1)),
            (delta, f"x_w − x (±{epsilon * 255:.0f}/255)", dict(cmap="seismic", vmin=-epsilon, vmax=epsilon)),
        )):
            axes[i, j].imshow(img.numpy(), **kw)
            axes[i, j].set_title(title, fontsize=7)
            axes[i, j].axis("off")
    fig.tight_layout()
    return fig


def _num(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def render_markdown(report: dict) -> str:
    verdict = "**VERIFIED** — the suspect was trained on the marked data" if report["verified"] else "**NOT VERIFIED**"
    if report.get("exploratory"):
        verdict = ("**EXPLORATORY** — no ownership verdict; at the changed thresholds the rule "
                   f"{'passes' if report['passes_at_used_thresholds'] else 'fails'}")
    lines = [
        "# X-Mark dataset ownership verification",
        "",
        *markdown_threshold_lines(report),
        f"Verdict: {verdict} (p = {report['p_value']:.3g}, α = {report['alpha']:g}, τ = {report['tau']:g}).",
        "",
        f"- suspect: `{suspect_label(report['suspect'])}`",
        f"- attack before verification: `{report.get('attack', {}).get('name', 'none')}`",
        f"- watermark queried: `{report['watermark']['source']}` (sha256 `{report['watermark']['sha256'][:16]}…`)",
        f"- secret: sha256 `{report['secret_sha256'][:16]}…`; target class {report['target_class']} "
        f"({report['target_name']})",
        f"- m = {report['m']} non-target images at {report['query_size']} px; {report['queries']} queries; "
        f"{report['seconds']:.1f} s",
        "",
        "| | value |",
        "|---|---|",
        f"| ΔP = mean(P_w − P_b) | {report['delta_p']:.4f} |",
        f"| mean P_b / mean P_w | {report['p_benign_mean']:.4f} / {report['p_marked_mean']:.4f} |",
        f"| p-value (paired one-sided t-test, margin τ) | {report['p_value']:.3g} |",
        f"| WSR (x_w classified as y_t) | {report['wsr']:.3f} |",
        f"| suspect test passes (p < α) | {report['suspect_test_passes']} |",
    ]
    if report.get("benign_accuracy") is not None:
        lines.append(f"| benign balanced accuracy ({report['benign_split']}) | {report['benign_accuracy']:.4f} |")
    lines += ["", "## Control: the owner's clean reference models (recorded at release)", ""]
    if report["control"]:
        lines += ["| model | ΔP | p | WSR | passes (blocks the verdict) | re-tested at this τ/α |",
                  "|---|---|---|---|---|---|"]
        for name, c in report["control"].items():
            lines.append(f"| {name} | {_num(c.get('delta_p'), '.4f')} | {_num(c.get('p_value'), '.3g')} | "
                         f"{_num(c.get('wsr'), '.3f')} | {c['verified']} | "
                         f"{'yes' if c.get('retested') else 'no (release-time record)'} |")
        lines += ["", "A verdict needs the suspect's test to pass and every control to fail."]
        if not all(c.get("retested") for c in report["control"].values()):
            lines += ["Controls marked 'no' were tested at release only (τ, α sealed then): the owner kit stores "
                      "no per-image probabilities to re-test them at this τ/α."]
    else:
        lines.append("None recorded in the secret.")
    lines += ["", "## How to read this", "",
              "ΔP is how much the owner's mark raises the suspect's target-class probability on images of "
              "other classes; p is the chance of a rise this large if the true mean rise were at most τ. "
              "A model never trained on the marked data gives ΔP ≈ 0 and p ≈ 1.", ""]
    if report["figures"]:
        lines += ["## Figures", ""] + [f"![{Path(p).stem}](figures/{Path(p).name})" for p in report["figures"]] + [""]
    return "\n".join(lines)


def _thresholds(cfg: DictConfig, doc: dict) -> tuple[ThresholdRules, float, float]:
    """``(rules, τ, α)``: the verdict uses τ and α sealed in secret.json; a changed τ or a larger α is exploratory."""
    v = cfg.verify
    rules = apply_threshold_overrides(doc["thresholds"], {"tau": v.get("tau"), "alpha": v.get("alpha")}, cfg.secret)
    tau, alpha = float(rules.used["tau"]), float(rules.used["alpha"])
    if not 0.0 <= tau < 1.0:
        raise BadInput(f"verify.tau must be in [0, 1), got {tau}")
    if not 0.0 < alpha < 1.0:
        raise BadInput(f"verify.alpha must be in (0, 1), got {alpha}")
    return rules, tau, alpha


def _load_marker(cfg: DictConfig, doc: dict) -> tuple[XMarkMarker, Path, str]:
    """``(marker, its file, "owner" | "verify.watermark")``; the owner's generator must match its sealed sha256."""
    if cfg.verify.get("watermark"):
        watermark_file, source = Path(cfg.verify.watermark), "verify.watermark"
    else:
        watermark_file, source = marker_path(doc, cfg.secret), "owner"
        if not watermark_file.is_file():
            raise BadInput(f"{cfg.secret}: field 'marker.checkpoint' names {watermark_file}, which does not exist")
        if marker_sha256(watermark_file) != doc["marker"]["sha256"]:
            raise BadInput(f"{watermark_file}: sha256 differs from field 'marker.sha256' of {cfg.secret} "
                           "(the generator file was changed)")
    return load_marker(watermark_file, tuple(cfg.suspect_factories)), watermark_file, source


def _query_images(cfg: DictConfig, doc: dict, marker: XMarkMarker) -> dict[str, Any]:
    """The verification pairs at the query size: ``{clean, marked (N×C×S×S, 8-bit), ids, split, data,
    datamodule, query_size}`` -- marked at the generator's resolution, resized to ``data.image_size``."""
    overrides = OmegaConf.to_container(cfg.data, resolve=True)
    # default query size: the owner's marking size (also when verify.watermark is another generator)
    query_size = int(overrides.get("image_size") or doc["marker"]["image_size"])
    data = data_config(doc["verification"]["data"], cfg.data, cfg.secret)
    data["image_size"] = int(doc["marker"]["image_size"])  # mark at the generator's resolution
    datamodule = instantiate(data)
    split = cfg.verify.split or doc["verification"]["split"]
    images, ids, labels = verification_images(datamodule, doc, split, cfg.verify.get("m"), cfg.secret)
    if any(label == int(doc["target_class"]) for label in labels):
        raise BadInput(f"{cfg.secret}: field 'verification.ids' holds target-class images; X-Mark queries "
                       "non-target images only")
    if tuple(images.shape[-2:]) != (marker.image_size, marker.image_size):
        images = resize(images, marker.image_size)
    marked = quantise(marker.mark(images)["marked"])
    return {"clean": resize(images, query_size), "marked": quantise(resize(marked, query_size)), "ids": ids,
            "split": split, "data": data, "datamodule": datamodule, "query_size": query_size,
            "overrides": overrides}


def _open_suspect(cfg: DictConfig, doc: dict):
    """The suspect classifier; a checkpoint's ``num_classes`` must be the secret's."""
    num_classes = len(doc["classes"])
    suspect = open_suspect(cfg.suspect, task="classification", device=resolve_device(cfg.device),
                           factories=tuple(cfg.suspect_factories), http=cfg.get("http"), num_classes=num_classes)
    suspect_classes = (getattr(suspect, "hparams", None) or {}).get("num_classes")
    if suspect_classes is not None and int(suspect_classes) != num_classes:
        raise BadInput(f"{cfg.suspect}: field 'hyper_parameters.num_classes' is {suspect_classes}; the secret has "
                       f"{num_classes} classes ({doc['classes']})")
    return suspect


def _query_pairs(cfg: DictConfig, suspect, queries: dict[str, Any], target: int) -> dict[str, np.ndarray]:
    """The suspect's ``p_benign``, ``p_marked`` (finite, else BadInput) and ``pred_marked`` per image."""
    with QueryBar(suspect.predict, 2 * len(queries["clean"])) as predict:
        pairs = query_pairs(predict, queries["clean"], queries["marked"], target, batch_size=int(cfg.verify.batch_size))
    for name in ("p_benign", "p_marked"):
        if not np.all(np.isfinite(pairs[name])):
            raise BadInput(f"{cfg.suspect}: the suspect returned non-finite probabilities (NaN/inf) for "
                           f"{int((~np.isfinite(pairs[name])).sum())} of {len(pairs[name])} images ({name})")
    return pairs


def _benign_accuracy(cfg: DictConfig, suspect, queries: dict[str, Any], marking_size: int) -> float | None:
    """The suspect's balanced accuracy on the clean verification split at the query size (``verify.benign_accuracy``)."""
    if not cfg.verify.get("benign_accuracy"):
        return None
    datamodule = queries["datamodule"]
    if queries["query_size"] != marking_size:
        datamodule = instantiate(dict(queries["data"], image_size=queries["query_size"]))
        datamodule.setup()
    return benign_accuracy(suspect, datamodule, queries["split"], int(cfg.verify.batch_size))


def _figures(cfg: DictConfig, stage: Path, pairs: dict, result: dict, queries: dict, epsilon: float) -> list[str]:
    """``figures/paired_probabilities.png`` and (``verify.num_figures`` > 0) ``figures/examples.png``."""
    figures_dir = stage / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    m = len(queries["ids"])
    fig = paired_figure(pairs["p_benign"], pairs["p_marked"], result["tau"],
                        f"ΔP={result['delta_p']:.3f}, p={result['p_value']:.3g}, WSR={result['wsr']:.2f} (m={m})")
    fig.savefig(figures_dir / "paired_probabilities.png", dpi=90)
    plt.close(fig)
    figures = [str(figures_dir / "paired_probabilities.png")]
    k = min(int(cfg.verify.num_figures), m)
    if k > 0:
        fig = examples_figure(queries["clean"][:k], queries["marked"][:k], pairs["p_benign"][:k],
                              pairs["p_marked"][:k], epsilon)
        fig.savefig(figures_dir / "examples.png", dpi=90)
        plt.close(fig)
        figures.append(str(figures_dir / "examples.png"))
    return figures


def run(cfg: DictConfig) -> int:
    """X-Mark verification of ``cfg.suspect`` against ``cfg.secret``; returns the exit code."""
    require(cfg, "suspect", "out")
    started = time.time()
    out, stage = output_dirs(cfg)
    doc = read_xmark_secret(cfg.secret)
    rules, tau, alpha = _thresholds(cfg, doc)
    target = int(doc["target_class"])
    stages = Stages(5)  # stage lines with timings in the log (verification/progress.py)
    with stages("marked query images") as step:
        marker, watermark_file, source = _load_marker(cfg, doc)
        queries = _query_images(cfg, doc, marker)
        step.detail = f"{len(queries['ids'])} pairs, watermark {source}"
    with stages("load suspect") as step:
        suspect = _open_suspect(cfg, doc)
        # removal attack before verification (verification/attacks/): the pairs, BA and report see the attacked suspect
        suspect, attack = apply_attack(cfg.attack, suspect, queries["datamodule"], "classification")
        step.detail = f"{getattr(suspect, 'kind', 'checkpoint')}, attack {attack['name']}"
    with stages("paired margin test") as step:
        pairs = _query_pairs(cfg, suspect, queries, target)
        result = {**xmark_test(pairs["p_benign"], pairs["p_marked"], tau, alpha, pairs["pred_marked"], target),
                  "tau": tau}
        step.detail = f"{len(queries['ids'])} pairs, p={result['p_value']:.3g}"
    with stages("benign accuracy") as step:
        benign = _benign_accuracy(cfg, suspect, queries, marker.image_size)
        step.detail = "skipped (verify.benign_accuracy=false)" if benign is None else f"{benign:.3f}"
    report_started = time.perf_counter()
    # the owner's clean controls at this τ/α (re-tested from stored per-image probabilities)
    try:
        control = retest_controls(doc.get("control") or {}, tau, alpha, target)
    except ValueError as err:
        raise BadInput(f"{cfg.secret}: field '{err}'") from None
    control_fails = all(not c["verified"] for c in control.values())
    passes = bool(result["verified"] and control_fails)
    figures = _figures(cfg, stage, pairs, result, queries, marker.epsilon)
    report: dict[str, Any] = {
        "method": "xmark",
        "attack": attack,
        "verified": passes and not rules.exploratory,
        "passes_at_used_thresholds": passes,
        **rules.record(),
        "p_value": result["p_value"],
        "delta_p": result["delta_p"],
        "wsr": result["wsr"],
        "m": len(queries["ids"]),
        "tau": tau,
        "alpha": alpha,
        "queries": suspect.queries,
        "suspect_test_passes": bool(result["verified"]),
        "control_fails": control_fails,
        "control": control,
        "p_benign_mean": float(pairs["p_benign"].mean()),
        "p_marked_mean": float(pairs["p_marked"].mean()),
        "benign_accuracy": benign,
        "benign_split": queries["split"] if benign is not None else None,
        "target_class": target,
        "target_name": doc["classes"][target],
        "query_size": queries["query_size"],
        "marking_size": marker.image_size,
        "watermark": {"source": source, "file": str(watermark_file), "sha256": marker_sha256(watermark_file)},
        "suspect": suspect_record(suspect),
        "secret": str(cfg.secret),
        "secret_sha256": secret_sha256(doc),
        "ids": queries["ids"],
        "p_benign": pairs["p_benign"].tolist(),
        "p_marked": pairs["p_marked"].tolist(),
        "figures": [staged_path(f, stage, out) for f in figures],
        "seconds": round(time.time() - started, 3),
        "config": {"verify": OmegaConf.to_container(cfg.verify, resolve=True), "device": resolve_device(cfg.device),
                   "data_overrides": {k: val for k, val in queries["overrides"].items() if val is not None}},
    }
    write_report(stage, report, render_markdown(report), "X-Mark dataset ownership verification", figures)
    stages.record("controls and report", time.perf_counter() - report_started, f"{len(control)} clean controls")
    why = "" if passes or not result["verified"] else " (a clean control model also passes: no evidence)"
    return announce_verdict(rules, report, passes, (
        f"p={result['p_value']:.3g}, ΔP={result['delta_p']:.3f}, WSR={result['wsr']:.2f}, m={len(queries['ids'])}, "
        f"τ={tau:g}, α={alpha:g}; {suspect.queries} queries, {report['seconds']:.1f} s"), out, why)
