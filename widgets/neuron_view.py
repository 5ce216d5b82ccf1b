"""The neuron view: open or build a neuron index, search descriptions, open a neuron's card.

- **Index**: open an index directory (or one found in the cache for this model), or build one
  over a corpus as a ``LiveJob`` (progress bar with tokens/s and time left; Cancel keeps a
  checkpoint and Build / Resume continues it); the view opens the index when the build is done.
- **Search**: description text (token patterns, written and imported explanations) or a token
  the neuron fires on (``token:`` prefix or the token mode); pick a hit to open its card.
- **Card**: the token pattern, stored explanations with their scores (Explain runs
  ``explain_neuron`` with the attached model as a job; its score is shown as it is), statistics,
  the activation histogram, top and random examples with every token shaded by its activation
  (from re-running the model on the stored token ids; cached per neuron), and the neuron's
  activation on a prompt.
- **Ablate**: ``ablate_request`` (a tuple of specs like ``"5:123"``) is set for this neuron or for
  every search hit; the app hands it to the ablation tab.
- **Overview**: the most selective neurons of every layer; click a point to open it.

Model work runs in worker threads (``asyncio.to_thread`` or a job); every result is recorded
in ``history``. Errors are shown in the view and the previous card is kept.
"""
from __future__ import annotations

import asyncio
import html
import json
import logging
import math
from collections import OrderedDict
from pathlib import Path

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.core.jobs import CANCELLED, DONE, RUNNING, Job
from explorer.core.session import ModelSession
from explorer.neurons.describe import (
    DescriptionStore,
    ExampleActivations,
    Explanation,
    SearchHit,
    check_session,
    example_activations,
    explain_neuron,
    search,
    show_token,
    token_pattern,
)
from explorer.neurons.index import (
    IndexRequest,
    NeuronHistogram,
    NeuronIndex,
    NeuronStats,
    PromptActivation,
    SelectiveNeurons,
    build_index,
    prompt_activation,
)
from explorer.persistence.history import History

from . import neuron_charts
from .chart_style import neuron_spec
from .live import LiveJob
from .parts import TEXT_LIMIT, alert

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

NO_INDEX_TEXT = (
    "**No neuron index is open.** An index holds every MLP neuron's top-activating and random "
    "examples over a corpus. Press **Build / Resume** to index {tokens:,} tokens of the default news "
    "corpus with the attached model (leave *Corpus* empty; the progress bar shows tokens/s and the time left), or give "
    "your own corpus (plain text, JSONL, parquet or a saved `datasets` directory). An index built "
    "earlier (here or with `python -m explorer neurons index`) opens from its directory."
)

EXAMPLES_PX = 460  # height of the card's example lists (they scroll)
EXAMPLES_CACHE = 32  # neurons whose per-token activations are kept (two small arrays each)


def known_indexes(session: ModelSession) -> dict[str, str]:
    """Index directories in the cache built with this model: label -> path (newest first)."""
    from explorer.core.defaults import cache_dir

    root = cache_dir() / "neurons"
    info = session.info()
    found = []
    for manifest in root.glob("*/manifest.json") if root.is_dir() else []:
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        model = m.get("model", {})
        if model.get("config_hash") != info.config_hash or model.get("name") != info.name:
            continue
        corpus = Path(str(m.get("corpus", {}).get("path", "?"))).name
        state = "" if m.get("complete") else ", partial"
        label = f"{int(m.get('tokens_done', 0)):,} tokens of {corpus}{state} ({m.get('created', '?')})"
        found.append((str(m.get("created", "")), label, str(manifest.parent)))
    found.sort(reverse=True)
    return {label: path for _, label, path in found}


def job_running(live: LiveJob) -> bool:
    """Whether the live job's job is running (also a foreground one, which has no thread)."""
    return live.job is not None and live.job.status == RUNNING


def parse_query(query: str, mode: str) -> tuple[str | None, str | None]:
    """(text, token) to search for: ``token:`` forces a token search (the rest is the token)."""
    if query.lower().startswith("token:"):
        return None, query[len("token:"):].removeprefix(" ") or None
    if mode == "token":
        return None, query or None
    return (query.strip() or None), None


class NeuronView(pn.viewable.Viewer):
    """Neuron index, search, neuron cards and the per-layer overview for one ModelSession."""

    # ----------------------------------------------------------------- the index
    index_dir = param.String(default="", label="Index directory",
                             doc="A neuron index directory to open.")
    open_index = param.Event(label="Open", doc="Open the index at index_dir.")
    corpus = param.String(default="", label="Corpus",
                          doc="Corpus to index: plain text, JSONL, parquet or a datasets directory; "
                              "empty = the default news corpus.")
    max_tokens = param.Integer(default=20_000, bounds=(0, None), label="Max tokens",
                               doc="Tokens to index (0 = the whole corpus).")
    window = param.Integer(default=64, bounds=(2, None), label="Window", doc="Tokens per example window.")
    top_k = param.Integer(default=20, bounds=(1, 500), label="Top examples", doc="Top examples kept per neuron.")
    n_random = param.Integer(default=20, bounds=(0, 500), label="Random examples",
                             doc="Random windows kept (shared by all neurons).")
    batch_windows = param.Integer(default=16, bounds=(1, None), label="Windows per batch")
    out_dir = param.String(default="", label="Output directory",
                           doc="Where the index is written; empty = the cache, keyed by model, corpus and settings.")
    build = param.Event(label="Build / Resume", doc="Build the index (a cancelled build resumes).")
    cancel = param.Event(label="Cancel", doc="Stop the build; its checkpoint is kept.")
    building = param.Boolean(default=False, doc="True while a build runs.")
    build_percent = param.Integer(default=0, bounds=(0, 100), doc="Build progress in percent.")
    build_status = param.String(default="", doc="The build's progress line.")
    index = param.ClassSelector(class_=NeuronIndex, default=None, allow_None=True, doc="The open index.")
    index_info = param.String(default="", doc="One line about the open index.")

    # ----------------------------------------------------------------- search
    query = param.String(default="", label="Search descriptions",
                         doc="Words that must all appear in a description; 'token: he' finds neurons firing on ' he'.")
    search_mode = param.Selector(default="text", objects={"text": "text", "token": "token"}, label="Search by")
    run_search = param.Event(label="Search")
    hits = param.List(default=[], item_type=SearchHit, doc="The last search's hits.")
    search_status = param.String(default="")

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

    # ----------------------------------------------------------------- overview
    overview_n = param.Integer(default=5, bounds=(1, 50), label="Neurons per layer")
    overview = param.ClassSelector(class_=SelectiveNeurons, default=None, allow_None=True)

    status = param.String(default="", doc="Status line (markdown).")
    error = param.String(default="", doc="The last error shown to the user; empty when none.")
    busy = param.Boolean(default=False, doc="True while the card's stored data loads.")

    def __init__(self, session: ModelSession, history: History | None = None, background: bool = True,
                 **params) -> None:
        super().__init__(**params)
        self.session = session
        self.history = history
        self.background = background  # False: jobs run on the caller's thread (notebooks, tests)
        self._build_job = LiveJob(self._on_build_progress, self._on_build_finish)
        self._explain_job = LiveJob(lambda progress, partial: None, self._on_explain_finish)
        self._examples: OrderedDict[tuple, tuple[ExampleActivations, ExampleActivations]] = OrderedDict()
        self._model_ok = False
        self._model_note = ""
        self._card_key: tuple | None = None
        self._computing = 0  # example-activation runs in flight
        self._histogram = pn.pane.Bokeh(None, css_classes=["neuron-histogram"], sizing_mode="stretch_width")
        self._prompt_chart = pn.pane.Bokeh(None, css_classes=["neuron-prompt-chart"], sizing_mode="stretch_width")
        self._overview_chart = pn.pane.Bokeh(None, css_classes=["neuron-overview"], sizing_mode="stretch_width")
        self._top_html = pn.pane.HTML("", css_classes=["neuron-top-examples"], sizing_mode="stretch_width",
                                      stylesheets=[neuron_charts.EXAMPLES_CSS])
        self._random_html = pn.pane.HTML("", css_classes=["neuron-random-examples"], sizing_mode="stretch_width",
                                         stylesheets=[neuron_charts.EXAMPLES_CSS])
        self._card_html = pn.pane.HTML("", css_classes=["neuron-card-info"], sizing_mode="stretch_width",
                                       stylesheets=[CARD_CSS])
        # A list box: unlike a Select it may have nothing selected, so new hits open nothing by themselves.
        self._hit_select = pn.widgets.MultiSelect(options={}, size=10, css_classes=["neuron-hits"],
                                                  sizing_mode="stretch_width", disabled=True)
        self._hit_select.param.watch(self._on_hit_selected, "value")
        self._known = pn.widgets.Select(label="Indexes in the cache", options={}, css_classes=["neuron-known"],
                                        sizing_mode="stretch_width")
        self._known.param.watch(self._on_known_selected, "value")
        self.refresh_known()
        self._layout = self._build_layout()

    # ================================================================= index
    def refresh_known(self) -> None:
        """List the indexes in the cache built with this model (for the picker)."""
        try:
            found = known_indexes(self.session)
        except OSError:
            found = {}
        self._known.options = {"(choose one)": "", **found}
        self._known.disabled = not found

    def _on_known_selected(self, event) -> None:
        if event.new:
            self.index_dir = event.new

    @param.depends("open_index", watch=True)
    async def _on_open_index(self) -> None:
        await self.load_index(self.index_dir)

    async def load_index(self, path: str | Path) -> None:
        """Open an index directory (reading it off the loop); errors are shown, the old index kept."""
        path = str(path).strip()
        if not path:
            self.error = "**No index directory given:** type one, pick one from the cache, or build an index."
            return
        self.busy = True
        try:
            index = await asyncio.to_thread(NeuronIndex.open, path)
            self.set_index(index)
        except ExplorerError as e:
            self.error = f"**Could not open the index:** {e}"
        except Exception as e:
            log.exception("opening a neuron index failed")
            self.error = f"**Unexpected error** ({type(e).__name__}: {e}). Details are in the server log."
        finally:
            self.busy = False

    def set_index(self, index: NeuronIndex) -> None:
        """Show an index: its overview, search and cards (the previous card is cleared)."""
        try:
            check_session(index, self.session)
            self._model_ok, self._model_note = True, ""
        except ExplorerError as e:
            self._model_ok, self._model_note = False, str(e)
        self._examples.clear()
        self._card_key = None
        self._hit_select.param.update(options={}, value=[], disabled=True)
        m = index.manifest
        state = "complete" if index.complete else "partial (Build / Resume continues it)"
        info = (f"**Index** `{index.path}` · {index.model_name} · {index.n_layers} layers × {index.d_mlp:,} neurons · "
                f"{index.tokens_done:,} tokens of `{Path(str(m['corpus']['path'])).name}` · {state}")
        if self._model_note:
            info += f" · ⚠ {self._model_note}: stored data only (no shading, prompt or Explain)."
        self.param.update(index=index, index_dir=str(index.path), index_info=info, hits=[], search_status="",
                          stats=None, histogram=None, top=None, random=None, descriptions=[], pattern_text="",
                          explanation=None, explain_status="", prompt_result=None, error="",
                          status="Search the descriptions, type a layer and neuron, or click a point of the overview.")
        self.refresh_known()

    @param.depends("overview_n", "index", watch=True)
    def _update_overview(self) -> None:
        if self.index is None:
            return
        overview = self.index.selective_neurons(self.overview_n)
        self.overview = overview
        if self.history is not None:
            self.history.add(overview, f"selective neurons ({overview.n_per_layer} per layer)")
        fig = neuron_charts.selectivity_overview(overview)
        source = fig.select_one({"name": neuron_charts.OVERVIEW_SOURCE})
        source.selected.on_change("indices", self._overview_tap(source, overview))
        self._overview_chart.object = fig

    def _overview_tap(self, source, overview: SelectiveNeurons):
        def on_tap(attr, old, new) -> None:
            if new and self.overview is overview:  # ignore taps on a replaced chart
                self.select_neuron(int(source.data["layer"][new[0]]), int(source.data["neuron"][new[0]]))
        return on_tap

    # ----------------------------------------------------------------- build
    def build_request(self) -> IndexRequest:
        corpus = self.corpus.strip()
        if corpus:
            path = Path(corpus).expanduser()
            if not path.exists():
                raise ExplorerError(f"corpus not found: {corpus} (give a text, JSONL or parquet file, or a "
                                    "datasets directory; leave it empty for the default corpus)")
            corpus = str(path)
        return IndexRequest(corpus_path=corpus or None, max_tokens=self.max_tokens or None, window=self.window,
                            top_k=self.top_k, n_random=self.n_random, batch_windows=self.batch_windows)

    @param.depends("build", watch=True)
    def _on_build(self) -> None:
        self.start_build()

    def start_build(self) -> Job | None:
        """Start (or resume) the build job; it reports to the progress bar and opens the index."""
        if job_running(self._build_job):
            return self._build_job.job
        try:
            request = self.build_request()
        except ExplorerError as e:
            self.error = f"**Could not build the index:** {e}"
            return None
        out = self.out_dir.strip() or None
        session = self.session
        self.param.update(building=True, build_percent=0, error="",
                          build_status="Starting: reading the corpus…")
        return self._build_job.start(lambda ctx: build_index(session, request, out_dir=out, ctx=ctx), name="neuron-index",
                                     background=self.background)

    @param.depends("cancel", watch=True)
    def _on_cancel(self) -> None:
        if job_running(self._build_job):
            self._build_job.cancel()
            self.build_status = "Cancelling: finishing the current batch and writing a checkpoint…"

    def _on_build_progress(self, progress, partial) -> None:
        total = max(progress.total, 1)
        self.param.update(build_percent=min(100, int(100 * progress.done / total)),
                          build_status=f"{progress.done:,} / {progress.total:,} tokens · {progress.message}")

    def _on_build_finish(self, job: Job) -> None:
        self.building = False
        if job.status == DONE and job.result is not None:
            index = job.result
            elapsed = index.manifest.get("elapsed_s", 0) or 0
            self.set_index(index)
            self.param.update(build_percent=100, build_status=(
                f"Built: {index.tokens_done:,} tokens in {elapsed:.0f} s "
                f"({index.tokens_done / max(elapsed, 1e-9):,.0f} tokens/s this run)."))
        elif job.status == CANCELLED and job.result is not None:
            self.build_status = (f"Cancelled at {job.result.tokens_done:,} tokens; the checkpoint is kept: "
                                 "press Build / Resume to continue.")
        else:
            self.build_status = "The build failed."
            self.error = f"**Could not build the index:** {job.error}"

    # ================================================================= search
    @param.depends("run_search", watch=True)
    def _on_search(self) -> None:
        self.do_search()

    def do_search(self) -> list[SearchHit]:
        """Search the open index's descriptions; the hits fill the list (best first)."""
        if self.index is None:
            self.error = "**No index is open:** open or build one first."
            return []
        text, token = parse_query(self.query, self.search_mode)
        try:
            if text is None and token is None:
                raise ExplorerError("the search is empty: type words of a description, or a token "
                                    "(e.g. 'token: he')")
            hits = search(self.index, query=text, token=token, limit=200)
        except ExplorerError as e:
            self.error = f"**Could not search:** {e}"
            return []
        options = {}
        for h in hits:
            score = "" if h.score is None else f" · score {h.score:.2f}"
            label = f"{neuron_spec(h.layer, h.neuron)} · {h.relevance:.2f} · [{h.source}] {h.description}{score}"
            options.setdefault(label[:160], f"{h.layer}:{h.neuron}:{len(options)}")
        what = f"token {show_token(token)}" if token is not None else f"'{text}'"
        self._hit_select.param.update(options=options, disabled=not hits, value=[])
        self.param.update(hits=hits, error="", search_status=(
            f"{len(hits)} neurons for {what}" if hits else f"No neuron matches {what}."))
        return hits

    def _on_hit_selected(self, event) -> None:
        picked = [v for v in event.new if v not in (event.old or [])] or list(event.new)
        if not picked:
            return
        layer, neuron, _ = picked[0].split(":")
        self.select_neuron(int(layer), int(neuron))

    def pick_hit(self, i: int) -> None:
        """Select the i-th hit in the list (what a click on it does)."""
        self._hit_select.value = [list(self._hit_select.options.values())[i]]

    def hit_specs(self) -> tuple[str, ...]:
        """The search hits as unique neuron specs, best first."""
        return tuple(dict.fromkeys(f"{h.layer}:{h.neuron}" for h in self.hits))

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
            except ExplorerError as e:
                self.error = f"**Could not compute the examples' activations:** {e}"
                return
            except Exception as e:
                log.exception("neuron example activations failed")
                self.error = f"**Unexpected error** ({type(e).__name__}: {e}). Details are in the server log."
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
                               f"score {e.score_text} ({e.score_note}; {e.n_top} top + {e.n_random} random examples)." + weak)
        if self.index is not None and self.stats is not None and (self.stats.layer, self.stats.neuron) == (e.layer, e.neuron):
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
        except ExplorerError as e:
            self.error = f"**Could not run the prompt:** {e}"
            return
        except Exception as e:
            log.exception("neuron prompt activation failed")
            self.error = f"**Unexpected error** ({type(e).__name__}: {e}). Details are in the server log."
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

    # ================================================================= layout
    def _build_layout(self) -> pn.viewable.Viewable:
        no_index = self.param.index.rx.is_(None)
        index_dir = pn.widgets.TextInput.from_param(self.param.index_dir, sizing_mode="stretch_width",
                                                    placeholder="/path/to/index", css_classes=["neuron-index-dir"])
        open_btn = pn.widgets.Button.from_param(self.param.open_index, width=90, margin=(26, 10, 10, 10),
                                                css_classes=["neuron-open-index"])
        corpus = pn.widgets.TextInput.from_param(self.param.corpus, sizing_mode="stretch_width",
                                                 placeholder="empty = the default news corpus",
                                                 css_classes=["neuron-corpus"])
        max_tokens = pn.widgets.IntInput.from_param(self.param.max_tokens, width=120, step=1000,
                                                    css_classes=["neuron-max-tokens"])
        build = pn.widgets.Button.from_param(self.param.build, color="primary", width=140, margin=(26, 10, 10, 10),
                                             disabled=self.param.building, css_classes=["neuron-build"])
        cancel = pn.widgets.Button.from_param(self.param.cancel, width=90, margin=(26, 10, 10, 10),
                                              disabled=self.param.building.rx.not_(), css_classes=["neuron-cancel"])
        advanced = pn.Card(
            pn.FlexBox(*(pn.widgets.IntInput.from_param(p, width=130)
                         for p in (self.param.window, self.param.top_k, self.param.n_random, self.param.batch_windows))),
            pn.widgets.TextInput.from_param(self.param.out_dir, sizing_mode="stretch_width",
                                            placeholder="empty = the cache"),
            title="Build settings", collapsed=True, sizing_mode="stretch_width", margin=(0, 10))
        progress = pn.indicators.Progress(value=self.param.build_percent, max=100, sizing_mode="stretch_width",
                                          visible=self.param.build_status.rx.bool(), css_classes=["neuron-progress"],
                                          margin=(0, 10))
        build_status = pn.pane.Markdown(self.param.build_status, css_classes=["neuron-build-status"],
                                        sizing_mode="stretch_width", margin=(0, 10))
        picker = pn.Column(
            pn.Row(self._known, index_dir, open_btn, sizing_mode="stretch_width"),
            pn.Row(corpus, max_tokens, build, cancel, sizing_mode="stretch_width"),
            advanced, progress, build_status, sizing_mode="stretch_width", css_classes=["neuron-picker"])
        no_index_md = pn.pane.Markdown(NO_INDEX_TEXT.format(tokens=self.max_tokens), css_classes=["neuron-no-index"],
                                       visible=no_index, sizing_mode="stretch_width")
        info = pn.pane.Markdown(self.param.index_info, css_classes=["neuron-index-info"],
                                visible=self.param.index_info.rx.bool(), sizing_mode="stretch_width", margin=(0, 10))
        error = alert(self.param.error, "neuron-error")

        query = pn.widgets.TextInput.from_param(self.param.query, sizing_mode="stretch_width",
                                                placeholder="e.g. he  ·  token: she  ·  words of an explanation",
                                                css_classes=["neuron-query"])
        mode = pn.widgets.RadioButtonGroup.from_param(self.param.search_mode, css_classes=["neuron-search-mode"],
                                                      margin=(26, 10, 10, 10))
        search_btn = pn.widgets.Button.from_param(self.param.run_search, color="primary", width=90,
                                                  margin=(26, 10, 10, 10), disabled=no_index,
                                                  css_classes=["neuron-search"])
        search_status = pn.pane.Markdown(self.param.search_status, css_classes=["neuron-search-status"],
                                         sizing_mode="stretch_width", margin=(0, 10))
        layer = pn.widgets.IntInput.from_param(self.param.layer, width=90, css_classes=["neuron-layer"])
        neuron = pn.widgets.IntInput.from_param(self.param.neuron, width=110, css_classes=["neuron-neuron"])
        show = pn.widgets.Button.from_param(self.param.show, width=120, margin=(26, 10, 10, 10), disabled=no_index,
                                            css_classes=["neuron-show"])
        ablate_hits = pn.widgets.Button.from_param(self.param.ablate_hits, disabled=self.param.hits.rx.len() == 0,
                                                   css_classes=["neuron-ablate-hits"], sizing_mode="stretch_width")
        left = pn.Column(pn.Row(query, search_btn, sizing_mode="stretch_width"), mode, search_status,
                         self._hit_select, ablate_hits, pn.Row(layer, neuron, show), width=360,
                         css_classes=["neuron-search-panel"])

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
        status = pn.pane.Markdown(self.param.status, css_classes=["neuron-status"], sizing_mode="stretch_width",
                                  margin=(0, 10))
        overview_n = pn.widgets.IntInput.from_param(self.param.overview_n, width=130)
        main = pn.Column(
            pn.Row(left, pn.Column(status, card, sizing_mode="stretch_width"), sizing_mode="stretch_width"),
            pn.Row(overview_n), self._overview_chart,
            sizing_mode="stretch_width", loading=self.param.busy, visible=self.param.index.rx.is_not(None),
            css_classes=["neuron-main"])
        return pn.Column(picker, info, error, no_index_md, main, sizing_mode="stretch_width",
                         css_classes=["neuron-view"])

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout
