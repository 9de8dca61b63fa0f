"""Every config composes and instantiates: presets, backbones, trainers, loggers, experiments."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONFIGS, compose_config
from utils.run import redacted_config

DATA_PRESETS = sorted(p.stem for p in (CONFIGS / "data").glob("[!_]*.yaml"))
BACKBONES = sorted(p.stem for p in (CONFIGS / "backbone").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def test_the_groups_design_md_lists_exist():
    for group in ["method", "data", "backbone", "loss", "trainer", "logger", "callbacks", "paths", "experiment"]:
        assert (CONFIGS / group).is_dir(), group
    for trainer in ["cpu", "gpu", "ddp", "ddp_cpu", "multinode"]:
        assert (CONFIGS / "trainer" / f"{trainer}.yaml").is_file()
    for logger in ["wandb", "csv", "none"]:
        assert (CONFIGS / "logger" / f"{logger}.yaml").is_file()


@pytest.mark.parametrize("preset", DATA_PRESETS)
def test_every_data_preset_instantiates(preset, tmp_path):
    overrides = [f"data={preset}"]
    cfg = compose_config(overrides, tmp_path)
    if OmegaConf.is_missing(cfg.data, "root"):
        cfg = compose_config(overrides + [f"data.root={tmp_path}"], tmp_path)
    dm = instantiate(cfg.data)
    assert dm.task in ("segmentation", "classification")
    assert dm.num_classes == cfg.data.num_classes
    assert cfg.optimized_metric.startswith("val/")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_config_composes_with_matching_data(backbone, tmp_path):
    cfg = compose_config([f"backbone={backbone}"], tmp_path)
    target = cfg.backbone._target_
    assert target.startswith("models.")
    OmegaConf.to_container(cfg.backbone, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert plain["task_name"] == experiment
    assert plain["callbacks"]["model_checkpoint"]["monitor"] == plain["optimized_metric"]


def test_command_line_overrides_reach_the_config(tmp_path):
    cfg = compose_config(["experiment=task_cls_synthetic", "loss.ce.weight=0.3", "data.batch_size=7",
                          "method.optimizer.lr=0.01"], tmp_path)
    assert cfg.loss.ce.weight == 0.3 and cfg.data.batch_size == 7 and cfg.method.optimizer.lr == 0.01
    assert cfg.optimized_metric == "val/balanced_accuracy"
    assert cfg.backbone.num_classes == 2 and cfg.backbone.in_channels == 1


def test_secret_keys_are_redacted_for_loggers(tmp_path):
    cfg = compose_config(["+method.payload=OWNER-42", "secret_keys=[method.payload]"], tmp_path)
    public = redacted_config(cfg)  # no owner kit: no salt, no digest at all
    assert "OWNER-42" not in str(public)
    assert public["method"]["payload"] == "<secret>"
    salted = redacted_config(cfg, salt=b"\x01" * 32)
    assert "OWNER-42" not in str(salted)
    assert salted["method"]["payload"].startswith("<secret hmac-sha256:")


def test_ddp_cpu_trainer_instantiates_two_gloo_processes(tmp_path):
    cfg = compose_config(["trainer=ddp_cpu"], tmp_path)
    assert cfg.trainer.devices == 2 and cfg.trainer.strategy.process_group_backend == "gloo"
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.num_devices == 2
