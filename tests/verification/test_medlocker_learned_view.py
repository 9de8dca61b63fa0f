"""``verify.py mode=evaluate`` with the thief's learned remover as the ``learned`` view (issue 18).

A miniature MedLocker kit is written directly (no protection run): an APTOS-layout dataset of
smooth 32 px images, four of them protected with the owner's QR mark, certificates entries with
the mark's position, a secret.json and a small_cnn classification checkpoint as the suspect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import CONFIGS, ROOT
from verification.medlocker_removal import learned_settings, learned_view
from verification.protocols import BadInput
from watermark.imageio import quantise
from watermark.medlocker.logo import composite, footprint, render_qr_logo
from watermark.medlocker.removal_attacks import inpaint_footprint

SIZE, NUM, EVALUATED = 32, 16, 4


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 0.6 + 0.2
    return quantise(F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False))


def _save(t: torch.Tensor, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """(secret.json, suspect checkpoint, protected B×C×H×W, footprints bool B×H×W, dataset samples)."""
    from models.classification import build_timm_classifier

    tmp = tmp_path_factory.mktemp("learned_view")
    root, run = tmp / "data", tmp / "run"
    images = _images(NUM, 0)
    ids = [f"img{i:02d}" for i in range(NUM)]
    labels = [int(float(im.mean()) > 0.5) for im in images]
    for image_id, im in zip(ids, images):
        _save(im, root / "train_images" / f"{image_id}.png")
    (root / "train.csv").write_text("id_code,diagnosis\n" + "".join(f"{i},{y}\n" for i, y in zip(ids, labels)))
    logo = render_qr_logo("owner-7", 21, error_correction="L")  # the owner's mark
    run.mkdir()
    np.save(run / "logo.npy", logo)
    entries, prots, fps = [], [], []
    for k, image_id in enumerate(ids[:EVALUATED]):
        x, y = 2 + 3 * k, 4 + 2 * k
        prot = quantise(composite(images[k:k + 1], logo, x, y, 0.9))[0]
        _save(prot, run / "protected" / "train_images" / f"{image_id}.png")
        entries.append({"image_id": image_id, "protected_path": f"train_images/{image_id}.png", "x": x, "y": y,
                        "scale": 1.0, "alpha": 0.9, "placement": "mark"})
        prots.append(prot)
        fps.append(footprint(SIZE, SIZE, logo, x, y, 1.0))
    (run / "certificates.json").write_text(json.dumps({"format": "medmark-image-certificate", "entries": entries}))
    secret = {"format": "medmark-medlocker-secret", "method": "medlocker", "ids": ids[:EVALUATED],
              "certificates": str(run / "certificates.json"), "restore_dir": str(run / "restore"),
              "logo": str(run / "logo.npy"), "public_key": str(run / "absent.pem"), "dataset_root": str(root),
              "protected_dir": str(run / "protected"),
              "data": {"layout": "aptos", "classes": ["0", "1"], "reader_options": {}},
              "removal": {"median_k": 3, "jpeg_quality": 75, "inpaint_radius": 3}}
    (run / "owner").mkdir()
    (run / "owner" / "secret.json").write_text(json.dumps(secret))
    torch.manual_seed(0)
    net = build_timm_classifier(name="small_cnn", num_classes=2, in_channels=3)
    config = {"_target_": "models.build_timm_classifier", "name": "small_cnn", "num_classes": 2, "in_channels": 3}
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"backbone": config, "task": "classification", "num_classes": 2}},
               run / "suspect.ckpt")
    from datamodules.readers import read_dataset

    samples = read_dataset("aptos", root, classes=["0", "1"])
    return run / "owner" / "secret.json", run / "suspect.ckpt", torch.stack(prots), np.stack(fps), samples


def _settings(**changes):
    block = OmegaConf.to_container(OmegaConf.load(CONFIGS / "verify.yaml").removal.learned)
    return learned_settings(OmegaConf.create({"removal": {"learned": {**block, **changes}}}))


def _verify(secret: Path, suspect: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "verify.py"), f"secret={secret}", "mode=evaluate",
                           f"suspect={suspect}", f"out={out}", "quiet=true", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_learned_view_is_off_by_default_and_bad_fields_are_named():
    assert _settings() is None  # configs/verify.yaml: steps 0
    config, num_images = _settings(steps=3)
    assert config.steps == 3 and num_images == 512
    for field, bad in (("lr", 0), ("steps", -1), ("steps", "many"), ("decoder_channels", [8]),
                       ("alpha_range", [0.0, 1.0]), ("num_images", 0), ("encoder_depth", 0)):
        with pytest.raises(BadInput, match=rf"removal\.learned\.{field}\b"):
            _settings(**{field: bad})


def test_untrained_remover_is_the_inpainting_view_and_training_changes_it_deterministically(kit):
    torch.set_num_threads(1)
    _, _, prot, fps, samples = kit
    evaluated = {f"img{i:02d}" for i in range(EVALUATED)}
    inpaint = inpaint_footprint(prot, fps, 3)
    # one step of a vanishing learning rate: the zero head stays (numerically) zero
    untrained, record = learned_view(_settings(steps=1, lr=1e-12, batch_size=4), prot, fps, samples, evaluated,
                                     3, "data")
    assert torch.equal(untrained, inpaint)
    assert record["thief_images"] == NUM - EVALUATED  # never an original of an evaluated image
    trained, record = learned_view(_settings(steps=6, lr=0.01, batch_size=4), prot, fps, samples, evaluated,
                                   3, "data")
    assert trained.shape == prot.shape and not torch.equal(trained, inpaint) and not torch.equal(trained, prot)
    assert torch.equal(trained, torch.floor(trained * 255 + 0.5) / 255)  # stored-image grid
    assert record["steps"] == 6 and 0 <= record["final_l1"] < 1
    again, _ = learned_view(_settings(steps=6, lr=0.01, batch_size=4), prot, fps, samples, evaluated, 3, "data")
    assert torch.equal(again, trained)  # seeded


@pytest.mark.slow
def test_evaluate_reports_the_learned_view_and_refuses_a_bad_field_with_exit_2(kit, tmp_path):
    secret, suspect, *_ = kit
    bad = _verify(secret, suspect, tmp_path / "bad", "removal.learned.alpha_range=[0.0,1.0]")
    assert bad.returncode == 2 and "removal.learned.alpha_range" in bad.stderr
    assert not (tmp_path / "bad" / "report.json").exists()
    out = tmp_path / "eval"
    proc = _verify(secret, suspect, out, "removal.learned.steps=3", "removal.learned.batch_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["accuracy"]) == {"clean", "protected", "median3", "jpeg75", "inpaint", "learned"}
    assert all(0.0 <= v <= 1.0 for v in report["accuracy"].values())
    learned = report["removal"]["learned"]
    assert learned["steps"] == 3 and learned["thief_images"] == NUM - EVALUATED and learned["encoder"]
    assert "owner-7" not in json.dumps(report) + (out / "report.md").read_text()
    assert "| learned |" in (out / "report.md").read_text()
    assert "learned remover" in proc.stderr + proc.stdout  # the stage line
