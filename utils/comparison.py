"""Side-by-side comparison of the runs of a Hydra multirun (backbones, hyper-parameters).

    python train.py -m experiment=task_seg_synthetic backbone=unet_resnet18,sam_tiny
    python -m utils.comparison logs/task_seg_synthetic/multiruns/<time>     # (re)build it

writes, next to the job folders of the sweep directory,

    comparison.csv   one row per job: what varied, status, the monitored validation metric,
                     the test metrics, watermark evidence, parameters, time per epoch, peak memory
    comparison.md    the same as a Markdown table (printed at the end of the multirun)
    comparison.png   bar charts of the main columns

Sources, per job folder (``<sweep dir>/<job num>``): ``summary.json`` (written by
``utils.run``: metrics, ``resources``), ``job.json`` (written by :class:`ComparisonCallback`:
the job's overrides with secret values hidden, its config-group choices, status, error),
``release.json`` (X-Mark) and ``protection.json`` (MedLocker / MIAD-MARK). A job with no
``summary.json`` gets a row saying ``failed`` (with the error where one was recorded).

The callback is registered in ``configs/hydra/default.yaml`` (``hydra.callbacks``); it rebuilds
the comparison after every job, so a multirun that stops half-way still leaves one.
This module imports neither torch nor matplotlib at import time (Hydra builds the callback for every run).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger("medmark")

JOB_FILE = "job.json"
OUTPUTS = ("comparison.csv", "comparison.md", "comparison.png")
SECRET_PLACEHOLDER = "<secret>"

# Fixed leading columns; metric columns (test/..., wm/...) follow in the order first seen.
LEAD = ["job", "label", "status", "method", "backbone", "monitor", "best_score", "epochs"]
TAIL = ["num_parameters", "seconds_per_epoch", "peak_memory_mib", "peak_memory_kind", "seconds", "error", "dir"]

# Watermark evidence found in summary.json["fit"] (last validation values at the end of fit).
_WM_FIT = re.compile(r"^val/(wm_.*|readout_bit_accuracy|mask_agreement|stealthmark_score|wsr_.*|xmark_score|"
                     r"delta_p_.*|psnr|ssim|lpips)$")


# ---------------------------------------------------------------------------------------------
# reading one job folder
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return None


def _overrides_of(job_dir: Path, job: dict | None) -> list[str]:
    if job and isinstance(job.get("overrides"), list):
        return [str(o) for o in job["overrides"]]
    hydra_overrides = job_dir / ".hydra" / "overrides.yaml"
    if hydra_overrides.is_file():
        try:
            import yaml

            loaded = yaml.safe_load(hydra_overrides.read_text())
            return [str(o) for o in loaded or []]
        except Exception:  # noqa: BLE001  (a broken file only loses the label)
            return []
    return []


def _backbone_of(job: dict | None, config: dict | None) -> str | None:
    choice = ((job or {}).get("choices") or {}).get("backbone")
    if choice:
        return str(choice)
    backbone = (config or {}).get("backbone")
    if not isinstance(backbone, dict):
        return None
    parts = [str(backbone[k]) for k in ("arch", "variant", "encoder_name", "name") if backbone.get(k)]
    target = str(backbone.get("_target_", "")).rsplit(".", 1)[-1]
    if "sam" in target and parts:
        parts = ["sam", *parts]
    return "_".join(parts) or target or None


def _method_of(job: dict | None, config: dict | None) -> str | None:
    choice = ((job or {}).get("choices") or {}).get("method")
    if choice:
        return str(choice)
    method = (config or {}).get("method")
    target = method.get("_target_") if isinstance(method, dict) else None
    return str(target).rsplit(".", 1)[-1] if target else None


def _last_error(job_dir: Path) -> str | None:
    """The last error line of the job's ``train.log`` (Hydra's job log), if any."""
    path = job_dir / "train.log"
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    starts = [i for i, line in enumerate(lines) if "[ERROR]" in line]
    if starts:  # the last logged error with its continuation lines (exception text, full_key)
        tail = [lines[starts[-1]].split("] - ", 1)[-1]]
        tail += [line for line in lines[starts[-1] + 1: starts[-1] + 4] if not line.startswith("[")]
        return " ".join(part.strip() for part in tail)[:400]
    for line in reversed(lines):
        if "Error" in line or "error:" in line:
            return line.strip()[:400]
    return None


def _load_config(job_dir: Path) -> dict | None:
    path = job_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        import yaml

        loaded = yaml.safe_load(path.read_text())
        return loaded if isinstance(loaded, dict) else None
    except Exception:  # noqa: BLE001
        return None


def watermark_evidence(job_dir: Path, summary: dict | None) -> dict[str, Any]:
    """Whatever ownership evidence the run left: per-epoch watermark checks, release, protection."""
    out: dict[str, Any] = {}
    for key, value in sorted(((summary or {}).get("fit") or {}).items()):
        if _WM_FIT.match(key):
            out["wm/" + key.split("/", 1)[1]] = _number(value)
    release = _read_json(job_dir / "release.json")  # X-Mark
    if release:
        proxy = release.get("proxy") or {}
        out["wm/release_proxy_wsr"] = _number(proxy.get("wsr"))
        out["wm/release_proxy_p_value"] = _number(proxy.get("p_value"))
        control = [v.get("wsr") for v in (release.get("control") or {}).values() if isinstance(v, dict)]
        control = [c for c in (_number(v) for v in control) if c is not None]
        out["wm/release_clean_wsr_max"] = max(control) if control else None
        out["wm/release_psnr"] = _number(release.get("psnr_mean"))
    protection = _read_json(job_dir / "protection.json")  # MedLocker / MIAD-MARK
    if protection:
        out["wm/protection_success_rate"] = _number(protection.get("success_rate"))
        accuracy = protection.get("accuracy") or {}
        out["wm/protection_acc_clean"] = _number(accuracy.get("clean"))
        out["wm/protection_acc_protected"] = _number(accuracy.get("protected"))
        out["wm/protection_psnr"] = _number(protection.get("psnr_mean"))
    if (job_dir / "owner" / "secret.json").is_file():
        out["wm/owner_kit"] = "yes"
    return out


def read_job(job_dir: Path) -> dict[str, Any]:
    """One comparison row (plain values) for one job folder; never raises on a broken run."""
    job_dir = Path(job_dir)
    job = _read_json(job_dir / JOB_FILE)
    summary = _read_json(job_dir / "summary.json")
    config = _load_config(job_dir)
    row: dict[str, Any] = {
        "job": job_dir.name,
        "overrides": _overrides_of(job_dir, job),
        "method": _method_of(job, config),
        "backbone": _backbone_of(job, config),
        "dir": str(job_dir),
    }
    if summary is None:
        error = (job or {}).get("error") or _last_error(job_dir)
        running = (job or {}).get("status") == "running" and not error
        row["status"] = "incomplete" if running else "failed"
        row["error"] = error or ("no summary.json" if not running else None)
        return row
    row["status"] = "ok"
    row["monitor"] = summary.get("monitor")
    row["best_score"] = _number(summary.get("best_score"))
    row["epochs"] = _number(summary.get("epochs"))
    row["seconds"] = _number(summary.get("seconds"))
    for key, value in (summary.get("test") or {}).items():
        if "/loss" not in key:
            row[key] = _number(value)
    row.update(watermark_evidence(job_dir, summary))
    resources = summary.get("resources") or {}
    for key in ("num_parameters", "seconds_per_epoch", "peak_memory_mib"):
        row[key] = _number(resources.get(key))
    row["peak_memory_kind"] = resources.get("peak_memory_kind")
    return row


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------
def _is_job_dir(path: Path) -> bool:
    if not path.is_dir() or path.name.startswith("."):
        return False
    return any((path / name).exists() for name in (JOB_FILE, "summary.json", "config.yaml", "train.log", ".hydra"))


def _sort_key(path: Path) -> tuple:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in Path(sweep_dir).iterdir() if _is_job_dir(p)), key=_sort_key)


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def build_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """Rows of every job folder under ``sweep_dir``; ``label`` = the overrides that vary across jobs."""
    rows = [read_job(d) for d in job_dirs(sweep_dir)]
    known = [dict(map(_split, r["overrides"])) for r in rows if r["overrides"]]  # jobs with a record
    values: dict[str, set] = {}
    for overrides in known:
        for key, value in overrides.items():
            values.setdefault(key, set()).add(value)
    varying = {k for k, v in values.items() if len(v) > 1 or sum(k in o for o in known) < len(known)}
    for row in rows:
        parts = [o for o in row["overrides"] if _split(o)[0] in varying]
        row["label"] = " ".join(parts) if parts else (row.get("backbone") or row["job"])
    return rows


def columns_of(rows: list[dict[str, Any]]) -> list[str]:
    metrics: list[str] = []
    for row in rows:
        for key in row:
            if (key.startswith("test/") or key.startswith("wm/")) and key not in metrics:
                metrics.append(key)
    metrics = [k for k in metrics if k.startswith("test/")] + [k for k in metrics if k.startswith("wm/")]
    return LEAD + metrics + TAIL


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value.is_integer() and abs(value) >= 1:
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


def to_markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    shown = [c for c in columns if c not in ("dir",)]
    lines = ["| " + " | ".join(shown) + " |", "|" + "|".join("---" for _ in shown) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)).replace("|", "\\|") for c in shown) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monitor = next((r.get("monitor") for r in rows if r.get("monitor")), None)
    panels: list[tuple[str, str, float]] = [("best_score", f"best {monitor or 'score'} (val)", 1.0)]
    for key in ("test/dice", "test/balanced_accuracy", "test/accuracy", "test/success_rate"):
        if any(r.get(key) is not None for r in rows):
            panels.append((key, key, 1.0))
            break
    for key in ("wm/wm_readout_bit_accuracy", "wm/readout_bit_accuracy", "wm/release_proxy_wsr", "wm/wsr_proxy",
                "wm/protection_success_rate"):
        if any(r.get(key) is not None for r in rows):
            panels.append((key, key.replace("wm/", "watermark: "), 1.0))
            break
    kinds = sorted({r.get("peak_memory_kind") for r in rows if r.get("peak_memory_kind")})
    panels += [("num_parameters", "parameters (millions)", 1e-6), ("seconds_per_epoch", "seconds / epoch", 1.0),
               ("peak_memory_mib", "peak memory, MiB" + (f" ({', '.join(kinds)})" if kinds else ""), 1.0)]
    labels = [r["label"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(3.2 * len(panels), 8), 3.8), squeeze=False)
    for ax, (key, title, scale) in zip(axes[0], panels):
        heights = [(r.get(key) or 0.0) * scale if r.get("status") == "ok" and r.get(key) is not None else 0.0
                   for r in rows]
        colours = ["tab:blue" if r.get("status") == "ok" else "lightgrey" for r in rows]
        bars = ax.bar(range(len(rows)), heights, color=colours)
        for bar, row in zip(bars, rows):
            value = row.get(key)
            if row.get("status") != "ok":
                text = row.get("status", "")
            else:
                text = "n/a" if value is None else _fmt(value * scale)
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([lbl if len(lbl) <= 28 else lbl[:27] + "…" for lbl in labels], rotation=30, ha="right",
                           fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(path.parent.name, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_comparison(sweep_dir: str | Path, plot: bool = True) -> tuple[list[dict[str, Any]], str]:
    """Build and write ``comparison.csv/.md/.png`` in ``sweep_dir``; return (rows, markdown)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a multirun directory")
    rows = build_rows(sweep_dir)
    columns = columns_of(rows)
    from io import StringIO

    buffer = StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
    _atomic_write(sweep_dir / "comparison.csv", buffer.getvalue())
    markdown = to_markdown(rows, columns)
    _atomic_write(sweep_dir / "comparison.md", f"# Comparison: {sweep_dir}\n\n" + markdown)
    if plot and rows:
        _plot(rows, sweep_dir / "comparison.png")
    return rows, markdown


# ---------------------------------------------------------------------------------------------
# the Hydra callback
# ---------------------------------------------------------------------------------------------
def _secret_keys(config: Any) -> list[str]:
    try:
        keys = config.get("secret_keys") or []
        return [str(k) for k in keys]
    except Exception:  # noqa: BLE001
        return []


def redact_overrides(overrides: list[str], secret_keys: list[str]) -> list[str]:
    """``key=value`` overrides with the value hidden where ``key`` is (under) a secret key."""
    out = []
    for override in overrides:
        key, value = _split(override)
        if "=" in override and any(key == s or key.startswith(s + ".") for s in secret_keys):
            prefix = override[: len(override) - len(value)]
            out.append(prefix + SECRET_PLACEHOLDER)
        else:
            out.append(override)
    return out


class _RedactLaunchLog(logging.Filter):
    """Hides secret override values in Hydra's launcher log lines (``#0 : method.payload=...``)."""

    def __init__(self, secret_keys: list[str]):
        super().__init__()
        self.secret_keys = secret_keys

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        head, sep, tail = message.partition(" : ")
        if sep and tail:
            record.msg = head + sep + " ".join(redact_overrides(tail.split(" "), self.secret_keys))
            record.args = ()
        return True


# Hydra's launchers print every job's overrides before running it.
_LAUNCHER_LOGGERS = ("hydra._internal.core_plugins.basic_launcher", "hydra_plugins")


class ComparisonCallback(Callback):
    """Hydra callback: records each multirun job (``job.json``) and rebuilds the comparison.

    A plain (non-multirun) ``train.py`` run is left untouched.

    Args:
        enabled: false = do nothing (``hydra.callbacks.comparison.enabled=false``).
        plot: also draw ``comparison.png``.
        redact_multirun_yaml: hide the values of ``secret_keys`` (and secret command-line
            overrides) in Hydra's ``<sweep dir>/multirun.yaml`` copy of the config.
    """

    def __init__(self, enabled: bool = True, plot: bool = True, redact_multirun_yaml: bool = True):
        self.enabled = bool(enabled)
        self.plot = bool(plot)
        self.redact_multirun_yaml = bool(redact_multirun_yaml)

    @staticmethod
    def _multirun(config: Any) -> bool:
        try:
            from hydra.types import RunMode

            return config.hydra.mode == RunMode.MULTIRUN
        except Exception:  # noqa: BLE001
            return False

    def _redact_multirun_yaml(self, config: Any) -> None:
        secret_keys = _secret_keys(config)
        path = Path(str(config.hydra.sweep.dir)) / "multirun.yaml"
        if not (self.redact_multirun_yaml and secret_keys and path.is_file()):
            return
        from omegaconf import OmegaConf, open_dict

        saved = OmegaConf.load(path)
        changed = False
        with open_dict(saved):
            for key in secret_keys:
                if OmegaConf.select(saved, key, default=None, throw_on_missing=False) not in (None, SECRET_PLACEHOLDER):
                    OmegaConf.update(saved, key, SECRET_PLACEHOLDER, merge=False)
                    changed = True
            task = OmegaConf.select(saved, "hydra.overrides.task", default=None)
            if task is not None:
                redacted = redact_overrides([str(o) for o in task], secret_keys)
                if redacted != [str(o) for o in task]:
                    saved.hydra.overrides.task = redacted
                    changed = True
                    # hydra.job.override_dirname joins the same overrides ("k=v,k=v")
                    dirname = OmegaConf.select(saved, "hydra.job.override_dirname", default=None)
                    if isinstance(dirname, str):
                        for old, new in zip([str(o) for o in task], redacted):
                            dirname = dirname.replace(old.lstrip("+~"), new.lstrip("+~"))
                        saved.hydra.job.override_dirname = dirname
        if changed:
            _atomic_write(path, OmegaConf.to_yaml(saved))

    def _write_job(self, config: Any, **fields: Any) -> Path | None:
        try:
            from omegaconf import OmegaConf

            job_dir = Path(str(config.hydra.runtime.output_dir))
            path = job_dir / JOB_FILE
            doc = _read_json(path) or {}
            if not doc:
                overrides = [str(o) for o in OmegaConf.to_container(config.hydra.overrides.task, resolve=False)]
                choices = OmegaConf.to_container(config.hydra.runtime.choices, resolve=False)
                doc = {"num": int(config.hydra.job.num), "overrides": redact_overrides(overrides, _secret_keys(config)),
                       "choices": {k: v for k, v in choices.items() if not str(k).startswith("hydra")}}
            doc.update(fields)
            job_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, json.dumps(doc, indent=2, default=str) + "\n")
            return job_dir
        except Exception as exc:  # noqa: BLE001  (bookkeeping must never break a training run)
            log.warning("comparison: could not write %s: %s", JOB_FILE, exc)
            return None

    def _rebuild(self, config: Any, announce: bool = False) -> None:
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            rows, markdown = write_comparison(sweep_dir, plot=self.plot)
        except Exception as exc:  # noqa: BLE001
            log.warning("comparison: could not build the comparison: %s", exc)
            return
        if announce and rows:
            print(f"\n== comparison of {len(rows)} runs -> {sweep_dir}/comparison.{{csv,md,png}}\n{markdown}",
                  flush=True)

    # -- hydra.experimental.callback.Callback hooks ---------------------------------------------
    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        # Always (even with enabled=false): a secret given on the command line must not be
        # printed by the launcher's "#N : <overrides>" lines.
        secret_keys = _secret_keys(config)
        if secret_keys:
            for name in _LAUNCHER_LOGGERS:
                logging.getLogger(name).addFilter(_RedactLaunchLog(secret_keys))

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        if not (self.enabled and self._multirun(config)):
            return
        try:
            self._redact_multirun_yaml(config)
        except Exception as exc:  # noqa: BLE001
            log.warning("comparison: could not redact multirun.yaml: %s", exc)
        self._write_job(config, status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"))

    def on_job_end(self, config: Any, job_return: Any = None, **kwargs: Any) -> None:
        if not self._multirun(config):
            return
        # Hydra's sweeper writes a failed job's overrides to stderr ("Error executing job with
        # overrides: [...]") after this hook: hide the secret values there too.
        secret_keys = _secret_keys(config)
        if secret_keys and isinstance(getattr(job_return, "overrides", None), list):
            job_return.overrides = redact_overrides([str(o) for o in job_return.overrides], secret_keys)
        if not self.enabled:
            return
        fields: dict[str, Any] = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        status = getattr(getattr(job_return, "status", None), "name", None)
        fields["status"] = {"COMPLETED": "completed", "FAILED": "failed"}.get(status, str(status).lower())
        if status == "FAILED":
            error = getattr(job_return, "_return_value", None)
            fields["error"] = f"{type(error).__name__}: {error}"[:500]
        elif status == "COMPLETED":
            value = getattr(job_return, "_return_value", None)
            fields["return_value"] = value if _number(value) is not None else None
        self._write_job(config, **fields)
        self._rebuild(config)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if not self.enabled:
            return
        try:
            self._redact_multirun_yaml(config)
        except Exception as exc:  # noqa: BLE001
            log.warning("comparison: could not redact multirun.yaml: %s", exc)
        self._rebuild(config, announce=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m utils.comparison <multirun dir> [--no-plot]``: (re)build the comparison."""
    args = list(sys.argv[1:] if argv is None else argv)
    plot = "--no-plot" not in args
    paths = [a for a in args if not a.startswith("--")]
    if len(paths) != 1:
        print("usage: python -m utils.comparison <multirun dir> [--no-plot]", file=sys.stderr)
        return 2
    try:
        rows, markdown = write_comparison(paths[0], plot=plot)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: no job folders under {paths[0]}", file=sys.stderr)
        return 2
    print(markdown, end="")
    print(f"-> {Path(paths[0]) / 'comparison.csv'}, comparison.md" + (", comparison.png" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
