"""Composable loss terms (see :mod:`losses.base`).

By concept: :mod:`losses.task` (cross-entropy, BCE, Dice), :mod:`losses.perceptual` (LPIPS),
:mod:`losses.laplacian` (frequency penalty on δ), :mod:`losses.uncertainty` (StealthMark),
:mod:`losses.xmark` (X-Mark's targeted/suppression terms), :mod:`losses.adversarial` (MedLocker).
"""

from losses.base import LossTerm
from losses.laplacian import LaplacianPenaltyTerm
from losses.perceptual import LPIPSTerm
from losses.task import BCETerm, CrossEntropyTerm, DiceTerm, soft_dice

__all__ = ["BCETerm", "CrossEntropyTerm", "DiceTerm", "LPIPSTerm", "LaplacianPenaltyTerm", "LossTerm", "soft_dice"]
