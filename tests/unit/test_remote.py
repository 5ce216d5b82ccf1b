"""Remote models (NDIF): every remote-capable analysis, run with ``remote="local"``, against the
same analysis on the same weights loaded the ordinary way.

``remote="local"`` is nnsight's local simulation of a server: each trace is serialised exactly as
for NDIF, deserialised with this project's modules hidden, and run here. A session loaded so holds
no weights of its own (a meta skeleton, plus the readout fetched by one trace), so anything that
runs here instead of through a trace fails. Families: Llama (RMSNorm, GQA), GPT-2 (Conv1D,
LayerNorm, biases) and Gemma 2 (post-norms, soft-capped logits).
"""
from __future__ import annotations

import argparse

import pytest
import torch
from nnsight.intervention.backends.local import LocalSimulationBackend

import explorer.core.remote as remote_mod
from explorer import ablate, attention_patterns, compare_prompts, head_scores, logit_lens, patch, sweep
from explorer.core.errors import UnsupportedModelError
from explorer.core.remote import RemoteServerError, RemoteUnsupportedError, remote_target
from explorer.core.session import ModelSession
from helpers import assert_results_agree
from tiny_models import make_tiny_model

FAMILIES = ("llama", "gpt2", "gemma2")
PROMPT = "The capital of France is"
OTHER = "The capital of Spain is"
TOL = 1e-5


@pytest.fixture(scope="module")
def pairs(tokenizer, tmp_path_factory):
    """Per family: (a remote="local" session, an ordinary session) on the same saved weights."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(f"remote-{family}")
        make_tiny_model(family, len(tokenizer), seed=3).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[family] = (ModelSession.load(str(path), remote="local"), ModelSession.load(str(path), device="cpu"))
    return out


@pytest.fixture(params=FAMILIES)
def pair(request, pairs):
    return pairs[request.param]


@pytest.fixture
def remote_calls(monkeypatch):
    """Count the traces that went through nnsight's serialising backend."""
    calls = []
    original = LocalSimulationBackend.__call__

    def counted(self, tracer):
        calls.append(tracer)
        return original(self, tracer)

    monkeypatch.setattr(LocalSimulationBackend, "__call__", counted)
    return calls


def assert_same(a, b, tol: float = TOL) -> None:
    assert_results_agree(a, b, tol)


def top1(session: ModelSession) -> str:
    return str(logit_lens(session, PROMPT).top_tokens[-1, -1, 0])


def test_no_weights_here(pair):
    remote, local = pair
    assert remote.remote == "local" and not local.remote
    assert remote.hf.get_submodule(remote.adapter.embed).weight.device.type == "meta"
    block = remote.hf_blocks()[0]
    assert all(p.device.type == "meta" for p in block.get_submodule(remote.adapter.mlp).parameters())
    assert block.get_submodule(remote.adapter.attn_out).weight.device.type == "meta"
    assert remote.unembed_weight().device.type == "cpu"  # the readout, fetched by a trace
    assert torch.equal(remote.unembed_weight(), local.unembed_weight())
    assert remote.info().device.startswith("remote") and remote.info().n_layers == local.info().n_layers
    assert remote.info().n_params == local.info().n_params


def test_lens(pair, remote_calls):
    remote, local = pair
    assert_same(logit_lens(remote, PROMPT, top_k=5), logit_lens(local, PROMPT, top_k=5))
    assert len(remote_calls) == 1
    assert_same(compare_prompts(remote, PROMPT, prompt_b=OTHER), compare_prompts(local, PROMPT, prompt_b=OTHER))


def test_heads(pair, remote_calls):
    remote, local = pair
    assert_same(attention_patterns(remote, PROMPT), attention_patterns(local, PROMPT))
    assert_same(head_scores(remote, PROMPT, seq_len=6), head_scores(local, PROMPT, seq_len=6))
    assert remote_calls  # patterns, activations and the W_O matvecs all ran as remote traces


@pytest.mark.parametrize("components,mode", [(("1.2", "mlp:0"), "zero"), (("attn:1",), "mean"),
                                             (("2.0", "1:5"), "resample")])
def test_ablation(pair, components, mode, remote_calls):
    remote, local = pair
    kw = dict(components=components, target=top1(local), mode=mode, second_prompt=OTHER)
    assert_same(ablate(remote, PROMPT, **kw), ablate(local, PROMPT, **kw))
    assert remote_calls


@pytest.mark.parametrize("kind,mode", [("heads", "zero"), ("blocks", "mean"), ("neurons", "resample")])
def test_sweep(pair, kind, mode, remote_calls):
    remote, local = pair
    kw = dict(target=top1(local), kind=kind, mode=mode, second_prompt=OTHER, top_n=70)
    a, b = sweep(remote, PROMPT, **kw), sweep(local, PROMPT, **kw)
    assert a.complete and a.total == b.total
    assert_same(a, b, tol=1e-4)  # batched differently: float32 sums in another order
    # Many edited runs per request: a sweep is a few requests (+ the clean run, means or resample).
    assert len(remote_calls) <= 4 + a.total // 64


@pytest.mark.parametrize("site", ["resid", "mlp"])
def test_patching(pair, site, remote_calls):
    remote, local = pair
    target = top1(local)
    compare = str(logit_lens(local, OTHER).top_tokens[-1, -1, 0])
    if compare == target:
        compare = str(logit_lens(local, PROMPT).top_tokens[-1, -1, 1])
    kw = dict(corrupt=OTHER, target=target, compare_token=compare, site=site)
    a, b = patch(remote, PROMPT, **kw), patch(local, PROMPT, **kw)
    assert a.complete
    assert_same(a, b, tol=1e-4)
    assert len(remote_calls) <= 3 + a.total // 64  # the clean and corrupted runs, then the patches


def test_neuron_activation_and_demonstrations(pair, remote_calls):
    from explorer import prompt_activation
    from explorer.analyses.demonstrations import DemoRequest, demonstration_lens

    remote, local = pair
    assert_same(prompt_activation(remote, PROMPT, layer=1, neuron=7), prompt_activation(local, PROMPT, layer=1, neuron=7))
    request = DemoRequest(n_prompts=3, n_demos=3, seed=1, batch_size=4)
    assert_same(demonstration_lens(remote, request), demonstration_lens(local, request), tol=1e-4)
    assert remote_calls


def test_refusals(pairs):
    from explorer import build_index, direct_logit_attribution, generate, train_sae  # noqa: F401

    remote, _ = pairs["llama"]
    with pytest.raises(RemoteUnsupportedError, match="generation cannot run on a remote"):
        generate(remote, PROMPT, max_new_tokens=2)
    with pytest.raises(RemoteUnsupportedError, match="building the neuron index cannot run on a remote"):
        build_index(remote, max_tokens=64)
    from explorer.analyses.hidden import collect_hidden
    from explorer.analyses.patchscope import patchscope

    for fn, what in ((patchscope, "Patchscope"), (collect_hidden, "collecting hidden states")):
        with pytest.raises(RemoteUnsupportedError, match=what):
            fn(remote)
    with pytest.raises(RemoteUnsupportedError, match="attribution sweep"):
        sweep(remote, PROMPT, target=top1(remote), kind="heads", method="attribution")
    # Anything else that runs the skeleton itself (plain torch hooks and forwards) says so too.
    x = torch.tensor([[1, 2, 3]])
    with pytest.raises(RemoteUnsupportedError, match="cannot run on a remote"):
        remote.hf(input_ids=x)


def test_an_unreachable_server_is_one_clear_error(pairs, monkeypatch):
    path = pairs["llama"][0].path
    with pytest.raises(RemoteServerError, match=r"the NDIF server at http://127.0.0.1:9 could not run"):
        ModelSession.load(path, remote=True, ndif_host="http://127.0.0.1:9")
    # A trace that forgets remote= would load the weights here: refused instead.
    monkeypatch.setattr(remote_mod, "fetch_readout", lambda session: None)
    session = ModelSession.load(path, remote=True, ndif_host="http://127.0.0.1:9")
    with pytest.raises(RemoteUnsupportedError, match="would load the weights here"):
        with session.lm.trace(torch.tensor([[1, 2]])):
            session.lm.lm_head.output.save()


def test_remote_target():
    assert remote_target("local") == "local"
    assert remote_target(True, "http://127.0.0.1:5001/") == "http://127.0.0.1:5001"
    with pytest.raises(UnsupportedModelError, match="must be a URL"):
        remote_target(True, "127.0.0.1:5001")
    with pytest.raises(UnsupportedModelError, match="True or 'local'"):
        remote_target("yes")


def test_cli_checks():
    from cli.checks import check_placement
    from explorer.core.errors import ExplorerError

    with pytest.raises(ExplorerError, match="--ndif-host needs --remote"):
        check_placement(argparse.Namespace(ndif_host="http://x", remote=None))
    with pytest.raises(ExplorerError, match="--device-map does not apply"):
        check_placement(argparse.Namespace(remote="ndif", device_map="auto"))


def test_the_app_attaches_a_remote_model(pairs, tmp_path):
    from widgets.model_picker import ModelPicker

    remote, _ = pairs["llama"]
    got: list[ModelSession] = []
    picker = ModelPicker(got.append, ndif_host="local")
    picker.param.trigger("attach_remote")
    assert "Type the model" in picker.error
    picker.load(remote.path, background=False, remote=True)
    assert got and got[0].remote == "local" and got[0].hf_blocks()[0].mlp.down_proj.weight.device.type == "meta"
    assert picker.status.startswith(f"Attached **{remote.name} (NDIF)**")
