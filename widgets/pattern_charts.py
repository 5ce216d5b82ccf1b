"""Chart builders for attention patterns: pure functions from ``HeadPattern`` results to Bokeh models.

- ``pattern_figure`` / ``pattern_heatmaps``: one query × key heatmap per head, in the heads'
  overlay colours;
- ``pattern_lines``: BertViz-style lines from each query token to each key token, one colour per head.

A prompt longer than ``FULL_AXIS_POSITIONS`` gets a position window (``pattern_axis``): the last
queries and keys, panned, with the attention to earlier keys summed into one column (or row).
``widgets.heads_charts`` re-exports every name here.
"""
from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np
from bokeh.layouts import gridplot
from bokeh.models import (
    ColorBar,
    ColumnDataSource,
    HoverTool,
    Legend,
    LinearColorMapper,
    Range1d,
)
from bokeh.palettes import interp_palette
from bokeh.plotting import figure

from explorer.analyses.heads import HeadPattern

from .chart_style import (
    HEAD_COLORS,
    PositionAxis,
    add_note,
    head_color,
    head_label,
    kv_group,
    position_axis,
    show_token,
    style_figure,
)
from .charts import quote_token

PATTERNS = "heads-patterns"
LINES = "heads-lines"
MIN_LINE_WEIGHT = 0.01  # the line view leaves out weaker attention (invisible at that alpha anyway)


def _ramp(color: str, n: int = 64) -> list[str]:
    """White to ``color``: weight 0 is the page, weight 1 the head's own colour."""
    return list(interp_palette(("#ffffff", color), n))


PATTERN_HELD = 64    # a long prompt's pattern holds the last 64 queries × keys (4,160 cells)
PATTERN_SHOWN = 20   # and shows 20 × 20 of them at a time
LINES_HELD = 64
LINES_SHOWN = 24


def pattern_axis(tokens, held: int = PATTERN_HELD, shown: int = PATTERN_SHOWN,
                 window: tuple[int, int] | None = None) -> PositionAxis:
    """The positions a pattern chart holds: every one of a short prompt, else a window of the last
    ``held`` queries and the same keys (earlier keys are summed into one column)."""
    return position_axis(tokens, held=held, shown=shown, window=window)


def _earlier_label(start: int) -> str:
    return f"0–{start - 1} (sum)" if start > 1 else "0 (sum)"


def pattern_data(pattern: HeadPattern, axis: PositionAxis | None = None) -> dict[str, list]:
    """One entry per (query, key) cell, query-major: for a short prompt ``weight`` reshapes to
    ``pattern.pattern``. A windowed ``axis`` holds its queries × keys, plus (when the window starts
    after 0) one cell per query at x = start − 1 with the summed attention to every earlier key."""
    axis = axis or pattern_axis(pattern.tokens)
    start, stop = axis.start, axis.stop
    shown = {i: html.escape(quote_token(pattern.tokens[i])) for i in axis.positions}
    q, k = np.divmod(np.arange((stop - start) ** 2), stop - start)
    q, k = q + start, k + start
    data = {
        "q": q.tolist(), "k": k.tolist(),
        "x": [axis.coord(i) for i in k], "y": [axis.coord(i) for i in q],
        "q_tok": [f"{i}: {shown[i]}" for i in q], "k_tok": [f"{i}: {shown[i]}" for i in k],
        "weight": [float(w) for w in pattern.pattern[start:stop, start:stop].ravel()],
    }
    if start > 0 and not axis.categorical:
        before = pattern.pattern[start:stop, :start].sum(axis=1, dtype=np.float64)
        rows = list(range(start, stop))
        data["q"] += rows
        data["k"] += [-1] * len(rows)
        data["x"] += [start - 1] * len(rows)
        data["y"] += rows
        data["q_tok"] += [f"{i}: {shown[i]}" for i in rows]
        data["k_tok"] += [f"keys {_earlier_label(start)}"] * len(rows)
        data["weight"] += [float(w) for w in before]
    return data


def pattern_source_name(layer: int, head: int) -> str:
    return f"heads-pattern-source-{layer}.{head}"


def pattern_figure(pattern: HeadPattern, color: str = HEAD_COLORS[0], n_heads: int | None = None,
                   n_kv_heads: int | None = None, window: tuple[int, int] | None = None):
    """One head's attention: queries on y (top to bottom), keys on x, colour = weight in [0, 1].

    A prompt longer than ``FULL_AXIS_POSITIONS`` gets a window (see ``pattern_axis``): the chart
    holds ``PATTERN_HELD`` queries and keys (``window`` = (start, stop), else the last ones),
    shows ``PATTERN_SHOWN`` at a time, pans in both directions, and sums the attention to keys
    before the window into one column; a note under it says which.
    """
    axis = pattern_axis(pattern.tokens, window=window)
    n = axis.view_stop - axis.view_start
    side = min(max(22 * n, 160), 440)
    source = ColumnDataSource(pattern_data(pattern, axis), name=pattern_source_name(pattern.layer, pattern.head))
    mapper = LinearColorMapper(palette=_ramp(color), low=0.0, high=1.0)
    kv = "" if n_heads is None else f" · KV group {kv_group(pattern.head, n_heads, n_kv_heads)}"
    earlier = axis.windowed and axis.start > 0
    if axis.categorical:
        x_range, y_range = axis.axis_range(), axis.axis_range(reverse=True)
    else:  # keys may pan one column further left, onto the earlier keys' sum
        lo = axis.start - (1.5 if earlier else 0.5)
        x_range = Range1d(axis.view_start - 0.5, axis.view_stop - 0.5, bounds=(lo, axis.stop - 0.5),
                          min_interval=3, max_interval=float(PATTERN_HELD + 1))
        y_range = axis.axis_range(reverse=True, max_shown=PATTERN_HELD)
    fig = figure(
        name=f"heads-pattern-{pattern.layer}.{pattern.head}",
        x_range=x_range, y_range=y_range,
        frame_width=side, frame_height=side,
        tools="pan,reset,hover,save" if axis.windowed else "hover,save",
        toolbar_location="right" if axis.windowed else None,
        title=f"Head {head_label(pattern.layer, pattern.head)}{kv}: query (row) → key (column)",
        tooltips=[("query", "@q_tok{safe}"), ("key", "@k_tok{safe}"), ("weight", "@weight{0.0000}")],
    )
    style_figure(fig)
    # The head's colour frames the chart (a coloured title would fail text contrast for most of them).
    fig.outline_line_color = color
    fig.outline_line_width = 3
    fig.rect("x", "y", 1, 1, source=source, fill_color={"field": "weight", "transform": mapper},
             line_color="#eeeeee", line_width=0.5)
    fig.add_layout(ColorBar(color_mapper=mapper, width=8, padding=4, major_label_text_font_size="9px"), "right")
    fig.grid.visible = False
    fig.axis.axis_line_color = None
    fig.axis.major_tick_line_color = None
    axis.style_axis(fig.yaxis)
    axis.style_axis(fig.xaxis)
    fig.yaxis.major_label_orientation = 0.0
    fig.xaxis.major_label_orientation = math.pi / 2
    if earlier:
        fig.xaxis.ticker.ticks = [axis.start - 1, *fig.xaxis.ticker.ticks]
        fig.xaxis.major_label_overrides = {axis.start - 1: _earlier_label(axis.start),
                                           **fig.xaxis.major_label_overrides}
    axis.annotate(fig)
    if earlier:
        add_note(fig, f"Column '{_earlier_label(axis.start)}': each query's attention to every earlier key.")
    fig.xaxis.axis_label = "key"
    fig.yaxis.axis_label = "query"
    return fig


def pattern_heatmaps(patterns: Sequence[HeadPattern], n_heads: int | None = None,
                     n_kv_heads: int | None = None, ncols: int = 2):
    """Small multiples: one heatmap per head, in the heads' overlay colours, two per row."""
    if not patterns:
        raise ValueError("pattern_heatmaps needs at least one head pattern")
    figs = [pattern_figure(p, head_color(i), n_heads, n_kv_heads) for i, p in enumerate(patterns)]
    grid = gridplot(figs, ncols=min(ncols, len(figs)), toolbar_location=None)
    grid.name = PATTERNS
    return grid


def line_data(pattern: HeadPattern, min_weight: float = MIN_LINE_WEIGHT,
              axis: PositionAxis | None = None) -> dict[str, list]:
    """One segment per (query, key) with weight ≥ ``min_weight``: from the query on the left
    (x=0, row y=-query) to the key on the right (x=1, y=-key). A windowed ``axis`` keeps its
    queries and keys, and sends each query's summed attention to the keys before the window to
    one row at y = -(start − 1)."""
    axis = axis or pattern_axis(pattern.tokens, LINES_HELD, LINES_SHOWN)
    start, stop = axis.start, axis.stop
    block = np.asarray(pattern.pattern[start:stop, start:stop])
    q, k = np.nonzero(block >= min_weight)
    weights = block[q, k].astype(float)
    q, k = q + start, k + start
    if start > 0 and not axis.categorical:
        before = pattern.pattern[start:stop, :start].sum(axis=1, dtype=np.float64)
        rows = np.nonzero(before >= min_weight)[0]
        q = np.concatenate([q, rows + start])
        k = np.concatenate([k, np.full(len(rows), start - 1)])
        weights = np.concatenate([weights, before[rows]])
    shown = {i: html.escape(quote_token(pattern.tokens[i])) for i in axis.positions}
    earlier = f"keys {_earlier_label(start)}"
    return {
        "x0": [0.0] * len(q), "x1": [1.0] * len(q),
        "y0": (-q).astype(float).tolist(), "y1": (-k).astype(float).tolist(),
        "q": q.tolist(), "k": k.tolist(), "weight": weights.tolist(),
        "alpha": np.clip(weights, 0.05, 1.0).tolist(),
        "width": (0.5 + 4.0 * weights).tolist(),
        "head": [head_label(pattern.layer, pattern.head)] * len(q),
        "q_tok": [f"{i}: {shown[i]}" for i in q],
        "k_tok": [f"{i}: {shown[i]}" if i >= start else earlier for i in k],
    }


def line_source_name(layer: int, head: int) -> str:
    return f"heads-lines-source-{layer}.{head}"


def pattern_lines(patterns: Sequence[HeadPattern], n_heads: int | None = None,
                  n_kv_heads: int | None = None, min_weight: float = MIN_LINE_WEIGHT,
                  window: tuple[int, int] | None = None):
    """BertViz's head view: query tokens on the left, key tokens on the right, a line from each
    query to each key it attends to, alpha and width by the weight, one colour per head (the
    legend hides a head on click). Weights below ``min_weight`` are not drawn.

    A prompt longer than ``FULL_AXIS_POSITIONS`` gets a window (see ``pattern_axis``):
    ``LINES_HELD`` tokens held, ``LINES_SHOWN`` in view, panned up and down; the attention to
    earlier tokens goes, summed, to one row above the window.
    """
    if not patterns:
        raise ValueError("pattern_lines needs at least one head pattern")
    tokens = patterns[0].tokens
    axis = pattern_axis(tokens, LINES_HELD, LINES_SHOWN, window)
    earlier = axis.windowed and axis.start > 0
    rows = axis.view_stop - axis.view_start
    if axis.categorical:
        y_range = Range1d(-(axis.stop - 1) - 0.9, -axis.start + 0.9)
    else:
        top = -(axis.start - 1 if earlier else axis.start) + 0.9
        y_range = Range1d(-(axis.view_stop - 1) - 0.9, -axis.view_start + 0.9,
                          bounds=(-(axis.stop - 1) - 0.9, top), min_interval=4, max_interval=float(LINES_HELD + 2))
    fig = figure(name=LINES, width=420 if axis.categorical else 460, frame_height=max(120, 20 * rows + 20),
                 x_range=Range1d(-1.0, 2.0), y_range=y_range,
                 tools="ypan,reset,save" if axis.windowed else "save",
                 toolbar_location="right" if axis.windowed else None,
                 title="query tokens (left) attend to key tokens (right)")
    style_figure(fig)
    # A window's rows carry their positions ('8190: the'): the reader can't count 8,000 rows.
    labels = [show_token(tokens[i]) for i in axis.positions] if axis.categorical else list(axis.labels)
    ys = [-float(i) for i in axis.positions]
    fig.text([-0.04] * len(ys), ys, text=labels, text_align="right", text_baseline="middle",
             text_font_size="11px", text_color="#222222")
    key_labels, key_ys = list(labels), list(ys)
    if earlier:
        key_labels.insert(0, _earlier_label(axis.start))
        key_ys.insert(0, -float(axis.start - 1))
    fig.text([1.04] * len(key_ys), key_ys, text=key_labels, text_align="left", text_baseline="middle",
             text_font_size="11px", text_color="#222222")
    # The legend below the plot (created before the glyphs, which then join it): one entry per head.
    fig.add_layout(Legend(orientation="horizontal", click_policy="hide", label_text_font_size="10px",
                          location="center"), "below")
    renderers = []
    for i, pattern in enumerate(patterns):
        kv = "" if n_heads is None else f" (KV group {kv_group(pattern.head, n_heads, n_kv_heads)})"
        source = ColumnDataSource(line_data(pattern, min_weight, axis),
                                  name=line_source_name(pattern.layer, pattern.head))
        renderers.append(fig.segment("x0", "y0", "x1", "y1", source=source, line_color=head_color(i),
                                     line_alpha="alpha", line_width="width",
                                     legend_label=f"{head_label(pattern.layer, pattern.head)}{kv}"))
    fig.add_tools(HoverTool(renderers=renderers, line_policy="interp",
                            tooltips=[("head", "@head"), ("query", "@q_tok{safe}"), ("key", "@k_tok{safe}"),
                                      ("weight", "@weight{0.0000}")]))
    fig.axis.visible = False
    fig.grid.visible = False
    fig.outline_line_color = None
    axis.annotate(fig)
    if earlier:
        add_note(fig, f"Lines to '{_earlier_label(axis.start)}': attention to every earlier token, summed.")
    return fig
