"""Chart builders for SAEs: pure functions from results to Bokeh figures.

- ``training_charts``: one small line chart per training metric (FVU, L0, dead-latent share,
  Δ LM loss) against tokens, each with a named ``ColumnDataSource`` per line so a view can
  replace the data as a run goes on (``training_data``);
- ``features_heatmap``: a prompt's top SAE features, positions across and rank 1..k down, each
  cell the feature's number, coloured by its activation; a long prompt gets a position window
  (``chart_style.position_axis``), so no figure is wider than ``MAX_CANVAS_PX``.
"""
from __future__ import annotations

import numpy as np
from bokeh.models import ColorBar, ColumnDataSource, HoverTool, LinearColorMapper
from bokeh.palettes import Oranges256
from bokeh.plotting import figure

from explorer.features.attribution import FeatureAttribution
from explorer.features.encode import FeatureActivations
from explorer.features.train import SAETrainResult

from .chart_style import MAX_CANVAS_PX, add_note, bounded, position_axis, style_figure, text_colors

# metric -> (title, y label, [(line, colour, legend)])
METRICS = {
    "fvu": ("Fraction of variance unexplained", "FVU",
            [("train", "#1f77b4", "training batches"), ("eval", "#d62728", "held-out windows")]),
    "l0": ("L0: active latents per token", "L0", [("train", "#1f77b4", "training batches"),
                                                   ("eval", "#d62728", "held-out windows")]),
    "dead": ("Dead latents", "share", [("train", "#7f7f7f", "no firing in the last window of tokens")]),
    "delta_loss": ("Δ LM loss with the reconstruction spliced in", "nats",
                   [("eval", "#d62728", "held-out windows")]),
}
HEATMAP = "sae-features-heatmap"
HEATMAP_SOURCE = "sae-features-cells"
COLUMN_PX, ROW_PX, HELD, SHOWN = 64, 24, 96, 40


def chart_name(metric: str) -> str:
    return f"sae-chart-{metric}"


def source_name(metric: str, line: str) -> str:
    return f"sae-source-{metric}-{line}"


def training_data(result: SAETrainResult | None) -> dict[tuple[str, str], dict[str, list]]:
    """The data of every line: (metric, line) -> {"tokens", "value"}."""
    empty = {"tokens": [], "value": []}
    if result is None:
        return {(m, line): dict(empty) for m, (_, _, lines) in METRICS.items() for line, _, _ in lines}
    cols = {("fvu", "train"): (result.log_tokens, result.log_fvu),
            ("fvu", "eval"): (result.eval_tokens, result.eval_fvu),
            ("l0", "train"): (result.log_tokens, result.log_l0),
            ("l0", "eval"): (result.eval_tokens, result.eval_l0),
            ("dead", "train"): (result.log_tokens, result.log_dead),
            ("delta_loss", "eval"): (result.eval_tokens, result.eval_delta_loss)}
    return {key: {"tokens": [int(t) for t in x], "value": [float(v) for v in y]} for key, (x, y) in cols.items()}


def training_charts(result: SAETrainResult | None = None, width: int = 420, height: int = 230) -> dict[str, figure]:
    """metric -> figure (see the module docstring); empty lines before a run."""
    data = training_data(result)
    figs = {}
    for metric, (title, ylabel, lines) in METRICS.items():
        fig = figure(title=title, width=width, height=height, x_axis_label="tokens", y_axis_label=ylabel,
                     tools="pan,wheel_zoom,reset,save", name=chart_name(metric))
        for line, colour, legend in lines:
            src = ColumnDataSource(data[(metric, line)], name=source_name(metric, line))
            fig.line("tokens", "value", source=src, color=colour, line_width=2, legend_label=legend)
            fig.scatter("tokens", "value", source=src, color=colour, size=4)
        fig.add_tools(HoverTool(tooltips=[("tokens", "@tokens{0,0}"), (ylabel, "@value{0.000}")]))
        fig.legend.location = "top_right"
        fig.legend.label_text_font_size = "10px"
        fig.xaxis.formatter.use_scientific = False
        style_figure(fig)
        figs[metric] = fig
    return figs


def features_heatmap(result: FeatureActivations, window: tuple[int, int] | None = None):
    """Positions × rank of the top features (cell text: the feature number; colour: activation)."""
    tokens = [str(t) for t in result.tokens]
    axis = position_axis(tokens, held=HELD, shown=SHOWN, window=window)
    k = result.features.shape[1]
    ranks = [str(r + 1) for r in range(k)]
    xs, ys, feats, acts, toks = [], [], [], [], []
    for pos in axis.positions:
        for r in range(k):
            f = int(result.features[pos, r])
            xs.append(axis.coord(pos))
            ys.append(ranks[r])
            feats.append(str(f) if f >= 0 else "")
            acts.append(float(result.activations[pos, r]) if f >= 0 else float("nan"))
            toks.append(tokens[pos])
    finite = [a for a in acts if a == a]
    high = max(finite) if finite else 1.0
    mapper = LinearColorMapper(palette=list(reversed(Oranges256)), low=0.0, high=high, nan_color="#f2f2f2")
    src = ColumnDataSource({"x": xs, "rank": ys, "feature": feats, "activation": acts, "token": toks,
                            "text_color": text_colors(list(reversed(Oranges256)), 0.0, high, acts)},
                           name=HEATMAP_SOURCE)
    n_cols = len(axis.coords()) if axis.categorical else axis.view_stop - axis.view_start
    width = bounded(140 + COLUMN_PX * n_cols, MAX_CANVAS_PX)
    height = bounded(110 + ROW_PX * k, MAX_CANVAS_PX)
    fig = figure(title=f"Top {k} SAE features per position (layer {result.layer} {result.site}, "
                       f"{result.d_sae:,} features, {result.architecture})",
                 x_range=axis.axis_range(), y_range=list(reversed(ranks)), width=width, height=height,
                 tools="pan,reset,save", name=HEATMAP, toolbar_location="above")
    fig.rect("x", "rank", 1, 1, source=src, fill_color={"field": "activation", "transform": mapper},
             line_color="white")
    fig.text("x", "rank", text="feature", source=src, text_align="center", text_baseline="middle",
             text_font_size="10px", text_color="text_color")
    fig.add_tools(HoverTool(tooltips=[("token", "@token"), ("feature", "@feature"),
                                      ("activation", "@activation{0.000}")]))
    fig.add_layout(ColorBar(color_mapper=mapper, width=8, title="activation"), "right")
    fig.yaxis.axis_label = "rank"
    axis.style_axis(fig.xaxis[0])
    axis.annotate(fig)
    add_note(fig, f"L0 (active features) per position: mean {np.mean(result.l0):.1f}, max {int(np.max(result.l0))}")
    style_figure(fig)
    return fig


ATTRIBUTION = "sae-attribution-heatmap"
ATTRIBUTION_SOURCE = "sae-attribution-cells"


def attribution_heatmap(result: FeatureAttribution, window: tuple[int, int] | None = None):
    """Features (ranked by |total|, top row first) × positions, coloured by activation × gradient
    (red raises the target logit, blue lowers it); a position window past 32 positions."""
    from bokeh.palettes import RdBu11

    tokens = [str(t) for t in result.tokens]
    axis = position_axis(tokens, held=HELD, shown=SHOWN, window=window)
    rows = [f"#{int(f)} ({t:+.3g})" for f, t in zip(result.features, result.totals)]
    xs, ys, vals, toks, feats = [], [], [], [], []
    for pos in axis.positions:
        for i, label in enumerate(rows):
            xs.append(axis.coord(pos))
            ys.append(label)
            vals.append(float(result.per_position[pos, i]))
            toks.append(tokens[pos])
            feats.append(int(result.features[i]))
    bound = max([abs(v) for v in vals] + [1e-9])
    palette = list(RdBu11)   # bokeh lists it blue to red: red for high (raises the logit)
    mapper = LinearColorMapper(palette=palette, low=-bound, high=bound)
    src = ColumnDataSource({"x": xs, "feature_row": ys, "value": vals, "token": toks, "feature": feats},
                           name=ATTRIBUTION_SOURCE)
    n_cols = len(axis.coords()) if axis.categorical else axis.view_stop - axis.view_start
    fig = figure(title=f"Attribution of {result.target!r} (logit {result.logit:.2f}) to SAE features: "
                       "activation × gradient", x_range=axis.axis_range(), y_range=list(reversed(rows)),
                 width=bounded(220 + 44 * n_cols), height=bounded(110 + 20 * len(rows)),
                 tools="pan,reset,save", name=ATTRIBUTION, toolbar_location="above")
    fig.rect("x", "feature_row", 1, 1, source=src, fill_color={"field": "value", "transform": mapper},
             line_color="white")
    fig.add_tools(HoverTool(tooltips=[("feature", "@feature"), ("token", "@token"),
                                      ("attribution", "@value{+0.0000}")]))
    fig.add_layout(ColorBar(color_mapper=mapper, width=8, title="act × grad"), "right")
    axis.style_axis(fig.xaxis[0])
    axis.annotate(fig)
    style_figure(fig)
    return fig
