"""Browser tests: the real app served in-process, driven by Debian's headless Chromium."""
from __future__ import annotations

import os
import shutil

import pytest

try:  # chromium may be absent; then every test here is skipped below
    from playwright.sync_api import expect

    # A page shows a server-side change only after the server's event loop sends the patch; with
    # four sessions drawing charts on a slow 2-core CI machine that took over Playwright's default
    # 5 s once (the status line of a finished run). Waiting is for the page, never for a result.
    expect.set_options(timeout=30_000)
except ImportError:
    pass

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.ui)
            if not os.path.exists(CHROMIUM):
                item.add_marker(pytest.mark.skip(reason="needs chromium: apt-get install chromium"))


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    # Debian's chromium instead of a `playwright install` download.
    return {
        **browser_type_launch_args,
        "executable_path": CHROMIUM,
        "args": ["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
    }


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args):
    return {**browser_context_args, "viewport": {"width": 1400, "height": 900}}


@pytest.fixture(autouse=True)
def server_cleanup():
    """Stop servers and reset panel's global state after each test (as panel's own suite does)."""
    from panel.io.state import state

    try:
        yield
    finally:
        state.kill_all_servers()
        state.reset()
