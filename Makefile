# medmark: `make demo` and `make test` set everything up on a fresh machine with
# Python 3.11 and pip (a .venv is created from the pinned requirements.txt and reused).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell $(PYTHON) -c "import hashlib;print(hashlib.sha256(open('requirements.txt','rb').read()).hexdigest()[:12])")
STAMP := $(VENV)/.requirements-$(REQ_HASH)
PYTEST_ARGS ?=

.PHONY: venv demo demo-stealthmark test bench clean-venv

$(STAMP): requirements.txt
	@$(PYTHON) -c "import sys; assert sys.version_info[:2] >= (3, 11), 'Python 3.11+ required, found ' + sys.version"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@rm -f $(VENV)/.requirements-*
	@touch $@

venv: $(STAMP)

# The main job on built-in synthetic data (generated on first use under data/).
demo: venv
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) train.py experiment=task_seg_synthetic logger=csv

# StealthMark story: train a clean and a watermarked UNet, verify both, print verdicts and Dice
# (see docs/stealthmark.md §4 for what the CPU budget reaches).
demo-stealthmark: venv
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m utils.demo_stealthmark --out logs/demo_stealthmark

test: venv
	WANDB_MODE=disabled $(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
