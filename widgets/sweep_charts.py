"""Chart builders for sweeps and activation patching: heatmaps (and ranked bars) that fill in live.

The view builds a figure from the first partial result and then calls ``update_sweep_chart`` /
``update_patch_chart`` with each newer partial, on the page's event loop (Bokeh models may only
change there). Cells not computed yet (NaN) are drawn grey and unlabelled. A sweep too large for
a readable heatmap (neurons; heads or blocks of a large model) is a ranked bar chart of its
largest effects, the rest summarised. ``widgets.ablation_charts`` re-exports every name here.
"""
from __future__ import annotations

import html
import math

import numpy as np
from bokeh.models import (
    CDSView,
    ColorBar,
    ColumnDataSource,
    FactorRange,
    HoverTool,
    IndexFilter,
    LinearColorMapper,
    Range1d,
    Span,
    TapTool,
)
from bokeh.palettes import RdBu11, interp_palette
from bokeh.plotting import figure

from explorer.interventions.ablation import SweepResult
from explorer.interventions.patching import PatchResult

from .chart_style import (
    TEXT_DARK,
    PositionAxis,
    add_note,
    bounded,
    chart_window,
    layer_factors,
    layer_label,
    position_axis,
    style_figure,
    text_colors,
)
from .charts import frame_rows, quote_token

SWEEP_CHART = "ablation-sweep-chart"
SWEEP_SOURCE = "ablation-sweep-source"
SWEEP_MAPPER = "ablation-sweep-mapper"
PATCH_CHART = "ablation-patch-chart"
PATCH_SOURCE = "ablation-patch-source"
PATCH_MAPPER = "ablation-patch-mapper"

# Diverging, red = negative: an ablation that lowers the metric (the component was helping).
DIVERGING = tuple(reversed(interp_palette(RdBu11, 255)))
NAN_COLOR = "#e3e3e3"
ROW_PX = 17
UNITS = {"heads": "heads", "blocks": "components", "neurons": "neurons", "features": "features"}


# --------------------------------------------------------------- formatting
def metric_name(target: str, compare: str | None) -> str:
    """The sweep/patching metric in words: logit(' Paris') or logit(' Paris') − logit(' Rome')."""
    text = f"logit({quote_token(target)})"
    return text if compare is None else f"{text} − logit({quote_token(compare)})"


def cell_text(value: float, fmt: str) -> str:
    """A cell's number, without the '-0.00' of tiny negative values."""
    return fmt.format(0.0 if abs(value) < 0.005 else value)


def symmetric_bound(values: np.ndarray, floor: float) -> float:
    """Half-width of a colour range centred on 0 that holds every finite value (at least ``floor``)."""
    finite = np.abs(values[np.isfinite(values)])
    return max(floor, float(finite.max()) if finite.size else floor)


# -------------------------------------------------------------------- sweeps
SWEEP_TOP_N = 30          # a ranked sweep chart draws the 30 largest |effects|
SWEEP_FILTER = "ablation-sweep-filter"
SWEEP_NOTE = "ablation-sweep-note"
BAR_PX = 22               # ranked chart: height per bar
GRID_MAX_HEADS = 32       # a heads heatmap wider than this (or taller than GRID_MAX_LAYERS) is ranked instead
GRID_MAX_LAYERS = 48


def sweep_ranked(result: SweepResult) -> bool:
    """Whether the sweep is drawn as ranked bars (neurons; heads or blocks of a model whose
    [layer × head] heatmap would outgrow the page) rather than as a heatmap."""
    kind = result.request.kind
    if kind == "neurons" or result.effects.ndim != 2:
        return True
    n_layers, n_cols = result.effects.shape
    return n_layers > GRID_MAX_LAYERS or (kind == "heads" and n_cols > GRID_MAX_HEADS)


def sweep_hint(result: SweepResult | None = None, kind: str | None = None) -> str:
    """What a click on the sweep chart does, in words that match the chart (a bar or a cell)."""
    if result is not None:
        what = "bar" if sweep_ranked(result) else "cell"
    else:
        what = "bar" if kind == "neurons" else "cell"
    return f"Click a {what} to put that component into the single-ablation field."


def sweep_data(result: SweepResult) -> dict[str, list]:
    """One entry per component (``effects``' flat order): position, effect (NaN = not done), labels."""
    flat = np.asarray(result.effects, dtype=float).reshape(-1)
    half = symmetric_bound(flat, 1e-6)
    kind = result.request.kind
    n_cols = result.effects.shape[1] if result.effects.ndim == 2 else 1
    data: dict[str, list] = {k: [] for k in ("x", "y", "spec", "effect", "ablated", "text", "text_color",
                                             "activation", "status")}
    colors = text_colors(DIVERGING, -half, half, flat.tolist(), NAN_COLOR)
    for i, (spec, v) in enumerate(zip(result.components, flat)):
        if kind == "heads":
            x, y = str(i % n_cols), layer_label(i // n_cols)
        elif kind == "blocks":
            x, y = ("attn", "mlp")[i % 2], layer_label(i // 2)
        else:
            x, y = spec, ""
        done = math.isfinite(v)
        data["x"].append(x)
        data["y"].append(y)
        data["spec"].append(spec)
        data["effect"].append(v)
        data["ablated"].append(result.baseline_metric + v)
        data["text"].append(cell_text(v, "{:+.2f}") if done else "")
        data["text_color"].append(colors[i])
        data["activation"].append(float(result.activations[i]) if result.activations is not None else math.nan)
        data["status"].append("done" if done else "not done yet")
    return data


def _sweep_title(result: SweepResult) -> str:
    req = result.request
    what = {"heads": "each head", "blocks": "each attention / MLP output",
            "neurons": f"each of the {len(result.components)} most active neurons",
            "features": f"each of the {len(result.components)} most active SAE features"}[req.kind]
    method = "attribution estimate" if req.method == "attribution" else req.method
    done = "" if result.complete else f" · {result.done}/{result.total} done"
    return (f"Effect of {req.mode}-ablating {what} on {metric_name(result.target, result.compare)} "
            f"(ablated − baseline, {method}){done}")


def ranked_indices(result: SweepResult, n: int = SWEEP_TOP_N) -> list[int]:
    """Indices (into ``components``) of the n finished components with the largest |effect|, largest
    first (the engine's ``SweepResult.top`` order)."""
    index = {spec: i for i, spec in enumerate(result.components)}
    return [index[spec] for spec, _ in result.top(n)]


def sweep_note(result: SweepResult, n: int = SWEEP_TOP_N) -> str:
    """The ranked chart's note: how many bars of how many, and the rest summarised."""
    flat = np.asarray(result.effects, dtype=float).reshape(-1)
    top = ranked_indices(result, n)
    unit = UNITS[result.request.kind]
    rest = np.delete(flat, top)
    finished = rest[np.isfinite(rest)]
    waiting = len(rest) - len(finished)
    text = f"The {len(top)} largest |effects| of {len(flat):,} {unit}."
    if len(finished):
        text += (f" The other {len(finished):,}: from {finished.min():+.3f} to {finished.max():+.3f}, "
                 f"sum {finished.sum():+.3f}.")
    if waiting:
        text += f" {waiting:,} not done yet."
    return text


def _ranked_factors(result: SweepResult, top: list[int]) -> list[str]:
    """The bars' factors bottom to top: the largest |effect| on top."""
    return [result.components[i] for i in reversed(top)] or ["(none finished yet)"]


def _ranked_extent(result: SweepResult, top: list[int]) -> tuple[float, float]:
    values = [float(result.effects.reshape(-1)[i]) for i in top] or [0.0]
    lo, hi = min(0.0, min(values)), max(0.0, max(values))
    pad = 0.18 * ((hi - lo) or 1.0)  # room for the value labels at the bars' ends
    return lo - (pad if lo < 0 else 0.02 * pad), hi + (pad if hi > 0 else 0.02 * pad)


def _ranked_chart(result: SweepResult, source: ColumnDataSource, fill: dict, n: int):
    top = ranked_indices(result, n)
    unit = UNITS[result.request.kind]
    lo, hi = _ranked_extent(result, top)
    rows = max(len(top), 1)
    fig = figure(name=SWEEP_CHART, y_range=FactorRange(factors=_ranked_factors(result, top)),
                 x_range=Range1d(lo, hi), height=bounded(BAR_PX * min(rows, n) + 150), min_width=480,
                 sizing_mode="stretch_width", tools="reset,save", toolbar_location="right",
                 title=_sweep_title(result))
    view = CDSView(filter=IndexFilter(indices=top, name=SWEEP_FILTER))
    glyph = fig.hbar(y="spec", right="effect", left=0, height=0.72, source=source, view=view, fill_color=fill,
                     line_color=None, nonselection_fill_alpha=1.0, selection_line_color="#000000",
                     selection_line_width=2)
    # Each bar's value at its end, outside the bar: dark text on the white plot.
    fig.text(x="effect", y="spec", text="label", source=source, view=CDSView(filter=view.filter),
             text_align="align", text_baseline="middle", x_offset="offset", text_font_size="10px",
             text_color=TEXT_DARK)
    fig.add_layout(Span(location=0, dimension="height", line_color="#666666", line_width=1))
    fig.yaxis.major_label_text_font_size = "11px"
    fig.yaxis.axis_label = {"neurons": "neuron (layer:index)", "heads": "head (layer.head)",
                            "blocks": "block output", "features": "SAE feature"}[result.request.kind]
    fig.xaxis.axis_label = f"effect on the metric (ablated − baseline), {unit} ranked by |effect|"
    add_note(fig, sweep_note(result, n), "below", name=SWEEP_NOTE).tags = [n]
    return fig, glyph


def _bar_labels(data: dict[str, list]) -> None:
    """Value labels for the ranked bars: text, alignment and offset per component."""
    data["label"] = [f"{v:+.3f}" if math.isfinite(v) else "" for v in data["effect"]]
    data["align"] = ["left" if not v < 0 else "right" for v in data["effect"]]
    data["offset"] = [4 if not v < 0 else -4 for v in data["effect"]]


def sweep_chart(result: SweepResult, top_n: int = SWEEP_TOP_N):
    """The sweep's effects: a [layer × head] or [layer × attn/mlp] heatmap (the last layer on top),
    or, for neurons and for models whose heatmap would outgrow the page, a ranked chart: the
    ``top_n`` largest |effects| as horizontal bars, the rest summarised in a note under it.

    Every component's row stays in the source named ``SWEEP_SOURCE`` (a ranked chart draws only
    its top rows, through the view's ``IndexFilter`` named ``SWEEP_FILTER``); tapping a cell or a
    bar selects that row, whose ``spec`` names the component.
    """
    data = sweep_data(result)
    ranked = sweep_ranked(result)
    if ranked:
        _bar_labels(data)
    source = ColumnDataSource(data, name=SWEEP_SOURCE)
    half = symmetric_bound(np.asarray(data["effect"]), 1e-6)
    mapper = LinearColorMapper(palette=list(DIVERGING), low=-half, high=half, nan_color=NAN_COLOR,
                               name=SWEEP_MAPPER)
    fill = {"field": "effect", "transform": mapper}
    tips = [("component", "@spec"), ("effect", "@effect{+0.000}"), ("metric after", "@ablated{0.000}"),
            ("", "@status")]
    kind = result.request.kind
    if ranked:
        fig, glyph = _ranked_chart(result, source, fill, top_n)
        if kind in ("neurons", "features"):
            tips.insert(1, ("peak activation", "@activation{0.000}"))
    else:
        n_layers = result.effects.shape[0]
        xs = [str(h) for h in range(result.effects.shape[1])] if kind == "heads" else ["attn", "mlp"]
        fig = figure(name=SWEEP_CHART, x_range=xs, y_range=layer_factors(layer_label(i) for i in range(n_layers)),
                     height=bounded(ROW_PX * n_layers + 110), sizing_mode="stretch_width", min_width=360,
                     tools="reset,save", toolbar_location="right", title=_sweep_title(result))
        glyph = fig.rect("x", "y", 1, 1, source=source, fill_color=fill, line_color="#ffffff", line_width=0.5,
                         nonselection_fill_alpha=1.0, nonselection_line_alpha=1.0,
                         selection_line_color="#000000", selection_line_width=2)
        fig.text("x", "y", text="text", source=source, text_align="center", text_baseline="middle",
                 text_font_size="9px", text_color="text_color")
        fig.grid.visible = False
        fig.axis.axis_line_color = None
        fig.axis.major_tick_line_color = None
        fig.xaxis.axis_label = "head" if kind == "heads" else "block output"
        fig.yaxis.axis_label = "layer"
    style_figure(fig)
    fig.add_tools(HoverTool(renderers=[glyph], tooltips=tips))
    fig.add_tools(TapTool(renderers=[glyph]))
    fig.add_layout(ColorBar(color_mapper=mapper, title="effect", title_text_font_size="10px",
                            major_label_text_font_size="10px", width=10, padding=6), "right")
    fig.tags = [sweep_key(result)]
    return fig


def sweep_key(result: SweepResult) -> str:
    """Identifies the sweep a figure shows: a newer partial of the same sweep updates it in place."""
    return f"sweep:{hash((result.request, result.components))}"


def update_sweep_chart(fig, result: SweepResult) -> None:
    """Show a newer partial (or the final) result of the same sweep in an existing figure.

    Call on the document's event loop (or with no served document).
    """
    data = sweep_data(result)
    ranked = fig.select_one({"name": SWEEP_FILTER})
    if ranked is not None:
        _bar_labels(data)
    fig.select_one({"name": SWEEP_SOURCE}).data = data
    mapper = fig.select_one({"name": SWEEP_MAPPER})
    half = symmetric_bound(np.asarray(data["effect"]), 1e-6)
    mapper.update(low=-half, high=half)
    fig.title.text = _sweep_title(result)
    if ranked is not None:
        n = _top_n(fig)
        top = ranked_indices(result, n)
        ranked.indices = top
        fig.y_range.factors = _ranked_factors(result, top)
        fig.x_range.update(**dict(zip(("start", "end"), _ranked_extent(result, top))))
        fig.select_one({"name": SWEEP_NOTE}).text = sweep_note(result, n)


def _top_n(fig) -> int:
    """The top-N a ranked chart was built with (kept in its note's tags)."""
    return int(fig.select_one({"name": SWEEP_NOTE}).tags[0])


def sweep_top_html(result: SweepResult, n: int = 8) -> str:
    """The n finished components with the largest |effect|, as a small HTML table."""
    top = result.top(n)
    if not top:
        return "<div class='caption'>No finished components yet.</div>"
    rows = "".join(f"<tr><td>{i}</td><td class='tok'>{html.escape(spec)}</td><td>{v:+.3f}</td></tr>"
                   for i, (spec, v) in enumerate(top, 1))
    return (f"<div class='caption'>Largest effects ({result.done}/{result.total} done)</div>"
            f"<table><tr><th>#</th><th>component</th><th>effect</th></tr>{rows}</table>")


# ------------------------------------------------------------------ patching
PATCH_HELD = 256   # a long prompt's patching heatmap holds this many positions
PATCH_SHOWN = 16


def patch_axis(result: PatchResult, window: tuple[int, int] | None = None) -> PositionAxis:
    """The positions a patching heatmap holds and shows (the last ones of a long prompt)."""
    return position_axis(result.corrupt_tokens, held=PATCH_HELD, shown=PATCH_SHOWN, window=window)


def patch_data(result: PatchResult, axis: PositionAxis | None = None) -> dict[str, list]:
    """One entry per (layer, position) that ``axis`` holds, row-major: the restored fraction
    (NaN = not done) and labels."""
    axis = axis or patch_axis(result)
    restored = np.asarray(result.restored, dtype=float)
    half = symmetric_bound(restored, 1.0)
    xs = axis.coords()
    positions = list(axis.positions)
    clean = [html.escape(quote_token(result.clean_tokens[p])) for p in positions]
    corrupt = [html.escape(quote_token(result.corrupt_tokens[p])) for p in positions]
    data: dict[str, list] = {k: [] for k in ("x", "y", "layer", "pos", "restored", "patched", "text",
                                             "text_color", "clean_token", "corrupt_token")}
    for l, label in enumerate(result.layer_labels):
        values = [float(restored[l, p]) for p in positions]
        data["text_color"] += text_colors(DIVERGING, -half, half, values, NAN_COLOR)
        for i, p in enumerate(positions):
            v = values[i]
            data["x"].append(xs[i])
            data["y"].append(label)
            data["layer"].append(l)
            data["pos"].append(p)
            data["restored"].append(v)
            data["patched"].append(float(result.patched[l, p]))
            data["text"].append(cell_text(v, "{:.2f}") if math.isfinite(v) else "")
            data["clean_token"].append(clean[i])
            data["corrupt_token"].append(corrupt[i])
    return data


def _patch_title(result: PatchResult) -> str:
    site = {"resid": "residual stream after the block", "attn": "attention output", "mlp": "MLP output",
            "features": "SAE feature activation (error term kept)"}[result.site]
    done = "" if result.complete else f" · {result.done}/{result.total} done"
    return (f"Fraction of {metric_name(result.target, result.compare)} restored by patching the clean "
            f"{site} (clean {result.clean_metric:.2f}, corrupted {result.corrupt_metric:.2f}){done}")


def patch_chart(result: PatchResult, window: tuple[int, int] | None = None):
    """[layer × position] heatmap of the restored fraction (the last layer on top); the corrupted
    prompt's tokens on the x axis. A long prompt gets a position window (``patch_axis``: the last
    ``PATCH_HELD`` positions, or ``window`` = (start, stop)), panned, with a note under it."""
    axis = patch_axis(result, window)
    data = patch_data(result, axis)
    source = ColumnDataSource(data, name=PATCH_SOURCE)
    half = symmetric_bound(np.asarray(result.restored, dtype=float), 1.0)
    mapper = LinearColorMapper(palette=list(DIVERGING), low=-half, high=half, nan_color=NAN_COLOR,
                               name=PATCH_MAPPER)
    n_layers = len(result.layer_labels)
    columns = axis.view_stop - axis.view_start
    fig = figure(name=PATCH_CHART, x_range=axis.axis_range(max_shown=3 * PATCH_SHOWN),
                 y_range=layer_factors(result.layer_labels),
                 frame_height=frame_rows(n_layers),
                 min_width=bounded(70 * columns + 170), sizing_mode="stretch_width",
                 tools="xpan,xwheel_zoom,reset,save" if axis.windowed else "pan,box_zoom,wheel_zoom,reset,save",
                 toolbar_location="right", title=_patch_title(result))
    style_figure(fig)
    cells = fig.rect("x", "y", 1, 1, source=source, fill_color={"field": "restored", "transform": mapper},
                     line_color="#ffffff", line_width=0.5)
    fig.text("x", "y", text="text", source=source, text_align="center", text_baseline="middle",
             text_font_size="9px", text_color="text_color")
    fig.add_tools(HoverTool(renderers=[cells], tooltips=[
        ("layer", "@y"), ("position", "@pos: @corrupt_token{safe} (clean @clean_token{safe})"),
        ("restored", "@restored{0.000}"), ("metric patched", "@patched{0.000}")]))
    fig.add_layout(ColorBar(color_mapper=mapper, title="restored", title_text_font_size="10px",
                            major_label_text_font_size="10px", width=10, padding=6), "right")
    fig.grid.visible = False
    fig.axis.axis_line_color = None
    fig.axis.major_tick_line_color = None
    axis.style_axis(fig.xaxis)
    axis.annotate(fig)
    fig.xaxis.axis_label = "corrupted prompt position: token"
    fig.yaxis.axis_label = "SAE feature" if result.site == "features" else "layer"
    fig.tags = [patch_key(result)]
    return fig


def patch_key(result: PatchResult) -> str:
    return f"patch:{hash(result.request)}"


def update_patch_chart(fig, result: PatchResult) -> None:
    """Show a newer partial (or the final) patching result in an existing figure (on the loop),
    over the positions the figure holds."""
    shown = chart_window(fig)
    axis = patch_axis(result, None if shown is None else (shown[0], shown[1]))
    data = patch_data(result, axis)
    fig.select_one({"name": PATCH_SOURCE}).data = data
    half = symmetric_bound(np.asarray(result.restored, dtype=float), 1.0)
    fig.select_one({"name": PATCH_MAPPER}).update(low=-half, high=half)
    fig.title.text = _patch_title(result)
