"""The neuron view's card part: a neuron's token pattern, stored explanations with their scores
(Explain writes and scores one with the attached model, as a job), statistics, histogram, top
and random examples shaded by activation (re-running the model on the stored windows; cached
per neuron), and "Ablate this neuron".
"""
from __future__ import annotations

import asyncio
import html
import logging
import math
from collections import OrderedDict
from collections.abc import Callable

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.core.jobs import DONE, Job
from explorer.core.session import ModelSession
from explorer.neurons.describe import (
    DescriptionStore,
    ExampleActivations,
    Explanation,
    TokenListExplainer,
    example_activations,
    explain_neuron,
    token_pattern,
)
from explorer.neurons.index import NeuronHistogram, NeuronIndex, NeuronStats
from explorer.persistence.history import History

from . import neuron_charts
from .chart_style import neuron_spec
from .live import LiveJob
from .parts import EXPLAINERS, RunState, error_text, explainer_param, job_running

log = logging.getLogger(__name__)

CARD_CSS = """
.ncard-title { font-size: 17px; font-weight: 600; margin: 2px 0 4px 0; }
table.nstats { border-collapse: collapse; font-size: 12px; margin-top: 4px; }
table.nstats th { text-align: left; font-weight: normal; color: #666; padding: 1px 10px 1px 0; }
table.nstats td { text-align: right; padding: 1px 8px 1px 0; font-variant-numeric: tabular-nums; }
.ndesc { font-size: 13px; margin: 3px 0; }
.ndesc .src { color: #666; font-size: 11px; }
.ndesc .score { font-variant-numeric: tabular-nums; }
.ndesc.none { color: #666; }
"""

EXAMPLES_PX = 460  # height of the card's example lists (they scroll)
EXAMPLES_CACHE = 32  # neurons whose per-token activations are kept (two small arrays each)


class CardPart(pn.viewable.Viewer):
    """One neuron's card; ``on_ablate(specs)`` hears "Ablate this neuron"."""

    layer = param.Integer(default=0, label="Layer")
    neuron = param.Integer(default=0, label="Neuron")
    show = param.Event(label="Open neuron", doc="Open the card of (layer, neuron).")
    stats = param.ClassSelector(class_=NeuronStats, default=None, allow_None=True)
    histogram = param.ClassSelector(class_=NeuronHistogram, default=None, allow_None=True)
    top = param.ClassSelector(class_=ExampleActivations, default=None, allow_None=True,
                              doc="The card's top examples (per-token activations once computed).")
    random = param.ClassSelector(class_=ExampleActivations, default=None, allow_None=True)
    descriptions = param.List(default=[], doc="Stored descriptions of the card's neuron.")
    pattern_text = param.String(default="")
    examples_busy = param.Boolean(default=False, doc="True while per-token activations are computed.")
    explain = param.Event(label="Explain", doc="Write and score an explanation with the chosen explainer.")
    explainer = explainer_param()
    explaining = param.Boolean(default=False)
    explanation = param.ClassSelector(class_=Explanation, default=None, allow_None=True,
                                      doc="The last explanation written here.")
    explain_status = param.String(default="")
    ablate_this = param.Event(label="Ablate this neuron")

    def __init__(self, session: ModelSession, state: RunState, on_ablate: Callable[[tuple[str, ...]], None],
                 history: History | None = None, background: bool = True, **params) -> None:
        """``state``: the view's shared status/error line."""
        super().__init__(**params)
        self.session, self.state, self._on_ablate, self.history = session, state, on_ablate, history
        self.background = background  # False: jobs run on the caller's thread (notebooks, tests)
        self.index: NeuronIndex | None = None
        self.model_note = ""  # why the attached model cannot run on the index; empty when it can
        self._explain_job = LiveJob(lambda progress, partial: None, self._on_explain_finish)
        self._examples: OrderedDict[tuple, tuple[ExampleActivations, ExampleActivations]] = OrderedDict()
        self._card_key: tuple | None = None
        self._computing = 0  # example-activation runs in flight
        self._histogram = pn.pane.Bokeh(None, css_classes=["neuron-histogram"], sizing_mode="stretch_width")
        self._top_html = pn.pane.HTML("", css_classes=["neuron-top-examples"], sizing_mode="stretch_width",
                                      stylesheets=[neuron_charts.EXAMPLES_CSS])
        self._random_html = pn.pane.HTML("", css_classes=["neuron-random-examples"], sizing_mode="stretch_width",
                                         stylesheets=[neuron_charts.EXAMPLES_CSS])
        self._card_html = pn.pane.HTML("", css_classes=["neuron-card-info"], sizing_mode="stretch_width",
                                       stylesheets=[CARD_CSS])
        self._layout = self._build()

    def set_index(self, index: NeuronIndex, model_note: str = "") -> None:
        """A new index: the card is cleared; ``model_note`` says why the model cannot run on it."""
        self.index, self.model_note = index, model_note
        self._examples.clear()
        self._card_key = None
        self.param.update(stats=None, histogram=None, top=None, random=None, descriptions=[], pattern_text="",
                          explanation=None, explain_status="")

    def close(self) -> None:
        """Stop a running Explain."""
        self._explain_job.cancel()

    # ================================================================= the card
    def select_neuron(self, layer: int, neuron: int) -> None:
        """Open a neuron's card (as a hit, a tap or the Open button does)."""
        self.param.update(layer=layer, neuron=neuron)
        self.param.trigger("show")

    @param.depends("show", watch=True)
    async def _on_show(self) -> None:
        await self.open_neuron()

    async def open_neuron(self, layer: int | None = None, neuron: int | None = None) -> None:
        """Show the card of (layer, neuron): stored data at once, then every token's activation."""
        if layer is not None or neuron is not None:
            self.param.update(layer=self.layer if layer is None else layer,
                              neuron=self.neuron if neuron is None else neuron)
        index, layer, neuron = self.index, self.layer, self.neuron
        if index is None:
            self.state.error = "**No index is open:** open or build one first."
            return
        key = (str(index.path), index.tokens_done, layer, neuron)
        try:
            index.check_neuron(layer, neuron)
            stats = index.stats(layer, neuron)
            hist = index.histogram(layer, neuron)
            pattern = token_pattern(index, layer, neuron)
            descriptions = DescriptionStore(index.path).for_neuron(layer, neuron)
            cached = self._examples.get(key)
            top, rand = cached if cached is not None else example_activations(index, layer, neuron)
        except ExplorerError as e:
            self.state.error = f"**Could not open the neuron:** {e}"
            return
        self._card_key = key
        self.param.update(stats=stats, histogram=hist, top=top, random=rand, descriptions=descriptions,
                          pattern_text=pattern.summary, explanation=None, explain_status="")
        self.state.param.update(error="", status=self._card_status(layer, neuron, cached is not None))
        if self.history is not None:
            label = f"neuron {neuron_spec(layer, neuron)}"
            for result, what in ((stats, "stats"), (hist, "histogram"), (pattern, "token pattern")):
                self.history.add(result, f"{label} {what}")
        if cached is None and not self.model_note:
            self._computing += 1
            self.examples_busy = True
            try:
                top, rand = await asyncio.to_thread(example_activations, index, layer, neuron, self.session)
            except Exception as e:
                self.state.error = error_text(e, "compute the examples' activations", log)
                return
            finally:
                self._computing -= 1
                self.examples_busy = self._computing > 0  # another neuron's run may still be going
            self._examples[key] = (top, rand)
            while len(self._examples) > EXAMPLES_CACHE:
                self._examples.popitem(last=False)
            if self._card_key == key:  # the user may have opened another neuron meanwhile
                self.param.update(top=top, random=rand)
                self.state.status = self._card_status(layer, neuron, True)
        if self.history is not None and self._card_key == key:
            self.history.add(self.top, f"neuron {neuron_spec(layer, neuron)} top examples")
            self.history.add(self.random, f"neuron {neuron_spec(layer, neuron)} random examples")

    def _card_status(self, layer: int, neuron: int, computed: bool) -> str:
        if self.model_note:
            return f"**Neuron {neuron_spec(layer, neuron)}** · stored data only: {self.model_note}"
        if not computed:
            return (f"**Neuron {neuron_spec(layer, neuron)}** · computing every example token's activation "
                    f"(the model re-reads the stored windows up to layer {layer})…")
        return (f"**Neuron {neuron_spec(layer, neuron)}** · every token shaded by its activation "
                "(the model on the stored windows)")

    @param.depends("stats", "histogram", watch=True)
    def _update_histogram(self) -> None:
        if self.histogram is not None:
            self._histogram.object = neuron_charts.activation_histogram(self.histogram, self.stats)

    @param.depends("top", "random", watch=True)
    def _update_examples(self) -> None:
        scale = None
        if self.stats is not None and math.isfinite(self.stats.max) and self.stats.max > 0:
            scale = self.stats.max  # one colour scale for top and random examples: the neuron's max
        self._top_html.object = neuron_charts.examples_html(self.top, scale) if self.top is not None else ""
        self._random_html.object = neuron_charts.examples_html(self.random, scale) if self.random is not None else ""

    @param.depends("stats", "descriptions", "pattern_text", "explanation", watch=True)
    def _update_card(self) -> None:
        self._card_html.object = self.card_html() if self.stats is not None else ""

    def card_html(self) -> str:
        """The card's text part: title, token pattern, descriptions with scores, statistics."""
        s = self.stats
        parts = [f"<div class='ncard-title'>Layer {s.layer} · neuron {s.neuron}</div>",
                 f"<div class='ndesc pattern'><span class='src'>token pattern</span> "
                 f"{html.escape(self.pattern_text)}</div>"]
        if self.descriptions:
            for d in self.descriptions:
                if d.get("score") is not None:
                    score = f"score {float(d['score']):.3f}"
                elif d.get("kind") == "explanation":
                    score = "score undefined"
                else:
                    score = ""
                note = d.get("score_note") or ""
                if d.get("kind") == "explanation" and str(d.get("source", "")).startswith("session:"):
                    # Written and scored by the attached model: say what the number is.
                    note = (f"{note}. Score = correlation of the explainer's simulated activations with the "
                            "true ones; small models explain weakly, so low scores are expected.").lstrip(". ")
                text = d.get("description") or "(no explanation written)"
                parts.append(
                    f"<div class='ndesc described'><span class='src'>{html.escape(str(d.get('source')))} · "
                    f"{html.escape(str(d.get('kind')))}</span> {html.escape(text)} "
                    f"<span class='score'>{html.escape(score)}</span>"
                    + (f"<div class='src note'>{html.escape(note)}</div>" if note else "") + "</div>")
        else:
            parts.append("<div class='ndesc none'>No written explanation yet: press Explain (slow), or import "
                         "descriptions with <code>python -m explorer neurons import</code>.</div>")
        rows = [("max", f"{s.max:.4g}"), ("mean", f"{s.mean:.3g}"), ("std", f"{s.std:.3g}"), ("min", f"{s.min:.3g}"),
                ("fires (> 0) on", f"{s.frequency:.1%} of {s.tokens:,} tokens")]
        rows += [(f"p{100 * q:g} ≈", f"{v:.3g}") for q, v in zip(s.quantile_levels, s.quantiles)
                 if q in (0.5, 0.9, 0.99, 0.999)]
        cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        parts.append(f"<table class='nstats'>{cells}</table>")
        return "".join(parts)

    # ----------------------------------------------------------------- explain
    @param.depends("explain", watch=True)
    def _on_explain(self) -> None:
        self.start_explain()

    def start_explain(self) -> Job | None:
        """Explain the card's neuron with the attached model (a job: slow; the score is shown as it is)."""
        if job_running(self._explain_job):
            return self._explain_job.job
        if self.index is None or self.stats is None:
            self.state.error = "**Nothing to explain:** open a neuron first."
            return None
        if self.model_note:
            self.state.error = f"**Cannot explain:** {self.model_note}"
            return None
        index, session, layer, neuron = self.index, self.session, self.stats.layer, self.stats.neuron
        spec = EXPLAINERS[self.explainer]
        self.state.error = ""
        self.param.update(explaining=True, explain_status=(
            f"Explaining neuron {neuron_spec(layer, neuron)} by its firing tokens, scored on held-out examples…"
            if spec == TokenListExplainer.name else
            f"Explaining neuron {neuron_spec(layer, neuron)} with {session.name}: it writes an explanation from "
            "the top examples, then simulates activations to score it (tens of seconds on a CPU)…"))

        def run(ctx):
            return explain_neuron(session, index=index, layer=layer, neuron=neuron,
                                  explainer=spec)

        return self._explain_job.start(run, name="explain-neuron", background=self.background)

    def _on_explain_finish(self, job: Job) -> None:
        self.explaining = False
        if job.status != DONE or job.result is None:
            self.explain_status = ""
            self.state.error = f"**Could not explain the neuron:** {job.error}"
            return
        e: Explanation = job.result
        if self.history is not None:
            self.history.add(e, f"neuron {neuron_spec(e.layer, e.neuron)} explanation")
        weak = ("" if e.explainer == TokenListExplainer.name else
                " The explainer is the attached model; a small model writes weak explanations and "
                "simulates poorly, so a low score is the honest result.")
        self.explain_status = (f"Neuron {neuron_spec(e.layer, e.neuron)}: “{e.explanation or '(no explanation)'}” · "
                               f"score {e.score_text} ({e.score_note}; {e.n_top} top + {e.n_random} random "
                               "examples)." + weak)
        same = self.stats is not None and (self.stats.layer, self.stats.neuron) == (e.layer, e.neuron)
        if self.index is not None and same:
            self.param.update(explanation=e,
                              descriptions=DescriptionStore(self.index.path).for_neuron(e.layer, e.neuron))

    # ----------------------------------------------------------------- ablate
    @param.depends("ablate_this", watch=True)
    def _on_ablate_this(self) -> None:
        if self.stats is None:
            self.state.error = "**Nothing to ablate:** open a neuron first."
            return
        self._on_ablate((f"{self.stats.layer}:{self.stats.neuron}",))

    def controls(self) -> pn.Row:
        """Layer, neuron and *Open neuron* (the view puts them under the search)."""
        layer = pn.widgets.IntInput.from_param(self.param.layer, width=90, css_classes=["neuron-layer"])
        neuron = pn.widgets.IntInput.from_param(self.param.neuron, width=110, css_classes=["neuron-neuron"])
        show = pn.widgets.Button.from_param(self.param.show, width=120, margin=(26, 10, 10, 10),
                                            css_classes=["neuron-show"])
        return pn.Row(layer, neuron, show)

    def _build(self) -> pn.Column:
        explain = pn.widgets.Button.from_param(self.param.explain, width=110, disabled=self.param.explaining,
                                               loading=self.param.explaining, css_classes=["neuron-explain"])
        ablate_this = pn.widgets.Button.from_param(self.param.ablate_this, width=170,
                                                   disabled=self.param.stats.rx.is_(None),
                                                   css_classes=["neuron-ablate-this"])
        explain_status = pn.pane.Markdown(self.param.explain_status, css_classes=["neuron-explain-status"],
                                          visible=self.param.explain_status.rx.bool(), sizing_mode="stretch_width")
        # Fixed-height scroll boxes: with max_height the tabs took the examples' full height, a
        # blank gap of ~1,300 px before "Run on prompt" (issue 15, 6).
        examples = pn.Tabs(("Top examples", pn.Column(self._top_html, height=EXAMPLES_PX, scroll="y-auto",
                                                      sizing_mode="stretch_width")),
                           ("Random examples", pn.Column(self._random_html, height=EXAMPLES_PX, scroll="y-auto",
                                                         sizing_mode="stretch_width")),
                           sizing_mode="stretch_width", loading=self.param.examples_busy,
                           css_classes=["neuron-examples"])
        card = pn.Column(
            pn.Row(pn.Column(self._card_html, pn.Row(explain, ablate_this),
                             pn.widgets.Select.from_param(self.param.explainer, width=170), explain_status, width=380),
                   pn.Column(self._histogram, min_width=360, sizing_mode="stretch_width"),
                   sizing_mode="stretch_width"),
            examples,
            sizing_mode="stretch_width", visible=self.param.stats.rx.is_not(None),
            css_classes=["neuron-card"])
        return card

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout
