"""The Heads tab in a real browser: run, click a grid cell, shift/ctrl-click more heads, errors."""
from __future__ import annotations

import pytest

pytest.importorskip("playwright")

from panel.tests.util import wait_until  # noqa: E402
from playwright.sync_api import expect  # noqa: E402

from browser import FRAME_JS, serve_explorer  # noqa: E402
from widgets import heads_charts as hc  # noqa: E402

PROMPT = "The cat sat on the mat. The cat sat on the mat."
RUN_TIMEOUT = 60_000  # ms: the first head scores of the default model trace two sequences on CPU


@pytest.fixture
def served(page, default_session):
    """Serve the real app, open its Heads tab, keep the Python side at hand."""
    return serve_explorer(page, default_session, "Heads", ".heads-prompt textarea")


def run_heads(page, prompt: str) -> None:
    page.locator(".heads-prompt textarea").fill(prompt)
    page.locator(".heads-run button").click()


def click_head(page, view, layer: int, head: int, modifier: str | None = None) -> None:
    """Click the grid cell of a head (layer 0 is the bottom row)."""
    page.locator(".heads-grid").scroll_into_view_if_needed()  # its 30 rows are taller than the fold
    frame = page.evaluate(FRAME_JS, hc.GRID)
    assert frame is not None
    n_layers, n_heads = view.result.n_layers, view.result.n_heads
    x = frame["left"] + (head + 0.5) * frame["width"] / n_heads
    y = frame["top"] + (n_layers - 1 - layer + 0.5) * frame["height"] / n_layers
    if modifier:
        page.keyboard.down(modifier)
    page.mouse.click(x, y)
    if modifier:
        page.keyboard.up(modifier)


def console_errors(messages) -> list[str]:
    return [m.text for m in messages if m.type == "error"]


def test_run_click_a_head_and_overlay_a_second(page, served):
    app, messages = served
    view = app.heads
    run_heads(page, PROMPT)
    status = page.locator(".heads-status p")
    expect(status).to_contain_text("30 layers × 9 heads (3 KV groups)", timeout=RUN_TIMEOUT)
    expect(page.locator(".heads-grid canvas").first).to_be_visible()
    # The table is rendered (Bokeh's DataTable): its first row is the strongest induction head.
    layer, head, _ = view.result.top("induction", 1)[0]
    expect(page.locator(".heads-table .slick-cell").first).to_have_text(hc.head_label(layer, head))
    assert view.result.induction[layer, head] > 0.5  # SmolLM2 has a strong induction head

    click_head(page, view, layer, head)
    wait_until(lambda: view.selected == [hc.chip_label(layer, head)], page)
    caption = page.locator(".heads-selection p")
    expect(caption).to_contain_text(f"{hc.head_label(layer, head)} (KV group {head // 3})")
    expect(page.locator(".heads-pattern canvas").first).to_be_visible()
    expect(page.locator(".heads-lines canvas").first).to_be_visible()
    assert page.locator(".heads-pattern").count() == 1
    # The line view shows this head's lines on the current prompt's tokens.
    lines = view._lines.object.select_one({"name": hc.line_source_name(layer, head)})
    assert lines is not None and len(lines.data["weight"]) > 0

    # Shift-click a second head (the strongest previous-token head): both are overlaid.
    second = next((l, h) for l, h, _ in view.result.top("previous_token", 5) if (l, h) != (layer, head))
    click_head(page, view, *second, modifier="Shift")
    both = [hc.chip_label(layer, head), hc.chip_label(*second)]
    wait_until(lambda: view.selected == both, page)
    expect(page.locator(".heads-pattern")).to_have_count(2)
    expect(caption).to_contain_text(hc.head_label(*second))
    expect(page.locator(".heads-chips")).to_contain_text(hc.chip_label(*second))  # the chips follow
    # Ctrl-click adds a third head; ctrl-clicking it again removes it.
    click_head(page, view, 0, 0, modifier="Control")
    wait_until(lambda: view.selected == both + ["0.0"], page)
    expect(page.locator(".heads-pattern")).to_have_count(3)
    click_head(page, view, 0, 0, modifier="Control")
    wait_until(lambda: view.selected == both, page)
    expect(page.locator(".heads-pattern")).to_have_count(2)
    assert console_errors(messages) == []


def test_empty_prompt_shows_error_then_the_tab_still_works(page, served):
    app, _ = served
    view = app.heads
    run_heads(page, "")
    error = page.locator(".heads-error")
    expect(error).to_be_visible(timeout=RUN_TIMEOUT)
    expect(error).to_contain_text("empty")
    assert view.result is None
    run_heads(page, PROMPT)
    expect(page.locator(".heads-status p")).to_contain_text("prompt tokens", timeout=RUN_TIMEOUT)
    expect(error).to_be_hidden()
    click_head(page, view, 0, 0)
    wait_until(lambda: view.selected == ["0.0"], page)
    expect(page.locator(".heads-pattern canvas").first).to_be_visible()
