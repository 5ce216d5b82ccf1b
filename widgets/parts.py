"""Small parts the views are built from: readable alerts, uncut prompt fields, a run state with
one error policy, a job panel around ``LiveJob``, and the target-token hint.

A view is a ``pn.viewable.Viewer`` that owns its inputs (params) and composes these parts:

>>> state = RunState()
>>> state.fail(ValueError("boom"), "run the lens")  # doctest: +SKIP
>>> state.error.startswith("**Unexpected error**")  # doctest: +SKIP
True
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.core.jobs import FAILED, RUNNING, Job, JobContext, Progress

from .live import LiveJob, served_doc

log = logging.getLogger(__name__)

# Panel's alert colours come from the page theme's variables; the material page makes the
# danger text white on light pink (1.3:1). Fixed colours here: text on background >= 7:1 (WCAG AA
# asks 4.5:1), the same in every theme.
ALERT_COLORS = {
    "danger": ("#58151c", "#f8d7da", "#f1aeb5"),   # 10.0:1
    "warning": ("#664d03", "#fff3cd", "#ffe69c"),  # 7.6:1
    "info": ("#055160", "#cff4fc", "#9eeaf9"),     # 8.4:1
    "success": ("#0a3622", "#d1e7dd", "#a3cfbb"),  # 11.4:1
}
ALERT_CSS = "\n".join(
    f":host(.alert-{kind}) {{ color: {fg}; background-color: {bg}; border-color: {border}; }}\n"
    f":host(.alert-{kind}) * {{ color: {fg}; }}"
    for kind, (fg, bg, border) in ALERT_COLORS.items())

# Under the Material page Panel's default (secondary) buttons render as bare text: a new user
# cannot tell "Apply" or "Cancel" from a label. An outline in the accent colour (7:1 on white)
# marks them as buttons while the filled primary buttons stay the main action.
BUTTON_CSS = (".bk-btn-default { border: 1px solid #1f5a96 !important; color: #1f5a96 !important; "
              "background-color: #ffffff !important; }\n"
              ".bk-btn-default:hover:not(:disabled) { background-color: #e8f0f8 !important; }\n"
              ".bk-btn-default:disabled { border-color: #9aa5b1 !important; color: #5f6b76 !important; }")


def outline_secondary_buttons(root: pn.viewable.Viewable) -> int:
    """Give every default-type button under ``root`` the outline of ``BUTTON_CSS``; returns how
    many buttons got it (each only once)."""
    changed = 0
    buttons = [*root.select(pn.widgets.Button), *root.select(pn.widgets.FileDownload)]
    for button in buttons:
        if button.button_type == "default" and BUTTON_CSS not in button.stylesheets:
            button.stylesheets = [*button.stylesheets, BUTTON_CSS]
            changed += 1
    return changed


# Panel's text inputs cut what is typed or pasted at 5,000 characters without a word; the
# engine's context check is the real limit (it names the token count), so the field allows more.
TEXT_LIMIT = 10_000_000

HELP_STYLE = {"font-size": "12px", "color": "#555"}  # 7.5:1 on white


def alert(p: param.Parameter | str, css: str, kind: str = "danger", **kw) -> pn.pane.Alert:
    """An alert bound to a string parameter, visible while it is non-empty, with readable colours."""
    visible = p.rx.bool() if isinstance(p, param.Parameter) else bool(p)
    return pn.pane.Alert(p, alert_type=kind, css_classes=[css], visible=visible, sizing_mode="stretch_width",
                         stylesheets=[ALERT_CSS], **kw)


def text_field(p: param.Parameter, css: str, area: bool = False, live: bool = True, **kw) -> pn.widgets.Widget:
    """A text field (``area``: a growing text area) bound to a parameter, with no silent length cut;
    ``live`` updates the parameter on every key press (live token counts)."""
    if area:
        kw = {"rows": 2, "auto_grow": True, "max_rows": 8, **kw}
        cls = pn.widgets.TextAreaInput
    else:
        cls = pn.widgets.TextInput
    if live:
        kw["onkeyup"] = True
    return cls.from_param(p, css_classes=[css], max_length=TEXT_LIMIT, **kw)


# The explainers a view offers, by label: None is the attached model (explorer.neurons.describe).
EXPLAINERS = {"attached model": None, "token list": "tokens"}


def explainer_param() -> param.Selector:
    """The "Explainer" choice of a view that explains units (spec: ``EXPLAINERS[value]``)."""
    return param.Selector(default="attached model", objects=list(EXPLAINERS), label="Explainer",
                          doc="attached model: it writes an explanation and simulates it (slow, weak for a small "
                              "model); token list: the tokens the unit fires on, simulated by matching them")


def help_text(text: str, css: str, **kw) -> pn.pane.Markdown:
    """A short grey help paragraph."""
    return pn.pane.Markdown(text, css_classes=[css], margin=(0, 10), styles=HELP_STYLE,
                            sizing_mode="stretch_width", **kw)


def error_text(e: BaseException, what: str, logger: logging.Logger | None = None) -> str:
    """The one error policy: bad input says what to do; anything else is a bug, logged (with its
    traceback) on ``logger``."""
    if isinstance(e, ExplorerError):
        return f"**Could not {what}:** {e}"
    (logger or log).error("%s failed", what, exc_info=e)
    return (f"**Unexpected error** while trying to {what} ({type(e).__name__}: {e}). "
            "Check the inputs and try again; if it repeats, the details are in the server log.")


class RunState(param.Parameterized):
    """Status line, error and busy flag of one runnable part, and whether its result is stale."""

    status = param.String(default="", doc="Status line (markdown).")
    error = param.String(default="", doc="The last error shown to the user; empty when none.")
    busy = param.Boolean(default=False, doc="True while the part's work runs.")
    stale = param.Boolean(default=False, doc="True when the shown result no longer matches the inputs.")

    def fail(self, e: BaseException, what: str) -> None:
        self.error = error_text(e, what)


def stale_note(p: param.Parameter, css: str) -> pn.pane.Markdown:
    """'The result below was made with other inputs' while ``p`` (a Boolean) is true."""
    return pn.pane.Markdown("⚠ **Inputs changed**: the result below was made with the previous inputs. "
                            "Run again to update it.", css_classes=[css], visible=p, margin=(0, 10),
                            styles={"color": "#664d03"}, sizing_mode="stretch_width")


def guarded(fn: Callable, what: str, session: Any, request: Any, ctx: JobContext) -> Any:
    """Run ``fn(session, request, ctx=ctx)`` as a job (bind the rest with ``functools.partial``);
    an unexpected error is logged and reaches the user as an ExplorerError."""
    try:
        return fn(session, request, ctx=ctx)
    except ExplorerError:
        raise
    except Exception as e:
        log.exception("%s failed", what)
        raise ExplorerError(f"unexpected error ({type(e).__name__}: {e}); details are in the server log") from e


def progress_text(progress: Progress, unit: str) -> str:
    """'54/270 heads · 12.3 heads/s · ~18 s left' (rate and time left once something finished)."""
    text = f"{progress.done}/{progress.total} {unit}"
    if progress.done and progress.elapsed > 0:
        text += f" · {progress.done / progress.elapsed:.1f} {unit}/s"
    eta = progress.eta
    if eta is not None and progress.done < progress.total:
        text += f" · ~{eta:.0f} s left"
    return text


def set_bar(bar: pn.indicators.Progress, done: int, total: int) -> None:
    """Move a progress bar without ever asking for value > max on the way."""
    total = max(1, total)
    done = min(max(0, done), total)
    if total >= bar.max:
        bar.max = total
        bar.value = done
    else:
        bar.value = done
        bar.max = total


def push(pane: pn.pane.Bokeh) -> None:
    """In a notebook (no served document) in-place Bokeh changes must be pushed explicitly."""
    if served_doc() is None:
        pn.io.push_notebook(pane)


def job_running(live: LiveJob) -> bool:
    """Whether the live job's job is running (also a foreground one, which has no thread)."""
    return live.job is not None and live.job.status == RUNNING


class JobPanel(param.Parameterized):
    """One long job of a view: Start/Cancel buttons, a progress bar, its status and error line.

    ``on_progress(progress, partial)`` and ``on_finish(job)`` are the owner's; a failed job's
    error is shown here (``what`` names the work: "run the sweep"), then ``on_fail(job)`` runs if given.
    """

    running = param.Boolean(default=False)
    done = param.Integer(default=0)
    total = param.Integer(default=1)
    status = param.String(default="")
    error = param.String(default="")

    def __init__(self, what: str, css: str, on_progress: Callable[[Progress, Any], None],
                 on_finish: Callable[[Job], None], start_label: str = "Start",
                 on_fail: Callable[[Job], None] | None = None, **params) -> None:
        super().__init__(**params)
        self.what, self.css, self.start_label = what, css, start_label
        self._owner_progress, self._owner_finish, self._owner_fail = on_progress, on_finish, on_fail
        self.live = LiveJob(self._progress, self._finish)
        # Set from params by a watcher, never by refs: a bar refuses value > max, and refs may
        # apply a new value before the new max.
        self.bar = pn.indicators.Progress(value=0, max=1, width=260, margin=(14, 10, 4, 10),
                                          css_classes=[f"{css}-progress"])
        self.param.watch(lambda *_events: set_bar(self.bar, self.done, self.total), ["done", "total"])

    @property
    def job(self) -> Job | None:
        return self.live.job

    def start(self, fn: Callable[[JobContext], Any], status: str, background: bool = True) -> Job | None:
        if self.live.running:
            return None
        self.param.update(running=True, error="", done=0, total=1, status=status)
        return self.live.start(fn, name=self.css, background=background)

    def cancel(self, note: str = "Cancelling after the current batch…") -> None:
        if self.live.running:
            self.status = note
        self.live.cancel()

    def _progress(self, progress: Progress, partial: Any) -> None:
        self._owner_progress(progress, partial)
        self.param.update(done=progress.done, total=max(1, progress.total))

    def _finish(self, job: Job) -> None:
        self.running = False
        if job.status == FAILED:
            self.param.update(error=f"**Could not {self.what}:** {job.error}", status="Failed.")
            if self._owner_fail is not None:
                self._owner_fail(job)
            return
        self._owner_finish(job)

    def buttons(self, start: param.Parameter, cancel: param.Parameter, width: int = 120) -> list:
        """The Start and Cancel buttons for the owner's two Event params."""
        go = pn.widgets.Button.from_param(start, color="primary", width=width, height=36, margin=(26, 10, 10, 10),
                                          disabled=self.param.running, css_classes=[f"{self.css}-start"])
        stop = pn.widgets.Button.from_param(cancel, width=100, height=36, margin=(26, 10, 10, 10),
                                            disabled=self.param.running.rx.not_(), css_classes=[f"{self.css}-cancel"])
        return [go, stop]

    def progress_row(self) -> pn.Row:
        status = pn.pane.Markdown(self.param.status, css_classes=[f"{self.css}-status"], margin=(4, 10),
                                  sizing_mode="stretch_width")
        return pn.Row(self.bar, status, sizing_mode="stretch_width")

    def error_box(self) -> pn.pane.Alert:
        return alert(self.param.error, f"{self.css}-error")


def token_hint(session, text: str) -> str:
    """A hint when a target typed without its leading space is likely another token: 'Paris' ->
    "Did you mean ' Paris' ...?"; empty when none applies (empty, '#id', a leading space, no such token)."""
    if not text or text.startswith((" ", "#")) or text != text.strip():
        return ""
    try:
        session.token_id(" " + text)
    except Exception:
        return ""
    try:
        session.token_id(text)
        alone = f"'{text}' is a token too, but after a word"
    except Exception:
        alone = f"'{text}' alone is not one token; after a word"
    return (f"Did you mean **' {text}'** (with a leading space)? {alone} models predict the token "
            "with the space.")


__all__ = ["ALERT_COLORS", "ALERT_CSS", "JobPanel", "RunState", "TEXT_LIMIT", "alert", "error_text", "guarded",
           "help_text", "job_running", "progress_text", "push", "set_bar", "stale_note", "text_field", "token_hint"]


class JobSection(param.Parameterized):
    """A section that runs one job at a time (``self.job``: a ``JobPanel``; ``self.run()``; a
    ``result`` param): Start and Cancel, and a stale mark when an input changes under a shown result."""

    start = param.Event(label="Start")
    cancel = param.Event(label="Cancel")
    stale = param.Boolean(default=False, doc="True when the shown result no longer matches the inputs.")

    cancel_note = "Cancelling after the current batch…"  # the status line while a cancel takes effect

    def _mark_stale(self, *_events) -> None:
        if self.result is not None and not self.job.running:
            self.stale = True

    @param.depends("start", watch=True)
    def _on_start(self) -> None:
        self.run()

    @param.depends("cancel", watch=True)
    def _on_cancel(self) -> None:
        self.job.cancel(self.cancel_note)
