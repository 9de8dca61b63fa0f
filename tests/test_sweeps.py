"""W&B sweep specs (configs/sweep/*.yaml): structure, the agent's command expansion, and that
every expanded command composes (fast) and trains on a tiny budget, offline (slow).

The expansion mirrors ``wandb agent`` (wandb/wandb_agent.py ``_command_run``): one value per
parameter, ``${args_no_hyphens}`` -> ``key=value`` (wandb's own formatter),
``${env}`` -> ``/usr/bin/env``, ``${interpreter}`` -> this Python, ``${program}`` -> train.py.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import CONFIGS, ROOT, TINY_SEG, compose_config

SWEEP_DIR = CONFIGS / "sweep"
SPECS = sorted(SWEEP_DIR.glob("*.yaml"))
REQUIRED = {"task", "stealthmark", "xmark", "medlocker", "miadmark"}

TOP_LEVEL = {"program", "method", "metric", "parameters", "command", "name", "description", "project", "entity",
             "early_terminate", "run_cap", "controller", "job", "image_uri"}
SEARCH_METHODS = {"grid", "random", "bayes"}
# W&B distributions and the keys each needs (https://docs.wandb.ai/guides/sweeps/sweep-config-keys)
DISTRIBUTIONS = {
    "constant": {"value"}, "categorical": {"values"}, "int_uniform": {"min", "max"}, "uniform": {"min", "max"},
    "q_uniform": {"min", "max"}, "log_uniform": {"min", "max"}, "log_uniform_values": {"min", "max"},
    "q_log_uniform": {"min", "max"}, "q_log_uniform_values": {"min", "max"}, "inv_log_uniform": {"min", "max"},
    "inv_log_uniform_values": {"min", "max"}, "normal": set(), "q_normal": set(), "log_normal": set(),
    "q_log_normal": set(), "beta": set(), "q_beta": set(),
}
PARAM_KEYS = {"value", "values", "probabilities", "distribution", "min", "max", "q", "mu", "sigma", "a", "b"}


# ----------------------------------------------------------------------------- helpers
def load_spec(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _distribution(spec: dict) -> str:
    if "distribution" in spec:
        return spec["distribution"]
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    if "min" in spec and "max" in spec:  # wandb infers these from the bounds' types
        both_int = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
        return "int_uniform" if both_int else "uniform"
    return "<none>"


def validate_spec(spec: Any) -> list[str]:
    """Structural problems of a W&B sweep spec as used here (empty list = valid)."""
    if not isinstance(spec, dict):
        return ["the spec is not a mapping"]
    errors = [f"unknown top-level key {k!r}" for k in spec if k not in TOP_LEVEL]
    if spec.get("program") != "train.py":
        errors.append(f"program must be train.py (the agent runs it from the repo root), got {spec.get('program')!r}")
    if spec.get("method") not in SEARCH_METHODS:
        errors.append(f"method must be one of {sorted(SEARCH_METHODS)}, got {spec.get('method')!r}")
    metric = spec.get("metric")
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str) or \
            metric.get("goal") not in ("maximize", "minimize"):
        errors.append("metric needs a name and goal: maximize | minimize")
    params = spec.get("parameters")
    if not isinstance(params, dict) or not params:
        return errors + ["parameters must be a non-empty mapping"]
    for name, p in params.items():
        where = f"parameters.{name}"
        if not isinstance(p, dict):
            errors.append(f"{where}: must be a mapping")
            continue
        if "parameters" in p:
            errors.append(f"{where}: nested parameters do not become Hydra key=value overrides; use dotted keys")
            continue
        errors += [f"{where}: unknown key {k!r}" for k in p if k not in PARAM_KEYS]
        dist = _distribution(p)
        if dist not in DISTRIBUTIONS:
            errors.append(f"{where}: unknown distribution {dist!r}")
            continue
        missing = DISTRIBUTIONS[dist] - set(p)
        if missing:
            errors.append(f"{where}: {dist} needs {sorted(missing)}")
            continue
        if dist == "categorical":
            if not isinstance(p["values"], list) or not p["values"]:
                errors.append(f"{where}: values must be a non-empty list")
            elif any(v is None for v in p["values"]):
                errors.append(f"{where}: None reaches train.py as the string 'None' (Hydra's null is 'null')")
            if "probabilities" in p and (len(p["probabilities"]) != len(p["values"])
                                         or abs(sum(p["probabilities"]) - 1) > 1e-6):
                errors.append(f"{where}: probabilities must match values and sum to 1")
        if dist == "constant" and p["value"] is None:
            errors.append(f"{where}: None reaches train.py as the string 'None'")
        if "min" in p and "max" in p and not p["min"] < p["max"]:
            errors.append(f"{where}: min must be < max")
        if dist.endswith("log_uniform_values") and p.get("min", 1) <= 0:
            errors.append(f"{where}: {dist} needs min > 0")
        if dist.startswith("q_") and "q" in p and p["q"] <= 0:
            errors.append(f"{where}: q must be > 0")
        if spec.get("method") == "grid" and dist not in ("categorical", "constant"):
            errors.append(f"{where}: grid search needs values/value, not {dist}")
    command = spec.get("command")
    if not isinstance(command, list) or command[:3] != ["${env}", "${interpreter}", "${program}"] \
            or command[-1:] != ["${args_no_hyphens}"]:
        errors.append("command must be [${env}, ${interpreter}, ${program}, <fixed overrides>, ${args_no_hyphens}]")
    else:
        fixed = [str(c) for c in command[3:-1]]
        if not any(c.startswith("experiment=") for c in fixed):
            errors.append("command must name its experiment=<name>")
        if "logger=wandb" not in fixed:
            errors.append("command must select logger=wandb (the agent's runs report to the sweep)")
        errors += [f"command: unexpected macro {c}" for c in fixed if "${" in c]
    return errors


def _quantize(x: float, q: float) -> float:
    return round(x / q) * q


def sample_parameter(p: dict, rng: random.Random, corner: str | None = None) -> Any:
    """One value of a parameter, as the sweep controller would propose it.

    ``corner``: ``"low"``/``"high"`` take the first/last value or the bounds instead of a draw.
    """
    dist = _distribution(p)
    if dist == "constant":
        return p["value"]
    if dist == "categorical":
        values = p["values"]
        return values[0] if corner == "low" else values[-1] if corner == "high" else rng.choice(values)
    lo, hi = p.get("min"), p.get("max")
    if dist == "int_uniform":
        return lo if corner == "low" else hi if corner == "high" else rng.randint(lo, hi)
    if dist in ("uniform", "q_uniform"):
        x = lo if corner == "low" else hi if corner == "high" else rng.uniform(lo, hi)
        return _quantize(x, p.get("q", 1.0)) if dist == "q_uniform" else x
    if dist in ("log_uniform", "q_log_uniform"):  # bounds are exponents (natural log)
        x = math.exp(lo if corner == "low" else hi if corner == "high" else rng.uniform(lo, hi))
        return _quantize(x, p.get("q", 1.0)) if dist.startswith("q_") else x
    if dist in ("log_uniform_values", "q_log_uniform_values"):
        x = lo if corner == "low" else hi if corner == "high" else math.exp(rng.uniform(math.log(lo), math.log(hi)))
        return _quantize(x, p.get("q", 1.0)) if dist.startswith("q_") else x
    if dist in ("inv_log_uniform", "inv_log_uniform_values"):
        a, b = (-hi, -lo) if dist == "inv_log_uniform" else (math.log(1 / hi), math.log(1 / lo))
        return 1 / math.exp(a if corner == "low" else b if corner == "high" else rng.uniform(a, b))
    mu, sigma = p.get("mu", 0.0), p.get("sigma", 1.0)
    if dist in ("normal", "q_normal"):
        x = rng.gauss(mu, sigma)
        return _quantize(x, p.get("q", 1.0)) if dist.startswith("q_") else x
    if dist in ("log_normal", "q_log_normal"):
        x = math.exp(rng.gauss(mu, sigma))
        return _quantize(x, p.get("q", 1.0)) if dist.startswith("q_") else x
    if dist in ("beta", "q_beta"):
        x = rng.betavariate(p.get("a", 1.0), p.get("b", 1.0))
        return _quantize(x, p.get("q", 1.0)) if dist.startswith("q_") else x
    raise ValueError(f"cannot sample {p}")


def sample_parameters(spec: dict, rng: random.Random, corner: str | None = None) -> dict[str, Any]:
    return {name: sample_parameter(p, rng, corner) for name, p in spec["parameters"].items()}


def _args_no_hyphens(params: dict[str, Any]) -> list[str]:
    try:  # the agent's own formatter
        from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

        return create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args_no_hyphens"]
    except ImportError:  # pragma: no cover  (same format: f"{param}={value}")
        return [f"{k}={v}" for k, v in params.items()]


def expand_command(spec: dict, params: dict[str, Any], interpreter: str = "python") -> list[str]:
    """The argv ``wandb agent`` builds for one run of this sweep (wandb_agent.py ``_command_run``)."""
    sweep_vars = {"args_no_hyphens": _args_no_hyphens(params), "interpreter": [interpreter],
                  "program": [spec["program"]], "env": ["/usr/bin/env"] if os.name != "nt" else []}
    argv: list[str] = []
    for chunk in spec["command"]:
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += sweep_vars.get(chunk[2:-1]) or []
        else:
            argv.append(chunk)
    return argv


def hydra_overrides(argv: list[str], program: str = "train.py") -> list[str]:
    """The Hydra overrides of an expanded command (everything after the program)."""
    return argv[argv.index(program) + 1:]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def compose_expanded(spec: dict, params: dict[str, Any], tmp_path: Path):
    """Compose the config of one expanded run; check each swept key holds the swept value."""
    overrides = hydra_overrides(expand_command(spec, params))
    cfg = compose_config(overrides, tmp_path)
    plain = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    for key, value in params.items():
        node = plain
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{key}: not in the composed config"
            node = node[part]
        assert _same(node, value), f"{key}: composed {node!r}, swept {value!r}"
    return cfg


def _experiment(spec: dict) -> str:
    return next(str(c).split("=", 1)[1] for c in spec["command"] if str(c).startswith("experiment="))


# ----------------------------------------------------------------------------- fast tests
def test_every_method_has_a_sweep():
    assert REQUIRED <= {p.stem for p in SPECS}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_spec_is_a_valid_wandb_sweep(path):
    spec = load_spec(path)
    assert validate_spec(spec) == []
    assert (ROOT / spec["program"]).is_file()
    assert _experiment(spec).startswith(path.stem), "a sweep file is named after its method"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_spec_passes_wandbs_own_schema_when_installed(path):
    sweeps = pytest.importorskip("sweeps", reason="wandb[sweeps] (the offline schema) is not installed")
    assert sweeps.schema_violations_from_proposed_config(load_spec(path)) == []


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_expanded_command_composes_with_every_swept_key(path, tmp_path):
    spec = load_spec(path)
    rng = random.Random(0)
    for corner in ("low", "high", None):
        params = sample_parameters(spec, rng, corner)
        argv = expand_command(spec, params)
        assert argv[:3] == ["/usr/bin/env", "python", "train.py"] or os.name == "nt"
        assert all("${" not in a for a in argv)
        cfg = compose_expanded(spec, params, tmp_path)
    # the sweep never carries a secret (W&B stores swept values in clear in the run config)
    secret = [str(k) for k in cfg.get("secret_keys") or []]
    leaked = [k for k in spec["parameters"] if any(k == s or k.startswith(s + ".") for s in secret)]
    assert not leaked, f"swept secret keys: {leaked}"
    # a validation metric must be the one checkpoints are selected on (what train.py returns)
    metric = spec["metric"]["name"]
    assert metric.startswith(("val/", "test/"))
    if metric.startswith("val/"):
        assert metric == cfg.optimized_metric
        assert spec["metric"]["goal"] == ("maximize" if cfg.monitor_mode == "max" else "minimize")


def test_args_no_hyphens_are_hydra_key_value_pairs():
    spec = {"program": "train.py", "command": ["${env}", "${interpreter}", "${program}", "experiment=x",
                                                "${args_no_hyphens}"]}
    argv = expand_command(spec, {"method.optimizer.lr": 1e-05, "data.batch_size": 8, "data.augment.hflip": True},
                          interpreter="/py")
    assert argv == ["/usr/bin/env", "/py", "train.py", "experiment=x", "method.optimizer.lr=1e-05",
                    "data.batch_size=8", "data.augment.hflip=True"]


def test_a_key_that_does_not_exist_fails_the_compose_check(tmp_path):
    spec = load_spec(SWEEP_DIR / "xmark.yaml")
    spec["parameters"]["loss.nope.weight"] = {"values": [0.5, 1.0]}
    assert validate_spec(spec) == []  # structurally fine: only composing finds it
    with pytest.raises(Exception, match="nope"):
        compose_expanded(spec, sample_parameters(spec, random.Random(0)), tmp_path)


def test_structural_mistakes_are_reported():
    spec = load_spec(SWEEP_DIR / "task.yaml")
    bad = {**spec, "method": "hyperband", "metric": {"name": "val/dice"},
           "parameters": {"a.b": {"distribution": "log_uniform_values", "min": 0.0, "max": 1.0},
                          "c.d": {"values": []}, "e": {"parameters": {"f": {"value": 1}}}, "g": {"value": None}},
           "command": ["${env}", "${interpreter}", "${program}", "${args}"]}
    errors = "\n".join(validate_spec(bad))
    for fragment in ("method must be", "metric needs", "a.b: log_uniform_values needs min > 0",
                     "c.d: values must be", "nested parameters", "g: None", "command must be"):
        assert fragment in errors
    grid = {**spec, "method": "grid"}
    assert any("grid search needs values" in e for e in validate_spec(grid))


# ----------------------------------------------------------------------------- tiny real runs
# Tiny budgets per experiment, appended after the swept arguments (a swept key keeps its value).
_NOT_EXPERIMENT = [o for o in TINY_SEG if not o.startswith(("experiment=", "logger="))]
TINY = {
    "task_seg_synthetic": _NOT_EXPERIMENT + ["eval_untrained=false", "test=false"],
    "stealthmark_synthetic": ["data.synthetic.num_images=32", "data.synthetic.image_size=64", "data.image_size=50",
                              "data.batch_size=8", "trainer.max_epochs=1", "method.trigger.patch.size=4",
                              "callbacks.watermark_check.num_images=4", "callbacks.validation_panels=null",
                              "test=false"],
    "xmark_synthetic": ["data.synthetic.num_images=120", "data.synthetic.image_size=32", "data.image_size=32",
                        "data.batch_size=16", "method.warmup_steps=2", "method.mark_fraction=1.0",
                        "method.generator.base_width=8", "method.generator.depth=2",
                        "method.generator.epsilon=0.0627450980392157", "trainer.limit_val_batches=1",
                        "trainer.max_epochs=1", "callbacks.validation_panels=null", "test=false",
                        # the release (tested in test_xmark.py) needs a trained generator: after one
                        # tiny epoch every stored delta rounds to 0 and callbacks/xmark.py then fails
                        # formatting psnr_mean=None
                        "callbacks.xmark_release=null", "callbacks.xmark_panels=null"],
    "medlocker_synthetic": ["backbone=small_cnn", "data.synthetic.num_images=40", "data.synthetic.image_size=48",
                            "data.image_size=48", "data.batch_size=8", "trainer.max_epochs=1",
                            "method.logo.size_fraction=0.5", "method.placement.restarts=2",
                            "method.placement.steps=4", "method.delta.steps=3"],
}
TINY["miadmark_synthetic"] = TINY["medlocker_synthetic"]


def _tiny_for(spec: dict) -> list[str]:
    swept = set(spec["parameters"])
    return [o for o in TINY[_experiment(spec)] if o.split("=", 1)[0] not in swept]


@pytest.mark.slow
@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_expanded_command_trains_offline_on_a_tiny_budget(path, tmp_path):
    """One run per sweep, as the agent starts it, with the first value / lower bound of every
    parameter (the specs list values cheapest first, so the time stays bounded; random draws
    are composed above)."""
    import sys

    spec = load_spec(path)
    params = sample_parameters(spec, random.Random(0), corner="low")
    argv = expand_command(spec, params, interpreter=sys.executable)
    run_dir = tmp_path / "run"
    argv += _tiny_for(spec) + [f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}",
                               f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_API_KEY": "",
           "WANDB_DIR": str(tmp_path), "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config")}
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stderr[-4000:]}"
    summary = json.loads((run_dir / "summary.json").read_text())
    # the sweep's metric is a key the run actually logged
    metric = spec["metric"]["name"]
    logged = summary["fit"] if metric.startswith("val/") else summary.get("test") or {}
    assert metric in logged, f"{metric} not logged; have {sorted(logged)}"
    # every swept value reached the run's config
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key, value in params.items():
        node = written
        for part in key.split("."):
            node = node[part]
        assert _same(node, value), key
    assert list(run_dir.rglob("offline-run-*")), "the W&B logger did not run (offline)"
