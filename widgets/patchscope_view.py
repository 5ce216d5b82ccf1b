"""The patchscope view: a prompt's hidden states decoded by an identity prompt, blocks × positions.

Beside the logit lens: every block's output at every position of the prompt is patched over the
identity prompt's placeholder (its last token) at the same block, and the identity prompt's
next-token top-1 fills the cell (colour = its probability). A click on a cell shows its top-k.
The identity prompt is editable. The model runs in a worker thread (``asyncio.to_thread``);
the grid is rebuilt by a pure builder and swapped into its pane on the page's loop.
"""
from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import panel as pn
import param

from explorer.analyses.patchscope import DEFAULT_IDENTITY, PatchscopeRequest, PatchscopeResult, patchscope
from explorer.core.session import ModelSession
from explorer.persistence.history import History

from . import probe_charts as pc
from .charts import quote_token, shorten
from .live import QueuedRuns
from .parts import TEXT_LIMIT, alert, error_text

log = logging.getLogger(__name__)

# Positions patched per run when the prompt is longer than one grid: each is a patched forward
# per block (30 x 32 = 960 for the default model, about a minute on 2 busy CPU cores).
LONG_WINDOW = 32

TOPK_CSS = """
.caption { font-weight: 600; margin-bottom: 6px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 2px 10px 2px 0; text-align: right; }
th { color: #666; font-weight: normal; border-bottom: 1px solid #ddd; }
td.tok { text-align: left; font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre; }
"""


class PatchscopeView(QueuedRuns, pn.viewable.Viewer):
    """Patchscopes of a prompt for one ModelSession; usable alone: ``PatchscopeView(session)``."""

    prompt = param.String(default="The Eiffel Tower is in the city of", label="Prompt",
                          doc="The source prompt: each of its positions is decoded at every block.")
    identity = param.String(default=DEFAULT_IDENTITY, label="Identity prompt",
                            doc="Its last token is replaced by the source state; its next token is read.")
    placeholder = param.Integer(default=-1, label="Placeholder position",
                                doc="The identity prompt's position that is replaced (-1: its last token). With "
                                    "the default prompt the next token is mostly ' ->'; end it with '? ->' and use "
                                    "-2 to read the repeated token instead.")
    top_k = param.Integer(default=10, bounds=(1, 50), label="Top-k")
    start = param.Integer(default=0, bounds=(0, None), label="First position shown",
                          doc="A prompt longer than the grid is patched at a window of 32 positions: "
                              "its last ones, or from the position typed here.")
    run = param.Event(label="Run patchscope")

    result = param.ClassSelector(class_=PatchscopeResult, default=None, allow_None=True)
    status = param.String(default="Type a prompt and press **Run patchscope**.")
    error = param.String(default="")
    busy = param.Boolean(default=False)

    def __init__(self, session: ModelSession, history: History | None = None, **params) -> None:
        super().__init__(**params)
        self.session = session
        self.history = history
        self._start_picked = False  # the user typed a first position (kept for the next run)
        self._setting_start = False
        self._grid = pn.pane.Bokeh(None, css_classes=["patchscope-grid"])
        self._topk = pn.pane.HTML("", css_classes=["patchscope-topk"], width=300, stylesheets=[TOPK_CSS],
                                  margin=(10, 10, 10, 20))
        self._layout = self._build_layout()

    @param.depends("run", watch=True)
    async def _on_run(self) -> None:
        await self.compute()

    async def _compute_once(self) -> None:
        started = time.perf_counter()
        request = PatchscopeRequest(self.prompt, self._positions(), self.identity.replace("\\n", "\n"),
                                    self.placeholder, top_k=self.top_k)
        try:
            result = await asyncio.to_thread(patchscope, self.session, request)
        except Exception as e:  # bad input says what to do; a bug is logged; the page stays
            self.error = error_text(e, "run the patchscope", log)
            return
        self.show(result, time.perf_counter() - started)

    def _positions(self) -> tuple[int, ...] | None:
        """None (every position) when the prompt fits one grid, else one grid's window: the last
        positions, or from the one the user typed. A 1,000-token prompt patched everywhere took
        tens of minutes with no progress (30,000 patched runs for a 30-block model)."""
        try:
            n = int(self.session.encode(self.prompt).numel())
        except Exception:  # the engine reports a bad prompt
            return None
        width = min(LONG_WINDOW, pc.patchscope_width())
        if n <= pc.patchscope_width():
            return None
        first = self.start if self._start_picked else n - width
        first = min(max(0, first), n - width)
        return tuple(range(first, first + width))

    @param.depends("start", watch=True)
    def _on_start(self) -> None:
        if not self._setting_start:
            self._start_picked = True

    @param.depends("prompt", watch=True)
    def _on_prompt(self) -> None:
        self._start_picked = False  # a new prompt shows its last positions unless the user picks others

    def show(self, result: PatchscopeResult, seconds: float | None = None) -> None:
        if self.history is not None:
            self.history.add(result, f"patchscope: {shorten(result.request.prompt, 30)}")
        lo, _ = pc.patchscope_window(result)
        final = result.top_tokens[-1, -1, 0]
        took = f" · {seconds:.2f} s" if seconds is not None else ""
        n, shown = len(result.tokens), len(result.positions)
        part = "" if shown == n else (f" of {n} (positions {int(result.positions[0])}–{int(result.positions[-1])}: "
                                      "type *First position shown* and run again for others)")
        self._setting_start = True
        try:
            self.param.update(result=result, start=int(result.positions[lo]), error="",
                              status=f"**{result.model}** · {shown} positions{part} × "
                                     f"{len(result.layer_labels)} blocks · last block at position "
                                     f"{int(result.positions[-1])} {quote_token(final)}{took}")
        finally:
            self._setting_start = False

    def select_cell(self, row: int, col: int) -> None:
        self._topk.object = pc.patchscope_topk_html(self.result, row, col)

    def _tap_handler(self, source, result):
        def on_tap(attr, old, new) -> None:
            if new and self.result is result:
                self.select_cell(source.data["row"][new[0]], source.data["col"][new[0]])
        return on_tap

    @param.depends("result", "start", watch=True)
    def _update_grid(self) -> None:
        if self.result is None:
            return
        column = int(np.searchsorted(self.result.positions, self.start))  # ``start`` is a token position
        fig = pc.patchscope_grid(self.result, column)
        source = fig.select_one({"name": pc.PATCHSCOPE_SOURCE})
        source.selected.on_change("indices", self._tap_handler(source, self.result))
        # Left to the layout, the row squeezed a 32-column grid into ~830 px and the tokens
        # overlapped; at its own width the box around it scrolls sideways. Set on the new figure
        # before it is shown (the pane's width would be synced into the figure on the page, off
        # the document's lock).
        fig.min_width = fig.width
        self._grid.object = fig
        lo, hi = pc.patchscope_window(self.result, column)
        self.select_cell(len(self.result.layer_labels) - 1, hi - 1)

    def _build_layout(self) -> pn.viewable.Viewable:
        prompt = pn.widgets.TextAreaInput.from_param(self.param.prompt, max_length=TEXT_LIMIT, rows=2, auto_grow=True,
                                                     max_rows=6,
                                                     sizing_mode="stretch_width", css_classes=["patchscope-prompt"])
        identity = pn.widgets.TextAreaInput.from_param(self.param.identity, max_length=TEXT_LIMIT, rows=4, width=260,
                                                       css_classes=["patchscope-identity"])
        run = pn.widgets.Button.from_param(self.param.run, color="primary", width=150, height=36,
                                           margin=(26, 10, 10, 10), disabled=self.param.busy,
                                           css_classes=["patchscope-run"])
        top_k = pn.widgets.IntInput.from_param(self.param.top_k, width=80)
        placeholder = pn.widgets.IntInput.from_param(self.param.placeholder, width=140)
        start = pn.widgets.IntInput.from_param(self.param.start, width=160)  # its label needs ~140 px
        error = alert(self.param.error, "patchscope-error")
        status = pn.pane.Markdown(self.param.status, sizing_mode="stretch_width", css_classes=["patchscope-status"])
        grid_box = pn.Column(self._grid, scroll="x-auto", sizing_mode="stretch_width")
        inputs = pn.Row(prompt, identity, pn.Column(run, pn.Row(top_k, start), placeholder),
                        sizing_mode="stretch_width")
        return pn.Column(inputs,
                         error, pn.Column(status, pn.Row(grid_box, self._topk, sizing_mode="stretch_width"),
                                          loading=self.param.busy, sizing_mode="stretch_width"),
                         sizing_mode="stretch_width", css_classes=["patchscope-view"])

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout
