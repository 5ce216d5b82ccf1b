"""What works on any index's units (a neuron index, or an SAE's feature index): which units fire
on the user's own text, how concentrated their token patterns are, and a comparison of two
indexes at one layer (features vs neurons: the case for SAEs, in numbers).

- **Units on text**: the prompt runs through the model (stopped after the layer's site) and the
  ``top_k`` most active units at every token are listed, with their activations.
- **Token-pattern concentration** of a unit: the share of its top examples' positive activation
  mass that falls on its single most weighty firing token (the token at each top example's
  position). 1.0: every top example fires on the same token; near 1/k: all on different ones.
  Only *live* units count: those with at least one top example whose activation is > 0.
- **Explanation score**: the simulation score (``explorer.neurons.describe.explain_neuron``)
  of each unit explained so far at the layer, by one explainer; undefined scores are left out
  of the mean (and counted).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from explorer.core.errors import ExplorerError
from explorer.core.results import Result, array
from explorer.neurons.index import NeuronIndex

CONCENTRATED = 0.5  # a unit whose top token holds at least this share of its top mass is "single-token"


# =================================================================== units on text
@dataclass(frozen=True, eq=False)
class UnitsOnText(Result):
    """Per token of a prompt, the index's ``top_k`` most active units at one layer (strongest first)."""

    prompt: str
    layer: int
    unit_name: str                 # "neuron" or "feature"
    index: str                     # the index directory
    token_ids: np.ndarray = array("T", "int64")
    tokens: np.ndarray = array("T", "str")
    units: np.ndarray = array("T K", "int64")
    activations: np.ndarray = array("T K", "float32")

    def rows(self) -> list[list[dict]]:
        """[[{"unit", "activation"}, ...] per token], positive activations only."""
        return [[{"unit": int(u), "activation": float(a)} for u, a in zip(us, acts) if a > 0]
                for us, acts in zip(self.units, self.activations)]


def units_on_text(session, index: NeuronIndex, prompt: str, layer: int | None = None,
                  top_k: int = 5) -> UnitsOnText:
    """Which of the index's units fire on ``prompt`` ("which features fire here?").

    ``layer`` None: the index's only layer (a feature index), else required. ``session`` must run
    the index's model.

    >>> from explorer import build_index
    >>> from explorer.neurons.units import units_on_text
    >>> index = build_index(session, max_tokens=256, window=32, top_k=4, n_random=2, out_dir="index")
    >>> fired = units_on_text(session, index, "The nurse said", layer=3, top_k=2)
    >>> fired.tokens.tolist(), fired.units.shape
    (['The', ' nurse', ' said'], (3, 2))
    """
    from explorer.neurons.describe import check_session

    if top_k < 1:
        raise ExplorerError(f"top_k must be ≥ 1, got {top_k}")
    if not prompt:
        raise ExplorerError("the text is empty")
    if layer is None:
        if len(index.layers) != 1:
            raise ExplorerError(f"the index holds layers {index.layers[0]}..{index.layers[-1]}: give the layer")
        layer = index.layers[0]
    index.row(layer)
    index.check_neuron(layer, 0)
    check_session(index, session)
    ids = session.encode(prompt)
    acts = index.unit_activations(session, layer, ids[None])[0]          # [T, N]
    k = min(top_k, acts.shape[-1])
    vals, idx = acts.topk(k, dim=-1)
    return UnitsOnText(prompt=prompt, layer=int(layer), unit_name=index.unit_name, index=str(index.path),
                       token_ids=ids.numpy().astype(np.int64),
                       tokens=np.array(session.decode_each(ids.numpy()).tolist(), dtype=str),
                       units=idx.cpu().numpy().astype(np.int64), activations=vals.cpu().numpy().astype(np.float32))


# =================================================================== concentration
def pattern_concentration(token_ids: np.ndarray, activations: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per unit, the top token's share of the top examples' positive activation mass.

    ``token_ids``, ``activations``, ``valid``: [U, k] (firing token, activation, whether the
    example exists). Returns [U] float64; NaN for a unit with no positive mass (not live).
    """
    acts = np.where(valid, np.maximum(np.asarray(activations, dtype=np.float64), 0.0), 0.0)
    ids = np.where(valid, token_ids, -1)
    same = ids[:, :, None] == ids[:, None, :]                            # [U, k, k]
    per_token = (same * acts[:, None, :]).sum(-1)                        # each example's token's mass
    total = acts.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, per_token.max(-1) / np.where(total > 0, total, 1.0), np.nan)


def layer_concentration(index: NeuronIndex, layer: int) -> np.ndarray:
    """[n_units] the token-pattern concentration of every unit of ``layer`` (NaN: not live)."""
    row = index.row(layer)
    a = index.arrays
    fire = index.firing_token_ids()[row]
    return pattern_concentration(fire, a["top_act"][row], a["top_row"][row] >= 0)


# =================================================================== comparison
@dataclass(frozen=True, eq=False)
class UnitComparison(Result):
    """Features (an SAE's index) vs neurons (a neuron index) at one layer.

    ``*_concentration``: mean token-pattern concentration over live units; ``*_single_token``:
    share of live units whose top token holds ≥ ``CONCENTRATED`` of their top mass;
    ``*_mean_score``: mean simulation score of the units explained by ``explainer`` (None when
    none has a defined score); ``*_explained``: units explained; ``*_scored``: of those, with a
    defined score.
    """

    layer: int
    explainer: str
    feature_index: str
    neuron_index: str
    feature_units: int
    neuron_units: int
    feature_live: int
    neuron_live: int
    feature_concentration: float
    neuron_concentration: float
    feature_single_token: float
    neuron_single_token: float
    feature_explained: int
    neuron_explained: int
    feature_scored: int
    neuron_scored: int
    feature_mean_score: float | None
    neuron_mean_score: float | None
    feature_scores: np.ndarray = array("F", "float64")   # the defined scores, by unit number
    neuron_scores: np.ndarray = array("N", "float64")
    definition: str = ("concentration: the top firing token's share of a unit's top-example activation mass, "
                       "mean over live units; score: simulation score (Pearson r) of written explanations")


def _scores(index: NeuronIndex, layer: int, explainer: str | None) -> tuple[int, list[float], str]:
    from explorer.neurons.describe import DescriptionStore

    found = [e for e in DescriptionStore(index.path).explanations()
             if e.layer == layer and (explainer is None or e.explainer == explainer)]
    names = sorted({e.explainer for e in found})
    if explainer is None and len(names) > 1:
        raise ExplorerError(f"{index.path} holds explanations by {', '.join(names)}: name the explainer")
    found.sort(key=lambda e: e.neuron)
    return len(found), [float(e.score) for e in found if e.score is not None], (names[0] if names else "")


def _side(index: NeuronIndex, layer: int) -> tuple[int, int, float, float]:
    c = layer_concentration(index, layer)
    live = c[np.isfinite(c)]
    mean = float(live.mean()) if live.size else float("nan")
    single = float((live >= CONCENTRATED).mean()) if live.size else float("nan")
    return len(c), int(live.size), mean, single


def compare_units(features: NeuronIndex, neurons: NeuronIndex, layer: int | None = None,
                  explainer: str | None = None) -> UnitComparison:
    """Token-pattern concentration and mean explanation score of features vs neurons at one layer.

    ``layer`` None: the feature index's layer. Both indexes must hold the layer; explanations
    are read from their description stores (explain some units first: ``explain_sample``).

    >>> from explorer import build_index
    >>> from explorer.neurons.units import compare_units
    >>> index = build_index(session, max_tokens=256, window=32, top_k=4, n_random=2, out_dir="index")
    >>> c = compare_units(index, index, layer=3)       # (an index against itself, for the shape)
    >>> c.feature_concentration == c.neuron_concentration, 0 < c.neuron_concentration <= 1
    (True, True)
    """
    if layer is None:
        layer = features.layers[0]
    features.row(layer)
    neurons.row(layer)
    fu, fl, fc, fs = _side(features, layer)
    nu, nl, nc, ns = _side(neurons, layer)
    if explainer is None:  # the explainer both sides share, where there is one
        f_names = {e.explainer for e in _all_explanations(features, layer)}
        n_names = {e.explainer for e in _all_explanations(neurons, layer)}
        shared = sorted(f_names & n_names) or sorted(f_names | n_names)
        explainer = shared[0] if shared else None
    fe, f_scores, _ = _scores(features, layer, explainer)
    ne, n_scores, _ = _scores(neurons, layer, explainer)
    return UnitComparison(
        layer=int(layer), explainer=explainer or "", feature_index=str(features.path), neuron_index=str(neurons.path),
        feature_units=fu, neuron_units=nu, feature_live=fl, neuron_live=nl, feature_concentration=fc,
        neuron_concentration=nc, feature_single_token=fs, neuron_single_token=ns, feature_explained=fe,
        neuron_explained=ne, feature_scored=len(f_scores), neuron_scored=len(n_scores),
        feature_mean_score=float(np.mean(f_scores)) if f_scores else None,
        neuron_mean_score=float(np.mean(n_scores)) if n_scores else None,
        feature_scores=np.array(f_scores, dtype=np.float64), neuron_scores=np.array(n_scores, dtype=np.float64))


def _all_explanations(index: NeuronIndex, layer: int):
    from explorer.neurons.describe import DescriptionStore

    return [e for e in DescriptionStore(index.path).explanations() if e.layer == layer]


def sample_live_units(index: NeuronIndex, layer: int, n: int, seed: int = 0) -> list[int]:
    """``n`` live units of ``layer`` drawn uniformly without replacement (seeded), ascending."""
    c = layer_concentration(index, layer)
    live = np.flatnonzero(np.isfinite(c))
    if n >= live.size:
        return live.tolist()
    g = np.random.default_rng(seed)
    return sorted(int(u) for u in g.choice(live, size=n, replace=False))


def explain_sample(session, index: NeuronIndex, layer: int, n: int, seed: int = 0, explainer=None,
                   ctx=None, **explain_fields) -> list:
    """Explain (and score) ``n`` live units of ``layer`` drawn by ``sample_live_units``; cached
    explanations are reused. Returns the ``Explanation`` results."""
    from explorer.neurons.describe import Explainer, explain_neuron

    explainer = Explainer.load(explainer, session)
    out = []
    units = sample_live_units(index, layer, n, seed)
    for i, unit in enumerate(units):
        if ctx is not None:
            if ctx.cancelled:
                break
            ctx.report(i, len(units), message=f"explaining {index.unit_name} {unit}")
        with torch.no_grad():
            out.append(explain_neuron(session, index=index, layer=layer, neuron=unit, explainer=explainer,
                                      **explain_fields))
    return out
