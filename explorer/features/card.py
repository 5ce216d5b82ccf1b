"""A feature's card: the output tokens its decoder direction promotes and suppresses.

The direct effect of a feature on the logits, ignoring everything after its site and the final
norm's per-vector scale, is its decoder row through the unembedding: ``W_U · W_dec[j]``
(Neuronpedia's "top logits"), with the final norm's elementwise weight (the RMSNorm/LayerNorm
gain) applied first, so the directions that the model's norm amplifies count as they do there,
and no unembedding bias; the mean over the vocabulary is subtracted, so the numbers say which
tokens the direction favours over the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from explorer.core.results import Result, array
from explorer.features.encode import open_sae
from explorer.features.sae import SAEError, SparseAutoencoder


@dataclass(frozen=True, eq=False)
class FeatureCard(Result):
    """A feature's top promoted (``top_*``) and suppressed (``bottom_*``) output tokens."""

    sae: str
    feature: int
    layer: int
    site: str
    top_tokens: np.ndarray = array("K", "str")
    top_values: np.ndarray = array("K", "float64")
    bottom_tokens: np.ndarray = array("K", "str")
    bottom_values: np.ndarray = array("K", "float64")


def _norm_gain(session) -> torch.Tensor | None:
    """The final norm's elementwise weight, where it has one."""
    norm = session.hf.get_submodule(session.adapter.final_norm)
    w = getattr(norm, "weight", None)
    return None if w is None else w.detach().float()


def feature_card(session, sae: str | SparseAutoencoder, feature: int, top_k: int = 10,
                 any_model: bool = False) -> FeatureCard:
    """The ``top_k`` output tokens feature ``feature``'s decoder direction promotes and suppresses.

    >>> from explorer.features.card import feature_card
    >>> from explorer.features.sae import SAEConfig, SparseAutoencoder
    >>> sae = SparseAutoencoder.init(SAEConfig(d_in=576, d_sae=8, architecture="topk", k=2,
    ...                              metadata={"hook_name": "blocks.12.hook_resid_post"}))
    >>> card = feature_card(session, sae, 3, top_k=4, any_model=True)
    >>> card.top_tokens.shape, bool(card.top_values[0] >= card.top_values[-1])
    ((4,), True)
    """
    model = open_sae(session, sae, any_model=any_model)
    if not 0 <= feature < model.d_sae:
        raise SAEError(f"feature {feature} is out of range: the SAE has features 0..{model.d_sae - 1}")
    layer, site = model.cfg.site
    d = model.W_dec[feature].detach().float().to(session.device)
    gain = _norm_gain(session)
    if gain is not None:
        d = d * gain.to(d.device)
    logits = (session.unembed_weight().float() @ d).double()
    logits = logits - logits.mean()
    k = min(top_k, logits.numel())
    top, bottom = logits.topk(k), (-logits).topk(k)
    strings = session.vocab_strings()
    source = sae if isinstance(sae, str) else str(model.cfg.metadata.get("source_path", ""))
    return FeatureCard(sae=source, feature=int(feature), layer=layer, site=site,
                       top_tokens=np.array([strings[i] for i in top.indices.tolist()], dtype=str),
                       top_values=top.values.cpu().numpy(),
                       bottom_tokens=np.array([strings[i] for i in bottom.indices.tolist()], dtype=str),
                       bottom_values=(-bottom.values).cpu().numpy())
