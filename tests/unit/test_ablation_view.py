"""The ablation tab without a browser: a tiny llama, the view driven by its params and methods.

Numbers shown are checked against the engine, and where the engine's answer would be the
same cached object, against an independent engine path (lens=False requests, the sequential
sweep, the plain nnsight patching path).
"""
from __future__ import annotations

import asyncio
import dataclasses
import html
import logging
import math

import numpy as np
import panel as pn
import pytest
from bokeh.document import Document
from bokeh.models import LinearColorMapper

from explorer.core.jobs import CANCELLED, DONE, Progress
from explorer.interventions.ablation import AblationRequest, SweepResult, ablate, sweep
from explorer.interventions.patching import PatchRequest, patch, restored_fraction
from explorer.persistence.history import History
from widgets import AblationView, ExplorerApp, parts
from widgets import ablation_charts as ac
from widgets.ablation_single import SingleAblation
from widgets.ablation_sweep import AblationSweep
from widgets.charts import position_labels
from widgets.patching_view import PatchingPanel

PROMPT = "The capital of France is"
ITALY = "The capital of Italy is"  # same token count as PROMPT
# Long enough (>= 32 tokens) that an exact head sweep of the tiny model takes one batch per layer.
LONG = ("When the committee met again in the spring, the members who had travelled from the northern "
        "towns argued for hours about the bridge, the school and the new market before they voted, and then")
# >= 12 tokens: patching takes one batch per layer.
CLEAN_LONG = "Many people visit the old town every summer because the capital of France is"
CORRUPT_LONG = "Many people visit the old town every summer because the capital of Italy is"
N_LAYERS, N_HEADS = 3, 4


@pytest.fixture(scope="module")
def session(tiny_sessions):
    return tiny_sessions["llama"]


def run(view: SingleAblation) -> None:
    asyncio.run(view.compute())


def sweep_source(view: AblationSweep):
    return view._pane.object.select_one({"name": ac.SWEEP_SOURCE})


# ----------------------------------------------------------- single ablation
def test_card_and_lenses_show_the_engines_numbers(session):
    history = History()
    view = SingleAblation(session, history=history, prompt=PROMPT, target=" Paris", compare_token=" Rome",
                        components="1.2, 0:7")
    run(view)
    assert view.error == "" and view.result is not None
    result = view.result
    # An independent computation (lens=False is a different request: not the cached result).
    fresh = ablate(session, AblationRequest(PROMPT, " Paris", ("1.2", "0:7"), compare_token=" Rome", lens=False))
    assert fresh is not result
    for got, want in ((result.baseline, fresh.baseline), (result.ablated, fresh.ablated)):
        assert got.logit == pytest.approx(want.logit, abs=1e-4)
        assert got.prob == pytest.approx(want.prob, abs=1e-6)
        assert got.rank == want.rank
        assert got.logit_diff == pytest.approx(want.logit_diff, abs=1e-4)
    # The card shows exactly those values.
    rows = ac.card_rows(result)
    assert [r[0] for r in rows] == ["logit", "probability", "rank", "logit diff vs ' Rome'"]
    b, a = result.baseline, result.ablated
    assert rows[0][1:] == (f"{b.logit:.3f}", f"{a.logit:.3f}", f"{a.logit - b.logit:+.3f}")
    assert rows[1][1:3] == (f"{b.prob:.4f}", f"{a.prob:.4f}")
    assert rows[2][1:] == (str(b.rank), str(a.rank), f"{a.rank - b.rank:+d}")
    assert rows[3][1:3] == (f"{b.logit_diff:.3f}", f"{a.logit_diff:.3f}")
    card = view._card.object
    assert "Ablated 0:7, 1.2 · zero" in card
    for row in rows:
        for cell in row[1:]:
            assert f"<td>{cell}</td>" in card or f">{cell}</td>" in card
    # Both lenses, one colour scale (top-1 probability, 0-1), each with its own run's numbers.
    base_fig, abl_fig = view._lens_baseline.object, view._lens_ablated.object
    assert base_fig.name == ac.LENS_BASELINE and abl_fig.name == ac.LENS_ABLATED
    for fig, lens in ((base_fig, result.lens_baseline), (abl_fig, result.lens_ablated)):
        data = fig.select_one({"name": f"{fig.name}-source"}).data
        assert np.allclose(data["value"], lens.top_probs[:, :, 0].ravel())
    mappers = [fig.select_one({"type": LinearColorMapper}) for fig in (base_fig, abl_fig)]
    assert [(m.low, m.high) for m in mappers] == [(0.0, 1.0), (0.0, 1.0)]
    assert not np.allclose(result.lens_baseline.top_probs, result.lens_ablated.top_probs)
    # Target curves of both runs on one chart; the last layer's lens is the model's own output.
    curves = view._target_pair.object.select_one({"name": ac.TARGET_PAIR_SOURCE}).data
    assert np.allclose(curves["p_base"], result.lens_baseline.target_probs[:, -1])
    assert np.allclose(curves["p_abl"], result.lens_ablated.target_probs[:, -1])
    assert curves["p_base"][-1] == pytest.approx(b.prob, abs=1e-5)
    assert curves["p_abl"][-1] == pytest.approx(a.prob, abs=1e-5)
    assert curves["r_abl"][-1] == a.rank
    assert [e.result for e in history.entries] == [result]
    assert "logit diff" in view.status and not view.busy


def test_mean_and_resample_modes(session):
    text = "Cats sleep most of the day, and dogs like to run in the park with their owners."
    view = SingleAblation(session, prompt=PROMPT, components="mlp:1", mode="mean", mean_source="text", mean_text=text)
    run(view)
    assert view.error == ""
    fresh = ablate(session, AblationRequest(PROMPT, " Paris", ("mlp:1",), mode="mean", mean_text=text, lens=False))
    assert view.result.ablated.logit == pytest.approx(fresh.ablated.logit, abs=1e-4)
    assert view.result.request.mean_text == text and "your text" in view._card.object

    view.param.update(mode="resample", second_prompt=ITALY)
    assert view.resample_counts.startswith("prompt: 5 tokens · second prompt: 5 tokens · equal")
    run(view)
    assert view.error == "" and view.result.request.mode == "resample"
    fresh = ablate(session, AblationRequest(PROMPT, " Paris", ("mlp:1",), mode="resample", second_prompt=ITALY,
                                            lens=False))
    assert view.result.ablated.logit == pytest.approx(fresh.ablated.logit, abs=1e-4)
    previous = view.result
    view.second_prompt = "The capital of Italy is Rome"
    assert "they differ" in view.resample_counts
    run(view)
    assert "equal token length" in view.error and view.result is previous

    view.param.update(mode="mean", mean_text="  ")
    run(view)
    assert "mean text is empty" in view.error and view.result is previous


def test_single_ablation_errors_are_shown_and_the_result_kept(session):
    view = SingleAblation(session, prompt=PROMPT, components="0.1")
    run(view)
    previous, card, lens = view.result, view._card.object, view._lens_ablated.object
    for components, prompt, target, message in (
            ("9.1", PROMPT, " Paris", "out of range"),
            ("three", PROMPT, " Paris", "cannot read component"),
            ("", PROMPT, " Paris", "no components given"),
            ("0.1", "   ", " Paris", "empty"),
            ("0.1", PROMPT, "", "target token is empty")):
        view.param.update(components=components, prompt=prompt, target=target)
        run(view)
        assert message in view.error, (components, prompt, target, view.error)
        assert view.result is previous and view._card.object == card and view._lens_ablated.object is lens
    view.param.update(components="0.1", prompt=PROMPT, target=" Paris")
    run(view)
    assert view.error == ""


def test_unexpected_errors_are_shown_and_logged(session, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    from explorer.interventions import ablation as engine

    monkeypatch.setattr(engine, "ablate", broken)
    monkeypatch.setattr(engine, "sweep", broken)
    view = AblationView(session)
    view.single.components = "0.1"
    with caplog.at_level(logging.ERROR, logger=parts.__name__):
        run(view.single)
        job = view.sweep.run(background=False)
    assert "Unexpected error" in view.single.error and "boom" in view.single.error
    assert job.status == "error" and "unexpected error (RuntimeError: boom)" in view.sweep.job.error
    assert "run the ablation failed" in caplog.text and "sweep failed" in caplog.text
    assert not view.single.busy and not view.sweep.job.running


def test_select_components(session):
    view = AblationView(session)
    view.single.components = "2.3"
    view._sections.active = 2
    view.select_components(["1.2", " 0:5 ", ""])
    assert view.single.components == "1.2, 0:5" and view.single.error == "" and view._sections.active == 0
    run(view.single)
    assert view.single.result.components == ("0:5", "1.2")
    view.select_components(["7.0"])
    assert view.single.components == "7.0" and "out of range" in view.single.error
    view._sections.active = 1
    view.select_components(["mlp:2"], show=False)
    assert view._sections.active == 1 and view.single.error == ""


def test_each_section_owns_its_inputs_and_marks_a_stale_result(session):
    """Issue 15 (8): editing the sweep's prompt leaves the single ablation's alone; a result whose
    inputs changed is marked stale until the next run."""
    view = AblationView(session)
    view.single.param.update(prompt=PROMPT, components="0.1")
    view.sweep.prompt = "A different prompt for the sweep"
    view.patching.target = " Rome"
    assert view.single.prompt == PROMPT and view.single.target == " Paris"
    run(view.single)
    assert view.single.result is not None and not view.single.stale
    view.single.components = "0.2"
    assert view.single.stale  # the card still shows 0.1
    view.single.prompt = "   "
    run(view.single)  # an error: the old result stays, still marked stale
    assert "empty" in view.single.error and view.single.stale and view.single.result.components == ("0.1",)
    view.single.prompt = PROMPT
    run(view.single)
    assert not view.single.stale and view.single.result.components == ("0.2",)
    view.sweep.prompt = PROMPT
    view.sweep.run(background=False)
    assert not view.sweep.stale
    view.sweep.kind = "blocks"
    assert view.sweep.stale and not view.single.stale


def test_a_target_without_its_leading_space_gets_a_hint(session):
    view = AblationView(session)
    for part in (view.single, view.sweep, view.patching):
        assert part.target_hint == ""
        part.target = "Paris"
        assert "' Paris'" in part.target_hint
    assert view.single.target_hint and view.single.target == "Paris"


# -------------------------------------------------------------------- sweeps
def test_foreground_sweep_fills_the_heatmap_live(session):
    history = History()
    view = AblationSweep(session, history=history, prompt=LONG, target=" the")
    view.job.live.interval = 0.0  # flush every batch's report
    seen = []
    original = view.job._progress

    def record(progress, partial):
        original(progress, partial)
        seen.append((view._pane.object, int(np.isnan(sweep_source(view).data["effect"]).sum()),
                     view.job.bar.value, view.job.status))

    view.job.live._on_progress = record
    job = view.run(background=False)
    assert job.status == DONE and view.job.error == ""
    result = view.result
    assert result.complete and result.effects.shape == (N_LAYERS, N_HEADS)
    # One figure, filled in place: fewer empty cells after every batch, the bar and text moving.
    figs = {id(fig) for fig, *_ in seen}
    assert len(figs) == 1 and len(seen) >= N_LAYERS
    empties = [n for _, n, _, _ in seen]
    assert empties[0] == (N_LAYERS - 1) * N_HEADS and empties[-1] == 0
    assert all(a >= b for a, b in zip(empties, empties[1:]))
    assert [bar for *_, bar, _ in seen][:N_LAYERS] == [4, 8, 12]
    assert seen[0][3].startswith("4/12 heads") and "heads/s" in seen[0][3]
    # The chart holds the engine's effects, checked against the sequential (plain nnsight) sweep.
    data = sweep_source(view).data
    assert np.array_equal(np.asarray(data["effect"], dtype=np.float32), result.effects.ravel())
    assert list(data["spec"]) == list(result.components)
    reference = sweep(session, dataclasses.replace(result.request, method="sequential"))
    assert np.allclose(data["effect"], reference.effects.ravel(), atol=1e-4)
    assert data["x"][:5] == ["0", "1", "2", "3", "0"] and data["y"][:5] == ["L0"] * 4 + ["L1"]
    mapper = view._pane.object.select_one({"name": ac.SWEEP_MAPPER})
    assert mapper.high == pytest.approx(float(np.abs(result.effects).max())) and mapper.low == -mapper.high
    assert view.job.status.startswith("Done: 12 heads") and view.job.bar.value == view.job.bar.max == 12
    assert [e.result for e in history.entries] == [result] and "heads sweep (exact, zero)" in history.entries[0].label
    top = result.top(3)
    assert top[0][0] in view._top.object and f"{top[0][1]:+.3f}" in view._top.object


def test_cancelled_sweep_keeps_the_finished_cells(session):
    history = History()
    view = AblationSweep(session, history=history, prompt=LONG, target=" and", mode="zero")
    original = view.job._progress

    def cancel_after_first_batch(progress, partial):
        original(progress, partial)
        view.job.cancel()

    view.job.live._on_progress = cancel_after_first_batch
    job = view.run(background=False)
    assert job.status == CANCELLED
    result = view.result
    assert 0 < result.done < result.total == N_LAYERS * N_HEADS
    data = np.asarray(sweep_source(view).data["effect"], dtype=float)
    finished = ~np.isnan(data)
    assert finished.sum() == result.done and finished[:result.done].all()
    full = sweep(session, result.request)  # the complete sweep (a cancelled one is never cached)
    assert full.complete and full is not result
    assert np.allclose(data[finished], full.effects.ravel()[finished], atol=1e-5)
    assert view.job.status.startswith(f"Cancelled after {result.done}/12 heads") and "kept" in view.job.status
    assert len(history) == 1 and history.entries[0].result is result and "cancelled" in history.entries[0].label
    assert not view.job.running


def test_blocks_and_neuron_sweeps_and_the_attribution_method(session):
    view = AblationSweep(session, prompt=PROMPT, kind="blocks")
    view.run(background=False)
    result = view.result
    data = sweep_source(view).data
    assert result.effects.shape == (N_LAYERS, 2) and data["x"][:2] == ["attn", "mlp"]
    assert np.allclose(data["effect"], result.effects.ravel())

    view.param.update(kind="neurons", top_n=20)
    view.run(background=False)
    result = view.result
    fig = view._pane.object
    # A ranked chart: the largest |effect| on top, every component's row kept in the source.
    assert len(result.components) == 20
    assert list(fig.y_range.factors) == [spec for spec, _ in reversed(result.top(ac.SWEEP_TOP_N))]
    assert ac.sweep_hint(result).startswith("Click a bar")
    data = sweep_source(view).data
    assert np.allclose(data["effect"], result.effects) and np.allclose(data["activation"], result.activations)
    assert view.job.status.startswith("Done: 20 neurons")

    view.param.update(kind="heads", method="attribution")
    view.run(background=False)
    result = view.result
    assert result.request.method == "attribution" and "attribution estimate" in view._pane.object.title.text
    assert np.allclose(sweep_source(view).data["effect"], result.effects.ravel())


def test_sweep_errors_keep_the_previous_chart_and_a_tap_selects_the_component(session):
    view = AblationSweep(session, prompt=PROMPT)
    view.run(background=False)
    fig, result = view._pane.object, view.result
    view.prompt = ""
    job = view.run(background=False)
    assert job.status == "error" and "empty" in view.job.error
    assert view._pane.object is fig and view.result is result
    view.param.update(mode="resample", second_prompt="Too short")
    view.prompt = PROMPT
    view.run(background=False)
    assert "equal token length" in view.job.error and view._pane.object is fig
    # What a click on a cell does in the browser: the component goes to the single-ablation field.
    picked = []
    view.on_pick = picked.append
    source = sweep_source(view)
    source.selected.indices = [6]
    assert picked == [source.data["spec"][6]] == ["1.2"]
    assert "1.2" in view.hint


def test_progress_text():
    assert parts.progress_text(Progress(54, 270, 10.0), "heads") == "54/270 heads · 5.4 heads/s · ~40 s left"
    assert parts.progress_text(Progress(0, 270, 0.5), "heads") == "0/270 heads"
    assert parts.progress_text(Progress(60, 60, 2.0), "neurons") == "60/60 neurons · 30.0 neurons/s"


def test_sweep_chart_from_a_restored_result(session):
    """Charts need only the result: a snapshot's round-tripped (partial) sweep draws the same."""
    view = AblationSweep(session, prompt=PROMPT, kind="blocks")
    original = view.job._progress
    view.job.live._on_progress = lambda p, part: (original(p, part), view.job.cancel())
    view.run(background=False)
    result = view.result
    again = SweepResult.from_dict(result.to_dict())
    a, b = ac.sweep_data(result), ac.sweep_data(again)
    assert a["spec"] == b["spec"] and np.allclose(a["effect"], b["effect"], equal_nan=True)


# ------------------------------------------------------------------ patching
def test_patching_fills_the_heatmap_with_the_engines_fractions(session):
    history = History()
    view = PatchingPanel(session, history=history, clean=CLEAN_LONG, corrupt=CORRUPT_LONG, target=" Paris",
                        compare_token=" Rome")
    n = session.encode(CLEAN_LONG).numel()
    assert n >= 12 and view.counts == f"clean: {n} tokens · corrupted: {n} tokens · equal ✓"
    view.job.live.interval = 0.0
    seen = []
    original = view.job._progress
    view.job.live._on_progress = lambda p, part: (original(p, part), seen.append(view._pane.object))
    job = view.run(background=False)
    assert job.status == DONE and view.job.error == ""
    result = view.result
    assert result.complete and result.restored.shape == (N_LAYERS, n)
    assert len({id(f) for f in seen}) == 1 and len(seen) >= N_LAYERS  # one figure, filled in place
    fig = view._pane.object
    data = fig.select_one({"name": ac.PATCH_SOURCE}).data
    assert np.allclose(data["restored"], result.restored.ravel())
    assert list(fig.x_range.factors) == position_labels(result.corrupt_tokens)
    assert html.escape("' Italy'") in data["corrupt_token"] and html.escape("' France'") in data["clean_token"]
    # Independent check of some cells through the plain nnsight path.
    request = PatchRequest(CLEAN_LONG, CORRUPT_LONG, " Paris", "resid", " Rome")
    for layer, pos in ((0, n - 2), (1, n - 2), (2, n - 1), (0, 0)):
        assert result.restored[layer, pos] == pytest.approx(restored_fraction(session, request, [(layer, [pos])]),
                                                            abs=1e-4)
    assert view.job.status.startswith(f"Done: {3 * n} cells") and view.job.bar.value == 3 * n
    assert history.entries[-1].result is result


def test_patching_errors_keep_the_previous_heatmap(session):
    view = PatchingPanel(session, clean=PROMPT, corrupt=ITALY, target=" Paris", site="mlp")
    view.run(background=False)
    fig, result = view._pane.object, view.result
    view.corrupt = "The capital city of Italy is"
    assert "clean: 5 tokens · corrupted: 6 tokens · **they differ**" in view.counts
    job = view.run(background=False)
    assert job.status == "error"
    assert "equal token length" in view.job.error and "5 tokens" in view.job.error
    assert view._pane.object is fig and view.result is result
    view.corrupt = ""
    assert view.counts.startswith("clean: 5 tokens · corrupted: 0 tokens")
    view.run(background=False)
    assert "empty" in view.job.error
    view.corrupt = ITALY
    view.run(background=False)
    assert view.job.error == ""


def test_cancelled_patching_keeps_what_finished(session):
    history = History()
    view = PatchingPanel(session, history=history, clean=CLEAN_LONG, corrupt=CORRUPT_LONG, target=" Paris",
                        site="attn")
    original = view.job._progress
    view.job.live._on_progress = lambda p, part: (original(p, part), view.job.cancel())
    job = view.run(background=False)
    result = view.result
    assert job.status == CANCELLED and 0 < result.done < result.total
    restored = np.asarray(view._pane.object.select_one({"name": ac.PATCH_SOURCE}).data["restored"])
    assert np.isfinite(restored).sum() == result.done
    assert view.job.status.startswith("Cancelled") and "cancelled" in history.entries[-1].label
    full = patch(session, result.request)
    finite = np.isfinite(result.restored)
    assert np.allclose(result.restored[finite], full.restored[finite], atol=1e-5)


# ---------------------------------------------------------------- rendering
def test_view_and_app_render(session):
    view = AblationView(session)
    assert pn.panel(view).get_root(Document()) is not None
    assert view._sections._names == ["Single ablation", "Sweep", "Activation patching"]
    app = ExplorerApp(session)
    assert "Ablation" in app._tabs._names and isinstance(app.ablation, AblationView)
    assert app.ablation.history is app.history
    assert math.isfinite(view.sweep.param.top_n.bounds[1])
