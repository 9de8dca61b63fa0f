"""Composable loss terms (see :mod:`losses.base`)."""

from losses.base import LossTerm
from losses.task import BCETerm, CrossEntropyTerm, DiceTerm, soft_dice

__all__ = ["BCETerm", "CrossEntropyTerm", "DiceTerm", "LossTerm", "soft_dice"]
