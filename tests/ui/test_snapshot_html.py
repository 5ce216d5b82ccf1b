"""The standalone HTML export opens from file:// with the network off and draws its charts."""
from __future__ import annotations

import pytest

from explorer.analyses.lens import CompareRequest, LensRequest, compare_prompts, logit_lens
from explorer.persistence.snapshot import Entry, load_snapshot, save_snapshot
from widgets.export import export_html

pytestmark = pytest.mark.ui


def test_html_renders_offline(tmp_path, tiny_sessions, browser):
    s = tiny_sessions["gpt2"]
    lens = logit_lens(s, LensRequest("The capital of France is", top_k=3))
    comp = compare_prompts(s, CompareRequest("one two three", "four five six", top_k=3))
    snap = load_snapshot(save_snapshot(tmp_path / "s.zip", [Entry("lens", lens), Entry("cmp", comp), s.info()]))
    page_path = export_html(snap, tmp_path / "page.html", title="Test snapshot")
    text = page_path.read_text()
    assert "cdn.bokeh.org" not in text and "http://" not in text.split("<body")[0].replace("http://www.w3.org", "")

    context = browser.new_context(offline=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(page_path.as_uri())
    page.wait_for_selector("text=Test snapshot")
    # lens heatmap + 2 target-curve panels + 2 comparison panels, each a bokeh canvas
    # (inside bokeh's shadow roots, which playwright's locators pierce)
    page.locator("canvas").nth(4).wait_for(state="attached", timeout=30_000)
    box = page.locator("canvas").first.bounding_box()
    assert box is not None and box["width"] > 100 and box["height"] > 100
    assert page.get_by_text("1. lens").count() == 1 and page.get_by_text("3. ModelInfo").count() == 1
    context.close()
    assert not errors
