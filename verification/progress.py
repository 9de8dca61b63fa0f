"""What a verification says while it runs: numbered stage lines with timings, and progress bars.

Stage lines go through the ``medmark`` logger at INFO, so Hydra prints them on the console and
writes them to the run's log file (``<out>/verify.log``)::

    [1/5] load suspect (checkpoint, 20 images, attack none) ... 0.4 s
    [2/5] null model (10000 random QR codes) ... 0.1 s
    [3/5] response test (20 images) ... 1.2 s
    [4/5] LIME: 7/10 decoded ... 61.0 s
    [5/5] report ... 0.9 s

Progress bars (tqdm, on stderr) run over suspect queries, LIME images, attack epochs and
protected images. They are drawn only when stderr is a terminal and the run is not quiet
(``quiet=true`` in configs/verify.yaml, or ``--quiet`` on the command line); in a log file or a
pipe nothing but the stage lines appears. Callers never put secrets (payloads, keys, seeds) in a
stage name or detail.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

log = logging.getLogger("medmark")

T = TypeVar("T")

_SETTINGS = {"quiet": False}  # set once per run by set_quiet() (verify.py: cfg.quiet)


def set_quiet(quiet: bool) -> None:
    """``quiet=True``: no progress bars for the rest of this process (stage lines still logged)."""
    _SETTINGS["quiet"] = bool(quiet)


def bars_enabled() -> bool:
    """Draw bars? Only on an interactive stderr and when not quiet."""
    isatty = getattr(sys.stderr, "isatty", None)
    return not _SETTINGS["quiet"] and bool(isatty and isatty())


def progress(iterable: Iterable[T] | None = None, total: int | None = None, desc: str = "",
             unit: str = "it") -> Any:
    """A tqdm bar over ``iterable`` (or a manual bar with ``update(n)`` when ``iterable`` is None).

    Disabled (a silent pass-through) when :func:`bars_enabled` is false; the bar is removed when
    done (``leave=False``): the stage line that follows says what happened.
    """
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr,
                disable=not bars_enabled(), dynamic_ncols=True)


class Stage:
    """One running stage; set ``detail`` to add a result to its line (e.g. ``"7/10 decoded"``)."""

    def __init__(self, name: str):
        self.name = name
        self.detail = ""


class Stages:
    """Numbered stages of one run: ``with stages("load suspect"): ...`` logs
    ``[i/n] load suspect ... 0.4 s`` when the block ends (``... failed after 0.4 s`` on an error).

    Args:
        total: the number of stages announced (``n`` of ``[i/n]``).
        logger: where the lines go (default the ``medmark`` logger, INFO).
    """

    def __init__(self, total: int, logger: logging.Logger = log):
        self.total = int(total)
        self.index = 0
        self.logger = logger

    def _line(self, name: str, detail: str, seconds: float, failed: bool = False) -> None:
        self.index += 1
        text = f"{name}: {detail}" if detail else name
        if failed:
            self.logger.info("[%d/%d] %s ... failed after %.1f s", self.index, self.total, text, seconds)
        else:
            self.logger.info("[%d/%d] %s ... %.1f s", self.index, self.total, text, seconds)

    @contextmanager
    def __call__(self, name: str) -> Iterator[Stage]:
        stage = Stage(name)
        started = time.perf_counter()
        try:
            yield stage
        except BaseException:
            self._line(stage.name, stage.detail, time.perf_counter() - started, failed=True)
            raise
        self._line(stage.name, stage.detail, time.perf_counter() - started)

    def record(self, name: str, seconds: float, detail: str = "") -> None:
        """Log a stage that was timed elsewhere (e.g. inside a framework-free core function)."""
        self._line(name, detail, float(seconds))


class QueryBar:
    """Wrap a suspect's ``predict`` so that a bar counts the images sent: ``QueryBar(predict, total)``.

    ``predict``: ``images B×C×H×W -> answers`` (passed through unchanged). Use as a context
    manager so the bar is closed; ``total`` may be an estimate (None: no percentage).
    """

    def __init__(self, predict: Callable[[Any], Any], total: int | None, desc: str = "suspect queries"):
        self.predict = predict
        self.bar = progress(total=total, desc=desc, unit="img")

    def __call__(self, images: Any) -> Any:
        answer = self.predict(images)
        self.bar.update(len(images))
        return answer

    def __enter__(self) -> "QueryBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
