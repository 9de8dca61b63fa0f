"""W&B artifacts, offline: the StealthMark story (train -> owner kit -> verify) leaves the checkpoint
(opt-in), the public owner kit and the verification report in W&B, and no secret.

W&B runs offline here (no credentials, ``WANDB_MODE=offline``). An offline run keeps what it would
upload: ``<dir>/wandb/offline-run-*/run-<id>.wandb`` (the run's records: config, summary, artifact
manifests) and, for each artifact file, a copy in ``$WANDB_DATA_DIR/artifacts/staging/``. The tests
read those bytes (``wandb.Api`` does not work offline).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import wandb
from omegaconf import OmegaConf

from conftest import ROOT, read_summary
from test_stealthmark import PAYLOAD, TINY_STEALTHMARK, TRIGGER_SEED

SECRET_FILES = ("secret.json", "drawn_secrets.json", "redaction_salt.hex", "owner_private_key.pem")

# The tests' tiny StealthMark run (test_stealthmark.py), one epoch on 48 images, W&B on; the secret
# comes from a 0600 file (MEDMARK_SECRET_FILE), never the command line (W&B records the command line).
TINY_WANDB = [o for o in TINY_STEALTHMARK if not o.startswith(("trainer.", "data.synthetic.num_images", "logger=",
                                                               "method.payload", "method.trigger.seed"))] + [
    "data.synthetic.num_images=48", "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1",
    "callbacks.watermark_check.num_images=4", "logger=wandb",
]


def wandb_env(base: Path) -> dict[str, str]:
    """Offline W&B with every folder it writes under ``base`` (no credentials, no prompt)."""
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_API_KEY": "", "HOME": str(base),
            "WANDB_DIR": str(base / "wandb_dir"), "WANDB_DATA_DIR": str(base / "wandb_data"),
            "WANDB_CACHE_DIR": str(base / "wandb_cache"), "WANDB_CONFIG_DIR": str(base / "wandb_config"),
            "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}


def wandb_files(*folders: Path) -> list[Path]:
    """Every file W&B wrote under ``folders`` (offline runs, staged artifact copies, caches)."""
    return [p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file()]


def staged_sha256(base: Path) -> set[str]:
    """SHA-256 of each file staged for upload as an artifact (offline: copies in the data dir)."""
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in wandb_files(base / "wandb_data" / "artifacts")}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_log(folder: Path) -> bytes:
    """The bytes of the offline run log(s) under ``folder`` (config, summary, artifact manifests)."""
    logs = sorted(folder.rglob("offline-run-*/run-*.wandb"))
    assert logs, f"no offline W&B run under {folder}"
    return b"".join(p.read_bytes() for p in logs)


def assert_no_secret(files: list[Path], kit: Path) -> None:
    """No secret value of the kit (payload, trigger seed, private key, salt, drawn secrets) in ``files``,
    and no file whose bytes are a secret file's."""
    secret = json.loads((kit / "secret.json").read_text())
    assert secret["key"]["payload"] == PAYLOAD and secret["key"]["trigger"]["seed"] == TRIGGER_SEED
    needles = [PAYLOAD.encode(), str(TRIGGER_SEED).encode()]
    for name in ("owner_private_key.pem", "redaction_salt.hex"):
        body = (kit / name).read_bytes()
        needles.append(body.strip().splitlines()[1] if name.endswith(".pem") else body.strip())
    secret_hashes = {sha256(kit / name) for name in SECRET_FILES if (kit / name).is_file()}
    assert files
    for path in files:
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() not in secret_hashes, path
        for needle in needles:
            assert needle not in data, (path, needle[:8])


@pytest.mark.slow
def test_offline_stealthmark_story_has_checkpoint_kit_and_report_artifacts_and_no_secret(tmp_path):
    secret_file = tmp_path / "secret.yaml"
    secret_file.write_text(f"method: {{payload: {PAYLOAD}, trigger: {{seed: {TRIGGER_SEED}}}}}\n")
    secret_file.chmod(0o600)
    env = {**wandb_env(tmp_path), "MEDMARK_SECRET_FILE": str(secret_file)}
    run_dir = tmp_path / "run"
    train = [sys.executable, str(ROOT / "train.py"), *TINY_WANDB, "callbacks.wandb_artifacts.log_checkpoint=true",
             f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kit, summary = run_dir / "owner", read_summary(run_dir)
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    record = json.loads((kit / "wandb_run.json").read_text())
    assert record["run_id"] == run_id and record["owner_kit_artifact"] == f"owner-kit-{run_id}"
    train_log = run_log(run_dir)
    assert f"model-{run_id}".encode() in train_log and f"owner-kit-{run_id}".encode() in train_log
    assert b"<secret hmac-sha256:" in train_log  # the logged training config carries the salted marker

    out = tmp_path / "report"
    verify = [sys.executable, str(ROOT / "verify.py"), f"secret={kit / 'secret.json'}",
              f"suspect={summary['best_checkpoint']}", f"out={out}", "logger=wandb",
              f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}",
              "verify.num_images=4", "verify.qr_evidence=readout", "verify.null_k=99", "verify.num_figures=1",
              "suspect_factories=[models.,test_stealthmark.]"]
    proc = subprocess.run(verify, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-3000:]
    verify_log = run_log(out)
    assert b"verification-report" in verify_log and f"verification-{run_id}".encode() in verify_log
    assert b'"job_type"' in verify_log or b"verify" in verify_log
    assert run_id.encode() in verify_log  # lineage: the training run is named in the verify run's config

    staged = staged_sha256(tmp_path)
    assert sha256(Path(summary["best_checkpoint"])) in staged          # checkpoint (opt-in)
    assert sha256(kit / "certificate.json") in staged                  # certificate
    assert sha256(kit / "owner_public_key.pem") in staged              # public key
    assert b"report.json" in verify_log and b"report.html" in verify_log  # report, in the artifact's manifest
    staged_texts = [p.read_bytes() for p in wandb_files(tmp_path / "wandb_data" / "artifacts")]
    assert any(b'"secret_sha256"' in data for data in staged_texts)   # report.json
    assert any(data.lstrip().lower().startswith(b"<!doctype html") for data in staged_texts)  # report.html
    # StealthMark's figures draw the decoded payload: they stay in the owner's report folder only
    figures = list((out / "figures").glob("*.png"))
    assert figures and not any(sha256(p) in staged for p in figures)
    assert_no_secret(wandb_files(run_dir / "wandb", out / "wandb", tmp_path / "wandb_data", tmp_path / "wandb_dir",
                                 tmp_path / "wandb_cache"), kit)


def _fake_trainer(logger, checkpoint: Path):
    callback = SimpleNamespace(best_model_path=str(checkpoint), best_model_score=None, monitor="val/x",
                               dirpath=str(checkpoint.parent))
    return SimpleNamespace(loggers=[logger], is_global_zero=True, checkpoint_callback=callback, current_epoch=0,
                           global_step=1)


@pytest.mark.parametrize("log_checkpoint", [False, True])
def test_checkpoint_is_uploaded_only_when_opted_in_and_kit_by_allow_list(tmp_path, monkeypatch, log_checkpoint):
    from lightning.pytorch.loggers import WandbLogger

    from callbacks.wandb_artifacts import WandbArtifacts

    for key, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    (run_dir / "owner").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    checkpoint = run_dir / "checkpoints" / "best-epoch000.ckpt"
    checkpoint.write_bytes(b"weights " * 64)
    (run_dir / "owner" / "certificate.json").write_text('{"signed": "claim"}\n')
    (run_dir / "owner" / "owner_public_key.pem").write_text("PUBLIC KEY\n")
    (run_dir / "owner" / "secret.json").write_text(json.dumps({"payload": PAYLOAD}))  # not in the allow-list
    logger = WandbLogger(save_dir=str(run_dir), project="medmark", offline=True)
    callback = WandbArtifacts(str(run_dir), ["owner/certificate.json", "owner/owner_public_key.pem",
                                             "owner/wandb_run.json", "release.json"], log_checkpoint=log_checkpoint)
    trainer = _fake_trainer(logger, checkpoint)
    callback.teardown(trainer, None, "fit")  # a fit that did not end: nothing
    assert not (run_dir / "owner" / "wandb_run.json").exists()
    callback.on_fit_end(trainer, None)
    callback.teardown(trainer, None, "fit")
    run_id = logger.experiment.id
    logger.experiment.finish()
    wandb.teardown()  # the W&B service writes the run log asynchronously: stop it so the files are complete

    staged, log = staged_sha256(tmp_path), run_log(run_dir)
    assert (sha256(checkpoint) in staged) is log_checkpoint and (b".ckpt" in log) is log_checkpoint
    assert (f"model-{run_id}".encode() in log) is log_checkpoint
    assert sha256(run_dir / "owner" / "certificate.json") in staged and f"owner-kit-{run_id}".encode() in log
    assert json.loads((run_dir / "owner" / "wandb_run.json").read_text())["run_id"] == run_id
    assert sha256(run_dir / "owner" / "secret.json") not in staged and b"secret.json" not in log
    assert all(PAYLOAD.encode() not in p.read_bytes() for p in wandb_files(run_dir / "wandb", tmp_path / "wandb_data"))


@pytest.mark.parametrize("name", ["owner/secret.json", "owner/drawn_secrets.json", "owner/redaction_salt.hex",
                                  "owner/owner_private_key.pem", "owner/master_key.hex", "owner/generator.pt",
                                  "checkpoints/last.ckpt", "../other/certificate.json"])
def test_a_secret_file_in_the_allow_list_is_refused_naming_the_field(tmp_path, name):
    from callbacks.wandb_artifacts import WandbArtifacts

    with pytest.raises(ValueError, match="callbacks.wandb_artifacts.public_files"):
        WandbArtifacts(str(tmp_path), ["owner/certificate.json", name], log_checkpoint=False)


def test_verify_report_and_config_sent_to_wandb_are_redacted(tmp_path, monkeypatch):
    """A verified StealthMark report holds the decoded payload: the copies in W&B say [redacted], and
    a config value holding a secret becomes the salted marker config.yaml uses."""
    from utils.loggers import start_wandb_run
    from utils.run import secret_digest
    from verification.wandb_report import log_verification

    for key, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    kit, out = tmp_path / "run" / "owner", tmp_path / "report"
    kit.mkdir(parents=True)
    (out / "figures").mkdir(parents=True)
    salt = bytes(range(32))
    (kit / "redaction_salt.hex").write_text(salt.hex() + "\n")
    (kit / "secret.json").write_text(json.dumps({"method": "stealthmark", "key": {
        "payload": PAYLOAD, "trigger": {"kind": "patch", "seed": TRIGGER_SEED}}}))
    (kit / "wandb_run.json").write_text(json.dumps({"run_id": "train123", "project": "medmark",
                                                    "owner_kit_artifact": "owner-kit-train123"}))
    report = {"method": "stealthmark", "verified": True, "p_value": 1e-4, "qr_p_value": 1e-3,
              "decoded": [{"id": "img0", "text": PAYLOAD, "matches": True}]}
    (out / "report.json").write_text(json.dumps(report))
    (out / "report.md").write_text(f"| img0 | {PAYLOAD} | True |\n")
    (out / "report.html").write_text("<p>[redacted]</p>")
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(out / "figures" / "image00_img0.png")  # draws the payload
    cfg = OmegaConf.create({"secret": str(kit / "secret.json"), "out": str(out), "note": f"about {PAYLOAD}",
                            "seed_again": TRIGGER_SEED, "logger": {"wandb": {
                                "_target_": "utils.loggers.build_wandb_logger", "save_dir": str(out),
                                "project": "medmark", "name": "verify", "offline": True, "log_model": False}}})
    run_id = log_verification(cfg, 0, start_wandb_run)
    assert run_id is not None
    wandb.teardown()  # the W&B service writes the run log asynchronously: stop it so the files are complete
    log = run_log(out)
    assert secret_digest(PAYLOAD, salt).encode() in log and secret_digest(TRIGGER_SEED, salt).encode() in log
    assert b"verification-train123" in log and b"train123" in log and b"VERIFIED" in log
    staged = [p.read_bytes() for p in wandb_files(tmp_path / "wandb_data" / "artifacts")]
    assert any(b'"text": "[redacted]"' in data for data in staged)  # report.json, redacted copy
    assert any(b"| img0 | [redacted] |" in data for data in staged)   # report.md
    assert any(b"<html" in data.lower() for data in staged)           # report.html, rendered again
    assert sha256(out / "figures" / "image00_img0.png") not in staged_sha256(tmp_path)  # StealthMark: no figure
    for path in wandb_files(out / "wandb", tmp_path / "wandb_data"):
        assert PAYLOAD.encode() not in path.read_bytes(), path
        assert str(TRIGGER_SEED).encode() not in path.read_bytes(), path
    assert json.loads((out / "report.json").read_text())["decoded"][0]["text"] == PAYLOAD  # the owner's copy stays


def test_run_id_is_kept_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    from utils.loggers import WANDB_RUN_ID_FILE, keep_wandb_run_id

    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # no W&B run: nothing kept
    assert keep_wandb_run_id(OmegaConf.create({"id": None}), tmp_path / "off", ckpt_path=None) is None
    assert not (tmp_path / "off").exists()
    monkeypatch.setenv("WANDB_MODE", "offline")
    first = OmegaConf.create({"project": "medmark", "id": None})
    run_id = keep_wandb_run_id(first, tmp_path / "a", ckpt_path=None)
    assert first.id == run_id and "resume" not in first
    assert (tmp_path / "a" / WANDB_RUN_ID_FILE).read_text().strip() == run_id
    # a resume into a new run folder: the id of the checkpoint's run folder, resume=allow, recorded here too
    resumed = OmegaConf.create({"project": "medmark", "id": None})
    again = keep_wandb_run_id(resumed, tmp_path / "b", ckpt_path=str(tmp_path / "a" / "checkpoints" / "last.ckpt"))
    assert again == run_id and resumed.resume == "allow"
    assert (tmp_path / "b" / WANDB_RUN_ID_FILE).read_text().strip() == run_id
    # a new run (no ckpt_path) never continues an old one
    fresh = OmegaConf.create({"project": "medmark", "id": None})
    assert keep_wandb_run_id(fresh, tmp_path / "a", ckpt_path=None) != run_id and "resume" not in fresh
    # a sweep agent's id wins; other ranks write nothing
    monkeypatch.setenv("WANDB_RUN_ID", "agent42")
    swept = OmegaConf.create({"project": "medmark", "id": None})
    assert keep_wandb_run_id(swept, tmp_path / "c", ckpt_path=None, write=False) == "agent42"
    assert not (tmp_path / "c").exists()


def test_without_a_live_wandb_run_the_callback_writes_and_logs_nothing(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from callbacks.wandb_artifacts import WandbArtifacts

    monkeypatch.setenv("WANDB_MODE", "disabled")  # logger=wandb with W&B switched off (the tests' default)
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "certificate.json").write_text("{}\n")
    checkpoint = tmp_path / "best.ckpt"
    checkpoint.write_bytes(b"w")
    callback = WandbArtifacts(str(tmp_path), ["owner/certificate.json", "owner/wandb_run.json"], log_checkpoint=True)
    for logger in (WandbLogger(save_dir=str(tmp_path), project="medmark"), CSVLogger(save_dir=str(tmp_path))):
        trainer = _fake_trainer(logger, checkpoint)
        callback.on_fit_end(trainer, None)
        callback.teardown(trainer, None, "fit")
    assert not (tmp_path / "owner" / "wandb_run.json").exists() and not (tmp_path / "wandb").exists()


def test_short_secret_values_are_not_matched_by_value():
    """A seed of 1 matched by value would turn every innocent 1 of the config into the marker -- and
    so tell where the secret's value stands; only long values are matched."""
    from verification.wandb_report import kit_secret_values, redact_tree

    doc = {"method": "stealthmark", "key": {"payload": PAYLOAD, "trigger": {"seed": 1}}}
    assert kit_secret_values(doc) == [PAYLOAD]
    doc["key"]["trigger"]["seed"] = TRIGGER_SEED
    redacted = redact_tree({"num_figures": 1, "seed": TRIGGER_SEED, "note": f"x{PAYLOAD}"}, kit_secret_values(doc), None)
    assert redacted == {"num_figures": 1, "seed": "<secret>", "note": "<secret>"}
