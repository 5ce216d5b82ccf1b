"""Architecture adapters: every table entry points at the module that does what the entry says.

Each entry is checked against what a separate, plain copy of each tiny model actually computes
(Hugging Face's own hidden states and logits, and the shapes flowing through the projections),
so a path that exists but names the wrong module fails too.
"""
from __future__ import annotations

import copy

import pytest
import torch

from explorer.core.adapters import ADAPTERS, Adapter, adapter_for, check_modules
from explorer.core.errors import ExplorerError, UnsupportedModelError
from explorer.core.session import ModelSession
from tiny_models import FAMILIES, make_tiny_model, tiny_config

VOCAB = 512  # the adapter checks need no real tokenizer


@pytest.fixture(scope="module")
def plain_models():
    models = {}
    for family in FAMILIES:
        model = make_tiny_model(family, VOCAB)
        model.config.use_cache = False
        models[family] = model
    return models


def run_with_hooks(model, paths_out=(), paths_in=()):
    """Forward a fixed prompt; return HF's output and the outputs/inputs of the named modules."""
    seen: dict[tuple[str, str], torch.Tensor] = {}

    def hook(kind: str, path: str):
        def keep(_module, inputs, output) -> None:  # returns None: the output is left alone
            value = inputs[0] if kind == "in" else output
            seen[kind, path] = value[0] if isinstance(value, tuple) else value
        return keep

    handles = [model.get_submodule(p).register_forward_hook(hook("out", p)) for p in paths_out]
    handles += [model.get_submodule(p).register_forward_hook(hook("in", p)) for p in paths_in]
    ids = torch.tensor([[5, 17, 300, 42, 7, 99]])
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def test_every_supported_family_has_an_adapter():
    assert set(FAMILIES) <= set(ADAPTERS)
    for family in FAMILIES:
        adapter = adapter_for(family)
        assert isinstance(adapter, Adapter) and adapter.family == family


@pytest.mark.parametrize("model_type", ["bert", "t5", "opt", "gptj", ""])
def test_unknown_model_type_names_it_and_the_supported_ones(model_type):
    with pytest.raises(UnsupportedModelError) as info:
        adapter_for(model_type)
    message = str(info.value)
    assert f"'{model_type}'" in message
    for family in FAMILIES:
        assert family in message
    assert isinstance(info.value, ExplorerError)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_paths_exist(family, plain_models):
    check_modules(adapter_for(family), plain_models[family])  # does not raise


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_entries_do_what_they_say(family, plain_models):
    model, adapter, cfg = plain_models[family], adapter_for(family), tiny_config(family, VOCAB)
    n_layers, d = 3, 64
    n_heads = 4

    blocks = model.get_submodule(adapter.blocks)
    assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == n_layers == cfg.num_hidden_layers
    embed = model.get_submodule(adapter.embed)
    assert isinstance(embed, torch.nn.Embedding) and tuple(embed.weight.shape) == (VOCAB, d)
    unembed = model.get_submodule(adapter.unembed)
    assert isinstance(unembed, torch.nn.Linear) and tuple(unembed.weight.shape) == (VOCAB, d)

    attn_out = [f"{adapter.blocks}.{i}.{adapter.attn_out}" for i in range(n_layers)]
    mlp_out = [f"{adapter.blocks}.{i}.{adapter.mlp_out}" for i in range(n_layers)]
    out, seen = run_with_hooks(model, paths_out=[adapter.resid_in] + [f"{adapter.blocks}.{i}" for i in range(n_layers)],
                               paths_in=attn_out + mlp_out)
    hidden = out.hidden_states
    # resid_in: the residual stream entering block 0 (HF's hidden_states[0]).
    torch.testing.assert_close(seen["out", adapter.resid_in], hidden[0], rtol=0, atol=0)
    # final_norm turns the last block's output into HF's last hidden state; unembed makes the logits.
    last = seen["out", f"{adapter.blocks}.{n_layers - 1}"]
    with torch.no_grad():
        normed = model.get_submodule(adapter.final_norm)(last)
        torch.testing.assert_close(normed, hidden[-1], rtol=0, atol=1e-6)
        logits = unembed(normed)
        cap = getattr(cfg, adapter.logit_softcap) if adapter.logit_softcap else None
        if family == "gemma2":  # the one tiny family that soft-caps its logits
            assert cap == 30.0
            logits = cap * torch.tanh(logits / cap)
        else:
            assert cap is None
        torch.testing.assert_close(logits, out.logits, rtol=1e-6, atol=1e-5)
    # attn_out's input is the concatenation of the heads; mlp_out's input is the neurons.
    d_mlp = 4 * d if family == "gpt2" else cfg.intermediate_size
    for i in range(n_layers):
        assert seen["in", attn_out[i]].shape[-1] == n_heads * (getattr(cfg, "head_dim", None) or d // n_heads)
        assert seen["in", mlp_out[i]].shape[-1] == d_mlp
    # attn / mlp are the sub-blocks that contain those projections.
    block = blocks[0]
    assert block.get_submodule(adapter.attn_out) in list(block.get_submodule(adapter.attn).modules())
    assert block.get_submodule(adapter.mlp_out) in list(block.get_submodule(adapter.mlp).modules())
    assert adapter.attn_out.startswith(adapter.attn + ".") and adapter.mlp_out.startswith(adapter.mlp + ".")
    # Post-norms: each block's output is its input plus the post-norms' outputs (where named),
    # else plus the attention and MLP outputs.
    attn_site = adapter.attn_post_norm or adapter.attn
    mlp_site = adapter.mlp_post_norm or adapter.mlp
    sites = [f"{adapter.blocks}.{i}.{p}" for i in range(n_layers) for p in (attn_site, mlp_site)]
    _, seen = run_with_hooks(model, paths_out=sites + [f"{adapter.blocks}.{i}" for i in range(n_layers)])
    for i in range(n_layers):
        added = seen["out", f"{adapter.blocks}.{i}.{attn_site}"] + seen["out", f"{adapter.blocks}.{i}.{mlp_site}"]
        torch.testing.assert_close(seen["out", f"{adapter.blocks}.{i}"], hidden[i] + added, rtol=1e-5, atol=1e-5)
    # Every RMSNorm scales by (norm_gain_offset + weight): checked with random weights.
    gen = torch.Generator().manual_seed(3)
    for name, norm in model.named_modules():
        if "RMSNorm" in type(norm).__name__ and norm.weight.shape[-1] == d:
            norm = copy.deepcopy(norm)
            with torch.no_grad():
                norm.weight.copy_(torch.randn(d, generator=gen))
            x = torch.randn(5, d, generator=gen)
            eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
            expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (adapter.norm_gain_offset + norm.weight)
            with torch.no_grad():
                torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5, msg=name)


def test_check_names_every_missing_top_level_module():
    llama = make_tiny_model("llama", VOCAB)
    with pytest.raises(UnsupportedModelError) as info:
        check_modules(adapter_for("gpt2"), llama)
    message = str(info.value)
    assert "'gpt2'" in message
    for path in ("transformer.h", "transformer.wte", "transformer.drop", "transformer.ln_f"):
        assert path in message
    assert "lm_head" not in message  # present in both: not reported


def test_check_names_a_missing_final_norm():
    model = make_tiny_model("llama", VOCAB)
    del model.model.norm
    with pytest.raises(UnsupportedModelError, match=r"missing model\.norm$"):
        check_modules(adapter_for("llama"), model)


def test_check_names_missing_block_modules():
    model = make_tiny_model("gpt_neox", VOCAB)
    del model.gpt_neox.layers[0].mlp.dense_4h_to_h
    with pytest.raises(UnsupportedModelError) as info:
        check_modules(adapter_for("gpt_neox"), model)
    assert "gpt_neox.layers.0.mlp.dense_4h_to_h" in str(info.value)
    assert "attention.dense" not in str(info.value)


def test_session_refuses_a_model_missing_adapter_modules(tokenizer):
    model = make_tiny_model("qwen2", len(tokenizer))
    del model.lm_head
    with pytest.raises(UnsupportedModelError, match="lm_head"):
        ModelSession(model, tokenizer, name="broken")


def test_session_refuses_an_unsupported_architecture(tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=1,
                       ffn_dim=64, num_attention_heads=4, max_position_embeddings=64)
    with pytest.raises(UnsupportedModelError, match="'opt'"):
        ModelSession(OPTForCausalLM(config), tokenizer, name="opt")


def test_check_names_a_missing_post_norm():
    model = make_tiny_model("olmo2", VOCAB)
    del model.model.layers[0].post_feedforward_layernorm
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.post_feedforward_layernorm"):
        check_modules(adapter_for("olmo2"), model)


@pytest.mark.parametrize("model_type, hint", [("gemma3", "gemma3_text"), ("gemma", "Gemma 2")])
def test_near_miss_model_types_say_what_is_supported(model_type, hint):
    with pytest.raises(UnsupportedModelError, match=hint):
        adapter_for(model_type)


def test_every_adapter_has_a_tiny_model():
    assert set(ADAPTERS) == set(FAMILIES)  # a family added to the table is added to the tests too
