"""Chart builders: pure functions from engine results to Bokeh figures (no server, no Panel).

Every builder returns a fresh Bokeh model; the views swap whole figures instead of mutating
data sources, which keeps Bokeh changes trivially thread-safe. Models carry ``name`` values
so tests (and the view's tap handler) can find them: see ``HEATMAP_SOURCE`` and friends.
"""
from __future__ import annotations

import html

import numpy as np
from bokeh.layouts import column
from bokeh.models import (
    ColorBar,
    ColumnDataSource,
    HoverTool,
    Label,
    LinearColorMapper,
    Range1d,
    Span,
    TapTool,
)
from bokeh.palettes import Viridis256
from bokeh.plotting import figure

from explorer.analyses.lens import LensComparison, LensResult

from .chart_style import (
    MAX_CANVAS_PX,
    PositionAxis,
    bounded,
    layer_factors,
    layer_ticks,
    position_axis,
    position_label,
    show_token,
    style_figure,
    text_colors,
)

# Names of the models tests and views look up.
HEATMAP = "lens-heatmap"
HEATMAP_SOURCE = "lens-heatmap-source"
TARGET_CURVE = "lens-target-curve"
COMPARE_CHART = "lens-compare-chart"

COLOR_A = "#1f77b4"
COLOR_B = "#ff7f0e"

# metric name -> (colour-bar title, palette). Entropy and KL run the other way (low = bright)
# so that, whatever the metric, a bright cell means "confident / close to the final answer".
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "prob": ("top-1 probability", tuple(Viridis256)),
    "entropy": ("entropy (nats)", tuple(reversed(Viridis256))),
    "kl": ("KL(final ‖ layer) (nats)", tuple(reversed(Viridis256))),
}

ROW_PX = 17       # heatmap row height
COLUMN_PX = 70    # minimum heatmap column width: room for ~10 characters at 10 px
CELL_CHARS = 9    # top-1 token text is cut to this many characters in a cell
LENS_HELD = 128   # a long prompt's heatmap holds this many positions (~19 kB of cells each)
LENS_SHOWN = 16   # and shows this many at a time (COLUMN_PX each)


# ------------------------------------------------------------------ token text
def quote_token(token: str) -> str:
    """A token in quotes with its spaces kept, e.g. ' Paris' (for titles and hovers)."""
    return "'" + show_token(token) + "'"


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def position_labels(tokens) -> list[str]:
    """Unique x-axis factors, one per position: '3: Paris'."""
    return [position_label(i, t) for i, t in enumerate(tokens)]


def shorten(text: str, n: int = 44) -> str:
    """Keep the start and the end of a long prompt (the parts that usually differ)."""
    text = " ".join(str(text).split())
    if len(text) <= n:
        return text
    half = (n - 1) // 2
    return text[:half].rstrip() + "…" + text[-half:].lstrip()


# --------------------------------------------------------------------- heatmap
def _topk_html(result: LensResult, row: int, pos: int) -> str:
    lines = []
    for token, prob in zip(result.top_tokens[row, pos], result.top_probs[row, pos]):
        lines.append(f"{prob:6.3f}&nbsp;&nbsp;{html.escape(quote_token(token))}")
    return "<br>".join(lines)


def lens_axis(result: LensResult, position: int | None = None,
              window: tuple[int, int] | None = None) -> PositionAxis:
    """The positions a lens heatmap of ``result`` holds and shows (see ``chart_style.position_axis``)."""
    return position_axis(result.tokens, held=LENS_HELD, shown=LENS_SHOWN, focus=position, window=window)


def heatmap_data(result: LensResult, metric: str = "prob", axis: PositionAxis | None = None) -> dict[str, list]:
    """The heatmap's columns, one entry per (row, position) cell, row-major, over the positions
    ``axis`` holds (default: ``lens_axis(result)``, every position of a short prompt)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    axis = axis or lens_axis(result)
    values = np.asarray(result.metric(metric), dtype=float)
    low, high = _color_range(values, metric)  # over every position: a window keeps the scale
    positions = list(axis.positions)
    n_rows = values.shape[0]
    xs = axis.coords()
    tokens = [f"{p}: {html.escape(quote_token(result.tokens[p]))}" for p in positions]
    data: dict[str, list] = {k: [] for k in (
        "x", "y", "row", "pos", "value", "top1", "text", "text_color", "font_style",
        "layer", "token", "top_prob", "entropy", "kl", "target_prob", "target_rank", "topk")}
    for r in range(n_rows):
        row_values = [float(values[r, p]) for p in positions]
        data["text_color"] += text_colors(METRICS[metric][1], low, high, row_values)
        for i, p in enumerate(positions):
            top1 = str(result.top_tokens[r, p, 0])
            data["x"].append(xs[i])
            data["y"].append(result.layer_labels[r])
            data["row"].append(r)
            data["pos"].append(p)
            data["value"].append(row_values[i])
            data["top1"].append(top1)
            data["text"].append(_cut(show_token(top1), CELL_CHARS))
            # Cells whose top-1 is the target token are bold: where the answer appears.
            data["font_style"].append("bold" if result.top_ids[r, p, 0] == result.target_id else "normal")
            data["layer"].append(result.layer_labels[r])
            data["token"].append(tokens[i])
            data["top_prob"].append(float(result.top_probs[r, p, 0]))
            data["entropy"].append(float(result.entropy[r, p]))
            data["kl"].append(float(result.kl_to_final[r, p]))
            data["target_prob"].append(float(result.target_probs[r, p]))
            data["target_rank"].append(int(result.target_ranks[r, p]))
            data["topk"].append(_topk_html(result, r, p))
    return data


def _color_range(values: np.ndarray, metric: str) -> tuple[float, float]:
    if metric == "prob":
        return 0.0, 1.0
    finite = values[np.isfinite(values)]
    high = float(finite.max()) if finite.size else 1.0
    return 0.0, high if high > 0 else 1.0


def lens_heatmap(result: LensResult, metric: str = "prob", position: int | None = None,
                 window: tuple[int, int] | None = None):
    """Layers × positions, each cell its top-1 token, coloured by ``metric`` (prob, entropy, kl).

    Rows run from the embeddings (bottom) to the last layer (top), as the residual stream
    flows. ``position`` outlines one column (the selected position). The cells'
    ColumnDataSource is named ``HEATMAP_SOURCE`` and carries ``row``/``pos`` per cell.

    A prompt of more than ``FULL_AXIS_POSITIONS`` tokens gets a position window: the chart holds
    ``LENS_HELD`` positions (``window`` = (start, stop), else the last ones or those around
    ``position``), shows ``LENS_SHOWN`` at a time and pans over the rest; a note under the chart
    says which (``chart_style.chart_window`` reads it back).
    """
    axis = lens_axis(result, position, window)
    data = heatmap_data(result, metric, axis)  # checks the metric name
    title, palette = METRICS[metric]
    source = ColumnDataSource(data, name=HEATMAP_SOURCE, tags=["lens-heatmap-cells"])
    low, high = _color_range(np.asarray(result.metric(metric), dtype=float), metric)
    mapper = LinearColorMapper(palette=list(palette), low=low, high=high)

    n_rows = result.n_rows
    columns = axis.view_stop - axis.view_start
    fig = figure(
        name=HEATMAP,
        x_range=axis.axis_range(max_shown=3 * LENS_SHOWN),
        y_range=layer_factors(result.layer_labels),
        frame_height=frame_rows(n_rows),
        min_width=bounded(COLUMN_PX * columns + 170),
        sizing_mode="stretch_width",
        tools="xpan,xwheel_zoom,reset,save" if axis.windowed else "pan,box_zoom,wheel_zoom,reset,save",
        toolbar_location="right",
        title=f"Top-1 token per layer and position · colour: {title}",
        x_axis_location="below",
    )
    style_figure(fig)
    cells = fig.rect("x", "y", 1, 1, source=source, fill_color={"field": "value", "transform": mapper},
                     line_color="#ffffff", line_width=0.5,
                     # a tap selects a cell; keep the other cells fully visible
                     nonselection_fill_alpha=1.0, nonselection_line_alpha=1.0,
                     selection_line_color="#e6194b", selection_line_width=2)
    fig.text("x", "y", text="text", source=source, text_align="center", text_baseline="middle",
             text_font_size="10px", text_color="text_color", text_font_style="font_style")
    if position is not None and axis.start <= position < axis.stop:
        # Outline the selected column; (factor, offset) pairs address a category's edges.
        fig.quad(left=[axis.edge(position, -0.5)], right=[axis.edge(position, 0.5)],
                 bottom=[(result.layer_labels[0], -0.5)], top=[(result.layer_labels[-1], 0.5)],
                 fill_alpha=0, line_color="#e6194b", line_width=2)
    fig.add_tools(HoverTool(renderers=[cells], tooltips=_HEATMAP_TOOLTIP))
    fig.add_tools(TapTool(renderers=[cells]))
    fig.add_layout(ColorBar(color_mapper=mapper, title=title, title_text_font_size="10px",
                            major_label_text_font_size="10px", width=10, padding=6), "right")
    fig.grid.visible = False
    fig.axis.axis_line_color = None
    fig.axis.major_tick_line_color = None
    axis.style_axis(fig.xaxis)
    axis.annotate(fig)
    fig.yaxis.axis_label = "layer (residual stream after)" if n_rows * ROW_PX >= 200 else "layer"
    fig.xaxis.axis_label = "prompt position: token"
    return fig


def frame_rows(n_rows: int, row_px: int = ROW_PX) -> int:
    """The plot-area height of a heatmap of ``n_rows`` layers: ``row_px`` a row, at least 120 px
    (room for the toolbar and the colour bar), under the canvas limit with its axes and notes."""
    return bounded(max(120, row_px * n_rows), MAX_CANVAS_PX - 400)


_HEATMAP_TOOLTIP = """
<div style="font-family: ui-monospace, monospace; font-size: 11px; line-height: 1.35; max-width: 320px">
  <div style="font-weight: bold; margin-bottom: 3px">@layer &middot; position @token{safe}</div>
  <div>entropy @entropy{0.00} nats &middot; KL @kl{0.000}</div>
  <div>p(target) @target_prob{0.0000} &middot; rank @target_rank</div>
  <div style="margin-top: 4px; font-weight: bold">top-k</div>
  <div>@topk{safe}</div>
</div>
"""


# ---------------------------------------------------------------- target curve
def target_curve(result: LensResult, position: int):
    """The target token's probability (top) and rank (bottom, log scale) per layer at ``position``."""
    pos = min(max(int(position), 0), result.n_positions - 1)
    n_rows = result.n_rows
    labels = list(result.layer_labels)
    source = ColumnDataSource({
        "row": list(range(n_rows)), "layer": labels,
        "prob": [float(v) for v in result.target_probs[:, pos]],
        "rank": [int(v) for v in result.target_ranks[:, pos]],
        "top1": [quote_token(t) for t in result.top_tokens[:, pos, 0]],
    }, name="lens-target-source")
    ticker, overrides = layer_ticks(n_rows, labels)
    target = quote_token(result.target)
    where = f"position {pos}: {quote_token(result.tokens[pos])}"
    hover = HoverTool(tooltips=[("layer", "@layer"), ("p(target)", "@prob{0.0000}"),
                                ("rank", "@rank"), ("top-1", "@top1")], mode="vline")

    prob = figure(name="lens-target-prob", height=230, sizing_mode="stretch_width",
                  title=f"p({target}) per layer at {where}", y_range=Range1d(-0.02, 1.02),
                  x_range=Range1d(-0.5, n_rows - 0.5), tools="xpan,xwheel_zoom,reset,save",
                  toolbar_location="right")
    prob.line("row", "prob", source=source, line_width=2, color=COLOR_A)
    prob.scatter("row", "prob", source=source, size=6, color=COLOR_A)
    prob.add_tools(hover)
    prob.yaxis.axis_label = "probability"

    max_rank = max(2, int(source.data["rank"] and max(source.data["rank"])))
    # Inverted log axis: rank 1 on top, so the curve climbs as the target wins.
    rank = figure(name="lens-target-rank", height=190, sizing_mode="stretch_width",
                  title=f"rank of {target} (1 = top token)", y_axis_type="log",
                  y_range=Range1d(max_rank * 2.0, 0.7), x_range=prob.x_range,
                  tools="xpan,xwheel_zoom,reset,save", toolbar_location="right")
    rank.line("row", "rank", source=source, line_width=2, color="#2ca02c")
    rank.scatter("row", "rank", source=source, size=6, color="#2ca02c")
    rank.add_tools(HoverTool(tooltips=hover.tooltips, mode="vline"))
    rank.yaxis.axis_label = "rank"
    for fig in (prob, rank):
        style_figure(fig)
        fig.xaxis.ticker = ticker
        fig.xaxis.major_label_overrides = overrides
        fig.toolbar.logo = None
    rank.xaxis.axis_label = "layer"
    return column(prob, rank, name=TARGET_CURVE, sizing_mode="stretch_width")


# ------------------------------------------------------------------ comparison
def describe_divergence(comparison: LensComparison, threshold: float) -> str:
    """One line: where prompt B's target probability first departs from prompt A's."""
    diff = comparison.difference()
    row = comparison.divergence_row(threshold)
    labels = comparison.layer_labels
    if row is None:
        worst = int(np.argmax(np.abs(diff)))
        return (f"No divergence above {threshold:.2f}: the largest |Δp| is "
                f"{abs(diff[worst]):.2f} at {labels[worst]}.")
    return f"Diverges first at {labels[row]} (|Δp| = {abs(diff[row]):.2f} > {threshold:.2f})."


def comparison_chart(comparison: LensComparison, threshold: float):
    """Both prompts' target probability per layer (last position), and B − A per layer.

    A vertical marker shows the first layer where |B − A| exceeds ``threshold`` (if any).
    """
    pa, pb = comparison.curves()
    diff = comparison.difference()
    labels = list(comparison.layer_labels)
    n_rows = len(labels)
    row = comparison.divergence_row(threshold)
    source = ColumnDataSource({
        "row": list(range(n_rows)), "layer": labels, "a": [float(v) for v in pa], "b": [float(v) for v in pb],
        "diff": [float(v) for v in diff],
        "color": [COLOR_B if d >= 0 else COLOR_A for d in diff],
    }, name="lens-compare-source")
    ticker, overrides = layer_ticks(n_rows, labels, max_ticks=16)
    target = quote_token(comparison.a.target)
    x_range = Range1d(-0.5, n_rows - 0.5)

    curves = figure(name="lens-compare-curves", height=250, sizing_mode="stretch_width",
                    title=f"p({target}) at the last position: prompt A vs prompt B",
                    x_range=x_range, y_range=Range1d(-0.02, 1.02),
                    tools="xpan,xwheel_zoom,reset,save", toolbar_location="right")
    curves.line("row", "a", source=source, line_width=2, color=COLOR_A,
                legend_label=f"A: {shorten(comparison.request.prompt_a)}")
    curves.scatter("row", "a", source=source, size=5, color=COLOR_A)
    curves.line("row", "b", source=source, line_width=2, color=COLOR_B, line_dash="dashed",
                legend_label=f"B: {shorten(comparison.request.prompt_b)}")
    curves.scatter("row", "b", source=source, size=5, color=COLOR_B, marker="square")
    curves.add_tools(HoverTool(tooltips=[("layer", "@layer"), ("p A", "@a{0.0000}"),
                                         ("p B", "@b{0.0000}"), ("B − A", "@diff{+0.0000}")],
                               mode="vline"))
    curves.legend.location = "top_left"
    curves.legend.label_text_font_size = "10px"
    curves.legend.background_fill_alpha = 0.8
    curves.legend.click_policy = "hide"
    curves.yaxis.axis_label = "probability"

    delta = figure(name="lens-compare-diff", height=190, sizing_mode="stretch_width",
                   title=f"B − A per layer (dashed: ±{threshold:.2f})", x_range=x_range,
                   y_range=Range1d(-1.05, 1.05), tools="xpan,xwheel_zoom,reset,save",
                   toolbar_location="right")
    delta.vbar(x="row", top="diff", width=0.7, color="color", source=source)
    for level in (threshold, -threshold):
        delta.add_layout(Span(location=level, dimension="width", line_dash="dashed",
                              line_color="#777777", line_width=1))
    delta.yaxis.axis_label = "Δp"
    delta.xaxis.axis_label = "layer"

    for fig in (curves, delta):
        style_figure(fig)
        fig.xaxis.ticker = ticker
        fig.xaxis.major_label_overrides = overrides
        if row is not None:
            fig.add_layout(Span(location=row, dimension="height", line_color="#d62728", line_width=2))
    if row is not None:
        curves.add_layout(Label(x=row, y=0.9, text=f" diverges at {labels[row]}", text_color="#d62728",
                                text_font_size="11px", x_offset=4,
                                text_align="left" if row < n_rows * 0.7 else "right"))
    else:
        curves.title.text += f" (no divergence above {threshold:.2f})"
    return column(curves, delta, name=COMPARE_CHART, sizing_mode="stretch_width")
