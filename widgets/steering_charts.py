"""Chart builders of the Generate and Steering tabs: pure functions from results to bokeh figures
(or HTML), testable without a server.

- ``token_strip``: an arm's generated tokens as clickable cells, wrapped into lines;
- ``rank_chart``: the chosen token's rank per layer (log scale, 1 on top) in both arms;
- ``lens_column_html``: per layer (the last on top), each arm's top-1 token and the chosen token's rank;
- ``sweep_chart``: the steering metric against α (NaN = not computed yet: a gap), the baseline dashed;
- ``vector_html`` / ``apply_html``: where a vector was read, and what applying it did.
"""
from __future__ import annotations

import html
import math

import numpy as np
from bokeh.models import ColumnDataSource, HoverTool, Range1d, Span, TapTool
from bokeh.plotting import figure

from explorer.interventions.generate import GenerateResult, Generation
from explorer.interventions.steering import SteeringVector, SteerResult, SteerSweepResult

from .chart_style import add_note, bounded, layer_ticks, show_token, style_figure

TOKEN_STRIP = "generate-token-strip"
TOKEN_SOURCE = "generate-token-source"
RANK_CHART = "generate-rank-chart"
SWEEP_CHART = "steering-sweep-chart"
ARM_COLORS = ("#1f77b4", "#d62728")    # baseline, intervened
CHAR_PX = 8
LINE_CHARS = 90
STRIP_WIDTH = LINE_CHARS * CHAR_PX

TABLE_CSS = """
table { border-collapse: collapse; font-size: 12px; }
th, td { padding: 1px 8px 1px 0; text-align: right; }
th { color: #555; font-weight: normal; border-bottom: 1px solid #ddd; }
td.tok { text-align: left; font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre; }
"""


def _tok(token) -> str:
    return show_token(str(token))


def token_strip(gen: Generation, selected: int | None = None, title: str | None = None):
    """The tokens of one arm as cells wrapped at ~``LINE_CHARS`` characters; tap selects one."""
    xs, ys, ws, texts, idx = [], [], [], [], []
    x, line = 0, 0
    for n, token in enumerate(gen.tokens):
        text = _tok(token)
        w = max(2, len(text) + 1)
        if x + w > LINE_CHARS and x > 0:
            x, line = 0, line + 1
        xs.append(x + w / 2)
        ys.append(-line)
        ws.append(w)
        texts.append(text)
        idx.append(n)
        x += w
    lines = line + 1
    source = ColumnDataSource({"x": xs, "y": ys, "w": ws, "text": texts, "n": idx,
                               "color": ["#fde3a7" if i == selected else "#eef3f8" for i in idx]},
                              name=TOKEN_SOURCE)
    fig = figure(name=TOKEN_STRIP, width=STRIP_WIDTH, height=bounded(34 + 24 * lines),
                 x_range=Range1d(0, LINE_CHARS), y_range=Range1d(-lines + 0.5, 0.5), tools="",
                 toolbar_location=None, title=title or gen.label)
    # The picked token is marked by its fill colour; the others stay opaque (Bokeh's default
    # fades unselected glyphs to 0.1 alpha, which left the text unreadable once one was picked).
    fig.rect("x", "y", width="w", height=0.85, source=source, fill_color="color", line_color="#c9d3de",
             nonselection_fill_alpha=1.0, nonselection_line_alpha=1.0)
    fig.text("x", "y", text="text", source=source, text_align="center", text_baseline="middle",
             text_font_size="12px", text_font="monospace", text_color="#222222", nonselection_text_alpha=1.0)
    fig.add_tools(TapTool(), HoverTool(tooltips=[("token", "@n: @text")]))
    fig.axis.visible = False
    fig.grid.visible = False
    style_figure(fig)
    if selected is not None and 0 <= selected < len(idx):
        source.selected.indices = [selected]
    return fig


def rank_chart(result: GenerateResult, n: int):
    """Rank (log scale, 1 on top) per layer of the token each arm chose at step ``n``."""
    labels = list(result.layer_labels)
    rows = len(labels)
    fig = figure(name=RANK_CHART, height=260, sizing_mode="stretch_width", y_axis_type="log",
                 x_range=Range1d(-0.5, rows - 0.5), tools="xpan,xwheel_zoom,reset,save", toolbar_location="right",
                 title=f"rank of each arm's token {n} per layer (1 = top; where the model commits)")
    top = 2
    for color, arm in zip(ARM_COLORS, result.arms):
        if not arm.has_lens or n >= len(arm.token_ids):
            continue
        ranks = [int(r) for r in arm.chosen_ranks[:, n]]
        top = max(top, *ranks)
        src = ColumnDataSource({"row": list(range(rows)), "rank": ranks, "layer": labels,
                                "top1": [_tok(t) for t in arm.top_tokens[:, n, 0]],
                                "p": [float(p) for p in arm.chosen_probs[:, n]]})
        label = f"{arm.label}: {_tok(arm.tokens[n])}"
        fig.line("row", "rank", source=src, color=color, line_width=2, legend_label=label[:60])
        fig.scatter("row", "rank", source=src, color=color, size=5)
    fig.y_range = Range1d(top * 2.0, 0.7)
    fig.add_tools(HoverTool(tooltips=[("layer", "@layer"), ("rank", "@rank"), ("p", "@p{0.0000}"),
                                      ("top-1", "@top1")]))
    ticker, overrides = layer_ticks(rows, labels)
    fig.xaxis.ticker = ticker
    fig.xaxis.major_label_overrides = overrides
    fig.xaxis.axis_label = "layer"
    fig.yaxis.axis_label = "rank"
    if fig.legend:
        fig.legend.location = "bottom_right"
        fig.legend.label_text_font_size = "11px"
    style_figure(fig)
    return fig


def lens_column_html(result: GenerateResult, n: int) -> str:
    """Per layer (the last on top): each arm's top-1 token and the chosen token's rank at step ``n``."""
    arms = [a for a in result.arms if a.has_lens and n < len(a.token_ids)]
    if not arms:
        return "<p>No lens for this token (generate with the lens on).</p>"
    head = "".join(f"<th colspan=3>{html.escape(a.label[:40])}: {html.escape(_tok(a.tokens[n]))}</th>" for a in arms)
    sub = "".join("<th>top-1</th><th>p</th><th>rank</th>" for _ in arms)
    rows = []
    for r in range(len(result.layer_labels) - 1, -1, -1):
        cells = "".join(f"<td class=tok>{html.escape(_tok(a.top_tokens[r, n, 0]))}</td>"
                        f"<td>{a.top_probs[r, n, 0]:.3f}</td><td>{int(a.chosen_ranks[r, n])}</td>" for a in arms)
        rows.append(f"<tr><th>{html.escape(result.layer_labels[r])}</th>{cells}</tr>")
    return f"<table><tr><th></th>{head}</tr><tr><th>layer</th>{sub}</tr>{''.join(rows)}</table>"


def sweep_chart(result: SteerSweepResult):
    """The metric against α; points not computed yet are gaps; the unsteered metric dashed."""
    what = f"logit({_tok(result.target)})" + ("" if result.compare is None else f" − logit({_tok(result.compare)})")
    fig = figure(name=SWEEP_CHART, height=280, sizing_mode="stretch_width", tools="pan,wheel_zoom,reset,save",
                 toolbar_location="right", title=f"{what} against α (steering at L{result.layer})")
    metric = [float(m) if not math.isnan(m) else float("nan") for m in result.metric]
    src = ColumnDataSource({"alpha": [float(a) for a in result.alphas], "metric": metric,
                            "prob": [float(p) for p in result.probs], "rank": [int(r) for r in result.ranks]})
    fig.line("alpha", "metric", source=src, line_width=2, color=ARM_COLORS[1])
    fig.scatter("alpha", "metric", source=src, size=7, color=ARM_COLORS[1])
    fig.add_layout(Span(location=result.baseline_metric, dimension="width", line_dash="dashed", line_color="#777"))
    fig.add_tools(HoverTool(tooltips=[("α", "@alpha"), ("metric", "@metric{0.000}"), ("p(target)", "@prob{0.0000}"),
                                      ("rank", "@rank")]))
    fig.xaxis.axis_label = "α"
    fig.yaxis.axis_label = what
    if not result.complete:
        add_note(fig, f"{result.done} of {result.total} done")
    style_figure(fig)
    return fig


def vector_html(vec: SteeringVector) -> str:
    """The vector's summary and the token each prompt was read at."""
    def table(name, prompts, tokens):
        rows = "".join(f"<tr><td class=tok>{html.escape(p[:60])}</td><td class=tok>{html.escape(_tok(t))}</td></tr>"
                       for p, t in zip(prompts, tokens))
        return f"<table><tr><th>{name} prompt</th><th>read at</th></tr>{rows}</table>"

    summary = (f"<p><b>{html.escape(vec.method)}</b> vector at L{vec.layer}, norm {vec.norm:.3f}, "
               f"d = {vec.d_model}, model {html.escape(vec.model or '?')}</p>")
    return summary + table("positive", vec.positive, vec.positive_tokens) + table(
        "negative", vec.negative, vec.negative_tokens)


def apply_html(result: SteerResult) -> str:
    """Baseline and steered target stats side by side."""
    req = result.request
    what = "direction ablated at every layer" if req.mode == "ablate" else f"α = {req.alpha:g} at L{result.layer}"
    rows = "".join(
        f"<tr><th>{name}</th><td>{s.logit:.3f}</td><td>{s.prob:.4g}</td><td>{s.rank}</td>"
        f"<td>{'' if s.logit_diff is None else f'{s.logit_diff:.3f}'}</td></tr>"
        for name, s in (("baseline", result.baseline), ("steered", result.steered)))
    return (f"<p>{html.escape(_tok(result.target))} at the last position, {html.escape(what)}</p>"
            f"<table><tr><th></th><th>logit</th><th>prob</th><th>rank</th><th>logit diff</th></tr>{rows}</table>")


def texts_html(result: SteerSweepResult) -> str:
    """The steered continuation at each chosen α."""
    if not result.texts:
        return ""
    rows = "".join(f"<tr><th>α = {a:g}</th><td class=tok>{html.escape(t)}</td></tr>"
                   for a, t in zip(result.text_alphas, result.texts))
    return f"<table>{rows}</table>"


def arms_equal(result: GenerateResult) -> bool:
    """Whether both arms produced the same tokens."""
    arms = result.arms
    return len(arms) == 2 and np.array_equal(arms[0].token_ids, arms[1].token_ids)


# ====================================================================== steering vs the swap
COMPARE_CHART = "steering-vs-swap-chart"
COMPARE_STYLE = {  # kind -> (colour, dash, legend)
    "ablate": ("#d62728", "dashed", "direction ablated"),
    "control": ("#1f77b4", "dotted", "swap: control arm"),
    "swapped": ("#ff7f0e", "dotted", "swap: swapped arm"),
}
COMPARE_TITLES = {"pronoun_preference": "pronoun preference (log p he − log p she)",
                  "stereotype_alignment": "stereotype alignment (r with share of men)",
                  "minimal_pairs": "minimal pairs (share stereotyped)",
                  "heldout_loss": "held-out loss (nats/token): the cost"}


def compare_chart(result, width: int = 360, height: int = 260):
    """A grid of four panels (the three bias probes and the held-out loss), each against α: the
    steering sweep as a line with ±1 SE whiskers, and the direction ablation and the swap run's
    control and swapped arms as horizontal lines with a ±1 SE band, on the same axes."""
    from bokeh.layouts import gridplot
    from bokeh.models import Whisker

    from explorer.training.steer_compare import METRICS

    steer = [i for i, k in enumerate(result.kinds) if k == "steer"]
    alphas = [float(result.alpha[i]) for i in steer]
    lo, hi = (min(alphas), max(alphas)) if alphas else (-1.0, 1.0)
    if lo == hi:
        lo, hi = lo - 1.0, hi + 1.0
    panels = []
    for n, metric in enumerate(METRICS):
        fig = figure(name=f"{COMPARE_CHART}-{metric}", width=width, height=height, tools="save,reset",
                     toolbar_location=None, title=COMPARE_TITLES[metric])
        vals = np.array([result.value(metric, i) for i in steer], dtype=float).reshape(-1, 2)
        se = np.nan_to_num(vals[:, 1])
        src = ColumnDataSource({"alpha": alphas, "v": vals[:, 0], "lo": vals[:, 0] - se, "hi": vals[:, 0] + se,
                                "se": vals[:, 1], "label": [result.labels[i] for i in steer]})
        legend = {"legend_label": f"steering at L{result.layer}"} if n == 0 else {}
        fig.line("alpha", "v", source=src, line_width=2, color="#2ca02c", **legend)
        fig.scatter("alpha", "v", source=src, size=7, color="#2ca02c")
        fig.add_layout(Whisker(base="alpha", lower="lo", upper="hi", source=src, line_color="#2ca02c"))
        for i, kind in enumerate(result.kinds):
            if kind not in COMPARE_STYLE:
                continue
            v, s = result.value(metric, i)
            if not math.isfinite(v):
                continue
            color, dash, name = COMPARE_STYLE[kind]
            band = s if math.isfinite(s) else 0.0
            row = ColumnDataSource({"alpha": [lo, hi], "v": [v, v], "lo": [v - band] * 2, "hi": [v + band] * 2,
                                    "se": [s, s], "label": [result.labels[i]] * 2})
            if band:
                fig.varea("alpha", y1="lo", y2="hi", source=row, fill_color=color, fill_alpha=0.12)
            legend = {"legend_label": name} if n == 0 else {}
            fig.line("alpha", "v", source=row, line_width=2, color=color, line_dash=dash, **legend)
        fig.add_tools(HoverTool(tooltips=[("", "@label"), ("value", "@v{0.000}"), ("SE", "@se{0.000}")]))
        fig.xaxis.axis_label = "α (steering toward 'she')"
        if n == 0 and fig.legend:
            fig.legend.label_text_font_size = "9px"
            fig.legend.location = "top_right"
            fig.legend.background_fill_alpha = 0.6
        if not result.complete and n == 0:
            add_note(fig, f"{result.done} of {result.total} settings done")
        style_figure(fig)
        panels.append(fig)
    return gridplot(panels, ncols=2, toolbar_location=None)


def compare_html(result) -> str:
    """The comparison's rows as a table: each metric's value ± SE, what was scored, and the note."""
    from explorer.training.steer_compare import METRICS

    head = "".join(f"<th>{html.escape(m.replace('_', ' '))}</th>" for m in METRICS)
    rows = []
    for i, label in enumerate(result.labels):
        cells = []
        for m in METRICS:
            v, s = result.value(m, i)
            text = "" if not math.isfinite(v) else f"{v:.3f}" + (f" ± {s:.3f}" if math.isfinite(s) else "")
            cells.append(f"<td>{text}</td>")
        rows.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
    scored = (f"<p>{result.n_templates} templates × {result.n_occupations} occupations, {result.n_pairs} minimal "
              f"pairs, {result.n_windows} held-out windows of {result.seq_len} tokens; direction at L{result.layer}, "
              f"norm {result.vector_norm:.2f}" + (f"; swap run {html.escape(result.run)}" if result.run else
                                                  "; no swap run") + "</p>")
    note = f"<p><i>{html.escape(result.note)}</i></p>" if result.note else ""
    return scored + note + f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"
