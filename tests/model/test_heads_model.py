"""Heads on the embedded default model (SmolLM2-135M: 30 layers, 9 query heads sharing 3 KV heads).

References come from a separate plain copy of the model loaded with HF's eager attention.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli.main import main
from explorer.analyses.heads import HeadsRequest, attention_patterns, direct_logit_attribution, head_scores

pytestmark = pytest.mark.model

PROMPT = "The capital of France is"
LONGER = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def plain(default_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32,
                                                 local_files_only=True, attn_implementation="eager")
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def test_an_induction_head_on_repeated_random_tokens(default_session, plain):
    result = head_scores(default_session, HeadsRequest(PROMPT, seq_len=24, seed=0))
    layer, head, score = result.top("induction", 1)[0]
    top = ", ".join(f"L{l}H{h} {v:.3f}" for l, h, v in result.top("induction", 5))
    print(f"\nstrongest induction heads (24 random tokens ×2, seed 0): {top}")
    assert score > 0.5
    assert result.induction.shape == (30, 9)
    # The same head on an independent plain eager forward over the same random sequence.
    with torch.no_grad():
        att = plain(torch.from_numpy(result.random_ids)[None], output_attentions=True).attentions[layer][0, head]
    n = 24
    second = range(len(result.random_ids) - n, len(result.random_ids))
    expected = float(np.mean([att[q, q - n + 1].item() for q in second]))
    assert score == pytest.approx(expected, abs=1e-5)
    assert ("induction" in result.roles(0.5)[(layer, head)])
    # Another seed finds the same head among the strong ones: it is a property of the head.
    other = head_scores(default_session, HeadsRequest(PROMPT, seq_len=24, seed=1))
    assert other.induction[layer, head] > 0.5


def test_patterns_equal_eager_output_attentions(default_session, plain):
    result = attention_patterns(default_session, LONGER)
    ids = default_session.encode(LONGER)
    with torch.no_grad():
        ref = torch.stack([a[0] for a in plain(ids[None], output_attentions=True).attentions]).numpy()
    assert result.patterns.shape == (30, 9, ids.numel(), ids.numel()) == ref.shape
    np.testing.assert_allclose(result.patterns, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(result.patterns.sum(-1), 1.0, atol=1e-5)
    assert default_session.hf.config._attn_implementation == "sdpa"


def test_dla_adds_up_to_the_final_logit(default_session, plain):
    result = direct_logit_attribution(default_session, PROMPT)
    ids = default_session.encode(PROMPT)
    with torch.no_grad():
        logits = plain(ids[None]).logits[0, -1]
    assert result.target == " Paris" and result.target_id == int(logits.argmax())
    assert result.logit == pytest.approx(float(logits[result.target_id]), abs=1e-4)
    assert abs(result.total - float(logits[result.target_id])) < 1e-3
    assert result.norm_kind == "rmsnorm" and result.final_norm_bias == 0.0 and result.unembed_bias == 0.0


@pytest.mark.parametrize("layer, head", [(23, 4), (29, 1)])
def test_head_dla_equals_hooks(default_session, plain, layer, head):
    """A head's DLA from forward hooks on the plain copy: its slice of o_proj's input through
    its slice of o_proj's weight, through the final RMSNorm with the clean scale, onto W_U[t]."""
    result = direct_logit_attribution(default_session, PROMPT)
    got = {}
    o_proj = plain.model.layers[layer].self_attn.o_proj
    h1 = o_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("z", a[0][0, -1].double()))
    h2 = plain.model.norm.register_forward_pre_hook(lambda m, a: got.__setitem__("h", a[0][0, -1].double()))
    try:
        with torch.no_grad():
            plain(default_session.encode(PROMPT)[None])
    finally:
        h1.remove()
        h2.remove()
    dh = 64
    part = o_proj.weight.double()[:, head * dh:(head + 1) * dh] @ got["z"][head * dh:(head + 1) * dh]
    h = got["h"]
    rms = torch.sqrt(h.pow(2).mean() + plain.model.norm.variance_epsilon)
    expected = float(plain.lm_head.weight[result.target_id].double()
                     @ (plain.model.norm.weight.double() * part / rms))
    assert result.heads[layer, head] == pytest.approx(expected, abs=1e-4)


def test_cli_heads_json_on_default_model(capsys, default_model_dir):
    code = main(["heads", "--model", str(default_model_dir), "--prompt", PROMPT, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert data["tokens"] == ["The", " capital", " of", " France", " is"] and data["target"] == " Paris"
    for name in ("previous_token", "induction", "duplicate_token", "bos", "entropy", "dla"):
        assert len(data["scores"][name]) == 30 and len(data["scores"][name][0]) == 9
    assert max(max(row) for row in data["scores"]["induction"]) > 0.5
