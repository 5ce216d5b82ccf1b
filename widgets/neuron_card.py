"""The neuron view's card part: a neuron's token pattern, stored explanations with their scores
(Explain writes and scores one with the attached model, as a job), statistics, histogram, top
and random examples shaded by activation (re-running the model on the stored windows; cached
per neuron), its activation on a prompt, and "Ablate this neuron".

A mixin of params and methods: ``NeuronView`` combines it with the index and the search.
"""
from __future__ import annotations

import asyncio
import html
import logging
import math

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.core.jobs import DONE, Job
from explorer.neurons.describe import (
    DescriptionStore,
    ExampleActivations,
    Explanation,
    example_activations,
    explain_neuron,
    token_pattern,
)
from explorer.neurons.index import (
    NeuronHistogram,
    NeuronStats,
    PromptActivation,
    prompt_activation,
)

from . import neuron_charts
from .chart_style import neuron_spec
from .parts import TEXT_LIMIT, error_text, job_running

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


class CardPart(param.Parameterized):
    """One neuron's card (the host view provides session, history, index, error, busy)."""

    # ----------------------------------------------------------------- the card
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

    explain = param.Event(label="Explain", doc="Write and score an explanation with the attached model.")
    explaining = param.Boolean(default=False)
    explanation = param.ClassSelector(class_=Explanation, default=None, allow_None=True,
                                      doc="The last explanation written here.")
    explain_status = param.String(default="")

    prompt = param.String(default="The nurse said that she would be late.", label="Prompt",
                          doc="Text to read the neuron's activation on.")
    run_prompt = param.Event(label="Run on prompt")
    prompt_result = param.ClassSelector(class_=PromptActivation, default=None, allow_None=True)
    prompt_busy = param.Boolean(default=False)

    ablate_this = param.Event(label="Ablate this neuron")
    ablate_hits = param.Event(label="Ablate all hits")
    ablate_request = param.ClassSelector(class_=tuple, default=(),
                                         doc="Component specs ('5:123') to select in the ablation tab; "
                                             "set by the ablate buttons.")

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
            self.error = "**No index is open:** open or build one first."
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
            self.error = f"**Could not open the neuron:** {e}"
            return
        self._card_key = key
        self.param.update(stats=stats, histogram=hist, top=top, random=rand, descriptions=descriptions,
                          pattern_text=pattern.summary, explanation=None, explain_status="", error="",
                          status=self._card_status(layer, neuron, cached is not None))
        if self.history is not None:
            label = f"neuron {neuron_spec(layer, neuron)}"
            for result, what in ((stats, "stats"), (hist, "histogram"), (pattern, "token pattern")):
                self.history.add(result, f"{label} {what}")
        if cached is None and self._model_ok:
            self._computing += 1
            self.examples_busy = True
            try:
                top, rand = await asyncio.to_thread(example_activations, index, layer, neuron, self.session)
            except Exception as e:
                self.error = error_text(e, "compute the examples' activations", log)
                return
            finally:
                self._computing -= 1
                self.examples_busy = self._computing > 0  # another neuron's run may still be going
            self._examples[key] = (top, rand)
            while len(self._examples) > EXAMPLES_CACHE:
                self._examples.popitem(last=False)
            if self._card_key == key:  # the user may have opened another neuron meanwhile
                self.param.update(top=top, random=rand, status=self._card_status(layer, neuron, True))
        if self.history is not None and self._card_key == key:
            self.history.add(self.top, f"neuron {neuron_spec(layer, neuron)} top examples")
            self.history.add(self.random, f"neuron {neuron_spec(layer, neuron)} random examples")

    def _card_status(self, layer: int, neuron: int, computed: bool) -> str:
        if not self._model_ok:
            return f"**Neuron {neuron_spec(layer, neuron)}** · stored data only: {self._model_note}"
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
            self.error = "**Nothing to explain:** open a neuron first."
            return None
        if not self._model_ok:
            self.error = f"**Cannot explain:** {self._model_note}"
            return None
        index, session, layer, neuron = self.index, self.session, self.stats.layer, self.stats.neuron
        self.param.update(explaining=True, error="", explain_status=(
            f"Explaining neuron {neuron_spec(layer, neuron)} with {session.name}: it writes an explanation from "
            "the top examples, then simulates activations to score it (tens of seconds on a CPU)…"))

        def run(ctx):
            return explain_neuron(session, index=index, layer=layer, neuron=neuron)

        return self._explain_job.start(run, name="explain-neuron", background=self.background)

    def _on_explain_finish(self, job: Job) -> None:
        self.explaining = False
        if job.status != DONE or job.result is None:
            self.explain_status = ""
            self.error = f"**Could not explain the neuron:** {job.error}"
            return
        e: Explanation = job.result
        if self.history is not None:
            self.history.add(e, f"neuron {neuron_spec(e.layer, e.neuron)} explanation")
        weak = (" The explainer is the attached model; a small model writes weak explanations and "
                "simulates poorly, so a low score is the honest result.")
        self.explain_status = (f"Neuron {neuron_spec(e.layer, e.neuron)}: “{e.explanation or '(no explanation)'}” · "
                               f"score {e.score_text} ({e.score_note}; {e.n_top} top + {e.n_random} random "
                               "examples)." + weak)
        same = self.stats is not None and (self.stats.layer, self.stats.neuron) == (e.layer, e.neuron)
        if self.index is not None and same:
            self.param.update(explanation=e,
                              descriptions=DescriptionStore(self.index.path).for_neuron(e.layer, e.neuron))

    # ----------------------------------------------------------------- prompt
    @param.depends("run_prompt", watch=True)
    async def _on_run_prompt(self) -> None:
        await self.compute_prompt()

    async def compute_prompt(self) -> None:
        """The card's neuron (or layer/neuron) on the prompt, without blocking the loop."""
        layer, neuron = (self.stats.layer, self.stats.neuron) if self.stats is not None else (self.layer, self.neuron)
        if self.index is not None and not self._model_ok:
            self.error = f"**Cannot run the prompt:** {self._model_note}"
            return
        self.prompt_busy = True
        try:
            result = await asyncio.to_thread(prompt_activation, self.session, self.prompt, layer=layer, neuron=neuron)
        except Exception as e:
            self.error = error_text(e, "run the prompt", log)
            return
        finally:
            self.prompt_busy = False
        if self.history is not None:
            self.history.add(result, f"neuron {neuron_spec(layer, neuron)} on a prompt")
        self.param.update(prompt_result=result, error="")

    @param.depends("prompt_result", watch=True)
    def _update_prompt_chart(self) -> None:
        if self.prompt_result is not None:
            self._prompt_chart.object = neuron_charts.prompt_activation_chart(self.prompt_result)

    # ----------------------------------------------------------------- ablate
    def request_ablation(self, specs: tuple[str, ...]) -> None:
        """Ask for these components in the ablation tab (fires even if the request repeats)."""
        if not specs:
            self.error = "**Nothing to ablate:** open a neuron or search first."
            return
        if tuple(specs) == self.ablate_request:
            self.param.trigger("ablate_request")
        else:
            self.ablate_request = tuple(specs)

    @param.depends("ablate_this", watch=True)
    def _on_ablate_this(self) -> None:
        self.request_ablation((f"{self.stats.layer}:{self.stats.neuron}",) if self.stats is not None else ())

    @param.depends("ablate_hits", watch=True)
    def _on_ablate_hits(self) -> None:
        self.request_ablation(self.hit_specs())

    def _card_layout(self) -> pn.Column:
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
        prompt = pn.widgets.TextInput.from_param(self.param.prompt, max_length=TEXT_LIMIT,
                                                 sizing_mode="stretch_width",
                                                 css_classes=["neuron-prompt"])
        run_prompt = pn.widgets.Button.from_param(self.param.run_prompt, width=140, margin=(26, 10, 10, 10),
                                                  disabled=self.param.prompt_busy, css_classes=["neuron-run-prompt"])
        card = pn.Column(
            pn.Row(pn.Column(self._card_html, pn.Row(explain, ablate_this), explain_status, width=380),
                   pn.Column(self._histogram, min_width=360, sizing_mode="stretch_width"),
                   sizing_mode="stretch_width"),
            examples,
            pn.Row(prompt, run_prompt, sizing_mode="stretch_width"),
            pn.Column(self._prompt_chart, loading=self.param.prompt_busy, sizing_mode="stretch_width"),
            sizing_mode="stretch_width", visible=self.param.stats.rx.is_not(None),
            css_classes=["neuron-card"])
        return card
