"""Chart builders at the sizes that used to break them, and the conventions every chart shares.

Long inputs are synthetic results (tests/long_results.py) as long as the default model's context
(8,192 tokens): every builder must stay under the browsers' canvas limit, hold a bounded window of
positions with a real pan range over it, and say which positions it shows.
"""
from __future__ import annotations

import math

import long_results as lr
import numpy as np
import pytest
from bokeh.models import CDSView, FactorRange, IndexFilter, LayoutDOM, Plot, Range1d

from widgets import ablation_charts as ac
from widgets import charts
from widgets import heads_charts as hc
from widgets import intervention_charts as ic
from widgets import neuron_charts as nc
from widgets.chart_style import (
    FULL_AXIS_POSITIONS,
    MAX_CANVAS_PX,
    MUTED,
    chart_window,
    contrast,
    palette_color,
    position_axis,
    text_on,
)

N = lr.CONTEXT


@pytest.fixture(scope="module")
def lens():
    return lr.lens()


@pytest.fixture(scope="module")
def pattern():
    return lr.pattern()


def plots(model) -> list[Plot]:
    found = [model] if isinstance(model, Plot) else []
    return found + [p for p in model.select({"type": Plot}) if p is not model]


def assert_drawable(model) -> None:
    """Every plot in ``model`` (and a column of them) stays under the canvas limit."""
    assert isinstance(model, LayoutDOM)
    for plot in plots(model):
        for size in (plot.width, plot.height, plot.min_width, plot.min_height):
            assert size is None or size <= MAX_CANVAS_PX, (plot.name, plot.width, plot.height, plot.min_width)
        for size in (plot.frame_width, plot.frame_height):  # the plot area, with room for axes and notes
            assert size is None or size + 400 <= MAX_CANVAS_PX, (plot.name, plot.frame_width, plot.frame_height)
        # a fixed height (of the plot or its frame): nothing stretches a chart's height
        assert plot.height is not None or plot.frame_height is not None, plot.name
    heights = [p.height or p.frame_height + 400 for p in plots(model)]
    assert sum(heights) <= 4 * MAX_CANVAS_PX  # a layout of several stays a few screens tall


def assert_window(fig, total: int, held: int, shown: int, source_name: str, pos_column: str = "pos"):
    """The chart reports its window, holds exactly those positions, and pans over them."""
    window = chart_window(fig)
    assert window is not None, fig.name
    start, stop, n, view_start, view_stop = window
    assert n == total and 0 <= start < stop <= total and stop - start <= held
    assert start <= view_start < view_stop <= stop and view_stop - view_start <= shown
    source = fig.select_one({"name": source_name})
    held_positions = {p for p in source.data[pos_column] if p >= 0}
    assert held_positions == set(range(start, stop))  # the glyphs are the window, not every position
    note = " ".join(t.text for t in fig.below if getattr(t, "text", None))
    assert f"{view_start:,}–{view_stop - 1:,}" in note and "drag" in note
    if stop - start < total:
        assert f"{total:,}" in note and "result holds all" in note
    return window


def x_window(fig, window) -> None:
    """A real window: a numeric x range over the view, bounded to the held positions, and tick
    labels for the held positions only (no squashed axis of every token)."""
    start, stop, _, view_start, view_stop = window
    assert isinstance(fig.x_range, Range1d)
    assert (fig.x_range.start, fig.x_range.end) == (view_start - 0.5, view_stop - 0.5)
    lo, hi = fig.x_range.bounds
    assert hi == stop - 0.5 and lo in (start - 0.5, start - 1.5)
    assert set(fig.xaxis.major_label_overrides) <= set(range(start - 1, stop))


# ------------------------------------------------------------------ the lens
def test_lens_heatmap_of_a_full_context_prompt(lens):
    for metric in charts.METRICS:
        fig = charts.lens_heatmap(lens, metric)
        assert_drawable(fig)
        window = assert_window(fig, N, charts.LENS_HELD, charts.LENS_SHOWN, charts.HEATMAP_SOURCE)
        x_window(fig, window)
        start, stop, _, _, view_stop = window
        assert (start, stop, view_stop) == (N - charts.LENS_HELD, N, N)  # the last positions by default
        data = fig.select_one({"name": charts.HEATMAP_SOURCE}).data
        assert len(data["value"]) == lens.n_rows * (stop - start)
        rows, pos = np.asarray(data["row"]), np.asarray(data["pos"])
        assert np.allclose(data["value"], lens.metric(metric)[rows, pos], atol=1e-6)
        assert list(data["top1"]) == [str(t) for t in lens.top_tokens[rows, pos, 0]]
        assert data["x"] == data["pos"]  # numeric coordinates: position = x
        # The colour scale covers the whole result, not only the window.
        mapper = fig.select_one({"type": charts.LinearColorMapper})
        if metric != "prob":
            assert mapper.high == pytest.approx(float(lens.metric(metric).max()))


def test_lens_heatmap_window_follows_the_selected_position_or_a_given_window(lens):
    fig = charts.lens_heatmap(lens, "prob", position=100)
    start, stop, _, view_start, view_stop = chart_window(fig)
    assert start <= 100 < stop and view_start <= 100 < view_stop
    outline = [r for r in fig.renderers if r.glyph.__class__.__name__ == "Quad"]
    assert len(outline) == 1 and outline[0].data_source.data["left"] == [99.5]
    fig = charts.lens_heatmap(lens, "prob", window=(2000, 2050))
    start, stop, *_ = chart_window(fig)
    assert (start, stop) == (2000, 2050)
    fig = charts.lens_heatmap(lens, "prob", window=(0, N))  # asked for too much: held stays bounded
    start, stop, *_ = chart_window(fig)
    assert (start, stop) == (0, charts.LENS_HELD)


def test_short_prompts_keep_one_labelled_column_per_position(lens):
    short = lr.lens(FULL_AXIS_POSITIONS)
    fig = charts.lens_heatmap(short)
    assert chart_window(fig) is None and isinstance(fig.x_range, FactorRange)
    assert list(fig.x_range.factors) == charts.position_labels(short.tokens)
    longer = lr.lens(FULL_AXIS_POSITIONS + 1)
    fig = charts.lens_heatmap(longer)
    start, stop, total, view_start, view_stop = chart_window(fig)
    assert (start, stop, total) == (0, FULL_AXIS_POSITIONS + 1, FULL_AXIS_POSITIONS + 1)  # all held, panned
    assert view_stop - view_start == charts.LENS_SHOWN
    assert "result holds all" not in " ".join(t.text for t in fig.below if getattr(t, "text", None))


def test_target_curve_and_comparison_of_long_prompts(lens):
    assert_drawable(charts.target_curve(lens, N - 1))
    comparison = lr.comparison()
    assert_drawable(charts.comparison_chart(comparison, 0.1))
    for side in (comparison.a, comparison.b):
        fig = charts.lens_heatmap(side)
        assert_drawable(fig)
        assert chart_window(fig)[2] == side.n_positions


# ------------------------------------------------------------------ heads
def test_head_pattern_of_a_full_context_prompt(pattern):
    fig = hc.pattern_figure(pattern, n_heads=9, n_kv_heads=3)
    assert_drawable(fig)
    window = assert_window(fig, N, hc.PATTERN_HELD, hc.PATTERN_SHOWN, hc.pattern_source_name(17, 4), "q")
    x_window(fig, window)
    start, stop, *_ = window
    assert isinstance(fig.y_range, Range1d) and fig.y_range.start > fig.y_range.end  # first query on top
    data = fig.select_one({"name": hc.pattern_source_name(17, 4)}).data
    q, k, w = np.asarray(data["q"]), np.asarray(data["k"]), np.asarray(data["weight"])
    inside = k >= 0
    assert set(k[inside]) == set(range(start, stop))
    np.testing.assert_allclose(w[inside], pattern.pattern[q[inside], k[inside]])
    # Attention to the keys before the window, summed into the column at start - 1: here the sink's 0.5.
    earlier = ~inside
    assert sorted(q[earlier]) == list(range(start, stop))
    np.testing.assert_allclose(w[earlier], pattern.pattern[q[earlier], :start].sum(axis=1))
    assert np.asarray(data["x"])[earlier].tolist() == [start - 1] * (stop - start)
    assert fig.xaxis.major_label_overrides[start - 1] == f"0–{start - 1} (sum)"
    assert fig.title.text.startswith("Head 17.4 ")
    grid = hc.pattern_heatmaps([pattern, lr.pattern(layer=2, head=0)], 9, 3)
    assert_drawable(grid)


def test_pattern_lines_of_a_full_context_prompt(pattern):
    fig = hc.pattern_lines([pattern, lr.pattern(layer=2, head=0)], 9, 3)
    assert_drawable(fig)
    start, stop, total, view_start, view_stop = chart_window(fig)
    assert total == N and stop - start <= hc.LINES_HELD and view_stop - view_start <= hc.LINES_SHOWN
    assert isinstance(fig.y_range, Range1d) and fig.y_range.bounds[0] == -(stop - 1) - 0.9
    source = fig.select_one({"name": hc.line_source_name(17, 4)})
    q, k = np.asarray(source.data["q"]), np.asarray(source.data["k"])
    assert set(q) == set(range(start, stop)) and k.min() == start - 1  # the earlier keys' row
    texts = [r for r in fig.renderers if r.glyph.__class__.__name__ == "Text"]
    assert max(len(r.data_source.data["text"]) for r in texts) <= hc.LINES_HELD + 1
    assert [item.label.value for item in fig.legend[0].items] == ["17.4 (KV group 1)", "2.0 (KV group 0)"]


def test_heads_grid_and_table_of_a_large_model():
    scores = lr.head_scores()
    for score in ("induction", "dla"):  # a share on [0, 1] and the diverging DLA scale
        fig = hc.heads_grid(scores, score, selected=[(125, 127)], n_kv_heads=8)
        assert_drawable(fig)
        assert list(fig.y_range.factors) == [str(i) for i in range(scores.n_layers)]  # the last layer on top
    table = hc.heads_table(scores, n_kv_heads=8)
    assert table.height <= MAX_CANVAS_PX and table.source.data["label"][0].count(".") == 1


# ------------------------------------------------------------------ ablation and patching
def test_ablation_lenses_of_a_full_context_prompt():
    result = lr.ablation()
    base, abl = ac.lens_pair(result)
    for fig in (base, abl):
        assert_drawable(fig)
        x_window(fig, assert_window(fig, N, charts.LENS_HELD, charts.LENS_SHOWN, f"{fig.name}-source"))
    assert_drawable(ac.target_pair(result))


def test_patching_heatmap_of_a_full_context_prompt_fills_in_its_window():
    partial = lr.patch(done=30 * N - 5)
    fig = ac.patch_chart(partial)
    assert_drawable(fig)
    window = assert_window(fig, N, ac.PATCH_HELD, ac.PATCH_SHOWN, ac.PATCH_SOURCE)
    x_window(fig, window)
    assert list(fig.y_range.factors) == list(partial.layer_labels)  # L0 at the bottom, the last layer on top
    full = lr.patch()
    ac.update_patch_chart(fig, full)
    assert chart_window(fig) == window
    data = fig.select_one({"name": ac.PATCH_SOURCE}).data
    start, stop = window[:2]
    assert len(data["restored"]) == 30 * (stop - start)
    np.testing.assert_allclose(data["restored"], full.restored[:, start:stop].ravel())


def test_neuron_sweep_is_a_ranked_bar_chart():
    result = lr.sweep("neurons", n_neurons=1536)
    fig = ac.sweep_chart(result)
    assert_drawable(fig)
    assert fig.min_width <= 600 and fig.height <= ac.BAR_PX * ac.SWEEP_TOP_N + 200
    top = result.top(ac.SWEEP_TOP_N)
    assert list(fig.y_range.factors) == [spec for spec, _ in reversed(top)]  # the largest on top
    view = next(r.view for r in fig.renderers if r.glyph.__class__.__name__ == "HBar")
    assert isinstance(view, CDSView) and isinstance(view.filter, IndexFilter)
    source = fig.select_one({"name": ac.SWEEP_SOURCE})
    assert [source.data["spec"][i] for i in view.filter.indices] == [spec for spec, _ in top]
    assert len(source.data["spec"]) == 1536  # every component stays tappable data
    # The rest summarised: count, range and sum of the effects not drawn.
    rest = np.delete(result.effects, [result.components.index(s) for s, _ in top])
    note = fig.select_one({"name": ac.SWEEP_NOTE}).text
    assert "of 1,536 neurons" in note and f"other {len(rest):,}" in note
    assert f"{rest.min():+.3f}" in note and f"{rest.max():+.3f}" in note and f"sum {rest.sum():+.3f}" in note
    assert ac.sweep_hint(result) == "Click a bar to put that component into the single-ablation field."


def test_a_ranked_sweep_updates_live():
    partial = lr.sweep("neurons", n_neurons=400, done=10)
    fig = ac.sweep_chart(partial)
    assert len(fig.y_range.factors) == 10 and "390 not done yet" in fig.select_one({"name": ac.SWEEP_NOTE}).text
    full = lr.sweep("neurons", n_neurons=400)
    ac.update_sweep_chart(fig, full)
    assert list(fig.y_range.factors) == [spec for spec, _ in reversed(full.top(ac.SWEEP_TOP_N))]
    assert "not done" not in fig.select_one({"name": ac.SWEEP_NOTE}).text
    labels = fig.select_one({"name": ac.SWEEP_SOURCE}).data["label"]
    assert labels[0] == f"{float(full.effects[0]):+.3f}"


def test_head_and_block_sweeps_rank_when_the_heatmap_outgrows_the_page():
    small = lr.sweep("heads", n_layers=30, width=9)
    fig = ac.sweep_chart(small)
    assert not ac.sweep_ranked(small) and ac.sweep_hint(small).startswith("Click a cell")
    assert list(fig.y_range.factors) == [f"L{i}" for i in range(30)]  # L0 at the bottom: the last layer on top
    for big in (lr.sweep("heads", n_layers=126, width=128), lr.sweep("blocks", n_layers=126)):
        assert ac.sweep_ranked(big)
        fig = ac.sweep_chart(big)
        assert_drawable(fig)
        assert len(fig.y_range.factors) == ac.SWEEP_TOP_N


# ------------------------------------------------------------------ neurons and training
def test_prompt_activation_of_a_full_context_prompt_pans_over_every_position():
    result = lr.prompt_activation()
    fig = nc.prompt_activation_chart(result)
    assert_drawable(fig)
    window = assert_window(fig, N, nc.PROMPT_HELD, nc.PROMPT_SHOWN, nc.PROMPT_SOURCE)
    x_window(fig, window)
    assert window[:3] == (0, N, N)  # one float per position: the whole prompt is held
    np.testing.assert_allclose(fig.select_one({"name": nc.PROMPT_SOURCE}).data["activation"], result.activations)


def test_neuron_and_training_charts_of_large_inputs():
    for model in (nc.selectivity_overview(lr.selective()), nc.activation_histogram(lr.histogram()),
                  ic.audit_chart(lr.audit()), ic.pairs_chart(lr.pairs()), *ic.run_charts(lr.arm()).values()):
        assert_drawable(model)
    c = lr.checkpoints()
    for metric in ic.METRIC_LABELS:
        assert_drawable(ic.checkpoint_metric_chart(c, metric))
    fig = ic.checkpoint_lens_chart(c)
    assert_drawable(fig)
    assert len(fig.title.text) < 60  # the prompt went to a note of its own, shortened


# ------------------------------------------------------------------ conventions
def test_position_axis_windows():
    toks = [" a"] * 1000
    axis = position_axis(toks, held=100, shown=10)
    assert (axis.start, axis.stop, axis.view_start, axis.view_stop) == (900, 1000, 990, 1000)
    axis = position_axis(toks, held=100, shown=10, focus=50)
    assert axis.start <= 50 < axis.stop and axis.view_start <= 50 < axis.view_stop
    axis = position_axis(toks, held=100, shown=10, focus=995)
    assert (axis.start, axis.stop) == (900, 1000) and axis.view_start <= 995 < axis.view_stop <= 1000
    axis = position_axis(toks, held=100, shown=10, window=(-5, 5000))
    assert (axis.start, axis.stop) == (0, 100)
    axis = position_axis(toks[:5], held=100, shown=2)
    assert axis.categorical and axis.note() == [] and axis.coords() == [f"{i}: a" for i in range(5)]


def test_head_labels_are_component_specs(pattern):
    assert hc.head_label(17, 4) == hc.chip_label(17, 4) == "17.4"
    scores = lr.head_scores(3, 4, 10)
    assert hc.grid_data(scores)["label"][:2] == ["0.0", "0.1"]


def test_cell_text_meets_wcag_aa_on_every_palette_colour():
    for palette in (charts.METRICS["prob"][1], charts.METRICS["entropy"][1], ac.DIVERGING, hc.DLA_PALETTE):
        assert min(contrast(text_on(c), c) for c in palette) >= 4.5
    assert contrast(text_on(ac.NAN_COLOR), ac.NAN_COLOR) >= 4.5
    assert contrast(MUTED, "#ffffff") >= 4.5
    # The colours the builders give cells are the mapper's: check them on a real chart.
    fig = charts.lens_heatmap(lr.lens(20), "entropy")
    data = fig.select_one({"name": charts.HEATMAP_SOURCE}).data
    mapper = fig.select_one({"type": charts.LinearColorMapper})
    for value, color in zip(data["value"], data["text_color"]):
        cell = palette_color(mapper.palette, mapper.low, mapper.high, value)
        assert contrast(color, cell) >= 4.5, (value, color, cell)


def test_no_private_chart_helpers_cross_modules():
    import pathlib
    import re

    root = pathlib.Path(charts.__file__).parent
    for path in [*root.glob("*charts.py"), root / "chart_style.py"]:
        for line in path.read_text().splitlines():
            match = re.match(r"\s*from \.(\w+) import (.*)", line)
            if match:
                assert not any(name.strip().startswith("_") for name in match.group(2).split(",")), (path, line)


def test_sweep_text_colours_follow_the_cells():
    result = lr.sweep("heads", n_layers=6, width=4)
    data = ac.sweep_data(result)
    half = float(np.nanmax(np.abs(result.effects)))
    for value, color in zip(data["effect"], data["text_color"]):
        if math.isfinite(value):
            assert contrast(color, palette_color(ac.DIVERGING, -half, half, value)) >= 4.5
