"""Chart builders for probes, CCS and patchscopes: pure functions from results to Bokeh figures.

No figure exceeds ``MAX_PX`` in either dimension for any input: the patchscope grid shows a
window of at most ``max_columns`` positions (the result keeps them all), and row heights shrink
for very deep models.
"""
from __future__ import annotations

import html
import math

import numpy as np
from bokeh.models import (
    ColorBar,
    ColumnDataSource,
    FixedTicker,
    HoverTool,
    Legend,
    LegendItem,
    LinearColorMapper,
    Range1d,
    Span,
    TapTool,
)
from bokeh.palettes import Viridis256
from bokeh.plotting import figure

from explorer.analyses.ccs import CCSResult
from explorer.analyses.patchscope import PatchscopeResult
from explorer.analyses.probes import ProbeResult

from .charts import quote_token, show_token

MAX_PX = 8000
PROBE_CURVE = "probe-curve"
PATCHSCOPE_GRID = "patchscope-grid"
PATCHSCOPE_SOURCE = "patchscope-cells"
COLORS = {"probe": "#1f77b4", "control": "#7f7f7f", "ccs": "#d62728", "supervised": "#9467bd", "lens": "#2ca02c"}
ROW_PX, COLUMN_PX, CELL_CHARS = 17, 70, 9


def _ticks(n_rows: int, labels, max_ticks: int = 10) -> tuple[FixedTicker, dict]:
    step = max(1, math.ceil(n_rows / max_ticks))
    ticks = sorted(set(list(range(0, n_rows, step)) + [n_rows - 1]))
    return FixedTicker(ticks=ticks), {int(i): str(labels[i]) for i in ticks}


def _style(fig) -> None:
    fig.toolbar.logo = None
    fig.title.text_font_size = "12px"
    fig.axis.major_label_text_font_size = "10px"
    fig.grid.grid_line_alpha = 0.35


def _values(a) -> list[float]:
    return [float("nan") if v is None else float(v) for v in np.asarray(a, dtype=float)]


def probe_curve(result: ProbeResult | None = None, ccs: CCSResult | None = None, height: int = 340):
    """Held-out accuracy per row: the probe with its ±1 SE band, the shuffled-label control, the
    chance line, and (given a CCS result) CCS, the supervised pair probe and the logit lens's answer."""
    base = result if result is not None else ccs
    if base is None:
        raise ValueError("probe_curve needs a probe or a CCS result")
    labels = list(base.layer_labels)
    n = len(labels)
    rows = list(range(n))
    fig = figure(name=PROBE_CURVE, height=min(height, MAX_PX), sizing_mode="stretch_width",
                 x_range=Range1d(-0.5, n - 0.5), y_range=Range1d(0.0, 1.02),
                 tools="xpan,xwheel_zoom,reset,save", toolbar_location="right")
    _style(fig)
    items = []
    tooltips = [("layer", "@layer"), ("accuracy", "@acc{0.000} ± @se{0.000}")]
    if result is not None:
        acc, se = np.asarray(result.accuracy, float), np.asarray(result.accuracy_se, float)
        src = ColumnDataSource(dict(row=rows, layer=labels, acc=_values(acc), se=_values(se),
                                    lo=_values(np.clip(acc - se, 0, 1)), hi=_values(np.clip(acc + se, 0, 1)),
                                    ctl=_values(result.control_accuracy)), name="probe-curve-source")
        band = fig.varea("row", "lo", "hi", source=src, fill_color=COLORS["probe"], fill_alpha=0.18)
        line = fig.line("row", "acc", source=src, line_width=2, color=COLORS["probe"])
        dots = fig.scatter("row", "acc", source=src, size=6, color=COLORS["probe"])
        ctl = fig.line("row", "ctl", source=src, line_width=1.5, color=COLORS["control"], line_dash="dashed")
        items += [LegendItem(label="probe (held-out, ±1 SE)", renderers=[line, dots, band]),
                  LegendItem(label="shuffled-label control", renderers=[ctl])]
        fig.add_tools(HoverTool(renderers=[dots], tooltips=tooltips + [("control", "@ctl{0.000}")], mode="vline"))
        if result.best_row >= 0:
            fig.add_layout(Span(location=result.best_row, dimension="height", line_color=COLORS["probe"],
                                line_alpha=0.5, line_dash="dotted"))
        chance = result.chance
        what = (f"{result.request.data_name or 'data'}: {result.n} texts, site {result.request.site}, "
                f"{result.request.folds}-fold · {result.rows_done}/{n} rows")
        if result.best_row >= 0:
            what += f" · best {labels[result.best_row]} {result.accuracy[result.best_row]:.2f}"
    else:
        chance = ccs.chance
        what = ""
    if ccs is not None:
        src = ColumnDataSource(dict(row=rows, layer=labels, ccs=_values(ccs.accuracy),
                                    sup=_values(ccs.supervised_accuracy),
                                    lens=_values(ccs.lens_accuracy), cctl=_values(ccs.control_accuracy),
                                    cons=_values(ccs.loss_consistency), conf=_values(ccs.loss_confidence)),
                               name="ccs-curve-source")
        c = fig.line("row", "ccs", source=src, line_width=2, color=COLORS["ccs"])
        cd = fig.scatter("row", "ccs", source=src, size=5, color=COLORS["ccs"], marker="square")
        s = fig.line("row", "sup", source=src, line_width=1.5, color=COLORS["supervised"])
        le = fig.line("row", "lens", source=src, line_width=1.5, color=COLORS["lens"], line_dash="dotdash")
        items += [LegendItem(label="CCS (sign from the training labels)", renderers=[c, cd]),
                  LegendItem(label="supervised on pairs", renderers=[s]),
                  LegendItem(label="logit-lens answer", renderers=[le])]
        fig.add_tools(HoverTool(renderers=[cd], mode="vline", tooltips=[
            ("layer", "@layer"), ("CCS", "@ccs{0.000}"), ("supervised", "@sup{0.000}"), ("lens", "@lens{0.000}"),
            ("untrained starts", "@cctl{0.000}"), ("consistency / confidence", "@cons{0.0000} / @conf{0.0000}")]))
        what += (" · " if what else "") + f"CCS: {ccs.n_train} pairs to train, {ccs.n_test} held out"
    fig.add_layout(Span(location=chance, dimension="width", line_color="#444444", line_dash="dotted", line_width=1))
    items.append(LegendItem(label=f"chance {chance:.2f}", renderers=[]))
    legend = Legend(items=[i for i in items if i.renderers], location="top_left", label_text_font_size="10px",
                    background_fill_alpha=0.7, click_policy="hide")
    fig.add_layout(legend)
    fig.title.text = f"Accuracy per layer · {what} · dotted: chance {chance:.2f}"
    ticker, overrides = _ticks(n, labels)
    fig.xaxis.ticker, fig.xaxis.major_label_overrides = ticker, overrides
    fig.xaxis.axis_label, fig.yaxis.axis_label = "layer (residual stream after)", "held-out accuracy"
    return fig


# ------------------------------------------------------------------- patchscope grid
def patchscope_width(max_columns: int = 100) -> int:
    """How many source positions one grid shows: at most ``max_columns`` and ≤ MAX_PX wide."""
    return max(1, min(max_columns, (MAX_PX - 200) // COLUMN_PX))


def patchscope_window(result: PatchscopeResult, start: int | None = None, max_columns: int = 100) -> tuple[int, int]:
    """The columns [lo, hi) a grid shows: at most ``max_columns`` and ≤ MAX_PX wide; default the last ones."""
    n = len(result.positions)
    width = patchscope_width(max_columns)
    lo = max(0, n - width) if start is None else min(max(0, int(start)), max(0, n - width))
    return lo, min(n, lo + width)


def patchscope_grid(result: PatchscopeResult, start: int | None = None, max_columns: int = 100):
    """Blocks × source positions, each cell the identity prompt's top-1 token after the patch,
    coloured by its probability. The cells' source (``PATCHSCOPE_SOURCE``) carries ``row``/``col``."""
    lo, hi = patchscope_window(result, start, max_columns)
    L = len(result.layer_labels)
    row_px = max(4, min(ROW_PX, (MAX_PX - 150) // max(1, L)))
    xs = [f"{int(p)}: {show_token(result.tokens[int(p)]).strip() or '␣'}"[:16] for p in result.positions[lo:hi]]
    if len(set(xs)) < len(xs):  # a position asked for twice: factors must be unique
        xs = [f"{x} #{j}" for j, x in enumerate(xs)]
    data: dict[str, list] = {k: [] for k in ("x", "y", "row", "col", "prob", "text", "color", "topk", "layer", "token")}
    for r in range(L):
        for j, c in enumerate(range(lo, hi)):
            p = float(result.top_probs[r, c, 0])
            tok = str(result.top_tokens[r, c, 0])
            data["x"].append(xs[j])
            data["y"].append(result.layer_labels[r])
            data["row"].append(r)
            data["col"].append(c)
            data["prob"].append(p)
            data["text"].append(show_token(tok)[:CELL_CHARS])
            data["color"].append("#ffffff" if p < 0.55 else "#1a1a1a")
            data["topk"].append("<br>".join(f"{q:.3f}&nbsp;&nbsp;{html.escape(quote_token(t))}"
                                            for t, q in zip(result.top_tokens[r, c], result.top_probs[r, c])))
            data["layer"].append(result.layer_labels[r])
            data["token"].append(html.escape(quote_token(result.tokens[int(result.positions[c])])))
    source = ColumnDataSource(data, name=PATCHSCOPE_SOURCE)
    mapper = LinearColorMapper(palette=list(Viridis256), low=0.0, high=1.0)
    width = min(MAX_PX, COLUMN_PX * (hi - lo) + 200)
    fig = figure(name=PATCHSCOPE_GRID, x_range=xs, y_range=list(result.layer_labels),
                 height=min(MAX_PX, row_px * L + 120), width=width, tools="pan,box_zoom,wheel_zoom,reset,save",
                 toolbar_location="right",
                 title="Patchscope: identity prompt's top-1 after block l's state of each position"
                       + (f" (positions {lo}–{hi - 1} of {len(result.positions)})"
                          if hi - lo < len(result.positions) else ""))
    _style(fig)
    cells = fig.rect("x", "y", 1, 1, source=source, fill_color={"field": "prob", "transform": mapper},
                     line_color="#ffffff", line_width=0.5, nonselection_fill_alpha=1.0, nonselection_line_alpha=1.0,
                     selection_line_color="#e6194b", selection_line_width=2)
    if row_px >= 12:
        fig.text("x", "y", text="text", source=source, text_align="center", text_baseline="middle",
                 text_font_size="10px", text_color="color")
    fig.add_tools(HoverTool(renderers=[cells], tooltips="""
<div style="font-family: ui-monospace, monospace; font-size: 11px; max-width: 320px">
  <div style="font-weight: bold">@layer &middot; source @token{safe}</div><div>@topk{safe}</div></div>"""))
    fig.add_tools(TapTool(renderers=[cells]))
    fig.add_layout(ColorBar(color_mapper=mapper, title="p(top-1)", width=10, padding=6,
                            major_label_text_font_size="10px"), "right")
    fig.grid.visible = False
    fig.xaxis.major_label_orientation = 0.0 if hi - lo <= 12 else math.pi / 4
    fig.xaxis.axis_label, fig.yaxis.axis_label = "source position: token", "block (patched at the same block)"
    return fig


def patchscope_topk_html(result: PatchscopeResult, row: int, col: int) -> str:
    """One cell's top-k as a small HTML table."""
    pos = int(result.positions[col])
    body = "".join(f"<tr><td>{i}</td><td class='tok'>{html.escape(quote_token(t))}</td><td>{p:.3f}</td></tr>"
                   for i, (t, p) in enumerate(zip(result.top_tokens[row, col], result.top_probs[row, col]), 1))
    return (f"<div class='caption'>{html.escape(result.layer_labels[row])}, source position {pos} "
            f"({html.escape(quote_token(result.tokens[pos]))})</div>"
            f"<table><tr><th>#</th><th>token</th><th>p</th></tr>{body}</table>")
