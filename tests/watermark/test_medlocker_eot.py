"""Removal-aware δ (watermark/medlocker/removal_eot.py) and the learned remover attack
(watermark/medlocker/learned_remover.py): fast, framework-free checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from watermark.medlocker.footprint_pgd import pgd_on_footprint
from watermark.medlocker.learned_remover import LearnedRemover, RemoverConfig, apply_remover, make_pairs, thief_logos, \
    train_remover
from watermark.medlocker.logo import footprint, render_protected, render_qr_logo
from watermark.medlocker.removal_attacks import inpaint_footprint, jpeg
from watermark.medlocker.removal_eot import check_eot, eot_loss, inpaint_straight_through, input_diversity, \
    jpeg_straight_through, ring_support

REMOVAL = {"median_k": 3, "jpeg_quality": 75, "inpaint_radius": 3}
ZERO = {"median": 0.0, "blur": 0.0, "blur_sigma": 1.0, "jpeg": 0.0, "inpaint": 0.0, "ring_px": 0}
ALL = {"median": 1.0, "blur": 0.5, "blur_sigma": 1.0, "jpeg": 1.0, "inpaint": 1.0, "ring_px": 2}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
                               torch.nn.Flatten(), torch.nn.Linear(128, 5)).eval()


@pytest.fixture(scope="module")
def scene():
    """Two 32 px images with a QR mark at (4, 6); lesion region = a 6x6 block touching the mark's ring."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(0.2, 0.8, size=(2, 3, 32, 32)).astype(np.float32))
    logo = render_qr_logo("owner", 21, error_correction="L")
    mark = footprint(32, 32, logo, 4, 6)
    region = np.zeros((32, 32), bool)
    region[28:32, 10:16] = True  # just below the mark (rows 6..26), its first row inside a 2 px ring
    marks = torch.from_numpy(np.stack([mark, mark]))
    return images, logo, mark, region, marks, torch.tensor([1, 3])


def _ce(model, labels):
    return lambda x: F.cross_entropy(model(x), labels, reduction="none")


def test_eot_with_zero_weights_is_exactly_the_plain_loss_and_pgd(scene):
    images, _, mark, _, marks, labels = scene
    model = _model()
    plain, eot = _ce(model, labels), eot_loss(_ce(model, labels), check_eot(ZERO), REMOVAL, marks)
    assert torch.equal(plain(images), eot(images))
    support = torch.from_numpy(np.stack([mark, mark]))
    d_plain = pgd_on_footprint(plain, images, support, 8 / 255, 5, generator=torch.Generator().manual_seed(3))
    d_eot = pgd_on_footprint(eot, images, support, 8 / 255, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(d_plain, d_eot)
    # a non-zero weight does change the loss (the check above can fail)
    assert not torch.equal(plain(images), eot_loss(plain, check_eot({**ZERO, "jpeg": 1.0}), REMOVAL, marks)(images))


def test_check_eot_refuses_negative_weight_and_fractional_ring():
    with pytest.raises(ValueError, match=r"method\.delta\.eot\.inpaint"):
        check_eot({**ZERO, "inpaint": -1.0})
    with pytest.raises(ValueError, match=r"method\.delta\.eot\.ring_px"):
        check_eot({**ZERO, "ring_px": 1.5})
    with pytest.raises(ValueError, match=r"method\.delta\.eot\.diversity must be a probability"):
        check_eot({**ZERO, "diversity": 1.5})
    with pytest.raises(ValueError, match=r"method\.delta\.eot\.diversity_scale"):
        check_eot({**ZERO, "diversity_scale": 0.0})
    assert check_eot({**ZERO, "diversity": 1.0, "diversity_scale": 1.0})["diversity"] == 1.0  # the closed ends pass
    assert check_eot(ZERO)["diversity"] == 0.0  # a block without the key (a run from before it): off


def test_input_diversity_shrinks_and_pads_back_to_the_same_size_differentiably():
    images = torch.rand(2, 3, 20, 20, requires_grad=True)
    assert input_diversity(images, 1.0, torch.Generator().manual_seed(0)) is images  # scale 1: nothing drawn smaller
    sizes = set()
    for seed in range(40):
        out = input_diversity(images, 0.5, torch.Generator().manual_seed(seed))
        assert out.shape == images.shape
        rows = (out.detach().abs().sum((0, 1, 3)) > 0).sum().item()  # the shrunk copy's height; the rest is padding
        sizes.add(int(rows))
        assert torch.equal(out, input_diversity(images, 0.5, torch.Generator().manual_seed(seed)))  # seeded
    assert min(sizes) >= 10 and max(sizes) <= 20 and len(sizes) > 3  # drawn in [round(0.5 * 20), 20]
    out = input_diversity(images, 0.5, torch.Generator().manual_seed(1))
    out.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_eot_diversity_feeds_the_surrogate_resized_views_with_the_given_probability(scene):
    images, _, _, _, marks, labels = scene
    seen: list[torch.Tensor] = []

    def recording_ce(x):
        seen.append(x.detach())
        return x.flatten(1).mean(1)

    for p, expect_changed in ((0.0, 0), (1.0, 20)):
        seen.clear()
        loss = eot_loss(recording_ce, check_eot({**ZERO, "diversity": p, "diversity_scale": 0.5}), REMOVAL, marks,
                        generator=torch.Generator().manual_seed(2))
        for _ in range(20):
            loss(images)
        changed = sum(not torch.equal(v, images) for v in seen)
        assert len(seen) == 20 and changed in range(expect_changed - 2, expect_changed + 1)  # a draw may keep H
    # a diverse evaluation resizes every view (each its own size); the removal views are still there
    seen.clear()
    eot_loss(recording_ce, check_eot({**ZERO, "jpeg": 1.0, "diversity": 1.0, "diversity_scale": 0.5}), REMOVAL, marks,
             generator=torch.Generator().manual_seed(5))(images)
    assert len(seen) == 2 and all(bool((v == 0).any()) for v in seen)  # zero padding: the inputs never hold a 0
    half = eot_loss(recording_ce, check_eot({**ZERO, "diversity": 0.5}), REMOVAL, marks,
                    generator=torch.Generator().manual_seed(7))
    seen.clear()
    for _ in range(200):
        half(images)
    assert 60 <= sum(not torch.equal(v, images) for v in seen) <= 110  # ≈ 0.5 · 200, less the draws that keep H


def test_jpeg_straight_through_forwards_real_jpeg_and_passes_identity_gradient(scene):
    images = scene[0].clone().requires_grad_(True)
    out = jpeg_straight_through(images, 75)
    assert torch.allclose(out, jpeg(images.detach(), 75), atol=1e-6)
    weights = torch.rand_like(images)
    (out * weights).sum().backward()
    assert torch.allclose(images.grad, weights)


def test_inpaint_straight_through_is_cv2_forward_and_steers_the_fill_from_the_ring(scene):
    images, _, mark, _, marks, _ = scene
    x = images.clone().requires_grad_(True)
    out = inpaint_straight_through(x, marks, 3)
    assert torch.allclose(out, inpaint_footprint(images, marks, 3), atol=1e-6)
    hole = marks.unsqueeze(1).expand_as(out)
    out[hole].sum().backward()  # the filled pixels only
    grad = x.grad.abs().sum(1)  # B x H x W
    assert float(grad[:, torch.from_numpy(mark)].max()) == 0.0  # a hole pixel's own input is painted over
    ring = torch.from_numpy(ring_support(mark, np.zeros_like(mark), 1) & ~mark)
    assert float(grad[:, ring].min(dim=1).values.max()) >= 0 and float(grad[:, ring].sum()) > 0
    far = torch.zeros_like(ring)
    far[:, 30:] = True  # > radius from the mark (columns 4..24)
    assert float(grad[:, far].max()) == 0.0


def test_ring_support_grows_the_footprint_but_never_onto_the_region(scene):
    _, _, mark, region, _, _ = scene
    support = ring_support(mark, region, 2)
    assert (support & region).sum() == 0 and (mark & ~region <= support).all()
    assert support.sum() > mark.sum()  # the ring is there
    assert np.array_equal(ring_support(mark, region, 0), mark)


def test_eot_pgd_with_a_ring_leaves_lesion_pixels_bit_identical(scene):
    images, logo, mark, region, marks, labels = scene
    model = _model()
    support = torch.from_numpy(np.stack([ring_support(mark, region, 2)] * 2))
    loss = eot_loss(_ce(model, labels), check_eot(ALL), REMOVAL, marks)
    delta = pgd_on_footprint(loss, images, support, 8 / 255, 3, generator=torch.Generator().manual_seed(0))
    assert float(delta.abs().max()) > 0 and float(delta.abs().max()) <= 8 / 255 + 1e-7
    assert float(delta[:, :, torch.from_numpy(region)].abs().max()) == 0.0
    original = (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    out = render_protected(original, logo, 4, 6, 0.8, 1.0, delta[0].permute(1, 2, 0).numpy(), delta_scope="image")
    assert np.array_equal(out[region], original[region])
    assert not np.array_equal(out[~mark & ~region], original[~mark & ~region])  # δ on the ring is stored


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 0.6 + 0.2
    return F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)


def test_learned_remover_starts_as_inpainting_trains_and_beats_identity_on_held_out_pairs():
    torch.set_num_threads(1)
    cfg = RemoverConfig.from_dict({"steps": 20, "batch_size": 8, "lr": 0.01, "encoder": "tu-resnet10t",
                                   "encoder_depth": 2, "decoder_channels": [16, 8], "num_logos": 3,
                                   "logo_fractions": [0.7, 0.8], "alpha_range": [0.6, 1.0],
                                   "delta_epsilon": 0.03, "seed": 0})
    clean = _smooth_images(16, 1)
    marked, fps = make_pairs(clean, thief_logos(cfg, 32), cfg, np.random.default_rng(99))
    untrained = LearnedRemover(3, cfg, 3).eval()  # zero head: exactly the inpainting attack
    assert torch.equal(apply_remover(untrained, marked, fps), inpaint_footprint(marked, fps, 3))
    train = _smooth_images(64, 0)
    model = train_remover(lambda: iter(train.split(16)), 3, 32, cfg, 3)
    assert any(float(p.abs().max()) > 0 for p in model.unet.segmentation_head.parameters())  # it did train
    identity = F.l1_loss(marked, clean).item()
    removed = apply_remover(model, marked, fps)
    assert removed.shape == clean.shape and torch.equal(removed, torch.floor(removed * 255 + 0.5) / 255)
    assert F.l1_loss(removed, clean).item() < 0.2 * identity


def test_remover_config_refuses_out_of_range_fields():
    good = {"steps": 1, "batch_size": 8, "lr": 0.003, "encoder": "tu-resnet10t", "encoder_depth": 2,
            "decoder_channels": [16, 8], "num_logos": 3, "logo_fractions": [0.5, 0.6], "alpha_range": [0.6, 1.0],
            "delta_epsilon": 0.03, "seed": 0}
    with pytest.raises(ValueError, match=r"method\.removal\.learned\.decoder_channels"):
        RemoverConfig.from_dict({**good, "decoder_channels": [16]})
    with pytest.raises(ValueError, match=r"method\.removal\.learned\.alpha_range"):
        RemoverConfig.from_dict({**good, "alpha_range": [0.0, 1.0]})
