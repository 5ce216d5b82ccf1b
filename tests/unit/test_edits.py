"""Edit kinds beyond ablation and patching (the ones steering needs) through both runners of
``explorer.interventions.edits``, checked against plain PyTorch hooks on a separate copy of the
tiny model (module paths written out here per family, not read from the adapters)."""
from __future__ import annotations

import pytest
import torch

from explorer.interventions.edits import (
    OPS,
    Edit,
    EditError,
    apply_edit,
    nnsight_runs,
    register_op,
    replay,
    run_clean,
)
from tiny_models import make_tiny_model

# Gemma 2 (sliding window, soft-caps, post-norms), OLMo-2 (post-norms only), Phi-3 (fused
# projections) join the three original layouts: replay re-runs their blocks from captured
# arguments, per-layer masks included.
BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers",
          "gemma2": "model.layers", "olmo2": "model.layers", "phi3": "model.layers"}
FAMILIES = tuple(BLOCKS)
PROMPT = "The capital of France is"
TOL = 1e-4


@pytest.fixture(scope="module")
def plain(tokenizer, tiny_sessions):
    out = {}
    for family in FAMILIES:
        model = make_tiny_model(family, len(tokenizer))
        model.load_state_dict(tiny_sessions[family].hf.state_dict())
        model.config.use_cache = False
        out[family] = model
    return out


def ref_logits(model, family: str, ids: torch.Tensor, changes: dict[int, callable]) -> torch.Tensor:
    """Last-position logits with each block's output (its hidden states) replaced by change(h)."""
    blocks = model.get_submodule(BLOCKS[family])
    handles = []
    for layer, change in changes.items():
        def hook(mod, args, out, change=change):
            if isinstance(out, tuple):
                return (change(out[0]),) + tuple(out[1:])
            return change(out)
        handles.append(blocks[layer].register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(ids[None]).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()


def _both_runners(session, ids, edits) -> tuple[torch.Tensor, torch.Tensor]:
    run = run_clean(session, ids)
    with torch.no_grad(), session.lock:
        fast = replay(session, run, [edits])[0]
    return fast, nnsight_runs(session, ids, [edits])[0]["logits"]


@pytest.mark.parametrize("family", FAMILIES)
def test_adding_a_vector_to_a_block_output(family, tiny_sessions, plain):
    """Steering: the residual stream after block 1 gets α·v at every position."""
    session = tiny_sessions[family]
    ids = session.encode(PROMPT)
    v = 3.0 * torch.randn(session.hf.config.hidden_size, generator=torch.Generator().manual_seed(0))
    expected = ref_logits(plain[family], family, ids, {1: lambda h: h + v})
    fast, traced = _both_runners(session, ids, [Edit("resid", 1, (Ellipsis,), v, op="add")])
    torch.testing.assert_close(fast, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(traced, expected, atol=TOL, rtol=0)
    clean = ref_logits(plain[family], family, ids, {})
    assert (expected - clean).abs().max() > 1e-2  # the edit changes the output


@pytest.mark.parametrize("family", FAMILIES)
def test_projecting_a_direction_out_at_every_layer(family, tiny_sessions, plain):
    session = tiny_sessions[family]
    ids = session.encode(PROMPT)
    d = session.hf.config.hidden_size
    u = torch.randn(d, generator=torch.Generator().manual_seed(1))
    u = u / u.norm()

    def remove(h):
        return h - (h @ u)[..., None] * u

    expected = ref_logits(plain[family], family, ids, {l: remove for l in range(session.n_layers)})
    edits = [Edit("resid", l, (Ellipsis,), u, op="project_out") for l in range(session.n_layers)]
    fast, traced = _both_runners(session, ids, edits)
    torch.testing.assert_close(fast, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(traced, expected, atol=TOL, rtol=0)


def test_a_registered_op_runs_in_both_runners(tiny_sessions, plain):
    """A new edit kind is one function: here, scaling the block's contribution (output − input)."""
    register_op("scale", lambda x, value: x * value)
    try:
        session = tiny_sessions["llama"]
        ids = session.encode(PROMPT)
        blocks = plain["llama"].get_submodule(BLOCKS["llama"])
        inputs = {}
        pre = blocks[2].register_forward_pre_hook(lambda m, a, k: inputs.update(h=a[0] if a else k["hidden_states"]),
                                                  with_kwargs=True)
        try:
            expected = ref_logits(plain["llama"], "llama", ids, {2: lambda h: inputs["h"] + 0.5 * (h - inputs["h"])})
        finally:
            pre.remove()
        fast, traced = _both_runners(session, ids, [Edit("block", 2, (Ellipsis,), torch.tensor(0.5), op="scale")])
        torch.testing.assert_close(fast, expected, atol=TOL, rtol=0)
        torch.testing.assert_close(traced, expected, atol=TOL, rtol=0)
    finally:
        OPS.pop("scale")


def test_edit_ops_on_a_row():
    row = torch.arange(6.0).view(2, 3)
    apply_edit(row, Edit("resid", 0, (slice(None), 1), torch.tensor(10.0), op="add"))
    assert row.tolist() == [[0, 11, 2], [3, 14, 5]]
    inp = torch.ones(2, 3)
    apply_edit(row, Edit("block", 0, (Ellipsis,)), inp)  # zero the contribution: output := input
    assert row.tolist() == inp.tolist()


def test_bad_edits_are_named():
    with pytest.raises(EditError, match="unknown edit op"):
        Edit("resid", 0, (Ellipsis,), op="twist")
    with pytest.raises(EditError, match="unknown site"):
        Edit("embed", 0, (Ellipsis,))
    with pytest.raises(EditError, match="exists already"):
        register_op("add", lambda x, v: x)


def test_one_place_turns_the_residual_stream_into_logits(tokenizer):
    """A transform of the final logits (Gemma's soft-capping) put into ``session.unembedding``
    alone reaches the lens, ablation, sweeps and patching: no analysis unembeds on its own."""
    from explorer.analyses.lens import logit_lens
    from explorer.core.session import ModelSession
    from explorer.interventions.ablation import ablate, sweep
    from explorer.interventions.patching import patch

    model = make_tiny_model("llama", len(tokenizer))
    reference = make_tiny_model("llama", len(tokenizer))
    session = ModelSession(model, tokenizer, name="capped")  # its own session: its cache stays its own
    cap = 2.0
    plain_logits = session.unembedding.logits

    def capped(hidden, **kwargs):
        kwargs.pop("out", None)  # a fresh tensor instead of the lens' buffer
        return cap * torch.tanh(plain_logits(hidden, **kwargs) / cap)

    session.unembedding.logits = capped
    ids = session.encode(PROMPT)
    with torch.no_grad():
        raw = reference(ids[None]).logits[0, -1].float()
    want = cap * torch.tanh(raw / cap)
    tid = session.token_id(" Paris")
    lens = logit_lens(session, PROMPT, top_k=3, target=" Paris")
    assert lens.target_probs[-1, -1] == pytest.approx(float(torch.softmax(want, -1)[tid]), abs=1e-5)
    assert ablate(session, PROMPT, target=" Paris", components="0.1").baseline.logit == pytest.approx(float(want[tid]), abs=1e-4)
    assert sweep(session, PROMPT, target=" Paris", kind="blocks").baseline_logit == pytest.approx(float(want[tid]), abs=1e-4)
    patched = patch(session, PROMPT, corrupt="The capital of Spain is", target=" Paris")
    assert patched.clean_metric == pytest.approx(float(want[tid]), abs=1e-4)
    assert abs(float(want[tid] - raw[tid])) > 1e-3  # the cap changes the logit: the checks above can fail
