"""Speed options: channels_last / torch.compile from `speed`, bf16-mixed, DataLoader options, and
benchmarks/throughput.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate

from conftest import ROOT, TINY_SEG, compose_config
from lightning_modules import TaskModule


def _module(tmp_path, overrides: list[str] = ()):
    cfg = compose_config(TINY_SEG + list(overrides), tmp_path)
    return instantiate(cfg.method, backbone=cfg.backbone, loss=cfg.loss, _recursive_=False), cfg


def _batches(n: int, size: int = 32, batch: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        mask = (torch.rand(batch, 1, size, size, generator=g) > 0.7).float()
        out.append({"image": torch.rand(batch, 3, size, size, generator=g), "mask": mask,
                    "box": torch.tensor([[0.0, 0.0, size - 1.0, size - 1.0]]).repeat(batch, 1),
                    "id": [f"{i}-{j}" for j in range(batch)]})
    return out


class _Batches:
    """An iterable of ready batches (a plain list would be taken for a list of dataloaders)."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def _fit(module, steps: int = 2, **trainer_kwargs) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, inference_mode=False, **trainer_kwargs)
    trainer.fit(module, train_dataloaders=_Batches(_batches(steps)))
    return trainer


def test_speed_group_defaults_reach_the_module_and_are_off(tmp_path):
    module, cfg = _module(tmp_path)
    assert set(cfg.speed) >= {"channels_last", "compile", "compile_mode", "compile_backend"}
    assert cfg.method.speed == cfg.speed
    assert module.speed["channels_last"] is False and module.speed["compile"] is False
    assert "speed" not in module.hparams and "compile" not in module.hparams  # runtime options, not saved


def test_unknown_speed_option_is_an_error(tmp_path):
    with pytest.raises(Exception, match="speed: unknown option"):
        _module(tmp_path, ["+speed.channel_last=true"])


def test_channels_last_and_compile_wire_through_and_checkpoints_keep_plain_names(tmp_path):
    # The eager backend runs the whole torch.compile path (Dynamo graph capture) without
    # inductor's C++ build, which takes minutes on a small shared CPU.
    module, _ = _module(tmp_path, ["speed.channels_last=true", "speed.compile=true", "speed.compile_backend=eager"])
    layouts = []
    step = module.training_step

    def recording_step(batch, batch_idx):
        layouts.append(batch["image"].is_contiguous(memory_format=torch.channels_last))
        return step(batch, batch_idx)

    module.training_step = recording_step
    trainer = _fit(module)
    assert layouts == [True, True]  # inputs converted after the device transfer
    convs = [m.weight for m in module.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert getattr(module.model, "_compiled_call_impl", None) is not None  # compiled in place
    assert not [k for k in module.state_dict() if "_orig_mod" in k]

    path = tmp_path / "speed.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert not [k for k in saved if "_orig_mod" in k]
    # a plain module (no speed options: they are not saved) loads it strictly ...
    loaded = TaskModule.load_from_checkpoint(path, map_location="cpu")
    assert loaded.speed["compile"] is False and loaded.speed["channels_last"] is False
    for name, value in module.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value)
    # ... and so does init_weights of a fresh plain module
    fresh, _ = _module(tmp_path)
    fresh.load_model_weights(path)
    x = torch.rand(2, 3, 32, 32)
    module.eval(), loaded.eval()
    assert torch.allclose(module.predict_probs(x), loaded.predict_probs(x), atol=1e-5)


def test_bf16_mixed_precision_trains_on_cpu(tmp_path):
    module, _ = _module(tmp_path, ["trainer.precision=bf16-mixed"])
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = _fit(module, precision="bf16-mixed")
    assert trainer.global_step == 2
    assert any(not torch.equal(before[k], v) for k, v in module.model.state_dict().items())
    assert all(p.dtype == torch.float32 for p in module.parameters())  # mixed: fp32 master weights


@pytest.mark.parametrize("precision, device, native, warned", [
    ("bf16-mixed", "cpu", False, True),
    ("bf16-true", "cpu", False, True),
    ("bf16-mixed", "cpu", True, False),    # AVX-512 / AMX: oneDNN runs bf16 natively
    ("bf16-mixed", "cuda", False, False),  # the CPU's bf16 units do not matter on a GPU
    ("32-true", "cpu", False, False),
    ("16-mixed", "cpu", False, False),
])
def test_emulated_bf16_warning_only_for_bf16_on_a_cpu_without_it(precision, device, native, warned):
    from utils.hardware import emulated_bf16_warning

    message = emulated_bf16_warning(precision, device, native)
    assert (message is not None) is warned
    if warned:
        assert f"trainer.precision={precision}" in message and "32-true" in message


@pytest.mark.parametrize("native", [False, True])
def test_training_warns_before_anything_is_written_when_bf16_would_be_emulated(tmp_path, monkeypatch, caplog, native):
    import utils.run as run_module

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):  # the first step after the trainer is built: nothing trained, nothing written
        raise Stop

    monkeypatch.setattr(run_module, "cpu_bf16_is_native", lambda: native)
    monkeypatch.setattr(run_module, "refuse_existing_kit", stop)
    cfg = compose_config(TINY_SEG + ["trainer.precision=bf16-mixed", "trainer.accelerator=cpu"], tmp_path)
    with caplog.at_level("WARNING", logger="medmark"), pytest.raises(Stop):
        run_module.run_training(cfg)
    warnings = [r.getMessage() for r in caplog.records if "without native bf16" in r.getMessage()]
    assert len(warnings) == (0 if native else 1)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("workers", [2, 0])
def test_dataloader_options_reach_the_dataloader(tmp_path, workers):
    cfg = compose_config(TINY_SEG + [f"data.num_workers={workers}", "data.pin_memory=true",
                                     "data.persistent_workers=true", "data.prefetch_factor=3"], tmp_path)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader(), datamodule.test_dataloader()):
        assert loader.num_workers == workers and loader.pin_memory is True
        # persistent_workers / prefetch_factor only mean something with worker processes
        assert loader.persistent_workers is (workers > 0)
        assert loader.prefetch_factor == (3 if workers else None)


def test_common_data_defaults_are_plain_dataloader_defaults(tmp_path):
    cfg = compose_config(["data=kvasir_seg", f"data.root={tmp_path}"], tmp_path)
    assert cfg.data.num_workers == 2 and cfg.data.pin_memory is False
    assert cfg.data.persistent_workers is False and cfg.data.prefetch_factor is None


def test_throughput_benchmark_prints_one_json_object(tmp_path):  # ~15 s on 2 cores
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--device", "cpu", "--steps", "2",
           "--warmup", "1", "--batch-size", "2", "--threads", "1", "--image-size", "50", "--min-images", "16",
           "--backbones", "unet_resnet18,no_such_backbone", "--methods", "task,stealthmark,xmark",
           "--data-dir", str(tmp_path / "data"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert report == json.loads(out.read_text())
    settings = report["settings"]
    assert settings["device"] == "cpu" and settings["precision"] == "32-true"
    assert settings["gpu_util_source"] is None and settings["memory_kind"].startswith("cpu_peak_rss")
    unet = report["results"]["unet_resnet18"]
    for method in ("task", "stealthmark"):
        entry = unet[method]
        assert "error" not in entry, entry.get("error")
        assert entry["samples_per_s"] > 0 and entry["peak_memory_mib"] > 0
        assert entry["gpu_util_percent"] is None
        assert 0.0 <= entry["data_loading"]["share"] <= 1.0
        assert entry["data_loading"]["num_workers"] == 2  # configs/data/_common.yaml
        assert entry["throughput_ratio_to_task"] > 0 and entry["time_ratio_to_task"] > 0
    assert unet["task"]["throughput_ratio_to_task"] == 1.0
    assert unet["stealthmark"]["image_size"] == 50
    assert "skipped" in unet["xmark"]  # a segmentation backbone: X-Mark needs a classifier
    assert "error" in report["results"]["no_such_backbone"]  # recorded, the run went on


@pytest.mark.parametrize(("workers", "cpus", "threads"), [(2, 2, 1), (1, 2, 2), (0, 2, 2), (4, 2, 1), (3, 16, 5),
                                                           (2, 3, 1), (16, 16, 1)])
def test_each_test_worker_gets_an_equal_share_of_the_cpus(workers, cpus, threads):
    # make test runs one pytest-xdist worker per CPU; torch's default of one thread per CPU in each
    # would oversubscribe the cores (conftest sets OMP_NUM_THREADS to this share before torch starts)
    from conftest import worker_threads

    assert worker_threads(workers, cpus) == threads
