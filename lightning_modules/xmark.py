"""X-Mark generator training (``method=xmark``, docs/xmark.md, step 3).

Three kinds of network live in :class:`XMarkModule`:

* ``generator`` -- :class:`models.generator.ConditionalUNetGenerator` G(x, s): the only thing
  X-Mark releases (as ``owner/generator.pt``, via :class:`watermark.xmark.marker.XMarkMarker`);
* ``model`` -- the *proxy Mal model* (built from the ``backbone`` config): a classifier
  trained, with clean labels, on the currently marked training set (a fraction
  ``mark_fraction`` of the target-class images replaced by G's output), so it learns what a
  thief's model would learn from the released data. The targeted term is computed on it
  (first-order bilevel scheme: ``proxy_steps`` proxy updates per generator update);
* ``surrogate`` and ``references`` -- frozen *clean* classifiers. The surrogate gives the
  EigenCAM saliency s (cached on disk, :class:`watermark.xmark.saliency.SaliencyCache`) and, with
  the references, the Ind-M suppression term (marked non-target images must stay correctly
  classified by clean models: a mark that fools clean models is an adversarial
  perturbation, not a watermark) and the untargeted term (marked target-class images lose
  their natural evidence). The surrogate comes from ``surrogate_checkpoint`` (a
  ``method=task`` run) or, when that is null, is trained here on clean batches during the
  first ``warmup_steps`` and then frozen.

Training step (manual optimisation, two optimisers):

1. iterations < ``warmup_steps``: the proxy (and an inline surrogate) take a CE step on the
   clean batch; G is not updated.
2. afterwards: s = EigenCAM(surrogate, x); the proxy takes a CE step on the marked batch
   (target-class rows replaced by x_w with probability ``mark_fraction``; optionally randomly
   rescaled); every ``proxy_steps`` iterations G takes a step on the generator terms of the
   ``loss`` group (all terms not in ``proxy_terms``), which read:

   ``marked`` / ``delta`` (B×C×H×W), ``marked_logits`` (proxy on x_w), ``rescaled_marked_logits``
   (proxy on randomly down/up-sampled x_w), ``surrogate_marked_logits``,
   ``reference_marked_logits`` (list: surrogate + references on x_w).

Logged: every term (``train/loss/<name>`` for G, ``train_proxy/loss/<name>`` for the proxy),
and per validation epoch: the proxy's task metrics on clean images (``val/balanced_accuracy``
= benign accuracy of a Mal-like model), ``val/wsr_proxy``, ``val/wsr_surrogate``,
``val/wsr_references`` (max over clean models), ``val/delta_p_proxy``,
``val/delta_p_surrogate``, image quality ``val/psnr``, ``val/ssim`` (torchmetrics) and
``val/lpips`` (when an ``lpips`` term is configured), ``val/linf`` (max |x_w − x|) and
``val/xmark_score`` = wsr_proxy − wsr_references (checkpoint selection). WSR = share of
marked non-target images classified as y_t.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from datamodules.transforms import random_rescale
from lightning_modules.base import to_plain
from lightning_modules.task import TaskModule
from losses.perceptual import LPIPSTerm
from models.generator import ConditionalUNetGenerator
from models.safe_reader import ModelFileError, load_model_checkpoint
from watermark.imageio import quantise
from watermark.xmark.marker import XMarkMarker
from watermark.xmark.saliency import SaliencyCache, default_target_layer, eigencam_saliency

log = logging.getLogger("medmark.xmark")

def _no_pretrained(config: dict) -> dict:
    """A backbone config that never reads pretrained weights (the state dict follows)."""
    config = copy.deepcopy(dict(config))
    for name in ("weights_path", "encoder_weights", "encoder_weights_path", "checkpoint"):
        if name in config:
            config[name] = None
    if "allow_random_init" in config:
        config["allow_random_init"] = True
    return config


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
        saliency_cache_dir: folder of the EigenCAM cache (null = compute without caching).
        sign_correction: EigenCAM sign correction.
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
        saliency_cache_dir: str | None = None,
        sign_correction: bool = True,
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
        self.save_hyperparameters({
            "generator": generator, "target_class": int(target_class),
            "generator_optimizer": to_plain(generator_optimizer) or {"_target_": "torch.optim.Adam", "lr": 1e-3},
            "mark_fraction": float(mark_fraction), "proxy_steps": int(proxy_steps),
            "warmup_steps": int(warmup_steps), "proxy_terms": list(proxy_terms),
            "proxy_rescale": float(proxy_rescale), "rescale_range": [float(v) for v in rescale_range],
            "surrogate_checkpoint": surrogate_checkpoint,
            "surrogate_backbone": to_plain(surrogate_backbone), "reference_checkpoints": list(reference_checkpoints),
            "saliency_cache_dir": saliency_cache_dir, "sign_correction": bool(sign_correction),
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
        self.register_buffer("iterations", torch.zeros((), dtype=torch.long))
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

    def train_heldout_control(self, loader, epochs: int, seed: int, lr: float = 1e-3) -> nn.Module:
        """A clean classifier the generator never saw: the surrogate's architecture, fresh weights.

        The suppression terms keep *the clean models they are trained against* blind to the
        mark; a generator trained long enough turns δ into a perturbation that transfers to
        other clean models anyway (docs/xmark.md). Only a model outside that loop can show it.

        Args:
            loader: clean training batches (``image`` B×C×H×W in [0, 1], ``label`` B long).
            epochs: passes over ``loader`` (Adam, cross-entropy).
            seed: initialisation and data order of this model.
        Returns:
            the trained model, on the CPU, in eval mode, frozen.
        """
        device = self.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = instantiate(_no_pretrained(copy.deepcopy(self.surrogate_config))).to(device)
            optimizer = torch.optim.Adam(model.parameters(), lr=float(lr))
            model.train()
            for _ in range(int(epochs)):
                for batch in loader:
                    logits = model(batch["image"].to(device))
                    loss = nn.functional.cross_entropy(logits, batch["label"].to(device).long())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        return model.cpu().eval().requires_grad_(False)

    def clean_models(self) -> list[nn.Module]:
        """The frozen clean classifiers of the suppression terms: surrogate + references."""
        return [self.surrogate, *self.references]

    def _freeze_clean_models(self) -> None:
        for model in self.clean_models():
            model.eval().requires_grad_(False)

    def on_fit_start(self) -> None:
        if not self.inline_surrogate or not self.warming_up:
            self._freeze_clean_models()

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen models stay in eval mode (BatchNorm statistics fixed); an inline surrogate
        # trains during warm-up only.
        for model in self.references:
            model.eval()
        if not (mode and self.inline_surrogate and self.warming_up):
            self.surrogate.eval()
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
        proxy_params = list(self.model.parameters())
        if self.inline_surrogate:
            proxy_params += list(self.surrogate.parameters())
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
        if not warming_up and self.inline_surrogate and self.surrogate.training:
            self._freeze_clean_models()  # warm-up just ended: the surrogate is final from here on

        # 1. proxy (and inline surrogate during warm-up) on the marked training set, clean labels
        proxy_images = images
        if not warming_up:
            with torch.no_grad():
                saliency = self.saliency(images, batch.get("id"))
                marked = self.generator(images, saliency)["marked"]
            chosen = self._target_mask(labels) & (torch.rand(labels.shape, device=labels.device)
                                                  < self.hparams.mark_fraction)
            proxy_images = torch.where(chosen[:, None, None, None], quantise(marked), images)
            if self.hparams.proxy_rescale > 0 and float(torch.rand(())) < self.hparams.proxy_rescale:
                proxy_images = random_rescale(proxy_images, tuple(self.hparams.rescale_range))
            self.log("train/marked_share", chosen.float().mean(), on_step=False, on_epoch=True,
                     batch_size=len(labels))
        self.model.train()
        proxy_batch = {**batch, "image": proxy_images}
        proxy_loss = self.compute_loss({"logits": self.model(proxy_images)}, proxy_batch, "train_proxy",
                                       terms=self.hparams.proxy_terms)
        if warming_up and self.inline_surrogate:
            proxy_loss = proxy_loss + F.cross_entropy(self.surrogate(images), labels)
        proxy_opt.zero_grad()
        self.manual_backward(proxy_loss)
        proxy_opt.step()

        # 2. generator, every proxy_steps iterations after warm-up
        iteration = int(self.iterations)
        self.iterations += 1
        if warming_up or iteration % self.hparams.proxy_steps:
            return proxy_loss.detach()
        outputs = self.generator_outputs(batch, saliency, train=True)
        loss = self.compute_loss(outputs, batch, "train", terms=self.generator_terms)
        generator_opt.zero_grad()
        self.manual_backward(loss)
        generator_opt.step()
        self.model.zero_grad(set_to_none=True)  # G's backward left gradients on the proxy
        return loss.detach()

    def generator_outputs(self, batch: dict[str, Any], saliency: Tensor | None, train: bool) -> dict[str, Any]:
        """G's outputs and the logits every generator term reads (see module docstring)."""
        out = self.generator(batch["image"], saliency)
        marked = out["marked"]
        was_training = self.model.training
        self.model.eval()  # running BatchNorm statistics: a batch of marked images must not shift them
        try:
            outputs = {
                "marked": marked,
                "delta": out["delta"],
                "marked_logits": self.model(marked),
                "rescaled_marked_logits": self.model(random_rescale(marked, tuple(self.hparams.rescale_range))),
                "surrogate_marked_logits": self.surrogate(marked),
            }
        finally:
            self.model.train(was_training and train)
        outputs["reference_marked_logits"] = [outputs["surrogate_marked_logits"]] + [r(marked) for r in self.references]
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
            proxy_w = torch.softmax(self.model(marked[keep]), 1)
            proxy_b = torch.softmax(self.model(images[keep]), 1)
            sur_w = torch.softmax(self.surrogate(marked[keep]), 1)
            sur_b = torch.softmax(self.surrogate(images[keep]), 1)
            self.log(f"{stage}/wsr_proxy", (proxy_w.argmax(1) == t).float().mean(), **kw)
            self.log(f"{stage}/delta_p_proxy", (proxy_w[:, t] - proxy_b[:, t]).mean(), **kw)
            self.log(f"{stage}/wsr_surrogate", (sur_w.argmax(1) == t).float().mean(), **kw)
            self.log(f"{stage}/delta_p_surrogate", (sur_w[:, t] - sur_b[:, t]).mean(), **kw)
            wsr_refs = torch.stack([(r(marked[keep]).argmax(1) == t).float().mean() for r in self.clean_models()])
            self.log(f"{stage}/wsr_references", wsr_refs.max(), **kw)
            self.log(f"{stage}/xmark_score", (proxy_w.argmax(1) == t).float().mean() - wsr_refs.max(), **kw)
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
