"""An ablation sweep: every head / block output / most active neuron / most active SAE feature
(an SAE folder; error term kept) ablated one at a time.

Runs as a job (``parts.JobPanel`` around ``live.LiveJob``); its throttled progress reports,
with the newest partial result, arrive on the page's event loop, where the chart is built from
the first partial and updated in place by newer ones. Cancelling keeps the finished cells.
A click on a bar or cell hands that component to ``on_pick`` (the single ablation's field).
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import panel as pn
import param

from explorer.core.components import geometry
from explorer.core.jobs import Job, Progress
from explorer.core.session import ModelSession
from explorer.interventions import ablation as engine
from explorer.interventions.ablation import SweepRequest, SweepResult
from explorer.persistence.history import History

from . import ablation_charts as ac
from .ablation_form import FORM_INPUTS, MeasureForm
from .charts import shorten
from .parts import JobPanel, JobSection, guarded, progress_text, push, stale_note

SWEEP_KINDS = {"every head": "heads", "every attention & MLP output": "blocks",
               "the N most active neurons": "neurons", "the N most active SAE features": "features"}
SWEEP_METHODS = {"exact": "exact", "attribution (fast, approximate)": "attribution"}

SIDE_CSS = """
.caption { font-weight: 600; margin-bottom: 6px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 2px 10px 2px 0; text-align: right; }
th { color: #666; font-weight: normal; border-bottom: 1px solid #ddd; }
td.tok { text-align: left; font-family: ui-monospace, Menlo, Consolas, monospace; }
"""


class AblationSweep(MeasureForm, JobSection, pn.viewable.Viewer):
    """Sweep one kind of component; a ranked chart or heatmap that fills in live, and the largest effects."""

    kind = param.Selector(default="heads", objects=SWEEP_KINDS, label="Sweep over",
                          doc="Which components are ablated, one at a time.")
    method = param.Selector(default="exact", objects=SWEEP_METHODS, label="Method",
                            doc="exact: one ablated run per component; attribution: a gradient estimate "
                                "from one forward and one backward pass.")
    top_n = param.Integer(default=50, bounds=(1, None), label="N",
                          doc="Neuron and feature sweeps: how many of the most active on the prompt.")
    sae_dir = param.String(default="", label="SAE folder",
                           doc="Feature sweeps: an SAE in the SAELens layout; each feature is ablated to 0 "
                               "at every position, the SAE's error term kept.")
    start = param.Event(label="Start sweep")
    result = param.ClassSelector(class_=SweepResult, default=None, allow_None=True,
                                 doc="The sweep shown (partial while running or after a cancel).")
    hint = param.String(default="")

    def __init__(self, session: ModelSession, history: History | None = None,
                 on_pick: Callable[[str], None] | None = None, **params) -> None:
        super().__init__(**params)
        self.history = history
        self.on_pick = on_pick
        self.init_form(session)
        geom = geometry(session)
        self.param.top_n.bounds = (1, geom.n_layers * geom.d_mlp)
        self.job = JobPanel("run the sweep", "sweep", self._on_progress, self._on_finish)
        self._pane = pn.pane.Bokeh(None, css_classes=["ablation-sweep-chart"], sizing_mode="stretch_width")
        self._top = pn.pane.HTML("", css_classes=["ablation-sweep-top"], width=260, stylesheets=[SIDE_CSS],
                                 margin=(10, 10, 10, 20))
        self.param.watch(self._mark_stale, [*FORM_INPUTS, "kind", "method", "top_n", "sae_dir"])
        self._layout = self._build()

    def request(self) -> SweepRequest:
        return SweepRequest(prompt=self.prompt, target=self.target, kind=self.kind, mode=self.mode,
                            top_n=self.top_n, method=self.method, compare_token=self.compare_token or None,
                            sae=(self.sae_dir.strip() or None) if self.kind == "features" else None,
                            **self.replacement())

    def run(self, background: bool = True) -> Job | None:
        """Start a sweep for the current inputs (``background=False`` blocks: notebooks, tests)."""
        if self.job.running:
            return None
        try:
            request = self.request()
        except Exception as e:
            self.job.error = f"**Could not start the sweep:** {e}"
            return None
        self.stale = False
        return self.job.start(partial(guarded, engine.sweep, "sweep", self.session, request),
                              "Starting: the clean run…", background=background)

    def _on_progress(self, progress: Progress, result: SweepResult | None) -> None:
        if result is not None:
            self._show(result)
        unit = ac.UNITS[result.request.kind if result is not None else self.kind]
        self.job.status = progress_text(progress, unit)

    def _on_finish(self, job: Job) -> None:
        result: SweepResult = job.result
        self._show(result)
        unit = ac.UNITS[result.request.kind]
        prompt = shorten(result.request.prompt, 30)
        what = f"{result.request.kind} sweep ({result.request.method}, {result.request.mode})"
        if result.complete:
            label = f"{what}: {prompt}"
            top = result.top(1)
            status = (f"Done: {result.total} {unit} in {job.progress.elapsed:.1f} s"
                      + (f" · largest effect {top[0][0]} ({top[0][1]:+.3f})" if top else ""))
        else:
            label = f"{what}, cancelled at {result.done}/{result.total}: {prompt}"
            status = (f"Cancelled after {result.done}/{result.total} {unit}: the finished cells are kept "
                      "(grey = not done).")
        if self.history is not None:
            self.history.add(result, label)
        self.job.param.update(done=result.done, total=max(1, result.total), status=status, error="")

    def _show(self, result: SweepResult) -> None:
        """Build the figure, or update it in place for a newer result of the same sweep (on the loop)."""
        fig = self._pane.object
        if fig is None or fig.tags != [ac.sweep_key(result)]:
            fig = ac.sweep_chart(result)
            source = fig.select_one({"name": ac.SWEEP_SOURCE})
            source.selected.on_change("indices", self._tap(fig, source))
            self._pane.object = fig
            self.hint = ac.sweep_hint(result)
        else:
            ac.update_sweep_chart(fig, result)
            push(self._pane)
        self._top.object = ac.sweep_top_html(result)
        self.result = result

    def _tap(self, fig, source) -> Callable:
        def on_tap(attr, old, new) -> None:
            if new and self._pane.object is fig:  # ignore taps on a replaced figure
                spec = source.data["spec"][new[0]]
                if self.on_pick is not None:
                    self.on_pick(spec)
                self.hint = f"**{spec}** is now in the single-ablation field."

        return on_tap

    def _build(self) -> pn.viewable.Viewable:
        kind = pn.widgets.Select.from_param(self.param.kind, width=230, css_classes=["sweep-kind"])
        method = pn.widgets.Select.from_param(self.param.method, width=230, css_classes=["sweep-method"])
        top_n = pn.widgets.IntInput.from_param(self.param.top_n, width=100,
                                               visible=self.param.kind.rx().rx.in_(("neurons", "features")))
        sae = pn.widgets.TextInput.from_param(self.param.sae_dir, width=240, css_classes=["sweep-sae"],
                                              placeholder="e.g. runs/sae-l12",
                                              visible=self.param.kind.rx() == "features")
        hint = pn.pane.Markdown(self.param.hint, css_classes=["sweep-hint"], margin=(0, 10),
                                styles={"font-size": "12px", "color": "#555"}, visible=self.param.hint.rx.bool())
        return pn.Column(
            self.form_controls("sweep"),
            pn.FlexBox(kind, method, top_n, sae, *self.job.buttons(self.param.start, self.param.cancel),
                       align_items="flex-start", sizing_mode="stretch_width"),
            self.job.progress_row(), self.job.error_box(), stale_note(self.param.stale, "sweep-stale"), hint,
            pn.Row(self._pane, self._top, sizing_mode="stretch_width"),
            sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout
