"""Tiny random models of each supported family, built in-process (no hub), for the unit tests.

A plain module, not conftest: test files import it by name, and pytest keeps several conftest
modules (tests/, tests/ui/) that would shadow each other under one import name.

Each family keeps what makes it different, at a size where it still shows: Mistral and Gemma
slide a 4-token window over the tests' 6-14-token prompts; Gemma 2 soft-caps its attention
and final logits at values the scaled-up weights reach; Gemma 3 alternates sliding and full
layers and norms its queries and keys, as do Qwen3 and OLMo-2. Gemma and Qwen3 heads are not
d_model / n_heads wide (gemma-2-2b: 8 heads of 256 in d 2304; Qwen3-0.6B: 16 of 128 in d 1024),
so their tiny models' are not either: the attention output projection's input is 4 heads of 24
(Gemma 2), 8 (Gemma 3) or 32 (Qwen3) in d 64.
"""
from __future__ import annotations

import torch

FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox",
            "gemma2", "gemma3_text", "qwen3", "phi3", "olmo2")

# Families whose blocks norm the attention and MLP outputs before adding them to the residual.
POST_NORM_FAMILIES = ("gemma2", "gemma3_text", "olmo2")

_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)


def tiny_config(family: str, vocab_size: int):
    """A 3-layer, 4-head, d=64 random config of a family (2 KV heads where the family has GQA)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, tie_word_embeddings=False)
    if family in ("llama", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[family]
        return cls(**_SHAPE, **common)
    if family == "mistral":
        return tf.MistralConfig(sliding_window=4, **_SHAPE, **common)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=32, **_SHAPE, **common)
    if family == "phi3":
        return tf.Phi3Config(pad_token_id=0, **_SHAPE, **common)
    if family == "olmo2":
        return tf.Olmo2Config(pad_token_id=0, **_SHAPE, **common)
    if family == "gemma2":
        return tf.Gemma2Config(head_dim=24, query_pre_attn_scalar=24, sliding_window=4,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                               attn_logit_softcapping=5.0, final_logit_softcapping=30.0, **_SHAPE, **common)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                   **_SHAPE, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=256, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                num_attention_heads=4, max_position_embeddings=256, **common)
    raise ValueError(family)


def make_tiny_model(family: str, vocab_size: int, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size))
    # Random init gives near-uniform outputs; scale weights up so tests see peaked, varied
    # distributions (a stricter check of the lens than near-uniform ones).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()
