"""Helpers shared by the browser tests (a plain module: see tests/tiny_models.py on why)."""
from __future__ import annotations

import re

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


def serve_explorer(page, session, tab: str | None = None, ready: str | None = None):
    """Serve the real app (one ExplorerApp per browser session), open ``tab``, wait for the CSS
    selector ``ready`` to be visible; return (the ExplorerApp, the console messages)."""
    from widgets.app import ExplorerApp

    apps: list[ExplorerApp] = []

    def factory():
        app = ExplorerApp(session)
        apps.append(app)
        return app.template()

    messages, _ = serve_component(page, factory)
    wait_until(lambda: len(apps) == 1, page)
    if tab is not None:
        page.locator(".explorer-tabs .bk-tab", has_text=re.compile(f"^{re.escape(tab)}$")).click()
    if ready is not None:
        expect(page.locator(ready)).to_be_visible()
    return apps[0], messages
