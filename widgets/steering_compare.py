"""The Steering tab's comparison with the pronoun swap (a part of ``SteeringView``).

Pick a pronoun-swap run (a folder typed in, a run found under the app's runs folder, or the run
of this session's Pronoun swap tab, which the app shell hands over as ``session_run``), a layer
and α values, and **Compare**: the swap run's bias probes and held-out loss are scored under
steering at each α and with the direction ablated, on the run's own probe set and held-out
windows (``explorer.training.steer_compare``), as a job whose chart fills in setting by setting,
with the run's control and swapped arms on the same axes. The direction is the gender direction
of the swap's word pairs, or the tab's current vector.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.core.session import ModelSession
from explorer.interventions.steering import SteeringVector, parse_alphas
from explorer.persistence.history import History
from explorer.training.intervene import default_runs_dir, list_runs
from explorer.training.steer_compare import SteerCompareRequest, SteerCompareResult, steering_vs_swap

from . import steering_charts as sc
from .live import LiveJob
from .parts import alert

NO_RUN = "(no run: steering and ablation only)"
SESSION_RUN = "this session's Pronoun swap run"


class SteerComparePart(pn.viewable.Viewer):
    """Steering and direction ablation beside a pronoun-swap run's arms, on one ModelSession."""

    run_choice = param.Selector(default=NO_RUN, objects=[NO_RUN], label="Swap run")
    run_dir = param.String(default="", label="or a run folder", doc="A folder made by `intervene --out DIR`.")
    session_run = param.String(default="", doc="The Pronoun swap tab's current run folder (set by the app).")
    layer = param.Integer(default=None, allow_None=True, label="Layer")
    alphas = param.String(default="-2,-1,0,1,2", label="α values")
    use_vector = param.Boolean(default=False, label="Use the current vector (not the gender direction)")
    ablate = param.Boolean(default=True, label="Also ablate the direction")
    compare = param.Event(label="Compare")
    refresh = param.Event(label="↻")
    cancel = param.Event(label="Stop")

    result = param.ClassSelector(class_=SteerCompareResult, default=None, allow_None=True)
    running = param.Boolean(default=False)
    status = param.String(default="Compare steering with a pronoun-swap run's control and swapped arms.")
    error = param.String(default="")

    def __init__(self, session: ModelSession, history: History | None = None,
                 vector: Callable[[], SteeringVector | None] = lambda: None,
                 runs_root: str | Path | None = None, **params) -> None:
        params.setdefault("layer", session.n_layers // 3)
        super().__init__(**params)
        self.session = session
        self.history = history
        self._vector = vector
        self._runs_root = Path(runs_root) if runs_root is not None else default_runs_dir()
        self._runs: dict[str, str] = {}
        self._live = LiveJob(self._on_progress, self._on_finish)
        self._chart = pn.pane.Bokeh(None, css_classes=["steer-compare-chart"])
        self._table = pn.pane.HTML("", css_classes=["steer-compare-table"], stylesheets=[sc.TABLE_CSS])
        self.refresh_runs()
        self._layout = self._build_layout()

    # ----------------------------------------------------------------------- runs
    def refresh_runs(self) -> None:
        """List the runs under the runs folder (and this session's run) in the picker."""
        try:
            found = {f"{Path(r.out_dir).name} ({r.status}, {r.step} steps)": r.out_dir
                     for r in list_runs(self._runs_root)}
        except ExplorerError:
            found = {}
        if self.session_run:
            found = {SESSION_RUN: self.session_run, **found}
        self._runs = found
        options = [NO_RUN] + list(found)
        current = self.run_choice if self.run_choice in options else NO_RUN
        self.param.run_choice.objects = options
        self.run_choice = current

    @param.depends("refresh", watch=True)
    def _on_refresh(self) -> None:
        self.refresh_runs()

    @param.depends("session_run", watch=True)
    def _on_session_run(self) -> None:
        self.refresh_runs()

    def chosen_run(self) -> str:
        """The run folder compared against ('' = none): the typed folder wins over the picker."""
        if self.run_dir.strip():
            return self.run_dir.strip()
        return self._runs.get(self.run_choice, "")

    # ---------------------------------------------------------------------- compare
    def request(self) -> SteerCompareRequest:
        vector = None
        if self.use_vector:
            vector = self._vector()
            if vector is None:
                raise ExplorerError("build or load a vector first, or untick 'Use the current vector'")
        return SteerCompareRequest(run=self.chosen_run(), layer=self.layer, alphas=parse_alphas(self.alphas),
                                   ablate=self.ablate, vector=vector)

    @param.depends("compare", watch=True)
    def _on_compare(self) -> None:
        self.start()

    @param.depends("cancel", watch=True)
    def _on_cancel(self) -> None:
        self._live.cancel()

    def close(self) -> None:
        self._live.cancel()

    def start(self, background: bool = True) -> None:
        request = self._live.begin(self.request, self)
        if request is None:
            return
        self.param.update(error="", running=True, result=None, status="Scoring the probes under each setting…")
        self._live.start(lambda ctx: steering_vs_swap(self.session, request, ctx=ctx), name="steer-compare",
                         background=background)

    def _on_progress(self, progress, partial) -> None:
        if partial is not None:
            self.result = partial
        self.status = f"Comparing… {progress.done} / {progress.total} ({progress.message})"

    def _on_finish(self, job) -> None:
        if self._live.failed(job, self, "**The comparison failed:** {}"):
            return
        r = job.result
        if r is not None:
            self.result = r
            if self.history is not None and r.complete:
                self.history.add(r, f"steering vs swap L{r.layer}" + (f" ({Path(r.run).name})" if r.run else ""))
            self.status = f"Done: {r.done} of {r.total} settings." + (f" Note: {r.note}." if r.note else "")

    @param.depends("result", watch=True)
    def _update(self) -> None:
        r = self.result
        self._chart.object = None if r is None else sc.compare_chart(r)
        self._table.object = "" if r is None else sc.compare_html(r)

    # ----------------------------------------------------------------------- layout
    def _build_layout(self) -> pn.viewable.Viewable:
        w = pn.widgets
        # Two rows: in one, the run pickers and the settings overflowed a 1600-px window.
        runs = pn.Row(
            w.Select.from_param(self.param.run_choice, width=260, css_classes=["steer-compare-run"]),
            w.Button.from_param(self.param.refresh, width=40, align="end"),
            w.TextInput.from_param(self.param.run_dir, width=220, placeholder="e.g. runs/demo",
                                   css_classes=["steer-compare-dir"]))
        row = pn.Row(
            w.IntInput.from_param(self.param.layer, width=80),
            w.TextInput.from_param(self.param.alphas, width=150, css_classes=["steer-compare-alphas"]),
            pn.Column(w.Checkbox.from_param(self.param.use_vector), w.Checkbox.from_param(self.param.ablate)),
            w.Button.from_param(self.param.compare, color="primary", width=100, disabled=self.param.running,
                                css_classes=["steer-compare-button"], align="end"),
            w.Button.from_param(self.param.cancel, width=70, disabled=self.param.running.rx.not_(), align="end"))
        error = alert(self.param.error, "steer-compare-error")
        return pn.Column(pn.pane.Markdown("#### Steering vs the pronoun swap"), runs, row, error,
                         pn.pane.Markdown(self.param.status, css_classes=["steer-compare-status"]),
                         pn.Row(self._chart, self._table), css_classes=["steer-compare"])

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout
