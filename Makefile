# `make run` (set up, then serve the app), `make test` (set up, then every test: unit, model,
# browser, notebooks), `make check` (lint and the unit tests: the quick loop while developing).
# All are idempotent: a second run reuses the virtualenv, the package and the cached defaults.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 5006
PIP    := $(BIN)/python -m pip install -q --disable-pip-version-check
# The versions the suite is tested with; pyproject.toml only states the compatible ranges.
CONSTRAINTS := constraints.txt
PYTEST := $(BIN)/python -m pytest -p no:cacheprovider
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-remote test-saelens check lint unit setup setup-test chromium redis-server constraints bench gpu-check clean

# serve fetches the default model and corpus itself the first time (one process: faster start).
run: $(VENV)/.installed
	$(BIN)/python -m explorer serve --port $(PORT)

# Everything but the browser tests on every core (one file per worker: its module fixtures are
# built once), then the browser tests on two workers (each file on one; each test serves the app
# and drives Chromium, and much of their time is waiting on the page).
test: setup-test chromium
	$(PYTEST) -n auto --dist loadfile tests/unit tests/integration tests/model tests/examples
	$(PYTEST) -n 2 --dist loadfile tests/ui

# A real NDIF server on 127.0.0.1 for the default model (tests/remote/stack.py: Redis, an S3
# store, Ray with ndif's controller and a CPU model actor, ndif's API), the remote lens, heads,
# ablation, sweep and patching checked against local runs, then every process it started
# stopped by PID. The server side lives in $(NDIF_VENV), which sees .venv's packages (torch,
# transformers, nnsight) through a .pth file: ndif 0.1.2 says Python >= 3.12 but runs on 3.11.
NDIF_VENV := .venv-ndif
NDIF_REQUIREMENTS := tests/remote/requirements-ndif.txt

# Ray's internal ports listen on every interface whatever address it is given, so where the
# kernel allows it (root or user namespaces) the stack and the test run in a private network
# namespace that has only a loopback device: nothing it opens can be reached from outside.
test-remote: setup-test redis-server $(NDIF_VENV)/.installed
	@if unshare -n true 2>/dev/null && command -v ip >/dev/null; then \
	  echo "test-remote: in a private network namespace (loopback only)"; \
	  unshare -n sh -c 'ip link set lo up && $(PYTEST) -s tests/remote'; \
	else \
	  echo "test-remote: no network namespace here; Ray's internal ports listen on all interfaces"; \
	  $(PYTEST) -s tests/remote; \
	fi

$(NDIF_VENV)/.installed: $(NDIF_REQUIREMENTS) $(VENV)/.installed
	test -x $(NDIF_VENV)/bin/python || $(BIN)/python -m venv $(NDIF_VENV)
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
	  > "$$($(NDIF_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/explorer-venv.pth"
	$(NDIF_VENV)/bin/python -m pip install -q --disable-pip-version-check --ignore-requires-python -r $(NDIF_REQUIREMENTS)
	touch $@

# The real SAELens (tests/saelens): SAEs written here open in SAELens and encode and decode the
# same, and SAELens's own saved SAEs open here. sae-lens pins transformer-lens < 4 and many other
# packages, so it lives in its own environment, $(SAELENS_VENV), never in .venv; the test process
# (in .venv) runs SAELens's side as a subprocess with that environment's python.
SAELENS_VENV := .venv-saelens
SAELENS_REQUIREMENTS := tests/saelens/requirements-saelens.txt

test-saelens: setup-test $(SAELENS_VENV)/.installed
	SAELENS_PYTHON=$(SAELENS_VENV)/bin/python $(PYTEST) tests/saelens

$(SAELENS_VENV)/.installed: $(SAELENS_REQUIREMENTS)
	test -x $(SAELENS_VENV)/bin/python || $(PYTHON) -m venv $(SAELENS_VENV)
	$(SAELENS_VENV)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(SAELENS_VENV)/bin/python -m pip install -q --disable-pip-version-check -r $(SAELENS_REQUIREMENTS)
	touch $@

# Debian's redis-server for the NDIF queue (as chromium: the distribution's package).
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q redis-server; }

check: lint unit

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

# One worker per core, each file on one worker (its module fixtures built once); the tests run
# one torch thread each (tests/conftest.py), so the workers do not compete for cores. The
# integration tests (training runs, every result type through snapshots, served sessions) run in
# `make test` only.
unit: setup-test
	$(PYTEST) -n auto --dist loadfile tests/unit

setup: $(VENV)/.installed
	$(BIN)/python -m explorer setup

setup-test: setup $(VENV)/.installed-test

# torch first, pinned: pip takes the CPU build served from local disk, never a CUDA one; the
# project's range then admits it, so nothing replaces it.
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -c $(CONSTRAINTS) -e ".[test]"
	touch $@

# Browser tests use Debian's chromium (never a browser download).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

# After upgrading a dependency in .venv (and passing `make test`): record the versions tested.
constraints: $(VENV)/.installed-test
	$(BIN)/python .ci/freeze_constraints.py > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)

bench: setup
	$(BIN)/python benchmarks/lens.py

# On a CUDA machine: every benchmark's ratio and the model tests in bfloat16, one table
# (without CUDA it says so and stops).
gpu-check: setup-test
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) $(NDIF_VENV) build *.egg-info
