"""Plain segmentation / classification training (``method=task``).

Used for baselines, X-Mark surrogates and suspects, and MedLocker surrogates. Watermark
objectives subclass it so that the task metrics and the ``predict_probs`` interface stay
identical across methods.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.base import ObjectiveModule
from lightning_modules.metrics import build_metrics


class TaskModule(ObjectiveModule):
    """Args: ``task`` (segmentation|classification), ``num_classes`` (classification),
    ``panel_size`` (images kept from the first validation batch for figure callbacks),
    and everything :class:`ObjectiveModule` takes."""

    def __init__(self, task: str, num_classes: int = 1, panel_size: int = 4, **kwargs):
        super().__init__(**kwargs)
        if task not in ("segmentation", "classification"):
            raise ValueError(f"method.task must be segmentation or classification, got {task!r}")
        self.save_hyperparameters({"task": task, "num_classes": num_classes, "panel_size": panel_size})
        self.task = task
        self.num_classes = num_classes
        self.val_metrics = build_metrics(task, "val/", num_classes)
        self.test_metrics = build_metrics(task, "test/", num_classes)
        self.panel: dict[str, torch.Tensor] | None = None

    # -- the model, as a suspect would expose it -----------------------------------------
    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits: segmentation B×1×H×W, classification B×K. ``images`` B×C×H×W in [0,1]."""
        if self.task == "segmentation":
            return self.model(images, boxes)
        return self.model(images)

    def logits_to_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.task == "segmentation" else torch.softmax(logits, dim=1)

    @torch.no_grad()
    def predict_probs(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities: segmentation B×1×H×W in [0,1], classification B×K (rows sum to 1)."""
        return self.logits_to_probs(self(images, boxes).float())

    # -- steps ------------------------------------------------------------------------------
    def model_outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        logits = self(batch["image"], batch.get("box"))
        return {"logits": logits}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.compute_loss(self.model_outputs(batch), batch, "train")

    def _eval_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        outputs = self.model_outputs(batch)
        self.compute_loss(outputs, batch, stage)
        probs = self.logits_to_probs(outputs["logits"].float())
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        target = batch["mask"] if self.task == "segmentation" else batch["label"]
        metrics.update(probs, target)
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=len(probs))
        if stage == "val" and batch_idx == 0:
            n = self.hparams.panel_size
            self.panel = {"image": batch["image"][:n].detach().cpu(), "probs": probs[:n].detach().cpu(),
                          "target": target[:n].detach().cpu(), "id": list(batch["id"][:n])}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")
