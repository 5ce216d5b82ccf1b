"""Ablation and sweeps on tiny random models of every family, checked against plain PyTorch.

The reference never goes through the engine: it runs a separate copy of each tiny model (same
seed, so identical weights, which is asserted) with ordinary forward hooks that edit the
activation, using module paths written out here per family (not read from explorer.core.adapters).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import explorer.interventions.ablation as ablation_mod
import explorer.interventions.edits as edits_mod
from explorer.analyses.lens import LensRequest, logit_lens
from explorer.core.components import Component, ComponentError, Geometry, geometry, parse_component, parse_components
from explorer.core.errors import EmptyPromptError, TokenError
from explorer.core.jobs import Job
from explorer.interventions.ablation import (
    AblationError,
    AblationRequest,
    AblationResult,
    SweepRequest,
    SweepResult,
    ablate,
    mean_activations,
    spearman,
    sweep,
)
from tiny_models import FAMILIES, make_tiny_model

_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma2", "gemma3_text")
BLOCKS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", **{f: "model.layers" for f in _LLAMA_LIKE}}
ATTN = {"gpt2": "attn", "gpt_neox": "attention", **{f: "self_attn" for f in _LLAMA_LIKE}}
ATTN_OUT = {"gpt2": "attn.c_proj", "gpt_neox": "attention.dense", **{f: "self_attn.o_proj" for f in _LLAMA_LIKE}}
# Phi-3 fuses gate and up projections (gate_up_proj): its neurons are still down_proj's input.
MLP_OUT = {"gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h", **{f: "mlp.down_proj" for f in _LLAMA_LIKE}}
D_MLP = {"gpt2": 256, "gpt_neox": 128, **{f: 128 for f in _LLAMA_LIKE}}
N_LAYERS, N_HEADS = 3, 4
D_HEADS = {"gemma2": 24, "gemma3_text": 8, "qwen3": 32}  # heads not d_model / n_heads wide


def d_head(family: str) -> int:
    return D_HEADS.get(family, 16)


PROMPT = "The capital of France is"
SECOND = "The capital of Spain is"   # same token count as PROMPT
TARGET = " Paris"
MEAN_TEXT = "Cats sleep most of the day, and dogs like to run in the park with their owners."
TOL = 1e-4


# ----------------------------------------------------------------------------- reference
@pytest.fixture(scope="module")
def plain(tokenizer, tiny_sessions):
    """family -> a separate unwrapped model with the session's weights."""
    out = {}
    for family in FAMILIES:
        model = make_tiny_model(family, len(tokenizer))
        sa, sb = tiny_sessions[family].hf.state_dict(), model.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), family
        model.config.use_cache = False
        out[family] = model
    return out


def _mod(model, family: str, layer: int, rel: str | None = None):
    block = model.get_submodule(BLOCKS[family])[layer]
    return block if rel is None else block.get_submodule(rel)


def ref_logits(model, family: str, ids: torch.Tensor, edits=()) -> torch.Tensor:
    """Last-position logits [V] with edits: (kind, layer, index, value) where kind is head/neuron/
    attn/mlp/block, index the head/neuron, value None (zero) or a tensor broadcast to the slice."""
    handles = []

    def put(x, sl, value):
        x = x.clone()
        x[..., sl] = 0 if value is None else value
        return x

    for kind, layer, index, value in edits:
        if kind == "head":
            sl = slice(index * d_head(family), (index + 1) * d_head(family))
            handles.append(_mod(model, family, layer, ATTN_OUT[family]).register_forward_pre_hook(
                lambda m, a, sl=sl, v=value: (put(a[0], sl, v),) + a[1:]))
        elif kind == "neuron":
            handles.append(_mod(model, family, layer, MLP_OUT[family]).register_forward_pre_hook(
                lambda m, a, n=index, v=value: (put(a[0], n, v),) + a[1:]))
        elif kind == "attn":
            handles.append(_mod(model, family, layer, ATTN[family]).register_forward_hook(
                lambda m, a, o, v=value: (put(o[0], slice(None), v),) + tuple(o[1:])))
        elif kind == "mlp":
            handles.append(_mod(model, family, layer, "mlp").register_forward_hook(
                lambda m, a, o, v=value: put(o, slice(None), v)))
        elif kind == "block":  # the block's output := its input (+ value)
            handles.append(_mod(model, family, layer).register_forward_hook(
                lambda m, a, o, v=value: a[0].clone() if v is None else a[0] + v))
        else:
            raise ValueError(kind)
    try:
        with torch.no_grad():
            return model(ids[None]).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()


def ref_capture(model, family: str, ids: torch.Tensor, kind: str, layer: int) -> torch.Tensor:
    """The activation [T, W] at a site in a clean run (block: output − input)."""
    got = {}

    def keep(x):  # hooks must return None: a returned value would replace the activation
        got.setdefault("x", x[0].detach().clone())

    if kind == "head":
        h = _mod(model, family, layer, ATTN_OUT[family]).register_forward_pre_hook(lambda m, a: keep(a[0]))
    elif kind == "neuron":
        h = _mod(model, family, layer, MLP_OUT[family]).register_forward_pre_hook(lambda m, a: keep(a[0]))
    elif kind == "attn":
        h = _mod(model, family, layer, ATTN[family]).register_forward_hook(lambda m, a, o: keep(o[0]))
    elif kind == "mlp":
        h = _mod(model, family, layer, "mlp").register_forward_hook(lambda m, a, o: keep(o))
    else:
        h = _mod(model, family, layer).register_forward_hook(lambda m, a, o: keep(o - a[0]))
    try:
        with torch.no_grad():
            model(ids[None])
    finally:
        h.remove()
    return got["x"]


def ref_stats(logits: torch.Tensor, tid: int) -> tuple[float, float, int]:
    p = torch.softmax(logits.double(), -1)
    return float(logits[tid]), float(p[tid]), int((logits > logits[tid]).sum()) + 1


def check_stats(stats, logits: torch.Tensor, tid: int) -> None:
    logit, prob, rank = ref_stats(logits, tid)
    assert stats.logit == pytest.approx(logit, abs=TOL)
    assert stats.prob == pytest.approx(prob, rel=1e-3, abs=1e-7)
    assert abs(stats.rank - rank) <= 1  # ties within float noise may swap neighbours


def _ids(session, text):
    return session.encode(text)


# ----------------------------------------------------------------------------- components
def test_parse_components_kinds_and_order():
    comps = parse_components("mlp:2, 3.1 1:7,block:0 attn:2,3.1")
    assert [c.spec for c in comps] == ["block:0", "1:7", "attn:2", "mlp:2", "3.1"]
    assert parse_component("3.1") == Component(3, "head", 1)
    assert parse_component(" 5:1024 ") == Component(5, "neuron", 1024)
    assert parse_component("MLP:4") == Component(4, "mlp")
    assert parse_components(["0.1", "2:3,attn:1"]) == (Component(0, "head", 1), Component(1, "attn"),
                                                      Component(2, "neuron", 3))


@pytest.mark.parametrize("spec", ["3", "3.x", "head:3", "mlp3", "-1.2", "3.1.2", "attn:", "3:4:5"])
def test_bad_component_spec_message(spec):
    with pytest.raises(ComponentError, match="use L.H for a head"):
        parse_component(spec)


def test_empty_components():
    with pytest.raises(ComponentError, match="no components"):
        parse_components(" , ")


def test_component_ranges(tiny_sessions):
    geom = geometry(tiny_sessions["gpt2"])
    assert geom == Geometry(n_layers=3, n_heads=4, d_head=16, d_mlp=256, d_model=64)
    assert geometry(tiny_sessions["llama"]).d_mlp == 128
    with pytest.raises(ComponentError, match=r"layer 3 in '3.0' is out of range: the model has 3 layers \(0-2\)"):
        parse_components("3.0", geom)
    with pytest.raises(ComponentError, match=r"head 4 in '1.4' is out of range: each layer has 4 heads"):
        parse_components("1.4", geom)
    with pytest.raises(ComponentError, match=r"neuron 256 in '0:256' is out of range: each MLP has 256 neurons"):
        parse_components("0:256", geom)
    with pytest.raises(ComponentError, match="layer 7"):
        parse_components("mlp:7", geom)


# ------------------------------------------------------------------------ single ablations
def test_zero_head_matches_reference_hook(tiny_session, plain):
    family = tiny_session.name.removeprefix("tiny-")
    ids = _ids(tiny_session, PROMPT)
    tid = tiny_session.token_id(TARGET)
    base = ref_logits(plain[family], family, ids)
    for specs, edits in ((["0.1"], [("head", 0, 1, None)]),
                         (["2.3"], [("head", 2, 3, None)]),
                         (["1.0", "1.2", "2.1"], [("head", 1, 0, None), ("head", 1, 2, None), ("head", 2, 1, None)])):
        result = ablate(tiny_session, AblationRequest(PROMPT, TARGET, tuple(specs), lens=False))
        ref = ref_logits(plain[family], family, ids, edits)
        assert (ref - base).abs().max() > 1e-3, "the ablation must change the output for the test to mean anything"
        check_stats(result.baseline, base, tid)
        check_stats(result.ablated, ref, tid)
        assert result.effect == pytest.approx(float(ref[tid] - base[tid]), abs=TOL)


@pytest.mark.parametrize("kind", ["neuron", "attn", "mlp", "block"])
def test_zero_neuron_attn_mlp_block_match_reference(tiny_session, plain, kind):
    family = tiny_session.name.removeprefix("tiny-")
    ids = _ids(tiny_session, PROMPT)
    tid = tiny_session.token_id(TARGET)
    spec, edit = {"neuron": ("1:37", ("neuron", 1, 37, None)), "attn": ("attn:1", ("attn", 1, None, None)),
                  "mlp": ("mlp:0", ("mlp", 0, None, None)), "block": ("block:1", ("block", 1, None, None))}[kind]
    result = ablate(tiny_session, AblationRequest(PROMPT, TARGET, (spec,), lens=False))
    ref = ref_logits(plain[family], family, ids, [edit])
    assert (ref - ref_logits(plain[family], family, ids)).abs().max() > 1e-4
    check_stats(result.ablated, ref, tid)


def test_mixed_components_one_request(tiny_sessions, plain):
    family = "gpt_neox"
    session = tiny_sessions[family]
    ids = _ids(session, PROMPT)
    result = ablate(session, AblationRequest(PROMPT, TARGET, "0.1, 0:5, attn:1, 2:9, mlp:2, block:0", lens=False))
    assert result.components == ("0.1", "0:5", "block:0", "attn:1", "2:9", "mlp:2")  # execution order
    ref = ref_logits(plain[family], family, ids, [("head", 0, 1, None), ("neuron", 0, 5, None), ("block", 0, None, None),
                                                  ("attn", 1, None, None), ("neuron", 2, 9, None), ("mlp", 2, None, None)])
    check_stats(result.ablated, ref, session.token_id(TARGET))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_mean_ablation_matches_reference(tiny_sessions, plain, tokenizer, family):
    session = tiny_sessions[family]
    model = plain[family]
    mean_ids = torch.tensor(tokenizer(MEAN_TEXT, add_special_tokens=False).input_ids)
    assert mean_ids.numel() < ablation_mod.MEAN_SEQ  # one row: the reference is one forward
    ids = _ids(session, PROMPT)
    tid = session.token_id(TARGET)
    means = {kind: ref_capture(model, family, mean_ids, kind, 1).double().mean(0).float()
             for kind in ("head", "neuron", "attn", "block")}
    got = mean_activations(session, "head", MEAN_TEXT)
    dh = d_head(family)
    assert got.shape == (N_LAYERS, N_HEADS * dh)
    torch.testing.assert_close(got[1], means["head"], atol=1e-5, rtol=1e-5)
    cases = [("1.2", ("head", 1, 2, means["head"][2 * dh:3 * dh])),
             ("1:11", ("neuron", 1, 11, means["neuron"][11])),
             ("attn:1", ("attn", 1, None, means["attn"])),
             ("block:1", ("block", 1, None, means["block"]))]
    for spec, edit in cases:
        result = ablate(session, AblationRequest(PROMPT, TARGET, (spec,), mode="mean", mean_text=MEAN_TEXT, lens=False))
        check_stats(result.ablated, ref_logits(model, family, ids, [edit]), tid)


def test_mean_activations_cached_and_default_corpus(tiny_sessions):
    session = tiny_sessions["gpt2"]
    a = mean_activations(session, "neuron", MEAN_TEXT)
    assert mean_activations(session, "neuron", MEAN_TEXT) is a  # computed once
    corpus = mean_activations(session, "attn", None, max_tokens=256)
    assert corpus.shape == (N_LAYERS, 64) and torch.isfinite(corpus).all()
    with pytest.raises(AblationError, match="no mean activations"):
        mean_activations(session, "resid", MEAN_TEXT)


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "gpt_neox"])
def test_resample_matches_reference(tiny_sessions, plain, family):
    session, model = tiny_sessions[family], plain[family]
    ids, ids2 = _ids(session, PROMPT), _ids(session, SECOND)
    assert ids.numel() == ids2.numel() and not torch.equal(ids, ids2)
    tid = session.token_id(TARGET)
    for spec, kind, layer, index in (("2.1", "head", 2, 1), ("0:40", "neuron", 0, 40), ("mlp:1", "mlp", 1, None),
                                     ("block:2", "block", 2, None)):
        act = ref_capture(model, family, ids2, kind, layer)  # [T, W] from the second prompt
        value = {"head": lambda: act[:, index * d_head(family):(index + 1) * d_head(family)],
                 "neuron": lambda: act[:, index]}.get(kind, lambda: act)()
        result = ablate(session, AblationRequest(PROMPT, TARGET, (spec,), mode="resample", second_prompt=SECOND,
                                                 lens=False))
        check_stats(result.ablated, ref_logits(model, family, ids, [(kind, layer, index, value)]), tid)


def test_resample_with_same_prompt_changes_nothing(tiny_session):
    result = ablate(tiny_session, AblationRequest(PROMPT, TARGET, "0.1,1:3,attn:2,mlp:1,block:0", mode="resample",
                                                  second_prompt=PROMPT, lens=False))
    assert result.ablated.logit == pytest.approx(result.baseline.logit, abs=1e-5)
    assert result.ablated.rank == result.baseline.rank
    swept = sweep(tiny_session, SweepRequest(PROMPT, TARGET, kind="heads", mode="resample", second_prompt=PROMPT))
    np.testing.assert_allclose(swept.effects, 0, atol=1e-5)


def test_resample_needs_equal_length(tiny_sessions):
    session = tiny_sessions["llama"]
    with pytest.raises(AblationError, match=r"equal token length .* the prompt is 5 tokens, the second prompt 6"):
        ablate(session, AblationRequest(PROMPT, TARGET, "0.1", mode="resample", second_prompt="The capital city of Spain is"))
    with pytest.raises(AblationError, match="needs a second prompt"):
        ablate(session, AblationRequest(PROMPT, TARGET, "0.1", mode="resample"))
    with pytest.raises(AblationError, match="equal token length"):
        sweep(session, SweepRequest(PROMPT, TARGET, mode="resample", second_prompt="Hi"))


def test_compare_token_logit_difference(tiny_sessions, plain):
    family = "llama"
    session = tiny_sessions[family]
    ids = _ids(session, PROMPT)
    tid, cid = session.token_id(TARGET), session.token_id(" London")
    result = ablate(session, AblationRequest(PROMPT, TARGET, "1.1", compare_token=" London", lens=False))
    ref = ref_logits(plain[family], family, ids, [("head", 1, 1, None)])
    base = ref_logits(plain[family], family, ids)
    assert result.ablated.logit_diff == pytest.approx(float(ref[tid] - ref[cid]), abs=TOL)
    assert result.baseline.logit_diff == pytest.approx(float(base[tid] - base[cid]), abs=TOL)
    assert result.metric_effect == pytest.approx(result.ablated.logit_diff - result.baseline.logit_diff)
    assert result.compare == " London" and result.compare_id == cid


def test_lens_with_and_without_ablation(tiny_session):
    result = ablate(tiny_session, AblationRequest(PROMPT, TARGET, "attn:1,0:3", top_k=5))
    plain_lens = logit_lens(tiny_session, LensRequest(PROMPT, TARGET, top_k=5))
    lb, la = result.lens_baseline, result.lens_ablated
    assert lb.validate() is None and la.validate() is None
    np.testing.assert_allclose(lb.top_probs, plain_lens.top_probs, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(lb.target_probs, plain_lens.target_probs, rtol=1e-4, atol=1e-7)
    # The last lens row is the model's own output: it matches the reported stats.
    assert la.target_probs[-1, -1] == pytest.approx(result.ablated.prob, rel=1e-4)
    assert lb.target_probs[-1, -1] == pytest.approx(result.baseline.prob, rel=1e-4)
    assert la.target_ranks[-1, -1] == result.ablated.rank
    # Rows below the first ablated layer are untouched; later rows differ.
    np.testing.assert_allclose(la.target_probs[:1], lb.target_probs[:1], rtol=1e-5)
    assert not np.allclose(la.target_probs[-1], lb.target_probs[-1], rtol=1e-6, atol=0)


def test_ablate_is_cached_and_round_trips(tiny_sessions):
    session = tiny_sessions["qwen2"]
    request = AblationRequest(PROMPT, TARGET, "1.1,mlp:0", compare_token=" London", top_k=3)
    result = ablate(session, request)
    assert ablate(session, request) is result
    back = AblationResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back.request == request and back.components == result.components
    assert back.baseline == result.baseline and back.ablated == result.ablated
    np.testing.assert_array_equal(back.lens_ablated.top_ids, result.lens_ablated.top_ids)
    np.testing.assert_array_equal(back.tokens, result.tokens)
    assert back.lens_ablated.top_probs.dtype == np.float32 and back.validate() is None
    data = result.to_dict()
    assert set(data["baseline"]) >= {"logit", "prob", "rank"}


def test_bad_inputs(tiny_sessions):
    session = tiny_sessions["gpt2"]
    with pytest.raises(AblationError, match="unknown ablation mode 'half'"):
        ablate(session, AblationRequest(PROMPT, TARGET, "0.1", mode="half"))
    with pytest.raises(ComponentError, match="head 9"):
        ablate(session, AblationRequest(PROMPT, TARGET, "0.9"))
    with pytest.raises(TokenError):
        ablate(session, AblationRequest(PROMPT, " Parisian capital", "0.1"))
    with pytest.raises(AblationError, match="compare token is the target"):
        ablate(session, AblationRequest(PROMPT, TARGET, "0.1", compare_token=TARGET))
    with pytest.raises(EmptyPromptError):
        ablate(session, AblationRequest("  ", TARGET, "0.1"))
    with pytest.raises(AblationError, match="unknown sweep kind"):
        sweep(session, SweepRequest(PROMPT, TARGET, kind="layers"))
    with pytest.raises(AblationError, match="unknown sweep method"):
        sweep(session, SweepRequest(PROMPT, TARGET, method="fast"))
    with pytest.raises(AblationError, match="top-n must be between 1 and 768"):
        sweep(session, SweepRequest(PROMPT, TARGET, kind="neurons", top_n=0))


# ---------------------------------------------------------------------------------- sweeps
def test_head_sweep_matches_reference_hooks(tiny_session, plain):
    family = tiny_session.name.removeprefix("tiny-")
    ids = _ids(tiny_session, PROMPT)
    tid = tiny_session.token_id(TARGET)
    result = sweep(tiny_session, SweepRequest(PROMPT, TARGET, kind="heads"))
    base = ref_logits(plain[family], family, ids)[tid]
    ref = np.array([[float(ref_logits(plain[family], family, ids, [("head", l, h, None)])[tid] - base)
                     for h in range(N_HEADS)] for l in range(N_LAYERS)])
    assert result.effects.shape == (N_LAYERS, N_HEADS) and result.complete
    assert np.abs(ref).max() > 1e-2
    np.testing.assert_allclose(result.effects, ref, atol=TOL, rtol=0)
    assert result.baseline_logit == pytest.approx(float(base), abs=TOL)
    assert result.components[:5] == ("0.0", "0.1", "0.2", "0.3", "1.0")


@pytest.mark.parametrize("kind", ["heads", "blocks", "neurons"])
def test_batched_sweep_equals_sequential(tiny_session, kind, monkeypatch):
    # Small chunks so that a layer's ablations span several forwards and layers merge.
    monkeypatch.setattr(edits_mod, "CHUNK_TOKENS", 15)
    monkeypatch.setattr(edits_mod, "MERGE_TOKENS", 12)
    exact = sweep(tiny_session, SweepRequest(PROMPT, TARGET, kind=kind, top_n=12))
    seq = sweep(tiny_session, SweepRequest(PROMPT, TARGET, kind=kind, top_n=12, method="sequential"))
    shape = {"heads": (N_LAYERS, N_HEADS), "blocks": (N_LAYERS, 2), "neurons": (12,)}[kind]
    assert exact.effects.shape == shape and exact.components == seq.components
    assert not np.isnan(exact.effects).any() and np.abs(exact.effects).max() > 1e-3
    np.testing.assert_allclose(exact.effects, seq.effects, atol=TOL, rtol=0)


@pytest.mark.parametrize("family,mode,kinds", [("llama", "mean", ("heads", "neurons")), ("gpt2", "mean", ("blocks",)),
                                               ("gpt_neox", "resample", ("heads", "blocks")),
                                               ("qwen2", "resample", ("neurons",))])
def test_batched_sweep_equals_sequential_other_modes(tiny_sessions, family, mode, kinds):
    session = tiny_sessions[family]
    extra = dict(mean_text=MEAN_TEXT) if mode == "mean" else dict(second_prompt=SECOND)
    for kind in kinds:
        exact = sweep(session, SweepRequest(PROMPT, TARGET, kind=kind, mode=mode, top_n=6, **extra))
        seq = sweep(session, SweepRequest(PROMPT, TARGET, kind=kind, mode=mode, top_n=6, method="sequential", **extra))
        assert np.abs(exact.effects).max() > 1e-3
        np.testing.assert_allclose(exact.effects, seq.effects, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_sweep_on_eager_attention_with_mask_tensor(tokenizer, family):
    """Eager attention hands each block a [1, 1, T, T] mask tensor: the replay must broadcast it."""
    from explorer.core.session import ModelSession

    model = make_tiny_model(family, len(tokenizer))
    model.set_attn_implementation("eager")
    session = ModelSession(model, tokenizer, name=f"eager-{family}")
    run = ablation_mod.run_clean(session, session.encode(PROMPT))
    assert run.calls[1][1]["attention_mask"].shape == (1, 1, 5, 5)
    for kind in ("heads", "blocks"):
        exact = sweep(session, SweepRequest(PROMPT, TARGET, kind=kind))
        seq = sweep(session, SweepRequest(PROMPT, TARGET, kind=kind, method="sequential"))
        np.testing.assert_allclose(exact.effects, seq.effects, atol=TOL, rtol=0)


def test_block_sweep_and_compare_token_match_single_ablations(tiny_sessions):
    session = tiny_sessions["gpt_neox"]
    result = sweep(session, SweepRequest(PROMPT, TARGET, kind="blocks", compare_token=" London"))
    for l in range(N_LAYERS):
        for j, k in enumerate(("attn", "mlp")):
            single = ablate(session, AblationRequest(PROMPT, TARGET, f"{k}:{l}", compare_token=" London", lens=False))
            assert result.effects[l, j] == pytest.approx(single.metric_effect, abs=TOL)
    assert result.components == ("attn:0", "mlp:0", "attn:1", "mlp:1", "attn:2", "mlp:2")


def test_neuron_sweep_picks_most_active(tiny_sessions, plain):
    family = "llama"
    session = tiny_sessions[family]
    ids = _ids(session, PROMPT)
    acts = torch.stack([ref_capture(plain[family], family, ids, "neuron", l) for l in range(N_LAYERS)])  # [L, T, N]
    peak = acts.abs().amax(1).reshape(-1)
    expected = torch.argsort(peak, descending=True)[:6]
    result = sweep(session, SweepRequest(PROMPT, TARGET, kind="neurons", top_n=6))
    assert result.components == tuple(f"{int(i) // D_MLP[family]}:{int(i) % D_MLP[family]}" for i in expected)
    np.testing.assert_allclose(np.abs(result.activations), peak[expected].numpy(), rtol=1e-5)


class FakeContext:
    """Cancels after a given number of reports; records the partial results."""

    def __init__(self, cancel_after: int) -> None:
        self.reports: list = []
        self.cancel_after = cancel_after

    @property
    def cancelled(self) -> bool:
        return len(self.reports) >= self.cancel_after

    def report(self, done, total, partial=None, message=""):
        self.reports.append((done, total, partial))


def test_sweep_reports_partials_and_cancel_keeps_finished(tiny_sessions, monkeypatch):
    session = tiny_sessions["gpt2"]
    monkeypatch.setattr(edits_mod, "CHUNK_TOKENS", 10)  # 2 heads per forward: 6 batches
    monkeypatch.setattr(edits_mod, "MERGE_TOKENS", 0)
    request = SweepRequest(PROMPT, " Rome", kind="heads")  # 5 tokens: 2 heads per forward
    ctx = FakeContext(cancel_after=2)
    part = sweep(session, request, ctx=ctx)
    assert len(ctx.reports) == 2 and not part.complete
    assert part.done == 4 and part.total == 12
    finished = ~np.isnan(part.effects)
    assert finished.sum() == 4
    first = ctx.reports[0][2]
    assert isinstance(first, SweepResult) and np.isnan(first.effects).sum() == 10 and first.done == 2
    full = sweep(session, request)  # the cancelled one was not cached
    assert full.complete and not np.isnan(full.effects).any()
    np.testing.assert_allclose(part.effects[finished], full.effects[finished], atol=1e-6)
    # A finished sweep is cached, and a context still hears that it is done.
    ctx2 = FakeContext(cancel_after=99)
    assert sweep(session, request, ctx=ctx2) is full and ctx2.reports[-1][:2] == (12, 12)


def test_sweep_as_job_cancel(tiny_sessions, monkeypatch):
    session = tiny_sessions["llama"]
    monkeypatch.setattr(edits_mod, "CHUNK_TOKENS", 5)  # one head per forward
    request = SweepRequest("One two three four five", TARGET, kind="heads")
    seen, jobs = [], []

    def on_progress(progress, partial):
        seen.append(progress.done)
        if progress.done >= 3:
            jobs[0].cancel()

    jobs.append(Job(lambda ctx: sweep(session, request, ctx=ctx), name="sweep", on_progress=on_progress))
    job = jobs[0]
    assert session.encode(request.prompt).numel() == 5
    result = job.run()
    assert job.status == "cancelled"
    assert result.done == 3 and np.isfinite(result.effects).sum() == 3 and seen == [1, 2, 3]


def test_sweep_round_trip_with_nan(tiny_sessions, monkeypatch):
    session = tiny_sessions["mistral"]
    monkeypatch.setattr(edits_mod, "CHUNK_TOKENS", 5)
    ctx = FakeContext(cancel_after=1)
    part = sweep(session, SweepRequest(PROMPT, TARGET, kind="neurons", top_n=5), ctx=ctx)
    assert part.done == 1 and np.isnan(part.effects).sum() == 4
    for result in (part, sweep(session, SweepRequest(PROMPT, TARGET, kind="neurons", top_n=5))):
        back = SweepResult.from_dict(json.loads(json.dumps(result.to_dict())))
        np.testing.assert_array_equal(back.effects, result.effects)  # NaN compares equal here
        np.testing.assert_array_equal(back.activations, result.activations)
        assert back.effects.dtype == np.float32 and back.components == result.components
        assert back.request == result.request and back.validate() is None
        assert back.done == result.done


# ----------------------------------------------------------------------------- attribution
def ref_attribution(model, family: str, ids: torch.Tensor, tid: int) -> np.ndarray:
    """Independent attribution patching for zero-ablated heads: −Σ act·∂logit/∂act per head slice."""
    acts = {}
    embed = {"gpt2": "transformer.wte", "gpt_neox": "gpt_neox.embed_in",
             **{f: "model.embed_tokens" for f in _LLAMA_LIKE}}[family]
    handles = [model.get_submodule(embed).register_forward_hook(
        lambda m, a, o: o.detach().requires_grad_(True))]
    for l in range(N_LAYERS):
        handles.append(_mod(model, family, l, ATTN_OUT[family]).register_forward_pre_hook(
            lambda m, a, l=l: acts.__setitem__(l, a[0])))  # returns None: a pure capture
    try:
        logit = model(ids[None]).logits[0, -1, tid]
        grads = torch.autograd.grad(logit, [acts[l] for l in range(N_LAYERS)])
    finally:
        for h in handles:
            h.remove()
    return np.array([(-(acts[l] * g)[0].detach().view(-1, N_HEADS, d_head(family)).sum((0, 2))).numpy()
                     for l, g in enumerate(grads)])


def test_attribution_matches_reference_gradient(tiny_session, plain):
    family = tiny_session.name.removeprefix("tiny-")
    ids = _ids(tiny_session, PROMPT)
    tid = tiny_session.token_id(TARGET)
    result = sweep(tiny_session, SweepRequest(PROMPT, TARGET, kind="heads", method="attribution"))
    ref = ref_attribution(plain[family], family, ids, tid)
    np.testing.assert_allclose(result.effects, ref, atol=1e-4, rtol=1e-4)
    exact = sweep(tiny_session, SweepRequest(PROMPT, TARGET, kind="heads"))
    rho = spearman(result.effects, exact.effects)
    print(f"{family}: attribution vs exact Spearman {rho:.3f}")
    assert rho > 0.3  # first-order estimate of the same effects


def test_attribution_zero_when_replacement_equals_activation(tiny_sessions):
    """Resampling with the same prompt: replacement == activation, so every estimate is 0."""
    session = tiny_sessions["gpt2"]
    for kind in ("heads", "blocks", "neurons"):
        r = sweep(session, SweepRequest(PROMPT, TARGET, kind=kind, mode="resample", second_prompt=PROMPT,
                                        method="attribution", top_n=4))
        np.testing.assert_allclose(r.effects, 0, atol=1e-6)


def test_spearman():
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([10, 20, 30, 45.0])) == pytest.approx(1)
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([4, 3, 2, 1.0])) == pytest.approx(-1)
    assert spearman(np.array([1, 2, np.nan, 4.0]), np.array([1, 2, 9, 3.0])) == pytest.approx(1)
