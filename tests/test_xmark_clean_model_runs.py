"""X-Mark references and held-out controls trained by train.py itself (``pipeline: train_py``).

Each one is a ``method=task`` run of :func:`utils.run.run_training` before the X-Mark fit -- AdamW,
cosine schedule, the thief's augmentation in ``data.augment``, best-by-validation checkpoint, as a
suspect is trained -- whose checkpoint joins ``method.reference_checkpoints`` /
``callbacks.xmark_release.control_checkpoints``; finished runs are reused; no secret reaches their
configs; a multi-process launch that would train them in every rank is refused.
"""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from test_xmark_ensemble import TINY_ENSEMBLE, _fit

SINGLE = [o for o in TINY_ENSEMBLE if "extra_proxies" not in o]
TWO_FAMILIES = SINGLE + ["backbone=resnet18", "+backbone@method.surrogate_backbone=small_cnn"]
THIEF = ["method.thief_augment.hflip=0.5", "method.thief_augment.zoom=[1.0,1.111]"]


def _train_py(references: list[int] | None = None, controls: list[int] | None = None, epochs: int = 1) -> list[str]:
    overrides = []
    if references is not None:
        overrides += [f"method.trained_references.epochs={epochs}", f"method.trained_references.seeds={references}",
                      "method.trained_references.pipeline=train_py"]
    if controls is not None:
        overrides += [f"callbacks.xmark_release.heldout_control.epochs={epochs}",
                      f"callbacks.xmark_release.heldout_control.seeds={controls}",
                      "callbacks.xmark_release.heldout_control.pipeline=train_py"]
    else:
        overrides.append("callbacks.xmark_release.heldout_control.epochs=0")
    return overrides


def test_suspect_augment_is_the_thiefs_augmentation_as_data_augment():
    from utils.clean_model_runs import suspect_augment

    assert suspect_augment(None) == {"hflip": 0.0}
    assert suspect_augment({"hflip": 0.5, "zoom": [1.0, 1.111]}) == {"hflip": 0.5, "scale": [1.0, 1.111]}
    assert suspect_augment({"hflip": 0.25, "zoom": [1.0, 1.0]}) == {"hflip": 0.25}  # no zoom: no RandomAffine


def test_a_clean_run_is_configured_like_a_suspect_and_holds_no_secret(tmp_path):
    from utils.clean_model_runs import task_run_config

    cfg = compose_config(TWO_FAMILIES + THIEF + ["callbacks.xmark_release.seed=123456789",
                                                 "method.optimizer.lr=0.05"], tmp_path)
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    run = task_run_config(cfg, backbone, seed=3, epochs=7, augment={"hflip": 0.5, "scale": [1.0, 1.111]},
                          output_dir=tmp_path / "clean")
    plain = OmegaConf.to_container(run, resolve=True)
    assert plain["method"]["_target_"] == "lightning_modules.TaskModule" and plain["method"]["task"] == "classification"
    assert plain["method"]["optimizer"] == {"_target_": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 1e-4}
    assert plain["method"]["scheduler"] == {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 7}
    assert list(plain["callbacks"]) == ["model_checkpoint"] and plain["logger"] is None
    checkpoint = plain["callbacks"]["model_checkpoint"]
    assert checkpoint["monitor"] == "val/balanced_accuracy" and checkpoint["mode"] == "max"
    assert checkpoint["dirpath"] == str(tmp_path / "clean" / "checkpoints")
    assert plain["data"]["augment"] == {"hflip": 0.5, "scale": [1.0, 1.111]}
    assert plain["data"]["root"] == OmegaConf.to_container(cfg.data, resolve=True)["root"]  # the clean source
    assert plain["data"]["image_size"] == 32 and plain["data"]["batch_size"] == 16  # as the X-Mark run reads it
    assert plain["trainer"]["max_epochs"] == 7 and plain["trainer"]["default_root_dir"] == str(tmp_path / "clean")
    assert plain["backbone"] == backbone and plain["seed"] == 3 and plain["secret_keys"] == []
    assert not plain["test"] and list(plain["loss"]) == ["ce"]
    text = OmegaConf.to_yaml(run)
    assert "123456789" not in text and "xmark_release" not in text and "generator" not in text


def test_the_plan_has_one_run_per_seed_family_and_augmentation(tmp_path):
    from utils.clean_model_runs import clean_model_plan

    cfg = compose_config(TWO_FAMILIES + THIEF + _train_py(references=[3, 4], controls=[1], epochs=2), tmp_path)
    plan = clean_model_plan(cfg)
    assert [p["name"] for p in plan] == [
        "reference_surrogate_seed3", "reference_backbone_seed3", "reference_surrogate_seed4", "reference_backbone_seed4",
        "control_surrogate_seed1", "control_surrogate_thief_augment_seed1",
        "control_backbone_seed1", "control_backbone_thief_augment_seed1"]
    assert {p["backbone"]["name"] for p in plan if "backbone" in p["name"]} == {"resnet18"}
    assert {p["backbone"]["name"] for p in plan if "surrogate" in p["name"]} == {"small_cnn"}
    thief = {"hflip": 0.5, "scale": [1.0, 1.111]}
    assert all(p["augment"] == thief for p in plan if p["role"] == "reference")  # thief_augmented: true
    assert [p["augment"] for p in plan if p["role"] == "control"] == [{"hflip": 0.0}, thief] * 2
    assert all(p["epochs"] == 2 for p in plan)
    only_backbone = compose_config(TWO_FAMILIES + _train_py(references=[3])
                                   + ["method.trained_references.families=[backbone]",
                                      "method.trained_references.thief_augmented=false"], tmp_path)
    assert [(p["name"], p["augment"]) for p in clean_model_plan(only_backbone)] == [
        ("reference_backbone_seed3", {"hflip": 0.0})]
    loop = compose_config(TWO_FAMILIES + THIEF + ["method.trained_references.epochs=2",
                                                  "method.trained_references.seeds=[3]"], tmp_path)
    assert clean_model_plan(loop) == []  # the default pipeline: nothing is trained before the fit


@pytest.mark.parametrize("change, message", [
    (["method.trained_references.pipeline=script"],
     r"method.trained_references.pipeline must be one of \['loop', 'train_py'\], got 'script'"),
    (["callbacks.xmark_release.heldout_control.pipeline=Train_py"],
     r"callbacks.xmark_release.heldout_control.pipeline must be one of \['loop', 'train_py'\], got 'Train_py'"),
    (_train_py(references=[2], controls=[1, 2]), r"heldout_control.seeds share \[2\]"),
])
def test_bad_settings_are_refused_before_anything_is_trained(tmp_path, monkeypatch, change, message):
    import utils.run as run_module
    from utils.clean_model_runs import train_clean_models_first

    monkeypatch.setattr(run_module, "run_training", lambda cfg: pytest.fail("trained despite bad settings"))
    with pytest.raises(ValueError, match=message):
        train_clean_models_first(compose_config(SINGLE + change, tmp_path))


def test_a_run_with_train_py_references_and_controls(tmp_path, monkeypatch):
    """One tiny X-Mark run: a clean reference and a clean control trained by train.py first, then read back."""
    from models.safe_reader import load_model_checkpoint
    from utils.clean_model_runs import train_clean_models_first

    one_family = ["method.trained_references.families=[surrogate]",
                  "callbacks.xmark_release.heldout_control.proxy_families=false"]  # _fit's run has 3 families
    module, release = _fit(tmp_path, "tp", _train_py(references=[3], controls=[1], epochs=2) + one_family, monkeypatch)
    root = tmp_path / "tp" / "clean_models"
    assert sorted(p.name for p in root.iterdir()) == ["control_surrogate_seed1", "reference_surrogate_seed3"]
    summaries = {p.name: json.loads((p / "summary.json").read_text()) for p in root.iterdir()}
    for name, summary in summaries.items():  # train.py's own run: best-by-validation checkpoint, 2 epochs
        assert summary["monitor"] == "val/balanced_accuracy" and summary["best_checkpoint"], name
        assert "best-epoch" in summary["best_checkpoint"] and summary["global_step"] > 0
    # the reference is in the Ind-M term with the weights of its best checkpoint; none is trained in the loop
    assert len(module.trained_references) == 0 and len(module.references) == 1
    best, _ = load_model_checkpoint(summaries["reference_surrogate_seed3"]["best_checkpoint"], task="classification")
    for got, want in zip(module.references[0].state_dict().values(), best.state_dict().values()):
        assert torch.equal(got, want)
    assert module.hparams.reference_checkpoints == [summaries["reference_surrogate_seed3"]["best_checkpoint"]]
    # the control is the release's only held-out control (none trained at release), named by architecture
    assert release["heldout_architectures"] == ["small_cnn (control_checkpoints[0])"]
    assert "heldout_0" in release["control"] and "heldout_1" not in release["control"]

    # resumed into the same folder: both runs are reused, nothing is trained again
    import utils.run as run_module
    monkeypatch.setattr(run_module, "run_training", lambda cfg: pytest.fail("a finished clean run was retrained"))
    calls = []
    again = compose_config(TINY_ENSEMBLE + _train_py(references=[3], controls=[1], epochs=2) + one_family
                           + [f"paths.output_dir={tmp_path / 'tp'}"], tmp_path)
    added = train_clean_models_first(again, before_training=lambda: calls.append(1))
    assert added == {"reference_checkpoints": [summaries["reference_surrogate_seed3"]["best_checkpoint"]],
                     "control_checkpoints": [summaries["control_surrogate_seed1"]["best_checkpoint"]]}
    assert calls == []  # nothing to train: the owner-kit check is not needed either
    assert list(again.callbacks.xmark_release.control_checkpoints) == added["control_checkpoints"]


def test_a_multi_process_launch_is_refused_and_the_kit_check_runs_once(tmp_path, monkeypatch):
    import utils.run as run_module
    from utils.clean_model_runs import train_clean_models_first

    cfg = compose_config(SINGLE + _train_py(references=[3, 4]), tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(run_module, "run_training", lambda cfg: pytest.fail("trained in a multi-process launch"))
    with pytest.raises(ValueError, match=r"reference_surrogate_seed3 in every process .* list their checkpoints"):
        train_clean_models_first(cfg)
    monkeypatch.setenv("WORLD_SIZE", "1")
    trained, checks = [], []

    def fake_run(run_cfg):  # a finished run: summary.json and its checkpoint
        out = tmp_path / "run" / "clean_models" / f"reference_surrogate_seed{run_cfg.seed}"
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "best.ckpt").write_bytes(b"x")
        (out / "summary.json").write_text(json.dumps({"best_checkpoint": str(out / "checkpoints" / "best.ckpt")}))
        trained.append(int(run_cfg.seed))

    monkeypatch.setattr(run_module, "run_training", fake_run)
    added = train_clean_models_first(cfg, before_training=lambda: checks.append(len(trained)))
    assert trained == [3, 4] and checks == [0]  # the kit check once, before the first run
    assert [p.rsplit("/", 3)[-3] for p in added["reference_checkpoints"]] == ["reference_surrogate_seed3",
                                                                             "reference_surrogate_seed4"]
    assert list(cfg.method.reference_checkpoints) == added["reference_checkpoints"]
