"""Shared fixtures: tiny random models of each supported family, and the embedded default."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing loads from a hub in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One torch thread, here and in every subprocess (CLI runs, notebook kernels). The tests' models
# are small, and on a shared 2-core machine two OpenMP threads wait for each other at every op:
# a tiny model's forward took 0.6-1.0 s with two threads and 0.07 s with one under load, the
# default model's 4x slower. Set OMP_NUM_THREADS yourself to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from explorer.core.defaults import ensure_default_model
from explorer.core.session import ModelSession
from tiny_models import FAMILIES, make_tiny_model

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch was imported first


@pytest.fixture(scope="session")
def default_model_dir():
    """The embedded default model's cached directory (fetched once by `make test`'s setup)."""
    return ensure_default_model()


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    """The default model's tokenizer, reused by the tiny models (no hub needed)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir), local_files_only=True)


@pytest.fixture(scope="session")
def tiny_sessions(tokenizer):
    """One ModelSession per family, built in-process on random weights."""
    return {
        f: ModelSession(make_tiny_model(f, len(tokenizer)), tokenizer, name=f"tiny-{f}")
        for f in FAMILIES
    }


@pytest.fixture(params=FAMILIES)
def tiny_session(request, tiny_sessions):
    return tiny_sessions[request.param]


@pytest.fixture(scope="session")
def default_session(default_model_dir):
    """The embedded default model (real weights), loaded once per test run: on the CPU in float32,
    or where EXPLORER_TEST_DEVICE / EXPLORER_TEST_DTYPE say (benchmarks/gpu_check.py: cuda, bfloat16)."""
    return ModelSession.load(str(default_model_dir), device=os.environ.get("EXPLORER_TEST_DEVICE", "cpu"),
                             dtype=os.environ.get("EXPLORER_TEST_DTYPE", "float32"))


def pytest_collection_modifyitems(config, items):
    """Run the browser tests last: Playwright's sync API leaves an asyncio loop running in the
    main thread for the rest of the session, which the unit tests' own ``asyncio.run`` refuses."""
    ui = os.path.join(os.path.dirname(__file__), "ui") + os.sep
    items.sort(key=lambda item: str(item.fspath).startswith(ui))


def pytest_sessionfinish(session, exitstatus):
    """Stop every panel server a test left running: a threaded server is not a daemon thread, so
    the run would never exit (tests/integration/test_session_cleanup.py serves for real)."""
    if "panel" in sys.modules:
        from panel.io.state import state

        state.kill_all_servers()
