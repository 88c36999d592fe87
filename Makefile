# StealGuard: setup | test | bench (more targets land with their issues). Run from the repository root.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.stealguard-requirements
DEBS := prometheus dataset-fashion-mnist
PYTEST_ARGS ?=

.PHONY: help setup debs test lint bench

help:
	@echo "make setup   create .venv, install pinned packages and the Debian packages the tests need"
	@echo "make test    setup, then ruff and the whole test suite (what CI runs)"
	@echo "make bench   run the benchmarks in bench/ and print their ratios"

setup: $(STAMP) debs

# torch first, from the pinned CPU wheel (an unpinned torch would pull a multi-GB CUDA build), then the rest.
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "$$(grep -E '^torch==' requirements.txt)"
	$(PIP) install --quiet -r requirements.txt
	$(PY) -c "import torch; assert not torch.version.cuda, 'a CUDA build of torch was installed'; print('torch', torch.__version__)"
	@touch $@

debs:
	@missing=""; \
	command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	test -d /usr/share/datasets/fashion-mnist || missing="$$missing dataset-fashion-mnist"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else \
		echo "missing Debian packages:$$missing"; \
		echo "install them with: sudo apt-get install --no-install-recommends$$missing"; \
		exit 1; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done
