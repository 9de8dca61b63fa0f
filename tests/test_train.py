"""train.py end to end, as a user runs it: tiny budgets of the real experiment configs."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import TINY_CLS, TINY_SEG, read_summary, run_train
from lightning_modules import TaskModule

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg")
    proc, run_dir = run_train(TINY_SEG, tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, run_dir, proc


def test_segmentation_run_writes_the_run_contract(seg_run):
    _, run_dir, proc = seg_run
    summary = read_summary(run_dir)
    assert summary["monitor"] == "val/dice"
    assert 0.0 <= summary["best_score"] <= 1.0
    assert {"test/dice", "test/iou", "test/auroc", "test/hd95"} <= set(summary["test"])
    assert "val/dice" in summary["untrained"]  # eval_untrained in the experiment
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert summary["best_checkpoint"] and "best-epoch" in summary["best_checkpoint"]
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "figures").glob("val_panel_epoch*.png"))
    assert "best val/dice" in proc.stdout and str(run_dir) in proc.stdout


def test_checkpoint_rebuilds_the_model_without_hydra(seg_run):
    _, run_dir, _ = seg_run
    module = TaskModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    module.eval()
    probs = module.predict_probs(torch.rand(2, 3, 32, 32))
    assert probs.shape == (2, 1, 32, 32) and 0.0 <= probs.min() and probs.max() <= 1.0


def test_resume_from_last_checkpoint_continues_the_run(seg_run):
    tmp, run_dir, _ = seg_run
    first = read_summary(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    proc, resumed_dir = run_train(TINY_SEG + ["trainer.max_epochs=2", f"ckpt_path={last}", "eval_untrained=false"],
                                  tmp, run_name="resumed")
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = read_summary(resumed_dir)
    # one more epoch on top of the first run's steps, not a fresh start
    assert resumed["global_step"] == 2 * first["global_step"]


def test_classification_run_reports_balanced_accuracy(tmp_path):
    proc, run_dir = run_train(TINY_CLS, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = read_summary(run_dir)
    assert summary["monitor"] == "val/balanced_accuracy"
    assert {"test/accuracy", "test/balanced_accuracy", "test/auroc"} <= set(summary["test"])


def _on_folder(root) -> list[str]:
    """The tiny segmentation run pointed at a dataset folder (no synthetic keys)."""
    return [o for o in TINY_SEG if not o.startswith("data.synthetic.")] + ["data=kvasir_seg", f"data.root={root}"]


def _copy_generated_polyps(tmp_path, seg_run):
    tmp, _, _ = seg_run
    generated = next(p for p in (tmp / "data").iterdir() if p.name.startswith("synthetic_polyp"))
    root = tmp_path / "copy"
    shutil.copytree(generated, root)
    return root


def test_corrupt_image_stops_training_with_exit_2_naming_the_file(tmp_path, seg_run):
    root = _copy_generated_polyps(tmp_path, seg_run)
    victim = sorted((root / "Kvasir-SEG" / "images").glob("*.jpg"))[3]
    victim.write_bytes(b"\xff\xd8 truncated nonsense")
    proc, run_dir = run_train(_on_folder(root), tmp_path)
    assert proc.returncode == 2
    assert victim.name in proc.stderr
    assert not (run_dir / "checkpoints").exists()  # stopped before training


def test_mask_of_wrong_size_stops_training_naming_the_file(tmp_path, seg_run):
    from PIL import Image

    root = _copy_generated_polyps(tmp_path, seg_run)
    victim = sorted((root / "Kvasir-SEG" / "masks").glob("*.jpg"))[5]
    Image.new("L", (7, 9)).save(victim)
    proc, _ = run_train(_on_folder(root), tmp_path)
    assert proc.returncode == 2
    assert victim.name in proc.stderr and "mask size" in proc.stderr


def test_missing_dataset_root_is_a_clear_error(tmp_path):
    proc, _ = run_train(_on_folder(tmp_path / "nowhere"), tmp_path)
    assert proc.returncode == 2 and "nowhere" in proc.stderr


def test_ddp_cpu_two_processes_train_one_model(tmp_path):
    proc, run_dir = run_train(TINY_SEG + ["trainer=ddp_cpu", "eval_untrained=false"], tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = read_summary(run_dir)
    assert summary["best_score"] is not None and "test/dice" in summary["test"]
    # DistributedSampler gives each of the 2 processes half of the training set: one model,
    # half the steps per epoch of a single process (batch 4, one epoch).
    per_process = math.ceil(summary["data"]["num_train"] / 2)
    assert summary["global_step"] == math.ceil(per_process / 4)


def test_wandb_logger_goes_offline_without_credentials_and_never_prompts(tmp_path):
    overrides = [o for o in TINY_CLS if not o.startswith("logger=")] + ["logger=wandb", "test=false"]
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": "", "HOME": str(tmp_path), "WANDB_DIR": str(tmp_path)}
    proc, run_dir = run_train(overrides, tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "wandb sync" in proc.stderr + proc.stdout
    assert list(run_dir.rglob("offline-run-*")), "no offline W&B run written"
    logged = (run_dir / "config.yaml").read_text()
    assert "task_cls_synthetic" in logged
    assert json.loads((run_dir / "summary.json").read_text())["monitor"] == "val/balanced_accuracy"


def test_init_weights_starts_from_another_runs_network_and_names_bad_files(seg_run, tmp_path):
    from hydra.utils import instantiate

    from conftest import compose_config

    _, run_dir, _ = seg_run
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    cfg = compose_config(TINY_SEG, tmp_path)
    module = instantiate(cfg.method, backbone=cfg.backbone, loss=cfg.loss, _recursive_=False)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    name = next(k for k in saved if k.startswith("model.") and saved[k].is_floating_point() and saved[k].dim() == 4)
    assert not torch.equal(module.model.state_dict()[name[len("model."):]], saved[name])  # fresh init differs
    module.load_model_weights(checkpoint)
    assert torch.equal(module.model.state_dict()[name[len("model."):]], saved[name])

    with pytest.raises(FileNotFoundError, match="init_weights: .*missing.ckpt"):
        module.load_model_weights(tmp_path / "missing.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt is not a readable"):
        module.load_model_weights(junk)
    other = compose_config(TINY_SEG + ["backbone=unet_resnet34"], tmp_path)
    bigger = instantiate(other.method, backbone=other.backbone, loss=other.loss, _recursive_=False)
    with pytest.raises(ValueError, match="do not fit this backbone"):
        bigger.load_model_weights(checkpoint)
