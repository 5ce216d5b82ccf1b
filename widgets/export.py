"""A standalone HTML page of a whole snapshot, and the snapshot's manifest as a table.

``figures_for(result)`` (``widgets.registry``) is what both the snapshot view and this page
draw, so a reopened snapshot shows the same charts as the live session; the registry maps each
result type to its builder (``widgets.figures``) and to the group (view) it came from. The HTML
page inlines bokeh's resources: it opens from disk with no server and no network.
"""
from __future__ import annotations

import html
from collections.abc import Iterable
from pathlib import Path

from bokeh.embed import file_html
from bokeh.layouts import column
from bokeh.resources import INLINE

from explorer.persistence.snapshot import Entry, Snapshot

from . import registry
from .figures import FIELDS, div_model, summary_table, table_rows
from .registry import display_name, figures_for, group_of, grouped

# Views of the registry, for callers that want a plain mapping.
BUILDERS = {k.type: k.figures for k in registry.KINDS if k.figures is not None}
GROUPS = {g: tuple(k.type for k in registry.KINDS if k.group == g) for g in registry.GROUPS}

# ------------------------------------------------------------------ manifest
def manifest_rows(manifest: dict) -> list[tuple[str, str]]:
    """(what, value) rows describing a snapshot: its model, when it was made, with what."""
    model = manifest.get("model") or {}
    rows = [("model", str(model.get("name", "unknown")))]
    for key, label in (("architecture", "architecture"), ("n_layers", "layers"), ("config_hash", "config hash"),
                       ("weights_hash", "weights hash")):
        if key in model:
            rows.append((label, str(model[key])))
    rows.append(("created", str(manifest.get("created", "unknown"))))
    rows.append(("schema version", str(manifest.get("schema_version", "?"))))
    packages = manifest.get("packages") or {}
    if packages:
        rows.append(("packages", ", ".join(f"{k} {v}" for k, v in packages.items())))
    return rows


def manifest_html(manifest: dict) -> str:
    return f"<table class='snapshot-manifest'>{table_rows(manifest_rows(manifest))}</table>"


# ------------------------------------------------------------------ the page
def snapshot_page(snapshot: Snapshot | Iterable[Entry], title: str = "Interp Explorer snapshot") -> str:
    """One self-contained HTML document: every result's charts, titled and captioned, by group."""
    snap = snapshot if isinstance(snapshot, Snapshot) else Snapshot(manifest={}, entries=tuple(snapshot))
    model = snap.model
    header = (f"<h1>{html.escape(title)}</h1><p>{len(snap.entries)} results made with "
              f"<b>{html.escape(str(model.get('name', 'an unknown model')))}</b>.</p>{manifest_html(snap.manifest)}")
    parts: list = [div_model(header)]
    for group, items in grouped(snap.entries):
        parts.append(div_model(f"<h2>{html.escape(group)}</h2>"))
        for i, entry in items:
            kind = display_name(entry.result)
            parts.append(div_model(f"<h3>{i + 1}. {html.escape(entry.label or kind)}</h3>"
                                   f"<div class='note'>{html.escape(kind)}</div>"))
            for caption, fig in figures_for(entry.result, model):
                parts.append(fig)
                if caption:
                    parts.append(div_model(f"<p class='caption'><i>{html.escape(caption)}</i></p>"))
    return file_html(column(*parts, sizing_mode="stretch_width"), resources=INLINE, title=title)


def export_html(snapshot: Snapshot | Iterable[Entry], path: str | Path,
                title: str = "Interp Explorer snapshot") -> Path:
    """Write every result's charts, titled and captioned, to one self-contained HTML file."""
    path = Path(path)
    path.write_text(snapshot_page(snapshot, title), encoding="utf-8")
    return path


__all__ = ["BUILDERS", "FIELDS", "GROUPS", "display_name", "figures_for", "summary_table", "group_of", "grouped",
           "manifest_rows", "manifest_html", "snapshot_page", "export_html"]
