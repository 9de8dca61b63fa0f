"""StealthMark callbacks: a quick watermark check per validation epoch, and the owner kit.

* :class:`WatermarkCheck` -- on the first ``num_images`` validation images: the trigger
  response (paired test, as ``log10`` p-value) and the per-cell readout decoded with
  function-pattern repair, on triggered and on clean copies; optionally LIME on a few
  images. Logs rates and p-values only -- never the decoded text (it is the payload).
* :class:`OwnerKitExport` -- at the end of fitting (global rank zero only): writes
  ``owner/secret.json`` (0o600) and the signed ``owner/certificate.json``
  (:mod:`watermark.stealthmark.kit`), creating the owner's Ed25519 key pair on first use.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from omegaconf import DictConfig

from lightning_modules.base import to_plain
from models.safe_reader import read_checkpoint
from watermark import certificates
from watermark.stealthmark import explain
from watermark.stealthmark.kit import (
    build_model_certificate,
    build_secret,
    sample_list_sha256,
    weights_sha256,
    write_certificate,
    write_secret,
)
from watermark.kit_io import file_sha256
from watermark.stealthmark.qr import bit_accuracy, decode_with_repair
from watermark.stats import paired_margin_test
from watermark.stealthmark.evidence import quiet_lime, readout

log = logging.getLogger("medmark")



class WatermarkCheck(Callback):
    """Quick StealthMark check each ``every_n_epochs`` validation epochs.

    Args:
        every_n_epochs: run every n-th validation epoch.
        num_images: validation images used (the first ones served); ≥ 2 for the paired test.
        response_margin: τ of the paired trigger-response test.
        lime_images: also explain this many images with LIME (0 = readout only: LIME costs
            ``lime_samples`` model queries per image).
        lime_samples, lime_batch_size: LIME samples per image (≥ 3·G² joint, ≥ 100
            per-cell) and query batch size.
        lime_target, lime_surrogate: what LIME explains and with which local model, as
            ``verify.lime_target`` / ``verify.lime_surrogate``.

    Logged (``val/wm_*``): ``readout_decoded`` and ``readout_decoded_clean`` (share of images
    whose readout decodes to the payload, triggered / clean), ``readout_bit_accuracy``,
    ``response_log10p``, and with LIME ``lime_decoded``, ``lime_bit_accuracy``.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8, response_margin: float = 0.01,
                 lime_images: int = 0, lime_samples: int = 1400, lime_batch_size: int = 250,
                 lime_target: str = "triggered", lime_surrogate: str = "per_cell"):
        if num_images < 2:
            raise ValueError(f"callbacks.watermark_check.num_images must be >= 2, got {num_images}")
        self.every_n_epochs = int(every_n_epochs)
        self.num_images = int(num_images)
        self.response_margin = float(response_margin)
        self.lime_images = int(lime_images)
        self.lime_samples = int(lime_samples)
        self.lime_batch_size = int(lime_batch_size)
        if lime_target not in explain.LIME_TARGETS:
            raise ValueError(f"callbacks.watermark_check.lime_target must be one of {explain.LIME_TARGETS}, "
                             f"got {lime_target!r}")
        self.lime_target = str(lime_target)
        if lime_surrogate not in explain.LIME_SURROGATES:
            raise ValueError(f"callbacks.watermark_check.lime_surrogate must be one of {explain.LIME_SURROGATES}, "
                             f"got {lime_surrogate!r}")
        self.lime_surrogate = str(lime_surrogate)
        self._images: list[torch.Tensor] = []

    def _due(self, trainer: Trainer) -> bool:
        return not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._images = []

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        have = sum(len(x) for x in self._images)
        if self._due(trainer) and have < self.num_images:
            self._images.append(batch["image"][: self.num_images - have].detach())

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        key = getattr(pl_module, "key", None)
        if key is None or not self._due(trainer) or not self._images:
            return
        images = torch.cat(self._images)[: self.num_images]
        self._images = []
        if len(images) < 2:
            return
        trigger = key.build_trigger()

        def predict(x: torch.Tensor) -> torch.Tensor:
            return pl_module.predict_probs(x.to(pl_module.device)).float().cpu()

        probs_clean = predict(images)
        probs_trig = predict(trigger.apply(images))
        p = paired_margin_test(explain.uncertainty_score(probs_clean).numpy(),
                               explain.uncertainty_score(probs_trig).numpy(), margin=self.response_margin)
        read_trig, read_clean = readout(probs_trig, key), readout(probs_clean, key)
        values = {
            "val/wm_readout_decoded": sum(r["text"] == key.payload for r in read_trig) / len(read_trig),
            "val/wm_readout_decoded_clean": sum(r["text"] == key.payload for r in read_clean) / len(read_clean),
            "val/wm_readout_bit_accuracy": sum(r["bit_accuracy"] for r in read_trig) / len(read_trig),
            "val/wm_response_log10p": math.log10(max(p, 1e-300)),
        }
        if self.lime_images > 0:
            spec, reference = key.spec(), key.modules()
            hits, bits = 0, 0.0
            n = min(self.lime_images, len(images))
            with quiet_lime():
                for i in range(n):
                    w = explain.lime_cell_weights(predict, images[i].cpu().permute(1, 2, 0).numpy(), spec,
                                                  trigger=trigger, num_samples=self.lime_samples,
                                                  batch_size=self.lime_batch_size, hide_value=key.hide_value, seed=i,
                                                  target=self.lime_target, surrogate=self.lime_surrogate)
                    grid = explain.weights_to_grid(w)
                    hits += decode_with_repair(grid, key.qr_version, key.error_correction) == key.payload
                    bits += bit_accuracy(grid, reference)
            values["val/wm_lime_decoded"] = hits / n
            values["val/wm_lime_bit_accuracy"] = bits / n
        # Each rank checks its own first images; the logged value is their mean.
        pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=True)


class OwnerKitExport(Callback):
    """Write the owner kit at the end of fitting (global rank zero only).

    Args:
        output_dir: the kit folder (``<run>/owner``).
        owner_id: who claims the model (certificate field).
        data: the run's data config (``_target_`` + arguments); verification rebuilds the
            verification images from it.
        verification_split: split whose ids become the verification images (default ``test``:
            never trained on, never used for checkpoint selection).
        num_verification_images: keep the first n ids of that split; null = all.
        thresholds: pre-registered test thresholds ``alpha``, ``response_margin``, ``min_decoded``.
        private_key: PEM file of the owner's Ed25519 key; null = ``<output_dir>/owner_private_key.pem``,
            created (0o600) with its public key on first use and reused afterwards.
    """

    def __init__(self, output_dir: str, owner_id: str, data: dict | DictConfig, thresholds: dict | DictConfig,
                 verification_split: str = "test", num_verification_images: int | None = None,
                 private_key: str | None = None):
        self.output_dir = Path(output_dir)
        self.owner_id = str(owner_id)
        self.data = to_plain(data)
        self.thresholds = to_plain(thresholds)
        self.verification_split = verification_split
        self.num_verification_images = num_verification_images
        self.private_key = private_key

    def _owner_keys(self) -> tuple[Any, Path]:
        """The owner's private key (loaded or created) and the path of its public key."""
        key, _private_path, public_path = certificates.owner_signing_key(
            self.output_dir, self.private_key, field="callbacks.owner_kit.private_key")
        return key, public_path

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        key = getattr(pl_module, "key", None)
        if key is None:
            raise RuntimeError("OwnerKitExport needs a StealthMarkModule with a key (method=stealthmark)")
        datamodule = trainer.datamodule
        if datamodule is None or not getattr(datamodule, "splits", None):
            raise RuntimeError("OwnerKitExport needs the run's data module (its splits name the verification images)")
        if self.verification_split not in datamodule.splits:
            raise ValueError(f"callbacks.owner_kit.verification_split={self.verification_split!r} is not a split "
                             f"({sorted(datamodule.splits)})")
        ids = [s.id for s in datamodule.splits[self.verification_split]]
        if self.num_verification_images is not None:
            ids = ids[: int(self.num_verification_images)]

        checkpoint = trainer.checkpoint_callback
        best = (checkpoint.best_model_path or None) if checkpoint else None
        last = Path(checkpoint.dirpath) / "last.ckpt" if checkpoint and checkpoint.dirpath else None
        last = str(last) if last is not None and last.is_file() else None
        doc = build_secret(key, ids, self.verification_split, self.data, self.thresholds,
                           checkpoint=best, last_checkpoint=last)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_secret(self.output_dir / "secret.json", doc)

        model_path = best or last
        if model_path:
            state = read_checkpoint(model_path)["state_dict"]  # models.safe_reader: weights only, no config built
            weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
            model = {"checkpoint": Path(model_path).name, "checkpoint_sha256": file_sha256(model_path),
                     "weights_sha256": weights_sha256(weights)}
        else:
            model = {"checkpoint": None, "checkpoint_sha256": None,
                     "weights_sha256": weights_sha256(pl_module.model.state_dict())}
        train = datamodule.splits.get("train", [])
        dataset = {"layout": getattr(datamodule, "layout", None), "num_train": len(train),
                   "samples_sha256": sample_list_sha256([(s.id, Path(s.image.path).name) for s in train])}
        private_key, public_path = self._owner_keys()
        cert = build_model_certificate(self.owner_id, doc, key, model, dataset)
        write_certificate(self.output_dir / "certificate.json", cert, private_key)
        log.info("owner kit written to %s (secret.json, certificate.json, %s); key sha256 %s",
                 self.output_dir, public_path.name, key.sha256()[:16])
