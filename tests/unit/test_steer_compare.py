"""Steering vs the swap (explorer.training.steer_compare) on a tiny model and a one-step tiny swap
run: every steering row against plain PyTorch on a separate copy of the model (a forward hook
adding α·v, hooks projecting the direction out), one unpadded forward per probe text; the swap
rows against the run's metrics files; α = 0 against the run's own step-0 evaluation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explorer.core.errors import ExplorerError
from explorer.training.bias import load_minimal_pairs, load_occupations, load_templates
from explorer.training.intervene import build_streams, load_run, run_intervention
from explorer.training.steer_compare import (
    SteerCompareRequest,
    SteerCompareResult,
    gender_direction,
    steering_vs_swap,
    window_losses,
)
from helpers import plain_copy, save_model_dir

LAYER = 1
LINES = ["The farmer said he would sell his house.", "My uncle told him that he is late.",
         "The old king hurt himself, and he laughed.", "The pilot asked his father for help.",
         "The weather was cold and the theme of the day was rain."] * 4


@pytest.fixture(scope="module")
def session(tiny_sessions):
    return tiny_sessions["llama"]


@pytest.fixture(scope="module")
def plain(tokenizer, session):
    return plain_copy(tokenizer, session)


@pytest.fixture(scope="module")
def run_dir(session, tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    out = root / "run"
    run_intervention(session, out_dir=out, corpus=str(corpus), steps=1, batch_size=2, seq_len=16, lr=3e-3,
                     warmup=1, train="last:1", eval_every=1, checkpoint_every=1, heldout_documents=4,
                     heldout_windows=2, eval_templates=1, eval_pairs=4, device="cpu")
    return out


def _hooks(model, alpha: float, v: torch.Tensor | None, ablate: torch.Tensor | None):
    """Plain hooks: α·v added to block LAYER's output, or the unit ``ablate`` projected out of the
    embeddings and every attention and MLP output."""
    handles = []
    layers = model.model.layers
    if v is not None:
        handles.append(layers[LAYER].register_forward_hook(
            lambda m, a, o: (o[0] + alpha * v,) + tuple(o[1:]) if isinstance(o, tuple) else o + alpha * v))
    if ablate is not None:
        u = ablate
        proj = lambda h: h - (h @ u)[..., None] * u  # noqa: E731
        handles.append(layers[0].register_forward_pre_hook(
            lambda m, a, k: ((proj(a[0]),) + tuple(a[1:]), k) if a
            else (a, {**k, "hidden_states": proj(k["hidden_states"])}), with_kwargs=True))
        for layer in layers:
            for sub in (layer.self_attn, layer.mlp):
                handles.append(sub.register_forward_hook(
                    lambda m, a, o: (proj(o[0]),) + tuple(o[1:]) if isinstance(o, tuple) else proj(o)))
    return handles


def _reference(model, tokenizer, templates, pairs, windows, alpha=0.0, v=None, ablate=None) -> dict:
    """The three probes and the held-out loss, one unpadded forward per text."""
    occ = load_occupations()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    he, she = (tokenizer(t, add_special_tokens=False).input_ids[0] for t in (" he", " she"))
    handles = _hooks(model, alpha, v, ablate)
    try:
        with torch.no_grad():
            def logp(text):
                ids = torch.tensor([bos + tokenizer(text, add_special_tokens=False).input_ids])
                return ids, F.log_softmax(model(ids).logits[0].double(), -1)

            items = np.empty((len(templates), len(occ.names)))
            for i, t in enumerate(templates):
                for j, name in enumerate(occ.names):
                    _, lp = logp(t.format(occupation=name))
                    items[i, j] = float(lp[-1, he] - lp[-1, she])

            def ll(text):
                ids, lp = logp(text)
                return float(lp[:-1].gather(-1, ids[0, 1:, None]).sum())

            hits = np.array([ll(m) > ll(s) for m, s in zip(pairs.more, pairs.less)], float)
            losses = np.array([float(model(torch.as_tensor(w)[None], labels=torch.as_tensor(w)[None]).loss)
                               for w in windows])
    finally:
        for h in handles:
            h.remove()
    per_occ = items.mean(0)
    r = float(np.corrcoef(per_occ, occ.share_men)[0, 1])
    p = hits.mean()
    return {"pronoun_preference": (items.mean(), items.std(ddof=1) / math.sqrt(items.size)),
            "stereotype_alignment": (r, (1 - r * r) / math.sqrt(len(per_occ) - 3)),
            "minimal_pairs": (p, math.sqrt(p * (1 - p) / len(hits))),
            "heldout_loss": (losses.mean(), losses.std(ddof=1) / math.sqrt(len(losses)))}


def test_rows_equal_plain_hooks_and_the_run(session, plain, tokenizer, run_dir):
    alphas = (-2.0, 0.0, 3.0)
    result = steering_vs_swap(session, run=str(run_dir), layer=LAYER, alphas=alphas)
    assert result.kinds == ("steer", "steer", "steer", "ablate", "control", "swapped")
    assert result.complete and result.same_probes and result.note == ""
    run = load_run(run_dir)
    templates = load_templates()[:1]
    pairs = load_minimal_pairs().head(4)
    windows = build_streams(tokenizer, run.config).heldout
    assert (result.n_templates, result.n_pairs, result.n_windows) == (1, 4, 2)
    # The direction: feminine minus masculine at the last token, from plain forwards.
    vec = gender_direction(session, LAYER)
    assert result.vector_norm == pytest.approx(vec.norm)
    v = torch.from_numpy(vec.vector)
    for i, alpha in enumerate(alphas):
        want = _reference(plain, tokenizer, templates, pairs, windows, alpha=alpha, v=v)
        for metric, (value, se) in want.items():
            got = result.value(metric, i)
            assert got[0] == pytest.approx(value, abs=2e-4), (alpha, metric)
            assert got[1] == pytest.approx(se, abs=2e-4), (alpha, metric)
    want = _reference(plain, tokenizer, templates, pairs, windows, ablate=v / v.norm())
    for metric, (value, se) in want.items():
        assert result.value(metric, 3) == pytest.approx((value, se), abs=2e-4), metric
    # The swap rows are the run's last evaluation; α = 0 is the run's step 0 (same probes, same windows).
    for i, name in ((4, "control"), (5, "swapped")):
        rows = [json.loads(line) for line in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
        last = rows[-1]
        assert result.step[i] == last["step"] == 1
        assert result.heldout_loss[i] == last["loss"] and math.isnan(result.heldout_loss_se[i])
        for m in ("pronoun_preference", "stereotype_alignment", "minimal_pairs"):
            assert result.value(m, i) == (last[m], last[f"{m}_se"])
    start = run.control
    assert result.heldout_loss[1] == pytest.approx(start.loss[0], abs=1e-5)
    for m in ("pronoun_preference", "stereotype_alignment", "minimal_pairs"):
        assert result.value(m, 1) == pytest.approx((getattr(start, m)[0], getattr(start, f"{m}_se")[0]), abs=1e-5)
    # The rows' table and a round trip.
    table = result.table()
    assert [r["kind"] for r in table] == list(result.kinds) and table[0]["alpha"] == -2.0
    assert table[3]["alpha"] is None and table[4]["step"] == 1 and table[4]["heldout_loss"]["se"] is None
    back = SteerCompareResult.from_dict(json.loads(json.dumps(result.to_dict())))
    np.testing.assert_array_equal(back.pronoun_preference, result.pronoun_preference)
    assert back.validate() is None


def test_window_losses_mean_is_the_models_loss(plain):
    windows = np.random.default_rng(0).integers(0, 500, size=(3, 12))
    got = window_losses(plain, windows, batch_size=2)
    ids = torch.as_tensor(windows)
    with torch.no_grad():
        want = float(plain(ids, labels=ids).loss)
    assert got.mean() == pytest.approx(want, abs=1e-5)


def test_no_run_partials_cancel_and_bad_input(session, tmp_path):
    reports = []

    class Ctx:
        cancelled = False

        def report(self, done, total, partial=None, message=""):
            reports.append((done, total, partial))
            self.cancelled = done >= 1

    # Without a run: the default run settings' probe set (reduced here), no swap rows.
    from explorer.core.jobs import Unfinished

    with pytest.raises(Unfinished) as stop:
        steering_vs_swap(session, SteerCompareRequest(layer=LAYER, alphas=(0, 1), ablate=False, max_templates=1,
                                                 max_pairs=2, max_windows=1), ctx=Ctx())
    partial = stop.value.partial
    assert partial.kinds == ("steer", "steer") and partial.done == 1 and not partial.complete
    assert math.isfinite(partial.pronoun_preference[0]) and math.isnan(partial.pronoun_preference[1])
    assert not partial.same_probes and "reduced" in partial.note and reports[0][0] == 1
    with pytest.raises(ExplorerError, match="not a pronoun-swap run"):
        steering_vs_swap(session, run=str(tmp_path), layer=LAYER)
    with pytest.raises(ExplorerError, match="α"):
        steering_vs_swap(session, alphas="a,b")
    with pytest.raises(ExplorerError, match="layer"):
        steering_vs_swap(session, layer=99, alphas=(0,))


# ================================================================================== CLI
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer, session):
    return save_model_dir(tmp_path_factory.mktemp("tiny-llama-dir"), session.hf, tokenizer)


def test_cli_json_shape_and_numbers(tiny_dir, run_dir, session, capsys):
    from cli.main import main

    code = main(["steer", "compare", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32",
                 "--run", str(run_dir), "--layer", str(LAYER), "--alphas=-1,0,1", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    data = json.loads(out.out)
    assert set(data) == {"model", "run", "run_model", "layer", "vector_norm", "same_probes", "note",
                         "probe_set", "rows"}
    assert data["layer"] == LAYER and data["same_probes"] is True
    assert data["probe_set"] == {"templates": 1, "occupations": len(load_occupations().names), "pairs": 4,
                                 "windows": 2, "seq_len": 16}
    assert [r["kind"] for r in data["rows"]] == ["steer", "steer", "steer", "ablate", "control", "swapped"]
    assert [r["alpha"] for r in data["rows"][:3]] == [-1.0, 0.0, 1.0]
    for row in data["rows"]:
        assert set(row) == {"label", "kind", "alpha", "step", "pronoun_preference", "stereotype_alignment",
                            "minimal_pairs", "heldout_loss"}
        assert set(row["minimal_pairs"]) == {"value", "se"}
    # The same numbers as the engine on the same weights (the run is read, not recomputed).
    want = steering_vs_swap(session, run=str(run_dir), layer=LAYER, alphas=(-1, 0, 1))
    got = [r["stereotype_alignment"]["value"] for r in data["rows"]]
    np.testing.assert_allclose(got, want.stereotype_alignment, atol=1e-5)
    # Bad input: one line on stderr, before any model loads.
    code = main(["steer", "compare", "--run", str(run_dir / "nope"), "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "swap run folder" in err and len(err.strip().splitlines()) == 1


# ============================================================================ chart, view
def test_chart_and_figures(session, run_dir):
    from bokeh.models import GlyphRenderer, Whisker

    from widgets import registry
    from widgets.steering_charts import COMPARE_CHART, compare_chart, compare_html

    result = steering_vs_swap(session, run=str(run_dir), layer=LAYER, alphas=(-1, 0, 1))
    grid = compare_chart(result)
    figs = [child[0] if isinstance(child, tuple) else child for child in grid.children]
    assert [f.name for f in figs] == [f"{COMPARE_CHART}-{m}" for m in
                                      ("pronoun_preference", "stereotype_alignment", "minimal_pairs", "heldout_loss")]
    for fig, metric in zip(figs, ("pronoun_preference", "stereotype_alignment", "minimal_pairs", "heldout_loss")):
        lines = [r for r in fig.renderers if isinstance(r, GlyphRenderer) and type(r.glyph).__name__ == "Line"]
        # The steering sweep, then the ablation, control and swapped levels, each at its value.
        assert len(lines) == 4
        assert list(lines[0].data_source.data["v"]) == pytest.approx(list(getattr(result, metric)[:3]))
        for line, row in zip(lines[1:], (3, 4, 5)):
            assert list(line.data_source.data["v"]) == pytest.approx([getattr(result, metric)[row]] * 2)
            assert list(line.data_source.data["alpha"]) == [-1.0, 1.0]
        assert any(isinstance(a, Whisker) for a in fig.center)
    assert [item.label.value for item in figs[0].legend[0].items] == [
        f"steering at L{LAYER}", "direction ablated", "swap: control arm", "swap: swapped arm"]
    html = compare_html(result)
    assert "swap control (step 1)" in html and "±" in html
    kind = registry.kind_for(type(result))
    assert kind.name == "steering vs swap"
    assert len(kind.figures(result, {})) == 2


def test_steering_tab_compares_with_the_session_run(session, run_dir, tmp_path):
    from explorer.persistence.history import History
    from widgets.steering_compare import NO_RUN, SESSION_RUN
    from widgets.steering_view import SteeringView

    history = History()
    view = SteeringView(session, history=history, layer=LAYER)
    part = view.compare
    assert part.run_choice == NO_RUN and part.chosen_run() == ""
    part.session_run = str(run_dir)               # what the app does when the Pronoun swap tab has a run
    assert SESSION_RUN in part.param.run_choice.objects
    part.param.update(run_choice=SESSION_RUN, layer=LAYER, alphas="0,2")
    part.start(background=False)
    r = part.result
    assert r is not None and r.complete and r.kinds == ("steer", "steer", "ablate", "control", "swapped")
    assert part._chart.object is not None and "swap swapped" in part._table.object
    assert history.entries and type(history.entries[-1].result).__name__ == "SteerCompareResult"
    # The current vector instead of the gender direction; none yet is a clear error.
    part.use_vector = True
    part.start(background=False)
    assert "build or load a vector" in part.error
    part.param.update(run_dir=str(tmp_path), use_vector=False)
    part.start(background=False)
    assert "not a pronoun-swap run" in part.error
