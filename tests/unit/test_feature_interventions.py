"""SAE features used in interventions: Generate's A/B arm with features ablated or clamped, the
single ablation with ``sae:F`` specs, and a feature's decoder direction as a steering vector.

The references never go through ``explorer.features``: a tiny random TopK SAE is written to disk
in the SAELens layout, its encode/decode is written out here, and the model is a separate copy of
the tiny model driven by a plain full-recompute loop with a PyTorch forward hook that replaces
the site by the SAE's reconstruction with the features edited plus the error term.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli.main import main
from explorer.core.errors import ExplorerError
from explorer.features.edits import feature_vector, parse_features, sae_for
from explorer.features.sae import SAEError
from explorer.features.saelens_io import load_sae
from explorer.interventions.generate import Intervention, generate
from helpers import plain_copy, random_sae_weights, save_model_dir, save_topk_sae, topk_encode

PROMPT = "The capital of France is"
LAYER, D, D_SAE, K = 1, 64, 96, 6


def sae_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    return random_sae_weights(D, D_SAE, seed)


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    return save_topk_sae(tmp_path_factory.mktemp("sae"), sae_weights(), LAYER, K)


@pytest.fixture(scope="module")
def plain(tokenizer, tiny_sessions):
    return plain_copy(tokenizer, tiny_sessions["llama"])


def ref_encode(w, x: torch.Tensor) -> torch.Tensor:
    return topk_encode(w, x, K)


def ref_decode(w, f: torch.Tensor) -> torch.Tensor:
    return f @ w["W_dec"].double() + w["b_dec"].double()


def edited(w, x: torch.Tensor, values: dict[int, float]) -> torch.Tensor:
    """reconstruction(features set to values) + (x − reconstruction): the error term kept."""
    f = ref_encode(w, x)
    g = f.clone()
    for j, v in values.items():
        g[..., j] = v
    return (ref_decode(w, g) + (x.double() - ref_decode(w, f))).to(x.dtype)


def plain_generate(model, ids: torch.Tensor, n: int, values: dict[int, float] | None) -> list[int]:
    """Greedy, a full forward per token; the hook replaces block LAYER's output."""
    w = sae_weights()
    seq = ids.tolist()
    handle = None
    if values is not None:
        def hook(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h = edited(w, h, values)
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
        handle = model.model.layers[LAYER].register_forward_hook(hook)
    try:
        for _ in range(n):
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].float().argmax()))
    finally:
        if handle is not None:
            handle.remove()
    return seq[ids.numel():]


def active_features(session, plain, n: int = 2) -> list[int]:
    """The most active features at the prompt's last position (so editing them matters)."""
    ids = session.encode(PROMPT)
    seen = []
    handle = plain.model.layers[LAYER].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        plain(ids[None])
    handle.remove()
    f = ref_encode(sae_weights(), seen[0][0, -1])
    return [int(j) for j in f.argsort(descending=True)[:n]]


# ============================================================================ generate
def test_ab_arm_with_features_ablated_or_clamped_equals_a_plain_hooked_loop(tiny_sessions, plain, sae_dir):
    session = tiny_sessions["llama"]
    ids = session.encode(PROMPT)
    a, b = active_features(session, plain)
    for spec, values in ((f"{a}", {a: 0.0}), (f"{a}, {b}=5.0", {a: 0.0, b: 5.0})):
        got = generate(session, PROMPT, max_new_tokens=8,
                       intervention=Intervention(sae=str(sae_dir), features=spec))
        assert got.intervened.token_ids.tolist() == plain_generate(plain, ids, 8, values), spec
        assert got.baseline.token_ids.tolist() == plain_generate(plain, ids, 8, None)
        assert "SAE features" in got.intervened.label
    # A large clamp changes the text (the test would pass vacuously otherwise).
    big = generate(session, PROMPT, max_new_tokens=8, intervention=Intervention(sae=str(sae_dir), features=f"{a}=60"))
    assert big.intervened.token_ids.tolist() == plain_generate(plain, ids, 8, {a: 60.0})
    assert big.intervened.token_ids.tolist() != big.baseline.token_ids.tolist()


def test_ab_arms_identical_without_features(tiny_sessions, sae_dir):
    session = tiny_sessions["llama"]
    iv = Intervention(sae=str(sae_dir), features="")
    assert iv.empty
    got = generate(session, PROMPT, max_new_tokens=8, intervention=iv, temperature=1.0, seed=3)
    assert got.baseline.token_ids.tolist() == got.intervened.token_ids.tolist()


def test_feature_specs_and_errors(tiny_sessions, sae_dir):
    assert parse_features("1, 2=5, sae:3=-1.5, 4 = 2") == [(1, 0.0), (2, 5.0), (3, -1.5), (4, 2.0)]
    for bad in ("x", "1=abc", "1=inf", ""):
        with pytest.raises(SAEError):
            parse_features(bad)
    session = tiny_sessions["llama"]
    with pytest.raises(ExplorerError, match="SAE folder"):
        generate(session, PROMPT, max_new_tokens=2, intervention=Intervention(features="1"))
    with pytest.raises(SAEError, match="out of range"):
        generate(session, PROMPT, max_new_tokens=2, intervention=Intervention(sae=str(sae_dir), features=f"{D_SAE}"))
    assert sae_for(session, sae_dir) is sae_for(session, sae_dir)   # one SAE (one edit op) per folder


def run(capsys, *argv):
    code = main([str(x) for x in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_generate_with_features(tmp_path, tokenizer, tiny_sessions, plain, sae_dir, capsys):
    model_dir = save_model_dir(tmp_path / "model", plain, tokenizer)
    a, _ = active_features(tiny_sessions["llama"], plain)
    code, out, err = run(capsys, "generate", "--model", model_dir, "--device", "cpu", "--prompt", PROMPT,
                         "--max-new-tokens", 6, "--sae", sae_dir, "--features", f"{a}=60", "--ab", "--json")
    assert code == 0, err
    data = json.loads(out)
    ids = tiny_sessions["llama"].encode(PROMPT)
    assert data["token_ids"] == plain_generate(plain, ids, 6, {a: 60.0})
    assert data["baseline"]["token_ids"] == plain_generate(plain, ids, 6, None)
    for argv, message in ((["--features", "1"], "needs --sae"), (["--sae", str(sae_dir)], "--features"),
                          (["--sae", str(sae_dir), "--features", "1=x"], "bad feature spec"),
                          (["--sae", str(tmp_path / "none"), "--features", "1"], "")):
        code, out, err = run(capsys, "generate", "--model", tmp_path / "no-model", "--prompt", PROMPT, *argv)
        assert code != 0 and message in err and "no-model" not in err


# ============================================================================ steering
def test_feature_steering_vector_is_the_normalised_decoder_row(tiny_sessions, sae_dir):
    sae = load_sae(sae_dir)
    vec = feature_vector(sae, 7, model="tiny-llama")
    row = sae_weights()["W_dec"][7].double().numpy()
    np.testing.assert_allclose(vec.vector, row / np.linalg.norm(row), rtol=1e-6, atol=1e-7)
    assert vec.method == "sae-feature" and vec.layer == LAYER and abs(vec.norm - 1) < 1e-6
    vec.check_for(tiny_sessions["llama"])
    assert vec.validate() is None
    with pytest.raises(SAEError, match="out of range"):
        feature_vector(sae, D_SAE)


def test_generate_view_runs_features_and_steers_by_a_feature(tiny_sessions, plain, sae_dir):
    from widgets.generate_view import GenerateView

    session = tiny_sessions["llama"]
    a, _ = active_features(session, plain)
    view = GenerateView(session, prompt=PROMPT, max_new_tokens=5, chat=False, lens=False)
    view.form.features = f"{a}=60"
    view.start(background=False)
    assert "SAE folder" in view.error
    view.form.sae_dir = str(sae_dir)
    view.start(background=False)
    assert view.error == "", view.error
    ids = session.encode(PROMPT)
    assert view.result.intervened.token_ids.tolist() == plain_generate(plain, ids, 5, {a: 60.0})
    assert view.result.baseline.token_ids.tolist() == plain_generate(plain, ids, 5, None)
    view.form.param.update(features="", steer_feature=7)
    view.form.param.trigger("use_feature")
    vec = view.form.vector
    row = sae_weights()["W_dec"][7].numpy()
    assert vec.method == "sae-feature" and view.form.steer and "feature 7" in view.form.feature_note
    np.testing.assert_allclose(vec.vector, row / np.linalg.norm(row), rtol=1e-6, atol=1e-7)
    iv = view.form.intervention()
    assert iv.layer == LAYER and iv.features == "" and iv.steer is not None
    view.form.steer_feature = D_SAE
    view.form.param.trigger("use_feature")
    assert "out of range" in view.form.feature_note


def test_cli_sae_vector_writes_the_normalised_decoder_row(tmp_path, sae_dir, capsys):
    from explorer.interventions.steering import load_vector

    out = tmp_path / "f7.safetensors"
    code, text, err = run(capsys, "sae", "vector", "--sae", sae_dir, "--feature", 7, "--out", out, "--json")
    assert code == 0, err
    assert json.loads(text)["layer"] == LAYER
    vec = load_vector(out)
    row = sae_weights()["W_dec"][7].numpy()
    np.testing.assert_allclose(vec.vector, row / np.linalg.norm(row), rtol=1e-6, atol=1e-7)
    assert vec.method == "sae-feature" and vec.layer == LAYER
    code, text, err = run(capsys, "sae", "vector", "--sae", sae_dir, "--feature", D_SAE, "--out", out)
    assert code != 0 and "out of range" in err and len(err.strip().splitlines()) == 1


# ============================================================================ ablation
def plain_last_logits(model, ids: torch.Tensor, values: dict[int, float] | None, zero_mlp0: bool = False):
    w = sae_weights()
    handles = []
    if values is not None:
        def hook(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h = edited(w, h, values)
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
        handles.append(model.model.layers[LAYER].register_forward_hook(hook))
    if zero_mlp0:
        handles.append(model.model.layers[0].mlp.register_forward_hook(lambda m, a, o: torch.zeros_like(o)))
    try:
        with torch.no_grad():
            return model(ids[None]).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()


def test_single_ablation_of_features_equals_a_plain_hook(tiny_sessions, plain, sae_dir):
    from explorer.interventions.ablation import ablate

    session = tiny_sessions["llama"]
    ids = session.encode(PROMPT)
    a, b = active_features(session, plain)
    base = plain_last_logits(plain, ids, None)
    for specs, values, mlp0 in ((f"sae:{a}", {a: 0.0}, False),
                                (f"mlp:0, sae:{a}, sae:{b}=5", {a: 0.0, b: 5.0}, True)):
        r = ablate(session, PROMPT, target=" Paris", components=specs, sae=str(sae_dir), lens=False)
        want = plain_last_logits(plain, ids, values, mlp0)
        assert abs(r.ablated.logit - float(want[r.target_id])) < 2e-4, specs
        assert abs(r.baseline.logit - float(base[r.target_id])) < 2e-4
        assert r.ablated.rank == int((want > want[r.target_id]).sum()) + 1
        assert abs(r.ablated.logit - r.baseline.logit) > 1e-3      # the edit matters
    assert r.components == ("mlp:0", f"sae:{a}", f"sae:{b}=5")
    with pytest.raises(ExplorerError, match="SAE folder"):
        ablate(session, PROMPT, target=" Paris", components=f"sae:{a}", lens=False)


def test_single_ablation_view_takes_feature_specs(tiny_sessions, plain, sae_dir):
    import asyncio

    from widgets.ablation_single import SingleAblation

    session = tiny_sessions["llama"]
    a, _ = active_features(session, plain)
    view = SingleAblation(session, prompt=PROMPT, target=" Paris", components=f"sae:{a}=7")
    asyncio.run(view.compute())
    assert "SAE folder" in view.error
    view.sae_dir = str(sae_dir)
    asyncio.run(view.compute())
    assert view.error == "", view.error
    want = plain_last_logits(plain, session.encode(PROMPT), {a: 7.0})
    assert abs(view.result.ablated.logit - float(want[view.result.target_id])) < 2e-4
    assert f"sae:{a}=7" in view.status
    view.select([f"sae:{a}", "0.1"])
    assert view.error == ""


def test_module_examples():
    import doctest

    import explorer.features.edits as mod

    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_steering_view_makes_a_vector_from_a_feature(tiny_sessions, sae_dir):
    from widgets.steering_view import SteeringView

    view = SteeringView(tiny_sessions["llama"])
    view.param.update(sae_dir=str(sae_dir), sae_feature=7)
    view.param.trigger("from_feature")
    assert view.error == "", view.error
    row = sae_weights()["W_dec"][7].numpy()
    np.testing.assert_allclose(view.vector.vector, row / np.linalg.norm(row), rtol=1e-6, atol=1e-7)
    assert view.vector.method == "sae-feature" and view.vector.layer == LAYER
    view.sae_feature = D_SAE
    view.param.trigger("from_feature")
    assert "out of range" in view.error


def test_mlp_out_sae_features_while_generating_and_result_round_trip(tiny_sessions, plain, tmp_path):
    """An SAE on block 1's MLP output edits that output (not the residual stream)."""
    from explorer.core.results import RESULT_TYPES

    save_topk_sae(tmp_path, sae_weights(), LAYER, K, hook="mlp_out")
    session = tiny_sessions["llama"]
    ids = session.encode(PROMPT)
    w = sae_weights()
    seen = []
    handle = plain.model.layers[LAYER].mlp.register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        plain(ids[None])
    handle.remove()
    a = int(ref_encode(w, seen[0][0, -1]).argmax())
    handle = plain.model.layers[LAYER].mlp.register_forward_hook(lambda m, a_, o: edited(w, o, {a: 40.0}))
    try:
        seq = ids.tolist()
        for _ in range(6):
            with torch.no_grad():
                seq.append(int(plain(torch.tensor([seq])).logits[0, -1].argmax()))
    finally:
        handle.remove()
    got = generate(session, PROMPT, max_new_tokens=6, intervention=Intervention(sae=str(tmp_path), features=f"{a}=40"))
    assert got.intervened.token_ids.tolist() == seq[ids.numel():]
    back = RESULT_TYPES["GenerateResult"].from_dict(got.to_dict())
    assert back.request == got.request and back.request.intervention.features == f"{a}=40"


def test_cli_ablate_with_features(tmp_path, tokenizer, tiny_sessions, plain, sae_dir, capsys):
    model_dir = save_model_dir(tmp_path / "model", plain, tokenizer)
    session = tiny_sessions["llama"]
    a, b = active_features(session, plain)
    code, out, err = run(capsys, "ablate", "--model", model_dir, "--device", "cpu", "--prompt", PROMPT,
                         "--target", " Paris", "--blocks", "mlp:0", "--sae", sae_dir, "--features", f"{a}, {b}=5",
                         "--json")
    assert code == 0, err
    data = json.loads(out)
    want = plain_last_logits(plain, session.encode(PROMPT), {a: 0.0, b: 5.0}, zero_mlp0=True)
    assert abs(data["ablated"]["logit"] - float(want[data["target_id"]])) < 2e-4
    assert data["components"] == ["mlp:0", f"sae:{a}", f"sae:{b}=5"]
    for argv, message in ((["--features", "1"], "--sae"), (["--sae", str(sae_dir), "--features", "x"], "bad feature"),
                          (["--sweep", "heads", "--sae", str(sae_dir), "--features", "1"], "not both")):
        code, out, err = run(capsys, "ablate", "--model", tmp_path / "no-model", "--prompt", PROMPT,
                             "--target", " Paris", *argv)
        assert code != 0 and message in err and "no-model" not in err, err
