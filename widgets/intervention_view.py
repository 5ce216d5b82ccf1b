"""The pronoun-swap tab: preview a corpus swap, run the two-arm intervention live, compare checkpoints.

``InterventionView`` composes four parts, each owning its inputs and feedback:

- ``audit_part`` (``SwapAuditPart``): corpus, swap direction, *Preview swap* (the swap audit).
- ``run_part`` (``RunPart``): run settings, Start / Cancel / Resume (a ``JobPanel``), live charts.
- ``runs_part`` (``RunsPart``): the runs under ``runs_dir`` (default
  ``explorer.training.intervene.default_runs_dir()``), reopenable (``load_run``).
- ``ckpt_part`` (``CheckpointsPart``): compare checkpoints of a run or model directories.

The view joins them: a run's settings are the audit part's corpus fields plus the run part's,
over ``base_config``; a finished run refreshes the run lists; opening a run fills both parts'
fields. Every finished, cancelled or reopened run goes into ``history``.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.persistence.history import History
from explorer.training.intervene import (
    InterventionConfig,
    InterventionResult,
    default_runs_dir,
    list_runs,
    load_run,
)

from .checkpoints_view import CheckpointsPart
from .intervention_audit import CORPUS_HELP, DIRECTIONS, SwapAuditPart
from .intervention_run import FULL_SIZE, RunPart, next_step_text


def run_label(result: InterventionResult) -> str:
    """'run-20260101-120000 · done · 40/40 steps · m2f · SmolLM2-135M-Instruct'."""
    return (f"{Path(result.out_dir).name} · {result.status} · {result.step}/{result.config.steps} steps · "
            f"{result.config.direction} · {result.model}")


class RunsPart(pn.viewable.Viewer):
    """The finished runs: a list, Refresh and *Open run* (``on_open(folder)``)."""

    run_choice = param.Selector(default=None, objects={}, allow_None=True, label="Runs",
                                doc="Runs under the runs folder, newest first.")
    refresh = param.Event(label="Refresh")
    open = param.Event(label="Open run")

    def __init__(self, on_refresh, on_open, running: param.Parameter, **params) -> None:
        super().__init__(**params)
        self._on_refresh_cb, self._on_open_cb, self._running = on_refresh, on_open, running

    def set_runs(self, options: dict[str, str], select: str | None = None) -> None:
        """The runs to list (label -> folder); keep the chosen one if still there, else ``select`` or the first."""
        self.param.run_choice.objects = options
        values = list(options.values())
        keep = select if select in values else (self.run_choice if self.run_choice in values else None)
        self.run_choice = keep or (values[0] if values else None)

    @param.depends("refresh", watch=True)
    def _on_refresh(self) -> None:
        self._on_refresh_cb()

    @param.depends("open", watch=True)
    def _on_open(self) -> None:
        if self.run_choice:
            self._on_open_cb(self.run_choice)

    def __panel__(self) -> pn.viewable.Viewable:
        runs = pn.widgets.Select.from_param(self.param.run_choice, css_classes=["swap-runs"], width=520)
        refresh = pn.widgets.Button.from_param(self.param.refresh, width=90, height=36, margin=(26, 10, 10, 10),
                                               css_classes=["swap-refresh"])
        open_ = pn.widgets.Button.from_param(self.param.open, width=110, height=36, margin=(26, 10, 10, 10),
                                             disabled=self._running, css_classes=["swap-open"])
        return pn.Column(pn.pane.Markdown("#### Finished runs", margin=(10, 10, 0, 10)),
                         pn.Row(runs, refresh, open_, sizing_mode="stretch_width"), sizing_mode="stretch_width")


class InterventionView(pn.viewable.Viewer):
    """The pronoun-swap intervention for one model (a ModelSession, or the embedded default)."""

    def __init__(self, session=None, history: History | None = None, runs_dir: str | Path | None = None,
                 base_config: InterventionConfig | None = None, background: bool = True, **params) -> None:
        super().__init__(**params)
        base = base_config or InterventionConfig()
        self.session = session
        self.history = history
        self.runs_dir = Path(runs_dir).expanduser() if runs_dir is not None else default_runs_dir()
        self.base_config = base  # settings the view does not show (probe set size, held-out, device)
        self._tokenizer = None
        self.audit_part = SwapAuditPart(lambda: self.tokenizer, self.config, history=history)
        self.audit_part.show_config(base)
        self.run_part = RunPart(session, self.config, self.runs_dir, history=history, background=background,
                                on_done=lambda out: self.refresh_runs(select=out),
                                on_audit=lambda audit: setattr(self.audit_part, "audit", audit))
        self.run_part.show_config(base)
        self.runs_part = RunsPart(self.refresh_runs, self.open_run, self.run_part.job.param.running)
        self.ckpt_part = CheckpointsPart(device=base.device, history=history, background=background)
        self.refresh_runs()
        self._layout = pn.Column(
            pn.Tabs(("Intervention run", pn.Column(self.audit_part, self.run_part, self.runs_part,
                                                   sizing_mode="stretch_width")),
                    ("Across checkpoints", self.ckpt_part), sizing_mode="stretch_width", css_classes=["swap-sections"]),
            sizing_mode="stretch_width", css_classes=["intervention-view"])

    def config(self) -> InterventionConfig:
        """The run's settings: the parts' fields over ``base_config`` (checked)."""
        config = replace(self.base_config, **self.audit_part.fields(), **self.run_part.fields())
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

    @property
    def result(self) -> InterventionResult | None:
        """The run shown (partial while it runs)."""
        return self.run_part.result

    @property
    def effect(self) -> str:
        """The shown run's effect line (markdown)."""
        return self.run_part.effect

    def refresh_runs(self, select: str | None = None) -> list[InterventionResult]:
        """List the runs under ``runs_dir`` (newest first) in both run pickers."""
        try:
            runs = list_runs(self.runs_dir)
        except ExplorerError as e:
            self.run_part.job.error = f"**Could not list the runs:** {e}"
            runs = []
        options = {run_label(r): r.out_dir for r in runs}
        self.runs_part.set_runs(options, select)
        self.ckpt_part.set_runs(options, select)
        return runs

    def open_run(self, out_dir: str | Path) -> InterventionResult | None:
        """Reopen a run from its files: the same charts as when it ran, its settings in the fields."""
        job = self.run_part.job
        if job.running:
            job.error = "**A run is in progress:** cancel it before opening another."
            return None
        try:
            result = load_run(out_dir)
        except ExplorerError as e:
            job.error = f"**Could not open the run:** {e}"
            return None
        self.run_part.show_result(result)
        self.run_part.show_config(result.config)  # Resume continues it, Start repeats it
        self.audit_part.show_config(result.config)
        self.audit_part.audit = result.audit
        job.param.update(error="", done=result.step, total=max(1, result.config.steps),
                         status=f"Opened {Path(result.out_dir).name}: {result.status}, {result.step}/"
                                f"{result.config.steps} steps.")
        if self.history is not None:
            self.history.add(result, f"pronoun swap run {Path(result.out_dir).name} (reopened, {result.status})")
        return result

    def close(self) -> None:
        """Stop this view's jobs (a run is checkpointed when it stops)."""
        self.run_part.job.cancel()
        self.ckpt_part.job.cancel()

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout


__all__ = ["CORPUS_HELP", "DIRECTIONS", "FULL_SIZE", "InterventionView", "RunsPart", "next_step_text", "run_label"]
