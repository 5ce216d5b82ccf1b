"""A model's weights fingerprint: which model a saved artefact (a steering vector) was made on,
whatever folder or name the model was loaded from.

``model_fingerprint`` hashes the config's geometry (model type, vocabulary, widths, depth, heads)
and a fixed sample of the input embedding matrix: 32 rows spread evenly over the vocabulary,
every column, cast to bfloat16 first so that the same weights loaded in float32 or bfloat16 give
the same hash (a float16 load may round differently and then reads as another model). The same
model copied to another folder has the same fingerprint; a fine-tuned or different model has
another one (its embeddings differ; a copy trained with frozen embeddings, as the pronoun swap's
``last:N`` runs, shares them and so reads as the same model). It is computed once per session
(cached) and costs one small gather.
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from explorer.core.session import ModelSession

SAMPLE_ROWS = 32
CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
               "num_attention_heads", "num_key_value_heads", "n_embd", "n_layer", "n_head")


def weights_fingerprint(model) -> str:
    """The fingerprint of a Hugging Face causal LM ('' when its embeddings cannot be read,
    e.g. left on the meta device by disk offload).

    >>> from explorer.core.fingerprint import weights_fingerprint
    >>> len(weights_fingerprint(session.hf))
    16
    """
    config = model.config
    geometry = {k: getattr(config, k, None) for k in CONFIG_KEYS}
    h = hashlib.sha256(json.dumps(geometry, sort_keys=True, default=str).encode())
    try:
        weight = model.get_input_embeddings().weight
        if weight.device.type == "meta":
            return ""
        rows = torch.linspace(0, weight.shape[0] - 1, SAMPLE_ROWS).round().long()
        with torch.no_grad():
            sample = weight.detach()[rows.to(weight.device)].to("cpu", torch.bfloat16).contiguous()
    except (AttributeError, NotImplementedError, RuntimeError):
        return ""
    h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(session: ModelSession) -> str:
    """``weights_fingerprint`` of the session's model, computed once per session."""
    return session.cached(("weights-fingerprint",), lambda: weights_fingerprint(session.hf))
