"""Neuron descriptions: token patterns, correlation scoring, explain/simulate, import, search, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cli.main import main
from explorer.neurons.describe import (
    DescribeError,
    DescriptionStore,
    Explainer,
    Explanation,
    TokenPattern,
    check_session,
    clean_explanation,
    correlation_score,
    explain_neuron,
    import_descriptions,
    pattern_from_firing,
    scale_activations,
    search,
    token_pattern,
)
from explorer.neurons.index import IndexRequest, build_index, neuron_activations
from helpers import corpus_head


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_head(tmp_path_factory.mktemp("corpus"), 10)


@pytest.fixture(scope="module")
def index(tiny_sessions, corpus, tmp_path_factory):
    req = IndexRequest(corpus_path=str(corpus), max_tokens=1024, window=32, top_k=8, n_random=4, batch_windows=8)
    return build_index(tiny_sessions["llama"], req, out_dir=tmp_path_factory.mktemp("idx"))


@pytest.fixture
def fresh_index(tiny_sessions, corpus, tmp_path):
    req = IndexRequest(corpus_path=str(corpus), max_tokens=512, window=32, top_k=6, n_random=3, batch_windows=8)
    return build_index(tiny_sessions["llama"], req, out_dir=tmp_path / "idx")


# ------------------------------------------------------------------ token patterns
def test_pattern_counts_mass_and_summary():
    tokens = [" he"] * 7 + [" his"] * 5 + [" she"] * 2 + ["x", "y", "z", "w", "v", "u"]
    acts = [4.0] * 7 + [3.0] * 5 + [2.0] * 2 + [1.0] * 6
    p = pattern_from_firing(3, 17, tokens, acts)
    total = 7 * 4 + 5 * 3 + 2 * 2 + 6
    assert p.tokens.tolist()[:3] == [" he", " his", " she"] and p.counts.tolist()[:3] == [7, 5, 2]
    assert p.mass[0] == pytest.approx(28 / total) and p.mass.sum() == pytest.approx(1.0)
    assert p.summary == (f'fires on " he" (7/20, {28 / total:.0%} of top mass), " his" (5/20, {15 / total:.0%}), '
                         f'" she" (2/20, {4 / total:.0%}), "x" (1/20, {1 / total:.0%})…')
    again = TokenPattern.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again.to_dict() == p.to_dict()
    # negative activations carry no mass; no examples at all is a valid pattern
    q = pattern_from_firing(0, 0, ["\n", "a"], [-1.0, -2.0])
    assert q.summary == 'fires on "\\n" (1/2, 0% of top mass), "a" (1/2, 0%)' and q.mass.tolist() == [0, 0]
    assert pattern_from_firing(0, 0, [], []).summary == "no examples"


def test_token_pattern_from_the_index(index):
    top = index.top_examples(1, 5)
    p = token_pattern(index, 1, 5)
    assert p.n_examples == len(top) == 8
    firing = [e.tokens[e.position] for e in top]
    assert dict(zip(p.tokens.tolist(), p.counts.tolist())) == {t: firing.count(t) for t in set(firing)}


# ------------------------------------------------------------------ scoring
def test_correlation_score_constructed_cases():
    true = np.array([[0.0, 1.0, 5.0, 0.0], [2.0, 0.0, 0.0, 3.0]])
    assert correlation_score(true, true) == pytest.approx(1.0)
    assert correlation_score(2 * true + 1, true) == pytest.approx(1.0)       # scale-free
    assert correlation_score(-true, true) == pytest.approx(-1.0)
    assert correlation_score(np.full_like(true, 3.0), true) is None            # constant simulation
    assert correlation_score(true, np.zeros_like(true)) is None                # constant truth
    assert correlation_score([[1.0]], [[2.0]]) is None                         # one token
    ragged_sim = [np.array([0.0, 1.0]), np.array([2.0, 0.5, 0.0])]
    ragged_true = [np.array([0.0, 2.0]), np.array([4.0, 1.0, 0.0])]
    assert correlation_score(ragged_sim, ragged_true) == pytest.approx(1.0)
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([1.0, 3.0, 2.0, 5.0])
    assert correlation_score(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    with pytest.raises(DescribeError):
        correlation_score(x, y[:3])


def test_scale_activations_like_bills_et_al():
    assert scale_activations(np.array([-1.0, 0.0, 0.49, 0.5, 1.0]), 1.0).tolist() == [0, 0, 4, 5, 10]
    assert scale_activations(np.array([1.0, 2.0]), 0.0).tolist() == [0, 0]


def test_clean_explanation():
    assert clean_explanation(' the word "he" 8\nmore') == 'the word "he"'
    assert clean_explanation('"male pronouns".<|im_end|>') == "male pronouns"
    assert clean_explanation("years like 1990") == "years like 1990"


# ------------------------------------------------------------------ explain and simulate
class OracleExplainer(Explainer):
    """Explains with a fixed text; simulates with a function of the true activations."""

    def __init__(self, truth, transform, text="the oracle's explanation"):
        super().__init__(model=None, tokenizer=None, name="oracle")
        self.truth, self.transform, self.text, self.prompts = truth, transform, text, []

    def explain(self, user_text, max_new_tokens=40):
        self.prompts.append(user_text)
        return self.text

    def fit_explain_prompt(self, examples, max_new_tokens):
        from explorer.neurons.describe import explain_prompt_text

        return explain_prompt_text(examples)

    def simulate(self, explanation, examples):
        return [self.transform(self.truth[tuple(toks)]) for toks in examples]


def _truth(index, session, layer, neuron):
    exs = index.top_examples(layer, neuron) + index.random_examples(layer, neuron)
    import torch

    acts = neuron_activations(session, [layer], torch.from_numpy(np.stack([e.token_ids for e in exs])))[0]
    return {tuple(e.tokens.tolist()): acts[i, :, neuron].numpy() for i, e in enumerate(exs)}


def test_perfect_simulation_scores_one(fresh_index, tiny_sessions):
    session = tiny_sessions["llama"]
    oracle = OracleExplainer(_truth(fresh_index, session, 2, 4), lambda t: 3 * t + 1)
    e = explain_neuron(session, index=fresh_index, layer=2, neuron=4, explainer=oracle, n_explain=3, n_score_top=3, n_score_random=3)
    assert e.score == pytest.approx(1.0, abs=1e-5) and e.score_text.startswith("1.00")
    assert e.n_top == 3 and e.n_random == 3 and e.simulated.shape == e.true.shape == (6, 32)
    assert e.explanation == "the oracle's explanation" and "top-and-random" in e.score_note
    # the explainer saw even-ranked top examples with 0-10 activations, and not the held-out ones
    assert oracle.prompts[0].count("Excerpt ") == 3 and "Activations (token, 0-10)" in oracle.prompts[0]
    assert " 10" in oracle.prompts[0]
    # cached next to the index, keyed by (layer, neuron, explainer); a second call does not explain again
    stored = json.loads((fresh_index.path / "explanations.json").read_text())
    assert list(stored) == ["2:4:oracle"]
    again = explain_neuron(session, index=fresh_index, layer=2, neuron=4, explainer=oracle)
    assert len(oracle.prompts) == 1 and again.score == pytest.approx(e.score)
    assert np.array_equal(again.simulated, e.simulated)
    explain_neuron(session, index=fresh_index, layer=2, neuron=4, explainer=oracle, refresh=True, n_explain=2)
    assert len(oracle.prompts) == 2


def test_constant_simulation_is_undefined_not_a_crash(fresh_index, tiny_sessions):
    session = tiny_sessions["llama"]
    oracle = OracleExplainer(_truth(fresh_index, session, 0, 1), lambda t: np.full_like(t, 5.0))
    e = explain_neuron(session, index=fresh_index, layer=0, neuron=1, explainer=oracle)
    assert e.score is None and e.score_text == "undefined" and "constant" in e.score_note
    back = Explanation.from_dict(json.loads(json.dumps(e.to_dict())))
    assert back.score is None and back.explanation == e.explanation
    empty = OracleExplainer({}, None, text="")
    e = explain_neuron(session, index=fresh_index, layer=0, neuron=2, explainer=empty)
    assert e.score is None and "no explanation" in e.score_note


def test_real_explainer_end_to_end_on_a_tiny_model(fresh_index, tiny_sessions):
    """The session's own (random, tiny) model explains and simulates: garbage, but well-formed."""
    session = tiny_sessions["llama"]
    e = explain_neuron(session, index=fresh_index, layer=1, neuron=2, n_explain=2, n_score_top=2, n_score_random=2, max_new_tokens=6)
    assert e.explainer == "session:tiny-llama" and isinstance(e.explanation, str)
    assert e.simulated.shape == (4, 32) and np.all((e.simulated >= 0) & (e.simulated <= 9))
    assert e.score is None or -1.0 <= e.score <= 1.0
    assert np.allclose(e.true[0].max(), fresh_index.top_examples(1, 2)[1].activation, atol=1e-4)


def test_simulation_prompt_reads_at_each_tab_and_splits_long_examples(tiny_sessions, tokenizer):
    ex = Explainer.for_session(tiny_sessions["gpt2"])  # context 256 tokens
    ids, values = ex.rating_tokens()
    assert values.tolist() == list(range(10))  # "10" is two tokens for this tokenizer
    assert [tokenizer.decode([i]) for i in ids] == [str(v) for v in range(10)]
    tokens = [" he", " said", "\n", " she"] * 40
    prompts = ex.simulation_ids("male pronouns", tokens)
    assert len(prompts) > 1 and all(len(p) <= 256 for p, _ in prompts)
    assert sum(len(r) for _, r in prompts) == len(tokens)
    tab = tokenizer("\t", add_special_tokens=False).input_ids[-1]
    assert all(p[i] == tab for p, reads in prompts for i in reads)
    sims = ex.simulate("male pronouns", [tokens])
    assert sims[0].shape == (len(tokens),)


def test_explaining_with_another_model_than_the_index_is_refused(fresh_index, tiny_sessions):
    with pytest.raises(DescribeError, match="attach the index's model"):
        check_session(fresh_index, tiny_sessions["gpt2"])
    with pytest.raises(DescribeError, match="not found"):
        explain_neuron(tiny_sessions["llama"], index=fresh_index, layer=0, neuron=0, explainer="/nonexistent/model")


# ------------------------------------------------------------------ import
def neuron_record(layer, neuron):
    """A record in OpenAI's neuron-explainer NeuronRecord JSON format (as their files are written)."""
    def rec(tokens, acts):
        return {"dataclass_name": "ActivationRecord", "tokens": tokens, "activations": acts}

    return {
        "dataclass_name": "NeuronRecord",
        "neuron_id": {"dataclass_name": "NeuronId", "layer_index": layer, "neuron_index": neuron},
        "random_sample": [rec(["The", " cat", " sat"], [0.0, 0.01, -0.02])],
        "random_sample_by_quantile": [[rec(["A"], [0.0])]],
        "quantile_boundaries": [0.0, 0.1, 0.5],
        "mean": 0.01, "variance": 0.02, "skewness": 3.0, "kurtosis": 12.0,
        "most_positive_activation_records": [
            rec(["Yesterday", " he", " said"], [0.0, 2.5, 0.1]),
            rec([" and", " he", " left"], [0.0, 2.0, 0.0]),
            rec([" then", " his", " car"], [0.1, 1.5, 0.2]),
            rec(["When", " she", " came"], [0.0, 0.5, 0.0]),
        ],
    }


def test_import_neuron_records_and_search(tmp_path):
    path = tmp_path / "5_131.json"
    path.write_text(json.dumps(neuron_record(5, 131)))
    assert import_descriptions(tmp_path / "store", path) == 1
    (entry,) = DescriptionStore(tmp_path / "store").imported()
    assert (entry["layer"], entry["neuron"], entry["kind"]) == (5, 131, "record")
    assert entry["description"].startswith('fires on " he" (2/4, 69% of top mass), " his" (1/4, 23%)')
    assert len(entry["top_records"]) == 4 and entry["random_records"][0]["tokens"] == ["The", " cat", " sat"]
    hits = search(tmp_path / "store", token="he")
    assert [(h.layer, h.neuron, h.kind) for h in hits] == [(5, 131, "record")]
    assert hits[0].relevance == pytest.approx(4.5 / 6.5)
    assert search(tmp_path / "store", query="his")[0].neuron == 131
    assert search(tmp_path / "store", query="cat") == []  # random samples are not what it fires on


def test_import_explanations_jsonl_and_plain_json(tmp_path):
    lines = [{"dataclass_name": "NeuronSimulationResults",
              "neuron_id": {"dataclass_name": "NeuronId", "layer_index": 0, "neuron_index": n},
              "scored_explanations": [{"dataclass_name": "ScoredExplanation", "explanation": text,
                                       "scored_simulation": {"dataclass_name": "ScoredSimulation",
                                                             "scored_sequence_simulations": [],
                                                             "ev_correlation_score": score,
                                                             "rsquared_score": 0.1,
                                                             "absolute_dev_explained_score": 0.1}}]}
             for n, text, score in ((1, "masculine pronouns like he and him", 0.62),
                                    (2, "words about the weather", None))]
    path = tmp_path / "explanations.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    assert import_descriptions(tmp_path, path) == 2
    (tmp_path / "plain.json").write_text(json.dumps([{"layer": 3, "neuron": 9, "explanation": "he or she",
                                                      "score": 0.3}]))
    assert import_descriptions(tmp_path, tmp_path / "plain.json") == 1
    hits = search(tmp_path, query="he")
    assert [(h.layer, h.neuron, h.score) for h in hits] == [(0, 1, 0.62), (3, 9, 0.3)]
    assert search(tmp_path, query="weather")[0].score is None
    assert search(tmp_path, query="pronouns him")[0].neuron == 1
    assert search(tmp_path, query="pronouns cat") == []


def test_import_csv_and_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("layer,neuron,description,score\n4,7,dates and years,0.5\n4,8,\"commas, mostly\",\n")
    assert import_descriptions(tmp_path, path) == 2
    hits = search(tmp_path, query="commas")
    assert [(h.layer, h.neuron, h.kind, h.score) for h in hits] == [(4, 8, "csv", None)]
    (tmp_path / "bad.csv").write_text("layer,neuron,description\n1,x,words\n")
    with pytest.raises(DescribeError, match=r"bad.csv, line 2"):
        import_descriptions(tmp_path, tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text(json.dumps(neuron_record(0, 0)) + "\n{broken\n")
    with pytest.raises(DescribeError, match=r"line 2: not valid JSON"):
        import_descriptions(tmp_path, tmp_path / "bad.jsonl")
    rec = neuron_record(0, 0)
    rec["most_positive_activation_records"][0]["activations"] = [1.0]
    (tmp_path / "r.json").write_text(json.dumps(rec))
    with pytest.raises(DescribeError, match="3 tokens but 1 activations"):
        import_descriptions(tmp_path, tmp_path / "r.json")
    (tmp_path / "other.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(DescribeError, match="neither a neuron record"):
        import_descriptions(tmp_path, tmp_path / "other.json")
    with pytest.raises(DescribeError, match="file not found"):
        import_descriptions(tmp_path, tmp_path / "missing.json")


# ------------------------------------------------------------------ search over an index
def test_search_index_patterns_by_token_and_text(index):
    fire = index.firing_token_ids()
    tid = int(np.bincount(fire[fire >= 0]).argmax())  # the commonest firing token
    tok = index.token_strings([tid])[0]
    hits = search(index, token=str(tok), limit=10_000)
    expect = {(l, n) for l, n in zip(*np.nonzero((fire == tid).any(-1)))}
    assert {(h.layer, h.neuron) for h in hits} >= expect and all(h.kind == "pattern" for h in hits)
    assert all(a.relevance >= b.relevance for a, b in zip(hits, hits[1:]))
    word = str(tok).strip()
    if word.isalpha():
        assert {(h.layer, h.neuron) for h in search(index, query=word, limit=10_000)} >= expect
    with pytest.raises(DescribeError, match="needs a query"):
        search(index)


def test_search_mixes_explanations_and_patterns(fresh_index, tiny_sessions):
    session = tiny_sessions["llama"]
    oracle = OracleExplainer(_truth(fresh_index, session, 1, 1), lambda t: t, text="quotation marks and dialogue")
    explain_neuron(session, index=fresh_index, layer=1, neuron=1, explainer=oracle)
    hits = search(fresh_index.path, query="dialogue")
    assert [(h.layer, h.neuron, h.kind, h.source) for h in hits] == [(1, 1, "explanation", "oracle")]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------ CLI
def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_explain_import_search(fresh_index, tiny_sessions, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("cli.neurons.load_session", lambda args: tiny_sessions["llama"])
    code, out, err = run_cli(capsys, "neurons", "explain", "--index", fresh_index.path, "--layer", 0, "--neuron", 3,
                             "--n-explain", 2, "--n-score", 1, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert set(data) >= {"explanation", "score", "score_note", "explainer", "layer", "neuron"}
    assert data["score"] is None or -1 <= data["score"] <= 1
    code, out, err = run_cli(capsys, "neurons", "explain", "--index", fresh_index.path, "--layer", 0, "--neuron", 3)
    assert code == 0 and "score" in out

    rec = tmp_path / "rec.json"
    rec.write_text(json.dumps(neuron_record(2, 5)))
    code, out, err = run_cli(capsys, "neurons", "import", rec, "--index", fresh_index.path, "--json")
    assert code == 0 and json.loads(out)["imported"] == 1
    code, out, err = run_cli(capsys, "neurons", "search", "--index", fresh_index.path, "--query", "his", "--json")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert any(r["layer"] == 2 and r["neuron"] == 5 and r["kind"] == "record" for r in results)
    code, out, err = run_cli(capsys, "neurons", "show", "--index", fresh_index.path, "--layer", 2, "--neuron", 5,
                             "--json")
    assert code == 0 and any(d["kind"] == "record" for d in json.loads(out)["descriptions"])

    code, out, err = run_cli(capsys, "neurons", "import", tmp_path / "missing.json", "--index", fresh_index.path)
    assert code == 2 and "file not found" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(capsys, "neurons", "explain", "--index", fresh_index.path, "--layer", 0,
                             "--neuron", 99999)
    assert code == 2 and "out of range" in err


def test_token_list_explainer_example():
    import doctest

    from explorer.neurons import describe

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    (test,) = finder.find(describe.TokenListExplainer, globs=vars(describe))
    assert runner.run(test).failed == 0 and test.examples
    with pytest.raises(describe.DescribeError, match="not a token-list"):
        describe.TokenListExplainer().simulate("responds to the word he", [["he"]])
