"""BatchTopK SAEs and transcoders on tiny models, checked against plain-PyTorch references written here.

BatchTopK's selection is checked against hand computations and a dense re-computation; the saved
SAE (a JumpReLU with the threshold estimated in training) against a plain JumpReLU written out
from the safetensors file; a transcoder's (input, target) pairs against plain hooks on an
independent copy of the model; a transcoder that *is* the MLP (a ReLU GPT-2 MLP) spliced in
gives the model's own loss.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli.main import main
from explorer.core.session import ModelSession
from explorer.features.encode import encode_prompt
from explorer.features.harvest import activations, lm_loss, mlp_pairs
from explorer.features.sae import SAEConfig, SAEError, SparseAutoencoder
from explorer.features.saelens_io import check_fits, load_sae, save_sae
from explorer.features.train import (
    TrainConfig,
    TrainState,
    batch_topk,
    calibrate_threshold,
    evaluate,
    train_sae,
    train_step,
)
from helpers import corpus_head
from tiny_models import make_tiny_model

D = 64  # the tiny models' d_model
TRAIN = dict(layer=1, width=96, k=8, max_tokens=8 * 64 * 4, window=64, batch=128, batch_windows=4,
             eval_windows=2, eval_every=3, dead_window=512, warmup_steps=4, lr=3e-3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(corpus_head(tmp_path_factory.mktemp("corpus"), 30))


# ------------------------------------------------------------------------------ BatchTopK
def test_batch_topk_keeps_the_k_times_batch_largest_across_the_batch():
    # k = 1, 2 vectors: the 2 largest of all 6 entries, wherever they are
    rows, latents, values = batch_topk(torch.tensor([[5.0, 4.0, 0.1], [0.2, 0.3, 0.1]]), 1)
    assert (rows.tolist(), latents.tolist(), values.tolist()) == ([0, 0], [0, 1], [5.0, 4.0])
    # k = 2, 3 vectors: 6 of 12, ordered by row then latent; negatives kept pass the ReLU as 0
    pre = torch.tensor([[1.0, -2.0, 3.0, -4.0], [-5.0, 6.0, -7.0, 8.0], [-1.5, -0.5, -3.0, 2.0]])
    rows, latents, values = batch_topk(pre, 2)
    assert list(zip(rows.tolist(), latents.tolist())) == [(0, 0), (0, 2), (1, 1), (1, 3), (2, 1), (2, 3)]
    assert values.tolist() == [1.0, 3.0, 6.0, 8.0, 0.0, 2.0]


def test_a_batch_topk_step_equals_a_dense_computation_and_calibrates_the_threshold():
    cfg = TrainConfig(width=24, k=3, architecture="batchtopk", warmup_steps=1, lr=1e-2, batch=4)
    state = TrainState(cfg, 8, torch.device("cpu"), {})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        state.sae.b_enc.copy_(torch.randn(24, generator=g) * 0.1)
    for _ in range(3):
        x = torch.randn(10, 8, generator=g) * 2
        w = {n: getattr(state.sae, n).detach().clone().double() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        h = (x.double() - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        keep = torch.zeros_like(h, dtype=torch.bool).view(-1)
        keep[torch.argsort(h.view(-1), descending=True)[:3 * 10]] = True   # brute force: a full sort
        f = torch.where(keep.view_as(h), h.clamp(min=0), torch.zeros_like(h))
        fvu_ref = ((f @ w["W_dec"] + w["b_dec"] - x.double()) ** 2).sum() / ((x.double() - x.double().mean(0)) ** 2).sum()
        fvu, l0, fired = train_step(state, x)
        assert abs(fvu - float(fvu_ref)) < 1e-5
        assert l0 == float((f > 0).sum()) / 10
        assert fired.tolist() == (f > 0).any(0).tolist()
    # θ with the weights as they now are: the 31st largest of the 10 x 24 pre-activations (read 4 rows at a time)
    with torch.no_grad():
        h = (x.double() - state.sae.b_dec.double()) @ state.sae.W_enc.double() + state.sae.b_enc.double()
    theta = calibrate_threshold(state, x)
    assert theta == pytest.approx(max(float(h.view(-1).sort(descending=True).values[30]), 0.0), rel=1e-5)
    assert int((h > theta).sum()) == 30
    with torch.no_grad():
        state.sae.b_enc.fill_(-1e4)
    assert calibrate_threshold(state, x) == 0.0     # fewer than k·N+1 positive: 0 (keep every positive)


@pytest.fixture(scope="module")
def batch_trained(tiny_sessions, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("btk")
    return train_sae(tiny_sessions["llama"], corpus_path=corpus, out_dir=out, architecture="batchtopk",
                     checkpoint_every=1, **TRAIN)


def test_batch_topk_saves_a_jumprelu_that_encodes_as_a_plain_one(batch_trained, tiny_sessions):
    r = batch_trained
    assert r.status == "done" and r.settings["architecture"] == "batchtopk"
    assert np.all(r.log_l0 <= TRAIN["k"] + 1e-9) and np.all(np.isfinite(r.log_fvu)) and 0 < r.fvu < 1
    cfg = json.loads((__import__("pathlib").Path(r.out_dir) / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and "k" not in cfg
    assert cfg["normalize_activations"] == "constant_norm_rescale"   # each vector scaled to norm √d_in
    assert cfg["metadata"]["explorer"]["architecture"] == "batchtopk" and cfg["metadata"]["explorer"]["k"] == 8
    from safetensors.numpy import load_file

    w = {k: torch.from_numpy(v).double() for k, v in load_file(f"{r.out_dir}/sae_weights.safetensors").items()}
    theta = w["threshold"]
    assert float(theta.min()) == float(theta.max()) > 0       # one threshold for every latent
    session = tiny_sessions["llama"]
    ids = session.encode("The nurse said that she would come back tomorrow")[None]
    x = activations(session, ids, 1, "resid")[0].double()
    scaled = x * D ** 0.5 / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    h = (scaled - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    plain = torch.where(h > theta, h.clamp(min=0), torch.zeros_like(h))
    sae = load_sae(r.out_dir)
    torch.testing.assert_close(sae.encode(x.float()).double(), plain, atol=1e-5, rtol=1e-5)
    recon = (plain @ w["W_dec"] + w["b_dec"]) * torch.linalg.vector_norm(x, dim=-1, keepdim=True) / D ** 0.5
    torch.testing.assert_close(sae(x.float()).double(), recon, atol=1e-4, rtol=1e-4)
    feats = encode_prompt(session, "The nurse said that she would come back tomorrow", sae=r.out_dir, top_k=3)
    assert feats.architecture == "jumprelu" and feats.l0.tolist() == (plain > 0).sum(-1).tolist()
    assert r.l0 == pytest.approx(r.eval_l0[-1]) and 0 < r.l0   # held-out L0: what the threshold gives


@pytest.mark.parametrize("site", ["resid", "transcoder"])
def test_batch_topk_threshold_gives_mean_l0_k_on_the_last_pass(tiny_sessions, corpus, tmp_path, site):
    """The saved θ, applied by a plain JumpReLU written here to the last forward pass's vectors
    (the calibration set: training windows 28..31 after the 2 held out), keeps k latents per vector."""
    from safetensors.numpy import load_file

    from explorer.core.corpus import iter_documents, token_windows

    session = tiny_sessions["llama"]
    r = train_sae(session, corpus_path=corpus, out_dir=tmp_path, architecture="batchtopk", site=site, **TRAIN)
    assert r.status == "done" and r.settings["threshold"] == "pass-calibrated"
    n_windows = TRAIN["eval_windows"] + TRAIN["max_tokens"] // TRAIN["window"]
    windows = list(token_windows(iter_documents(corpus), session.tokenizer, TRAIN["window"],
                                 n_windows * TRAIN["window"]))
    ids = torch.tensor(np.stack([w.ids for w in windows[-TRAIN["batch_windows"]:]]))
    with torch.no_grad():
        layer = session.hf.model.layers[TRAIN["layer"]]
        hooked = layer.mlp if site == "transcoder" else layer
        seen = []
        handle = hooked.register_forward_hook(lambda m, a, o: seen.append(a[0] if site == "transcoder" else o))
        session.hf(ids)
        handle.remove()
    x = (seen[0][0] if isinstance(seen[0], tuple) else seen[0])[:, 1:].reshape(-1, D).double()
    w = {k: torch.from_numpy(v).double() for k, v in load_file(f"{tmp_path}/sae_weights.safetensors").items()}
    if site == "transcoder":
        h = x @ w["W_enc"] + w["b_enc"]
    else:
        h = (x * D ** 0.5 / torch.linalg.vector_norm(x, dim=-1, keepdim=True) - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    theta = w["threshold"]
    l0 = float((torch.where(h > theta, h.clamp(min=0), torch.zeros_like(h)) > 0).sum(-1).double().mean())
    assert abs(l0 - TRAIN["k"]) <= 2 / len(x), l0          # exact but for float rounding at θ
    assert abs(r.l0 - TRAIN["k"]) < 0.5 * TRAIN["k"], r.l0   # held out: near k


# ------------------------------------------------------------------------------ transcoders
def test_transcoder_pairs_equal_plain_hooks_on_the_mlp(tiny_session, tokenizer):
    family = tiny_session.name.removeprefix("tiny-")
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    plain = make_tiny_model(family, len(tokenizer))          # an independent copy, same seed
    blocks = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}.get(family, "model.layers")
    seen = []
    handle = plain.get_submodule(f"{blocks}.1.mlp").register_forward_hook(lambda m, a, o: seen.append((a[0], o)))
    with torch.no_grad():
        plain(ids)
    handle.remove()
    inp, out = mlp_pairs(tiny_session, ids, 1)
    torch.testing.assert_close(inp, seen[0][0])
    torch.testing.assert_close(out, seen[0][1])
    torch.testing.assert_close(activations(tiny_session, ids, 1, "mlp_in"), seen[0][0])
    if family == "llama":   # the MLP's input is the post-attention norm's output
        normed = []
        h = plain.model.layers[1].post_attention_layernorm.register_forward_hook(lambda m, a, o: normed.append(o))
        with torch.no_grad():
            plain(ids)
        h.remove()
        torch.testing.assert_close(inp, normed[0])


def relu_gpt2_session(tokenizer) -> ModelSession:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GPT2Config(n_embd=D, n_layer=3, n_head=4, n_positions=256, activation_function="relu",
                           vocab_size=len(tokenizer), tie_word_embeddings=False)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return ModelSession(model, tokenizer, name="tiny-gpt2-relu")


def test_a_transcoder_that_is_the_mlp_spliced_in_leaves_the_loss_unchanged(tokenizer):
    """GPT-2's MLP with a ReLU is c_proj(ReLU(c_fc(x))): a ReLU transcoder with W_enc = c_fc, W_dec = c_proj."""
    session = relu_gpt2_session(tokenizer)
    mlp = session.hf.transformer.h[1].mlp
    weights = {"W_enc": mlp.c_fc.weight.detach(), "b_enc": mlp.c_fc.bias.detach(),
               "W_dec": mlp.c_proj.weight.detach(), "b_dec": mlp.c_proj.bias.detach()}
    meta = {"hook_name": "blocks.1.ln2.hook_normalized", "hook_name_out": "blocks.1.hook_mlp_out"}
    exact = SparseAutoencoder(SAEConfig(d_in=D, d_sae=4 * D, architecture="standard", apply_b_dec_to_input=False,
                                        d_out=D, metadata=meta), weights)
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(2))
    fvu, l0, spliced_loss = evaluate(session, exact, ids, 1, "transcoder", skip_first=0)
    assert fvu < 1e-10 and l0 > 0
    assert abs(spliced_loss - lm_loss(session, ids)) < 1e-5
    assert check_fits(exact, session) == (1, "mlp_in")
    broken = SparseAutoencoder(exact.cfg, {**weights, "W_dec": weights["W_dec"] * 0})
    assert abs(evaluate(session, broken, ids, 1, "transcoder", skip_first=0)[2] - lm_loss(session, ids)) > 1e-3


@pytest.mark.parametrize("arch, saved", [("standard", "transcoder"), ("jumprelu", "jumprelu_transcoder"),
                                         ("topk", "topk_transcoder")])
def test_transcoders_round_trip_the_saelens_layout(tmp_path, arch, saved):
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(16, 40, generator=g), "b_enc": torch.randn(40, generator=g) * 0.1,
         "W_dec": torch.randn(40, 12, generator=g), "b_dec": torch.randn(12, generator=g)}
    if arch == "jumprelu":
        w["threshold"] = torch.rand(40, generator=g)
    meta = {"hook_name": "blocks.2.ln2.hook_normalized", "hook_name_out": "blocks.2.hook_mlp_out"}
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=40, architecture=arch, k=5 if arch == "topk" else None,
                                      apply_b_dec_to_input=False, d_out=12, metadata=meta), w)
    save_sae(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_out"], cfg["apply_b_dec_to_input"]) == (saved, 16, 12, False)
    assert cfg["metadata"]["hook_name_out"] == "blocks.2.hook_mlp_out"
    back = load_sae(tmp_path)
    assert back.cfg.d_out == 12 and back.cfg.site == (2, "mlp_in") and back.cfg.site_out == (2, "mlp_out")
    x = torch.randn(5, 16, generator=g).double()
    h = x @ w["W_enc"].double() + w["b_enc"].double()         # no b_dec subtraction: it is on the output side
    if arch == "standard":
        f = h.clamp(min=0)
    elif arch == "jumprelu":
        f = torch.where(h > w["threshold"].double(), h.clamp(min=0), torch.zeros_like(h))
    else:
        f = torch.zeros_like(h).scatter(-1, h.topk(5, dim=-1).indices, h.topk(5, dim=-1).values.clamp(min=0))
    torch.testing.assert_close(back(x.float()).double(), f @ w["W_dec"].double() + w["b_dec"].double(),
                               atol=1e-4, rtol=1e-5)
    with pytest.raises(SAEError, match="b_dec"):
        SAEConfig(d_in=16, d_sae=40, architecture="standard", d_out=12, apply_b_dec_to_input=True).check()


# ------------------------------------------------------------------------------ resume
class CancelAfter:
    """A job context that asks to stop after ``n`` progress reports."""

    def __init__(self, n: int) -> None:
        self.n, self.reports = n, 0

    @property
    def cancelled(self) -> bool:
        return self.reports >= self.n

    def report(self, *args, **kwargs) -> None:
        self.reports += 1


@pytest.mark.parametrize("architecture, site", [("batchtopk", "resid"), ("topk", "transcoder"),
                                                ("batchtopk", "transcoder")])
def test_cancel_and_resume_equal_one_run_for_the_new_options(tiny_sessions, corpus, tmp_path, architecture, site):
    session = tiny_sessions["llama"]
    settings = dict(TRAIN, architecture=architecture, site=site, corpus_path=corpus)
    whole = train_sae(session, out_dir=tmp_path / "whole", **settings)
    first = train_sae(session, out_dir=tmp_path / "parts", ctx=CancelAfter(3), **settings)
    assert first.status == "cancelled" and 0 < first.tokens < TRAIN["max_tokens"]
    final = train_sae(session, out_dir=tmp_path / "parts", **settings)
    assert final.status == "done" and whole.status == "done"
    a, b = load_sae(tmp_path / "whole"), load_sae(tmp_path / "parts")
    assert a.weights().keys() == b.weights().keys()
    for name, value in a.weights().items():
        assert torch.equal(value, b.weights()[name]), name
    skip = {"out_dir", "elapsed_s"}
    da, db = whole.to_dict(), final.to_dict()
    assert {k: v for k, v in da.items() if k not in skip} == {k: v for k, v in db.items() if k not in skip}
    if site == "transcoder":
        assert a.cfg.is_transcoder and a.cfg.site == (1, "mlp_in") and a.cfg.site_out == (1, "mlp_out")
        assert whole.log_fvu[0] < 1.5 and whole.fvu < 1.5 and np.isfinite(whole.delta_loss)


# ------------------------------------------------------------------------------ CLI
def test_cli_trains_a_batch_topk_transcoder_and_encodes_with_it(tmp_path, tokenizer, corpus, capsys):
    model_dir = tmp_path / "model"
    make_tiny_model("llama", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "tc"
    assert main(["sae", "train", "--model", str(model_dir), "--layer", "1", "--site", "transcoder",
                 "--architecture", "batchtopk", "--width", "32", "--k", "4", "--max-tokens", "1024",
                 "--window", "32", "--batch", "128", "--batch-windows", "8", "--corpus", corpus,
                 "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokens"] == 1024 and summary["delta_loss"] is not None
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_transcoder" and cfg["metadata"]["hook_name"] == "blocks.1.ln2.hook_normalized"
    assert main(["sae", "encode", "--model", str(model_dir), "--sae", str(out), "--prompt", "The nurse",
                 "--top-k", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tokens"] == ["The", " nurse"] and data["site"] == "mlp_in"
    assert main(["sae", "attribute", "--model", str(model_dir), "--sae", str(out), "--prompt", "The nurse",
                 "--json"]) == 0   # attribution splices a transcoder at its MLP (tests/unit/test_transcoder_use.py)
    assert json.loads(capsys.readouterr().out)["site"] == "mlp_in"


# ------------------------------------------------------------------------------ the Train SAE tab
def test_the_train_sae_tab_trains_a_batch_topk_transcoder(tiny_sessions, corpus, tmp_path):
    from explorer.persistence.history import History
    from widgets.sae_train_view import SAETrainView

    history = History()
    view = SAETrainView(tiny_sessions["llama"], history=history, background=False,
                        base_config=TrainConfig(window=32, batch_windows=4, eval_windows=2, eval_every=2,
                                                warmup_steps=2),
                        layer=1, site="transcoder", architecture="batchtopk", width=32, k=4, max_tokens=512,
                        batch=64, corpus=corpus, out_dir=str(tmp_path / "tc"))
    assert view.config().architecture == "batchtopk" and view.config().site == "transcoder"
    view.param.trigger("start")
    assert view.error == "" and view.result.status == "done"
    assert load_sae(view.sae_path).cfg.is_transcoder
    assert "transcoder batchtopk" in history.entries[-1].label
