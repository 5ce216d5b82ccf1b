"""The logit-lens view: a prompt (or two), a layers × positions heatmap, the target's curve.

State lives in parameters; the model runs in a worker thread (``asyncio.to_thread``) so the
page stays live; every chart is rebuilt by a pure builder from ``widgets.charts`` and swapped
into its pane (a Panel parameter change, safe on any thread; no Bokeh model is mutated).
"""
from __future__ import annotations

import asyncio
import html
import logging
import time

import panel as pn
import param

from explorer.analyses.lens import CompareRequest, LensComparison, LensRequest, LensResult, compare_prompts, logit_lens
from explorer.core.errors import ExplorerError
from explorer.core.session import ModelSession, fast_bfloat16
from explorer.persistence.history import History

from . import charts
from .live import QueuedRuns
from .parts import TEXT_LIMIT, alert, error_text, token_hint

log = logging.getLogger(__name__)

TOPK_CSS = """
.caption { font-weight: 600; margin-bottom: 6px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 2px 10px 2px 0; text-align: right; }
th { color: #666; font-weight: normal; border-bottom: 1px solid #ddd; }
td.tok, th:nth-child(2) { text-align: left; font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre; }
"""

# Up to this many positions, the heatmap leaves room for the target curve beside it.
BESIDE_MAX_POSITIONS = 8

METRIC_CHOICES = {"top-1 probability": "prob", "entropy": "entropy", "KL to final": "kl"}


class LogitLensView(QueuedRuns, pn.viewable.Viewer):
    """Logit lens of a prompt, optionally compared with a second one, for one ModelSession."""

    prompt = param.String(default="The capital of France is", label="Prompt",
                          doc="Text read through the lens.")
    compare = param.Boolean(default=False, label="Compare with a second prompt",
                            doc="Also run prompt B and compare the target curves.")
    prompt_b = param.String(default="", label="Prompt B", doc="The second prompt (compare mode).")
    target = param.String(default="", label="Target token",
                          doc="Token whose probability is tracked; empty = the final top-1 "
                              "at the last position. '#1234' names a token id.")
    metric = param.Selector(default="prob", objects=METRIC_CHOICES, label="Colour by",
                            doc="What colours the heatmap cells.")
    position = param.Integer(default=0, bounds=(0, 1), label="Position",
                             doc="Prompt position of the target curve (set to the last on a new prompt).")
    threshold = param.Number(default=0.1, bounds=(0.0, 1.0), step=0.01, label="Divergence threshold |Δp|",
                             doc="Compare mode: first layer where |p_B − p_A| exceeds this.")
    top_k = param.Integer(default=10, bounds=(1, 50), label="Top-k", doc="Tokens listed per cell.")
    unembed_dtype = param.Selector(default="auto", objects=["auto", "bfloat16"], label="Unembed dtype",
                                   doc="auto = the model's dtype (exact). bfloat16 is faster on GPUs and "
                                       "AMX/AVX512-BF16 CPUs, slower on other CPUs; ~97% top-1 agreement.")
    heatmap_of = param.Selector(default="A", objects=["A", "B"], label="Heatmap of prompt",
                                doc="Compare mode: which prompt the heatmap shows.")
    run = param.Event(label="Run lens", doc="Compute the lens for the current settings.")

    result = param.ClassSelector(class_=LensResult, default=None, allow_None=True,
                                 doc="The lens shown in the heatmap and target curve.")
    comparison = param.ClassSelector(class_=LensComparison, default=None, allow_None=True,
                                     doc="The last comparison (compare mode), else None.")
    divergence = param.String(default="", doc="One line: where the compared prompts diverge.")
    status = param.String(default="Type a prompt and press **Run lens**.", doc="Status line (markdown).")
    error = param.String(default="", doc="The last error shown to the user; empty when none.")
    busy = param.Boolean(default=False, doc="True while the model is running.")
    target_hint = param.String(default="", doc="A hint when the target is likely missing its leading space.")

    def __init__(self, session: ModelSession, history: History | None = None, **params) -> None:
        super().__init__(**params)
        self.session = session
        self.history = history  # where computed results are recorded (snapshots store it)
        # Bokeh panes stay visible (empty until a result comes): toggling `visible` together
        # with `object` makes panel 1.9.4's Bokeh pane copy the template's stylesheet models
        # from the figure onto itself, which fails validation.
        self._heatmap = pn.pane.Bokeh(None, css_classes=["lens-heatmap"], sizing_mode="stretch_width")
        self._curve = pn.pane.Bokeh(None, css_classes=["lens-target-curve"], sizing_mode="stretch_width")
        self._compare_chart = pn.pane.Bokeh(None, css_classes=["lens-compare-chart"],
                                            sizing_mode="stretch_width")
        self._topk = pn.pane.HTML("", css_classes=["lens-topk"], width=300,
                                  visible=False, margin=(10, 10, 10, 20), stylesheets=[TOPK_CSS])
        # A long prompt's heatmap shows a window of positions (chart_style), never a wider canvas.
        self._heat_box = pn.Column(self._heatmap, sizing_mode="stretch_width")
        self._picked = False   # the user chose a position (slider or cell) since the prompts last changed
        self._placing = False  # the view itself is moving the position
        # Short prompts: target curve and top-k beside the heatmap; long prompts: below it.
        self._beside = pn.Row(sizing_mode="stretch_width")
        self._below = pn.Row(sizing_mode="stretch_width")
        self._wide: bool | None = None
        self._arrange(wide=False)
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
            if self.compare:
                if not self.prompt_b.strip():
                    raise ExplorerError("prompt B is empty: type a second prompt, or untick Compare")
                request = CompareRequest(self.prompt, self.prompt_b, target, self.top_k, self.unembed_dtype)
                comparison = await asyncio.to_thread(compare_prompts, self.session, request)
                result = comparison.a if self.heatmap_of == "A" else comparison.b
            else:
                request = LensRequest(self.prompt, target, self.top_k, self.unembed_dtype)
                comparison = None
                result = await asyncio.to_thread(logit_lens, self.session, request)
            # Back on the event loop: publish everything in one batch of parameter changes.
            self._publish(result, comparison, time.perf_counter() - started)
        except Exception as e:  # bad input says what to do; a bug is logged; the previous charts stay
            self.error = error_text(e, "run the lens", log)

    def _publish(self, result: LensResult, comparison: LensComparison | None, seconds: float) -> None:
        if self.history is not None:
            if comparison is not None:
                self.history.add(comparison, f"lens comparison: {charts.shorten(self.prompt, 30)}")
            else:
                self.history.add(result, f"logit lens: {charts.shorten(self.prompt, 30)}")
        self._show(result, comparison=comparison, error="",
                   status=self._status_text(result, comparison, seconds))

    def _show(self, result: LensResult, **more) -> None:
        """Show a result at the last position, unless the user picked another on this same prompt."""
        last = result.n_positions - 1
        same_prompt = self.result is not None and list(self.result.tokens) == list(result.tokens)
        position = min(self.position, last) if same_prompt and self._picked else last
        self._placing = True
        try:
            self.param.position.bounds = (0, max(1, last))  # a slider needs start < end
            self.param.update(result=result, position=position, **more)
        finally:
            self._placing = False

    @param.depends("position", watch=True)
    def _on_position(self) -> None:
        if not self._placing:
            self._picked = True

    @param.depends("prompt", "prompt_b", "compare", watch=True)
    def _on_new_prompt(self) -> None:
        self._picked = False  # a new prompt or a compare run starts at the last position

    @param.depends("target", watch=True)
    def _update_target_hint(self) -> None:
        self.target_hint = token_hint(self.session, self.target)

    def _status_text(self, result: LensResult, comparison: LensComparison | None, seconds: float) -> str:
        final = result.top_probs[-1, -1, 0]
        text = (f"**{result.model}** · {result.n_positions} tokens × {result.n_rows} rows · "
                f"final prediction {charts.quote_token(result.top_tokens[-1, -1, 0])} (p = {final:.2f}) · "
                f"target {charts.quote_token(result.target)} · {seconds:.2f} s")
        if comparison is not None:
            text += f" · heatmap: prompt {self.heatmap_of}"
        return text

    # --------------------------------------------------------------- cell taps
    def _tap_handler(self, source, result: LensResult):
        """A Bokeh on_change callback for one heatmap's cells (bound to the result it shows)."""

        def on_tap(attr, old, new) -> None:
            if new and self.result is result:  # ignore taps on a heatmap already replaced
                self.select_cell(source.data["row"][new[0]], source.data["pos"][new[0]])

        return on_tap

    def select_cell(self, row: int, pos: int) -> None:
        """Select a cell as a tap does: its position, its top-1 token as the target; re-run."""
        result = self.result
        token_id = int(result.top_ids[row, pos, 0])
        self.param.update(position=pos, target=self._target_text(str(result.top_tokens[row, pos, 0]), token_id))
        self.param.trigger("run")

    def _target_text(self, token: str, token_id: int) -> str:
        """The token as text when that text names it back, else '#id' (e.g. byte-piece tokens)."""
        try:
            if self.session.token_id(token) == token_id:
                return token
        except ExplorerError:
            pass
        return f"#{token_id}"

    # ------------------------------------------------------------------ charts
    @param.depends("result", "metric", "position", watch=True)
    def _update_heatmap(self) -> None:
        if self.result is None:
            return
        self._arrange(wide=self.result.n_positions > BESIDE_MAX_POSITIONS)
        fig = charts.lens_heatmap(self.result, self.metric, self.position)
        source = fig.select_one({"name": charts.HEATMAP_SOURCE})
        source.selected.on_change("indices", self._tap_handler(source, self.result))
        self._heatmap.object = fig

    def _arrange(self, wide: bool) -> None:
        if wide == self._wide:
            return
        self._wide = wide
        if wide:
            self._beside.objects = [self._heat_box]
            self._below.objects = [self._curve, self._topk]
        else:
            self._beside.objects = [self._heat_box, pn.Column(self._curve, self._topk, width=430)]
            self._below.objects = []

    @param.depends("result", "position", watch=True)
    def _update_curve(self) -> None:
        if self.result is None:
            return
        self._curve.object = charts.target_curve(self.result, self.position)
        self._topk.param.update(object=self._topk_html(), visible=True)

    @param.depends("comparison", "threshold", watch=True)
    def _update_compare(self) -> None:
        if self.comparison is None:
            self._compare_chart.object = None
            self.divergence = ""
            return
        self._compare_chart.object = charts.comparison_chart(self.comparison, self.threshold)
        self.divergence = charts.describe_divergence(self.comparison, self.threshold)

    @param.depends("heatmap_of", watch=True)
    def _update_heatmap_of(self) -> None:
        if self.comparison is not None:
            self._show(self.comparison.a if self.heatmap_of == "A" else self.comparison.b)

    def _topk_html(self) -> str:
        """The final layer's top-k at the selected position, as a small HTML table."""
        result = self.result
        pos = min(self.position, result.n_positions - 1)
        rows = "".join(
            f"<tr><td>{i}</td><td class='tok'>{html.escape(charts.quote_token(tok))}</td><td>{p:.3f}</td></tr>"
            for i, (tok, p) in enumerate(zip(result.top_tokens[-1, pos], result.top_probs[-1, pos]), 1)
        )
        caption = f"Final layer, position {pos} ({html.escape(charts.quote_token(result.tokens[pos]))})"
        return (f"<div class='caption'>{caption}</div>"
                f"<table><tr><th>#</th><th>token</th><th>p</th></tr>{rows}</table>")

    # ------------------------------------------------------------------ layout
    def _build_layout(self) -> pn.viewable.Viewable:
        prompt = pn.widgets.TextAreaInput.from_param(
            self.param.prompt, rows=2, auto_grow=True, max_rows=8, sizing_mode="stretch_width",
            max_length=TEXT_LIMIT, placeholder="Type a prompt, e.g. The capital of France is",
            css_classes=["lens-prompt"])
        prompt_b = pn.widgets.TextAreaInput.from_param(
            self.param.prompt_b, rows=2, auto_grow=True, max_rows=8, sizing_mode="stretch_width",
            max_length=TEXT_LIMIT, placeholder="e.g. The capital of France is London. The capital of France is",
            css_classes=["lens-prompt-b"], visible=self.param.compare)
        target = pn.widgets.TextInput.from_param(self.param.target, width=170, css_classes=["lens-target"],
                                                 placeholder="default: final top-1")
        run = pn.widgets.Button.from_param(self.param.run, color="primary", width=120, height=36,
                                           margin=(26, 10, 10, 10), disabled=self.param.busy,
                                           css_classes=["lens-run"])
        compare = pn.widgets.Checkbox.from_param(self.param.compare, css_classes=["lens-compare"],
                                                 margin=(8, 10, 4, 10))
        metric = pn.widgets.RadioButtonGroup.from_param(self.param.metric, css_classes=["lens-metric"],
                                                        margin=(26, 10, 10, 10))
        position = pn.widgets.IntSlider.from_param(self.param.position, width=200,
                                                   disabled=self.param.result.rx.is_(None),
                                                   css_classes=["lens-position"])
        threshold = pn.widgets.FloatSlider.from_param(self.param.threshold, width=200,
                                                      visible=self.param.compare,
                                                      css_classes=["lens-threshold"])
        heatmap_of = pn.widgets.RadioButtonGroup.from_param(self.param.heatmap_of, width=90,
                                                            margin=(26, 10, 10, 10),
                                                            visible=self.param.compare)
        top_k = pn.widgets.IntInput.from_param(self.param.top_k, width=80)
        # Say on the option itself whether bfloat16 pays off on this machine.
        bf16 = "bfloat16 (fast here)" if fast_bfloat16(self.session.device) else "bfloat16 (slower here)"
        dtype = pn.widgets.Select.from_param(self.param.unembed_dtype, width=170,
                                             options={"auto (model dtype)": "auto", bf16: "bfloat16"})
        controls = pn.Column(
            pn.Row(prompt, target, run, sizing_mode="stretch_width"),
            compare,
            prompt_b,
            # A FlexBox wraps its items onto a second line when the page is narrow.
            pn.FlexBox(metric, position, threshold, heatmap_of, top_k, dtype, align_items="flex-start",
                       sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )
        error = alert(self.param.error, "lens-error")
        hint = pn.pane.Markdown(self.param.target_hint, css_classes=["lens-target-hint"], margin=(0, 10),
                                visible=self.param.target_hint.rx.bool(), styles={"color": "#664d03"},
                                sizing_mode="stretch_width")
        status = pn.pane.Markdown(self.param.status, css_classes=["lens-status"], sizing_mode="stretch_width",
                                  margin=(0, 10))
        divergence = pn.pane.Markdown(self.param.divergence.rx.pipe(lambda s: f"**{s}**" if s else ""),
                                      css_classes=["lens-divergence"], visible=self.param.divergence.rx.bool(),
                                      sizing_mode="stretch_width", margin=(0, 10))
        results = pn.Column(
            status,
            self._beside,
            self._below,
            divergence,
            self._compare_chart,
            sizing_mode="stretch_width",
            loading=self.param.busy,  # the spinner while the model runs
            css_classes=["lens-results"],
        )
        return pn.Column(controls, hint, error, results, sizing_mode="stretch_width", css_classes=["lens-view"])

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout
