"""The pronoun-swap tab: preview a corpus swap, run the two-arm intervention live, compare checkpoints.

Three parts share one view:
- **Corpus and swap audit.** The corpus (the default news corpus, or a path) and the swap
  direction; *Preview swap* runs ``corpus_audit`` (tokenising both arms' text, a second or so,
  ``asyncio.to_thread``) and shows the counts per word pair, the token counts before → after and
  sample changes, before any training starts. A bad corpus is a visible error; what was shown
  stays.
- **The run.** Settings from ``InterventionConfig`` (the demo's defaults); *Start* runs
  ``run_intervention`` as a job through ``widgets.live.LiveJob``. The engine copies the model
  out of the session under ``session.lock`` (a deep copy, well under a second) and then trains
  its own two copies without the lock, so the other tabs keep using the model during a run.
  Every step's partial result reaches the page's loop (throttled); the charts are built from
  the first one and then only the new rows are streamed into their sources. *Cancel* stops
  after the current step (both arms are checkpointed); *Resume* continues the shown run from
  its last checkpoint (with the current *Steps*, so a finished run can also be extended).
  Runs live under ``runs_dir`` (default ``explorer.training.intervene.default_runs_dir()``), one folder
  each, and are listed and reopenable (``load_run``). Every finished or cancelled run, and
  every reopened one, goes into ``history``.
- **Across checkpoints.** Checkpoints of a run and/or typed model directories (e.g. Pythia
  revisions), a prompt and target token: ``compare_checkpoints`` as a job; a bias metric
  (± SE) across them (a line per arm for a run's checkpoints) and the lens target probability
  per layer for each checkpoint. The comparison goes into ``history``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.core.jobs import CANCELLED, FAILED, Job, JobContext, Progress
from explorer.persistence.history import History
from explorer.training.intervene import (
    InterventionConfig,
    InterventionResult,
    corpus_audit,
    default_runs_dir,
    list_runs,
    load_run,
    run_intervention,
)
from explorer.training.swap import SwapAudit

from . import intervention_charts as ic
from .checkpoints_view import CheckpointsPart
from .live import LiveJob
from .parts import alert, push, set_bar

log = logging.getLogger(__name__)

DIRECTIONS = {"masculine → feminine": "m2f", "feminine → masculine": "f2m"}
CORPUS_HELP = ("Empty: the default news corpus (300 articles). Or a path: plain text (.txt, one document per "
               "line or paragraph), JSONL or parquet with a text field, or a folder saved by `datasets`.")
FULL_SIZE = ("The full demo: `python -m explorer intervene --out DIR` (40 steps, evaluations every 10, "
             "checkpoints every 20; a few minutes on 2 CPU cores).")


def run_label(result: InterventionResult) -> str:
    """'run-20260101-120000 · done · 40/40 steps · m2f · SmolLM2-135M-Instruct'."""
    return (f"{Path(result.out_dir).name} · {result.status} · {result.step}/{result.config.steps} steps · "
            f"{result.config.direction} · {result.model}")


def next_step_text(config: InterventionConfig | None, done: int, total: int) -> str:
    """' · now: step 10, then evaluating both arms…' when the step under way ends in an evaluation
    (tens of seconds with nothing else to report), else ''."""
    if config is None or done >= total:
        return ""
    step = done + 1
    if step % config.eval_every == 0 or step == total:
        return f" · now: step {step}, then **evaluating** both arms…"
    return ""


class InterventionView(CheckpointsPart, pn.viewable.Viewer):
    """The pronoun-swap intervention for one model (a ModelSession, or the embedded default)."""

    # ---- corpus and swap
    corpus = param.String(default="", label="Corpus (empty: default news corpus)", doc=CORPUS_HELP)
    text_mode = param.Selector(default="lines", objects=["lines", "paragraphs"], label="Text: one document per",
                               doc="Plain-text corpora: a document per line, or per blank-line-separated paragraph.")
    direction = param.Selector(default="m2f", objects=DIRECTIONS, label="Swapped arm",
                               doc="The swap the swapped arm's text gets; the control arm trains on the original.")
    preview = param.Event(label="Preview swap", doc="Audit the swap of the training documents (no training).")
    audit = param.ClassSelector(class_=SwapAudit, default=None, allow_None=True, doc="The swap audit shown.")
    audit_busy = param.Boolean(default=False)
    audit_error = param.String(default="")
    # ---- run settings (InterventionConfig)
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
    cancel = param.Event(label="Cancel")
    resume = param.Event(label="Resume")
    # ---- run state
    result = param.ClassSelector(class_=InterventionResult, default=None, allow_None=True,
                                 doc="The run shown (partial while it runs).")
    running = param.Boolean(default=False)
    run_done = param.Integer(default=0)
    run_total = param.Integer(default=1)
    status = param.String(default="Preview the swap, choose settings, press **Start run**.")
    error = param.String(default="")
    effect = param.String(default="", doc="The effect line (markdown).")
    # ---- finished runs
    run_choice = param.Selector(default=None, objects={}, allow_None=True, label="Runs",
                                doc="Runs under the runs folder, newest first.")
    refresh = param.Event(label="Refresh")
    open = param.Event(label="Open run")
    def __init__(self, session=None, history: History | None = None, runs_dir: str | Path | None = None,
                 base_config: InterventionConfig | None = None, background: bool = True, **params) -> None:
        base = base_config or InterventionConfig()
        settings = {k: getattr(base, k) for k in ("steps", "batch_size", "seq_len", "lr", "train", "eval_every",
                                                  "checkpoint_every", "seed", "direction", "text_mode")}
        settings["corpus"] = base.corpus or ""
        super().__init__(**{**settings, **params})
        self.session = session
        self.history = history
        self.runs_dir = Path(runs_dir).expanduser() if runs_dir is not None else default_runs_dir()
        self.base_config = base  # settings the view does not show (probe set size, held-out, device)
        self.background = background  # False: jobs run on the caller's thread (notebooks, tests)
        self._tokenizer = None
        self._run_job = LiveJob(self._on_run_progress, self._on_run_finish)
        self._figures: dict[str, Any] | None = None
        self._figures_key: str | None = None
        self._chart_panes = {key: pn.pane.Bokeh(None, css_classes=[ic.chart_name(key)], margin=(5, 10))
                             for key in ic.RUN_METRICS}
        self._audit_chart = pn.pane.Bokeh(None, css_classes=["swap-audit-chart"], margin=(5, 10))
        self._audit_html = pn.pane.HTML("", css_classes=["swap-audit"], stylesheets=[ic.AUDIT_CSS],
                                        sizing_mode="stretch_width", margin=(5, 10))
        self._effect_table = pn.pane.HTML("", css_classes=["swap-effect-table"], stylesheets=[ic.EFFECT_CSS],
                                          margin=(0, 10))
        self._run_bar = pn.indicators.Progress(value=0, max=1, width=260, margin=(14, 10, 4, 10),
                                               css_classes=["swap-progress"])
        self._init_checkpoints()
        self.refresh_runs()
        self._layout = self._build()

    # ============================================================ settings
    def config(self) -> InterventionConfig:
        """The run's settings: the view's fields over ``base_config`` (checked)."""
        config = replace(self.base_config, corpus=self.corpus.strip() or None, text_mode=self.text_mode,
                         direction=self.direction, steps=self.steps, batch_size=self.batch_size,
                         seq_len=self.seq_len, lr=float(self.lr), train=self.train.strip(),
                         eval_every=self.eval_every, checkpoint_every=self.checkpoint_every, seed=self.seed)
        config.check()
        return config

    @property
    def tokenizer(self):
        """The session's tokenizer, or the embedded default model's (loaded once)."""
        if self.session is not None:
            return self.session.tokenizer
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from explorer.core.defaults import ensure_default_model

            self._tokenizer = AutoTokenizer.from_pretrained(str(ensure_default_model()), local_files_only=True)
        return self._tokenizer

    # ============================================================ the audit
    @param.depends("preview", watch=True)
    async def _on_preview(self) -> None:
        await self.preview_audit()

    async def preview_audit(self) -> SwapAudit | None:
        """Audit the swap of the current corpus (no training); errors are shown, the last audit kept."""
        if self.audit_busy:
            return None
        self.audit_busy = True
        try:
            config = self.config()
            audit = await asyncio.to_thread(corpus_audit, self.tokenizer, config)
        except ExplorerError as e:
            self.audit_error = f"**Could not read the corpus:** {e}"
            return None
        except Exception as e:  # a bug or an unreadable file: tell the user, log the traceback
            log.exception("swap audit failed")
            self.audit_error = f"**Unexpected error** ({type(e).__name__}: {e}). Details are in the server log."
            return None
        finally:
            self.audit_busy = False
        self.param.update(audit=audit, audit_error="")
        if self.history is not None:
            self.history.add(audit, f"swap audit ({audit.direction}): {config.corpus or 'news corpus'}")
        return audit

    @param.depends("audit", watch=True)
    def _update_audit(self) -> None:
        if self.audit is None:
            return
        self._audit_chart.object = ic.audit_chart(self.audit)
        self._audit_html.object = ic.audit_html(self.audit)

    # ============================================================ the run
    @param.depends("start", watch=True)
    def _on_start(self) -> None:
        self.start_run()

    @param.depends("cancel", watch=True)
    def _on_cancel(self) -> None:
        self.cancel_run()

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
        if self._run_job.running:
            return None
        try:
            config = self.config()
        except ExplorerError as e:
            self.error = f"**Check the settings:** {e}"
            return None
        return self._launch(config, self._new_run_dir(), "Starting: copying the model, tokenising the corpus, "
                                                          "then evaluating the starting model…", background)

    def resume_run(self, background: bool | None = None) -> Job | None:
        """Continue the shown run from its last checkpoint (up to the current Steps)."""
        if self._run_job.running:
            return None
        if self.result is None:
            self.error = "**Nothing to resume:** open a run (or start one) first."
            return None
        config = replace(self.result.config, steps=max(self.steps, 1))
        return self._launch(config, Path(self.result.out_dir), "Resuming from the last checkpoint…", background)

    def _launch(self, config: InterventionConfig, out: Path, status: str, background: bool | None) -> Job:
        self._run_config = config  # what the next step does (evaluations) is said in the status line
        self.param.update(running=True, error="", run_done=0, run_total=config.steps, status=status)
        model = self.session  # None: the engine loads the embedded default itself
        return self._run_job.start(lambda ctx: _guarded_run(model, config, out, ctx), name="intervene",
                                   background=self.background if background is None else background)

    def cancel_run(self) -> None:
        if self._run_job.running:
            self.status = "Cancelling after the current step (both arms are checkpointed)…"
        self._run_job.cancel()

    @property
    def job(self) -> Job | None:
        """The current (or last) run's job."""
        return self._run_job.job

    def _on_run_progress(self, progress: Progress, partial: InterventionResult | None) -> None:
        if partial is not None:
            first = self._figures_key != partial.out_dir  # the run's first report: show its audit too
            self.show_result(partial)
            if first:
                self.audit = partial.audit
        text = f"{progress.message}" if progress.message else f"step {progress.done}/{progress.total}"
        eta = progress.eta
        if eta is not None and progress.done < progress.total:
            text += f" · ~{eta:.0f} s left"
        text += next_step_text(getattr(self, "_run_config", None), progress.done, progress.total)
        self.param.update(run_done=progress.done, run_total=max(1, progress.total), status=text)

    def _on_run_finish(self, job: Job) -> None:
        self.running = False
        if job.status == FAILED:
            self.param.update(error=f"**The run failed:** {job.error}", status="Failed.")
            self.refresh_runs()
            return
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
        self.param.update(status=status, error="", run_done=result.step, run_total=max(1, result.config.steps))
        self.refresh_runs(select=result.out_dir)

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

    @param.depends("run_done", "run_total", watch=True)
    def _update_run_bar(self) -> None:
        set_bar(self._run_bar, self.run_done, self.run_total)

    # ============================================================ finished runs
    @param.depends("refresh", watch=True)
    def _on_refresh(self) -> None:
        self.refresh_runs()

    def refresh_runs(self, select: str | None = None) -> list[InterventionResult]:
        """List the runs under ``runs_dir`` (newest first) in both run pickers."""
        try:
            runs = list_runs(self.runs_dir)
        except ExplorerError as e:
            self.error = f"**Could not list the runs:** {e}"
            runs = []
        options = {run_label(r): r.out_dir for r in runs}
        for p in (self.param.run_choice, self.param.ckpt_run):
            p.objects = options
        values = list(options.values())
        choice = select if select in values else (self.run_choice if self.run_choice in values else None)
        self.run_choice = choice or (values[0] if values else None)
        ckpt = select if select in values else (self.ckpt_run if self.ckpt_run in values else None)
        self.ckpt_run = ckpt or (values[0] if values else None)
        self._update_ckpt_choices()
        return runs

    @param.depends("open", watch=True)
    def _on_open(self) -> None:
        if self.run_choice:
            self.open_run(self.run_choice)

    def open_run(self, out_dir: str | Path) -> InterventionResult | None:
        """Reopen a run from its files: the same charts as when it ran."""
        if self._run_job.running:
            self.error = "**A run is in progress:** cancel it before opening another."
            return None
        try:
            result = load_run(out_dir)
        except ExplorerError as e:
            self.error = f"**Could not open the run:** {e}"
            return None
        self.show_result(result)
        c = result.config  # its settings in the fields: Resume continues it, Start repeats it
        self.param.update(corpus=c.corpus or "", text_mode=c.text_mode, direction=c.direction, steps=c.steps,
                          batch_size=c.batch_size, seq_len=c.seq_len, lr=c.lr, train=c.train,
                          eval_every=c.eval_every, checkpoint_every=c.checkpoint_every, seed=c.seed)
        self.audit = result.audit
        self.param.update(error="", run_done=result.step, run_total=max(1, result.config.steps),
                          status=f"Opened {Path(result.out_dir).name}: {result.status}, {result.step}/"
                                 f"{result.config.steps} steps.")
        if self.history is not None:
            self.history.add(result, f"pronoun swap run {Path(result.out_dir).name} (reopened, {result.status})")
        return result

    # ============================================================ closing
    def close(self) -> None:
        """Stop this view's jobs (a run is checkpointed when it stops)."""
        self._run_job.cancel()
        self._cmp_job.cancel()

    # ============================================================ layout
    def _alert(self, p: param.Parameter, css: str) -> pn.pane.Alert:
        return alert(p, css)

    def _build_run(self) -> pn.viewable.Viewable:
        corpus = pn.widgets.TextInput.from_param(self.param.corpus, css_classes=["swap-corpus"],
                                                 sizing_mode="stretch_width",
                                                 placeholder="default news corpus, or "
                                                             "/path/to/corpus.txt|.jsonl|.parquet")
        text_mode = pn.widgets.Select.from_param(self.param.text_mode, width=170)
        direction = pn.widgets.Select.from_param(self.param.direction, width=190, css_classes=["swap-direction"])
        preview = pn.widgets.Button.from_param(self.param.preview, width=140, height=36, margin=(26, 10, 10, 10),
                                               disabled=self.param.audit_busy, css_classes=["swap-preview"])
        help_text = pn.pane.Markdown(CORPUS_HELP, margin=(0, 10), styles={"font-size": "12px", "color": "#555"})
        audit = pn.Row(self._audit_chart, self._audit_html, sizing_mode="stretch_width",
                       loading=self.param.audit_busy)
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
        not_running = self.param.running.rx.not_()
        start = pn.widgets.Button.from_param(self.param.start, color="primary", width=120, height=36,
                                             margin=(26, 10, 10, 10), disabled=self.param.running,
                                             css_classes=["swap-start"])
        cancel = pn.widgets.Button.from_param(self.param.cancel, width=100, height=36, margin=(26, 10, 10, 10),
                                              disabled=not_running, css_classes=["swap-cancel"])
        resume = pn.widgets.Button.from_param(self.param.resume, width=100, height=36, margin=(26, 10, 10, 10),
                                              disabled=self.param.running.rx() | self.param.result.rx.is_(None),
                                              css_classes=["swap-resume"])
        status = pn.pane.Markdown(self.param.status, css_classes=["swap-status"], margin=(4, 10),
                                  sizing_mode="stretch_width")
        effect = pn.pane.Markdown(self.param.effect, css_classes=["swap-effect"], margin=(0, 10),
                                  sizing_mode="stretch_width")
        # Rows of two, not a FlexBox: a FlexBox collapses Bokeh panes whose figure arrives later.
        panes = list(self._chart_panes.values())
        charts = pn.Column(*(pn.Row(*panes[i:i + 2]) for i in range(0, len(panes), 2)), sizing_mode="stretch_width")
        runs = pn.widgets.Select.from_param(self.param.run_choice, css_classes=["swap-runs"], width=520)
        refresh = pn.widgets.Button.from_param(self.param.refresh, width=90, height=36, margin=(26, 10, 10, 10),
                                               css_classes=["swap-refresh"])
        open_ = pn.widgets.Button.from_param(self.param.open, width=110, height=36, margin=(26, 10, 10, 10),
                                             disabled=self.param.running, css_classes=["swap-open"])
        return pn.Column(
            pn.Row(corpus, text_mode, direction, preview, sizing_mode="stretch_width"), help_text,
            self._alert(self.param.audit_error, "swap-audit-error"), audit,
            pn.pane.Markdown("#### Run settings", margin=(10, 10, 0, 10)), settings,
            pn.Row(start, cancel, resume, self._run_bar, sizing_mode="stretch_width"), status,
            self._alert(self.param.error, "swap-error"), effect, self._effect_table, charts,
            pn.pane.Markdown(FULL_SIZE, margin=(0, 10), styles={"font-size": "12px", "color": "#555"}),
            pn.pane.Markdown("#### Finished runs", margin=(10, 10, 0, 10)),
            pn.Row(runs, refresh, open_, sizing_mode="stretch_width"),
            sizing_mode="stretch_width")

    def _build(self) -> pn.viewable.Viewable:
        self._sections = pn.Tabs(("Intervention run", self._build_run()),
                                 ("Across checkpoints", self._build_checkpoints()),
                                 sizing_mode="stretch_width", css_classes=["swap-sections"])
        return pn.Column(self._sections, sizing_mode="stretch_width", css_classes=["intervention-view"])

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout


def _guarded_run(model, config: InterventionConfig, out: Path, ctx: JobContext) -> InterventionResult:
    """The run; an unexpected error is logged and reaches the user as an ExplorerError."""
    try:
        return run_intervention(model, config, out_dir=out, ctx=ctx)
    except ExplorerError:
        raise
    except Exception as e:
        log.exception("intervention run failed")
        raise ExplorerError(f"unexpected error ({type(e).__name__}: {e}); details are in the server log") from e
