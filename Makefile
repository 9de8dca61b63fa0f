# medmark: `make demo` and `make test` set everything up on a fresh machine with
# Python 3.11 and pip (a .venv is created from the pinned requirements.txt and reused; the package
# is installed into it in editable mode, giving .venv/bin/medmark -- docs/quickstart.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell $(PYTHON) -c "import hashlib;print(hashlib.sha256(open('requirements.txt','rb').read()).hexdigest()[:12])")
STAMP := $(VENV)/.requirements-$(REQ_HASH)
# The medmark package itself (editable: the `medmark` command runs this checkout), re-installed
# when pyproject.toml changes; its dependencies come from the pinned requirements.txt above.
PKG_HASH := $(shell $(PYTHON) -c "import hashlib;print(hashlib.sha256(open('pyproject.toml','rb').read()).hexdigest()[:12])")
PKG_STAMP := $(VENV)/.package-$(PKG_HASH)
PYTEST_ARGS ?=
# Hydra overrides for both training runs of `make demo` / `make demo-full`, e.g.
# DEMO_OVERRIDES=trainer.precision=bf16-mixed on a CPU with bf16 units (AVX512-BF16/AMX; without them bf16 is
# emulated and 14.7x slower: train.py warns; docs/stealthmark.md §4).
DEMO_OVERRIDES ?=

.PHONY: venv demo demo-full demo-task test bench clean-venv

$(STAMP): requirements.txt
	@$(PYTHON) -c "import sys; assert sys.version_info[:2] >= (3, 11), 'Python 3.11+ required, found ' + sys.version"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@rm -f $(VENV)/.requirements-*
	@touch $@

# --no-build-isolation: build with the venv's setuptools (nothing fetched; works offline).
$(PKG_STAMP): $(STAMP) pyproject.toml
	@$(PY) -c "import setuptools" 2>/dev/null || $(PY) -m pip install --quiet "setuptools>=64"
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.package-*
	@touch $@

venv: $(STAMP) $(PKG_STAMP)

# The main job: the StealthMark story on built-in synthetic polyps (generated on first use under
# data/): train a clean UNet, watermark it, verify both (10 LIME images x 400 samples each), print both
# verdicts and the Dice of each.
# 11 min 40 s on an idle 2-core CPU with .venv present, 24 min 35 s on a slower AVX2-only one (both timed with
# 3 LIME images x 1500 samples, 12 % more queries; docs/stealthmark.md §4: what this budget reaches; make demo-full for the rest).
demo: venv
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m utils.demo_stealthmark --out logs/demo $(DEMO_OVERRIDES)

# The same story at the budget that meets every StealthMark acceptance figure (160 marking epochs =
# 2880 steps, 10 LIME images per suspect; 60 min 50 s on an idle 2-core CPU, 41 min 52 s with
# DEMO_OVERRIDES=trainer.precision=bf16-mixed on one with bf16 units; docs/stealthmark.md §4).
demo-full: venv
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m utils.demo_stealthmark --out logs/demo_full --mark-epochs 160 --lime-images 10 --lime-samples 1500 $(DEMO_OVERRIDES)

# Plain segmentation training only (UNet on synthetic polyps, 3 CPU-minutes, docs/quickstart.md): the foundation's demo.
demo-task: venv
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) train.py experiment=task_seg_synthetic logger=csv

# The suite runs on one pytest-xdist worker per CPU (tests/conftest.py gives each worker its share of torch
# threads); --dist loadfile keeps a test file on one worker, so a module's fixtures (tiny trained models)
# are built once. On a 2-core CPU: 16 min 39 s instead of 29 min 47 s serially (PYTEST_WORKERS=0), 1.79x,
# measured side by side by benchmarks/suite_workers.py.
PYTEST_WORKERS ?= logical
test: venv
	WANDB_MODE=disabled $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# benchmarks that need a protection / training run's files (secret=, suspect=): listed, not run
BENCH_NEEDS_ARGS := false_positives robustness
# benchmarks too long for make bench: listed, not run (suite_workers runs the whole test suite twice, ≈ 45 min)
BENCH_LONG := suite_workers

bench: venv
	@for b in benchmarks/[!_]*.py; do n=$$(basename $$b .py); case " $(BENCH_NEEDS_ARGS) $(BENCH_LONG) " in *" $$n "*) continue;; esac; \
		echo "== $$b"; $(PY) $$b || exit 1; done
	@echo "== not run, they need arguments (see each file's docstring):"; \
		for n in $(BENCH_NEEDS_ARGS); do echo "   $(PY) benchmarks/$$n.py secret=... [suspect=...]"; done
	@echo "== not run, too long (see each file's docstring):"; \
		for n in $(BENCH_LONG); do echo "   $(PY) benchmarks/$$n.py [pytest arguments]"; done

clean-venv:
	rm -rf $(VENV)
