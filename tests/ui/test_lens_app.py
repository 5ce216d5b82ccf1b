"""The served app in a real browser: run the lens, click a cell, compare two prompts, errors."""
from __future__ import annotations

import re

import pytest

pytest.importorskip("playwright")

from panel.tests.util import wait_until  # noqa: E402
from playwright.sync_api import expect  # noqa: E402

from browser import FRAME_JS, serve_explorer  # noqa: E402
from widgets import charts  # noqa: E402

PROMPT = "The capital of France is"
PROMPT_B = "The capital of France is London. The capital of France is"
RUN_TIMEOUT = 30_000  # ms: a CPU lens of the default model takes ~1-3 s, the first one longer


@pytest.fixture
def served(page, default_session):
    """Serve the real app (one ExplorerApp per browser session) and keep the Python side at hand."""
    return serve_explorer(page, default_session)


def run_lens(page, prompt: str) -> None:
    page.locator(".lens-prompt textarea").fill(prompt)
    page.locator(".lens-run button").click()


def console_errors(messages) -> list[str]:
    return [m.text for m in messages if m.type == "error"]


def test_lens_shows_paris(page, served):
    app, messages = served
    run_lens(page, PROMPT)
    # DOM-visible checks: the final-layer top-k table and the status line.
    expect(page.locator(".lens-topk td.tok").first).to_have_text("' Paris'", timeout=RUN_TIMEOUT)
    expect(page.locator(".lens-status p")).to_contain_text("final prediction ' Paris'")
    expect(page.locator(".lens-heatmap canvas").first).to_be_visible()
    expect(page.locator(".lens-target-curve canvas").first).to_be_visible()
    expect(page.locator(".lens-run button")).to_be_enabled()
    # Python-side: the heatmap's last cell (final layer, last position) is " Paris".
    view = app.lens
    source = view._heatmap.object.select_one({"name": charts.HEATMAP_SOURCE})
    last = source.data["row"].index(view.result.n_rows - 1) + view.result.n_positions - 1
    assert (source.data["row"][last], source.data["pos"][last]) == (view.result.n_rows - 1,
                                                                    view.result.n_positions - 1)
    assert source.data["top1"][last] == " Paris"
    assert console_errors(messages) == []


def test_clicking_a_cell_sets_position_and_target(page, served):
    app, _ = served
    run_lens(page, PROMPT)
    expect(page.locator(".lens-topk td.tok").first).to_have_text("' Paris'", timeout=RUN_TIMEOUT)
    view = app.lens
    result = view.result
    row, pos = result.n_rows - 1, 3  # the final layer at " France"
    expected = str(result.top_tokens[row, pos, 0])
    frame = page.evaluate(FRAME_JS, charts.HEATMAP)
    assert frame is not None
    cell_w, cell_h = frame["width"] / result.n_positions, frame["height"] / result.n_rows
    page.mouse.click(frame["left"] + (pos + 0.5) * cell_w, frame["top"] + (result.n_rows - 1 - row + 0.5) * cell_h)
    # The lens re-runs for the clicked token; the curve and table follow the clicked position.
    wait_until(lambda: view.result is not result and view.result.target == expected, page, timeout=RUN_TIMEOUT)
    assert view.position == pos
    expect(page.locator(".lens-status p")).to_contain_text(f"target {charts.quote_token(expected)}")
    expect(page.locator(".lens-topk .caption")).to_contain_text(f"position {pos}")
    expect(page.locator(".lens-target input")).to_have_value(view.target)


def test_compare_mode_shows_divergence(page, served):
    app, messages = served
    page.locator(".lens-compare input").check()
    page.locator(".lens-prompt-b textarea").fill(PROMPT_B)
    run_lens(page, PROMPT)
    divergence = page.locator(".lens-divergence p")
    expect(divergence).to_contain_text(re.compile(r"Diverges first at (embed|L\d+) \(\|Δp\| = "),
                                       timeout=RUN_TIMEOUT)
    expect(page.locator(".lens-compare-chart canvas").first).to_be_visible()
    assert app.lens.comparison is not None
    # The threshold is applied without the model: above any |Δp| nothing diverges.
    app.lens.threshold = 1.0
    expect(divergence).to_contain_text("No divergence above 1.00")
    assert console_errors(messages) == []


def test_empty_prompt_shows_error_then_recovers(page, served):
    app, _ = served
    run_lens(page, "")
    error = page.locator(".lens-error")
    expect(error).to_be_visible(timeout=RUN_TIMEOUT)
    expect(error).to_contain_text("empty")
    assert app.lens.result is None
    run_lens(page, PROMPT)
    expect(page.locator(".lens-topk td.tok").first).to_have_text("' Paris'", timeout=RUN_TIMEOUT)
    expect(error).to_be_hidden()
