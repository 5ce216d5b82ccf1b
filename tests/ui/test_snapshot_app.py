"""Snapshots in the served app: compute, save (a download), reopen in a fresh session (an upload),
see the same charts, continue from there; a bad file is a visible error; Export HTML downloads."""
from __future__ import annotations

import re
import zipfile

import pytest

pytest.importorskip("playwright")

from panel.tests.util import wait_until  # noqa: E402
from playwright.sync_api import expect  # noqa: E402

from browser import SOURCES_JS, serve_explorer_apps  # noqa: E402
from explorer.persistence.snapshot import load_snapshot  # noqa: E402
from widgets import charts  # noqa: E402
from widgets import heads_charts as hc  # noqa: E402

PROMPT = "The capital of France is"
HEADS_PROMPT = "The cat sat on the mat. The cat sat on the mat."
RUN_TIMEOUT = 60_000

# Names of the bokeh plots rendered in the page (every view of every root, recursively).
PLOT_NAMES_JS = """() => {
  const names = []
  const walk = (view) => {
    if (view.frame && view.model.name) names.push(view.model.name)
    for (const child of (view.child_views || [])) walk(child)
  }
  for (const root of Object.values(Bokeh.index)) walk(root)
  return names
}"""

GRID_COLUMNS = ("label", "value", *hc.SCORES)  # the live grid also marks the selected heads: not compared


@pytest.fixture
def served(page, default_session):
    """Serve the real app; return (every ExplorerApp made, one per session; the port; console messages)."""
    return serve_explorer_apps(page, default_session)


def tab(page, title: str):
    return page.locator(".explorer-tabs .bk-tab", has_text=re.compile(f"^{re.escape(title)}$"))


def errors(messages) -> list[str]:
    return [m.text for m in messages if m.type == "error"]


def compute_lens_and_heads(page, app) -> None:
    page.locator(".lens-prompt textarea").fill(PROMPT)
    page.locator(".lens-run button").click()
    expect(page.locator(".lens-topk td.tok").first).to_have_text("' Paris'", timeout=RUN_TIMEOUT)
    tab(page, "Heads").click()
    page.locator(".heads-prompt textarea").fill(HEADS_PROMPT)
    page.locator(".heads-run button").click()
    expect(page.locator(".heads-status p")).to_contain_text("30 layers × 9 heads", timeout=RUN_TIMEOUT)
    layer, head, _ = app.heads.result.top("induction", 1)[0]
    app.heads.select_heads([(layer, head)])  # what a click on the grid does (tested in test_heads_app)
    wait_until(lambda: len(app.history) == 4, page)


def test_save_reopen_in_a_fresh_session_and_continue(page, served, browser, tmp_path):
    apps, port, messages = served
    app = apps[0]
    compute_lens_and_heads(page, app)
    labels = [e.label for e in app.history.entries]

    with page.expect_download() as download:
        page.locator(".save-snapshot button").click()
    path = tmp_path / "session.zip"
    download.value.save_as(path)
    assert download.value.suggested_filename.endswith(".zip")
    snap = load_snapshot(path)
    assert [e.label for e in snap.entries] == labels
    assert snap.model["name"] == app.session.name and zipfile.is_zipfile(path)
    expect(page.locator(".snapshot-status-line p")).to_contain_text("Saved 4 results")

    # A fresh browser session (its own context): open the file, no model work needed to show it.
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    fresh = context.new_page()
    fresh_messages = []
    fresh.on("console", lambda m: fresh_messages.append(m))
    fresh.goto(f"http://localhost:{port}", wait_until="domcontentloaded")
    wait_until(lambda: len(apps) == 2, fresh)
    other = apps[1]
    assert len(other.history) == 0  # nothing leaks from the first session
    fresh.locator(".open-snapshot input[type=file]").set_input_files(str(path))
    expect(tab(fresh, "Snapshot: session.zip")).to_be_visible(timeout=RUN_TIMEOUT)
    cards = fresh.locator(".snapshot-entry")
    expect(cards).to_have_count(4, timeout=RUN_TIMEOUT)
    expect(fresh.locator("table.snapshot-manifest")).to_contain_text(app.session.name)
    for i, label in enumerate(labels, 1):
        expect(fresh.get_by_text(f"{i}. {label}")).to_be_visible()
    # The same charts: every plot the first page drew, drawn again from the file, with the same data.
    live_names = set(page.evaluate(PLOT_NAMES_JS))
    pattern = f"heads-pattern-{layer_head(app)}"
    assert {charts.HEATMAP, hc.GRID, pattern} <= live_names and any("target" in n for n in live_names)
    wait_until(lambda: live_names <= set(fresh.evaluate(PLOT_NAMES_JS)), fresh, timeout=RUN_TIMEOUT)
    expect(fresh.locator(".snapshot-entry canvas").first).to_be_visible()
    layer, head, _ = app.heads.result.top("induction", 1)[0]
    pattern_fig = next(p.object for p in app.heads._patterns.objects if p.object.name == pattern)
    for fig, name, columns in ((app.lens._heatmap.object, charts.HEATMAP_SOURCE, ("top1", "value", "row", "pos")),
                               (pattern_fig, hc.pattern_source_name(layer, head), ("q", "k", "weight")),
                               (app.heads._grid.object, hc.GRID_SOURCE, GRID_COLUMNS)):
        live = fig.select_one({"name": name}).data  # what the first page shows now
        for p in (page, fresh):  # the snapshot draws two grids (induction and DLA): one must match
            assert any(same_columns(d, live, columns) for d in p.evaluate(SOURCES_JS, name)), (name, p)
    # the heads table: every head with its scores (a static table in the snapshot tab)
    table = fresh.locator(".snapshot-entry table", has_text="induction").first
    expect(table).to_contain_text(hc.head_label(layer, head))
    n_layers, n_heads = app.heads.result.induction.shape
    expect(table.locator("tr")).to_have_count(1 + n_layers * n_heads)

    # Same model attached: continue from the lens entry; the lens tab reruns it.
    fresh.locator(".snapshot-continue button").first.click()
    expect(fresh.locator(".lens-prompt textarea")).to_have_value(PROMPT, timeout=RUN_TIMEOUT)
    expect(fresh.locator(".lens-topk td.tok").first).to_have_text("' Paris'", timeout=RUN_TIMEOUT)
    assert other.lens.result.request.prompt == PROMPT
    assert [e.label for e in app.history.entries] == labels  # the first session is untouched
    assert errors(messages) == [] and errors(fresh_messages) == []
    context.close()


def test_bad_file_and_html_export(page, served, tmp_path):
    apps, _, messages = served
    app = apps[0]
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"PK\x03\x04 this is not a snapshot")
    n_tabs = len(app._tabs)
    page.locator(".open-snapshot input[type=file]").set_input_files(str(bad))
    alert = page.locator(".snapshot-open-error")
    expect(alert).to_be_visible(timeout=RUN_TIMEOUT)
    expect(alert).to_contain_text("Could not open broken.zip")
    assert len(app._tabs) == n_tabs and app.snapshots == []

    page.locator(".lens-prompt textarea").fill(PROMPT)
    page.locator(".lens-run button").click()
    expect(page.locator(".lens-topk td.tok").first).to_have_text("' Paris'", timeout=RUN_TIMEOUT)
    with page.expect_download() as download:
        page.locator(".export-html button").click()
    assert download.value.suggested_filename.endswith(".html")
    html_path = tmp_path / "page.html"
    download.value.save_as(html_path)
    text = html_path.read_text()
    assert "cdn.bokeh.org" not in text and "logit lens: The capital of France is" in text
    assert errors(messages) == []
    # the page opens from file:// and draws the lens (network off: resources are inline)
    page_errors = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    page.context.set_offline(True)
    page.goto(html_path.as_uri())
    wait_until(lambda: charts.HEATMAP in page.evaluate(PLOT_NAMES_JS), page, timeout=RUN_TIMEOUT)
    expect(page.locator("canvas").first).to_be_visible()
    page.context.set_offline(False)
    assert page_errors == []


def same_columns(shown: dict, live: dict, columns) -> bool:
    return all(list(shown[c]) == list(live[c]) for c in columns)


def layer_head(app) -> str:
    layer, head, _ = app.heads.result.top("induction", 1)[0]
    return f"{layer}.{head}"
