"""Chart builders for the heads view: pure functions from head results to Bokeh models.

- ``heads_grid``: layers × heads, coloured by one score, role letters where a score passes the
  threshold, the selected heads outlined in their overlay colours.
- ``heads_table``: one row per head (layer, head, KV group, every score, role), sortable.
- ``pattern_heatmaps`` / ``pattern_lines`` (from ``widgets.pattern_charts``, re-exported here): the
  selected heads' attention as small heatmaps, and as BertViz-style lines.

Like ``widgets.charts``, every builder returns fresh models (the view swaps whole figures) and
names what tests and the view look up (``GRID_SOURCE`` and friends).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from bokeh.models import (
    ColorBar,
    ColumnDataSource,
    DataTable,
    HoverTool,
    LinearColorMapper,
    NumberFormatter,
    StringFormatter,
    TableColumn,
)
from bokeh.palettes import RdBu, Viridis256, interp_palette
from bokeh.plotting import figure

from explorer.analyses.heads import HeadScores

from .chart_style import (
    HEAD_COLORS,
    MAX_CANVAS_PX,
    MAX_OVERLAY,
    add_note,
    chip_label,
    head_color,
    head_label,
    kv_group,
    layer_tick_formatter,
    style_figure,
    text_colors,
)
from .charts import position_labels, quote_token
from .pattern_charts import (
    LINES,
    LINES_HELD,
    LINES_SHOWN,
    MIN_LINE_WEIGHT,
    PATTERN_HELD,
    PATTERN_SHOWN,
    PATTERNS,
    line_data,
    line_source_name,
    pattern_axis,
    pattern_data,
    pattern_figure,
    pattern_heatmaps,
    pattern_lines,
    pattern_source_name,
)

# Names of the models tests and the view look up.
GRID = "heads-grid"
GRID_SOURCE = "heads-grid-source"
TABLE = "heads-table"
TABLE_SOURCE = "heads-table-source"

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


DLA_PALETTE = tuple(interp_palette(tuple(reversed(RdBu[11])), 256))  # red < 0 < blue
GRID_ROW_PX = 18
GRID_COLUMN_PX = 46


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


__all__ = [  # the heads view's names, and the pattern charts' (from pattern_charts)
    "GRID",
    "GRID_SOURCE",
    "HEAD_COLORS",
    "LINES",
    "LINES_HELD",
    "LINES_SHOWN",
    "MAX_OVERLAY",
    "MIN_LINE_WEIGHT",
    "PATTERNS",
    "PATTERN_HELD",
    "PATTERN_SHOWN",
    "ROLE_LETTERS",
    "SCORES",
    "TABLE",
    "TABLE_SOURCE",
    "chip_label",
    "grid_cell",
    "grid_data",
    "head_color",
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
    "position_labels",
    "role_text",
    "table_data",
]
