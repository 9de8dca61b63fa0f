"""Per-batch wall-clock timing shared by the benchmarks (a Lightning callback)."""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback


def sync(device: torch.device | None) -> None:
    """Wait for queued CUDA work on ``device`` (no-op on the CPU or for ``None``)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(Callback):
    """Start/end ``perf_counter`` of every training (or test) batch, CUDA-synchronised on ``device``.

    Attributes:
        starts, ends: seconds (``time.perf_counter``) per batch, in order.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.starts: list[float] = []
        self.ends: list[float] = []

    @property
    def times(self) -> list[float]:
        """Seconds each finished batch took (forward, backward, optimiser step, ...)."""
        return [e - s for s, e in zip(self.starts, self.ends)]

    def _start(self) -> None:
        sync(self.device)
        self.starts.append(time.perf_counter())

    def _end(self) -> None:
        sync(self.device)
        self.ends.append(time.perf_counter())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end()

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._start()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end()
