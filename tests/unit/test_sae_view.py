"""The Train SAE view on a tiny model, driven without a browser: a run fills the four charts from
its result, cancel + resume finishes it, bad settings and a bad SAE folder are visible errors, and
the encode heatmap stays under the canvas limit (a position window for long prompts)."""
from __future__ import annotations

import asyncio

import pytest

from explorer.core.jobs import CANCELLED
from explorer.features.train import TrainConfig
from widgets import sae_charts as sc
from widgets.chart_style import MAX_CANVAS_PX, chart_window
from widgets.sae_train_view import SAETrainView

SMALL = TrainConfig(window=32, batch_windows=4, eval_windows=2, eval_every=2, warmup_steps=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from explorer.core.defaults import ensure_default_corpus

    with open(ensure_default_corpus(), encoding="utf-8") as f:
        lines = [next(f) for _ in range(10)]
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return str(path)


def make_view(session, corpus, out, **params):
    settings = dict(layer=1, width=32, k=4, max_tokens=1024, batch=64, corpus=corpus, out_dir=str(out))
    return SAETrainView(session, background=False, base_config=SMALL, **{**settings, **params})


def test_a_run_fills_the_charts_and_sets_the_encode_folder(tiny_sessions, corpus, tmp_path):
    view = make_view(tiny_sessions["llama"], corpus, tmp_path / "sae")
    view.param.trigger("start")
    assert not view.running and view.error == ""
    r = view.result
    assert r is not None and r.status == "done" and r.tokens == 1024
    assert view.status.startswith("Done") and view.sae_path == r.out_dir
    data = sc.training_data(r)
    for metric, fig in view._figures.items():
        for (m, line), values in data.items():
            if m == metric:
                src = fig.select_one({"name": sc.source_name(m, line)})
                assert src.data["value"] == values["value"] and len(values["value"]) > 0
    assert data[("fvu", "train")]["value"] == [float(v) for v in r.log_fvu]


def test_cancel_then_resume_finishes_the_run(tiny_sessions, corpus, tmp_path):
    view = make_view(tiny_sessions["llama"], corpus, tmp_path / "sae")
    original = view._on_progress
    calls = []

    def cancel_after_two(progress, partial):
        original(progress, partial)
        calls.append(progress.done)
        if len(calls) == 2:
            view.cancel_run()

    view._job._on_progress = cancel_after_two
    view._job.interval = 0  # every report reaches the view: a fast machine finishes within two throttled ones
    job = view.start_run()
    assert job.status == CANCELLED and view.result.status == "cancelled"
    assert "Resume" in view.status
    view._job._on_progress = original
    view.param.trigger("resume")
    assert view.result.status == "done" and view.result.tokens == 1024


def test_bad_settings_and_a_bad_sae_folder_are_shown(tiny_sessions, corpus, tmp_path):
    view = make_view(tiny_sessions["llama"], corpus, tmp_path / "sae", layer=9)
    view.param.trigger("start")
    assert "layer 9 is out of range" in view.error and view.result is None
    view.sae_path = str(tmp_path / "nothing")
    assert asyncio.run(view.encode()) is None
    assert "SAE not found" in view.encode_error


def test_encode_draws_a_heatmap_windowed_for_long_prompts(tiny_sessions, corpus, tmp_path):
    view = make_view(tiny_sessions["llama"], corpus, tmp_path / "sae")
    view.start_run()
    view.prompt, view.top_k = "The nurse said that she", 3
    result = asyncio.run(view.encode())
    assert result is not None and view.encode_error == ""
    fig = view._heatmap.object
    cells = fig.select_one({"name": sc.HEATMAP_SOURCE}).data
    assert len(cells["feature"]) == 5 * 3
    assert cells["feature"][:3] == [str(f) for f in result.features[0]]
    assert chart_window(fig) is None
    view.prompt = " ".join(["word"] * 200)   # the tiny model's context is 256
    long = asyncio.run(view.encode())
    fig = view._heatmap.object
    assert long is not None and len(long.tokens) == 200 and chart_window(fig) is not None
    assert fig.width <= MAX_CANVAS_PX and fig.height <= MAX_CANVAS_PX


def test_attribute_draws_the_ranked_features(tiny_sessions, corpus, tmp_path):
    view = make_view(tiny_sessions["llama"], corpus, tmp_path / "sae")
    view.start_run()
    view.prompt, view.top_k, view.attr_target = "The nurse said that", 4, " she"
    result = asyncio.run(view.attribute())
    assert result is not None and view.encode_error == "" and result.target == " she"
    fig = view._attribution.object
    cells = fig.select_one({"name": sc.ATTRIBUTION_SOURCE}).data
    assert len(cells["value"]) == 4 * 4
    assert cells["feature"][:4] == [int(f) for f in result.features]
    assert fig.width <= MAX_CANVAS_PX
    view.attr_target = "not one token at all"
    assert asyncio.run(view.attribute()) is None and "Could not attribute" in view.encode_error
