"""The probes and patchscope views driven without a browser, and their chart builders' sizes."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from bokeh.embed import json_item

from explorer.analyses.patchscope import PatchscopeRequest, PatchscopeResult, patchscope
from explorer.persistence.history import History
from widgets import probe_charts as pc
from widgets.patchscope_view import PatchscopeView
from widgets.probes_view import FILE, ProbesView


def write_data(tmp_path, truth=False):
    path = tmp_path / "d.jsonl"
    rows = []
    for i in range(10):
        if truth:
            rows += [{"text": f"Item {i} is apple.", "label": "true", "group": str(i)},
                     {"text": f"Item {i} is engine.", "label": "false", "group": str(i)}]
        else:
            rows += [{"text": f"word {i} apple", "label": "fruit"}, {"text": f"word {i} engine", "label": "machine"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_probes_view_runs_fills_the_chart_and_saves(tiny_sessions, tmp_path):
    history = History()
    view = ProbesView(tiny_sessions["llama"], history=history, background=False)
    assert "facts" in view.param.dataset.objects and FILE in view.param.dataset.objects
    view.param.update(dataset=FILE, path=str(write_data(tmp_path)), site="mean", folds=4)
    job = view.start()
    assert job is not None and job.error is None, view.error
    assert view.result.complete and not view.busy and view.error == ""
    assert view._chart.object is not None and view._chart.object.name == pc.PROBE_CURVE
    assert [e.result for e in history.entries] == [view.result]
    if view.result.best_row > 0:
        data = view._vector_file().getvalue()
        from safetensors.torch import load
        assert load(data)["vector"].shape == (view.session.hf.config.hidden_size,)
        assert not view._save_vector.disabled


def test_probes_view_with_ccs(tiny_sessions, tmp_path):
    view = ProbesView(tiny_sessions["llama"], background=False)
    view.param.update(dataset=FILE, path=str(write_data(tmp_path, truth=True)), folds=2, with_ccs=True, ccs_epochs=10)
    view.start()
    assert view.error == "" and view.ccs_result is not None and view.result is not None
    from bokeh.models import GlyphRenderer

    renderers = view._chart.object.select({"type": GlyphRenderer})
    assert len(renderers) >= 7  # probe band/line/dots, control, CCS line/dots, supervised, lens


def test_probes_view_shows_errors_and_keeps_running(tiny_sessions, tmp_path):
    view = ProbesView(tiny_sessions["llama"], background=False)
    view.param.update(dataset=FILE, path=str(tmp_path / "missing.jsonl"))
    assert view.start() is None and "not found" in view.error
    view.param.update(path=str(write_data(tmp_path)), with_ccs=True)
    assert view.start() is None and "true/false" in view.error


def test_probe_curve_from_a_partial_result_and_sizes(tiny_sessions, tmp_path):
    from explorer.analyses.probes import run_probes

    seen = []

    class Ctx:
        cancelled = False

        def report(self, done, total, partial=None, message=""):
            if partial is not None:
                seen.append(pc.probe_curve(partial))

    run_probes(tiny_sessions["gpt2"], texts=("a b", "c d", "e f", "g h"), labels=("x", "y", "x", "y"), folds=2,
               ctx=Ctx())
    assert seen and all(f.height <= pc.MAX_PX for f in seen)
    json_item(seen[0])  # serialises with NaN rows not yet done


def synthetic_patchscope(n_layers: int, n_pos: int) -> PatchscopeResult:
    k = 3
    ids = np.zeros((n_layers, n_pos, k), dtype=np.int64)
    return PatchscopeResult(
        request=PatchscopeRequest("x"), model="m", tokens=np.array([f"t{i}" for i in range(n_pos)]),
        positions=np.arange(n_pos), layer_labels=tuple(f"L{i}" for i in range(n_layers)),
        identity_tokens=np.array(["?"]), placeholder=0, top_ids=ids, top_tokens=np.full(ids.shape, "tok"),
        top_probs=np.full(ids.shape, 0.5, dtype=np.float32))


@pytest.mark.parametrize("n_layers,n_pos", [(4, 3), (30, 2000), (600, 5)])
def test_patchscope_grid_never_exceeds_the_limit(n_layers, n_pos):
    result = synthetic_patchscope(n_layers, n_pos)
    fig = pc.patchscope_grid(result)
    assert fig.width <= pc.MAX_PX and fig.height <= pc.MAX_PX
    lo, hi = pc.patchscope_window(result)
    assert hi == n_pos and len(fig.x_range.factors) == hi - lo
    assert pc.patchscope_window(result, start=0)[0] == 0


def test_patchscope_view(tiny_sessions):
    history = History()
    view = PatchscopeView(tiny_sessions["llama"], history=history, prompt="one two three", top_k=3)
    asyncio.run(view._compute_once())
    assert view.error == "" and view.result is not None and view.result.top_ids.shape[1] == 3
    assert view._grid.object is not None and "<table>" in view._topk.object
    view.select_cell(0, 0)
    assert "L0" in view._topk.object
    assert history.entries[-1].result is view.result
    view.identity = ""
    asyncio.run(view._compute_once())
    assert "identity prompt" in view.error and view.result is not None


def test_a_long_prompt_is_patched_at_one_window_of_positions(tiny_sessions):
    """A 1,000-token prompt patched at every position took tens of minutes with no progress: the
    view patches one grid's window, the last positions or from the one typed."""
    session = tiny_sessions["llama"]
    from widgets.patchscope_view import LONG_WINDOW

    width = LONG_WINDOW
    view = PatchscopeView(session, prompt="one two three four " * 60, top_k=2)
    n = int(session.encode(view.prompt).numel())
    assert n > pc.patchscope_width() + 10
    asyncio.run(view._compute_once())
    assert view.error == "" and view.result.positions.tolist() == list(range(n - width, n))
    assert f"of {n} (positions {n - width}–{n - 1}" in view.status and view.start == n - width
    # the grid keeps its width (its box scrolls): squeezed by the row, its tokens overlapped
    assert view._grid.object.min_width == view._grid.object.width >= 70 * width
    direct = patchscope(session, PatchscopeRequest(view.prompt, (n - 1,), top_k=2))
    assert view.result.top_ids[:, -1].tolist() == direct.top_ids[:, 0].tolist()  # the engine's numbers
    view.start = 3
    asyncio.run(view._compute_once())
    assert view.result.positions.tolist() == list(range(3, 3 + width)) and view.start == 3
    view.prompt = "one two three"  # a short prompt: every position again
    asyncio.run(view._compute_once())
    assert view.result.positions.tolist() == list(range(len(view.result.tokens)))
