"""Tiny random models of each supported family, built in-process (no hub), for the unit tests.

A plain module, not conftest: test files import it by name, and pytest keeps several conftest
modules (tests/, tests/ui/) that would shadow each other under one import name.
"""
from __future__ import annotations

import torch

FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox")


def tiny_config(family: str, vocab_size: int):
    """A 3-layer, 4-head, d=64 random config of a family (2 KV heads where the family has GQA)."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, tie_word_embeddings=False)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
        return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=256, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=4, max_position_embeddings=256, **common)
    raise ValueError(family)


def make_tiny_model(family: str, vocab_size: int, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size))
    # Random init gives near-uniform outputs; scale weights up so tests see peaked, varied
    # distributions (a stricter check of the lens than near-uniform ones).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()
