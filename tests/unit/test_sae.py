"""Sparse autoencoders on tiny models, checked against plain-PyTorch references written here.

The references never go through ``explorer.features``: each architecture's encode/decode is
written out below from SAELens's definitions; site activations are read from the model's own
``output_hidden_states`` or a plain hook on an independent copy of the model.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli.main import main
from explorer.core.session import ModelSession
from explorer.features.encode import encode_prompt
from explorer.features.harvest import activations, lm_loss
from explorer.features.sae import SAEConfig, SAEError, SparseAutoencoder, parse_hook_name
from explorer.features.saelens_io import check_fits, load_sae, save_sae
from explorer.features.train import SAETrainResult, evaluate, train_sae
from helpers import corpus_head
from tiny_models import make_tiny_model

D = 64  # the tiny models' d_model


# ------------------------------------------------------------------------------ references
def ref_encode(w: dict, arch: str, x: torch.Tensor, k=None, apply_b_dec=True, norm="none") -> torch.Tensor:
    x = x.double()
    if norm == "constant_norm_rescale":
        x = x * (x.shape[-1] ** 0.5) / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    elif norm == "layer_norm":
        c = x - x.mean(-1, keepdim=True)
        x = c / (torch.sqrt((c ** 2).sum(-1, keepdim=True) / (x.shape[-1] - 1)) + 1e-5)
    if apply_b_dec:
        x = x - w["b_dec"].double()
    h = x @ w["W_enc"].double() + w["b_enc"].double()
    if arch == "standard":
        return h.clamp(min=0)
    if arch == "jumprelu":
        return torch.where(h > w["threshold"].double(), h.clamp(min=0), torch.zeros_like(h))
    out = torch.zeros_like(h)
    for i in range(h.shape[0]):      # brute force: the k largest by a full sort
        order = torch.argsort(h[i], descending=True)[:k]
        out[i, order] = h[i, order].clamp(min=0)
    return out


def ref_decode(w: dict, f: torch.Tensor, x: torch.Tensor, norm="none") -> torch.Tensor:
    y = f.double() @ w["W_dec"].double() + w["b_dec"].double()
    x = x.double()
    if norm == "constant_norm_rescale":
        y = y * torch.linalg.vector_norm(x, dim=-1, keepdim=True) / (x.shape[-1] ** 0.5)
    elif norm == "layer_norm":
        c = x - x.mean(-1, keepdim=True)
        y = y * torch.sqrt((c ** 2).sum(-1, keepdim=True) / (x.shape[-1] - 1)) + x.mean(-1, keepdim=True)
    return y


def random_weights(arch: str, d_in: int = 16, d_sae: int = 40, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.5, "b_enc": torch.randn(d_sae, generator=g) * 0.1,
         "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.3, "b_dec": torch.randn(d_in, generator=g)}
    if arch == "jumprelu":
        w["threshold"] = torch.rand(d_sae, generator=g)
    return w


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
@pytest.mark.parametrize("norm", ["none", "constant_norm_rescale", "layer_norm", "expected_average_only_in"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_encode_decode_equal_the_plain_definition(arch, norm, apply_b_dec):
    w = random_weights(arch)
    cfg = SAEConfig(d_in=16, d_sae=40, architecture=arch, k=5 if arch == "topk" else None,
                    apply_b_dec_to_input=apply_b_dec, normalize_activations=norm)
    sae = SparseAutoencoder(cfg, w)
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(1)) * 3
    f = sae.encode(x)
    ref_norm = norm if norm != "expected_average_only_in" else "none"
    f_ref = ref_encode(w, arch, x, k=5, apply_b_dec=apply_b_dec, norm=ref_norm)
    torch.testing.assert_close(f.double(), f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(f, x).double(), ref_decode(w, f_ref, x, norm=ref_norm), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sae(x), sae.decode(f, x))
    if arch == "topk":
        assert int((f > 0).sum(-1).max()) <= 5


def test_config_checks_name_the_problem():
    with pytest.raises(SAEError, match="gated"):
        SAEConfig(d_in=4, d_sae=8, architecture="gated").check()
    with pytest.raises(SAEError, match="k"):
        SAEConfig(d_in=4, d_sae=8, architecture="topk", k=9).check()
    with pytest.raises(SAEError, match="W_dec has shape"):
        SparseAutoencoder(SAEConfig(d_in=4, d_sae=8, architecture="standard"),
                          {**random_weights("standard", 4, 8), "W_dec": torch.zeros(8, 5)})
    assert parse_hook_name("blocks.5.hook_mlp_out") == (5, "mlp_out")
    with pytest.raises(SAEError, match="hook_z"):
        parse_hook_name("blocks.5.attn.hook_z")


# ------------------------------------------------------------------------------ SAELens files
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_saelens_layout_round_trip(tmp_path, arch):
    w = random_weights(arch)
    meta = {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post"}
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=40, architecture=arch, k=5 if arch == "topk" else None,
                                      apply_b_dec_to_input=False, metadata=meta), w)
    save_sae(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["d_in"] == 16 and cfg["d_sae"] == 40
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["metadata"]["hook_layer"] == 1
    from safetensors.numpy import load_file

    stored = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert stored["W_enc"].shape == (16, 40) and stored["W_dec"].shape == (40, 16)
    assert set(stored) == set(w)
    back = load_sae(tmp_path)
    assert back.cfg.architecture == arch and back.cfg.apply_b_dec_to_input is False and back.cfg.site == (1, "resid")
    x = torch.randn(5, 16)
    torch.testing.assert_close(back(x), sae(x))


def test_topk_rescaled_by_decoder_norm_encodes_as_saelens_defines_it(tmp_path):
    """SAELens's ``rescale_acts_by_decoder_norm``: the top k of pre · ‖W_dec[j]‖, ReLU'd; decoded as
    (f / ‖W_dec‖) W_dec + b_dec (tests/saelens checks the same against SAELens itself)."""
    from safetensors.torch import save_file

    w = random_weights("topk")
    w["W_dec"] = w["W_dec"] * torch.linspace(0.2, 3.0, 40)[:, None]     # rows of very different norms
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": 16, "d_sae": 40, "k": 5, "apply_b_dec_to_input": True,
        "rescale_acts_by_decoder_norm": True, "metadata": {"hook_name": "blocks.1.hook_resid_post"}}))
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(1)).double() * 3
    wd = {k: v.double() for k, v in w.items()}
    n = wd["W_dec"].norm(dim=-1)
    pre = ((x - wd["b_dec"]) @ wd["W_enc"] + wd["b_enc"]) * n
    top = pre.topk(5, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp(min=0))
    recon = (f / n) @ wd["W_dec"] + wd["b_dec"]
    sae = load_sae(tmp_path)
    got = sae.encode(x.float())
    torch.testing.assert_close(got.double(), f, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sae.decode(got, x.float()).double(), recon, atol=1e-4, rtol=1e-5)
    plain = ref_encode(wd, "topk", x, k=5)           # without the rescale another set of features wins
    assert not torch.equal((plain != 0), (f != 0))


def test_reads_pre_6_flat_configs(tmp_path):
    """SAELens < 6 wrote flat configs, with TopK as a standard SAE's activation function."""
    w = random_weights("topk")
    from safetensors.numpy import save_file

    save_file({k: v.numpy() for k, v in w.items()}, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": 16, "d_sae": 40, "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3}, "hook_point": "blocks.2.hook_resid_pre", "model_name": "gpt2-small",
        "normalize_activations": False, "sae_lens_version": "3.0.0"}))
    sae = load_sae(tmp_path)
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.site) == ("topk", 3, (1, "resid"))
    assert sae.cfg.apply_b_dec_to_input and sae.cfg.normalize_activations == "none"
    x = torch.randn(4, 16)
    torch.testing.assert_close(sae.encode(x).double(), ref_encode(w, "topk", x, k=3), atol=1e-5, rtol=1e-5)


def test_loading_errors_are_clear(tmp_path, tiny_sessions):
    with pytest.raises(SAEError, match="not found"):
        load_sae(tmp_path / "missing")
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 16, "d_sae": 40, "k": 2}))
    with pytest.raises(SAEError, match="no sae_weights.safetensors"):
        load_sae(tmp_path)
    session = tiny_sessions["llama"]
    wide = SparseAutoencoder(SAEConfig(d_in=16, d_sae=40, architecture="standard",
                                       metadata={"hook_name": "blocks.1.hook_resid_post"}), random_weights("standard"))
    with pytest.raises(SAEError, match="width 16 but tiny-llama has d_model 64"):
        check_fits(wide, session)
    other = SparseAutoencoder.init(SAEConfig(d_in=D, d_sae=8, architecture="standard",
                                             metadata={"hook_name": "blocks.1.hook_resid_post",
                                                       "model_name": "gemma-2-2b"}))
    with pytest.raises(SAEError, match="trained on gemma-2-2b but the attached model is tiny-llama"):
        check_fits(other, session)
    assert check_fits(other, session, any_model=True) == (1, "resid")
    deep = SparseAutoencoder.init(SAEConfig(d_in=D, d_sae=8, architecture="standard",
                                            metadata={"hook_name": "blocks.7.hook_resid_post"}))
    with pytest.raises(SAEError, match="layer 7"):
        check_fits(deep, session)


# ------------------------------------------------------------------------------ harvesting
def test_activations_match_the_model_and_stop_at_the_site(tiny_session, tokenizer):
    family = tiny_session.name.removeprefix("tiny-")
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    plain = make_tiny_model(family, len(tokenizer))          # an independent copy, same seed
    with torch.no_grad():
        hidden = plain(ids, output_hidden_states=True).hidden_states
    blocks = tiny_session.hf_blocks()
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    try:
        got = activations(tiny_session, ids, 1, "resid")
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]  # blocks after the site never ran
    torch.testing.assert_close(got, hidden[2])
    plain_blocks = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}.get(family, "model.layers")
    seen = []
    mlp = plain.get_submodule(f"{plain_blocks}.2.mlp")   # written out here, not from the adapter
    handle = mlp.register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        plain(ids)
    handle.remove()
    torch.testing.assert_close(activations(tiny_session, ids, 2, "mlp_out"), seen[0])


@pytest.mark.parametrize("site", ["resid", "mlp_out"])
def test_identity_sae_spliced_in_leaves_the_loss_unchanged(tiny_sessions, site):
    """Width = d_in, W_enc = W_dec = I, b_dec = −c (c above every |activation|): ReLU(x + c) − c = x."""
    session = tiny_sessions["llama"]
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(2))
    c = float(activations(session, ids, 1, site).abs().max()) + 1.0
    eye = torch.eye(D)
    sae = SparseAutoencoder(SAEConfig(d_in=D, d_sae=D, architecture="standard"),
                            {"W_enc": eye, "b_enc": torch.zeros(D), "W_dec": eye, "b_dec": torch.full((D,), -c)})
    fvu, l0, spliced_loss = evaluate(session, sae, ids, 1, site, skip_first=0)
    assert fvu < 1e-10 and l0 == D
    assert abs(spliced_loss - lm_loss(session, ids)) < 1e-5
    # and a broken SAE does change the loss (the splice is really in the forward pass)
    zero = SparseAutoencoder(SAEConfig(d_in=D, d_sae=D, architecture="standard"),
                             {"W_enc": eye, "b_enc": torch.zeros(D), "W_dec": eye * 0, "b_dec": torch.zeros(D)})
    assert abs(evaluate(session, zero, ids, 1, site, skip_first=0)[2] - lm_loss(session, ids)) > 1e-3


# ------------------------------------------------------------------------------ training
TRAIN = dict(layer=1, site="resid", width=96, k=16, max_tokens=12 * 64 * 4, window=64, batch=128, batch_windows=4,
             eval_windows=2, eval_every=3, dead_window=512, warmup_steps=4, lr=3e-3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(corpus_head(tmp_path_factory.mktemp("corpus"), 30))


@pytest.fixture(scope="module")
def trained(tiny_sessions, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sae")
    return train_sae(tiny_sessions["llama"], corpus_path=corpus, out_dir=out, checkpoint_every=1, **TRAIN)


def test_a_tiny_sae_trains_end_to_end_and_its_fvu_falls(trained):
    r = trained
    assert r.status == "done" and r.tokens == TRAIN["max_tokens"]
    assert r.log_fvu[-3:].mean() < 0.8 * r.log_fvu[:3].mean()
    assert np.all(np.diff(r.eval_fvu) < 0)  # held-out FVU falls at every evaluation
    assert np.allclose(r.log_l0, TRAIN["k"]) and r.l0 == TRAIN["k"]
    assert 0 <= r.dead_fraction <= 1 and r.delta_loss is not None and np.isfinite(r.delta_loss)
    assert r.eval_tokens.tolist() == [768, 1536, 2304, 3072]  # every 3rd of 12 passes (the last is one)
    assert r.validate() is None
    assert SAETrainResult.from_dict(json.loads(json.dumps(r.to_dict()))).to_dict() == r.to_dict()
    sae = load_sae(r.out_dir)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == TRAIN["k"] and sae.cfg.site == (1, "resid")
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(TRAIN["width"]))


def test_a_finished_run_is_reopened_not_retrained(trained, tiny_sessions, corpus):
    again = train_sae(tiny_sessions["llama"], corpus_path=corpus, out_dir=trained.out_dir, **TRAIN)
    assert again.to_dict() == trained.to_dict()
    with pytest.raises(SAEError, match="another model, corpus or settings"):
        train_sae(tiny_sessions["llama"], corpus_path=corpus, out_dir=trained.out_dir, **{**TRAIN, "k": 5})


class CancelAfter:
    """A job context that asks to stop after ``n`` progress reports."""

    def __init__(self, n: int) -> None:
        self.n, self.reports = n, 0

    @property
    def cancelled(self) -> bool:
        return self.reports >= self.n

    def report(self, *args, **kwargs) -> None:
        self.reports += 1


def test_cancel_and_resume_equal_one_uninterrupted_run(trained, tiny_sessions, corpus, tmp_path):
    session = tiny_sessions["llama"]
    first = train_sae(session, corpus_path=corpus, out_dir=tmp_path, ctx=CancelAfter(5), **TRAIN)
    assert first.status == "cancelled" and 0 < first.tokens < TRAIN["max_tokens"]
    assert load_sae(tmp_path).cfg.k == TRAIN["k"]           # the SAE so far is saved and usable
    second = train_sae(session, corpus_path=corpus, out_dir=tmp_path, ctx=CancelAfter(3), **TRAIN)
    assert second.status == "cancelled" and second.tokens > first.tokens
    final = train_sae(session, corpus_path=corpus, out_dir=tmp_path, **TRAIN)
    assert final.status == "done"
    a, b = load_sae(trained.out_dir), load_sae(tmp_path)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    skip = {"out_dir", "elapsed_s"}
    da, db = trained.to_dict(), final.to_dict()
    assert {k: v for k, v in da.items() if k not in skip} == {k: v for k, v in db.items() if k not in skip}
    assert not (tmp_path / ".work").exists()


def test_encode_prompt_lists_the_top_features(trained, tiny_sessions):
    session = tiny_sessions["llama"]
    result = encode_prompt(session, "The nurse said that she", sae=trained.out_dir, top_k=3)
    assert result.tokens.tolist() == ["The", " nurse", " said", " that", " she"]
    sae = load_sae(trained.out_dir)
    x = activations(session, session.encode(result.prompt)[None], 1, "resid")[0].float()
    f = sae.encode(x)
    for t in range(len(result.tokens)):
        order = torch.argsort(f[t], descending=True)[:3]
        assert result.features[t].tolist() == order.tolist()
        np.testing.assert_allclose(result.activations[t], f[t, order].numpy(), rtol=1e-6)
    assert result.l0.tolist() == [TRAIN["k"]] * 5
    assert result.validate() is None


def test_cli_train_and_encode(tmp_path, tokenizer, corpus, capsys):
    model_dir = tmp_path / "model"
    make_tiny_model("llama", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "sae"
    args = ["sae", "train", "--model", str(model_dir), "--layer", "1", "--width", "32", "--k", "4",
            "--max-tokens", "1024", "--window", "32", "--batch", "128", "--batch-windows", "8",
            "--corpus", corpus, "--out", str(out), "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {"fvu", "l0", "dead_fraction", "delta_loss", "tokens"} <= set(summary) and summary["tokens"] == 1024
    assert (out / "cfg.json").exists() and (out / "sae_weights.safetensors").exists()
    assert main(["sae", "encode", "--model", str(model_dir), "--sae", str(out), "--prompt", "The nurse",
                 "--top-k", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tokens"] == ["The", " nurse"] and len(data["features"]) == 2
    assert all(set(f) == {"feature", "activation"} for pos in data["features"] for f in pos)
    assert main(["sae", "attribute", "--model", str(model_dir), "--sae", str(out), "--prompt", "The nurse",
                 "--target", " said", "--top-n", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["target"] == " said" and len(data["features"]) == 3
    assert all(len(f["per_position"]) == 2 for f in data["features"])
    assert main(["sae", "feature", "--model", str(model_dir), "--sae", str(out), "--feature", "3", "--top-k", "2",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["feature"] == 3 and len(data["top_tokens"]) == 2 and len(data["bottom_values"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["sae", "train", "--layer", "1", "--site", "attn", "--out", "x"], "invalid choice"),
    (["sae", "train", "--layer", "1", "--width", "8", "--k", "9", "--out", "x"], "--k 9 is more than --width 8"),
    (["sae", "train", "--layer", "30", "--out", "x"], "--layer 30 does not exist"),
    (["sae", "train", "--layer", "1", "--corpus", "/no/such/file", "--out", "x"], "corpus not found"),
    (["sae", "encode", "--sae", "/no/such/dir", "--prompt", "hi"], "SAE not found"),
    (["sae", "encode", "--sae", "x", "--prompt", " "], "empty"),
])
def test_cli_rejects_bad_arguments_before_loading_a_model(argv, message, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ModelSession, "load", refuse)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_auxk_trains_dead_latents_only_when_they_are_dead():
    """Without dead latents only the k selected encoder columns get a gradient; with dead ones,
    the AuxK loss also moves the dead latents' columns (those never among the top k)."""
    from explorer.features.train import TrainConfig, TrainState, train_step

    cfg = TrainConfig(width=48, k=2, dead_window=100, warmup_steps=1, lr=1e-2)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    moved = {}
    for dead in (False, True):
        state = TrainState(cfg, 8, torch.device("cpu"), {})
        state.tokens = 1000
        state.fired_at[:] = 1000
        if dead:
            state.fired_at[24:] = 0            # latents 24.. last fired 1000 tokens ago
        before = state.sae.W_enc.detach().clone()
        _, l0, fired = train_step(state, x)
        assert l0 == 2
        changed = (state.sae.W_enc.detach() != before).any(0)
        moved[dead] = changed & ~fired         # columns of latents not selected by the top-k
    assert not moved[False].any()
    assert moved[True][24:].any() and not moved[True][:24].any()


@pytest.mark.parametrize("name", ["explorer.features.sae", "explorer.features.saelens_io"])
def test_module_examples(name, tmp_path, monkeypatch):
    import doctest
    import importlib

    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_feature_attribution_equals_a_plain_activation_times_gradient(trained, tiny_sessions, tokenizer):
    from explorer.features.attribution import feature_attribution

    session = tiny_sessions["llama"]
    prompt = "The nurse said that she"
    att = feature_attribution(session, prompt, sae=trained.out_dir, target=" he", top_n=6)
    sae = load_sae(trained.out_dir)
    w = {k: v.detach() for k, v in sae.weights().items()}
    plain = make_tiny_model("llama", len(tokenizer))
    ids = session.encode(prompt)[None]
    held = {}

    def hook(_m, _a, out):
        x = out[0].double()
        f = ref_encode(w, "topk", x, k=TRAIN["k"]).requires_grad_(True)
        recon = f @ w["W_dec"].double() + w["b_dec"].double()
        held["f"] = f
        return (recon + (x - recon).detach()).float()[None]

    handle = plain.model.layers[1].register_forward_hook(hook)
    logit = plain(ids).logits[0, -1, tokenizer(" he", add_special_tokens=False).input_ids[0]]
    handle.remove()
    (grad,) = torch.autograd.grad(logit, [held["f"]])
    ref = (held["f"] * grad).detach()
    totals = ref.sum(0)
    assert att.target == " he" and abs(att.logit - float(logit.detach())) < 1e-4
    order = torch.argsort(totals.abs(), descending=True)[:6]
    assert att.features.tolist() == order.tolist()
    np.testing.assert_allclose(att.totals, totals[order].numpy(), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(att.per_position, ref[:, order].numpy(), rtol=1e-3, atol=1e-6)
    assert att.validate() is None


def test_feature_edits_ablate_clamp_and_steer_as_plain_hooks_do(trained, tiny_sessions, tokenizer):
    from explorer.features.edits import feature_edit, steer_edit
    from explorer.interventions.edits import nnsight_runs

    session = tiny_sessions["llama"]
    sae = load_sae(trained.out_dir)
    ids = session.encode("The nurse said that she")
    x = activations(session, ids[None], 1, "resid")[0].float()
    f = sae.encode(x)
    top = int(f[3].argmax())
    w = {k: v.detach() for k, v in sae.weights().items()}
    plain = make_tiny_model("llama", len(tokenizer))

    def plain_logits(change):
        def hook(_m, _a, out):
            y = out.clone()
            y[0] = change(out[0])
            return y
        handle = plain.model.layers[1].register_forward_hook(hook)
        with torch.no_grad():
            logits = plain(ids[None]).logits[0, -1]
        handle.remove()
        return logits

    def ablate_at_3(row):
        h = ref_encode(w, "topk", row.double(), k=TRAIN["k"]).float()
        row = row.clone()
        row[3] = row[3] - h[3, top] * w["W_dec"][top]
        return row

    clean, ablated, clamped, same, steered = nnsight_runs(session, ids, [
        [], [feature_edit(sae, [top], 0.0, positions=[3])], [feature_edit(sae, [top], 5.0)],
        [feature_edit(sae, [top], float(f[3, top]), positions=[3])], [steer_edit(sae, top, 4.0)]])
    torch.testing.assert_close(ablated["logits"], plain_logits(ablate_at_3), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(same["logits"], clean["logits"], atol=2e-4, rtol=1e-4)   # its own value: no change

    def clamp_all(row):
        h = ref_encode(w, "topk", row.double(), k=TRAIN["k"]).float()
        return row + (5.0 - h[:, top])[:, None] * w["W_dec"][top]

    torch.testing.assert_close(clamped["logits"], plain_logits(clamp_all), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(steered["logits"], plain_logits(lambda row: row + 4.0 * w["W_dec"][top]),
                               atol=2e-4, rtol=1e-4)
    assert not torch.allclose(ablated["logits"], clean["logits"])
    with pytest.raises(SAEError, match="out of range"):
        feature_edit(sae, [TRAIN["width"]])


def test_feature_card_ranks_output_tokens_by_the_decoder_direction(trained, tiny_sessions, tokenizer):
    from explorer.features.card import feature_card

    session = tiny_sessions["llama"]
    card = feature_card(session, trained.out_dir, 5, top_k=4)
    sae = load_sae(trained.out_dir)
    plain = make_tiny_model("llama", len(tokenizer))
    d = sae.W_dec[5].double() * plain.model.norm.weight.detach().double()
    logits = plain.lm_head.weight.detach().double() @ d
    logits = logits - logits.mean()
    order = torch.argsort(logits, descending=True)
    assert card.top_tokens.tolist() == [tokenizer.decode([int(i)]) for i in order[:4]]
    np.testing.assert_allclose(card.top_values, logits[order[:4]].numpy(), rtol=1e-4)
    assert card.bottom_tokens.tolist() == [tokenizer.decode([int(i)]) for i in order.flip(0)[:4]]
    assert card.validate() is None and card.layer == 1
    with pytest.raises(SAEError, match="out of range"):
        feature_card(session, trained.out_dir, TRAIN["width"])
