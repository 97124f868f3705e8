# One command each on a fresh machine: `make demo` and `make test`.
# Each creates its venv and installs the project into it first (CPU torch 2.13 wheel).
#   .venv      the core on the newest transformers 5.x (no Enformer): `make test`
#   .venv-tf4  the core plus the `enformer` extra, whose enformer-pytorch pins transformers 4.56.2:
#              `make test-tf4`, and `make demo` (its DNA encoder is Enformer)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
VENV_TF4 := .venv-tf4
BIN_TF4 := $(VENV_TF4)/bin

.PHONY: install install-tf4 demo test test-tf4 bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q --upgrade -e ".[test]" "transformers>=5,<6"
	@# a .venv made before Enformer became an extra still holds enformer-pytorch (pinned to transformers 4.56)
	$(BIN)/pip uninstall -q -y enformer-pytorch 2>/dev/null || true
	touch $@

$(BIN_TF4)/python:
	$(PY) -m venv $(VENV_TF4)
	$(BIN_TF4)/pip install -q --upgrade pip

$(VENV_TF4)/.installed: pyproject.toml | $(BIN_TF4)/python
	$(BIN_TF4)/pip install -q "torch==2.13.0"
	$(BIN_TF4)/pip install -q -e ".[test,enformer]"
	touch $@

install: $(VENV)/.installed

install-tf4: $(VENV_TF4)/.installed

demo: install-tf4
	HF_HUB_OFFLINE=1 $(BIN_TF4)/python -m cli.demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-tf4: install-tf4
	HF_HUB_OFFLINE=1 $(BIN_TF4)/python -m pytest -q -m "not slow and not gpu and not storage"

bench: install-tf4
	HF_HUB_OFFLINE=1 $(BIN_TF4)/python benchmarks/bench_build.py
