# vmfleet — the two commands a newcomer runs are `make demo` and `make test`.
# Both install what a fresh machine lacks (Debian packages, the Go build of the local
# control plane, a virtualenv at .venv with the project) before they do their job.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VMFLEET := $(VENV)/bin/vmfleet
PYTEST_ARGS ?=
VMS ?= 3
# Airflow (the `airflow` extra) gets its own virtualenv so its dependency pins cannot
# break .venv; the Airflow tests run from it.
AIRFLOW_VENV ?= .venv-airflow
AIRFLOW_PY := $(AIRFLOW_VENV)/bin/python
AIRFLOW_TESTS := tests/unit/test_airflow_operators.py tests/unit/test_airflow_provider.py \
                 tests/unit/test_airflow_fleet_ops.py tests/unit/test_airflow_output.py \
                 tests/unit/test_raw_api.py \
                 tests/e2e/test_airflow_dags.py tests/e2e/test_airflow_services.py
# `make setup WITH_AIRFLOW=0` skips the Airflow virtualenv (a cold install downloads
# ~150 packages); `make test` then runs the Airflow tests only where it exists.
WITH_AIRFLOW ?= 1

.PHONY: help setup setup-core system-deps venv controlplane coredns redis-image helm image crds crds-check typecheck lint \
        test test-unit test-e2e demo dev-up dev-down clean

help:
	@echo "make demo       start the local environment and run the original guide's flow"
	@echo "make test       lint (ruff, mypy strict), unit and end-to-end tests (real kube-apiserver, sshd, Redis, RabbitMQ)"
	@echo "make dev-down   stop the local environment"
	@echo "make test-airflow  the Airflow operators and DAGs (from .venv-airflow, real Airflow 3)"
	@echo "make image      build the image from the Dockerfile (buildah, no Docker daemon)"
	@echo "make crds       regenerate crds/ from vmfleet/api/models.py"
	@echo "make soak       10,000 commands over 20 VMs with faults injected (SOAK_ARGS=...)"
	@echo "make bench      benchmarks side by side with Ansible, parallel-ssh, asyncssh, ssh, Airflow (QUICK=1: <10 min)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

.PHONY: airflow-venv test-airflow
$(AIRFLOW_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/pip install --quiet -e '.[airflow,dev]'
	touch $@

airflow-venv: $(AIRFLOW_VENV)/.installed

system-deps:
	bash scripts/install-system-deps.sh

controlplane:
	bash tests/e2e/controlplane/build.sh

# The pod-network cluster's DNS (CoreDNS from its Go module; cached per machine).
coredns:
	bash tests/e2e/controlplane/build-coredns.sh

helm:
	bash scripts/install-helm.sh

# The controller's and workers' image from the Dockerfile, with buildah (no Docker
# daemon), on a Python 3.11 base made from Debian packages; cached per machine
# (scripts/build-image.sh). BASE_IMAGE=python:3.11-slim where that image is at hand.
image: system-deps
	bash scripts/build-image.sh

# The chart's bundled broker image for clusters that pull nothing (Debian's redis-server).
redis-image: system-deps
	bash scripts/build-redis-image.sh

# What the local environment needs (make demo, dev-up, soak); the tests need all of setup.
setup-core: system-deps venv controlplane

setup: setup-core coredns helm image redis-image $(if $(filter 1,$(WITH_AIRFLOW)),airflow-venv)

crds: venv
	$(VMFLEET) crds generate

crds-check: venv
	$(VMFLEET) crds check

typecheck: venv
	$(PY) -m mypy

# The guards `make test` runs first: ruff (the rule set in pyproject.toml) and mypy strict.
lint: venv
	$(VENV)/bin/ruff check .
	$(PY) -m mypy

test-unit: venv
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

test-e2e: setup
	$(PY) -m pytest tests/e2e -q -ra $(PYTEST_ARGS)

test: setup crds-check lint
	$(PY) -m pytest tests -q -ra $(PYTEST_ARGS)
	@if [ -x $(AIRFLOW_PY) ]; then set -x; $(AIRFLOW_PY) -m pytest $(AIRFLOW_TESTS) -q -ra $(PYTEST_ARGS); \
	else echo "Airflow tests skipped: no $(AIRFLOW_VENV) (make airflow-venv)"; fi

test-airflow: setup
	$(AIRFLOW_PY) -m pytest $(AIRFLOW_TESTS) -q -ra $(PYTEST_ARGS)

dev-up: setup-core
	$(VMFLEET) dev up --vms $(VMS)

dev-down: venv
	$(VMFLEET) dev down

demo: setup-core
	$(VMFLEET) dev up --vms $(VMS)
	$(VMFLEET) dev demo

# Benchmarks, side by side with the peers (bench/README.md): `make bench`, or
# `make bench QUICK=1` (under 10 minutes). Not part of `make test`.
QUICK ?= 0
BENCH_ARGS ?=
.PHONY: bench bench-setup
$(VENV)/.bench-installed: pyproject.toml $(VENV)/.installed
	$(VENV)/bin/pip install --quiet -e '.[bench,dev]'
	touch $@

$(AIRFLOW_VENV)/.bench-installed: pyproject.toml $(AIRFLOW_VENV)/.installed
	$(AIRFLOW_VENV)/bin/pip install --quiet apache-airflow-providers-ssh
	touch $@

bench-setup: setup-core $(VENV)/.bench-installed airflow-venv $(AIRFLOW_VENV)/.bench-installed

bench: bench-setup
	$(PY) bench/run.py $(if $(filter 1,$(QUICK)),--quick) $(BENCH_ARGS)

# Not part of `make test`: 10,000 commands over 20 VMs under chaos (bench/soak.py --help).
.PHONY: soak
soak: setup-core
	$(PY) bench/soak.py $(SOAK_ARGS)

clean: dev-down
	rm -rf .vmfleet
