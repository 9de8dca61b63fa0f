"""X-Mark generator training (``method=xmark``, docs/xmark.md, step 3).

Three kinds of network live in :class:`XMarkModule`:

* ``generator`` -- :class:`models.generator.ConditionalUNetGenerator` G(x, s): the only thing
  X-Mark releases (as ``owner/generator.pt``, via :class:`watermark.xmark.marker.XMarkMarker`);
* ``model`` -- the *proxy Mal model* (built from the ``backbone`` config): a classifier
  trained, with clean labels, on the currently marked training set (a fraction
  ``mark_fraction`` of the target-class images replaced by G's output), so it learns what a
  thief's model would learn from the released data. The targeted term is computed on it
  (first-order bilevel scheme: ``proxy_steps`` proxy updates per generator update);
* ``extra_proxies`` -- further proxy Mal models of other architecture families
  (``method.extra_proxies``: name -> backbone config, composed from ``configs/backbone``),
  trained exactly like ``model``. The proxy ensemble is ``{"backbone": model, **extra_proxies}``;
  the targeted terms read one logits tensor per proxy and combine them (``proxy_combine``:
  ``sum`` = the ``proxy_weights``-weighted mean over every proxy, ``sample`` = one proxy per
  generator step, drawn with probabilities ∝ ``proxy_weights``). No extra proxy = the
  single-proxy X-Mark;
* ``clean_twins`` -- one clean classifier per extra proxy family (and one of the main proxy's
  architecture when it is not the surrogate's), trained on clean batches during warm-up and then
  frozen, so the Ind-M suppression term and the release's controls cover every family the
  generator learns against (``indm_covers_proxy_families``);
* ``trained_references`` -- clean classifiers of those families trained to convergence before
  the first iteration (``method.trained_references``), frozen in the Ind-M term beside the twins;
* ``surrogate`` and ``references`` -- frozen *clean* classifiers. The surrogate gives the
  EigenCAM saliency s (cached on disk, :class:`watermark.xmark.saliency.SaliencyCache`) and, with
  the references, the Ind-M suppression term (marked non-target images must stay correctly
  classified by clean models: a mark that fools clean models is an adversarial
  perturbation, not a watermark) and the untargeted term (marked target-class images lose
  their natural evidence). The surrogate comes from ``surrogate_checkpoint`` (a
  ``method=task`` run) or, when that is null, is trained here on clean batches during the
  first ``warmup_steps`` and then frozen.

Budget: ``generator_steps`` generator updates after ``warmup_steps`` iterations, i.e.
``warmup_steps + generator_steps · proxy_steps`` iterations in all, whatever the dataset size
(the run stops there; ``trainer.max_epochs`` is only an upper bound). ``generator_steps: null``
= the epoch budget of ``trainer.max_epochs`` (then 3× the data means 3× the generator steps,
and δ drifts towards a transferable adversarial perturbation; docs/xmark.md).

Training step (manual optimisation, two optimisers):

1. iterations < ``warmup_steps``: the proxy (and an inline surrogate) take a CE step on the
   clean batch; G is not updated.
2. afterwards: s = EigenCAM(surrogate, x); the proxy takes a CE step on the marked batch
   (target-class rows replaced by x_w with probability ``mark_fraction``; then, with
   ``thief_augment``, flipped/zoomed like a thief's training pipeline; optionally randomly
   rescaled); every ``proxy_steps`` iterations G takes a step on the generator terms of the
   ``loss`` group (all terms not in ``proxy_terms``), which read:

   ``marked`` / ``delta`` (B×C×H×W), ``marked_logits`` (proxy on x_w; a list of B×K, one per
   proxy used this step), ``rescaled_marked_logits`` (the same on randomly down/up-sampled
   x_w -- after ``thief_augment``'s flip/zoom when that is set: the thief's whole pipeline),
   ``proxy_weights`` (tensor P, the weights of those proxies), ``surrogate_marked_logits``,
   ``reference_marked_logits`` (list: every clean model on x_w, surrogate first).

Logged: every term (``train/loss/<name>`` for G, ``train_proxy/loss/<name>`` for the proxy),
and per validation epoch: the proxy's task metrics on clean images (``val/balanced_accuracy``
= benign accuracy of a Mal-like model), ``val/wsr_proxy`` (the ``backbone`` proxy;
``val/wsr_proxy/<name>`` and ``val/delta_p_proxy/<name>`` per proxy), ``val/wsr_surrogate``,
``val/wsr_references`` and ``val/delta_p_references`` (max over clean models), ``val/delta_p_proxy``,
``val/delta_p_surrogate``, image quality ``val/psnr``, ``val/ssim`` (torchmetrics) and
``val/lpips`` (when an ``lpips`` term is configured), ``val/linf`` (max |x_w − x|) and
``val/xmark_score`` = min over proxies of their ΔP − max over the clean models of theirs (checkpoint
selection and sweeps; ΔP = mean rise of p(y_t) from x to x_w on non-target images, the verifier's
statistic: a WSR-based score rewarded a proxy that answers y_t to every image, marked or not).
WSR = share of marked non-target images classified as y_t.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from datamodules.transforms import random_rescale, thief_augment as thief_augment_fn
from lightning_modules.base import to_plain
from lightning_modules.metrics import target_class_response
from lightning_modules.task import TaskModule
from lightning_modules.xmark_clean_models import (architecture, fit_clean_classifier, no_pretrained, select_families,
                                                  thief_augment_settings, trained_reference_settings)
from losses.perceptual import LPIPSTerm
from models.generator import ConditionalUNetGenerator
from models.safe_reader import ModelFileError, load_model_checkpoint
from watermark.imageio import quantise
from watermark.xmark.marker import XMarkMarker
from watermark.xmark.saliency import SaliencyCache, default_target_layer, eigencam_saliency

log = logging.getLogger("medmark.xmark")


def _proxy_ensemble(extra_proxies: dict | None, proxy_weights: dict | None, proxy_combine: str) -> tuple[dict, dict]:
    """``method.extra_proxies`` / ``proxy_weights`` / ``proxy_combine`` checked: (extra proxies, {name: weight})."""
    extra_proxies = {str(k): dict(to_plain(v)) for k, v in (to_plain(extra_proxies) or {}).items()}
    if "backbone" in extra_proxies:
        raise ValueError("method.extra_proxies: 'backbone' is the name of the main proxy (the backbone config)")
    proxy_names = ["backbone", *extra_proxies]
    proxy_weights = {str(k): float(v) for k, v in (to_plain(proxy_weights) or {}).items()}
    unknown = sorted(set(proxy_weights) - set(proxy_names))
    if unknown:
        raise ValueError(f"method.proxy_weights names {unknown}, which are not proxies ({proxy_names})")
    weights = [proxy_weights.get(n, 1.0) for n in proxy_names]
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"method.proxy_weights must be >= 0 with a positive sum, got {dict(zip(proxy_names, weights))}")
    if proxy_combine not in ("sum", "sample"):
        raise ValueError(f"method.proxy_combine must be sum or sample, got {proxy_combine!r}")
    return extra_proxies, dict(zip(proxy_names, weights))


# ------------------------------------------------------------------------------------ module


class XMarkModule(TaskModule):
    """X-Mark generator training; see the module docstring.

    Args:
        generator: :class:`ConditionalUNetGenerator` arguments (``in_channels``, ``base_width``,
            ``depth``, ``epsilon``, ``gate_with_saliency``, ``saliency_channels``).
        generator_optimizer: optimiser config (without ``params``) of G.
        target_class: y_t, index into ``data.classes``.
        mark_fraction: probability that a target-class training image is marked (= the share
            the release marks).
        proxy_steps: proxy updates per generator update (after warm-up).
        warmup_steps: iterations of clean proxy (and inline surrogate) training before G learns.
        proxy_terms: names of the ``loss`` terms that train the proxy (the rest train G).
        proxy_rescale: probability of randomly rescaling a proxy training batch (scale robustness).
        rescale_range: (low, high) factor range of :func:`random_rescale`.
        surrogate_checkpoint: a ``method=task`` classification checkpoint; null = train inline.
        surrogate_backbone: backbone config of an inline surrogate (default: ``backbone``).
        reference_checkpoints: further clean classification checkpoints for Ind-M suppression.
        trained_references: ``{epochs, seeds, lr, thief_augmented, families, pipeline, ...}`` -- clean models of each
            held-out family (:meth:`heldout_families`, or those named), ``epochs`` passes over the clean training split
            per seed (through the thief's augmentation when ``thief_augmented``), before the first iteration, then
            frozen in the Ind-M term: an innocent party's fully trained model, where a clean twin gets only the
            warm-up. ``epochs: 0`` = none. ``pipeline: train_py``: trained by train.py before the run and passed
            here as ``reference_checkpoints`` (:mod:`utils.clean_model_runs`), so none is built here.
        saliency_cache_dir: folder of the EigenCAM cache (null = compute without caching).
        sign_correction: EigenCAM sign correction.
        extra_proxies: ``{name: backbone config}`` -- further proxy Mal models (other families);
            empty/null = the single ``backbone`` proxy. ``"backbone"`` is a reserved name.
        proxy_weights: ``{proxy name: weight >= 0}`` in the targeted terms (missing = 1);
            names: ``backbone`` and the ``extra_proxies`` keys.
        proxy_combine: ``sum`` (weighted mean over every proxy each generator step) or
            ``sample`` (one proxy per generator step, drawn ∝ weight; cheaper per step).
        indm_covers_proxy_families: train one clean twin per extra proxy family (and one of the
            ``backbone`` proxy's architecture when it differs from the surrogate's) during warm-up
            and add it to the Ind-M suppression term and the controls.
        generator_steps: generator updates after warm-up, then the run stops (null = epochs).
        thief_augment: ``{hflip: p, zoom: [low, high]}`` -- the augmentation a thief trains with
            (:func:`datamodules.transforms.thief_augment`), applied to every proxy training batch
            after marking and to x_w before the rescaled targeted term, so that δ is learnt
            through the flips and zooms the released images will undergo; null or
            ``{hflip: 0, zoom: [1, 1]}`` = none (the original X-Mark, bit for bit).
        **kwargs: :class:`TaskModule` arguments (``task``, ``num_classes``, ``backbone``, ``loss``,
            ``optimizer`` of the proxy, ...).
    """

    def __init__(
        self,
        generator: dict,
        target_class: int = 1,
        generator_optimizer: dict | None = None,
        mark_fraction: float = 0.8,
        proxy_steps: int = 4,
        warmup_steps: int = 100,
        proxy_terms: list[str] | tuple[str, ...] = ("ce",),
        proxy_rescale: float = 0.5,
        rescale_range: tuple[float, float] | list[float] = (0.5, 1.0),
        surrogate_checkpoint: str | None = None,
        surrogate_backbone: dict | None = None,
        reference_checkpoints: list[str] | tuple[str, ...] = (),
        trained_references: dict | None = None,
        saliency_cache_dir: str | None = None,
        sign_correction: bool = True,
        extra_proxies: dict[str, dict] | None = None,
        proxy_weights: dict[str, float] | None = None,
        proxy_combine: str = "sum",
        indm_covers_proxy_families: bool = True,
        generator_steps: int | None = None,
        thief_augment: dict | None = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("task", "classification")
        super().__init__(**kwargs)
        if self.task != "classification":
            raise ValueError("method=xmark watermarks classification datasets (data.task=classification)")
        if not 0 <= int(target_class) < self.num_classes:
            raise ValueError(f"method.target_class={target_class} is not a class index (0..{self.num_classes - 1})")
        if not 0.0 < float(mark_fraction) <= 1.0:
            raise ValueError(f"method.mark_fraction must be in (0, 1], got {mark_fraction}")
        if int(proxy_steps) < 1 or int(warmup_steps) < 0:
            raise ValueError(f"method.proxy_steps must be >= 1 and warmup_steps >= 0, got {proxy_steps}, {warmup_steps}")
        generator = dict(to_plain(generator))
        unknown = [n for n in proxy_terms if n not in self.loss_terms]
        if unknown:
            raise ValueError(f"method.proxy_terms names {unknown}, which are not in the loss group "
                             f"({sorted(self.loss_terms)})")
        self.generator_terms = [n for n in self.loss_terms if n not in proxy_terms]
        if not self.generator_terms:
            raise ValueError("no generator loss terms: the loss group holds only method.proxy_terms")
        extra_proxies, proxy_weights = _proxy_ensemble(extra_proxies, proxy_weights, proxy_combine)
        if generator_steps is not None and int(generator_steps) < 1:
            raise ValueError(f"method.generator_steps must be >= 1 or null, got {generator_steps}")
        self.save_hyperparameters({
            "generator": generator, "target_class": int(target_class),
            "generator_optimizer": to_plain(generator_optimizer) or {"_target_": "torch.optim.Adam", "lr": 1e-3},
            "mark_fraction": float(mark_fraction), "proxy_steps": int(proxy_steps),
            "warmup_steps": int(warmup_steps), "proxy_terms": list(proxy_terms),
            "proxy_rescale": float(proxy_rescale), "rescale_range": [float(v) for v in rescale_range],
            "surrogate_checkpoint": surrogate_checkpoint,
            "surrogate_backbone": to_plain(surrogate_backbone), "reference_checkpoints": list(reference_checkpoints),
            "saliency_cache_dir": saliency_cache_dir, "sign_correction": bool(sign_correction),
            "extra_proxies": extra_proxies, "proxy_weights": proxy_weights,
            "proxy_combine": proxy_combine, "indm_covers_proxy_families": bool(indm_covers_proxy_families),
            "generator_steps": None if generator_steps is None else int(generator_steps),
            "thief_augment": thief_augment_settings(thief_augment),
            "trained_references": trained_reference_settings(trained_references),
        })
        self.automatic_optimization = False
        self.target_class = int(target_class)
        self.generator = ConditionalUNetGenerator(**generator)

        if surrogate_checkpoint:
            self.surrogate, surrogate_hparams = self._load_clean_model(surrogate_checkpoint, "surrogate_checkpoint")
            self.surrogate_config = surrogate_hparams["backbone"]
            self.inline_surrogate = False
        else:
            self.surrogate_config = to_plain(surrogate_backbone) or copy.deepcopy(self.hparams.backbone)
            self.surrogate = instantiate(self.surrogate_config)
            self.inline_surrogate = True
        self.references = nn.ModuleList(
            self._load_clean_model(p, f"reference_checkpoints[{i}]")[0] for i, p in enumerate(reference_checkpoints)
        )
        self.extra_proxies = nn.ModuleDict({name: instantiate(cfg) for name, cfg in extra_proxies.items()})
        # Every architecture the generator learns against needs a clean model of its own in the Ind-M
        # term: a ResNet18 proxy beside a small-CNN surrogate otherwise leaves clean ResNet18s free to
        # answer to δ (measured: Ind-M ResNet18 ΔP 0.23, docs/xmark.md).
        twin_configs = self.uncovered_families() if indm_covers_proxy_families else {}
        if twin_configs and int(warmup_steps) < 1:
            raise ValueError(f"method.indm_covers_proxy_families trains clean twins of {sorted(twin_configs)} during "
                             "warm-up: method.warmup_steps must be >= 1")
        self.clean_twins = nn.ModuleDict(
            {name: instantiate(no_pretrained(cfg)) for name, cfg in twin_configs.items()})
        trained = self.hparams.trained_references  # built now (checkpoints load), trained in on_train_start
        families = select_families(self.heldout_families(), trained["families"])
        seeds = trained["seeds"] if trained["pipeline"] == "loop" else []  # train_py: in reference_checkpoints
        self.trained_references = nn.ModuleDict({f"{family}_seed{seed}": instantiate(no_pretrained(cfg))
                                                 for seed in seeds for family, cfg in families.items()})
        self.register_buffer("iterations", torch.zeros((), dtype=torch.long))
        self.generator_updates = 0  # generator optimiser steps taken by this process (not saved)
        self._saliency_cache: SaliencyCache | None = None
        self.xmark_panel: dict[str, Any] | None = None

    def _load_clean_model(self, path: str, field: str) -> tuple[nn.Module, dict]:
        """A clean classification checkpoint via :mod:`models.safe_reader`; ``hparams["backbone"]``
        comes back validated (exact factory, scalar arguments), so rebuilding from it is safe."""
        try:
            model, hparams = load_model_checkpoint(path, task="classification")
        except ModelFileError as err:
            raise ValueError(f"method.{field}: {err}") from None
        if int(getattr(model, "num_classes", self.num_classes)) != self.num_classes:
            raise ValueError(f"method.{field}: {path} has {model.num_classes} classes, data.classes has {self.num_classes}")
        return model.eval().requires_grad_(False), hparams

    # -- frozen models & saliency -------------------------------------------------------------
    @property
    def warming_up(self) -> bool:
        return int(self.iterations) < self.hparams.warmup_steps

    def train_heldout_control(self, loader, epochs: int, seed: int, lr: float, backbone: dict | None = None,
                              desc: str = "held-out control", augment: dict | None = None, **fit) -> nn.Module:
        """A clean classifier the generator never saw: the surrogate's (or ``backbone``'s) architecture, fresh weights.

        The suppression terms keep *the clean models they are trained against* blind to the
        mark; a generator trained long enough turns δ into a perturbation that transfers to
        other clean models anyway (docs/xmark.md). Only a model outside that loop can show it.

        Args:
            loader: clean training batches (``image`` B×C×H×W in [0, 1], ``label`` B long).
            epochs, seed, lr: passes over ``loader`` (cross-entropy); initialisation and data order; learning rate.
            backbone: backbone config of the model (:meth:`heldout_families`); None = the surrogate's.
            desc: label of the progress bar (tqdm, drawn only on a terminal). No secret goes into it.
            augment: ``{hflip, zoom}``: every batch through :func:`datamodules.transforms.thief_augment`
                (an innocent party's usual pipeline, :meth:`heldout_augmentations`); None = as they come.
            **fit: ``weight_decay``, ``schedule`` of :func:`fit_clean_classifier` (default Adam, constant lr).
        Returns:
            the trained model, on the CPU, in eval mode, frozen.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = instantiate(no_pretrained(copy.deepcopy(backbone or self.surrogate_config))).to(self.device)
            fit_clean_classifier(model, loader, epochs, lr, desc=desc, **fit,
                                 augment=(lambda x: thief_augment_fn(x, **augment)) if augment else None)
        return model.cpu().eval().requires_grad_(False)

    def clean_models(self) -> list[nn.Module]:
        """The frozen clean classifiers of the suppression terms: surrogate, references, trained references, twins."""
        return [self.surrogate, *self.references, *self.trained_references.values(), *self.clean_twins.values()]

    def proxies(self) -> dict[str, nn.Module]:
        """The proxy Mal ensemble: ``{"backbone": model, **extra_proxies}`` (one model = single proxy)."""
        return {"backbone": self.model, **self.extra_proxies}

    def uncovered_families(self) -> dict[str, dict]:
        """``{proxy name: backbone config}`` of the proxies the surrogate's architecture does not stand for:
        every extra proxy, and ``backbone`` when its architecture (factory and name) is not the surrogate's."""
        families = {}
        if architecture(self.hparams.backbone) != architecture(self.surrogate_config):
            families["backbone"] = copy.deepcopy(dict(to_plain(self.hparams.backbone)))
        families.update({name: copy.deepcopy(cfg) for name, cfg in self.hparams.extra_proxies.items()})
        return families

    def heldout_families(self) -> dict[str, dict]:
        """Backbone configs of held-out controls: the surrogate's architecture and each other proxy family
        (:meth:`uncovered_families`)."""
        return {"surrogate": copy.deepcopy(self.surrogate_config), **self.uncovered_families()}

    def heldout_augmentations(self) -> dict[str, dict | None]:
        """How held-out controls are trained: ``{"": None}`` (the batches as they come), plus
        ``{"+thief_augment": settings}`` when ``method.thief_augment`` is on.

        A generator trained against the thief's augmentation is checked against clean models of
        both kinds: an innocent party trains with that pipeline too, and models trained with and
        without it answer differently to a transferable δ (docs/xmark.md).
        """
        augment = self.hparams.thief_augment
        if float(augment["hflip"]) == 0.0 and list(map(float, augment["zoom"])) == [1.0, 1.0]:
            return {"": None}
        return {"": None, "+thief_augment": dict(augment)}

    @property
    def total_iterations(self) -> int | None:
        """The step budget in iterations (warm-up + generator_steps · proxy_steps); None = epochs."""
        if self.hparams.generator_steps is None:
            return None
        return self.hparams.warmup_steps + self.hparams.generator_steps * self.hparams.proxy_steps

    def _freeze_clean_models(self) -> None:
        for model in self.clean_models():
            model.eval().requires_grad_(False)

    def on_fit_start(self) -> None:
        if not self.warming_up:
            self._freeze_clean_models()
        elif not self.inline_surrogate:
            self.surrogate.eval().requires_grad_(False)
            for model in [*self.references, *self.trained_references.values()]:
                model.eval().requires_grad_(False)

    def on_train_start(self) -> None:
        budget = self.total_iterations  # the training batches are known from here on
        if budget is not None:
            batches, epochs = self.trainer.num_training_batches, self.trainer.max_epochs
            if epochs is not None and epochs >= 0 and batches * epochs < budget:
                log.warning("method.generator_steps=%d needs %d iterations, but trainer.max_epochs=%d x %d batches "
                            "= %d: raise trainer.max_epochs", self.hparams.generator_steps, budget, epochs, batches,
                            batches * epochs)
        if len(self.trained_references) and int(self.iterations) == 0:  # a resumed run has them in its checkpoint
            datamodule = self.trainer.datamodule
            self.train_references(datamodule.train_dataloader() if datamodule else self.trainer.train_dataloader)

    def train_references(self, loader) -> None:
        """Train every ``trained_references`` model on clean batches (``image``, ``label``), then freeze it:
        each is :meth:`train_heldout_control` with its family, seed and optimiser settings. Under DDP rank
        ``i % world_size`` trains the ``i``-th and broadcasts it (no rank repeats another's work)."""
        settings = self.hparams.trained_references
        augment = self.heldout_augmentations().get("+thief_augment") if settings["thief_augmented"] else None
        families, fit = self.heldout_families(), {name: settings[name] for name in ("weight_decay", "schedule")}
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self._trainer else (1, 0)
        for index, (key, model) in enumerate(self.trained_references.items()):
            if index % world == rank:
                family, seed = key.rsplit("_seed", 1)
                started = time.time()
                model.load_state_dict(self.train_heldout_control(loader, settings["epochs"], int(seed), settings["lr"],
                                      families[family], f"trained reference {key}", augment, **fit).state_dict())
                log.info("trained reference %s (%d epochs) in %.0f s", key, settings["epochs"], time.time() - started)
        for index, model in enumerate(self.trained_references.values()):
            if world > 1:  # every rank joins every broadcast, in order; CPU tensors unpickle on any rank's device
                state = {name: value.cpu() for name, value in model.state_dict().items()}
                model.load_state_dict(self.trainer.strategy.broadcast(state, src=index % world))
            model.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen models stay in eval mode (BatchNorm statistics fixed); an inline surrogate
        # trains during warm-up only.
        for model in [*self.references, *self.trained_references.values()]:
            model.eval()
        if not (mode and self.inline_surrogate and self.warming_up):
            self.surrogate.eval()
        if not (mode and self.warming_up):
            for model in self.clean_twins.values():
                model.eval()
        return self

    def saliency(self, images: Tensor, ids: list[str] | None = None) -> Tensor | None:
        """EigenCAM maps B×1×H×W of the surrogate (cached by id when a cache folder is set)."""
        if not self.generator.saliency_channels:
            return None
        # grad-cam hands activations to NumPy: fp32 even under bf16/fp16 autocast (trainer.precision).
        with torch.autocast(images.device.type, enabled=False):
            images = images.float()
            if self.hparams.saliency_cache_dir and ids is not None and not self.warming_up:
                if self._saliency_cache is None:
                    self._saliency_cache = SaliencyCache(self.hparams.saliency_cache_dir, self.surrogate,
                                                         sign_correction=self.hparams.sign_correction)
                return self._saliency_cache.get(images, list(ids))
            return eigencam_saliency(self.surrogate, default_target_layer(self.surrogate), images,
                                     self.hparams.sign_correction)

    def marker(self, image_size: int) -> XMarkMarker:
        """A detached CPU copy of G + surrogate (marking ``image_size``-pixel images) for release/verification."""
        surrogate = copy.deepcopy(self.surrogate).cpu().eval().requires_grad_(False)
        return XMarkMarker(copy.deepcopy(self.generator).cpu().eval(), surrogate, self.hparams.generator,
                           self.surrogate_config, image_size, self.hparams.sign_correction)

    def default_loss_terms(self) -> list[str]:
        # Without an explicit selection (TaskModule's evaluation), only the proxy's task terms apply.
        return list(self.hparams.proxy_terms)

    # -- training -------------------------------------------------------------------------
    def configure_optimizers(self):
        generator_opt = instantiate(self.hparams.generator_optimizer, params=list(self.generator.parameters()))
        proxy_params = [p for proxy in self.proxies().values() for p in proxy.parameters()]
        if self.inline_surrogate:
            proxy_params += list(self.surrogate.parameters())
        proxy_params += list(self.clean_twins.parameters())
        proxy_opt = instantiate(self.hparams.optimizer, params=proxy_params)
        return [generator_opt, proxy_opt]

    def on_train_epoch_start(self) -> None:
        for name, opt in zip(("generator", "proxy"), self.optimizers()):
            self.log(f"lr/{name}", opt.optimizer.param_groups[0]["lr"], on_step=False, on_epoch=True)

    def _target_mask(self, labels: Tensor) -> Tensor:
        return labels == self.target_class

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        generator_opt, proxy_opt = self.optimizers()
        images, labels = batch["image"], batch["label"]
        warming_up = self.warming_up
        if not warming_up and (self.inline_surrogate and self.surrogate.training
                               or any(m.training for m in self.clean_twins.values())):
            self._freeze_clean_models()  # warm-up just ended: the clean models are final from here on

        # 1. proxies (and inline surrogate / clean twins during warm-up) on the marked training set, clean labels
        proxy_images = images
        if not warming_up:
            with torch.no_grad():
                saliency = self.saliency(images, batch.get("id"))
                marked = self.generator(images, saliency)["marked"]
            chosen = self._target_mask(labels) & (torch.rand(labels.shape, device=labels.device)
                                                  < self.hparams.mark_fraction)
            proxy_images = torch.where(chosen[:, None, None, None], quantise(marked), images)
        # the thief trains on flipped/zoomed copies of the released images (clean ones too)
        proxy_images = thief_augment_fn(proxy_images, **self.hparams.thief_augment)
        if not warming_up:
            if self.hparams.proxy_rescale > 0 and float(torch.rand(())) < self.hparams.proxy_rescale:
                proxy_images = random_rescale(proxy_images, tuple(self.hparams.rescale_range))
            self.log("train/marked_share", chosen.float().mean(), on_step=False, on_epoch=True,
                     batch_size=len(labels))
        proxy_batch = {**batch, "image": proxy_images}
        proxy_loss = None
        for name, proxy in self.proxies().items():
            proxy.train()
            stage = "train_proxy" if name == "backbone" else f"train_proxy/{name}"
            loss = self.compute_loss({"logits": proxy(proxy_images)}, proxy_batch, stage,
                                     terms=self.hparams.proxy_terms)
            proxy_loss = loss if proxy_loss is None else proxy_loss + loss
        if warming_up:
            clean = [self.surrogate] if self.inline_surrogate else []
            for model in clean + list(self.clean_twins.values()):
                proxy_loss = proxy_loss + F.cross_entropy(model(images), labels)
        proxy_opt.zero_grad()
        self.manual_backward(proxy_loss)
        proxy_opt.step()

        # 2. generator, every proxy_steps iterations after warm-up
        iteration = int(self.iterations)
        self.iterations += 1
        budget = self.total_iterations
        if budget is not None and int(self.iterations) >= budget:
            self.trainer.should_stop = True  # the step budget, whatever the dataset size
        if warming_up or iteration % self.hparams.proxy_steps:
            return proxy_loss.detach()
        outputs = self.generator_outputs(batch, saliency, train=True)
        loss = self.compute_loss(outputs, batch, "train", terms=self.generator_terms)
        generator_opt.zero_grad()
        self.manual_backward(loss)
        generator_opt.step()
        for proxy in self.proxies().values():
            proxy.zero_grad(set_to_none=True)  # G's backward left gradients on the proxies
        self.generator_updates += 1
        return loss.detach()

    def proxies_for_step(self, train: bool) -> tuple[list[str], Tensor]:
        """Names of the proxies the targeted terms read this step and their weights (tensor P, sums to 1).

        ``proxy_combine=sum`` (or evaluation): every proxy with a positive weight; ``sample``
        (training): one, drawn with probabilities ∝ ``proxy_weights``.
        """
        weights = self.hparams.proxy_weights
        names = [n for n in self.proxies() if weights[n] > 0]
        w = torch.tensor([weights[n] for n in names], dtype=torch.float32)
        if train and self.hparams.proxy_combine == "sample" and len(names) > 1:
            pick = int(torch.multinomial(w, 1))
            return [names[pick]], torch.ones(1)
        return names, w / w.sum()

    def generator_outputs(self, batch: dict[str, Any], saliency: Tensor | None, train: bool) -> dict[str, Any]:
        """G's outputs and the logits every generator term reads (see module docstring)."""
        out = self.generator(batch["image"], saliency)
        marked = out["marked"]
        names, weights = self.proxies_for_step(train)
        proxies = self.proxies()
        modes = {name: proxy.training for name, proxy in proxies.items()}
        for name in names:
            proxies[name].eval()  # running BatchNorm statistics: a batch of marked images must not shift them
        try:
            marked_logits = [proxies[n](marked) for n in names]
            rescaled = random_rescale(thief_augment_fn(marked, **self.hparams.thief_augment),
                                      tuple(self.hparams.rescale_range))
            rescaled_logits = [proxies[n](rescaled) for n in names]
            outputs = {
                "marked": marked,
                "delta": out["delta"],
                # one proxy: the tensor itself (the single-proxy X-Mark, bit for bit)
                "marked_logits": marked_logits[0] if len(names) == 1 else marked_logits,
                "rescaled_marked_logits": rescaled_logits[0] if len(names) == 1 else rescaled_logits,
                "proxy_weights": weights.to(marked.device),
                "surrogate_marked_logits": self.surrogate(marked),
            }
        finally:
            for name, proxy in proxies.items():
                proxy.train(modes[name] and train)
        outputs["reference_marked_logits"] = [outputs["surrogate_marked_logits"]] + [
            r(marked) for r in self.clean_models()[1:]]
        return outputs

    # -- evaluation -----------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        super()._eval_step(batch, batch_idx, stage)  # the proxy's clean task metrics
        if self.warming_up and stage == "val":
            return
        images, labels = batch["image"], batch["label"]
        saliency = self.saliency(images, batch.get("id"))
        outputs = self.generator_outputs(batch, saliency, train=False)
        marked = quantise(outputs["marked"])
        n = len(labels)
        kw = dict(on_step=False, on_epoch=True, batch_size=n)
        self.log(f"{stage}/psnr", peak_signal_noise_ratio(marked, images, data_range=1.0), **kw)
        self.log(f"{stage}/ssim", structural_similarity_index_measure(marked, images, data_range=1.0), **kw)
        self.log(f"{stage}/linf", (marked - images).abs().amax(), on_step=False, on_epoch=True, reduce_fx="max",
                 batch_size=n)
        lpips = next((t for t in self.loss_terms.values() if isinstance(t, LPIPSTerm)), None)
        if lpips is not None:
            self.log(f"{stage}/lpips", lpips.distance(images, marked).mean(), **kw)
        keep = ~self._target_mask(labels)
        if bool(keep.any()):
            m = int(keep.sum())
            kw = dict(on_step=False, on_epoch=True, batch_size=m)
            t = self.target_class
            marked_kept, clean_kept = marked[keep], images[keep]  # the non-target rows, taken once
            proxy_delta_p = []
            for name, proxy in self.proxies().items():
                wsr, delta_p = target_class_response(proxy, marked_kept, clean_kept, t)
                suffix = "" if name == "backbone" else f"/{name}"
                self.log(f"{stage}/wsr_proxy{suffix}", wsr, **kw)
                self.log(f"{stage}/delta_p_proxy{suffix}", delta_p, **kw)
                proxy_delta_p.append(delta_p)
            clean_wsr, clean_delta_p = map(torch.stack, zip(*[  # surrogate first
                target_class_response(r, marked_kept, clean_kept, t) for r in self.clean_models()]))
            largest_clean_delta_p = clean_delta_p.max()
            self.log(f"{stage}/wsr_surrogate", clean_wsr[0], **kw)
            self.log(f"{stage}/delta_p_surrogate", clean_delta_p[0], **kw)
            self.log(f"{stage}/wsr_references", clean_wsr.max(), **kw)
            self.log(f"{stage}/delta_p_references", largest_clean_delta_p, **kw)
            # every family must learn the mark (the weakest proxy counts) and no clean model may answer to it
            self.log(f"{stage}/xmark_score", torch.stack(proxy_delta_p).min() - largest_clean_delta_p, **kw)
        if stage == "val" and batch_idx == 0:
            k = self.hparams.panel_size
            self.xmark_panel = {
                "image": images[:k].detach().cpu(),
                "saliency": (saliency if saliency is not None else torch.zeros_like(images[:, :1]))[:k].detach().cpu(),
                "delta": outputs["delta"][:k].detach().cpu(),
                "marked": marked[:k].detach().cpu(),
                "label": labels[:k].detach().cpu(),
                "epsilon": self.generator.epsilon,
            }

    def on_validation_epoch_end(self) -> None:
        if self.warming_up:
            # Before G learns there is no watermark to score; -1 keeps warm-up checkpoints last.
            self.log("val/xmark_score", -1.0)
