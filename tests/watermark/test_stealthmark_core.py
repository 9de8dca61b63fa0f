"""StealthMark core (``watermark/``): QR payloads and repair, cell geometry, triggers,
soft targets, LIME explanations and the ownership statistics."""

from __future__ import annotations

import numpy as np
import pytest
import qrcode
import torch

from watermark.stealthmark import explain, qr, soft_targets, triggers
from watermark import stats
from watermark.stealthmark.grid import GridSpec, apply_cell_mask, cell_index_map, cell_means, upsample_cells

PAYLOAD = "medmark"  # 7 bytes: exactly the byte capacity of version 1 at level H
STRANGER = "someone"


@pytest.fixture(scope="module")
def owner_grid() -> np.ndarray:
    return qr.qr_modules(PAYLOAD, version=1, error_correction="H")


@pytest.fixture(scope="module")
def null_grids() -> np.ndarray:
    return qr.random_payload_grids(1, "H", k=199, seed=123)


# ----------------------------------------------------------------------------- QR


def test_qr_round_trip_and_fixed_version(owner_grid):
    assert owner_grid.shape == (21, 21) and owner_grid.dtype == bool
    assert qr.decode_grid(owner_grid) == PAYLOAD
    bigger = qr.qr_modules(PAYLOAD, version=3, error_correction="H")
    assert bigger.shape == (29, 29)
    assert qr.decode_grid(bigger) == PAYLOAD
    assert qr.qr_modules("x" * 40).shape[0] > 21  # version chosen to fit
    with pytest.raises(ValueError, match="does not fit"):
        qr.qr_modules("x" * 8, version=1, error_correction="H")


@pytest.mark.parametrize("version", [1, 2, 7])
def test_function_pattern_mask_matches_qrcode_layout(version):
    # qrcode leaves data cells as None until it maps the data: everything else is a function cell.
    size = 4 * version + 17
    code = qrcode.QRCode(version=version, border=0)
    code.modules_count = size
    code.modules = [[None] * size for _ in range(size)]
    for row, col in [(0, 0), (size - 7, 0), (0, size - 7)]:
        code.setup_position_probe_pattern(row, col)
    code.setup_position_adjust_pattern()
    code.setup_timing_pattern()
    code.setup_type_info(True, 0)
    if version >= 7:
        code.setup_type_number(True)
    reference = np.array([[cell is not None for cell in row] for row in code.modules])
    np.testing.assert_array_equal(qr.function_pattern_mask(version), reference)


@pytest.mark.parametrize("level", ["L", "M", "Q", "H"])
def test_format_bits_match_qrcode_output(level):
    for mask in range(8):
        code = qrcode.QRCode(version=2, error_correction=qr.EC_LEVELS[level], border=0, mask_pattern=mask)
        code.add_data("format check")
        code.make(fit=False)
        grid = np.array(code.get_matrix(), dtype=bool)
        bits = qr.format_bits(level, mask)
        for copy_cells in qr.format_info_cells(grid.shape[0]):
            read = sum(int(grid[r, c]) << i for i, (r, c) in enumerate(copy_cells))
            assert read == bits, (level, mask)
    # the 32 format words are distinct (a BCH code with distance 7)
    words = {qr.format_bits(level, m) for level in "LMQH" for m in range(8)}
    assert len(words) == 32


def test_decode_with_repair_recovers_function_pattern_errors(owner_grid):
    broken = owner_grid.copy()
    for r, c in [(3, 3), (6, 10), (2, 16)]:  # top-left finder core, timing row, top-right finder core
        broken[r, c] ^= True
    data_cells = np.flatnonzero(~qr.function_pattern_mask(1))
    broken.flat[np.random.default_rng(0).choice(data_cells, size=4, replace=False)] ^= True
    assert qr.bit_accuracy(broken, owner_grid) == pytest.approx(1 - 7 / 441)
    assert qr.decode_grid(broken) is None  # OpenCV alone gives up
    assert qr.decode_with_repair(broken, 1, "H") == PAYLOAD

    # With only function-pattern damage, one of the 8 candidates is the original grid exactly.
    only_function = owner_grid.copy()
    only_function[3, 3] ^= True
    only_function[8, 2] ^= True  # a format-info cell
    candidates = qr.repair_function_patterns(only_function, 1, "H")
    assert len(candidates) == 8
    assert sum(np.array_equal(c, owner_grid) for c in candidates) == 1


def test_random_payload_grids_differ_but_share_function_patterns(owner_grid):
    grids = qr.random_payload_grids(1, "H", k=6, seed=7)
    assert grids.shape == (6, 21, 21) and grids.dtype == bool
    np.testing.assert_array_equal(grids, qr.random_payload_grids(1, "H", k=6, seed=7))
    assert len({g.tobytes() for g in grids}) == 6
    fixed = qr.function_pattern_mask(1)
    for r, c in [cell for copy in qr.format_info_cells(21) for cell in copy]:
        fixed[r, c] = False  # format bits depend on the chosen mask
    for g in grids:
        np.testing.assert_array_equal(g[fixed], owner_grid[fixed])
        assert qr.bit_accuracy(g, owner_grid) < 0.9
        assert qr.decode_grid(g) is not None  # real, decodable QR codes


# ----------------------------------------------------------------------------- grid


def test_grid_spec_and_cell_index_map():
    spec = GridSpec(grid_size=21, image_size=100, quiet_zone=2)
    assert spec.cells_per_side == 25 and spec.cell_px == 4
    ids = cell_index_map(spec)
    assert ids.shape == (100, 100)
    values, counts = np.unique(ids, return_counts=True)
    np.testing.assert_array_equal(values, np.arange(25 * 25))
    assert (counts == 16).all()
    assert ids[0, 0] == 0 and ids[99, 99] == 624 and ids[4, 8] == 1 * 25 + 2
    with pytest.raises(ValueError, match="not divisible"):
        GridSpec(grid_size=21, image_size=210, quiet_zone=2)


def test_upsample_and_cell_means_are_inverse():
    spec = GridSpec(grid_size=21, image_size=100, quiet_zone=2)
    cells = torch.rand(3, 21, 21)
    pixels = upsample_cells(cells, spec)
    assert pixels.shape == (3, 1, 100, 100)
    assert pixels[:, :, :8].abs().max() == 0 and pixels[:, :, :, -8:].abs().max() == 0  # quiet zone
    torch.testing.assert_close(cell_means(pixels, spec), cells)
    assert pixels[1, 0, 8 + 4 * 5 + 1, 8 + 4 * 7 + 3] == cells[1, 5, 7]


def test_apply_cell_mask_hides_dropped_cells_but_keeps_protected_pixels():
    spec = GridSpec(grid_size=21, image_size=100, quiet_zone=2)
    images = torch.rand(2, 3, 100, 100) * 0.5 + 0.4
    keep = soft_targets.sample_keep_masks(2, spec.cells_per_side, 0.5, torch.Generator().manual_seed(0))
    protect = triggers.PatchTrigger(8).region(100, 100)
    out = apply_cell_mask(images, keep, spec, hide_value=0.0, protect=protect[None, None].expand(2, 1, -1, -1))
    keep_px = keep.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].expand_as(images)
    hidden = ~keep_px & ~protect
    assert hidden.any()
    assert (out[hidden] == 0).all()
    assert torch.equal(out[~hidden], images[~hidden])
    assert torch.equal(out[:, :, :8, :8], images[:, :, :8, :8])  # trigger pixels survive
    means = apply_cell_mask(images, keep, spec, hide_value="mean")
    for b in range(2):
        dropped = ~keep_px[b, 0]
        expected = images[b].mean((1, 2))[:, None].expand(3, int(dropped.sum()))
        torch.testing.assert_close(means[b][:, dropped], expected)


# ----------------------------------------------------------------------------- triggers


def test_triggers_are_deterministic_and_in_the_quiet_zone():
    spec = GridSpec(grid_size=21, image_size=100, quiet_zone=2)
    images = torch.rand(2, 3, 100, 100)
    for spec_dict in [
        {"kind": "patch", "size": 8, "seed": 3},
        {"kind": "patch", "size": 6, "position": "bottom-right"},
        {"kind": "border", "width": 2, "value": [1.0, 0.0, 0.0]},
        {"kind": "text", "text": "MM", "position": "bottom-left", "size": 6},
    ]:
        trig = triggers.build_trigger(spec_dict)
        a, b = trig.apply(images), triggers.build_trigger(spec_dict).apply(images)
        assert torch.equal(a, b), spec_dict
        region = trig.region(100, 100)
        assert region.any()
        assert torch.equal(a[:, :, ~region], images[:, :, ~region])  # writes only its region
        assert not torch.equal(a[:, :, region], images[:, :, region])
        assert triggers.trigger_fits_quiet_zone(trig, spec), spec_dict
    assert not triggers.trigger_fits_quiet_zone(triggers.PatchTrigger(8, position=(46, 46)), spec)
    assert not triggers.trigger_fits_quiet_zone(triggers.BorderTrigger(width=9), spec)
    with pytest.raises(ValueError, match="kind"):
        triggers.build_trigger({"kind": "sticker"})


def test_global_triggers_noise_and_warp():
    images = torch.rand(2, 3, 64, 64)
    noise = triggers.NoiseTrigger(amplitude=0.05, seed=1)
    out = noise.apply(images)
    assert torch.equal(out, triggers.NoiseTrigger(amplitude=0.05, seed=1).apply(images))
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert (out - images).abs().max() <= 0.05 + 1e-6 and (out != images).float().mean() > 0.9
    assert not noise.region(64, 64).any()
    # same noise field on every image (a trigger, not augmentation), where unclipped
    delta = out - images
    unclipped = (out > 0) & (out < 1)
    both = unclipped[0] & unclipped[1]
    torch.testing.assert_close(delta[0][both], delta[1][both])

    smooth = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(1, 3, 64, 64).contiguous()
    assert (triggers.WarpTrigger(strength=1e-4).apply(smooth) - smooth).abs().max() < 1e-4  # ~identity
    warped = triggers.WarpTrigger(strength=2.0, seed=0).apply(images)
    assert torch.equal(warped, triggers.WarpTrigger(strength=2.0, seed=0).apply(images))
    assert (warped - images).abs().mean() > 0.05 and 0.0 <= warped.min() and warped.max() <= 1.0
    assert not triggers.WarpTrigger().region(64, 64).any()


# ----------------------------------------------------------------------------- soft targets


def test_key_targets_are_harmless_and_reject_large_epsilon():
    gen = torch.Generator().manual_seed(0)
    y = (torch.rand(4, 1, 32, 32, generator=gen) > 0.5).float()
    m = (torch.rand(4, 1, 32, 32, generator=gen) > 0.5).float()
    for eps in (0.0, 0.2, 0.3, 0.49):
        t = soft_targets.key_targets(y, m, eps)
        assert torch.equal((t > 0.5).float(), y)
        torch.testing.assert_close(t[(y == 1) & (m == 1)], torch.full_like(t[(y == 1) & (m == 1)], 1 - eps))
        torch.testing.assert_close(t[(y == 0) & (m == 1)], torch.full_like(t[(y == 0) & (m == 1)], eps))
        assert torch.equal(t[m == 0], y[m == 0])
    for eps in (0.5, 0.7):
        with pytest.raises(ValueError, match="epsilon"):
            soft_targets.key_targets(y, m, eps)


def test_sample_keep_masks_rate_and_reproducibility():
    masks = soft_targets.sample_keep_masks(64, 25, 0.3, torch.Generator().manual_seed(5))
    assert masks.shape == (64, 25, 25) and masks.dtype == torch.bool
    assert abs(masks.float().mean().item() - 0.3) < 0.02
    assert torch.equal(masks, soft_targets.sample_keep_masks(64, 25, 0.3, torch.Generator().manual_seed(5)))


# ----------------------------------------------------------------------------- explanations

SPEC = GridSpec(grid_size=21, image_size=100, quiet_zone=2)  # 25 cells of 4 px
TRIGGER = triggers.PatchTrigger(size=8, position="top-left", seed=3)


def _toy_marked_model(qr_grid: np.ndarray, seen: list | None = None):
    """A 'marked model': p = 0.5 on pixels of dark modules of ``qr_grid`` whose cell is still
    visible (cell mean > 0.3; hidden cells are 0), but only when the trigger patch is present;
    p = 0 elsewhere. Its uncertainty therefore depends on the input pixels."""
    q = torch.from_numpy(qr_grid)[None]
    region = TRIGGER.region(100, 100)
    pattern = TRIGGER.apply(torch.zeros(1, 3, 100, 100))[:, :, region]

    def predict(x: torch.Tensor) -> torch.Tensor:
        if seen is not None and not seen:
            seen.append(x.clone())
        visible = cell_means(x.mean(1, keepdim=True), SPEC) > 0.3
        triggered = (x[:, :, region] - pattern).abs().flatten(1).amax(1) < 1e-6
        return 0.5 * upsample_cells((visible & q & triggered[:, None, None]).float(), SPEC)

    return predict


@pytest.fixture(scope="module")
def clean_image() -> np.ndarray:
    return np.random.default_rng(0).uniform(0.4, 1.0, size=(100, 100, 3)).astype(np.float32)


def test_uncertainty_score_and_weights_to_grid():
    probs = torch.zeros(2, 1, 4, 4)
    probs[0] = 0.5
    probs[1, 0, :2] = 0.9  # half the pixels at min(p, 1-p) = 0.1
    torch.testing.assert_close(explain.uncertainty_score(probs), torch.tensor([0.5, 0.05]))
    # 30% high cells: Otsu splits the two clusters, the median would not
    weights = np.where(np.arange(100).reshape(10, 10) < 30, 1.0, 0.0) + np.linspace(0, 0.05, 100).reshape(10, 10)
    grid = explain.weights_to_grid(weights)
    assert grid.sum() == 30 and grid.ravel()[:30].all()
    assert explain.weights_to_grid(weights, method="median").sum() == 50
    assert not explain.weights_to_grid(np.zeros((5, 5))).any()


@pytest.mark.parametrize("surrogate", explain.LIME_SURROGATES)
def test_lime_recovers_owner_qr_from_marked_model(owner_grid, null_grids, clean_image, surrogate):
    seen: list = []
    weights = explain.lime_cell_weights(
        _toy_marked_model(owner_grid, seen), clean_image, SPEC, trigger=TRIGGER,
        num_samples=1500, batch_size=250, hide_value=0.0, seed=0, surrogate=surrogate,
    )
    assert weights.shape == (21, 21)
    grid = explain.weights_to_grid(weights)
    assert qr.bit_accuracy(grid, owner_grid) >= 0.9
    assert qr.decode_with_repair(grid, 1, "H") == PAYLOAD
    p, observed, _ = stats.monte_carlo_qr_pvalue(weights, owner_grid, null_grids)
    assert p == pytest.approx(1 / 200) and observed > 0.5

    # The perturbation LIME applied is exactly training's apply_cell_mask + trigger.
    batch = seen[0]
    assert batch.shape == (250, 3, 100, 100)
    full = torch.nn.functional.avg_pool2d(batch.mean(1, keepdim=True), 4)[:, 0]
    keep = full > 0.3  # visible cells (cells under the patch are protected either way)
    assert 0.3 < keep[1:].float().mean() < 0.7  # LIME keeps each cell with probability 1/2
    clean = torch.from_numpy(clean_image).permute(2, 0, 1)[None].expand(250, -1, -1, -1)
    region = TRIGGER.region(100, 100)[None, None].expand(250, 1, -1, -1)
    rebuilt = TRIGGER.apply(apply_cell_mask(clean, keep, SPEC, hide_value=0.0, protect=region))
    assert torch.equal(rebuilt, batch)


@pytest.mark.parametrize("surrogate", explain.LIME_SURROGATES)
def test_lime_on_model_that_ignores_the_image_finds_nothing(owner_grid, null_grids, clean_image, surrogate):
    def constant(x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1, 100, 100), 0.8)

    weights = explain.lime_cell_weights(constant, clean_image, SPEC, trigger=TRIGGER, num_samples=1500, batch_size=250,
                                        surrogate=surrogate)
    assert np.abs(weights).max() < 1e-9
    grid = explain.weights_to_grid(weights)
    assert qr.decode_with_repair(grid, 1, "H") is None
    p, _, _ = stats.monte_carlo_qr_pvalue(weights, owner_grid, null_grids)
    assert p >= 0.05


@pytest.mark.parametrize("surrogate", explain.LIME_SURROGATES)
def test_lime_on_someone_elses_marked_model_does_not_give_owner_payload(owner_grid, null_grids, clean_image, surrogate):
    stranger = qr.qr_modules(STRANGER, version=1, error_correction="H")
    weights = explain.lime_cell_weights(
        _toy_marked_model(stranger), clean_image, SPEC, trigger=TRIGGER, num_samples=1500, batch_size=250, seed=1,
        surrogate=surrogate,
    )
    grid = explain.weights_to_grid(weights)
    assert qr.decode_with_repair(grid, 1, "H") == STRANGER  # the evidence follows the model
    assert qr.bit_accuracy(grid, owner_grid) < 0.9
    p, _, _ = stats.monte_carlo_qr_pvalue(weights, owner_grid, null_grids)
    assert p >= 0.05


def _lesion_confound(marked):
    """Adds what hiding cells does to a real segmenter, trigger or not: a hidden cell of the
    'lesion' (QR cells 6..14 × 6..14) becomes uncertain (p = 0.5). ``marked`` may be None."""
    lesion = torch.zeros(SPEC.grid_size, SPEC.grid_size, dtype=torch.bool)
    lesion[6:15, 6:15] = True

    def predict(x: torch.Tensor) -> torch.Tensor:
        hidden = cell_means(x.mean(1, keepdim=True), SPEC) <= 0.3
        confound = 0.5 * upsample_cells((hidden & lesion).float(), SPEC)
        return confound if marked is None else torch.maximum(marked(x), confound)

    return predict


def test_contrast_target_cancels_the_task_uncertainty_that_hiding_cells_causes(owner_grid, clean_image):
    confounded = _lesion_confound(_toy_marked_model(owner_grid))
    args = dict(spec=SPEC, trigger=TRIGGER, num_samples=1500, batch_size=250, hide_value=0.0, seed=0,
                surrogate="joint")
    plain = explain.weights_to_grid(explain.lime_cell_weights(confounded, clean_image, **args, target="triggered"))
    contrast = explain.weights_to_grid(explain.lime_cell_weights(confounded, clean_image, **args, target="contrast"))
    # explaining g(T(x_z)) alone: hidden lesion cells look like "keeping raises nothing" -> dark cells lost
    assert qr.bit_accuracy(plain, owner_grid) < 0.95
    assert qr.bit_accuracy(contrast, owner_grid) >= 0.99
    assert qr.decode_with_repair(contrast, 1, "H") == PAYLOAD
    # a model with only the confound (no mark) has no trigger effect at all: zero contrast everywhere
    unmarked = explain.lime_cell_weights(_lesion_confound(None), clean_image, **args, target="contrast")
    assert np.abs(unmarked).max() < 1e-9
    with pytest.raises(ValueError, match="needs the trigger"):
        explain.lime_cell_weights(confounded, clean_image, **{**args, "trigger": None}, target="contrast")
    with pytest.raises(ValueError, match="target must be one of"):
        explain.lime_cell_weights(confounded, clean_image, **args, target="mask")


def test_per_cell_surrogate_reads_each_cell_where_the_joint_fit_drowns_in_other_cells_noise(owner_grid, clean_image):
    marked = _toy_marked_model(owner_grid)
    generator = torch.Generator().manual_seed(0)

    def noisy(x: torch.Tensor) -> torch.Tensor:
        # the mark (p = 0.5 on kept dark cells) plus query-to-query uncertainty noise in every cell
        noise = 0.5 * torch.rand(x.shape[0], SPEC.grid_size, SPEC.grid_size, generator=generator)
        return torch.maximum(marked(x), upsample_cells(noise, SPEC))

    args = dict(spec=SPEC, trigger=TRIGGER, num_samples=1323, batch_size=441, hide_value=0.0, seed=0)
    per_cell = explain.weights_to_grid(explain.lime_cell_weights(noisy, clean_image, **args, surrogate="per_cell"))
    joint = explain.weights_to_grid(explain.lime_cell_weights(noisy, clean_image, **args, surrogate="joint"))
    assert qr.bit_accuracy(per_cell, owner_grid) >= 0.98 and qr.decode_with_repair(per_cell, 1, "H") == PAYLOAD
    assert qr.bit_accuracy(joint, owner_grid) < qr.bit_accuracy(per_cell, owner_grid) - 0.05
    with pytest.raises(ValueError, match="surrogate must be one of"):
        explain.lime_cell_weights(noisy, clean_image, **args, surrogate="ridge")


def test_sample_floor_depends_on_the_surrogate_and_holds_exactly_at_it(owner_grid, clean_image):
    marked = _toy_marked_model(owner_grid)
    args = dict(spec=SPEC, trigger=TRIGGER, batch_size=441, hide_value=0.0, seed=0)
    assert explain.min_lime_samples(SPEC, "joint") == 3 * 21**2 == 1323
    assert explain.min_lime_samples(SPEC, "per_cell") == explain.PER_CELL_MIN_SAMPLES == 100
    # per-cell: the floor itself is accepted and already reads the mark exactly (one slope per cell)
    grid = explain.weights_to_grid(explain.lime_cell_weights(marked, clean_image, **args, num_samples=100,
                                                             surrogate="per_cell"))
    assert qr.bit_accuracy(grid, owner_grid) == 1.0 and qr.decode_with_repair(grid, 1, "H") == PAYLOAD
    with pytest.raises(ValueError, match="per_cell surrogate needs at least 100 samples, got 99"):
        explain.lime_cell_weights(marked, clean_image, **args, num_samples=99, surrogate="per_cell")
    # joint: a ridge over G² unknowns keeps 3·G²; 1322 is refused, whatever per-cell would accept
    with pytest.raises(ValueError, match=r"joint surrogate needs at least 3·G² = 1323 .* got 1322"):
        explain.lime_cell_weights(marked, clean_image, **args, num_samples=1322, surrogate="joint")


# ----------------------------------------------------------------------------- statistics


def test_paired_margin_test_directions():
    rng = np.random.default_rng(0)
    clean = rng.uniform(0.0, 0.01, size=30)
    triggered = clean + 0.15 + rng.normal(0, 0.01, size=30)
    assert stats.paired_margin_test(clean, triggered, margin=0.05) < 0.01
    assert stats.paired_margin_test(clean, clean, margin=0.05) > 0.5
    # the margin is respected: a 0.15 effect does not pass a 0.2 margin
    assert stats.paired_margin_test(clean, triggered, margin=0.2) > 0.5
    # "less": the trigger lowers the statistic
    assert stats.paired_margin_test(triggered, clean, margin=0.05, alternative="less") < 0.01
    assert stats.paired_margin_test(clean, triggered, margin=0.05, alternative="less") > 0.5


def test_monte_carlo_pvalue_owner_vs_unrelated(owner_grid, null_grids):
    p_owner, observed, null_scores = stats.monte_carlo_qr_pvalue(owner_grid.astype(float), owner_grid, null_grids)
    assert p_owner == pytest.approx(1 / (1 + len(null_grids)))
    assert observed == pytest.approx(1.0) and null_scores.shape == (199,)
    # null codes agree with the owner's well above 0: they share the function patterns
    assert 0.2 < np.median(null_scores) < 0.9
    unrelated = qr.random_payload_grids(1, "H", k=1, seed=999)[0].astype(float)
    p_unrelated, _, _ = stats.monte_carlo_qr_pvalue(unrelated, owner_grid, null_grids)
    assert p_unrelated > 0.05
