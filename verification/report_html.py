"""``report.html``: one self-contained page of ownership evidence, beside report.json / report.md.

    write_html_report(out_dir, report, figures, title)  # -> <out_dir>/report.html

Order: the verdict (large, coloured), the evidence table (the report's numbers), the
figures (PNG, base64-embedded: the file can be mailed or archived alone), the suspect's
identity (kind, path/URL, sha256) and query count, the owner's signed certificate check
(``valid signature by ed25519:<fingerprint>`` or ``INVALID``) and the software versions.

All text is HTML-escaped. Secrets never reach the page: fields named like key material
(``payload``, ``text``, ``key``, ``master_key``, ``private_key``, ``token``, ``password``) are
left out wherever they occur, and ``redact=`` strings (e.g. the payload, passed by the
StealthMark protocol as a second guard) are replaced by ``[redacted]`` in the final page.
"""

from __future__ import annotations

import base64
import hashlib
import html
import importlib.metadata
import json
import math
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

ROOT = Path(__file__).resolve().parents[1]
# field names never rendered (secrets and decoded payload text); hashes such as key_sha256 are fine
SECRET_FIELDS = frozenset({"payload", "text", "key", "master_key", "private_key", "secret_key", "token", "password",
                           "authorization"})
# shown in their own sections, not in the evidence table
_SECTION_FIELDS = frozenset({"suspect", "figures", "config", "certificate"})
MAX_FIGURE_BYTES = 8 << 20
MAX_LIST_ROWS = 50


# ----------------------------------------------------------------------------- facts


def software_versions() -> dict[str, str]:
    """python, torch, lightning, numpy, onnxruntime and medmark (package or pyproject, + git commit)."""
    versions = {"python": platform.python_version()}
    for name in ("torch", "lightning", "numpy", "onnxruntime"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    versions["medmark"] = medmark_version()
    return versions


def medmark_version() -> str:
    """The installed package's version, else pyproject's; `` (git <commit>)`` when a checkout is found."""
    try:
        version = importlib.metadata.version("medmark")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
        try:
            import tomllib

            version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
        except (OSError, KeyError, ValueError):
            pass
    commit = _git_commit(ROOT)
    return f"{version} (git {commit[:12]})" if commit else version


def _git_commit(root: Path) -> str | None:
    """HEAD's commit read from ``.git`` files (no subprocess); None when not a plain checkout."""
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head if len(head) == 40 else None
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        return None
    return None


def public_key_fingerprint(public_key) -> str:
    """``ed25519:`` + the first 32 hex digits of sha256(raw 32-byte public key)."""
    from cryptography.hazmat.primitives import serialization

    from watermark.certificates import load_public_key

    raw = load_public_key(public_key).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


def certificate_check(secret_path: str | Path | None, secret_sha256: str | None = None) -> dict[str, Any]:
    """The owner kit's signed certificate next to ``secret_path``, checked.

    StealthMark / X-Mark kits: ``owner/certificate.json`` + ``owner/owner_public_key.pem``;
    MedLocker / MIAD-MARK: the secret's ``certificates`` and ``public_key`` fields. Returns
    ``{status: valid | INVALID | absent, fingerprint, owner_id, method, created_at,
    secret_matches, certificate, public_key, detail}``. The public key found beside the secret
    only proves the kit is self-consistent; a reviewer compares the fingerprint with the key
    the owner published.
    """
    from watermark.certificates import CertificateFormatError, load_certificate, verify_certificate

    result: dict[str, Any] = {"status": "absent", "fingerprint": None, "detail": None}
    if not secret_path:
        result["detail"] = "no secret given"
        return result
    owner = Path(secret_path).parent
    try:
        doc = json.loads(Path(secret_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        doc = {}
    doc = doc if isinstance(doc, dict) else {}
    cert_file = Path(doc["certificates"]) if isinstance(doc.get("certificates"), str) else owner / "certificate.json"
    keys = [Path(doc["public_key"])] if isinstance(doc.get("public_key"), str) else []
    keys += [owner / "owner_public_key.pem", owner / "public_key.pem"]
    key_file = next((k for k in keys if k.is_file()), None)
    result["certificate"] = str(cert_file)
    if not cert_file.is_file():
        result["detail"] = f"no certificate at {cert_file}"
        return result
    if key_file is None:
        result.update(status="INVALID", detail=f"no owner public key found beside {cert_file.name}")
        return result
    result["public_key"] = str(key_file)
    try:
        cert = load_certificate(cert_file)
        result["fingerprint"] = public_key_fingerprint(key_file)
        valid = verify_certificate(cert, key_file)
    except (CertificateFormatError, ValueError, OSError) as err:
        result.update(status="INVALID", detail=f"{type(err).__name__}: {err}")
        return result
    result["status"] = "valid" if valid else "INVALID"
    if not valid:
        result["detail"] = "the signature does not verify under this public key (certificate altered or another key)"
    for name in ("owner_id", "method", "created_at"):
        result[name] = cert.get(name)
    if secret_sha256 and "secret_sha256" in cert:
        result["secret_matches"] = cert["secret_sha256"] == secret_sha256
    return result


# ----------------------------------------------------------------------------- rendering


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        return f"{value:.4g}"
    if value is None:
        return "—"
    return str(value)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def evidence_rows(report: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Dotted ``(field, value)`` rows of the report's scalars; lists of numbers summarised."""
    rows: list[tuple[str, str]] = []
    for name, value in report.items():
        if str(name).lower() in SECRET_FIELDS or (not prefix and name in _SECTION_FIELDS):
            continue
        field = f"{prefix}{name}"
        if isinstance(value, Mapping):
            rows += evidence_rows(value, field + ".")
        elif isinstance(value, (list, tuple)):
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and value:
                if len(value) <= 8:
                    rows.append((field, ", ".join(_fmt(v) for v in value)))
                else:
                    mean = sum(value) / len(value)
                    rows.append((field, f"{len(value)} values: min {_fmt(min(value))}, mean {_fmt(float(mean))}, "
                                        f"max {_fmt(max(value))}"))
            elif all(_scalar(v) for v in value):
                shown = ", ".join(_fmt(v) for v in value[:12])
                rows.append((field, shown + (f" … ({len(value)} in all)" if len(value) > 12 else "")))
            # lists of records are rendered as their own tables (record_tables)
        elif _scalar(value):
            rows.append((field, _fmt(value)))
    return rows


def record_tables(report: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(field, columns, rows)`` for top-level lists of flat records (per-image results)."""
    tables = []
    for name, value in report.items():
        if name in _SECTION_FIELDS or str(name).lower() in SECRET_FIELDS:
            continue
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            columns: list[str] = []
            for record in value:
                for key, v in record.items():
                    if key not in columns and str(key).lower() not in SECRET_FIELDS and _scalar(v):
                        columns.append(key)
            rows = [[_fmt(r.get(c)) for c in columns] for r in value[:MAX_LIST_ROWS]]
            tables.append((name, columns, rows))
    return tables


def _table(header: Iterable[str] | None, rows: Iterable[Iterable[str]], cls: str = "") -> str:
    out = [f'<table class="{_e(cls)}">' if cls else "<table>"]
    if header is not None:
        out.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _figure(path: Path) -> str:
    data = path.read_bytes()
    if not data.startswith(b"\x89PNG") or len(data) > MAX_FIGURE_BYTES:
        return (f'<p class="note">figure {_e(path.name)} not embedded (not a PNG or over '
                f'{MAX_FIGURE_BYTES >> 20} MB)</p>')
    encoded = base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{encoded}" alt="{_e(path.stem)}">'
            f"<figcaption>{_e(path.name)}</figcaption></figure>")


def _verdict(report: Mapping[str, Any]) -> tuple[str, str, str]:
    """``(word, css class, one-line summary)``."""
    if "verified" not in report:
        return "MEASUREMENT", "neutral", "a measurement, not an ownership verdict"
    verified = bool(report["verified"])
    parts = []
    for name, label in (("p_value", "p"), ("alpha", "α"), ("tau", "τ"), ("delta_p", "ΔP"), ("wsr", "WSR"),
                        ("asr", "ASR"), ("bit_accuracy", "bit accuracy")):
        if isinstance(report.get(name), (int, float)) and not isinstance(report.get(name), bool):
            parts.append(f"{label} = {_fmt(report[name])}")
    thresholds = report.get("thresholds")
    if "alpha" not in report and isinstance(thresholds, Mapping) and "alpha" in thresholds:
        parts.append(f"α = {_fmt(thresholds['alpha'])}")
    summary = ", ".join(parts)
    if report.get("exploratory"):  # thresholds changed from the owner kit's sealed values: no verdict
        return "EXPLORATORY", "exploratory", summary
    return ("VERIFIED", "verified", summary) if verified else ("NOT VERIFIED", "not-verified", summary)


def threshold_notes(report: Mapping[str, Any]) -> list[str]:
    """HTML paragraphs: the exploratory banner naming each changed threshold, stricter thresholds."""
    notes = []
    changed = report.get("changed_thresholds") or {}
    if report.get("exploratory") or changed:
        items = "".join(f"<li><code>{_e(name)}</code>: sealed {_e(_fmt(c.get('sealed')))} &rarr; used "
                        f"{_e(_fmt(c.get('used')))}</li>" for name, c in changed.items() if isinstance(c, Mapping))
        notes.append('<div class="banner" id="exploratory"><strong>EXPLORATORY</strong> &mdash; decision '
                     "thresholds were changed from the values sealed in the owner kit; this report is not an "
                     f"ownership verdict (exit code 3).<ul>{items}</ul></div>")
    stricter = report.get("stricter_thresholds") or {}
    if stricter:
        items = ", ".join(f"{_e(name)} {_e(_fmt(c.get('sealed')))} (sealed) &rarr; {_e(_fmt(c.get('used')))}"
                          for name, c in stricter.items() if isinstance(c, Mapping))
        notes.append(f'<p class="note">Stricter than sealed (the verdict stays binding): {items}</p>')
    return notes


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;
color:#1d2433;line-height:1.45}
h1{font-size:1.4em;margin-bottom:.2em}
h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #dde;padding-bottom:.2em}
.verdict{font-size:2.6em;font-weight:800;padding:.35em .6em;border-radius:.25em;color:#fff;display:inline-block;
letter-spacing:.03em}
.verified{background:#1b7f3b}.not-verified{background:#b3261e}.neutral{background:#49557a}
.exploratory{background:#a15c00}.banner{border:3px solid #a15c00;background:#fff4e0;padding:.6em 1em;margin:.8em 0}
.summary{font-size:1.1em;margin:.6em 0 0}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}
td,th{border:1px solid #d4d8e4;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f1f3f8}td:first-child{font-family:ui-monospace,Menlo,monospace}
figure{display:inline-block;margin:.5em 1em .5em 0}figure img{max-width:100%;border:1px solid #dde}
figcaption{font-size:.85em;color:#555}.note{color:#555;font-size:.9em}
.ok{color:#1b7f3b;font-weight:700}.bad{color:#b3261e;font-weight:700}
"""


def render_html(report: Mapping[str, Any], figures: Iterable[str | Path], title: str,
                certificate: Mapping[str, Any] | None = None, versions: Mapping[str, str] | None = None) -> str:
    """The page as a string (see the module docstring)."""
    word, cls, summary = _verdict(report)
    body = [f"<h1>{_e(title)}</h1>", f'<div class="verdict {cls}" id="verdict">{_e(word)}</div>']
    body += threshold_notes(report)
    if summary:
        body.append(f'<p class="summary">{_e(summary)}</p>')
    queries = report.get("queries", (report.get("suspect") or {}).get("queries")
                         if isinstance(report.get("suspect"), Mapping) else None)
    if queries is not None:
        body.append(f'<p class="summary">{_e(queries)} suspect queries'
                    + (f"; verification took {_e(_fmt(report['seconds']))} s"
                       if isinstance(report.get("seconds"), (int, float)) else "") + "</p>")

    body.append("<h2>Evidence</h2>")
    body.append(_table(("field", "value"), evidence_rows(report), "evidence"))
    for name, columns, rows in record_tables(report):
        body.append(f"<h3>{_e(name)}</h3>")
        body.append(_table(columns, rows))

    paths = [Path(f) for f in figures]
    body.append("<h2>Figures</h2>")
    shown = [p for p in paths if p.is_file()]
    body += [_figure(p) for p in shown] if shown else ['<p class="note">No figures.</p>']

    body.append("<h2>Suspect</h2>")
    suspect = report.get("suspect")
    if isinstance(suspect, Mapping):
        rows = [(k, _fmt(v)) for k, v in suspect.items() if str(k).lower() not in SECRET_FIELDS and _scalar(v)]
        rows += [(k, json.dumps(v)) for k, v in suspect.items() if str(k).lower() not in SECRET_FIELDS
                 and not _scalar(v)]
        body.append(_table(("field", "value"), rows))
    elif suspect is not None:
        body.append(_table(("field", "value"), [("suspect", _fmt(suspect))]))
    else:
        body.append('<p class="note">No suspect model (this check reads files only).</p>')

    body.append("<h2>Owner certificate</h2>")
    cert = certificate or {"status": "absent", "detail": "not checked"}
    if cert.get("status") == "valid":
        line = f'<p><span class="ok">valid signature</span> by <code>{_e(cert.get("fingerprint"))}</code>'
        if cert.get("owner_id"):
            line += f" (owner {_e(cert['owner_id'])}"
            line += f", signed {_e(cert['created_at'])})" if cert.get("created_at") else ")"
        body.append(line + "</p>")
        if cert.get("secret_matches") is not None:
            body.append(f"<p>certificate commits to this secret: "
                        f"<span class=\"{'ok' if cert['secret_matches'] else 'bad'}\">"
                        f"{'yes' if cert['secret_matches'] else 'NO'}</span></p>")
        body.append('<p class="note">The public key beside the owner kit proves the kit is self-consistent; compare '
                    "this fingerprint with the key the owner published.</p>")
    elif cert.get("status") == "INVALID":
        body.append(f'<p><span class="bad">INVALID</span> signature'
                    + (f" (key <code>{_e(cert['fingerprint'])}</code>)" if cert.get("fingerprint") else "")
                    + (f": {_e(cert['detail'])}" if cert.get("detail") else "") + "</p>")
    else:
        detail = f": {_e(cert['detail'])}" if cert.get("detail") else ""
        body.append(f'<p class="note">No signed certificate checked{detail}.</p>')

    body.append("<h2>Software</h2>")
    versions = dict(versions or software_versions())
    versions["generated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    body.append(_table(("", "version"), versions.items()))
    config = report.get("config")
    if isinstance(config, Mapping):
        body.append("<h2>Configuration</h2>")
        body.append(_table(("field", "value"), evidence_rows(config)))

    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_e(title)} — {_e(word)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def write_html_report(out_dir: str | Path, report: Mapping[str, Any], figures: Iterable[str | Path], title: str, *,
                      certificate: Mapping[str, Any] | None = None, redact: Iterable[str] = ()) -> Path:
    """Write ``<out_dir>/report.html``; returns its path.

    Args:
        out_dir: the report folder (created).
        report: the report.json document (secret-free by contract; secret-named fields are
            skipped anyway).
        figures: PNG files to embed (missing files are skipped).
        title: page heading.
        certificate: a :func:`certificate_check` result; ``None`` = checked from
            ``report["secret"]`` (and ``report["secret_sha256"]``).
        redact: strings that must not appear (replaced by ``[redacted]``); empty strings ignored.
    """
    if certificate is None:
        certificate = certificate_check(report.get("secret"), report.get("secret_sha256"))
    page = render_html(report, figures, title, certificate)
    for secret in redact:
        if secret:
            page = page.replace(html.escape(str(secret), quote=True), "[redacted]").replace(str(secret), "[redacted]")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


if __name__ == "__main__":  # pragma: no cover - render an existing report.json: python -m verification.report_html <dir>
    folder = Path(sys.argv[1])
    doc = json.loads((folder / "report.json").read_text())
    print(write_html_report(folder, doc, doc.get("figures") or [], sys.argv[2] if len(sys.argv) > 2 else "Report"))
