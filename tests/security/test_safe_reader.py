"""models/safe_reader.py: one reader for every foreign model file; nothing in a file's config is built.

Every hostile file is written at run time with ``torch.save`` of plain dicts. The nested
``_target_`` attacks would have *run* under the old ``hydra.utils.instantiate`` loaders (the
nested node is instantiated before the outer factory even sees its arguments), so "the sentinel
file does not exist" is the test that the config was never built, not just refused afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, compose_config
from lightning_modules.medlocker import CLASSIFIER, ClassifierLoadError
from verification.suspect import CheckpointSuspect, SuspectError, build_suspect_model
from models.xmark_marker import MarkerError, load_marker
from watermark.xmark.marker import XMarkMarker
from models.generator import ConditionalUNetGenerator
from models.safe_reader import FACTORIES, ModelFileError, build_model, load_model_checkpoint, read_checkpoint
from verification.attacks import build_student
from verification.protocols import BadInput

SMALL_CNN = {"_target_": "models.build_timm_classifier", "name": "small_cnn", "num_classes": 2, "in_channels": 1,
             "weights_path": None, "network_channels": None, "mean": None, "std": None}
WHERE = "hyper_parameters.backbone"


def _net(config: dict = SMALL_CNN) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(config, "reference").eval()


def _checkpoint(path: Path, backbone, task: str = "classification", net: torch.nn.Module | None = None) -> Path:
    """A Lightning-shaped checkpoint: ``state_dict`` of ``model.*`` weights + ``hyper_parameters``."""
    net = net if net is not None else _net()
    hparams = {"task": task} if backbone is None else {"task": task, "backbone": backbone}
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}, "hyper_parameters": hparams},
               path)
    return path


def _opens(sentinel: Path) -> dict:
    """A Hydra node that, if instantiated, creates ``sentinel`` (``builtins.open(file, "w")``)."""
    return {"_target_": "builtins.open", "file": str(sentinel), "mode": "w"}


def _hostile_backbones(sentinel: Path) -> list[tuple[str, dict, str]]:
    """``(attack, backbone config, key path the refusal must name)``."""
    return [
        ("nested _target_ builtins.open", {**SMALL_CNN, "name": _opens(sentinel)}, f"{WHERE}.name"),
        ("nested _target_ under a new key", {**SMALL_CNN, "encoder": _opens(sentinel)}, f"{WHERE}.encoder"),
        ("nested torch.load of pickle bytes", {**SMALL_CNN, "mean": {"_target_": "torch.load", "f": str(sentinel),
                                                                     "weights_only": False}}, f"{WHERE}.mean"),
        ("outer models.weights.os.system", {"_target_": "models.weights.os.system", "command": f"touch {sentinel}"},
         f"{WHERE}._target_"),
        ("outer builtins.open", {"_target_": "builtins.open", "file": str(sentinel), "mode": "w"}, f"{WHERE}._target_"),
        ("unknown factory models.build_evil", {**SMALL_CNN, "_target_": "models.build_evil"}, f"{WHERE}._target_"),
        ("_args_", {**SMALL_CNN, "_args_": [str(sentinel), "w"]}, f"{WHERE}._args_"),
        ("_partial_", {**SMALL_CNN, "_partial_": True}, f"{WHERE}._partial_"),
        ("_recursive_", {**SMALL_CNN, "_recursive_": True}, f"{WHERE}._recursive_"),
        ("_convert_", {**SMALL_CNN, "_convert_": "all"}, f"{WHERE}._convert_"),
        ("nested mapping value", {**SMALL_CNN, "std": {"a": 1}}, f"{WHERE}.std"),
        ("list containing a mapping", {**SMALL_CNN, "mean": [0.5, _opens(sentinel)]}, f"{WHERE}.mean[1]"),
        ("nested list", {**SMALL_CNN, "mean": [[0.5]]}, f"{WHERE}.mean[0]"),
        ("OmegaConf interpolation string", {**SMALL_CNN, "name": "${oc.env:HOME}"}, f"{WHERE}.name"),
        ("non-identifier key", {**SMALL_CNN, "not a name": 1}, "not a name"),
    ]


ATTACKS = [a for a, _, _ in _hostile_backbones(Path("x"))]


@pytest.mark.parametrize("attack", ATTACKS)
def test_every_loader_refuses_hostile_backbones_and_builds_nothing(attack, tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    _, backbone, key = next(c for c in _hostile_backbones(sentinel) if c[0] == attack)
    path = _checkpoint(tmp_path / "evil.ckpt", backbone)
    loaders = [
        (ModelFileError, lambda: load_model_checkpoint(path, task="classification")),
        (SuspectError, lambda: CheckpointSuspect(path, task="classification")),
        (SuspectError, lambda: build_suspect_model(path, ("models.",), task=None)),  # the old prefix: no effect
        (ClassifierLoadError, lambda: load_model_checkpoint(path, **CLASSIFIER)),
    ]
    for error, load in loaders:
        with pytest.raises(error) as err:
            load()
        message = str(err.value)
        assert not sentinel.exists(), f"{attack}: the file's config was built"
        assert isinstance(err.value, ModelFileError) and isinstance(err.value, ValueError)
        assert "evil.ckpt" in message and key in message, message


def test_marker_bundle_configs_are_checked_too(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    generator = ConditionalUNetGenerator(in_channels=1, saliency_channels=1, base_width=4, depth=1)
    surrogate = _net()
    marker = XMarkMarker(generator, surrogate, {"in_channels": 1, "saliency_channels": 1, "base_width": 4,
                                                "depth": 1}, dict(SMALL_CNN), image_size=32)
    good = marker.save(tmp_path / "generator.pt")
    bundle = torch.load(good, weights_only=True)
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(load_marker(good).mark(x)["marked"], marker.mark(x)["marked"], rtol=0, atol=0)
    cases = {
        "surrogate_config.name": {**bundle, "surrogate_config": {**SMALL_CNN, "name": _opens(sentinel)}},
        "surrogate_config._target_": {**bundle, "surrogate_config": {**SMALL_CNN,
                                                                     "_target_": "models.weights.os.system"}},
        "generator_config.depth": {**bundle, "generator_config": {**bundle["generator_config"],
                                                                  "depth": _opens(sentinel)}},
        "generator_config._partial_": {**bundle, "generator_config": {**bundle["generator_config"],
                                                                      "_partial_": True}},
    }
    for key, hostile in cases.items():
        torch.save(hostile, tmp_path / "evil.pt")
        with pytest.raises(MarkerError) as err:
            load_marker(tmp_path / "evil.pt", factories=("models.",))
        assert "evil.pt" in str(err.value) and key in str(err.value), str(err.value)
        assert not sentinel.exists()


def test_pickled_code_is_refused_by_weights_only(tmp_path):
    sentinel = tmp_path / "sentinel.txt"

    class Opens:  # unpickling would call builtins.open(sentinel, "w")
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    torch.save({"state_dict": {}, "hyper_parameters": {"backbone": SMALL_CNN}, "payload": Opens()},
               tmp_path / "pickle.ckpt")
    with pytest.raises(SuspectError, match=r"pickle\.ckpt: not a readable PyTorch checkpoint"):
        CheckpointSuspect(tmp_path / "pickle.ckpt", task="classification")
    assert not sentinel.exists()


def test_foreign_and_incomplete_files_are_named(tmp_path):
    with pytest.raises(SuspectError, match=r"missing\.ckpt: checkpoint not found"):
        CheckpointSuspect(tmp_path / "missing.ckpt", task="classification")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match=r"junk\.ckpt: not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "junk.ckpt")
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    with pytest.raises(ModelFileError, match=r"list\.ckpt: not a checkpoint \(holds a list"):
        read_checkpoint(tmp_path / "list.ckpt")
    torch.save({"hyper_parameters": {"backbone": SMALL_CNN}}, tmp_path / "nostate.ckpt")
    with pytest.raises(ModelFileError, match=r"nostate\.ckpt: not a Lightning checkpoint \(no 'state_dict'\)"):
        load_model_checkpoint(tmp_path / "nostate.ckpt", task="classification")
    _checkpoint(tmp_path / "nobackbone.ckpt", None)
    with pytest.raises(ClassifierLoadError, match=r"nobackbone\.ckpt: field 'hyper_parameters\.backbone' is missing"):
        load_model_checkpoint(tmp_path / "nobackbone.ckpt", **CLASSIFIER)
    _checkpoint(tmp_path / "seg.ckpt", SMALL_CNN, task="segmentation")
    with pytest.raises(SuspectError, match=r"seg\.ckpt: field 'hyper_parameters\.task' is 'segmentation'"):
        CheckpointSuspect(tmp_path / "seg.ckpt", task="classification")
    _checkpoint(tmp_path / "misfit.ckpt", {**SMALL_CNN, "num_classes": 5})
    with pytest.raises(SuspectError, match=r"misfit\.ckpt: field 'state_dict' does not fit"):
        CheckpointSuspect(tmp_path / "misfit.ckpt", task="classification")


def test_valid_checkpoint_loads_and_predicts_identically(tmp_path):
    net = _net()
    # pretrained-weight keys point at files that do not exist: forced off, the file's weights win
    stored = {**SMALL_CNN, "weights_path": str(tmp_path / "absent.pth"), "pretrained": True,
              "weights_dir": str(tmp_path / "absent")}
    path = _checkpoint(tmp_path / "good.ckpt", stored, net=net)
    images = torch.rand(4, 1, 32, 32)
    model, hparams = load_model_checkpoint(path, task="classification")
    with torch.no_grad():
        torch.testing.assert_close(model(images), net(images), rtol=0, atol=0)
    assert hparams["backbone"]["weights_path"] is None and hparams["backbone"]["pretrained"] is False
    suspect = CheckpointSuspect(path, task="classification")
    with torch.no_grad():
        expected = torch.softmax(net(images), dim=1)
    torch.testing.assert_close(suspect.predict(images), expected, rtol=0, atol=0)
    classifier, _ = load_model_checkpoint(path, **CLASSIFIER)
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), net(images), rtol=0, atol=0)
    assert "models.build_timm_classifier" in FACTORIES and "models.segmentation.build_smp_model" in FACTORIES


def test_operator_module_entry_admits_only_names_that_module_defines(tmp_path):
    net = _net()
    # `models.` (the old default prefix) adds nothing; a module entry never follows further dots
    for target in ("models.weights.os.system", "models.weights.torch.load", "models.count_parameters",
                   "models.weights.Path"):
        path = _checkpoint(tmp_path / "x.ckpt", {"_target_": target}, net=net)
        with pytest.raises(SuspectError, match=r"x\.ckpt: field 'hyper_parameters\.backbone\._target_'"):
            build_suspect_model(path, ("models.", "models.weights."), task=None)


class _FakeSuspect:
    def __init__(self, backbone: dict):
        self.hparams, self.path = {"backbone": backbone}, "stolen.ckpt"


def test_distillation_student_from_the_suspects_config_uses_the_safe_reader(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    attack = {"backbone": None, "seed": 0}
    with pytest.raises(BadInput) as err:
        build_student(attack, _FakeSuspect({**SMALL_CNN, "name": _opens(sentinel)}), None)
    assert "stolen.ckpt" in str(err.value) and f"{WHERE}.name" in str(err.value)
    assert not sentinel.exists()
    student, config = build_student(attack, _FakeSuspect(dict(SMALL_CNN)), None)
    assert student(torch.rand(2, 1, 32, 32)).shape == (2, 2) and config["_target_"] == SMALL_CNN["_target_"]


# ----------------------------------------------------------------------------- verify.py end to end


@pytest.mark.slow
def test_verify_cli_exits_2_on_a_hostile_stealthmark_suspect(tmp_path):
    """A tiny StealthMark secret + TinyPositionalNet suspects (random weights, no training).

    The hostile copy names a *trusted* outer factory (the verifier's own test network via
    ``suspect_factories``) with a nested ``builtins.open`` node; the benign copy shows that the
    same command gets past loading the suspect (exit 0/1), so the exit 2 is the refusal.
    """
    from test_stealthmark import PAYLOAD, THRESHOLDS, TINY_STEALTHMARK, TRIGGER_SEED, TinyPositionalNet
    from watermark.stealthmark.kit import StealthMarkKey, build_secret, write_secret

    cfg = compose_config([*TINY_STEALTHMARK, "data.synthetic.num_images=24"], tmp_path)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    key = StealthMarkKey(payload=PAYLOAD, qr_version=1, error_correction="H", image_size=50, quiet_zone=2,
                         trigger={"kind": "patch", "size": 4, "position": "top-left", "seed": TRIGGER_SEED})
    secret = write_secret(tmp_path / "owner" / "secret.json", build_secret(key, ["none"], "test", data, THRESHOLDS))
    backbone = {"_target_": "test_stealthmark.TinyPositionalNet", "in_channels": 3, "image_size": 50, "width": 16}
    torch.manual_seed(0)
    net = TinyPositionalNet(3, 50, 16)
    sentinel = tmp_path / "sentinel.txt"
    hostile = _checkpoint(tmp_path / "hostile.ckpt", {**backbone, "width": _opens(sentinel)}, "segmentation", net)
    benign = _checkpoint(tmp_path / "benign.ckpt", backbone, "segmentation", net)

    def verify(suspect: Path, out: Path) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / "verify.py"), f"secret={secret}", f"suspect={suspect}", f"out={out}",
               f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}", "verify.images=split",
               "verify.num_images=4", "verify.qr_evidence=readout", "verify.null_k=99", "verify.num_figures=0",
               f"verify.cache_dir={tmp_path / 'cache'}", "suspect_factories=[test_stealthmark.]"]
        env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)

    proc = verify(hostile, tmp_path / "report_hostile")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "hostile.ckpt" in proc.stderr and f"{WHERE}.width" in proc.stderr, proc.stderr[-3000:]
    assert not sentinel.exists()
    assert not (tmp_path / "report_hostile" / "report.json").exists()
    proc = verify(benign, tmp_path / "report_benign")
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "report_benign" / "report.json").is_file()
