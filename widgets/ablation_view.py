"""The ablation tab: ablate components, sweep every head / block / neuron, patch activations.

Three sections share one view. A single ablation is a forward pass of a few seconds, so it
runs with ``await asyncio.to_thread(...)`` as the lens view does. Sweeps and patching runs are
longer: each runs as a job through ``widgets.live.LiveJob``, whose throttled progress reports
(with the newest partial result) arrive on the page's event loop. There the heatmap is built
from the first partial and updated in place by the newer ones (Bokeh models change only on
the loop). Cancelling keeps the cells that finished. Every finished result, and a cancelled
partial one, goes into ``history``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any, Callable

import panel as pn
import param

from explorer.interventions.ablation import MODES, AblationRequest, AblationResult, SweepRequest, SweepResult, ablate, sweep
from explorer.core.components import SYNTAX, ComponentError, components_for, geometry
from explorer.core.errors import ExplorerError
from explorer.persistence.history import History
from explorer.core.jobs import FAILED, Job, JobContext, Progress
from explorer.interventions.patching import SITES, PatchRequest, PatchResult, patch
from explorer.core.session import ModelSession

from . import ablation_charts as ac
from .charts import shorten
from .live import LiveJob, QueuedRuns, served_doc

log = logging.getLogger(__name__)

COMPONENT_HELP = (
    "Comma-separated specs, counting from 0: **L.H** a head (3.1), **L:N** an MLP neuron (5:1024), "
    "**attn:L** / **mlp:L** a block's whole attention / MLP output, **block:L** a whole block "
    "(its output := its input). All listed components are ablated together.")

SWEEP_KINDS = {"every head": "heads", "every attention & MLP output": "blocks",
               "the N most active neurons": "neurons"}
SWEEP_METHODS = {"exact": "exact", "attribution (fast, approximate)": "attribution"}
MEAN_SOURCES = {"default corpus": "corpus", "my text": "text"}

SIDE_CSS = """
.caption { font-weight: 600; margin-bottom: 6px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 2px 10px 2px 0; text-align: right; }
th { color: #666; font-weight: normal; border-bottom: 1px solid #ddd; }
td.tok { text-align: left; font-family: ui-monospace, Menlo, Consolas, monospace; }
"""


def _count_text(label: str, n: int | None) -> str:
    return f"{label}: {'?' if n is None else n} token{'' if n == 1 else 's'}"


def progress_text(progress: Progress, unit: str) -> str:
    """'54/270 heads · 12.3 heads/s · ~18 s left' (rate and time left once something finished)."""
    text = f"{progress.done}/{progress.total} {unit}"
    if progress.done and progress.elapsed > 0:
        text += f" · {progress.done / progress.elapsed:.1f} {unit}/s"
    eta = progress.eta
    if eta is not None and progress.done < progress.total:
        text += f" · ~{eta:.0f} s left"
    return text


class AblationView(QueuedRuns, pn.viewable.Viewer):
    """Single ablations, ablation sweeps and activation patching for one ModelSession."""

    # ---- shared by the single ablation and the sweeps
    prompt = param.String(default="The capital of France is", label="Prompt",
                          doc="The prompt whose next-token prediction is measured (at its last position).")
    target = param.String(default=" Paris", label="Target token",
                          doc="The token whose logit, probability and rank are measured; '#1234' names a token id.")
    compare_token = param.String(default="", label="Compare token (optional)",
                                 doc="When given, the metric is logit(target) − logit(compare token).")
    mode = param.Selector(default="zero", objects=list(MODES), label="Mode",
                          doc="zero: set to 0; mean: the mean over a text; resample: the second prompt's activation.")
    mean_source = param.Selector(default="corpus", objects=MEAN_SOURCES, label="Mean over",
                                 doc="Mean mode: the text the mean activations are taken over.")
    mean_text = param.String(default="", label="Mean text", doc="Mean mode with 'my text': the text to average over.")
    second_prompt = param.String(default="", label="Second prompt (resample)",
                                 doc="Resample mode: activations come from this prompt (same token count).")
    # ---- single ablation
    components = param.String(default="", label="Components", doc=COMPONENT_HELP)
    run = param.Event(label="Run ablation", doc="Ablate the components and compare with the baseline.")
    # ---- sweeps
    sweep_kind = param.Selector(default="heads", objects=SWEEP_KINDS, label="Sweep over",
                                doc="Which components are ablated, one at a time.")
    sweep_method = param.Selector(default="exact", objects=SWEEP_METHODS, label="Method",
                                  doc="exact: one ablated run per component; attribution: a gradient estimate "
                                      "from one forward and one backward pass.")
    top_n = param.Integer(default=50, bounds=(1, None), label="N neurons",
                          doc="Neuron sweeps: how many of the most active neurons on the prompt.")
    sweep_start = param.Event(label="Start sweep")
    sweep_cancel = param.Event(label="Cancel")
    # ---- activation patching
    clean = param.String(default="The capital of France is", label="Clean prompt",
                         doc="Its activations are patched into the corrupted run.")
    corrupt = param.String(default="The capital of Italy is", label="Corrupted prompt",
                           doc="Must have the same number of tokens as the clean prompt.")
    patch_site = param.Selector(default="resid", objects=list(SITES), label="Site",
                                doc="resid: the residual stream after a block; attn / mlp: its attention / MLP output.")
    patch_target = param.String(default=" Paris", label="Target token", doc="The clean answer.")
    patch_compare = param.String(default="", label="Compare token (optional)",
                                 doc="e.g. the corrupted answer: the metric is then the logit difference.")
    patch_start = param.Event(label="Run patching")
    patch_cancel = param.Event(label="Cancel")

    # ---- results and state
    result = param.ClassSelector(class_=AblationResult, default=None, allow_None=True,
                                 doc="The single ablation shown.")
    sweep_result = param.ClassSelector(class_=SweepResult, default=None, allow_None=True,
                                       doc="The sweep shown (partial while running or after a cancel).")
    patch_result = param.ClassSelector(class_=PatchResult, default=None, allow_None=True,
                                       doc="The patching run shown (partial while running or after a cancel).")
    status = param.String(default="Type components and press **Run ablation**.")
    error = param.String(default="", doc="Single ablation: the last error; empty when none.")
    busy = param.Boolean(default=False, doc="True while a single ablation runs.")
    sweep_status = param.String(default="")
    sweep_error = param.String(default="")
    sweep_running = param.Boolean(default=False)
    sweep_done = param.Integer(default=0)
    sweep_total = param.Integer(default=1)
    sweep_hint = param.String(default="Click a cell to put that component into the single-ablation field.")
    patch_status = param.String(default="")
    patch_error = param.String(default="")
    patch_running = param.Boolean(default=False)
    patch_done = param.Integer(default=0)
    patch_total = param.Integer(default=1)
    patch_counts = param.String(default="", doc="Live token counts of the clean and corrupted prompts.")
    resample_counts = param.String(default="", doc="Live token counts of the prompt and the second prompt.")

    def __init__(self, session: ModelSession, history: History | None = None, **params) -> None:
        super().__init__(**params)
        self.session = session
        self.history = history
        geom = geometry(session)
        self.param.top_n.bounds = (1, geom.n_layers * geom.d_mlp)
        self._sweep_job = LiveJob(self._on_sweep_progress, self._on_sweep_finish)
        self._patch_job = LiveJob(self._on_patch_progress, self._on_patch_finish)
        # Bokeh panes stay visible (empty until a result comes): see lens_view for why.
        self._card = pn.pane.HTML("", css_classes=["ablation-card"], width=430, stylesheets=[ac.CARD_CSS],
                                  margin=(5, 20, 5, 10))
        self._target_pair = pn.pane.Bokeh(None, css_classes=["ablation-target-pair"], sizing_mode="stretch_width")
        self._lens_baseline = pn.pane.Bokeh(None, css_classes=["ablation-lens-baseline"],
                                            sizing_mode="stretch_width")
        self._lens_ablated = pn.pane.Bokeh(None, css_classes=["ablation-lens-ablated"],
                                           sizing_mode="stretch_width")
        self._sweep_pane = pn.pane.Bokeh(None, css_classes=["ablation-sweep-chart"], sizing_mode="stretch_width")
        self._sweep_top = pn.pane.HTML("", css_classes=["ablation-sweep-top"], width=260, stylesheets=[SIDE_CSS],
                                       margin=(10, 10, 10, 20))
        self._patch_pane = pn.pane.Bokeh(None, css_classes=["ablation-patch-chart"], sizing_mode="stretch_width")
        # Progress bars are set from params by watchers, never by refs: a bar refuses value > max,
        # and refs may apply a new value before the new max.
        self._sweep_bar = pn.indicators.Progress(value=0, max=1, width=260, margin=(14, 10, 4, 10),
                                                 css_classes=["sweep-progress"])
        self._patch_bar = pn.indicators.Progress(value=0, max=1, width=260, margin=(14, 10, 4, 10),
                                                 css_classes=["patch-progress"])
        self._update_patch_counts()
        self._update_resample_counts()
        self._sections = self._build_sections()
        self._layout = pn.Column(self._sections, sizing_mode="stretch_width", css_classes=["ablation-view"])

    # ============================================================ public API
    def select_components(self, specs: list[str], show: bool = True) -> None:
        """Put components (specs such as '3.1', '5:1024') into the single-ablation field.

        With ``show`` the single-ablation section is brought to the front. A spec that does
        not exist in the model is reported in the view's error line (the field keeps it).
        """
        specs = [s.strip() for s in specs if s and s.strip()]
        self.components = ", ".join(specs)
        try:
            components_for(self.session, specs)
            self.error = ""
        except ComponentError as e:
            self.error = f"**Check the components:** {e}"
        if show:
            self._sections.active = 0

    # ========================================================= single ablation
    @param.depends("run", watch=True)
    async def _on_run(self) -> None:
        await self.compute()

    def _replacement(self) -> dict[str, Any]:
        """mean_text / second_prompt of a request for the current mode (checked)."""
        if self.mode == "mean" and self.mean_source == "text":
            if not self.mean_text.strip():
                raise ExplorerError("the mean text is empty: type a text to average over, or pick the default corpus")
            return {"mean_text": self.mean_text, "second_prompt": None}
        if self.mode == "resample":
            return {"mean_text": None, "second_prompt": self.second_prompt}
        return {"mean_text": None, "second_prompt": None}

    def ablation_request(self) -> AblationRequest:
        if not self.components.strip():
            raise ComponentError(f"no components given: {SYNTAX}")
        return AblationRequest(prompt=self.prompt, target=self.target, components=self.components,
                               mode=self.mode, compare_token=self.compare_token or None, **self._replacement())

    async def _compute_once(self) -> None:
        started = time.perf_counter()
        try:
            request = self.ablation_request()
            result = await asyncio.to_thread(ablate, self.session, request)
            self._publish(result, time.perf_counter() - started)
        except ExplorerError as e:  # bad input: say what to do, keep the previous result
            self.error = f"**Could not run the ablation:** {e}"
        except Exception as e:  # a bug or a broken model: tell the user, log the traceback
            log.exception("ablation failed")
            self.error = f"**Unexpected error** ({type(e).__name__}: {e}). Details are in the server log."

    def _publish(self, result: AblationResult, seconds: float) -> None:
        if self.history is not None:
            self.history.add(result, f"ablation {', '.join(result.components)} ({result.request.mode}): "
                                     f"{shorten(result.request.prompt, 30)}")
        effect = result.metric_effect
        what = "logit diff" if result.baseline.logit_diff is not None else "logit"
        self.param.update(result=result, error="", status=(
            f"**{result.model}** · ablated {', '.join(result.components)} ({result.request.mode}) · "
            f"{what} {effect:+.3f} · p {result.baseline.prob:.3f} → {result.ablated.prob:.3f} · {seconds:.2f} s"))

    @param.depends("result", watch=True)
    def _update_single(self) -> None:
        result = self.result
        if result is None:
            return
        self._card.object = ac.ablation_card(result)
        if result.lens_baseline is not None and result.lens_ablated is not None:
            base, abl = ac.lens_pair(result)
            self._lens_baseline.object = base
            self._lens_ablated.object = abl
            self._target_pair.object = ac.target_pair(result)

    # =================================================================== sweeps
    def sweep_request(self) -> SweepRequest:
        return SweepRequest(prompt=self.prompt, target=self.target, kind=self.sweep_kind, mode=self.mode,
                            top_n=self.top_n, method=self.sweep_method,
                            compare_token=self.compare_token or None, **self._replacement())

    @param.depends("sweep_start", watch=True)
    def _on_sweep_start(self) -> None:
        self.start_sweep()

    @param.depends("sweep_cancel", watch=True)
    def _on_sweep_cancel(self) -> None:
        self.cancel_sweep()

    def start_sweep(self, background: bool = True) -> Job | None:
        """Start a sweep for the current parameters (``background=False`` blocks: notebooks, tests)."""
        if self._sweep_job.running:
            return None
        try:
            request = self.sweep_request()
        except ExplorerError as e:
            self.sweep_error = f"**Could not start the sweep:** {e}"
            return None
        self.param.update(sweep_running=True, sweep_error="", sweep_done=0, sweep_total=1,
                          sweep_status="Starting: the clean run…")
        return self._sweep_job.start(partial(_guarded, sweep, self.session, request, "sweep"),
                                     name="sweep", background=background)

    def cancel_sweep(self) -> None:
        if self._sweep_job.running:
            self.sweep_status = "Cancelling after the current batch…"
        self._sweep_job.cancel()

    def _unit(self, result: SweepResult | None = None) -> str:
        kind = result.request.kind if result is not None else self.sweep_kind
        return ac.UNITS[kind]

    def _on_sweep_progress(self, progress: Progress, result: SweepResult | None) -> None:
        if result is not None:
            self._show_sweep(result)
        self.param.update(sweep_done=progress.done, sweep_total=max(1, progress.total),
                          sweep_status=progress_text(progress, self._unit(result)))

    def _on_sweep_finish(self, job: Job) -> None:
        self.sweep_running = False
        if job.status == FAILED:
            self.param.update(sweep_error=f"**Could not run the sweep:** {job.error}", sweep_status="Failed.")
            return
        result: SweepResult = job.result
        self._show_sweep(result)
        unit = self._unit(result)
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
        self.param.update(sweep_done=result.done, sweep_total=max(1, result.total), sweep_status=status,
                          sweep_error="")

    def _show_sweep(self, result: SweepResult) -> None:
        """Build the sweep's figure, or update it in place for a newer result of the same sweep.

        Runs on the page's loop (LiveJob hands progress there) or without a served document.
        """
        fig = self._sweep_pane.object
        if fig is None or fig.tags != [ac.sweep_key(result)]:
            fig = ac.sweep_chart(result)
            source = fig.select_one({"name": ac.SWEEP_SOURCE})
            source.selected.on_change("indices", self._sweep_tap(fig, source))
            self._sweep_pane.object = fig
        else:
            ac.update_sweep_chart(fig, result)
            _push(self._sweep_pane)
        self._sweep_top.object = ac.sweep_top_html(result)
        self.sweep_result = result

    def _sweep_tap(self, fig, source) -> Callable:
        def on_tap(attr, old, new) -> None:
            if new and self._sweep_pane.object is fig:  # ignore taps on a replaced figure
                spec = source.data["spec"][new[0]]
                self.select_components([spec], show=False)
                self.sweep_hint = f"**{spec}** is now in the single-ablation field."

        return on_tap

    # ================================================================= patching
    def patch_request(self) -> PatchRequest:
        return PatchRequest(clean=self.clean, corrupt=self.corrupt, target=self.patch_target,
                            site=self.patch_site, compare_token=self.patch_compare or None)

    @param.depends("patch_start", watch=True)
    def _on_patch_start(self) -> None:
        self.start_patch()

    @param.depends("patch_cancel", watch=True)
    def _on_patch_cancel(self) -> None:
        self.cancel_patch()

    def start_patch(self, background: bool = True) -> Job | None:
        """Start a patching run for the current parameters (``background=False`` blocks)."""
        if self._patch_job.running:
            return None
        self.param.update(patch_running=True, patch_error="", patch_done=0, patch_total=1,
                          patch_status="Starting: the clean and corrupted runs…")
        return self._patch_job.start(partial(_guarded, patch, self.session, self.patch_request(), "patching"),
                                     name="patching", background=background)

    def cancel_patch(self) -> None:
        if self._patch_job.running:
            self.patch_status = "Cancelling after the current batch…"
        self._patch_job.cancel()

    def _on_patch_progress(self, progress: Progress, result: PatchResult | None) -> None:
        if result is not None:
            self._show_patch(result)
        self.param.update(patch_done=progress.done, patch_total=max(1, progress.total),
                          patch_status=progress_text(progress, "cells"))

    def _on_patch_finish(self, job: Job) -> None:
        self.patch_running = False
        if job.status == FAILED:
            self.param.update(patch_error=f"**Could not run patching:** {job.error}", patch_status="Failed.")
            return
        result: PatchResult = job.result
        self._show_patch(result)
        what = (f"patching ({result.site}): {shorten(result.request.clean, 30)} → "
                f"{shorten(result.request.corrupt, 30)}")
        if result.complete:
            status = f"Done: {result.total} cells in {job.progress.elapsed:.1f} s"
        else:
            what = f"{what} (cancelled at {result.done}/{result.total})"
            status = f"Cancelled after {result.done}/{result.total} cells: the finished cells are kept."
        if self.history is not None:
            self.history.add(result, what)
        self.param.update(patch_done=result.done, patch_total=max(1, result.total), patch_status=status,
                          patch_error="")

    def _show_patch(self, result: PatchResult) -> None:
        fig = self._patch_pane.object
        if fig is None or fig.tags != [ac.patch_key(result)]:
            self._patch_pane.object = ac.patch_chart(result)
        else:
            ac.update_patch_chart(fig, result)
            _push(self._patch_pane)
        self.patch_result = result

    @param.depends("sweep_done", "sweep_total", watch=True)
    def _update_sweep_bar(self) -> None:
        _set_bar(self._sweep_bar, self.sweep_done, self.sweep_total)

    @param.depends("patch_done", "patch_total", watch=True)
    def _update_patch_bar(self) -> None:
        _set_bar(self._patch_bar, self.patch_done, self.patch_total)

    # ============================================================ token counts
    def _count(self, text: str) -> int | None:
        """Tokens the engine will see (0 for an empty text, None when it cannot be encoded)."""
        if not text or not text.strip():
            return 0
        try:
            return int(self.session.encode(text).numel())
        except ExplorerError:
            return None

    @param.depends("clean", "corrupt", watch=True)
    def _update_patch_counts(self) -> None:
        a, b = self._count(self.clean), self._count(self.corrupt)
        text = f"{_count_text('clean', a)} · {_count_text('corrupted', b)}"
        if a and b:
            text += " · equal ✓" if a == b else " · **they differ**: patching needs equal token lengths"
        self.patch_counts = text

    @param.depends("prompt", "second_prompt", "mode", watch=True)
    def _update_resample_counts(self) -> None:
        if self.mode != "resample":
            self.resample_counts = ""
            return
        a, b = self._count(self.prompt), self._count(self.second_prompt)
        text = f"{_count_text('prompt', a)} · {_count_text('second prompt', b)}"
        if a and b:
            text += " · equal ✓" if a == b else " · **they differ**: resampling needs equal token lengths"
        self.resample_counts = text

    # ================================================================== layout
    def _text(self, p: param.Parameter, css: str, area: bool = False, **kw) -> pn.widgets.Widget:
        """A text field bound to a parameter, updated on every key press (live token counts)."""
        cls = pn.widgets.TextAreaInput if area else pn.widgets.TextInput
        extra = dict(rows=2, auto_grow=True, max_rows=6) if area else {}
        return cls.from_param(p, onkeyup=True, css_classes=[css], **extra, **kw)

    def _prompt_controls(self, prefix: str) -> pn.Column:
        """Prompt, target, compare token and the ablation mode (one set per section, same params)."""
        prompt = self._text(self.param.prompt, f"{prefix}-prompt", area=True, sizing_mode="stretch_width",
                            placeholder="e.g. The capital of France is")
        target = self._text(self.param.target, f"{prefix}-target", width=150, placeholder="e.g. ' Paris'")
        compare = self._text(self.param.compare_token, f"{prefix}-compare", width=170, placeholder="optional")
        mode = pn.widgets.RadioButtonGroup.from_param(self.param.mode, css_classes=[f"{prefix}-mode"],
                                                      margin=(26, 10, 10, 10))
        is_mean = self.param.mode.rx() == "mean"
        mean_source = pn.widgets.Select.from_param(self.param.mean_source, width=150)
        mean_text = self._text(self.param.mean_text, f"{prefix}-mean-text", area=True, sizing_mode="stretch_width",
                               placeholder="A text to average activations over",
                               visible=is_mean & (self.param.mean_source.rx() == "text"))
        is_resample = self.param.mode.rx() == "resample"
        second = self._text(self.param.second_prompt, f"{prefix}-second-prompt", sizing_mode="stretch_width",
                            placeholder="Same number of tokens, e.g. The capital of Italy is")
        counts = pn.pane.Markdown(self.param.resample_counts, css_classes=[f"{prefix}-resample-counts"],
                                  margin=(0, 10))
        return pn.Column(
            pn.Row(prompt, target, compare, mode, sizing_mode="stretch_width"),
            pn.Row(mean_source, mean_text, visible=is_mean, sizing_mode="stretch_width"),
            pn.Column(second, counts, visible=is_resample, sizing_mode="stretch_width"),
            sizing_mode="stretch_width")

    def _build_single(self) -> pn.viewable.Viewable:
        components = self._text(self.param.components, "ablation-components", sizing_mode="stretch_width",
                                placeholder="e.g. 3.1, 5:1024, mlp:2")
        run = pn.widgets.Button.from_param(self.param.run, color="primary", width=140, height=36,
                                           margin=(26, 10, 10, 10), disabled=self.param.busy,
                                           css_classes=["ablation-run"])
        help_text = pn.pane.Markdown(COMPONENT_HELP, css_classes=["ablation-help"], margin=(0, 10),
                                     styles={"font-size": "12px", "color": "#555"}, sizing_mode="stretch_width")
        error = pn.pane.Alert(self.param.error, alert_type="danger", css_classes=["ablation-error"],
                              visible=self.param.error.rx.bool(), sizing_mode="stretch_width")
        status = pn.pane.Markdown(self.param.status, css_classes=["ablation-status"], margin=(0, 10),
                                  sizing_mode="stretch_width")
        lenses = pn.Row(self._lens_baseline, self._lens_ablated, sizing_mode="stretch_width", scroll="x-auto")
        results = pn.Column(status, pn.Row(self._card, self._target_pair, sizing_mode="stretch_width"), lenses,
                            sizing_mode="stretch_width", loading=self.param.busy, css_classes=["ablation-results"])
        return pn.Column(self._prompt_controls("ablation"),
                         pn.Row(components, run, sizing_mode="stretch_width"), help_text, error, results,
                         sizing_mode="stretch_width")

    def _build_sweep(self) -> pn.viewable.Viewable:
        kind = pn.widgets.Select.from_param(self.param.sweep_kind, width=230, css_classes=["sweep-kind"])
        method = pn.widgets.Select.from_param(self.param.sweep_method, width=230, css_classes=["sweep-method"])
        top_n = pn.widgets.IntInput.from_param(self.param.top_n, width=100,
                                               visible=self.param.sweep_kind.rx() == "neurons")
        start = pn.widgets.Button.from_param(self.param.sweep_start, color="primary", width=120, height=36,
                                             margin=(26, 10, 10, 10), disabled=self.param.sweep_running,
                                             css_classes=["sweep-start"])
        cancel = pn.widgets.Button.from_param(self.param.sweep_cancel, width=100, height=36,
                                              margin=(26, 10, 10, 10), disabled=self.param.sweep_running.rx.not_(),
                                              css_classes=["sweep-cancel"])
        bar = self._sweep_bar
        status = pn.pane.Markdown(self.param.sweep_status, css_classes=["sweep-status"], margin=(4, 10),
                                  sizing_mode="stretch_width")
        error = pn.pane.Alert(self.param.sweep_error, alert_type="danger", css_classes=["sweep-error"],
                              visible=self.param.sweep_error.rx.bool(), sizing_mode="stretch_width")
        hint = pn.pane.Markdown(self.param.sweep_hint, css_classes=["sweep-hint"], margin=(0, 10),
                                styles={"font-size": "12px", "color": "#555"},
                                visible=self.param.sweep_result.rx.is_not(None))
        return pn.Column(
            self._prompt_controls("sweep"),
            pn.FlexBox(kind, method, top_n, start, cancel, align_items="flex-start", sizing_mode="stretch_width"),
            pn.Row(bar, status, sizing_mode="stretch_width"),
            error, hint,
            pn.Row(self._sweep_pane, self._sweep_top, sizing_mode="stretch_width"),
            sizing_mode="stretch_width")

    def _build_patch(self) -> pn.viewable.Viewable:
        clean = self._text(self.param.clean, "patch-clean", sizing_mode="stretch_width")
        corrupt = self._text(self.param.corrupt, "patch-corrupt", sizing_mode="stretch_width")
        counts = pn.pane.Markdown(self.param.patch_counts, css_classes=["patch-counts"], margin=(0, 10))
        target = self._text(self.param.patch_target, "patch-target", width=150)
        compare = self._text(self.param.patch_compare, "patch-compare", width=170, placeholder="e.g. ' Rome'")
        site = pn.widgets.RadioButtonGroup.from_param(self.param.patch_site, css_classes=["patch-site"],
                                                      margin=(26, 10, 10, 10))
        start = pn.widgets.Button.from_param(self.param.patch_start, color="primary", width=130, height=36,
                                             margin=(26, 10, 10, 10), disabled=self.param.patch_running,
                                             css_classes=["patch-start"])
        cancel = pn.widgets.Button.from_param(self.param.patch_cancel, width=100, height=36,
                                              margin=(26, 10, 10, 10), disabled=self.param.patch_running.rx.not_(),
                                              css_classes=["patch-cancel"])
        bar = self._patch_bar
        status = pn.pane.Markdown(self.param.patch_status, css_classes=["patch-status"], margin=(4, 10),
                                  sizing_mode="stretch_width")
        error = pn.pane.Alert(self.param.patch_error, alert_type="danger", css_classes=["patch-error"],
                              visible=self.param.patch_error.rx.bool(), sizing_mode="stretch_width")
        return pn.Column(
            pn.Row(clean, corrupt, sizing_mode="stretch_width"), counts,
            pn.FlexBox(target, compare, site, start, cancel, align_items="flex-start", sizing_mode="stretch_width"),
            pn.Row(bar, status, sizing_mode="stretch_width"),
            error,
            pn.Column(self._patch_pane, scroll="x-auto", sizing_mode="stretch_width"),
            sizing_mode="stretch_width")

    def _build_sections(self) -> pn.Tabs:
        return pn.Tabs(
            ("Single ablation", self._build_single()),
            ("Sweep", self._build_sweep()),
            ("Activation patching", self._build_patch()),
            sizing_mode="stretch_width", css_classes=["ablation-sections"],
        )

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout


def _guarded(fn: Callable, session: ModelSession, request: Any, what: str, ctx: JobContext) -> Any:
    """Run an engine job; an unexpected error is logged and reaches the user as an ExplorerError."""
    try:
        return fn(session, request, ctx=ctx)
    except ExplorerError:
        raise
    except Exception as e:
        log.exception("%s failed", what)
        raise ExplorerError(f"unexpected error ({type(e).__name__}: {e}); details are in the server log") from e


def _set_bar(bar: pn.indicators.Progress, done: int, total: int) -> None:
    """Move a progress bar without ever asking for value > max on the way."""
    total = max(1, total)
    done = min(max(0, done), total)
    if total >= bar.max:
        bar.max = total
        bar.value = done
    else:
        bar.value = done
        bar.max = total


def _push(pane: pn.pane.Bokeh) -> None:
    """In a notebook (no served document) in-place Bokeh changes must be pushed explicitly."""
    if served_doc() is None:
        pn.io.push_notebook(pane)
