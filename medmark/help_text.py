"""``--help`` of ``train.py`` / ``verify.py`` / ``eval.py`` (and ``medmark train|verify|evaluate``).

Hydra prints ``hydra.help.template``; ``configs/hydra/help/medmark.yaml`` sets it to
``${medmark_help:${hydra.job.name}}``, the resolver registered here. It writes the command's
modes, exit codes, most used overrides (with their current values) and examples. Every list --
experiments, methods, config groups and their options, verification protocols, suspect kinds,
attacks -- is read from the config tree and the protocol registry when help is asked for, so a
new ``configs/experiment/<name>.yaml`` shows up by itself; options whose name starts with ``_``
(internal presets such as ``data/_common``) are never listed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from medmark import CONFIG_DIR

RESOLVER = "medmark_help"

# hydra.job.name (the entry script's name) -> the medmark sub-command
COMMAND_OF_JOB = {"train": "train", "verify": "verify", "eval": "evaluate"}

# the most used overrides per job: (key, what it takes); the current value is read from the config
OVERRIDES: dict[str, list[tuple[str, str]]] = {
    "train": [("experiment", "a mode above"), ("method", "objective"), ("data", "dataset layout"),
              ("data.root", "folder of a real dataset"), ("backbone", "network"), ("trainer", "hardware"),
              ("trainer.max_epochs", "epochs"), ("logger", "wandb | csv | none"), ("seed", "global seed"),
              ("ckpt_path", "resume from <run>/checkpoints/last.ckpt")],
    "eval": [("experiment", "the run's experiment"), ("ckpt_path", "the .ckpt to evaluate (required)"),
             ("split", "val | test"), ("data.root", "folder of a real dataset")],
    "verify": [("secret", "owner kit's secret.json (required)"), ("suspect", "the suspect (see above)"),
               ("out", "report folder (required)"), ("attack", "removal attack before verifying"),
               ("device", "cpu | cuda"), ("verify.num_images", "images queried"),
               ("verify.num_samples", "LIME samples per image"), ("verify.batch_size", "images per query"),
               ("mode", "MedLocker: certificate | restore | evaluate"),
               ("removal.learned.steps", "MedLocker evaluate: train the thief's learned remover (0 = off)"),
               ("quiet", "no progress bars (or --quiet)"),
               ("logger", "none | wandb (verdict, p-values, redacted report as a W&B run)")],
}

EXAMPLES: dict[str, list[str]] = {
    "train": ["python train.py experiment=task_seg_synthetic trainer.max_epochs=1",
              "medmark train experiment=stealthmark_synthetic data.root=/data/Kvasir-SEG data=kvasir_seg",
              "python train.py -m experiment=task_seg_synthetic backbone=unet_resnet34,sam_tiny"],
    "eval": ["python eval.py experiment=task_seg_synthetic ckpt_path=<run>/checkpoints/best-epoch007.ckpt",
             "medmark evaluate experiment=task_cls_synthetic ckpt_path=<ckpt> split=val"],
    "verify": ["python verify.py secret=<run>/owner/secret.json suspect=<run>/checkpoints/last.ckpt out=reports/s1",
               "medmark verify secret=<kit>/secret.json suspect=https://host/predict out=reports/api attack=jpeg",
               "python verify.py secret=<kit>/secret.json mode=certificate images=<run>/protected out=reports/c1"],
}

EXIT_CODES: dict[str, list[str]] = {
    "train": ["0  done", "2  bad input (config, dataset, missing weights): the message names the file or key;",
              "   a multirun (-m) with a failed job exits non-zero"],
    "eval": ["0  done (summary.json + figures/)", "2  bad input (config, checkpoint, data): the file or key is named"],
    "verify": ["0  ownership verified (at the thresholds sealed in the owner kit)", "1  not verified",
               "2  bad input or any error: the file or field is named; nothing but the log is left in out=",
               "3  exploratory: a decision threshold was changed; the report is no verdict"],
}

# app -> its "Modes" section, registered by the entry script that knows them (verify.py: the protocol
# registry and the suspect kinds; medmark/ itself never imports verification/). Default: experiments.
MODE_SECTIONS: dict[str, Callable[[], list[str]]] = {}


def group_options(group: str) -> list[str]:
    """Public options of a config group (``_``-prefixed presets left out), from Hydra's search path
    when Hydra is running, else from ``configs/<group>/``."""
    try:
        from hydra.core.global_hydra import GlobalHydra

        names = list(GlobalHydra.instance().config_loader().get_group_options(group)) \
            if GlobalHydra.instance().is_initialized() else None
    except Exception:  # noqa: BLE001 - help must never fail; fall back to the folder
        names = None
    if names is None:
        names = [p.stem for p in (CONFIG_DIR / group).glob("*.yaml")]
    return sorted(n for n in names if not n.split("/")[-1].startswith("_"))


def config_groups(app: str) -> list[str]:
    """The top-level config groups the app's own config tree offers (Hydra's groups left out)."""
    try:
        from hydra.core.global_hydra import GlobalHydra

        groups = list(GlobalHydra.instance().config_loader().list_groups(""))
    except Exception:  # noqa: BLE001
        groups = [p.name for p in CONFIG_DIR.iterdir() if p.is_dir()]
    used = {"verify": {"attack", "paths"}}.get(app)  # verify.py composes only these groups
    return sorted(g for g in groups if g != "hydra" and not g.startswith("_") and (used is None or g in used))


def description(group: str, name: str, width: int = 88) -> str:
    """The first comment line of ``configs/<group>/<name>.yaml`` (after ``@package``), shortened."""
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.is_file():
        return ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break  # the header comment is over
        text = line.lstrip("# ").strip()
        if not text or text.startswith(("@package", "Code:")):
            continue
        text = text.split(". ")[0].rstrip(",.:;")
        return text if len(text) <= width else text[: width - 1] + "…"
    return ""


def _current(root: DictConfig, key: str) -> str:
    """The value ``key`` has now: a group's chosen option or a config value (``-`` when absent)."""
    choices = OmegaConf.select(root, "hydra.runtime.choices", default=None) or {}
    if key in choices:
        return "null" if choices[key] is None else str(choices[key])
    try:
        value = OmegaConf.select(root, key, default="-", throw_on_missing=False)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation: show it as written
        return "(interpolated)"
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def _modes(app: str) -> list[str]:
    if app in MODE_SECTIONS:
        return MODE_SECTIONS[app]()
    names = group_options("experiment")
    width = max((len(n) for n in names), default=0)
    lines = ["Modes -- experiment=<name> (configs/experiment/):"]
    lines += [f"  {n:<{width}}  {description('experiment', n)}".rstrip() for n in names]
    lines += [f"  (methods: method={'|'.join(group_options('method'))})"]
    return lines


def help_text(app: str, root: DictConfig | None = None) -> str:
    """The help page of ``app`` (``train``, ``eval`` or ``verify``: Hydra's job name)."""
    from medmark.cli import COMMANDS

    command = COMMAND_OF_JOB.get(app, app)
    summary = COMMANDS[command].summary if command in COMMANDS else ""
    script = "eval.py" if app == "eval" else f"{app}.py"
    lines = [f"medmark {command} -- {summary}", "",
             f"usage: python {script} [group=option ...] [key=value ...]",
             f"       medmark {command} [group=option ...] [key=value ...]", ""]
    lines += _modes(app) + [""]
    lines += ["Exit codes:"] + [f"  {line}" for line in EXIT_CODES.get(app, [])] + [""]
    overrides = OVERRIDES.get(app, [])
    if overrides:
        width = max(len(k) for k, _ in overrides) + 1
        lines.append("Most used overrides (key=value; now = this config's value):")
        for key, what in overrides:
            now = f" (now {_current(root, key)})" if root is not None else ""
            lines.append(f"  {key + '=':<{width}} {what}{now}")
        lines.append("")
    lines.append("Config groups (group=option; internal presets starting with _ are not listed):")
    lines += [f"  {g}: {', '.join(group_options(g))}" for g in config_groups(app)]
    lines += ["", "Examples:"] + [f"  {e}" for e in EXAMPLES.get(app, [])]
    lines += ["", "The whole config: --cfg job.  Hydra's own flags: --hydra-help.  Docs: docs/quickstart.md"]
    return "\n".join(lines)


def _resolve_help(app: str, *, _root_: Any = None) -> str:
    # Hydra substitutes $NAME in the template (string.Template): a literal $ must be doubled
    return help_text(str(app), _root_).replace("$", "$$")


if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, _resolve_help, use_cache=False)
