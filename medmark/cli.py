"""The ``medmark`` command: one entry point for the three jobs, each a Hydra app on ``configs/``.

    medmark train experiment=task_seg_synthetic trainer.max_epochs=1      # = python train.py ...
    medmark verify secret=<kit>/secret.json suspect=<ckpt> out=<dir>      # = python verify.py ...
    medmark evaluate experiment=task_seg_synthetic ckpt_path=<ckpt>       # = python eval.py ...

Everything after the command is passed to Hydra unchanged (overrides, ``-m``, ``--cfg job``,
``--help``). Exit codes are the scripts' own: 0 done; 2 bad input -- including a Hydra config
error (unknown key, bad override, missing option) -- with a message naming the file or key;
``verify`` also 1 (not verified) and 3 (exploratory). Relative paths (``data/``, ``logs/``,
``weights/``) resolve against the current working directory (``configs/paths/default.yaml``;
``MEDMARK_ROOT`` / ``MEDMARK_DATA_DIR`` / ``MEDMARK_WEIGHTS_DIR`` move them).
"""

from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple, Sequence

import medmark.help_text  # noqa: F401,E402  (registers ${medmark_help:...}: --help of every command)

EXIT_BAD_INPUT = 2


class Command(NamedTuple):
    module: str  # the entry module (top-level, next to configs/); it defines cli(argv, prog) -> int
    summary: str


COMMANDS: dict[str, Command] = {
    "train": Command("train", "train an objective (task, StealthMark, X-Mark, MIAD-Mark, MedLocker) from configs/train.yaml"),
    "verify": Command("verify", "verify ownership of a suspect with an owner kit (exit 0 verified, 1 not, 2 bad input, 3 exploratory)"),
    "evaluate": Command("eval", "run a checkpoint on a data split: summary.json + figures, no training (configs/eval.yaml)"),
}

USAGE = "usage: medmark {train,verify,evaluate} [hydra overrides ...]   (medmark <command> --help: its modes, exit codes, overrides, examples)"


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "Paths (data/, logs/, weights/) are relative to the current directory; see docs/quickstart.md."]
    return "\n".join(lines)


@contextmanager
def hydra_argv(prog: str | None, argv: Sequence[str] | None) -> Iterator[None]:
    """Let a ``@hydra.main`` function (it reads ``sys.argv``) see ``[prog, *argv]``; restored after.

    ``argv=None`` leaves ``sys.argv`` as it is (``python train.py ...``).
    """
    if argv is None:
        yield
        return
    saved = sys.argv
    sys.argv = [prog or saved[0], *argv]
    try:
        yield
    finally:
        sys.argv = saved


def run_hydra_main(main: Callable[[], object], argv: Sequence[str] | None = None, prog: str | None = None,
                   task_ran: Callable[[], bool] = lambda: False) -> int:
    """Run a ``@hydra.main`` function on ``argv`` and return the process exit code.

    * the task returned: 0; the task called ``sys.exit(code)``: ``code``;
    * Hydra stopped before the task ran (its own errors exit 1, which is no verdict here): 2;
    * ``--help`` / ``--cfg`` / ``--info``: 0;
    * an error after the task ran (an uncaught exception, a failed multirun job): Hydra's code (1).

    Args:
        task_ran: says whether the task function was entered (set by the entry module).
    """
    try:
        with hydra_argv(prog, argv):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code == 0 or task_ran():
            return code
        print("error: the command line or configuration is invalid (Hydra's message above names the key); "
              "exit code 2", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except Exception as exc:  # HYDRA_FULL_ERROR=1 lets Hydra's own errors through as exceptions
        if task_ran():
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``medmark <command> [overrides]``: the command's exit code (2 for an unknown command)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(usage(), file=sys.stderr)
        return EXIT_BAD_INPUT
    if args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] in ("-V", "--version"):
        from medmark import __version__

        print(f"medmark {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    entry = importlib.import_module(COMMANDS[name].module)
    return int(entry.cli(rest, prog=f"medmark {name}"))


if __name__ == "__main__":
    sys.exit(main())
