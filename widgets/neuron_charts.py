"""Chart builders for the neuron view: pure functions from engine results to Bokeh figures or HTML.

- ``activation_histogram``: the index's per-neuron histogram on its own bins (16 log-spaced bins
  per decade on each side of zero), drawn one bar per bin on a signed-log axis;
- ``prompt_activation_chart``: a neuron's activation at every token of a prompt;
- ``selectivity_overview``: the most selective neurons of each layer (layer × selectivity);
- ``examples_html``: examples as text, each token's background shaded by its activation.

Models carry ``name`` values (the constants below) so tests and the view can find them.
"""
from __future__ import annotations

import html
import math

import numpy as np
from bokeh.models import (
    ColumnDataSource,
    FixedTicker,
    HoverTool,
    Range1d,
    Span,
    TapTool,
)
from bokeh.plotting import figure

from explorer.neurons.describe import ExampleActivations
from explorer.neurons.index import (
    NeuronHistogram,
    NeuronStats,
    PromptActivation,
    SelectiveNeurons,
)

from .chart_style import neuron_spec, position_axis, style_figure
from .charts import quote_token

HISTOGRAM = "neuron-histogram"
HISTOGRAM_SOURCE = "neuron-histogram-source"
PROMPT_CHART = "neuron-prompt-chart"
PROMPT_SOURCE = "neuron-prompt-source"
OVERVIEW = "neuron-overview"
OVERVIEW_SOURCE = "neuron-overview-source"

POSITIVE = "#e6550d"
NEGATIVE = "#3182bd"
SHADE_RGB = (253, 141, 60)   # token background for positive activations
NEG_RGB = (107, 174, 214)    # and for negative ones

EXAMPLES_CSS = """
.nex { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; line-height: 1.55;
       margin: 0 0 8px 0; padding: 3px 6px; border-left: 3px solid #ddd; }
.nex .head { color: #555; font-size: 11px; margin-bottom: 1px; }
.nex .head b { color: #000; }
.nex .toks { white-space: pre-wrap; word-break: break-word; }
.nex .tok { border-radius: 2px; }
.nex .tok.peak { outline: 1.5px solid #a63603; }
.nex-note { color: #666; font-size: 12px; margin-bottom: 6px; }
"""


# ---------------------------------------------------------------- histogram
def value_to_x(values, edges: np.ndarray) -> np.ndarray:
    """Where activation values fall on the histogram's bin axis (bin b is centred on x = b).

    Edge ``i`` sits at x = i + 0.5; values in between are placed linearly within their bin.
    """
    x = np.interp(np.asarray(values, dtype=np.float64), edges, np.arange(len(edges)) + 0.5)
    return np.asarray(x)


def histogram_data(hist: NeuronHistogram) -> dict[str, list]:
    """One row per bin: its position, count, share of the sample and value range."""
    edges = hist.edges
    n_bins = len(hist.counts)
    lows = np.concatenate([[-np.inf], edges])
    highs = np.concatenate([edges, [np.inf]])
    total = max(int(hist.counts.sum()), 1)
    def fmt(v: float) -> str:
        return "−∞" if v == -np.inf else "+∞" if v == np.inf else f"{v:.3g}"
    return {
        "x": list(range(n_bins)),
        "count": [int(c) for c in hist.counts],
        "share": [int(c) / total for c in hist.counts],
        "low": [float(v) if np.isfinite(v) else None for v in lows],
        "high": [float(v) if np.isfinite(v) else None for v in highs],
        "range": [f"({fmt(lo)}, {fmt(hi)}]" for lo, hi in zip(lows, highs)],
        "color": [POSITIVE if lo >= 0 else NEGATIVE if hi <= 0 else "#888888" for lo, hi in zip(lows, highs)],
    }


def _unit_label(layer: int, unit: int, unit_name: str) -> str:
    """'12:100' for a neuron, '100 (layer 12)' for an SAE feature (its number is the SAE's own)."""
    return neuron_spec(layer, unit) if unit_name == "neuron" else f"{unit} (layer {layer})"


def activation_histogram(hist: NeuronHistogram, stats: NeuronStats | None = None, unit_name: str = "neuron"):
    """The neuron's activation histogram, one bar per index bin on a signed-log axis.

    The index counts a 1-in-``stride`` token subsample in fixed bins (16 per decade for |a| in
    [1e-3, 1e3] on each side of zero); each bar is one of those bins, so bar heights are the
    stored counts. Dashed lines: the median and the maximum (from ``stats``).
    """
    data = histogram_data(hist)
    source = ColumnDataSource(data, name=HISTOGRAM_SOURCE)
    nonzero = np.flatnonzero(hist.counts)
    lo, hi = (int(nonzero[0]), int(nonzero[-1])) if len(nonzero) else (len(hist.counts) // 2 - 8,
                                                                         len(hist.counts) // 2 + 8)
    if stats is not None and math.isfinite(stats.max):
        hi = max(hi, math.ceil(float(value_to_x([stats.max], hist.edges)[0])))
    pad = max(2, (hi - lo) // 20)
    x_range = Range1d(lo - pad - 0.5, hi + pad + 0.5)
    y_top = max(1, int(hist.counts.max(initial=0))) * 1.08
    fig = figure(name=HISTOGRAM, height=250, sizing_mode="stretch_width", x_range=x_range,
                 y_range=Range1d(0, y_top), tools="xpan,xwheel_zoom,reset,save", toolbar_location="right",
                 title=f"{unit_name.capitalize()} {_unit_label(hist.layer, hist.neuron, unit_name)}: "
                       f"{hist.sampled_tokens:,} sampled tokens "
                       f"(1 in {hist.stride})")
    style_figure(fig)
    bars = fig.vbar(x="x", top="count", width=0.9, color="color", source=source, line_color=None)
    fig.add_tools(HoverTool(renderers=[bars], tooltips=[("activation", "@range"), ("tokens", "@count"),
                                                        ("share", "@share{0.0%}")]))
    # Ticks on the decade edges ±0.01 … ±1000, and "0" on the middle bin (|a| < 0.001).
    labels: dict[float, str] = {}
    smallest = float(np.min(np.abs(hist.edges)))
    for i, edge in enumerate(hist.edges):
        exponent = math.log10(abs(edge))
        if abs(exponent - round(exponent)) < 1e-9 and abs(edge) > smallest * 1.5:
            labels[i + 0.5] = f"{edge:g}"
    labels[float(np.searchsorted(hist.edges, 0.0))] = "0"
    fig.xaxis.ticker = FixedTicker(ticks=sorted(labels))
    fig.xaxis.major_label_overrides = labels
    fig.xaxis.axis_label = "activation (signed log scale, 16 bins per decade)"
    fig.yaxis.axis_label = "tokens"
    if stats is not None:
        for value, color, what in ((stats.quantile(0.5), "#555555", "median"), (stats.max, "#a50f15", "max")):
            if math.isfinite(value):
                fig.add_layout(Span(location=float(value_to_x([value], hist.edges)[0]), dimension="height",
                                    line_color=color, line_dash="dashed", line_width=1.5, name=f"histogram-{what}"))
    return fig


# ---------------------------------------------------------------- prompt
PROMPT_HELD = 16384   # a prompt's bars: one float each, so the chart holds (nearly) every position
PROMPT_SHOWN = 48     # and shows this many at a time


def prompt_activation_chart(result: PromptActivation, window: tuple[int, int] | None = None):
    """The neuron's activation at every token of the prompt (bars; orange > 0, blue < 0).

    Beyond ``FULL_AXIS_POSITIONS`` tokens the axis is a window over every position (up to
    ``PROMPT_HELD``; ``window`` = (start, stop) picks others): ``PROMPT_SHOWN`` bars in view,
    ending at the last token, panned by dragging; a note under the chart says which.
    """
    axis = position_axis(result.tokens, held=PROMPT_HELD, shown=PROMPT_SHOWN, window=window)
    positions = list(axis.positions)
    acts = [float(result.activations[p]) for p in positions]
    source = ColumnDataSource({
        "x": axis.coords(), "pos": positions, "activation": acts,
        "token": [quote_token(result.tokens[p]) for p in positions],
        "color": [POSITIVE if a > 0 else NEGATIVE for a in acts],
    }, name=PROMPT_SOURCE)
    lo, hi = min(0.0, min(acts, default=0.0)), max(0.0, max(acts, default=0.0))
    span = (hi - lo) or 1.0
    bars_in_view = axis.view_stop - axis.view_start
    fig = figure(name=PROMPT_CHART, x_range=axis.axis_range(), height=260 if axis.categorical else 300,
                 min_width=max(300, min(34 * bars_in_view, 1000)),
                 sizing_mode="stretch_width", y_range=Range1d(lo - 0.08 * span, hi + 0.08 * span),
                 tools="xpan,xwheel_zoom,reset,save", toolbar_location="right",
                 title=f"Neuron {neuron_spec(result.layer, result.neuron)} on the prompt: activation per token")
    style_figure(fig)
    bars = fig.vbar(x="x", top="activation", width=0.8, color="color", source=source)
    fig.add_tools(HoverTool(renderers=[bars], tooltips=[("position", "@pos"), ("token", "@token"),
                                                        ("activation", "@activation{0.0000}")]))
    fig.add_layout(Span(location=0, dimension="width", line_color="#999999", line_width=1))
    axis.style_axis(fig.xaxis, rotate_after=10)
    axis.annotate(fig)
    fig.xaxis.axis_label = "prompt position: token"
    fig.yaxis.axis_label = "activation"
    return fig


# ---------------------------------------------------------------- overview
def overview_data(sel: SelectiveNeurons) -> dict[str, list]:
    return {
        "layer": [int(v) for v in sel.layers],
        "neuron": [int(v) for v in sel.neurons],
        "selectivity": [float(v) for v in sel.selectivity],
        "max": [float(v) for v in sel.max],
        "frequency": [float(v) for v in sel.frequency],
        "token": [quote_token(t) for t in sel.top_token],
        "spec": [neuron_spec(int(layer), int(n)) for layer, n in zip(sel.layers, sel.neurons)],
    }


def selectivity_overview(sel: SelectiveNeurons):
    """The ``n_per_layer`` most selective neurons of every layer: layer on x, selectivity on y.

    Tap a point to open that neuron (the view listens to the source's selection).
    """
    source = ColumnDataSource(overview_data(sel), name=OVERVIEW_SOURCE)
    n_layers = int(sel.layers.max()) + 1 if len(sel.layers) else 1
    fig = figure(name=OVERVIEW, height=260, sizing_mode="stretch_width", x_range=Range1d(-0.7, n_layers - 0.3),
                 tools="pan,box_zoom,wheel_zoom,reset,save", toolbar_location="right",
                 title=f"Most selective neurons per layer (top {sel.n_per_layer}; selectivity = "
                       f"(max − mean) / std over {sel.tokens:,} tokens) · click a point to open it")
    style_figure(fig)
    points = fig.scatter("layer", "selectivity", source=source, size=8, color=POSITIVE, alpha=0.75,
                         line_color="#7f2704", nonselection_alpha=0.5, selection_color="#a50f15")
    fig.add_tools(HoverTool(renderers=[points], tooltips=[
        ("neuron", "L@layer N@neuron"), ("selectivity", "@selectivity{0.0}"), ("max", "@max{0.000}"),
        ("fires on", "@frequency{0.0%} of tokens"), ("top token", "@token")]))
    fig.add_tools(TapTool(renderers=[points]))
    fig.xaxis.axis_label = "layer"
    fig.yaxis.axis_label = "selectivity (std above mean)"
    return fig


# ---------------------------------------------------------------- examples
def token_text(token: str) -> str:
    """A token as running text: spaces kept, line breaks and tabs shown as symbols."""
    return str(token).replace("\r", "␍").replace("\n", "↵").replace("\t", "⇥")


def _shade(a: float, scale: float) -> str:
    if not math.isfinite(a) or scale <= 0 or a == 0:
        return ""
    rgb = SHADE_RGB if a > 0 else NEG_RGB
    alpha = min(1.0, abs(a) / scale)
    return f"background: rgba({rgb[0]}, {rgb[1]}, {rgb[2]}, {alpha:.3f});"


def examples_html(ex: ExampleActivations, scale: float | None = None, limit: int | None = None) -> str:
    """Examples as text, each token's background shaded by the neuron's activation there.

    ``scale`` is the activation that gets full colour (default: the largest |activation| shown).
    Every token span carries ``data-act`` (its activation; empty where unknown) and a hover title.
    Without ``token_activations`` only each example's stored position is shaded.
    """
    n = len(ex) if limit is None else min(limit, len(ex))
    if n == 0:
        return "<div class='nex-note'>No examples.</div>"
    per_token = ex.token_activations
    if scale is None:
        values = np.abs(per_token[:n]) if per_token is not None else np.abs(ex.activations[:n])
        scale = float(np.nanmax(values)) if values.size else 1.0
    blocks = []
    if per_token is None:
        blocks.append("<div class='nex-note'>Only the marked token's activation is stored in the index; "
                      "attach the index's model to shade every token.</div>")
    for i in range(n):
        pos = int(ex.positions[i])
        spans = []
        for j, tok in enumerate(ex.tokens[i]):
            if per_token is not None:
                a = float(per_token[i, j])
            else:
                a = float(ex.activations[i]) if j == pos else math.nan
            known = math.isfinite(a)
            cls = "tok peak" if j == pos else "tok"
            title = f"{quote_token(tok)}: {a:.4g}" if known else quote_token(tok)
            spans.append(f"<span class='{cls}' data-pos='{j}' data-act='{repr(a) if known else ''}' "
                         f"title='{html.escape(title, quote=True)}' style='{_shade(a, scale) if known else ''}'>"
                         f"{html.escape(token_text(tok))}</span>")
        head = (f"<b>{float(ex.activations[i]):.3f}</b> · {ex.kind} #{i + 1} · window {int(ex.window_index[i])} · "
                f"at {html.escape(quote_token(ex.tokens[i][pos]))}")
        blocks.append(f"<div class='nex' data-rank='{i}'><div class='head'>{head}</div>"
                      f"<div class='toks'>{''.join(spans)}</div></div>")
    return "".join(blocks)
