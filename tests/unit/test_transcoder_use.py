"""Transcoder features (MLP input → MLP output) in interventions and attribution, against plain loops.

A tiny random TopK transcoder is written out here in the SAELens layout; the references encode it
by hand (no ``b_dec`` subtraction: a transcoder's ``b_dec`` is on the output side) and run a
separate copy of the tiny model with a PyTorch forward hook on block LAYER's MLP that reads the
MLP's input and rewrites its output: ``out + Σ_j (v_j − f_j(in)) · W_dec[j]`` (features set,
error term kept) or ``out + α · W_dec[j]`` (steering). The engine's three runners (the nnsight
path, the block replay and generation's hooks), the feature sweep, feature patching and the
activation × gradient attribution must each agree with them.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli.main import main
from explorer.features.attribution import feature_attribution
from explorer.features.edits import feature_edit, sae_for, steer_edit
from explorer.features.sae import SAEConfig, SparseAutoencoder
from explorer.features.saelens_io import save_sae
from explorer.interventions.ablation import SweepRequest, ablate, sweep
from explorer.interventions.edits import nnsight_runs, replay, run_clean
from explorer.interventions.generate import Intervention, generate
from explorer.interventions.patching import PatchRequest, patch
from helpers import plain_copy, random_sae_weights, save_model_dir

PROMPT, CORRUPT, TARGET, COMPARE = "The capital of France is", "The capital of Italy is", " Paris", " Rome"
LAYER, D, D_SAE, K = 1, 64, 96, 6
META = {"hook_name": f"blocks.{LAYER}.ln2.hook_normalized", "hook_name_out": f"blocks.{LAYER}.hook_mlp_out"}


def weights() -> dict[str, torch.Tensor]:
    return random_sae_weights(D, D_SAE, 3)


def ref_encode(x: torch.Tensor) -> torch.Tensor:
    """TopK of x W_enc + b_enc (float64), ReLU'd: a transcoder's features of the MLP's input x."""
    w = weights()
    h = x.double() @ w["W_enc"].double() + w["b_enc"].double()
    top = h.topk(K, dim=-1)
    return torch.zeros_like(h).scatter(-1, top.indices, top.values.clamp(min=0))


@pytest.fixture(scope="module")
def tc_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("transcoder")
    cfg = SAEConfig(d_in=D, d_sae=D_SAE, architecture="topk", k=K, apply_b_dec_to_input=False, d_out=D,
                    metadata=dict(META))
    save_sae(SparseAutoencoder(cfg, weights()), path)
    return str(path)


@pytest.fixture(scope="module")
def session(tiny_sessions):
    return tiny_sessions["llama"]


@pytest.fixture(scope="module")
def plain(tokenizer, session):
    return plain_copy(tokenizer, session)


def mlp_hook(values: dict[int, float] | None = None, steer: tuple[int, float] | None = None,
             positions: list[int] | None = None, seen: dict | None = None):
    """A forward hook (with kwargs) on the plain model's MLP that edits its output as described."""
    w = weights()

    def hook(mod, args, kwargs, out):
        x_in = args[0] if args else kwargs["x"]
        if seen is not None:
            seen["in"] = x_in[0].detach().clone()
        y = out.double().clone()
        where = slice(None) if positions is None else positions
        if values:
            f = ref_encode(x_in)
            for j, v in values.items():
                y[0, where] += (v - f[0, where, j:j + 1]) * w["W_dec"][j].double()
        if steer is not None:
            j, alpha = steer
            y[0, where] += alpha * w["W_dec"][j].double()
        return y.to(out.dtype)

    return hook


def plain_logits(plain, ids: torch.Tensor, **edit) -> tuple[torch.Tensor, torch.Tensor]:
    """(last-position logits float64, block LAYER's MLP input [T, d]) with the MLP output edited."""
    seen: dict = {}
    handle = plain.model.layers[LAYER].mlp.register_forward_hook(mlp_hook(seen=seen, **edit), with_kwargs=True)
    try:
        with torch.no_grad():
            logits = plain(ids[None]).logits[0, -1].double()
    finally:
        handle.remove()
    return logits, seen["in"]


def active(session, plain, n: int = 2, prompt: str = PROMPT) -> list[int]:
    """The features most active at the last position (editing them matters)."""
    _, x_in = plain_logits(plain, session.encode(prompt))
    return [int(j) for j in ref_encode(x_in[-1]).argsort(descending=True)[:n]]


def test_every_runner_edits_transcoder_features_as_a_plain_mlp_hook(session, plain, tc_dir):
    sae = sae_for(session, tc_dir)
    ids = session.encode(PROMPT)
    a, b = active(session, plain)
    cases = [([feature_edit(sae, [a], 0.0)], dict(values={a: 0.0})),
             ([feature_edit(sae, [a, b], [0.0, 5.0], positions=[2, 4])], dict(values={a: 0.0, b: 5.0}, positions=[2, 4])),
             ([steer_edit(sae, b, 3.0)], dict(steer=(b, 3.0)))]
    rows = [edits for edits, _ in cases]
    traced = nnsight_runs(session, ids, rows)
    clean = run_clean(session, ids)
    with torch.no_grad(), session.lock:
        replayed = replay(session, clean, rows)
    base, _ = plain_logits(plain, ids)
    for i, (_, ref_edit) in enumerate(cases):
        want, _ = plain_logits(plain, ids, **ref_edit)
        torch.testing.assert_close(traced[i]["logits"].double(), want, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(replayed[i].double(), want, atol=2e-4, rtol=1e-4)
        assert (want - base).abs().max() > 1e-2, ref_edit        # each edit matters
    # clamping a feature to its own activation changes nothing (the error term is kept)
    _, x_in = plain_logits(plain, ids)
    own = float(ref_encode(x_in[3])[a])
    same = nnsight_runs(session, ids, [[feature_edit(sae, [a], own, positions=[3])]])[0]["logits"]
    torch.testing.assert_close(same.double(), base, atol=2e-4, rtol=1e-4)


def test_single_ablation_and_generation_with_transcoder_features(session, plain, tc_dir):
    ids = session.encode(PROMPT)
    a, b = active(session, plain)
    r = ablate(session, PROMPT, target=TARGET, components=f"sae:{a}, sae:{b}=5", sae=tc_dir, lens=False)
    want, _ = plain_logits(plain, ids, values={a: 0.0, b: 5.0})
    assert abs(r.ablated.logit - float(want[r.target_id])) < 2e-4
    got = generate(session, PROMPT, max_new_tokens=6, intervention=Intervention(sae=tc_dir, features=f"{a}=40"))
    seq = ids.tolist()
    handle = plain.model.layers[LAYER].mlp.register_forward_hook(mlp_hook(values={a: 40.0}), with_kwargs=True)
    try:
        for _ in range(6):   # greedy, a full forward per token
            with torch.no_grad():
                seq.append(int(plain(torch.tensor([seq])).logits[0, -1].argmax()))
    finally:
        handle.remove()
    assert got.intervened.token_ids.tolist() == seq[ids.numel():]
    assert got.intervened.token_ids.tolist() != got.baseline.token_ids.tolist()   # the clamp matters


def ref_metric(session, logits: torch.Tensor) -> float:
    return float(logits[session.token_id(TARGET)] - logits[session.token_id(COMPARE)])


@pytest.mark.parametrize("method", ["exact", "sequential"])
def test_feature_sweep_over_a_transcoder_equals_a_plain_loop(session, plain, tc_dir, method):
    ids = session.encode(PROMPT)
    base_logits, x_in = plain_logits(plain, ids)
    peak = ref_encode(x_in).abs().max(0).values
    order = [int(j) for j in torch.argsort(peak, descending=True, stable=True)[:4] if peak[j] > 0]
    got = sweep(session, SweepRequest(PROMPT, TARGET, kind="features", top_n=4, method=method,
                                      compare_token=COMPARE, sae=tc_dir))
    assert got.complete and got.components == tuple(f"sae:{j}" for j in order)
    np.testing.assert_allclose(got.activations, [float(peak[j]) for j in order], rtol=1e-4, atol=1e-4)
    base = ref_metric(session, base_logits)
    for j, effect in zip(order, got.effects):
        logits, _ = plain_logits(plain, ids, values={j: 0.0})
        assert effect == pytest.approx(ref_metric(session, logits) - base, abs=2e-4), j
    assert np.abs(got.effects).max() > 1e-3


def test_feature_patching_over_a_transcoder_equals_a_plain_loop(session, plain, tc_dir):
    clean_ids, corrupt_ids = session.encode(PROMPT), session.encode(CORRUPT)
    clean_logits, clean_in = plain_logits(plain, clean_ids)
    corrupt_logits, corrupt_in = plain_logits(plain, corrupt_ids)
    f_clean = ref_encode(clean_in)
    diff = (f_clean - ref_encode(corrupt_in)).abs().sum(0)
    feats = [int(j) for j in torch.argsort(diff, descending=True, stable=True)[:2]]
    got = patch(session, PatchRequest(PROMPT, CORRUPT, TARGET, compare_token=COMPARE, site="features",
                                      sae=tc_dir, top_n=2))
    assert got.layer_labels == tuple(f"f{j}" for j in feats)
    for r, j in enumerate(feats):
        for p in range(clean_ids.numel()):
            logits, _ = plain_logits(plain, corrupt_ids, values={j: float(f_clean[p, j])}, positions=[p])
            assert got.patched[r, p] == pytest.approx(ref_metric(session, logits), abs=2e-4), (j, p)


def test_transcoder_attribution_equals_a_plain_activation_times_gradient(session, plain, tc_dir):
    att = feature_attribution(session, PROMPT, sae=tc_dir, target=TARGET, top_n=5)
    w = {k: v.double() for k, v in weights().items()}
    held = {}

    def hook(mod, args, kwargs, out):
        f = ref_encode(args[0][0]).detach().requires_grad_(True)
        recon = f @ w["W_dec"] + w["b_dec"]
        held["f"] = f
        return (recon + (out[0].double() - recon).detach())[None].to(out.dtype)

    ids = session.encode(PROMPT)
    handle = plain.model.layers[LAYER].mlp.register_forward_hook(hook, with_kwargs=True)
    try:
        logit = plain(ids[None]).logits[0, -1, session.token_id(TARGET)]
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logit, [held["f"]])
    ref = (held["f"] * grad).detach()
    order = torch.argsort(ref.sum(0).abs(), descending=True)[:5]
    assert att.site == "mlp_in" and att.layer == LAYER and abs(att.logit - float(logit)) < 1e-4
    assert att.features.tolist() == order.tolist()
    np.testing.assert_allclose(att.per_position, ref[:, order].numpy(), rtol=1e-3, atol=1e-6)
    assert np.abs(att.totals).max() > 1e-3


def test_cli_attributes_and_ablates_with_a_transcoder(tmp_path, tokenizer, session, plain, tc_dir, capsys):
    model_dir = save_model_dir(tmp_path / "model", plain, tokenizer)
    a, _ = active(session, plain)
    assert main(["sae", "attribute", "--model", str(model_dir), "--sae", tc_dir, "--prompt", PROMPT,
                 "--target", TARGET, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["site"] == "mlp_in" and len(data["features"]) > 0
    assert main(["ablate", "--model", str(model_dir), "--prompt", PROMPT, "--target", TARGET, "--sae", tc_dir,
                 "--features", str(a), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want, _ = plain_logits(plain, session.encode(PROMPT), values={a: 0.0})
    assert abs(out["ablated"]["logit"] - float(want[session.token_id(TARGET)])) < 2e-4
