"""Verify ownership: a suspect (model or images) + the owner kit's secret -> report + exit code.

    python verify.py secret=<run>/owner/secret.json suspect=<checkpoint> out=<dir>   # StealthMark
    python verify.py ... attack=prune attack.amount=0.3                               # robustness

The secret's ``method`` field picks the protocol (``utils/verification.PROTOCOLS``); each
writes ``<out>/report.json``, ``<out>/report.md`` and figures. Exit codes:

* 0 ownership verified, 1 not verified -- at the thresholds sealed in the owner kit;
* 2 bad input or any error: a Hydra config error (unknown key, bad override syntax), a missing
  ``secret=``/``suspect=``/``out=``, a bad file, an exception raised by the suspect, non-finite
  suspect outputs (the message names the file or field); nothing but the log is left in ``out=``;
* 3 exploratory: a decision threshold (α, τ, response margin, min_decoded) was changed from its
  sealed value -- the report carries a banner naming each one and is no verdict.

Reports and figures are written into a temporary sibling folder of ``out=`` and moved into it only
when the protocol reaches a verdict (0, 1 or 3). Secrets (payloads, keys) are never printed.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

import utils.resolvers  # noqa: F401  (registers ${len:...})
from datamodules.samples import DatasetError
from verification.adapters.base import CHECKPOINT_SUFFIXES, ONNX_SUFFIXES, TORCHSCRIPT_SUFFIXES
from verification.progress import set_quiet
from verification.suspect import SuspectError
from verification.protocols import (
    EXIT_BAD_INPUT,
    EXIT_EXPLORATORY,
    EXIT_NOT_VERIFIED,
    EXIT_VERIFIED,
    PROTOCOLS,
    BadInput,
    make_stage,
    publish_stage,
    run_protocol,
)
from medmark import CONFIG_DIR
from medmark.cli import hydra_argv
from medmark.help_text import MODE_SECTIONS
from utils.loggers import start_wandb_run
from verification.wandb_report import log_verification
from watermark.stealthmark.kit import OwnerKitError

log = logging.getLogger("medmark")

# Errors whose message already names the file or field at fault; anything else is reported with
# its type (and the suspect file, where one was given).
NAMED_ERRORS = (OwnerKitError, SuspectError, BadInput, DatasetError, FileNotFoundError)
VERDICT_CODES = (EXIT_VERIFIED, EXIT_NOT_VERIFIED, EXIT_EXPLORATORY)

# exit code of the task function, read by cli() after Hydra returns (Hydra itself exits 1 on
# its own errors -- the "not verified" code -- so its exits are mapped to 2 when no task ran)
_RESULT: dict[str, int] = {}


def verify(cfg: DictConfig) -> int:
    """Run the secret's protocol with staged output; returns the exit code (never raises)."""
    stage = None
    try:
        OmegaConf.resolve(cfg)
        set_quiet(bool(cfg.get("quiet")))
        if cfg.get("out"):
            stage = make_stage(cfg.out)
            with open_dict(cfg):
                cfg.stage_dir = str(stage)
        code = run_protocol(cfg)
        if code in VERDICT_CODES and stage is not None:
            publish_stage(stage, Path(cfg.out))
            log_verification(cfg, code, start_wandb_run)  # logger=wandb: run + report artifact (else nothing)
        elif code not in VERDICT_CODES:
            code = EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - any error is exit 2, never "not verified"
        message = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, NAMED_ERRORS) and cfg.get("suspect"):
            message += f" (while verifying suspect={cfg.get('suspect')})"
        log.error("%s", message)
        log.debug("traceback", exc_info=True)
        print(f"error: {message}", file=sys.stderr, flush=True)
        code = EXIT_BAD_INPUT
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    return code


# --help: what each verification module needs on the command line (a protocol missing here is still listed)
PROTOCOL_USAGE = {
    "verification.stealthmark": "suspect=<segmentation model> out=<dir>   (trigger response + QR payload by LIME)",
    "verification.xmark": "suspect=<classifier> out=<dir>   (paired margin test on clean/marked images)",
    "verification.medlocker": "mode=certificate|restore images=<folder> | mode=evaluate suspect=<classifier>",
}


def help_modes() -> list[str]:
    """The "Modes" section of ``--help``: the protocols of :data:`PROTOCOLS` and the suspect kinds."""
    by_module: dict[str, list[str]] = {}
    for method, module in PROTOCOLS.items():
        by_module.setdefault(module, []).append(method)
    width = max(len(", ".join(m)) for m in by_module.values())
    lines = ["Modes -- the owner kit's secret.json picks the protocol by its `method` field:"]
    lines += [f"  {', '.join(methods):<{width}}  {PROTOCOL_USAGE.get(module, module)}"
              for module, methods in by_module.items()]
    return lines + ["", "Suspects (suspect=):",
                    f"  checkpoint {'/'.join(CHECKPOINT_SUFFIXES)}, TorchScript {'/'.join(TORCHSCRIPT_SUFFIXES)}, "
                    f"ONNX {'/'.join(ONNX_SUFFIXES)}, an http(s):// endpoint (http.* settings);",
                    "  MedLocker: an image folder (images=) of protected images"]


MODE_SECTIONS["verify"] = help_modes


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="verify.yaml")
def main(cfg: DictConfig) -> None:
    _RESULT["code"] = verify(cfg)


def missing_out(argv: list[str]) -> bool:
    """True when the command line names no ``out=`` (Hydra's flags such as ``--help`` excepted).

    Checked before Hydra starts: without ``out=`` its run folder cannot be resolved either.
    """
    if any(arg.startswith("-") for arg in argv):
        return False
    return not any(arg.lstrip("+").split("=", 1)[0] == "out" and arg.split("=", 1)[1:] not in ([""], ["null"])
                   for arg in argv if "=" in arg)


def quiet_flag(argv: list[str]) -> list[str]:
    """``--quiet`` (no progress bars) -> the override ``quiet=true``; other arguments unchanged."""
    if "--quiet" not in argv:
        return argv
    return [arg for arg in argv if arg != "--quiet"] + ["quiet=true"]


def cli(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``python verify.py ...`` / ``medmark verify ...``: the exit code (Hydra's own errors -> 2;
    ``--help``/``--cfg`` -> 0). ``argv=None``: ``sys.argv[1:]``."""
    argv = quiet_flag(list(sys.argv[1:] if argv is None else argv))
    if missing_out(argv):
        print("error: out= is required: the report folder (e.g. out=reports/suspect1); exit code 2",
              file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    try:
        with hydra_argv(prog, argv):
            main()
    except SystemExit as exc:
        if "code" in _RESULT:
            return _RESULT["code"]
        if exc.code in (0, None):
            return 0
        print("error: the command line or configuration is invalid (Hydra's message above names the key); "
              "exit code 2", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - e.g. HYDRA_FULL_ERROR=1 lets Hydra's errors through
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return _RESULT.get("code", 0)


if __name__ == "__main__":
    sys.exit(cli())
