# unplugd: the two commands that matter are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/unplugd
# The generator's version has one home, proto/generate.py (REQUIRED_TOOLS).
PROTOC_TOOLS := $(shell sed -n 's/^REQUIRED_TOOLS = "\(.*\)"/\1/p' proto/generate.py)
PROTOC_VENV := $(CACHE)/protoc-venv-$(PROTOC_TOOLS)
export UNPLUGD_CACHE := $(CACHE)
export UNPLUGD_PROTOC_PYTHON := $(PROTOC_VENV)/bin/python

.PHONY: help format dev system-deps protoc-venv proto lint typecheck unit pytest test inspect demo bench reliability fuzz clean

help:
	@echo "make demo     build the guest image, boot a VM, show unplugd and unplugctl at work"
	@echo "make test     lint, type-check and run every test (unit, integration, e2e)"
	@echo "make inspect  run 'unplugd inspect' on this machine"
	@echo "make bench    speed and memory figures against lsblk, lsof, fuser, qemu-guest-agent"
	@echo "make reliability  resource bounds and failure behaviour under load, as one table (root, ~10 min)"
	@echo "make proto    regenerate proto/unplugd/v1/*_pb2*.py"
	@echo "make fuzz     fuzz every parser of untrusted input for FUZZ_SECONDS (60)"

system-deps:
	@packaging/dev/system-deps.sh

$(VENV)/.stamp: pyproject.toml packaging/dev/venv.sh
	packaging/dev/venv.sh

# The directory's mtime changes when a root module is added or removed: relink .dev/ then.
.dev/.stamp: proto/unplugd $(VENV)/.stamp
	packaging/dev/venv.sh links

dev: system-deps $(VENV)/.stamp .dev/.stamp protoc-venv

# grpcio-tools $(PROTOC_TOOLS) (1.51.3): its output loads on Debian 12's protobuf 3.21 and on current PyPI.
protoc-venv: $(PROTOC_VENV)/.stamp
$(PROTOC_VENV)/.stamp:
	python3 -m venv $(PROTOC_VENV)
	$(PROTOC_VENV)/bin/pip install -q grpcio-tools==$(PROTOC_TOOLS) mypy-protobuf==3.5.0
	touch $@

proto: protoc-venv
	PATH=$(PROTOC_VENV)/bin:$$PATH $(PROTOC_VENV)/bin/python proto/generate.py

lint: dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

# The package and its tests in one run ([tool.mypy] in pyproject.toml: strict; the grpc and
# protobuf stubs come from the dev extras).
typecheck: dev
	$(VENV)/bin/mypy -p unplugd -p tests

# Two workers (the machine's cores): the VM modules run two at a time, each whole in one worker
# (loadfile keeps a module's guest to one process). tests/conftest.py orders the modules longest
# first; --no-loadscope-reorder keeps that order (xdist would sort by number of tests).
TEST_JOBS ?= 2
pytest: dev
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder --durations=40 $(PYTEST_ARGS)

test: lint typecheck pytest

# The one code format `make lint` checks.
format: dev
	$(VENV)/bin/ruff format .

# Coverage-guided (atheris) when it installs, hypothesis otherwise: tests/fuzz/run.py says which.
FUZZ_SECONDS ?= 60
fuzz: dev
	@$(VENV)/bin/pip install -q atheris >/dev/null 2>&1 || echo "atheris did not install: falling back to hypothesis"
	$(PY) tests/fuzz/run.py --seconds $(FUZZ_SECONDS)

inspect: dev
	$(VENV)/bin/unplugd inspect

demo: dev
	$(PY) -m tests.vm.demo $(DEMO_ARGS)

bench: dev
	$(PY) tests/bench/run.py

# RELIABILITY_ARGS: e.g. --duration 5 --only load
reliability: dev
	$(PY) tests/reliability/run.py $(RELIABILITY_ARGS)

clean:
	rm -rf $(VENV) .dev build dist .mypy_cache .ruff_cache .pytest_cache
