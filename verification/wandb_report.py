"""``verify.py logger=wandb``: a verification as a W&B run (``job_type="verify"``) linked to its training run.

After ``verify.py`` has published a verdict (exit 0, 1 or 3), :func:`log_verification`

* starts a W&B run from the ``logger.wandb`` config (offline by itself without credentials) whose
  config is the verify config with every secret value of the owner kit replaced by
  ``<secret hmac-sha256:HEX>`` under the kit's salt (``<kit>/redaction_salt.hex``; ``<secret>``
  without it) -- the marker ``config.yaml`` of a training run carries;
* logs the verdict, the exit code and the report's numbers (p-values, ASR, ...) in the run summary,
  and the report's public figures (:data:`PUBLIC_FIGURES`) as images;
* logs the report (``report.json``/``.md``/``.html`` + those figures) as an artifact of type
  ``verification-report``. The StealthMark report holds the decoded payload text, and its figures
  draw it (title, QR rendering, explanation maps): the copies sent to W&B have every secret string
  of the kit replaced by ``[redacted]``, ``report.html`` is rendered again without the figures that
  are not public, and those figures stay in the owner's folder only;
* declares lineage: the training run's ``owner-kit-<id>`` artifact (named in the kit's public
  ``wandb_run.json``, written by ``callbacks/wandb_artifacts.py``) is used as the run's input
  (``run.use_artifact``). W&B's offline mode cannot declare inputs: offline, the training run's id
  and artifact name are in the run config (``training_run``) only.

A W&B failure never changes the verdict: it is logged as a warning.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("medmark")

REPORT_FILES = ("report.json", "report.md", "report.html")
REPORT_ARTIFACT_TYPE = "verification-report"
KIT_RUN_RECORD = "wandb_run.json"       # in the kit folder, beside secret.json
RUN_ID_FILE = "wandb_run_id.txt"        # in the training run folder (the kit's parent)
SALT_FILE = "redaction_salt.hex"
VERDICTS = {0: "VERIFIED", 1: "NOT VERIFIED", 3: "EXPLORATORY"}

#: Figures of each method's report that show no secret, by file name: the only ones sent to W&B.
#: StealthMark's show the decoded payload (title and QR rendering) and the explanation maps that
#: draw the QR code itself: none goes to W&B (they stay in the owner's report folder).
PUBLIC_FIGURES = {
    "stealthmark": (),
    "xmark": ("paired_probabilities.png", "examples.png"),
    "medlocker": (),  # its protocols write no figures
    "miadmark": (),
}

#: Dotted fields of each method's secret.json whose values are secret (lists: every element).
SECRET_FIELDS = {
    "stealthmark": ("key.payload", "key.trigger.seed"),
    "xmark": ("verification.seed", "release.marked_ids"),
    "medlocker": (),  # its secret.json holds no key material (the keys are separate files)
    "miadmark": (),
}


#: Shortest secret matched by value: a shorter one matches innocent text or numbers (``1``), and
#: replacing those would reveal the secret by where the marker lands.
MIN_SECRET_STRING, MIN_SECRET_DIGITS = 4, 6


def kit_secret_values(secret_doc: dict) -> list[Any]:
    """The secret values of a secret.json document (strings of >= 4 characters, integers of >= 6
    digits: :data:`MIN_SECRET_STRING`, :data:`MIN_SECRET_DIGITS`), by its ``method``."""
    values: list[Any] = []
    for dotted in SECRET_FIELDS.get(secret_doc.get("method"), ()):
        node: Any = secret_doc
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        for value in node if isinstance(node, list) else [node]:
            if isinstance(value, str) and len(value) >= MIN_SECRET_STRING:
                values.append(value)
            elif isinstance(value, int) and not isinstance(value, bool) and len(str(abs(value))) >= MIN_SECRET_DIGITS:
                values.append(value)
    return values


def read_salt(kit_dir: Path) -> bytes | None:
    """The kit's 32-byte redaction salt (None: absent or unreadable -- e.g. a verifier without it)."""
    try:
        salt = bytes.fromhex((kit_dir / SALT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return salt if len(salt) == 32 else None


def secret_marker(value: Any, salt: bytes | None) -> str:
    """``<secret hmac-sha256:HEX>``: HMAC-SHA256 of the value's canonical JSON under ``salt``
    (the formula of ``utils.run.secret_digest``, which config.yaml uses); ``<secret>`` without a salt."""
    if salt is None:
        return "<secret>"
    message = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return f"<secret hmac-sha256:{hmac.new(salt, message, hashlib.sha256).hexdigest()}>"


def redact_tree(node: Any, secrets: list[Any], salt: bytes | None) -> Any:
    """``node`` (plain containers) with each leaf equal to a secret, or a string containing a secret
    string, replaced by :func:`secret_marker` of that secret."""
    if isinstance(node, dict):
        return {k: redact_tree(v, secrets, salt) for k, v in node.items()}
    if isinstance(node, list):
        return [redact_tree(v, secrets, salt) for v in node]
    for secret in secrets:
        if (node == secret and type(node) is type(secret)) or (
                isinstance(node, str) and isinstance(secret, str) and secret in node):
            return secret_marker(secret, salt)
        if isinstance(node, str) and not isinstance(secret, str) and node == str(secret):
            return secret_marker(secret, salt)
    return node


def redact_text(text: str, secrets: Iterable[Any]) -> str:
    """``text`` with every secret (its decimal form for a number) replaced by ``[redacted]``."""
    for secret in secrets:
        text = text.replace(str(secret), "[redacted]")
    return text


def training_record(secret_path: Path) -> dict[str, Any] | None:
    """The training run's W&B identity: the kit's ``wandb_run.json``, else the run id of
    ``<kit>/../wandb_run_id.txt`` (no artifact name then); None when neither is there."""
    kit = secret_path.parent
    try:
        record = json.loads((kit / KIT_RUN_RECORD).read_text())
        if isinstance(record, dict) and record.get("run_id"):
            return record
    except (OSError, ValueError):
        pass
    try:
        run_id = (kit.parent / RUN_ID_FILE).read_text().strip()
    except OSError:
        return None
    return {"run_id": run_id} if run_id else None


def summary_values(report: dict, code: int) -> dict[str, Any]:
    """The run summary: verdict, exit code and the report's top-level numbers and booleans."""
    values = {k: v for k, v in report.items() if isinstance(v, (int, float, bool)) and v is not None}
    values.update({"verdict": VERDICTS.get(code, str(code)), "exit_code": int(code)})
    return values


def public_figures(out: Path, method: str | None) -> list[Path]:
    """The report's figures under ``<out>/figures`` that :data:`PUBLIC_FIGURES` allows for ``method``."""
    allowed = PUBLIC_FIGURES.get(method or "", ())
    return [out / "figures" / name for name in allowed if (out / "figures" / name).is_file()]


def _report_artifact(out: Path, secrets: list[Any], name: str, staging: Path, figures: list[Path]):
    """A ``verification-report`` artifact: report.json/.md with every secret string ``[redacted]``,
    report.html rendered again from the redacted report with the public ``figures`` only, and those figures."""
    import wandb

    from verification.report_html import write_html_report

    report_text = redact_text((out / "report.json").read_text(encoding="utf-8"), secrets)
    report = json.loads(report_text)
    markdown = (out / "report.md").read_text(encoding="utf-8") if (out / "report.md").is_file() else ""
    title = markdown.splitlines()[0].lstrip("# ").strip() if markdown.startswith("#") else "Verification report"
    artifact = wandb.Artifact(name, type=REPORT_ARTIFACT_TYPE, metadata={
        "verified": report.get("verified"), "exploratory": report.get("exploratory"),
        "method": report.get("method"), "secret_sha256": report.get("secret_sha256")})
    (staging / "report.json").write_text(report_text, encoding="utf-8")
    (staging / "report.md").write_text(redact_text(markdown, secrets), encoding="utf-8")
    write_html_report(staging, report, [str(f) for f in figures], title,
                      redact=[str(s) for s in secrets if isinstance(s, str)])
    for file_name in REPORT_FILES:
        artifact.add_file(str(staging / file_name), name=file_name)
    for figure in figures:
        artifact.add_file(str(figure), name=f"figures/{figure.name}")
    return artifact


def _declare_lineage(run: Any, record: dict[str, Any] | None) -> None:
    name = (record or {}).get("owner_kit_artifact")
    if not name:
        log.info("W&B: no training run recorded in the owner kit (wandb_run.json): no lineage declared")
        return
    if getattr(run, "offline", False):
        log.info("W&B offline mode cannot declare artifact inputs; the training run (%s, artifact %s) is in "
                 "this run's config as training_run", record.get("run_id"), name)
        return
    path = "/".join(p for p in (record.get("entity"), record.get("project"), f"{name}:latest") if p)
    try:
        run.use_artifact(path)
    except Exception as exc:  # noqa: BLE001 - lineage is a link, never a reason to fail
        log.warning("W&B: could not use artifact %s as input: %s: %s", path, type(exc).__name__, exc)


def log_verification(cfg: DictConfig, code: int, start_run: Callable[..., Any]) -> str | None:
    """Log a published verification (``cfg.out``) to W&B when ``cfg.logger.wandb`` is set.

    Args:
        cfg: the resolved verify config (``secret``, ``out``, ``logger.wandb``).
        code: the verdict's exit code (0, 1 or 3).
        start_run: ``utils.loggers.start_wandb_run`` (``**logger.wandb`` + wandb.init arguments -> run).
    Returns:
        the W&B run id, or None (no W&B logger, or W&B failed: a warning says why).
    """
    wandb_cfg = OmegaConf.select(cfg, "logger.wandb", default=None)
    if not wandb_cfg:
        return None
    try:
        import wandb

        secret_path, out = Path(cfg.secret), Path(cfg.out)
        secret_doc = json.loads(secret_path.read_text())
        secrets = kit_secret_values(secret_doc)
        salt = read_salt(secret_path.parent)
        record = training_record(secret_path)
        config = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "stage_dir"}
        config = redact_tree({**config, "training_run": record}, secrets, salt)
        report = json.loads((out / "report.json").read_text())
        settings = {k: v for k, v in OmegaConf.to_container(wandb_cfg, resolve=True).items() if k not in ("id", "resume")}
        run = start_run(**settings, job_type="verify", config=config)
        if getattr(run, "disabled", False):  # WANDB_MODE=disabled
            run.finish()
            return None
        try:
            _declare_lineage(run, record)
            run.summary.update(redact_tree(summary_values(report, code), secrets, salt))
            figures = public_figures(out, secret_doc.get("method"))
            if figures:
                run.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in figures})
            name = f"verification-{(record or {}).get('run_id') or 'unlinked'}"
            with tempfile.TemporaryDirectory() as staging:
                run.log_artifact(_report_artifact(out, secrets, name, Path(staging), figures), aliases=["latest"])
            return run.id
        finally:
            run.finish()
    except Exception as exc:  # noqa: BLE001 - W&B never changes a verdict
        log.warning("W&B: the verification was not logged: %s: %s", type(exc).__name__, exc)
        return None
