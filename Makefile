# ext-authz developer commands. `make test` builds the environment from nothing and runs every check.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: test lint typecheck unit protos venv run bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP) lint typecheck unit

lint: $(STAMP)
	$(VENV)/bin/ruff check ext_authz tests
	$(VENV)/bin/ruff format --check ext_authz tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest

# Benchmarks: ratios measured in one run (never part of `make test`).
bench: $(STAMP)
	$(PY) -m tests.bench.bench_rules

# Regenerates ext_authz/_proto from protos/ (a test checks the committed files match).
protos: $(STAMP)
	$(PY) protos/generate.py .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
