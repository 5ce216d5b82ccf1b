"""Chart builders for the pronoun-swap tab: pure functions from swap, bias and run results.

The run charts put both arms on every figure against the training step: a line per arm with a
±1 SE band where the metric has one (pronoun preference, stereotype alignment, minimal pairs),
the held-out loss, and every step's training loss. A live run builds them once from its first
partial result (``run_charts``) and then ``update_run_charts`` streams the rows that are new
in each newer partial into the same data sources, on the page's event loop (Bokeh models
change only there). Every model carries a ``name`` so tests can find it: a source is named
``source_name(chart, arm)``, e.g. ``swap-pronoun-preference-control-source``.
"""
from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence

import numpy as np
from bokeh.models import (
    ColorBar,
    ColumnDataSource,
    Div,
    FactorRange,
    HoverTool,
    LinearColorMapper,
    NoOverlap,
    NumeralTickFormatter,
    Span,
)
from bokeh.palettes import Category10_10, Viridis256
from bokeh.plotting import figure

from explorer.training.bias import BiasResult, PairScores
from explorer.training.checkpoints import CheckpointComparison
from explorer.training.intervene import ArmMetrics, InterventionResult
from explorer.training.swap import SwapAudit

from .chart_style import MAX_CANVAS_PX, add_note, bounded, style_figure
from .charts import COLOR_A, COLOR_B, quote_token, shorten

# chart key -> (title, y-axis label, has an SE, reference line or None)
RUN_METRICS: dict[str, tuple[str, str, bool, float | None]] = {
    "pronoun_preference": ("Pronoun preference", "mean log p(' he') − log p(' she')", True, 0.0),
    "stereotype_alignment": ("Stereotype alignment", "r(preference, share of men)", True, 0.0),
    "minimal_pairs": ("Minimal pairs", "share stereotyped preferred", True, 0.5),
    "loss": ("Held-out loss", "nats / token", False, None),
    "train_loss": ("Training loss (every step)", "nats / token", False, None),
}
# published data sets' headline metrics -> (title, y-axis label, unbiased reference)
DATASET_METRICS: dict[str, tuple[str, str, float]] = {
    "pct_stereotype": ("CrowS-Pairs", "share stereotyped sentence more likely", 0.5),
    "accuracy_gap_pro_minus_anti": ("WinoBias", "accuracy pro − anti", 0.0),
    "stereotype_score": ("StereoSet", "stereotype score (SS)", 0.5),
}
ARM_COLORS = {"control": COLOR_A, "swapped": COLOR_B}
AUDIT_CHART = "swap-audit-counts"
AUDIT_SOURCE = "swap-audit-source"
BIAS_CHART = "swap-bias-occupations"
PAIRS_CHART = "swap-pairs"
CKPT_METRIC_CHART = "swap-ckpt-metric"
CKPT_LENS_CHART = "swap-ckpt-lens"
CKPT_LENS_SOURCE = "swap-ckpt-lens-source"
WIDTH, HEIGHT = 470, 270


def chart_name(key: str) -> str:
    """The bokeh name of a run chart: 'swap-pronoun-preference'."""
    return "swap-" + key.replace("_", "-")


def source_name(key: str, arm: str) -> str:
    """The bokeh name of one arm's data source on a run chart."""
    return f"{chart_name(key)}-{arm}-source"


# --------------------------------------------------------------------- run charts
def arm_data(arm: ArmMetrics, key: str) -> dict[str, np.ndarray]:
    """One arm's columns on a run chart: step, value (and se, lower, upper with an SE)."""
    if key == "train_loss":  # every step's loss, not the per-evaluation mean
        return {"step": arm.train_steps.astype(np.int64), "value": arm.train_losses.astype(np.float64)}
    value = np.asarray(getattr(arm, key), dtype=np.float64)
    data = {"step": arm.step.astype(np.int64), "value": value}
    if RUN_METRICS[key][2]:
        se = np.asarray(getattr(arm, f"{key}_se"), dtype=np.float64)
        data.update(se=se, lower=value - se, upper=value + se)
    return data


def metric_chart(arms: Sequence[ArmMetrics], key: str):
    """One metric of each arm against step, with a ±1 SE band where the metric has one."""
    title, y_label, has_se, reference = RUN_METRICS[key]
    fig = figure(width=WIDTH, height=HEIGHT, title=title, name=chart_name(key), x_axis_label="step",
                 y_axis_label=y_label, tools="pan,wheel_zoom,box_zoom,reset,save")
    for arm in arms:
        color = ARM_COLORS.get(arm.arm, "#555555")
        source = ColumnDataSource(arm_data(arm, key), name=source_name(key, arm.arm))
        if has_se:
            fig.varea(x="step", y1="lower", y2="upper", source=source, fill_color=color, fill_alpha=0.18,
                      legend_label=arm.arm)
        fig.line(x="step", y="value", source=source, line_color=color, line_width=2, legend_label=arm.arm)
        if key != "train_loss":
            fig.scatter(x="step", y="value", source=source, color=color, size=5, legend_label=arm.arm)
    if reference is not None:
        fig.add_layout(Span(location=reference, dimension="width", line_color="#888888", line_dash="dashed",
                            line_width=1))
    tips = [("step", "@step"), ("value", "@value{0.0000}")] + ([("± SE", "@se{0.0000}")] if has_se else [])
    fig.add_tools(HoverTool(tooltips=tips, mode="vline" if key == "train_loss" else "mouse"))
    fig.legend.location = "top_left"
    fig.legend.click_policy = "hide"
    fig.legend.label_text_font_size = "10px"
    style_figure(fig)
    return fig


def run_charts(result: InterventionResult | ArmMetrics) -> dict[str, object]:
    """Every run chart (RUN_METRICS order) of a run, or of one arm alone."""
    arms = [result] if isinstance(result, ArmMetrics) else [result.control, result.swapped]
    return {key: metric_chart(arms, key) for key in RUN_METRICS}


def update_run_charts(figures: dict[str, object], result: InterventionResult) -> int:
    """Bring the charts to a newer partial result (on the document's loop); return rows streamed.

    Rows beyond what a source holds are streamed (only they travel to the browser); a source
    whose steps no longer match the result (another run, a resume that dropped rows) is
    replaced whole.
    """
    streamed = 0
    for key, fig in figures.items():
        for arm in (result.control, result.swapped):
            source = fig.select_one({"name": source_name(key, arm.arm)})
            if source is None:
                continue
            new = arm_data(arm, key)
            old_steps = np.asarray(source.data["step"])
            n_old, n_new = len(old_steps), len(new["step"])
            if n_new >= n_old and np.array_equal(old_steps, new["step"][:n_old]):
                if n_new > n_old:
                    source.stream({k: v[n_old:] for k, v in new.items()})
                    streamed += n_new - n_old
            else:
                source.data = new
                streamed += n_new
    return streamed


def _fmt(x: float, spec: str = "+.3f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def effect_text(result: InterventionResult) -> str:
    """The run's headline: swapped − control pronoun preference ± SE and z (markdown)."""
    e = result.effect()
    if e["step"] < 0:
        return "No evaluation yet."
    direction = "toward ' she'" if e["difference"] < 0 else "toward ' he'"
    significant = abs(e["z"]) > 2 if math.isfinite(e["z"]) else False
    verdict = "more than 2 SE: the swap took effect" if significant and e["difference"] < 0 else (
        "more than 2 SE" if significant else "within 2 SE")
    return (f"**Effect at step {e['step']}:** swapped − control pronoun preference = "
            f"**{_fmt(e['difference'])} ± {_fmt(e['se'], '.3f')}** (z = {_fmt(e['z'], '+.1f')}; "
            f"{direction}, {verdict}). Control {_fmt(e['control'])}, swapped {_fmt(e['swapped'])}.")


EFFECT_CSS = """
table { border-collapse: collapse; font-size: 12px; font-variant-numeric: tabular-nums; }
th, td { padding: 2px 12px 2px 0; text-align: right; }
th { color: #555; font-weight: normal; border-bottom: 1px solid #ddd; }
td:first-child, th:first-child { text-align: left; }
"""


def effect_rows(result: InterventionResult) -> list[tuple[str, str, str, str, str]]:
    """(metric, control, swapped, swapped − control ± SE, z) at the last evaluation, formatted."""
    rows = []
    for key in ("pronoun_preference", "stereotype_alignment", "minimal_pairs"):
        e = result.effect(key)
        rows.append((RUN_METRICS[key][0], _fmt(e["control"]), _fmt(e["swapped"]),
                     f"{_fmt(e['difference'])} ± {_fmt(e['se'], '.3f')}", _fmt(e["z"], "+.1f")))
    return rows


def effect_table(result: InterventionResult) -> str:
    """HTML table of every bias metric's swapped − control difference."""
    head = "<tr><th>metric</th><th>control</th><th>swapped</th><th>swapped − control</th><th>z</th></tr>"
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in effect_rows(result))
    return f"<table class='effect-table'>{head}{body}</table>"


# --------------------------------------------------------------------- the audit
def audit_chart(audit: SwapAudit, max_pairs: int = 20):
    """Horizontal bars: how often each word pair was swapped (most frequent on top)."""
    pairs = list(audit.pairs[:max_pairs])
    counts = audit.counts[:max_pairs].astype(np.int64)
    factors = list(reversed(pairs)) or ["(nothing swapped)"]
    source = ColumnDataSource({"pair": pairs, "count": counts}, name=AUDIT_SOURCE)
    fig = figure(y_range=FactorRange(*factors), width=380, height=max(160, 22 * len(factors) + 80),
                 title="Words swapped, most frequent on top", name=AUDIT_CHART, x_axis_label="count",
                 tools="save", toolbar_location=None)
    # The counts on a line of their own: in the title they were cut off at this width.
    add_note(fig, f"{audit.total:,} words in {audit.n_changed_documents:,} of {audit.n_documents:,} documents",
             "above")
    fig.hbar(y="pair", right="count", source=source, height=0.7, color=COLOR_B)
    fig.xaxis.formatter = NumeralTickFormatter(format="0.[0]a")  # 40k, not 4.000e+4
    fig.add_tools(HoverTool(tooltips=[("pair", "@pair"), ("count", "@count")]))
    fig.x_range.start = 0
    style_figure(fig)
    return fig


_CHANGE = re.compile(r"\[([^\[\]→]*)→([^\[\]]*)\]")

AUDIT_CSS = """
table { border-collapse: collapse; font-size: 12px; font-variant-numeric: tabular-nums; }
th, td { padding: 2px 12px 2px 0; text-align: right; }
th { color: #555; font-weight: normal; }
td.pair, th.pair { text-align: left; }
.sample { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; margin: 3px 0; }
del { background: #fde2e2; color: #8a1f1f; }
ins { background: #dff3e2; color: #1d6b2c; text-decoration: none; }
.caption { font-weight: 600; margin: 6px 0 4px 0; }
"""


def sample_html(sample: str) -> str:
    """An audit sample '…said [he→she] would…' with the change marked (<del>he</del><ins>she</ins>)."""
    out, last = [], 0
    for m in _CHANGE.finditer(sample):
        out.append(html.escape(sample[last:m.start()]))
        out.append(f"<del>{html.escape(m.group(1))}</del><ins>{html.escape(m.group(2))}</ins>")
        last = m.end()
    out.append(html.escape(sample[last:]))
    return "".join(out)


def audit_html(audit: SwapAudit, max_rows: int = 40) -> str:
    """Token counts before → after, the counts per pair, and the sample diff."""
    if audit.tokens_before >= 0:
        delta = audit.tokens_after - audit.tokens_before
        tokens = (f"<div class='caption'>Training tokens: {audit.tokens_before:,} → {audit.tokens_after:,} "
                  f"({delta:+,})</div>")
    else:
        tokens = ""
    rows = "".join(f"<tr><td class='pair'>{html.escape(p)}</td><td>{int(c):,}</td></tr>"
                   for p, c in zip(audit.pairs[:max_rows], audit.counts[:max_rows]))
    more = f"<tr><td class='pair'>… {len(audit.pairs) - max_rows} more</td><td></td></tr>" \
        if len(audit.pairs) > max_rows else ""
    direction = "masculine → feminine" if audit.direction == "m2f" else "feminine → masculine"
    samples = "".join(f"<div class='sample'>{sample_html(s)}</div>" for s in audit.samples) or \
        "<div class='sample'>(no changes)</div>"
    return (f"<div class='caption'>Swap {direction}: {audit.total:,} words in {audit.n_changed_documents:,} of "
            f"{audit.n_documents:,} training documents</div>{tokens}"
            f"<table class='audit-table'><tr><th class='pair'>pair</th><th>count</th></tr>{rows}{more}</table>"
            f"<div class='caption'>Sample changes</div>{samples}")


# --------------------------------------------------------------------- bias probes
def bias_chart(result: BiasResult):
    """Pronoun preference per occupation against its share of men (what the alignment correlates)."""
    source = ColumnDataSource({"share": result.share_men.astype(np.float64),
                               "preference": result.per_occupation.astype(np.float64),
                               "occupation": list(result.occupations)}, name=f"{BIAS_CHART}-source")
    fig = figure(width=WIDTH, height=HEIGHT + 30, name=BIAS_CHART, x_axis_label="share of men (%)",
                 y_axis_label="log p(' he') − log p(' she')",
                 title=f"Per occupation: r = {result.stereotype_alignment:+.3f} ± "
                       f"{result.stereotype_alignment_se:.3f}", tools="pan,wheel_zoom,reset,save")
    fig.scatter(x="share", y="preference", source=source, size=6, color=COLOR_A, alpha=0.8)
    fig.add_layout(Span(location=0, dimension="width", line_color="#888888", line_dash="dashed"))
    fig.add_tools(HoverTool(tooltips=[("", "@occupation"), ("share of men", "@share{0.0}%"),
                                      ("preference", "@preference{+0.000}")]))
    style_figure(fig)
    return fig


def pairs_chart(scores: PairScores):
    """Each minimal pair: summed log-likelihood of the stereotyped vs the anti-stereotyped sentence."""
    source = ColumnDataSource({"less": scores.ll_less.astype(np.float64), "more": scores.ll_more.astype(np.float64),
                               "more_text": list(scores.more), "less_text": list(scores.less)},
                              name=f"{PAIRS_CHART}-source")
    fig = figure(width=WIDTH - 80, height=HEIGHT + 30, name=PAIRS_CHART,
                 x_axis_label="log-likelihood, anti-stereotyped", y_axis_label="log-likelihood, stereotyped",
                 title=f"{scores.name}: {scores.pct_stereotype:.3f} ± {scores.se:.3f} stereotyped preferred",
                 tools="pan,wheel_zoom,reset,save")
    fig.scatter(x="less", y="more", source=source, size=6, color=COLOR_B, alpha=0.8)
    values = np.concatenate([scores.ll_less, scores.ll_more])
    if values.size:
        lo, hi = float(values.min()), float(values.max())
        fig.line(x=[lo, hi], y=[lo, hi], line_color="#888888", line_dash="dashed")  # above: stereotyped wins
    fig.add_tools(HoverTool(tooltips=[("stereotyped", "@more_text"), ("anti", "@less_text"),
                                      ("LL", "@more{0.00} vs @less{0.00}")]))
    style_figure(fig)
    return fig


# --------------------------------------------------------------------- across checkpoints
METRIC_LABELS = {"pronoun_preference": "pronoun preference", "stereotype_alignment": "stereotype alignment",
                 "minimal_pairs": "minimal pairs"}


def _group(label: str) -> str:
    """'control/step-000040' → 'control'; a plain directory → 'models'."""
    return label.split("/", 1)[0] if "/" in label else "models"


def checkpoint_metric_text(c: CheckpointComparison, metric: str) -> tuple[str, str, float | None]:
    """(name, y-axis label, reference line) of a probe metric or of a data set scored across checkpoints."""
    if metric in c.datasets:
        key = c.dataset_metrics[c.datasets.index(metric)]
        title, y_label, reference = DATASET_METRICS.get(key, (metric, key, None))
        return f"{title} ({key.replace('_', ' ')})", y_label, reference
    return METRIC_LABELS[metric], RUN_METRICS[metric][1], RUN_METRICS[metric][3]


def checkpoint_metric_chart(c: CheckpointComparison, metric: str = "pronoun_preference"):
    """A bias metric (± SE) across checkpoints: a line per arm against step when every checkpoint
    has a step, else points over the checkpoints' names in order. ``metric`` is one of
    ``c.metric_names``: the three probes, then each published data set scored."""
    values, ses = c.metric(metric)
    name, y_label, reference = checkpoint_metric_text(c, metric)
    numeric = len(c.steps) > 0 and bool((c.steps >= 0).all())
    if numeric:
        fig = figure(width=WIDTH + 60, height=HEIGHT + 20, x_axis_label="step")
    else:
        fig = figure(width=WIDTH + 60, height=HEIGHT + 60, x_range=FactorRange(*c.labels))
        fig.xaxis.major_label_orientation = 0.6
        fig.xaxis.major_label_policy = NoOverlap()  # hundreds of checkpoints: labels that fit
    fig.name = CKPT_METRIC_CHART
    fig.title.text = f"{name[0].upper()}{name[1:]} across checkpoints (± SE)"
    fig.yaxis.axis_label = y_label
    groups = list(dict.fromkeys(_group(label) for label in c.labels))
    palette = {g: ARM_COLORS.get(g, Category10_10[(i + 2) % 10]) for i, g in enumerate(groups)}
    for g in groups:
        idx = [i for i, label in enumerate(c.labels) if _group(label) == g]
        x = c.steps[idx].astype(np.int64) if numeric else [c.labels[i] for i in idx]
        v, s = values[idx].astype(np.float64), ses[idx].astype(np.float64)
        source = ColumnDataSource({"x": x, "value": v, "se": s, "lower": v - s, "upper": v + s,
                                   "label": [c.labels[i] for i in idx]}, name=f"{CKPT_METRIC_CHART}-{g}-source")
        fig.segment(x0="x", y0="lower", x1="x", y1="upper", source=source, line_color=palette[g], line_width=2)
        fig.line(x="x", y="value", source=source, line_color=palette[g], line_width=2, legend_label=g)
        fig.scatter(x="x", y="value", source=source, color=palette[g], size=7, legend_label=g)
    if reference is not None:
        fig.add_layout(Span(location=reference, dimension="width", line_color="#888888", line_dash="dashed"))
    fig.add_tools(HoverTool(tooltips=[("", "@label"), ("value", "@value{0.0000}"), ("± SE", "@se{0.0000}")]))
    fig.legend.location = "top_left"
    fig.legend.label_text_font_size = "10px"
    fig.toolbar.logo = None
    style_figure(fig)
    return fig


def checkpoint_lens_chart(c: CheckpointComparison):
    """The lens probability of the target at the prompt's last position: checkpoints × layers."""
    n, r = c.target_probs.shape
    rows = [c.labels[i] for i in range(n) for _ in range(r)]
    cols = [c.layer_labels[j] for _ in range(n) for j in range(r)]
    probs = c.target_probs.astype(np.float64).reshape(-1)
    source = ColumnDataSource({"checkpoint": rows, "layer": cols, "prob": probs}, name=CKPT_LENS_SOURCE)
    mapper = LinearColorMapper(palette=Viridis256, low=0.0, high=max(1e-6, float(probs.max()) if probs.size else 1.0))
    # Rows and columns shrink before the chart outgrows a canvas (hundreds of checkpoints).
    row_px = max(3, min(24, (MAX_CANVAS_PX - 100) // max(1, n)))
    column_px = max(3, min(22, (MAX_CANVAS_PX - 100) // max(1, r)))
    fig = figure(x_range=FactorRange(*c.layer_labels) if r else FactorRange("(no lens)"),
                 y_range=FactorRange(*reversed(c.labels)) if n else FactorRange("(none)"),
                 width=bounded(max(WIDTH, 100 + column_px * r)), height=bounded(max(160, 80 + row_px * n)),
                 name=CKPT_LENS_CHART, title=f"p({quote_token(c.target)}) after each layer",
                 tools="save,reset", toolbar_location="right")
    add_note(fig, f"at the end of {shorten(c.prompt, 50)!r}", "above")
    if row_px < 12:
        fig.yaxis.major_label_policy = NoOverlap()
    if column_px < 12:
        fig.xaxis.major_label_policy = NoOverlap()
    fig.rect(x="layer", y="checkpoint", width=1, height=1, source=source, line_color=None,
             fill_color={"field": "prob", "transform": mapper})
    fig.add_layout(ColorBar(color_mapper=mapper, width=10, title="p"), "right")
    fig.add_tools(HoverTool(tooltips=[("", "@checkpoint"), ("layer", "@layer"), ("p", "@prob{0.0000}")]))
    fig.xaxis.major_label_orientation = 0.9
    style_figure(fig)
    return fig


def checkpoints_summary_html(c: CheckpointComparison) -> str:
    """Every checkpoint's metrics (the three probes, then any data sets scored) in a table."""
    names = c.metric_names
    head = ("<tr><th>checkpoint</th>" + "".join(f"<th>{html.escape(checkpoint_metric_text(c, m)[0])}</th>"
                                               for m in names) + "</tr>")
    columns = [c.metric(m) for m in names]
    body = ""
    for i, label in enumerate(c.labels):
        cells = "".join(f"<td>{_fmt(float(v[i]))} ± {_fmt(float(se[i]), '.3f')}</td>" for v, se in columns)
        body += f"<tr><td>{html.escape(label)}</td>{cells}</tr>"
    return f"<table class='ckpt-table'>{head}{body}</table>"


def div(text: str, css: str, name: str | None = None, width: int | None = None) -> Div:
    kwargs = {"width": width} if width else {"sizing_mode": "stretch_width"}
    return Div(text=text, stylesheets=[css], name=name, **kwargs)
