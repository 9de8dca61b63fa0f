"""One LightningModule per objective; :class:`ObjectiveModule` sums and logs loss terms."""

from lightning_modules.base import ObjectiveModule, build_loss_terms
from lightning_modules.task import TaskModule

__all__ = ["ObjectiveModule", "TaskModule", "build_loss_terms"]
