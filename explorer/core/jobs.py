"""Jobs: long work (sweeps, indexing, training) on a worker thread, with progress and cancel.

A job's function receives a ``JobContext``: it reports progress (and partial results) through
``ctx.report`` and checks ``ctx.cancelled`` between batches; when cancelled it returns what it
has finished, which becomes the job's result. Jobs know nothing of Panel: a UI subscribes with
callbacks (called on the worker thread) and hands the updates to its own event loop.
"""
from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from explorer.core.errors import ExplorerError

T = TypeVar("T")

PENDING, RUNNING, DONE, CANCELLED, FAILED = "pending", "running", "done", "cancelled", "error"


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    elapsed: float  # seconds since the job started
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far (None before the first unit finishes)."""
        if not self.done or not self.total:
            return None
        return self.elapsed / self.done * (self.total - self.done)


class JobContext:
    """Handed to a job's function: report progress, check for cancellation."""

    def __init__(self, job: Job) -> None:
        self._job = job

    @property
    def cancelled(self) -> bool:
        return self._job._stop.is_set()

    def report(self, done: int, total: int, partial: Any = None, message: str = "") -> None:
        self._job._report(done, total, partial, message)


class Job(Generic[T]):
    """Runs ``fn(ctx)`` on a daemon thread. ``status`` is pending/running/done/cancelled/error."""

    def __init__(self, fn: Callable[[JobContext], T], name: str = "job",
                 on_progress: Callable[[Progress, Any], None] | None = None,
                 on_finish: Callable[[Job[T]], None] | None = None) -> None:
        self.name = name
        self._fn = fn
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_progress = on_progress
        self._on_finish = on_finish
        self._t0 = 0.0
        self.status = PENDING
        self.progress = Progress(0, 0, 0.0)
        self.partial: Any = None
        self.result: T | None = None
        self.error: str | None = None

    def start(self) -> Job[T]:
        self._t0 = time.monotonic()
        self.status = RUNNING
        self._thread = threading.Thread(target=self._run, name=f"explorer-{self.name}", daemon=True)
        self._thread.start()
        return self

    def run(self) -> T:
        """Run on the calling thread (CLI, notebooks, tests); raises the job's error."""
        self._t0 = time.monotonic()
        self.status = RUNNING
        self._run()
        if self.status == FAILED:
            raise ExplorerError(self.error or "job failed")
        return self.result  # type: ignore[return-value]

    def cancel(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> T | None:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.result

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _report(self, done: int, total: int, partial: Any, message: str) -> None:
        self.progress = Progress(done, total, time.monotonic() - self._t0, message)
        if partial is not None:
            self.partial = partial
        if self._on_progress is not None:
            self._on_progress(self.progress, partial)

    def _run(self) -> None:
        try:
            self.result = self._fn(JobContext(self))
            self.status = CANCELLED if self._stop.is_set() else DONE
        except ExplorerError as e:
            self.error, self.status = str(e), FAILED
        except Exception as e:  # unexpected: keep the message for the user, the trace for the log
            self.error = f"{type(e).__name__}: {e}"
            self.status = FAILED
            traceback.print_exc()
        finally:
            if self._on_finish is not None:
                self._on_finish(self)


class Unfinished(Exception):
    """Raised by a computation that stopped early (cancelled) to carry its partial result out of
    ``session.cached`` without caching it; see ``cached_unless_cancelled``."""

    def __init__(self, partial: Any) -> None:
        super().__init__("cancelled")
        self.partial = partial


def cached_unless_cancelled(session, key, compute: Callable[[], T], ctx=None) -> T:
    """``session.cached(key, compute)`` for a job that may be cancelled: a ``compute`` that raises
    ``Unfinished(partial)`` returns the partial result, uncached (asking again recomputes); a
    complete result is cached and reported to ``ctx`` once more as done (a cache hit reports
    nothing else)."""
    try:
        result = session.cached(key, compute)
    except Unfinished as stop:
        return stop.partial
    if ctx is not None:
        ctx.report(result.done, result.total, partial=result, message="done")
    return result
