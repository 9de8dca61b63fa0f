"""The body of ``train.py``: compose -> instantiate -> (validate untrained) -> fit -> test -> summary
(+ ``figures/curves.png`` from the CSV log every run keeps).

Kept out of ``train.py`` so the entry point stays thin and tests can call it with a
composed config.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import stat
import string
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from utils.clean_model_runs import train_clean_models_first
from utils.hardware import cpu_bf16_is_native, emulated_bf16_warning
from utils.loggers import CURVES_FILE, keep_wandb_run_id, metrics_csv_of, plot_curves, with_csv_logger

log = logging.getLogger("medmark")


class EpochClock(pl.Callback):
    """Wall time of each training epoch (its validation included), for ``summary.json``."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None


def _reset_peak_memory(device: torch.device) -> None:
    """Start this run's peak-memory count (a Hydra multirun runs every job in one process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets VmHWM, the peak resident set size of this process
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_memory(device: torch.device) -> tuple[float | None, str]:
    """(MiB, kind): CUDA ``max_memory_allocated`` on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1), "cuda_max_allocated"
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1), "cpu_peak_rss"
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return round(peak / (2**20 if os.uname().sysname == "Darwin" else 1024), 1), "cpu_peak_rss_process"
    except (ImportError, AttributeError):
        return None, "unknown"


def _finish_wandb(trainer: pl.Trainer) -> None:
    """Close this run's W&B run, so the next job of a multirun (same process) starts its own."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def instantiate_list(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-like group; ``null`` entries skipped."""
    objects = []
    for name, spec in (group or {}).items():
        if spec is not None and "_target_" in spec:
            log.debug("instantiating %s", name)
            objects.append(instantiate(spec))
    return objects


# ----------------------------------------------------------------------------- secrets
#
# A method's secret config values (StealthMark's payload and trigger seed, X-Mark's marking and
# verification seeds) default to null in configs/method/*.yaml: a public default would be a
# public secret. A run resolves them once, before anything is built, in this order:
#   1. ``secret_file`` (config key, or the MEDMARK_SECRET_FILE environment variable): a JSON/YAML
#      file whose values override the secret fields -- nothing on the command line, nothing in ps;
#   2. resume (``ckpt_path``): the values recorded in the run's owner kit (drawn_secrets.json);
#   3. still null: drawn with Python ``secrets`` and recorded in <kit>/drawn_secrets.json (0600).
# Under DDP every process resolves on its own; only global rank 0 writes, and the StealthMark
# module adopts rank 0's key when the processes' keys differ (StealthMarkModule.setup). X-Mark's
# seeds are only used by rank 0 (XMarkRelease.on_fit_end).

DRAWN_SECRETS_FILE = "drawn_secrets.json"
SALT_FILE = "redaction_salt.hex"
KIT_FILES = ("secret.json", DRAWN_SECRETS_FILE)  # present = a kit (or a run that will write one) lives here
PAYLOAD_ALPHABET = string.ascii_lowercase + string.digits  # one byte-mode QR segment (watermark/stealthmark/qr.py)


class KitExistsError(ValueError):
    """The run would replace an existing owner kit (exit 2 from train.py)."""


def _draw_payload(cfg: DictConfig) -> str:
    """Random payload of the full byte capacity of ``method.qr`` (v1-H: 7 characters, ~36 bits)."""
    from watermark.stealthmark.qr import byte_capacity, qr_modules

    version = int(OmegaConf.select(cfg, "method.qr.version", default=1))
    level = str(OmegaConf.select(cfg, "method.qr.error_correction", default="H")).upper()
    length = byte_capacity(version, level)
    for _ in range(100):
        payload = "".join(secrets.choice(PAYLOAD_ALPHABET) for _ in range(length))
        try:
            qr_modules(payload, version=version, error_correction=level)
            return payload
        except ValueError:  # a long digit run changed the segment mode: draw again
            continue
    raise ValueError(f"method.payload: could not draw a payload that fits QR version {version}-{level}")


# Dotted config key -> how a null value is drawn. Only keys present in the run's config count.
DRAWABLE_SECRETS = {
    "method.payload": _draw_payload,
    "method.trigger.seed": lambda cfg: secrets.randbits(31),
    "callbacks.xmark_release.seed": lambda cfg: secrets.randbits(63),
    "callbacks.xmark_release.verification.seed": lambda cfg: secrets.randbits(63),
}
_MISSING = object()


@dataclass
class SecretResolution:
    """What :func:`resolve_secrets` did: values drawn here, values reused from a kit, where from."""

    kit_dir: Path | None
    drawn: dict[str, Any] = field(default_factory=dict)
    reused: dict[str, Any] = field(default_factory=dict)
    reused_from: Path | None = None
    secret_file: Path | None = None

    @property
    def recorded(self) -> dict[str, Any]:
        """Values this run's kit must keep so that the run can be resumed."""
        return {**self.reused, **self.drawn}


def kit_dir(cfg: DictConfig) -> Path | None:
    """The owner-kit folder of the run's method (null for a method without one)."""
    callbacks = cfg.get("callbacks") or {}
    if callbacks.get("owner_kit"):
        return Path(callbacks.owner_kit.output_dir)
    if callbacks.get("xmark_release"):
        return Path(callbacks.xmark_release.owner_dir)
    if callbacks.get("medlocker_export"):
        return Path(callbacks.medlocker_export.output_dir) / "owner"
    return None


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def _secret_prefixes(cfg: DictConfig) -> list[str]:
    return [str(k) for k in (cfg.get("secret_keys") or [])] + [k for k in DRAWABLE_SECRETS
                                                             if OmegaConf.select(cfg, k, default=_MISSING) is not _MISSING]


def _set_secret(cfg: DictConfig, dotted: str, value: Any, explicit: set[str] = frozenset()) -> None:
    """Set one secret value; ``method.trigger.seed`` also reaches the trigger blocks that follow it."""
    old = OmegaConf.select(cfg, dotted, default=None)
    OmegaConf.update(cfg, dotted, value, merge=False)
    if dotted != "method.trigger.seed":
        return
    trigger = OmegaConf.select(cfg, "method.trigger", default=None)
    for name in list(trigger.keys()) if isinstance(trigger, DictConfig) else []:
        block = trigger.get(name)
        key = f"method.trigger.{name}.seed"
        if isinstance(block, DictConfig) and "seed" in block and key not in explicit:
            # An unresolved block interpolates ${method.trigger.seed} and follows by itself; a resolved
            # one (train.py resolves first) holds the old value or null.
            if OmegaConf.is_interpolation(block, "seed"):
                continue
            if block.seed is None or block.seed == old:
                block.seed = value


def read_secret_file(path: str | os.PathLike, cfg: DictConfig) -> dict[str, Any]:
    """Dotted key -> value from a JSON/YAML secret file (nested mappings or dotted keys).

    Every key must be one of the run's secret fields (``secret_keys`` or a drawable secret, or
    below one) and exist in the config. A file readable by group/others is used with a warning.

    Raises:
        ValueError: missing/unreadable file, not a mapping, or a key that is not a secret field
            (the message names the file and the key, never a value).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"secret_file: {p} does not exist")
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        log.warning("secret_file %s is readable by group/others (mode %s); run `chmod 600 %s`", p, oct(mode), p)
    try:
        data = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    except Exception as err:  # noqa: BLE001 -- any parse error: name the file, not its contents
        raise ValueError(f"secret_file {p}: not valid JSON/YAML ({type(err).__name__})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"secret_file {p}: must hold a non-empty mapping of secret fields")
    values = _flatten(data)
    prefixes = _secret_prefixes(cfg)
    for key in values:
        if not any(key == pre or key.startswith(pre + ".") for pre in prefixes):
            raise ValueError(f"secret_file {p}: field '{key}' is not a secret field of this run "
                             f"(secret fields: {', '.join(prefixes) or 'none'})")
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise ValueError(f"secret_file {p}: field '{key}' is not a key of this run's config")
    return values


def _read_drawn(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        values = doc["values"]
        if not isinstance(values, dict):
            raise TypeError("values is not a mapping")
        return values
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: field 'values': unreadable record of drawn secrets ({type(err).__name__})") from None


def resolve_secrets(cfg: DictConfig) -> SecretResolution:
    """Fill the run's null secret fields in ``cfg`` (in place): secret file, then resume, then draw.

    Never logs a value. Writes nothing (see :func:`record_secrets`).

    Raises:
        ValueError: a bad secret file, or a resume whose drawn secrets cannot be found.
    """
    result = SecretResolution(kit_dir=kit_dir(cfg))
    source = cfg.get("secret_file")
    explicit: set[str] = set()
    if source:
        values = read_secret_file(source, cfg)
        explicit = set(values)
        for key, value in values.items():
            _set_secret(cfg, key, value, explicit)
        result.secret_file = Path(source)
    missing = [k for k in DRAWABLE_SECRETS if OmegaConf.select(cfg, k, default=_MISSING) is None]
    if missing and cfg.get("ckpt_path"):
        # A resumed run must train on the secret it started with: never draw a new one.
        rel = Path("owner")
        if result.kit_dir is not None:
            try:
                rel = result.kit_dir.resolve().relative_to(Path(cfg.paths.output_dir).resolve())
            except ValueError:
                pass
        candidates = [p / DRAWN_SECRETS_FILE for p in
                      ([result.kit_dir] if result.kit_dir is not None else [])
                      + [Path(cfg.ckpt_path).resolve().parent.parent / rel]]
        found = next((c for c in candidates if c.is_file()), None)
        recorded = _read_drawn(found) if found else {}
        absent = [k for k in missing if k not in recorded]
        if absent:
            raise ValueError(f"{', '.join(absent)}: null on resume (ckpt_path={cfg.ckpt_path}) and not recorded in "
                             f"{' or '.join(str(c) for c in candidates)}; pass the original values with "
                             "secret_file=<file> (a new draw would not match the checkpoint's mark)")
        for key in missing:
            _set_secret(cfg, key, recorded[key], explicit)
            result.reused[key] = recorded[key]
        result.reused_from = found
        missing = []
    for key in missing:
        value = DRAWABLE_SECRETS[key](cfg)
        _set_secret(cfg, key, value, explicit)
        result.drawn[key] = value
    return result


def refuse_existing_kit(cfg: DictConfig, kit: Path | None) -> None:
    """Raise :class:`KitExistsError` when ``kit`` already holds a kit this run would replace.

    Allowed: a resume (``ckpt_path`` set: the same run goes on) or ``overwrite_kit=true``.
    """
    if kit is None or cfg.get("ckpt_path") or cfg.get("overwrite_kit"):
        return
    for name in KIT_FILES:
        if (kit / name).exists():
            raise KitExistsError(f"{kit / name} exists: this folder already holds an owner kit whose secret marks "
                                 "the checkpoints beside it; choose another run folder, resume with ckpt_path=, "
                                 "or pass overwrite_kit=true to replace it")


def record_secrets(resolution: SecretResolution) -> bytes | None:
    """Global rank 0 only: write ``drawn_secrets.json`` (0600) when values were drawn or reused and
    return the kit's redaction salt (reused if present, else 32 new bytes in ``redaction_salt.hex``, 0600)."""
    from watermark.certificates import write_secret_file

    kit = resolution.kit_dir
    if kit is None:
        return None
    if resolution.recorded:
        doc = {"format": "medmark-drawn-secrets", "version": 1, "values": resolution.recorded,
               "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_secret_file(kit / DRAWN_SECRETS_FILE, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
        what = ", ".join(sorted(resolution.recorded))
        if resolution.drawn:
            log.info("secret value(s) %s were null: drawn at random and stored in the owner kit %s (0600)",
                     ", ".join(sorted(resolution.drawn)), kit / DRAWN_SECRETS_FILE)
        else:
            log.info("secret value(s) %s reused from %s (resume) and stored in %s", what, resolution.reused_from,
                     kit / DRAWN_SECRETS_FILE)
    salt_path = kit / SALT_FILE
    if salt_path.is_file():
        try:
            salt = bytes.fromhex(salt_path.read_text().strip())
            if len(salt) == 32:
                return salt
        except ValueError:
            pass
    salt = secrets.token_bytes(32)
    write_secret_file(salt_path, salt.hex().encode("ascii") + b"\n")
    return salt


def secret_digest(value: Any, salt: bytes) -> str:
    """HMAC-SHA256 of a secret config value (canonical JSON) under the kit's salt, hex."""
    message = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(salt, message, hashlib.sha256).hexdigest()


def redacted_config(cfg: DictConfig, salt: bytes | None = None) -> dict:
    """Resolved config as plain dict, every key listed in ``secret_keys`` replaced.

    With the owner kit's ``salt`` (32 random bytes, ``<kit>/redaction_salt.hex``) the value becomes
    ``<secret hmac-sha256:HEX>``: the owner can later show which secret a config referred to,
    nobody else can test a guess against it (a plain hash of a 7-character payload or a seed is
    brute-forced in seconds). Without a salt: ``<secret>``. This is what config.yaml and loggers get.
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    for dotted in cfg.get("secret_keys") or []:
        node = plain
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict) and parts[-1] in node and node[parts[-1]] is not None:
            node[parts[-1]] = (f"<secret hmac-sha256:{secret_digest(node[parts[-1]], salt)}>" if salt is not None
                               else "<secret>")
    return plain


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value) if math.isfinite(float(value)) else None
    return dict(sorted(out.items()))


def format_summary(summary: dict[str, Any]) -> str:
    """A few human lines: the monitored metric (best, untrained), test metrics, where outputs are."""
    monitor = summary.get("monitor") or ""
    lines = [f"== {summary['task']} run finished in {summary['seconds']} s"]
    if summary.get("best_score") is not None:
        line = f"best {monitor}: {summary['best_score']:.4f}"
        untrained = (summary.get("untrained") or {}).get(monitor)
        if untrained is not None:
            line += f"  (untrained model: {untrained:.4f})"
        lines.append(line)
    if summary.get("test"):
        lines.append("test: " + ", ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in summary["test"].items()
                                          if v is not None and "/loss" not in k))
    lines.append(f"outputs: {summary['output_dir']} (summary.json, checkpoints/, figures/)")
    return "\n".join(lines)


def plot_run_curves(loggers: list, output_dir: Path) -> str | None:
    """Plot the run's CSV log into ``<output_dir>/figures/curves.png``; its path, or None.

    A plotting failure is logged and never fails the run (the model is trained by then).
    """
    metrics_csv = metrics_csv_of(loggers)
    if metrics_csv is None or not metrics_csv.is_file():
        log.warning("no CSV metrics log found: figures/curves.png not written")
        return None
    try:
        path = plot_curves(metrics_csv, output_dir / CURVES_FILE)
    except Exception as exc:  # noqa: BLE001 - a figure must not lose a finished run
        log.warning("figures/curves.png not written: %s: %s", type(exc).__name__, exc)
        return None
    return str(path) if path else None


def run_training(cfg: DictConfig) -> float | None:
    """Train/test as configured; write ``summary.json``; return ``cfg.optimized_metric``'s best value."""
    started = time.time()
    output_dir = Path(cfg.paths.output_dir)
    resolution = resolve_secrets(cfg)  # before anything is built: the module and callbacks take the values
    # X-Mark's pipeline: train_py references / controls (else nothing); a kit this run would replace is
    # refused before they are trained, not after
    train_clean_models_first(cfg, before_training=lambda: refuse_existing_kit(cfg, resolution.kit_dir))
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.method, backbone=cfg.backbone, loss=cfg.loss, _recursive_=False)
    if cfg.get("init_weights"):
        module.load_model_weights(cfg.init_weights)
    callbacks = instantiate_list(cfg.get("callbacks"))
    epoch_clock = EpochClock()
    callbacks.append(epoch_clock)
    wandb_cfg = OmegaConf.select(cfg, "logger.wandb", default=None)
    if wandb_cfg is not None:  # <run>/wandb_run_id.txt: a resumed run (ckpt_path=) continues its W&B run
        keep_wandb_run_id(wandb_cfg, output_dir, cfg.get("ckpt_path"), write=rank_zero_only.rank == 0)
    loggers = with_csv_logger(instantiate_list(cfg.get("logger")), output_dir)  # CSV always: figures/curves.png
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    slow_precision = emulated_bf16_warning(trainer.precision, trainer.strategy.root_device.type, cpu_bf16_is_native())
    if slow_precision and trainer.is_global_zero:
        log.warning(slow_precision)

    salt = None
    if trainer.is_global_zero:
        refuse_existing_kit(cfg, resolution.kit_dir)  # before anything of this run is written
        salt = record_secrets(resolution)
    public_config = redacted_config(cfg, salt)
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(public_config))

    # Bad data stops the run here, before any training, naming the files at fault. Only the
    # first process reads ahead; under torchrun the others meet it inside fit() after
    # Lightning's own prepare_data barrier (they must not generate data concurrently).
    if trainer.local_rank == 0 and trainer.node_rank == 0:
        datamodule.prepare_data()
        datamodule.setup("fit")
    for logger in trainer.loggers:
        logger.log_hyperparams(public_config)

    summary: dict[str, Any] = {"task": cfg.data.task, "output_dir": str(output_dir)}
    if datamodule.splits:
        summary["data"] = {"root": str(datamodule.dataset_root()),
                           **{f"num_{name}": len(split) for name, split in datamodule.splits.items()}}
    device = trainer.strategy.root_device
    _reset_peak_memory(device)
    if cfg.get("eval_untrained"):
        summary["untrained"] = _numbers(trainer.validate(module, datamodule=datamodule, verbose=False)[0])
    fit_started = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_seconds = time.time() - fit_started

    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint else ""
    summary.update(
        {
            "monitor": cfg.get("optimized_metric"),
            "best_score": float(checkpoint.best_model_score) if checkpoint and checkpoint.best_model_score is not None else None,
            "best_checkpoint": best_path or None,
            "last_checkpoint": str(Path(checkpoint.dirpath) / "last.ckpt") if checkpoint and checkpoint.save_last else None,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "fit": _numbers(trainer.callback_metrics),
        }
    )
    if cfg.get("test"):
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None, verbose=False)
        summary["test"] = _numbers(results[0]) if results else {}
    summary["seconds"] = round(time.time() - started, 1)
    network = getattr(module, "model", module)
    peak_mib, peak_kind = _peak_memory(device)
    summary["resources"] = {
        "num_parameters": sum(p.numel() for p in network.parameters()),
        "num_trainable_parameters": sum(p.numel() for p in network.parameters() if p.requires_grad),
        "num_parameters_module": sum(p.numel() for p in module.parameters()),  # + generator, references, LPIPS...
        "fit_seconds": round(fit_seconds, 1),
        "epochs_timed": len(epoch_clock.seconds),
        "seconds_per_epoch": (round(sum(epoch_clock.seconds) / len(epoch_clock.seconds), 2)
                              if epoch_clock.seconds else None),
        "peak_memory_mib": peak_mib,
        "peak_memory_kind": peak_kind,
        "device": str(device),
    }

    if trainer.is_global_zero:
        summary["curves"] = plot_run_curves(trainer.loggers, output_dir)
        path = output_dir / "summary.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
        print(format_summary(summary), flush=True)
    _finish_wandb(trainer)
    metric = cfg.get("optimized_metric")
    if metric is None:
        return None
    return summary["best_score"] if summary["best_score"] is not None else summary["fit"].get(metric)
