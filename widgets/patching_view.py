"""Activation patching: the clean run's activations patched into the corrupted run, cell by cell.

A job (``parts.JobPanel``); the heatmap is built from the first partial result and filled in
place by newer ones; cancelling keeps the finished cells. The part owns its inputs.
"""
from __future__ import annotations

from functools import partial

import panel as pn
import param

from explorer.core.jobs import Job, Progress
from explorer.core.session import ModelSession
from explorer.interventions import patching as engine
from explorer.interventions.patching import SITES, PatchRequest, PatchResult
from explorer.persistence.history import History

from . import ablation_charts as ac
from .ablation_form import counts_line
from .charts import shorten
from .parts import JobPanel, JobSection, guarded, progress_text, push, stale_note, text_field, token_hint

INPUTS = ("clean", "corrupt", "site", "target", "compare_token", "sae_dir", "features", "top_n")


class PatchingPanel(JobSection, pn.viewable.Viewer):
    """Patch each layer × position of the clean run into the corrupted one; how much is restored."""

    clean = param.String(default="The capital of France is", label="Clean prompt",
                         doc="Its activations are patched into the corrupted run.")
    corrupt = param.String(default="The capital of Italy is", label="Corrupted prompt",
                           doc="Must have the same number of tokens as the clean prompt.")
    site = param.Selector(default="resid", objects=[*SITES, "features"], label="Site",
                          doc="resid: the residual stream after a block; attn / mlp: its attention / MLP output; "
                              "features: SAE features (one row per feature), each set to its clean activation.")
    sae_dir = param.String(default="", label="SAE folder", doc="Site features: an SAE in the SAELens layout.")
    features = param.String(default="", label="Features (optional)",
                            doc="Site features: e.g. '123, 456'; empty: the N that differ most between the prompts.")
    top_n = param.Integer(default=20, bounds=(1, None), label="N features")
    target = param.String(default=" Paris", label="Target token", doc="The clean answer.")
    compare_token = param.String(default="", label="Compare token (optional)",
                                 doc="e.g. the corrupted answer: the metric is then the logit difference.")
    start = param.Event(label="Run patching")
    result = param.ClassSelector(class_=PatchResult, default=None, allow_None=True,
                                 doc="The patching run shown (partial while running or after a cancel).")
    counts = param.String(default="", doc="Live token counts of the clean and corrupted prompts.")
    target_hint = param.String(default="")

    def __init__(self, session: ModelSession, history: History | None = None, **params) -> None:
        super().__init__(**params)
        self.session = session
        self.history = history
        self.job = JobPanel("run patching", "patch", self._on_progress, self._on_finish)
        self._pane = pn.pane.Bokeh(None, css_classes=["ablation-patch-chart"], sizing_mode="stretch_width")
        self._update_counts()
        self._update_hint()
        self.param.watch(self._mark_stale, list(INPUTS))
        self._layout = self._build()

    def request(self) -> PatchRequest:
        features = self.site == "features"
        return PatchRequest(clean=self.clean, corrupt=self.corrupt, target=self.target, site=self.site,
                            compare_token=self.compare_token or None,
                            sae=(self.sae_dir.strip() or None) if features else None,
                            features=self.features.strip() if features else "", top_n=self.top_n)

    @param.depends("clean", "corrupt", watch=True)
    def _update_counts(self) -> None:
        self.counts = counts_line(self.session, self.clean, self.corrupt, ("clean", "corrupted"), "patching")

    @param.depends("target", watch=True)
    def _update_hint(self) -> None:
        self.target_hint = token_hint(self.session, self.target)

    def run(self, background: bool = True) -> Job | None:
        """Start a patching run for the current inputs (``background=False`` blocks)."""
        self.stale = False
        return self.job.start(partial(guarded, engine.patch, "patching", self.session, self.request()),
                              "Starting: the clean and corrupted runs…", background=background)

    def _on_progress(self, progress: Progress, result: PatchResult | None) -> None:
        if result is not None:
            self._show(result)
        self.job.status = progress_text(progress, "cells")

    def _on_finish(self, job: Job) -> None:
        result: PatchResult = job.result
        self._show(result)
        what = f"patching ({result.site}): {shorten(result.request.clean, 30)} → {shorten(result.request.corrupt, 30)}"
        if result.complete:
            status = f"Done: {result.total} cells in {job.progress.elapsed:.1f} s"
        else:
            what = f"{what} (cancelled at {result.done}/{result.total})"
            status = f"Cancelled after {result.done}/{result.total} cells: the finished cells are kept."
        if self.history is not None:
            self.history.add(result, what)
        self.job.param.update(done=result.done, total=max(1, result.total), status=status, error="")

    def _show(self, result: PatchResult) -> None:
        fig = self._pane.object
        if fig is None or fig.tags != [ac.patch_key(result)]:
            self._pane.object = ac.patch_chart(result)
        else:
            ac.update_patch_chart(fig, result)
            push(self._pane)
        self.result = result

    def _build(self) -> pn.viewable.Viewable:
        clean = text_field(self.param.clean, "patch-clean", sizing_mode="stretch_width")
        corrupt = text_field(self.param.corrupt, "patch-corrupt", sizing_mode="stretch_width")
        counts = pn.pane.Markdown(self.param.counts, css_classes=["patch-counts"], margin=(0, 10))
        target = text_field(self.param.target, "patch-target", width=150)
        compare = text_field(self.param.compare_token, "patch-compare", width=170, placeholder="e.g. ' Rome'")
        hint = pn.pane.Markdown(self.param.target_hint, css_classes=["patch-target-hint"], margin=(0, 10),
                                visible=self.param.target_hint.rx.bool(), styles={"color": "#664d03"})
        site = pn.widgets.RadioButtonGroup.from_param(self.param.site, css_classes=["patch-site"],
                                                      margin=(26, 10, 10, 10))
        is_features = self.param.site.rx() == "features"
        feature_row = pn.Row(
            text_field(self.param.sae_dir, "patch-sae", width=240, placeholder="e.g. runs/sae-l12"),
            text_field(self.param.features, "patch-features", width=180, placeholder="e.g. 123, 456"),
            pn.widgets.IntInput.from_param(self.param.top_n, width=100), visible=is_features)
        return pn.Column(
            pn.Row(clean, corrupt, sizing_mode="stretch_width"), counts, feature_row,
            pn.FlexBox(target, compare, site, *self.job.buttons(self.param.start, self.param.cancel, width=130),
                       align_items="flex-start", sizing_mode="stretch_width"),
            hint, self.job.progress_row(), self.job.error_box(), stale_note(self.param.stale, "patch-stale"),
            self._pane, sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout
