"""Writing a protocol's report (json + md + html) and announcing its verdict: one home for every protocol.

:func:`write_report` writes ``report.json``, ``report.md`` and ``report.html`` into the staging
folder; :func:`announce_verdict` prints the verdict line (with the exploratory banner when a
sealed threshold was changed) and the report's final path, and returns the exit code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from verification.protocols import ThresholdRules, exploratory_banner
from verification.report_html import write_html_report


def write_report(stage: str | Path, report: Mapping[str, Any], markdown: str, title: str,
                 figures: Iterable[str | Path] = (), *, certificate: Mapping[str, Any] | None = None,
                 redact: Iterable[str] = ()) -> None:
    """``<stage>/report.json`` (``report``, indented), ``report.md`` (``markdown``) and ``report.html``.

    Args:
        stage: the folder to write into (created; ``verify.py``'s staging folder).
        report: the secret-free report document.
        markdown: the whole report.md text.
        title: report.html's heading.
        figures, certificate, redact: passed to :func:`verification.report_html.write_html_report`.
    """
    stage = Path(stage)
    stage.mkdir(parents=True, exist_ok=True)
    (stage / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (stage / "report.md").write_text(markdown)
    write_html_report(stage, report, list(figures), title, certificate=certificate, redact=redact)


def announce_verdict(rules: ThresholdRules, report: Mapping[str, Any], passes: bool, summary: str,
                     out: str | Path, why: str = "") -> int:
    """Print ``<VERDICT><why>: <summary>`` and ``report: <out>/report.json``; return the exit code.

    Args:
        rules: the sealed / used thresholds (:func:`~verification.protocols.apply_threshold_overrides`).
        report: the report (``verified``; the exploratory banner is read from it).
        passes: whether the rule passes at the thresholds used (the exploratory line says so).
        summary: the protocol's numbers (never a secret).
        why: a note after a NOT VERIFIED word (e.g. a control model also passes).
    """
    word = "VERIFIED" if report["verified"] else "NOT VERIFIED"
    if rules.exploratory:
        print(exploratory_banner(report), flush=True)
        word = f"EXPLORATORY (the rule {'passes' if passes else 'fails'} at the changed thresholds)"
    print(f"{word}{why}: {summary}", flush=True)
    print(f"report: {Path(out) / 'report.json'}", flush=True)
    return rules.exit_code(bool(report["verified"]))
