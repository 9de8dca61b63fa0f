"""Loss-weight schedules by term name, so objectives need no schedule code.

Config example (``callbacks.loss_schedule.schedules``)::

    lpips: {start: 0.0, end: 1.0, ramp_epochs: 5}      # linear ramp over epochs 0..5
    guard: {start: 0.0, end: 0.5, ramp_steps: 200, delay_steps: 100}
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer


class LossWeightSchedule(Callback):
    """Sets ``pl_module.loss_terms[name].weight`` before each training batch.

    Each schedule: ``start``, ``end`` and either ``ramp_epochs`` (with optional
    ``delay_epochs``) or ``ramp_steps`` (with optional ``delay_steps``); linear in between,
    ``end`` afterwards. The current weights are logged as ``weights/<name>``.
    """

    def __init__(self, schedules: dict[str, dict] | None = None):
        self.schedules = dict(schedules or {})

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        unknown = set(self.schedules) - set(pl_module.loss_terms)
        if unknown:
            raise ValueError(f"loss schedule for unknown term(s) {sorted(unknown)}; terms: {sorted(pl_module.loss_terms)}")

    @staticmethod
    def weight_at(spec: dict, epoch: float, step: int) -> float:
        start, end = float(spec.get("start", 0.0)), float(spec["end"])
        if "ramp_steps" in spec:
            t = (step - spec.get("delay_steps", 0)) / max(1, spec["ramp_steps"])
        else:
            t = (epoch - spec.get("delay_epochs", 0)) / max(1e-9, spec.get("ramp_epochs", 1))
        t = min(1.0, max(0.0, t))
        return start + (end - start) * t

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        epoch = trainer.current_epoch + batch_idx / max(1, trainer.num_training_batches)
        for name, spec in self.schedules.items():
            weight = self.weight_at(spec, epoch, trainer.global_step)
            pl_module.loss_terms[name].weight = weight
            pl_module.log(f"weights/{name}", weight, on_step=True, on_epoch=False)
