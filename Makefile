# Two commands: `make run` (set up, then serve the app) and `make test` (set up, then every test).
# Both are idempotent: a second run reuses the virtualenv, the package and the cached defaults.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 5006
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test setup setup-test chromium bench clean

# serve fetches the default model and corpus itself the first time (one process: faster start).
run: $(VENV)/.installed
	$(BIN)/python -m explorer serve --port $(PORT)

test: setup-test chromium
	$(BIN)/python -m pytest

setup: $(VENV)/.installed
	$(BIN)/python -m explorer setup

setup-test: setup $(VENV)/.installed-test

# torch first, pinned: pip takes the CPU build served from local disk, never a CUDA one.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

# Browser tests use Debian's chromium (never a browser download).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

bench: setup
	$(BIN)/python benchmarks/lens.py

clean:
	rm -rf $(VENV) build *.egg-info
