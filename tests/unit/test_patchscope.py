"""Patchscopes equal a plain forward-hook patch in transformers, one run per (layer, position)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from explorer.analyses.lens import LensRequest, logit_lens
from explorer.analyses.patchscope import (
    DEFAULT_IDENTITY,
    PatchscopeError,
    PatchscopeRequest,
    PatchscopeResult,
    patchscope,
)

PROMPT = "The capital of France is Paris"


def hooked_patch(session, prompt: str, position: int, layer: int, identity: str) -> torch.Tensor:
    """Next-token probabilities of ``identity`` with block ``layer``'s output at its last token
    replaced by the same block's output of ``prompt`` at ``position``: two plain forwards."""
    block = session.hf_blocks()[layer]
    saved = {}

    def grab(module, args, output):
        saved["h"] = (output[0] if isinstance(output, tuple) else output)[0, position].clone()

    def put(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h[0, -1] = saved["h"]
        return output

    with torch.no_grad():
        handle = block.register_forward_hook(grab)
        session.hf(session.encode(prompt)[None])
        handle.remove()
        handle = block.register_forward_hook(put)
        logits = session.hf(session.encode(identity)[None]).logits[0, -1]
        handle.remove()
    return torch.softmax(logits.float(), -1)


def test_patchscope_equals_a_plain_hook_patch(tiny_session):
    result = patchscope(tiny_session, PROMPT, positions=(1, -1), top_k=4, batch_size=5)
    assert result.validate() is None
    assert result.top_ids.shape == (tiny_session.n_layers, 2, 4)
    for layer in range(tiny_session.n_layers):
        for col, pos in enumerate((1, -1)):
            ref = hooked_patch(tiny_session, PROMPT, pos, layer, DEFAULT_IDENTITY)
            p, i = ref.topk(4)
            np.testing.assert_allclose(result.top_probs[layer, col], p.numpy(), atol=2e-5, rtol=1e-4)
            # ids agree unless two probabilities tie to float precision
            same = result.top_ids[layer, col] == i.numpy()
            assert same.all() or np.allclose(np.diff(p.numpy()), 0, atol=1e-6)


def test_every_position_and_the_last_block_is_the_logit_lens(tiny_sessions):
    s = tiny_sessions["llama"]
    result = patchscope(s, PROMPT, top_k=3)
    lens = logit_lens(s, LensRequest(PROMPT, top_k=3))
    assert list(result.positions) == list(range(len(lens.tokens)))
    # at the last block the patched state goes straight to the final norm and the unembedding
    np.testing.assert_array_equal(result.top_ids[-1], lens.top_ids[-1])
    np.testing.assert_allclose(result.top_probs[-1], lens.top_probs[-1], atol=1e-5)


def test_round_trip_summary_and_errors(tiny_sessions):
    s = tiny_sessions["gpt2"]
    result = patchscope(s, PatchscopeRequest(PROMPT, positions=(-2,), identity="x -> x\n?", top_k=2))
    back = PatchscopeResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert np.array_equal(back.top_ids, result.top_ids) and back.top_tokens.dtype.kind == "U"
    summary = result.summary()
    assert set(summary) >= {"layers", "top_tokens", "top_probs"}
    assert len(summary["layers"]) == s.n_layers and len(summary["top_tokens"][0]) == 2
    assert summary["position"] == len(result.tokens) - 2
    with pytest.raises(PatchscopeError, match="outside"):
        patchscope(s, PROMPT, positions=(99,))
    with pytest.raises(PatchscopeError, match="top-k"):
        patchscope(s, PROMPT, top_k=0)
    with pytest.raises(PatchscopeError, match="placeholder"):
        patchscope(s, PROMPT, placeholder=50)
