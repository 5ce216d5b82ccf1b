"""A closed session's app is destroyed and garbage-collected: served for real, sessions opened and
closed by a bokeh websocket client (no browser: Playwright's sync API keeps references to
panel objects alive in the test process itself, so the browser tests cannot check this)."""
from __future__ import annotations

import gc
import weakref

from bokeh.client import pull_session
from panel.tests.util import serve_and_wait, wait_until

from explorer.analyses.lens import LensRequest, logit_lens
from widgets.app import ExplorerApp, drop_state_watchers, session_options


def test_closed_sessions_apps_are_collected(tiny_sessions):
    session = tiny_sessions["llama"]
    apps: list[weakref.ref] = []
    strong: list[ExplorerApp] = []  # until each session has been opened and used

    def factory():
        app = ExplorerApp(session)
        apps.append(weakref.ref(app))
        strong.append(app)
        return app.template()

    port = serve_and_wait(factory, **session_options(unused_session_lifetime_ms=500, check_unused_sessions_ms=200))
    for i in range(3):
        client = pull_session(url=f"http://localhost:{port}/")
        wait_until(lambda: len(apps) == i + 1, timeout=20_000)
        app = strong.pop()
        app.history.add(logit_lens(session, LensRequest(f"Session {i} says hello", top_k=3)), "lens")
        assert app._page is not None and len(app.history) == 1
        del app
        client.close()
    strong.clear()
    # destroyed (its cleanup ran: Page watchers on pn.state dropped) and collected
    wait_until(lambda: gc.collect() >= 0 and all(ref() is None for ref in apps), timeout=30_000)


def test_drop_state_watchers_removes_a_pages_reference_watchers(tiny_sessions):
    """The Page syncs its busy indicator with ``pn.state.param.busy`` through a watcher whose
    callback is a method of the Page's ``.param``: the app's close drops it (and only it)."""
    import panel as pn

    before = sum(len(ws) for what in pn.state.param.watchers.values() for ws in what.values())
    app = ExplorerApp(tiny_sessions["llama"])
    page = app.template()
    added = sum(len(ws) for what in pn.state.param.watchers.values() for ws in what.values()) - before
    assert added >= 1
    assert drop_state_watchers(page) == added
    assert sum(len(ws) for what in pn.state.param.watchers.values() for ws in what.values()) == before


def test_a_closed_history_keeps_nothing_added_later(tiny_sessions):
    """A job that ends after its session closed (a cancelled sweep's partial result) adds nothing."""
    from explorer.persistence.history import History

    history = History()
    seen = []
    history.on_add(seen.append)
    result = logit_lens(tiny_sessions["llama"], LensRequest("one two three", top_k=3))
    history.add(result, "before")
    history.close()
    history.add(result, "after")
    assert len(history) == 0 and history.entries == () and [e.label for e in seen] == ["before"]
