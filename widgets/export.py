"""Figures for any saved result, and a standalone HTML page of a whole snapshot.

``figures_for(result)`` is what both the snapshot view and the HTML export draw, so a reopened
snapshot shows the same charts as the live session. The HTML page inlines bokeh's resources:
it opens from disk with no server and no network.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Callable, Iterable

from bokeh.embed import file_html
from bokeh.layouts import column
from bokeh.models import Div
from bokeh.resources import INLINE

from explorer.lens import LensComparison, LensResult
from explorer.results import Result
from explorer.snapshot import Entry, Snapshot

from .charts import comparison_chart, describe_divergence, lens_heatmap, shorten, target_curve

Figure = tuple[str, object]  # (caption, bokeh model)

DEFAULT_THRESHOLD = 0.1


def _lens_figures(r: LensResult) -> list[Figure]:
    last = r.n_positions - 1
    return [
        (f"Logit lens of {shorten(r.request.prompt, 80)!r}: each cell is a layer's top token at a "
         f"position, coloured by its probability.", lens_heatmap(r, "prob")),
        (f"Probability and rank of the target {r.target!r} per layer at the last position.",
         target_curve(r, last)),
    ]


def _comparison_figures(c: LensComparison) -> list[Figure]:
    return [(f"{describe_divergence(c, DEFAULT_THRESHOLD)} A: {shorten(c.request.prompt_a, 60)!r}; "
             f"B: {shorten(c.request.prompt_b, 60)!r}.", comparison_chart(c, DEFAULT_THRESHOLD))]


# One entry per result type that has charts; other results are listed by their fields.
CHARTS: dict[type, Callable[[Result], list[Figure]]] = {
    LensResult: _lens_figures,
    LensComparison: _comparison_figures,
}


def _summary(result: Result) -> str:
    rows = []
    for key, value in result.to_dict().items():
        if key == "type":
            continue
        text = shorten(str(value), 120)
        rows.append(f"<tr><td><b>{html.escape(key)}</b></td><td>{html.escape(text)}</td></tr>")
    return f"<table class='result-fields'>{''.join(rows)}</table>"


def figures_for(result: Result) -> list[Figure]:
    """The captioned charts of one result (a field table for types without charts)."""
    for cls, build in CHARTS.items():
        if isinstance(result, cls):
            return build(result)
    return [("", Div(text=_summary(result), sizing_mode="stretch_width"))]


def export_html(snapshot: Snapshot | Iterable[Entry], path: str | Path, title: str = "Interp Explorer snapshot") -> Path:
    """Write every result's charts, titled and captioned, to one self-contained HTML file."""
    entries = snapshot.entries if isinstance(snapshot, Snapshot) else tuple(snapshot)
    model = snapshot.model if isinstance(snapshot, Snapshot) else {}
    created = snapshot.manifest.get("created", "") if isinstance(snapshot, Snapshot) else ""
    header = (f"<h1>{html.escape(title)}</h1><p>Model: <b>{html.escape(str(model.get('name', 'unknown')))}</b>"
              f" ({html.escape(str(model.get('architecture', '')))}) · saved {html.escape(created)} · "
              f"{len(entries)} results</p>")
    parts: list = [Div(text=header, sizing_mode="stretch_width")]
    for i, entry in enumerate(entries, 1):
        kind = type(entry.result).__name__
        parts.append(Div(text=f"<h2>{i}. {html.escape(entry.label or kind)}</h2>", sizing_mode="stretch_width"))
        for caption, fig in figures_for(entry.result):
            parts.append(fig)
            if caption:
                parts.append(Div(text=f"<p class='caption'><i>{html.escape(caption)}</i></p>",
                                 sizing_mode="stretch_width"))
    page = file_html(column(*parts, sizing_mode="stretch_width"), resources=INLINE, title=title)
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
