"""Removal attacks (verification/model_attacks.py), their configs and classes (verification/attacks/), verify.py's bad
attack values, and the robustness / false-positive studies (benchmarks/).

Each attack must change the model or the queries as it claims: pruning reaches the requested
sparsity, quantisation stores int8 Linear weights and ≤ 256 values per conv channel, fine-tuning
lowers the task loss, distillation gives a different network that imitates the teacher, query
transforms change the pixels the suspect sees. The ``slow`` tests run both studies end to end on
a hand-made tiny kit (a 50 px StealthMark secret over 24 synthetic polyps and an unmarked
:class:`TinySegNet` checkpoint) -- they check the outputs exist and are coherent, not the verdicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ROOT
from omegaconf import OmegaConf

from verification.attacks import apply_attack, build_attack, task_quality
from verification.protocols import BadInput
from verification import model_attacks as attacks

ENV = {**os.environ, "WANDB_MODE": "disabled",  # this folder: the suspect_factories test networks
       "PYTHONPATH": os.pathsep.join(map(str, (ROOT, ROOT / "tests", Path(__file__).resolve().parent)))}
FACTORIES = "suspect_factories=[models.,test_attacks.]"


def attack_cfg(name: str, /, **values) -> dict:
    """``configs/attack/<name>.yaml`` with ``values`` over it, as ``verify.py attack=<name> attack.k=v`` composes it
    (a name without a config file: just ``{"name": name, **values}``)."""
    path = ROOT / "configs" / "attack" / f"{name}.yaml"
    base = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {"name": name}
    return {**base, **values}


class TinySegNet(nn.Module):
    """Convs + a Linear global-context branch; ``forward(images, boxes=None) -> logits B×1×H×W``."""

    def __init__(self, in_channels: int = 3, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.context = nn.Linear(width, width)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        features = self.stem(images)
        context = self.context(features.mean(dim=(2, 3)))[:, :, None, None]
        return self.head(features + context)


class TinyClassifier(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(images).flatten(1))


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth images with structure (JPEG / resize have something to change)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    base = 0.5 * ramp[None, :] + 0.5 * ramp[:, None]
    return (base[None, None] * torch.rand(n, 3, 1, 1, generator=g) + 0.3 * torch.rand(n, 3, size, size, generator=g)
            ).clamp(0, 1)


def _seg_batches(n_batches: int = 4, seed: int = 0) -> list[dict]:
    out = []
    for i in range(n_batches):
        x = _images(4, seed=seed + i)
        out.append({"image": x, "mask": (x[:, :1] > 0.55).float()})
    return out


def _cls_batches(n_batches: int = 4, seed: int = 0) -> list[dict]:
    out = []
    for i in range(n_batches):
        x = _images(8, seed=seed + i)
        out.append({"image": x, "label": (x.mean(dim=(1, 2, 3)) * 6).long().clamp(0, 2)})
    return out


class FakeSuspect:
    """A weighted suspect (``model``) that records every image batch it is sent."""

    kind = "checkpoint"
    factories = ("test_attacks.",)  # the verifier's suspect_factories: the student copies a test network

    def __init__(self, model: nn.Module | None, task: str = "segmentation", hparams: dict | None = None):
        self.model, self.task, self.device, self.queries = model, task, torch.device("cpu"), 0
        self.hparams = hparams or {}
        self.seen: list[torch.Tensor] = []

    def identity(self) -> dict:
        return {"kind": self.kind, "path": "fake.ckpt"}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.clone())
        self.queries += len(images)
        if self.model is None:
            return torch.full((len(images), 1, *images.shape[-2:]), 0.5)
        logits = attacks.forward_logits(self.model.eval(), images, self.task)
        return torch.sigmoid(logits) if self.task == "segmentation" else torch.softmax(logits, 1)


class FakeDataModule:
    """``splits`` + ``dataset(split, train_transforms)`` over in-memory samples."""

    def __init__(self, task: str):
        batches = _seg_batches(3) if task == "segmentation" else _cls_batches(3)
        key = "mask" if task == "segmentation" else "label"
        samples = [{"image": b["image"][i], key: b[key][i], "id": f"s{j}{i}"}
                   for j, b in enumerate(batches) for i in range(len(b["image"]))]
        self.splits = {"train": samples, "val": samples[:4], "test": samples[:8]}
        self.channels, self.num_classes, self.image_size = 3, (1 if task == "segmentation" else 3), 16

    def setup(self, stage=None) -> None:
        pass

    def dataset(self, split: str, train_transforms: bool = False) -> list[dict]:
        return self.splits[split]


# ----------------------------------------------------------------------------- model attacks


def test_prune_reaches_the_requested_sparsity_of_prunable_weights():
    torch.manual_seed(0)
    net = TinySegNet()
    for amount in (0.1, 0.5, 0.7):
        model = TinySegNet()
        model.load_state_dict(net.state_dict())
        stats = attacks.prune_global_l1(model, amount)
        weights = [m.weight for m, _ in attacks.prunable_weights(model)]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert zeros == pytest.approx(amount, abs=2e-3) and stats["sparsity"] == pytest.approx(zeros)


def test_quantize_packs_linear_int8_and_rounds_conv_weights_per_channel():
    torch.manual_seed(0)
    net = TinySegNet(width=16)
    x = _images(2)
    before = net(x).detach()
    conv_before = net.stem[0].weight.detach().clone()
    model, record = attacks.quantize_int8(net)
    linear = model.context
    assert isinstance(linear, torch.ao.nn.quantized.dynamic.Linear) and linear.weight().dtype == torch.qint8
    assert record["linear_quantized"] == ["context"] and set(record["conv_fake_quantized"]) == {"stem.0", "stem.2", "head"}
    for name in record["conv_fake_quantized"]:
        weight = model.get_submodule(name).weight.detach()
        assert max(len(torch.unique(weight[c])) for c in range(weight.shape[0])) <= 256
    assert not torch.equal(conv_before, model.stem[0].weight) and record["conv_mean_abs_change"] > 0
    after = model(x).detach()
    assert after.shape == before.shape and not torch.equal(after, before)
    assert (after - before).abs().max() < 0.1 * before.abs().max()  # int8: a perturbation, not a new model


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_finetune_changes_weights_and_lowers_the_task_loss(task):
    torch.manual_seed(0)
    net = TinySegNet() if task == "segmentation" else TinyClassifier()
    batches = _seg_batches() if task == "segmentation" else _cls_batches()

    def loss() -> float:
        with torch.no_grad():
            return sum(float(attacks.task_loss(attacks.forward_logits(net.eval(), b["image"], task), b, task))
                       for b in batches) / len(batches)

    weights = [p.detach().clone() for p in net.parameters()]
    start = loss()
    stats = attacks.finetune(net, batches, epochs=5, lr=1e-2, task=task)
    assert stats["steps"] == 20 and not net.training
    assert any(not torch.equal(a, b) for a, b in zip(weights, net.parameters()))
    assert loss() < start and stats["epoch_losses"][-1] < stats["epoch_losses"][0]


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm() + 1e-12))


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_distill_gives_a_new_network_that_imitates_the_teacher(task):
    torch.manual_seed(0)
    teacher = TinySegNet() if task == "segmentation" else TinyClassifier()
    # a trained teacher: its answers vary with the image (a fresh net's are almost constant)
    attacks.finetune(teacher, _seg_batches() if task == "segmentation" else _cls_batches(), epochs=10, lr=1e-2,
                     task=task)
    torch.manual_seed(1)
    student = TinySegNet() if task == "segmentation" else TinyClassifier()
    suspect = FakeSuspect(teacher, task)
    held_out = _images(16, seed=99)

    def outputs(net):
        with torch.no_grad():
            logits = attacks.forward_logits(net.eval(), held_out, task)
            return torch.sigmoid(logits) if task == "segmentation" else torch.softmax(logits, 1)

    corr_before = _corr(outputs(student), outputs(teacher))
    batches = [{"image": _images(8, seed=s)} for s in range(6)]  # no masks / labels: queries only
    stats = attacks.distill(student, suspect.predict, batches, task=task, epochs=15, lr=1e-2)
    assert stats["teacher_queries"] == 15 * 48 == suspect.queries
    print(f"{task}: correlation with the teacher {corr_before:.3f} -> ", end="")
    assert all(not torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), student.state_dict().values()))
    corr_after = _corr(outputs(student), outputs(teacher))
    print(f"{corr_after:.3f}")
    assert corr_after > 0.8 and corr_after > corr_before


# ----------------------------------------------------------------------------- query transforms


@pytest.mark.parametrize("name,params", [("jpeg", {"quality": 50}), ("resize", {"factor": 0.5}),
                                         ("noise", {"sigma": 0.03}), ("crop", {"fraction": 0.8})])
@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_query_transforms_change_the_pixels_the_suspect_sees(name, params, task):
    torch.manual_seed(0)
    inner = FakeSuspect(TinySegNet() if task == "segmentation" else TinyClassifier(), task)
    wrapped = attacks.TransformedSuspect(inner, attacks.QueryTransform(name, **params))
    x = _images(3, size=32)
    probs = wrapped.predict(x)
    seen = inner.seen[-1]
    assert seen.shape == x.shape and (seen - x).abs().max() > 1e-3
    assert wrapped.queries == inner.queries == 3 and wrapped.model is inner.model
    assert wrapped.identity()["query_transform"]["name"] == name and wrapped.task == task
    assert probs.shape == ((3, 1, 32, 32) if task == "segmentation" else (3, 3))
    if name == "crop" and task == "segmentation":  # the answer is mapped back: 0 outside the crop
        assert float(probs[..., :3, :].abs().max()) == 0.0 and float(probs[..., 10:20, 10:20].min()) > 0


def test_jpeg_of_grey_images_and_noise_are_reproducible():
    x = _images(2, size=24)[:, :1]
    assert attacks.jpeg_round_trip(x, 90).shape == x.shape
    a = attacks.QueryTransform("noise", sigma=0.05, seed=3)(x)
    b = attacks.QueryTransform("noise", sigma=0.05, seed=3)(x)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- dispatcher


@pytest.mark.parametrize("attack,field", [
    (attack_cfg("prune", amount=1.0), "attack.amount"),
    (attack_cfg("prune", amount=-0.1), "attack.amount"),
    (attack_cfg("jpeg", quality=0), "attack.quality"),
    (attack_cfg("jpeg", quality=101), "attack.quality"),
    (attack_cfg("finetune", data_share=0.0), "attack.data_share"),
    (attack_cfg("finetune", lr=0), "attack.lr"),
    (attack_cfg("resize", factor=1.5), "attack.factor"),
    (attack_cfg("crop", mode="corner"), "attack.mode"),
    (attack_cfg("noise", sigma="lots"), "attack.sigma"),
    (attack_cfg("erase"), "attack.name"),
    (attack_cfg("jpeg", qualty=50), "attack.qualty"),
    (attack_cfg("jpeg", name="prune"), "attack.name"),
    ({k: v for k, v in attack_cfg("prune").items() if k != "amount"}, "attack.amount"),
    (attack_cfg("prune", _target_="builtins.print"), "attack._target_"),
    (attack_cfg("prune", _target_="collections.OrderedDict"), "attack._target_"),  # a class, not an attack
])
def test_bad_attack_values_are_bad_input_naming_the_field(attack, field):
    with pytest.raises(BadInput, match=field.replace(".", r"\.")):
        build_attack(attack)


def test_every_attack_config_builds_its_attack_with_the_defaults_of_the_file():
    for path in sorted((ROOT / "configs" / "attack").glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(path))
        attack, split = build_attack(cfg)
        assert attack.name == cfg["name"] == path.stem and split is None
        assert attack.parameters() == {k: v for k, v in cfg.items() if k not in ("_target_", "name", "quality_split")}


@pytest.mark.parametrize("name", ["prune", "quantize", "finetune"])
def test_weight_attacks_need_the_suspects_weights(name):
    with pytest.raises(BadInput, match=f"attack={name} needs the suspect's weights"):
        apply_attack(attack_cfg(name), FakeSuspect(None), FakeDataModule("segmentation"), "segmentation")
    with pytest.raises(BadInput, match="attack=distill needs the suspect's weights"):
        apply_attack(attack_cfg("distill"), FakeSuspect(None), FakeDataModule("segmentation"), "segmentation")


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_dispatcher_runs_every_attack_and_measures_quality(task):
    dm = FakeDataModule(task)
    make = (lambda: TinySegNet()) if task == "segmentation" else (lambda: TinyClassifier())
    backbone = {"_target_": f"test_attacks.{'TinySegNet' if task == 'segmentation' else 'TinyClassifier'}"}
    metric = "dice" if task == "segmentation" else "balanced_accuracy"
    for cfg in (attack_cfg("none"), attack_cfg("prune", amount=0.5), attack_cfg("quantize"),
                attack_cfg("finetune", epochs=1, data_share=0.5, batch_size=4),
                attack_cfg("distill", epochs=1, batch_size=4), attack_cfg("jpeg", quality=50),
                attack_cfg("resize", factor=0.5), attack_cfg("noise", sigma=0.01), attack_cfg("crop")):
        torch.manual_seed(0)
        suspect = FakeSuspect(make(), task, hparams={"backbone": backbone})
        attacked, record = apply_attack({**cfg, "quality_split": "test"}, suspect, dm, task)
        assert record["name"] == cfg["name"] and record["quality"]["metric"] == metric
        assert 0.0 <= record["quality"]["value"] <= 1.0 and record["quality"]["num_images"] == 8
        n_train = len(dm.splits["train"])
        if cfg["name"] == "finetune":  # data_share 0.5 of the split, batches of 4
            assert record["num_images"] == n_train // 2 and record["steps"] == -(-n_train // 2 // 4)
        if cfg["name"] == "distill":
            assert isinstance(attacked, attacks.ModuleSuspect) and attacked.model is not suspect.model
            assert record["teacher_queries"] == n_train and attacked.identity()["distilled_from"]["path"] == "fake.ckpt"
        if cfg["name"] in ("jpeg", "resize", "noise", "crop"):
            assert isinstance(attacked, attacks.TransformedSuspect)
    quality = task_quality(FakeSuspect(make(), task), dm, task, split="test")
    assert quality["queries"] == 8


# ----------------------------------------------------------------------------- verify.py and the studies


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A 50 px StealthMark secret over 24 synthetic polyps + an (unmarked) TinySegNet checkpoint."""
    from hydra.utils import instantiate

    from watermark.stealthmark.kit import StealthMarkKey, build_secret, write_secret

    base = tmp_path_factory.mktemp("attack_kit")
    data = {"_target_": "datamodules.MedicalImageDataModule", "augment": {}, "batch_size": 4, "channels": 3,
            "classes": None, "data_dir": str(base / "data"), "eval_batch_size": None, "image_size": 50,
            "layout": "kvasir_seg", "num_classes": 1, "num_workers": 0, "on_bad_sample": "error",
            "persistent_workers": False, "pin_memory": False, "reader_options": {}, "root": None, "split_seed": 0,
            "synthetic": {"image_size": 64, "name": "synthetic_polyp", "num_images": 24, "seed": 0},
            "task": "segmentation", "test_fraction": 0.2, "val_fraction": 0.2, "validate": "header"}
    dm = instantiate(data)
    dm.prepare_data()
    dm.setup()
    key = StealthMarkKey(payload="Zq8-atk", qr_version=1, error_correction="H", image_size=50, quiet_zone=2,
                         trigger={"kind": "patch", "size": 4, "position": "top-left", "seed": 5}, hide_value=0.0,
                         epsilon=0.3)
    checkpoint = base / "suspect.ckpt"
    torch.manual_seed(0)
    net = TinySegNet()
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"backbone": {"_target_": "test_attacks.TinySegNet", "in_channels": 3},
                                     "task": "segmentation"}}, checkpoint)
    doc = build_secret(key, [s.id for s in dm.splits["test"]], "test", data,
                       {"alpha": 1e-3, "response_margin": 0.01, "min_decoded": 1}, checkpoint=str(checkpoint))
    secret = write_secret(base / "owner" / "secret.json", doc)
    return base, secret, checkpoint


def _verify(kit, out: Path, *extra: str) -> subprocess.CompletedProcess:
    base, secret, checkpoint = kit
    cmd = [sys.executable, str(ROOT / "verify.py"), f"secret={secret}", f"suspect={checkpoint}", f"out={out}",
           f"paths.data_dir={base / 'data'}", f"paths.log_dir={base / 'logs'}", FACTORIES,
           "verify.qr_evidence=readout", "verify.null_k=200", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)


def test_verify_exits_2_naming_the_bad_attack_field(kit, tmp_path):
    proc = _verify(kit, tmp_path / "r1", "attack=prune", "attack.amount=1.5")
    assert proc.returncode == 2 and "attack.amount" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "r1" / "report.json").exists()
    proc = _verify(kit, tmp_path / "r2", "attack=jpeg", "attack.quality=0")
    assert proc.returncode == 2 and "attack.quality" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_verify_runs_a_query_attack_and_records_quality(kit, tmp_path):
    proc = _verify(kit, tmp_path / "r", "attack=crop", "attack.fraction=0.8", "attack.quality_split=test")
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    attack = json.loads((tmp_path / "r" / "report.json").read_text())["attack"]
    assert attack["name"] == "crop" and attack["quality"]["metric"] == "dice"


@pytest.mark.slow
def test_tiny_robustness_study_writes_json_md_png(kit, tmp_path):
    base, secret, checkpoint = kit
    out = tmp_path / "rob"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "robustness.py"), f"secret={secret}", f"suspect={checkpoint}",
           f"out={out}", "attacks=none,finetune_1ep,prune_0.5,quantize,distill,jpeg_50,crop_0.9",
           "finetune.max_batches=1", "distill.epochs=1", "distill.max_batches=1", "verify.num_images=4",
           "verify.null_k=200", f"paths.data_dir={base / 'data'}", FACTORIES]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "robustness.json").read_text())
    assert [r["entry"] for r in doc["rows"]] == ["none", "finetune_1ep", "prune_0.5", "quantize", "distill",
                                                 "jpeg_50", "crop_0.9"]
    assert all(r["exit_code"] in (0, 1) and r["quality_metric"] == "dice" for r in doc["rows"])
    assert doc["rows"][2]["attack_record"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert doc["rows"][4]["attack_record"]["epochs"] == 1  # the user's distill.epochs beat the preset's
    assert (out / "robustness.md").read_text().count("| prune_0.5 |") == 1
    assert (out / "robustness.png").stat().st_size > 1000


@pytest.mark.slow
def test_tiny_false_positive_study_writes_json_md_png(kit, tmp_path):
    base, secret, checkpoint = kit
    out = tmp_path / "fp"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "false_positives.py"), f"secret={secret}", "K=2", "epochs=1",
           f"out={out}", "verify.null_k=200", f"paths.data_dir={base / 'data'}", FACTORIES]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "false_positives.json").read_text())
    assert doc["K"] == 2 and len(doc["models"]) == 2 and doc["false_claims"] == 0
    assert [m["seed"] for m in doc["models"]] == [1000, 1001] and all(m["exit_code"] == 1 for m in doc["models"])
    assert {c["name"] for c in doc["ind_w"]} == {"other_owner", "other_payload_same_trigger"}
    assert all(not c["evidence"]["verified"] for c in doc["ind_w"])
    assert "false ownership claim" in (out / "false_positives.md").read_text()
    assert (out / "false_positives.png").stat().st_size > 1000
