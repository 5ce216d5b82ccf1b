"""The default model served by a real NDIF stack on 127.0.0.1 (``make test-remote``): the lens,
heads, one ablation, a sweep and patching run remotely (``remote=True``) and match the same
analyses on the model loaded here.

The stack (tests/remote/stack.py) is started for this module and stopped by PID after it; set
``NDIF_TEST_HOST`` to use a stack that is already running instead. Prints the per-trace
overhead (remote vs local) and the stack's resident memory.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from explorer import ablate, attention_patterns, head_scores, logit_lens, patch, sweep
from explorer.analyses.lens import residual_streams
from explorer.core.defaults import ensure_default_model
from explorer.core.session import ModelSession
from helpers import assert_results_agree

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import Stack  # noqa: E402

PROMPT = "The capital of France is"
CORRUPT = "The capital of Italy is"
TOL = 1e-4  # float32 on the same CPU; batches of other sizes sum in another order


@pytest.fixture(scope="module")
def stack():
    host = os.environ.get("NDIF_TEST_HOST")
    if host:
        yield host, None
        return
    with Stack(ensure_default_model()) as running:
        yield running.host, running


@pytest.fixture(scope="module")
def sessions(stack):
    host, _ = stack
    model = str(ensure_default_model())
    remote = ModelSession.load(model, remote=True, ndif_host=host)
    local = ModelSession.load(model, device="cpu", dtype="float32")
    return remote, local


def assert_same(a, b, tol: float = TOL) -> None:
    assert_results_agree(a, b, tol)


def test_no_weights_here(sessions):
    remote, _ = sessions
    assert remote.remote.startswith("http://127.0.0.1")
    assert all(p.device.type == "meta" for p in remote.hf_blocks().parameters())
    assert remote.info().n_params == sessions[1].info().n_params  # W_U tied to the embeddings stays one


def test_lens(sessions):
    remote, local = sessions
    a, b = logit_lens(remote, PROMPT, top_k=5), logit_lens(local, PROMPT, top_k=5)
    assert_same(a, b, tol=1e-5)
    assert str(a.top_tokens[-1, -1, 0]) == " Paris"


def test_heads(sessions):
    remote, local = sessions
    assert_same(attention_patterns(remote, PROMPT), attention_patterns(local, PROMPT), tol=1e-5)
    assert_same(head_scores(remote, PROMPT, seq_len=8), head_scores(local, PROMPT, seq_len=8))


def test_ablation(sessions):
    remote, local = sessions
    kw = dict(components=("3.1", "mlp:2"), target=" Paris")
    assert_same(ablate(remote, PROMPT, **kw), ablate(local, PROMPT, **kw))


def test_sweep(sessions):
    remote, local = sessions
    a, b = sweep(remote, PROMPT, target=" Paris", kind="heads"), sweep(local, PROMPT, target=" Paris", kind="heads")
    assert a.complete and a.effects.shape == (30, 9)
    assert_same(a, b)


def test_patching(sessions):
    remote, local = sessions
    kw = dict(corrupt=CORRUPT, target=" Paris", compare_token=" Rome")
    a, b = patch(remote, PROMPT, **kw), patch(local, PROMPT, **kw)
    assert a.complete
    assert_same(a, b)


def test_overhead_and_memory(sessions, stack):
    """Per-trace time of the lens's residual-stream trace, remote vs local (median of 5)."""
    remote, local = sessions
    ids = remote.encode(PROMPT)

    def median(session) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            with torch.no_grad():
                residual_streams(session, [ids])
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    t_local, t_remote = median(local), median(remote)
    _, running = stack
    rss = running.rss() / 2**30 if running is not None else float("nan")
    print(f"\nper trace: local {t_local * 1e3:.0f} ms, remote {t_remote * 1e3:.0f} ms "
          f"(+{(t_remote - t_local) * 1e3:.0f} ms); stack RSS {rss:.2f} GiB")
    assert t_remote < t_local + 5.0
