"""The neuron view: open or build a neuron index, search descriptions, open a neuron's card.

``NeuronView`` composes five parts, each owning its inputs and widgets, sharing one status and
error line (a ``RunState``):

- ``indexer`` (``IndexPart``): open an index directory (or one found in the cache for this
  model), or build one over a corpus as a job (progress with tokens/s and time left; Cancel
  keeps a checkpoint and Build / Resume continues it); a built index opens by itself.
- ``search`` (``SearchPart``): description text or a token the neuron fires on; a hit opens its card.
- ``card`` (``CardPart``): token pattern, explanations with scores (Explain: a job with the
  attached model), statistics, histogram, top and random examples shaded by activation.
- ``on_prompt`` (``PromptPart``): the card's neuron on a prompt.
- ``overview`` (``OverviewPart``): the most selective neurons of every layer; a click opens one.

*Ablate this neuron* / *Ablate all hits* set ``ablate_request`` (specs like ``"5:123"``); the
app hands it to the ablation tab. Model work runs in worker threads or jobs; every result goes
into ``history``. Errors are shown in the view and the previous card is kept.
"""
from __future__ import annotations

import panel as pn
import param

from explorer.core.session import ModelSession
from explorer.neurons.index import NeuronIndex
from explorer.persistence.history import History

from .neuron_card import CardPart
from .neuron_index import NO_INDEX_TEXT, IndexPart, OverviewPart
from .neuron_prompt import PromptPart
from .neuron_search import SearchPart, parse_query
from .parts import RunState, alert


class NeuronView(pn.viewable.Viewer):
    """Neuron index, search, neuron cards and the per-layer overview for one ModelSession."""

    ablate_request = param.ClassSelector(class_=tuple, default=(),
                                         doc="Component specs ('5:123') to select in the ablation tab; "
                                             "set by the ablate buttons.")

    def __init__(self, session: ModelSession, history: History | None = None, background: bool = True,
                 **params) -> None:
        """``background=False``: jobs run on the caller's thread (notebooks, tests)."""
        super().__init__(**params)
        self.session = session
        self.history = history
        self.state = RunState()
        self.card = CardPart(session, self.state, self.request_ablation, history=history, background=background)
        self.indexer = IndexPart(session, self.state, self._on_index, background=background)
        self.search = SearchPart(self.state, self.card.select_neuron, self.request_ablation)
        self.on_prompt = PromptPart(session, self.state, self._prompt_target, history=history)
        self.overview = OverviewPart(self.card.select_neuron, history=history)
        self._layout = self._build()

    @property
    def index(self) -> NeuronIndex | None:
        """The open index."""
        return self.indexer.index

    def set_index(self, index: NeuronIndex) -> None:
        """Show an index: its overview, search and cards (the previous card is cleared)."""
        self.indexer.set_index(index)

    async def open_neuron(self, layer: int | None = None, neuron: int | None = None) -> None:
        """Show the card of (layer, neuron): stored data at once, then every token's activation."""
        await self.card.open_neuron(layer, neuron)

    def request_ablation(self, specs: tuple[str, ...]) -> None:
        """Ask for these components in the ablation tab (fires even if the request repeats)."""
        if not specs:
            self.state.error = "**Nothing to ablate:** open a neuron or search first."
            return
        if tuple(specs) == self.ablate_request:
            self.param.trigger("ablate_request")
        else:
            self.ablate_request = tuple(specs)

    def close(self) -> None:
        """Stop this view's jobs (a build keeps its checkpoint)."""
        self.indexer.close()
        self.card.close()

    def _on_index(self, index: NeuronIndex, model_note: str) -> None:
        self.card.set_index(index, model_note)
        self.search.set_index(index)
        self.on_prompt.set_model_note(model_note)
        self.on_prompt.result = None
        self.state.param.update(error="", status="Search the descriptions, type a layer and neuron, or click a "
                                                 "point of the overview.")
        self.overview.set_index(index)

    def _prompt_target(self) -> tuple[int, int]:
        stats = self.card.stats
        return (stats.layer, stats.neuron) if stats is not None else (self.card.layer, self.card.neuron)

    def _build(self) -> pn.viewable.Viewable:
        no_index = pn.pane.Markdown(NO_INDEX_TEXT.format(tokens=self.indexer.max_tokens),
                                    css_classes=["neuron-no-index"], visible=self.indexer.param.index.rx.is_(None),
                                    sizing_mode="stretch_width")
        left = pn.Column(self.search, self.card.controls(), width=360, css_classes=["neuron-search-panel"])
        status = pn.pane.Markdown(self.state.param.status, css_classes=["neuron-status"],
                                  sizing_mode="stretch_width", margin=(0, 10))
        card = pn.Column(self.card, self.on_prompt, sizing_mode="stretch_width",
                         visible=self.card.param.stats.rx.is_not(None))
        main = pn.Column(
            pn.Row(left, pn.Column(status, card, sizing_mode="stretch_width"), sizing_mode="stretch_width"),
            self.overview, sizing_mode="stretch_width", loading=self.state.param.busy,
            visible=self.indexer.param.index.rx.is_not(None), css_classes=["neuron-main"])
        return pn.Column(self.indexer, alert(self.state.param.error, "neuron-error"), no_index, main,
                         sizing_mode="stretch_width", css_classes=["neuron-view"])

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout


__all__ = ["NeuronView", "parse_query"]
