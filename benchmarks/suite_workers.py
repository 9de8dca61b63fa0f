"""Wall time of the test suite serially and on pytest-xdist workers (as ``make test`` runs it), one run; prints JSON.

    python benchmarks/suite_workers.py                        # the whole suite, twice: ≈ 45 min on a 2-core CPU
    python benchmarks/suite_workers.py tests/test_xmark.py    # a part (any pytest arguments)
    python benchmarks/suite_workers.py --workers 4 tests/verification

Both runs use the same pytest arguments, the same checkout and this interpreter, one after the other:
serial (``-n 0``) first, then ``-n <workers> --dist loadfile`` (``make test``'s setting: a file's tests
on one worker, so its module fixtures are built once; tests/conftest.py gives each worker its share of
torch threads). ``speedup`` = serial wall seconds ÷ parallel wall seconds (> 1: the workers are faster).
Each run's pytest output goes to ``<out>/serial.log`` / ``<out>/parallel.log``; the JSON holds both
runs' wall time, exit code and pytest's summary line. The machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.hardware import cpu_capability  # noqa: E402

SUMMARY = re.compile(r"^=*\s*(\d+ (passed|failed|error).*) in [\d.]+s")


def run_pytest(pytest_args: list[str], log: Path) -> dict:
    """One pytest run from the checkout's root: ``{"seconds", "returncode", "summary"}``; output to ``log``."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("OMP_NUM_THREADS", None)  # each run decides its own threads (conftest.py for the workers)
    started = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
                              cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    summary = [m.group(1) for line in log.read_text().splitlines() if (m := SUMMARY.match(line.strip()))]
    return {"seconds": round(seconds, 1), "returncode": proc.returncode, "summary": summary[-1] if summary else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="logical", help="pytest-xdist -n of the parallel run (make test: logical)")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "bench" / "suite_workers")
    args, pytest_args = parser.parse_known_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"serial run, pytest {' '.join(pytest_args) or '(whole suite)'} ...", file=sys.stderr, flush=True)
    serial = run_pytest(["-n", "0", *pytest_args], args.out / "serial.log")
    print(f"serial {serial['seconds']} s; parallel run (-n {args.workers}) ...", file=sys.stderr, flush=True)
    parallel = run_pytest(["-n", str(args.workers), "--dist", "loadfile", *pytest_args], args.out / "parallel.log")
    result = {
        "benchmark": "suite_workers", "pytest_args": pytest_args, "workers": args.workers,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(), "cpu_capability": cpu_capability(),
        "serial": serial, "parallel": parallel,
        "speedup": round(serial["seconds"] / parallel["seconds"], 3) if parallel["seconds"] else None,
    }
    print(json.dumps(result, indent=2))
    return 0 if serial["returncode"] == parallel["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
