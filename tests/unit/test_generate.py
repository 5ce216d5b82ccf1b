"""Generation (explorer.interventions.generate) against transformers' own ``generate`` and against
plain full-recompute loops with PyTorch hooks on a separate copy of each tiny model (module
paths written out here per family, not read from the adapters)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from explorer.core.errors import ExplorerError
from explorer.core.results import RESULT_TYPES
from explorer.interventions.generate import (
    GenerateError,
    GenerateResult,
    Intervention,
    generate,
    pick,
)
from tiny_models import make_tiny_model

PROMPT = "The capital of France is"
PATHS = {  # blocks, attention, MLP, attention output projection
    "llama": ("model.layers", "self_attn", "mlp", "self_attn.o_proj"),
    "gpt2": ("transformer.h", "attn", "mlp", "attn.c_proj"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp", "attention.dense"),
}
FAMILIES = tuple(PATHS)


@pytest.fixture(scope="module")
def plain(tokenizer, tiny_sessions):
    out = {}
    for family in ("llama", "mistral", "qwen2", "gpt2", "gpt_neox"):
        model = make_tiny_model(family, len(tokenizer))
        model.load_state_dict(tiny_sessions[family].hf.state_dict())
        out[family] = model
    return out


def hf_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), generation_config=cfg)
    return out[0, ids.numel():].tolist()


def ref_loop(model, family: str, ids: torch.Tensor, n: int, hooks=(), temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> list[int]:
    """Plain generation: a full forward of the whole sequence per token (no cache), each hook
    ``(module path, kind, fn(module, args, out, T))`` registered on the reference model."""
    seq = ids.tolist()
    T = len(seq)
    gen = torch.Generator().manual_seed(seed)
    handles = []
    for path, kind, fn in hooks:
        mod = model.get_submodule(path)
        if kind == "pre":
            handles.append(mod.register_forward_pre_hook(lambda m, a, k, fn=fn: fn(m, a, k, T), with_kwargs=True))
        else:
            handles.append(mod.register_forward_hook(lambda m, a, o, fn=fn: fn(m, a, o, T)))
    try:
        for _ in range(n):
            with torch.no_grad():
                logits = model(torch.tensor([seq])).logits[0, -1].float()
            if temperature == 0:
                seq.append(int(logits.argmax()))
                continue
            probs = torch.softmax(logits / temperature, -1)
            if top_p < 1:  # nucleus written out: sort, keep while the mass above is below top_p
                p, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(p, 0) - p < top_p
                probs = torch.zeros_like(probs)
                probs[order[keep]] = p[keep]
            seq.append(int(torch.multinomial(probs, 1, generator=gen)))
    finally:
        for h in handles:
            h.remove()
    return seq[T:]


def map_out(out, fn):
    if isinstance(out, tuple):
        return (fn(out[0]),) + tuple(out[1:])
    return fn(out)


# ================================================================================ plain
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "gpt_neox"])
def test_greedy_equals_transformers_generate(family, tiny_sessions, plain):
    session = tiny_sessions[family]
    ids = session.encode(PROMPT)
    result = generate(session, PROMPT, max_new_tokens=12)
    assert result.baseline.token_ids.tolist() == hf_greedy(plain[family], ids, 12)
    assert result.baseline.token_ids.tolist() == ref_loop(plain[family], family, ids, 12)
    assert result.intervened is None and result.baseline.stop_reason == "length"
    assert result.baseline.text == session.tokenizer.decode(result.baseline.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_matches_a_plain_loop_with_the_same_seed(family, tiny_sessions, plain):
    session = tiny_sessions[family]
    ids = session.encode(PROMPT)
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
        got = generate(session, PROMPT, max_new_tokens=10, temperature=temperature, top_p=top_p, seed=5)
        want = ref_loop(plain[family], family, ids, 10, temperature=temperature, top_p=top_p, seed=5)
        assert got.baseline.token_ids.tolist() == want
    a = generate(session, PROMPT, max_new_tokens=10, temperature=1.0, seed=1).baseline.token_ids
    b = generate(session, PROMPT, max_new_tokens=10, temperature=1.0, seed=2).baseline.token_ids
    assert a.tolist() != b.tolist()   # another seed, other draws (random tiny weights: near certain)


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    draws = {pick(logits, 1.0, 0.7, torch.Generator().manual_seed(s)) for s in range(200)}
    assert draws == {0, 1}            # 0.5 + 0.3 reach 0.7; the rest never drawn
    assert pick(logits, 0.0, 0.1, None) == 0


# ========================================================================= interventions
def _vector(session, seed=0, scale=4.0):
    d = session.hf.config.hidden_size
    return scale * torch.randn(d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["all", "last", "generated"])
def test_steered_generation_equals_plain_hook_loop(family, positions, tiny_sessions, plain):
    session = tiny_sessions[family]
    ids = session.encode(PROMPT)
    v, layer, alpha = _vector(session), 1, 1.5
    blocks = PATHS[family][0]

    def add(mod, args, out, T):
        def f(h):
            h = h.clone()
            if positions == "all":
                h[:, :] += alpha * v
            elif positions == "last":
                h[:, T - 1] += alpha * v
            else:
                h[:, T:] += alpha * v
            return h
        return map_out(out, f)

    want = ref_loop(plain[family], family, ids, 10, hooks=[(f"{blocks}.{layer}", "post", add)])
    iv = Intervention(steer=v.numpy(), layer=layer, alpha=alpha, positions=positions)
    got = generate(session, PROMPT, max_new_tokens=10, intervention=iv)
    assert got.intervened.token_ids.tolist() == want
    assert got.baseline.token_ids.tolist() == ref_loop(plain[family], family, ids, 10)
    if positions == "all":
        assert got.intervened.token_ids.tolist() != got.baseline.token_ids.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_during_generation_equals_plain_hooks(family, tiny_sessions, plain):
    """Zero-ablate head 1 of block 0 and the MLP of block 2 (the Ablation tab's specs)."""
    session = tiny_sessions[family]
    ids = session.encode(PROMPT)
    blocks, _, mlp, o_proj = PATHS[family]
    d_head = session.hf.config.hidden_size // session.hf.config.num_attention_heads

    def zero_head(mod, args, kwargs, T):
        x = args[0].clone()
        x[..., d_head:2 * d_head] = 0
        return (x,) + tuple(args[1:]), kwargs

    def zero_out(mod, args, out, T):
        return map_out(out, torch.zeros_like)

    want = ref_loop(plain[family], family, ids, 10,
                    hooks=[(f"{blocks}.0.{o_proj}", "pre", zero_head), (f"{blocks}.2.{mlp}", "post", zero_out)])
    got = generate(session, PROMPT, max_new_tokens=10, intervention=Intervention(components=("0.1", "mlp:2")))
    assert got.intervened.token_ids.tolist() == want


@pytest.mark.parametrize("family", FAMILIES)
def test_direction_ablation_during_generation_equals_plain_hooks(family, tiny_sessions, plain):
    """Arditi et al.: the direction is projected out of the embeddings and every attention and MLP output."""
    session = tiny_sessions[family]
    ids = session.encode(PROMPT)
    v = _vector(session, seed=3)
    u = v / v.norm()
    blocks, attn, mlp, _ = PATHS[family]
    proj = lambda h: h - (h @ u)[..., None] * u  # noqa: E731

    def emb(mod, args, kwargs, T):
        if args:
            return (proj(args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": proj(kwargs["hidden_states"])}

    hooks = [(f"{blocks}.0", "pre", emb)]
    for layer in range(session.n_layers):
        for sub in (attn, mlp):
            hooks.append((f"{blocks}.{layer}.{sub}", "post", lambda m, a, o, T: map_out(o, proj)))
    want = ref_loop(plain[family], family, ids, 10, hooks=hooks)
    got = generate(session, PROMPT, max_new_tokens=10, intervention=Intervention(direction=v.numpy()))
    assert got.intervened.token_ids.tolist() == want


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ab_arms_identical_when_the_intervention_changes_nothing(tiny_sessions, temperature):
    session = tiny_sessions["llama"]
    iv = Intervention(steer=_vector(session).numpy(), layer=1, alpha=0.0)
    got = generate(session, PROMPT, max_new_tokens=12, temperature=temperature, seed=7, intervention=iv, lens=True)
    assert got.baseline.token_ids.tolist() == got.intervened.token_ids.tolist()
    np.testing.assert_array_equal(got.baseline.chosen_ranks, got.intervened.chosen_ranks)
    np.testing.assert_allclose(got.baseline.chosen_probs, got.intervened.chosen_probs, atol=1e-6)


# ======================================================================== lens columns
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lens_columns_end_on_the_models_own_distribution(family, tiny_sessions, plain):
    session = tiny_sessions[family]
    ids = session.encode(PROMPT)
    got = generate(session, PROMPT, max_new_tokens=6, lens=True, top_k=3)
    arm = got.baseline
    R, L = len(got.layer_labels), session.n_layers
    assert arm.chosen_ranks.shape == (R, 6) == (L + 1, 6) and arm.top_ids.shape == (R, 6, 3)
    seq = torch.tensor([ids.tolist() + arm.token_ids.tolist()])
    with torch.no_grad():
        out = plain[family](seq, output_hidden_states=True)
    T = ids.numel()
    probs = torch.softmax(out.logits[0, T - 1:T + 5].float(), -1)           # where each token was predicted
    chosen = torch.tensor(arm.token_ids)
    np.testing.assert_allclose(arm.chosen_probs[-1], probs[torch.arange(6), chosen].numpy(), atol=1e-5)
    assert (arm.chosen_ranks[-1] == 1).all()                                  # greedy: rank 1 at the end
    np.testing.assert_array_equal(arm.top_ids[-1, :, 0], chosen.numpy())
    # A middle row: block 0's output read through the final norm and unembedding by hand.
    h0 = out.hidden_states[1][0, T - 1:T + 5]
    norm = plain[family].get_submodule("model.norm" if family == "llama" else "transformer.ln_f")
    head = plain[family].get_output_embeddings()
    with torch.no_grad():
        ref = torch.softmax(head(norm(h0)).float(), -1)
    np.testing.assert_allclose(arm.chosen_probs[1], ref[torch.arange(6), chosen].numpy(), atol=1e-5)
    assert arm.commit_layer(0) is not None


# ============================================================================== stopping
def test_stop_event_stops_within_one_token(tiny_sessions):
    session = tiny_sessions["llama"]
    stop = threading.Event()
    seen = []

    def on_token(step, pieces):
        seen.append(pieces)
        if step == 3:
            stop.set()

    got = generate(session, PROMPT, max_new_tokens=50, stop_event=stop, on_token=on_token)
    assert len(got.baseline.token_ids) == 4 and got.baseline.stop_reason == "stopped"
    assert "".join(p[0] for p in seen) == got.baseline.text   # the streamed pieces make up the text


def test_stop_string_and_eos(tiny_sessions, plain):
    session = tiny_sessions["llama"]
    full = generate(session, PROMPT, max_new_tokens=12)
    piece = str(full.baseline.tokens[4]).strip() or str(full.baseline.tokens[4])
    cut = generate(session, PROMPT, max_new_tokens=12, stop=(piece,))
    assert cut.baseline.stop_reason == "stop string" and piece in cut.baseline.text
    assert len(cut.baseline.token_ids) <= 5
    assert cut.baseline.token_ids.tolist() == full.baseline.token_ids[:len(cut.baseline.token_ids)].tolist()
    # The end-of-sequence token ends a generation (here: pretend the third token is the EOS).
    eos = int(full.baseline.token_ids[2])
    old = session.hf.generation_config.eos_token_id
    session.hf.generation_config.eos_token_id = eos
    try:
        got = generate(session, PROMPT, max_new_tokens=12)
    finally:
        session.hf.generation_config.eos_token_id = old
    assert got.baseline.stop_reason == "eos" and got.baseline.token_ids[-1] == eos
    assert len(got.baseline.token_ids) <= 3


def test_chat_template(tiny_sessions):
    session = tiny_sessions["llama"]
    got = generate(session, "Hi there", max_new_tokens=3, chat=True)
    assert got.prompt_text.startswith("<|im_start|>") and got.prompt_text.rstrip().endswith("assistant")
    want = session.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                                 add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert got.prompt_ids.tolist() == list(want)


# ============================================================================ bad input
@pytest.mark.parametrize("fields, message", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top-p"),
    ({"max_new_tokens": 0}, "max new tokens"),
    ({"intervention": Intervention(steer=(1.0, 2.0), layer=1, alpha=1.0)}, "another model"),
    ({"intervention": Intervention(steer=tuple([1.0] * 64), layer=7, alpha=1.0)}, "layer 7 does not exist"),
    ({"intervention": Intervention(components=("0.1",), mode="resample")}, "zero or mean"),
    ({"intervention": Intervention(components=("9.1",))}, "out of range"),
    ({"intervention": Intervention(direction=tuple([0.0] * 64))}, "zero"),
    ({"prompt": "  "}, "empty"),
])
def test_bad_input(tiny_sessions, fields, message):
    session = tiny_sessions["llama"]
    with pytest.raises(ExplorerError, match=message):
        generate(session, **{"prompt": PROMPT, **fields})


def test_generate_error_is_an_explorer_error():
    assert issubclass(GenerateError, ExplorerError)


def test_result_round_trips(tiny_sessions):
    session = tiny_sessions["gpt2"]
    iv = Intervention(components=("0.1",), steer=_vector(session).numpy(), layer=1, alpha=2.0, label="v")
    got = generate(session, PROMPT, max_new_tokens=4, intervention=iv, lens=True, stop=("zz",))
    assert got.validate() is None
    back = RESULT_TYPES["GenerateResult"].from_dict(got.to_dict())
    assert isinstance(back, GenerateResult) and back.validate() is None
    assert back.request == got.request
    np.testing.assert_array_equal(back.intervened.chosen_ranks, got.intervened.chosen_ranks)
    assert back.intervened.text == got.intervened.text and back.request.intervention.label == "v"
