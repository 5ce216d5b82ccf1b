"""The heads view without a browser: chart builders on real head results, the view driven by
its params (tiny Llama with grouped-query attention, and GPT-2)."""
from __future__ import annotations

import asyncio
import logging

import numpy as np
import panel as pn
import pytest
from bokeh.document import Document
from bokeh.events import Tap
from bokeh.models import ColumnDataSource, DataTable, HoverTool, LinearColorMapper

from explorer.analyses import heads as heads_engine
from explorer.analyses.heads import ROLE_OF_SCORE, HeadScores, HeadsRequest, attention_patterns, head_scores
from explorer.persistence.history import History
from widgets import ExplorerApp, HeadsView
from widgets import heads_charts as hc
from widgets import heads_view as heads_view_module

PROMPT = "The cat sat on the mat. The cat sat on the mat."
OTHER = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def llama(tiny_sessions):
    return tiny_sessions["llama"]  # 3 layers, 4 query heads sharing 2 KV heads


@pytest.fixture(scope="module")
def scores(llama) -> HeadScores:
    return head_scores(llama, HeadsRequest(PROMPT))


@pytest.fixture(scope="module")
def attention(llama, scores):
    return attention_patterns(llama, PROMPT)


@pytest.fixture
def no_model(monkeypatch):
    """Make any model work fail loudly: for changes that must not need the model."""

    def fail(*args, **kwargs):
        raise AssertionError("the model was used")

    monkeypatch.setattr(heads_view_module, "head_scores", fail)
    monkeypatch.setattr(heads_view_module, "attention_patterns", fail)
    monkeypatch.setattr(heads_engine, "_run", fail)  # every heads trace goes through it


def run(view: HeadsView) -> None:
    asyncio.run(view.compute())


def grid_source(view_or_fig) -> ColumnDataSource:
    fig = view_or_fig._grid.object if isinstance(view_or_fig, HeadsView) else view_or_fig
    return fig.select_one({"name": hc.GRID_SOURCE})


def table_source(view: HeadsView) -> ColumnDataSource:
    return view._table.object.select_one({"name": hc.TABLE_SOURCE})


def as_array(data: dict, column: str, shape: tuple[int, int]) -> np.ndarray:
    """A per-head column back as [layers, heads], whatever the row order."""
    out = np.full(shape, np.nan)
    for layer, head, value in zip(data["layer"], data["head"], data[column]):
        out[layer, head] = value
    return out


# ------------------------------------------------------------------- charts
def test_kv_groups_follow_grouped_query_attention():
    assert [hc.kv_group(h, 9, 3) for h in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # SmolLM2
    assert [hc.kv_group(h, 4, 2) for h in range(4)] == [0, 0, 1, 1]
    assert [hc.kv_group(h, 4, None) for h in range(4)] == [0, 1, 2, 3]  # one KV head per head
    assert hc.head_label(17, 4) == "17.4" and hc.chip_label(17, 4) == "17.4"  # one convention: the spec
    assert heads_engine.parse_head(hc.chip_label(17, 4)) == (17, 4)
    assert set(hc.ROLE_LETTERS) == set(ROLE_OF_SCORE.values())  # every engine role has a letter


@pytest.mark.parametrize("score", list(hc.SCORES))
def test_grid_cells_equal_the_engine_scores(scores, score):
    fig = hc.heads_grid(scores, score, n_kv_heads=2)
    assert fig.name == hc.GRID
    data = grid_source(fig).data
    shape = (scores.n_layers, scores.n_heads)
    assert len(data["value"]) == scores.n_layers * scores.n_heads
    assert len(set(zip(data["layer"], data["head"]))) == len(data["value"])  # each head once
    np.testing.assert_allclose(as_array(data, "value", shape), getattr(scores, score), rtol=0, atol=1e-6)
    for name in hc.SCORES:  # every score of every head rides along for the hover
        np.testing.assert_allclose(as_array(data, name, shape), getattr(scores, name), rtol=0, atol=1e-6)
    assert data["kv"] == [hc.kv_group(h, 4, 2) for h in data["head"]]
    assert list(fig.y_range.factors) == [str(i) for i in range(scores.n_layers)]  # layer 0 at the bottom
    assert list(fig.x_range.factors) == [str(i) for i in range(scores.n_heads)]
    hover = fig.select_one({"type": HoverTool}).tooltips
    assert all(f"@{name}" in hover for name in hc.SCORES) and "KV group @kv" in hover and "@role" in hover


def test_grid_palettes(scores):
    mapper = hc.heads_grid(scores, "dla").select_one({"type": LinearColorMapper})
    bound = float(np.abs(scores.dla).max())
    assert mapper.low == pytest.approx(-bound) and mapper.high == pytest.approx(bound)  # centred on 0
    assert mapper.palette[0] != mapper.palette[-1] and len(mapper.palette) == 256
    mapper = hc.heads_grid(scores, "induction").select_one({"type": LinearColorMapper})
    assert (mapper.low, mapper.high) == (0.0, 1.0)  # attention shares on a fixed scale
    mapper = hc.heads_grid(scores, "entropy").select_one({"type": LinearColorMapper})
    assert mapper.high == pytest.approx(float(scores.entropy.max()))
    with pytest.raises(ValueError):
        hc.heads_grid(scores, "nope")


def test_grid_marks_roles_at_the_threshold(scores):
    for threshold in (0.0, 0.3, 1.01):
        data = grid_source(hc.heads_grid(scores, "bos", threshold)).data
        roles = scores.roles(threshold)
        for layer, head, role, marks in zip(data["layer"], data["head"], data["role"], data["marks"]):
            expected = roles.get((layer, head), ())
            assert role == hc.role_text(expected)
            assert marks == "".join(hc.ROLE_LETTERS[r] for r in expected)
    # Threshold 0: every head has every role; above 1: none has any.
    assert set(grid_source(hc.heads_grid(scores, "bos", 0.0)).data["marks"]) == {"PIDS"}
    assert set(grid_source(hc.heads_grid(scores, "bos", 1.01)).data["marks"]) == {""}


def test_grid_outlines_the_selected_heads_and_maps_clicks_to_cells(scores):
    selected = [(2, 1), (0, 3)]
    fig = hc.heads_grid(scores, "induction", selected=selected)
    source = grid_source(fig)
    outlines = [r for r in fig.renderers if r.data_source is not source and r.glyph.__class__.__name__ == "Rect"]
    assert [(r.data_source.data["y"][0], r.data_source.data["x"][0]) for r in outlines] == [("2", "1"), ("0", "3")]
    assert [r.glyph.line_color for r in outlines] == list(hc.HEAD_COLORS[:2])
    # Factor i spans [i, i + 1] on a categorical axis: a click's coordinates name its cell.
    assert hc.grid_cell(scores, 1.5, 2.5) == (2, 1)
    assert hc.grid_cell(scores, 0.01, 0.99) == (0, 0)
    assert hc.grid_cell(scores, scores.n_heads - 0.01, scores.n_layers - 0.01) == (scores.n_layers - 1,
                                                                                    scores.n_heads - 1)
    assert hc.grid_cell(scores, -0.2, 1.0) is None and hc.grid_cell(scores, 1.0, scores.n_layers + 0.1) is None
    assert hc.grid_cell(scores, None, 1.0) is None


def test_table_rows_equal_the_engine_and_follow_the_threshold(scores):
    table = hc.heads_table(scores, 0.3, n_kv_heads=2, sort_by="induction")
    assert isinstance(table, DataTable) and table.name == hc.TABLE and table.sortable
    data = table.source.data
    shape = (scores.n_layers, scores.n_heads)
    for name in hc.SCORES:
        np.testing.assert_allclose(as_array(data, name, shape), getattr(scores, name), rtol=0, atol=1e-6)
    assert data["induction"] == sorted(data["induction"], reverse=True)
    assert data["label"][0] == hc.head_label(*scores.top("induction", 1)[0][:2])
    roles = scores.roles(0.3)
    assert data["role"] == [hc.role_text(roles.get((l, h), ())) for l, h in zip(data["layer"], data["head"])]
    assert data["kv"] == [h // 2 for h in data["head"]]
    titles = [c.title for c in table.columns]
    assert "KV group" in titles and "role (≥ 0.30)" in titles
    # Entropy sorts lowest first: the most focused heads on top.
    entropy = hc.heads_table(scores, sort_by="entropy").source.data["entropy"]
    assert entropy == sorted(entropy)


def test_pattern_figures_and_lines_carry_the_engine_weights(attention):
    one = attention.head(1, 2)
    fig = hc.pattern_figure(one, n_heads=4, n_kv_heads=2)
    data = fig.select_one({"name": hc.pattern_source_name(1, 2)}).data
    t = len(attention.tokens)
    np.testing.assert_array_equal(np.array(data["weight"], dtype=np.float32).reshape(t, t),
                                  attention.patterns[1, 2])
    assert data["q"][t + 1] == 1 and data["k"][t + 1] == 1
    assert "KV group 1" in fig.title.text and fig.title.text.startswith("Head 1.2")
    assert list(fig.x_range.factors) == hc.position_labels(attention.tokens)

    two = [attention.head(1, 2), attention.head(0, 0)]
    grid = hc.pattern_heatmaps(two, 4, 2)
    assert grid.name == hc.PATTERNS
    assert grid.select_one({"name": hc.pattern_source_name(0, 0)}) is not None

    lines = hc.pattern_lines(two, 4, 2)
    assert lines.name == hc.LINES
    segments = [r for r in lines.renderers if r.glyph.__class__.__name__ == "Segment"]
    assert [r.glyph.line_color for r in segments] == list(hc.HEAD_COLORS[:2])  # distinct colours
    for pattern, renderer in zip(two, segments):
        d = renderer.data_source.data
        assert renderer.data_source.name == hc.line_source_name(pattern.layer, pattern.head)
        # Exactly the weights ≥ the cut, each from its query (left) to its key (right).
        q, k = np.nonzero(pattern.pattern >= hc.MIN_LINE_WEIGHT)
        assert d["q"] == q.tolist() and d["k"] == k.tolist()
        np.testing.assert_array_equal(np.array(d["weight"], dtype=np.float32), pattern.pattern[q, k])
        assert d["y0"] == [-float(i) for i in q] and d["y1"] == [-float(i) for i in k]
        assert all(k_ <= q_ for q_, k_ in zip(d["q"], d["k"]))  # causal: never a later key
    legend = [item.label.value for item in lines.legend[0].items]
    assert legend == ["1.2 (KV group 1)", "0.0 (KV group 0)"]
    with pytest.raises(ValueError):
        hc.pattern_lines([])


# --------------------------------------------------------------------- view
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_view_runs_and_shows_the_engine_scores(tiny_sessions, family):
    session = tiny_sessions[family]
    history = History()
    view = HeadsView(session, history=history, prompt=OTHER)
    assert view.result is None and view._grid.object is None
    view.param.trigger("run")  # no event loop running: the async handler runs to completion
    assert view.error == "" and not view.busy
    expected = head_scores(session, HeadsRequest(OTHER))
    shape = (expected.n_layers, expected.n_heads)
    grid = grid_source(view).data
    np.testing.assert_allclose(as_array(grid, "value", shape), expected.induction, rtol=0, atol=1e-6)
    table = table_source(view).data
    for name in hc.SCORES:
        np.testing.assert_allclose(as_array(table, name, shape), getattr(expected, name), rtol=0, atol=1e-6)
    n_kv = session.info().n_kv_heads
    assert table["kv"] == [hc.kv_group(h, expected.n_heads, n_kv) for h in table["head"]]
    assert f"DLA target {hc.quote_token(expected.target)}" in view.status
    assert view.attention is not None and view.attention.patterns.shape[:2] == shape
    assert [type(e.result) for e in history.entries] == [HeadScores]
    # Another score recolours the grid from the same result.
    view.score = "dla"
    np.testing.assert_allclose(as_array(grid_source(view).data, "value", shape), expected.dla, rtol=0, atol=1e-9)


def test_view_uses_one_head_scores_call(llama, monkeypatch):
    calls = []
    real = heads_view_module.head_scores
    monkeypatch.setattr(heads_view_module, "head_scores", lambda *a, **k: calls.append(a) or real(*a, **k))
    traces = []
    real_run = heads_engine._run
    monkeypatch.setattr(heads_engine, "_run", lambda *a, **k: traces.append(a) or real_run(*a, **k))
    view = HeadsView(llama, prompt="A prompt seen by no other test, twice. A prompt seen by no other test, twice.")
    run(view)
    assert view.error == "" and len(calls) == 1 and len(traces) == 1  # one trace for the whole tab
    view.selected = ["0.1", "2.3"]
    view.threshold = 0.2
    assert len(calls) == 1 and len(traces) == 1


def test_threshold_changes_roles_without_the_model(llama, scores, attention, no_model):
    view = HeadsView(llama)
    view.param.update(result=scores, attention=attention)  # what a finished run publishes
    grid, table = view._grid.object, view._table.object
    for threshold in (0.05, 0.6, 1.0):
        view.threshold = threshold
        roles = scores.roles(threshold)
        data = table_source(view).data
        assert data["role"] == [hc.role_text(roles.get((l, h), ())) for l, h in zip(data["layer"], data["head"])]
        marks = grid_source(view).data["marks"]
        assert marks == ["".join(hc.ROLE_LETTERS[r] for r in roles.get((l, h), ()))
                         for l in range(scores.n_layers) for h in range(scores.n_heads)]
    assert view._grid.object is not grid and view._table.object is not table
    assert view.error == ""


def test_selecting_a_head_shows_its_pattern_without_the_model(llama, scores, attention, no_model):
    reference = attention  # attention_patterns(llama, PROMPT), computed before the model was disabled
    view = HeadsView(llama)
    view.param.update(result=scores, attention=reference)
    assert view._lines.object is None and view._patterns.objects == []
    view.selected = ["2.1"]
    (pane,) = view._patterns.objects
    data = pane.object.select_one({"name": hc.pattern_source_name(2, 1)}).data
    t = len(reference.tokens)
    np.testing.assert_array_equal(np.array(data["weight"], dtype=np.float32).reshape(t, t),
                                  reference.patterns[2, 1])
    assert view._lines.object.select_one({"name": hc.line_source_name(2, 1)}) is not None
    assert "**2.1** (KV group 0)" in view.selection_text  # heads 0-1 share KV head 0


def test_pattern_matches_attention_patterns(llama):
    view = HeadsView(llama, prompt=PROMPT, selected=["1.3"])
    run(view)
    reference = attention_patterns(llama, PROMPT).patterns[1, 3]
    data = view._patterns.objects[0].object.select_one({"name": hc.pattern_source_name(1, 3)}).data
    np.testing.assert_array_equal(np.array(data["weight"], dtype=np.float32).reshape(reference.shape), reference)


def tap(view: HeadsView, layer: int, head: int, **modifiers) -> None:
    """What a click on a grid cell sends: a Tap event at the cell's centre (plot coordinates)."""
    fig = view._grid.object
    fig._trigger_event(Tap(fig, x=head + 0.5, y=layer + 0.5,
                           modifiers={"shift": False, "ctrl": False, "alt": False, **modifiers}))


def test_grid_clicks_select_and_overlay_heads(llama, scores, attention, no_model):
    history = History()
    view = HeadsView(llama, history=history)
    view.param.update(result=scores, attention=attention)
    tap(view, 1, 0)
    assert view.selected == ["1.0"]
    tap(view, 2, 3, shift=True)  # shift-click adds
    assert view.selected == ["1.0", "2.3"]
    assert [p.object.name for p in view._patterns.objects] == ["heads-pattern-1.0", "heads-pattern-2.3"]
    for i, (layer, head) in enumerate([(1, 0), (2, 3)]):
        data = view._patterns.objects[i].object.select_one({"name": hc.pattern_source_name(layer, head)}).data
        np.testing.assert_array_equal(np.array(data["weight"], dtype=np.float32),
                                      attention.patterns[layer, head].ravel())
    segments = [r for r in view._lines.object.renderers if r.glyph.__class__.__name__ == "Segment"]
    assert [r.data_source.name for r in segments] == [hc.line_source_name(1, 0), hc.line_source_name(2, 3)]
    assert segments[0].glyph.line_color != segments[1].glyph.line_color
    outlines = [r for r in view._grid.object.renderers
                if r.data_source is not grid_source(view) and r.glyph.__class__.__name__ == "Rect"]
    assert len(outlines) == 2  # the rebuilt grid outlines both
    # The shown results are in the history: the patterns once, each shown head once.
    types = [type(e.result).__name__ for e in history.entries]
    assert types == ["AttentionResult", "HeadPattern", "HeadPattern"]
    assert [(e.result.layer, e.result.head) for e in history.entries[1:]] == [(1, 0), (2, 3)]
    tap(view, 0, 2, ctrl=True)  # ctrl-click adds too
    assert view.selected == ["1.0", "2.3", "0.2"]
    tap(view, 2, 3, ctrl=True)  # and removes a head already shown
    assert view.selected == ["1.0", "0.2"]
    tap(view, 0, 2)  # a plain click: that head alone
    assert view.selected == ["0.2"]
    tap(view, 0, 2)  # a plain click on the one head shown clears it
    assert view.selected == [] and view._patterns.objects == [] and view._lines.object is None
    # A grid's clicks are ignored once a new result replaced it (a copy: a different object).
    old = view._grid.object
    view.result = HeadScores.from_dict(scores.to_dict())
    old._trigger_event(Tap(old, x=0.5, y=0.5, modifiers={"shift": False, "ctrl": False, "alt": False}))
    assert view.selected == []
    tap(view, 0, 0)
    assert view.selected == ["0.0"]
    # Clicks outside the cells (e.g. on the axes) change nothing.
    view._grid.object._trigger_event(Tap(view._grid.object, x=-0.3, y=0.5))
    assert view.selected == ["0.0"]


def test_overlay_keeps_at_most_max_heads(llama, scores, attention, no_model):
    view = HeadsView(llama)
    view.param.update(result=scores, attention=attention)
    heads = [(l, h) for l in range(scores.n_layers) for h in range(scores.n_heads)]
    assert len(heads) > hc.MAX_OVERLAY
    view.select_heads(heads)
    assert view.selected == [hc.chip_label(*h) for h in heads[-hc.MAX_OVERLAY:]]
    assert len(view._patterns.objects) == hc.MAX_OVERLAY
    view.selected = [hc.chip_label(*h) for h in heads]  # typed into the chips
    assert len(view.selected) == hc.MAX_OVERLAY
    with pytest.raises(ValueError):
        view.selected = ["9.9"]  # not a head of this model


@pytest.mark.parametrize("prompt, target, message", [
    ("   ", "", "the prompt is empty"),
    ("The", "", "at least 2 tokens"),
    (PROMPT, " xyzzyplughfrobnicate", "pick a single token"),
    (PROMPT, "#999999999", "outside the vocabulary"),
])
def test_errors_are_shown_and_the_previous_result_kept(llama, prompt, target, message):
    view = HeadsView(llama, prompt=OTHER, selected=["0.1"])
    run(view)
    assert view.error == ""
    previous = (view.result, view.attention, view._grid.object, view._table.object, view._lines.object)
    view.param.update(prompt=prompt, target=target)
    run(view)
    assert message in view.error and view.error.startswith("**Could not compute head scores:**")
    assert (view.result, view.attention, view._grid.object, view._table.object, view._lines.object) == previous
    assert not view.busy
    view.param.update(prompt=OTHER, target="")
    run(view)
    assert view.error == ""


def test_unexpected_errors_are_shown_and_logged(llama, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(heads_view_module, "head_scores", broken)
    view = HeadsView(llama, prompt="Another prompt for the broken engine")
    with caplog.at_level(logging.ERROR, logger=heads_view_module.__name__):
        run(view)
    assert "Unexpected error" in view.error and "boom" in view.error
    assert "compute head scores failed" in caplog.text
    assert not view.busy


def test_view_keeps_the_loop_free_and_queues_a_second_request(llama):
    view = HeadsView(llama, prompt="A different prompt for the queue test")

    async def scenario():
        task = asyncio.create_task(view.compute())
        await asyncio.sleep(0)  # the run has started and waits on its worker thread
        assert view.busy
        await view.compute()  # while busy: remembered, not dropped
        assert view._rerun
        await task

    asyncio.run(scenario())
    assert not view.busy and view.result is not None


def test_view_renders_for_a_notebook(llama, scores, attention):
    view = HeadsView(llama, selected=["0.0", "1.1"])
    assert pn.panel(view).get_root(Document()) is not None
    view.param.update(result=scores, attention=attention)
    assert pn.panel(view).get_root(Document()) is not None
    assert "Attention of **0.0**" in view.selection_text


def test_app_has_the_heads_tab_sharing_the_history(llama):
    app = ExplorerApp(llama)
    names = list(app._tabs._names)
    assert names.index("Heads") == names.index("Logit lens") + 1
    assert isinstance(app.heads, HeadsView) and app.heads.history is app.history
    assert pn.panel(app).get_root(Document()) is not None
