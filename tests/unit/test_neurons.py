"""The neuron index on tiny models, checked against plain-PyTorch references.

References never go through the engine: each tiny model is rebuilt as a separate plain copy
(same seed, identical weights, asserted), the neuron activations (the input of each block's MLP
out-projection, module paths written out here per family) are collected with forward pre-hooks
over windows built here from the corpus text, and everything is compared with brute force
(argsort over all windows, bottom-k priorities over all windows, counts over all tokens).
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

import helpers
from cli.main import main
from explorer.core.corpus import CorpusError
from explorer.core.errors import ExplorerError
from explorer.core.jobs import Job
from explorer.neurons.index import (
    IndexRequest,
    NeuronExample,
    NeuronIndex,
    NeuronIndexError,
    NeuronStats,
    build_index,
    hist_bins,
    hist_edges,
    hist_quantiles,
    window_priority,
)
from helpers import corpus_head
from tiny_models import make_tiny_model

# The families with distinct MLPs: Llama's SwiGLU, GPT-2's Conv1D, NeoX's, Phi-3's fused
# gate_up_proj, Gemma's GELU gates (Gemma 2, Gemma 3), OLMo-2's post-normed MLP, Qwen3.
FAMS = ("llama", "gpt2", "gpt_neox", "phi3", "gemma2", "gemma3_text", "olmo2", "qwen3")
_LLAMA_LIKE = ("llama", "phi3", "gemma2", "gemma3_text", "olmo2", "qwen3")
BLOCKS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", **{f: "model.layers" for f in _LLAMA_LIKE}}
MLP_OUT = {"gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h", **{f: "mlp.down_proj" for f in _LLAMA_LIKE}}
WINDOW, MAX_TOKENS, TOP_K, N_RANDOM, BATCH = 32, 1536, 6, 5, 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 12 articles of the default corpus as a small text corpus."""
    return corpus_head(tmp_path_factory.mktemp("corpus"), 12)


def request(corpus, **kw) -> IndexRequest:
    args = dict(corpus_path=str(corpus), max_tokens=MAX_TOKENS, window=WINDOW, top_k=TOP_K, n_random=N_RANDOM,
                batch_windows=BATCH, hist_stride=8, checkpoint_every=2)
    args.update(kw)
    return IndexRequest(**args)


def reference_windows(tokenizer, corpus, window=WINDOW, max_tokens=MAX_TOKENS) -> np.ndarray:
    return helpers.reference_windows(tokenizer, corpus, window, max_tokens)


def plain_acts(family, tokenizer, session, ids: np.ndarray) -> list[np.ndarray]:
    """Neuron activations [windows, W, N] per layer from a separate plain model and pre-hooks."""
    model = make_tiny_model(family, len(tokenizer), seed=0)
    for (name, p), q in zip(model.named_parameters(), session.hf.parameters()):
        assert torch.equal(p, q), name
    blocks = model.get_submodule(BLOCKS[family])
    store: list[list[torch.Tensor]] = [[] for _ in blocks]
    hooks = [blk.get_submodule(MLP_OUT[family]).register_forward_pre_hook(
        lambda mod, args, i=i: store[i].append(args[0].detach().clone())) for i, blk in enumerate(blocks)]
    try:
        with torch.no_grad():
            for chunk in torch.from_numpy(ids).split(16):
                model(chunk)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s).float().numpy() for s in store]


@pytest.fixture(scope="module")
def built(tiny_sessions, tokenizer, corpus, tmp_path_factory):
    """family -> (index, reference windows, reference activations)."""
    out = {}
    for family in FAMS:
        session = tiny_sessions[family]
        index = build_index(session, request(corpus), out_dir=tmp_path_factory.mktemp(family))
        windows = reference_windows(tokenizer, corpus)
        out[family] = (index, windows, plain_acts(family, tokenizer, session, windows))
    return out



# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("family", FAMS)
def test_windows_match_an_independent_tokenisation(built, family):
    index, windows, _ = built[family]
    a = index.arrays
    assert index.tokens_done == len(windows) * WINDOW == MAX_TOKENS // WINDOW * WINDOW
    assert np.array_equal(a["windows"], windows[a["window_index"]])


@pytest.mark.parametrize("family", FAMS)
def test_top_k_is_exact_against_brute_force(built, family):
    index, windows, acts = built[family]
    a = index.arrays
    for layer, ref in enumerate(acts):
        wmax = ref.max(axis=1)                                 # [windows, N]
        order = np.argsort(-wmax, axis=0, kind="stable")[:TOP_K]
        expect = np.take_along_axis(wmax, order, axis=0).T     # [N, k], highest first
        np.testing.assert_allclose(a["top_act"][layer], expect, atol=1e-5, rtol=1e-5)
        win = a["window_index"][a["top_row"][layer]]           # [N, k] stream window ids
        n = np.arange(ref.shape[2])[:, None]
        # the stored window and position hold the stored activation, which is that window's maximum
        np.testing.assert_allclose(ref[win, a["top_pos"][layer], n], a["top_act"][layer], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(wmax[win, n], a["top_act"][layer], atol=1e-5, rtol=1e-5)
        # no window is repeated within a neuron's top-k
        assert all(len(set(row)) == TOP_K for row in win)


@pytest.mark.parametrize("family", FAMS)
def test_random_sample_is_the_bottom_k_priority_windows(built, family):
    index, windows, acts = built[family]
    a = index.arrays
    prio = [window_priority(0, i) for i in range(len(windows))]
    expect = sorted(range(len(windows)), key=lambda i: (prio[i], i))[:N_RANDOM]
    assert list(a["window_index"][a["rand_row"]]) == expect
    for layer, ref in enumerate(acts):
        win = a["window_index"][a["rand_row"]][None, :]        # [1, R]
        n = np.arange(ref.shape[2])[:, None]
        np.testing.assert_allclose(ref[win, a["rand_pos"][layer], n], a["rand_act"][layer], atol=1e-5, rtol=1e-5)
    # positions differ between neurons (each neuron has its own random position)
    assert len(np.unique(a["rand_pos"][0, :, 0])) > 1


@pytest.mark.parametrize("family", FAMS)
def test_statistics_against_all_tokens(built, family):
    index, windows, acts = built[family]
    a = index.arrays
    for layer, ref in enumerate(acts):
        flat = ref.reshape(-1, ref.shape[2])
        assert np.abs(a["n_pos"][layer] - (flat > 0).sum(0)).max() <= 1
        np.testing.assert_allclose(a["act_sum"][layer], flat.astype(np.float64).sum(0), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(a["act_min"][layer], flat.min(0), atol=1e-5)
        sub = ref[:, ::8].reshape(-1, ref.shape[2])
        counts = np.stack([np.bincount(np.digitize(sub[:, n], hist_edges(), right=True), minlength=a["hist"].shape[-1])
                           for n in range(ref.shape[2])])
        # the arithmetic binning agrees with a binary search except at float rounding on an edge
        assert np.abs(a["hist"][layer].astype(np.int64) - counts).sum() <= 2
    st = index.stats(1, 7)
    flat = acts[1][:, :, 7].ravel()
    assert st.tokens == flat.size
    assert st.frequency == pytest.approx((flat > 0).mean(), abs=1 / flat.size)
    assert st.mean == pytest.approx(flat.mean(), rel=1e-4, abs=1e-6)
    assert st.std == pytest.approx(flat.std(), rel=1e-3, abs=1e-6)
    assert st.max == pytest.approx(flat.max(), abs=1e-5)
    assert st.min == pytest.approx(flat.min(), abs=1e-5)
    sub = np.sort(acts[1][:, ::8, 7].ravel())
    for q, value in zip(st.quantile_levels, st.quantiles):
        lo = np.quantile(sub, max(0.0, q - 0.02)) - 1e-3
        hi = np.quantile(sub, min(1.0, q + 0.02)) + 1e-3
        assert lo - 0.16 * abs(lo) <= value <= hi + 0.16 * abs(hi), (q, value, lo, hi)


@pytest.mark.parametrize("family", FAMS)
def test_every_stored_example_reruns_to_its_activation(built, tokenizer, tiny_sessions, family):
    """Each example's stored tokens, fed to a plain copy of the model, give the stored activation."""
    index, _, _ = built[family]
    a = index.arrays
    acts = plain_acts(family, tokenizer, tiny_sessions[family], a["windows"].astype(np.int64))
    n = np.arange(index.d_mlp)[:, None]
    for layer, ref in enumerate(acts):
        np.testing.assert_allclose(ref[a["top_row"][layer], a["top_pos"][layer], n], a["top_act"][layer], atol=1e-4)
        np.testing.assert_allclose(ref[a["rand_row"][None, :], a["rand_pos"][layer], n], a["rand_act"][layer],
                                   atol=1e-4)
    ex = index.top_examples(2, 11)[0]
    assert ex.activation == pytest.approx(float(acts[2][a["top_row"][2, 11, 0], ex.position, 11]), abs=1e-4)


# ------------------------------------------------------------------ reading
def test_examples_stats_and_round_trips(built, tokenizer):
    index, _, _ = built["llama"]
    top = index.top_examples(1, 3)
    assert len(top) == TOP_K and [e.rank for e in top] == list(range(TOP_K))
    assert all(x.activation >= y.activation for x, y in zip(top, top[1:]))
    e = top[0]
    assert list(e.tokens) == [tokenizer.decode([int(i)]) for i in e.token_ids]
    assert e.token == e.tokens[e.position] and e.kind == "top"
    rand = index.random_examples(1, 3)
    assert len(rand) == N_RANDOM and all(r.kind == "random" for r in rand)
    for obj in (e, rand[0], index.stats(1, 3)):
        again = type(obj).from_dict(json.loads(json.dumps(obj.to_dict())))
        for k, v in obj.to_dict().items():
            assert again.to_dict()[k] == v, k
    assert isinstance(index.stats(0, 0), NeuronStats) and isinstance(e, NeuronExample)
    with pytest.raises(NeuronIndexError, match="layer 9 is out of range"):
        index.top_examples(9, 0)
    with pytest.raises(NeuronIndexError, match="neuron 100000 is out of range"):
        index.stats(0, 100000)


def test_index_is_readable_without_the_model_and_has_no_pickle(built):
    index, _, _ = built["gpt2"]
    files = sorted(p.name for p in index.path.iterdir())
    assert files == ["index.safetensors", "manifest.json", "vocab.json"]  # the work files are gone
    with open(index.path / "index.safetensors", "rb") as f:
        assert b"\x80\x04" not in f.read(16)  # not a pickle: a safetensors header length comes first
    m = json.loads((index.path / "manifest.json").read_text())
    assert m["complete"] and m["model"]["name"] == "tiny-gpt2" and m["model"]["n_layers"] == 3
    assert m["model"]["config_hash"] and m["corpus"]["size"] > 0 and len(m["corpus"]["head_sha256"]) == 16
    assert m["settings"]["window"] == WINDOW and m["tokens_done"] == index.tokens_done
    again = NeuronIndex.open(index.path)
    assert again.top_examples(0, 1)[0].tokens.tolist() == index.top_examples(0, 1)[0].tokens.tolist()


def test_open_errors(tmp_path, built):
    with pytest.raises(NeuronIndexError, match="no neuron index"):
        NeuronIndex.open(tmp_path / "nothing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{oops")
    with pytest.raises(NeuronIndexError, match="not valid JSON"):
        NeuronIndex.open(bad)
    (bad / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(NeuronIndexError, match="not a neuron index"):
        NeuronIndex.open(bad)
    index, _, _ = built["llama"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("manifest.json", "vocab.json", "index.safetensors"):
        (broken / name).write_bytes((index.path / name).read_bytes())
    m = json.loads((broken / "manifest.json").read_text())
    m["settings"]["top_k"] = TOP_K + 1
    (broken / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(NeuronIndexError, match="top_act has shape"):
        NeuronIndex.open(broken)


# ------------------------------------------------------------------ jobs, resume, cache
def _arrays_equal(a: NeuronIndex, b: NeuronIndex) -> None:
    assert set(a.arrays) == set(b.arrays)
    for k in a.arrays:
        assert np.array_equal(a.arrays[k], b.arrays[k]), k
    skip = {"created", "elapsed_s"}
    assert {k: v for k, v in a.manifest.items() if k not in skip} == \
        {k: v for k, v in b.manifest.items() if k not in skip}


def test_cancel_then_resume_equals_uninterrupted(tiny_sessions, corpus, tmp_path):
    session = tiny_sessions["llama"]
    whole = build_index(session, request(corpus), out_dir=tmp_path / "whole")
    reports = []

    def on_progress(progress, _):
        reports.append(progress)
        if len(reports) == 3:
            job.cancel()

    job = Job(lambda ctx: build_index(session, request(corpus), out_dir=tmp_path / "cut", ctx=ctx), on_progress=on_progress)
    partial = job.run()
    assert job.status == "cancelled"
    assert not partial.complete and 0 < partial.tokens_done < whole.tokens_done
    assert list((tmp_path / "cut" / ".work" / "checkpoints").glob("step-*/state.safetensors"))
    assert all("tokens/s" in p.message and "ETA" in p.message for p in reports[:3])
    assert reports[0].total == MAX_TOKENS // WINDOW * WINDOW
    resumed = Job(lambda ctx: build_index(session, request(corpus), out_dir=tmp_path / "cut", ctx=ctx)).run()
    assert resumed.complete
    _arrays_equal(whole, resumed)
    assert not (tmp_path / "cut" / ".work").exists()


def test_failure_midway_then_resume_equals_uninterrupted(tiny_sessions, corpus, tmp_path):
    """A build that dies between checkpoints redoes the batches after its last checkpoint."""
    session = tiny_sessions["gpt_neox"]
    whole = build_index(session, request(corpus, batch_windows=4), out_dir=tmp_path / "whole")
    calls = []

    def on_progress(progress, _):
        calls.append(progress.done)
        if len(calls) == 5:  # checkpoints after batches 2 and 4; batch 5 is written, then it dies
            raise RuntimeError("killed")

    with pytest.raises(ExplorerError, match="killed"):
        Job(lambda ctx: build_index(session, request(corpus, batch_windows=4), out_dir=tmp_path / "cut", ctx=ctx),
            on_progress=on_progress).run()
    assert not (tmp_path / "cut" / "manifest.json").exists()
    tokens = tmp_path / "cut" / ".work" / "tokens.bin"
    assert tokens.stat().st_size == 5 * 4 * WINDOW * 4  # five batches of four windows, int32
    resumed = build_index(session, request(corpus, batch_windows=4), out_dir=tmp_path / "cut")
    _arrays_equal(whole, resumed)


@pytest.mark.parametrize("seconds, checkpointed", [(0.0, 3), (3600.0, 0)])
def test_checkpoints_by_time(tiny_sessions, corpus, tmp_path, seconds, checkpointed):
    """Without ``checkpoint_every`` a checkpoint is written once ``checkpoint_seconds`` have passed
    (0: after every batch; an hour: not within this build), and resuming from it, or from nothing,
    still ends with the uninterrupted index."""
    from explorer.core.files import load_arrays as _load_arrays

    session = tiny_sessions["llama"]
    req = request(corpus, batch_windows=4, checkpoint_every=None, checkpoint_seconds=seconds)
    whole = build_index(session, req, out_dir=tmp_path / "whole")
    calls = []

    def on_progress(progress, _):
        calls.append(progress.done)
        if len(calls) == 3:
            raise RuntimeError("killed")

    with pytest.raises(ExplorerError, match="killed"):
        Job(lambda ctx: build_index(session, req, out_dir=tmp_path / "cut", ctx=ctx), on_progress=on_progress).run()
    ckpts = list((tmp_path / "cut" / ".work" / "checkpoints").glob("step-*/state.safetensors"))
    if checkpointed:
        assert len(ckpts) == 1  # only the latest is kept
        assert int(_load_arrays(ckpts[0])[1]["windows_done"]) == checkpointed * 4
    else:
        assert not ckpts
    _arrays_equal(whole, build_index(session, req, out_dir=tmp_path / "cut"))


def test_a_failing_batch_leaves_no_hooks_on_the_model(tiny_sessions, corpus, tmp_path, monkeypatch):
    """The index reads the neuron sites through hooks that exist only during its own forward: an
    error inside one propagates as itself and leaves the shared model as it was."""
    from explorer.neurons import index

    session = tiny_sessions["gpt2"]
    sites = [blk.get_submodule(MLP_OUT["gpt2"]) for blk in session.hf.get_submodule(BLOCKS["gpt2"])]
    ids = torch.arange(8)[None]
    with torch.no_grad():
        before = session.hf(ids).logits
    add_layer = index._State.add_layer

    def failing(self, layer, a):
        if layer == 1:
            raise ExplorerError("failed in layer 1")
        add_layer(self, layer, a)

    monkeypatch.setattr(index._State, "add_layer", failing)
    with pytest.raises(ExplorerError, match="failed in layer 1"):
        build_index(session, request(corpus), out_dir=tmp_path / "failed")
    assert all(not m._forward_pre_hooks for m in sites)
    with torch.no_grad():
        assert torch.equal(session.hf(ids).logits, before)
    monkeypatch.undo()
    build_index(session, request(corpus), out_dir=tmp_path / "ok")
    assert all(not m._forward_pre_hooks for m in sites)


def test_complete_index_is_reopened_and_mismatches_refused(tiny_sessions, corpus, tmp_path):
    session = tiny_sessions["llama"]
    first = build_index(session, request(corpus), out_dir=tmp_path / "idx")
    t0 = time.monotonic()
    again = build_index(session, request(corpus), out_dir=tmp_path / "idx")
    assert time.monotonic() - t0 < 1.0
    assert again.manifest["created"] == first.manifest["created"]
    with pytest.raises(NeuronIndexError, match="another model, corpus or settings"):
        build_index(session, request(corpus, top_k=3), out_dir=tmp_path / "idx")
    with pytest.raises(NeuronIndexError, match="another model, corpus or settings"):
        build_index(tiny_sessions["gpt2"], request(corpus), out_dir=tmp_path / "idx")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(NeuronIndexError, match="not a neuron index"):
        build_index(session, request(corpus), out_dir=other)


def test_default_directory_is_keyed_in_the_cache(tiny_sessions, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLORER_CACHE", str(tmp_path / "cache"))
    session = tiny_sessions["llama"]
    a = build_index(session, request(corpus, max_tokens=256))
    b = build_index(session, request(corpus, max_tokens=320))
    assert a.path.parent == b.path.parent == tmp_path / "cache" / "neurons"
    assert a.path != b.path and a.manifest["key"] == a.path.name


def test_state_is_bounded_by_settings_not_tokens(tiny_sessions, corpus, tmp_path):
    session = tiny_sessions["llama"]
    small = build_index(session, request(corpus, max_tokens=512), out_dir=tmp_path / "s")
    large = build_index(session, request(corpus, max_tokens=2048), out_dir=tmp_path / "l")
    for k in ("top_act", "rand_act", "hist", "n_pos"):
        assert small.arrays[k].shape == large.arrays[k].shape
    L, N = large.n_layers, large.d_mlp
    assert len(large.arrays["window_index"]) <= min(large.tokens_done // WINDOW, L * N * TOP_K + N_RANDOM)


def test_bad_requests(tiny_sessions, corpus, tmp_path):
    session = tiny_sessions["llama"]
    with pytest.raises(ExplorerError, match="less than one window"):
        build_index(session, request(corpus, max_tokens=8), out_dir=tmp_path / "a")
    with pytest.raises(ExplorerError, match="window must be"):
        build_index(session, request(corpus, window=1), out_dir=tmp_path / "b")
    short = tmp_path / "short.txt"
    short.write_text("only a few words\n")
    with pytest.raises(CorpusError, match="fewer than 32 tokens"):
        build_index(session, request(short), out_dir=tmp_path / "c")
    with pytest.raises(CorpusError, match="corpus not found"):
        build_index(session, request(tmp_path / "missing.txt"), out_dir=tmp_path / "d")
    with pytest.raises(ExplorerError, match="checkpoint_every must be"):
        build_index(session, request(corpus, checkpoint_every=0), out_dir=tmp_path / "e")
    with pytest.raises(ExplorerError, match="checkpoint_seconds must be"):
        build_index(session, request(corpus, checkpoint_seconds=-1.0), out_dir=tmp_path / "f")


# ------------------------------------------------------------------ histogram helpers
def test_hist_bins_and_quantiles():
    edges = hist_edges()
    x = torch.tensor([-5e3, -2.0, -1e-4, 0.0, 1e-4, 0.5, 2.0, 5e3], dtype=torch.float64)
    expect = np.digitize(x.numpy(), edges, right=True)
    assert hist_bins(x).tolist() == expect.tolist()
    rng = np.random.default_rng(0)
    values = rng.lognormal(0, 1, 20_000) - 1.0
    counts = np.bincount(np.digitize(values, edges, right=True), minlength=len(edges) + 1)
    qs = hist_quantiles(counts, edges, values.min(), values.max(), (0.1, 0.5, 0.9))
    for q, v in zip((0.1, 0.5, 0.9), qs):
        exact = np.quantile(values, q)
        assert abs(v - exact) <= 0.16 * abs(exact) + 1e-3
    assert np.isnan(hist_quantiles(np.zeros(len(edges) + 1), edges, 0, 1, (0.5,))).all()


# ------------------------------------------------------------------ CLI
@pytest.fixture
def cli_llama(tiny_sessions, monkeypatch):
    session = tiny_sessions["llama"]
    monkeypatch.setattr("cli.neurons.load_session", lambda args: session)
    return session


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_index_show_search(cli_llama, tokenizer, corpus, tmp_path, capsys):
    out_dir = tmp_path / "cli-index"
    code, out, err = run_cli(capsys, "neurons", "index", "--corpus", corpus, "--max-tokens", 512, "--window", 16,
                             "--top-k", 4, "--n-random", 3, "--out", out_dir, "--json")
    assert code == 0, err
    manifest = json.loads(out)
    assert manifest["complete"] and manifest["tokens_done"] == 512 and "indexing" in err  # tqdm on stderr

    code, out, err = run_cli(capsys, "neurons", "show", "--index", out_dir, "--layer", 2, "--neuron", 9, "--json")
    assert code == 0, err
    data = json.loads(out)
    top = data["top"]
    assert len(top) == 4 and [t["activation"] for t in top] == sorted((t["activation"] for t in top), reverse=True)
    for t in top:
        assert set(t) >= {"tokens", "token_ids", "position", "activation"}
        assert len(t["tokens"]) == len(t["token_ids"]) == 16 and all(isinstance(s, str) for s in t["tokens"])
    assert data["pattern"].startswith("fires on ")
    assert len(data["random"]) == 3 and set(data["stats"]) >= {"frequency", "quantiles", "max"}
    # each activation is the value at `position` when the model reads `token_ids`
    acts = plain_acts("llama", tokenizer, cli_llama, np.array([t["token_ids"] for t in top]))[2]
    for i, t in enumerate(top):
        assert acts[i, t["position"], 9] == pytest.approx(t["activation"], abs=1e-4)
        assert acts[i, :, 9].max() == pytest.approx(t["activation"], abs=1e-4)

    code, out, err = run_cli(capsys, "neurons", "show", "--index", out_dir, "--layer", 2, "--neuron", 9)
    assert code == 0 and "top examples:" in out and "[[" in out

    token = data["top"][0]["tokens"][data["top"][0]["position"]]
    code, out, err = run_cli(capsys, "neurons", "search", "--index", out_dir, "--token", token, "--json")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert any(r["layer"] == 2 and r["neuron"] == 9 for r in results)
    assert all(set(r) >= {"layer", "neuron", "description", "source"} for r in results)


@pytest.mark.parametrize("args, message", [
    (["neurons", "show", "--index", "/nonexistent/idx", "--layer", "0", "--neuron", "0"], "no neuron index"),
    (["neurons", "search", "--index", "/nonexistent/idx", "--query", "he"], "index directory not found"),
    (["neurons", "index", "--corpus", "/nonexistent/c.txt", "--out", "/tmp/x"], "corpus not found"),
])
def test_cli_bad_input_is_one_line_exit_2(cli_llama, capsys, args, message):
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_bad_neuron_and_missing_query(cli_llama, corpus, tmp_path, capsys):
    out_dir = tmp_path / "idx"
    assert run_cli(capsys, "neurons", "index", "--corpus", corpus, "--max-tokens", 256, "--window", 16,
                   "--out", out_dir)[0] == 0
    code, _, err = run_cli(capsys, "neurons", "show", "--index", out_dir, "--layer", 7, "--neuron", 0, "--json")
    assert code == 2 and "layer 7 is out of range" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "neurons", "search", "--index", out_dir)
    assert code == 2 and "--query" in err


def test_fused_statistics_give_the_same_index(tiny_sessions, corpus, tmp_path):
    """The compiled (fused) reductions agree with the plain ones: top-k, samples and histogram
    exactly, sums to float rounding; a last batch smaller than the compiled shape is handled."""
    from explorer.neurons import index

    session = tiny_sessions["llama"]
    # 48 windows in batches of 5: the last batch (3 windows) is not the compiled shape
    plain = build_index(session, request(corpus, fused="off", batch_windows=5), out_dir=tmp_path / "plain")
    fused = build_index(session, request(corpus, fused="on", batch_windows=5), out_dir=tmp_path / "fused")
    assert fused.tokens_done == plain.tokens_done == MAX_TOKENS // WINDOW * WINDOW
    assert index._FUSED[str(session.device)] is not index.layer_reductions  # really compiled
    for name in ("top_act", "top_row", "top_pos", "rand_act", "n_pos", "hist", "act_min"):
        np.testing.assert_array_equal(fused.arrays[name], plain.arrays[name], err_msg=name)
    for name in ("act_sum", "act_sumsq"):
        np.testing.assert_allclose(fused.arrays[name], plain.arrays[name], rtol=1e-5, atol=1e-4, err_msg=name)
    # "fused" only changes float rounding, so both builds have the same key (one index).
    assert fused.manifest["key"] == plain.manifest["key"]
