"""Conventions every chart builder shares: styling, layer axes, component labels, text colours
that stay readable on their cells, and the position window that keeps long prompts drawable.

- Layers run up the y axis: layer 0 (or the embeddings) at the bottom, the last layer on top,
  as the residual stream flows. A categorical bokeh axis lists its factors bottom to top, so
  ``layer_factors`` hands them over in layer order.
- A head is written as its component spec, ``17.4`` (layer.head), a neuron as ``17:4``: what
  the ablation field and the CLI read back.
- No canvas grows past ``MAX_CANVAS_PX`` (browsers draw larger canvases as a broken image). A
  prompt longer than ``FULL_AXIS_POSITIONS`` gets a ``PositionAxis`` window: a numeric axis
  over a bounded span of positions (``Range1d`` with ``bounds``, drag to pan), a note under the
  chart naming the positions it holds, and the full data left in the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from bokeh.models import CustomJSTickFormatter, FixedTicker, NoOverlap, Range1d, Title
from bokeh.palettes import Category10

MAX_CANVAS_PX = 8000          # the largest width or height any chart may have
FULL_AXIS_POSITIONS = 32      # up to this many positions every one gets its own labelled column
WINDOW_NOTE = "position-window-note"   # bokeh name of the note a windowed chart carries

TEXT_DARK = "#000000"   # cell text on light cells (with white, one of them always reaches 4.58:1)
TEXT_LIGHT = "#ffffff"  # cell text on dark cells
MUTED = "#555555"       # notes and subtitles on white: 7.5:1


# ------------------------------------------------------------------ figure style
def style_figure(fig) -> None:
    """The house style of a figure: no logo, small bold title, small axis labels, faint grid."""
    fig.toolbar.logo = None
    fig.title.text_font_size = "12px"
    fig.title.text_font_style = "bold"
    fig.axis.major_label_text_font_size = "10px"
    fig.axis.axis_label_text_font_size = "11px"
    fig.axis.axis_label_text_font_style = "normal"
    fig.grid.grid_line_alpha = 0.35


def add_note(fig, text: str, place: str = "below", name: str | None = None) -> Title:
    """A one-line note in muted text under (or above) the plot."""
    note = Title(text=text, text_font_size="11px", text_font_style="normal", text_color=MUTED,
                 name=name)
    fig.add_layout(note, place)
    return note


# ------------------------------------------------------------------ layers and components
def layer_label(layer: int) -> str:
    """'L17': how every chart names a layer (the lens adds 'embed' below L0)."""
    return f"L{layer}"


def layer_factors(labels) -> list[str]:
    """Factors of a layer axis with the higher layers on top: bokeh stacks categorical factors
    from the bottom up, so layer order (embeddings / L0 first) puts the last layer on top."""
    return [str(label) for label in labels]


def layer_tick_formatter() -> CustomJSTickFormatter:
    """A categorical layer axis whose factors are '0', '1', ... labelled 'L0', 'L1', ...
    (a categorical axis ignores ``major_label_overrides``; a fresh model per figure)."""
    return CustomJSTickFormatter(code="return 'L' + tick")


def layer_ticks(n_rows: int, labels, max_ticks: int = 9) -> tuple[FixedTicker, dict]:
    """At most ~``max_ticks`` ticks on a numeric layer axis, always the first and the last row."""
    step = max(1, math.ceil(n_rows / max_ticks))
    ticks = list(range(0, n_rows, step))
    if n_rows - 1 - ticks[-1] <= step / 2 and len(ticks) > 1:
        ticks[-1] = n_rows - 1  # no crowded pair of labels at the end
    else:
        ticks.append(n_rows - 1)
    ticks = sorted(set(ticks))
    return FixedTicker(ticks=ticks), {int(i): str(labels[i]) for i in ticks}


def head_spec(layer: int, head: int) -> str:
    """'17.4': a head as its component spec (the ablation field, the CLI and the head chips)."""
    return f"{layer}.{head}"


def neuron_spec(layer: int, neuron: int) -> str:
    """'17:4': an MLP neuron as its component spec."""
    return f"{layer}:{neuron}"


# ------------------------------------------------------------------ heads
# Overlaid heads get these colours, in selection order (grid outlines, patterns, lines).
HEAD_COLORS: tuple[str, ...] = tuple(Category10[10][:8])
MAX_OVERLAY = len(HEAD_COLORS)


def head_label(layer: int, head: int) -> str:
    """'17.4': a head as its component spec, in every chart, table and caption (``head_spec``)."""
    return head_spec(layer, head)


def chip_label(layer: int, head: int) -> str:
    """'17.4', the head's chip in the view's multi-select (the same text as ``head_label``)."""
    return head_spec(layer, head)


def head_color(index: int) -> str:
    return HEAD_COLORS[index % len(HEAD_COLORS)]


def kv_group(head: int, n_heads: int, n_kv_heads: int | None) -> int:
    """The KV head a query head reads (grouped-query attention repeats each KV head
    n_heads / n_kv_heads times in order, so query head h uses KV head h // that)."""
    n_kv = n_kv_heads or n_heads
    return head // max(1, n_heads // n_kv)


# ------------------------------------------------------------------ readable text on cells
def _luminance(hex_color: str) -> float:
    """WCAG relative luminance of '#rrggbb'."""
    value = hex_color.lstrip("#")
    channels = [int(value[i:i + 2], 16) / 255 for i in (0, 2, 4)]
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two '#rrggbb' colours (1 to 21; AA text needs 4.5)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_on(background: str) -> str:
    """White or black, whichever reads better on ``background`` (always ≥ 4.58:1)."""
    return TEXT_LIGHT if contrast(TEXT_LIGHT, background) >= contrast(TEXT_DARK, background) else TEXT_DARK


def palette_color(palette, low: float, high: float, value: float) -> str:
    """The colour a ``LinearColorMapper(palette, low, high)`` gives ``value`` (clamped to the ends)."""
    n = len(palette)
    if high <= low or not math.isfinite(value):
        return palette[n // 2]
    index = math.floor((value - low) / (high - low) * n)
    return palette[min(max(index, 0), n - 1)]


def text_colors(palette, low: float, high: float, values, nan_color: str = "#e3e3e3") -> list[str]:
    """The readable text colour on each value's cell."""
    table = [text_on(c) for c in palette]
    n = len(palette)
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append(text_on(nan_color))
        elif high <= low:
            out.append(table[n // 2])
        else:
            out.append(table[min(max(math.floor((v - low) / (high - low) * n), 0), n - 1)])
    return out


# ------------------------------------------------------------------ the position window
def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


@dataclass(frozen=True)
class PositionAxis:
    """The positions a chart draws and how its axis shows them.

    ``total`` positions in the result; the chart holds ``start``..``stop - 1`` and first shows
    ``view_start``..``view_stop - 1``. Up to ``FULL_AXIS_POSITIONS`` positions the axis is
    categorical, one labelled factor per position (``categorical``); beyond, it is numeric
    (coordinate = position), bounded to what the chart holds, and panned by dragging.
    """

    labels: tuple[str, ...]   # '3: Paris' per held position, start..stop-1
    total: int
    start: int
    stop: int
    view_start: int
    view_stop: int
    categorical: bool

    @property
    def positions(self) -> range:
        return range(self.start, self.stop)

    @property
    def windowed(self) -> bool:
        """Whether the chart shows less than every position at once."""
        return not self.categorical

    @property
    def clipped(self) -> bool:
        """Whether the chart holds fewer positions than the result."""
        return self.start > 0 or self.stop < self.total

    def label(self, pos: int) -> str:
        return self.labels[pos - self.start]

    def coord(self, pos: int):
        """A position's coordinate on the axis: its factor, or the position itself."""
        return self.labels[pos - self.start] if self.categorical else pos

    def coords(self) -> list:
        return list(self.labels) if self.categorical else list(self.positions)

    def edge(self, pos: int, offset: float):
        """A point ``offset`` (±0.5 = the edges) from a position's centre."""
        return (self.label(pos), offset) if self.categorical else pos + offset

    def axis_range(self, reverse: bool = False, max_shown: int | None = None):
        """The chart's range on this axis: the factors, or a ``Range1d`` over the view, bounded
        to the held positions (``reverse``: first position at the top, for a query axis)."""
        if self.categorical:
            return list(reversed(self.labels)) if reverse else list(self.labels)
        lo, hi = self.view_start - 0.5, self.view_stop - 0.5
        bounds = (self.start - 0.5, self.stop - 0.5)
        kwargs = {"bounds": bounds, "min_interval": min(3, self.stop - self.start)}
        if max_shown:
            kwargs["max_interval"] = float(max_shown)
        return Range1d(hi, lo, **kwargs) if reverse else Range1d(lo, hi, **kwargs)

    def style_axis(self, axis, rotate_after: int = 14) -> None:
        """Tick labels '3: Paris' on a numeric axis (overlapping ones dropped), or the factors'
        orientation on a categorical one."""
        if self.categorical:
            axis.major_label_orientation = 0.0 if len(self.labels) <= rotate_after else math.pi / 4
            return
        axis.ticker = FixedTicker(ticks=list(self.positions))
        axis.major_label_overrides = {p: self.label(p) for p in self.positions}
        axis.major_label_policy = NoOverlap(min_distance=4)
        axis.major_label_orientation = math.pi / 4

    def note(self) -> list[str]:
        """What the chart shows, in short lines (none when it shows every position)."""
        if self.categorical:
            return []
        view = f"Positions {self.view_start:,}–{self.view_stop - 1:,}"
        if not self.clipped:
            return [f"{view} of {self.total:,} in view: drag the chart to pan."]
        return [f"{view} in view: drag the chart to pan.",
                f"It holds {self.start:,}–{self.stop - 1:,} of {self.total:,}; the result holds all {self.total:,}."]

    def annotate(self, fig) -> None:
        """Put the note under the chart, one line per title; the first line's tags record
        (start, stop, total, view_start, view_stop) for ``chart_window``."""
        for i, line in enumerate(self.note()):
            note = add_note(fig, line, "below", name=WINDOW_NOTE if i == 0 else f"{WINDOW_NOTE}-{i + 1}")
            if i == 0:
                note.tags = [self.start, self.stop, self.total, self.view_start, self.view_stop]


def position_axis(tokens, *, held: int, shown: int, focus: int | None = None,
                  window: tuple[int, int] | None = None, full: int = FULL_AXIS_POSITIONS) -> PositionAxis:
    """The position window of a chart over ``tokens``.

    Up to ``full`` positions: every one, on a categorical axis. Beyond: the chart holds at most
    ``held`` positions: ``window`` = (start, stop) when given, else the last ones, or those around
    ``focus`` when the last ones would leave it out. ``shown`` of them are in view at first:
    ending a little after ``focus`` when it is held, else at the last held position.
    """
    total = len(tokens)
    if total <= full:
        start, stop, view_start, view_stop, categorical = 0, total, 0, total, True
    else:
        categorical = False
        held = max(1, int(held))
        if window is not None:
            start = min(max(0, int(window[0])), total - 1)
            stop = min(total, max(start + 1, int(window[1])), start + held)
        elif focus is not None and 0 <= focus < total - held:
            start = max(0, focus - held // 2)
            stop = min(total, start + held)
        else:
            start, stop = max(0, total - held), total
        n_show = max(1, min(int(shown), stop - start))
        focused = focus is not None and start <= focus < stop
        view_stop = min(stop, focus + 1 + n_show // 4) if focused else stop
        view_start = max(start, view_stop - n_show)
        view_stop = view_start + n_show
    labels = tuple(position_label(i, tokens[i]) for i in range(start, stop))
    return PositionAxis(labels, total, start, stop, view_start, view_stop, categorical)


def position_label(pos: int, token) -> str:
    """A position on an axis: '3: Paris' (unique per position, the token cut to 14 characters)."""
    return f"{pos}: {_cut(show_token(token).strip(' ') or '␣', 14)}"


def show_token(token) -> str:
    """A token made visible: control characters escaped, an all-space token as '␣'."""
    text = str(token).replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if text and not text.strip(" "):
        return "␣" * len(text)
    return text


def chart_window(model) -> tuple[int, int, int, int, int] | None:
    """(start, stop, total, view_start, view_stop) of the position window a chart reports (in a
    layout: the first chart that has one), or None when it shows every position."""
    notes = list(model.select({"name": WINDOW_NOTE})) if hasattr(model, "select") else []
    return tuple(notes[0].tags) if notes else None


def bounded(px: float, limit: int = MAX_CANVAS_PX) -> int:
    """A figure dimension held under the canvas limit."""
    return int(min(limit, max(1, px)))
