"""Helpers shared by the browser tests (a plain module: see tests/tiny_models.py on why)."""
from __future__ import annotations

import re
import weakref

from panel.tests.util import serve_component, wait_until
from playwright.sync_api import expect

# Finds a Bokeh plot view by its model name and returns its frame in page coordinates.
FRAME_JS = """(name) => {
  const find = (view) => {
    if (view.model && view.model.name === name) return view
    for (const child of (view.child_views || [])) { const found = find(child); if (found) return found }
    return null
  }
  for (const root of Object.values(Bokeh.index)) {
    const view = find(root)
    if (view) {
      const frame = view.frame.bbox
      const canvas = view.canvas_view.el.getBoundingClientRect()
      return {left: canvas.left + frame.left, top: canvas.top + frame.top,
              width: frame.width, height: frame.height}
    }
  }
  return null
}"""


# The data of every data source with a given name, as the browser holds it (plain arrays).
SOURCES_JS = """(name) => {
  const out = []
  for (const doc of Bokeh.documents) {
    for (const model of doc._all_models.values()) {
      if (model.name !== name || model.data == null) continue
      const data = model.data instanceof Map ? Object.fromEntries(model.data) : model.data
      out.push(Object.fromEntries(Object.entries(data).map(([k, v]) => [k, Array.from(v)])))
    }
  }
  return out
}"""


def explorer_factory(session, weak: bool = False):
    """A page factory for ``pn.serve``: one ExplorerApp per browser session on ``session``.

    Returns (every app made, in order: weak references when ``weak``, so a test can check that
    closed sessions' apps are collected; the factory)."""
    from widgets.app import ExplorerApp

    apps: list = []

    def factory():
        app = ExplorerApp(session)
        apps.append(weakref.ref(app) if weak else app)
        return app.template()

    return apps, factory


def serve_explorer_apps(page, session):
    """Serve the real app and open it in ``page``; return (every ExplorerApp made, the port, the
    page's console messages)."""
    apps, factory = explorer_factory(session)
    messages, port = serve_component(page, factory)
    wait_until(lambda: len(apps) == 1, page)
    return apps, port, messages


def serve_explorer(page, session, tab: str | None = None, ready: str | None = None):
    """Serve the real app (one ExplorerApp per browser session), open ``tab``, wait for the CSS
    selector ``ready`` to be visible; return (the ExplorerApp, the console messages)."""
    apps, _, messages = serve_explorer_apps(page, session)
    if tab is not None:
        page.locator(".explorer-tabs .bk-tab", has_text=re.compile(f"^{re.escape(tab)}$")).click()
    if ready is not None:
        expect(page.locator(ready)).to_be_visible()
    return apps[0], messages


# How far the page's main area is wider than what it shows (px; 0 when nothing sticks out). Inactive
# tabs are hidden but laid out, so a widget sticking out of any tab makes every tab scroll sideways.
MAIN_OVERFLOW_JS = """() => {
  let main = null
  const walk = (root) => { for (const el of root.querySelectorAll('*')) {
    if (!main && String(el.className).includes('main-content')) main = el; if (el.shadowRoot) walk(el.shadowRoot) } }
  walk(document)
  return main ? main.scrollWidth - main.clientWidth : null
}"""


def assert_in_view(page, selector: str) -> None:
    """The first element matching ``selector`` lies wholly inside the viewport's width, and the
    main area does not scroll sideways."""
    box = page.locator(selector).first.bounding_box()
    width = page.viewport_size["width"]
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, (selector, box, width)
    overflow = page.evaluate(MAIN_OVERFLOW_JS)
    assert overflow is not None and overflow <= 1, f"the main area is {overflow} px wider than the page"
