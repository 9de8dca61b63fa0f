"""Shared plumbing of the robustness and false-positive studies (``benchmarks/robustness.py``,
``benchmarks/false_positives.py``): ``key=value`` arguments, in-process ``verify.py`` runs, and
the evidence fields of a report.

Each verification is the real protocol of ``verify.py`` (``verification.protocols.run_protocol`` on
the composed ``configs/verify.yaml``), run in-process so the stack is imported once.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

import utils.resolvers  # noqa: E402,F401
from datamodules.samples import DatasetError  # noqa: E402
from verification.suspect import SuspectError  # noqa: E402
from verification.protocols import EXIT_BAD_INPUT, BadInput, run_protocol  # noqa: E402
from watermark.stealthmark.kit import OwnerKitError  # noqa: E402

log = logging.getLogger("medmark.study")


def parse_args(argv: list[str], known: dict[str, Any], usage: str) -> tuple[dict[str, Any], list[str]]:
    """``key=value`` (Hydra style) or ``--key value`` / ``--key=value`` arguments.

    Keys of ``known`` fill the options (with their defaults); every other ``key=value`` is
    returned as an override (``verify.*``, ``data.*``, ``<attack>.<field>``...).
    """
    options, extra = dict(known), []
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item in ("-h", "--help"):
            print(usage)
            raise SystemExit(0)
        if item.startswith("--"):
            item = item[2:].replace("-", "_")
            if "=" not in item:
                if i + 1 >= len(items):
                    raise SystemExit(f"error: --{item} needs a value\n{usage}")
                item = f"{item}={items[i + 1]}"
                i += 1
        if "=" not in item:
            raise SystemExit(f"error: expected key=value, got {item!r}\n{usage}")
        key, value = item.split("=", 1)
        if key in known:
            options[key] = value
        else:
            extra.append(f"{key}={value}")
        i += 1
    return options, extra


def verify_config(overrides: list[str], out: Path):
    """The composed ``configs/verify.yaml`` with ``overrides`` (paths point at the checkout)."""
    base = [f"paths.root_dir={ROOT}", f"paths.output_dir={out}", f"out={out}"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="verify", overrides=base + list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def run_verify(overrides: list[str], out: Path) -> tuple[int, dict | None, str | None]:
    """Run the verification protocol in-process; ``(exit code, report.json or None, error or None)``."""
    try:
        cfg = verify_config(overrides, out)
        code = int(run_protocol(cfg))
    except (OwnerKitError, SuspectError, BadInput, DatasetError, FileNotFoundError, ValueError,
            OmegaConfBaseException, InstantiationException) as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT, None, f"{type(exc).__name__}: {exc}"
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    return code, report, None


def evidence(report: dict | None, method: str) -> dict[str, Any]:
    """The watermark evidence of a report, flat (StealthMark or X-Mark fields)."""
    if report is None:
        return {}
    if method == "stealthmark":
        decoded = report.get("decoded") or []
        readout = report.get("readout") or {}
        return {
            "verified": bool(report["verified"]),
            "p_value": float(report["p_value"]),
            "response_p_value": float(report["response_p_value"]),
            "qr_p_value": float(report["qr_p_value"]),
            "qr_evidence": (report.get("qr") or {}).get("evidence"),
            "asr": float(report["asr"]),
            "decoded": f"{sum(bool(d.get('matches')) for d in decoded)}/{len(decoded)}",
            "bit_accuracy": float(report["bit_accuracy"]),
            "readout_decoded": f"{readout.get('decoded_triggered')}/{readout.get('num_images')}",
            "readout_bit_accuracy": readout.get("bit_accuracy_triggered"),
        }
    return {
        "verified": bool(report["verified"]),
        "p_value": float(report["p_value"]),
        "delta_p": float(report["delta_p"]),
        "wsr": float(report["wsr"]),
        "suspect_test_passes": bool(report.get("suspect_test_passes", report["verified"])),
    }


def fmt(value: Any, digits: int = 3) -> str:
    """Short table cell."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def neg_log10(p: float | None, floor: float = 1e-300) -> float:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return 0.0
    return -math.log10(max(float(p), floor))
