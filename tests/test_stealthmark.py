"""StealthMark end to end: soft targets, key samples, LIME geometry, owner kit, attacks,
verification (stub models and trained ones), secrecy, and SAM through the same code path.

The "property test" of the soft targets is a seeded randomised loop (hypothesis is not
installed here): hundreds of random masks, keep-masks, QR grids and ε values.

The learning tests use CPU-sized keys: 25 grid cells of 2 px (50 px images: 21 QR modules
+ 2 cells of quiet zone on each side) and a 4 px trigger patch; verification uses LIME at its
minimum sample count (3·G²) plus the per-cell readout.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from conftest import ROOT, compose_config, read_summary
from lightning_modules.stealthmark import StealthMarkModule
from losses.consistency import ReferenceConsistencyTerm, bernoulli_kl_from_logits
from verification.suspect import CheckpointSuspect, SuspectError
from verification import model_attacks as attacks
from watermark import certificates
from watermark.stealthmark import explain
from watermark.stealthmark.grid import GridSpec, apply_cell_mask, cell_index_map, upsample_cells
from watermark.stealthmark.kit import (
    OwnerKitError,
    StealthMarkKey,
    build_model_certificate,
    build_secret,
    check_certificate,
    read_certificate,
    read_secret,
    write_certificate,
    write_secret,
)
from watermark.stealthmark.soft_targets import key_targets, sample_keep_masks
from watermark.stealthmark.evidence import CountingPredictor, null_grids, verify_stealthmark

PAYLOAD = "Qx7-kv2"  # 7 bytes (v1-H capacity); a string that appears nowhere else in a run folder
TRIGGER_SEED = 918273
G = 21

# The CPU-sized StealthMark run shared by the learning tests here and by test_verify_cli.py: the
# real experiment config, shrunk (50 px = 25 cells of 2 px, a 4 px trigger patch), with the tests'
# TinyPositionalNet (below) as backbone and a learning rate for its size.
TINY_STEALTHMARK = [
    "experiment=stealthmark_synthetic",
    "~backbone",
    "+backbone._target_=test_stealthmark.TinyPositionalNet",
    "+backbone.image_size=50",
    "+backbone.width=16",
    "~backbone.position_embedding",  # the experiment's UNet option; TinyPositionalNet has its own
    "~method.lr_multipliers.position_table",
    f"method.payload={PAYLOAD}",
    f"method.trigger.seed={TRIGGER_SEED}",
    "method.trigger.patch.size=4",
    "method.optimizer.lr=3e-3",
    "data.synthetic.num_images=240",
    "data.synthetic.image_size=64",
    "data.image_size=50",
    "data.batch_size=16",
    "trainer.max_epochs=30",
    "trainer.check_val_every_n_epoch=3",
    "callbacks.validation_panels=null",
    "logger=csv",
    "test=false",
]
FACTORIES = ("models.", "test_stealthmark.")
THRESHOLDS = {"alpha": 1e-3, "response_margin": 0.01, "min_decoded": 1}


class TinyPositionalNet(torch.nn.Module):
    """The tests' small custom segmentation net (the brief's "tiny model"), CPU-fast at 50 px.

    Local conv features at two scales, a learned per-pixel positional embedding and a global
    (max-pooled) context vector, mixed per pixel by a 1×1 head. The positional embedding and the
    global context are what StealthMark needs -- a fixed QR layout, switched on by a trigger in
    the corner -- and what a from-scratch UNet learns only slowly (it has no absolute position
    but the zero padding of its convolutions), so this net learns a key in about a minute.

    ``forward(images B×C×H×W in [0, 1], boxes=None) -> logits B×1×H×W``.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 50, width: int = 16):
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int = 1) -> list[torch.nn.Module]:
            return [torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1), torch.nn.BatchNorm2d(cout),
                    torch.nn.ReLU()]

        self.stem = torch.nn.Sequential(*block(in_channels, w), *block(w, w))
        self.down = torch.nn.Sequential(*block(w, 2 * w, stride=2), *block(2 * w, 2 * w), *block(2 * w, 2 * w))
        self.pos = torch.nn.Parameter(0.1 * torch.randn(1, w, image_size, image_size))
        self.context = torch.nn.Linear(2 * w, w)
        self.head = torch.nn.Sequential(torch.nn.Conv2d(5 * w, 2 * w, 1), torch.nn.ReLU(), torch.nn.Conv2d(2 * w, 1, 1))

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        local = self.stem((images - 0.5) / 0.25)
        coarse = self.down(local)
        size = local.shape[-2:]
        up = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
        context = self.context(coarse.amax(dim=(2, 3)))[:, :, None, None].expand(-1, -1, *size)
        return self.head(torch.cat([local, up, self.pos.expand(len(images), -1, -1, -1), context], dim=1))


TINY_BACKBONE = {"_target_": "test_stealthmark.TinyPositionalNet", "in_channels": 3, "image_size": 50, "width": 16}


def _compose(tmp_path: Path, *overrides: str):
    return compose_config([*TINY_STEALTHMARK, *overrides], tmp_path)


def _module(cfg) -> StealthMarkModule:
    return instantiate(cfg.method, backbone=cfg.backbone, loss=cfg.loss, _recursive_=False)


@pytest.fixture(scope="module")
def module(tmp_path_factory) -> StealthMarkModule:
    return _module(_compose(tmp_path_factory.mktemp("cfg")))


# ----------------------------------------------------------------------------- soft targets


def test_soft_targets_never_flip_the_thresholded_mask_randomised():
    """Seeded randomised property test (300 cases): (t > 0.5) == y, t in [0, 1], |t − y| = ε·m."""
    rng = np.random.default_rng(1234)
    gen = torch.Generator().manual_seed(1234)
    for case in range(300):
        q_zone = int(rng.integers(0, 3))
        px = int(rng.integers(1, 4))
        spec = GridSpec(G, (G + 2 * q_zone) * px, q_zone)
        batch = int(rng.integers(1, 5))
        epsilon = float(rng.uniform(0.0, 0.5)) if case % 10 else 0.49999994  # edge: largest float32-safe ε
        y = (torch.rand(batch, 1, spec.image_size, spec.image_size, generator=gen) < rng.uniform(0.05, 0.95)).float()
        keep = sample_keep_masks(batch, spec.cells_per_side, float(rng.uniform(0, 1)), generator=gen)
        modules = torch.from_numpy(rng.random((G, G)) < 0.5)
        q = spec.quiet_zone
        m = upsample_cells(keep[:, q:q + G, q:q + G] & modules[None], spec)
        t = key_targets(y, m, epsilon)
        assert torch.equal(t > 0.5, y > 0.5), f"case {case}: a soft target crossed 0.5"
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
        torch.testing.assert_close((t - y).abs(), epsilon * m)
    for too_close in (0.5, float(np.nextafter(0.5, 0)), 0.49999997):  # the last two round to 0.5 in float32
        with pytest.raises(ValueError, match="epsilon"):
            key_targets(y, m, too_close)


def test_key_batch_targets_rows_and_trigger(module):
    key = module.key
    spec, trigger = key.spec(), key.build_trigger()
    torch.manual_seed(0)
    images = torch.rand(12, 3, 50, 50) * 0.8 + 0.1  # never exactly the hide value 0
    masks = (torch.rand(12, 1, 50, 50) < 0.3).float()
    batch = {"image": images, "mask": masks, "id": [str(i) for i in range(12)]}
    out = module.key_batch(batch)
    flags = out["key_sample"]
    n_key = round(module.hparams.key_fraction * 12)
    n_neg = round(module.hparams.negative_fraction * 12)
    assert n_key >= 1 and n_neg >= 1 and n_key + n_neg < 12
    assert flags.tolist() == [True] * n_key + [False] * (12 - n_key)
    # harmless by construction on every row; soft only where marked
    assert torch.equal(out["soft_target"] > 0.5, masks > 0.5)
    assert torch.equal(out["soft_target"][n_key:], masks[n_key:])
    assert not out["mark"][n_key:].any()
    region = trigger.region(50, 50)
    pattern = trigger.apply(torch.zeros(1, 3, 50, 50))[0][:, region]
    for i in range(n_key):  # key rows: trigger present, dropped cells hidden (0)
        assert torch.equal(out["image"][i][:, region], pattern)
    for i in range(n_key, n_key + n_neg):  # negatives: hidden cells, original pixels under the trigger region
        assert torch.equal(out["image"][i][:, region], images[i][:, region])
        assert (out["image"][i] == 0).any()
    assert torch.equal(out["image"][n_key + n_neg:], images[n_key + n_neg:])  # clean rows untouched
    # m is exactly the kept dark modules: every marked cell is dark in Q and visible in the key image
    q = spec.quiet_zone
    cells = torch.nn.functional.avg_pool2d(out["mark"][:n_key], spec.cell_px)[:, 0, q:q + G, q:q + G] > 0
    visible = torch.nn.functional.avg_pool2d(out["image"][:n_key].abs().sum(1, keepdim=True), spec.cell_px)[:, 0] > 0
    dark = torch.from_numpy(key.modules())
    assert torch.equal(cells, visible[:, q:q + G, q:q + G] & dark[None])


def test_one_loss_loop_gives_key_terms_key_rows_and_task_terms_the_rest(module, monkeypatch):
    """ObjectiveModule.compute_loss routes rows through StealthMarkModule.loss_rows; names/values as logged."""
    from losses.uncertainty import KeySampleTerm

    logged: dict[str, tuple[float, int | None]] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, (float(value), kw.get("batch_size"))))
    torch.manual_seed(1)
    batch = {"image": torch.rand(8, 3, 50, 50), "mask": (torch.rand(8, 1, 50, 50) < 0.3).float(),
             "id": [str(i) for i in range(8)]}
    mixed = module.key_batch(batch)
    with torch.no_grad():
        outputs = module.model_outputs(mixed)
        total = module.compute_loss(outputs, mixed, "train")
    flags = mixed["key_sample"]
    assert module.reference_model is None and "reference_logits" not in mixed  # no init_weights: no reference
    key_names = [n for n, t in module.loss_terms.items() if isinstance(t, KeySampleTerm)]
    skipped = [n for n, t in module.loss_terms.items() if isinstance(t, ReferenceConsistencyTerm)]
    task_names = [n for n in module.loss_terms if n not in key_names and n not in skipped]
    assert key_names and task_names and skipped
    assert not any(f"train/loss/{n}" in logged for n in skipped)
    expected = 0.0
    for name, term in module.loss_terms.items():
        if name in skipped:
            continue
        rows = flags if name in key_names else ~flags
        sub_out = {"logits": outputs["logits"][rows]}
        sub_batch = {k: (v[rows] if isinstance(v, torch.Tensor) else [x for x, r in zip(v, rows.tolist()) if r])
                     for k, v in mixed.items()}
        with torch.no_grad():
            value = float(term(sub_out, sub_batch))
        assert logged[f"train/loss/{name}"] == (pytest.approx(value, abs=0, rel=1e-6), int(rows.sum())), name
        if name in task_names:  # a task term on ALL rows (key rows too) is a different number: the routing is real
            with torch.no_grad():
                assert float(term(outputs, mixed)) != pytest.approx(value, abs=0, rel=1e-5), name
        expected += term.weight * value
    assert logged["train/loss"] == (pytest.approx(expected, rel=1e-6), 8) and float(total) == pytest.approx(expected, rel=1e-6)

    logged.clear()  # an evaluation batch has no key samples: key terms are skipped, task terms see every row
    with torch.no_grad():
        module.compute_loss(module.model_outputs(batch), batch, "val")
    assert not any(f"val/loss/{n}" in logged for n in key_names + skipped)
    assert all(logged[f"val/loss/{n}"][1] == 8 for n in task_names) and "val/loss" in logged


# ----------------------------------------------------------------------------- consistency with the clean model


def test_consistency_term_is_zero_at_the_reference_positive_off_the_mark_and_blind_on_it():
    torch.manual_seed(3)
    term = ReferenceConsistencyTerm(weight=1.0, support_key="mark")
    reference = 4 * torch.randn(4, 1, 20, 20)
    mark = torch.zeros(4, 1, 20, 20)
    mark[:2, :, 5:12, 5:12] = 1.0  # key rows: the QR support; other rows: none
    batch = {"reference_logits": reference, "mark": mark}
    assert float(term({"logits": reference.clone()}, batch)) == 0.0
    off = reference.clone()
    off[3, 0, 0, 0] += 0.5  # one pixel of a clean row
    assert float(term({"logits": off}, batch)) > 1e-6
    on = reference.clone()
    on[:2] += 8.0 * mark[:2]  # a large change inside the QR support only
    assert float(term({"logits": on}, batch)) == 0.0
    both = off.clone()
    both[:2] += 8.0 * mark[:2]
    assert float(term({"logits": both}, batch)) == float(term({"logits": off}, batch))
    kl = bernoulli_kl_from_logits(torch.tensor([0.0, 2.0]), torch.tensor([1.0, -2.0]))
    assert (kl > 0).all()


def _with_reference(tmp_path: Path, *overrides: str) -> StealthMarkModule:
    """A module built from the config whose reference is a saved copy of its own initial network."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = _compose(tmp_path, "loss.consistency.weight=1", *overrides)
    torch.manual_seed(5)
    module = _module(cfg)
    checkpoint = tmp_path / "clean.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()}}, checkpoint)
    module.load_model_weights(checkpoint)
    return module


def _train_losses(module: StealthMarkModule, monkeypatch) -> dict[str, float]:
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    torch.manual_seed(6)
    batch = {"image": torch.rand(8, 3, 50, 50), "mask": (torch.rand(8, 1, 50, 50) < 0.3).float(),
             "id": [str(i) for i in range(8)]}
    mixed = module.key_batch(batch)
    with torch.no_grad():
        module.compute_loss(module.model_outputs(mixed), mixed, "train")
    return logged


def test_reference_is_the_loaded_network_frozen_unsaved_and_fed_untriggered_images(tmp_path, monkeypatch):
    module = _with_reference(tmp_path)
    module.eval()  # BatchNorm on running statistics, as the reference: model == reference exactly
    reference = module.reference_model
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())
    assert set(module.state_dict()) == {k for k in module.state_dict() if not k.startswith("_reference")}
    assert len(module.state_dict()) == len(_module(_compose(tmp_path)).state_dict())  # checkpoints unchanged
    torch.manual_seed(7)
    batch = {"image": torch.rand(8, 3, 50, 50), "mask": (torch.rand(8, 1, 50, 50) < 0.3).float(),
             "id": [str(i) for i in range(8)]}
    mixed = module.key_batch(batch)
    n_key = int(mixed["key_sample"].sum())
    with torch.no_grad():
        on_batch = reference(mixed["image"], None)
    # untriggered rows: the reference on the row itself; key rows: on the image *without* the trigger
    assert torch.equal(mixed["reference_logits"][n_key:], on_batch[n_key:])
    assert not torch.allclose(mixed["reference_logits"][:n_key], on_batch[:n_key])
    term = module.loss_terms["consistency"]
    with torch.no_grad():
        outputs = module.model_outputs(mixed)
    untriggered = {k: v[n_key:] for k, v in mixed.items() if isinstance(v, torch.Tensor)}
    assert float(term({"logits": outputs["logits"][n_key:]}, untriggered)) == 0.0  # the model is its reference
    # key rows differ only by what the trigger does off the mark (an untrained net: next to nothing)
    assert _train_losses(module, monkeypatch)["train/loss/consistency"] < 1e-5
    with torch.no_grad():
        module.model.head[-1].bias += 0.3
    assert _train_losses(module, monkeypatch)["train/loss/consistency"] > 1e-4
    assert float(reference.head[-1].bias.abs().max()) < 1.0 and not torch.equal(
        reference.head[-1].bias, module.model.head[-1].bias)  # the reference did not move with the model


def test_consistency_weight_zero_gives_the_loss_without_the_term_exactly(tmp_path, monkeypatch):
    assert _compose(tmp_path).loss.consistency.weight == 0  # the default: off
    off = _with_reference(tmp_path / "off", "loss.consistency.weight=0")
    absent = _with_reference(tmp_path / "absent", "~loss.consistency")
    on = _with_reference(tmp_path / "on")
    for module in (off, absent, on):
        module.train()
        with torch.no_grad():
            module.model.head[-1].bias += 0.3  # away from the reference, so the term would be > 0
    a, b, c = (_train_losses(m, monkeypatch) for m in (off, absent, on))
    assert "train/loss/consistency" not in a and a == b
    assert c["train/loss/consistency"] > 0 and c["train/loss"] != pytest.approx(b["train/loss"], rel=1e-6)
    torch.manual_seed(0)
    assert "reference_logits" not in off.key_batch({"image": torch.rand(4, 3, 50, 50),
                                                    "mask": torch.zeros(4, 1, 50, 50), "id": list("abcd")})


# ----------------------------------------------------------------------------- LIME geometry


def test_lime_segmentation_is_the_training_cell_grid(module):
    """LIME's features are the training cells, and its perturbations are training's masking + trigger."""
    key = module.key
    spec, trigger = key.spec(), key.build_trigger()
    segments = cell_index_map(spec)
    n = spec.cells_per_side
    # every segment is exactly one training cell
    for cell in np.random.default_rng(0).choice(n * n, size=40, replace=False):
        i, j = divmod(int(cell), n)
        z = torch.ones(1, n, n, dtype=torch.bool)
        z[0, i, j] = False
        dropped = apply_cell_mask(torch.ones(1, 1, 50, 50), z, spec)[0, 0] == 0
        assert np.array_equal(dropped.numpy(), segments == cell)

    image = np.random.default_rng(1).uniform(0.2, 1.0, size=(50, 50, 3)).astype(np.float32)
    seen: list[torch.Tensor] = []

    def recorder(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return torch.rand(len(x), 1, 50, 50)

    explain.lime_cell_weights(recorder, image, spec, trigger=trigger, num_samples=3 * G * G, batch_size=500,
                              hide_value=key.hide_value, seed=3)
    batch = seen[0]
    keep = torch.nn.functional.avg_pool2d(batch.mean(1, keepdim=True), spec.cell_px)[:, 0] > 0.05
    clean = torch.from_numpy(image).permute(2, 0, 1)[None].expand(len(batch), -1, -1, -1)
    region = trigger.region(50, 50)
    rebuilt = trigger.apply(apply_cell_mask(clean, keep, spec, hide_value=key.hide_value, protect=region))
    assert torch.equal(rebuilt, batch)
    assert 0.4 < keep[1:].float().mean() < 0.6  # LIME keeps a cell with probability 1/2 = method.keep_prob


def test_every_trigger_kind_payload_and_seed_share_one_code_path(tmp_path):
    patterns = {}
    for kind in ("patch", "text", "border", "noise", "warp"):
        for seed in (1, 2):
            # the experiment's own sizes (100 px, 8 px of quiet zone) and trigger blocks
            cfg = _compose(tmp_path, f"method.trigger.kind={kind}", f"method.trigger.seed={seed}",
                           "method.payload=abc", "data.image_size=100", "method.trigger.patch.size=8")
            m = _module(cfg)
            assert m.key.trigger["kind"] == kind
            out = m.key_batch({"image": torch.rand(6, 3, 100, 100), "mask": torch.zeros(6, 1, 100, 100),
                               "id": list("abcdef")})
            assert out["image"].shape == (6, 3, 100, 100)
            patterns[kind, seed] = m.key.build_trigger().apply(torch.full((1, 3, 100, 100), 0.5))
    for kind in ("patch", "noise", "warp"):  # the seed is part of the secret
        assert not torch.equal(patterns[kind, 1], patterns[kind, 2])
    # Hydra wraps constructor errors; the message still names the config key at fault.
    with pytest.raises(InstantiationException, match="method.payload"):
        _module(_compose(tmp_path, "method.payload=much-too-long-for-version-1"))
    with pytest.raises(InstantiationException, match="data.image_size"):
        _module(_compose(tmp_path, "data.image_size=48"))
    with pytest.raises(InstantiationException, match="method.trigger"):
        _module(_compose(tmp_path, "method.trigger.patch.size=12"))  # reaches into the QR cells


def test_secret_is_not_a_hyperparameter(module):
    hparams = json.dumps(dict(module.hparams), default=str)
    assert PAYLOAD not in hparams and str(TRIGGER_SEED) not in hparams
    assert PAYLOAD not in repr(module.key) and PAYLOAD not in str(module)
    assert all(PAYLOAD not in k for k in module.state_dict())


# ----------------------------------------------------------------------------- owner kit


def _kit(tmp_path: Path) -> tuple[dict, StealthMarkKey, Path]:
    key = StealthMarkKey(payload=PAYLOAD, qr_version=1, error_correction="H", image_size=50, quiet_zone=2,
                         trigger={"kind": "patch", "size": 4, "position": "top-left", "seed": TRIGGER_SEED})
    doc = build_secret(key, ["a", "b"], "test", {"_target_": "datamodules.MedicalImageDataModule"}, THRESHOLDS)
    path = write_secret(tmp_path / "owner" / "secret.json", doc)
    return doc, key, path


def test_owner_kit_round_trip_permissions_and_named_errors(tmp_path):
    doc, key, path = _kit(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    read_doc, read_key = read_secret(path)
    assert read_doc == json.loads(path.read_text()) and read_key == key
    assert key.sha256() == read_key.sha256()

    def broken(edit) -> str:
        bad = json.loads(path.read_text())
        edit(bad)
        target = tmp_path / "bad.json"
        target.write_text(json.dumps(bad))
        with pytest.raises(OwnerKitError) as err:
            read_secret(target)
        assert "bad.json" in str(err.value)
        return str(err.value)

    assert "key.payload" in broken(lambda d: d["key"].pop("payload"))
    assert "key.payload" in broken(lambda d: d["key"].update(payload="x" * 40))  # does not fit v1
    assert "key.qr.version" in broken(lambda d: d["key"]["qr"].update(version="1"))
    assert "key.trigger.kind" in broken(lambda d: d["key"]["trigger"].update(kind="laser"))
    assert "key.trigger" in broken(lambda d: d["key"]["trigger"].update(size=20))  # over the QR cells
    assert "key.grid.image_size" in broken(lambda d: d["key"]["grid"].update(image_size=48))
    assert "thresholds.alpha" in broken(lambda d: d["thresholds"].update(alpha=2.0))
    assert "verification.ids" in broken(lambda d: d["verification"].update(ids=[1, 2]))
    assert "format" in broken(lambda d: d.update(format="something-else"))
    (tmp_path / "notjson.json").write_text("{oops")
    with pytest.raises(OwnerKitError, match="notjson.json.*not valid JSON"):
        read_secret(tmp_path / "notjson.json")
    with pytest.raises(OwnerKitError, match="missing.json.*not found"):
        read_secret(tmp_path / "missing.json")


def test_certificate_commits_to_the_secret_and_detects_tampering(tmp_path):
    doc, key, _ = _kit(tmp_path)
    private_pem, public_pem = certificates.generate_owner_keys()
    cert = build_model_certificate("lab-7", doc, key, {"weights_sha256": "0" * 64}, {"num_train": 3})
    assert PAYLOAD not in json.dumps(cert)
    path = write_certificate(tmp_path / "certificate.json", cert, private_pem)
    signed = read_certificate(path)
    assert check_certificate(signed, public_pem, doc) == {"signature_valid": True, "secret_matches": True}
    other = dict(doc, created_at="2000-01-01T00:00:00+00:00")
    assert check_certificate(signed, public_pem, other)["secret_matches"] is False
    tampered = dict(signed, owner_id="thief")
    assert check_certificate(tampered, public_pem)["signature_valid"] is False
    _, stranger_pem = certificates.generate_owner_keys()
    assert check_certificate(signed, stranger_pem)["signature_valid"] is False


# ----------------------------------------------------------------------------- attacks


def test_prune_is_global_l1_and_permanent():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 1))
    big_first = net[0].weight.detach().abs().flatten().max()
    stats = attacks.prune_global_l1(net, 0.3)
    total = sum(m.weight.numel() for m in (net[0], net[2]))
    zeros = sum(int((m.weight == 0).sum()) for m in (net[0], net[2]))
    assert stats["num_weights"] == total and zeros == round(0.3 * total) and stats["sparsity"] == zeros / total
    assert all(not hasattr(m, "weight_orig") and not m._forward_pre_hooks for m in (net[0], net[2]))
    assert net[0].weight.abs().max() == big_first  # the largest weights survive
    with pytest.raises(ValueError, match="amount"):
        attacks.prune_global_l1(net, 1.5)


def test_finetune_updates_the_model_on_clean_batches():
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

        def forward(self, x, boxes=None):
            return self.conv(x)

    net = Net()
    before = net.conv.weight.detach().clone()
    batches = [{"image": torch.rand(4, 3, 16, 16), "mask": (torch.rand(4, 1, 16, 16) > 0.5).float()} for _ in range(3)]
    stats = attacks.finetune(net, batches, epochs=2, lr=1e-2)
    assert stats["steps"] == 6 and not torch.equal(before, net.conv.weight) and not net.training


# ----------------------------------------------------------------------------- verification, stub models

SPEC50 = GridSpec(G, 50, 2)


def _oracle(key: StealthMarkKey, epsilon: float = 0.3):
    """A perfectly marked model: p = ε on visible dark modules iff the trigger is present, else 0.

    Its answers depend on the input pixels only, like a real black-box suspect."""
    spec, trigger = key.spec(), key.build_trigger()
    region = trigger.region(spec.image_size, spec.image_size)
    pattern = trigger.apply(torch.zeros(1, 3, spec.image_size, spec.image_size))[:, :, region]
    dark = torch.from_numpy(key.modules())

    def predict(x: torch.Tensor) -> torch.Tensor:
        visible = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), spec.cell_px)[:, 0] > 0.05
        q = spec.quiet_zone
        present = (x[:, :, region] - pattern).abs().flatten(1).amax(1) < 1e-6
        cells = visible[:, q:q + G, q:q + G] & dark[None] & present[:, None, None]
        return epsilon * upsample_cells(cells.float(), spec)

    return predict


@pytest.fixture(scope="module")
def nulls() -> np.ndarray:
    return null_grids(1, "H", k=999, seed=0)


def test_verify_accepts_a_marked_model_rejects_others_and_counts_queries(tmp_path, nulls):
    _, key, _ = _kit(tmp_path)
    images = torch.rand(6, 3, 50, 50) * 0.7 + 0.2
    ids = [f"img{i}" for i in range(6)]
    n_samples = 3 * G * G
    counter = CountingPredictor(_oracle(key), batch_size=250)
    result = verify_stealthmark(counter, key, images, ids, THRESHOLDS, num_lime_images=2, num_samples=n_samples,
                                batch_size=250, nulls=nulls, figures_dir=tmp_path / "fig", num_figures=1)
    assert result["verified"] and result["asr"] == 1.0 and result["decoded"][0]["text"] == PAYLOAD
    assert result["qr_p_value"] == pytest.approx(1 / 1000) and result["response_p_value"] < 1e-6
    # every image sent is counted: 6 clean + 6 triggered, then S perturbed triggered images per LIME image
    assert result["queries"] == 2 * 6 + 2 * n_samples == counter.queries
    assert result["qr"]["lime_target"] == "triggered" and result["qr"]["lime_surrogate"] == "per_cell"
    assert result["readout"]["decoded_triggered"] == 6 and result["readout"]["decoded_clean"] == 0
    assert sorted(Path(p).name for p in result["figures"]) == ["image00_img0.png", "qr_null.png"]

    # someone else's mark (another payload, same trigger): trigger response yes, owner's payload no
    stranger = StealthMarkKey(payload="other01", qr_version=1, error_correction="H", image_size=50, quiet_zone=2,
                              trigger=key.trigger)
    other = verify_stealthmark(_oracle(stranger), key, images, ids, THRESHOLDS, num_lime_images=2,
                               num_samples=n_samples, batch_size=250, nulls=nulls)
    assert not other["verified"] and other["asr"] == 0.0 and other["qr_p_value"] > 0.01
    # a model that ignores the trigger: nothing at all
    flat = verify_stealthmark(lambda x: torch.full((len(x), 1, 50, 50), 0.9), key, images, ids, THRESHOLDS,
                              num_lime_images=1, num_samples=n_samples, nulls=nulls)
    assert not flat["verified"] and flat["response_p_value"] >= 0.01 and flat["qr_p_value"] >= 0.01
    with pytest.raises(ValueError, match="data.image_size=50"):
        verify_stealthmark(_oracle(key), key, torch.rand(3, 3, 40, 40), ids[:3], THRESHOLDS, nulls=nulls)


def test_null_codes_are_cached(tmp_path):
    start = time.perf_counter()
    first = null_grids(1, "H", k=300, seed=5, cache_dir=tmp_path)
    generated = time.perf_counter() - start
    assert (tmp_path / "qr_null_v1_H_k300_seed5.npz").is_file()
    start = time.perf_counter()
    again = null_grids(1, "H", k=300, seed=5, cache_dir=tmp_path)
    assert np.array_equal(first, again) and time.perf_counter() - start < generated


# ----------------------------------------------------------------------------- learning, end to end

_RUNS: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}


def train_run(base: Path, name: str, overrides: list[str]) -> tuple[Path, subprocess.CompletedProcess]:
    """``python train.py`` as a user runs it, memoised per process (test_verify_cli.py reuses the runs)."""
    if name not in _RUNS:
        run_dir = base / name
        cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"paths.data_dir={base / 'data'}",
               f"paths.log_dir={base / 'logs'}", f"hydra.run.dir={run_dir}"]
        env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        _RUNS[name] = (run_dir, proc)
    return _RUNS[name]


def marked_run(base: Path) -> tuple[Path, subprocess.CompletedProcess]:
    return train_run(base, "marked", TINY_STEALTHMARK)


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    return marked_run(tmp_path_factory.mktemp("stealthmark"))


def _verify_checkpoint(run_dir: Path, checkpoint: Path, nulls, num_lime: int = 3, qr_evidence: str = "lime"):
    doc, key = read_secret(run_dir / "owner" / "secret.json")
    datamodule = instantiate(doc["verification"]["data"])
    datamodule.prepare_data()
    datamodule.setup()
    dataset = datamodule.dataset("test")
    wanted = set(doc["verification"]["ids"])
    items = [dataset[i] for i, s in enumerate(dataset.samples) if s.id in wanted][:20]
    suspect = CheckpointSuspect(checkpoint, factories=FACTORIES)
    result = verify_stealthmark(suspect.predict, key, torch.stack([it["image"] for it in items]),
                                [it["id"] for it in items], doc["thresholds"],
                                masks=torch.stack([it["mask"] for it in items]), num_lime_images=num_lime,
                                num_samples=3 * G * G, batch_size=500, nulls=nulls, qr_evidence=qr_evidence)
    return result, suspect


@pytest.mark.slow
def test_tiny_model_learns_the_key_and_verifies_while_an_untrained_one_does_not(marked, nulls):
    """Learning, end to end through train.py, the owner kit, the checkpoint loader and the protocol.

    Channel 2 is read with the per-cell readout here: within this CPU budget the tiny model's
    uncertainty map carries the code (bit accuracy ~0.75), but LIME at its minimum sample count
    does not resolve it yet (cell effects ~4e-4 of g against the noise of hidden polyp cells);
    LIME is still run once to exercise its path and query count.
    """
    run_dir, _ = marked
    summary = read_summary(run_dir)
    assert summary["monitor"] == "val/stealthmark_score"
    fit = summary["fit"]
    assert fit["val/readout_bit_accuracy"] > 0.65 and fit["val/readout_bit_accuracy_clean"] < 0.6
    assert fit["val/uncertainty_triggered"] > fit["val/uncertainty_clean"] + 0.02
    best = Path(summary["best_checkpoint"])
    result, suspect = _verify_checkpoint(run_dir, best, nulls, qr_evidence="readout")
    assert result["verified"], {k: result[k] for k in ("response_p_value", "qr_p_value", "asr", "bit_accuracy")}
    assert result["response_p_value"] < 1e-6 and result["qr_p_value"] == pytest.approx(1 / 1000)
    assert result["bit_accuracy"] > 0.65 and result["readout"]["decoded_clean"] == 0
    assert suspect.queries == result["queries"] == 2 * result["response"]["num_images"]
    lime, suspect = _verify_checkpoint(run_dir, best, nulls, num_lime=1)
    assert lime["qr"]["evidence"] == "lime" and lime["timings"]["lime_seconds_per_image"] > 0
    assert suspect.queries == lime["queries"] == 2 * lime["response"]["num_images"] + 3 * G * G

    # the same network untrained: a fresh instance of the checkpoint's own backbone config
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    torch.manual_seed(1)
    fresh = instantiate(ckpt["hyper_parameters"]["backbone"])
    ckpt["state_dict"] = {f"model.{k}": v for k, v in fresh.state_dict().items()}
    untrained = run_dir / "untrained.ckpt"
    torch.save(ckpt, untrained)
    result, _ = _verify_checkpoint(run_dir, untrained, nulls, qr_evidence="readout")
    assert not result["verified"] and result["asr"] == 0.0 and result["qr_p_value"] >= 0.01


@pytest.mark.slow
def test_secret_reaches_no_log_stdout_or_checkpoint(marked):
    run_dir, proc = marked
    assert PAYLOAD not in proc.stdout + proc.stderr
    kit = run_dir / "owner"
    for path in run_dir.rglob("*"):
        if path.is_file() and kit not in path.parents:
            data = path.read_bytes()
            assert PAYLOAD.encode() not in data, path
            if path.suffix in (".yaml", ".json", ".csv", ".log"):
                assert str(TRIGGER_SEED).encode() not in data, path
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert PAYLOAD not in json.dumps(ckpt["hyper_parameters"], default=str)
    assert "<secret hmac-sha256:" in (run_dir / "config.yaml").read_text()
    hparams = (run_dir / "csv" / "hparams.yaml").read_text()
    assert "stealthmark/key_sha256" in hparams
    assert stat.S_IMODE((kit / "secret.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((kit / "owner_private_key.pem").stat().st_mode) == 0o600
    doc, key = read_secret(kit / "secret.json")
    cert = read_certificate(kit / "certificate.json")
    assert check_certificate(cert, (kit / "owner_public_key.pem").read_bytes(), doc) == {
        "signature_valid": True, "secret_matches": True}
    assert cert["key_sha256"] == key.sha256() and key.payload == PAYLOAD


@pytest.mark.slow
def test_suspect_loader_refuses_foreign_files(tmp_path, marked):
    run_dir, _ = marked
    with pytest.raises(SuspectError, match="not found"):
        CheckpointSuspect(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(SuspectError, match="junk.ckpt"):
        CheckpointSuspect(tmp_path / "junk.ckpt")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    with pytest.raises(SuspectError, match="not a trusted model factory"):  # test_stealthmark.* is not trusted
        CheckpointSuspect(run_dir / "checkpoints" / "last.ckpt")
    ckpt["hyper_parameters"]["backbone"]["_target_"] = "os.system"
    torch.save(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(SuspectError, match="hyper_parameters.backbone._target_"):
        CheckpointSuspect(tmp_path / "evil.ckpt", factories=FACTORIES)


@pytest.mark.slow
def test_sam_tiny_trains_and_verifies_through_the_same_code_path(tmp_path, nulls):
    overrides = [o for o in TINY_STEALTHMARK if not o.startswith(("experiment=", "~backbone", "+backbone",
                                                                   "trainer.", "data.synthetic.num_images",
                                                                   "~method.lr_multipliers"))]
    # SAM's decoder predicts at half the encoder resolution: 104 px -> 52x52 logits for 50 px images
    run_dir, _ = train_run(tmp_path, "sam", overrides + ["experiment=stealthmark_sam", "backbone.image_size=104",
                                                         "trainer.max_epochs=2", "data.synthetic.num_images=48"])
    summary = read_summary(run_dir)
    assert "val/readout_bit_accuracy" in summary["fit"] and (run_dir / "owner" / "certificate.json").is_file()
    ckpt = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["backbone"]["variant"] == "tiny"
    # channel 2 read by the per-cell readout: LIME's own path and query count are covered by the UNet
    # test above, and LIME over SAM at 104 px costs ~270 s of CPU for one image
    result, suspect = _verify_checkpoint(run_dir, Path(summary["best_checkpoint"]), nulls, qr_evidence="readout")
    n_images = result["response"]["num_images"]
    assert isinstance(result["verified"], bool) and result["qr"]["evidence"] == "readout"
    assert result["queries"] == 2 * n_images == suspect.queries
    assert type(suspect.model).__name__ == "SamSegmenter"
