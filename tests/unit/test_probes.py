"""Hidden-state collection and per-layer probes, against transformers and scikit-learn."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression  # a test dependency: the independent reference

from explorer.analyses.hidden import HiddenError, HiddenStates, collect_hidden
from explorer.analyses.probes import (
    ProbeError,
    ProbeRequest,
    ProbeResult,
    builtin_sets,
    fit_logistic,
    kfold_predictions,
    load_labelled,
    load_probe,
    probe_bytes,
    run_probes,
    save_probe,
    save_steering_vector,
    spd_solve,
    standardise,
    stratified_folds,
)

TEXTS = ("The cat sat on the mat.", "Paris", "Two plus two is four, said the teacher to the class.",
         "A dog.", "hello world hello", "Rome is old")


def reference_rows(session, text: str) -> torch.Tensor:
    """[R, T, d]: the embeddings and every block's output of one unpadded forward, by plain hooks."""
    acts = []
    mods = [session.hf.get_submodule(session.adapter.resid_in), *session.hf_blocks()]
    hooks = [m.register_forward_hook(lambda m, a, o: acts.append((o[0] if isinstance(o, tuple) else o)[0]))
             for m in mods]
    try:
        with torch.no_grad():
            session.hf(session.encode(text)[None])
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(acts).float()


@pytest.mark.parametrize("padding", ["right", "left"])
def test_hidden_equals_unbatched_forward(tiny_session, padding):
    hs = collect_hidden(tiny_session, texts=TEXTS, sites=("last", "mean", "prev"), padding=padding, batch_size=4)
    assert hs.states.shape == (3, tiny_session.n_layers + 1, len(TEXTS), tiny_session.hf.config.hidden_size)
    for i, text in enumerate(TEXTS):
        ref = reference_rows(tiny_session, text)
        tol = dict(atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(hs.site("last")[:, i]), ref[:, -1], **tol)
        torch.testing.assert_close(torch.from_numpy(hs.site("mean")[:, i]), ref.mean(1), **tol)
        torch.testing.assert_close(torch.from_numpy(hs.site("prev")[:, i]), ref[:, max(0, ref.shape[1] - 2)], **tol)
        assert hs.n_tokens[i] == ref.shape[1] and hs.last_ids[i] == int(tiny_session.encode(text)[-1])


def test_hidden_rows_match_transformers_hidden_states(tiny_sessions):
    s = tiny_sessions["gpt2"]
    hs = collect_hidden(s, texts=TEXTS[:3], batch_size=3)
    for i, text in enumerate(TEXTS[:3]):
        out = s.hf(s.encode(text)[None], output_hidden_states=True).hidden_states
        # transformers' last entry is after the final norm; every earlier one is a block output
        for r in range(s.n_layers):
            np.testing.assert_allclose(hs.site("last")[r, i], out[r][0, -1].detach().numpy(), atol=2e-4, rtol=1e-4)


def test_hidden_round_trip_and_errors(tiny_sessions):
    s = tiny_sessions["llama"]
    hs = collect_hidden(s, texts=TEXTS[:2])
    back = HiddenStates.from_dict(json.loads(json.dumps(hs.to_dict())))
    assert np.array_equal(back.states, hs.states) and back.states.dtype == np.float32
    with pytest.raises(HiddenError, match="empty"):
        collect_hidden(s, texts=("ok", "  "))
    with pytest.raises(HiddenError, match="site"):
        collect_hidden(s, texts=("ok",), sites=("first",))


# ------------------------------------------------------------------------- regression
@pytest.mark.parametrize("n,d", [(120, 20), (40, 90)])
@pytest.mark.parametrize("C", [0.05, 1.0, 20.0])
def test_fit_logistic_equals_sklearn(n, d, C):
    rng = np.random.default_rng(n + d)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d)
    y = (x @ rng.normal(size=d) + rng.normal(size=n) > 0).astype(int)
    w, b = fit_logistic(torch.from_numpy(x)[None], torch.from_numpy(y)[None, None], C)
    ref = LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(x, y)
    np.testing.assert_allclose(w[0, 0].numpy(), ref.coef_[0], atol=2e-5 * max(1, np.abs(ref.coef_).max()))
    assert abs(b.item() - ref.intercept_[0]) < 2e-5 * max(1, abs(ref.intercept_[0]))


SOLVE_ON_TWO_THREADS = """
import numpy as np, torch
from explorer.analyses.probes import kfold_predictions, stratified_folds
torch.set_num_threads(2)
rng = np.random.default_rng(0)
y = np.arange(200) % 2
feats = torch.from_numpy(rng.normal(size=(200, 576)) + y[:, None] * 0.5)
folds = stratified_folds(y, 5, 0)
labels = torch.from_numpy(np.stack([y, rng.permutation(y)]))
for x in (feats, torch.ones(200, 576)):   # a real row, and one where every item is the same (the embeddings)
    print((kfold_predictions(x, labels, folds, 1.0) == labels).double().mean(1).tolist())
"""


def test_probes_fit_on_two_threads_without_hanging():
    """Regression: MKL's batched LU (torch.linalg.solve) hung on two threads for 5 folds of
    200 rows (the default model's 200 facts); the Newton systems are now solved by Cholesky."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", SOLVE_ON_TWO_THREADS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert "MKL ERROR" not in proc.stdout + proc.stderr
    real, same = (json.loads(line) for line in proc.stdout.split("\n")[:2])
    assert real[0] > 0.9 and same[0] == 0.5


def test_spd_solve_equals_lu_and_falls_back_when_not_definite():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 7, 9, generator=g, dtype=torch.float64)
    a = r @ r.transpose(1, 2) + torch.eye(7, dtype=torch.float64)
    a[2] = torch.diag(torch.tensor([1.0, -2.0, 3.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))   # indefinite
    b = torch.randn(3, 7, 1, generator=g, dtype=torch.float64)
    torch.testing.assert_close(spd_solve(a, b), torch.linalg.solve(a, b), rtol=1e-10, atol=1e-12)


def test_kfold_predictions_equal_sklearn_pipeline():
    rng = np.random.default_rng(0)
    n, d, k = 90, 30, 5
    x = rng.normal(size=(n, d)) + 3.0
    y = (x[:, 0] + 0.7 * rng.normal(size=n) > 3.0).astype(int)
    folds = stratified_folds(y, k, seed=1)
    pred = kfold_predictions(torch.from_numpy(x), torch.from_numpy(y)[None], folds, C=0.5, tol=1e-12)[0].numpy()
    ref = np.empty(n, dtype=int)
    for f in range(k):
        tr, te = folds != f, folds == f
        mu, sd = x[tr].mean(0), x[tr].std(0)
        model = LogisticRegression(C=0.5, tol=1e-12, max_iter=100_000).fit((x[tr] - mu) / sd, y[tr])
        ref[te] = model.predict((x[te] - mu) / sd)
    assert np.array_equal(pred, ref)


def test_separable_data_scores_one_and_shuffled_labels_score_chance():
    rng = np.random.default_rng(3)
    n, d = 200, 40
    y = np.repeat([0, 1], n // 2)
    x = rng.normal(size=(n, d))
    x[:, 5] = np.where(y == 1, 1.0, -1.0) * (2.0 + np.abs(x[:, 5]))   # a planted, separating feature
    folds = stratified_folds(y, 5, seed=0)
    shuffled = np.random.default_rng(9).permutation(y)
    pred = kfold_predictions(torch.from_numpy(x), torch.from_numpy(np.stack([y, shuffled])), folds, 1.0)
    acc = (pred.numpy() == np.stack([y, shuffled])).mean(1)
    assert acc[0] == 1.0
    assert abs(acc[1] - 0.5) < 3 * np.sqrt(0.25 / n)


def test_folds_are_stratified_and_keep_groups_together():
    y = np.array([0] * 30 + [1] * 20)
    folds = stratified_folds(y, 5, seed=0)
    assert all(np.sum((folds == f) & (y == 1)) == 4 for f in range(5))
    groups = [f"g{i // 2}" for i in range(50)]
    gf = stratified_folds(y, 5, seed=0, groups=groups)
    assert all(gf[i] == gf[i + 1] for i in range(0, 50, 2))


def test_standardise_uses_training_rows_only():
    x = torch.tensor([[[0.0], [2.0], [100.0]]], dtype=torch.float64)
    (xs,), (mean, std) = standardise(x, weight=torch.tensor([[1.0, 1.0, 0.0]]))
    assert mean.item() == 1.0 and std.item() == 1.0 and xs[0, 2, 0].item() == 99.0


# -------------------------------------------------------------------------- the probes
def planted(session, n_per_class=12):
    """Texts whose class is a word: at the embeddings' mean it is linearly readable."""
    a = [f"word {i} apple" for i in range(n_per_class)]
    b = [f"word {i} engine" for i in range(n_per_class)]
    return tuple(a + b), ("fruit",) * n_per_class + ("machine",) * n_per_class


def test_run_probes_equals_independent_pipeline(tiny_sessions):
    s = tiny_sessions["llama"]
    texts, labels = planted(s)
    reports = []

    class Ctx:
        cancelled = False

        def report(self, done, total, partial=None, message=""):
            if partial is not None:
                reports.append(partial)

    result = run_probes(s, ProbeRequest(texts, labels, site="mean", folds=4, C=1.0), ctx=Ctx())
    assert result.complete and result.validate() is None
    # the curve filled in row by row
    assert [r.rows_done for r in reports] == list(range(1, s.n_layers + 2))
    assert np.isnan(reports[0].accuracy[1:]).all() and not np.isnan(reports[-1].accuracy).any()
    # independent: plain-hook states, scikit-learn on the same folds
    y = np.array([labels[i] == "machine" for i in range(len(labels))], dtype=int)
    folds = stratified_folds(y, 4, seed=0)
    feats = torch.stack([reference_rows(s, t).mean(1) for t in texts], 1).double().numpy()   # [R, n, d]
    for r in range(s.n_layers + 1):
        pred = np.empty(len(y), dtype=int)
        for f in range(4):
            tr, te = folds != f, folds == f
            mu, sd = feats[r][tr].mean(0), feats[r][tr].std(0)
            sd = np.where(sd > 1e-12, sd, 1.0)
            m = LogisticRegression(C=1.0, tol=1e-10, max_iter=100_000).fit((feats[r][tr] - mu) / sd, y[tr])
            pred[te] = m.predict((feats[r][te] - mu) / sd)
        assert result.accuracy[r] == pytest.approx((pred == y).mean(), abs=1.5 / len(y))
    assert result.accuracy[0] == 1.0    # the word itself is in the embeddings
    assert result.chance == 0.5 and result.label_names == ("fruit", "machine")
    assert 0.0 <= result.control_accuracy.min() and result.control_accuracy.max() < 0.95


def test_best_probe_exports(tiny_sessions, tmp_path):
    from safetensors import safe_open

    s = tiny_sessions["llama"]
    texts, labels = planted(s)
    result = run_probes(s, texts=texts, labels=labels, site="mean", folds=3)
    result = ProbeResult.from_dict(json.loads(json.dumps(result.to_dict())))  # survives a snapshot
    best = int(np.argmax(result.accuracy))
    assert result.best_row == best
    if best == 0:
        with pytest.raises(ProbeError, match="embeddings"):
            save_steering_vector(result, tmp_path / "v.safetensors")
        return
    path = save_steering_vector(result, tmp_path / "v.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, vec = f.metadata(), f.get_tensor("vector")
    assert vec.shape == (s.hf.config.hidden_size,) and abs(float(vec.norm()) - 1) < 1e-5
    assert meta["layer"] == str(best - 1) and meta["model"] == s.name and json.loads(meta["prompts"]) == list(texts)
    probe = load_probe(save_probe(result, tmp_path / "p.safetensors"))
    states = torch.stack([reference_rows(s, t).mean(1)[best] for t in texts]).numpy()
    prob = probe.predict_proba(states)
    y = np.array([lab == "machine" for lab in labels])
    assert ((prob > 0.5) == y).mean() >= 0.9 and probe.layer == best - 1 and probe.labels == ("fruit", "machine")


def test_probe_errors(tiny_sessions, tmp_path):
    s = tiny_sessions["llama"]
    with pytest.raises(ProbeError, match="two label values"):
        run_probes(s, texts=("a", "b", "c"), labels=("x", "y", "z"))
    with pytest.raises(ProbeError, match="folds"):
        run_probes(s, texts=("a", "b", "c", "d"), labels=("x", "x", "y", "y"), folds=5)
    with pytest.raises(ProbeError, match="site"):
        run_probes(s, texts=("a", "b"), labels=("x", "y"), site="first")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n')
    with pytest.raises(ProbeError, match="label"):
        load_labelled(bad)
    with pytest.raises(ProbeError, match="not found"):
        load_labelled(tmp_path / "missing.jsonl")
    result = run_probes(s, texts=("a", "b", "c", "d"), labels=("x", "x", "y", "y"), folds=2)
    with pytest.raises(ProbeError):
        probe_bytes(result.__class__(**{**result.__dict__, "rows_done": 1}))


def test_labelled_csv_and_builtin_sets(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello,1\nworld,0\n")
    data = load_labelled(path)
    assert data.texts == ("hello", "world") and data.labels == ("1", "0") and data.groups is None
    sets = builtin_sets()
    assert {"facts", "gender", "city_animal"} <= set(sets)
    for info in sets.values():
        assert info["size"] > 50 and len(info["classes"]) == 2 and info["description"]
