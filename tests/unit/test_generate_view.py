"""The Generate and Steering views driven without a browser, and their chart builders."""
from __future__ import annotations

import asyncio

import numpy as np
from bokeh.embed import json_item

from explorer.interventions.generate import generate
from explorer.interventions.steering import build_vector, steer_sweep, vector_bytes
from explorer.persistence.history import History
from widgets import steering_charts as sc
from widgets.generate_view import GenerateView
from widgets.steering_view import SteeringView

PROMPT = "The capital of France is"


def test_generate_view_streams_ab_and_shows_the_lens_column(tiny_sessions):
    session = tiny_sessions["llama"]
    history = History()
    view = GenerateView(session, history=history, prompt=PROMPT, max_new_tokens=6, chat=False)
    vec = build_vector(session, positive=("I love it",), negative=("I hate it",), layer=1)
    view.form.param.update(vector=vec, steer=True, alpha=3.0)
    view._live.interval = 0.0     # flush every token (the page throttles to 0.15 s)
    seen = []
    view.param.watch(lambda e: seen.append(list(e.new)), "texts")
    view.start(background=False)
    assert view.error == "" and not view.running, view.error
    r = view.result
    want = generate(session, PROMPT, max_new_tokens=6, intervention=view.form.intervention())
    assert r.baseline.token_ids.tolist() == want.baseline.token_ids.tolist()
    assert r.intervened.token_ids.tolist() == want.intervened.token_ids.tolist()
    assert view.texts == [r.baseline.text, r.intervened.text] and len(seen) >= 2   # streamed, then final
    assert [e.result for e in history.entries] == [r]
    assert all(s.object is not None and s.object.name == sc.TOKEN_STRIP for s in view._strips)
    view.select_token(2)
    assert view._ranks.object.name == sc.RANK_CHART and "L2" in view._column.object
    json_item(view._ranks.object)   # serialisable
    # The token strip's tap selects a token.
    source = view._strips[1].object.select_one({"name": sc.TOKEN_SOURCE})
    source.selected.indices = [4]
    assert view.token == 4
    # Picking a token leaves the others readable (Bokeh's default faded them to alpha 0.1).
    for renderer in view._strips[1].object.renderers:
        glyph = renderer.nonselection_glyph
        alphas = [getattr(glyph, a) for a in ("fill_alpha", "line_alpha", "text_alpha") if hasattr(glyph, a)]
        assert alphas and all(a == 1.0 for a in alphas), (type(glyph).__name__, alphas)


def test_generate_view_stop_and_errors(tiny_sessions):
    session = tiny_sessions["llama"]
    view = GenerateView(session, prompt=PROMPT, max_new_tokens=40, lens=False, chat=False)
    stopped = []

    def stop_after_three(progress, partial):
        stopped.append(progress.done)
        if progress.done == 3:
            view.param.trigger("stop")

    view._live._on_progress = stop_after_three
    view._live.interval = 0.0
    view.start(background=False)
    assert view.result.baseline.stop_reason == "stopped" and len(view.result.baseline.token_ids) <= 4
    view.form.steer = True       # no vector yet: a clear error, nothing runs
    view.start(background=False)
    assert "Steering tab" in view.error
    view.form.param.update(steer=False, components="9.9")
    view.start(background=False)
    assert "out of range" in view.error and not view.running


def test_steering_view_builds_applies_and_sweeps(tiny_sessions, tmp_path):
    session = tiny_sessions["gpt2"]
    history = History()
    view = SteeringView(session, history=history, layer=1)
    asyncio.run(view._on_build())
    assert view.error == "" and view.vector is not None
    assert "read at" in view._vector_pane.object and "movie" in view._vector_pane.object
    asyncio.run(view._on_apply())
    assert "steered" in view._apply_pane.object
    view.param.update(alphas="-2,0,2", text_alphas="2")
    view.start_sweep(background=False)
    r = view.sweep_result
    assert r is not None and r.complete and view.error == ""
    want = steer_sweep(session, view.sweep_request())
    np.testing.assert_allclose(r.metric, want.metric, atol=1e-5)
    assert view._sweep_pane.object.name == sc.SWEEP_CHART and "α = 2" in view._texts_pane.object
    # Save, then load the bytes back; a list from an uploaded JSONL file.
    data = view._vector_file().getvalue()
    from safetensors.torch import load

    np.testing.assert_array_equal(load(data)["vector"].numpy(), load(vector_bytes(view.vector))["vector"].numpy())
    view.vector = None
    view.load_bytes(data)
    assert view.vector is not None and view.error == ""
    view._read_list("positive", b'{"text": "a"}\n{"text": "b"}\n', "p.jsonl")
    assert view.positive == "a\nb"
    view.load_bytes(b"junk")
    assert "Cannot load" in view.error


def test_sweep_chart_of_a_partial_result(tiny_sessions):
    session = tiny_sessions["llama"]
    vec = build_vector(session, positive=("I love it",), negative=("I hate it",), layer=1)
    full = steer_sweep(session, PROMPT, target=" Paris", vector=vec, alphas=(-1, 0, 1))
    metric = full.metric.copy()
    metric[2] = np.nan
    import dataclasses

    partial = dataclasses.replace(full, metric=metric, done=2)
    fig = sc.sweep_chart(partial)
    json_item(fig)
    assert any("2 of 3" in getattr(t, "text", "") for t in fig.below + fig.above)
