# The README's two commands: `make run` and `make test`. Everything else is a helper of theirs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# checkov pins its own dependency tree, so it lives in a virtualenv of its own.
IAC_VENV := .venv-iac
IAC_STAMP := $(IAC_VENV)/.installed
APT_PACKAGES := chromium libgl1 libglib2.0-0
MODELS_DIR ?= models

.PHONY: run test lint typecheck unit iac system-deps node-deps test-weights weights bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(IAC_STAMP): requirements-iac.txt
	test -x $(IAC_VENV)/bin/python || $(PYTHON) -m venv $(IAC_VENV)
	$(IAC_VENV)/bin/pip install --disable-pip-version-check -r requirements-iac.txt
	touch $@

## Set up, fetch the cutout weights if absent (not the diffusion pipelines: `make weights`), and serve on
## http://127.0.0.1:8080 with the local result store (CPU or GPU, no cloud credentials). Offline, the fetch
## says in one line how to get test weights, and the service starts anyway with what works without them.
## A failed fetch (the leading `-`) never stops the server from starting.
run: $(STAMP)
	-@$(BIN)/python scripts/fetch_weights.py "$${CUTOUT_MODELS_DIR:-$(MODELS_DIR)}" --cutout-only --if-missing --offline-ok
	$(BIN)/python -m service

## Set up and run every check: lint, types, infrastructure checks, and the whole test suite.
test: $(STAMP) $(IAC_STAMP) system-deps node-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	scripts/check_iac.sh
	$(BIN)/pytest

iac: $(STAMP) $(IAC_STAMP) node-deps
	scripts/check_iac.sh

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m "not browser"

# System packages the tests use (a real Chromium for the storefront tests; libGL for OpenCV).
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo=sudo; \
	  else echo "install these system packages first: sudo apt-get install$$missing" >&2; exit 1; fi; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
	fi

node-deps: node_modules/.installed

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

## Random weights in the production layout, for offline development and benchmarks.
test-weights: $(STAMP)
	$(BIN)/python scripts/make_test_weights.py $(MODELS_DIR)

## The production weights (needs the network; what the image build runs).
weights: $(STAMP)
	$(BIN)/python scripts/fetch_weights.py $(MODELS_DIR)

bench: $(STAMP)
	$(BIN)/python scripts/bench_effects.py

clean:
	rm -rf $(VENV) $(IAC_VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
