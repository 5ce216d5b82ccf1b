"""The neuron view's search part: description text (token patterns, written and imported
explanations) or a token the neuron fires on (``token:`` prefix or the token mode); a pick in
the hit list opens that neuron's card, *Ablate all hits* asks for them in the ablation tab."""
from __future__ import annotations

from collections.abc import Callable

import panel as pn
import param

from explorer.core.errors import ExplorerError
from explorer.neurons.describe import SearchHit, search, show_token
from explorer.neurons.index import NeuronIndex

from .chart_style import neuron_spec
from .parts import RunState


def parse_query(query: str, mode: str) -> tuple[str | None, str | None]:
    """(text, token) to search for: ``token:`` forces a token search (the rest is the token).

    >>> parse_query("token: he", "text")
    (None, 'he')
    """
    if query.lower().startswith("token:"):
        return None, query[len("token:"):].removeprefix(" ") or None
    if mode == "token":
        return None, query or None
    return (query.strip() or None), None


class SearchPart(pn.viewable.Viewer):
    """Search the open index; ``on_pick(layer, neuron)`` opens a hit, ``on_ablate(specs)`` ablates them all."""

    query = param.String(default="", label="Search descriptions",
                         doc="Words that must all appear in a description; 'token: he' finds neurons firing on ' he'.")
    search_mode = param.Selector(default="text", objects={"text": "text", "token": "token"}, label="Search by")
    run_search = param.Event(label="Search")
    hits = param.List(default=[], item_type=SearchHit, doc="The last search's hits.")
    search_status = param.String(default="")
    ablate_hits = param.Event(label="Ablate all hits")

    def __init__(self, state: RunState, on_pick: Callable[[int, int], None],
                 on_ablate: Callable[[tuple[str, ...]], None], **params) -> None:
        """``state``: the view's shared status/error line."""
        super().__init__(**params)
        self.state, self._on_pick, self._on_ablate = state, on_pick, on_ablate
        self.index: NeuronIndex | None = None
        # A list box: unlike a Select it may have nothing selected, so new hits open nothing by themselves.
        self._hit_select = pn.widgets.MultiSelect(options={}, size=10, css_classes=["neuron-hits"],
                                                  sizing_mode="stretch_width", disabled=True)
        self._hit_select.param.watch(self._on_hit_selected, "value")

    def set_index(self, index: NeuronIndex) -> None:
        """A new index: the hits are cleared."""
        self.index = index
        self._hit_select.param.update(options={}, value=[], disabled=True)
        self.param.update(hits=[], search_status="")

    @param.depends("run_search", watch=True)
    def _on_search(self) -> None:
        self.do_search()

    def do_search(self) -> list[SearchHit]:
        """Search the open index's descriptions; the hits fill the list (best first)."""
        if self.index is None:
            self.state.error = "**No index is open:** open or build one first."
            return []
        text, token = parse_query(self.query, self.search_mode)
        try:
            if text is None and token is None:
                raise ExplorerError("the search is empty: type words of a description, or a token "
                                    "(e.g. 'token: he')")
            hits = search(self.index, query=text, token=token, limit=200)
        except ExplorerError as e:
            self.state.error = f"**Could not search:** {e}"
            return []
        options = {}
        for h in hits:
            score = "" if h.score is None else f" · score {h.score:.2f}"
            label = f"{neuron_spec(h.layer, h.neuron)} · {h.relevance:.2f} · [{h.source}] {h.description}{score}"
            options.setdefault(label[:160], f"{h.layer}:{h.neuron}:{len(options)}")
        what = f"token {show_token(token)}" if token is not None else f"'{text}'"
        self._hit_select.param.update(options=options, disabled=not hits, value=[])
        self.param.update(hits=hits, search_status=(
            f"{len(hits)} neurons for {what}" if hits else f"No neuron matches {what}."))
        self.state.error = ""
        return hits

    def _on_hit_selected(self, event) -> None:
        picked = [v for v in event.new if v not in (event.old or [])] or list(event.new)
        if not picked:
            return
        layer, neuron, _ = picked[0].split(":")
        self._on_pick(int(layer), int(neuron))

    def pick_hit(self, i: int) -> None:
        """Select the i-th hit in the list (what a click on it does)."""
        self._hit_select.value = [list(self._hit_select.options.values())[i]]

    def hit_specs(self) -> tuple[str, ...]:
        """The search hits as unique neuron specs, best first."""
        return tuple(dict.fromkeys(f"{h.layer}:{h.neuron}" for h in self.hits))

    @param.depends("ablate_hits", watch=True)
    def _on_ablate_hits(self) -> None:
        if not self.hits:
            self.state.error = "**Nothing to ablate:** search first."
            return
        self._on_ablate(self.hit_specs())

    def __panel__(self) -> pn.viewable.Viewable:
        query = pn.widgets.TextInput.from_param(self.param.query, sizing_mode="stretch_width",
                                                placeholder="e.g. he  ·  token: she  ·  words of an explanation",
                                                css_classes=["neuron-query"])
        mode = pn.widgets.RadioButtonGroup.from_param(self.param.search_mode, css_classes=["neuron-search-mode"],
                                                      margin=(26, 10, 10, 10))
        search_btn = pn.widgets.Button.from_param(self.param.run_search, color="primary", width=90,
                                                  margin=(26, 10, 10, 10), css_classes=["neuron-search"])
        status = pn.pane.Markdown(self.param.search_status, css_classes=["neuron-search-status"],
                                  sizing_mode="stretch_width", margin=(0, 10))
        ablate_hits = pn.widgets.Button.from_param(self.param.ablate_hits, disabled=self.param.hits.rx.len() == 0,
                                                   css_classes=["neuron-ablate-hits"], sizing_mode="stretch_width")
        return pn.Column(pn.Row(query, search_btn, sizing_mode="stretch_width"), mode, status, self._hit_select,
                         ablate_hits, sizing_mode="stretch_width")
