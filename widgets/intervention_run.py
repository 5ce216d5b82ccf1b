"""The pronoun-swap tab's run part: the run settings, Start / Cancel / Resume, the live charts.

*Start* runs ``run_intervention`` as a job (a ``JobPanel``). The engine copies the model out of
the session under ``session.lock`` (a deep copy, well under a second) and then trains its own
two copies without the lock, so the other tabs keep using the model during a run. Every step's
partial result reaches the page's loop (throttled); the charts are built from the first one and
then only the new rows are streamed into their sources. *Cancel* stops after the current step
(both arms are checkpointed); *Resume* continues the shown run from its last checkpoint (with
the current *Steps*, so a finished run can also be extended). Runs live under ``runs_dir``, one
folder each.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.core.jobs import CANCELLED, Job, Progress
from explorer.persistence.history import History
from explorer.training.intervene import InterventionConfig, InterventionResult, run_intervention
from explorer.training.swap import SwapAudit

from . import intervention_charts as ic
from .parts import JobPanel, JobSection, guarded, help_text, push

FULL_SIZE = ("The full demo: `python -m explorer intervene --out DIR` (40 steps, evaluations every 10, "
             "checkpoints every 20; a few minutes on 2 CPU cores).")
SETTINGS = ("steps", "batch_size", "seq_len", "lr", "train", "eval_every", "checkpoint_every", "seed")


def next_step_text(config: InterventionConfig | None, done: int, total: int) -> str:
    """' · now: step 10, then evaluating both arms…' when the step under way ends in an evaluation
    (tens of seconds with nothing else to report), else ''."""
    if config is None or done >= total:
        return ""
    step = done + 1
    if step % config.eval_every == 0 or step == total:
        return f" · now: step {step}, then **evaluating** both arms…"
    return ""


def _run(config: InterventionConfig, out: Path, session, request, ctx) -> InterventionResult:
    return run_intervention(session, config, out_dir=out, ctx=ctx)


class RunPart(JobSection, pn.viewable.Viewer):
    """Train the two arms live: settings, Start / Cancel / Resume, progress and the run's charts."""

    steps = param.Integer(default=40, bounds=(1, None), label="Steps")
    batch_size = param.Integer(default=8, bounds=(1, None), label="Batch size")
    seq_len = param.Integer(default=64, bounds=(2, None), label="Sequence length")
    lr = param.Number(default=3e-4, bounds=(0, None), label="Learning rate")
    train = param.String(default="last:4", label="Train",
                         doc="'all', or 'last:N' (the last N blocks and the final norm).")
    eval_every = param.Integer(default=10, bounds=(1, None), label="Evaluate every")
    checkpoint_every = param.Integer(default=20, bounds=(1, None), label="Checkpoint every")
    seed = param.Integer(default=0, label="Seed")
    start = param.Event(label="Start run")
    resume = param.Event(label="Resume")
    result = param.ClassSelector(class_=InterventionResult, default=None, allow_None=True,
                                 doc="The run shown (partial while it runs).")
    effect = param.String(default="", doc="The effect line (markdown).")

    cancel_note = "Cancelling after the current step (both arms are checkpointed)…"

    def __init__(self, session, config: Callable[[], InterventionConfig], runs_dir: Path,
                 history: History | None = None, background: bool = True,
                 on_done: Callable[[str | None], None] | None = None,
                 on_audit: Callable[[SwapAudit], None] | None = None, **params) -> None:
        """``config()`` gives the checked settings (this part's over the view's); ``on_done(out_dir)``
        runs when a run ends (None: it failed), ``on_audit(audit)`` at a new run's first report."""
        super().__init__(**params)
        self.session, self._config, self.runs_dir, self.history = session, config, runs_dir, history
        self.background = background  # False: jobs run on the caller's thread (notebooks, tests)
        self._on_done, self._on_audit = on_done, on_audit
        self._run_config: InterventionConfig | None = None
        self.job = JobPanel("run the intervention", "swap", self._on_progress, self._on_finish,
                            start_label="Start run", on_fail=lambda job: self._done(None))
        self.job.status = "Preview the swap, choose settings, press **Start run**."
        self._figures: dict[str, Any] | None = None
        self._figures_key: str | None = None
        self._chart_panes = {key: pn.pane.Bokeh(None, css_classes=[ic.chart_name(key)], margin=(5, 10))
                             for key in ic.RUN_METRICS}
        self._effect_table = pn.pane.HTML("", css_classes=["swap-effect-table"], stylesheets=[ic.EFFECT_CSS],
                                          margin=(0, 10))
        self._layout = self._build()

    def fields(self) -> dict[str, Any]:
        """The run settings this part holds (``InterventionConfig`` fields)."""
        values = {name: getattr(self, name) for name in SETTINGS}
        return {**values, "lr": float(self.lr), "train": self.train.strip()}

    def show_config(self, config: InterventionConfig) -> None:
        """Put a run's settings into the fields (Resume continues it, Start repeats it)."""
        self.param.update(**{name: getattr(config, name) for name in SETTINGS})

    # ------------------------------------------------------------ the job
    def run(self) -> Job | None:
        return self.start_run()

    @param.depends("resume", watch=True)
    def _on_resume(self) -> None:
        self.resume_run()

    def _new_run_dir(self) -> Path:
        stamp = time.strftime("run-%Y%m%d-%H%M%S")
        path, n = self.runs_dir / stamp, 1
        while path.exists():
            n += 1
            path = self.runs_dir / f"{stamp}-{n}"
        return path

    def start_run(self, background: bool | None = None) -> Job | None:
        """Start a new run with the current settings in a new folder under ``runs_dir``."""
        if self.job.running:
            return None
        try:
            config = self._config()
        except ExplorerError as e:
            self.job.error = f"**Check the settings:** {e}"
            return None
        return self._launch(config, self._new_run_dir(), "Starting: copying the model, tokenising the corpus, "
                                                          "then evaluating the starting model…", background)

    def resume_run(self, background: bool | None = None) -> Job | None:
        """Continue the shown run from its last checkpoint (up to the current Steps)."""
        if self.job.running:
            return None
        if self.result is None:
            self.job.error = "**Nothing to resume:** open a run (or start one) first."
            return None
        config = replace(self.result.config, steps=max(self.steps, 1))
        return self._launch(config, Path(self.result.out_dir), "Resuming from the last checkpoint…", background)

    def _launch(self, config: InterventionConfig, out: Path, status: str, background: bool | None) -> Job | None:
        self._run_config = config  # what the next step does (evaluations) is said in the status line
        fn = partial(guarded, partial(_run, config, out), "intervention run", self.session, None)
        job = self.job.start(fn, status, background=self.background if background is None else background)
        if job is not None and self.job.running:  # a foreground job has finished already
            self.job.total = config.steps
        return job

    def cancel_run(self) -> None:
        self.job.cancel(self.cancel_note)

    def _on_progress(self, progress: Progress, partial_result: InterventionResult | None) -> None:
        if partial_result is not None:
            first = self._figures_key != partial_result.out_dir  # the run's first report: show its audit too
            self.show_result(partial_result)
            if first and self._on_audit is not None:
                self._on_audit(partial_result.audit)
        text = progress.message or f"step {progress.done}/{progress.total}"
        eta = progress.eta
        if eta is not None and progress.done < progress.total:
            text += f" · ~{eta:.0f} s left"
        self.job.status = text + next_step_text(self._run_config, progress.done, progress.total)

    def _on_finish(self, job: Job) -> None:
        result: InterventionResult = job.result
        self.show_result(result)
        name = Path(result.out_dir).name
        if result.status == "cancelled" or job.status == CANCELLED:
            status = (f"Cancelled at step {result.step}/{result.config.steps} ({name}); both arms are "
                      f"checkpointed: **Resume** continues from there.")
        else:
            status = f"Done: {result.step} steps in {job.progress.elapsed:.0f} s ({name})."
        if self.history is not None:
            self.history.add(result, f"pronoun swap run {name} ({result.status}, {result.step}/"
                                     f"{result.config.steps} steps)")
        self.job.param.update(status=status, error="", done=result.step, total=max(1, result.config.steps))
        self._done(result.out_dir)

    def _done(self, out_dir: str | None) -> None:
        if self._on_done is not None:
            self._on_done(out_dir)

    # ------------------------------------------------------------ drawing
    def show_result(self, result: InterventionResult) -> None:
        """Draw a run: new charts for another run, new rows streamed into the charts of the same one."""
        if self._figures is None or self._figures_key != result.out_dir:
            self._figures = ic.run_charts(result)
            self._figures_key = result.out_dir
            for key, pane in self._chart_panes.items():
                pane.object = self._figures[key]
        elif ic.update_run_charts(self._figures, result):
            for pane in self._chart_panes.values():
                push(pane)
        self._effect_table.object = ic.effect_table(result)
        self.param.update(result=result, effect=ic.effect_text(result))

    def _build(self) -> pn.viewable.Viewable:
        num = dict(width=120)
        settings = pn.FlexBox(
            pn.widgets.IntInput.from_param(self.param.steps, css_classes=["swap-steps"], **num),
            pn.widgets.IntInput.from_param(self.param.batch_size, **num),
            pn.widgets.IntInput.from_param(self.param.seq_len, **num),
            pn.widgets.FloatInput.from_param(self.param.lr, format="0.00000", step=1e-4, **num),
            pn.widgets.TextInput.from_param(self.param.train, css_classes=["swap-train"], **num),
            pn.widgets.IntInput.from_param(self.param.eval_every, css_classes=["swap-eval-every"], **num),
            pn.widgets.IntInput.from_param(self.param.checkpoint_every, **num),
            pn.widgets.IntInput.from_param(self.param.seed, **num),
            sizing_mode="stretch_width")
        resume = pn.widgets.Button.from_param(self.param.resume, width=100, height=36, margin=(26, 10, 10, 10),
                                              disabled=self.job.param.running.rx() | self.param.result.rx.is_(None),
                                              css_classes=["swap-resume"])
        effect = pn.pane.Markdown(self.param.effect, css_classes=["swap-effect"], margin=(0, 10),
                                  sizing_mode="stretch_width")
        # Rows of two, not a FlexBox: a FlexBox collapses Bokeh panes whose figure arrives later.
        panes = list(self._chart_panes.values())
        charts = pn.Column(*(pn.Row(*panes[i:i + 2]) for i in range(0, len(panes), 2)), sizing_mode="stretch_width")
        return pn.Column(
            pn.pane.Markdown("#### Run settings", margin=(10, 10, 0, 10)), settings,
            pn.Row(*self.job.buttons(self.param.start, self.param.cancel), resume, sizing_mode="stretch_width"),
            self.job.progress_row(), self.job.error_box(), effect, self._effect_table, charts,
            help_text(FULL_SIZE, "swap-full-size"), sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout
