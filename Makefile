# StealGuard: setup | test | bench | archive | serve | monitor | stop | reliability. Run from the repository root.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.stealguard-requirements
# fonts-*: the handwriting query set (mlflow_project/lab/handwriting.py, the offline EMNIST stand-in)
FONT_DEBS := fonts-bwht fonts-dkg-handwriting fonts-breip fonts-femkeklaver fonts-klee fonts-rufscript
DEBS := prometheus dataset-fashion-mnist redis-server $(FONT_DEBS)
# Two pytest workers (pytest-xdist), one test file each at a time (--dist loadfile keeps a module's fixtures, e.g.
# its TorchServe, in one worker): most of the suite waits on servers and subprocesses, so two share the 2 cores
# well. PYTEST_ARGS= (empty) runs it in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: help setup debs test test-fast lint bench demo

help:
	@echo "make setup   create .venv, install pinned packages and the Debian packages the tests need"
	@echo "make demo    setup, then victim -> OOD sweep -> register/promote -> archives (+ monitor) -> TorchServe + Prometheus -> thief + benign clients (DEMO_ARGS)"
	@echo "make test    setup, then ruff and the whole test suite (what CI runs)"
	@echo "make test-fast  unit + handler tests only: no TorchServe, MLflow or Prometheus server (under 2 min)"
	@echo "make bench   run the benchmarks in bench/ and print their ratios"
	@echo "make archive build model_store/\$$(ARCHIVE_NAME).mar (ARCHIVE_VICTIM, ARCHIVE_DEFENSE, ARCHIVE_ARGS)"
	@echo "make serve   start TorchServe on 127.0.0.1 with model_store/*.mar (TS_CONFIG)"
	@echo "make stop    stop TorchServe and Prometheus (those started by make serve / make monitor)"
	@echo "make monitor start Prometheus on 127.0.0.1:9090 with deploy/alerts.yml (make monitor-stop)"
	@echo "make reliability  60 s load, worker kill, lab averaging attack; figures into RELIABILITY.md"

setup: $(STAMP) debs

# torch first, from the pinned CPU wheel (an unpinned torch would pull a multi-GB CUDA build), then the rest
# (requirements/dev.txt: serve + lab + dev), then the project itself, editable, built with the pinned setuptools
# (no build isolation: nothing is fetched to build it).
REQUIREMENTS := requirements.txt $(wildcard requirements/*.txt) pyproject.toml

$(STAMP): $(REQUIREMENTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "$$(grep -E '^torch==' requirements/serve.txt)"
	$(PIP) install --quiet -r requirements/dev.txt
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PY) -c "import torch; assert not torch.version.cuda, 'a CUDA build of torch was installed'; print('torch', torch.__version__)"
	@touch $@

debs:
	@missing=""; \
	command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	test -d /usr/share/datasets/fashion-mnist || missing="$$missing dataset-fashion-mnist"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	for pkg in $(FONT_DEBS); do \
		dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$pkg"; \
	done; \
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

# The inner loop: plugins and the handler called in-process (tests/unit, tests/handler); no server is started.
test-fast: setup
	$(PY) -m pytest tests/unit tests/handler -m "not integration" $(PYTEST_ARGS)

# --- the newcomer's demo (issue 9): see mlflow_project/ops/demo.py (--help for ports, budgets, store, ...).
# Leaves TorchServe and Prometheus running (pid files in .run/, as make serve / make monitor): `make stop`.
DEMO_ARGS ?=

demo: setup
	$(PY) -m mlflow_project.ops.demo $(DEMO_ARGS)

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# --- serving (issue 6): archives in model_store/, TorchServe on loopback, started and stopped by
# mlflow_project/ops/torchserve.py. The resolved config, pid file, logs, TMPDIR (worker sockets) and
# key_file.json (token auth) live in the git-ignored .run/serve/.
# Per-client extraction monitor: ARCHIVE_ARGS='--monitor deploy/monitor.yaml' (a monitor: section; see
# docs/configuration.md). Its default store is the embedded SQLite file /var/tmp/stealguard/monitor.sqlite,
# shared by every worker on this host; for several replicas point it at one Redis: store: redis://HOST:6379/0.
ARCHIVE_NAME ?= fashion_mnist_mad_argmax
ARCHIVE_VICTIM ?= artifacts/victims/fashion_mnist_lenet
ARCHIVE_DEFENSE ?= {"name": "mad_argmax", "epsilon": 0.5, "norm": "l1", "jacobian": "last_layer"}
ARCHIVE_ARGS ?=
TS_CONFIG ?= deploy/config.properties
MODEL_STORE ?= model_store
SERVE_DIR := .run/serve
SERVE_PID := $(SERVE_DIR)/torchserve.pid

.PHONY: archive serve stop

archive: $(STAMP)
	$(PY) -m mlflow_project.lifecycle.package --name $(ARCHIVE_NAME) --victim $(ARCHIVE_VICTIM) \
		--defense '$(ARCHIVE_DEFENSE)' --export-path $(MODEL_STORE) $(ARCHIVE_ARGS)

serve: $(STAMP)
	@ls $(MODEL_STORE)/*.mar >/dev/null 2>&1 || { echo "no archives in $(MODEL_STORE)/: run make archive first"; exit 1; }
	@$(PY) -m mlflow_project.ops.torchserve start --config $(TS_CONFIG) --model-store $(MODEL_STORE) \
		--workdir $(SERVE_DIR) --pid-file $(SERVE_PID) --timeout 120 --stop-command "make stop"

# `make stop` stops TorchServe and, when `make monitor` started it, Prometheus.
stop: monitor-stop
	@$(PY) -m mlflow_project.ops.torchserve stop --pid-file $(SERVE_PID)

# --- monitoring (issue 8): Prometheus on 127.0.0.1:9090 scraping the local TorchServe (127.0.0.1:8082) and
# loading deploy/alerts.yml. Data, log and pid file live in the git-ignored .run/.
MONITOR_DIR := .run/prometheus
MONITOR_PID := .run/prometheus.pid
MONITOR_ADDR ?= 127.0.0.1:9090

.PHONY: monitor monitor-stop

monitor: debs $(STAMP)
	@promtool check config deploy/prometheus.yml >/dev/null || exit 1
	@$(PY) -m mlflow_project.ops.prometheus start --config deploy/prometheus.yml --workdir $(MONITOR_DIR) \
		--pid-file $(MONITOR_PID) --listen $(MONITOR_ADDR) --stop-command "make stop"

monitor-stop:
	@$(PY) -m mlflow_project.ops.prometheus stop --pid-file $(MONITOR_PID)

# --- reliability (issue 10): a defended archive with 2 workers under 16 clients for 60 s, a worker SIGKILLed
# mid-load, and the lab's averaging attack (trains the Fashion-MNIST victim first if it is not there yet).
# Prints the figures and writes them into RELIABILITY.md (between its reliability:begin/end markers).
RELIABILITY_VICTIM ?= artifacts/victims/fashion_mnist_lenet
RELIABILITY_ARGS ?= --seconds 60 --clients 16 --workers 2 --kill-seconds 30

.PHONY: reliability

reliability: setup
	@test -f $(RELIABILITY_VICTIM)/state_dict.pt || $(PY) -m mlflow_project.lab.train_victim --dataset fashion_mnist \
		--arch lenet --output-dir $(RELIABILITY_VICTIM) --no-progress
	$(PY) bench/reliability.py $(RELIABILITY_ARGS) --averaging --victim $(RELIABILITY_VICTIM) \
		--markdown RELIABILITY.md --json .run/reliability.json
