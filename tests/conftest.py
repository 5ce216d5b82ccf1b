"""Shared fixtures: tiny random models of each supported family, and the embedded default."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing loads from a hub in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from explorer.defaults import ensure_default_model
from explorer.session import ModelSession

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


@pytest.fixture(scope="session")
def default_model_dir():
    """The embedded default model's cached directory (fetched once by `make test`'s setup)."""
    return ensure_default_model()


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    """The default model's tokenizer, reused by the tiny models (no hub needed)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir), local_files_only=True)


@pytest.fixture(scope="session")
def tiny_sessions(tokenizer):
    """One ModelSession per family, built in-process on random weights."""
    return {
        f: ModelSession(make_tiny_model(f, len(tokenizer)), tokenizer, name=f"tiny-{f}")
        for f in FAMILIES
    }


@pytest.fixture(params=FAMILIES)
def tiny_session(request, tiny_sessions):
    return tiny_sessions[request.param]


@pytest.fixture(scope="session")
def default_session(default_model_dir):
    """The embedded default model (real weights), loaded once per test run."""
    return ModelSession.load(str(default_model_dir), device="cpu", dtype="float32")
