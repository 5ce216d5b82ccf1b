"""Widgets without a browser: chart builders on real lens results, the view driven by its params."""
from __future__ import annotations

import asyncio
import logging

import numpy as np
import panel as pn
import pytest
from bokeh.document import Document
from bokeh.models import ColumnDataSource, Span

from explorer import CompareRequest, compare_prompts, logit_lens
from widgets import ExplorerApp, LogitLensView, charts, create_app, serve_app
from widgets import app as app_module
from widgets import lens_view as lens_view_module

PROMPT = "The capital of France is"
PROMPT_B = "The capital of France is London. The capital of France is"


@pytest.fixture(scope="module")
def session(tiny_sessions):
    return tiny_sessions["llama"]


@pytest.fixture(scope="module")
def result(session):
    return logit_lens(session, PROMPT, top_k=5)


@pytest.fixture(scope="module")
def comparison(session):
    return compare_prompts(session, CompareRequest(PROMPT, PROMPT_B, top_k=5))


@pytest.fixture
def no_model(monkeypatch):
    """Make any model work from the view fail loudly: for changes that must not need the model."""

    def fail(*args, **kwargs):
        raise AssertionError("the model was used")

    monkeypatch.setattr(lens_view_module, "logit_lens", fail)
    monkeypatch.setattr(lens_view_module, "compare_prompts", fail)


def run(view: LogitLensView) -> None:
    asyncio.run(view.compute())


# ------------------------------------------------------------------- charts
def test_heatmap_has_one_cell_per_row_and_position(result):
    fig = charts.lens_heatmap(result)
    source = fig.select_one({"name": charts.HEATMAP_SOURCE})
    assert isinstance(source, ColumnDataSource)
    n_rows, n_pos = result.n_rows, result.n_positions
    assert len(source.data["x"]) == n_rows * n_pos
    for i, (row, pos) in enumerate(zip(source.data["row"], source.data["pos"])):
        assert source.data["top1"][i] == result.top_tokens[row, pos, 0]
        assert source.data["value"][i] == pytest.approx(float(result.top_probs[row, pos, 0]))
        assert source.data["y"][i] == result.layer_labels[row]
    # Every (row, pos) pair appears exactly once.
    assert len(set(zip(source.data["row"], source.data["pos"]))) == n_rows * n_pos
    # Unique position labels, embeddings at the bottom of the y range.
    assert len(set(fig.x_range.factors)) == n_pos
    assert fig.x_range.factors[-1].startswith(f"{n_pos - 1}: ")
    assert list(fig.y_range.factors) == list(result.layer_labels)
    assert fig.name == charts.HEATMAP


def test_heatmap_metrics_and_hover(result):
    for metric, values in (("entropy", result.entropy), ("kl", result.kl_to_final)):
        source = charts.lens_heatmap(result, metric).select_one({"name": charts.HEATMAP_SOURCE})
        assert np.allclose(source.data["value"], values.ravel(), atol=1e-6)
    source = charts.lens_heatmap(result).select_one({"name": charts.HEATMAP_SOURCE})
    # The hover's top-k column lists k tokens per cell, the top-1 first.
    first = source.data["topk"][0].split("<br>")
    assert len(first) == result.top_tokens.shape[-1]
    with pytest.raises(ValueError):
        charts.lens_heatmap(result, "nope")


def test_token_display_helpers():
    assert charts.show_token("a\nb") == "a\\nb"
    assert charts.show_token("  ") == "␣␣"
    assert charts.quote_token(" Paris") == "' Paris'"
    assert charts.position_labels([" a", " a"]) == ["0: a", "1: a"]
    assert len(charts.shorten("x" * 200)) <= 44


def test_target_curve_at_a_position(result):
    layout = charts.target_curve(result, 1)
    assert layout.name == charts.TARGET_CURVE
    source = layout.select_one({"name": "lens-target-source"})
    assert np.allclose(source.data["prob"], result.target_probs[:, 1])
    assert source.data["rank"] == [int(r) for r in result.target_ranks[:, 1]]
    assert layout.select_one({"name": "lens-target-rank"}).y_scale.__class__.__name__ == "LogScale"
    # Out-of-range positions are clamped, not an error.
    last = charts.target_curve(result, 999).select_one({"name": "lens-target-source"})
    assert np.allclose(last.data["prob"], result.target_probs[:, -1])


def test_comparison_chart_marks_the_divergence(comparison):
    row = comparison.divergence_row(0.0)
    assert row is not None  # two different prompts differ somewhere
    layout = charts.comparison_chart(comparison, 0.0)
    assert layout.name == charts.COMPARE_CHART
    vertical = [s for s in layout.select({"type": Span}) if s.dimension == "height"]
    assert vertical and all(s.location == row for s in vertical)
    assert "Diverges first at" in charts.describe_divergence(comparison, 0.0)
    # A threshold above any |Δp| has no divergence: no marker, a different sentence.
    layout = charts.comparison_chart(comparison, 1.0)
    assert not [s for s in layout.select({"type": Span}) if s.dimension == "height"]
    assert charts.describe_divergence(comparison, 1.0).startswith("No divergence above 1.00")


# --------------------------------------------------------------------- view
def test_view_runs_the_lens(session):
    view = LogitLensView(session, prompt=PROMPT, top_k=5)
    assert view.result is None
    view.param.trigger("run")  # no event loop running: the async handler runs to completion
    assert view.result is not None and view.error == ""
    assert view.result.n_positions == view.position + 1  # the last position is selected
    assert view.param.position.bounds == (0, view.result.n_positions - 1)
    assert view._heatmap.object is not None and view._curve.object is not None
    assert f"final prediction {charts.quote_token(view.result.top_tokens[-1, -1, 0])}" in view.status
    assert "position" in view._topk.object
    assert not view.busy


def test_view_keeps_the_loop_free_and_queues_a_second_request(session):
    view = LogitLensView(session, prompt="A different prompt for the queue test", top_k=5)

    async def scenario():
        task = asyncio.create_task(view.compute())
        await asyncio.sleep(0)  # the run has started and waits on its worker thread
        assert view.busy
        await view.compute()  # while busy: remembered, not dropped
        assert view._rerun
        await task

    asyncio.run(scenario())
    assert not view.busy and view.result is not None


def test_empty_prompt_shows_an_error_and_keeps_the_result(session):
    view = LogitLensView(session, prompt=PROMPT, top_k=5)
    run(view)
    previous, heatmap = view.result, view._heatmap.object
    view.prompt = "   "
    run(view)
    assert "empty" in view.error
    assert view.result is previous and view._heatmap.object is heatmap
    view.prompt = PROMPT
    run(view)
    assert view.error == ""


def test_unexpected_errors_are_shown_and_logged(session, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(lens_view_module, "logit_lens", broken)
    view = LogitLensView(session, prompt=PROMPT)
    with caplog.at_level(logging.ERROR, logger=lens_view_module.__name__):
        run(view)
    assert "Unexpected error" in view.error and "boom" in view.error
    assert "run the lens failed" in caplog.text
    assert not view.busy


def test_compare_mode_and_threshold_without_the_model(session, monkeypatch):
    view = LogitLensView(session, prompt=PROMPT, prompt_b=PROMPT_B, compare=True, top_k=5, threshold=0.0)
    run(view)
    assert view.comparison is not None and view.error == ""
    assert view.result is view.comparison.a
    assert view.divergence.startswith("Diverges first at L") or view.divergence.startswith("Diverges first at embed")
    chart = view._compare_chart.object

    def fail(*args, **kwargs):
        raise AssertionError("the model was used")

    monkeypatch.setattr(lens_view_module, "logit_lens", fail)
    monkeypatch.setattr(lens_view_module, "compare_prompts", fail)
    view.threshold = 1.0
    assert view.divergence.startswith("No divergence above 1.00")
    assert view._compare_chart.object is not chart
    view.heatmap_of = "B"
    assert view.result is view.comparison.b
    assert view.position == view.comparison.b.n_positions - 1


def test_compare_needs_prompt_b(session):
    view = LogitLensView(session, prompt=PROMPT, compare=True, prompt_b="")
    run(view)
    assert "prompt B is empty" in view.error and view.comparison is None


def test_position_and_metric_change_charts_without_the_model(session, no_model, result):
    view = LogitLensView(session, prompt=PROMPT, top_k=5)
    view._show(result)  # what a finished run does: the last position is selected
    assert view.position == result.n_positions - 1
    curve, heatmap = view._curve.object, view._heatmap.object
    view.position = 0
    assert view._curve.object is not curve
    source = view._curve.object.select_one({"name": "lens-target-source"})
    assert np.allclose(source.data["prob"], result.target_probs[:, 0])
    assert "position 0" in view._topk.object
    view.metric = "entropy"
    assert view._heatmap.object is not heatmap
    values = view._heatmap.object.select_one({"name": charts.HEATMAP_SOURCE}).data["value"]
    assert np.allclose(values, result.entropy.ravel(), atol=1e-6)


def test_tapping_a_cell_selects_its_position_and_token(session):
    view = LogitLensView(session, prompt=PROMPT, top_k=5)
    run(view)
    result = view.result
    row, pos = 1, 0
    expected_id = int(result.top_ids[row, pos, 0])
    source = view._heatmap.object.select_one({"name": charts.HEATMAP_SOURCE})
    index = next(i for i, (r, p) in enumerate(zip(source.data["row"], source.data["pos"])) if (r, p) == (row, pos))
    source.selected.indices = [index]  # what a tap in the browser does
    assert view.error == ""
    assert view.position == pos
    assert view.target in (str(result.top_tokens[row, pos, 0]), f"#{expected_id}")
    assert view.result.target_id == expected_id  # re-ran with the new target
    assert view.result is not result


def test_a_new_prompt_or_a_compare_run_resets_the_position(session):
    """Issue 15 (5): after a cell click a compare run must not keep the old position."""
    view = LogitLensView(session, prompt=PROMPT, top_k=5)
    run(view)
    last = view.result.n_positions - 1
    view.position = 1  # the user picks a position: a rerun of the same prompt keeps it
    run(view)
    assert view.position == 1
    view.param.update(compare=True, prompt_b=PROMPT + " the")  # a compare run: back to the last position
    run(view)
    assert view.position == view.result.n_positions - 1 == last
    view.position = 2  # picked again on the compare run: kept by its rerun
    run(view)
    assert view.position == 2
    view.param.update(compare=False, prompt="The capital of Italy is")  # a new prompt: its last position
    run(view)
    assert view.position == view.result.n_positions - 1


def test_a_target_without_its_leading_space_gets_a_hint(session):
    view = LogitLensView(session)
    assert view.target_hint == ""
    view.target = "Paris"
    assert "' Paris'" in view.target_hint and "leading space" in view.target_hint
    view.target = " Paris"
    assert view.target_hint == ""


def test_view_renders_for_a_notebook(session):
    view = LogitLensView(session)
    root = pn.panel(view).get_root(Document())
    assert root is not None


# ---------------------------------------------------------------------- app
def test_app_renders_with_model_card(session):
    app = ExplorerApp(session)
    assert pn.panel(app).get_root(Document()) is not None
    page = create_app(session)
    assert page.get_root(Document()) is not None
    card = app_module.model_card(session)
    info = session.info()
    assert info.name in card and f"{info.n_heads} ({info.n_kv_heads} KV)" in card
    assert [title for title in app._tabs._names] == ["Logit lens", "Heads", "Ablation", "Neurons", "Pronoun swap",
                                                     "Generate", "Steering", "Probes", "Patchscope", "Train SAE",
                                                     "Features"]
    assert app.probes.history is app.history and app.patchscope.history is app.history


def test_sidebar_help_follows_the_tab(session):
    app = ExplorerApp(session)
    assert app.help.startswith("### Reading the lens")
    for i, name in enumerate(app._tabs._names):
        app._tabs.active = i
        assert app.help == app_module.TAB_HELP[name] and app.help.startswith("### ")
    assert len({app_module.TAB_HELP[n] for n in app._tabs._names}) == len(app._tabs._names)  # one per tab


def test_human_count():
    assert app_module.human_count(134_515_008) == "134.5 M"
    assert app_module.human_count(7_241_732_096) == "7.2 B"
    assert app_module.human_count(999) == "999"


def test_serve_app_binds_the_given_address(session, monkeypatch, capsys):
    calls = {}
    monkeypatch.setattr(app_module.pn, "serve", lambda panels, **kwargs: calls.update(panels=panels, **kwargs))
    serve_app(session, port=5123)
    assert "Interp Explorer at http://127.0.0.1:5123" in capsys.readouterr().out
    assert calls["address"] == "127.0.0.1" and calls["port"] == 5123
    assert calls["websocket_origin"] == ["127.0.0.1:5123", "localhost:5123"]
    assert callable(calls["panels"])  # one app per browser session, served at "/"
    serve_app(session, port=80, address="0.0.0.0", allow_websocket_origin=["example.org:80"])
    assert calls["address"] == "0.0.0.0" and calls["websocket_origin"] == ["example.org:80"]


def test_a_result_as_a_notebook_cell_draws_its_charts(result):
    """``logit_lens(session, p)`` as a cell's last line: Panel picks the registry's pane."""
    from widgets.registry import ResultPane, display_name, kind_of

    pane = pn.panel(result)
    assert isinstance(pane, ResultPane)
    assert pane.get_root(Document()) is not None
    figures = [o.object for o in pane._pane.objects if isinstance(o, pn.pane.Bokeh)]
    assert figures and figures[0].name == charts.HEATMAP
    assert display_name(result) == "logit lens" and kind_of(result).view == "lens"


def test_every_result_type_has_a_name_for_people():
    import importlib

    from explorer.core.results import RESULT_TYPES
    from explorer.persistence.snapshot import RESULT_MODULES
    from widgets import registry

    for module in RESULT_MODULES:  # every snapshot-able result type registers itself on import
        importlib.import_module(f"explorer.{module}")
    for name, cls in RESULT_TYPES.items():
        kind = registry.kind_for(cls)
        shown = registry.display_name(cls.__new__(cls))
        assert shown != name and "Result" not in shown, name
        assert kind is None or kind.group in registry.GROUPS


def test_every_error_box_is_the_readable_alert():
    """Panel's own danger alert is white on light pink (1.4:1); every view builds its error box
    with ``parts.alert`` (#58151c on #f8d7da, 10:1; its colours are checked in the browser)."""
    from pathlib import Path

    import widgets

    bare = [f"{p.name}:{i + 1}" for p in sorted(Path(widgets.__file__).parent.glob("*.py")) if p.name != "parts.py"
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()) if "pn.pane.Alert(" in line]
    assert not bare, f"use widgets.parts.alert: {bare}"


def test_secondary_buttons_get_an_outline_once():
    from widgets.parts import BUTTON_CSS, outline_secondary_buttons

    primary, plain = pn.widgets.Button(name="Run", button_type="primary"), pn.widgets.Button(name="Apply")
    download = pn.widgets.FileDownload(callback=lambda: None, filename="x.bin", label="Save")
    root = pn.Column(pn.Row(primary, plain), download)
    assert outline_secondary_buttons(root) == 2 and outline_secondary_buttons(root) == 0
    assert BUTTON_CSS in plain.stylesheets and BUTTON_CSS in download.stylesheets and BUTTON_CSS not in primary.stylesheets
