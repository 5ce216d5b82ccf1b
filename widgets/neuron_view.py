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

import logging
from collections import OrderedDict

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.core.session import ModelSession
from explorer.neurons.describe import (
    ExampleActivations,
    SearchHit,
    search,
    show_token,
)
from explorer.persistence.history import History

from . import neuron_charts
from .chart_style import neuron_spec
from .live import LiveJob
from .neuron_card import CARD_CSS, CardPart
from .neuron_index import IndexPart
from .parts import alert

log = logging.getLogger(__name__)

def parse_query(query: str, mode: str) -> tuple[str | None, str | None]:
    """(text, token) to search for: ``token:`` forces a token search (the rest is the token)."""
    if query.lower().startswith("token:"):
        return None, query[len("token:"):].removeprefix(" ") or None
    if mode == "token":
        return None, query or None
    return (query.strip() or None), None


class NeuronView(IndexPart, CardPart, pn.viewable.Viewer):
    """Neuron index, search, neuron cards and the per-layer overview for one ModelSession."""

    # ----------------------------------------------------------------- search
    query = param.String(default="", label="Search descriptions",
                         doc="Words that must all appear in a description; 'token: he' finds neurons firing on ' he'.")
    search_mode = param.Selector(default="text", objects={"text": "text", "token": "token"}, label="Search by")
    run_search = param.Event(label="Search")
    hits = param.List(default=[], item_type=SearchHit, doc="The last search's hits.")
    search_status = param.String(default="")

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

    # ================================================================= layout
    def _build_layout(self) -> pn.viewable.Viewable:
        picker, info, no_index_md = self._index_layout()
        no_index = self.param.index.rx.is_(None)
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
        card = self._card_layout()
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
