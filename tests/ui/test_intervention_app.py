"""The pronoun-swap view served in a real browser on a tiny model: preview the swap audit, start a
6-step run, watch both arms' curves grow in the page's own Bokeh sources, see it finish."""
from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("playwright")

from panel.tests.util import serve_component, wait_until  # noqa: E402
from playwright.sync_api import expect  # noqa: E402

from browser import FRAME_JS  # noqa: E402
from explorer.persistence.history import History  # noqa: E402
from explorer.training.intervene import InterventionConfig  # noqa: E402
from widgets import intervention_charts as ic  # noqa: E402
from widgets.intervention_view import InterventionView  # noqa: E402

STEPS = 6
RUN_TIMEOUT = 240_000  # ms: the tiny run takes ~15 s on 2 idle cores, far more on a busy machine
SOURCES = [ic.source_name(key, arm) for key in ("pronoun_preference", "train_loss") for arm in ("control", "swapped")]

# Row counts of named ColumnDataSources in the browser's documents (what the page has rendered).
ROWS_JS = """(names) => {
  const out = {}
  for (const doc of Bokeh.documents) {
    for (const name of names) {
      const model = doc.get_model_by_name(name)
      if (model) out[name] = model.data.step.length
    }
  }
  return out
}"""


@pytest.fixture
def served(page, tiny_sessions, tmp_path):
    lines = [f"The farmer said he would sell his house {i}. His father told him the men were late." for i in range(30)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    base = InterventionConfig(corpus=str(corpus), steps=STEPS, batch_size=2, seq_len=16, lr=3e-3, warmup=1,
                              train="last:2", eval_every=1, checkpoint_every=3, heldout_documents=4,
                              heldout_windows=2, eval_templates=1, eval_pairs=4, device="cpu")
    views: list[InterventionView] = []

    def factory():
        view = InterventionView(tiny_sessions["llama"], history=History(), runs_dir=tmp_path / "runs",
                                base_config=base)
        views.append(view)
        return view

    messages, _ = serve_component(page, factory)
    wait_until(lambda: len(views) == 1, page)
    return views[0], messages


def test_a_tiny_run_grows_both_curves_live_and_finishes(page, served):
    view, messages = served
    page.locator(".swap-preview button").click()
    expect(page.locator(".swap-audit")).to_contain_text("Training tokens", timeout=RUN_TIMEOUT)
    expect(page.locator(".swap-audit")).to_contain_text("he→she")
    expect(page.locator(".swap-audit-chart canvas").first).to_be_visible()
    assert page.locator(".swap-audit del").count() > 0  # the sample diff marks the changed words
    expect(page.locator(".swap-steps input")).to_have_value(str(STEPS))

    page.locator(".swap-start button").click()
    expect(page.locator(".swap-cancel button")).to_be_enabled(timeout=RUN_TIMEOUT)
    seen: list[dict] = []  # the page's row counts, sampled while the run goes

    def sample() -> dict:
        rows = page.evaluate(ROWS_JS, SOURCES)
        if rows and (not seen or rows != seen[-1]):
            seen.append(rows)
        return rows

    pref_c, pref_s = SOURCES[0], SOURCES[1]
    deadline = time.monotonic() + RUN_TIMEOUT / 1000
    while time.monotonic() < deadline:
        rows = sample()
        if rows.get(pref_c) == STEPS + 1 and rows.get(pref_s) == STEPS + 1:
            break
        page.wait_for_timeout(100)  # polling the page's state, not waiting for a guess
    assert seen and seen[-1][pref_c] == seen[-1][pref_s] == STEPS + 1
    # Both arms' curves grew in the page: several distinct sizes on the way, never shrinking.
    for name in SOURCES:
        counts = [s.get(name, 0) for s in seen]
        assert counts == sorted(counts), (name, counts)
        assert len(set(counts)) >= 3, (name, counts)
    assert seen[-1][SOURCES[2]] == seen[-1][SOURCES[3]] == STEPS  # one training loss per step and arm

    expect(page.locator(".swap-status p")).to_contain_text(f"Done: {STEPS} steps", timeout=RUN_TIMEOUT)
    expect(page.locator(".swap-effect p")).to_contain_text("swapped − control pronoun preference")
    expect(page.locator(".swap-start button")).to_be_enabled()
    result = view.result
    assert result.status == "done" and result.step == STEPS
    # The page's points are the engine's numbers.
    values = page.evaluate("""(name) => { for (const doc of Bokeh.documents) { const m = doc.get_model_by_name(name)
                              if (m) return Array.from(m.data.value) } return null }""", pref_s)
    np.testing.assert_allclose(values, result.swapped.pronoun_preference, rtol=1e-6)
    assert [e.result for e in view.history.entries][-1] is result
    for key in ic.RUN_METRICS:  # every chart is drawn at its size (a FlexBox once collapsed them)
        frame = page.evaluate(FRAME_JS, ic.chart_name(key))
        assert frame and frame["width"] > 200 and frame["height"] > 100, (key, frame)
    assert [m.text for m in messages if m.type == "error"] == []
