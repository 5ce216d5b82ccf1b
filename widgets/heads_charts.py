"""Chart builders for the heads view: pure functions from head results to Bokeh models.

- ``heads_grid``: layers × heads, coloured by one score, role letters where a score passes the
  threshold, the selected heads outlined in their overlay colours.
- ``heads_table``: one row per head (layer, head, KV group, every score, role), sortable.
- ``pattern_heatmaps``: one small query × key heatmap per selected head.
- ``pattern_lines``: BertViz-style lines from each query token to each key token, one colour per head.

Like ``widgets.charts``, every builder returns fresh models (the view swaps whole figures) and
names what tests and the view look up (``GRID_SOURCE`` and friends).
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
    DataTable,
    HoverTool,
    Legend,
    LinearColorMapper,
    NumberFormatter,
    Range1d,
    StringFormatter,
    TableColumn,
)
from bokeh.palettes import Category10, RdBu, Viridis256, interp_palette
from bokeh.plotting import figure

from explorer.analyses.heads import HeadPattern, HeadScores

from .chart_style import (
    MAX_CANVAS_PX,
    PositionAxis,
    add_note,
    head_spec,
    layer_tick_formatter,
    position_axis,
    style_figure,
    text_colors,
)
from .charts import position_labels, quote_token, show_token

# Names of the models tests and the view look up.
GRID = "heads-grid"
GRID_SOURCE = "heads-grid-source"
TABLE = "heads-table"
TABLE_SOURCE = "heads-table-source"
PATTERNS = "heads-patterns"
LINES = "heads-lines"

# Score name -> (label for people, colour-bar title).
SCORES: dict[str, tuple[str, str]] = {
    "previous_token": ("previous-token", "attention to the previous token"),
    "induction": ("induction", "induction score (repeated random tokens)"),
    "duplicate_token": ("duplicate-token", "attention to the earlier copy (repeated random tokens)"),
    "bos": ("BOS / sink share", "attention to position 0"),
    "entropy": ("mean entropy", "mean attention entropy (nats)"),
    "dla": ("DLA to target", "direct logit attribution to the target"),
}
# Short column titles for the table (the grid's hover spells them out).
TABLE_TITLES = {"previous_token": "prev-token", "induction": "induction", "duplicate_token": "duplicate",
                "bos": "BOS/sink", "entropy": "entropy", "dla": "DLA"}
# Role label -> the letter marking it on the grid.
ROLE_LETTERS: dict[str, str] = {"previous-token": "P", "induction": "I", "duplicate": "D", "sink": "S"}
ROLE_LEGEND = " · ".join(f"{letter} {role}" for role, letter in ROLE_LETTERS.items())

# Overlaid heads get these colours, in selection order (the grid outlines use the same).
HEAD_COLORS: tuple[str, ...] = tuple(Category10[10][:8])
MAX_OVERLAY = len(HEAD_COLORS)

DLA_PALETTE = tuple(interp_palette(tuple(reversed(RdBu[11])), 256))  # red < 0 < blue
GRID_ROW_PX = 18
GRID_COLUMN_PX = 46
MIN_LINE_WEIGHT = 0.01  # the line view leaves out weaker attention (invisible at that alpha anyway)


# ------------------------------------------------------------------ head names
def head_label(layer: int, head: int) -> str:
    """'17.4': a head as its component spec, in every chart, table and caption (``head_spec``)."""
    return head_spec(layer, head)


def chip_label(layer: int, head: int) -> str:
    """'17.4', the head's chip in the view's multi-select (the same text as ``head_label``)."""
    return head_spec(layer, head)


def kv_group(head: int, n_heads: int, n_kv_heads: int | None) -> int:
    """The KV head a query head reads (grouped-query attention repeats each KV head
    n_heads / n_kv_heads times in order, so query head h uses KV head h // that)."""
    n_kv = n_kv_heads or n_heads
    return head // max(1, n_heads // n_kv)


def head_color(index: int) -> str:
    return HEAD_COLORS[index % len(HEAD_COLORS)]


def role_text(roles: Sequence[str]) -> str:
    return ", ".join(roles) if roles else "—"


# ------------------------------------------------------------------ the grid
def _grid_colors(score: str, values: np.ndarray) -> tuple[tuple[str, ...], float, float]:
    """(palette, low, high) of a score: [0, 1] for attention shares, diverging around 0 for DLA."""
    if score == "dla":
        bound = float(np.max(np.abs(values))) if values.size else 1.0
        bound = bound if bound > 0 else 1.0
        return DLA_PALETTE, -bound, bound
    if score == "entropy":
        high = float(values.max()) if values.size else 1.0
        return tuple(Viridis256), 0.0, high if high > 0 else 1.0
    return tuple(Viridis256), 0.0, 1.0


def grid_data(result: HeadScores, score: str = "induction", threshold: float = 0.5,
              n_kv_heads: int | None = None) -> dict[str, list]:
    """The grid's columns, one entry per head, layer-major (layer 0 head 0, layer 0 head 1, ...)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {sorted(SCORES)}, got {score!r}")
    values = np.asarray(getattr(result, score), dtype=float)
    palette, low, high = _grid_colors(score, values)
    colors = iter(text_colors(palette, low, high, values.ravel().tolist()))
    roles = result.roles(threshold)
    n_layers, n_heads = values.shape
    data: dict[str, list] = {k: [] for k in (
        "x", "y", "layer", "head", "kv", "label", "value", *SCORES, "role", "marks", "text_color")}
    for layer in range(n_layers):
        for head in range(n_heads):
            head_roles = roles.get((layer, head), ())
            v = float(values[layer, head])
            data["x"].append(str(head))
            data["y"].append(str(layer))
            data["layer"].append(layer)
            data["head"].append(head)
            data["kv"].append(kv_group(head, n_heads, n_kv_heads))
            data["label"].append(head_label(layer, head))
            data["value"].append(v)
            for name in SCORES:
                data[name].append(float(getattr(result, name)[layer, head]))
            data["role"].append(role_text(head_roles))
            data["marks"].append("".join(ROLE_LETTERS[r] for r in head_roles))
            data["text_color"].append(next(colors))
    return data


_GRID_TOOLTIP = """
<div style="font-family: ui-monospace, monospace; font-size: 11px; line-height: 1.35">
  <div style="font-weight: bold; margin-bottom: 3px">@label &middot; KV group @kv</div>
  <div>previous-token&nbsp; @previous_token{0.000}</div>
  <div>induction&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp; @induction{0.000}</div>
  <div>duplicate&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp; @duplicate_token{0.000}</div>
  <div>BOS / sink&nbsp;&nbsp;&nbsp;&nbsp;&nbsp; @bos{0.000}</div>
  <div>entropy&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp; @entropy{0.000} nats</div>
  <div>DLA&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp; @dla{+0.000}</div>
  <div style="margin-top: 3px">role: @role</div>
</div>
"""


def heads_grid(result: HeadScores, score: str = "induction", threshold: float = 0.5,
               selected: Sequence[tuple[int, int]] = (), n_kv_heads: int | None = None):
    """Layers (y, layer 0 at the bottom) × heads (x), coloured by ``score``.

    Letters mark the roles whose score is at or above ``threshold``; ``selected`` heads are
    outlined in their overlay colours (``HEAD_COLORS`` in order). The cells' source is
    ``GRID_SOURCE``; cell (layer, head) spans [head, head + 1] × [layer, layer + 1] in the
    plot's coordinates (what ``grid_cell`` reads back from a click).
    """
    data = grid_data(result, score, threshold, n_kv_heads)  # checks the score name
    palette, low, high = _grid_colors(score, np.asarray(data["value"]))
    mapper = LinearColorMapper(palette=list(palette), low=low, high=high)
    n_layers, n_heads = result.n_layers, result.n_heads
    source = ColumnDataSource(data, name=GRID_SOURCE)

    label, title = SCORES[score]
    # Cells shrink (to 4 px) before the grid outgrows a canvas; the subtitle needs ~480 px.
    # The plot area: cells shrink (to 4 px) before the grid outgrows a canvas, and grow for a small
    # model so that its title, notes and colour bar are not cut off.
    row_px = max(4, min(GRID_ROW_PX, (MAX_CANVAS_PX - 400) // max(1, n_layers)))
    column_px = max(4, min(GRID_COLUMN_PX, (MAX_CANVAS_PX - 400) // max(1, n_heads)))
    fig = figure(
        name=GRID,
        x_range=[str(h) for h in range(n_heads)],
        y_range=[str(layer) for layer in range(n_layers)],  # bottom to top: the last layer on top
        frame_height=max(150, row_px * n_layers),
        frame_width=max(340, column_px * n_heads),
        tools="reset,save",
        toolbar_location="right",
        title=f"{label} per head · {result.model}",
    )
    style_figure(fig)
    add_note(fig, f"letters (score ≥ {threshold:.2f}): {ROLE_LEGEND}", "above")
    add_note(fig, f"colour: {title}", "above")
    cells = fig.rect("x", "y", 1, 1, source=source, fill_color={"field": "value", "transform": mapper},
                     line_color="#ffffff", line_width=0.5)
    fig.text("x", "y", text="marks", source=source, text_align="center", text_baseline="middle",
             text_font_size="10px", text_font_style="bold", text_color="text_color")
    for i, (layer, head) in enumerate(selected):
        if 0 <= layer < n_layers and 0 <= head < n_heads:  # an outline in the head's line-view colour
            fig.rect([str(head)], [str(layer)], 0.9, 0.86, fill_alpha=0, line_color=head_color(i),
                     line_width=3)
    fig.add_tools(HoverTool(renderers=[cells], tooltips=_GRID_TOOLTIP))
    # No tap tool: the view reads clicks as Tap events (with their shift/ctrl modifiers).
    fig.add_layout(ColorBar(color_mapper=mapper, title=label, title_text_font_size="10px",
                            major_label_text_font_size="10px", width=10, padding=6), "right")
    fig.grid.visible = False
    fig.axis.axis_line_color = None
    fig.axis.major_tick_line_color = None
    fig.xaxis.axis_label = "head"
    fig.yaxis.axis_label = "layer"
    fig.yaxis.formatter = layer_tick_formatter()  # factors '17' read 'L17', as on every layer axis
    return fig


def grid_cell(result: HeadScores, x: float | None, y: float | None) -> tuple[int, int] | None:
    """The (layer, head) under a click at plot coordinates (x, y) of ``heads_grid``, or None.
    Categorical axes put factor i at [i, i + 1]."""
    if x is None or y is None:
        return None
    head, layer = math.floor(x), math.floor(y)
    if 0 <= layer < result.n_layers and 0 <= head < result.n_heads:
        return int(layer), int(head)
    return None


# ------------------------------------------------------------------ the table
def table_data(result: HeadScores, threshold: float = 0.5, n_kv_heads: int | None = None,
               sort_by: str = "induction") -> dict[str, list]:
    """One row per head, ordered by ``sort_by`` (largest first; lowest first for entropy)."""
    data = grid_data(result, sort_by, threshold, n_kv_heads)
    values = np.asarray(data[sort_by])
    order = np.argsort(values if sort_by == "entropy" else -values, kind="stable")
    keep = ("label", "layer", "head", "kv", *SCORES, "role")
    return {k: [data[k][i] for i in order] for k in keep}


def heads_table(result: HeadScores, threshold: float = 0.5, n_kv_heads: int | None = None,
                sort_by: str = "induction", height: int = 320) -> DataTable:
    """Every head's scores and roles; click a column header to sort by it."""
    source = ColumnDataSource(table_data(result, threshold, n_kv_heads, sort_by), name=TABLE_SOURCE)
    number = NumberFormatter(format="0.000")
    columns = [
        TableColumn(field="label", title="head", formatter=StringFormatter(font_style="bold"), width=70),
        TableColumn(field="layer", title="layer", width=50),
        TableColumn(field="head", title="head #", width=55),
        TableColumn(field="kv", title="KV group", width=70),
        *[TableColumn(field=name, title=TABLE_TITLES[name], formatter=number, width=85)
          for name in SCORES if name != "dla"],
        TableColumn(field="dla", title=f"DLA → {quote_token(result.target)}",
                    formatter=NumberFormatter(format="+0.000"), width=110),
        TableColumn(field="role", title=f"role (≥ {threshold:.2f})", width=190),
    ]
    return DataTable(source=source, columns=columns, name=TABLE, sortable=True, index_position=None,
                     height=height, sizing_mode="stretch_width", selectable=True)


# ------------------------------------------------------------------ patterns
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


__all__ = [
    "GRID",
    "GRID_SOURCE",
    "HEAD_COLORS",
    "LINES",
    "MAX_OVERLAY",
    "PATTERNS",
    "ROLE_LETTERS",
    "SCORES",
    "TABLE",
    "TABLE_SOURCE",
    "chip_label",
    "grid_cell",
    "grid_data",
    "head_label",
    "heads_grid",
    "heads_table",
    "kv_group",
    "line_data",
    "line_source_name",
    "pattern_axis",
    "pattern_data",
    "pattern_figure",
    "pattern_heatmaps",
    "pattern_lines",
    "pattern_source_name",
    "position_labels",  # re-exported: the pattern axes' factors
    "table_data",
]
