# Two entry points for a fresh machine: `make run` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# The oldest allowed runtime dependencies (constraints-lowest.txt) and what runs against them.
LOWEST_VENV  ?= .venv-lowest
LOWEST_STAMP := $(LOWEST_VENV)/.installed
# Everything but the end-to-end tests: about a minute and a half on two cores.
LOWEST_TESTS ?= tests/protocol tests/storage tests/service tests/core tests/client
TEST_RUNNER  := pytest pytest-aiohttp pytest-asyncio pytest-xdist pytest-timeout 'moto[server]' hypothesis

.PHONY: run test test-lowest lint typecheck system-deps clean

# Exact versions from constraints.txt: what CI tested is what a fresh machine gets.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

$(LOWEST_STAMP): pyproject.toml constraints-lowest.txt
	rm -rf $(LOWEST_VENV)
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install -q -c constraints-lowest.txt \
		-e . $(TEST_RUNNER)
	touch $@

# The lower bounds in pyproject.toml are true: the fast tests pass on the oldest releases.
test-lowest: $(LOWEST_STAMP)
	PATH="$(CURDIR)/$(LOWEST_VENV)/bin:$$PATH" $(LOWEST_VENV)/bin/python -m pytest -n auto \
		-p no:cacheprovider -q $(LOWEST_TESTS)

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
	$(PY) -m mypy bench

# Everything: lint, types, the fast tests on the oldest allowed dependencies, then unit, storage
# contract (incl. moto S3), real-Nix end-to-end.
test: $(STAMP) system-deps lint typecheck test-lowest
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -n auto $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(LOWEST_VENV) .pytest_cache .mypy_cache .ruff_cache
