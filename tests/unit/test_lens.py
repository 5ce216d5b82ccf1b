"""The logit lens on tiny random models of every family, checked against plain PyTorch.

The reference never goes through the engine: it builds its own copy of each tiny model (same
seed, so identical weights, which is asserted), captures the residual stream with ordinary
forward hooks (cross-checked against ``output_hidden_states``), applies the final norm and the
unembedding itself and reduces in float64. Module paths are written out here per family rather
than read from ``explorer.core.adapters``, so a wrong adapter entry fails these tests.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from explorer.analyses.lens import CompareRequest, LensComparison, LensRequest, LensResult, compare_prompts, logit_lens
from explorer.core.errors import EmptyPromptError, ExplorerError, PromptTooLongError, TokenError
from explorer.core.session import ModelInfo, ModelSession
from tiny_models import FAMILIES, make_tiny_model

# Where each family keeps its parts, written out independently of explorer/core/adapters.py.
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma2", "gemma3_text")
EMBED_OUT = {"gpt2": "transformer.drop", "gpt_neox": "gpt_neox.emb_dropout",
             **{f: "model.embed_tokens" for f in _LLAMA_LIKE}}  # Gemma's scales by sqrt(d) itself
BLOCKS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", **{f: "model.layers" for f in _LLAMA_LIKE}}
FINAL_NORM = {"gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm",
              **{f: "model.norm" for f in _LLAMA_LIKE}}
GAIN_OFFSET = {"gemma2": 1.0, "gemma3_text": 1.0}  # Gemma's RMSNorm scales by 1 + weight


def softcap(family: str, logits: torch.Tensor, config) -> torch.Tensor:
    """Gemma 2's final-logit soft-cap, cap * tanh(z / cap), written out here."""
    if family != "gemma2":
        return logits
    cap = config.final_logit_softcapping
    return cap * torch.tanh(logits / cap)


PROMPTS = (
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
)
PARIS = 7042  # " Paris" in the default model's tokenizer, which the tiny models share
TOL = 1e-5    # absolute, float32
PROB_RTOL = 1e-4  # probabilities are also compared relatively: near-uniform ones are ~2e-5

# The conftest's tiny models give near-uniform outputs (top-1 ~3e-4, entropy ~10.6 of a maximal
# 10.8 nats), where an absolute 1e-5 on probabilities proves little. So the reference checks run
# on them and on a "peaked" copy whose unembedding is scaled up (top-1 up to ~0.99, KL up to
# ~40 nats) and whose norms have random gains, and probabilities are compared relatively as
# well as absolutely.
VARIANTS = ("tiny", "peaked")
PEAK_SCALE = 12.0
# Gemma 2 soft-caps its logits at 30: scaled 12x, most of a random model's logits would sit
# near the cap (top-1 ~0.36); scaled 8x its lens is less peaked than the others' (top-1 up to
# ~0.59, entropy down to ~2.5 nats) but still varied (KL up to ~20 nats).
PEAK_SCALES = {"gemma2": 8.0}
PEAK_GUARD = {"gemma2": (0.5, 3.0)}  # (top-1 above, entropy below), default (0.9, 0.5)


# ----------------------------------------------------------------------------- reference
def _peaked_model(family: str, vocab: int):
    """The tiny model with a scaled-up unembedding and random norm gains and biases.

    Random gains matter: with the default unit gains a norm is idempotent, so a lens that
    normed a row twice, or used another layer's norm, would pass unnoticed.
    """
    model = make_tiny_model(family, vocab)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        model.lm_head.weight.mul_(PEAK_SCALES.get(family, PEAK_SCALE))
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):  # gains 1 ± 0.5 (Gemma's are 1 + weight)
                p.copy_(1 - GAIN_OFFSET.get(family, 0.0) + 0.5 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1 and name.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def pairs(tokenizer, tiny_sessions):
    """(variant, family) -> (engine session, a separate unwrapped model with identical weights)."""
    vocab = len(tokenizer)
    out = {}
    for family in FAMILIES:
        plain = make_tiny_model(family, vocab)  # the conftest's default seed: the session's weights
        assert _same_weights(tiny_sessions[family].hf, plain), family
        out["tiny", family] = (tiny_sessions[family], plain)
        session = ModelSession(_peaked_model(family, vocab), tokenizer, name=f"peaked-{family}")
        plain = _peaked_model(family, vocab)
        assert _same_weights(session.hf, plain), family
        out["peaked", family] = (session, plain)
    for _, plain in out.values():
        plain.config.use_cache = False
    return out


def reference_lens(model, family: str, ids: torch.Tensor):
    """Plain PyTorch lens: ([R, T, V] float32 lens logits, [T, V] the model's own logits)."""
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    blocks = model.get_submodule(BLOCKS[family])
    handles = [model.get_submodule(EMBED_OUT[family]).register_forward_hook(keep)]
    handles += [block.register_forward_hook(keep) for block in blocks]
    try:
        with torch.no_grad():
            out = model(input_ids=ids[None], output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    assert len(captured) == len(blocks) + 1
    rows = torch.stack([c[0] for c in captured])  # [R, T, d]
    norm = model.get_submodule(FINAL_NORM[family])
    with torch.no_grad():
        # Cross-check the hooks against HF's own hidden states; the last of those is already
        # final-normed, so it is compared with norm(last block output), not normed again.
        hidden = out.hidden_states
        assert len(hidden) == len(blocks) + 1
        for i in range(len(blocks)):
            torch.testing.assert_close(rows[i], hidden[i][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(norm(rows[-1]), hidden[-1][0], rtol=0, atol=1e-6)
        logits = softcap(family, model.lm_head(norm(rows)), model.config)
        torch.testing.assert_close(logits[-1], out.logits[0], rtol=1e-6, atol=1e-5)
    return logits, out.logits[0]


def reduce_reference(logits: torch.Tensor, target_id: int, top_k: int) -> dict[str, np.ndarray]:
    """Float64 reductions of [R, T, V] logits: what every lens cell should hold."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    p = lp.exp()
    top_lp, top_ids = torch.topk(lp, top_k, dim=-1)
    t_lp = lp[..., target_id]
    return {
        "probs": p.numpy(),
        "top_ids": top_ids.numpy(),
        "top_probs": top_lp.exp().numpy(),
        "entropy": (-(p * lp).sum(-1)).numpy(),
        "kl_to_final": (p[-1] * (lp[-1] - lp)).sum(-1).numpy(),
        "target_probs": t_lp.exp().numpy(),
        # Rank bounds: tokens within float32 noise (2e-5 nats, ~5 ulp at |logit| 50) of the
        # target may fall either side of it; the upper count includes the target, hence no +1.
        "rank_lo": ((lp > t_lp[..., None] + 2e-5).sum(-1) + 1).numpy(),
        "rank_hi": (lp > t_lp[..., None] - 2e-5).sum(-1).numpy(),
    }


def assert_probs_close(actual, desired, what: str = ""):
    """Within 1e-5 absolute and 1e-4 relative (the relative part matters for small probabilities)."""
    actual, desired = np.asarray(actual, dtype=np.float64), np.asarray(desired, dtype=np.float64)
    assert np.abs(actual - desired).max() <= TOL, what
    np.testing.assert_allclose(actual, desired, rtol=PROB_RTOL, atol=1e-12, err_msg=what)


def assert_top_k(engine_ids, engine_probs, ref):
    """Top-k ids and probabilities equal the reference's; ids may swap only within exact ties."""
    assert_probs_close(engine_probs, ref["top_probs"], "top_probs")
    # The engine's ids must carry the probabilities it reports...
    probs_of_ids = np.take_along_axis(ref["probs"], engine_ids, axis=-1)
    assert_probs_close(probs_of_ids, engine_probs, "probabilities of the top ids")
    # ...and differ from the reference's only where two candidates are tied.
    differ = engine_ids != ref["top_ids"]
    if differ.any():
        gap = np.abs(probs_of_ids - ref["top_probs"]) / ref["top_probs"]
        assert (gap[differ] < 1e-5).all(), "top-k ids differ beyond ties"
    for cell in engine_ids.reshape(-1, engine_ids.shape[-1]):
        assert len(set(cell.tolist())) == len(cell), "a token appears twice in one top-k"


def assert_matches_reference(result: LensResult, ref: dict[str, np.ndarray]):
    assert_top_k(result.top_ids, result.top_probs, ref)
    np.testing.assert_allclose(result.entropy, ref["entropy"], rtol=1e-6, atol=TOL, err_msg="entropy")
    np.testing.assert_allclose(result.kl_to_final, ref["kl_to_final"], rtol=1e-5, atol=TOL, err_msg="kl")
    assert_probs_close(result.target_probs, ref["target_probs"], "target_probs")
    assert (result.target_ranks >= ref["rank_lo"]).all() and (result.target_ranks <= ref["rank_hi"]).all()
    assert (result.kl_to_final >= 0).all()
    assert np.all(result.kl_to_final[-1] <= TOL)  # the final row against itself


def ids_of(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, return_tensors="pt").input_ids[0]


def own_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's own next-token distribution at every position, from a plain forward [T, V]."""
    with torch.no_grad():
        return torch.softmax(model(input_ids=ids[None]).logits[0].double(), dim=-1)


def test_peaked_variant_is_peaked(pairs):
    """Guard for the checks' strength: the peaked models give confident, layer-varying lenses."""
    for family in FAMILIES:
        result = logit_lens(pairs["peaked", family][0], LensRequest(PROMPTS[1]))
        top1, low_entropy = PEAK_GUARD.get(family, (0.9, 0.5))
        assert result.top_probs[..., 0].max() > top1, family
        assert result.entropy.min() < low_entropy and result.entropy.max() > 2, family
        assert result.kl_to_final[:-1].max() > 10, family
        assert len(np.unique(result.top_ids[..., 0])) > 5, family


# ------------------------------------------------------------------------ every row, every family
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_row_matches_plain_pytorch(variant, family, prompt, pairs, tokenizer):
    session, plain = pairs[variant, family]
    ids = ids_of(tokenizer, prompt)
    logits, _ = reference_lens(plain, family, ids)
    result = logit_lens(session, LensRequest(prompt, target=" Paris", top_k=10))

    n_layers = len(plain.get_submodule(BLOCKS[family]))
    assert result.layer_labels == ("embed",) + tuple(f"L{i}" for i in range(n_layers))
    assert result.n_rows == n_layers + 1 and result.n_positions == len(ids)
    assert result.token_ids.tolist() == ids.tolist()
    assert result.tokens.tolist() == [tokenizer.decode([i]) for i in ids.tolist()]
    assert result.top_ids.shape == (n_layers + 1, len(ids), 10)
    assert result.target == " Paris" and result.target_id == PARIS
    assert result.model == session.name
    assert result.request == LensRequest(prompt, target=" Paris", top_k=10)

    assert_matches_reference(result, reduce_reference(logits, PARIS, 10))
    decode = np.vectorize(lambda i: tokenizer.decode([int(i)]), otypes=[str])
    assert (result.top_tokens == decode(result.top_ids)).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_last_row_is_the_models_own_distribution(variant, family, pairs, tokenizer):
    session, plain = pairs[variant, family]
    prompt = PROMPTS[1]
    own = own_probs(plain, ids_of(tokenizer, prompt))
    result = logit_lens(session, LensRequest(prompt, top_k=20))

    own_top_p, own_top_ids = torch.topk(own, 20, dim=-1)
    np.testing.assert_array_equal(result.top_ids[-1], own_top_ids.numpy())
    assert_probs_close(result.top_probs[-1], own_top_p.numpy(), "last row top_probs")
    # Default target: the model's own top-1 at the last position.
    assert result.target_id == int(own[-1].argmax())
    assert_probs_close(result.target_probs[-1], own[:, result.target_id].numpy(), "last row target")
    assert result.target_ranks[-1, -1] == 1
    own_entropy = -(own * own.clamp_min(1e-300).log()).sum(-1)
    np.testing.assert_allclose(result.entropy[-1], own_entropy.numpy(), rtol=1e-6, atol=TOL)


# --------------------------------------------------------------------------------- comparison
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_compare_equals_two_separate_lenses(variant, family, pairs, tokenizer):
    session, plain = pairs[variant, family]
    short, long = "The capital of France is", "Yesterday, after a very long walk, we said the capital of Germany is"
    assert len(ids_of(tokenizer, short)) + 5 < len(ids_of(tokenizer, long))
    for a, b in ((short, long), (long, short)):  # the left-padded prompt first, then second
        comparison = compare_prompts(session, CompareRequest(a, b, target=" Paris", top_k=10))
        assert isinstance(comparison, LensComparison)
        for prompt, part in ((a, comparison.a), (b, comparison.b)):
            alone = logit_lens(session, LensRequest(prompt, target=" Paris", top_k=10))
            assert part.request == alone.request
            assert part.token_ids.tolist() == alone.token_ids.tolist()
            assert part.target_id == alone.target_id == PARIS
            np.testing.assert_array_equal(part.top_ids, alone.top_ids)
            for name in ("top_probs", "target_probs"):
                assert_probs_close(getattr(part, name), getattr(alone, name), f"{family} {name}")
            for name in ("entropy", "kl_to_final"):
                np.testing.assert_allclose(getattr(part, name), getattr(alone, name), rtol=1e-5, atol=TOL,
                                           err_msg=f"{family} {name}")
            # Ranks may differ only where float32 noise reorders near-ties (checked just below).
            assert np.abs(part.target_ranks - alone.target_ranks).max() <= 2
            # And both equal the independent reference.
            logits, _ = reference_lens(plain, family, ids_of(tokenizer, prompt))
            assert_matches_reference(part, reduce_reference(logits, PARIS, 10))


def test_compare_default_target_is_prompt_a_final_top1(pairs, tokenizer):
    session, plain = pairs["peaked", "llama"]
    a, b = PROMPTS
    comparison = compare_prompts(session, CompareRequest(a, b))
    expected = int(own_probs(plain, ids_of(tokenizer, a))[-1].argmax())
    assert int(own_probs(plain, ids_of(tokenizer, b))[-1].argmax()) != expected  # B alone would differ
    assert comparison.a.target_id == comparison.b.target_id == expected
    assert comparison.a.target == comparison.b.target == tokenizer.decode([expected])
    assert comparison.a.target_ranks[-1, -1] == 1


def test_curves_difference_and_divergence_row(pairs):
    session, _ = pairs["peaked", "gpt2"]
    a, b = PROMPTS
    comparison = compare_prompts(session, CompareRequest(a, b, target=" Paris"))
    pa = logit_lens(session, LensRequest(a, target=" Paris")).target_probs[:, -1]
    pb = logit_lens(session, LensRequest(b, target=" Paris")).target_probs[:, -1]
    ca, cb = comparison.curves()
    assert_probs_close(ca, pa)
    assert_probs_close(cb, pb)
    diff = comparison.difference()
    np.testing.assert_array_equal(diff, cb - ca)
    assert comparison.layer_labels == comparison.a.layer_labels

    gaps = np.abs(diff)
    assert len(np.unique(gaps)) == len(gaps) and gaps.max() > 0
    # Thresholds just below each gap (and a negative one): the first row whose gap exceeds it.
    thresholds = [-1.0] + [g * 0.999 for g in gaps] + [float(gaps.max())]
    for threshold in thresholds:
        expected = next((i for i, g in enumerate(gaps) if g > threshold), None)
        assert comparison.divergence_row(threshold) == expected, threshold
    assert comparison.divergence_row(-1.0) == 0
    assert comparison.divergence_row(float(gaps.max())) is None
    assert comparison.divergence_row(1.0) is None
    # A threshold between the largest gap and the one before it in row order picks that row.
    top_row = int(np.argmax(gaps))
    below = max([g for g in gaps[:top_row]], default=-1.0)
    assert comparison.divergence_row((below + gaps[top_row]) / 2) == top_row


def test_compare_identical_prompts_do_not_diverge(pairs):
    session, _ = pairs["peaked", "llama"]
    comparison = compare_prompts(session, CompareRequest(PROMPTS[0], PROMPTS[0], target=" Paris"))
    assert np.abs(comparison.difference()).max() <= TOL
    assert comparison.divergence_row(TOL) is None


# ------------------------------------------------------------------------------- round trips
def assert_same_result(x, y):
    assert type(x) is type(y)
    for name in x.__dataclass_fields__:
        u, v = getattr(x, name), getattr(y, name)
        if isinstance(u, np.ndarray):
            assert isinstance(v, np.ndarray), name
            if u.dtype.kind == "U":  # the string width may shrink to the longest entry
                assert v.dtype.kind == "U", (name, v.dtype)
            else:
                assert u.dtype == v.dtype, (name, u.dtype, v.dtype)
            assert u.shape == v.shape, name
            np.testing.assert_array_equal(u, v, err_msg=name)
        elif isinstance(u, (LensResult, LensComparison)):
            assert_same_result(u, v)
        else:
            assert u == v and type(u) is type(v), name


def json_round_trip(result):
    data = result.to_dict()
    assert data["type"] == type(result).__name__
    return type(result).from_dict(json.loads(json.dumps(data)))


def test_lens_result_round_trip(pairs):
    session, _ = pairs["peaked", "qwen2"]
    result = logit_lens(session, LensRequest(PROMPTS[1], target="#123", top_k=7, unembed_dtype="bfloat16"))
    back = json_round_trip(result)
    assert_same_result(result, back)
    assert back.top_ids.dtype == np.int64 and back.top_probs.dtype == np.float32
    assert back.tokens.dtype.kind == "U" and back.target_ranks.dtype == np.int64
    assert isinstance(back.layer_labels, tuple) and isinstance(back.request, LensRequest)


def test_comparison_round_trip(pairs):
    session, _ = pairs["tiny", "gpt_neox"]
    comparison = compare_prompts(session, CompareRequest(*PROMPTS, target=" Paris", top_k=3))
    back = json_round_trip(comparison)
    assert_same_result(comparison, back)
    assert isinstance(back.request, CompareRequest) and back.request == comparison.request
    assert back.divergence_row(0.0) == comparison.divergence_row(0.0)


def test_model_info_round_trip(tiny_sessions):
    info = tiny_sessions["mistral"].info()
    back = json_round_trip(info)
    assert isinstance(back, ModelInfo)
    assert back == info


# --------------------------------------------------------------------------- targets and errors
def test_target_by_id_syntax(pairs, tokenizer):
    session, plain = pairs["peaked", "llama"]
    result = logit_lens(session, LensRequest(PROMPTS[0], target="#123", top_k=5))
    assert result.target_id == 123 and result.target == tokenizer.decode([123])
    logits, _ = reference_lens(plain, "llama", ids_of(tokenizer, PROMPTS[0]))
    assert_matches_reference(result, reduce_reference(logits, 123, 5))


def test_target_given_as_text_resolves_to_its_token(tiny_session, tokenizer):
    for text in (" Paris", " London", "Paris"):
        (tid,) = tokenizer(text, add_special_tokens=False).input_ids
        result = logit_lens(tiny_session, LensRequest(PROMPTS[0], target=text, top_k=3))
        assert result.target_id == tid and result.target == text


@pytest.mark.parametrize("target", [" antidisestablishmentarianism", "#49152", "#999999999", ""])
def test_bad_target_raises_token_error(tiny_sessions, target):
    with pytest.raises(TokenError):
        logit_lens(tiny_sessions["llama"], LensRequest(PROMPTS[0], target=target))
    with pytest.raises(TokenError):
        compare_prompts(tiny_sessions["llama"], CompareRequest(*PROMPTS, target=target))


def test_multi_token_target_message_names_the_pieces(tiny_sessions):
    with pytest.raises(TokenError, match="5 tokens"):
        logit_lens(tiny_sessions["gpt2"], LensRequest(PROMPTS[0], target=" antidisestablishmentarianism"))


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_prompt_raises(tiny_sessions, prompt):
    with pytest.raises(EmptyPromptError):
        logit_lens(tiny_sessions["llama"], LensRequest(prompt))
    with pytest.raises(EmptyPromptError):
        compare_prompts(tiny_sessions["llama"], CompareRequest(PROMPTS[0], prompt))


@pytest.mark.parametrize("family", FAMILIES)
def test_overlong_prompt_raises(tiny_sessions, tokenizer, family):
    prompt = "hello " * 300
    assert len(ids_of(tokenizer, prompt)) > 256  # the tiny configs' context
    with pytest.raises(PromptTooLongError, match="256"):
        logit_lens(tiny_sessions[family], LensRequest(prompt))
    with pytest.raises(PromptTooLongError):
        compare_prompts(tiny_sessions[family], CompareRequest(PROMPTS[0], prompt))


def test_prompt_at_the_context_limit_runs(tiny_sessions, tokenizer):
    prompt = "hello" + " hello" * 255
    assert len(ids_of(tokenizer, prompt)) == 256
    result = logit_lens(tiny_sessions["gpt2"], LensRequest(prompt, top_k=2))
    assert result.top_ids.shape == (4, 256, 2)


@pytest.mark.parametrize("top_k", [0, -1, 101])
def test_top_k_out_of_range_raises(tiny_sessions, top_k):
    with pytest.raises(ExplorerError, match="top-k"):
        logit_lens(tiny_sessions["llama"], LensRequest(PROMPTS[0], top_k=top_k))
    with pytest.raises(ExplorerError, match="top-k"):
        compare_prompts(tiny_sessions["llama"], CompareRequest(*PROMPTS, top_k=top_k))


@pytest.mark.parametrize("top_k", [1, 100])
def test_top_k_edges(tiny_sessions, top_k):
    result = logit_lens(tiny_sessions["llama"], LensRequest(PROMPTS[0], top_k=top_k))
    assert result.top_ids.shape[-1] == top_k == result.top_probs.shape[-1]
    assert (np.diff(result.top_probs, axis=-1) <= 0).all()


def test_metric_maps(tiny_sessions):
    result = logit_lens(tiny_sessions["llama"], LensRequest(PROMPTS[0]))
    np.testing.assert_array_equal(result.metric("prob"), result.top_probs[..., 0])
    np.testing.assert_array_equal(result.metric("entropy"), result.entropy)
    np.testing.assert_array_equal(result.metric("kl"), result.kl_to_final)
    np.testing.assert_array_equal(result.metric("target"), result.target_probs)


# ------------------------------------------------------------------------------------ cache
def test_repeated_request_is_served_from_the_cache(tiny_sessions):
    session = tiny_sessions["llama"]
    request = LensRequest(PROMPTS[1], target=" Paris", top_k=4)
    first = logit_lens(session, request)
    assert logit_lens(session, request) is first
    assert logit_lens(session, LensRequest(PROMPTS[1], target=" Paris", top_k=4)) is first  # an equal request
    assert logit_lens(session, PROMPTS[1], target=" Paris", top_k=4) is first  # the keyword form
    assert logit_lens(session, LensRequest(PROMPTS[1], target=" Paris", top_k=5)) is not first
    comparison = compare_prompts(session, CompareRequest(*PROMPTS))
    assert compare_prompts(session, CompareRequest(*PROMPTS)) is comparison

    session.clear_cache()
    again = logit_lens(session, request)
    assert again is not first
    assert_same_result(again, first)  # recomputed from scratch: exactly the same numbers


def test_errors_are_not_cached(tiny_sessions):
    session = tiny_sessions["llama"]
    for _ in range(2):
        with pytest.raises(EmptyPromptError):
            logit_lens(session, LensRequest(""))


# ---------------------------------------------------------------------------- unembed dtype
def test_auto_unembedding_is_the_model_dtype(tiny_sessions):
    assert LensRequest("x").unembed_dtype == "auto" and CompareRequest("x", "y").unembed_dtype == "auto"
    session = tiny_sessions["llama"]
    auto = logit_lens(session, LensRequest(PROMPTS[1]))
    fp32 = logit_lens(session, LensRequest(PROMPTS[1], unembed_dtype="float32"))
    for name in ("top_ids", "top_probs", "entropy", "kl_to_final", "target_probs", "target_ranks"):
        np.testing.assert_array_equal(getattr(auto, name), getattr(fp32, name), err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_unembedding_mostly_agrees(pairs, family):
    session, _ = pairs["peaked", family]
    fp32 = logit_lens(session, LensRequest(PROMPTS[1], target=" Paris"))
    bf16 = logit_lens(session, LensRequest(PROMPTS[1], target=" Paris", unembed_dtype="bfloat16"))
    agreement = (fp32.top_ids[..., 0] == bf16.top_ids[..., 0]).mean()
    assert agreement >= 0.9, agreement
    assert bf16.top_probs.dtype == np.float32 and bf16.top_ids.shape == fp32.top_ids.shape
    assert np.abs(bf16.top_probs[..., 0] - fp32.top_probs[..., 0]).max() < 0.1
    assert bf16.top_probs[..., 0].max() > 0.5  # peaked enough for agreement to mean something
    assert session.dtype == torch.float32  # the model itself was not cast


@pytest.mark.parametrize("variant", VARIANTS)
def test_gemma2_soft_cap_bites_and_the_lens_applies_it(variant, pairs):
    """Guard for the last-row check: the cap changes Gemma 2's logits by far more than the
    tolerances, so a lens that skipped it would fail there."""
    session, plain = pairs[variant, "gemma2"]
    ids = session.encode(PROMPTS[1])
    seen = {}
    handle = plain.lm_head.register_forward_hook(lambda m, a, o: seen.__setitem__("z", o[0]))
    try:
        with torch.no_grad():
            plain(input_ids=ids[None])
    finally:
        handle.remove()
    uncapped = torch.softmax(seen["z"].double(), -1)
    own = own_probs(plain, ids)
    # Relative to the probabilities compared (the tiny model's are ~1e-5): 3x the tolerance on
    # the near-uniform tiny model, far beyond it on the peaked one.
    assert ((uncapped - own).abs() / own).max() > (1e-2 if variant == "peaked" else 3 * PROB_RTOL)
    result = logit_lens(session, LensRequest(PROMPTS[1], top_k=5))
    assert_probs_close(result.top_probs[-1], torch.topk(own, 5, dim=-1).values.numpy(), "capped")
    assert session.unembedding.softcap == plain.config.final_logit_softcapping == 30.0
