"""The heads view: which heads attend to the previous token, copy (induction), sink to BOS, and
push the answer up (DLA); click a head to see its attention on the prompt.

Layout, top to bottom: the prompt, target and Run; the score, the role threshold and the
selected heads (as "L.H" chips); the layers × heads grid with the token-to-token line view
beside it; one small pattern heatmap per selected head; the table of every head.

Selecting heads. A click on a grid cell selects that head alone (a click on the one head shown
clears it); a shift- or ctrl-click adds a head, or removes it if shown; the chips do the same
from the keyboard. Up to ``MAX_OVERLAY`` heads are overlaid; each keeps one colour everywhere:
its outline on the grid, its lines in the line view, its heatmap's title and colour ramp.
Overlaid heads are drawn as small multiples (one heatmap per head) rather than one heatmap
with a head selector: two patterns side by side show at once where they differ (a
previous-token stripe next to an induction off-diagonal), which a selector hides behind a
click; the line view is the one place they are drawn on top of each other, as BertViz does.

Performance. The model work of the whole tab is one ``head_scores`` call, which is one trace
(the prompt and, the first time for a (seq_len, seed), the repeated random tokens as two
invokes) and caches the prompt's attention patterns as a by-product; the view then reads them
with ``attention_patterns`` (a cache hit). Selecting heads, changing the score or the threshold
never runs the model: patterns come from that cached AttentionResult, roles from
``HeadScores.roles``. (Only prompts whose patterns exceed the engine's pattern cache limit,
~250 tokens on SmolLM2, or whose cache entry was evicted, cost a second, patterns-only trace.)
"""
from __future__ import annotations

import asyncio
import logging
import time

import panel as pn
import param
from bokeh.events import Tap

from explorer.analyses.heads import (
    AttentionResult,
    HeadPattern,
    HeadScores,
    HeadsRequest,
    attention_patterns,
    head_scores,
    parse_head,
)
from explorer.core.session import ModelSession
from explorer.persistence.history import History

from . import heads_charts as hc
from .charts import quote_token, shorten
from .live import QueuedRuns
from .parts import TEXT_LIMIT, alert, error_text

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "The cat sat on the mat. The cat sat on the mat."
SCORE_CHOICES = {label: name for name, (label, _) in hc.SCORES.items()}
MAX_OVERLAY = hc.MAX_OVERLAY


def compute_heads(session: ModelSession, request: HeadsRequest) -> tuple[HeadScores, AttentionResult]:
    """The view's model work (run in a worker thread): the scores, then the prompt's patterns,
    which ``head_scores`` has just cached, so the second call does not run the model."""
    scores = head_scores(session, request)
    return scores, attention_patterns(session, request.prompt)


class HeadsView(QueuedRuns, pn.viewable.Viewer):
    """Head scores, roles, DLA and attention patterns of a prompt, for one ModelSession."""

    prompt = param.String(default=DEFAULT_PROMPT, label="Prompt",
                          doc="Text whose attention patterns and DLA are shown; repetition shows induction.")
    target = param.String(default="", label="Target token",
                          doc="Token for the DLA; empty = the final top-1. '#1234' names a token id.")
    score = param.Selector(default="induction", objects=SCORE_CHOICES, label="Colour by",
                           doc="Which score colours the grid (and orders the table).")
    threshold = param.Number(default=0.5, bounds=(0.0, 1.0), step=0.01, label="Role threshold",
                             doc="A head gets a role where its score is at or above this.")
    selected = param.ListSelector(default=[], objects=[], label="Heads (L.H)",
                                  doc="Heads whose patterns are shown, e.g. ['17.4', '18.6'].")
    seq_len = param.Integer(default=24, bounds=(1, None), label="Random tokens",
                            doc="Length of the random sequence (repeated twice) for induction/duplicate.")
    seed = param.Integer(default=0, bounds=(0, None), label="Seed", doc="Seed of the random sequence.")
    run = param.Event(label="Run", doc="Compute the head scores for the current prompt and target.")

    result = param.ClassSelector(class_=HeadScores, default=None, allow_None=True,
                                 doc="The scores shown in the grid and table.")
    attention = param.ClassSelector(class_=AttentionResult, default=None, allow_None=True,
                                    doc="The prompt's patterns (every head) the pattern views read.")
    status = param.String(default="Type a prompt and press **Run**.", doc="Status line (markdown).")
    selection_text = param.String(default="", doc="What the pattern views show (markdown).")
    error = param.String(default="", doc="The last error shown to the user; empty when none.")
    busy = param.Boolean(default=False, doc="True while the model is running.")

    def __init__(self, session: ModelSession, history: History | None = None, **params) -> None:
        selected = list(params.pop("selected", []))
        super().__init__(**params)
        info = session.info()
        self.n_layers, self.n_heads, self.n_kv_heads = info.n_layers, info.n_heads, info.n_kv_heads
        # This model's heads are the chips' choices (set on this instance's copy of the parameter).
        chips = self.param.selected
        chips.objects = [hc.chip_label(layer, head) for layer in range(self.n_layers)
                         for head in range(self.n_heads)]
        chips.check_on_set = True
        self.session = session
        self.history = history  # where computed results are recorded (snapshots store it)
        # The AttentionResult last put into the history, and its heads whose patterns are there.
        self._recorded_for: AttentionResult | None = None
        self._recorded: set[tuple[int, int]] = set()
        # Bokeh panes stay visible and are only given objects (see lens_view on why).
        self._grid = pn.pane.Bokeh(None, css_classes=["heads-grid"])
        self._lines = pn.pane.Bokeh(None, css_classes=["heads-lines"])
        self._table = pn.pane.Bokeh(None, css_classes=["heads-table"], sizing_mode="stretch_width")
        self._patterns = pn.FlexBox(css_classes=["heads-patterns"], sizing_mode="stretch_width")
        self._update_selection()
        self.selected = selected
        self._layout = self._build_layout()

    # ------------------------------------------------------------------ running
    @param.depends("run", watch=True)
    async def _on_run(self) -> None:
        await self.compute()

    async def _compute_once(self) -> None:
        # An empty field means "the default target"; a lone space is a real token, so no strip.
        target = self.target if self.target != "" else None
        started = time.perf_counter()
        try:
            request = HeadsRequest(self.prompt, target, self.seq_len, self.seed)
            scores, attention = await asyncio.to_thread(compute_heads, self.session, request)
            self._publish(scores, attention, time.perf_counter() - started)
        except Exception as e:  # bad input says what to do; a bug is logged; the previous charts stay
            self.error = error_text(e, "compute head scores", log)

    def _publish(self, scores: HeadScores, attention: AttentionResult, seconds: float) -> None:
        if self.history is not None:
            self.history.add(scores, f"head scores: {shorten(scores.request.prompt, 30)}")
        self.param.update(result=scores, attention=attention, error="",
                          status=self._status_text(scores, seconds))

    def _status_text(self, scores: HeadScores, seconds: float) -> str:
        dla = scores.attribution
        groups = "" if self.n_kv_heads == self.n_heads else f" ({self.n_kv_heads} KV groups)"
        return (f"**{scores.model}** · {scores.n_layers} layers × {scores.n_heads} heads{groups} · "
                f"{len(scores.tokens)} prompt tokens · DLA target {quote_token(dla.target)} "
                f"(logit {dla.logit:.2f}) · induction and duplicate on {scores.request.seq_len} random "
                f"tokens ×2 (seed {scores.request.seed}) · {seconds:.2f} s")

    # --------------------------------------------------------------- selecting
    def selected_heads(self) -> list[tuple[int, int]]:
        return [parse_head(chip) for chip in self.selected]

    def select_heads(self, heads: list[tuple[int, int]]) -> None:
        """Show these heads: the ones already shown keep their place and colour, new ones
        follow; beyond ``MAX_OVERLAY`` the oldest drop off."""
        wanted = list(dict.fromkeys((int(layer), int(head)) for layer, head in heads))
        kept = [h for h in self.selected_heads() if h in wanted]
        order = kept + [h for h in wanted if h not in kept]
        self.selected = [hc.chip_label(*h) for h in order[-MAX_OVERLAY:]]

    def click_head(self, layer: int, head: int, add: bool = False) -> None:
        """What a click on a grid cell does: select only this head (a click on the one head
        shown clears it); with ``add`` (shift/ctrl-click) add it, or remove it if shown."""
        current, clicked = self.selected_heads(), (int(layer), int(head))
        if add:
            heads = [h for h in current if h != clicked] if clicked in current else current + [clicked]
        else:
            heads = [] if current == [clicked] else [clicked]
        self.select_heads(heads)

    def _tap_handler(self, result: HeadScores):
        """A Bokeh Tap-event callback for one grid (bound to the result it shows)."""

        def on_tap(event) -> None:
            cell = hc.grid_cell(result, event.x, event.y)
            if cell is None or self.result is not result:  # outside the cells, or a replaced grid
                return
            modifiers = event.modifiers or {}
            self.click_head(*cell, add=bool(modifiers.get("shift") or modifiers.get("ctrl")))

        return on_tap

    @param.depends("selected", watch=True)
    def _trim_selection(self) -> None:
        if len(self.selected) > MAX_OVERLAY:  # e.g. typed into the chips: keep the newest
            self.selected = list(self.selected[-MAX_OVERLAY:])

    # ------------------------------------------------------------------ charts
    @param.depends("result", "score", "threshold", "selected", watch=True)
    def _update_grid(self) -> None:
        if self.result is None:
            return
        fig = hc.heads_grid(self.result, self.score, self.threshold, self.selected_heads(), self.n_kv_heads)
        fig.on_event(Tap, self._tap_handler(self.result))
        self._grid.object = fig

    @param.depends("result", "score", "threshold", watch=True)
    def _update_table(self) -> None:
        if self.result is None:
            return
        self._table.object = hc.heads_table(self.result, self.threshold, self.n_kv_heads, sort_by=self.score)

    @param.depends("attention", "selected", watch=True)
    def _update_selection(self) -> None:
        heads = self.selected_heads()
        if self.attention is None or not heads:
            self._lines.object = None
            self._patterns.objects = []
            self.selection_text = (
                "Press **Run** to see the selected heads' attention." if heads else
                "Click a head in the grid (shift-click adds one) or pick heads above to see "
                "their attention on the prompt.")
            return
        patterns = [self.attention.head(layer, head) for layer, head in heads]  # no model: cached arrays
        self._record(patterns)
        self._lines.object = hc.pattern_lines(patterns, self.n_heads, self.n_kv_heads)
        figures = [hc.pattern_figure(p, hc.head_color(i), self.n_heads, self.n_kv_heads)
                   for i, p in enumerate(patterns)]
        for fig in figures:
            # The test hook on the figure itself: a Bokeh pane made with an object does not
            # pass its own css_classes on to it (panel 1.9.4 does so only on later changes).
            fig.css_classes = ["heads-pattern"]
        self._patterns.objects = [pn.pane.Bokeh(fig) for fig in figures]
        shown = ", ".join(f"**{hc.head_label(p.layer, p.head)}** (KV group "
                          f"{hc.kv_group(p.head, self.n_heads, self.n_kv_heads)})" for p in patterns)
        self.selection_text = f"Attention of {shown} on the prompt ({len(self.attention.tokens)} tokens)."

    def _record(self, patterns: list[HeadPattern]) -> None:
        """Put the AttentionResult and each newly shown head's pattern into the history, once."""
        if self.history is None:
            return
        prompt = shorten(self.attention.request.prompt, 30)
        if self._recorded_for is not self.attention:
            self._recorded_for, self._recorded = self.attention, set()
            self.history.add(self.attention, f"attention patterns: {prompt}")
        for p in patterns:
            if (p.layer, p.head) not in self._recorded:
                self._recorded.add((p.layer, p.head))
                self.history.add(p, f"head pattern {hc.head_label(p.layer, p.head)}: {prompt}")

    # ------------------------------------------------------------------ layout
    def _build_layout(self) -> pn.viewable.Viewable:
        prompt = pn.widgets.TextAreaInput.from_param(
            self.param.prompt, max_length=TEXT_LIMIT, rows=2, auto_grow=True, max_rows=8,
            sizing_mode="stretch_width",
            placeholder="Type a prompt; repeat a phrase to see induction", css_classes=["heads-prompt"])
        target = pn.widgets.TextInput.from_param(self.param.target, width=170, css_classes=["heads-target"],
                                                 placeholder="default: final top-1")
        run = pn.widgets.Button.from_param(self.param.run, color="primary", width=120, height=36,
                                           margin=(26, 10, 10, 10), disabled=self.param.busy,
                                           css_classes=["heads-run"])
        score = pn.widgets.RadioButtonGroup.from_param(self.param.score, css_classes=["heads-score"],
                                                       margin=(26, 10, 10, 10))
        threshold = pn.widgets.FloatSlider.from_param(self.param.threshold, width=200,
                                                      css_classes=["heads-threshold"])
        heads = pn.widgets.MultiChoice.from_param(self.param.selected, width=320, max_items=MAX_OVERLAY,
                                                  placeholder="e.g. 17.4", css_classes=["heads-chips"])
        seq_len = pn.widgets.IntInput.from_param(self.param.seq_len, width=100)
        seed = pn.widgets.IntInput.from_param(self.param.seed, width=80)
        controls = pn.Column(
            pn.Row(prompt, target, run, sizing_mode="stretch_width"),
            pn.FlexBox(score, threshold, heads, seq_len, seed, align_items="flex-start",
                       sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )
        error = alert(self.param.error, "heads-error")
        status = pn.pane.Markdown(self.param.status, css_classes=["heads-status"], sizing_mode="stretch_width",
                                  margin=(0, 10))
        caption = pn.pane.Markdown(self.param.selection_text, css_classes=["heads-selection"],
                                   sizing_mode="stretch_width", margin=(0, 10))
        results = pn.Column(
            status,
            pn.FlexBox(self._grid, pn.Column(caption, self._lines, width=440), sizing_mode="stretch_width"),
            self._patterns,
            self._table,
            sizing_mode="stretch_width",
            loading=self.param.busy,  # the spinner while the model runs
            css_classes=["heads-results"],
        )
        return pn.Column(controls, error, results, sizing_mode="stretch_width", css_classes=["heads-view"])

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout
