"""X-Mark clean references trained inside the run (``method.trained_references``, docs/xmark.md).

One clean model per seed and held-out family is built with the module (so checkpoints load),
trained before the first iteration exactly like a held-out control of that family and seed,
frozen, and read by the Ind-M term; bad settings and seeds shared with the held-out controls
are refused by name; a resumed run does not retrain them; under DDP each is trained by one rank
and broadcast from it.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from test_xmark_ensemble import TINY_ENSEMBLE, _fit, build_module

SINGLE = [o for o in TINY_ENSEMBLE if "extra_proxies" not in o]
# a ResNet18 main proxy beside a small-CNN surrogate: two held-out families
TWO_FAMILIES = SINGLE + ["backbone=resnet18", "+backbone@method.surrogate_backbone=small_cnn"]


def _references(epochs: int, seeds: list[int], **extra) -> list[str]:
    return [f"method.trained_references.epochs={epochs}", f"method.trained_references.seeds={seeds}"] + [
        f"method.trained_references.{k}={v}" for k, v in extra.items()]


def _separable_batches(n_batches: int = 3, size: int = 32) -> list[dict]:
    """Class 1 = a bright left half, class 0 = a bright right half (a clean model learns it in a few steps)."""
    generator = torch.Generator().manual_seed(9)
    batches = []
    for _ in range(n_batches):
        labels = torch.randint(0, 2, (8,), generator=generator)
        images = 0.2 * torch.rand(8, 1, size, size, generator=generator)
        images[labels == 1, :, :, : size // 2] += 0.7
        images[labels == 0, :, :, size // 2:] += 0.7
        batches.append({"image": images, "label": labels})
    return batches


@pytest.mark.parametrize("change, message", [
    (["+method.trained_references.epoch=3"], r"trained_references: unknown field\(s\) \['epoch'\]"),
    (_references(-1, []), "trained_references.epochs must be >= 0"),
    (_references(2, [3, 3]), r"seeds must be distinct, got \[3, 3\]"),
    (_references(2, []), "give method.trained_references.seeds"),
    (_references(2, [3], lr=0.0), "trained_references.lr must be > 0"),
    (_references(2, [3], families="[resnet18]"), r"families: \['resnet18'\] — this run's held-out families are "
                                                   r"\['surrogate'\]"),
    (_references(2, [3], families="[]"), "families: an empty list"),
    (_references(2, [3], weight_decay=-0.1), "trained_references.weight_decay must be >= 0"),
    (_references(2, [3], schedule="step"), r"trained_references.schedule must be one of \['constant', 'cosine'\], "
                                           r"got 'step'"),
])
def test_bad_trained_reference_settings_are_refused_by_name(tmp_path, change, message):
    with pytest.raises(Exception, match=message):
        build_module(SINGLE + change, tmp_path)


def test_one_reference_per_seed_and_heldout_family_joins_the_indm_term(tmp_path):
    default, _ = build_module(TWO_FAMILIES, tmp_path)
    assert len(default.trained_references) == 0 and len(default.clean_models()) == 2  # surrogate + twin: as before
    module, _ = build_module(TWO_FAMILIES + _references(1, [3, 4]), tmp_path)
    assert sorted(module.trained_references) == ["backbone_seed3", "backbone_seed4", "surrogate_seed3",
                                                 "surrogate_seed4"]
    assert type(module.trained_references["backbone_seed3"]) is type(module.model)  # the ResNet18 proxy's family
    assert type(module.trained_references["surrogate_seed4"]) is type(module.surrogate)
    assert len(module.clean_models()) == 1 + 4 + 1  # surrogate, trained references, the ResNet18 twin
    only_proxy, _ = build_module(TWO_FAMILIES + _references(1, [3, 4], families="[backbone]"), tmp_path)
    assert sorted(only_proxy.trained_references) == ["backbone_seed3", "backbone_seed4"]  # one family asked for
    module.eval()
    batch = {"image": torch.rand(3, 1, 32, 32), "label": torch.tensor([0, 1, 0])}
    outputs = module.generator_outputs(batch, module.saliency(batch["image"]), train=False)
    assert len(outputs["reference_marked_logits"]) == 6  # the Ind-M term reads every clean model
    # a checkpoint of a run with trained references loads into a module built from the same config
    rebuilt, _ = build_module(TWO_FAMILIES + _references(1, [3, 4]), tmp_path)
    rebuilt.load_state_dict(module.state_dict(), strict=True)


@pytest.mark.parametrize("thief_augmented", [True, False])
def test_references_are_trained_like_a_heldout_control_then_frozen(tmp_path, monkeypatch, thief_augmented):
    module, _ = build_module(SINGLE + ["method.thief_augment.hflip=1.0"]
                             + _references(4, [3, 4], thief_augmented=thief_augmented), tmp_path)
    loader = _separable_batches()
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in module.trained_references.items()}
    seen: list[torch.Tensor] = []  # the first training batch of each reference, as its model sees it
    import lightning_modules.xmark as xmark_module
    original = xmark_module.fit_clean_classifier

    def recording_fit(model, batches, *args, augment=None, **kwargs):
        seen.append(augment(batches[0]["image"]) if augment is not None else batches[0]["image"])
        return original(model, batches, *args, augment=augment, **kwargs)

    monkeypatch.setattr(xmark_module, "fit_clean_classifier", recording_fit)
    module.train_references(loader)
    monkeypatch.undo()
    flipped = loader[0]["image"].flip(-1)
    assert len(seen) == 2 and all(torch.equal(v, flipped if thief_augmented else loader[0]["image"]) for v in seen)
    expected = module.train_heldout_control(loader, 4, 3, 1e-3, module.heldout_families()["surrogate"],
                                            augment={"hflip": 1.0, "zoom": [1.0, 1.0]} if thief_augmented else None)
    trained = module.trained_references["surrogate_seed3"]
    for got, want in zip(trained.state_dict().values(), expected.state_dict().values()):
        assert torch.equal(got, want)  # the same model as a held-out control of that family and seed
    other = module.trained_references["surrogate_seed4"]
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), other.parameters()))  # seeds differ
    for key, model in module.trained_references.items():
        assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before[key]))  # trained, not the init
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    module.train(True)
    assert not any(m.training for m in module.trained_references.values())  # BatchNorm statistics stay fixed
    images = torch.cat([b["image"] for b in loader])
    labels = torch.cat([b["label"] for b in loader])
    view = images.flip(-1) if thief_augmented else images  # it learnt the pipeline it was trained through
    with torch.no_grad():
        accuracy = (trained(view).argmax(1) == labels).float().mean()
    assert accuracy >= 0.9


def _attach_trainer(module, loader, broadcast, world_size: int = 1, global_rank: int = 0):
    module._trainer = SimpleNamespace(num_training_batches=len(loader), max_epochs=100, world_size=world_size,
                                      global_rank=global_rank,
                                      datamodule=SimpleNamespace(train_dataloader=lambda: loader),
                                      strategy=SimpleNamespace(broadcast=broadcast))


def test_train_start_trains_references_once_and_loads_rank_zeros_weights(tmp_path, monkeypatch):
    module, _ = build_module(SINGLE + _references(1, [3]), tmp_path)
    loader = _separable_batches(1)
    rank_zero = {k: torch.full_like(v, 0.25) if v.is_floating_point() else v
                 for k, v in module.trained_references["surrogate_seed3"].state_dict().items()}
    # rank 1 of 2: the only reference is rank 0's to train, its weights arrive by broadcast
    _attach_trainer(module, loader, lambda obj, src=0: rank_zero, world_size=2, global_rank=1)
    calls = []
    monkeypatch.setattr(module, "train_references", lambda batches: calls.append(batches))
    module.iterations.fill_(5)  # resumed: the checkpoint holds the trained references
    module.on_train_start()
    assert calls == []
    module.iterations.fill_(0)
    module.on_train_start()
    assert calls == [loader]  # a fresh run: trained once, on the data module's clean training batches
    monkeypatch.undo()
    monkeypatch.setattr(module, "train_heldout_control", lambda *a, **k: pytest.fail("rank 1 trained rank 0's model"))
    module.iterations.fill_(0)
    module.on_train_start()
    for got, want in zip(module.trained_references["surrogate_seed3"].state_dict().values(), rank_zero.values()):
        assert torch.equal(got, want)


@pytest.mark.parametrize("world_size, global_rank, trained, sources", [
    (1, 0, ["surrogate_seed3", "surrogate_seed4", "surrogate_seed5"], []),  # one process: no broadcast at all
    (2, 0, ["surrogate_seed3", "surrogate_seed5"], [0, 1, 0]),
    (2, 1, ["surrogate_seed4"], [0, 1, 0]),
    (3, 2, ["surrogate_seed5"], [0, 1, 2]),
])
def test_each_reference_is_trained_by_one_rank_and_broadcast_from_it(tmp_path, monkeypatch, world_size,
                                                                      global_rank, trained, sources):
    module, _ = build_module(SINGLE + _references(1, [3, 4, 5], schedule="cosine", weight_decay=0.01), tmp_path)
    loader = _separable_batches(1)
    calls, broadcasts = [], []

    def fake_control(batches, epochs, seed, lr, backbone, desc, augment, **fit):
        calls.append((desc.rsplit(" ", 1)[-1], fit))
        model = module.trained_references[f"surrogate_seed{seed}"]
        return SimpleNamespace(state_dict=lambda: {k: torch.full_like(v, seed) if v.is_floating_point() else v
                                                   for k, v in model.state_dict().items()})

    def broadcast(state, src=0):
        broadcasts.append(src)
        return {k: torch.full_like(v, 100 + src) if v.is_floating_point() else v for k, v in state.items()}

    _attach_trainer(module, loader, broadcast, world_size=world_size, global_rank=global_rank)
    monkeypatch.setattr(module, "train_heldout_control", fake_control)
    module.train_references(loader)
    assert [key for key, _ in calls] == trained  # no rank repeats another's work
    assert all(fit == {"weight_decay": 0.01, "schedule": "cosine"} for _, fit in calls)  # the settings reach the loop
    assert broadcasts == sources  # every rank joins every broadcast, in the same order
    for index, (key, model) in enumerate(module.trained_references.items()):
        value = 100 + index % world_size if world_size > 1 else int(key[-1])
        assert all(torch.all(p == value) for p in model.parameters()) and not model.training


def test_cosine_schedule_anneals_the_learning_rate_once_per_epoch(monkeypatch):
    from lightning_modules.xmark_clean_models import fit_clean_classifier

    seen: dict[str, list[float]] = {"Adam": [], "AdamW": []}

    def recording(base):
        class Recording(base):
            def step(self, closure=None):
                seen[base.__name__].append(self.param_groups[0]["lr"])
                return super().step(closure)
        return Recording

    monkeypatch.setattr(torch.optim, "Adam", recording(torch.optim.Adam))
    monkeypatch.setattr(torch.optim, "AdamW", recording(torch.optim.AdamW))
    loader = _separable_batches(2)
    fit_clean_classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2)), loader, 2, 0.1)
    assert seen == {"Adam": [0.1] * 4, "AdamW": []}  # the default: Adam at a constant rate
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 2))
    fit_clean_classifier(model, loader, 4, 0.1, weight_decay=0.01, schedule="cosine")
    expected = [0.1 * (1 + math.cos(math.pi * epoch / 4)) / 2 for epoch in range(4) for _ in range(2)]
    assert seen["AdamW"] == pytest.approx(expected)  # T_max = epochs, one step per epoch (not per batch)
    assert seen["AdamW"][-1] > 0  # the last epoch still learns
    with pytest.raises(ValueError, match="schedule must be one of"):
        fit_clean_classifier(model, loader, 1, 0.1, schedule="linear")


def test_release_refuses_heldout_seeds_the_references_share(tmp_path):
    from callbacks.xmark import XMarkRelease

    module, _ = build_module(SINGLE + _references(1, [2, 5]), tmp_path)
    trainer = SimpleNamespace(datamodule=None)

    def release(epochs: int, seeds: list[int]) -> XMarkRelease:
        return XMarkRelease(output_dir=".", release_dir="r", owner_dir="o", data={}, fraction=1.0, seed=5,
                            verification={}, thresholds={}, owner_id="t",
                            heldout_control={"epochs": epochs, "seeds": seeds})

    with pytest.raises(ValueError, match=r"trained_references.seeds and .*heldout_control.seeds share \[2\]"):
        release(1, [1, 2]).on_fit_start(trainer, module)
    release(1, [1, 3]).on_fit_start(trainer, module)  # disjoint seeds
    release(0, [2]).on_fit_start(trainer, module)  # no held-out control is trained


def test_release_warns_when_trained_references_have_no_checkpoint_controls(tmp_path, caplog):
    from callbacks.xmark import XMarkRelease

    trainer = SimpleNamespace(datamodule=None)
    common = dict(output_dir=".", release_dir="r", owner_dir="o", data={}, fraction=1.0, seed=5, verification={},
                  thresholds={}, owner_id="t", heldout_control={"epochs": 1, "seeds": [1]})
    with_references, _ = build_module(SINGLE + _references(1, [2]), tmp_path)
    without, _ = build_module(SINGLE, tmp_path)
    caplog.set_level("WARNING", logger="medmark.xmark")
    XMarkRelease(**common).on_fit_start(trainer, without)
    XMarkRelease(**common, control_checkpoints=["a.ckpt"]).on_fit_start(trainer, with_references)
    assert "control_checkpoints is empty" not in caplog.text  # no references, or a train.py control given
    XMarkRelease(**common).on_fit_start(trainer, with_references)
    assert "method.trained_references is on and callbacks.xmark_release.control_checkpoints is empty" in caplog.text


def test_heldout_controls_take_the_optimiser_and_schedule_they_are_given():
    from callbacks.xmark import XMarkRelease

    common = dict(output_dir=".", release_dir="r", owner_dir="o", data={}, fraction=1.0, seed=5, verification={},
                  thresholds={}, owner_id="t")
    for field, value, message in [("weight_decay", -1e-4, "heldout_control.weight_decay must be >= 0"),
                                  ("schedule", "cosin", r"heldout_control.schedule must be one of "
                                                        r"\['constant', 'cosine'\], got 'cosin'")]:
        with pytest.raises(ValueError, match=message):
            XMarkRelease(heldout_control={"epochs": 1, "seeds": [1], field: value}, **common)
    calls = []
    module = SimpleNamespace(heldout_families=lambda: {"surrogate": None},
                             train_heldout_control=lambda *args, **kwargs: calls.append(kwargs) or torch.nn.Identity())
    release = XMarkRelease(heldout_control={"epochs": 1, "seeds": [1, 2], "schedule": "cosine", "weight_decay": 1e-4},
                           **common)
    release.heldout_models(module, SimpleNamespace(train_dataloader=lambda: []))
    assert [(c["schedule"], c["weight_decay"]) for c in calls] == [("cosine", 1e-4)] * 2
    calls.clear()
    XMarkRelease(heldout_control={"epochs": 1, "seeds": [1]}, **common).heldout_models(
        module, SimpleNamespace(train_dataloader=lambda: []))
    assert [(c["schedule"], c["weight_decay"]) for c in calls] == [("constant", 0.0)]  # the default: as before


def test_a_run_with_trained_references_releases_them_as_controls(tmp_path, monkeypatch):
    from lightning_modules.xmark import XMarkModule

    trained_before_first_step = []
    original_train, original_step = XMarkModule.train_references, XMarkModule.training_step

    def spy_train(self, loader):
        original_train(self, loader)
        trained_before_first_step.append(int(self.iterations) == 0)
        self.frozen_copy = {k: [p.detach().clone() for p in m.parameters()] for k, m in self.trained_references.items()}

    def spy_step(self, batch, batch_idx):
        assert getattr(self, "frozen_copy", None) is not None, "a training step ran before the references were trained"
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(XMarkModule, "train_references", spy_train)
    monkeypatch.setattr(XMarkModule, "training_step", spy_step)
    extra = ["callbacks.xmark_release.heldout_control.epochs=0"] + _references(1, [3])
    module, release = _fit(tmp_path, "refs", extra, monkeypatch)
    assert trained_before_first_step == [True]
    assert sorted(module.trained_references) == ["cnn_b_seed3", "resnet18_seed3", "surrogate_seed3"]
    for key, model in module.trained_references.items():  # frozen: the generator's training left them as trained
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), module.frozen_copy[key])), key
    # surrogate + 3 trained references + 2 clean twins, each recorded as a reference control
    assert sorted(release["control"]) == [f"reference_{i}" for i in range(6)]
    assert dict(module.hparams.trained_references) == {"epochs": 1, "seeds": [3], "lr": 1e-3, "weight_decay": 0.0,
                                                       "schedule": "constant", "thief_augmented": True,
                                                       "families": None, "pipeline": "loop"}
