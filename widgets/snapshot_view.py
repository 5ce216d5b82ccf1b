"""The snapshot view: a saved session's results, every chart as it was, without the model.

``SnapshotView(path)`` (or a loaded ``Snapshot``, or the bytes of an uploaded file) shows the
manifest (model, config hash, when, with which package versions) and every stored result,
grouped by the view it came from and labelled as stored, drawn by ``export.figures_for``: the
same chart builders the live views use. Nothing here runs a model.

With a model session attached whose identity (name and config hash) matches the manifest,
results made from a request (lens, comparison, heads, ablation, sweep, patching) get a
"Continue from here" button: it loads that request's settings into the live view and, for the
quick analyses, runs it again. A different model gets a warning naming each difference.
"""
from __future__ import annotations

import html
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import panel as pn
import param
from bokeh.models import DataTable, Div, NumberFormatter

from explorer.analyses.heads import AttentionResult, HeadPattern, HeadScores
from explorer.analyses.lens import LensComparison, LensResult
from explorer.core.errors import ExplorerError
from explorer.core.results import Result
from explorer.core.session import ModelSession
from explorer.interventions.ablation import AblationResult, SweepResult
from explorer.interventions.patching import PatchResult
from explorer.persistence.snapshot import (
    Snapshot,
    SnapshotError,
    load_snapshot,
    model_differences,
    model_identity,
    read_snapshot,
)

from . import export
from .heads_charts import chip_label
from .parts import alert
from .registry import display_name, figures_for, grouped, kind_of

log = logging.getLogger(__name__)

VIEW_CSS = """
.snapshot-manifest table { border-collapse: collapse; font-size: 13px; }
.snapshot-manifest th { text-align: left; color: #666; font-weight: normal; padding: 2px 14px 2px 0;
                        vertical-align: top; }
.snapshot-manifest td { padding: 2px 0; word-break: break-word; }
"""

TABLE_CSS = """
.table-scroll { max-height: 320px; overflow: auto; }
table { border-collapse: collapse; font-size: 12px; font-variant-numeric: tabular-nums; }
th { position: sticky; top: 0; background: #fafafa; color: #555; font-weight: 600; text-align: left; }
th, td { padding: 2px 12px 2px 0; white-space: nowrap; }
tr + tr { border-top: 1px solid #eee; }
"""


def _cell(value: Any, formatter: Any) -> str:
    """One table cell as text, following the column's number format ("0.000", "+0.000")."""
    if isinstance(formatter, NumberFormatter) and isinstance(value, (int, float)):
        fmt = formatter.format
        decimals = len(fmt.split(".", 1)[1]) if "." in fmt else 0
        return f"{value:{'+' if fmt.startswith('+') else ''}.{decimals}f}"
    return str(value)


def table_div(table: DataTable) -> Div:
    """A bokeh DataTable as a static HTML table with the same columns, rows and name.

    Panel 1.9.4's Card renders its children before it is attached to the page, and SlickGrid
    (bokeh's DataTable) then fails to find its stylesheet, which blanks the whole snapshot tab.
    """
    data = table.source.data
    head = "".join(f"<th>{html.escape(c.title or c.field)}</th>" for c in table.columns)
    n = len(next(iter(data.values()), []))
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(data[c.field][i], c.formatter))}</td>"
                                    for c in table.columns) + "</tr>" for i in range(n))
    return Div(text=f"<div class='table-scroll'><table><tr>{head}</tr>{rows}</table></div>", name=table.name,
               stylesheets=[TABLE_CSS], sizing_mode="stretch_width")


def continue_kind(result: Result) -> str | None:
    """The live view a result's settings go back to ("lens", "heads", "ablation"), or None."""
    kind = kind_of(result)
    return kind.view if kind is not None else None


def _opt(value: str | None) -> str:
    return "" if value is None else value


def settings_for(result: Result) -> dict[str, Any]:
    """The view parameters that reproduce the request a result was made from."""
    if isinstance(result, LensResult):
        r = result.request
        return dict(prompt=r.prompt, target=_opt(r.target), top_k=r.top_k, unembed_dtype=r.unembed_dtype,
                    compare=False)
    if isinstance(result, LensComparison):
        r = result.request
        return dict(prompt=r.prompt_a, prompt_b=r.prompt_b, target=_opt(r.target), top_k=r.top_k,
                    unembed_dtype=r.unembed_dtype, compare=True)
    if isinstance(result, HeadScores):
        r = result.request
        return dict(prompt=r.prompt, target=_opt(r.target), seq_len=r.seq_len, seed=r.seed)
    if isinstance(result, HeadPattern):
        return dict(prompt=result.prompt, selected=[chip_label(result.layer, result.head)])
    if isinstance(result, AttentionResult):
        return dict(prompt=result.request.prompt)
    if isinstance(result, (AblationResult, SweepResult)):
        r = result.request
        out = dict(prompt=r.prompt, target=r.target, mode=r.mode, compare_token=_opt(r.compare_token),
                   second_prompt=_opt(r.second_prompt))
        if r.mode == "mean":
            out.update(mean_source="text" if r.mean_text is not None else "corpus", mean_text=_opt(r.mean_text))
        if isinstance(result, AblationResult):
            out["components"] = ", ".join(r.components)  # as the user wrote them
        else:
            out.update(kind=r.kind, method=r.method, top_n=r.top_n)
        return out
    if isinstance(result, PatchResult):
        r = result.request
        return dict(clean=r.clean, corrupt=r.corrupt, target=r.target, site=r.site,
                    compare_token=_opt(r.compare_token))
    raise ExplorerError(f"a {type(result).__name__} has no settings to continue from")


def as_snapshot(source: str | Path | bytes | Snapshot, name: str | None = None) -> Snapshot:
    """A snapshot from a path, the bytes of a file, or a loaded one (``SnapshotError`` if unreadable)."""
    if isinstance(source, Snapshot):
        return source
    if isinstance(source, (bytes, bytearray)):
        return read_snapshot(bytes(source), name or "the uploaded file")
    return load_snapshot(source)


class SnapshotView(pn.viewable.Viewer):
    """Every result of a snapshot, drawn as the live views draw them; optionally continue live."""

    title = param.String(default="Snapshot", doc="Heading of the view (the file's name).")
    model_warning = param.String(default="", doc="How the attached model differs from the snapshot's; empty when none.")
    can_continue = param.Boolean(default=False, doc="True when the attached model is the snapshot's.")
    status = param.String(default="", doc="What the last 'Continue from here' did (markdown).")
    error = param.String(default="", doc="The last error shown to the user; empty when none.")

    def __init__(self, source: str | Path | bytes | Snapshot, session: ModelSession | None = None,
                 views: dict[str, pn.viewable.Viewer] | None = None,
                 on_continue: Callable[[str], None] | None = None, name: str | None = None, **params) -> None:
        if "title" not in params:
            params["title"] = name or (Path(source).name if isinstance(source, (str, Path)) else "Snapshot")
        super().__init__(**params)
        self.snapshot = as_snapshot(source, name)
        self.session = session
        self.views: dict[str, pn.viewable.Viewer] = dict(views or {})  # kind -> live view to continue in
        self._on_continue = on_continue
        self._check_model()
        self._layout = self._build()

    # ------------------------------------------------------------------ the model
    def _check_model(self) -> None:
        """Compare the attached model with the manifest's: name and config hash must match."""
        if self.session is None:
            return
        stored = self.snapshot.model
        if not stored.get("name") or not stored.get("config_hash"):
            self.model_warning = ("This snapshot does not record which model made it, so its results cannot be "
                            "continued with the attached model.")
            return
        differences = model_differences(stored, model_identity(self.session))
        same_model = not any(d.startswith(("name", "config_hash")) for d in differences)
        self.can_continue = same_model
        if differences:
            lead = ("The attached model has the snapshot's name and configuration but other weights: "
                    "continuing recomputes with these weights." if same_model else
                    "The attached model is not the one this snapshot was made with, so its results cannot be "
                    "continued here.")
            self.model_warning = f"{lead} Differences: {'; '.join(differences)}."

    def attach(self, session: ModelSession, views: dict[str, pn.viewable.Viewer]) -> None:
        """Another model was attached (the sidebar's picker): check it against the snapshot's and
        continue in its views."""
        self.session, self.views = session, dict(views)
        self.param.update(model_warning="", can_continue=False)
        self._check_model()

    # ------------------------------------------------------------------ continue
    def continue_from(self, index: int, run: bool = True) -> pn.viewable.Viewer | None:
        """Load entry ``index``'s settings into its live view (made here if none was given) and,
        with ``run``, rerun the quick analyses. Returns the view, or None (the error is shown)."""
        result = self.snapshot.entries[index].result
        entry = kind_of(result)
        kind = entry.view if entry is not None else None
        if kind is None:
            self.error = f"**Cannot continue:** this result ({display_name(result)}) has no settings to load."
            return None
        if not self.can_continue:
            reason = self.model_warning if self.session is not None and self.model_warning else "no model is attached."
            self.error = f"**Cannot continue:** {reason}"
            return None
        view = self.views.get(kind) or self._make_view(kind)
        target = view.part(entry.part) if entry.part else view  # a part brings its section to the front
        try:
            target.param.update(**settings_for(result))
        except Exception as e:  # e.g. a setting this view cannot take (a CLI-only sweep method)
            self.error = f"**Could not load the settings:** {e}"
            return None
        quick = entry.rerun
        if run and quick:
            target.param.trigger("run")
        label = self.snapshot.entries[index].label
        then = (" and ran it again." if run and quick else "; press its Run button to compute it." if quick
                else "; press its Start button to run it again (a long job).")
        self.param.update(error="", status=f"Loaded the settings of **{html.escape(label)}** into the {kind} view"
                                           f"{then}")
        if self._on_continue is not None:
            self._on_continue(kind)
        return view

    def _make_view(self, kind: str) -> pn.viewable.Viewer:
        from .ablation_view import AblationView
        from .heads_view import HeadsView
        from .lens_view import LogitLensView

        view = {"lens": LogitLensView, "heads": HeadsView, "ablation": AblationView}[kind](self.session)
        self.views[kind] = view
        return view

    # ------------------------------------------------------------------ layout
    def entry_panel(self, index: int) -> pn.Card:
        """One stored result: its charts with their captions (and Continue from here)."""
        entry = self.snapshot.entries[index]
        kind = display_name(entry.result)
        objects: list = [pn.pane.Markdown(f"*{kind}*", css_classes=["snapshot-kind"], margin=(0, 10))]
        if self.can_continue and continue_kind(entry.result) is not None:
            button = pn.widgets.Button(label="Continue from here", width=170, css_classes=["snapshot-continue"],
                                       description="Load these settings into the live view")
            button.on_click(lambda _event, i=index: self.continue_from(i))
            objects.append(button)
        for caption, fig in figures_for(entry.result, self.snapshot.model):
            if isinstance(fig, DataTable):
                fig = table_div(fig)  # see table_div: a DataTable cannot render inside a Card
            objects.append(pn.pane.Bokeh(fig, css_classes=["snapshot-figure"]))
            if caption:
                objects.append(pn.pane.Markdown(caption, css_classes=["snapshot-caption"], margin=(0, 10, 12, 10),
                                                styles={"font-style": "italic", "color": "#444"},
                                                sizing_mode="stretch_width"))
        return pn.Card(*objects, title=f"{index + 1}. {entry.label or kind}", css_classes=["snapshot-entry"],
                       sizing_mode="stretch_width", margin=(5, 5, 10, 5))

    def _build(self) -> pn.viewable.Viewable:
        snap = self.snapshot
        model = snap.model.get("name", "an unknown model")
        header = pn.pane.Markdown(f"## {self.title}\n{len(snap.entries)} results made with **{model}**.",
                                  css_classes=["snapshot-title"], sizing_mode="stretch_width")
        manifest = pn.pane.HTML(export.manifest_html(snap.manifest), css_classes=["snapshot-manifest"],
                                stylesheets=[VIEW_CSS], sizing_mode="stretch_width")
        warning = alert(self.param.model_warning, "snapshot-warning", kind="warning")
        error = alert(self.param.error, "snapshot-error")
        status = pn.pane.Markdown(self.param.status, css_classes=["snapshot-status"], sizing_mode="stretch_width",
                                  visible=self.param.status.rx.bool())
        body: list = []
        for group, items in grouped(snap.entries):
            body.append(pn.pane.Markdown(f"### {group} ({len(items)})", css_classes=["snapshot-group"],
                                         sizing_mode="stretch_width"))
            body += [self.entry_panel(i) for i, _ in items]
        if not snap.entries:
            body.append(pn.pane.Markdown("This snapshot holds no results.", css_classes=["snapshot-empty"]))
        return pn.Column(header, manifest, warning, error, status, *body, sizing_mode="stretch_width",
                         css_classes=["snapshot-view"])

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout


__all__ = ["SnapshotView", "SnapshotError", "as_snapshot", "continue_kind", "settings_for", "table_div"]
