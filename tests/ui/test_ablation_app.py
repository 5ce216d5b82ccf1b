"""The Ablation tab of the served app in a real browser: a single ablation, a live head sweep
that is cancelled part-way, and an activation-patching run."""
from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("playwright")

from playwright.sync_api import expect  # noqa: E402

from browser import FRAME_JS, assert_in_view, serve_explorer  # noqa: E402
from widgets import ablation_charts as ac  # noqa: E402
from widgets.charts import position_labels  # noqa: E402

RUN_TIMEOUT = 90_000  # ms, an upper bound: a few seconds each on 2 idle cores, far more on a busy machine
# Not the prompt of the model tests' complete head sweep: a cached sweep would finish at once.
SWEEP_PROMPT, SWEEP_TARGET = "Paris is the capital of", " France"


@pytest.fixture
def served(page, default_session):
    return serve_explorer(page, default_session, "Ablation")


def section(page, name: str) -> None:
    page.locator(".ablation-sections .bk-tab", has_text=re.compile(f"^{name}$")).click()


def console_errors(messages) -> list[str]:
    return [m.text for m in messages if m.type == "error"]


def test_single_ablation_of_a_head_shows_the_card_and_both_lenses(page, served):
    app, messages = served
    view = app.ablation
    # At 1600 x 1000 with a long prompt the mode buttons stay inside the page, and no tab (hidden
    # ones included) makes the main area scroll sideways (issue 15: a few px overflowed).
    page.set_viewport_size({"width": 1600, "height": 1000})
    page.locator(".ablation-prompt textarea").fill("The river valley was quiet that year. " * 200)
    page.wait_for_timeout(300)  # the text area grows
    assert_in_view(page, ".ablation-mode")
    assert_in_view(page, ".ablation-run button")
    page.locator(".ablation-prompt textarea").fill("The capital of France is")
    page.locator(".ablation-target input").fill(" Paris")
    page.locator(".ablation-components input").fill("23.4")
    page.locator(".ablation-run button").click()
    caption = page.locator(".ablation-card .caption")
    expect(caption).to_have_text("Ablated 23.4 · zero", timeout=RUN_TIMEOUT)
    result = view.single.result
    assert result.components == ("23.4",) and result.request.prompt == "The capital of France is"
    cells = page.locator(".ablation-card td")
    # Row "logit": name, baseline, ablated, change; the numbers are the engine's.
    expect(cells.nth(1)).to_have_text(f"{result.baseline.logit:.3f}")
    expect(cells.nth(2)).to_have_text(f"{result.ablated.logit:.3f}")
    expect(cells.nth(6)).to_have_text(f"{result.ablated.prob:.4f}")
    assert result.ablated.logit < result.baseline.logit  # head 23.4 pushes ' Paris' up
    for css in ("ablation-lens-baseline", "ablation-lens-ablated", "ablation-target-pair"):
        expect(page.locator(f".{css} canvas").first).to_be_visible()
    assert view.single._lens_ablated.object.name == ac.LENS_ABLATED
    expect(page.locator(".ablation-status p")).to_contain_text("ablated 23.4 (zero)")
    assert app.history.entries[-1].result is result
    assert console_errors(messages) == []


def test_head_sweep_fills_live_and_cancel_keeps_the_finished_cells(page, served):
    app, messages = served
    view = app.ablation
    section(page, "Sweep")
    page.locator(".sweep-prompt textarea").fill(SWEEP_PROMPT)
    page.locator(".sweep-target input").fill(SWEEP_TARGET)
    page.locator(".sweep-start button").click()
    status = page.locator(".sweep-status p")
    expect(status).to_have_text("Starting: the clean run…")
    expect(page.locator(".sweep-cancel button")).to_be_enabled()
    # The first batch arrives: some cells done, the rest grey (NaN), progress with rate and time left.
    expect(status).to_contain_text(re.compile(r"^\d+/270 heads · [\d.]+ heads/s · ~\d+ s left"),
                                   timeout=RUN_TIMEOUT)
    expect(page.locator(".ablation-sweep-chart canvas").first).to_be_visible()
    partial = view.sweep.result
    assert partial is not None and 0 < partial.done < 270 and np.isnan(partial.effects).any()
    page.locator(".sweep-cancel button").click()
    expect(status).to_contain_text(re.compile(r"Cancelled after \d+/270 heads: the finished cells are kept"),
                                   timeout=RUN_TIMEOUT)
    result = view.sweep.result
    assert 0 < result.done < result.total == 270
    effects = np.asarray(view.sweep._pane.object.select_one({"name": ac.SWEEP_SOURCE}).data["effect"], float)
    assert np.isfinite(effects).sum() == result.done and np.isnan(effects).sum() == 270 - result.done
    assert "cancelled" in app.history.entries[-1].label and app.history.entries[-1].result is result
    expect(page.locator(".sweep-start button")).to_be_enabled()
    # Still responsive: clicking a finished cell (layer 0, head 2) fills the single-ablation field.
    page.locator(".ablation-sweep-chart").scroll_into_view_if_needed()
    frame = page.evaluate(FRAME_JS, ac.SWEEP_CHART)
    n_layers, n_heads = result.effects.shape
    cell_w, cell_h = frame["width"] / n_heads, frame["height"] / n_layers
    page.mouse.click(frame["left"] + 2.5 * cell_w, frame["top"] + (n_layers - 0.5) * cell_h)  # L0: the bottom row
    expect(page.locator(".sweep-hint p")).to_contain_text("0.2 is now in the single-ablation field")
    assert view.single.components == "0.2"
    section(page, "Single ablation")
    expect(page.locator(".ablation-components input")).to_have_value("0.2")
    assert console_errors(messages) == []


def test_patching_shows_token_counts_errors_and_the_heatmap(page, served):
    app, messages = served
    view = app.ablation
    section(page, "Activation patching")
    counts = page.locator(".patch-counts p")
    page.locator(".patch-clean input").fill("The capital of France is")
    page.locator(".patch-corrupt input").fill("The capital city of Italy is")
    expect(counts).to_contain_text("clean: 5 tokens · corrupted: 6 tokens · they differ")  # live, no button
    page.locator(".patch-start button").click()
    expect(page.locator(".patch-error")).to_contain_text("equal token length", timeout=RUN_TIMEOUT)
    page.locator(".patch-corrupt input").fill("The capital of Italy is")
    expect(counts).to_contain_text("clean: 5 tokens · corrupted: 5 tokens · equal")
    page.locator(".patch-target input").fill(" Paris")
    page.locator(".patch-compare input").fill(" Rome")
    page.locator(".patch-start button").click()
    expect(page.locator(".patch-status p")).to_contain_text("Done: 150 cells", timeout=RUN_TIMEOUT)
    expect(page.locator(".patch-error")).to_be_hidden()
    expect(page.locator(".ablation-patch-chart canvas").first).to_be_visible()
    result = view.patching.result
    assert result.complete and result.restored.shape == (30, 5) and result.compare == " Rome"
    fig = view.patching._pane.object
    assert list(fig.x_range.factors) == position_labels(result.corrupt_tokens)
    assert "Italy" in fig.x_range.factors[3]
    # Patching the clean residual stream at the last layer and last position restores it fully.
    assert result.restored[-1, -1] == pytest.approx(1.0, abs=1e-3)
    assert console_errors(messages) == []
