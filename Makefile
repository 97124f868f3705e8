# One command each on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs the project into it first: the CPU torch 2.13 wheel, then the
# project with every extra the suite and the demo use, at the exact versions in constraints.txt
# (what CI last tested), so every fresh machine resolves to the same set.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo demo-full test bench constraints

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -c constraints.txt -e ".[test,enformer]"
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m cli.demo

demo-full: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m cli.demo --full

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_build.py

# After a deliberate upgrade: re-resolve from pyproject's ranges in a scratch venv and pin the result.
constraints:
	rm -rf .venv-constraints && $(PY) -m venv .venv-constraints
	.venv-constraints/bin/pip install -q --upgrade pip
	.venv-constraints/bin/pip install -q "torch==2.13.0"
	.venv-constraints/bin/pip install -q -e ".[test,enformer]"
	.venv-constraints/bin/pip freeze --exclude-editable | sed 's/+cpu$$//' > constraints.txt
	rm -rf .venv-constraints
