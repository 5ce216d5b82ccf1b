"""Chart builders for the ablation tab: pure functions from ablation, sweep and patching results.

The single-ablation charts (card, both lenses, the target's curves) are rebuilt per result. The
sweep and patching charts, which fill in live, are in ``widgets.sweep_charts`` and re-exported
here. Models carry ``name`` values so tests and the view's tap handler can find them.
"""
from __future__ import annotations

import html

from bokeh.layouts import column
from bokeh.models import ColumnDataSource, HoverTool, Range1d
from bokeh.plotting import figure

from explorer.interventions.ablation import AblationResult

from .chart_style import layer_ticks, style_figure
from .charts import COLOR_A, COLOR_B, HEATMAP_SOURCE, lens_heatmap, quote_token, shorten
from .sweep_charts import (
    BAR_PX,
    DIVERGING,
    GRID_MAX_HEADS,
    GRID_MAX_LAYERS,
    NAN_COLOR,
    PATCH_CHART,
    PATCH_HELD,
    PATCH_MAPPER,
    PATCH_SHOWN,
    PATCH_SOURCE,
    ROW_PX,
    SWEEP_CHART,
    SWEEP_FILTER,
    SWEEP_MAPPER,
    SWEEP_NOTE,
    SWEEP_SOURCE,
    SWEEP_TOP_N,
    UNITS,
    metric_name,
    patch_axis,
    patch_chart,
    patch_data,
    patch_key,
    ranked_indices,
    sweep_chart,
    sweep_data,
    sweep_hint,
    sweep_key,
    sweep_note,
    sweep_ranked,
    sweep_top_html,
    update_patch_chart,
    update_sweep_chart,
)

# Names of the models tests and the view look up.
LENS_BASELINE = "ablation-lens-baseline"
LENS_ABLATED = "ablation-lens-ablated"
TARGET_PAIR = "ablation-target-pair"
TARGET_PAIR_SOURCE = "ablation-target-source"


# ---------------------------------------------------------- single ablation
def _card_values(result: AblationResult) -> list[tuple[str, float, float, str]]:
    """(quantity, baseline, ablated, number format) per card row."""
    b, a = result.baseline, result.ablated
    rows = [("logit", b.logit, a.logit, "{:.3f}"), ("probability", b.prob, a.prob, "{:.4f}"),
            ("rank", b.rank, a.rank, "{:d}")]
    if b.logit_diff is not None and a.logit_diff is not None:
        rows.append((f"logit diff vs {quote_token(result.compare)}", b.logit_diff, a.logit_diff, "{:.3f}"))
    return rows


def card_rows(result: AblationResult) -> list[tuple[str, str, str, str]]:
    """(quantity, baseline, ablated, change) rows of the result card, formatted."""
    out = []
    for name, base, abl, fmt in _card_values(result):
        change = fmt.replace("{:", "{:+").format(abl - base)
        out.append((name, fmt.format(base), fmt.format(abl), change))
    return out


CARD_CSS = """
.caption { font-weight: 600; margin-bottom: 4px; }
.sub { color: #555; font-size: 12px; margin-bottom: 6px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 12px 3px 0; text-align: right; }
th { color: #666; font-weight: normal; border-bottom: 1px solid #ddd; }
td:first-child, th:first-child { text-align: left; }
td.down { color: #b2182b; } td.up { color: #2166ac; }
"""


def ablation_card(result: AblationResult) -> str:
    """HTML card: what was ablated, and baseline vs ablated logit, probability, rank (and logit diff)."""
    req = result.request
    comps = ", ".join(result.components)
    how = req.mode
    if req.mode == "mean":
        how += " (over the default corpus)" if req.mean_text is None else " (over your text)"
    elif req.mode == "resample":
        how += f" (from {html.escape(repr(shorten(req.second_prompt or '', 40)))})"
    body = []
    for (name, base, abl, change), (_, b, a, _) in zip(card_rows(result), _card_values(result)):
        # a higher logit/probability is better for the target, a higher rank number worse
        better = (a < b) if name == "rank" else (a > b)
        cls = "" if a == b else ("up" if better else "down")
        body.append(f"<tr><td>{html.escape(name)}</td><td>{base}</td><td>{abl}</td>"
                    f"<td class='{cls}'>{change}</td></tr>")
    return (f"<div class='caption'>Ablated {html.escape(comps)} · {html.escape(how)}</div>"
            f"<div class='sub'>target {html.escape(quote_token(result.target))} at the last position of "
            f"{html.escape(repr(shorten(req.prompt, 50)))}</div>"
            f"<table><tr><th></th><th>baseline</th><th>ablated</th><th>change</th></tr>{''.join(body)}</table>")


def lens_pair(result: AblationResult):
    """The logit lens without and with the ablation: two heatmaps on the same 0–1 probability scale."""
    if result.lens_baseline is None or result.lens_ablated is None:
        raise ValueError("this ablation result has no logit lens (it was run with lens=False)")
    figs = []
    for lens, name, what in ((result.lens_baseline, LENS_BASELINE, "baseline"),
                             (result.lens_ablated, LENS_ABLATED, f"ablated {', '.join(result.components)}")):
        # colour = top-1 probability, a fixed 0–1 range: both maps share one colour scale
        fig = lens_heatmap(lens, "prob", position=None)
        fig.name = name
        fig.select_one({"name": HEATMAP_SOURCE}).name = f"{name}-source"
        fig.title.text = f"Logit lens, {what} · colour: top-1 probability"
        figs.append(fig)
    return figs


def target_pair(result: AblationResult):
    """p(target) (top) and its rank (bottom, log) per layer at the last position, baseline vs ablated."""
    base, abl = result.lens_baseline, result.lens_ablated
    if base is None or abl is None:
        raise ValueError("this ablation result has no logit lens (it was run with lens=False)")
    labels = list(base.layer_labels)
    n = len(labels)
    source = ColumnDataSource({
        "row": list(range(n)), "layer": labels,
        "p_base": [float(v) for v in base.target_probs[:, -1]], "p_abl": [float(v) for v in abl.target_probs[:, -1]],
        "r_base": [int(v) for v in base.target_ranks[:, -1]], "r_abl": [int(v) for v in abl.target_ranks[:, -1]],
    }, name=TARGET_PAIR_SOURCE)
    target = quote_token(result.target)
    x_range = Range1d(-0.5, n - 0.5)
    ticker, overrides = layer_ticks(n, labels)
    tips = [("layer", "@layer"), ("p baseline", "@p_base{0.0000}"), ("p ablated", "@p_abl{0.0000}"),
            ("rank baseline", "@r_base"), ("rank ablated", "@r_abl")]
    prob = figure(name=f"{TARGET_PAIR}-prob", height=220, sizing_mode="stretch_width", x_range=x_range,
                  y_range=Range1d(-0.02, 1.02), title=f"p({target}) per layer at the last position",
                  tools="xpan,xwheel_zoom,reset,save", toolbar_location="right")
    prob.line("row", "p_base", source=source, line_width=2, color=COLOR_A, legend_label="baseline")
    prob.scatter("row", "p_base", source=source, size=5, color=COLOR_A)
    prob.line("row", "p_abl", source=source, line_width=2, color=COLOR_B, line_dash="dashed",
              legend_label="ablated")
    prob.scatter("row", "p_abl", source=source, size=5, color=COLOR_B, marker="square")
    prob.legend.location = "top_left"
    prob.legend.label_text_font_size = "10px"
    prob.legend.background_fill_alpha = 0.8
    prob.yaxis.axis_label = "probability"
    max_rank = max(2, max(source.data["r_base"] + source.data["r_abl"]))
    rank = figure(name=f"{TARGET_PAIR}-rank", height=170, sizing_mode="stretch_width", x_range=x_range,
                  y_axis_type="log", y_range=Range1d(max_rank * 2.0, 0.7), title=f"rank of {target} (1 = top)",
                  tools="xpan,xwheel_zoom,reset,save", toolbar_location="right")
    rank.line("row", "r_base", source=source, line_width=2, color=COLOR_A)
    rank.line("row", "r_abl", source=source, line_width=2, color=COLOR_B, line_dash="dashed")
    rank.yaxis.axis_label = "rank"
    rank.xaxis.axis_label = "layer"
    for fig in (prob, rank):
        style_figure(fig)
        fig.add_tools(HoverTool(tooltips=tips, mode="vline"))
        fig.xaxis.ticker = ticker
        fig.xaxis.major_label_overrides = overrides
    return column(prob, rank, name=TARGET_PAIR, sizing_mode="stretch_width")


__all__ = [  # the single-ablation charts, and the sweep and patching charts (from sweep_charts)
    "BAR_PX", "CARD_CSS", "DIVERGING", "GRID_MAX_HEADS", "GRID_MAX_LAYERS", "LENS_ABLATED", "LENS_BASELINE",
    "NAN_COLOR", "PATCH_CHART", "PATCH_HELD", "PATCH_MAPPER", "PATCH_SHOWN", "PATCH_SOURCE", "ROW_PX",
    "SWEEP_CHART", "SWEEP_FILTER", "SWEEP_MAPPER", "SWEEP_NOTE", "SWEEP_SOURCE", "SWEEP_TOP_N", "TARGET_PAIR",
    "TARGET_PAIR_SOURCE", "UNITS", "ablation_card", "card_rows", "lens_pair", "metric_name", "patch_axis",
    "patch_chart", "patch_data", "patch_key", "ranked_indices", "sweep_chart", "sweep_data", "sweep_hint",
    "sweep_key", "sweep_note", "sweep_ranked", "sweep_top_html", "target_pair", "update_patch_chart",
    "update_sweep_chart",
]
