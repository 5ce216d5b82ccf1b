"""Activation patching on tiny random models of every family, checked against plain PyTorch.

The reference patches with ordinary forward hooks on a separate copy of each tiny model (same
seed, identical weights, asserted), with module paths written out here per family.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import explorer.interventions.edits as edits_mod
from explorer.interventions.ablation import AblationError
from explorer.interventions.patching import PatchRequest, PatchResult, patch, patched_metric, restored_fraction
from tiny_models import FAMILIES, make_tiny_model

_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma2", "gemma3_text")
BLOCKS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", **{f: "model.layers" for f in _LLAMA_LIKE}}
ATTN = {"gpt2": "attn", "gpt_neox": "attention", **{f: "self_attn" for f in _LLAMA_LIKE}}
N_LAYERS = 3

CLEAN = "The capital of France is"
CORRUPT = "The capital of Spain is"
TARGET, COMPARE = " Paris", " Madrid"
TOL = 1e-4


@pytest.fixture(scope="module")
def plain(tokenizer, tiny_sessions):
    out = {}
    for family in FAMILIES:
        model = make_tiny_model(family, len(tokenizer))
        sa, sb = tiny_sessions[family].hf.state_dict(), model.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), family
        model.config.use_cache = False
        out[family] = model
    return out


def _site(model, family, site, layer):
    block = model.get_submodule(BLOCKS[family])[layer]
    return {"resid": block, "attn": block.get_submodule(ATTN[family]), "mlp": block.get_submodule("mlp")}[site]


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def _with_first(o, x):
    return (x,) + tuple(o[1:]) if isinstance(o, tuple) else x


def ref_metric(model, family, ids, tid, cid, patches=()) -> float:
    """Metric of a run of ids with patches (site, layer, position, value [d]) applied by forward hooks."""
    handles = []
    for site, layer, pos, value in patches:
        def hook(m, a, o, pos=pos, value=value):
            x = _out(o).clone()
            x[0, pos] = value
            return _with_first(o, x)
        handles.append(_site(model, family, site, layer).register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(ids[None]).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()
    return float(logits[tid] - (logits[cid] if cid is not None else 0))


def ref_acts(model, family, ids, site) -> list[torch.Tensor]:
    got: dict[int, torch.Tensor] = {}
    handles = [_site(model, family, site, l).register_forward_hook(
        lambda m, a, o, l=l: got.__setitem__(l, _out(o)[0].clone())) for l in range(N_LAYERS)]
    try:
        with torch.no_grad():
            model(ids[None])
    finally:
        for h in handles:
            h.remove()
    return [got[l] for l in range(N_LAYERS)]


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("site", ["resid", "attn", "mlp"])
def test_patch_matches_reference_hooks(tiny_session, plain, site):
    family = tiny_session.name.removeprefix("tiny-")
    model = plain[family]
    clean, corrupt = tiny_session.encode(CLEAN), tiny_session.encode(CORRUPT)
    tid, cid = tiny_session.token_id(TARGET), tiny_session.token_id(COMPARE)
    result = patch(tiny_session, PatchRequest(CLEAN, CORRUPT, TARGET, site=site, compare_token=COMPARE))
    T = clean.numel()
    assert result.restored.shape == (N_LAYERS, T) and result.complete and result.validate() is None
    m_clean = ref_metric(model, family, clean, tid, cid)
    m_corrupt = ref_metric(model, family, corrupt, tid, cid)
    assert result.clean_metric == pytest.approx(m_clean, abs=TOL)
    assert result.corrupt_metric == pytest.approx(m_corrupt, abs=TOL)
    acts = ref_acts(model, family, clean, site)
    ref = np.array([[ref_metric(model, family, corrupt, tid, cid, [(site, l, p, acts[l][p])]) for p in range(T)]
                    for l in range(N_LAYERS)])
    np.testing.assert_allclose(result.patched, ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(result.restored, (ref - m_corrupt) / (m_clean - m_corrupt), atol=1e-3, rtol=0)
    assert np.ptp(result.restored) > 0.05  # the map is not trivially flat


def test_batched_patch_equals_sequential_nnsight(tiny_session, monkeypatch):
    monkeypatch.setattr(edits_mod, "CHUNK_TOKENS", 15)  # 3 positions per forward, layers merged
    monkeypatch.setattr(edits_mod, "MERGE_TOKENS", 12)
    for site in ("resid", "mlp"):
        request = PatchRequest(CLEAN, CORRUPT, TARGET, site=site)
        result = patch(tiny_session, request)
        L, T = result.patched.shape
        _, _, seq = patched_metric(tiny_session, request, [[(l, [p])] for l in range(L) for p in range(T)])
        np.testing.assert_allclose(result.patched, np.array(seq).reshape(L, T), atol=TOL, rtol=0)


def test_full_layer_patch_restores_everything_and_nothing_restores_nothing(tiny_session):
    request = PatchRequest(CLEAN, CORRUPT, TARGET, compare_token=COMPARE)
    T = tiny_session.encode(CLEAN).numel()
    for layer in range(N_LAYERS):
        assert restored_fraction(tiny_session, request, [(layer, range(T))]) == pytest.approx(1.0, abs=1e-4)
    assert restored_fraction(tiny_session, request, []) == pytest.approx(0.0, abs=1e-4)
    # The batched map agrees: the last layer's last position is the whole prediction.
    result = patch(tiny_session, request)
    assert result.restored[-1, -1] == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(result.restored[-1, :-1], 0, atol=1e-4)  # earlier positions: too late to matter


def test_target_alone_metric(tiny_sessions, plain):
    session, family = tiny_sessions["gpt2"], "gpt2"
    result = patch(session, PatchRequest(CLEAN, CORRUPT, TARGET))
    tid = session.token_id(TARGET)
    assert result.compare is None
    assert result.clean_metric == pytest.approx(ref_metric(plain[family], family, session.encode(CLEAN), tid, None),
                                                abs=TOL)


def test_equal_length_and_other_errors(tiny_sessions):
    session = tiny_sessions["llama"]
    with pytest.raises(AblationError, match=r"equal token length: the clean prompt is 5 tokens, the corrupted one 6"):
        patch(session, PatchRequest(CLEAN, "The capital city of Spain is", TARGET))
    with pytest.raises(AblationError, match="unknown patching site 'mlp_out'"):
        patch(session, PatchRequest(CLEAN, CORRUPT, TARGET, site="mlp_out"))
    with pytest.raises(AblationError, match="same metric"):
        patch(session, PatchRequest(CLEAN, CLEAN, TARGET))
    with pytest.raises(AblationError, match="compare token is the target"):
        patch(session, PatchRequest(CLEAN, CORRUPT, TARGET, compare_token=TARGET))


class CancelAfter:
    def __init__(self, n: int) -> None:
        self.n, self.reports = n, []

    @property
    def cancelled(self) -> bool:
        return len(self.reports) >= self.n

    def report(self, done, total, partial=None, message=""):
        self.reports.append((done, total, partial))


def test_cancel_keeps_finished_cells_and_round_trip(tiny_sessions, monkeypatch):
    session = tiny_sessions["qwen2"]
    monkeypatch.setattr(edits_mod, "CHUNK_TOKENS", 10)  # 2 positions per forward: 2 + 2 + 1 a layer
    monkeypatch.setattr(edits_mod, "MERGE_TOKENS", 0)
    request = PatchRequest(CLEAN, CORRUPT, TARGET, site="attn", compare_token=" Rome")
    ctx = CancelAfter(3)
    part = patch(session, request, ctx=ctx)
    assert (part.done, part.total) == (5, 15) and not part.complete
    assert np.isfinite(part.patched[0]).all() and np.isnan(part.restored[1:]).all()
    assert [r[0] for r in ctx.reports] == [2, 4, 5] and isinstance(ctx.reports[0][2], PatchResult)
    assert np.isnan(ctx.reports[0][2].patched).sum() == 13
    full = patch(session, request)
    assert full.complete
    done = np.isfinite(part.patched)
    np.testing.assert_allclose(part.patched[done], full.patched[done], atol=1e-6)
    assert patch(session, request) is full  # cached once complete
    for result in (part, full):
        back = PatchResult.from_dict(json.loads(json.dumps(result.to_dict())))
        np.testing.assert_array_equal(back.restored, result.restored)
        assert back.request == request and back.layer_labels == ("L0", "L1", "L2")
        assert back.restored.dtype == np.float32 and back.validate() is None
