"""X-Mark proxy ensemble, step budget and suspect-matrix benchmark (docs/xmark.md "Measured (ensemble)").

Fast: the ensemble config composes (families from configs/backbone), bad ensemble settings are
refused by name, every proxy sends the generator gradient (and a proxy of weight 0 none), the
``sample`` mode never draws a zero-weight proxy, and a tiny fit stops after the same number of
generator steps for 1× and 2× the data, releasing held-out controls of every family.
Slow: ``benchmarks/xmark_matrix.py --tiny`` end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import ROOT, compose_config

# Three tiny proxies of two families (small CNN as backbone, a ResNet18, a second small CNN), 32 px.
TINY_ENSEMBLE = [
    "experiment=xmark_synthetic", "logger=none", "test=false", "callbacks.validation_panels=null",
    "callbacks.xmark_panels=null", "data.synthetic.num_images=80", "data.synthetic.image_size=32",
    "data.image_size=32", "data.batch_size=16", "loss.lpips=null", "method.saliency_cache_dir=null",
    "method.generator.base_width=4", "method.generator.depth=2",
    "method.warmup_steps=2", "method.proxy_steps=2", "method.generator_steps=3",
    "+backbone@method.extra_proxies.resnet18=resnet18", "+backbone@method.extra_proxies.cnn_b=small_cnn",
    "callbacks.xmark_release.seed=5", "callbacks.xmark_release.verification.seed=6",
    "callbacks.xmark_release.verification.num_images=8",
]


def build_module(overrides: list[str], tmp_path: Path):
    cfg = compose_config(overrides, tmp_path)
    plain = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    return instantiate(plain["method"], backbone=plain["backbone"], loss=plain["loss"], _recursive_=False), cfg


def test_ensemble_experiment_composes_families_from_configs_backbone(tmp_path):
    cfg = compose_config(["experiment=xmark_ensemble_synthetic"], tmp_path)
    proxies = OmegaConf.to_container(cfg.method.extra_proxies, resolve=True)
    assert cfg.backbone.name == "small_cnn" and sorted(proxies) == ["resnet18", "vgg16_bn"]
    assert proxies["vgg16_bn"]["name"] == "vgg16_bn" and proxies["vgg16_bn"]["mlp_ratio"] == 0.0625
    assert proxies["resnet18"]["num_classes"] == 2 and proxies["resnet18"]["in_channels"] == 1
    assert cfg.method.generator_steps == 45 and cfg.callbacks.xmark_release.heldout_control.proxy_families
    single = compose_config(["experiment=xmark_synthetic"], tmp_path)
    assert OmegaConf.to_container(single.method.extra_proxies) == {}  # the original single-proxy X-Mark
    assert OmegaConf.to_container(single.method.thief_augment) == {"hflip": 0.0, "zoom": [1.0, 1.0]}  # off
    augmented = compose_config(["experiment=xmark_augmented_synthetic"], tmp_path)
    assert OmegaConf.to_container(augmented.method.thief_augment) == {"hflip": 0.5, "zoom": [1.0, 1.111]}
    assert augmented.method.generator_steps == 180 and augmented.method.mark_fraction == 0.5
    assert augmented.callbacks.xmark_release.fraction == 0.5  # the release marks the share the proxy saw


@pytest.mark.parametrize("change, message", [
    (["+backbone@method.extra_proxies.backbone=resnet18"], "'backbone' is the name of the main proxy"),
    (["+method.proxy_weights.vgg=1.0"], r"proxy_weights names \['vgg'\]"),
    (["+method.proxy_weights.backbone=0.0", "+method.proxy_weights.resnet18=0.0",
      "+method.proxy_weights.cnn_b=0.0"], "positive sum"),
    (["method.proxy_combine=vote"], "proxy_combine must be sum or sample"),
    (["method.generator_steps=0"], "generator_steps must be >= 1"),
    (["method.warmup_steps=0"], "warmup_steps must be >= 1"),
    (["+method.thief_augment.crop=0.9"], r"thief_augment has unknown keys \['crop'\]"),
    (["method.thief_augment.zoom=[0.9,1.0]"], "method.thief_augment: zoom must satisfy"),
    (["method.thief_augment.hflip=2"], "method.thief_augment: hflip must be a probability"),
])
def test_bad_ensemble_settings_are_refused_by_name(tmp_path, change, message):
    with pytest.raises(Exception, match=message):
        build_module(TINY_ENSEMBLE + change, tmp_path)


def _generator_grads(module, batch, weights: dict[str, float]) -> torch.Tensor:
    """Gradient on G's parameters of the targeted term with these proxy weights (sum mode)."""
    module.hparams.proxy_weights = {n: weights.get(n, 1.0) for n in module.proxies()}
    module.generator.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    outputs = module.generator_outputs(batch, module.saliency(batch["image"]), train=True)
    module.loss_terms["targeted"].compute(outputs, batch).backward()
    return torch.cat([p.grad.flatten() for p in module.generator.parameters() if p.grad is not None])


def test_every_proxy_drives_the_generator_and_a_zero_weight_proxy_does_not(tmp_path):
    module, _ = build_module(TINY_ENSEMBLE, tmp_path)
    module.surrogate.eval()
    names = list(module.proxies())
    assert names == ["backbone", "resnet18", "cnn_b"] and len(module.clean_twins) == 2
    assert len(module.clean_models()) == 3  # surrogate + a clean twin per extra family (Ind-M term)
    torch.manual_seed(1)
    batch = {"image": torch.rand(6, 1, 32, 32), "label": torch.tensor([0, 0, 0, 1, 0, 1])}
    alone = {n: _generator_grads(module, batch, {m: float(m == n) for m in names}) for n in names}
    for name, grad in alone.items():
        assert grad.abs().sum() > 0, f"proxy {name} sends the generator no gradient"
    every = _generator_grads(module, batch, {})
    # sum mode = the weighted mean of the proxies' terms: the gradient is the mean of each one's
    assert torch.allclose(every, sum(alone.values()) / 3, rtol=1e-4, atol=1e-7)
    without = _generator_grads(module, batch, {"resnet18": 0.0})
    assert not torch.allclose(every, without, rtol=1e-3)
    assert torch.allclose(without, (alone["backbone"] + alone["cnn_b"]) / 2, rtol=1e-4, atol=1e-7)
    weighted = _generator_grads(module, batch, {"backbone": 3.0, "resnet18": 1.0, "cnn_b": 0.0})
    assert torch.allclose(weighted, (3 * alone["backbone"] + alone["resnet18"]) / 4, rtol=1e-4, atol=1e-7)

    module.hparams.proxy_combine = "sample"
    module.hparams.proxy_weights = {"backbone": 0.0, "resnet18": 1.0, "cnn_b": 3.0}
    torch.manual_seed(0)
    drawn = [module.proxies_for_step(train=True)[0] for _ in range(200)]
    assert all(len(d) == 1 for d in drawn) and {d[0] for d in drawn} == {"resnet18", "cnn_b"}
    assert 0.6 < sum(d[0] == "cnn_b" for d in drawn) / 200 < 0.9  # ∝ weight (3:1)
    assert module.proxies_for_step(train=False)[0] == ["resnet18", "cnn_b"]  # evaluation: every proxy


def test_thief_augmentation_reaches_the_proxies_and_the_rescaled_term_only(tmp_path, monkeypatch):
    """method.thief_augment: proxies train on flipped copies, the rescaled term reads the flipped x_w;
    the plain targeted term (the verifier's view), the clean models and their training stay un-augmented."""
    single = [o for o in TINY_ENSEMBLE if "extra_proxies" not in o]
    module, _ = build_module(single + ["method.thief_augment.hflip=1.0", "method.proxy_rescale=0.0",
                                       "method.rescale_range=[1.0,1.0]", "method.mark_fraction=1.0"], tmp_path)
    seen: dict[str, list[torch.Tensor]] = {"proxy": [], "surrogate": []}
    module.model.register_forward_pre_hook(lambda m, args: seen["proxy"].append(args[0].detach().clone()))
    module.surrogate.register_forward_pre_hook(lambda m, args: seen["surrogate"].append(args[0].detach().clone()))
    optimizers = module.configure_optimizers()
    monkeypatch.setattr(module, "optimizers", lambda: optimizers)
    monkeypatch.setattr(module, "manual_backward", lambda loss: loss.backward())
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    torch.manual_seed(2)
    labels = torch.tensor([0, 1, 0, 1])
    batch = {"image": torch.rand(4, 1, 32, 32), "label": labels}

    module.training_step(batch, 0)  # warm-up: clean batch
    assert torch.equal(seen["proxy"][0], batch["image"].flip(-1))
    assert torch.equal(seen["surrogate"][0], batch["image"])  # the inline surrogate learns the clean data as is

    module.iterations.fill_(module.hparams.warmup_steps)  # warm-up over: marked batch, then G's step
    seen["proxy"].clear()
    module.training_step(batch, 1)
    proxy_batch, marked_view, pipeline_view = seen["proxy"]
    non_target = labels != module.target_class
    assert torch.equal(proxy_batch[non_target], batch["image"][non_target].flip(-1))  # never marked, flipped
    assert not torch.equal(proxy_batch[~non_target], batch["image"][~non_target].flip(-1))  # marked, then flipped
    assert torch.equal(pipeline_view, marked_view.flip(-1))  # rescaled term: thief's pipeline on x_w
    # plain targeted term: x_w as the verifier queries it (within ε of x, not mirrored)
    epsilon = module.hparams.generator["epsilon"]
    assert (marked_view - batch["image"]).abs().max() <= epsilon + 1e-6
    assert (marked_view - batch["image"].flip(-1)).abs().max() > 0.5


@pytest.mark.parametrize("hflip, thief_augmented, expected", [
    (1.0, True, ["small_cnn", "small_cnn+thief_augment", "small_cnn", "small_cnn+thief_augment"]),
    (1.0, False, ["small_cnn", "small_cnn"]),  # the release's switch off: plain controls only
    (0.0, True, ["small_cnn", "small_cnn"]),  # method.thief_augment off: nothing to add
])
def test_heldout_controls_also_train_with_the_thief_augmentation(tmp_path, monkeypatch, hflip, thief_augmented,
                                                                  expected):
    """With method.thief_augment on, each held-out control is trained twice: on the batches as they come
    and through the thief's pipeline (an innocent party trains with it too); same seed, same architecture."""
    import lightning_modules.xmark as xmark_module
    from callbacks.xmark import XMarkRelease

    single = [o for o in TINY_ENSEMBLE if "extra_proxies" not in o]
    module, _ = build_module(single + [f"method.thief_augment.hflip={hflip}"], tmp_path)
    seen: list[list[torch.Tensor]] = []

    def recording_instantiate(config, *args, **kwargs):
        model = instantiate(config, *args, **kwargs)
        inputs: list[torch.Tensor] = []
        seen.append(inputs)
        model.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
        return model

    monkeypatch.setattr(xmark_module, "instantiate", recording_instantiate)
    torch.manual_seed(3)
    batch = {"image": torch.rand(4, 1, 32, 32), "label": torch.tensor([0, 1, 0, 1])}
    datamodule = type("DM", (), {"train_dataloader": lambda self: [batch]})()
    release = XMarkRelease(output_dir=".", release_dir="r", owner_dir="o", data={}, fraction=1.0, seed=5,
                           verification={"split": "test", "num_images": 4, "seed": 1},
                           thresholds={"tau": 0.2, "alpha": 0.01}, owner_id="t",
                           heldout_control={"epochs": 1, "seeds": [1, 2], "thief_augmented": thief_augmented})
    models = release.heldout_models(module, datamodule)
    assert release.heldout_architectures == expected and len(models) == len(expected) == len(seen)
    for name, inputs in zip(expected, seen):
        assert len(inputs) == 1  # one epoch of one batch
        view = batch["image"].flip(-1) if name.endswith("+thief_augment") else batch["image"]
        assert torch.equal(inputs[0], view)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['thief_augment'\].*thief_augmented"):
        XMarkRelease(output_dir=".", release_dir="r", owner_dir="o", data={}, fraction=1.0, seed=5,
                     verification={}, thresholds={}, owner_id="t", heldout_control={"thief_augment": True})


class _ConstantTarget(torch.nn.Module):
    """Answers y_t = 1 to every image, marked or not: WSR 1, ΔP 0."""

    def forward(self, x):
        return torch.tensor([0.0, 10.0]).expand(len(x), 2)


class _MarkDetector(torch.nn.Module):
    """Answers y_t exactly when the image differs from ``clean`` (B×C×H×W): p(y_t) 0.5 on x, ≈ 1 on x_w."""

    def __init__(self, clean: torch.Tensor):
        super().__init__()
        self.clean = clean

    def forward(self, x):
        shift = (x - self.clean).abs().flatten(1).mean(1)
        return torch.stack([torch.zeros_like(shift), 1e4 * shift], 1)


def test_checkpoint_score_rewards_delta_p_not_a_proxy_that_always_answers_the_target(tmp_path, monkeypatch):
    """val/xmark_score follows the verifier's ΔP: a proxy saying y_t to everything (WSR 1) scores ≤ 0,
    one that answers to δ only scores ≈ 0.5; the weakest proxy of the ensemble counts."""
    module, _ = build_module(TINY_ENSEMBLE, tmp_path)
    module.eval()
    module.iterations.fill_(module.hparams.warmup_steps)  # past warm-up: the mark is scored
    torch.manual_seed(4)
    batch = {"image": torch.rand(6, 1, 32, 32), "label": torch.zeros(6, dtype=torch.long),
             "id": [f"i{k}" for k in range(6)]}
    logged: dict[str, object] = {}  # the task metrics log torchmetrics objects: kept out below
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, value))

    def score_with(**proxies) -> dict[str, float]:
        for name, proxy in proxies.items():
            if name == "backbone":
                module.model = proxy
            else:
                module.extra_proxies[name] = proxy
        logged.clear()
        with torch.no_grad():
            module._eval_step(batch, 0, "val")
        return {k: float(v) for k, v in logged.items() if isinstance(v, (float, torch.Tensor))}

    every_proxy = {"resnet18": _MarkDetector(batch["image"]), "cnn_b": _MarkDetector(batch["image"])}
    detecting = score_with(backbone=_MarkDetector(batch["image"]), **every_proxy)
    assert detecting["val/delta_p_proxy"] == pytest.approx(0.5, abs=0.01)
    clean = detecting["val/delta_p_proxy"] - detecting["val/xmark_score"]  # max ΔP over the clean models
    assert detecting["val/delta_p_references"] == pytest.approx(clean, abs=1e-5)
    assert clean >= detecting["val/delta_p_surrogate"] - 1e-6 and abs(clean) < 0.2
    assert detecting["val/xmark_score"] > 0.3
    constant = score_with(backbone=_ConstantTarget())
    assert constant["val/wsr_proxy"] == 1.0 and constant["val/delta_p_proxy"] == pytest.approx(0.0, abs=1e-6)
    assert constant["val/xmark_score"] == pytest.approx(-clean, abs=1e-5)  # the weakest proxy: ΔP 0
    assert constant["val/xmark_score"] < detecting["val/xmark_score"] - 0.3
    module.clean_twins["cnn_b"] = _MarkDetector(batch["image"])  # a clean model (not the surrogate) answers to δ
    transferable = score_with(backbone=_MarkDetector(batch["image"]))
    assert transferable["val/delta_p_proxy"] == pytest.approx(0.5, abs=0.01)
    assert transferable["val/xmark_score"] == pytest.approx(0.0, abs=0.01)
    assert transferable["val/delta_p_references"] == pytest.approx(0.5, abs=0.01)
    # a clean model answering y_t to every image, marked or not: WSR 1, yet δ moves nothing
    module.clean_twins["cnn_b"] = _ConstantTarget()
    biased = score_with(backbone=_MarkDetector(batch["image"]))
    assert biased["val/wsr_references"] == 1.0
    assert biased["val/delta_p_references"] == pytest.approx(clean, abs=1e-5)


def _fit(tmp_path: Path, name: str, extra: list[str], monkeypatch) -> tuple[object, dict]:
    """A real ``train.py`` run in-process; the X-Mark module it trained and its ``release.json``."""
    import utils.run as run_module

    built = {}

    def keep_module(config, *args, **kwargs):
        obj = instantiate(config, *args, **kwargs)
        if type(obj).__name__ == "XMarkModule":
            built["module"] = obj
        return obj

    monkeypatch.setattr(run_module, "instantiate", keep_module)
    run_module.run_training(compose_config(TINY_ENSEMBLE + extra + [f"paths.output_dir={tmp_path / name}"], tmp_path))
    return built["module"], json.loads((tmp_path / name / "release.json").read_text())


def test_step_budget_is_independent_of_dataset_size_and_controls_cover_every_family(tmp_path, monkeypatch):
    """Same generator steps for 80 and 160 images; the release tests every proxy and a held-out control per family."""
    held = ["callbacks.xmark_release.heldout_control.epochs=1", "callbacks.xmark_release.heldout_control.seeds=[1]"]
    small, release = _fit(tmp_path, "x1", held, monkeypatch)
    large, _ = _fit(tmp_path, "x2", ["data.synthetic.num_images=160", "callbacks.xmark_release.heldout_control.epochs=0"],
                    monkeypatch)
    budget = 2 + 3 * 2  # warmup_steps + generator_steps * proxy_steps
    assert small.trainer.num_training_batches < large.trainer.num_training_batches  # 2x data, more batches/epoch
    for module in (small, large):
        assert int(module.iterations) == budget and module.generator_updates == 3
    assert sorted(release["proxies"]) == ["backbone", "cnn_b", "resnet18"]
    assert release["heldout_architectures"] == ["small_cnn", "resnet18", "small_cnn"]  # surrogate's + each family
    assert {"heldout_0", "heldout_1", "heldout_2", "reference_0", "reference_1", "reference_2"} == set(release["control"])
    assert release["linf_within_epsilon"] and release["linf_255"] <= int(255 * release["epsilon"])


def test_matrix_refuses_a_folder_that_is_not_a_release(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "xmark_matrix.py"), "--release", str(tmp_path),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "release.json" in proc.stderr and str(tmp_path) in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_matrix_tiny_writes_json_markdown_and_heat_map(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "xmark_matrix.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                               "WANDB_MODE": "disabled", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "xmark_matrix.json").read_text())
    assert json.loads(proc.stdout) == doc
    assert [(c["arch"], c["scenario"]) for c in doc["cells"]] == [("small_cnn", "mal"), ("small_cnn", "indm")]
    for cell in doc["cells"]:
        assert cell["error"] is None and 0.0 <= cell["p_value"] <= 1.0 and 0.0 <= cell["benign_accuracy"] <= 1.0
    assert doc["summary"][0]["mal_runs"] == 1 and doc["summary"][0]["indm_runs"] == 1
    table = (out / "xmark_matrix.md").read_text()
    assert "| ΔP | p | WSR | benign BA | verdict |" in table and "Ind-M" in table
    assert (out / "xmark_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fake_release(folder: Path, source: Path) -> Path:
    (folder / "owner").mkdir(parents=True)
    (folder / "owner" / "secret.json").write_text(json.dumps({"marker": {"image_size": 32}}))
    (folder / "release.json").write_text(json.dumps({"release_dir": str(folder / "released"), "source": str(source),
                                                     "made_at": folder.name}))
    return folder


def test_matrix_trains_an_ind_m_suspect_once_per_source_and_a_mal_suspect_per_release(tmp_path, monkeypatch):
    """Ind-M suspects do not depend on the release: two releases of one source share them; Mal ones do not,
    and a suspect whose training did not finish (no checkpoint) is trained again."""
    from benchmarks import xmark_matrix

    trained, verified = [], []

    def fake_train(overrides, output_dir, data_dir):
        trained.append((output_dir.name, [o for o in overrides if o.startswith("data.root=")][0]))
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = output_dir / "best.ckpt"
        checkpoint.write_bytes(b"weights")
        summary = {"best_checkpoint": str(checkpoint)}
        (output_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    def fake_verify(overrides, output_dir):
        verified.append(overrides[:2])
        return 0, {"verified": False, "p_value": 1.0, "delta_p": 0.0, "wsr": 0.0, "benign_accuracy": 0.5}, None

    monkeypatch.setattr(xmark_matrix, "train", fake_train)
    monkeypatch.setattr(xmark_matrix, "run_verify", fake_verify)
    args = xmark_matrix.parse_args(["--release", "unused", "--archs", "small_cnn", "--seeds", "42"])
    # both spellings of several releases (a user typed the first and got exit 2 before)
    assert xmark_matrix.parse_args(["--release", "a", "b", "--release", "c"]).release == ["a", "b", "c"]
    source = tmp_path / "source"
    first, second = _fake_release(tmp_path / "first", source), _fake_release(tmp_path / "second", source)
    work = tmp_path / "work"
    cells = [xmark_matrix.run_cell(args, release, "small_cnn", 42, scenario, work)
             for release in (first, second) for scenario in ("mal", "indm")]
    assert [c["suspect_reused"] for c in cells] == [False, False, False, True]
    assert [root for _, root in trained] == [f"data.root={first / 'released'}", f"data.root={source}",
                                             f"data.root={second / 'released'}"]
    # each release's own secret verifies the shared Ind-M suspect
    assert verified[1][1] == verified[3][1] and verified[1][0] != verified[3][0]
    assert verified[3][0] == f"secret={second / 'owner' / 'secret.json'}"
    # another seed is another suspect; a lost checkpoint is retrained, not verified as missing
    xmark_matrix.run_cell(args, second, "small_cnn", 7, "indm", work)
    assert len(trained) == 4 and trained[-1][0].startswith("indm_small_cnn_s7_")
    (work / "suspects" / trained[1][0] / "best.ckpt").unlink()
    assert xmark_matrix.run_cell(args, first, "small_cnn", 42, "indm", work)["suspect_reused"] is False
    assert len(trained) == 5 and trained[-1] == trained[1]
    # the same source path with other contents (relabelled, an image re-exported) is another suspect
    source.mkdir()
    (source / "train.csv").write_text("Path,Lung Opacity\nimage_0.png,1\n")
    (source / "image_0.png").write_bytes(b"png")
    indm = [xmark_matrix.run_cell(args, first, "small_cnn", 42, "indm", work)["suspect_reused"] for _ in range(2)]
    assert indm == [False, True] and len(trained) == 6 and trained[-1][0] != trained[1][0]
    (source / "train.csv").write_text("Path,Lung Opacity\nimage_0.png,0\n")  # same size, one label flipped
    assert xmark_matrix.run_cell(args, first, "small_cnn", 42, "indm", work)["suspect_reused"] is False
    (source / "image_0.png").write_bytes(b"png, re-exported")
    assert xmark_matrix.run_cell(args, first, "small_cnn", 42, "indm", work)["suspect_reused"] is False
    assert len(trained) == 8 and len({name for name, _ in trained[-3:]}) == 3
    # one run (shared ``fingerprints``) walks each training folder once, not once per cell
    walked = []
    monkeypatch.setattr(xmark_matrix, "data_fingerprint",
                        lambda root, real=xmark_matrix.data_fingerprint: walked.append(root) or real(root))
    shared = {}
    reused = [xmark_matrix.run_cell(args, first, "small_cnn", seed, "indm", work, shared)["suspect_reused"]
              for seed in (42, 7, 42)]
    assert reused == [True, False, True] and walked == [source] and len(trained) == 9


@pytest.mark.parametrize("backbone, surrogate, covered", [
    ("resnet18", ["+backbone@method.surrogate_backbone=small_cnn"], ["backbone"]),  # another architecture
    ("small_cnn", ["+backbone@method.surrogate_backbone=small_cnn"], []),  # the same architecture, own config
    ("small_cnn", [], []),  # the surrogate is the backbone's config
])
def test_a_main_proxy_unlike_the_surrogate_gets_a_clean_twin_and_held_out_controls(tmp_path, backbone, surrogate,
                                                                                  covered):
    """The Ind-M term and the controls cover the main proxy's architecture when the surrogate does not
    (a ResNet18 proxy beside a small-CNN surrogate left clean ResNet18s answering to δ)."""
    from callbacks.xmark import XMarkRelease

    base = [o for o in TINY_ENSEMBLE if "extra_proxies" not in o] + [f"backbone={backbone}"] + surrogate
    module, cfg = build_module(base, tmp_path)
    assert sorted(module.clean_twins) == covered
    assert len(module.clean_models()) == 1 + len(covered)  # surrogate + twins in the suppression term
    if covered:
        assert module.clean_twins["backbone"] is not module.model
        assert type(module.clean_twins["backbone"]) is type(module.model)
    settings = {k: v for k, v in OmegaConf.to_container(cfg.callbacks.xmark_release, resolve=True).items()
                if not k.startswith("_")}
    release = XMarkRelease(**{**settings, "heldout_control": {"epochs": 1, "seeds": [1], "proxy_families": True}})
    names = [(c or {}).get("name") for c in release.heldout_families(module).values()]
    assert names == ["small_cnn"] + (["resnet18"] if covered else [])
    uncovered, _ = build_module(base + ["method.indm_covers_proxy_families=false"], tmp_path)
    assert len(uncovered.clean_twins) == 0 and list(uncovered.heldout_families()) == ["surrogate", *covered]
    if covered:
        with pytest.raises(Exception, match=r"clean twins of \['backbone'\].*warmup_steps must be >= 1"):
            build_module(base + ["method.warmup_steps=0"], tmp_path)
