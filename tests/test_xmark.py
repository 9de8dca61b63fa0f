"""X-Mark end to end: generator training -> release -> suspects -> verify.py (docs/methods/xmark.md).

Fast tests cover the pieces (exact L∞ after the PNG round trip, the owner kit, the marker
file, the classification suspect); the ``slow`` miniature pipeline trains tiny CNNs on
32-px synthetic chest X-rays in-process (one import of the stack), releases the marked
dataset, trains a Mal suspect on it and an Ind-M suspect on the clean data, and checks the
verdicts, the release contract and bad input through the real ``verify.py``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT, compose_config
from verification.suspect import CheckpointSuspect, SuspectError
from models.xmark_marker import MarkerError, load_marker
from watermark.xmark.marker import XMarkMarker, mark_native, query_pairs
from models.classification import build_timm_classifier
from models.generator import ConditionalUNetGenerator
from watermark.kit_io import OwnerKitError
from watermark.xmark.kit import build_xmark_secret, read_xmark_secret, write_xmark_secret
from watermark.xmark.stats import xmark_test

GEN_CFG = {"in_channels": 1, "saliency_channels": 1, "base_width": 4, "depth": 2, "epsilon": 8 / 255}
SUR_CFG = {"_target_": "models.build_timm_classifier", "name": "small_cnn", "num_classes": 2, "in_channels": 1}


def saturated_marker(epsilon: float = 8 / 255, image_size: int = 32) -> XMarkMarker:
    """A marker whose δ sits at ±ε almost everywhere (large head weights): the worst case for L∞."""
    torch.manual_seed(0)
    generator = ConditionalUNetGenerator(**{**GEN_CFG, "epsilon": epsilon})
    torch.nn.init.normal_(generator.head.weight, std=50.0)
    surrogate = build_timm_classifier(name="small_cnn", num_classes=2, in_channels=1)
    return XMarkMarker(generator, surrogate, {**GEN_CFG, "epsilon": epsilon}, SUR_CFG, image_size)


@pytest.mark.parametrize("epsilon", [8 / 255, 8.6 / 255])
@pytest.mark.parametrize("native", [32, 48])
def test_marked_png_round_trip_stays_within_epsilon_exactly(tmp_path, epsilon, native):
    marker = saturated_marker(epsilon)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(native, native), dtype=np.uint8)
    pixels[:4] = 0
    pixels[-4:] = 255  # clipping at both ends
    marked = mark_native(marker, pixels, channels=1)
    assert marked.dtype == np.uint8 and marked.shape == pixels.shape
    path = tmp_path / "view1_frontal.jpg"  # PNG bytes under the CSV's name, as the release writes
    Image.fromarray(marked).save(path, format="PNG")
    stored = np.asarray(Image.open(path))
    diff = np.abs(stored.astype(int) - pixels.astype(int))
    assert np.array_equal(stored, marked)
    assert diff.max() / 255 <= epsilon
    assert diff.max() == int(np.floor(255 * epsilon))  # saturated: the budget is used, not more
    rgb = np.repeat(pixels[..., None], 3, axis=2)
    marked_rgb = mark_native(marker, rgb, channels=1)
    assert marked_rgb.shape == rgb.shape and np.abs(marked_rgb.astype(int) - rgb.astype(int)).max() / 255 <= epsilon


def test_float_target_of_a_high_bit_depth_image_uses_the_budget_and_no_more():
    from watermark.xmark.marker import mark_native_unit

    epsilon = 4 / 255
    marker = saturated_marker(epsilon)
    unit = np.random.default_rng(2).uniform(0.1, 0.9, (40, 36))  # away from 0 and 1: nothing clips
    target = mark_native_unit(marker, unit, channels=1)
    change = np.abs(target - unit)
    assert target.shape == unit.shape and target.dtype == np.float64
    # saturated δ: the whole budget and no more (up to float64 rounding: x + ε − x is ε ± 1 ulp)
    assert change.max() <= epsilon + 1e-15 and change.max() > 0.99 * epsilon
    with pytest.raises(ValueError, match="H×W grey"):
        mark_native_unit(marker, unit[..., None], channels=1)


def test_a_grey_file_is_marked_by_a_three_channel_generator_within_epsilon():
    torch.manual_seed(0)
    config = {**GEN_CFG, "in_channels": 3}
    generator = ConditionalUNetGenerator(**config)
    torch.nn.init.normal_(generator.head.weight, std=50.0)
    marker = XMarkMarker(generator, build_timm_classifier(name="small_cnn", num_classes=2, in_channels=3), config,
                         {**SUR_CFG, "in_channels": 3}, 32)
    pixels = np.random.default_rng(3).integers(20, 236, (32, 32), dtype=np.uint8)
    marked = mark_native(marker, pixels, channels=3)  # one δ, the mean of the three channels'
    assert marked.shape == pixels.shape and 0 < np.abs(marked.astype(int) - pixels).max() <= int(255 * 8 / 255)


def test_marker_file_round_trips_and_bad_files_are_named(tmp_path):
    marker = saturated_marker()
    path = marker.save(tmp_path / "generator.pt")
    again = load_marker(path)
    x = torch.rand(3, 1, 32, 32)
    a, b = marker.mark(x), again.mark(x)
    assert torch.equal(a["marked"], b["marked"]) and a["saliency"].shape == (3, 1, 32, 32)
    assert a["delta"].abs().max() <= marker.epsilon and not torch.equal(a["marked"], x)
    with pytest.raises(MarkerError, match="not_there.pt"):
        load_marker(tmp_path / "not_there.pt")
    torch.save({"format": "something-else"}, tmp_path / "foreign.pt")
    with pytest.raises(MarkerError, match="foreign.pt.*'format'"):
        load_marker(tmp_path / "foreign.pt")
    bundle = torch.load(path, weights_only=True)
    bundle["surrogate_config"]["_target_"] = "os.system"
    torch.save(bundle, tmp_path / "evil.pt")
    with pytest.raises(MarkerError, match="surrogate_config._target_"):
        load_marker(tmp_path / "evil.pt")


def _secret(**changes) -> dict:
    doc = build_xmark_secret(
        target_class=1, classes=["No Finding", "Lung Opacity"], marker_checkpoint="generator.pt",
        marker_sha256="0" * 64, image_size=32, verification_ids=["a", "b", "c"], verification_split="test",
        verification_seed=3, data_config={"_target_": "datamodules.MedicalImageDataModule"}, tau=0.2, alpha=0.01,
        release={"fraction": 0.8, "marked_ids": ["x"]},
    )
    doc.update(changes)
    return doc


def test_secret_is_written_private_and_every_bad_field_is_named(tmp_path):
    path = write_xmark_secret(tmp_path / "secret.json", _secret())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = read_xmark_secret(path)
    assert doc["m"] == 3 and doc["thresholds"] == {"tau": 0.2, "alpha": 0.01} and doc["method"] == "xmark"
    for field, value in (("target_class", 5), ("m", 7), ("thresholds", {"tau": 0.2}),
                         ("thresholds", {"tau": 0.2, "alpha": 1.5}), ("classes", ["one"])):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(_secret(**{field: value})))
        with pytest.raises(OwnerKitError, match=rf"bad.json: field '{field}"):
            read_xmark_secret(bad)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(OwnerKitError, match="broken.json.*not valid JSON"):
        read_xmark_secret(tmp_path / "broken.json")


def test_query_pairs_and_test_give_known_verdicts():
    """A predictor that reacts to the mark verifies; one that ignores it does not."""
    images, marked = torch.zeros(20, 1, 8, 8), torch.full((20, 1, 8, 8), 0.1)

    def reacts(x):  # P(y_t) = 0.1 on clean, 0.9 on marked
        p = 0.1 + 8 * x.mean(dim=(1, 2, 3)) + 0.01 * torch.arange(len(x))
        return torch.stack([1 - p, p], 1)

    def ignores(x):
        p = torch.full((len(x),), 0.3) + 0.01 * torch.arange(len(x))
        return torch.stack([1 - p, p], 1)

    pairs = query_pairs(reacts, images, marked, target_class=1, batch_size=7)
    result = xmark_test(pairs["p_benign"], pairs["p_marked"], 0.2, 0.01, pairs["pred_marked"], 1)
    assert result["verified"] and result["wsr"] == 1.0 and result["delta_p"] == pytest.approx(0.8)
    pairs = query_pairs(ignores, images, marked, target_class=1)
    result = xmark_test(pairs["p_benign"], pairs["p_marked"], 0.2, 0.01, pairs["pred_marked"], 1)
    assert not result["verified"] and result["delta_p"] == 0.0 and result["wsr"] == 0.0


def test_default_method_config_needs_real_lpips_weights(tmp_path):
    cfg = compose_config(["method=xmark", "data=synthetic_cxr", "backbone=small_cnn", "loss=classification",
                          f"paths.weights_dir={tmp_path / 'no_weights'}"], tmp_path)
    assert cfg.optimized_metric == "val/xmark_score"
    assert set(cfg.loss) >= {"ce", "targeted", "untargeted", "indm", "lpips", "laplacian"}
    with pytest.raises(Exception, match="alexnet-owt-7be5be79.pth"):
        instantiate(cfg.method, backbone=cfg.backbone, loss=cfg.loss, _recursive_=False)
    cfg = compose_config(["experiment=xmark_synthetic"], tmp_path)
    assert cfg.loss.lpips.random_backbone is True  # the synthetic experiment opts in explicitly
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert plain["callbacks"]["xmark_release"]["data"]["layout"] == "chexpert"


def test_release_pool_keeps_the_validation_split_clean():
    """pool=train marks only train-split images (the val split stays clean); train+val draws from both."""
    from types import SimpleNamespace

    from callbacks.xmark import XMarkRelease

    def sample(split, i, label):
        return SimpleNamespace(id=f"{split}{i:02d}", label=label)

    splits = {name: [sample(name, i, i % 2) for i in range(n)] for name, n in (("train", 40), ("val", 20), ("test", 10))}
    datamodule = SimpleNamespace(splits=splits)
    common = dict(output_dir=".", release_dir="r", owner_dir="o", data={}, seed=5,
                  verification={"split": "test", "num_images": 4, "seed": 1}, thresholds={"tau": 0.2, "alpha": 0.01},
                  owner_id="t")
    val_ids = {s.id for s in splits["val"]}
    chosen = XMarkRelease(fraction=1.0, **common).choose_marked(datamodule, target_class=1)
    assert len(chosen) == 20 and all(s.label == 1 and s.id not in val_ids for s in chosen)
    both = XMarkRelease(fraction=1.0, pool="train+val", **common).choose_marked(datamodule, target_class=1)
    assert len(both) == 30 and any(s.id in val_ids for s in both)
    part = XMarkRelease(fraction=0.5, **common).choose_marked(datamodule, target_class=1)
    assert len(part) == 10 and {s.id for s in part} < {s.id for s in chosen}
    with pytest.raises(ValueError, match="pool"):
        XMarkRelease(fraction=1.0, pool="everything", **common)
    with pytest.raises(ValueError, match=r"heldout_control: unknown field\(s\) \['epoch'\]"):
        XMarkRelease(fraction=1.0, heldout_control={"epoch": 3}, **common)
    release = XMarkRelease(fraction=1.0, heldout_control={"epochs": 0}, control_checkpoints=["/no/such.ckpt"], **common)
    with pytest.raises(ValueError, match=r"control_checkpoints\[0\].*no/such.ckpt"):
        release.heldout_models(pl_module=None, datamodule=None)


# ------------------------------------------------------------------------- miniature pipeline

# Miniature: 32 px, 240 images, tiny generator, ε = 16/255 and a fast generator learning rate
# so that the mark is learnt in ~100 iterations; LPIPS off (its random backbone adds time, not
# signal, here). Measured with these settings: proxy Mal ΔP ≈ 0.5 (p ≈ 2e-5), clean control ΔP ≈ 0.
TINY_XMARK = [
    "experiment=xmark_synthetic", "logger=none",
    "data.synthetic.num_images=240", "data.synthetic.image_size=32", "data.image_size=32", "data.batch_size=16",
    "method.warmup_steps=30", "method.proxy_steps=1", "method.mark_fraction=1.0",
    "method.generator.base_width=8", "method.generator.depth=2", "method.generator.epsilon=0.0627450980392157",
    "method.generator_optimizer.lr=0.005", "loss.lpips=null",
    "callbacks.xmark_release.verification.num_images=30", "trainer.max_epochs=8",
    "method.generator_steps=null",  # the epoch budget these figures were measured with
    # explicit seeds (the config's are null = drawn): the figures below were measured with these
    "callbacks.xmark_release.seed=20260401", "callbacks.xmark_release.verification.seed=20260402",
    "test=false", "callbacks.validation_panels=null",
]
TINY_SUSPECT = [
    "experiment=task_cls_synthetic", "backbone=small_cnn", "logger=none", "data.image_size=32",
    "data.batch_size=16", "data.augment.hflip=0.0", "trainer.max_epochs=8", "test=false", "eval_untrained=false",
    "callbacks.validation_panels=null",
]


def _train(overrides: list[str], tmp_path: Path, name: str) -> Path:
    from utils.run import run_training

    cfg = compose_config(overrides + [f"paths.output_dir={tmp_path / name}"], tmp_path)
    run_training(cfg)
    return tmp_path / name


def _verify(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "verify.py"), *args, f"paths.data_dir={tmp_path / 'data'}",
           f"paths.log_dir={tmp_path / 'logs'}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xmark")
    run = _train(TINY_XMARK, tmp, "xmark")
    released = run / "released"
    mal = _train(TINY_SUSPECT + ["data=chexpert", f"data.root={released}", "data.synthetic=null"], tmp, "mal")
    source = json.loads((run / "release.json").read_text())["source"]
    ind_m = _train(TINY_SUSPECT + ["data=chexpert", f"data.root={source}", "data.synthetic=null", "seed=7"],
                   tmp, "ind_m")
    return tmp, run, mal, ind_m


@pytest.mark.slow
def test_release_contract(pipeline):
    tmp, run, _, _ = pipeline
    report = json.loads((run / "release.json").read_text())
    source, released = Path(report["source"]), Path(report["release_dir"])
    secret = read_xmark_secret(run / "owner" / "secret.json")
    marked = set(secret["release"]["marked_ids"])
    assert report["num_marked"] == len(marked) > 0 and report["linf_within_epsilon"]
    for csv in ("train.csv", "valid.csv"):
        assert (released / "CheXpert-v1.0-small" / csv).read_bytes() == (source / "CheXpert-v1.0-small" / csv).read_bytes()
    # the ordinary chexpert preset reads the release: same samples, same labels
    cfgs = [compose_config(["data=chexpert", f"data.root={root}", "data.image_size=32"], tmp).data
            for root in (source, released)]
    dms = [instantiate(c) for c in cfgs]
    for dm in dms:
        dm.setup()
    src = {s.id: s for split in dms[0].splits.values() for s in split}
    rel = {s.id: s for split in dms[1].splits.values() for s in split}
    assert src.keys() == rel.keys() and all(src[i].label == rel[i].label for i in src)
    eps = secret["release"]["epsilon"]
    changed = 0
    for sample_id, s in src.items():
        a, b = Path(s.image.path).read_bytes(), Path(rel[sample_id].image.path).read_bytes()
        if sample_id in marked:
            assert src[sample_id].label == secret["target_class"]
            x, xw = (np.asarray(Image.open(p)).astype(int) for p in (s.image.path, rel[sample_id].image.path))
            assert Image.open(rel[sample_id].image.path).format == "PNG"
            assert np.abs(xw - x).max() / 255 <= eps
            changed += a != b
        else:
            assert a == b, f"{sample_id} is not byte-identical"
    assert changed == len(marked)
    assert all(i not in marked for i in secret["verification"]["ids"])
    assert list((run / "figures").glob("xmark_panel_epoch*.png"))
    public = OmegaConf.load(run / "config.yaml").callbacks.xmark_release  # seeds hashed for loggers
    assert str(public.seed).startswith("<secret") and str(public.verification.seed).startswith("<secret")


@pytest.mark.slow
def test_mal_verifies_and_ind_m_does_not(pipeline):
    tmp, run, mal, ind_m = pipeline
    secret = run / "owner" / "secret.json"
    proc = _verify(tmp, f"secret={secret}", f"suspect={mal / 'checkpoints' / 'last.ckpt'}", f"out={tmp / 'v_mal'}")
    report = json.loads((tmp / "v_mal" / "report.json").read_text())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert {"method", "verified", "p_value", "delta_p", "wsr", "m", "tau", "alpha", "queries"} <= set(report)
    assert report["method"] == "xmark" and report["verified"] and report["p_value"] < 0.01
    assert report["delta_p"] > report["tau"] and report["queries"] >= 2 * report["m"]
    assert (tmp / "v_mal" / "report.md").is_file() and len(report["figures"]) == 2
    assert all(Path(p).is_file() for p in report["figures"])

    # Ind-M in-process (same protocol function verify.py dispatches to; saves an interpreter start)
    from verification.xmark import run as verify_xmark

    cfg = compose_config([f"secret={secret}", f"suspect={ind_m / 'checkpoints' / 'last.ckpt'}",
                          f"out={tmp / 'v_ind'}"], tmp, config_name="verify")
    assert verify_xmark(cfg) == 1
    report = json.loads((tmp / "v_ind" / "report.json").read_text())
    assert not report["verified"] and report["p_value"] >= 0.05 and report["delta_p"] < report["tau"]

    # The release recorded a clean model the generator never saw (heldout_0) next to the training
    # loop's own clean model; it must fail here, and were it to pass, nothing could be claimed.
    release = json.loads((run / "release.json").read_text())
    assert {"reference_0", "heldout_0"} <= set(release["control"])
    assert not release["control"]["heldout_0"]["verified"]
    doc = json.loads(secret.read_text())
    doc["control"]["heldout_0"]["verified"] = True
    leaky = run / "owner" / "secret_control_passes.json"
    leaky.write_text(json.dumps(doc))
    os.chmod(leaky, 0o600)
    cfg = compose_config([f"secret={leaky}", f"suspect={mal / 'checkpoints' / 'last.ckpt'}",
                          f"out={tmp / 'v_leak'}"], tmp, config_name="verify")
    assert verify_xmark(cfg) == 1
    report = json.loads((tmp / "v_leak" / "report.json").read_text())
    assert not report["verified"] and not report["control_fails"] and report["p_value"] < 0.01


@pytest.mark.slow
def test_suspect_classification_path_and_bad_input_exit_2(pipeline, tmp_path):
    tmp, run, mal, _ = pipeline
    suspect = CheckpointSuspect(mal / "checkpoints" / "last.ckpt", task="classification")
    probs = suspect.predict(torch.rand(3, 1, 32, 32))
    assert probs.shape == (3, 2) and torch.allclose(probs.sum(1), torch.ones(3)) and suspect.queries == 3
    with pytest.raises(SuspectError, match="hyper_parameters.task"):
        CheckpointSuspect(mal / "checkpoints" / "last.ckpt")  # segmentation expected

    secret = run / "owner" / "secret.json"
    doc = json.loads(secret.read_text())
    del doc["thresholds"]["tau"]
    bad = tmp_path / "tampered_secret.json"
    bad.write_text(json.dumps(doc))
    proc = _verify(tmp, f"secret={bad}", f"suspect={tmp_path / 'no_such.ckpt'}", f"out={tmp_path / 'r1'}")
    assert proc.returncode == 2 and "tampered_secret.json" in proc.stderr and "thresholds.tau" in proc.stderr
    with pytest.raises(SuspectError, match="no_such.ckpt"):  # what verify.py turns into exit 2
        CheckpointSuspect(tmp_path / "no_such.ckpt", task="classification")
