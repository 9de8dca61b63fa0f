"""Validation image panels: image | ground truth | prediction, each epoch.

Saved as PNG under ``<output_dir>/figures/`` (always: a run folder should show what the
model does without a logger) and sent to W&B when the run logs there.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402


def _show(ax, image: torch.Tensor, title: str, cmap: str | None = None) -> None:
    array = image.float().clamp(0, 1)
    array = array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)
    ax.imshow(array.numpy(), cmap=cmap or ("gray" if array.ndim == 2 else None), vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def save_and_log_figure(trainer: Trainer, fig, path: Path, key: str, dpi: int) -> None:
    """Save ``fig`` as PNG at ``path`` (folders created), close it, and send the file to W&B under ``key``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)


def render_panel(panel: dict, task: str, class_names: list[str] | None = None):
    """A matplotlib figure of the module's ``panel`` dict (see TaskModule)."""
    images = panel["image"]
    n = len(images)
    if task == "segmentation":
        fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
        for i in range(n):
            _show(axes[i, 0], images[i], str(panel["id"][i])[:24])
            _show(axes[i, 1], panel["target"][i], "mask", "gray")
            _show(axes[i, 2], panel["probs"][i], "prediction p", "magma")
    else:
        fig, axes = plt.subplots(1, n, figsize=(2 * n, 2.4), squeeze=False)
        for i in range(n):
            probs = panel["probs"][i]
            pred = int(probs.argmax())
            label = int(panel["target"][i])
            name = (lambda k: class_names[k] if class_names else str(k))
            _show(axes[0, i], images[i], f"y={name(label)}\npred={name(pred)} ({float(probs[pred]):.2f})")
    fig.tight_layout()
    return fig


class ValidationPanels(Callback):
    """Args: ``output_dir`` (run folder), ``every_n_epochs``."""

    def __init__(self, output_dir: str, every_n_epochs: int = 1):
        self.output_dir = Path(output_dir)
        self.every_n_epochs = every_n_epochs

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        panel = getattr(pl_module, "panel", None)
        if panel is None or trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        classes = getattr(trainer.datamodule, "classes", None) if trainer.datamodule else None
        fig = render_panel(panel, pl_module.task, classes)
        path = self.output_dir / "figures" / f"val_panel_epoch{trainer.current_epoch:03d}.png"
        save_and_log_figure(trainer, fig, path, "val/panel", dpi=80)
