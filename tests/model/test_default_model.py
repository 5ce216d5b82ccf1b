"""The logit lens on the embedded default model (SmolLM2-135M-Instruct), against plain Hugging Face.

The reference is a second, unwrapped copy of the model loaded from the same directory: forward
hooks on the embeddings and the 30 blocks, the final norm and the unembedding applied here.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from explorer.analyses.lens import CompareRequest, LensRequest, compare_prompts, logit_lens

pytestmark = pytest.mark.model

PROMPT = "The capital of France is"
# Misleading demonstrations: every earlier "capital" answer is a wrong city.
MISLEADING = ("The capital of Germany is Madrid. The capital of Spain is Rome. "
              "The capital of Italy is Berlin. The capital of France is")
TOL = 1e-5


@pytest.fixture(scope="module")
def plain(default_model_dir):
    """A separate plain copy of the default model (never wrapped by nnsight)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32, local_files_only=True)
    model.config.use_cache = False
    tok = AutoTokenizer.from_pretrained(str(default_model_dir), local_files_only=True)
    return model.eval(), tok


def reference(plain, prompt: str):
    """([31, T, V] lens logits, [T, V] the model's own logits) in plain PyTorch."""
    model, tok = plain
    ids = tok(prompt, return_tensors="pt").input_ids
    rows: list[torch.Tensor] = []

    def keep(_m, _i, out):
        rows.append(out[0] if isinstance(out, tuple) else out)

    handles = [model.model.embed_tokens.register_forward_hook(keep)]
    handles += [layer.register_forward_hook(keep) for layer in model.model.layers]
    try:
        with torch.no_grad():
            own = model(input_ids=ids).logits[0]
            lens = model.lm_head(model.model.norm(torch.stack([r[0] for r in rows])))
    finally:
        for h in handles:
            h.remove()
    return ids[0], lens, own


def test_capital_of_france_ends_on_paris(default_session, plain):
    result = logit_lens(default_session, LensRequest(PROMPT, top_k=5))
    assert result.n_rows == 31 and result.layer_labels[0] == "embed" and result.layer_labels[-1] == "L29"
    assert result.tokens.tolist() == ["The", " capital", " of", " France", " is"]
    assert result.top_tokens[-1, -1, 0] == " Paris"
    assert result.target == " Paris" and result.target_ranks[-1, -1] == 1
    # " Paris" emerges in the later layers, not from the embeddings.
    assert result.target_ranks[0, -1] > 100
    assert result.target_probs[-1, -1] > result.target_probs[:16, -1].max()


@pytest.mark.parametrize("prompt", [PROMPT, MISLEADING])
def test_every_row_matches_a_plain_copy(default_session, plain, prompt):
    ids, lens, own = reference(plain, prompt)
    result = logit_lens(default_session, LensRequest(prompt, target=" Paris", top_k=10))
    assert result.token_ids.tolist() == ids.tolist()

    # The last row is the model's own next-token distribution at every position: the softmax of
    # the logits a plain forward gives, taken in float64 (torch's float32 softmax kernel is
    # itself up to ~1.7e-5 off on AVX2 CPUs, measured; the lens's reductions are ~2e-7 off).
    own_p = torch.softmax(own.double(), -1)
    own_top_p, own_top_ids = torch.topk(own_p, 10, dim=-1)
    np.testing.assert_array_equal(result.top_ids[-1], own_top_ids.numpy())
    assert np.abs(result.top_probs[-1] - own_top_p.numpy()).max() <= TOL
    assert np.abs(result.target_probs[-1] - own_p[:, result.target_id].numpy()).max() <= TOL

    # Every row against float64 reductions of the plain copy's float32 lens logits (the same
    # logits: the same stacked matmul). Intermediate rows reach |logit| ~160 and KL ~180 nats;
    # the lens reduces logits shifted by their max, which keeps float32 within ~1e-6 relative
    # here (a float32 log_softmax would be ~5e-5 relative off on KL).
    lp = torch.log_softmax(lens.double(), -1)
    p = lp.exp()
    top_p, top_ids = torch.topk(p, 10, dim=-1)
    assert (result.top_ids == top_ids.numpy()).mean() > 0.999  # ids may only swap on exact ties
    assert np.abs(result.top_probs - top_p.numpy()).max() <= TOL
    np.testing.assert_allclose(result.entropy, (-(p * lp).sum(-1)).numpy(), rtol=1e-5, atol=TOL)
    np.testing.assert_allclose(result.kl_to_final, (p[-1] * (lp[-1] - lp)).sum(-1).numpy(), rtol=1e-5, atol=TOL)
    t_lp = lp[..., result.target_id]
    assert np.abs(result.target_probs - t_lp.exp().numpy()).max() <= TOL
    lo = (lp > t_lp[..., None] + 1e-5).sum(-1) + 1
    hi = (lp > t_lp[..., None] - 1e-5).sum(-1)  # counts the target itself
    assert ((result.target_ranks >= lo.numpy()) & (result.target_ranks <= hi.numpy())).all()


def test_misleading_demonstrations_comparison(default_session, plain):
    comparison = compare_prompts(default_session, CompareRequest(PROMPT, MISLEADING, target=" Paris"))
    assert comparison.a.target == comparison.b.target == " Paris"
    curve_a, curve_b = comparison.curves()
    assert curve_a.shape == curve_b.shape == (31,)
    # Both curves end at the model's own probability of " Paris" after each prompt.
    for prompt, curve in ((PROMPT, curve_a), (MISLEADING, curve_b)):
        _, _, own = reference(plain, prompt)
        own_paris = torch.softmax(own[-1].double(), -1)[7042].item()
        assert abs(curve[-1] - own_paris) <= TOL
    # The two prompts agree at the embeddings (same last token) and part ways later on.
    assert abs(comparison.difference()[0]) <= TOL
    row = comparison.divergence_row(0.05)
    assert row is not None and row > 0
    assert np.abs(comparison.difference()[:row]).max() <= 0.05
    # Each half equals its own lens run.
    alone = logit_lens(default_session, LensRequest(MISLEADING, target=" Paris", top_k=10))
    np.testing.assert_array_equal(comparison.b.top_ids, alone.top_ids)
    np.testing.assert_allclose(comparison.b.target_probs, alone.target_probs, rtol=0, atol=TOL)
    np.testing.assert_allclose(comparison.b.kl_to_final, alone.kl_to_final, rtol=1e-5, atol=TOL)


def test_bfloat16_unembedding_agrees_on_top1(default_session):
    fp32 = logit_lens(default_session, LensRequest(MISLEADING, target=" Paris"))
    bf16 = logit_lens(default_session, LensRequest(MISLEADING, target=" Paris", unembed_dtype="bfloat16"))
    agreement = (fp32.top_ids[..., 0] == bf16.top_ids[..., 0]).mean()
    assert agreement >= 0.95, agreement
    assert bf16.top_tokens[-1, -1, 0] == fp32.top_tokens[-1, -1, 0]
