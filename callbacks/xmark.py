"""X-Mark callbacks: image panels during training, and the release at the end of training.

:class:`XMarkPanels` saves ``figures/xmark_panel_epochXXX.png`` (x | saliency | δ amplified |
x_w) every validation epoch and sends it to W&B when the run logs there.

:class:`XMarkRelease` runs when ``fit`` ends (docs/xmark.md, step 4) and writes

* ``<run>/released/`` -- the source dataset folder copied file by file (``shutil.copy2``:
  CSVs and every untouched image byte-identical), in which a fraction ``fraction`` of the
  target-class images of the released *training* pool (``pool``; default ``train``: the data
  module's train split only, so the validation split carved from ``train.csv`` with the same
  ``split_seed``/``val_fraction`` stays clean and the owner's own Mal/Ind-M runs select their
  checkpoints on clean images; ``train+val``: every ``train.csv`` row) is replaced by its marked copy. Labels never change (clean
  label). Marked images are stored losslessly as PNG **under their original file name**, so
  the CSV's ``Path`` column stays byte-identical and the folder loads with the ordinary
  preset (readers decode by content, not by extension). Known limit: the file signature of
  a marked image (PNG among JPEGs) tells which images carry the mark; re-encode the whole
  release as PNG yourself if that matters more than byte-identity (``docs/xmark.md``).
* ``<run>/owner/`` -- ``generator.pt`` (G + the surrogate that gives its saliency),
  ``secret.json`` (:mod:`watermark.xmark.kit`: target class, verification ids, τ, α, m,
  marked ids, the controls: the clean models of training and held-out ones), ``certificate.json`` (signed), the owner's
  Ed25519 keys;
* ``<run>/release.json`` -- public numbers: counts, PSNR/SSIM/L∞ of the stored marked
  images against their sources, the control's ΔP/p (no ids).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402
from torchmetrics.functional.image import structural_similarity_index_measure  # noqa: E402

from datamodules.dicom import check_grey_writable, is_dicom_path, write_grey_dicom  # noqa: E402
from datamodules.synthetic import MARKER_NAME  # noqa: E402
from callbacks.figures import save_and_log_figure  # noqa: E402
from lightning_modules.xmark_clean_models import optimiser_settings, pipeline_setting  # noqa: E402
from models.safe_reader import ModelFileError, load_model_checkpoint  # noqa: E402
from watermark.imageio import quantise  # noqa: E402
from watermark.xmark.marker import mark_native, mark_native_unit, marker_sha256, query_pairs  # noqa: E402
from watermark import certificates  # noqa: E402
from watermark.xmark.kit import (  # noqa: E402
    build_xmark_certificate,
    build_xmark_secret,
    folder_sha256,
    write_xmark_certificate,
    write_xmark_secret,
)
from watermark.xmark.stats import CONTROL_PER_IMAGE, xmark_test  # noqa: E402

log = logging.getLogger("medmark.xmark")


def _show(ax, image: torch.Tensor, title: str, cmap: str = "gray", vmin: float = 0.0, vmax: float = 1.0) -> None:
    array = image.float()
    array = array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)
    ax.imshow(array.numpy(), cmap=cmap if array.ndim == 2 else None, vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def xmark_panel_figure(panel: dict[str, Any]):
    """Rows of x | saliency | δ (amplified to ±ε) | x_w for the module's ``xmark_panel``."""
    n = len(panel["image"])
    eps = float(panel["epsilon"]) or 1.0
    fig, axes = plt.subplots(n, 4, figsize=(6.4, 1.7 * n), squeeze=False)
    for i in range(n):
        _show(axes[i, 0], panel["image"][i], f"x (y={int(panel['label'][i])})")
        _show(axes[i, 1], panel["saliency"][i], "saliency s", "magma")
        _show(axes[i, 2], panel["delta"][i][:1], f"δ (±{eps * 255:.0f}/255)", "seismic", -eps, eps)
        _show(axes[i, 3], panel["marked"][i], "x_w")
    fig.tight_layout()
    return fig


class XMarkPanels(Callback):
    """Save (and log to W&B) the X-Mark panel every ``every_n_epochs`` validation epochs."""

    def __init__(self, output_dir: str, every_n_epochs: int = 1):
        self.output_dir = Path(output_dir)
        self.every_n_epochs = int(every_n_epochs)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        panel = getattr(pl_module, "xmark_panel", None)
        if panel is None or trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        fig = xmark_panel_figure(panel)
        path = self.output_dir / "figures" / f"xmark_panel_epoch{trainer.current_epoch:03d}.png"
        save_and_log_figure(trainer, fig, path, "val/xmark_panel", dpi=90)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images with values in [0, 1] (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


class XMarkRelease(Callback):
    """Write the marked dataset and the owner kit when training ends (module docstring).

    Args:
        output_dir: the run folder (``release.json`` goes here).
        release_dir: where the marked dataset is written (replaced if it exists).
        owner_dir: the owner kit folder.
        data: the run's data config (stored in the secret: it serves the verification images).
        fraction: share of target-class training images marked (``method.mark_fraction``).
        pool: which splits the marked images come from: ``train`` (default; the validation split
            stays clean) or ``train+val``.
        seed: draws which images are marked (secret).
        verification: ``{split, num_images (m), seed}`` -- the m non-target images queried.
        thresholds: ``{tau, alpha}``, pre-registered in the secret.
        owner_id: certificate field.
        private_key: owner's Ed25519 PEM; null = create ``<owner_dir>/owner_private_key.pem``.
        heldout_control: ``{epochs, seeds, lr, weight_decay, schedule, proxy_families, thief_augmented}``
            (optimiser and schedule: :func:`lightning_modules.xmark_clean_models.fit_clean_classifier`) --
            train one clean model of the surrogate's architecture per seed (and, with ``proxy_families``,
            one of each extra proxy family of the ensemble, e.g. a clean VGG; with ``thief_augmented`` and
            ``method.thief_augment`` on, each of them also once more with the thief's
            augmentation, named ``<architecture>+thief_augment``), which the generator never saw
            (``epochs: 0`` or no seeds = none), and record them as controls ``heldout_0..``
            (their architectures in ``release.json`` ``heldout_architectures``): the clean models inside the
            training loop are blind to the mark by construction, so only models outside it can
            show that δ has become a transferable adversarial perturbation (then no verdict can
            be claimed). Whether one clean model picks δ up depends on its seed, hence several.
            ``pipeline: train_py``: each of them is instead a ``method=task`` run of train.py trained before the
            fit (:mod:`utils.clean_model_runs`, best-by-validation checkpoint, as a suspect is trained) and
            appended to ``control_checkpoints``; ``loop`` (default): trained here at release.
        control_checkpoints: further clean classifier checkpoints, never seen by the generator,
            recorded as controls ``heldout_1..``.
    """

    def __init__(self, output_dir: str, release_dir: str, owner_dir: str, data: dict | DictConfig,
                 fraction: float, seed: int, verification: dict | DictConfig, thresholds: dict | DictConfig,
                 owner_id: str, private_key: str | None = None, batch_size: int = 64, pool: str = "train",
                 heldout_control: dict | DictConfig | None = None, control_checkpoints: list | None = None):
        self.output_dir = Path(output_dir)
        self.release_dir = Path(release_dir)
        self.owner_dir = Path(owner_dir)
        self.data = OmegaConf.to_container(data, resolve=True) if isinstance(data, DictConfig) else dict(data)
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"callbacks.xmark_release.fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)
        pools = {"train": ("train",), "train+val": ("train", "val")}
        if pool not in pools:
            raise ValueError(f"callbacks.xmark_release.pool must be one of {sorted(pools)}, got {pool!r}")
        self.pool = pool
        self.pool_splits = pools[pool]
        self.seed = int(seed)
        self.verification = OmegaConf.to_container(verification, resolve=True) \
            if isinstance(verification, DictConfig) else dict(verification)
        self.thresholds = OmegaConf.to_container(thresholds, resolve=True) \
            if isinstance(thresholds, DictConfig) else dict(thresholds)
        self.owner_id = str(owner_id)
        self.private_key = private_key
        self.batch_size = int(batch_size)
        held = heldout_control or {}
        held = OmegaConf.to_container(held, resolve=True) if isinstance(held, DictConfig) else dict(held)
        fields = ("epochs", "seeds", "lr", "weight_decay", "schedule", "proxy_families", "thief_augmented", "pipeline")
        unknown = sorted(set(held) - set(fields))
        if unknown:
            raise ValueError(f"callbacks.xmark_release.heldout_control: unknown field(s) {unknown} "
                             f"({', '.join(fields)})")
        self.heldout_control = {"epochs": int(held.get("epochs", 0)), "seeds": [int(v) for v in held.get("seeds", [])],
                                "lr": float(held.get("lr", 1e-3)),
                                **optimiser_settings(held, "callbacks.xmark_release.heldout_control"),
                                "proxy_families": bool(held.get("proxy_families", False)),
                                "thief_augmented": bool(held.get("thief_augmented", False)),
                                "pipeline": pipeline_setting(held, "callbacks.xmark_release.heldout_control")}
        if self.heldout_control["epochs"] < 0:
            raise ValueError("callbacks.xmark_release.heldout_control.epochs must be >= 0")
        self.control_checkpoints = [str(p) for p in (control_checkpoints or [])]
        self.heldout_architectures: list[str] = []  # filled by heldout_models, one per held-out control

    # -- pieces -------------------------------------------------------------------------------
    def heldout_families(self, pl_module) -> dict[str, dict | None]:
        """``{family name: backbone config}`` of the trained held-out controls (None = the surrogate's)."""
        families = pl_module.heldout_families() if hasattr(pl_module, "heldout_families") else {"surrogate": None}
        if not self.heldout_control["proxy_families"]:
            families = {"surrogate": families.get("surrogate")}
        return families

    def heldout_models(self, pl_module, datamodule) -> list[torch.nn.Module]:
        """Clean models outside the generator's training loop (``heldout_control``, ``control_checkpoints``)."""
        models = []
        self.heldout_architectures: list[str] = []
        epochs = self.heldout_control["epochs"]
        augmentations = {"": None}
        if self.heldout_control["thief_augmented"] and hasattr(pl_module, "heldout_augmentations"):
            augmentations = pl_module.heldout_augmentations()
        # train_py: utils.clean_model_runs trained them before the fit and listed them in control_checkpoints
        train_here = epochs > 0 and self.heldout_control["pipeline"] == "loop"
        for seed in self.heldout_control["seeds"] if train_here else []:
            for family, backbone in self.heldout_families(pl_module).items():
                for suffix, augment in augmentations.items():
                    started = time.time()
                    models.append(pl_module.train_heldout_control(
                        datamodule.train_dataloader(), epochs, seed, self.heldout_control["lr"], backbone,
                        desc=f"held-out control {len(models)} ({family}{suffix}, seed {seed})", augment=augment,
                        **{name: self.heldout_control[name] for name in ("weight_decay", "schedule")}))
                    name = (backbone or {}).get("name") or getattr(models[-1], "name", None) or family
                    self.heldout_architectures.append(f"{name}{suffix}")
                    log.info("held-out control %d: %s (%s%s, seed %d) trained %d epochs on the clean training split "
                             "in %.0f s", len(models) - 1, family, name, suffix, seed, epochs, time.time() - started)
        for i, path in enumerate(self.control_checkpoints):
            try:
                model, hparams = load_model_checkpoint(path, task="classification")
            except ModelFileError as err:
                raise ValueError(f"callbacks.xmark_release.control_checkpoints[{i}]: {err}") from None
            models.append(model.eval().requires_grad_(False))
            backbone = hparams.get("backbone")
            name = backbone.get("name") if isinstance(backbone, dict) else None
            self.heldout_architectures.append(f"{name} (control_checkpoints[{i}])" if name else
                                              f"control_checkpoints[{i}]")
        return models

    def _owner_keys(self):
        key, _private_path, _public_path = certificates.owner_signing_key(
            self.owner_dir, self.private_key, field="callbacks.xmark_release.private_key")
        return key

    def choose_marked(self, datamodule, target_class: int) -> list:
        """The target-class training samples to mark: ``round(fraction · n)`` drawn with ``seed``."""
        pool = [s for split in self.pool_splits for s in datamodule.splits.get(split, []) if s.label == target_class]
        pool.sort(key=lambda s: s.id)
        if not pool:
            raise ValueError(f"no training image of the target class {target_class} to mark")
        count = max(1, int(round(self.fraction * len(pool))))
        order = np.random.default_rng(self.seed).permutation(len(pool))[:count]
        return [pool[i] for i in sorted(order)]

    def verification_set(self, datamodule, target_class: int) -> tuple[list[str], torch.Tensor]:
        """m non-target ids of the verification split (drawn with the verification seed) and their images."""
        split = self.verification["split"]
        if split not in datamodule.splits:
            raise ValueError(f"callbacks.xmark_release.verification.split={split!r} is not a split "
                             f"({sorted(datamodule.splits)})")
        dataset = datamodule.dataset(split, train_transforms=False)
        candidates = sorted((s.id, i) for i, s in enumerate(dataset.samples) if s.label != target_class)
        m = int(self.verification["num_images"])
        if len(candidates) < 2:
            raise ValueError(f"split {split!r} has {len(candidates)} non-target image(s); verification needs >= 2")
        if len(candidates) < m:
            log.warning("verification: split %r has only %d non-target images (asked for m=%d); using all",
                        split, len(candidates), m)
        rng = np.random.default_rng(int(self.verification["seed"]))
        chosen = [candidates[i] for i in rng.permutation(len(candidates))[: min(m, len(candidates))]]
        images = torch.stack([dataset[i]["image"] for _, i in chosen])
        return [sid for sid, _ in chosen], images

    def write_release(self, source: Path, samples: list, marker, channels: int) -> dict[str, Any]:
        """Copy ``source`` to the release folder and overwrite ``samples`` with their marked version; quality stats.

        An 8-bit image file is replaced by a marked PNG (same name); a DICOM file by a marked DICOM file
        with every element kept but the pixels (and a new SOP Instance UID): δ is applied to the
        readings the data module gets from it and stored at the file's own bit depth
        (:func:`datamodules.dicom.write_grey_dicom`). PSNR, SSIM and L∞ compare those readings in [0, 1]."""
        if self.release_dir.resolve() == source.resolve():
            raise ValueError("callbacks.xmark_release.release_dir must differ from the source dataset folder")
        if self.release_dir.exists():
            shutil.rmtree(self.release_dir)
        shutil.copytree(source, self.release_dir, ignore=shutil.ignore_patterns(MARKER_NAME))
        psnr, ssim, linf = [], [], 0.0
        for sample in samples:
            path = Path(sample.image.path)
            try:
                relative = path.resolve().relative_to(source.resolve())
            except ValueError:
                raise ValueError(f"{path}: image is outside the dataset folder {source}; cannot release it") from None
            target = self.release_dir / relative
            if is_dicom_path(path):
                before, after = write_grey_dicom(path, target, lambda unit: mark_native_unit(marker, unit, channels),
                                                 marker.epsilon)
            else:
                with Image.open(path) as image:
                    pixels = np.asarray(image if image.mode in ("L", "RGB") else
                                        image.convert("L" if channels == 1 else "RGB"))
                Image.fromarray(mark_native(marker, pixels, channels)).save(target, format="PNG", optimize=False)
                stored = np.asarray(Image.open(target))  # read back: the numbers are about the file
                before, after = pixels / 255.0, stored / 255.0
            linf = max(linf, float(np.abs(after - before).max()))
            psnr.append(_psnr(after, before))
            a = torch.from_numpy(after).float()[None, None]
            b = torch.from_numpy(before).float()[None, None]
            if a.ndim == 5:
                a, b = a[0].permute(0, 3, 1, 2), b[0].permute(0, 3, 1, 2)
            ssim.append(float(structural_similarity_index_measure(a, b, data_range=1.0)))
        finite = [p for p in psnr if np.isfinite(p)]
        return {"num_marked": len(samples), "psnr_mean": float(np.mean(finite)) if finite else None,
                "psnr_min": float(np.min(finite)) if finite else None,
                "ssim_mean": float(np.mean(ssim)) if ssim else None, "linf_255": round(linf * 255.0, 4),
                "linf": linf, "epsilon": marker.epsilon,
                "linf_within_epsilon": bool(linf <= marker.epsilon + 1e-9)}

    def refuse_shared_seeds(self, references: dict) -> None:
        """ValueError when trained held-out controls share a seed with ``method.trained_references`` (checked
        settings): a clean model the generator was trained against is no held-out control."""
        shared = sorted(set(references.get("seeds", [])) & set(self.heldout_control["seeds"]))
        if shared and self.heldout_control["epochs"] > 0 and references.get("epochs", 0) > 0:
            raise ValueError(f"method.trained_references.seeds and callbacks.xmark_release.heldout_control.seeds "
                             f"share {shared}: a clean model the generator was trained against is no held-out control")

    # -- the hooks --------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Before any training: refuse held-out control seeds that are also trained-reference seeds, and a DICOM
        image the release would have to mark but could not write (colour, not 8/16-bit; DatasetError naming the
        file and field, train.py exit 2)."""
        references = getattr(pl_module, "hparams", {}).get("trained_references") or {}
        self.refuse_shared_seeds(references)
        if references.get("epochs", 0) > 0 and not self.control_checkpoints:
            # Measured (docs/xmark.md, `fam_s7`): the Ind-M term hid δ from clean models trained the way
            # its references are, every held-out control (trained alike) failed, and 2 of 3 innocent
            # ResNet18s trained by train.py passed. Only a control trained like a suspect shows that.
            log.warning("method.trained_references is on and callbacks.xmark_release.control_checkpoints is empty: "
                        "held-out controls trained like the references can miss a δ that clean models trained by "
                        "train.py answer to (false claims measured, docs/xmark.md); list train.py checkpoints of "
                        "the suspects' architectures there")
        datamodule = trainer.datamodule
        if datamodule is None or not getattr(datamodule, "splits", None) or not hasattr(pl_module, "target_class"):
            return  # on_fit_end names what is missing
        for sample in self.choose_marked(datamodule, int(pl_module.target_class)):
            if is_dicom_path(sample.image.path):
                check_grey_writable(sample.image.path)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        started = time.time()
        datamodule = trainer.datamodule
        if datamodule is None or not getattr(datamodule, "splits", None):
            raise RuntimeError("XMarkRelease needs the run's data module (its splits name the images)")
        if not hasattr(pl_module, "marker"):
            raise RuntimeError("XMarkRelease needs method=xmark (lightning_modules.xmark.XMarkModule)")
        target = int(pl_module.target_class)
        marker = pl_module.marker(int(datamodule.image_size))
        self.owner_dir.mkdir(parents=True, exist_ok=True)
        marker_file = marker.save(self.owner_dir / "generator.pt")
        source = Path(datamodule.dataset_root())

        samples = self.choose_marked(datamodule, target)
        quality = self.write_release(source, samples, marker, int(datamodule.channels))

        ids, images = self.verification_set(datamodule, target)
        marked = quantise(marker.mark(images)["marked"])
        control: dict[str, Any] = {}
        tau, alpha = float(self.thresholds["tau"]), float(self.thresholds["alpha"])
        controls = [(f"reference_{i}", copy.deepcopy(m).cpu().eval()) for i, m in enumerate(pl_module.clean_models())]
        controls += [(f"heldout_{i}", m) for i, m in enumerate(self.heldout_models(pl_module, datamodule))]
        for name, model in controls:
            pairs = query_pairs(lambda x, model=model: torch.softmax(model(x), 1), images, marked, target)
            control[name] = xmark_test(pairs["p_benign"], pairs["p_marked"], tau, alpha, pairs["pred_marked"], target)
            # per-image numbers: verify.py re-tests the control at any τ/α (sealed or exploratory)
            control[name].update({field: np.asarray(pairs[field]).tolist() for field in CONTROL_PER_IMAGE})
        proxies = pl_module.proxies() if hasattr(pl_module, "proxies") else {"backbone": pl_module.model}
        proxy_results = {}
        for name, proxy in proxies.items():
            proxy = copy.deepcopy(proxy).cpu().eval()
            pairs = query_pairs(lambda x, proxy=proxy: torch.softmax(proxy(x), 1), images, marked, target)
            proxy_results[name] = xmark_test(pairs["p_benign"], pairs["p_marked"], tau, alpha, pairs["pred_marked"],
                                             target)
        proxy_result = proxy_results["backbone"]

        classes = list(datamodule.classes)
        doc = build_xmark_secret(
            target_class=target, classes=classes, marker_checkpoint=marker_file.name,
            marker_sha256=marker_sha256(marker_file), image_size=marker.image_size, verification_ids=ids,
            verification_split=self.verification["split"], verification_seed=int(self.verification["seed"]),
            data_config=self.data, tau=tau, alpha=alpha,
            release={"fraction": self.fraction, "pool": self.pool, "marked_ids": [s.id for s in samples], "epsilon": marker.epsilon,
                     "dataset": str(self.release_dir), "source": str(source)},
            control=control,
        )
        write_xmark_secret(self.owner_dir / "secret.json", doc)
        dataset = {"layout": getattr(datamodule, "layout", None), "files_sha256": folder_sha256(self.release_dir),
                   "num_files": sum(1 for p in self.release_dir.rglob("*") if p.is_file())}
        cert = build_xmark_certificate(self.owner_id, doc, marker_sha256(marker_file), dataset)
        write_xmark_certificate(self.owner_dir / "certificate.json", cert, self._owner_keys())

        target_pool = sum(1 for split in self.pool_splits for s in datamodule.splits.get(split, [])
                          if s.label == target)
        report = {
            "release_dir": str(self.release_dir), "source": str(source), "owner_dir": str(self.owner_dir),
            "target_class": target, "target_name": classes[target], "num_target_training_images": target_pool,
            "fraction": self.fraction, "pool": self.pool, **quality, "m": len(ids),
            "control": {k: {n: v[n] for n in ("p_value", "delta_p", "wsr", "verified")} for k, v in control.items()},
            "proxy": {n: proxy_result[n] for n in ("p_value", "delta_p", "wsr", "verified")},
            "proxies": {k: {n: v[n] for n in ("p_value", "delta_p", "wsr", "verified")}
                        for k, v in proxy_results.items()},
            "heldout_architectures": list(getattr(self, "heldout_architectures", [])),
            "seconds": round(time.time() - started, 1),
        }
        (self.output_dir / "release.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"X-Mark release: {quality['num_marked']}/{target_pool} target-class training images marked "
              f"(PSNR {'inf (δ rounds to 0 everywhere)' if quality['psnr_mean'] is None else format(quality['psnr_mean'], '.2f') + ' dB'}, L∞ {quality['linf_255']}/255 <= ε={marker.epsilon * 255:.2f}/255)"
              f" -> {self.release_dir}; owner kit -> {self.owner_dir}; clean controls "
              + ", ".join(f"{k}: ΔP={v['delta_p']:.3f} p={v['p_value']:.3g}" for k, v in control.items())
              + "; proxy Mal: " + ", ".join(f"{k} ΔP={v['delta_p']:.3f} p={v['p_value']:.3g}"
                                            for k, v in proxy_results.items()), flush=True)
        passing = [name for name, v in control.items() if v["verified"]]
        if passing:
            # Not an error: the release is written, but verify.py will refuse every verdict on it.
            log.warning("clean control(s) %s pass the test on the marked verification images: the mark acts as a "
                        "transferable adversarial perturbation and no suspect can be verified with this release "
                        "(train the generator for fewer epochs or lower its epsilon)", ", ".join(passing))
