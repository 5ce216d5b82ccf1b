"""Threads sharing one ModelSession: analyses from several threads at once never corrupt each
other's traces (the model runs one job at a time under ``session.lock``)."""
from __future__ import annotations

import threading

from explorer.analyses.heads import HeadsRequest, head_scores
from explorer.analyses.lens import logit_lens


def test_lens_and_heads_from_four_threads(tiny_sessions):
    # The lens applies the final norm outside its trace; unlocked, that call fed another thread's
    # running heads trace (nnsight OutOfOrderError "model.model.norm.input ... already ran past it").
    session = tiny_sessions["llama"]
    errors: list[str] = []
    results: dict[int, list] = {}

    def work(i: int) -> None:
        try:
            for j in range(4):
                lens = logit_lens(session, f"Prompt number {i} round {j} is")
                heads = head_scores(session, HeadsRequest(f"The cat {i} sat on the mat {j}. The cat sat.", seed=i))
                results.setdefault(i, []).append((lens.request.prompt, heads.request.prompt))
        except Exception as e:  # collected: a thread's exception would not fail the test
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)  # no deadlock
    assert errors == []
    for i in range(4):  # each thread got its own results back
        assert [p for p, _ in results[i]] == [f"Prompt number {i} round {j} is" for j in range(4)]
