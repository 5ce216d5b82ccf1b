"""A fixture for tests that drive views without a browser (tests/unit, tests/integration), imported
by their conftest files: the browser tests run their own loop and must not get it."""
from __future__ import annotations

import asyncio
import warnings

import pytest


@pytest.fixture(autouse=True)
def close_panel_event_loop():
    """Triggering an async handler with no loop running makes panel create and set a loop; close it."""
    yield
    policy = asyncio.get_event_loop_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            loop = policy.get_event_loop()
        except RuntimeError:
            return
    if not loop.is_running():
        loop.close()
    policy.set_event_loop(None)
