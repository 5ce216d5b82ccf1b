"""Small inputs and plain references that several unit test files share.

A plain module like ``tiny_models``: test files import it by name. The references here never
go through the engine: windows are packed from the corpus text, SAE features are encoded by
hand, and a "plain" model is a separate copy of a tiny session's model.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_models import make_tiny_model


def corpus_head(directory: Path, n: int, name: str = "small.txt") -> Path:
    """A text corpus of the default corpus' first ``n`` articles (one a line), written in ``directory``."""
    from explorer.core.defaults import ensure_default_corpus

    with open(ensure_default_corpus(), encoding="utf-8") as f:
        lines = [next(f) for _ in range(n)]
    path = Path(directory) / name
    path.write_text("".join(lines), encoding="utf-8")
    return path


def reference_windows(tokenizer, corpus: Path, window: int, max_tokens: int) -> np.ndarray:
    """[n, window] token ids: the corpus' documents (one a line) joined by "\\n\\n", cut into windows."""
    sep = tokenizer("\n\n", add_special_tokens=False).input_ids
    flat: list[int] = []
    for line in corpus.read_text(encoding="utf-8").splitlines():
        if line.strip():
            flat += tokenizer(line.strip(), add_special_tokens=False).input_ids + sep
    n = min(len(flat) // window, max_tokens // window)
    return np.array(flat[: n * window], dtype=np.int64).reshape(n, window)


def plain_copy(tokenizer, session, family: str = "llama"):
    """A separate plain Hugging Face model with a tiny session's weights (eval mode)."""
    model = make_tiny_model(family, len(tokenizer))
    model.load_state_dict(session.hf.state_dict())
    return model.eval()


def save_model_dir(path: Path, model, tokenizer) -> Path:
    """A local model directory (weights and tokenizer) that the CLI's ``--model`` loads."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def random_sae_weights(d: int, d_sae: int, seed: int) -> dict[str, torch.Tensor]:
    """Random SAELens-layout weights whose TopK features fire on a tiny model's activations."""
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d, d_sae, generator=g) * 0.4, "b_enc": torch.randn(d_sae, generator=g) * 0.1,
            "W_dec": torch.randn(d_sae, d, generator=g) * 1.5, "b_dec": torch.randn(d, generator=g) * 0.1}


def save_topk_sae(path: Path, weights: dict[str, torch.Tensor], layer: int, k: int, hook: str = "resid_post") -> Path:
    """Save a TopK SAE reading block ``layer``'s ``hook`` (``resid_post``, ``mlp_out``) in the SAELens layout."""
    from explorer.features.sae import SAEConfig, SparseAutoencoder
    from explorer.features.saelens_io import save_sae

    d_sae, d = weights["W_dec"].shape
    cfg = SAEConfig(d_in=d, d_sae=d_sae, architecture="topk", k=k,
                    metadata={"hook_name": f"blocks.{layer}.hook_{hook}"})
    save_sae(SparseAutoencoder(cfg, weights), path)
    return Path(path)


def topk_encode(w: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    """TopK (SAELens), in float64: pre = (x − b_dec) W_enc + b_enc; the k largest kept, ReLU'd."""
    h = (x.double() - w["b_dec"].double()) @ w["W_enc"].double() + w["b_enc"].double()
    top = h.topk(k, dim=-1)
    return torch.zeros_like(h).scatter(-1, top.indices, top.values.clamp(min=0))


def assert_results_agree(a, b, tol: float, path: str = "") -> None:
    """Every array, number and nested result of two results agree (within ``tol``, relative to
    the values' size for large logits)."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        where = f"{path}{f.name}"
        if isinstance(x, np.ndarray):
            if x.dtype.kind in "fc":
                np.testing.assert_allclose(x, y, rtol=tol, atol=tol, equal_nan=True, err_msg=where)
            else:
                assert np.array_equal(x, y), where
        elif isinstance(x, float):
            assert x == pytest.approx(y, rel=tol, abs=tol), where
        elif dataclasses.is_dataclass(x) and not isinstance(x, type) and hasattr(x, "to_dict"):
            assert_results_agree(x, y, tol, where + ".")
