"""LiveJob without a server: updates and the finish call arrive, in order, on the caller's side."""
from __future__ import annotations

import threading

from explorer.core.jobs import CANCELLED, DONE, FAILED
from widgets.live import LiveJob, dispatch


def counting(n, gate=None):
    def fn(ctx):
        done = 0
        for i in range(n):
            if ctx.cancelled:
                break
            if gate is not None:
                gate.wait()
            done = i + 1
            ctx.report(done, n, partial=list(range(done)))
        return done
    return fn


def test_foreground_job_reports_progress_and_finishes():
    seen, finished = [], []
    live = LiveJob(lambda p, part: seen.append((p.done, len(part))), finished.append, interval=0.0)
    job = live.start(counting(5), background=False)
    assert job.status == DONE and job.result == 5
    assert seen[-1] == (5, 5) and all(a == b for a, b in seen)
    assert finished == [job]


def test_throttling_keeps_the_newest_report():
    seen = []
    live = LiveJob(lambda p, part: seen.append(p.done), lambda job: None, interval=3600)
    live.start(counting(50), background=False)
    # The first report flushes at once; the rest are held back by the interval and the
    # newest one is flushed when the job finishes.
    assert seen == [1, 50]


def test_cancel_stops_a_background_job_and_keeps_what_finished():
    gate = threading.Event()
    finished = threading.Event()
    live = LiveJob(lambda p, part: None, lambda job: finished.set(), interval=0.0)
    job = live.start(counting(1000, gate))
    assert live.running
    gate.set()
    live.cancel()
    assert finished.wait(10)
    assert job.status == CANCELLED and 0 <= job.result < 1000


def test_errors_reach_on_finish():
    def boom(ctx):
        raise ValueError("bad input")

    finished = []
    LiveJob(lambda p, part: None, finished.append).start(boom, background=False)
    assert finished[0].status == FAILED and "bad input" in finished[0].error


def test_dispatch_without_a_document_calls_directly():
    calls = []
    dispatch(None, lambda: calls.append(1))
    assert calls == [1]
