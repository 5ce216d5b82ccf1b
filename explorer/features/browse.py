"""A feature's full card: what it reads, where it fires, what it writes.

- **Top examples** and statistics from the SAE's feature index (``explorer.features.units``).
- **Top inputs**, two views: (1) from the index, the tokens its top examples fire on, with
  their share of the top activation mass (the token pattern: what activates it in context);
  (2) the direct path from the token embedding: ``W_E · W_enc[:, f]`` (each token's embedding
  through the encoder direction, mean over the vocabulary subtracted), which ignores every
  block before the SAE's site, so it is a rough guide for deep layers.
- **Top output tokens**: the decoder direction through the unembedding
  (``explorer.features.card.feature_card``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from explorer.core.results import Result, array
from explorer.features.card import feature_card
from explorer.features.encode import open_sae
from explorer.features.sae import SAEError
from explorer.neurons.describe import DescriptionStore, token_pattern
from explorer.neurons.index import NeuronIndex


@dataclass(frozen=True, eq=False)
class FeatureProfile(Result):
    """A feature's card (see the module docstring): examples, inputs, outputs, statistics."""

    sae: str
    index: str
    feature: int
    layer: int
    site: str
    tokens_indexed: int
    frequency: float              # share of indexed tokens where it is > 0
    max: float
    mean: float
    pattern: str                  # the token pattern's summary
    description: str              # the best-scored stored description ("" if none)
    description_score: float | None
    input_tokens: np.ndarray = array("I", "str")          # firing tokens of the top examples
    input_mass: np.ndarray = array("I", "float64")        # their share of the top activation mass
    input_counts: np.ndarray = array("I", "int64")
    embed_tokens: np.ndarray = array("J", "str")          # W_E · W_enc[:, f], highest first
    embed_values: np.ndarray = array("J", "float64")
    top_tokens: np.ndarray = array("K", "str")            # W_U · (gain ⊙ W_dec[f]), promoted
    top_values: np.ndarray = array("K", "float64")
    bottom_tokens: np.ndarray = array("K", "str")         # suppressed
    bottom_values: np.ndarray = array("K", "float64")
    example_tokens: np.ndarray = array("E W", "str")      # top examples' windows
    example_positions: np.ndarray = array("E", "int64")
    example_activations: np.ndarray = array("E", "float32")


def embedding_inputs(session, sae, feature: int, top_k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, values): the ``top_k`` tokens whose embedding best drives the feature's encoder
    direction, ``W_E · W_enc[:, feature]`` minus its mean over the vocabulary."""
    emb = session.hf.get_input_embeddings().weight.detach().float()
    w = sae.W_enc[:, feature].detach().float().to(emb.device)
    values = (emb @ w).double()
    values = values - values.mean()
    k = min(top_k, values.numel())
    top = values.topk(k)
    strings = session.vocab_strings()
    return (np.array([strings[i] for i in top.indices.tolist()], dtype=str), top.values.cpu().numpy())


def feature_profile(session, sae: str, index: NeuronIndex, feature: int, top_k: int = 10,
                    n_examples: int = 10, any_model: bool = False) -> FeatureProfile:
    """The card of feature ``feature`` of the SAE ``sae`` (a directory), with its ``index``.

    >>> from explorer.features.train import train_sae
    >>> from explorer.features.units import index_features
    >>> from explorer.features.browse import feature_profile
    >>> _ = train_sae(session, layer=3, width=64, k=4, max_tokens=2048, window=64, batch=256,
    ...               batch_windows=8, eval_windows=2, out_dir="sae")
    >>> index = index_features(session, "sae", max_tokens=512, window=32, top_k=4, n_random=2)
    >>> card = feature_profile(session, "sae", index, 5, top_k=3)
    >>> card.layer, card.top_tokens.shape, card.embed_tokens.shape
    (3, (3,), (3,))
    """
    model = open_sae(session, sae, any_model=any_model)
    if index.unit_kind != "sae" or index.n_units != model.d_sae:
        raise SAEError(f"{index.path} is not this SAE's feature index")
    layer = index.layers[0]
    index.check_neuron(layer, feature)
    out = feature_card(session, model, feature, top_k=top_k, any_model=any_model)
    pattern = token_pattern(index, layer, feature)
    stats = index.stats(layer, feature)
    ex = index.top_examples(layer, feature, n_examples)
    descs = [d for d in DescriptionStore(index.path).for_neuron(layer, feature) if d.get("description")]
    descs.sort(key=lambda d: -(d["score"] if d.get("score") is not None else -2.0))
    with torch.no_grad():
        e_tok, e_val = embedding_inputs(session, model, feature, top_k)
    W = index.window
    return FeatureProfile(
        sae=str(sae), index=str(index.path), feature=int(feature), layer=int(layer), site=out.site,
        tokens_indexed=index.tokens_done, frequency=stats.frequency, max=stats.max, mean=stats.mean,
        pattern=pattern.summary, description=descs[0]["description"] if descs else "",
        description_score=descs[0].get("score") if descs else None,
        input_tokens=pattern.tokens[:top_k], input_mass=pattern.mass[:top_k], input_counts=pattern.counts[:top_k],
        embed_tokens=e_tok, embed_values=e_val, top_tokens=out.top_tokens, top_values=out.top_values,
        bottom_tokens=out.bottom_tokens, bottom_values=out.bottom_values,
        example_tokens=np.stack([e.tokens for e in ex]).astype(str) if ex else np.zeros((0, W), dtype=str),
        example_positions=np.array([e.position for e in ex], dtype=np.int64),
        example_activations=np.array([e.activation for e in ex], dtype=np.float32))
