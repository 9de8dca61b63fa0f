"""W&B artifacts of a training run: the best checkpoint (opt-in) and the public owner kit.

:class:`WandbArtifacts` acts only when the run logs to W&B (``logger=wandb``; with any other logger it
does nothing). When ``fit`` ends (and again after ``test``, when MedLocker's export has written its
certificates) it logs, from global rank zero:

* ``model-<run id>`` (type ``model``, aliases ``best``/``latest``): the best checkpoint, only with
  ``log_checkpoint=true`` (a checkpoint can be large; it carries no secret value);
* ``owner-kit-<run id>`` (type ``owner-kit``): the files of ``public_files`` that exist -- an explicit
  allow-list of the kit's PUBLIC files (certificate, public key, X-Mark's ``release.json``, MedLocker's
  ``certificates.json``), plus ``owner/wandb_run.json`` written here: this run's W&B id, project and
  artifact names, which ``verify.py logger=wandb`` reads to link its report to this run.

Secret files (:data:`SECRET_FILE_NAMES`: ``secret.json``, ``drawn_secrets.json``, ``redaction_salt.hex``,
private keys, ``master_key.hex``, X-Mark's ``generator.pt``) and checkpoints are refused in
``public_files`` (constructor error naming the field): nothing but the allow-list is read.
Offline (no credentials) the artifacts are staged in the offline run and uploaded by ``wandb sync``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger("medmark")

#: File names that hold secrets in an owner kit (never uploaded, refused in ``public_files``).
SECRET_FILE_NAMES = frozenset({"secret.json", "drawn_secrets.json", "redaction_salt.hex", "owner_private_key.pem",
                               "private_key.pem", "master_key.hex", "generator.pt"})
#: Written into the kit by this callback: the training run's W&B identity (public).
RUN_RECORD_FILE = "owner/wandb_run.json"
OWNER_KIT_TYPE = "owner-kit"
MODEL_TYPE = "model"


def wandb_run_of(trainer: Trainer) -> Any | None:
    """The ``wandb`` run of the trainer's :class:`WandbLogger` (None: no W&B logger, not rank zero, or
    W&B disabled -- ``WANDB_MODE=disabled``, as in tests)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            run = logger.experiment
            return None if getattr(run, "disabled", False) else run
    return None


def owner_kit_artifact_name(run_id: str) -> str:
    return f"owner-kit-{run_id}"


def model_artifact_name(run_id: str) -> str:
    return f"model-{run_id}"


class WandbArtifacts(Callback):
    """Log the best checkpoint (opt-in) and the public owner kit as W&B artifacts.

    Args:
        output_dir: the run folder; ``public_files`` are relative to it.
        public_files: allow-list of public kit files (relative paths); missing ones are skipped.
        log_checkpoint: also log the best checkpoint (``last.ckpt`` when no best is known).

    Raises:
        ValueError: a ``public_files`` entry naming a secret file, a checkpoint, or leaving the run folder.
    """

    def __init__(self, output_dir: str, public_files: list[str], log_checkpoint: bool):
        self.output_dir = Path(output_dir)
        self.public_files = [str(name) for name in public_files]
        for name in self.public_files:
            path = Path(name)
            if path.name in SECRET_FILE_NAMES or path.suffix == ".ckpt" or path.is_absolute() or ".." in path.parts:
                raise ValueError(f"callbacks.wandb_artifacts.public_files: {name!r} is not a public kit file "
                                 f"(secret files {sorted(SECRET_FILE_NAMES)} and checkpoints are never uploaded; "
                                 "paths are relative to the run folder)")
        self.log_checkpoint = bool(log_checkpoint)
        self._fit_ended = False
        self._logged_kit: dict[str, int] = {}  # relative path -> size of what was logged (skip unchanged kits)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_ended = True  # teardown follows every other callback's on_fit_end (the kit is written then)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in ("fit", "test") or (stage == "fit" and not self._fit_ended):
            return
        run = wandb_run_of(trainer)
        if run is None:
            return
        if stage == "fit" and self.log_checkpoint:
            self._log_checkpoint(run, trainer)
        self._log_public_kit(run)

    def _log_checkpoint(self, run: Any, trainer: Trainer) -> None:
        import wandb

        checkpoint = trainer.checkpoint_callback
        best = Path(checkpoint.best_model_path) if checkpoint and checkpoint.best_model_path else None
        if best is None and checkpoint is not None and checkpoint.dirpath:
            best = Path(checkpoint.dirpath) / "last.ckpt"
        if best is None or not best.is_file():
            log.warning("W&B: no checkpoint file to log (callbacks.wandb_artifacts.log_checkpoint=true)")
            return
        score = checkpoint.best_model_score
        artifact = wandb.Artifact(model_artifact_name(run.id), type=MODEL_TYPE, metadata={
            "monitor": checkpoint.monitor, "score": float(score) if score is not None else None,
            "epoch": trainer.current_epoch, "global_step": trainer.global_step, "file": best.name})
        artifact.add_file(str(best), name=best.name)
        run.log_artifact(artifact, aliases=["best", "latest"])
        log.info("W&B: checkpoint %s logged as artifact %s", best.name, artifact.name)

    def _write_run_record(self, run: Any) -> None:
        record = {"run_id": run.id, "project": run.project, "entity": run.entity or None,
                  "owner_kit_artifact": owner_kit_artifact_name(run.id),
                  "model_artifact": model_artifact_name(run.id) if self.log_checkpoint else None}
        path = self.output_dir / RUN_RECORD_FILE
        if path.parent.is_dir():  # only into a kit folder that exists (a plain task run has none)
            path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    def _log_public_kit(self, run: Any) -> None:
        import wandb

        if not any((self.output_dir / name).is_file() for name in self.public_files if name != RUN_RECORD_FILE):
            return  # no owner kit in this run (a plain task run)
        self._write_run_record(run)
        present = {name: (self.output_dir / name).stat().st_size for name in self.public_files
                   if (self.output_dir / name).is_file()}
        if present == self._logged_kit:
            return
        artifact = wandb.Artifact(owner_kit_artifact_name(run.id), type=OWNER_KIT_TYPE,
                                  description="public parts of the owner kit (no secret)",
                                  metadata={"files": sorted(present)})
        for name in sorted(present):
            artifact.add_file(str(self.output_dir / name), name=name)
        run.log_artifact(artifact, aliases=["latest"])
        self._logged_kit = present
        log.info("W&B: owner kit (%s) logged as artifact %s", ", ".join(sorted(present)), artifact.name)
