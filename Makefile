# One command each on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project into it first (CPU torch 2.13 wheel).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m cli.demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_build.py
