"""Lightning callbacks: figures, loss-weight schedules, and (per method) watermark checks."""

from callbacks.figures import ValidationPanels, render_panel
from callbacks.schedules import LossWeightSchedule

__all__ = ["LossWeightSchedule", "ValidationPanels", "render_panel"]
