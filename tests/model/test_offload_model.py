"""The embedded default model sharded by accelerate between the CPU (or a GPU and the CPU) and the disk.

Loaded once with ``--device-map auto --max-memory cpu=200MB --offload-dir DIR`` (a third of its
540 MB of float32 weights in memory, the rest of the blocks and the final norm read from disk at
each forward), it gives the plain load's lens, heads, DLA, an ablation and a small neuron index:
the same float32 operations in the same order, so equal within float rounding. The CLI flags
reach the same load.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from cli.main import main
from explorer.analyses.heads import HeadsRequest, direct_logit_attribution, head_scores
from explorer.analyses.lens import logit_lens
from explorer.core.session import ModelSession
from explorer.interventions.ablation import ablate
from explorer.neurons.index import build_index

pytestmark = pytest.mark.model

PROMPT = "The capital of France is"
# Where default_session runs (tests/conftest.py): on a GPU (benchmarks/gpu_check.py) the sharded
# copy gets 100 MB of it, 100 MB of CPU memory and the disk, and computes on the GPU throughout.
DEVICE = os.environ.get("EXPLORER_TEST_DEVICE", "cpu")
DTYPE = os.environ.get("EXPLORER_TEST_DTYPE", "float32")
MAX_MEMORY = "cpu=200MB" if DEVICE == "cpu" else f"{DEVICE if ':' in DEVICE else 'cuda:0'}=100MB,cpu=100MB"
ATOL = 1e-4 if DTYPE == "float32" else 1e-2


@pytest.fixture(scope="module")
def offloaded(default_model_dir, tmp_path_factory):
    return ModelSession.load(str(default_model_dir), device=DEVICE, dtype=DTYPE, device_map="auto",
                             max_memory=MAX_MEMORY, offload_dir=tmp_path_factory.mktemp("offload"))


def _close(a, b, path="result"):
    if dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            _close(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, np.ndarray):
        if a.dtype.kind in "fiub":
            np.testing.assert_allclose(a.astype(float), b.astype(float), atol=ATOL, rtol=0, err_msg=path)
        else:
            assert (a == b).all(), path
    elif isinstance(a, float):
        assert abs(a - b) <= ATOL, path


def test_it_is_sharded_between_cpu_and_disk(offloaded):
    placed = offloaded.device_map
    assert placed is not None and "disk" in placed.values() and len(set(placed.values())) >= 2
    on_disk = [m for m, d in placed.items() if d == "disk"]
    print(f"\n{len(on_disk)} of {len(placed)} modules on disk: {on_disk[0]} .. {on_disk[-1]}")
    assert "model.norm" in on_disk and len(on_disk) > 15


def test_lens_heads_dla_and_ablation_equal_the_plain_load(offloaded, default_session):
    for run in (lambda s: logit_lens(s, PROMPT, top_k=5),
                lambda s: head_scores(s, HeadsRequest(PROMPT, seq_len=16, seed=0)),
                lambda s: direct_logit_attribution(s, PROMPT, target=" Paris"),
                lambda s: ablate(s, PROMPT, target=" Paris", components="mlp:0,4.1,2:100")):
        _close(run(default_session), run(offloaded))
    lens = logit_lens(offloaded, PROMPT, top_k=5)
    assert lens.top_tokens[-1, -1, 0] == " Paris"


def test_a_small_neuron_index_equals_the_plain_one(offloaded, default_session, tmp_path):
    kw = dict(max_tokens=512, window=64, top_k=4, n_random=2)
    a = build_index(default_session, out_dir=tmp_path / "plain", **kw)
    b = build_index(offloaded, out_dir=tmp_path / "offloaded", **kw)
    for key in a.arrays:
        np.testing.assert_allclose(a.arrays[key], b.arrays[key], atol=ATOL, rtol=0, err_msg=key)


def test_the_cli_flags_load_the_same_way(default_model_dir, tmp_path, capsys):
    code = main(["info", "--json", "--model", str(default_model_dir), "--device", "cpu", "--dtype", "float32",
                 "--device-map", "auto", "--max-memory", "cpu=200MB", "--offload-dir", str(tmp_path / "off")])
    info = json.loads(capsys.readouterr().out)["model"]
    assert code == 0 and info["device"].startswith("sharded: cpu") and "disk" in info["device"]
