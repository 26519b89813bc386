# Set-up and everyday commands. `make sweep` and `make test` create .venv on first use, with
# the exact versions of requirements/lock.txt (regenerate it with `make lock`).
#
# TORCH_SPEC is the torch of requirements/torch.txt, whose CPU build laptops and CI get; on a
# GPU box keep a CUDA build instead, e.g.
#   make TORCH_SPEC='torch>=2.4' sweep
PYTHON ?= python3
VENV ?= .venv
LOCK := requirements/lock.txt
TORCH_SPEC ?= -r requirements/torch.txt
BIN := $(VENV)/bin

.PHONY: venv check-python browser-deps sweep smoke gpu-check test lint format lock clean

# Debian and Ubuntu ship `python3 -m venv` without ensurepip (package python3-venv): say so
# plainly instead of leaving a half-made .venv behind.
check-python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { \
	    echo "make: $(PYTHON) is missing or older than Python 3.10; set PYTHON=/path/to/python3.10+" >&2; \
	    exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	    echo "make: '$(PYTHON) -m venv' cannot make a virtual environment here (no ensurepip):" \
	        "install the venv module, e.g. 'apt-get install python3-venv' on Debian/Ubuntu" >&2; \
	    exit 1; }

$(BIN)/.installed: pyproject.toml $(LOCK) requirements/torch.txt
	@$(MAKE) --no-print-directory check-python
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(LOCK) $(TORCH_SPEC)
	$(BIN)/pip install -q -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check
	touch $@

venv: $(BIN)/.installed

sweep: venv
	$(BIN)/python tune/lr_sweep.py

smoke: venv
	$(BIN)/python tune/lr_sweep.py --smoke-test

# On a CUDA machine: throughput, bf16 vs fp32, the table and a 16-trial search at four trials
# per GPU, in under 8 minutes (benchmarks/gpu_check.py says how). With no venv it runs the
# Python on PATH (a GPU box with a CUDA torch); `make gpu-check GPU_CHECK_ARGS='--device cpu
# --quick'` runs it at toy size on the CPU.
GPU_CHECK_ARGS ?=
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# The MLflow UI browser test drives Debian's chromium (or $$CHROMIUM_PATH) with playwright-core
# under Node.js 20+. `make test` tries to install them and runs every test either way: without
# them the browser test is skipped with the reason (and fails instead under CI=true).
browser-deps:
	scripts/install_browser_deps.sh

test: venv
	@scripts/install_browser_deps.sh || \
	    echo "make test: browser test dependencies missing (see above); that test will be skipped"
	$(BIN)/python -m pytest

# ruff, then the layer contracts of pyproject.toml's [tool.importlinter] (lint-imports).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-logo

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Re-resolve the ranges of pyproject.toml into requirements/lock.txt and derive
# cluster/constraints.txt from it (scripts/lock.py).
lock: venv
	$(BIN)/python scripts/lock.py

clean:
	rm -rf $(VENV) data runs mlflow.db
