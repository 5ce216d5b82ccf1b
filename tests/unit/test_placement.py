"""Big models on small machines: the --device-map/--max-memory flags, the free-memory budget that
sizes the lens chunks and the sweep batches, and tiny models sharded between the CPU and the disk
by accelerate (the unembedding and final norm offloaded) giving exactly the plain load's results."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from explorer.analyses.heads import HeadsRequest, direct_logit_attribution, head_scores
from explorer.analyses.hidden import collect_hidden
from explorer.analyses.lens import chunk_rows, logit_lens
from explorer.core.errors import UnsupportedModelError
from explorer.core.placement import (
    PlacementError,
    check_device_map,
    free_memory,
    memory_budget,
    parse_max_memory,
    parse_size,
)
from explorer.core.session import ModelSession
from explorer.interventions.ablation import ablate, sweep
from explorer.interventions.edits import CHUNK_TOKENS, replay_tokens
from explorer.interventions.patching import patch
from explorer.neurons.index import build_index
from tiny_models import make_tiny_model

PROMPT = "The capital of France is"


def test_sizes_and_max_memory_parse():
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("2 MiB") == 2 * 2**20 and parse_size("512") == 512
    assert parse_max_memory("cuda:0=20GiB,1=10GB, cpu=60GiB") == {0: 20 * 2**30, 1: 10**10, "cpu": 60 * 2**30}
    for bad in ("", "cpu", "cpu=", "gpu=1GB", "disk=1GB", "cpu=1GB,cpu=2GB", "cuda:x=1GB", "cpu=lots"):
        with pytest.raises(PlacementError):
            parse_max_memory(bad)
    assert check_device_map("sequential") == "sequential" and check_device_map(None) is None
    with pytest.raises(PlacementError, match="unknown device map"):
        check_device_map("everywhere")


def test_free_memory_and_the_budget(monkeypatch):
    free = free_memory("cpu")
    assert 0 < free < 2**50
    assert memory_budget("cpu", cap=1000) <= 1000
    monkeypatch.setenv("EXPLORER_MEMORY_BUDGET", "3MiB")
    assert memory_budget("cpu") == 3 * 2**20


def test_the_lens_chunk_shrinks_with_the_vocabulary_and_the_budget(monkeypatch):
    monkeypatch.setenv("EXPLORER_MEMORY_BUDGET", "1GiB")
    assert chunk_rows(49_152, "cpu") == 1024                    # SmolLM2: the full chunk
    assert chunk_rows(256_000, "cpu") == 2**30 // (12 * 256_000)  # Gemma: about 350 rows
    monkeypatch.setenv("EXPLORER_MEMORY_BUDGET", "1MiB")
    assert chunk_rows(256_000, "cpu", n_rows=43) == 43          # never less than one position


def _arrays_equal(a, b, path="result", atol=0.0):
    """Every numeric array and float of two results (nested ones too) within ``atol``."""
    if dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            _arrays_equal(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}", atol)
    elif isinstance(a, np.ndarray):
        if a.dtype.kind in "fiub":
            np.testing.assert_allclose(a.astype(float), b.astype(float), atol=atol, rtol=0, err_msg=path)
        else:
            assert (a == b).all(), path
    elif isinstance(a, float):
        assert abs(a - b) <= atol, path


def test_small_budgets_give_the_same_lens_and_sweep(tiny_sessions, monkeypatch):
    """One position per lens chunk and one row per replayed forward change nothing but speed."""
    session = tiny_sessions["llama"]
    lens = logit_lens(session, PROMPT, top_k=5, target=" Paris")
    swept = sweep(session, PROMPT, target=" Paris", kind="heads")
    session.clear_cache()
    monkeypatch.setenv("EXPLORER_MEMORY_BUDGET", "1KiB")
    n = session.encode(PROMPT).numel()
    assert replay_tokens(session, n) == n
    monkeypatch.delenv("EXPLORER_MEMORY_BUDGET")
    assert replay_tokens(session, n) == CHUNK_TOKENS           # this machine has room
    monkeypatch.setenv("EXPLORER_MEMORY_BUDGET", "1KiB")
    _arrays_equal(lens, logit_lens(session, PROMPT, top_k=5, target=" Paris"), atol=1e-6)
    _arrays_equal(swept, sweep(session, PROMPT, target=" Paris", kind="heads"), atol=1e-4)
    session.clear_cache()


# ------------------------------------------------------------------- offloaded tiny models
OFFLOAD_MAPS = {
    "llama": (["model.embed_tokens", "model.rotary_emb", "model.layers.0"],
              ["model.layers.1", "model.layers.2", "model.norm", "lm_head"]),
    "gpt2": (["transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h.0"],
             ["transformer.h.1", "transformer.h.2", "transformer.ln_f", "lm_head"]),
}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tokenizer, tmp_path_factory):
    """(plain, offloaded) sessions of one tiny model: the offloaded one loaded from its directory
    with block 0 on the CPU and blocks 1-2, the final norm and the unembedding on disk (an explicit
    map: accelerate's "auto" keeps a model whose largest layers are its embeddings in one piece)."""
    family = request.param
    root = tmp_path_factory.mktemp(f"tiny-{family}")
    model = make_tiny_model(family, len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    plain = ModelSession.load(str(root / "model"), device="cpu", dtype="float32")
    on_cpu, on_disk = OFFLOAD_MAPS[family]
    device_map = {**{m: "cpu" for m in on_cpu}, **{m: "disk" for m in on_disk}}
    off = ModelSession.load(str(root / "model"), device="cpu", dtype="float32", device_map=device_map,
                            offload_dir=root / "offload")
    return plain, off


def test_the_offloaded_model_is_sharded_as_asked(pair):
    plain, off = pair
    placed = off.device_map
    assert placed is not None and "disk" in placed.values() and "cpu" in placed.values(), placed
    assert off.unembedding.offloaded and off.unembed_weight().device.type == "meta"
    assert off.device.type == "cpu"
    assert off.info().device.startswith("sharded: cpu") and plain.info().device == "cpu"


@pytest.mark.parametrize("name", ["lens", "heads", "dla", "ablate", "mean-ablate", "sweep", "patch", "hidden"])
def test_offloaded_results_equal_the_plain_load(pair, name):
    plain, off = pair
    run = {
        "lens": lambda s: logit_lens(s, PROMPT, top_k=5, target=" Paris"),
        "heads": lambda s: head_scores(s, HeadsRequest(PROMPT, seq_len=6, seed=0)),
        "dla": lambda s: direct_logit_attribution(s, PROMPT, target=" Paris"),
        "ablate": lambda s: ablate(s, PROMPT, target=" Paris", components="0.1,mlp:1,block:2,1:5"),
        "mean-ablate": lambda s: ablate(s, PROMPT, target=" Paris", components="0.1,block:2", mode="mean",
                                        mean_text="Once upon a time there was a quiet town by the sea."),
        "sweep": lambda s: sweep(s, PROMPT, target=" Paris", kind="heads"),
        "patch": lambda s: patch(s, clean=PROMPT, corrupt="The capital of Italy is", target=" Paris"),
        "hidden": lambda s: collect_hidden(s, texts=("A cat.", PROMPT), sites=("last", "mean")),
    }[name]
    _arrays_equal(run(plain), run(off), atol=1e-5)


def test_an_offloaded_neuron_index_equals_the_plain_one(pair, tmp_path):
    from explorer.core.defaults import ensure_default_corpus

    corpus = tmp_path / "small.txt"
    with open(ensure_default_corpus(), encoding="utf-8") as f:
        corpus.write_text("".join(next(f) for _ in range(3)), encoding="utf-8")
    plain, off = pair
    kw = dict(corpus_path=str(corpus), max_tokens=256, window=32, top_k=4, n_random=2)
    a = build_index(plain, out_dir=tmp_path / "a", **kw)
    b = build_index(off, out_dir=tmp_path / "b", **kw)
    assert sorted(a.arrays) == sorted(b.arrays)
    for key in a.arrays:
        np.testing.assert_allclose(a.arrays[key], b.arrays[key], atol=1e-5, rtol=0, err_msg=key)


def test_placement_errors_are_clear(tmp_path, pair):
    plain, _ = pair
    with pytest.raises(UnsupportedModelError, match="need --device-map"):
        ModelSession.load(plain.path, max_memory="cpu=1GB")
    with pytest.raises(UnsupportedModelError, match="unknown device map"):
        ModelSession.load(plain.path, device_map="everywhere")
    with pytest.raises(UnsupportedModelError, match="embeddings"):
        ModelSession.load(plain.path, device="cpu", device_map="auto", max_memory="cpu=1MB",
                          offload_dir=tmp_path / "off")
    assert torch.get_default_dtype() == torch.float32
