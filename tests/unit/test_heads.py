"""Attention patterns, head scores and direct logit attribution on tiny models of every family.

References never go through the engine: each family's tiny model is rebuilt as a separate plain
copy (same seed, identical weights, asserted), switched to HF's eager attention and run with
``output_attentions=True``; DLA parts are recomputed from ordinary forward hooks with the final
norm's scale frozen by hand, in float64. Module paths are written out here per family rather
than read from ``explorer.core.adapters``. Scores are checked on hand-built patterns whose answers
are known, and the engine's wiring (which invoke feeds which score) is checked by substituting
such patterns into a real run.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli.main import main
from explorer.analyses import heads as heads_mod
from explorer.analyses.heads import (
    AttentionRequest,
    AttentionResult,
    DLARequest,
    DLAResult,
    HeadPattern,
    HeadScores,
    HeadsError,
    HeadsRequest,
    attention_patterns,
    bos_scores,
    direct_logit_attribution,
    duplicate_token_scores,
    eager_attention,
    entropy_scores,
    head_pattern,
    head_scores,
    induction_scores,
    parse_head,
    previous_token_scores,
)
from explorer.core.errors import EmptyPromptError, ExplorerError, TokenError
from explorer.core.session import ModelSession
from tiny_models import FAMILIES, make_tiny_model

# Written out independently of explorer/core/adapters.py.
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma2", "gemma3_text")
BLOCKS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", **{f: "model.layers" for f in _LLAMA_LIKE}}
EMBED_OUT = {"gpt2": "transformer.drop", "gpt_neox": "gpt_neox.emb_dropout",
             **{f: "model.embed_tokens" for f in _LLAMA_LIKE}}
O_PROJ = {"gpt2": "attn.c_proj", "gpt_neox": "attention.dense", **{f: "self_attn.o_proj" for f in _LLAMA_LIKE}}
FINAL_NORM = {"gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm",
              **{f: "model.norm" for f in _LLAMA_LIKE}}
# Norms of the attention / MLP output before the residual add (post-norm families only).
ATTN_POST_NORM = {f: "post_attention_layernorm" for f in ("gemma2", "gemma3_text", "olmo2")}
MLP_POST_NORM = {f: "post_feedforward_layernorm" for f in ("gemma2", "gemma3_text", "olmo2")}
GAIN_OFFSET = {"gemma2": 1.0, "gemma3_text": 1.0}  # Gemma's RMSNorm scales by 1 + weight
N_LAYERS, N_HEADS = 3, 4  # the conftest's tiny configs

PROMPTS = (
    "The capital of France is",  # 5 tokens: shorter than the repeated random sequence (padded)
    "When Mary and John went to the store, John gave a drink to Mary because she was thirsty "
    "after the long walk home from the market",  # longer than it (the random sequence is padded)
)
SEQ_LEN = 8  # random tokens per copy in the tests: 17 tokens with BOS
PATTERN_TOL = 1e-5
LOGIT_TOL = 1e-3


# ----------------------------------------------------------------------------- references
def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _biased_model(family: str, vocab: int):
    """The tiny model with random norm gains and biases (all 1-D parameters), so the LayerNorm
    bias and output-projection bias parts of the DLA are not trivially zero."""
    model = make_tiny_model(family, vocab)
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1 and name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def _plain(model):
    model.set_attn_implementation("eager")
    model.config.use_cache = False
    return model.eval()


@pytest.fixture(scope="module")
def pairs(tokenizer, tiny_sessions):
    """(variant, family) -> (engine session, separate plain eager model with identical weights)."""
    vocab = len(tokenizer)
    out = {}
    for family in FAMILIES:
        plain = _plain(make_tiny_model(family, vocab))  # seed 0: the session's weights
        assert _same_weights(tiny_sessions[family].hf, plain), family
        out["tiny", family] = (tiny_sessions[family], plain)
        session = ModelSession(_biased_model(family, vocab), tokenizer, name=f"biased-{family}")
        plain = _plain(_biased_model(family, vocab))
        assert _same_weights(session.hf, plain), family
        out["biased", family] = (session, plain)
    return out


def reference_attentions(model, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=ids[None], output_attentions=True)
    return torch.stack([a[0] for a in out.attentions]).numpy()  # [L, H, T, T]


def reference_dla(model, family: str, ids: torch.Tensor, target: int | None = None) -> dict:
    """Every DLA part from forward hooks on a plain model, in float64, with the final norm's
    scale frozen by hand: part contribution = W_U[t] · (N(h) - N(h - part))."""
    blocks = model.get_submodule(BLOCKS[family])
    norm = model.get_submodule(FINAL_NORM[family])
    got: dict[str, object] = {"z": {}, "o": {}, "mlp": {}}
    offset = GAIN_OFFSET.get(family, 0.0)

    def rms_frozen(norm_module, clean):
        """An RMSNorm with its scale frozen at the clean vector's (a linear map)."""
        eps = getattr(norm_module, "variance_epsilon", getattr(norm_module, "eps", None))
        gain = norm_module.weight.detach().double() + offset
        scale = torch.sqrt(clean.pow(2).mean() + eps)
        return lambda x: gain * x / scale

    def last(x):
        return x[0, -1].detach().double()

    handles = [model.get_submodule(EMBED_OUT[family]).register_forward_hook(
        lambda m, a, o: got.__setitem__("embed", last(o)))]
    handles.append(norm.register_forward_pre_hook(lambda m, a: got.__setitem__("h", last(a[0]))))
    for i, block in enumerate(blocks):
        o_proj = block.get_submodule(O_PROJ[family])
        handles.append(o_proj.register_forward_pre_hook(lambda m, a, i=i: got["z"].__setitem__(i, last(a[0]))))
        handles.append(o_proj.register_forward_hook(lambda m, a, o, i=i: got["o"].__setitem__(i, last(o))))
        mlp_site = block.get_submodule(MLP_POST_NORM.get(family, "mlp"))  # what the MLP adds
        handles.append(mlp_site.register_forward_hook(lambda m, a, o, i=i: got["mlp"].__setitem__(i, last(o))))
    # The logit before any final soft-cap: the unembedding's own output.
    handles.append(model.lm_head.register_forward_hook(lambda m, a, o: got.__setitem__("logits", last(o))))
    try:
        with torch.no_grad():
            capped = model(input_ids=ids[None]).logits[0, -1].double()
    finally:
        for h in handles:
            h.remove()
    logits = got["logits"]
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # the hook saw the logits before the cap, the model returned them after it
        torch.testing.assert_close(cap * torch.tanh(logits / cap), capped, rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(logits, capped, rtol=0, atol=0)
    t = int(logits.argmax()) if target is None else target
    h = got["h"]
    g = norm.weight.detach().double()
    w_u = model.lm_head.weight[t].detach().double()
    if isinstance(norm, torch.nn.LayerNorm):
        s = torch.sqrt(h.var(unbiased=False) + norm.eps)
        b = norm.bias.detach().double()

        def frozen(x):
            return g * (x - x.mean()) / s + b
    else:
        frozen = rms_frozen(norm, h)
        b = None

    with torch.no_grad():
        # The frozen norm at the clean point is the real norm there.
        torch.testing.assert_close(frozen(h), norm(h.float()).double(), rtol=0, atol=1e-4)

    def contrib(part):
        return float(w_u @ (frozen(h) - frozen(h - part)))

    heads = np.zeros((len(blocks), N_HEADS))
    attn_out = np.zeros(len(blocks))
    for i, block in enumerate(blocks):
        o_proj = block.get_submodule(O_PROJ[family])
        # What the attention adds to the residual: its output, or that output post-normed with
        # the post-norm's scale frozen at the clean output.
        post = (rms_frozen(block.get_submodule(ATTN_POST_NORM[family]), got["o"][i])
                if family in ATTN_POST_NORM else (lambda x: x))
        w = o_proj.weight.detach().double()
        z = got["z"][i]
        dh = z.numel() // N_HEADS
        for hd in range(N_HEADS):
            zs = z[hd * dh:(hd + 1) * dh]
            part = zs @ w[hd * dh:(hd + 1) * dh, :] if family == "gpt2" else w[:, hd * dh:(hd + 1) * dh] @ zs
            heads[i, hd] = contrib(post(part))
        attn_out[i] = contrib(post(got["o"][i]))
    bias_u = model.lm_head.bias
    return {
        "target": t,
        "logit": float(logits[t]),
        "embed": contrib(got["embed"]),
        "heads": heads,
        "attn_out": attn_out,  # heads + bias
        "mlp": np.array([contrib(got["mlp"][i]) for i in range(len(blocks))]),
        "norm_bias": 0.0 if b is None else float(w_u @ b),
        "unembed_bias": 0.0 if bias_u is None else float(bias_u[t]),
    }


# ----------------------------------------------------------------------------- patterns
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_patterns_equal_eager_output_attentions(family, prompt, pairs):
    session, plain = pairs["tiny", family]
    own = session.hf.config._attn_implementation  # sdpa (Gemma 2: eager, for its soft-capping)
    assert own == ("eager" if family == "gemma2" else "sdpa")  # the engine must switch to eager itself
    result = attention_patterns(session, prompt)
    ids = session.encode(prompt)
    ref = reference_attentions(plain, ids)
    assert result.patterns.shape == (N_LAYERS, N_HEADS, ids.numel(), ids.numel())
    assert result.patterns.dtype == np.float32
    np.testing.assert_allclose(result.patterns, ref, rtol=0, atol=PATTERN_TOL)
    np.testing.assert_allclose(result.patterns.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(result.patterns, k=1) == 0)  # causal
    assert session.hf.config._attn_implementation == own  # restored
    assert list(result.tokens) == list(session.decode_each(ids.numpy()))
    assert result.validate() is None


def test_gqa_gives_per_query_head_patterns(pairs):
    """Llama tiny: 4 query heads share 2 KV heads; heads sharing K still differ by their Q."""
    session, _ = pairs["tiny", "llama"]
    assert session.hf.config.num_key_value_heads == 2
    p = attention_patterns(session, PROMPTS[1]).patterns
    assert p.shape[1] == 4
    assert not np.allclose(p[:, 0], p[:, 1])


def test_head_pattern_from_result_and_session(pairs):
    session, plain = pairs["tiny", "gpt2"]
    result = attention_patterns(session, PROMPTS[0])
    one = result.head(2, 3)
    assert isinstance(one, HeadPattern) and (one.layer, one.head) == (2, 3)
    np.testing.assert_array_equal(one.pattern, result.patterns[2, 3])
    again = head_pattern(session, PROMPTS[0], layer=2, head=3)
    np.testing.assert_array_equal(again.pattern, one.pattern)
    ref = reference_attentions(plain, session.encode(PROMPTS[0]))
    np.testing.assert_allclose(one.pattern, ref[2, 3], atol=PATTERN_TOL)


@pytest.mark.parametrize("layer, head", [(3, 0), (0, 4), (-1, 0), (0, -1)])
def test_head_pattern_out_of_range(pairs, layer, head):
    session, _ = pairs["tiny", "llama"]
    with pytest.raises(HeadsError, match="does not exist"):
        head_pattern(session, PROMPTS[0], layer=layer, head=head)
    with pytest.raises(HeadsError):
        attention_patterns(session, PROMPTS[0]).head(layer, head)


def test_head_pattern_on_session_needs_prompt(pairs):
    from explorer.core.requests import RequestError

    with pytest.raises(RequestError, match="prompt"):
        head_pattern(pairs["tiny", "llama"][0], layer=0, head=0)


@pytest.mark.parametrize("text, expected", [("3.5", (3, 5)), ("L3H5", (3, 5)), ("l12h0", (12, 0)),
                                            (" 2:1 ", (2, 1)), ("0.0", (0, 0))])
def test_parse_head(text, expected):
    assert parse_head(text) == expected


@pytest.mark.parametrize("text", ["", "3", "3.", ".5", "a.b", "3.5.1", "-1.2", "L3", "3,5"])
def test_parse_head_rejects(text):
    with pytest.raises(HeadsError, match="LAYER.HEAD"):
        parse_head(text)


def test_eager_switch_restores_on_error(tokenizer):
    model = make_tiny_model("llama", len(tokenizer))
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError):
        with eager_attention(model):
            assert model.config._attn_implementation == "eager"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- scoring functions
def _causal_from(keys: list[int]) -> torch.Tensor:
    """A [1, 1, N, N] pattern where query i puts all its weight on key keys[i]."""
    n = len(keys)
    p = torch.zeros(1, 1, n, n)
    for q, k in enumerate(keys):
        assert 0 <= k <= q
        p[0, 0, q, k] = 1.0
    return p


def _induction_pattern(n: int, bos: bool = True) -> torch.Tensor:
    """Perfect induction on [BOS?] r r: second-copy query q attends to q - n + 1; others to themselves."""
    o = int(bos)
    keys = list(range(o + n)) + [q - n + 1 for q in range(o + n, o + 2 * n)]
    return _causal_from(keys)


def test_perfect_previous_token_pattern():
    p = _causal_from([0] + list(range(0, 11)))  # query i -> key i-1
    assert float(previous_token_scores(p)) == pytest.approx(1.0)
    assert float(bos_scores(p)) == pytest.approx(1 / 11)  # only query 1 looks at position 0
    assert float(entropy_scores(p)) == pytest.approx(0.0)
    assert float(induction_scores(p, 5)) == pytest.approx(0.0)
    assert float(duplicate_token_scores(p, 5)) == pytest.approx(0.0)


@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize("n", [3, 7])
def test_perfect_induction_pattern(n, bos):
    p = _induction_pattern(n, bos)
    assert float(induction_scores(p, n)) == pytest.approx(1.0)
    assert float(duplicate_token_scores(p, n)) == pytest.approx(0.0)
    assert float(previous_token_scores(p)) == pytest.approx(0.0)


def test_perfect_duplicate_token_pattern():
    n = 6
    keys = list(range(1 + n)) + [q - n for q in range(1 + n, 1 + 2 * n)]
    p = _causal_from(keys)
    assert float(duplicate_token_scores(p, n)) == pytest.approx(1.0)
    assert float(induction_scores(p, n)) == pytest.approx(0.0)


def test_sink_and_uniform_patterns():
    sink = _causal_from([0] * 9)
    assert float(bos_scores(sink)) == 1.0 and float(entropy_scores(sink)) == 0.0
    n = 9
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    rows = range(1, n)
    assert float(bos_scores(uniform)) == pytest.approx(np.mean([1 / (i + 1) for i in rows]), rel=1e-6)
    assert float(entropy_scores(uniform)) == pytest.approx(np.mean([np.log(i + 1) for i in rows]), rel=1e-6)
    assert float(previous_token_scores(uniform)) == pytest.approx(np.mean([1 / (i + 1) for i in rows]), rel=1e-6)


def test_scores_vectorise_over_layers_and_heads():
    p = torch.cat([_induction_pattern(4), _causal_from([0] + list(range(8)))], dim=1)  # [1, 2, 9, 9]
    ind = induction_scores(p, 4)
    assert ind.shape == (1, 2)
    assert ind[0, 0] == pytest.approx(1.0) and ind[0, 1] == pytest.approx(0.0)
    assert previous_token_scores(p)[0, 1] == pytest.approx(1.0)


def _reference_scores(prompt_att: np.ndarray, rep_att: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Loop-by-hand versions of the score definitions (queries 1.. on the prompt; second copy)."""
    t, big_n = prompt_att.shape[-1], rep_att.shape[-1]
    second = range(big_n - n, big_n)
    ent = -np.where(prompt_att > 0, prompt_att * np.log(np.where(prompt_att > 0, prompt_att, 1)), 0).sum(-1)
    return {
        "previous_token": np.mean([prompt_att[..., i, i - 1] for i in range(1, t)], axis=0),
        "bos": np.mean([prompt_att[..., i, 0] for i in range(1, t)], axis=0),
        "entropy": ent[..., 1:].mean(-1),
        "induction": np.mean([rep_att[..., q, q - n + 1] for q in second], axis=0),
        "duplicate_token": np.mean([rep_att[..., q, q - n] for q in second], axis=0),
    }


# ----------------------------------------------------------------------------- head scores
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_head_scores_match_plain_pytorch(family, prompt, pairs):
    session, plain = pairs["tiny", family]
    session.clear_cache()  # the first request runs prompt + random tokens as two invokes
    own = session.hf.config._attn_implementation
    result = head_scores(session, HeadsRequest(prompt, seq_len=SEQ_LEN))
    ids = session.encode(prompt)
    rep = torch.from_numpy(result.random_ids)
    ref = _reference_scores(reference_attentions(plain, ids), reference_attentions(plain, rep), SEQ_LEN)
    for name, expected in ref.items():
        got = getattr(result, name)
        assert got.shape == (N_LAYERS, N_HEADS) and got.dtype == np.float32, name
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=name)
    assert session.hf.config._attn_implementation == own
    # The prompt's patterns from the two-invoke trace were cached as its AttentionResult.
    np.testing.assert_allclose(attention_patterns(session, prompt).patterns,
                               reference_attentions(plain, ids), rtol=0, atol=PATTERN_TOL)
    np.testing.assert_array_equal(result.dla, result.attribution.heads)
    assert result.validate() is None


def test_random_sequence_is_bos_then_two_copies_of_ordinary_tokens(pairs, tokenizer):
    session, _ = pairs["tiny", "llama"]
    result = head_scores(session, HeadsRequest(PROMPTS[0], seq_len=20, seed=3))
    ids = result.random_ids
    assert tokenizer.bos_token_id is not None
    assert ids.shape == (41,) and ids[0] == tokenizer.bos_token_id
    first, second = ids[1:21], ids[21:]
    np.testing.assert_array_equal(first, second)
    assert len(set(first.tolist())) == 20  # distinct: no accidental earlier duplicates
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    assert not special & set(first.tolist())
    same = heads_mod.random_repeated_ids(session, 20, 3)
    np.testing.assert_array_equal(same.numpy(), ids)  # reproducible
    other = heads_mod.random_repeated_ids(session, 20, 4)
    assert not np.array_equal(other.numpy(), ids)


def test_random_sequence_without_bos():
    """A tokenizer without BOS: just the two copies; special ids are never drawn."""
    from types import SimpleNamespace

    class Tok:
        bos_token_id = None
        all_special_ids = [0, 1]
        added_tokens_decoder = {2: "<x>"}

        def __len__(self):
            return 12

    fake = SimpleNamespace(tokenizer=Tok(), unembed_weight=lambda: torch.zeros(12, 4), context_length=64)
    ids = heads_mod.random_repeated_ids(fake, 9, 0)
    assert ids.shape == (18,) and torch.equal(ids[:9], ids[9:])
    assert sorted(ids[:9].tolist()) == list(range(3, 12))  # all 9 ordinary ids, none special
    with pytest.raises(HeadsError, match="ordinary"):
        heads_mod.random_repeated_ids(fake, 10, 0)


def test_scores_wired_to_the_right_sequences(pairs, monkeypatch):
    """Substitute known patterns into a real run: the prompt gets a perfect previous-token
    pattern, the random sequence a perfect induction one; the scores and roles must follow."""
    session, _ = pairs["tiny", "qwen2"]
    session.clear_cache()
    real_run = heads_mod._run
    n = SEQ_LEN

    def fake_run(session_, ids, **kwargs):
        cap = real_run(session_, ids, **kwargs)
        t = ids.numel()
        prev = _causal_from([0] + list(range(t - 1)))[0, 0]
        pats = [prev.expand(N_LAYERS, N_HEADS, t, t).clone()]
        if kwargs.get("extra"):
            pats.append(_induction_pattern(n)[0, 0].expand(N_LAYERS, N_HEADS, 2 * n + 1, 2 * n + 1).clone())
        cap.patterns = pats
        return cap

    monkeypatch.setattr(heads_mod, "_run", fake_run)
    result = head_scores(session, HeadsRequest(PROMPTS[1], seq_len=n))
    np.testing.assert_allclose(result.previous_token, 1.0)
    np.testing.assert_allclose(result.induction, 1.0)
    np.testing.assert_allclose(result.duplicate_token, 0.0)
    np.testing.assert_allclose(result.entropy, 0.0)
    roles = result.roles(0.9)
    assert len(roles) == N_LAYERS * N_HEADS
    assert all(set(r) == {"previous-token", "induction"} for r in roles.values())
    assert result.roles({"induction": 0.9}) == {k: ("induction",) for k in roles}
    assert result.roles({"sink": 0.5}) == {}  # bos score is 1/(T-1) here


def test_random_token_scores_are_cached_across_prompts(pairs, monkeypatch):
    session, _ = pairs["tiny", "gpt2"]
    session.clear_cache()
    calls = []
    real_run = heads_mod._run
    monkeypatch.setattr(heads_mod, "_run", lambda s, ids, **kw: calls.append(len(kw.get("extra", ()))) or
                        real_run(s, ids, **kw))
    a = head_scores(session, HeadsRequest(PROMPTS[0], seq_len=SEQ_LEN))
    b = head_scores(session, HeadsRequest(PROMPTS[1], seq_len=SEQ_LEN))
    assert calls == [1, 0]  # one trace each; the second without the random-sequence invoke
    np.testing.assert_array_equal(a.induction, b.induction)
    assert head_scores(session, HeadsRequest(PROMPTS[0], seq_len=SEQ_LEN)) is a  # cached
    head_scores(session, HeadsRequest(PROMPTS[0], seq_len=SEQ_LEN, seed=1))
    assert calls == [1, 0, 1]
    # The attention and DLA caches were filled by the head-scores traces.
    attention_patterns(session, PROMPTS[1])
    direct_logit_attribution(session, PROMPTS[1])
    assert calls == [1, 0, 1]


def test_roles_threshold_and_top(pairs):
    session, _ = pairs["tiny", "llama"]
    result = head_scores(session, HeadsRequest(PROMPTS[1], seq_len=SEQ_LEN))
    everything = result.roles(0.0)
    assert len(everything) == N_LAYERS * N_HEADS
    assert all(set(r) == {"previous-token", "induction", "duplicate", "sink"} for r in everything.values())
    assert result.roles(1.01) == {}
    layer, h, v = result.top("bos", 1)[0]
    assert v == result.bos.max() and result.bos[layer, h] == v
    assert result.top("entropy", 1, largest=False)[0][2] == result.entropy.min()
    assert set(result.scores()) == {"previous_token", "induction", "duplicate_token", "bos", "entropy", "dla"}


def test_head_scores_bad_input(pairs):
    session, _ = pairs["tiny", "llama"]
    with pytest.raises(HeadsError, match="at least 1"):
        head_scores(session, HeadsRequest(PROMPTS[0], seq_len=0))
    with pytest.raises(HeadsError, match="context"):
        head_scores(session, HeadsRequest(PROMPTS[0], seq_len=200))  # 401 tokens > 256
    with pytest.raises(HeadsError, match="2 tokens"):
        head_scores(session, HeadsRequest("Hello", seq_len=4))
    with pytest.raises(EmptyPromptError):
        head_scores(session, HeadsRequest("  ", seq_len=4))
    with pytest.raises(TokenError):
        head_scores(session, HeadsRequest(PROMPTS[0], target=" Parisian capital", seq_len=4))
    assert session.hf.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- DLA
@pytest.mark.parametrize("variant", ["tiny", "biased"])
@pytest.mark.parametrize("family", FAMILIES)
def test_dla_parts_add_up_and_match_hooks(variant, family, pairs):
    session, plain = pairs[variant, family]
    prompt = PROMPTS[1]
    result = direct_logit_attribution(session, prompt)
    ref = reference_dla(plain, family, session.encode(prompt))
    assert result.target_id == ref["target"]  # default target: the model's top-1
    assert result.logit == pytest.approx(ref["logit"], abs=1e-4)
    assert abs(result.total - result.logit) < LOGIT_TOL
    assert abs(result.total - ref["logit"]) < LOGIT_TOL
    assert abs(result.unexplained) < LOGIT_TOL
    assert result.heads.shape == (N_LAYERS, N_HEADS)
    np.testing.assert_allclose(result.heads, ref["heads"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(result.heads.sum(1) + result.attn_bias, ref["attn_out"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(result.mlp, ref["mlp"], rtol=0, atol=1e-4)
    assert result.embed == pytest.approx(ref["embed"], abs=1e-4)
    assert result.final_norm_bias == pytest.approx(ref["norm_bias"], abs=1e-4)
    assert result.unembed_bias == pytest.approx(ref["unembed_bias"], abs=1e-6)
    assert result.norm_kind == ("layernorm" if family in ("gpt2", "gpt_neox") else "rmsnorm")
    if variant == "biased" and family in ("gpt2", "gpt_neox"):
        assert abs(result.final_norm_bias) > 1e-3 and np.abs(result.attn_bias).max() > 1e-3
    labels = [label for label, _ in result.parts()]
    assert labels[0] == "embed" and "L2H3" in labels and labels[-1] == "unembed bias"
    assert sum(v for _, v in result.parts()) == pytest.approx(result.total, abs=1e-9)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_dla_explicit_target(family, pairs, tokenizer):
    session, plain = pairs["biased", family]
    prompt = PROMPTS[0]
    target = " Paris"
    tid = tokenizer(target, add_special_tokens=False).input_ids[0]
    result = direct_logit_attribution(session, DLARequest(prompt, target))
    ref = reference_dla(plain, family, session.encode(prompt), target=tid)
    assert result.target_id == tid and result.target == target
    assert result.logit == pytest.approx(ref["logit"], abs=1e-4)
    assert abs(result.total - ref["logit"]) < LOGIT_TOL
    np.testing.assert_allclose(result.heads, ref["heads"], rtol=0, atol=1e-4)
    by_id = direct_logit_attribution(session, prompt, target=f"#{tid}")
    assert by_id.logit == pytest.approx(result.logit, abs=1e-6)


def test_dla_on_one_token_prompt(pairs):
    session, plain = pairs["tiny", "gpt_neox"]
    result = direct_logit_attribution(session, "Hello")
    ref = reference_dla(plain, "gpt_neox", session.encode("Hello"))
    assert abs(result.total - ref["logit"]) < LOGIT_TOL


def test_head_scores_dla_equals_direct_dla(pairs):
    session, _ = pairs["biased", "gpt2"]
    scores = head_scores(session, HeadsRequest(PROMPTS[0], seq_len=SEQ_LEN))
    session.clear_cache()
    direct = direct_logit_attribution(session, PROMPTS[0])
    np.testing.assert_allclose(scores.dla, direct.heads, rtol=0, atol=1e-6)
    assert scores.attribution.target_id == direct.target_id


# ----------------------------------------------------------------------------- results
def _round_trip(result):
    data = json.loads(json.dumps(result.to_dict()))
    back = type(result).from_dict(data)
    assert back.to_dict() == result.to_dict()
    return back


def test_results_round_trip(pairs):
    session, _ = pairs["biased", "gpt_neox"]
    scores = head_scores(session, HeadsRequest(PROMPTS[0], target=" Paris", seq_len=SEQ_LEN, seed=2))
    back = _round_trip(scores)
    assert isinstance(back, HeadScores) and isinstance(back.attribution, DLAResult)
    assert back.request == scores.request
    for name in ("previous_token", "induction", "duplicate_token", "bos", "entropy", "dla", "random_ids"):
        assert getattr(back, name).dtype == getattr(scores, name).dtype, name
        np.testing.assert_array_equal(getattr(back, name), getattr(scores, name))
    assert back.attribution.heads.dtype == np.float64
    assert back.attribution.total == scores.attribution.total
    assert back.target == " Paris"

    att = attention_patterns(session, PROMPTS[0])
    back = _round_trip(att)
    assert isinstance(back, AttentionResult) and back.request == AttentionRequest(PROMPTS[0])
    assert back.patterns.dtype == np.float32
    np.testing.assert_array_equal(back.patterns, att.patterns)
    assert list(back.tokens) == list(att.tokens)

    one = _round_trip(att.head(1, 2))
    np.testing.assert_array_equal(one.pattern, att.patterns[1, 2])

    dla = _round_trip(direct_logit_attribution(session, PROMPTS[1]))
    assert dla.request == DLARequest(PROMPTS[1]) and dla.validate() is None


def test_results_go_through_a_snapshot(pairs, tmp_path):
    from explorer.persistence.snapshot import load_snapshot, save_snapshot

    session, _ = pairs["tiny", "llama"]
    scores = head_scores(session, HeadsRequest(PROMPTS[0], seq_len=SEQ_LEN))
    att = attention_patterns(session, PROMPTS[0])
    path = save_snapshot(tmp_path / "s.zip", [scores, att, att.head(0, 1)])
    loaded = load_snapshot(path).results
    assert [type(r).__name__ for r in loaded] == ["HeadScores", "AttentionResult", "HeadPattern"]
    np.testing.assert_array_equal(loaded[0].induction, scores.induction)
    np.testing.assert_array_equal(loaded[1].patterns, att.patterns)


def test_validate_names_bad_shapes(pairs):
    session, _ = pairs["tiny", "llama"]
    scores = head_scores(session, HeadsRequest(PROMPTS[0], seq_len=SEQ_LEN))
    data = scores.to_dict()
    data["induction"] = [[0.0]]
    assert "induction" in HeadScores.from_dict(data).validate()
    data = attention_patterns(session, PROMPTS[0]).to_dict()
    data["patterns"] = [[[[1.0]]]]
    assert "patterns" in AttentionResult.from_dict(data).validate()


# ----------------------------------------------------------------------------- CLI
@pytest.fixture
def cli_session(pairs, monkeypatch):
    """The CLI on the tiny Llama: load_session is replaced, everything else is the real CLI."""
    session, _ = pairs["tiny", "llama"]
    monkeypatch.setattr("cli.heads.load_session", lambda args: session)
    return session


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_heads_json(cli_session, capsys):
    code, out, err = run_cli(capsys, "heads", "--prompt", PROMPTS[1], "--seq-len", "6", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert set(data["scores"]) >= {"previous_token", "induction", "duplicate_token", "bos", "entropy", "dla"}
    for name, grid in data["scores"].items():
        assert len(grid) == N_LAYERS and all(len(row) == N_HEADS for row in grid), name
    assert data["tokens"] == list(cli_session.decode_each(cli_session.encode(PROMPTS[1]).numpy()))
    assert isinstance(data["target"], str) and isinstance(data["target_id"], int)
    assert len(data["random_ids"]) == 13
    assert abs(data["dla"]["unexplained"]) < LOGIT_TOL
    for role in data["roles"]:
        assert set(role) == {"layer", "head", "roles"}


def test_cli_heads_target_and_table(cli_session, capsys):
    code, out, _ = run_cli(capsys, "heads", "--prompt", PROMPTS[0], "--target", " Paris", "--seq-len", "6")
    assert code == 0
    assert "direct logit attribution to ' Paris'" in out
    for heading in ("previous-token", "induction", "duplicate-token", "sink", "entropy", "roles"):
        assert heading in out


def test_cli_pattern_json(cli_session, capsys):
    code, out, _ = run_cli(capsys, "heads", "--prompt", PROMPTS[0], "--pattern", "2.3", "--json")
    assert code == 0
    data = json.loads(out)
    t = cli_session.encode(PROMPTS[0]).numel()
    assert (data["layer"], data["head"]) == (2, 3)
    assert len(data["tokens"]) == t and len(data["pattern"]) == t and all(len(r) == t for r in data["pattern"])
    np.testing.assert_allclose(np.array(data["pattern"]),
                               attention_patterns(cli_session, PROMPTS[0]).patterns[2, 3], atol=1e-7)
    code, out, _ = run_cli(capsys, "heads", "--prompt", PROMPTS[0], "--pattern", "L2H3")
    assert code == 0 and "L2H3 attention" in out


@pytest.mark.parametrize("args, message", [
    (["--pattern", "2.9"], "head 9 does not exist"),
    (["--pattern", "7.0"], "layer 7 does not exist"),
    (["--target", " Parisian capital"], "tokens"),
    (["--seq-len", "0"], "at least 1"),
    (["--seq-len", "500"], "context"),
])
def test_cli_bad_input_is_one_line_exit_2(cli_session, capsys, args, message):
    code, out, err = run_cli(capsys, "heads", "--prompt", PROMPTS[0], *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_cli_bad_head_syntax_fails_before_loading(monkeypatch, capsys):
    def no_load(args):
        raise AssertionError("the model must not load for a malformed --pattern")

    monkeypatch.setattr("cli.heads.load_session", no_load)
    code, out, err = run_cli(capsys, "heads", "--prompt", "x y", "--pattern", "two.three")
    assert code == 2 and out == "" and err.count("\n") == 1 and "LAYER.HEAD" in err


def test_cli_empty_prompt(cli_session, capsys):
    code, _, err = run_cli(capsys, "heads", "--prompt", " ", "--json")
    assert code == 2 and "empty" in err and err.count("\n") == 1


def test_heads_error_is_an_explorer_error():
    assert issubclass(HeadsError, ExplorerError)
