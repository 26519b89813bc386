# Set-up and everyday commands. `make sweep` and `make test` create .venv on first use.
#
# TORCH_SPEC pins the CPU build of torch for laptops and CI; on a GPU box run
#   make TORCH_SPEC='torch>=2.4' sweep
# (or keep the CUDA build you already have in the environment).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: venv browser-deps sweep smoke test lint format clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

sweep: venv
	$(BIN)/python tune/lr_sweep.py

smoke: venv
	$(BIN)/python tune/lr_sweep.py --smoke-test

# The MLflow UI test drives Debian's chromium with playwright-core (installed here, no download
# of a browser); the script does nothing when both are already there.
browser-deps:
	scripts/install_browser_deps.sh

test: venv browser-deps
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) data runs mlflow.db
