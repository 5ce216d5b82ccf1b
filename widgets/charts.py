"""Chart builders: pure functions from engine results to Bokeh figures (no server, no Panel).

Every builder returns a fresh Bokeh model; the views swap whole figures instead of mutating
data sources, which keeps Bokeh changes trivially thread-safe. Models carry ``name`` values
so tests (and the view's tap handler) can find them: see ``HEATMAP_SOURCE`` and friends.
"""
from __future__ import annotations

import html
import math

import numpy as np
from bokeh.layouts import column
from bokeh.models import (
    ColorBar,
    ColumnDataSource,
    FixedTicker,
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


# ------------------------------------------------------------------ token text
def show_token(token: str) -> str:
    """A token made visible: control characters escaped, an all-space token as '␣'."""
    text = str(token).replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if text and not text.strip(" "):
        return "␣" * len(text)
    return text


def quote_token(token: str) -> str:
    """A token in quotes with its spaces kept, e.g. ' Paris' (for titles and hovers)."""
    return "'" + show_token(token) + "'"


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def position_labels(tokens) -> list[str]:
    """Unique x-axis factors, one per position: '3: Paris'."""
    return [f"{i}: {_cut(show_token(t).strip(' ') or '␣', 14)}" for i, t in enumerate(tokens)]


def shorten(text: str, n: int = 44) -> str:
    """Keep the start and the end of a long prompt (the parts that usually differ)."""
    text = " ".join(str(text).split())
    if len(text) <= n:
        return text
    half = (n - 1) // 2
    return text[:half].rstrip() + "…" + text[-half:].lstrip()


def _row_ticks(n_rows: int, labels, max_ticks: int = 9) -> tuple[FixedTicker, dict]:
    """At most ~``max_ticks`` ticks on a layer axis, always the embeddings and the last layer."""
    step = max(1, math.ceil(n_rows / max_ticks))
    ticks = list(range(0, n_rows, step))
    if n_rows - 1 - ticks[-1] <= step / 2 and len(ticks) > 1:
        ticks[-1] = n_rows - 1  # no crowded pair of labels at the end
    else:
        ticks.append(n_rows - 1)
    ticks = sorted(set(ticks))
    return FixedTicker(ticks=ticks), {int(i): str(labels[i]) for i in ticks}


def _style(fig) -> None:
    fig.toolbar.logo = None
    fig.title.text_font_size = "12px"
    fig.title.text_font_style = "bold"
    fig.axis.major_label_text_font_size = "10px"
    fig.axis.axis_label_text_font_size = "11px"
    fig.axis.axis_label_text_font_style = "normal"
    fig.grid.grid_line_alpha = 0.35


# --------------------------------------------------------------------- heatmap
def _topk_html(result: LensResult, row: int, pos: int) -> str:
    lines = []
    for token, prob in zip(result.top_tokens[row, pos], result.top_probs[row, pos]):
        lines.append(f"{prob:6.3f}&nbsp;&nbsp;{html.escape(quote_token(token))}")
    return "<br>".join(lines)


def heatmap_data(result: LensResult, metric: str = "prob") -> dict[str, list]:
    """The heatmap's columns, one entry per (row, position) cell, row-major."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    values = np.asarray(result.metric(metric), dtype=float)
    low, high = _color_range(values, metric)
    n_rows, n_pos = values.shape
    xs = position_labels(result.tokens)
    reverse = metric != "prob"
    data: dict[str, list] = {k: [] for k in (
        "x", "y", "row", "pos", "value", "top1", "text", "text_color", "font_style",
        "layer", "token", "top_prob", "entropy", "kl", "target_prob", "target_rank", "topk")}
    for r in range(n_rows):
        for p in range(n_pos):
            v = float(values[r, p])
            t = 0.0 if high <= low else min(1.0, max(0.0, (v - low) / (high - low)))
            brightness = 1.0 - t if reverse else t
            top1 = str(result.top_tokens[r, p, 0])
            data["x"].append(xs[p])
            data["y"].append(result.layer_labels[r])
            data["row"].append(r)
            data["pos"].append(p)
            data["value"].append(v)
            data["top1"].append(top1)
            data["text"].append(_cut(show_token(top1), CELL_CHARS))
            # Viridis is dark below ~0.55: white text there, near-black above.
            data["text_color"].append("#ffffff" if brightness < 0.55 else "#1a1a1a")
            # Cells whose top-1 is the target token are bold: where the answer appears.
            data["font_style"].append("bold" if result.top_ids[r, p, 0] == result.target_id else "normal")
            data["layer"].append(result.layer_labels[r])
            data["token"].append(f"{p}: {html.escape(quote_token(result.tokens[p]))}")
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


def lens_heatmap(result: LensResult, metric: str = "prob", position: int | None = None):
    """Layers × positions, each cell its top-1 token, coloured by ``metric`` (prob, entropy, kl).

    Rows run from the embeddings (bottom) to the last layer (top), as the residual stream
    flows. ``position`` outlines one column (the selected position). The cells'
    ColumnDataSource is named ``HEATMAP_SOURCE`` and carries ``row``/``pos`` per cell.
    """
    data = heatmap_data(result, metric)  # checks the metric name
    title, palette = METRICS[metric]
    source = ColumnDataSource(data, name=HEATMAP_SOURCE, tags=["lens-heatmap-cells"])
    low, high = _color_range(np.asarray(data["value"]), metric)
    mapper = LinearColorMapper(palette=list(palette), low=low, high=high)

    xs = position_labels(result.tokens)
    n_rows, n_pos = result.n_rows, result.n_positions
    fig = figure(
        name=HEATMAP,
        x_range=xs,
        y_range=list(result.layer_labels),
        height=ROW_PX * n_rows + 110,
        min_width=COLUMN_PX * n_pos + 170,
        sizing_mode="stretch_width",
        tools="pan,box_zoom,wheel_zoom,reset,save",
        toolbar_location="right",
        title=f"Top-1 token per layer and position · colour: {title}",
        x_axis_location="below",
    )
    _style(fig)
    cells = fig.rect("x", "y", 1, 1, source=source, fill_color={"field": "value", "transform": mapper},
                     line_color="#ffffff", line_width=0.5,
                     # a tap selects a cell; keep the other cells fully visible
                     nonselection_fill_alpha=1.0, nonselection_line_alpha=1.0,
                     selection_line_color="#e6194b", selection_line_width=2)
    fig.text("x", "y", text="text", source=source, text_align="center", text_baseline="middle",
             text_font_size="10px", text_color="text_color", text_font_style="font_style")
    if position is not None and 0 <= position < n_pos:
        # Outline the selected column; (factor, offset) pairs address a category's edges.
        fig.quad(left=[(xs[position], -0.5)], right=[(xs[position], 0.5)],
                 bottom=[(result.layer_labels[0], -0.5)], top=[(result.layer_labels[-1], 0.5)],
                 fill_alpha=0, line_color="#e6194b", line_width=2)
    fig.add_tools(HoverTool(renderers=[cells], tooltips=_HEATMAP_TOOLTIP))
    fig.add_tools(TapTool(renderers=[cells]))
    fig.add_layout(ColorBar(color_mapper=mapper, title=title, title_text_font_size="10px",
                            major_label_text_font_size="10px", width=10, padding=6), "right")
    fig.grid.visible = False
    fig.axis.axis_line_color = None
    fig.axis.major_tick_line_color = None
    fig.xaxis.major_label_orientation = 0.0 if n_pos <= 14 else math.pi / 4
    fig.yaxis.axis_label = "layer (residual stream after)"
    fig.xaxis.axis_label = "prompt position: token"
    return fig


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
    source = ColumnDataSource(dict(
        row=list(range(n_rows)), layer=labels,
        prob=[float(v) for v in result.target_probs[:, pos]],
        rank=[int(v) for v in result.target_ranks[:, pos]],
        top1=[quote_token(t) for t in result.top_tokens[:, pos, 0]],
    ), name="lens-target-source")
    ticker, overrides = _row_ticks(n_rows, labels)
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
        _style(fig)
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
    source = ColumnDataSource(dict(
        row=list(range(n_rows)), layer=labels, a=[float(v) for v in pa], b=[float(v) for v in pb],
        diff=[float(v) for v in diff],
        color=[COLOR_B if d >= 0 else COLOR_A for d in diff],
    ), name="lens-compare-source")
    ticker, overrides = _row_ticks(n_rows, labels, max_ticks=16)
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
        _style(fig)
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
