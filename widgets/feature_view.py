"""The "Features" tab: an SAE's features browsed like neurons, through the neuron index.

- **Index.** An SAE folder (SAELens layout): *Open* reads its feature index (``<folder>/index``);
  *Build index* runs ``explorer.features.units.index_features`` as a job (tokens to index; the
  news corpus), with progress; an interrupted build resumes.
- **Card.** A feature number: its card (``explorer.features.browse.feature_profile``): top
  examples shaded by activation (the neuron tab's ``examples_html``, every token's activation
  re-read with the attached model), the activation histogram, top inputs (firing tokens from the
  index; the embedding through the encoder direction), top output tokens (decoder ·
  unembedding) and statistics.
- **Search.** Descriptions and token patterns (``token: he`` for a token); *Which features fire
  here?* lists the strongest features at every token of your own text.
- **Compare.** With a neuron index of the same model: features vs neurons at the SAE's layer
  (``explorer.neurons.units.compare_units``).

Every result goes to the history, so snapshots and the HTML export hold it.
"""
from __future__ import annotations

import asyncio
import html
import logging
from pathlib import Path

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.core.jobs import FAILED, Job, JobContext, Progress
from explorer.features.browse import FeatureProfile, feature_profile
from explorer.neurons.describe import (
    Explainer,
    Explanation,
    SearchHit,
    example_activations,
    explain_neuron,
    search,
)
from explorer.neurons.index import NeuronIndex
from explorer.neurons.units import UnitComparison, UnitsOnText, compare_units, explain_sample, units_on_text
from explorer.persistence.history import History

from .charts import quote_token
from .figures import div_model, table_rows
from .live import LiveJob
from .neuron_charts import EXAMPLES_CSS, activation_histogram, examples_html
from .parts import EXPLAINERS, alert, explainer_param, set_bar

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ pure builders (also for snapshots)
def _token_rows(tokens, values, fmt: str) -> str:
    return "".join(f"<tr><td>{html.escape(quote_token(t))}</td><td>{format(float(v), fmt)}</td></tr>"
                   for t, v in zip(tokens, values))


def profile_html(card: FeatureProfile) -> str:
    """The card's inputs, outputs and statistics as one HTML block."""
    desc = (f"<div class='caption'><b>{html.escape(card.description)}</b>"
            + ("" if card.description_score is None else f" (score {card.description_score:.3f})")
            + "</div>") if card.description else ""
    stats = table_rows([("fires (> 0) on", f"{card.frequency:.2%} of {card.tokens_indexed:,} tokens"),
                        ("max", f"{card.max:.4g}"), ("mean", f"{card.mean:.3g}")])
    col = "<div style='display:inline-block; vertical-align:top; margin-right:18px'>"
    return (f"<div class='caption'>{html.escape(card.pattern)}</div>{desc}"
            f"{col}<table><tr><th colspan=2>Top inputs (index: firing tokens, share of top mass)</th></tr>"
            f"{_token_rows(card.input_tokens, card.input_mass, '.1%')}</table></div>"
            f"{col}<table><tr><th colspan=2>Embedding · encoder direction</th></tr>"
            f"{_token_rows(card.embed_tokens, card.embed_values, '+.3f')}</table></div>"
            f"{col}<table><tr><th colspan=2>Promotes (decoder · unembedding)</th></tr>"
            f"{_token_rows(card.top_tokens, card.top_values, '+.3f')}</table></div>"
            f"{col}<table><tr><th colspan=2>Suppresses</th></tr>"
            f"{_token_rows(card.bottom_tokens, card.bottom_values, '+.3f')}</table></div>"
            f"{col}<table>{stats}</table></div>")


def comparison_html(c: UnitComparison) -> str:
    def score(v, n, m):
        return "–" if v is None else f"{v:.3f} ({n} scored of {m})"

    rows = (f"<tr><th></th><th>features</th><th>neurons</th></tr>"
            f"<tr><th>live units</th><td>{c.feature_live:,} of {c.feature_units:,}</td>"
            f"<td>{c.neuron_live:,} of {c.neuron_units:,}</td></tr>"
            f"<tr><th>token-pattern concentration</th><td>{c.feature_concentration:.3f}</td>"
            f"<td>{c.neuron_concentration:.3f}</td></tr>"
            f"<tr><th>single-token units (≥ 50%)</th><td>{c.feature_single_token:.1%}</td>"
            f"<td>{c.neuron_single_token:.1%}</td></tr>"
            f"<tr><th>mean explanation score</th>"
            f"<td>{score(c.feature_mean_score, c.feature_scored, c.feature_explained)}</td>"
            f"<td>{score(c.neuron_mean_score, c.neuron_scored, c.neuron_explained)}</td></tr>")
    return f"<div class='caption'>Layer {c.layer}: {html.escape(c.definition)}</div><table>{rows}</table>"


def fired_html(r: UnitsOnText) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(quote_token(t))}</td><td>"
        + ", ".join(f"{int(u)} ({float(a):.3g})" for u, a in zip(us, acts) if a > 0) + "</td></tr>"
        for t, us, acts in zip(r.tokens, r.units, r.activations))
    return f"<table><tr><th>token</th><th>{r.unit_name}s (activation)</th></tr>{rows}</table>"


def hits_html(hits: list[SearchHit]) -> str:
    if not hits:
        return "<div class='caption'>No matching features.</div>"
    rows = "".join(f"<tr><td>{h.neuron}</td><td>{h.relevance:.2f}</td><td>{html.escape(h.source)}</td>"
                   f"<td>{html.escape(h.description)}</td></tr>" for h in hits)
    return f"<table><tr><th>feature</th><th>relevance</th><th>source</th><th>description</th></tr>{rows}</table>"


class FeatureView(pn.viewable.Viewer):
    """Browse an SAE's features: index, card, search, units on text, comparison with neurons."""

    # how a feature is explained (see explorer.neurons.describe.ExplainRequest); the explainer is the model
    explain_settings = dict(n_explain=8, n_score_top=5, n_score_random=5, max_new_tokens=24)

    sae_path = param.String(default="", label="SAE folder (SAELens layout)")
    max_tokens = param.Integer(default=100_000, bounds=(64, None), label="Tokens to index")
    open_index = param.Event(label="Open")
    build = param.Event(label="Build index")
    feature = param.Integer(default=0, bounds=(0, None), label="Feature")
    show = param.Event(label="Show card")
    explain = param.Event(label="Explain (slow)")
    explainer = explainer_param()
    query = param.String(default="", label="Search descriptions (or token: he)")
    run_search = param.Event(label="Search")
    text = param.String(default="The capital of France is Paris.", label="Your text")
    run_fire = param.Event(label="Which features fire here?")
    neuron_index = param.String(default="", label="Neuron index folder (same model)")
    explain_first = param.Integer(default=0, bounds=(0, 1000), label="Explain first (random units per side)")
    run_compare = param.Event(label="Compare with neurons")
    status = param.String(default="Give an SAE folder and press **Open** (or **Build index**).")
    error = param.String(default="")
    busy = param.Boolean(default=False)
    card = param.ClassSelector(class_=FeatureProfile, default=None, allow_None=True)

    def __init__(self, session, history: History | None = None, background: bool = True, **params) -> None:
        super().__init__(**params)
        self.session = session
        self.history = history
        self.background = background
        self.index: NeuronIndex | None = None
        self._job = LiveJob(self._on_progress, self._on_finish)
        self._bar = pn.indicators.Progress(value=0, max=1, width=220, margin=(14, 10, 4, 10),
                                           css_classes=["features-progress"])
        self._card = pn.pane.HTML("", css_classes=["features-card"], sizing_mode="stretch_width")
        self._examples = pn.pane.HTML("", css_classes=["features-examples"], sizing_mode="stretch_width",
                                      stylesheets=[EXAMPLES_CSS])
        self._hist = pn.pane.Bokeh(None, css_classes=["features-hist"], margin=(5, 10))
        self._explanation = pn.pane.HTML("", css_classes=["features-explanation"], sizing_mode="stretch_width")
        self._search = pn.pane.HTML("", css_classes=["features-search"], sizing_mode="stretch_width")
        self._fire = pn.pane.HTML("", css_classes=["features-fire"], sizing_mode="stretch_width")
        self._compare = pn.pane.HTML("", css_classes=["features-compare"], sizing_mode="stretch_width")
        self._layout = self._build()

    # ------------------------------------------------------------------ index
    def _sae_dir(self) -> str:
        path = self.sae_path.strip()
        if not path:
            raise ExplorerError("give the SAE's folder first")
        return path

    @param.depends("open_index", watch=True)
    def _on_open(self) -> None:
        self.open()

    def open(self) -> NeuronIndex | None:
        """Open the SAE folder's feature index."""
        from explorer.features.units import open_feature_index

        try:
            self.index = open_feature_index(self._sae_dir())
        except ExplorerError as e:
            self.error = f"**Could not open:** {e}"
            return None
        self.error = ""
        idx = self.index
        self.param.feature.bounds = (0, idx.n_units - 1)
        self.status = (f"Index `{idx.path}`: {idx.n_units:,} features at layer {idx.layers[0]}, "
                       f"{idx.tokens_done:,} tokens" + ("" if idx.complete else " (partial: Build to resume)"))
        return idx

    @param.depends("build", watch=True)
    def _on_build(self) -> None:
        self.start_build()

    def start_build(self) -> Job | None:
        """Build (or resume) the SAE's feature index over the news corpus."""
        from explorer.features.units import index_features

        if self._job.running:
            return None
        try:
            sae = self._sae_dir()
        except ExplorerError as e:
            self.error = f"**Could not build:** {e}"
            return None
        tokens = self.max_tokens
        self.param.update(error="", busy=True, status="Indexing…")

        def work(ctx: JobContext) -> NeuronIndex:
            return index_features(self.session, sae, ctx=ctx, max_tokens=tokens)

        return self._job.start(work, name="feature-index", background=self.background)

    def _on_progress(self, progress: Progress, _partial) -> None:
        set_bar(self._bar, progress.done, progress.total)
        self.status = f"Indexing: {progress.done:,} / {progress.total:,} tokens ({progress.message})"

    def _on_finish(self, job: Job) -> None:
        self.busy = False
        if job.status == FAILED:
            self.error = f"**Indexing failed:** {job.error}"
            return
        if isinstance(job.result, NeuronIndex):
            self.open()

    def close(self) -> None:
        self._job.cancel()

    def _need_index(self) -> NeuronIndex:
        if self.index is None and self.open() is None:
            raise ExplorerError(self.error.removeprefix("**Could not open:** ") or "open an index first")
        return self.index

    # ------------------------------------------------------------------ card
    @param.depends("show", watch=True)
    async def _on_show(self) -> None:
        await self.show_card()

    async def show_card(self) -> FeatureProfile | None:
        """The feature's card, its examples (every token re-read with the model) and histogram."""
        try:
            index = self._need_index()
            f = self.feature
            card = await asyncio.to_thread(feature_profile, self.session, self._sae_dir(), index, f)
            top, _ = await asyncio.to_thread(example_activations, index, index.layers[0], f, self.session)
            hist = index.histogram(index.layers[0], f)
        except ExplorerError as e:
            self.error = f"**Could not show the feature:** {e}"
            return None
        self.error = ""
        self.card = card
        self._card.object = profile_html(card)
        self._examples.object = examples_html(top, limit=10)
        self._hist.object = activation_histogram(hist, index.stats(index.layers[0], f), unit_name=index.unit_name)
        if self.history is not None:
            self.history.add(card, f"feature {f} card (L{card.layer} {card.site})")
            self.history.add(top, f"feature {f} top examples")
        return card

    @param.depends("explain", watch=True)
    async def _on_explain(self) -> None:
        await self.explain_feature()

    async def explain_feature(self) -> Explanation | None:
        """Explain the feature with the attached model and score it by simulation (kept in the index)."""
        if self.busy:
            return None
        self.busy = True
        try:
            index = self._need_index()
            f = self.feature
            self.status = f"Explaining feature {f} (a generation and a few simulations)…"
            e = await asyncio.to_thread(explain_neuron, self.session, index=index, layer=index.layers[0], neuron=f,
                                        explainer=EXPLAINERS[self.explainer], **self.explain_settings)
        except ExplorerError as e:
            self.error = f"**Could not explain:** {e}"
            return None
        finally:
            self.busy = False
        self.error = ""
        self.status = f"Explained feature {f}."
        what = html.escape(e.explanation or "–")
        self._explanation.object = (f"<div class='caption'>Feature {f} responds to <b>{what}</b>; "
                                    f"simulation score {html.escape(e.score_text)} ({html.escape(e.score_note)}, "
                                    f"{e.n_top} top + {e.n_random} random examples, {html.escape(e.explainer)})</div>")
        if self.history is not None:
            self.history.add(e, f"feature {f} explanation")
        return e

    # ------------------------------------------------------------------ search and fire
    @param.depends("run_search", watch=True)
    def _on_search(self) -> None:
        self.do_search()

    def do_search(self) -> list[SearchHit]:
        q = self.query
        try:
            index = self._need_index()
            if not q.strip():
                raise ExplorerError("type words to search for, or token: he")
            # as the Neurons tab: "token: X" searches the token X (one space after the colon dropped)
            token = (q[len("token:"):].removeprefix(" ") or None) if q.lower().startswith("token:") else None
            q = q.strip()
            hits = search(index, query=None if token is not None else q, token=token, limit=100)
        except ExplorerError as e:
            self.error = f"**Search failed:** {e}"
            return []
        self.error = ""
        self._search.object = hits_html(hits)
        return hits

    @param.depends("run_fire", watch=True)
    async def _on_fire(self) -> None:
        await self.fire()

    async def fire(self) -> UnitsOnText | None:
        try:
            index = self._need_index()
            result = await asyncio.to_thread(units_on_text, self.session, index, self.text, None, 5)
        except ExplorerError as e:
            self.error = f"**Could not read the text:** {e}"
            return None
        self.error = ""
        self._fire.object = fired_html(result)
        if self.history is not None:
            self.history.add(result, f"features firing on {self.text[:40]}")
        return result

    # ------------------------------------------------------------------ compare
    @param.depends("run_compare", watch=True)
    async def _on_compare(self) -> None:
        await self.compare()

    async def compare(self) -> UnitComparison | None:
        """Features vs neurons at the SAE's layer, after explaining ``explain_first`` random units of
        each side with the chosen explainer (explanations already stored are reused)."""
        if self.busy:
            return None
        self.busy = True
        try:
            index = self._need_index()
            path = self.neuron_index.strip()
            if not path or not Path(path).expanduser().exists():
                raise ExplorerError("give the folder of a neuron index of this model (the Neurons tab builds one)")
            neurons = NeuronIndex.open(path)
            explainer = Explainer.load(EXPLAINERS[self.explainer], self.session)
            layer = index.layers[0]
            for side in (index, neurons) if self.explain_first else ():
                self.status = f"Explaining {self.explain_first} {side.unit_name}s of layer {layer} ({explainer.name})…"
                await asyncio.to_thread(explain_sample, self.session, side, layer, self.explain_first,
                                        explainer=explainer, **self.explain_settings)
            result = compare_units(index, neurons, explainer=explainer.name)
        except ExplorerError as e:
            self.error = f"**Could not compare:** {e}"
            return None
        finally:
            self.busy = False
        self.error = ""
        self.status = f"Compared features with neurons at layer {result.layer}."
        self._compare.object = comparison_html(result)
        if self.history is not None:
            self.history.add(result, f"features vs neurons at layer {result.layer}")
        return result

    # ------------------------------------------------------------------ layout
    def _build(self) -> pn.viewable.Viewable:
        p = self.param
        index = pn.Column(
            pn.Row(pn.widgets.TextInput.from_param(p.sae_path, sizing_mode="stretch_width"),
                   pn.widgets.IntInput.from_param(p.max_tokens, width=140)),
            pn.Row(pn.widgets.Button.from_param(p.open_index, css_classes=["features-open"]),
                   pn.widgets.Button.from_param(p.build, color="primary", css_classes=["features-build"]), self._bar),
            pn.pane.Markdown(p.status, css_classes=["features-status"]),
            alert(p.error, "features-error"),
            sizing_mode="stretch_width")
        card = pn.Column(
            pn.pane.Markdown("### Feature card"),
            pn.Row(pn.widgets.IntInput.from_param(p.feature, width=140),
                   pn.widgets.Button.from_param(p.show, color="primary", css_classes=["features-show"]),
                   pn.widgets.Button.from_param(p.explain, css_classes=["features-explain"]),
                   pn.widgets.Select.from_param(p.explainer, width=170)),
            self._explanation, self._card, self._hist, self._examples, sizing_mode="stretch_width")
        find = pn.Column(
            pn.pane.Markdown("### Search and your own text"),
            pn.Row(pn.widgets.TextInput.from_param(p.query, sizing_mode="stretch_width"),
                   pn.widgets.Button.from_param(p.run_search, css_classes=["features-search-button"])),
            self._search,
            pn.widgets.TextAreaInput.from_param(p.text, sizing_mode="stretch_width", height=60),
            pn.widgets.Button.from_param(p.run_fire, css_classes=["features-fire-button"]), self._fire,
            sizing_mode="stretch_width")
        compare = pn.Column(
            pn.pane.Markdown("### Features vs neurons"),
            pn.Row(pn.widgets.TextInput.from_param(p.neuron_index, sizing_mode="stretch_width"),
                   pn.widgets.IntInput.from_param(p.explain_first, width=230),
                   pn.widgets.Button.from_param(p.run_compare, css_classes=["features-compare-button"])),
            self._compare, sizing_mode="stretch_width")
        return pn.Column(index, card, find, compare, sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout


def profile_figures(card: FeatureProfile, model: dict) -> list:
    """Snapshot/export figures of a feature card."""
    ex = "".join(f"<div>{float(a):.3f} · at {html.escape(quote_token(toks[int(p)]))}: "
                 f"{html.escape(''.join(str(t) for t in toks[max(0, int(p) - 12):int(p) + 4]))}</div>"
                 for toks, p, a in zip(card.example_tokens, card.example_positions, card.example_activations))
    return [(f"Feature {card.feature} (layer {card.layer} {card.site}) of {card.sae}: inputs, outputs, statistics.",
             div_model(profile_html(card))),
            (f"Feature {card.feature}'s top examples: activation, firing token, the text up to it.", div_model(ex))]


def comparison_figures(c: UnitComparison, model: dict) -> list:
    return [(f"Features vs neurons at layer {c.layer}.", div_model(comparison_html(c)))]


def fired_figures(r: UnitsOnText, model: dict) -> list:
    return [(f"The {r.unit_name}s firing most on each token of {r.prompt[:60]!r}.", div_model(fired_html(r)))]


