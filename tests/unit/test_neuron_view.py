"""The neuron view on a tiny llama, driven by its params (no browser), checked against the engine
and against plain PyTorch: a separate copy of the model with forward pre-hooks on the MLP
down-projection, over windows tokenised here from the corpus text.
"""
from __future__ import annotations

import asyncio
import json
import re

import numpy as np
import panel as pn
import pytest
import torch
from bokeh.document import Document
from bokeh.models import Span

from explorer.neurons.describe import (
    ExampleActivations,
    example_activations,
    import_descriptions,
    search,
    token_pattern,
)
from explorer.neurons.index import (
    IndexRequest,
    NeuronHistogram,
    NeuronIndex,
    PromptActivation,
    SelectiveNeurons,
    build_index,
    neuron_activations,
    prompt_activation,
)
from explorer.persistence.history import History
from tiny_models import make_tiny_model
from widgets import NeuronView, neuron_card, neuron_charts, neuron_index
from widgets import neuron_view as neuron_view_module

WINDOW, MAX_TOKENS, TOP_K, N_RANDOM, BATCH = 32, 1024, 6, 4, 8
SETTINGS = dict(max_tokens=MAX_TOKENS, window=WINDOW, top_k=TOP_K, n_random=N_RANDOM, batch_windows=BATCH)

NAMES = ["Anna", "Tom", "Maria", "James", "Lena", "Omar", "Grace", "Peter"]
JOBS = ["nurse", "carpenter", "teacher", "engineer", "doctor", "baker", "pilot", "lawyer"]
VERBS = ["said that", "thought that", "wrote that", "told us that"]
ENDS = ["would be late today.", "had finished the report.", "liked the new house by the river.",
        "was tired after the long shift.", "will travel to Paris in May."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text corpus written here: one short document per line."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(80):
        name, job = NAMES[i % len(NAMES)], JOBS[rng.integers(len(JOBS))]
        pronoun = "she" if i % 2 == 0 else "he"
        lines.append(f"{name} the {job} {VERBS[rng.integers(len(VERBS))]} {pronoun} "
                     f"{ENDS[rng.integers(len(ENDS))]} Later {pronoun} went home at {5 + i % 4} pm.")
    path = tmp_path_factory.mktemp("corpus") / "people.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def session(tiny_sessions):
    return tiny_sessions["llama"]


@pytest.fixture(scope="module")
def plain(session, tokenizer):
    """A separate plain copy of the tiny llama (same seed, identical weights, asserted)."""
    model = make_tiny_model("llama", len(tokenizer), seed=0)
    for (name, p), q in zip(model.named_parameters(), session.hf.parameters()):
        assert torch.equal(p, q), name
    return model


def plain_acts(model, ids: np.ndarray, layer: int) -> np.ndarray:
    """[B, T, N] neuron activations of one layer: the down-projection's input, by a pre-hook."""
    store = []
    hook = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda mod, args: store.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(torch.as_tensor(ids, dtype=torch.long).reshape(-1, ids.shape[-1]))
    finally:
        hook.remove()
    return store[0].float().numpy()


def reference_windows(tokenizer, corpus) -> np.ndarray:
    """The corpus packed into windows as the index documents it: documents joined by "\\n\\n"."""
    sep = tokenizer("\n\n", add_special_tokens=False).input_ids
    flat: list[int] = []
    for line in corpus.read_text(encoding="utf-8").splitlines():
        if line.strip():
            flat += tokenizer(line.strip(), add_special_tokens=False).input_ids + sep
    n = min(len(flat) // WINDOW, MAX_TOKENS // WINDOW)
    return np.array(flat[: n * WINDOW], dtype=np.int64).reshape(n, WINDOW)


def make_view(session, corpus, out_dir, **kw) -> NeuronView:
    args = dict(corpus=str(corpus), out_dir=str(out_dir), **SETTINGS)
    args.update(kw)
    view = NeuronView(session, history=History(), background=False)
    view.indexer.param.update(**args)
    return view


@pytest.fixture(scope="module")
def built(session, corpus, tmp_path_factory):
    """A view that built its index in the foreground, with every progress line it showed."""
    view = make_view(session, corpus, tmp_path_factory.mktemp("view-index"))
    lines: list[str] = []
    view.indexer.param.watch(lambda e: lines.append(e.new), "build_status")
    view.indexer.param.trigger("build")
    return view, lines


@pytest.fixture
def view(built, session):
    """A fresh view on the built index (each test starts without a card)."""
    v = NeuronView(session, history=History(), background=False)
    v.set_index(built[0].index)
    return v


def run(coro) -> None:
    asyncio.run(coro)


# ------------------------------------------------------------------ build
def test_build_in_the_view_opens_the_same_index_as_the_engine(built, session, corpus, tmp_path):
    view, lines = built
    index = view.index
    assert view.state.error == "" and index is not None and index.complete
    assert index.tokens_done == MAX_TOKENS // WINDOW * WINDOW
    assert view.indexer.index_dir == str(index.path) and "complete" in view.indexer.index_info
    assert view.indexer.build_percent == 100 and view.indexer.build_status.startswith(f"Built: {index.tokens_done:,} tokens")
    # the progress bar's lines: tokens done of the total, tokens/s and time left
    assert any(re.search(r"\d[\d,]* / 1,024 tokens · [\d,]+ tokens/s, ETA \d+m\d\ds", s) for s in lines), lines
    direct = build_index(session, IndexRequest(corpus_path=str(corpus), **SETTINGS), out_dir=tmp_path / "direct")
    for name, array in direct.arrays.items():
        assert np.array_equal(array, index.arrays[name]), name
    # the overview is there at once, and recorded
    assert isinstance(view.overview.result, SelectiveNeurons) and view.overview._chart.object is not None
    assert any(isinstance(e.result, SelectiveNeurons) for e in view.history.entries)


def test_a_cancelled_build_resumes_to_the_full_index(session, corpus, built, tmp_path):
    view = make_view(session, corpus, tmp_path / "idx")
    # cancel from the first progress report (the build checks between batches)
    watcher = view.indexer.param.watch(lambda e: view.indexer.param.trigger("cancel"), "build_percent")
    view.indexer.param.trigger("build")
    view.indexer.param.unwatch(watcher)
    assert view.index is None and view.state.error == ""
    done = int(re.search(r"Cancelled at ([\d,]+) tokens", view.indexer.build_status).group(1).replace(",", ""))
    assert 0 < done < MAX_TOKENS and "Build / Resume" in view.indexer.build_status
    view.indexer.param.trigger("build")
    assert view.index is not None and view.index.complete and view.state.error == ""
    full = built[0].index
    for name in ("top_act", "top_row", "top_pos", "windows", "hist", "rand_act", "n_pos"):
        assert np.array_equal(view.index.arrays[name], full.arrays[name]), name


def test_build_errors_are_visible(session, tmp_path, built):
    view = make_view(session, tmp_path / "missing.txt", tmp_path / "idx")
    view.indexer.param.trigger("build")
    assert "corpus not found" in view.state.error and view.index is None and not view.indexer.building
    # a job failure (here: a directory holding something else) reaches the view too
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not an index")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    view = make_view(session, empty, tmp_path / "idx2")
    view.indexer.param.trigger("build")
    assert "no documents" in view.state.error and "failed" in view.indexer.build_status
    # opening a directory that is not an index keeps the index that is open
    v = NeuronView(session, background=False)
    v.set_index(built[0].index)
    v.indexer.index_dir = str(other)
    v.indexer.param.trigger("open_index")
    assert "no neuron index" in v.state.error and v.index is built[0].index


def test_open_an_index_directory(built, session):
    v = NeuronView(session, background=False)
    v.indexer.index_dir = str(built[0].index.path)
    v.indexer.param.trigger("open_index")
    assert v.state.error == "" and v.index is not None and v.index.path == built[0].index.path
    assert v.overview.result is not None


# ------------------------------------------------------------------ the card
def test_card_values_equal_the_index(view, built):
    index = built[0].index
    run(view.open_neuron(1, 5))
    assert view.state.error == ""
    assert view.card.stats.to_dict() == index.stats(1, 5).to_dict()
    assert np.array_equal(view.card.histogram.counts, index.arrays["hist"][1, 5])
    assert view.card.pattern_text == token_pattern(index, 1, 5).summary
    top, rand = index.top_examples(1, 5), index.random_examples(1, 5)
    assert len(view.card.top) == len(top) == TOP_K and len(view.card.random) == len(rand) == N_RANDOM
    for shown, stored in ((view.card.top, top), (view.card.random, rand)):
        assert shown.positions.tolist() == [e.position for e in stored]
        assert np.allclose(shown.activations, [e.activation for e in stored])
        assert np.array_equal(shown.token_ids, np.stack([e.token_ids for e in stored]))
    html = view.card._card_html.object
    assert "Layer 1 · neuron 5" in html and f"{index.stats(1, 5).max:.4g}" in html
    # the histogram chart shows the index's counts, with the median and max marked
    source = view.card._histogram.object.select_one({"name": neuron_charts.HISTOGRAM_SOURCE})
    assert source.data["count"] == index.arrays["hist"][1, 5].tolist()
    assert {s.name for s in view.card._histogram.object.select({"type": Span})} >= {"histogram-median", "histogram-max"}
    labels = [e.label for e in view.history.entries]
    assert "neuron 1:5 stats" in labels and "neuron 1:5 top examples" in labels


def test_highlighted_activations_equal_the_model_on_the_stored_ids(view, built, session, plain):
    layer, neuron = 2, 7
    run(view.open_neuron(layer, neuron))
    for ex in (view.card.top, view.card.random):
        engine = neuron_activations(session, [layer], torch.from_numpy(ex.token_ids))[0][:, :, neuron].numpy()
        reference = plain_acts(plain, ex.token_ids, layer)[:, :, neuron]
        assert np.allclose(ex.token_activations, engine, atol=1e-4)
        assert np.allclose(ex.token_activations, reference, atol=1e-4)
        # the stored activation is the model's at the stored position (the max, for top examples)
        at = ex.token_activations[np.arange(len(ex)), ex.positions]
        assert np.allclose(at, ex.activations, atol=1e-4)
    assert np.allclose(view.card.top.token_activations.max(axis=1), view.card.top.activations, atol=1e-4)
    # the HTML shades every token and carries its activation
    html = view.card._top_html.object
    acts = [float(a) for a in re.findall(r"data-act='([^']*)'", html)]
    assert np.allclose(acts, view.card.top.token_activations.ravel(), atol=1e-6)
    assert html.count("class='tok peak'") == TOP_K and "background: rgba(" in html


def test_examples_are_computed_once_per_neuron(view, monkeypatch):
    calls = []
    real = neuron_card.example_activations

    def counting(index, layer, neuron, session=None):
        calls.append(session is not None)
        return real(index, layer, neuron, session)

    monkeypatch.setattr(neuron_card, "example_activations", counting)
    run(view.open_neuron(0, 3))
    run(view.open_neuron(0, 4))
    run(view.open_neuron(0, 3))
    assert calls.count(True) == 2  # the model ran for two neurons; the third open came from the cache
    assert view.card.stats.neuron == 3 and view.card.top.token_activations is not None


def test_bad_layer_or_neuron_is_visible_and_keeps_the_card(view):
    run(view.open_neuron(1, 2))
    card = view.card.stats
    run(view.open_neuron(99, 0))
    assert "layer 99 is out of range" in view.state.error and view.card.stats is card
    run(view.open_neuron(0, -1))
    assert "neuron -1 is out of range" in view.state.error and view.card.stats is card
    run(view.open_neuron(1, 2))
    assert view.state.error == ""


def test_no_index_says_how_to_build_one(session):
    v = NeuronView(session, background=False)
    run(v.open_neuron(0, 0))
    assert "No index is open" in v.state.error
    v.search.do_search()
    assert "No index is open" in v.state.error
    assert "Build / Resume" in neuron_index.NO_INDEX_TEXT and v.indexer.max_tokens == 20_000


# ------------------------------------------------------------------ search
def test_token_search_lists_the_engine_hits_and_opens_a_card(view, built):
    index = built[0].index
    token = str(index.top_examples(1, 5)[0].token)
    view.search.query = "token:" + token
    hits = view.search.do_search()
    expected = search(index, token=token, limit=200)
    assert [(h.layer, h.neuron) for h in hits] == [(h.layer, h.neuron) for h in expected]
    assert (1, 5) in [(h.layer, h.neuron) for h in hits] and view.state.error == ""
    assert view.search.search_status.startswith(f"{len(hits)} neurons for token")
    # token mode without the prefix finds the same
    view.search.param.update(query=token, search_mode="token")
    assert [(h.layer, h.neuron) for h in view.search.do_search()] == [(h.layer, h.neuron) for h in expected]
    # picking a hit in the list opens its card
    view.search.pick_hit(1)
    assert (view.card.stats.layer, view.card.stats.neuron) == (hits[1].layer, hits[1].neuron)
    assert view.card.top.token_activations is not None


def test_text_search_finds_imported_descriptions(built, session, tmp_path):
    index = NeuronIndex.open(built[0].index.path)
    csv = tmp_path / "d.csv"
    csv.write_text("layer,neuron,description,score\n2,9,pronouns after said that,0.42\n", encoding="utf-8")
    import_descriptions(index.path, csv, source="mine")
    try:
        v = NeuronView(session, background=False)
        v.set_index(index)
        v.search.query = "pronouns said"
        hits = v.search.do_search()
        assert [(h.layer, h.neuron, h.kind) for h in hits] == [(2, 9, "csv")]
        v.search.pick_hit(0)
        assert "pronouns after said that" in v.card._card_html.object and "score 0.420" in v.card._card_html.object
        v.search.query = "nothing matches this"
        assert v.search.do_search() == [] and v.search.search_status.startswith("No neuron matches")
        v.search.query = "   "
        v.search.do_search()
        assert "the search is empty" in v.state.error
    finally:
        (index.path / "imported.json").unlink()


def test_parse_query():
    assert neuron_view_module.parse_query("token: he", "text") == (None, "he")
    assert neuron_view_module.parse_query("token:  he", "text") == (None, " he")
    assert neuron_view_module.parse_query(" he", "token") == (None, " he")
    assert neuron_view_module.parse_query(" gender words ", "text") == ("gender words", None)
    assert neuron_view_module.parse_query("", "text") == (None, None)


# ------------------------------------------------------------------ ablate, prompt, explain
def test_ablate_buttons_set_the_request(view):
    seen = []
    view.param.watch(lambda e: seen.append(e.new), "ablate_request")
    view.card.param.trigger("ablate_this")
    assert "Nothing to ablate" in view.state.error and seen == []
    run(view.open_neuron(1, 5))
    view.card.param.trigger("ablate_this")
    view.card.param.trigger("ablate_this")  # the same request again still reaches the ablation tab
    assert seen == [("1:5",), ("1:5",)] and view.ablate_request == ("1:5",)
    view.search.query = "token:" + str(view.card.top.tokens[0][view.card.top.positions[0]])
    hits = view.search.do_search()
    view.search.param.trigger("ablate_hits")
    specs = list(dict.fromkeys(f"{h.layer}:{h.neuron}" for h in hits))
    assert list(view.ablate_request) == specs and "1:5" in specs


def test_prompt_activation_equals_plain_hooks(view, session, plain, tokenizer):
    run(view.open_neuron(2, 7))
    view.on_prompt.prompt = "The nurse said that she would be late."
    run(view.on_prompt.compute())
    r = view.on_prompt.result
    assert view.state.error == "" and isinstance(r, PromptActivation) and (r.layer, r.neuron) == (2, 7)
    ids = tokenizer(view.on_prompt.prompt, return_tensors="np").input_ids
    assert r.token_ids.tolist() == ids[0].tolist()
    assert np.allclose(r.activations, plain_acts(plain, ids, 2)[0, :, 7], atol=1e-4)
    source = view.on_prompt._chart.object.select_one({"name": neuron_charts.PROMPT_SOURCE})
    assert np.allclose(source.data["activation"], r.activations)
    view.on_prompt.prompt = "  "
    run(view.on_prompt.compute())
    assert "empty" in view.state.error and view.on_prompt.result is r


def test_explain_runs_as_a_job_and_shows_its_score(view, built):
    run(view.open_neuron(1, 3))
    job = view.card.start_explain()
    assert job.status == "done" and view.state.error == "" and not view.card.explaining
    e = view.card.explanation
    assert (e.layer, e.neuron) == (1, 3) and e.explainer == "session:tiny-llama"
    assert f"score {e.score_text}" in view.card.explain_status and "honest" in view.card.explain_status
    assert any(d["kind"] == "explanation" and d["source"] == e.explainer for d in view.card.descriptions)
    assert "score " in view.card._card_html.object
    assert any(r.result is e for r in view.history.entries)
    view.card.explainer = "token list"
    job = view.card.start_explain()
    t = view.card.explanation
    assert job.status == "done" and t.explainer == "tokens" and t.explanation.startswith("the tokens [")
    assert "honest" not in view.card.explain_status and f"score {t.score_text}" in view.card.explain_status
    view.card.explainer = "attached model"
    (built[0].index.path / "explanations.json").unlink()


def test_an_index_of_another_model_shows_stored_data_only(built, tiny_sessions):
    v = NeuronView(tiny_sessions["mistral"], background=False)
    v.set_index(built[0].index)
    assert "⚠" in v.indexer.index_info
    run(v.open_neuron(1, 5))
    assert v.state.error == "" and v.card.top.token_activations is None
    assert "attach the index's model" in v.card._top_html.object
    acts = re.findall(r"data-act='([^']*)'", v.card._top_html.object)
    assert sum(a != "" for a in acts) == TOP_K  # only the stored positions
    v.card.start_explain()
    assert "Cannot explain" in v.state.error


# ------------------------------------------------------------------ overview and selectivity
def test_selectivity_equals_a_direct_numpy_computation(built, plain, tokenizer, corpus):
    index = built[0].index
    windows = reference_windows(tokenizer, corpus)
    assert np.array_equal(index.arrays["windows"], windows[index.arrays["window_index"]])
    z_index = index.selectivity()
    sel = index.selective_neurons(4)
    for layer in range(index.n_layers):
        a = plain_acts(plain, windows, layer).astype(np.float64).reshape(-1, index.d_mlp)
        z = (a.max(0) - a.mean(0)) / a.std(0)
        assert np.allclose(z_index[layer], z, rtol=1e-4, atol=1e-4)
        mine = sel.neurons[sel.layers == layer]
        assert np.allclose(np.sort(z)[::-1][:4], sel.selectivity[sel.layers == layer], rtol=1e-4)
        assert set(mine.tolist()) == set(np.argsort(-z)[:4].tolist())
        assert np.allclose(sel.max[sel.layers == layer], a.max(0)[mine], atol=1e-4)
        assert np.allclose(sel.frequency[sel.layers == layer], (a > 0).mean(0)[mine])
    fire = index.firing_token_ids()[sel.layers, sel.neurons, 0]
    assert sel.top_token.tolist() == index.token_strings(fire).tolist()


def test_overview_chart_and_tap_opens_a_neuron(view):
    fig = view.overview._chart.object
    source = fig.select_one({"name": neuron_charts.OVERVIEW_SOURCE})
    sel = view.overview.result
    assert source.data["layer"] == sel.layers.tolist() and source.data["selectivity"] == sel.selectivity.tolist()
    assert len(source.data["layer"]) == view.index.n_layers * view.overview.n_per_layer
    source.selected.indices = [7]  # what a click on a point does
    assert view.state.error == ""
    assert (view.card.stats.layer, view.card.stats.neuron) == (sel.layers[7], sel.neurons[7])
    view.overview.n_per_layer = 2
    assert len(view.overview._chart.object.select_one({"name": neuron_charts.OVERVIEW_SOURCE}).data["layer"]) == \
        2 * view.index.n_layers


# ------------------------------------------------------------------ engine additions
def test_neuron_activations_stop_after_the_last_requested_layer(session, plain):
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    calls = []
    last = session.hf.model.layers[-1]
    hook = last.register_forward_hook(lambda *args: calls.append(1))
    try:
        (a0,) = neuron_activations(session, [0], ids)
    finally:
        hook.remove()
    assert calls == []  # block 2 never ran
    assert np.allclose(a0.numpy(), plain_acts(plain, ids.numpy(), 0), atol=1e-5)
    a2, a1 = neuron_activations(session, [2, 1], ids)
    assert np.allclose(a2.numpy(), plain_acts(plain, ids.numpy(), 2), atol=1e-5)
    assert np.allclose(a1.numpy(), plain_acts(plain, ids.numpy(), 1), atol=1e-5)


def test_prompt_activation_errors(session):
    from explorer.core.errors import ExplorerError

    with pytest.raises(ExplorerError, match="layer 3 is out of range"):
        prompt_activation(session, "hello", layer=3, neuron=0)
    with pytest.raises(ExplorerError, match="neuron 128 is out of range"):
        prompt_activation(session, "hello", layer=0, neuron=128)


def test_new_results_round_trip(built, session):
    index = built[0].index
    top, rand = example_activations(index, 1, 5, session)
    stored, _ = example_activations(index, 1, 5)
    results = [top, rand, stored, index.histogram(1, 5), index.selective_neurons(3),
               prompt_activation(session, "The nurse said", layer=1, neuron=5)]
    for r in results:
        back = type(r).from_dict(json.loads(json.dumps(r.to_dict())))
        for name, value in vars(r).items():
            other = getattr(back, name)
            if isinstance(value, np.ndarray):
                assert other.dtype == value.dtype and np.array_equal(other, value), name
            else:
                assert other == value, name
    assert stored.token_activations is None and isinstance(top, ExampleActivations)
    h = index.histogram(1, 5)
    assert isinstance(h, NeuronHistogram) and h.sampled_tokens == int(index.arrays["hist_tokens"][0])


def test_examples_html_escapes_tokens():
    ex = ExampleActivations(layer=0, neuron=0, kind="top", positions=np.array([1]),
                            activations=np.array([2.0], np.float32), token_ids=np.array([[1, 2, 3]]),
                            tokens=np.array([["<b>", " x\n", "'&"]]), window_index=np.array([0]),
                            token_activations=np.array([[0.5, 2.0, -1.0]], np.float32))
    html = neuron_charts.examples_html(ex)
    assert "<b>" not in html.replace("<b>2.000</b>", "") and "&lt;b&gt;" in html and "&#x27;&amp;" in html
    assert " x↵" in html and "rgba(253, 141, 60, 1.000)" in html and "rgba(107, 174, 214, 0.500)" in html


def test_view_renders_for_a_notebook(view):
    run(view.open_neuron(1, 5))
    assert pn.panel(view).get_root(Document()) is not None


def test_the_views_history_saves_to_a_snapshot(view, tmp_path):
    from explorer.persistence.snapshot import load_snapshot, save_snapshot

    run(view.open_neuron(1, 5))
    run(view.on_prompt.compute())
    entries = view.history.entries
    kinds = {type(e.result).__name__ for e in entries}
    assert {"SelectiveNeurons", "NeuronStats", "NeuronHistogram", "TokenPattern", "ExampleActivations",
            "PromptActivation"} <= kinds
    back = load_snapshot(save_snapshot(tmp_path / "s.zip", entries))
    assert [e.label for e in back.entries] == [e.label for e in entries]
    for old, new in zip(entries, back.entries):
        assert json.dumps(new.result.to_dict(), sort_keys=True) == json.dumps(old.result.to_dict(), sort_keys=True)


def test_a_build_cancelled_before_its_first_batch_says_so(session, corpus, tmp_path):
    from explorer.core.errors import ExplorerError
    from explorer.core.jobs import Job

    request = IndexRequest(corpus_path=str(corpus), **SETTINGS)
    job = Job(lambda ctx: build_index(session, request, out_dir=tmp_path / "i", ctx=ctx))
    job.cancel()
    with pytest.raises(ExplorerError, match="cancelled before its first batch"):
        job.run()
