"""Long work for views: run an ``explorer.core.jobs.Job`` and hand its progress to the page's loop.

Bokeh models may only change on the document's event loop; a job reports from its worker
thread. ``dispatch`` hops onto the loop (or calls directly when there is no served document:
notebooks, tests). ``LiveJob`` keeps only the newest progress report, flushes it at most every
``interval`` seconds with at most one flush queued (a slow page never piles up callbacks), and
stops its job when the browser session closes.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import panel as pn
from panel.io.state import set_curdoc

from explorer.core.errors import ExplorerError
from explorer.core.jobs import Job, JobContext, Progress

T = TypeVar("T")


def served_doc():
    """The current served document, or None (notebook, plain Python, tests without a server)."""
    doc = pn.state.curdoc
    return doc if doc is not None and doc.session_context is not None else None


def dispatch(doc, fn: Callable[[], None]) -> None:
    """Run ``fn`` on ``doc``'s event loop with its lock held; directly when ``doc`` is None."""
    if doc is None:
        fn()
        return
    with set_curdoc(doc):
        pn.state.execute(fn, schedule=True)


class LiveJob:
    """One job at a time for a view, with throttled updates on the page's loop.

    ``on_progress(progress, partial)`` and ``on_finish(job)`` always run on the loop (or on the
    caller's thread without a server). ``partial`` is the newest partial result reported.
    """

    def __init__(self, on_progress: Callable[[Progress, Any], None], on_finish: Callable[[Job], None],
                 interval: float = 0.15) -> None:
        self._on_progress = on_progress
        self._on_finish = on_finish
        self.interval = interval
        self.job: Job | None = None
        self._doc = None
        self._lock = threading.Lock()
        self._latest: tuple[Progress, Any] | None = None
        self._pending = False
        self._last = float("-inf")  # the first report flushes at once
        self._hooked = False

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.alive

    def start(self, fn: Callable[[JobContext], Any], name: str = "job", background: bool = True) -> Job:
        """Start ``fn(ctx)`` as a job. ``background=False`` runs it here (notebook/tests: blocks)."""
        if self.running:
            raise RuntimeError("a job is already running for this view")
        self._doc = served_doc()
        if self._doc is not None and not self._hooked:
            # Only inside a served session: elsewhere this would hook every future session.
            pn.state.on_session_destroyed(lambda _ctx: self.cancel())
            self._hooked = True
        with self._lock:
            self._latest, self._pending, self._last = None, False, float("-inf")
        self.job = Job(fn, name=name, on_progress=self._report, on_finish=self._finished)
        if background:
            self.job.start()
        else:
            try:
                self.job.run()
            except Exception:
                pass  # the job keeps its error; on_finish has shown it
        return self.job

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def begin(self, build: Callable[[], T], view: Any, error: str = "**{}**") -> T | None:
        """The request of a new job: ``build()``; None while a job runs, or when ``build`` raises an
        ExplorerError (bad input), which ``view.error`` then shows (formatted by ``error``)."""
        if self.running:
            return None
        try:
            return build()
        except ExplorerError as e:
            view.error = error.format(e)
            return None

    @staticmethod
    def failed(job: Job, view: Any, error: str) -> bool:
        """After ``job``: ``view.running`` off and, if the job failed, its error in ``view.error``
        (formatted by ``error``); True if it failed."""
        view.running = False
        if job.error:
            view.error = error.format(job.error)
            return True
        return False

    # worker thread ----------------------------------------------------------
    def _report(self, progress: Progress, partial: Any) -> None:
        with self._lock:
            keep = partial if partial is not None else (self._latest[1] if self._latest else None)
            self._latest = (progress, keep)
            due = time.monotonic() - self._last >= self.interval
            schedule = due and not self._pending
            if schedule:
                self._pending = True
        if schedule:
            dispatch(self._doc, self._flush)

    def _finished(self, job: Job) -> None:
        def finish() -> None:
            self._flush()
            self._on_finish(job)

        dispatch(self._doc, finish)

    # loop -----------------------------------------------------------------
    def _flush(self) -> None:
        with self._lock:
            latest, self._latest = self._latest, None
            self._pending = False
            self._last = time.monotonic()
        if latest is not None:
            with pn.io.hold():
                self._on_progress(*latest)


class QueuedRuns:
    """For views whose Run button does model work (``busy`` param, ``_compute_once`` coroutine).

    A request arriving while a run is in flight is not dropped: one more run follows, with the
    newest parameters, when the current one ends; further requests meanwhile merge into it.
    """

    _rerun = False

    async def compute(self) -> None:
        """Run ``_compute_once`` now, or once more after the run in flight."""
        if self.busy:
            self._rerun = True
            return
        self.busy = True
        try:
            while True:
                self._rerun = False
                await self._compute_once()
                if not self._rerun:
                    break
        finally:
            self.busy = False
