"""SAE features browsed with the neuron index, checked against plain-PyTorch references.

References never go through ``explorer.features`` or ``explorer.neurons``: the windows are built
here from the corpus text, the site's activations come from a plain forward hook on an
independent copy of the tiny model (same seed, identical weights, asserted), and the SAE's
TopK encode is written out below; concentrations and mean scores are counted by hand.
"""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
import torch

from cli.main import main
from explorer.features.browse import feature_profile
from explorer.features.sae import SAEConfig, SAEError, SparseAutoencoder
from explorer.features.saelens_io import load_sae, save_sae
from explorer.features.units import index_features, open_feature_index
from explorer.neurons.describe import DescriptionStore, Explanation, search
from explorer.neurons.index import IndexRequest, build_index
from explorer.neurons.units import compare_units, pattern_concentration, units_on_text
from helpers import corpus_head, reference_windows, save_model_dir
from tiny_models import make_tiny_model

LAYER, WIDTH, K = 1, 48, 6
WINDOW, MAX_TOKENS, TOP_K, N_RANDOM, BATCH = 32, 1536, 6, 5, 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_head(tmp_path_factory.mktemp("corpus"), 12)


def request(corpus) -> IndexRequest:
    return IndexRequest(corpus_path=str(corpus), max_tokens=MAX_TOKENS, window=WINDOW, top_k=TOP_K,
                        n_random=N_RANDOM, batch_windows=BATCH, checkpoint_every=2)


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    """A random TopK SAE at layer 1's residual output of tiny-llama, saved in the SAELens layout."""
    g = torch.Generator().manual_seed(3)
    w_dec = torch.randn(WIDTH, 64, generator=g)
    w = {"W_enc": w_dec.t().contiguous() * 0.5, "b_enc": torch.randn(WIDTH, generator=g) * 0.1,
         "W_dec": w_dec, "b_dec": torch.randn(64, generator=g) * 0.1}
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=WIDTH, architecture="topk", k=K,
                                      metadata={"hook_name": f"blocks.{LAYER}.hook_resid_post",
                                                "model_name": "tiny-llama"}), w)
    return save_sae(sae, tmp_path_factory.mktemp("sae"))


@pytest.fixture(scope="module")
def built(tiny_sessions, sae_dir, corpus):
    session = tiny_sessions["llama"]
    return index_features(session, str(sae_dir), request(corpus))


@pytest.fixture(scope="module")
def neuron_index(tiny_sessions, corpus, tmp_path_factory):
    return build_index(tiny_sessions["llama"], request(corpus), out_dir=tmp_path_factory.mktemp("neurons"))


def plain_features(session, tokenizer, sae_dir, ids: np.ndarray) -> np.ndarray:
    """[windows, W, d_sae]: block 1's output from a plain copy of the model (forward hook), then
    TopK encode by hand: h = (x − b_dec) W_enc + b_enc; the k largest through a ReLU; position 0 zero."""
    model = make_tiny_model("llama", len(tokenizer), seed=0)
    for (name, p), q in zip(model.named_parameters(), session.hf.parameters()):
        assert torch.equal(p, q), name
    w = load_sae(sae_dir).weights()
    got = []
    handle = model.get_submodule(f"model.layers.{LAYER}").register_forward_hook(
        lambda m, a, o: got.append((o[0] if isinstance(o, tuple) else o).detach().clone()))
    try:
        with torch.no_grad():
            for chunk in torch.from_numpy(ids).split(16):
                model(chunk)
    finally:
        handle.remove()
    x = torch.cat(got).double()
    h = (x - w["b_dec"].double()) @ w["W_enc"].double() + w["b_enc"].double()
    out = torch.zeros_like(h)
    order = torch.argsort(h, dim=-1, descending=True)[..., :K]
    out.scatter_(-1, order, h.gather(-1, order).clamp(min=0))
    out[:, 0] = 0   # each window's first position (the attention sink) reads as 0
    return out.float().numpy()


@pytest.fixture(scope="module")
def reference(built, tiny_sessions, tokenizer, corpus, sae_dir):
    windows = reference_windows(tokenizer, corpus, WINDOW, MAX_TOKENS)
    return windows, plain_features(tiny_sessions["llama"], tokenizer, sae_dir, windows)


# ------------------------------------------------------------------ the index
def test_the_feature_index_is_the_neuron_index_with_one_row_of_features(built, sae_dir):
    assert built.complete and built.unit_kind == "sae" and built.unit_name == "feature"
    assert built.layers == [LAYER] and built.n_units == WIDTH and built.path == sae_dir / "index"
    assert built.arrays["top_act"].shape == (1, WIDTH, TOP_K)
    units = built.manifest["units"]
    assert units["sae"]["hook_name"] == "blocks.1.hook_resid_post" and units["sae"]["d_sae"] == WIDTH
    assert open_feature_index(sae_dir).manifest == built.manifest


def test_stored_examples_rerun_to_their_stored_activations(built, reference):
    windows, acts = reference                                          # [windows, W, F]
    a = built.arrays
    assert np.array_equal(a["windows"], windows[a["window_index"]])
    wmax = acts.max(axis=1)                                            # [windows, F]
    order = np.argsort(-wmax, axis=0, kind="stable")[:TOP_K]
    np.testing.assert_allclose(a["top_act"][0], np.take_along_axis(wmax, order, 0).T, atol=1e-4, rtol=1e-4)
    for f in range(WIDTH):
        for e in built.top_examples(LAYER, f) + built.random_examples(LAYER, f):
            assert np.array_equal(e.token_ids, windows[e.window_index])
            np.testing.assert_allclose(acts[e.window_index, e.position, f], e.activation, atol=1e-4, rtol=1e-4)
    # statistics over every token
    flat = acts.reshape(-1, WIDTH)
    np.testing.assert_array_equal(a["n_pos"][0], (flat > 0).sum(0))
    np.testing.assert_allclose(a["act_sum"][0], flat.astype(np.float64).sum(0), rtol=1e-4, atol=1e-3)
    stats = built.stats(LAYER, 7)
    assert stats.frequency == pytest.approx((flat[:, 7] > 0).mean())


def test_explanation_scoring_reads_the_features(built, reference, tiny_sessions):
    from explorer.neurons.describe import example_activations

    windows, acts = reference
    top, rand = example_activations(built, LAYER, 4, tiny_sessions["llama"])
    np.testing.assert_allclose(top.token_activations, acts[top.window_index, :, 4], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(rand.token_activations, acts[rand.window_index, :, 4], atol=1e-4, rtol=1e-4)


def test_a_feature_is_explained_and_scored_on_its_true_activations(built, reference, tiny_sessions, tmp_path):
    from explorer.neurons.describe import DescriptionStore, explain_neuron

    windows, acts = reference
    store = DescriptionStore(tmp_path)                   # not the index's: other tests count its explanations
    e = explain_neuron(tiny_sessions["llama"], index=built, layer=LAYER, neuron=4, store=store, n_explain=2,
                       n_score_top=1, n_score_random=1, max_new_tokens=4)
    scored = [built.top_examples(LAYER, 4)[1], built.random_examples(LAYER, 4)[0]]
    np.testing.assert_allclose(e.true, acts[[x.window_index for x in scored], :, 4], atol=1e-4, rtol=1e-4)
    assert e.simulated.shape == e.true.shape and store.get_explanation(LAYER, 4, e.explainer) is not None


def test_a_token_list_explanation_is_scored_on_held_out_examples_by_matching(built, reference, tiny_sessions,
                                                                             tmp_path):
    """The "tokens" explainer: the shown examples' tokens at ≥ half the maximum, predicted 10 where they
    occur and 0 elsewhere on the held-out top and random examples; the score is their Pearson r."""
    from explorer.neurons.describe import DescriptionStore, explain_neuron

    windows, acts = reference
    top = built.top_examples(LAYER, 4)
    shown, held = top[0::2][:3], top[1::2][:3]
    rand = built.random_examples(LAYER, 4)[:3]
    true_shown = acts[[x.window_index for x in shown], :, 4]
    peak = true_shown.max()
    listed = {t for x, a in zip(shown, true_shown) for t, v in zip(x.tokens, a) if np.floor(10 * max(v, 0) / peak) >= 5}
    scored = held + rand
    sim = np.array([[10.0 if t in listed else 0.0 for t in x.tokens] for x in scored])
    true = acts[[x.window_index for x in scored], :, 4]
    e = explain_neuron(tiny_sessions["llama"], index=built, layer=LAYER, neuron=4, store=DescriptionStore(tmp_path),
                       explainer="tokens", n_explain=3, n_score_top=3, n_score_random=3)
    assert e.explainer == "tokens" and listed and set(json.loads(e.explanation.split("tokens ", 1)[1])) == listed
    np.testing.assert_array_equal(e.simulated, sim)
    assert e.score == pytest.approx(float(np.corrcoef(sim.ravel(), true.ravel())[0, 1]), abs=1e-4)


def test_units_on_text_equal_the_plain_encode(built, tiny_sessions, tokenizer, sae_dir):
    session = tiny_sessions["llama"]
    text = "The nurse said that she was tired"
    fired = units_on_text(session, built, text, top_k=3)
    ids = np.array([tokenizer(text, add_special_tokens=False).input_ids])
    ref = plain_features(session, tokenizer, sae_dir, ids)[0]
    for t in range(len(fired.tokens)):
        np.testing.assert_allclose(fired.activations[t], np.sort(ref[t])[::-1][:3], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(ref[t, fired.units[t]], fired.activations[t], atol=1e-4, rtol=1e-4)
    assert fired.unit_name == "feature" and fired.validate() is None


def test_search_finds_a_planted_feature(built, reference):
    windows, acts = reference
    # by token: the feature whose plain top activation sits on a token is found by that token
    f = 11
    w, pos = np.unravel_index(np.argmax(acts[:, :, f]), acts.shape[:2])
    token = built.token_strings([windows[w, pos]])[0]
    assert (LAYER, f) in {(h.layer, h.neuron) for h in search(built, token=token, limit=1000)}
    # by description: a planted explanation
    DescriptionStore(built.path).put_explanation(Explanation(
        layer=LAYER, neuron=29, explainer="planted", explanation="legal contracts and clauses", score=0.5,
        score_note="", n_top=0, n_random=0, max_activation=1.0, simulated=np.zeros((0, WINDOW), np.float32),
        true=np.zeros((0, WINDOW), np.float32)))
    hits = search(built.path, query="contracts")
    assert [(h.layer, h.neuron, h.kind) for h in hits] == [(LAYER, 29, "explanation")]


# ------------------------------------------------------------------ comparison
def test_pattern_concentration_on_a_hand_case():
    ids = np.array([[5, 5, 7, -1], [1, 2, 3, 4], [9, 9, 9, 9]])
    acts = np.array([[2.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, -1.0, 0.0, 0.0]])
    valid = np.array([[True, True, True, False], [True] * 4, [True] * 4])
    c = pattern_concentration(ids, acts, valid)
    assert c[0] == pytest.approx(3 / 4) and c[1] == pytest.approx(1 / 4) and np.isnan(c[2])


def _hand_concentration(index, layer):
    values = []
    for u in range(index.n_units):
        mass: dict[str, float] = defaultdict(float)
        for e in index.top_examples(layer, u):
            mass[e.token] += max(e.activation, 0.0)
        total = sum(mass.values())
        if total > 0:
            values.append(max(mass.values()) / total)
    return np.mean(values), np.mean([v >= 0.5 for v in values]), len(values)


def _plant(index, scores: dict[int, float | None]):
    store = DescriptionStore(index.path)
    empty = np.zeros((0, WINDOW), np.float32)
    for unit, score in scores.items():
        store.put_explanation(Explanation(layer=LAYER, neuron=unit, explainer="x", explanation=f"unit {unit}",
                                          score=score, score_note="", n_top=0, n_random=0, max_activation=1.0,
                                          simulated=empty, true=empty))


def test_compare_equals_a_hand_computation(built, neuron_index):
    _plant(built, {1: 0.6, 2: 0.2, 3: None})
    _plant(neuron_index, {4: 0.1, 5: -0.1})
    c = compare_units(built, neuron_index, explainer="x")
    fc, fs, fl = _hand_concentration(built, LAYER)
    nc, ns, nl = _hand_concentration(neuron_index, LAYER)
    assert c.layer == LAYER and c.feature_units == WIDTH and c.neuron_units == neuron_index.d_mlp
    assert (c.feature_live, c.neuron_live) == (fl, nl)
    assert c.feature_concentration == pytest.approx(fc) and c.neuron_concentration == pytest.approx(nc)
    assert c.feature_single_token == pytest.approx(fs) and c.neuron_single_token == pytest.approx(ns)
    assert (c.feature_explained, c.feature_scored, c.neuron_explained, c.neuron_scored) == (3, 2, 2, 2)
    assert c.feature_mean_score == pytest.approx(0.4) and c.neuron_mean_score == pytest.approx(0.0)
    assert c.validate() is None and type(c).from_dict(json.loads(json.dumps(c.to_dict()))).to_dict() == c.to_dict()


# ------------------------------------------------------------------ the card
def test_feature_profile_joins_examples_inputs_and_outputs(built, tiny_sessions, sae_dir, reference):
    session = tiny_sessions["llama"]
    card = feature_profile(session, str(sae_dir), built, 9, top_k=4, n_examples=3)
    windows, acts = reference
    ex = built.top_examples(LAYER, 9, 3)
    assert card.example_positions.tolist() == [e.position for e in ex]
    np.testing.assert_allclose(card.example_activations, [e.activation for e in ex])
    assert card.input_tokens[0] == ex[0].token or card.input_counts[0] > 1
    # the embedding inputs: W_E · W_enc[:, f], mean-subtracted, highest first (plain)
    w = load_sae(sae_dir).weights()
    ref = session.hf.get_input_embeddings().weight.detach().double() @ w["W_enc"][:, 9].double()
    ref = ref - ref.mean()
    np.testing.assert_allclose(card.embed_values, torch.sort(ref, descending=True).values[:4].numpy(), rtol=1e-5)
    assert card.top_tokens.shape == (4,) and card.validate() is None


def test_errors_are_clear(built, tiny_sessions, sae_dir, tmp_path):
    with pytest.raises(Exception, match="feature 48 is out of range"):
        built.top_examples(LAYER, WIDTH)
    with pytest.raises(Exception, match="layer 0 is not indexed"):
        built.stats(0, 1)
    with pytest.raises(SAEError, match="no feature index"):
        open_feature_index(tmp_path)
    other = load_sae(sae_dir).with_config(metadata={"hook_name": "blocks.1.hook_resid_post",
                                                    "model_name": "gemma-2-2b"})
    with pytest.raises(SAEError, match="trained on gemma-2-2b"):
        index_features(tiny_sessions["llama"], other, out_dir=tmp_path / "x", max_tokens=64)


# ------------------------------------------------------------------ CLI
def test_cli_index_show_search_compare(tmp_path, tokenizer, corpus, capsys, sae_dir, neuron_index):
    model_dir = save_model_dir(tmp_path / "model", make_tiny_model("llama", len(tokenizer)), tokenizer)
    sae = load_sae(sae_dir)
    sae_cli = save_sae(sae.with_config(metadata={"hook_name": "blocks.1.hook_resid_post",
                                                 "model_name": "model"}), tmp_path / "sae")
    base = ["--model", str(model_dir), "--device", "cpu"]
    narrow = save_sae(SparseAutoencoder.init(SAEConfig(d_in=16, d_sae=8, architecture="topk", k=2, metadata={
        "hook_name": "blocks.1.hook_resid_post"})), tmp_path / "narrow")
    assert main(["sae", "index", *base, "--sae", str(narrow), "--corpus", str(corpus)]) == 2
    assert "width 16 but the model has d_model 64" in capsys.readouterr().err   # before the model loads
    assert main(["sae", "index", *base, "--sae", str(sae_dir), "--corpus", str(corpus)]) == 2
    assert "trained on tiny-llama but the model is model" in capsys.readouterr().err
    assert main(["sae", "show", "--sae", str(sae_cli), "--feature", "1", "--json"]) == 2
    assert "no feature index" in capsys.readouterr().err
    assert main(["sae", "index", *base, "--sae", str(sae_cli), "--corpus", str(corpus), "--max-tokens", "512",
                 "--window", "32", "--top-k", "4", "--n-random", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["units"]["kind"] == "sae" and out["tokens_done"] == 512
    assert main(["sae", "show", "--sae", str(sae_cli), "--feature", "3", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {"layer", "feature", "model", "tokens_indexed", "top", "random", "pattern", "stats",
            "descriptions"} <= set(shown)
    assert len(shown["top"]) == 4 and {"tokens", "position", "activation", "token"} <= set(shown["top"][0])
    assert main(["sae", "show", "--sae", str(sae_cli), "--feature", str(WIDTH), "--json"]) == 2
    assert "out of range" in capsys.readouterr().err
    token = shown["top"][0]["token"]
    assert main(["sae", "search", "--sae", str(sae_cli), "--token", token, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert any(r["feature"] == 3 for r in found["results"])
    assert main(["sae", "compare", "--sae", str(sae_cli), "--neurons", str(neuron_index.path), "--json"]) == 2
    assert "compare indexes of one model" in capsys.readouterr().err
    assert main(["neurons", "index", *base, "--corpus", str(corpus), "--max-tokens", "512", "--window", "32",
                 "--top-k", "4", "--n-random", "3", "--out", str(tmp_path / "nidx"), "--json"]) == 0
    capsys.readouterr()
    assert main(["sae", "explain", *base, "--sae", str(sae_cli), "--feature", "3", "--n-explain", "2",
                 "--n-score", "1", "--json"]) == 0
    explained = json.loads(capsys.readouterr().out)
    assert explained["feature"] == 3 and {"explanation", "score", "explainer"} <= set(explained)
    assert main(["sae", "compare", "--sae", str(sae_cli), "--neurons", str(tmp_path / "nidx"), "--json"]) == 0
    cmp = json.loads(capsys.readouterr().out)
    assert cmp["layer"] == LAYER and {"feature_concentration", "neuron_concentration", "feature_mean_score",
                                      "neuron_mean_score"} <= set(cmp)
    assert cmp["feature_explained"] == 1 and cmp["neuron_explained"] == 0


# ------------------------------------------------------------------ the app
def test_the_features_tab_builds_and_shows_a_card(tiny_sessions, sae_dir, built, neuron_index):
    import asyncio

    import panel as pn
    from bokeh.document import Document

    from explorer.persistence.history import History
    from widgets.app import TAB_HELP
    from widgets.feature_view import FeatureView
    from widgets.registry import figures_for

    history = History()
    view = FeatureView(tiny_sessions["llama"], history=history, background=False)
    assert "Features" in TAB_HELP
    view.sae_path = str(sae_dir)
    assert view.open() is not None and view.index.n_units == WIDTH
    view.feature = 9
    card = asyncio.run(view.show_card())
    assert card is not None and card.feature == 9 and view.error == ""
    assert "Promotes" in view._card.object and "data-act" in view._examples.object
    assert view._hist.object is not None
    token = built.top_examples(LAYER, 9)[0].token
    view.query = "token: " + token
    hits = view.do_search()
    assert hits, (repr(token), view.error)
    assert [h.neuron for h in hits] == [h.neuron for h in search(built, token=token, limit=100)]
    fired = asyncio.run(view.fire())
    assert fired is not None and "feature" in view._fire.object
    view.explain_settings = dict(n_explain=2, n_score_top=1, n_score_random=1, max_new_tokens=4)
    explained = asyncio.run(view.explain_feature())
    assert explained is not None and "simulation score" in view._explanation.object
    view.neuron_index = str(neuron_index.path)
    cmp = asyncio.run(view.compare())
    assert cmp is not None and "concentration" in view._compare.object
    kinds = [type(e.result).__name__ for e in history.entries]
    assert kinds == ["FeatureProfile", "ExampleActivations", "UnitsOnText", "Explanation", "UnitComparison"]
    for e in history.entries:
        assert figures_for(e.result, {})
    # the results go into a snapshot and its HTML export, and come back out
    from explorer.persistence.snapshot import read_snapshot, snapshot_bytes
    from widgets.export import snapshot_page

    back = read_snapshot(snapshot_bytes(history.entries))
    assert [type(e.result).__name__ for e in back.entries] == kinds
    assert back.entries[0].result.to_dict() == card.to_dict()
    assert "Promotes" in snapshot_page(back)
    assert pn.panel(view).get_root(Document()) is not None
    view.feature = WIDTH - 1
    # the token-list explainer: explain 3 random units of each side first, then compare their scores
    view.explainer, view.explain_first = "token list", 3
    by_tokens = asyncio.run(view.compare())
    assert by_tokens is not None and by_tokens.explainer == "tokens" and view.error == ""
    assert by_tokens.feature_explained == 3 and by_tokens.neuron_explained == 3
    assert by_tokens.feature_scored > 0 and by_tokens.feature_mean_score is not None
    view.sae_path = str(sae_dir.parent)   # no index there
    view.index = None
    assert asyncio.run(view.show_card()) is None and "no feature index" in view.error
