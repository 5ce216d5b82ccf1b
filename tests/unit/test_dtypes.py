"""bfloat16 and float16 models in every analysis, against the same weights in float32.

Each family here is run three times with identical weights: float32 (the conftest's tiny model)
and copies cast to bfloat16 and float16. A half-precision model computes every activation with
~3 (bfloat16) or ~4 (float16) significant digits, so its results differ from float32's by that
rounding carried through three blocks; the tolerances below are stated per dtype in TOL, a few
times the largest difference measured on these models (bfloat16 ≈ 8× float16, its 3 fewer
mantissa bits). What must not be lost to the half-precision model's own rounding is checked
tightly, against the half-precision model itself: the lens' softmax reductions, the DLA sums and
the neuron index's statistics run in float32 (float64 for DLA), so they match a float64
reduction of that model's own half-precision activations to float32 accuracy.

Families: Llama (RMSNorm, GQA), GPT-2 (LayerNorm, Conv1D, biases), Gemma 2 (post-norms,
1 + weight norms, attention and final-logit soft-caps, sliding window).
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from cli.main import main
from explorer.analyses.heads import attention_patterns, direct_logit_attribution, head_scores
from explorer.analyses.lens import LensRequest, logit_lens
from explorer.core.session import ModelSession
from explorer.interventions.ablation import AblationRequest, SweepRequest, ablate, sweep
from explorer.interventions.patching import PatchRequest, patch
from explorer.neurons.index import build_index, neuron_activations
from tiny_models import make_tiny_model

DTYPE_FAMILIES = ("llama", "gpt2", "gemma2")
DTYPES = ("bfloat16", "float16")
PROMPT = "When Mary and John went to the store, John gave a drink to"
CLEAN, CORRUPT = "The capital of France is", "The capital of Spain is"

# Largest |half − float32| allowed, per quantity (on these tiny models; probabilities ~1e-4,
# logits and activations of order 1-3, patterns and head scores in [0, 1] or nats).
TOL = {
    "bfloat16": dict(entropy=1e-2, kl=1e-2, target_rel=0.05, top1=0.85, pattern=0.02, score=0.01,
                     dla=0.02, logit=0.05, effect=0.05, neuron_rel=0.03),
    "float16": dict(entropy=2e-3, kl=2e-3, target_rel=0.01, top1=0.95, pattern=2e-3, score=2e-3,
                    dla=4e-3, logit=5e-3, effect=5e-3, neuron_rel=5e-3),
}
# The unit of rounding of each dtype (2^-mantissa bits).
EPS = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}


@pytest.fixture(scope="module")
def trio(tiny_sessions, tokenizer):
    """(family, dtype) -> session; dtype "float32" is the conftest's own tiny session."""
    out = {}
    for family in DTYPE_FAMILIES:
        base = tiny_sessions[family]
        out[family, "float32"] = base
        for name in DTYPES:
            model = copy.deepcopy(base.hf).to(getattr(torch, name))
            out[family, name] = ModelSession(model, tokenizer, name=f"tiny-{family}-{name}")
    return out


def own_logits(session, ids: torch.Tensor) -> torch.Tensor:
    """The model's own output logits [T, V] from a plain forward, as float64.

    Gemma 2 soft-caps them in its own dtype (a half-precision tanh, rounded again); the lens caps
    in float32. So for it the unembedding's half-precision output is taken instead and capped
    here in float64: what the lens computes, from the same half-precision matmul.
    """
    seen = {}
    handle = session.hf.lm_head.register_forward_hook(lambda m, a, o: seen.__setitem__("z", o[0]))
    try:
        with torch.no_grad(), session.lock:
            logits = session.hf(input_ids=ids[None]).logits[0]
    finally:
        handle.remove()
    cap = getattr(session.hf.config, "final_logit_softcapping", None)
    if cap is None:
        return logits.double()
    return cap * torch.tanh(seen["z"].double() / cap)


# ----------------------------------------------------------------------------- lens
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", DTYPE_FAMILIES)
def test_lens(trio, family, dtype):
    tol = TOL[dtype]
    half, full = trio[family, dtype], trio[family, "float32"]
    assert half.dtype == getattr(torch, dtype)
    a = logit_lens(full, LensRequest(PROMPT, target=" Paris"))
    b = logit_lens(half, LensRequest(PROMPT, target=" Paris"))
    for name in ("top_probs", "entropy", "kl_to_final", "target_probs"):
        assert getattr(b, name).dtype == np.float32
    assert (a.top_ids[..., 0] == b.top_ids[..., 0]).mean() >= tol["top1"]  # near-uniform: ties swap
    np.testing.assert_allclose(b.entropy, a.entropy, rtol=0, atol=tol["entropy"])
    np.testing.assert_allclose(b.kl_to_final, a.kl_to_final, rtol=0, atol=tol["kl"])
    np.testing.assert_allclose(b.target_probs, a.target_probs, rtol=tol["target_rel"], atol=0)
    # The reductions ran in float32: the last row is the half model's own output distribution
    # (its logits, as it rounds them, softmaxed in float64) to float32 accuracy.
    own = torch.softmax(own_logits(half, half.encode(PROMPT)), -1)
    top_p, top_ids = torch.topk(own, 10, dim=-1)
    np.testing.assert_allclose(b.top_probs[-1], top_p.numpy(), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(b.target_probs[-1], own[:, b.target_id].numpy(), rtol=1e-4, atol=1e-9)
    entropy = -(own * own.log()).sum(-1).numpy()
    np.testing.assert_allclose(b.entropy[-1], entropy, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- heads and DLA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", DTYPE_FAMILIES)
def test_patterns_head_scores_and_dla(trio, family, dtype):
    tol = TOL[dtype]
    half, full = trio[family, dtype], trio[family, "float32"]
    pa, pb = attention_patterns(full, PROMPT).patterns, attention_patterns(half, PROMPT).patterns
    assert pb.dtype == np.float32
    np.testing.assert_allclose(pb, pa, rtol=0, atol=tol["pattern"])
    np.testing.assert_allclose(pb.sum(-1), 1.0, atol=1e-2 if dtype == "bfloat16" else 2e-3)
    sa, sb = head_scores(full, PROMPT, seq_len=8), head_scores(half, PROMPT, seq_len=8)
    for name in ("previous_token", "induction", "duplicate_token", "bos", "entropy"):
        np.testing.assert_allclose(getattr(sb, name), getattr(sa, name), rtol=0, atol=tol["score"], err_msg=name)
    da = direct_logit_attribution(full, PROMPT, target=" Paris")
    db = direct_logit_attribution(half, PROMPT, target=" Paris")
    np.testing.assert_allclose(db.heads, da.heads, rtol=0, atol=tol["dla"])
    np.testing.assert_allclose(db.mlp, da.mlp, rtol=0, atol=tol["dla"])
    assert db.logit == pytest.approx(da.logit, abs=tol["logit"])
    # The parts are summed in float64 from the half model's own activations: they add up to its
    # logit up to the rounding of that logit itself (it leaves the unembedding in half precision).
    assert abs(db.unexplained) <= 2 * EPS[dtype] * max(1.0, abs(db.logit))
    assert abs(da.unexplained) < 1e-3


# ----------------------------------------------------------------------------- interventions
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", DTYPE_FAMILIES)
def test_ablation_sweep_and_patching(trio, family, dtype):
    tol = TOL[dtype]
    half, full = trio[family, dtype], trio[family, "float32"]
    request = AblationRequest(PROMPT, " Paris", components=("1.2", "0:5", "mlp:1"), lens=False)
    aa, ab = ablate(full, request), ablate(half, request)
    assert ab.baseline.logit == pytest.approx(aa.baseline.logit, abs=tol["logit"])
    assert ab.ablated.logit == pytest.approx(aa.ablated.logit, abs=tol["logit"])
    assert ab.ablated.logit != ab.baseline.logit
    for kind in ("heads", "neurons"):
        sa = sweep(full, SweepRequest(PROMPT, " Paris", kind=kind, top_n=8))
        sb = sweep(half, SweepRequest(PROMPT, " Paris", kind=kind, top_n=8))
        assert sb.effects.dtype == np.float32 and np.isfinite(sb.effects).all()
        if kind == "neurons":  # the most active neurons: the same ones, up to near-ties
            assert len(set(sa.components) & set(sb.components)) >= 6
            common = [c for c in sa.components if c in sb.components]
            ia = [sa.components.index(c) for c in common]
            ib = [sb.components.index(c) for c in common]
            np.testing.assert_allclose(sb.effects[ib], sa.effects[ia], rtol=0, atol=tol["effect"])
        else:
            np.testing.assert_allclose(sb.effects, sa.effects, rtol=0, atol=tol["effect"])
    pa = patch(full, PatchRequest(CLEAN, CORRUPT, " Paris", compare_token=" Madrid"))
    pb = patch(half, PatchRequest(CLEAN, CORRUPT, " Paris", compare_token=" Madrid"))
    # The patched metric (a logit difference), not the restored fraction: that divides by the
    # clean−corrupt gap, which on a random model is small enough to magnify any rounding.
    np.testing.assert_allclose(pb.patched, pa.patched, rtol=0, atol=2 * tol["logit"])


# ----------------------------------------------------------------------------- neurons
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", DTYPE_FAMILIES)
def test_neuron_activations(trio, family, dtype):
    half, full = trio[family, dtype], trio[family, "float32"]
    ids = half.encode(PROMPT)[None]
    acts_a, acts_b = neuron_activations(full, [0, 1, 2], ids), neuron_activations(half, [0, 1, 2], ids)
    for a, b in zip(acts_a, acts_b):
        assert b.dtype == torch.float32
        scale = float(a.abs().max())
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=0, atol=TOL[dtype]["neuron_rel"] * scale)


def _plain_neuron_acts(session, windows: np.ndarray) -> list[np.ndarray]:
    """The session model's own (half-precision) neuron activations from plain pre-hooks, upcast."""
    mods = [blk.get_submodule("mlp.c_proj" if session.adapter.family == "gpt2" else "mlp.down_proj")
            for blk in session.hf_blocks()]
    store: list[list[torch.Tensor]] = [[] for _ in mods]
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: store[i].append(args[0].detach().clone()))
               for i, m in enumerate(mods)]
    try:
        with torch.no_grad(), session.lock:
            session.hf(torch.from_numpy(windows))
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s).double().numpy() for s in store]


@pytest.mark.parametrize("dtype", DTYPES)
def test_neuron_index_statistics_are_float32(trio, tokenizer, dtype, tmp_path):
    """The index of a half-precision model sums its activations in float64: the sums equal a
    float64 sum of the model's own half-precision activations (a half-precision running sum
    over 512 tokens would be off by whole units)."""
    session = trio["llama", dtype]
    line = " ".join(["The nurse said that she would come back tomorrow morning."] * 80)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(line + "\n", encoding="utf-8")
    index = build_index(session, str(corpus), max_tokens=512, window=32, top_k=4, n_random=2,
                        batch_windows=8, out_dir=tmp_path / "index")
    assert index.complete and index.tokens_done == 512
    # The corpus stream as the index cuts it: the line's tokens, then a blank-line separator.
    flat = tokenizer(line, add_special_tokens=False).input_ids
    windows = np.array(flat[:512], dtype=np.int64).reshape(16, 32)
    acts = _plain_neuron_acts(session, windows)
    a = index.arrays
    for layer, ref in enumerate(acts):
        flat_acts = ref.reshape(-1, ref.shape[-1])
        np.testing.assert_allclose(a["act_sum"][layer], flat_acts.sum(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(a["act_sumsq"][layer], (flat_acts ** 2).sum(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(a["act_min"][layer], flat_acts.min(0), rtol=0, atol=1e-6)
        # A half-precision running sum would be far off: it cannot even hold these sums exactly.
        rounded = torch.from_numpy(flat_acts.sum(0)).to(getattr(torch, dtype)).double().numpy()
        assert np.abs(rounded - a["act_sum"][layer]).max() > 1e-3


# ----------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def saved_gemma2(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("models") / "tiny-gemma2"
    make_tiny_model("gemma2", len(tokenizer), seed=5).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_load_and_cli_info_in_each_dtype(saved_gemma2, dtype, capsys):
    session = ModelSession.load(str(saved_gemma2), device="cpu", dtype=dtype)
    assert session.dtype == getattr(torch, dtype)
    info = session.info()
    assert info.family == "gemma2" and info.dtype == dtype and info.architecture == "Gemma2ForCausalLM"
    assert logit_lens(session, "The capital of France is", top_k=3).top_probs.dtype == np.float32
    assert main(["info", "--model", str(saved_gemma2), "--device", "cpu", "--dtype", dtype, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["model"]
    assert printed["family"] == "gemma2" and printed["dtype"] == dtype


def test_load_accepts_a_torch_dtype(saved_gemma2):
    session = ModelSession.load(str(saved_gemma2), device="cpu", dtype=torch.bfloat16)
    assert session.dtype == torch.bfloat16 and session.info().dtype == "bfloat16"
