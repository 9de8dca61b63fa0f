"""X-Mark building blocks: Laplacian pyramid, generator budget, EigenCAM saliency and its cache,
loss terms (LPIPS offline), and the paired margin verification statistic."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats
from torch import nn

from datamodules.transforms import random_rescale, thief_augment
from losses.laplacian import LaplacianPenaltyTerm
from losses.perceptual import LPIPSTerm
from losses.xmark import IndMSuppressionTerm, TargetedCETerm, UntargetedSuppressionTerm
from models import build_timm_classifier
from models.generator import ConditionalUNetGenerator, build_generator
from watermark.xmark.pyramid import laplacian_pyramid, max_levels, reconstruct
from watermark.xmark.saliency import SaliencyCache, default_target_layer, eigencam_saliency, normalise_maps
from watermark.xmark.stats import xmark_test

# ---------------------------------------------------------------- Laplacian pyramid


def test_pyramid_reconstructs_input_and_is_differentiable():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 37, 50, requires_grad=True)  # odd sizes on purpose
    pyramid = laplacian_pyramid(x, levels=3)
    assert [tuple(b.shape[-2:]) for b in pyramid] == [(37, 50), (19, 25), (10, 13), (5, 7)]
    recon = reconstruct(pyramid)
    assert (recon - x).abs().max().item() < 1e-5
    # Bands are not trivial (the finest band carries most of white noise's energy) ...
    assert pyramid[0].pow(2).mean() > 0.5 * x.detach().pow(2).mean()
    # ... and gradients flow through decomposition + reconstruction (identity map).
    recon.sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x), atol=1e-5)


def test_pyramid_bands_of_a_constant_are_zero_and_levels_are_checked():
    bands = laplacian_pyramid(torch.full((1, 1, 32, 32), 0.3), levels=3)
    assert max(b.abs().max().item() for b in bands[:-1]) < 1e-6  # reflect borders keep the gain exact
    assert torch.allclose(bands[-1], torch.full_like(bands[-1], 0.3))
    assert max_levels(32, 32) == 4
    with pytest.raises(ValueError, match="too many"):
        laplacian_pyramid(torch.zeros(1, 1, 32, 32), levels=5)


def test_laplacian_penalty_prefers_low_frequencies_and_ignores_residual():
    torch.manual_seed(0)
    term = LaplacianPenaltyTerm(levels=3)
    noise = torch.randn(1, 1, 64, 64)
    ramp = torch.linspace(-1, 1, 64).view(1, 1, 1, 64).expand(1, 1, 64, 64).clone()
    ramp = ramp / ramp.norm() * noise.norm()  # same L2 norm
    p_noise = term.compute({"delta": noise}, {}).item()
    p_ramp = term.compute({"delta": ramp}, {}).item()
    assert p_noise > 50 * p_ramp
    # The low-pass residual is free: a constant offset costs nothing.
    shifted = term.compute({"delta": noise + 0.5}, {}).item()
    assert shifted == pytest.approx(p_noise, rel=1e-4)
    # Finest band weighted most: weighting only the coarsest level lowers the noise penalty.
    coarse_only = LaplacianPenaltyTerm(levels=3, level_weights=[0.0, 0.0, 1.0])
    assert coarse_only.compute({"delta": noise}, {}).item() < 0.5 * p_noise
    with pytest.raises(ValueError):
        LaplacianPenaltyTerm(levels=3, level_weights=[1.0, 0.5])


# ---------------------------------------------------------------- generator


def _saturate(generator: ConditionalUNetGenerator, value: float = 10.0) -> None:
    # tanh(±10) == ±1 in float32: δ sits exactly on the budget.
    with torch.no_grad():
        generator.head.weight.zero_()
        generator.head.bias.fill_(value)


def test_generator_respects_linf_budget_any_size_and_gating():
    torch.manual_seed(0)
    eps = 8 / 255
    g = ConditionalUNetGenerator(in_channels=1, base_width=8, depth=3, epsilon=eps)
    x, s = torch.rand(3, 1, 30, 45), torch.rand(3, 1, 30, 45)  # not multiples of 2^3
    out = g(x, s)
    assert out["delta"].shape == out["marked"].shape == x.shape
    assert out["delta"].abs().max().item() < 0.05 * eps  # near-zero init: marked ≈ image
    _saturate(g, 10.0)
    out = g(x, s)
    assert out["delta"].abs().max().item() <= eps and out["delta"].min().item() == pytest.approx(eps)
    assert out["marked"].min() >= 0 and out["marked"].max() <= 1
    assert (out["marked"] - x).abs().max().item() <= eps + 1e-7
    assert torch.allclose(out["marked"], (x + eps).clamp(0, 1))

    gated = ConditionalUNetGenerator(in_channels=1, base_width=8, depth=2, epsilon=eps, gate_with_saliency=True)
    _saturate(gated, -10.0)
    s = torch.zeros(1, 1, 16, 16)
    s[..., :8, :] = 1.0
    delta = gated(torch.rand(1, 1, 16, 16), s)["delta"]
    assert delta[..., 8:, :].abs().max().item() == 0.0
    assert delta[..., :8, :].max().item() == pytest.approx(-eps)
    with pytest.raises(ValueError, match="saliency"):
        g(x, None)


def _png_round_trip(marked: torch.Tensor) -> np.ndarray:
    u8 = np.clip(np.round(marked[0, 0].detach().numpy() * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(u8).save(buffer, format="PNG")
    buffer.seek(0)
    return np.asarray(Image.open(buffer), dtype=np.int64)


@pytest.mark.parametrize("eps_in_levels,max_levels_after_png", [(8.0, 8), (8.7, 9)])
def test_generator_budget_after_png_uint8_round_trip(eps_in_levels, max_levels_after_png):
    """What holds: for 8-bit images (x = k/255) and ε = n/255, the saved PNG differs from x by at most
    n grey levels (= ε exactly). For ε off the 1/255 grid rounding can add up to half a level:
    |x_png − x| ≤ ε + 0.5/255 (here 8.7/255 becomes 9 levels > ε)."""
    torch.manual_seed(0)
    u = torch.randint(0, 256, (1, 1, 32, 32))
    x = u.float() / 255.0
    g = ConditionalUNetGenerator(in_channels=1, base_width=8, depth=2, epsilon=eps_in_levels / 255)
    _saturate(g, 10.0)
    marked = g(x, torch.rand(1, 1, 32, 32))["marked"]
    diff = np.abs(_png_round_trip(marked) - u[0, 0].numpy())
    assert diff.max() == max_levels_after_png  # reached where x + ε is not clipped
    assert diff.max() <= eps_in_levels + 0.5
    if float(eps_in_levels).is_integer():
        assert diff.max() <= eps_in_levels


def test_generator_gradients_reach_all_parameters(tmp_path):
    torch.manual_seed(0)
    g = ConditionalUNetGenerator(in_channels=1, base_width=8, depth=2)
    x, s = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    loss = (g(x, s)["marked"] - torch.rand_like(x)).pow(2).mean()
    loss.backward()
    for name, p in g.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"

    # Factory: weights from a local (Lightning-style, prefixed) checkpoint reproduce the outputs.
    path = tmp_path / "gen.ckpt"
    torch.save({"state_dict": {f"generator.{k}": v for k, v in g.state_dict().items()}}, path)
    loaded = build_generator(weights_path=str(path), weights_prefix="generator.", in_channels=1, base_width=8, depth=2)
    assert torch.equal(loaded(x, s)["delta"], g(x, s)["delta"])
    with pytest.raises(RuntimeError, match="do not fit"):
        build_generator(weights_path=str(path), weights_prefix="generator.", in_channels=1, base_width=4, depth=2)
    with pytest.raises(FileNotFoundError, match="generator"):
        build_generator(weights_path=str(tmp_path / "missing.ckpt"), in_channels=1)


# ---------------------------------------------------------------- saliency


@pytest.fixture(scope="module")
def surrogate():
    torch.manual_seed(0)
    return build_timm_classifier("resnet10t", num_classes=2, in_channels=1)


def test_eigencam_shape_range_and_input_dependence(surrogate):
    layer = default_target_layer(surrogate)
    assert layer is surrogate.net.layer4
    torch.manual_seed(1)
    images = torch.rand(2, 1, 64, 64)
    images[1, :, 8:40, 8:40] += 0.8  # a bright blob changes the activations
    images = images.clamp(0, 1)
    surrogate.train()
    maps = eigencam_saliency(surrogate, layer, images)
    assert surrogate.training and surrogate.net.layer4.training  # grad-cam's eval() is undone
    assert maps.shape == (2, 1, 64, 64) and maps.dtype == torch.float32
    assert maps.min().item() >= 0.0 and maps.max().item() <= 1.0
    assert maps.flatten(1).max(1).values.min().item() == pytest.approx(1.0)  # per-image normalised
    assert (maps[0] - maps[1]).abs().mean().item() > 0.02
    surrogate.eval()
    # A constant map carries no location: it normalises to zeros, not NaN.
    flat = normalise_maps(torch.stack([torch.full((1, 4, 4), 0.7), torch.arange(16.0).view(1, 4, 4)]))
    assert torch.equal(flat[0], torch.zeros(1, 4, 4)) and flat[1].max().item() == 1.0


def test_default_target_layer_vgg_style_and_error():
    small = build_timm_classifier("small_cnn", num_classes=2, in_channels=1)
    layer = default_target_layer(small)
    assert isinstance(layer, nn.ReLU) and layer is small.net.features[-1]
    maps = eigencam_saliency(small, layer, torch.rand(2, 1, 32, 32))
    assert maps.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="no convolutional layer"):
        default_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)))


def test_saliency_cache_reuses_and_recomputes(surrogate, tmp_path, caplog):
    torch.manual_seed(2)
    images = torch.rand(3, 1, 64, 64)
    ids = ["p1/s1/view1.png", "p2/s1/view1.png", "p3/s1/view1.png"]
    cache = SaliencyCache(tmp_path / "cache", surrogate)
    first = cache.get(images, ids)
    assert (cache.hits, cache.misses) == (0, 3)
    assert torch.equal(first, eigencam_saliency(surrogate, cache.target_layer, images))
    second = cache.get(images, ids)
    assert (cache.hits, cache.misses) == (3, 3)
    assert torch.equal(first, second)

    # A corrupt file is recomputed, with a warning.
    cache.path_for(ids[1]).write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING, logger="watermark.xmark.saliency"):
        third = cache.get(images, ids)
    assert "unreadable" in caplog.text
    assert (cache.hits, cache.misses) == (5, 4)
    assert torch.allclose(third, first, atol=1e-5)  # recomputed alone: equal up to BLAS batching

    # Changed surrogate weights -> another fingerprint -> everything recomputed.
    old_fingerprint, old_dir = cache.fingerprint, cache.key_dir
    # (timm zero-inits each block's last BN, so perturb the shortcut conv, which does matter)
    weight = surrogate.net.layer4[0].downsample[1].weight
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(0.5 * torch.randn_like(original))
        changed = cache.get(images, ids)
        assert cache.fingerprint != old_fingerprint and cache.key_dir != old_dir
        assert (cache.hits, cache.misses) == (5, 7)
        assert not torch.equal(changed, first)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert cache.fingerprint == old_fingerprint  # back to the old weights: old maps are reused
    cache.get(images, ids)
    assert (cache.hits, cache.misses) == (8, 7)


# ---------------------------------------------------------------- loss terms


def test_lpips_term_is_offline():
    with pytest.raises(FileNotFoundError) as err:
        LPIPSTerm(net="alex")
    message = str(err.value)
    assert "backbone_weights_path" in message and "random_backbone" in message and "alexnet-owt" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LPIPSTerm(net="alex", backbone_weights_path="/nonexistent/alexnet-owt-7be5be79.pth")


def test_lpips_term_random_backbone_and_local_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    term = LPIPSTerm(net="alex", random_backbone=True)
    assert len(term.state_dict()) == 0 and not list(term.parameters())  # not in checkpoints/optimisers
    x = torch.rand(2, 1, 64, 64)
    same = term.compute({"marked": x.clone()}, {"image": x})
    other = term.compute({"marked": torch.rand(2, 1, 64, 64)}, {"image": x})
    assert same.item() < 1e-6 and other.item() > 1e-3
    term.train()
    assert not term.metric.training  # dropout in lpips' linear layers stays off

    # A torchvision-layout backbone file is mapped onto lpips' slices exactly.
    features = torchvision.models.alexnet(weights=None).features.state_dict()
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    loaded = LPIPSTerm(net="alex", backbone_weights_path=str(path))
    assert torch.equal(loaded.metric.net.slice1[0].weight, features["0.weight"])
    assert torch.equal(getattr(loaded.metric.net.slice5, "10").weight, features["10.weight"])
    assert loaded.backbone_source == str(path.absolute())


def test_targeted_ce_masks_non_target_samples():
    term = TargetedCETerm(target_class=1)
    labels = torch.tensor([0, 0, 1, 2])
    logits = torch.zeros(4, 3)
    base = term.compute({"marked_logits": logits}, {"label": labels}).item()
    grown = logits.clone()
    grown[:, 1] = 2.0
    assert term.compute({"marked_logits": grown}, {"label": labels}).item() < base
    # Target-class samples are ignored: changing their logits changes nothing.
    ignored = logits.clone()
    ignored[2] = torch.tensor([5.0, -5.0, 0.0])
    assert term.compute({"marked_logits": ignored}, {"label": labels}).item() == pytest.approx(base)
    only_target = torch.randn(3, 3, requires_grad=True)
    value = term.compute({"marked_logits": only_target}, {"label": torch.ones(3, dtype=torch.long)})
    assert value.item() == 0.0 and value.requires_grad


def test_untargeted_suppression_and_indm_terms():
    term = UntargetedSuppressionTerm(target_class=1)
    labels = torch.tensor([1, 1, 0])
    logits = torch.tensor([[0.0, 2.0], [1.0, 1.0], [0.0, 9.0]])
    value = term.compute({"marked_logits": logits}, {"label": labels})
    p_t = torch.softmax(logits[:2], dim=1)[:, 1]
    assert value.item() == pytest.approx((-torch.log1p(-p_t)).mean().item(), rel=1e-5)
    lowered = logits.clone()
    lowered[:2, 1] -= 3.0
    assert 0.0 <= term.compute({"marked_logits": lowered}, {"label": labels}).item() < value.item()
    assert term.compute({"marked_logits": logits}, {"label": torch.tensor([0, 0, 0])}).item() == 0.0

    indm = IndMSuppressionTerm(target_class=1)
    refs = [torch.randn(3, 2), torch.randn(3, 2)]
    keep = labels != 1
    expected = (F.cross_entropy(refs[0][keep], labels[keep]) + F.cross_entropy(refs[1][keep], labels[keep])) / 2
    got = indm.compute({"reference_marked_logits": refs}, {"label": labels})
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="reference"):
        indm.compute({"reference_marked_logits": []}, {"label": labels})


def test_random_rescale_is_reproducible_differentiable_and_lowpass():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64, requires_grad=True)
    a = random_rescale(x, (0.5, 0.8), generator=torch.Generator().manual_seed(3))
    b = random_rescale(x, (0.5, 0.8), generator=torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    penalty = LaplacianPenaltyTerm(levels=2)
    assert penalty.compute({"delta": a}, {}) < 0.5 * penalty.compute({"delta": x}, {})  # fine detail is lost
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(random_rescale(x, (1.0, 1.0)), x)


@pytest.mark.parametrize("zoom", [1.05, 1.111, 1.5])
def test_thief_augment_zoom_is_torchvisions_random_affine_scale(zoom):
    """The batch zoom equals what the thief's data pipeline (RandomAffine(scale)) does to one image."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    torch.manual_seed(0)
    x = torch.rand(3, 1, 40, 48)
    ours = thief_augment(x, hflip=0.0, zoom=(zoom, zoom))
    for image, augmented in zip(x, ours):
        reference = TF.affine(image, angle=0.0, translate=[0, 0], scale=zoom, shear=[0.0, 0.0],
                              interpolation=InterpolationMode.BILINEAR)
        assert (augmented - reference).abs().max() < 1e-4
    assert (ours - x).abs().max() > 0.05  # a zoom really moved the content


def test_thief_augment_flips_each_image_independently_and_reproducibly():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(64, 1, 1, 1)  # left-right asymmetric
    a = thief_augment(x, hflip=0.5, generator=torch.Generator().manual_seed(7))
    b = thief_augment(x, hflip=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    flipped = torch.tensor([torch.equal(img, x[0].flip(-1)) for img in a])
    kept = torch.tensor([torch.equal(img, x[0]) for img in a])
    assert bool((flipped ^ kept).all())  # every image is exactly one of the two
    assert 16 < int(flipped.sum()) < 48  # per image, not one coin for the batch
    assert torch.equal(thief_augment(x, hflip=1.0), x.flip(-1))
    assert thief_augment(x, hflip=0.0, zoom=(1.0, 1.0)) is x  # off = untouched (no random draw either)


def test_thief_augment_is_differentiable_and_keeps_a_constant_image():
    x = torch.full((2, 1, 16, 16), 0.3, requires_grad=True)
    out = thief_augment(x, hflip=0.5, zoom=(1.0, 1.2), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, torch.full_like(out, 0.3), atol=1e-6)  # no border or fill leaks in
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("hflip, zoom, message", [
    (1.5, (1.0, 1.0), "hflip"), (-0.1, (1.0, 1.0), "hflip"),
    (0.5, (0.9, 1.0), "zoom"), (0.5, (1.2, 1.1), "zoom"),
])
def test_thief_augment_refuses_bad_settings(hflip, zoom, message):
    with pytest.raises(ValueError, match=message):
        thief_augment(torch.zeros(1, 1, 4, 4), hflip=hflip, zoom=zoom)


# ---------------------------------------------------------------- verification statistic


def test_xmark_test_known_verdicts():
    rng = np.random.default_rng(0)
    n = 50
    p_b = rng.uniform(0.0, 0.1, n)

    owned = xmark_test(p_b, rng.uniform(0.85, 1.0, n), tau=0.2, alpha=0.01)
    assert owned["verified"] and owned["p_value"] < 1e-3 and owned["delta_p"] > 0.7

    unchanged = xmark_test(p_b, p_b.copy(), tau=0.2)
    assert not unchanged["verified"] and unchanged["p_value"] >= 0.05 and unchanged["delta_p"] == 0.0
    noisy_same = xmark_test(p_b, np.clip(p_b + rng.normal(0, 0.02, n), 0, 1), tau=0.2)
    assert not noisy_same["verified"] and noisy_same["p_value"] >= 0.05

    # The margin matters: a real but small shift (0.1) is significant without margin, not with τ = 0.2.
    shifted = np.clip(p_b + 0.1 + rng.normal(0, 0.01, n), 0, 1)
    assert xmark_test(p_b, shifted, tau=0.0)["verified"]
    with_margin = xmark_test(p_b, shifted, tau=0.2)
    assert not with_margin["verified"] and with_margin["p_value"] >= 0.05


def test_xmark_test_matches_paper_ttest_and_reports_wsr():
    rng = np.random.default_rng(1)
    p_b = rng.uniform(0, 0.3, 40)
    p_w = np.clip(p_b + rng.normal(0.3, 0.2, 40), 0, 1)
    result = xmark_test(p_b, p_w, tau=0.2, marked_predictions=(p_w > 0.5).astype(int), target_class=1)
    reference = stats.ttest_rel(p_b + 0.2, p_w, alternative="less").pvalue
    assert result["p_value"] == pytest.approx(reference, rel=1e-9)
    assert result["wsr"] == pytest.approx(np.mean(p_w > 0.5))
    assert xmark_test(p_b, p_w)["wsr"] is None
    with pytest.raises(ValueError, match="target_class"):
        xmark_test(p_b, p_w, marked_predictions=np.ones(40, dtype=int))
    with pytest.raises(ValueError, match="probabilities"):
        xmark_test(p_b, p_w + 1.0)
