"""MedLocker / MIAD-MARK (issue 5): loss terms, PGD on the footprint, black-box search,
property tests of compositing and the lesion constraint, and a miniature protect -> verify run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, run_train
from losses.adversarial import AdversarialPlacementTerm, LesionOverlapTerm
from watermark.medlocker.blackbox_search import QueryCounter, SearchConfig, blackbox_search
from watermark.medlocker.footprint_pgd import pgd_on_footprint
from watermark.medlocker.logo import composite, footprint, logo_mask, render_protected, render_qr_logo
from watermark.medlocker.regions import allowed_positions

# ----------------------------------------------------------------------------- loss terms


def test_adversarial_term_is_negative_ensemble_ce_and_clipped():
    logits_a = torch.tensor([[4.0, 0.0], [0.0, 4.0]])
    logits_b = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    label = torch.tensor([0, 0])
    ce = lambda lg: torch.nn.functional.cross_entropy(lg, label, reduction="none")  # noqa: E731
    term = AdversarialPlacementTerm(max_ce=None, reduction="none")
    value = term({"ensemble_logits": [logits_a, logits_b]}, {"label": label})
    assert torch.allclose(value, -(ce(logits_a) + ce(logits_b)) / 2)
    clipped = AdversarialPlacementTerm(max_ce=1.0)({"ensemble_logits": [logits_a * 10]}, {"label": label})
    assert clipped.item() == pytest.approx(-(ce(logits_a * 10).clamp(max=1.0)).mean().item())
    with pytest.raises(ValueError, match="ensemble_logits"):
        term({"ensemble_logits": []}, {"label": label})


def test_overlap_term_is_share_of_mark_on_the_region_and_has_gradient():
    region = torch.zeros(2, 1, 8, 8)
    region[:, :, :4] = 1  # top half is lesion
    fp = torch.zeros(2, 1, 8, 8, requires_grad=True)
    with torch.no_grad():
        fp[0, :, :2, :2] = 0.5  # fully on the lesion
        fp[1, :, 6:, 6:] = 0.5  # fully off
    value = LesionOverlapTerm(reduction="none")({"soft_footprint": fp}, {"lesion_region": region})
    assert value.tolist() == pytest.approx([1.0, 0.0])
    value.sum().backward()
    assert fp.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ PGD


def test_pgd_delta_stays_on_the_footprint_in_the_ball_and_raises_the_loss():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 3))
    x = torch.rand(2, 3, 12, 12)
    y = torch.tensor([0, 2])
    fp = torch.zeros(2, 12, 12, dtype=torch.bool)
    fp[:, 3:7, 2:9] = True
    eps = 8 / 255

    def loss_fn(images):
        return torch.nn.functional.cross_entropy(net(images), y, reduction="none")

    delta = pgd_on_footprint(loss_fn, x, fp, eps, steps=10)
    assert delta.abs().max() <= eps + 1e-7
    assert torch.all(delta[:, :, ~fp[0]] == 0)
    assert delta.abs().sum() > 0
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    assert torch.all(loss_fn(x + delta) > loss_fn(x))
    assert torch.equal(pgd_on_footprint(loss_fn, x, fp, 0.0, steps=10), torch.zeros_like(x))


# ------------------------------------------------------------------------ black-box search


class DarkWindowModel:
    """Predicts class 1 once the window [rows 20..28, cols 4..12] is mostly dark, else class 0."""

    def __call__(self, images):
        dark = (images[:, :, 20:28, 4:12].mean(dim=(1, 2, 3)) < 0.45).float()
        return torch.stack([1 - 0.8 * dark - 0.1, 0.8 * dark + 0.1], dim=1)


def _bright_image(H=32, W=32):
    return torch.full((3, H, W), 0.8)


def test_blackbox_search_finds_the_window_counts_queries_and_stops_on_success():
    logo = np.zeros((8, 8, 4), np.float32)
    logo[..., 3] = 1.0  # a black square
    region = np.zeros((32, 32), bool)
    region[:10] = True  # lesion band at the top
    allowed = allowed_positions(region, logo_mask(logo))
    counter = QueryCounter(DarkWindowModel())
    cfg = SearchConfig(population=8, generations=40, query_budget=400, alpha_range=(0.6, 1.0), seed=1)
    result = blackbox_search(counter, _bright_image(), 0, logo, allowed, cfg)
    assert result.success and result.predicted == 1
    assert result.queries == counter.queries < cfg.query_budget  # stopped early, every image counted
    assert allowed[result.y, result.x]
    assert not (footprint(32, 32, logo, result.x, result.y) & region).any()
    assert 0.6 <= result.alpha <= 1.0


def test_blackbox_search_spends_exactly_its_budget_on_an_unfoolable_model():
    logo = np.zeros((6, 6, 4), np.float32)
    logo[..., 3] = 1.0
    allowed = allowed_positions(np.zeros((24, 24), bool), logo_mask(logo))
    counter = QueryCounter(lambda x: torch.tensor([[0.9, 0.1]]).repeat(len(x), 1))
    cfg = SearchConfig(population=6, generations=100, query_budget=50)
    result = blackbox_search(counter, _bright_image(24, 24), 0, logo, allowed, cfg)
    assert not result.success and result.queries == 50 == counter.queries
    with pytest.raises(ValueError, match="no allowed position"):
        blackbox_search(counter, _bright_image(24, 24), 0, logo, np.zeros_like(allowed), cfg)


# ----------------------------------------------------------------------- property tests

_PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def _scene(draw):
    H = draw(st.integers(12, 28))
    W = draw(st.integers(12, 28))
    C = draw(st.sampled_from([1, 3]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    h, w = draw(st.integers(2, 8)), draw(st.integers(2, 8))
    logo = rng.random((h, w, 4)).astype(np.float32)
    logo[..., 3] = np.where(rng.random((h, w)) < 0.3, 0.0, logo[..., 3])
    image = rng.integers(0, 256, size=(H, W, C), dtype=np.uint8)
    x, y = draw(st.integers(-3, W)), draw(st.integers(-3, H))
    alpha = draw(st.floats(0.0, 1.0))
    return image, logo, x, y, alpha, rng


@_PROPS
@given(_scene())
def test_render_is_a_convex_blend_on_the_footprint_and_identity_elsewhere(scene):
    image, logo, x, y, alpha, _ = scene
    H, W, C = image.shape
    out = render_protected(image, logo, x, y, alpha)
    assert out.dtype == np.uint8 and out.shape == image.shape
    fp = footprint(H, W, logo, x, y) if alpha > 0 else np.zeros((H, W), bool)
    assert np.array_equal(out[~fp], image[~fp])  # untouched off the mark, bit for bit
    # on the mark: between the original and the logo colour (convex blend), up to rounding
    ref = composite(torch.from_numpy(image).permute(2, 0, 1)[None].double() / 255, logo.astype(np.float64), x, y,
                    alpha)[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(out.astype(np.float64) - ref).max() <= 0.5 + 1e-6


@_PROPS
@given(_scene(), st.floats(0.0, 0.2))
def test_delta_changes_only_footprint_pixels_and_by_at_most_epsilon(scene, eps):
    image, logo, x, y, alpha, rng = scene
    H, W, C = image.shape
    delta = (rng.uniform(-eps, eps, size=image.shape)).astype(np.float32)
    plain = render_protected(image, logo, x, y, alpha)
    with_delta = render_protected(image, logo, x, y, alpha, delta=delta)
    fp = footprint(H, W, logo, x, y) if alpha > 0 else np.zeros((H, W), bool)
    assert np.array_equal(with_delta[~fp], image[~fp])
    assert np.abs(with_delta.astype(int) - plain.astype(int)).max() <= int(np.ceil(eps * 255)) + 1


@_PROPS
@given(st.integers(0, 2**31 - 1), st.integers(14, 30), st.floats(0.05, 0.5))
def test_every_allowed_position_leaves_the_lesion_region_bit_identical(seed, size, density):
    rng = np.random.default_rng(seed)
    region = rng.random((size, size)) < density * 0.1
    logo = render_qr_logo("o", 21)[::3, ::3].copy()  # 7x7 sparse mark
    mask = logo_mask(logo)
    allowed = allowed_positions(region, mask)
    image = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    ys, xs = np.nonzero(allowed)
    for i in rng.permutation(len(ys))[:8]:
        out = render_protected(image, logo, int(xs[i]), int(ys[i]), 1.0)
        assert np.array_equal(out[region], image[region])
    # and every forbidden position really touches the region
    bad_ys, bad_xs = np.nonzero(~allowed)
    for i in rng.permutation(len(bad_ys))[:8]:
        assert (footprint(size, size, logo, int(bad_xs[i]), int(bad_ys[i])) & region).any()


# ------------------------------------------------------------ miniature end to end (slow)

TINY_ADV = [
    "backbone=small_cnn",
    "data.synthetic.num_images=40",
    "data.synthetic.image_size=48",
    "data.image_size=48",
    "data.batch_size=8",
    "trainer.max_epochs=1",
    "logger=none",
    "method.logo.size_fraction=0.5",
    "method.placement.restarts=2",
    "method.placement.steps=4",
    "method.delta.steps=3",
]


def _verify(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "verify.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def _read(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img)


@pytest.fixture(scope="module")
def miad_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("miad")
    proc, run_dir = run_train(["experiment=miadmark_synthetic", *TINY_ADV], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, tmp


@pytest.mark.slow
def test_protection_run_writes_layout_certificates_and_keeps_lesions_bit_identical(miad_run):
    run_dir, tmp = miad_run
    secret = json.loads((run_dir / "owner" / "secret.json").read_text())
    assert secret["method"] == "miadmark" and secret["ids"]
    assert "master_key" not in json.dumps({k: v for k, v in secret.items() if not k.endswith("_file")})
    for name in ("owner_private_key.pem", "master_key.hex"):
        assert (run_dir / "owner" / name).stat().st_mode & 0o077 == 0
    key_hex = (run_dir / "owner" / "master_key.hex").read_text().strip()
    assert key_hex not in (run_dir / "config.yaml").read_text() + (run_dir / "train.log").read_text()
    cert = json.loads((run_dir / "certificates.json").read_text())
    assert len(cert["entries"]) == len(secret["ids"]) and cert["method"] == "miadmark"
    assert any(e["delta_sha256"] for e in cert["entries"])  # MIAD-MARK adds δ
    root = Path(secret["dataset_root"])
    rows = (run_dir / "protected" / "train.csv").read_text().strip().splitlines()
    assert rows[0] == "id_code,diagnosis" and len(rows) - 1 == len(secret["ids"])
    changed = 0
    for image_id in secret["ids"]:
        prot = _read(run_dir / "protected" / "train_images" / f"{image_id}.png")
        orig = _read(root / "train_images" / f"{image_id}.png")
        lesion = _read(root / "lesion_masks" / f"{image_id}.png") > 127
        assert np.array_equal(prot[lesion], orig[lesion])  # inside the lesion region: bit-identical
        changed += int((prot != orig).any())
    assert changed == len(secret["ids"])
    summary = json.loads((run_dir / "protection.json").read_text())
    assert summary["lesion_max_change"] == 0 and summary["overlap_px_total"] == 0
    assert set(summary["accuracy"]) == {"clean", "protected", "median", "jpeg", "inpaint"}


@pytest.mark.slow
def test_certificate_mode_passes_valid_and_fails_changed_field_or_pixel(miad_run):
    run_dir, tmp = miad_run
    secret = str(run_dir / "owner" / "secret.json")
    ok = _verify([f"secret={secret}", "mode=certificate", f"images={run_dir / 'protected'}", f"out={tmp / 'c0'}"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    # one changed field
    cert = json.loads((run_dir / "certificates.json").read_text())
    cert["entries"][0]["alpha"] = round(cert["entries"][0]["alpha"] - 0.01, 4)
    forged = tmp / "forged.json"
    forged.write_text(json.dumps(cert))
    bad = _verify([f"secret={secret}", "mode=certificate", f"images={run_dir / 'protected'}",
                   f"certificates={forged}", f"out={tmp / 'c1'}"])
    assert bad.returncode == 1
    assert json.loads((tmp / "c1" / "report.json").read_text())["signature_valid"] is False
    # one changed protected pixel
    images = tmp / "tampered"
    shutil.copytree(run_dir / "protected", images)
    first = sorted((images / "train_images").glob("*.png"))[0]
    from PIL import Image

    a = _read(first).copy()
    a[0, 0, 0] ^= 1
    Image.fromarray(a).save(first)
    bad = _verify([f"secret={secret}", "mode=certificate", f"images={images}", f"out={tmp / 'c2'}"])
    assert bad.returncode == 1
    report = json.loads((tmp / "c2" / "report.json").read_text())
    assert report["signature_valid"] is True and report["rerender_passed"] == report["entries"] - 1


@pytest.mark.slow
def test_restore_is_bit_exact_and_a_wrong_key_exits_2_writing_nothing(miad_run):
    run_dir, tmp = miad_run
    secret_path = run_dir / "owner" / "secret.json"
    secret = json.loads(secret_path.read_text())
    out = tmp / "restored"
    ok = _verify([f"secret={secret_path}", "mode=restore", f"key={run_dir / 'owner' / 'master_key.hex'}",
                  f"images={run_dir / 'protected'}", f"out={out}"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    root = Path(secret["dataset_root"])
    for image_id in secret["ids"]:
        assert np.array_equal(_read(out / "train_images" / f"{image_id}.png"),
                              _read(root / "train_images" / f"{image_id}.png"))
    wrong = tmp / "wrong.hex"
    wrong.write_text(os.urandom(32).hex())
    wrong.chmod(0o600)
    out_bad = tmp / "restored_bad"
    bad = _verify([f"secret={secret_path}", "mode=restore", f"key={wrong}", f"images={run_dir / 'protected'}",
                   f"out={out_bad}"])
    assert bad.returncode == 2
    assert "authentication failed" in bad.stderr and "nothing was written" in bad.stderr
    assert not [p for p in out_bad.rglob("*") if p.suffix == ".png"]
    assert wrong.read_text() not in bad.stdout + bad.stderr


@pytest.mark.slow
def test_evaluate_mode_reports_accuracy_on_original_protected_and_after_removal(miad_run):
    run_dir, tmp = miad_run
    out = tmp / "eval"
    proc = _verify([f"secret={run_dir / 'owner' / 'secret.json'}", "mode=evaluate",
                    f"suspect={run_dir / 'checkpoints' / 'last.ckpt'}", f"out={out}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["accuracy"]) == {"clean", "protected", "median3", "jpeg75", "inpaint"}
    summary = json.loads((run_dir / "protection.json").read_text())
    # the same surrogate gives the same accuracy on the stored protected images as during protection
    done = [i for i in summary["images"] if i["x"] is not None]
    assert report["accuracy"]["protected"] == pytest.approx(
        sum(i["pred_protected"] == i["label"] for i in done) / len(done))
    missing = _verify([f"secret={run_dir / 'owner' / 'secret.json'}", "mode=evaluate", f"out={tmp / 'e2'}"])
    assert missing.returncode == 2 and "suspect=" in missing.stderr


@pytest.mark.slow
def test_miadmark_run_protects_every_image_with_mark_or_delta_only(miad_run):
    """The fallback ladder: no image is left unprotected; δ-only images keep the lesion region exact."""
    run_dir, _ = miad_run
    summary = json.loads((run_dir / "protection.json").read_text())
    assert summary["placements"]["none"] == 0 and summary["num_protected"] == summary["num_images"]
    assert summary["changed_in_region_px"] == 0  # nothing changed inside the (margin-shrunk) region
    cert = json.loads((run_dir / "certificates.json").read_text())
    for e in cert["entries"]:
        assert e["delta_scope"] == ("image" if e["placement"] == "delta_only" else "footprint")
        if e["placement"] == "delta_only":
            assert e["alpha"] == 0.0 and e["delta_sha256"]
    assert summary["accuracy"]["protected"] <= summary["accuracy"]["clean"]


@pytest.fixture(scope="module")
def light_run(tmp_path_factory):
    """MedLocker with the light (inverted) polarity only: every mark is the owner's QR drawn light."""
    tmp = tmp_path_factory.mktemp("light")
    proc, run_dir = run_train(["experiment=medlocker_synthetic", *TINY_ADV, "method.fallback.polarities=[light]"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, tmp


@pytest.mark.slow
def test_light_polarity_is_certified_restored_exactly_and_a_flipped_polarity_fails(light_run):
    from watermark.certificates import load_private_key, sign_certificate

    run_dir, tmp = light_run
    secret_path = run_dir / "owner" / "secret.json"
    secret = json.loads(secret_path.read_text())
    cert = json.loads((run_dir / "certificates.json").read_text())
    marks = [e for e in cert["entries"] if e["placement"] == "mark"]
    assert marks and all(e["polarity"] == "light" for e in marks)
    summary = json.loads((run_dir / "protection.json").read_text())
    assert summary["polarities"] == {"dark": 0, "light": len(marks)} and summary["lesion_max_change"] == 0
    root = Path(secret["dataset_root"])
    brighter = 0
    for e in marks:
        prot = _read(run_dir / "protected" / e["protected_path"]).astype(int)
        orig = _read(root / "train_images" / f"{e['image_id']}.png").astype(int)
        lesion = _read(root / "lesion_masks" / f"{e['image_id']}.png") > 127
        assert np.array_equal(prot[lesion], orig[lesion])  # lesion pixels untouched
        assert (prot >= orig).all()  # a light mark (no δ in MedLocker) only brightens
        brighter += int((prot > orig).any())
    assert brighter == len(marks)
    ok = _verify([f"secret={secret_path}", "mode=certificate", f"images={run_dir / 'protected'}",
                  f"out={tmp / 'c0'}"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    out = tmp / "restored"
    ok = _verify([f"secret={secret_path}", "mode=restore", f"key={run_dir / 'owner' / 'master_key.hex'}",
                  f"images={run_dir / 'protected'}", f"out={out}"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    for image_id in secret["ids"]:
        assert np.array_equal(_read(out / "train_images" / f"{image_id}.png"),
                              _read(root / "train_images" / f"{image_id}.png"))
    # the polarity flipped to dark: unsigned -> the signature fails; re-signed by the owner -> the re-render fails
    first = next(i for i, e in enumerate(cert["entries"]) if e["placement"] == "mark")
    cert["entries"][first]["polarity"] = "dark"
    forged = tmp / "forged.json"
    forged.write_text(json.dumps(cert))
    bad = _verify([f"secret={secret_path}", "mode=certificate", f"images={run_dir / 'protected'}",
                   f"certificates={forged}", f"out={tmp / 'c1'}"])
    assert bad.returncode == 1 and json.loads((tmp / "c1" / "report.json").read_text())["signature_valid"] is False
    unsigned = {k: v for k, v in cert.items() if k != "signature"}
    resigned = sign_certificate(unsigned, load_private_key(run_dir / "owner" / "owner_private_key.pem"))
    forged.write_text(json.dumps(resigned))
    bad = _verify([f"secret={secret_path}", "mode=certificate", f"images={run_dir / 'protected'}",
                   f"certificates={forged}", f"out={tmp / 'c2'}"])
    assert bad.returncode == 1
    report = json.loads((tmp / "c2" / "report.json").read_text())
    assert report["signature_valid"] is True and report["rerender_passed"] == report["entries"] - 1


@pytest.fixture(scope="module")
def http_suspect(miad_run):
    """``python -m verification.serve`` on the miniature surrogate, on loopback; yields the base URL."""
    run_dir, _ = miad_run
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "verification.serve", str(run_dir / "checkpoints" / "last.ckpt"),
                             "--port", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else url
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_blackbox_search_against_a_suspect_reached_only_over_http(miad_run, http_suspect):
    """method.blackbox.suspect=<URL>: the placement is found through the HTTP adapter, every query counted."""
    import urllib.request

    run_dir, tmp = miad_run
    with urllib.request.urlopen(http_suspect + "/health") as r:
        before = json.loads(r.read())["queries"]
    budget = 40
    proc, bb_dir = run_train(["experiment=medlocker_synthetic", *TINY_ADV, "method.search=blackbox",
                              f"method.blackbox.suspect={http_suspect}/predict", f"method.blackbox.query_budget={budget}",
                              "method.blackbox.population=8", "+method.blackbox.http.max_batch=8",
                              f"method.surrogate_checkpoint={run_dir / 'checkpoints' / 'last.ckpt'}",
                              "trainer.min_epochs=0", "trainer.max_epochs=0"], tmp, run_name="bb_http")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with urllib.request.urlopen(http_suspect + "/health") as r:
        served = json.loads(r.read())["queries"] - before
    summary = json.loads((bb_dir / "protection.json").read_text())
    queries = [i["queries"] for i in summary["images"] if i["queries"] is not None]
    assert queries and all(1 <= q <= budget for q in queries)
    assert served == sum(queries)  # the server answered exactly the counted queries, nothing else
    assert summary["search"] == "blackbox" and summary["lesion_max_change"] == 0
    bad, _ = run_train(["experiment=medlocker_synthetic", *TINY_ADV, "method.search=blackbox",
                        f"method.blackbox.suspect={tmp / 'missing.onnx'}",
                        f"method.surrogate_checkpoint={run_dir / 'checkpoints' / 'last.ckpt'}",
                        "trainer.min_epochs=0", "trainer.max_epochs=0"], tmp, run_name="bb_missing")
    assert bad.returncode != 0 and "missing.onnx" in bad.stderr


@pytest.mark.slow
def test_false_positive_study_claims_nothing_the_owner_did_not_protect(miad_run):
    """benchmarks/false_positives.py on a MIAD-MARK kit: clean, other owners, perturbed re-renders -> 0 claims,
    while the owner's own images verify (the check has power) and a foreign key is never accepted."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from false_positives import main as fp_main

    run_dir, tmp = miad_run
    out = tmp / "fp"
    code = fp_main([f"secret={run_dir / 'owner' / 'secret.json'}", "K=7", f"out={out}"])
    result = json.loads((out / "false_positives.json").read_text())
    assert code == 0 and result["K"] == 7 and result["failed_runs"] == 0
    assert result["false_claims"] == 0 and result["false_image_claims"] == 0 and result["ind_w_false_claims"] == 0
    assert result["foreign_signatures_accepted"] == 0 and result["smallest_margin_pixels"] >= 1
    kinds = {s["name"] for s in result["sets"]}
    assert {"clean_originals", "other_owner_1", "perturbed_x+1", "perturbed_delta_changed"} <= kinds
    other = next(s for s in result["sets"] if s["name"] == "other_owner_1")["signature_check"]
    assert other["rerender_passed"] == other["images"] and other["signature_valid"] is False  # only the key fails
    control = result["owner_control"]
    assert control["verified"] and control["false_image_claims"] == control["images"]


def test_only_8_bit_images_of_the_served_size_and_channels_can_be_protected(tmp_path):
    from types import SimpleNamespace

    from callbacks.medlocker import check_protectable

    def sample(name: str, pixels: np.ndarray):
        return SimpleNamespace(image=SimpleNamespace(path=tmp_path / name, read=lambda: pixels))

    good = [sample("a.png", np.zeros((48, 48), np.uint8)), sample("b.png", np.zeros((48, 48), np.uint8))]
    check_protectable(good, image_size=48, channels=1)
    with pytest.raises(ValueError, match=r"c\.dcm: a DICOM file, not an 8-bit image"):
        check_protectable(good + [sample("c.dcm", np.zeros((48, 48), np.float32))], 48, 1)
    with pytest.raises(ValueError, match=r"d\.png: stored 48×47, data.image_size=48"):
        check_protectable(good + [sample("d.png", np.zeros((48, 47), np.uint8))], 48, 1)
    with pytest.raises(ValueError, match=r"e\.png: 3 channel\(s\) stored, data.channels=1"):
        check_protectable(good + [sample("e.png", np.zeros((48, 48, 4), np.uint8))], 48, 1)
    check_protectable([sample("f.png", np.zeros((48, 48, 4), np.uint8))], 48, 3)  # RGBA: the 3 colour channels


@pytest.mark.slow
def test_a_protection_run_whose_images_are_not_served_as_stored_stops_before_training(tmp_path):
    proc, run_dir = run_train(["experiment=miadmark_synthetic", *TINY_ADV, "data.image_size=32"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "stored 48×48, data.image_size=32" in proc.stderr and ".png" in proc.stderr
    assert not list(run_dir.rglob("*.ckpt")) and not (run_dir / "protection.json").exists()
