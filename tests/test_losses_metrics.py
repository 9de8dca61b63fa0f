"""Loss terms, their composition, schedules and task metrics on known inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from callbacks.schedules import LossWeightSchedule
from lightning_modules.base import build_loss_terms
from lightning_modules.metrics import ClassificationMetrics, SegmentationMetrics, hd95_per_image
from losses import BCETerm, CrossEntropyTerm, DiceTerm


def test_dice_term_is_zero_for_perfect_and_large_for_inverted_predictions():
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    perfect = {"logits": (mask * 2 - 1) * 20}
    inverted = {"logits": (1 - 2 * mask) * 20}
    term = DiceTerm()
    assert term(perfect, {"mask": mask}).item() < 0.05
    assert term(inverted, {"mask": mask}).item() > 0.9


def test_bce_term_accepts_soft_targets_and_minimum_is_at_target():
    target = torch.full((1, 1, 4, 4), 0.3)
    term = BCETerm(target_key="soft")
    at_target = term({"logits": torch.logit(target)}, {"soft": target})
    elsewhere = term({"logits": torch.zeros_like(target)}, {"soft": target})
    assert at_target < elsewhere


def test_cross_entropy_term_label_smoothing_changes_value():
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])
    batch = {"label": torch.tensor([0, 1])}
    plain = CrossEntropyTerm()({"logits": logits}, batch)
    smooth = CrossEntropyTerm(label_smoothing=0.2)({"logits": logits}, batch)
    assert smooth > plain


def test_build_loss_terms_from_config_drops_null_and_rejects_non_terms():
    terms = build_loss_terms({"bce": {"_target_": "losses.BCETerm", "weight": 0.5}, "dice": None})
    assert list(terms) == ["bce"] and terms["bce"].weight == 0.5
    with pytest.raises(TypeError, match="loss.bad"):
        build_loss_terms({"bad": {"_target_": "torch.nn.Identity"}})
    with pytest.raises(ValueError, match="no loss terms"):
        build_loss_terms({})


def test_hd95_known_distance_and_edge_cases():
    target = np.zeros((32, 32), bool)
    target[8:16, 8:16] = True
    shifted = np.roll(target, 4, axis=1)
    assert hd95_per_image(target, target) == 0.0
    assert hd95_per_image(shifted, target) == pytest.approx(4.0, abs=0.01)
    assert hd95_per_image(target, np.zeros_like(target)) is None  # undefined: excluded
    assert hd95_per_image(np.zeros_like(target), target) == pytest.approx(math.hypot(32, 32))


def test_segmentation_metrics_perfect_vs_half_overlap():
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1
    perfect = SegmentationMetrics("val/")
    perfect.update(mask.clone(), mask)
    out = perfect.compute()
    assert out["val/dice"] == pytest.approx(1.0) and out["val/iou"] == pytest.approx(1.0)
    half = SegmentationMetrics("val/")
    pred = torch.zeros_like(mask)
    pred[:, :, 4:12, 4:8] = 1  # half of the object, nothing else
    half.update(pred, mask)
    out = half.compute()
    assert out["val/dice"] == pytest.approx(2 * 32 / (32 + 64), abs=1e-4)
    assert out["val/iou"] == pytest.approx(0.5, abs=1e-4)
    assert out["val/hd95"] > 0


def test_classification_balanced_accuracy_differs_from_accuracy_on_imbalance():
    labels = torch.tensor([0] * 8 + [1] * 2)
    probs = torch.zeros(10, 2)
    probs[:, 0] = 1.0  # always predicts the majority class
    metrics = ClassificationMetrics("val/", 2)
    metrics.update(probs, labels)
    out = metrics.compute()
    assert out["val/accuracy"] == pytest.approx(0.8)
    assert out["val/balanced_accuracy"] == pytest.approx(0.5)


def test_loss_weight_schedule_ramps_linearly_then_holds():
    spec = {"start": 0.0, "end": 1.0, "ramp_steps": 10, "delay_steps": 5}
    assert LossWeightSchedule.weight_at(spec, 0, 0) == 0.0
    assert LossWeightSchedule.weight_at(spec, 0, 10) == pytest.approx(0.5)
    assert LossWeightSchedule.weight_at(spec, 0, 100) == 1.0
    by_epoch = {"start": 1.0, "end": 0.0, "ramp_epochs": 4}
    assert LossWeightSchedule.weight_at(by_epoch, 2.0, 0) == pytest.approx(0.5)
