"""The Generate and Steering tabs of the served app in a real browser (a smoke test): build a
vector, then generate with it (A/B) and see both arms' text and a token's lens column."""
from __future__ import annotations

import pytest

pytest.importorskip("playwright")

from panel.tests.util import wait_until  # noqa: E402
from playwright.sync_api import expect  # noqa: E402

from browser import serve_explorer  # noqa: E402

RUN_TIMEOUT = 90_000  # ms: a few seconds on 2 idle cores, far more on a busy machine


def test_build_a_vector_then_generate_ab(page, default_session):
    app, messages = serve_explorer(page, default_session, "Steering", ready=".steer-build button")
    page.locator(".steer-build button").click()
    expect(page.locator(".steer-vector")).to_contain_text("read at", timeout=RUN_TIMEOUT)
    wait_until(lambda: app.generate.form.vector is not None, page, timeout=RUN_TIMEOUT)
    page.locator(".explorer-tabs .bk-tab", has_text="Generate").first.click()
    page.locator(".gen-prompt textarea").fill("The capital of France is")
    app.generate.param.update(chat=False, max_new_tokens=8)
    app.generate.form.steer = True
    page.locator(".gen-run button").click()
    expect(page.locator(".gen-text-0")).to_contain_text("Paris", timeout=RUN_TIMEOUT)
    wait_until(lambda: app.generate.result is not None, page, timeout=RUN_TIMEOUT)
    expect(page.locator(".gen-text-1 .gen-text")).not_to_be_empty()
    expect(page.locator(".gen-lens-column")).to_contain_text("L29", timeout=RUN_TIMEOUT)
    expect(page.locator(".gen-run button")).to_be_enabled()
    assert [m.text for m in messages if m.type == "error"] == []
