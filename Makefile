# Two entry points for a fresh machine: `make run` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test lint typecheck unit system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# compat mode: a plain path entry instead of an import hook, which would add ~25 ms to
	# every larder-rustc start (the shim runs once per rustc call).
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

# Serve the embedded default: disk storage in ./larder-data, cache `main`.
run: $(STAMP)
	$(VENV)/bin/larder serve

system-deps:
	bash tools/install-system-deps.sh

lint: $(STAMP)
	$(PY) -m ruff check larder tests tools bench fuzz
	$(PY) -m ruff format --check larder tests tools bench fuzz

typecheck: $(STAMP)
	$(PY) -m mypy

# Everything: lint, types, unit, storage contract (incl. moto S3), real-Nix end-to-end.
test: $(STAMP) system-deps lint typecheck
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -n auto $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
