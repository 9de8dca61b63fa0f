"""MedLocker / MIAD-MARK core (watermark/): logos, regions, certificates, keyed removal, attacks."""

from __future__ import annotations

import base64
import copy
import math
import os
import stat

import numpy as np
import pytest
import torch

from watermark import certificates as cert_mod
from watermark.certificates import (
    CertificateFormatError,
    build_certificate,
    generate_owner_keys,
    load_private_key,
    load_public_key,
    rerender_check,
    save_private_key,
    sha256_array,
    sign_certificate,
    verify_certificate,
)
from watermark.medlocker.keyed_removal import (
    RestoreError,
    derive_image_key,
    encrypt_residual,
    generate_master_key,
    load_master_key,
    restore,
    save_master_key,
)
from watermark.medlocker.logo import (
    composite,
    composite_soft,
    footprint,
    logo_mask,
    overlaps,
    polarise,
    render_protected,
    render_qr_logo,
    render_text_logo,
)
from watermark.medlocker.regions import (
    allowed_positions,
    boxes_from_mask,
    fit_mark,
    fit_mark_all,
    region_from_boxes,
    region_from_saliency,
)
from watermark.medlocker.removal_attacks import inpaint_footprint, jpeg, median_filter


@pytest.fixture(scope="module")
def qr() -> np.ndarray:
    return render_qr_logo("owner:alice", 25)  # 21 modules -> 1 px each, 2 px transparent margin


@pytest.fixture(scope="module")
def keys():
    return generate_owner_keys()


def _rgb_batch(B=2, H=48, W=56, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, H, W, generator=g)


# ----------------------------------------------------------------------------- logos


def test_qr_logo_has_opaque_dark_modules_and_transparent_rest(qr):
    assert qr.shape == (25, 25, 4) and qr.dtype == np.float32
    a = qr[..., 3]
    assert set(np.unique(a)) == {0.0, 1.0}
    assert np.all(qr[a == 1.0][:, :3] == 0.0)  # dark modules are black
    assert a[:2].sum() == 0 and a[:, :2].sum() == 0  # centring margin is transparent
    assert 0.3 < a.mean() < 0.7
    with pytest.raises(ValueError, match="smaller than the QR"):
        render_qr_logo("owner:alice-lab", 10)


def test_text_logo_is_antialiased_on_transparent_background():
    t = render_text_logo("Alice", 24, rgb=(1.0, 0.5, 0.0))
    assert t.shape[0] == 24 and t.shape[1] > 24 and t.shape[2] == 4
    a = t[..., 3]
    assert a.max() == 1.0 and a.min() == 0.0
    assert ((a > 0) & (a < 1)).any()  # anti-aliased edges
    assert a[0].sum() == 0 and a[:, 0].sum() == 0  # margin stays transparent
    assert np.allclose(t[..., :3], (1.0, 0.5, 0.0))


# ------------------------------------------------------------------------- composite


def test_composite_alpha_zero_is_bit_identical(qr):
    imgs = _rgb_batch()
    out = composite(imgs, qr, 7, 5, 0.0)
    assert torch.equal(out, imgs)
    assert out.data_ptr() != imgs.data_ptr()  # a new tensor, the input is untouched


def test_composite_alpha_one_writes_logo_and_leaves_outside_untouched(qr):
    imgs = _rgb_batch()
    x, y = 9, 4
    out = composite(imgs, qr, x, y, 1.0)
    fp = torch.from_numpy(footprint(48, 56, qr, x, y))
    assert fp.sum() == int((qr[..., 3] > 0).sum())
    # Where A = 1 the logo colour (black) replaces the image exactly.
    assert torch.equal(out[:, :, fp], torch.zeros_like(out[:, :, fp]))
    # Outside the footprint nothing changes, bit for bit.
    assert torch.equal(out[:, :, ~fp], imgs[:, :, ~fp])


def test_composite_per_image_positions_scale_and_grey(qr):
    grey = _rgb_batch(B=2, H=64, W=64)[:, :1]
    out = composite(grey, qr, [0, 30], [0, 20], [1.0, 0.5], scale=2.0)
    fp0 = torch.from_numpy(footprint(64, 64, qr, 0, 0, scale=2.0))
    fp1 = torch.from_numpy(footprint(64, 64, qr, 30, 20, scale=2.0))  # clipped at the border
    assert 0 < fp1.sum() < fp0.sum()
    assert fp0.sum() == 4 * int((qr[..., 3] > 0).sum())  # nearest-neighbour x2 quadruples the area
    assert torch.equal(out[0, :, ~fp0], grey[0, :, ~fp0]) and torch.equal(out[1, :, ~fp1], grey[1, :, ~fp1])
    assert torch.equal(out[0, :, fp0], torch.zeros_like(out[0, :, fp0]))
    assert torch.allclose(out[1, :, fp1], 0.5 * grey[1, :, fp1])  # black logo at alpha .5 halves
    with pytest.raises(ValueError, match="integer pixel position"):
        composite(grey, qr, 1.5, 0, 0.5)


def test_composite_soft_matches_composite_at_integer_translation(qr):
    imgs = _rgb_batch()
    alpha = 0.7
    logit = math.log(alpha / (1 - alpha))
    hard = composite(imgs, qr, 11, 6, alpha)
    soft = composite_soft(imgs, qr, 11.0, 6.0, logit)
    assert (soft - hard).abs().max().item() < 1e-5
    grey_logo = render_text_logo("AB", 16, rgb=(0.9, 0.2, 0.4))  # non-binary alpha, grey image
    g = imgs[:, :1]
    assert (composite_soft(g, grey_logo, 3.0, 2.0, logit) - composite(g, grey_logo, 3, 2, alpha)).abs().max() < 1e-5


def test_composite_soft_gradients_reach_position_and_opacity(qr):
    imgs = _rgb_batch()
    params = {n: torch.tensor(v, requires_grad=True) for n, v in
              {"tx": 11.3, "ty": 6.6, "alpha_logit": 0.2}.items()}
    out = composite_soft(imgs, qr, params["tx"], params["ty"], params["alpha_logit"])
    # A position-sensitive objective: the marked image should look like a target pattern.
    target = torch.linspace(0, 1, 56).expand_as(imgs)
    ((out - target) ** 2).sum().backward()
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad) and p.grad.abs().item() > 1e-4, name


def test_overlaps_counts_shared_pixels(qr):
    fp = footprint(40, 40, qr, 5, 5)
    region = np.zeros((40, 40), bool)
    region[5:10, 5:10] = True
    assert overlaps(fp, region) == int(fp[5:10, 5:10].sum()) > 0
    assert overlaps(fp, np.zeros_like(region)) == 0


# --------------------------------------------------------------------------- regions


def test_two_blobs_give_two_dilated_boxes_containing_them():
    m = np.zeros((60, 80), bool)
    m[10:15, 12:20] = True  # blob 1
    m[40:52, 50:55] = True  # blob 2
    m[52, 55] = True  # diagonal neighbour of blob 2: same component (8-connectivity)
    boxes = boxes_from_mask(m, dilation_px=3)
    assert boxes == [(9, 7, 23, 18), (47, 37, 59, 56)]  # (x0, y0, x1, y1), exclusive ends
    region = region_from_boxes(boxes, 60, 80)
    assert region[m].all()  # every lesion pixel is protected
    assert region[7:18, 9:23].all() and not region[0:7].any() and not region[:, 59:].any()
    assert boxes_from_mask(m, dilation_px=30)[0] == (0, 0, 50, 45)  # clipped at the border
    assert boxes_from_mask(np.zeros((5, 5), bool), 2) == []


def test_saliency_threshold_region():
    cam = np.linspace(0, 1, 256).reshape(16, 16)
    for t in (110, 130, 150, 170):
        r = region_from_saliency(cam, t)
        assert np.array_equal(r, cam * 255 >= t)
    assert region_from_saliency(cam, 110).sum() > region_from_saliency(cam, 170).sum()
    with pytest.raises(ValueError, match="0..255"):
        region_from_saliency(cam, 300)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        region_from_saliency(cam * 2, 130)


@pytest.mark.parametrize("use_mask", [False, True])
def test_allowed_positions_never_overlap_region_bruteforce(use_mask):
    rng = np.random.default_rng(3)
    H, W, h, w = 22, 26, 6, 5
    region = np.zeros((H, W), bool)
    region[rng.integers(0, H, 6), rng.integers(0, W, 6)] = True
    region[8:11, 3:7] = True
    mask = rng.random((h, w)) < 0.5 if use_mask else np.ones((h, w), bool)
    allowed = allowed_positions(region, mask if use_mask else (h, w))
    assert allowed.shape == (H - h + 1, W - w + 1)
    for yy in range(H - h + 1):
        for xx in range(W - w + 1):
            hit = (region[yy:yy + h, xx:xx + w] & mask).any()
            assert allowed[yy, xx] == (not hit), (xx, yy)
    assert allowed.any() and not allowed.all()


def test_allowed_positions_agree_with_logo_footprint(qr):
    region = np.zeros((64, 64), bool)
    region[20:40, 20:40] = True
    allowed = allowed_positions(region, logo_mask(qr))
    ys, xs = np.nonzero(allowed)
    for yy, xx in list(zip(ys, xs))[::37]:
        assert overlaps(footprint(64, 64, qr, xx, yy), region) == 0
    ys, xs = np.nonzero(~allowed)
    for yy, xx in list(zip(ys, xs))[::37]:
        assert overlaps(footprint(64, 64, qr, xx, yy), region) > 0
    assert allowed_positions(region, (70, 10)).size == 0  # logo taller than the image


# ---------------------------------------------------------------------- certificates


def _protected_pair(qr, seed=0, with_delta=False, grey=False):
    rng = np.random.default_rng(seed)
    shape = (40, 48) if grey else (40, 48, 3)
    original = rng.integers(0, 256, shape, dtype=np.uint8)
    delta = None
    if with_delta:
        delta = (rng.uniform(-4, 4, shape) / 255).astype(np.float32)
    protected = render_protected(original, qr, 6, 9, 0.55, 1.0, delta)
    return original, protected, delta


def _entry(image_id, original, protected, logo, delta=None, x=6, y=9, alpha=0.55):
    return {"image_id": image_id, "original_sha256": sha256_array(original),
            "protected_sha256": sha256_array(protected), "logo_sha256": sha256_array(logo),
            "x": x, "y": y, "alpha": alpha, "scale": 1.0,
            "delta_sha256": None if delta is None else sha256_array(delta), "threshold": 130}


@pytest.fixture(scope="module")
def signed(qr, keys):
    o1, p1, _ = _protected_pair(qr, 1)
    o2, p2, d2 = _protected_pair(qr, 2, with_delta=True)
    entries = [_entry("img-001", o1, p1, qr), _entry("img-002", o2, p2, qr, d2)]
    cert = build_certificate("alice-lab", entries, "miadmark", created_at="2025-01-01T00:00:00+00:00")
    return sign_certificate(cert, keys[0])


def test_sha256_array_covers_bytes_shape_and_dtype():
    a = np.arange(12, dtype=np.uint8)
    assert sha256_array(a) == sha256_array(a.copy())
    assert sha256_array(a) != sha256_array(a.reshape(3, 4))
    assert sha256_array(a) != sha256_array(a.astype(np.int16))
    b = a.copy()
    b[5] += 1
    assert sha256_array(a) != sha256_array(b)


def test_signed_certificate_verifies(signed, keys):
    assert verify_certificate(signed, keys[1]) is True
    # Formatting and key order of the stored JSON do not matter.
    import json
    assert verify_certificate(json.loads(json.dumps(signed, indent=4)), load_public_key(keys[1])) is True


@pytest.mark.parametrize("field, change", [
    ("x", lambda v: v + 1),
    ("y", lambda v: v - 1),
    ("alpha", lambda v: v + 1e-9),
    ("scale", lambda v: 2.0),
    ("image_id", lambda v: v + "x"),
    ("protected_sha256", lambda v: ("0" if v[0] != "0" else "1") + v[1:]),
    ("logo_sha256", lambda v: v[::-1]),
    ("delta_sha256", lambda v: "f" * 64 if v is None else None),
    ("threshold", lambda v: 150),
])
def test_any_changed_entry_field_fails_verification(signed, keys, field, change):
    for i in range(2):
        forged = copy.deepcopy(signed)
        forged["entries"][i][field] = change(forged["entries"][i][field])
        assert verify_certificate(forged, keys[1]) is False, (field, i)


def test_changed_header_fields_fail_verification(signed, keys):
    for field, value in [("owner_id", "mallory"), ("method", "medlocker"), ("created_at", "2030-01-01")]:
        forged = dict(signed, **{field: value})
        assert verify_certificate(forged, keys[1]) is False, field
    forged = copy.deepcopy(signed)
    forged["entries"] = forged["entries"][:1]  # dropping an image
    assert verify_certificate(forged, keys[1]) is False


def test_altered_signature_and_other_key_fail(signed, keys):
    sig = bytearray(base64.b64decode(signed["signature"]))
    for pos in (0, 31, 63):
        bad = bytearray(sig)
        bad[pos] ^= 0x01
        assert verify_certificate(dict(signed, signature=base64.b64encode(bad).decode()), keys[1]) is False
    # Flip a padding-only bit of the base64 text: decodes to the same bytes but is not canonical.
    s = signed["signature"]  # 64 bytes -> 88 chars ending "==": the low 4 bits of s[-3] are padding
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    alt = s[:-3] + alphabet[alphabet.index(s[-3]) ^ 1] + s[-2:]
    assert base64.b64decode(alt) == base64.b64decode(s)
    assert verify_certificate(dict(signed, signature=alt), keys[1]) is False
    # Signed by someone else's key.
    other_priv, other_pub = generate_owner_keys()
    by_other = sign_certificate({k: v for k, v in signed.items() if k != "signature"}, other_priv)
    assert verify_certificate(by_other, keys[1]) is False
    assert verify_certificate(by_other, other_pub) is True


def test_malformed_certificate_raises_naming_the_field(signed, keys):
    with pytest.raises(CertificateFormatError, match="signature"):
        verify_certificate({k: v for k, v in signed.items() if k != "signature"}, keys[1])
    with pytest.raises(CertificateFormatError, match="signature"):
        verify_certificate(dict(signed, signature="not base64 !!"), keys[1])
    broken = copy.deepcopy(signed)
    del broken["entries"][1]["alpha"]
    with pytest.raises(CertificateFormatError, match=r"entries\[1\]\.alpha"):
        verify_certificate(broken, keys[1])
    broken = copy.deepcopy(signed)
    broken["entries"][0]["x"] = "6"
    with pytest.raises(CertificateFormatError, match=r"entries\[0\]\.x"):
        verify_certificate(broken, keys[1])
    with pytest.raises(CertificateFormatError, match="duplicate image_id"):
        build_certificate("o", [signed["entries"][0], signed["entries"][0]], "medlocker")


def test_rerender_check_is_bit_exact(qr, signed):
    o1, p1, _ = _protected_pair(qr, 1)
    o2, p2, d2 = _protected_pair(qr, 2, with_delta=True)
    e1, e2 = signed["entries"]
    assert rerender_check(e1, o1, p1, qr) is True
    assert rerender_check(e2, o2, p2, qr, d2) is True
    # One protected pixel off by one -> False.
    p_bad = p1.copy()
    p_bad[20, 20, 1] = p_bad[20, 20, 1] + (1 if p_bad[20, 20, 1] < 255 else -1)
    assert rerender_check(e1, o1, p_bad, qr) is False
    # Hashes right but the parameters wrong -> the re-rendering itself catches it.
    assert rerender_check(dict(e1, x=7), o1, p1, qr) is False
    assert rerender_check(dict(e1, alpha=0.56), o1, p1, qr) is False
    # Missing or wrong delta.
    assert rerender_check(e2, o2, p2, qr, None) is False
    assert rerender_check(e2, o2, p2, qr, d2 * 0.5) is False
    # The mark never touches pixels outside its footprint (lesion pixels stay exact).
    fp = footprint(40, 48, qr, 6, 9)
    assert np.array_equal(p2[~fp], o2[~fp]) and not np.array_equal(p2[fp], o2[fp])


def test_rerender_with_recomputed_hashes_on_grey_and_scaled(qr):
    rng = np.random.default_rng(5)
    original = rng.integers(0, 256, (50, 50), dtype=np.uint8)
    protected = render_protected(original, qr, 3, 4, 0.4, scale=1.5)
    entry = _entry("g", original, protected, qr, x=3, y=4, alpha=0.4)
    entry["scale"] = 1.5
    assert rerender_check(entry, original, protected, qr) is True
    tampered = protected.copy()
    tampered[10, 10] ^= 1
    entry_t = dict(entry, protected_sha256=sha256_array(tampered))  # forger also fixes the hash
    assert rerender_check(entry_t, original, tampered, qr) is False


def test_delta_only_scope_changes_only_the_lesion_free_area_and_is_certified(qr, keys):
    """MIAD-MARK's fallback: no mark (alpha 0), δ over the whole lesion-free area (delta_scope=image)."""
    rng = np.random.default_rng(11)
    original = rng.integers(0, 256, (30, 34, 3), dtype=np.uint8)
    region = np.zeros((30, 34), bool)
    region[5:20, 8:30] = True
    delta = (rng.uniform(-8 / 255, 8 / 255, original.shape) * ~region[..., None]).astype(np.float32)
    protected = render_protected(original, qr, 0, 0, 0.0, delta=delta, delta_scope="image")
    assert np.array_equal(protected[region], original[region])  # lesion region bit-identical
    assert (protected[~region] != original[~region]).mean() > 0.5  # δ acts on the lesion-free area
    assert np.abs(protected.astype(int) - original.astype(int)).max() <= 8  # ε = 8/255
    # with the default scope (footprint of an invisible mark) δ would do nothing
    assert np.array_equal(render_protected(original, qr, 0, 0, 0.0, delta=delta), original)
    entry = dict(_entry("d", original, protected, qr, delta, x=0, y=0, alpha=0.0), delta_scope="image")
    assert rerender_check(entry, original, protected, qr, delta) is True
    assert rerender_check(dict(entry, delta_scope="footprint"), original, protected, qr, delta) is False
    assert rerender_check({k: v for k, v in entry.items() if k != "delta_scope"}, original, protected, qr,
                          delta) is False
    _assert_field_signed(entry, "delta_scope", "footprint", "everywhere", keys)  # the scope is signed
    with pytest.raises(ValueError, match="delta_scope"):
        render_protected(original, qr, 0, 0, 0.0, delta=delta, delta_scope="everywhere")
    # the mark kept and δ widened to the lesion-free area (fallback.widen_delta): still exact on the region
    square = np.zeros((5, 5, 4), np.float32)
    square[..., 3] = 1.0  # a black 5x5 mark, placed below the region
    marked = render_protected(original, square, 1, 23, 0.8, delta=delta, delta_scope="image")
    assert np.array_equal(marked[region], original[region])
    plain = render_protected(original, square, 1, 23, 0.8)
    off_mark = ~region & ~footprint(30, 34, square, 1, 23)
    assert (marked[off_mark] != plain[off_mark]).any()  # δ reaches beyond the mark's footprint
    entry2 = dict(_entry("m", original, marked, square, delta, x=1, y=23, alpha=0.8), delta_scope="image")
    assert rerender_check(entry2, original, marked, square, delta) is True


def test_light_polarity_inverts_the_mark_keeps_its_footprint_and_the_lesion_pixels(qr):
    """polarity=light draws the same QR modules in the inverted colour; lesion pixels stay bit-identical."""
    light = polarise(qr, "light")
    assert polarise(qr, "dark") is qr
    assert np.array_equal(light[..., 3], qr[..., 3])  # same alpha -> same footprint
    assert np.array_equal(light[..., :3][qr[..., 3] > 0], 1 - qr[..., :3][qr[..., 3] > 0])
    assert np.array_equal(polarise(light, "light"), qr)  # an involution
    with pytest.raises(ValueError, match="polarity"):
        polarise(qr, "grey")
    rng = np.random.default_rng(5)
    original = rng.integers(60, 200, (40, 44, 3), dtype=np.uint8)
    lesion = np.zeros((40, 44), bool)
    lesion[28:38, 2:40] = True  # below the mark's window (rows 1..25)
    lesion[3:20, 30:42] = True  # right of it (columns 3..27)
    delta = rng.uniform(-8 / 255, 8 / 255, original.shape).astype(np.float32)
    fp = footprint(40, 44, qr, 3, 1)
    assert not (fp & lesion).any()
    out = {}
    for pol in ("dark", "light"):
        out[pol] = render_protected(original, qr, 3, 1, 0.9, delta=delta, polarity=pol)
        assert np.array_equal(out[pol][lesion], original[lesion])  # lesion pixels untouched
        assert np.array_equal(out[pol][~fp], original[~fp])  # nothing changes off the footprint
    # dark modules darken, light modules brighten the same pixels (alpha 0.9 > |δ|)
    assert (out["dark"][fp].astype(int) < original[fp]).all() and (out["light"][fp].astype(int) > original[fp]).all()
    with pytest.raises(ValueError, match="polarity"):
        render_protected(original, qr, 3, 1, 0.9, polarity="inverted")


def test_light_polarity_certificate_verifies_and_a_flipped_polarity_fails(qr, keys):
    rng = np.random.default_rng(6)
    original = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    delta = rng.uniform(-8 / 255, 8 / 255, original.shape).astype(np.float32)
    protected = render_protected(original, qr, 4, 5, 0.7, delta=delta, polarity="light")
    entry = dict(_entry("l", original, protected, qr, delta, x=4, y=5, alpha=0.7), polarity="light")
    assert rerender_check(entry, original, protected, qr, delta) is True
    assert rerender_check(dict(entry, polarity="dark"), original, protected, qr, delta) is False
    assert rerender_check({k: v for k, v in entry.items() if k != "polarity"}, original, protected, qr,
                          delta) is False  # absent = dark
    dark = render_protected(original, qr, 4, 5, 0.7, delta=delta)
    assert rerender_check(dict(_entry("d", original, dark, qr, delta, x=4, y=5, alpha=0.7)), original, dark, qr,
                          delta) is True  # old certificates (no polarity field) still verify
    _assert_field_signed(entry, "polarity", "dark", "white", keys)  # the polarity is signed


def _assert_field_signed(entry: dict, field: str, other: str, unknown: str, keys) -> None:
    """The signed certificate of ``entry`` verifies; ``field`` changed to ``other`` breaks the
    signature; an ``unknown`` value is refused with the field named."""
    signed_cert = sign_certificate(build_certificate("o", [entry], "miadmark"), keys[0])
    assert verify_certificate(signed_cert, keys[1]) is True
    changed = copy.deepcopy(signed_cert)
    changed["entries"][0][field] = other
    assert verify_certificate(changed, keys[1]) is False
    changed["entries"][0][field] = unknown
    with pytest.raises(CertificateFormatError, match=field):
        verify_certificate(changed, keys[1])


def _first_fit_bruteforce(lesion, base, masks, dilations):
    for d in dilations:
        region = base | region_from_boxes(boxes_from_mask(lesion, d), *base.shape)
        for s, m in masks.items():
            if allowed_positions(region, m).any():
                return s, d
    return None, dilations[0]


@pytest.mark.parametrize("seed", range(12))
def test_fit_mark_takes_the_first_rung_that_fits_and_never_releases_lesion_pixels(seed):
    rng = np.random.default_rng(seed)
    H = W = 40
    lesion = np.zeros((H, W), bool)
    for _ in range(int(rng.integers(3, 14))):  # scattered small lesions
        y, x = rng.integers(0, H - 2), rng.integers(0, W - 2)
        lesion[y:y + int(rng.integers(1, 3)), x:x + int(rng.integers(1, 3))] = True
    base = np.zeros((H, W), bool)
    base[: int(rng.integers(0, 12))] = True  # e.g. a Grad-CAM blob
    logo = np.zeros((16, 16, 4), np.float32)
    logo[..., 3] = 1.0
    masks = {s: logo_mask(logo, s) for s in (1.0, 0.5, 0.25)}
    region, allowed, scale, d = fit_mark(lesion, base, masks, [2, 1, 0])
    assert (region | ~lesion).all() and (region | ~base).all()  # lesions (and the CAM region) always kept out
    expected_scale, expected_d = _first_fit_bruteforce(lesion, base, masks, [2, 1, 0])
    assert (scale, d) == (expected_scale, expected_d)
    if allowed is not None:
        ys, xs = np.nonzero(allowed)
        for i in rng.permutation(len(ys))[:5]:
            assert not (footprint(H, W, logo, int(xs[i]), int(ys[i]), scale) & region).any()
    # every fitting rung, in either order: exactly the brute-force enumeration
    for order, pairs in (("scale_first", [(s, d) for s in masks for d in (2, 1, 0)]),
                         ("margin_first", [(s, d) for d in (2, 1, 0) for s in masks])):
        rungs = fit_mark_all(lesion, base, masks, [2, 1, 0], order)
        fitting = [(s, d) for s, d in pairs if allowed_positions(
            base | region_from_boxes(boxes_from_mask(lesion, d), H, W), masks[s]).any()]
        assert [(r[2], r[3]) for r in rungs] == fitting
        assert all((r[0] | ~lesion).all() for r in rungs)


def test_fit_mark_shrinks_scale_before_margin_and_reports_no_fit():
    logo = np.zeros((10, 10, 4), np.float32)
    logo[..., 3] = 1.0
    masks = {1.0: logo_mask(logo, 1.0), 0.5: logo_mask(logo, 0.5)}
    lesion = np.zeros((20, 20), bool)
    lesion[::6, ::6] = True  # single-pixel lesions every 6 px: gaps of 5 px between them
    # margin 2 -> boxes 5x5 every 6 px leave 1-px lanes: nothing fits; margin 1 -> 3x3 boxes, 3-px gaps: no 5x5
    # logo either; margin 0 -> 5-px gaps: the half-size logo (5x5) fits, the full one never does
    region, allowed, scale, d = fit_mark(lesion, np.zeros_like(lesion), masks, [2, 1, 0])
    assert (scale, d) == (0.5, 0) and allowed.any()
    assert fit_mark(lesion, np.zeros_like(lesion), {1.0: masks[1.0]}, [2, 1, 0])[1] is None
    free = np.zeros((20, 20), bool)
    free[0, 0] = True
    assert fit_mark(free, np.zeros_like(free), masks, [2, 1, 0])[2:] == (1.0, 2)  # default rung when it fits
    full = np.ones((20, 20), bool)
    region, allowed, scale, d = fit_mark(None, full, masks, [2, 1, 0])
    assert allowed is None and scale is None and d == 2 and region.all()


def test_private_key_file_is_owner_only(tmp_path, keys):
    p = save_private_key(tmp_path / "keys" / "owner.pem", keys[0])
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    k = load_private_key(p)
    assert k.public_key().public_bytes_raw() == load_public_key(keys[1]).public_bytes_raw()
    enc_priv, _ = generate_owner_keys(password=b"pw")
    with pytest.raises(ValueError, match="could not load"):
        load_private_key(enc_priv, password=b"wrong")
    assert cert_mod.load_private_key(enc_priv, password=b"pw") is not None


# ---------------------------------------------------------------------- keyed removal


def test_restore_is_bit_exact_for_rgb_and_grey(qr):
    key = generate_master_key()
    for seed, grey in [(10, False), (11, True), (12, False), (13, True)]:
        original, protected, _ = _protected_pair(qr, seed, with_delta=seed % 2 == 0, grey=grey)
        fp = footprint(40, 48, qr, 6, 9)
        blob = encrypt_residual(original, protected, fp, key, f"img-{seed}")
        restored = restore(protected, blob, key, f"img-{seed}")
        assert restored.dtype == np.uint8 and np.array_equal(restored, original)
        assert not np.array_equal(protected, original)
    # Also the extremes of the residual range (0 <-> 255).
    o = np.zeros((8, 8, 3), np.uint8)
    p = o.copy()
    p[2:5, 2:5] = 255
    fp = np.zeros((8, 8), bool)
    fp[2:5, 2:5] = True
    assert np.array_equal(restore(p, encrypt_residual(o, p, fp, key, "x"), key, "x"), o)


@pytest.fixture(scope="module")
def two_blobs(qr):
    key = generate_master_key()
    oa, pa, _ = _protected_pair(qr, 20)
    ob, pb, _ = _protected_pair(qr, 21)
    fp = footprint(40, 48, qr, 6, 9)
    return key, (oa, pa, encrypt_residual(oa, pa, fp, key, "A")), (ob, pb, encrypt_residual(ob, pb, fp, key, "B"))


def test_wrong_key_raises(two_blobs):
    key, (oa, pa, blob_a), _ = two_blobs
    with pytest.raises(RestoreError, match="authentication failed: wrong key or data not for this image"):
        restore(pa, blob_a, generate_master_key(), "A")


def test_blob_of_another_image_raises(two_blobs):
    key, (oa, pa, blob_a), (ob, pb, blob_b) = two_blobs
    with pytest.raises(RestoreError, match="authentication failed"):
        restore(pb, blob_a, key, "B")  # A's blob on B's image and id
    with pytest.raises(RestoreError, match="authentication failed"):
        restore(pb, blob_a, key, "A")  # right id, wrong image
    with pytest.raises(RestoreError, match="authentication failed"):
        restore(pa, blob_a, key, "B")  # right image, wrong id


def test_tampered_blob_raises(two_blobs):
    key, (oa, pa, blob_a), _ = two_blobs
    for pos in (4, 10, len(blob_a) // 2, len(blob_a) - 1):
        bad = bytearray(blob_a)
        bad[pos] ^= 0x40
        with pytest.raises(RestoreError):
            restore(pa, bytes(bad), key, "A")
    with pytest.raises(RestoreError, match="not a medmark restore blob"):
        restore(pa, b"XXXX" + blob_a[4:], key, "A")
    with pytest.raises(RestoreError):
        restore(pa, blob_a[:-1], key, "A")
    assert np.array_equal(restore(pa, blob_a, key, "A"), oa)  # the untouched blob still works


def test_derived_keys_differ_per_image_and_master_key():
    mk = generate_master_key()
    ks = {derive_image_key(mk, f"img-{i}") for i in range(20)}
    assert len(ks) == 20 and all(len(k) == 32 for k in ks)
    assert derive_image_key(mk, "a") == derive_image_key(mk, "a")
    assert derive_image_key(mk, "a") != derive_image_key(generate_master_key(), "a")
    with pytest.raises(ValueError, match="32 bytes"):
        derive_image_key(b"short", "a")


def test_encrypt_refuses_changes_outside_footprint(qr):
    original, protected, _ = _protected_pair(qr, 30)
    fp = footprint(40, 48, qr, 6, 9)
    with pytest.raises(ValueError, match="outside the footprint"):
        encrypt_residual(original, protected, np.zeros_like(fp), generate_master_key(), "a")


@pytest.mark.parametrize("fmt", ["hex", "raw"])
def test_master_key_file_roundtrip_owner_only(tmp_path, fmt):
    mk = generate_master_key()
    p = save_master_key(tmp_path / f"master.{fmt}", mk, fmt=fmt)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert load_master_key(p) == mk


# -------------------------------------------------------------------------- attacks


def test_attacks_preserve_shape_range_and_dtype(qr):
    imgs = composite(_rgb_batch(), qr, 10, 10, 0.8)
    grey = imgs[:, :1]
    for x in (imgs, grey):
        for out in (median_filter(x, 3), jpeg(x, 50), inpaint_footprint(x, footprint(48, 56, qr, 10, 10), 3)):
            assert out.shape == x.shape and out.dtype == x.dtype
            assert out.min() >= 0 and out.max() <= 1
            assert not torch.equal(out, x)


def test_median_filter_removes_isolated_dots():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    assert median_filter(x, 3).abs().max() == 0
    assert torch.equal(median_filter(x, 1), x)
    with pytest.raises(ValueError, match="odd"):
        median_filter(x, 4)


def test_jpeg_quality_orders_error():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 56), indexing="ij")
    imgs = torch.stack([0.5 + 0.4 * torch.sin(6 * xx), 0.5 + 0.4 * torch.cos(5 * yy), 0.3 + 0.5 * xx * yy])[None]
    err = {q: (jpeg(imgs, q) - imgs).abs().mean().item() for q in (10, 95)}
    assert err[95] < 0.5 * err[10] and err[95] < 0.01  # smooth content survives high quality
    # Channel order is kept: a pure red image stays red (no RGB/BGR swap).
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0] = 0.9
    out = jpeg(red, 90)
    assert out[:, 0].mean() > 0.8 and out[:, 2].mean() < 0.1


@pytest.mark.parametrize("method", ["telea", "ns"])
def test_inpainting_changes_only_footprint_pixels(qr, method):
    clean = torch.full((2, 3, 48, 56), 0.6)
    clean[:, 1] = torch.linspace(0.2, 0.8, 56)  # a smooth gradient to inpaint from
    fp = footprint(48, 56, qr, 12, 8)
    marked = composite(clean, qr, 12, 8, 1.0)
    out = inpaint_footprint(marked, fp, radius=3, method=method)
    fpt = torch.from_numpy(fp)
    assert torch.equal(out[:, :, ~fpt], marked[:, :, ~fpt])
    assert not torch.equal(out[:, :, fpt], marked[:, :, fpt])
    # Inpainting does bring the footprint much closer to the clean image than the mark was.
    assert (out - clean).abs()[:, :, fpt].mean() < 0.5 * (marked - clean).abs()[:, :, fpt].mean()
    per_image = np.stack([fp, np.zeros_like(fp)])  # B x H x W: second image untouched
    out2 = inpaint_footprint(marked, per_image, radius=3, method=method)
    assert torch.equal(out2[1], marked[1]) and torch.equal(out2[0], out[0])
