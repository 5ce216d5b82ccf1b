"""Steering vectors (explorer.interventions.steering) against plain PyTorch on a separate copy of
each tiny model: vectors from hooks on single-prompt forwards, steered logits from a forward
hook adding α·v, directional ablation from hooks on every attention and MLP output."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from explorer.core.errors import ExplorerError
from explorer.core.results import RESULT_TYPES
from explorer.interventions.generate import EditHooks, Intervention, Plan, plan_for
from explorer.interventions.steering import (
    SteeringError,
    SteeringVector,
    build_vector,
    direction_of,
    load_vector,
    parse_alphas,
    save_vector,
    steer_apply,
    steer_sweep,
)
from tiny_models import make_tiny_model

PATHS = {  # blocks, attention, MLP
    "llama": ("model.layers", "self_attn", "mlp"),
    "gpt2": ("transformer.h", "attn", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp"),
}
FAMILIES = tuple(PATHS)
POS = ("I love this movie", "What a wonderful day", "She is very kind")
NEG = ("I hate this movie", "What a terrible day", "She is very cruel")
PROMPT = "I think this film is"


@pytest.fixture(scope="module")
def plain(tokenizer, tiny_sessions):
    out = {}
    for family in FAMILIES:
        model = make_tiny_model(family, len(tokenizer))
        model.load_state_dict(tiny_sessions[family].hf.state_dict())
        out[family] = model
    return out


def out_tensor(out):
    return out[0] if isinstance(out, tuple) else out


def ref_last_state(model, family: str, ids: torch.Tensor, layer: int) -> torch.Tensor:
    seen = {}
    block = model.get_submodule(PATHS[family][0])[layer]
    h = block.register_forward_hook(lambda m, a, o: seen.update(h=out_tensor(o)[0, -1].clone()))
    try:
        with torch.no_grad():
            model(ids[None])
    finally:
        h.remove()
    return seen["h"]


def ref_logits(model, family: str, ids: torch.Tensor, hooks=()) -> torch.Tensor:
    handles = []
    for path, kind, fn in hooks:
        mod = model.get_submodule(path)
        if kind == "pre":
            handles.append(mod.register_forward_pre_hook(fn, with_kwargs=True))
        else:
            handles.append(mod.register_forward_hook(fn))
    try:
        with torch.no_grad():
            return model(ids[None]).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()


def add_hook(v: torch.Tensor, last_only: bool = False):
    def fn(mod, args, out):
        h = out_tensor(out).clone()
        if last_only:
            h[:, -1] += v
        else:
            h += v
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
    return fn


# =============================================================================== build
@pytest.mark.parametrize("family", FAMILIES)
def test_mean_vector_is_the_mean_of_last_token_differences(family, tiny_sessions, plain):
    session = tiny_sessions[family]
    vec = build_vector(session, positive=POS, negative=NEG, layer=1)
    ref = torch.stack([ref_last_state(plain[family], family, session.encode(p), 1)
                       - ref_last_state(plain[family], family, session.encode(n), 1) for p, n in zip(POS, NEG)])
    np.testing.assert_allclose(vec.vector, ref.mean(0).numpy(), atol=1e-4, rtol=1e-4)
    assert vec.positive_tokens == (" movie", " day", " kind") and vec.negative_tokens == (" movie", " day", " cruel")
    assert vec.layer == 1 and vec.method == "mean" and vec.model == session.name


def test_pca_and_logreg_directions(tiny_sessions, plain):
    family = "llama"
    session = tiny_sessions[family]
    states = lambda texts: np.stack([ref_last_state(plain[family], family, session.encode(t), 2).numpy()  # noqa: E731
                                     for t in texts]).astype(np.float64)
    pos, neg = states(POS), states(NEG)
    mean_diff = pos.mean(0) - neg.mean(0)
    # pca: numpy's SVD of the pair differences, signed toward the mean difference.
    v1 = np.linalg.svd(pos - neg, full_matrices=False)[2][0]
    v1 = v1 if v1 @ mean_diff > 0 else -v1
    pca = build_vector(session, positive=POS, negative=NEG, layer=2, method="pca").vector
    np.testing.assert_allclose(pca, v1 * (v1 @ mean_diff), atol=1e-3, rtol=1e-3)
    # logreg: scikit-learn on standardised features, mapped back to raw coordinates.
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([pos, neg])
    mu, sd = x.mean(0), x.std(0)
    sd[sd < 1e-12] = 1
    clf = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit((x - mu) / sd, [1] * 3 + [0] * 3)
    w = clf.coef_[0] / sd
    w /= np.linalg.norm(w)
    got = build_vector(session, positive=POS, negative=NEG, layer=2, method="logreg").vector
    cos = got @ w / np.linalg.norm(got)
    assert cos > 0.999
    np.testing.assert_allclose(np.linalg.norm(got), abs(w @ mean_diff), rtol=1e-3)
    # Unpaired lists are fine for logreg, not for mean or pca.
    build_vector(session, positive=POS, negative=NEG[:2], layer=2, method="logreg")
    with pytest.raises(SteeringError, match="pair up"):
        build_vector(session, positive=POS, negative=NEG[:2], layer=2, method="mean")


def test_direction_of_small_cases():
    pos = torch.tensor([[2.0, 0.0], [4.0, 0.0]])
    neg = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(direction_of(pos, neg, "mean").numpy(), [3.0, -1.0])


# =============================================================================== apply
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["all", "last"])
def test_steered_forward_equals_a_plain_hook_adding_alpha_v(family, positions, tiny_sessions, plain):
    session = tiny_sessions[family]
    vec = build_vector(session, positive=POS, negative=NEG, layer=1)
    ids = session.encode(PROMPT)
    alpha = 2.5
    v = torch.from_numpy(vec.vector)
    got = steer_apply(session, PROMPT, target=" great", vector=vec, alpha=alpha, positions=positions)
    block = f"{PATHS[family][0]}.1"
    want = ref_logits(plain[family], family, ids, [(block, "post", add_hook(alpha * v, positions == "last"))])
    base = ref_logits(plain[family], family, ids)
    tid = session.token_id(" great")
    assert got.steered.logit == pytest.approx(float(want[tid]), abs=1e-4)
    assert got.baseline.logit == pytest.approx(float(base[tid]), abs=1e-4)
    assert got.steered.rank == int((want > want[tid]).sum()) + 1
    assert got.steered.prob == pytest.approx(float(torch.softmax(want, -1)[tid]), abs=1e-6)
    assert abs(got.effect) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_direction_ablation_leaves_no_projection_at_any_layer(family, tiny_sessions, plain):
    session = tiny_sessions[family]
    vec = build_vector(session, positive=POS, negative=NEG, layer=1)
    u = torch.from_numpy(vec.unit())
    ids = session.encode(PROMPT)
    plan = plan_for(session, Intervention(direction=vec.vector))
    blocks = session.hf_blocks()
    rows: list[torch.Tensor] = []
    T = ids.numel()
    with torch.no_grad(), EditHooks(session, [Plan(), plan]) as hooks:
        # Plain hooks registered after the edit hooks read the edited residual stream.
        handles = [blocks[0].register_forward_pre_hook(
            lambda m, a, k: rows.append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)]
        handles += [b.register_forward_hook(lambda m, a, o: rows.append(out_tensor(o).clone())) for b in blocks]
        try:
            hooks.set(0, T, T)
            x = ids[None].expand(2, -1)
            session.hf(input_ids=x, attention_mask=torch.ones_like(x))
        finally:
            for h in handles:
                h.remove()
    stream = torch.stack(rows)                       # [1 + L, 2, T, d]
    assert stream.shape[0] == session.n_layers + 1
    clean_proj = (stream[:, 0] @ u).abs().max()
    ablated_proj = (stream[:, 1] @ u).abs().max()
    assert clean_proj > 1e-2 and ablated_proj < 1e-4 * max(1.0, float(stream[:, 1].abs().max()))
    # The logits equal plain hooks projecting the direction out of the embeddings, attention and MLP outputs.
    proj = lambda h: h - (h @ u)[..., None] * u  # noqa: E731
    blocks_path, attn, mlp = PATHS[family]

    def emb(m, a, k):
        if a:
            return (proj(a[0]),) + tuple(a[1:]), k
        return a, {**k, "hidden_states": proj(k["hidden_states"])}

    def post(m, a, o):
        return (proj(o[0]),) + tuple(o[1:]) if isinstance(o, tuple) else proj(o)

    hooks_ref = [(f"{blocks_path}.0", "pre", emb)]
    hooks_ref += [(f"{blocks_path}.{i}.{s}", "post", post) for i in range(session.n_layers) for s in (attn, mlp)]
    want = ref_logits(plain[family], family, ids, hooks_ref)
    got = steer_apply(session, PROMPT, target=" great", vector=vec, mode="ablate")
    assert got.steered.logit == pytest.approx(float(want[session.token_id(" great")]), abs=1e-4)


# =============================================================================== sweep
class Ctx:
    def __init__(self, cancel_after: int | None = None) -> None:
        self.reports, self.cancel_after = [], cancel_after

    @property
    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.reports) >= self.cancel_after

    def report(self, done, total, partial=None, message=""):
        self.reports.append((done, total, partial))


def test_sweep_equals_single_applications_with_partials(tiny_sessions, monkeypatch):
    import explorer.interventions.steering as steering

    monkeypatch.setattr(steering, "SWEEP_BATCH", 2)
    session = tiny_sessions["gpt2"]
    vec = build_vector(session, positive=POS, negative=NEG, layer=1)
    alphas = (-4.0, -1.0, 0.0, 1.5, 4.0)
    ctx = Ctx()
    sweep = steer_sweep(session, PROMPT, target=" great", compare_token=" bad", vector=vec, alphas=alphas,
                        text_alphas=(0.0, 4.0), max_new_tokens=4, ctx=ctx)
    assert sweep.complete and sweep.total == 7
    assert [r[0] for r in ctx.reports][:3] == [2, 4, 5]     # α batches of 2, then the texts
    assert np.isnan(ctx.reports[0][2].metric[2:]).all()      # a partial: the rest not yet computed
    for i, a in enumerate(alphas):
        one = steer_apply(session, PROMPT, target=" great", compare_token=" bad", vector=vec, alpha=a)
        assert sweep.metric[i] == pytest.approx(one.steered.logit_diff, abs=1e-4)
        assert sweep.ranks[i] == one.steered.rank
    assert sweep.metric[2] == pytest.approx(sweep.baseline_metric, abs=1e-5)
    from explorer.interventions.generate import generate

    plain_text = generate(session, PROMPT, max_new_tokens=4).baseline.text
    steered = generate(session, PROMPT, max_new_tokens=4,
                       intervention=Intervention(steer=vec.vector, layer=1, alpha=4.0)).intervened.text
    assert sweep.texts == (plain_text, steered)
    back = RESULT_TYPES["SteerSweepResult"].from_dict(json.loads(json.dumps(sweep.to_dict())))
    assert back.validate() is None and back.texts == sweep.texts
    np.testing.assert_allclose(back.metric, sweep.metric)


def test_sweep_cancel_keeps_finished(tiny_sessions, monkeypatch):
    import explorer.interventions.steering as steering

    monkeypatch.setattr(steering, "SWEEP_BATCH", 1)
    session = tiny_sessions["llama"]
    vec = build_vector(session, positive=POS, negative=NEG, layer=1)
    got = steer_sweep(session, PROMPT, target=" great", vector=vec, alphas=(1.0, 2.0, 3.0, 4.0), ctx=Ctx(2))
    assert got.done == 2 and not got.complete
    assert not np.isnan(got.metric[:2]).any() and np.isnan(got.metric[2:]).all()


def test_parse_alphas():
    assert parse_alphas("-8,-4,0,4,8") == (-8.0, -4.0, 0.0, 4.0, 8.0)
    for bad in ("", "a,b", "1,inf"):
        with pytest.raises(SteeringError):
            parse_alphas(bad)


# ========================================================================= save / load
def test_vectors_round_trip(tiny_sessions, tmp_path):
    session = tiny_sessions["llama"]
    vec = build_vector(session, positive=POS, negative=NEG, layer=2, method="pca")
    path = save_vector(vec, tmp_path / "v.safetensors")
    back = load_vector(path, session)
    np.testing.assert_array_equal(back.vector, vec.vector)
    assert (back.model, back.layer, back.method) == (vec.model, 2, "pca")
    assert back.positive == POS and back.negative == NEG and back.positive_tokens == vec.positive_tokens
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:   # the file's own layout, as other tools read it
        assert list(f.keys()) == ["vector"] and tuple(f.get_tensor("vector").shape) == (64,)
        meta = f.metadata()
    assert meta["layer"] == "2" and json.loads(meta["prompts"])["negative"] == list(NEG)
    snap = RESULT_TYPES["SteeringVector"].from_dict(vec.to_dict())
    np.testing.assert_array_equal(snap.vector, vec.vector)


def test_fingerprint_accepts_the_same_weights_from_another_folder(tokenizer, tmp_path, capsys):
    import dataclasses
    import shutil

    from cli.main import main
    from explorer.core.fingerprint import weights_fingerprint
    from explorer.core.session import ModelSession

    first = tmp_path / "first"
    make_tiny_model("llama", len(tokenizer), seed=3).save_pretrained(first)
    tokenizer.save_pretrained(first)
    copy = tmp_path / "a-copy-named-otherwise"
    shutil.copytree(first, copy)
    other = tmp_path / "other"
    make_tiny_model("llama", len(tokenizer), seed=4).save_pretrained(other)
    tokenizer.save_pretrained(other)
    a, b, c = (ModelSession.load(str(p), device="cpu", dtype="float32") for p in (first, copy, other))
    assert a.name != b.name
    vec = build_vector(a, positive=POS, negative=NEG, layer=1)
    assert vec.fingerprint and len(vec.fingerprint) == 16
    path = save_vector(vec, tmp_path / "v.safetensors")
    back = load_vector(path, b)                      # same weights, other folder and name: accepted
    assert back.fingerprint == vec.fingerprint and back.model == a.name   # the name kept for display
    steer_apply(b, PROMPT, target=" great", vector=back, alpha=1.0)
    with pytest.raises(SteeringError, match="another model"):
        load_vector(path, c)                         # another tiny model of the same shape: refused
    # The same weights in bfloat16 have the same fingerprint; another model's differ.
    assert weights_fingerprint(a.hf.to(torch.bfloat16)) == vec.fingerprint
    a.hf.float()
    assert weights_fingerprint(c.hf) != vec.fingerprint
    # An old vector (no fingerprint in its metadata) falls back to the name check.
    old = dataclasses.replace(vec, fingerprint="")
    old_path = save_vector(old, tmp_path / "old.safetensors")
    assert load_vector(old_path, a).fingerprint == ""
    with pytest.raises(SteeringError, match="build it again"):
        load_vector(old_path, b)
    # The CLI: checked against the loaded weights, not the folder's name.
    args = ["steer", "apply", "--device", "cpu", "--dtype", "float32", "--vector", str(path), "--prompt", PROMPT,
            "--target", " great", "--json"]
    assert main(args[:2] + ["--model", str(copy)] + args[2:]) == 0
    capsys.readouterr()
    assert main(args[:2] + ["--model", str(other)] + args[2:]) == 2
    assert "another model" in capsys.readouterr().err
    assert main(["generate", "--model", str(other), "--device", "cpu", "--steer", str(path), "--prompt", PROMPT,
                 "--max-new-tokens", "1", "--json"]) == 2
    assert "another model" in capsys.readouterr().err


def test_load_reads_the_probe_export(tiny_sessions, tmp_path):
    from safetensors.torch import save_file

    session = tiny_sessions["llama"]
    save_file({"vector": torch.ones(64)}, str(tmp_path / "p.safetensors"),
              metadata={"model": session.name, "layer": "1", "method": "probe-logistic",
                        "prompts": json.dumps(["a", "b"])})
    vec = load_vector(tmp_path / "p.safetensors", session)
    assert vec.method == "probe-logistic" and vec.positive == ("a", "b") and vec.d_model == 64


def test_bad_vectors_and_lists(tiny_sessions, tmp_path):
    session = tiny_sessions["llama"]
    vec = build_vector(session, positive=POS, negative=NEG, layer=1)
    wide = SteeringVector(model=session.name, layer=1, method="mean", vector=np.ones(32, np.float32),
                          positive=(), negative=(), positive_tokens=(), negative_tokens=())
    with pytest.raises(SteeringError, match="32 values"):
        steer_apply(session, PROMPT, target=" great", vector=wide)
    other = SteeringVector(model="another-model", layer=1, method="mean", vector=vec.vector,
                           positive=(), negative=(), positive_tokens=(), negative_tokens=())
    with pytest.raises(SteeringError, match="another-model"):
        steer_apply(session, PROMPT, target=" great", vector=other)
    with pytest.raises(ExplorerError, match="layer 9 does not exist"):
        steer_apply(session, PROMPT, target=" great", vector=vec, layer=9)
    with pytest.raises(ExplorerError, match="layer 5 does not exist"):
        build_vector(session, positive=POS, negative=NEG, layer=5)
    with pytest.raises(SteeringError, match="empty"):
        build_vector(session, positive=(), negative=NEG, layer=1)
    with pytest.raises(SteeringError, match="unknown method"):
        build_vector(session, positive=POS, negative=NEG, layer=1, method="svd")
    with pytest.raises(SteeringError, match="not found"):
        load_vector(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SteeringError, match="not a safetensors"):
        load_vector(tmp_path / "junk.safetensors")
    save_vector(vec, tmp_path / "v.safetensors")
    with pytest.raises(SteeringError, match="64 values"):
        load_vector(tmp_path / "v.safetensors", _wide_session(tiny_sessions))


def _wide_session(tiny_sessions):
    """A stand-in session with a wider residual stream, for the width check."""
    class Cfg:
        hidden_size = 128

    class Hf:
        config = Cfg()

    class S:
        name = tiny_sessions["llama"].name
        hf = Hf()

    return S()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_standing_intervention_applies_to_every_row_of_any_forward(family, tiny_sessions, plain):
    """``intervened``: any forward (here a batch of two prompts) runs steered on every row."""
    from explorer.interventions.generate import intervened

    session = tiny_sessions[family]
    vec = build_vector(session, positive=POS, negative=NEG, layer=1)
    v = torch.from_numpy(vec.vector)
    ids = torch.stack([session.encode(PROMPT), session.encode("I think this song is")])
    with intervened(session, Intervention(steer=vec.vector, layer=1, alpha=2.0)):
        got = session.hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].float()
    for row in range(2):
        want = ref_logits(plain[family], family, ids[row], [(f"{PATHS[family][0]}.1", "post", add_hook(2.0 * v))])
        torch.testing.assert_close(got[row], want, atol=1e-4, rtol=0)
    with intervened(session, Intervention(direction=vec.vector)):
        ablated = session.hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].float()
    one = steer_apply(session, PROMPT, target=" great", vector=vec, mode="ablate")
    assert float(ablated[0, session.token_id(" great")]) == pytest.approx(one.steered.logit, abs=1e-4)
    with pytest.raises(ExplorerError, match="every position"):
        with intervened(session, Intervention(steer=vec.vector, layer=1, alpha=2.0, positions="last")):
            pass
