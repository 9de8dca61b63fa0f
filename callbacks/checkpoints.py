"""Checkpointing: the best checkpoint by the validation metric *and* an always-current last.ckpt."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class BestAndLatestCheckpoint(ModelCheckpoint):
    """:class:`ModelCheckpoint` whose ``last.ckpt`` is the latest epoch, not the best one.

    Lightning ≥ 2.5 refreshes ``last.ckpt`` (``save_last=True``) only when a top-k checkpoint is
    written in the same step, so after the best epoch it stops moving: resuming from it would go
    back to the best epoch and lose the epochs after it, and "last" suspects would be the best.
    Here ``last.ckpt`` is written at every checkpointing point as well (one extra file write per
    validation epoch). Same arguments as :class:`ModelCheckpoint`.
    """

    def _refresh_last(self, trainer: Trainer, was_skipped: bool) -> None:
        if self.save_last and not was_skipped and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        skipped = self._should_skip_saving_checkpoint(trainer) or not self._should_save_on_train_epoch_end(trainer)
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer, skipped)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        skipped = self._should_skip_saving_checkpoint(trainer) or self._should_save_on_train_epoch_end(trainer)
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer, skipped)
