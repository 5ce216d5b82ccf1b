"""The Steering tab's "Steering vs the pronoun swap" section served in a real browser on a tiny
model: a one-step tiny swap run made here is picked from the runs list, Compare runs, and the
chart shows the steering sweep and both swap arms, the table their rows."""
from __future__ import annotations

import pytest

pytest.importorskip("playwright")

from panel.tests.util import serve_component, wait_until  # noqa: E402
from playwright.sync_api import expect  # noqa: E402

from explorer.persistence.history import History  # noqa: E402
from explorer.training.intervene import run_intervention  # noqa: E402
from widgets.steering_compare import SteerComparePart  # noqa: E402

TIMEOUT = 120_000  # ms: seconds on idle cores, far more on a busy machine
LINES = ["The farmer said he would sell his house.", "My uncle told him that he is late.",
         "The old king hurt himself, and he laughed.", "The pilot asked his father for help."] * 4

# The legend labels and named figures in the browser's documents (what the page has rendered).
CHART_JS = """() => {
  const legends = [], figures = []
  for (const doc of Bokeh.documents) {
    for (const model of doc._all_models.values()) {
      if (model.type === "LegendItem" && model.label) legends.push(model.label.value)
      if (model.type === "Figure" && model.name) figures.push(model.name)
    }
  }
  return {legends, figures}
}"""


@pytest.fixture
def served(page, tiny_sessions, tmp_path):
    session = tiny_sessions["llama"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    runs = tmp_path / "runs"
    run_intervention(session, out_dir=runs / "tiny-swap", corpus=str(corpus), steps=1, batch_size=2, seq_len=16,
                     lr=3e-3, warmup=1, train="last:1", eval_every=1, checkpoint_every=1, heldout_documents=4,
                     heldout_windows=2, eval_templates=1, eval_pairs=4, device="cpu")
    parts: list[SteerComparePart] = []

    def factory():
        part = SteerComparePart(session, history=History(), runs_root=runs, layer=1, alphas="-1,0,1")
        parts.append(part)
        return part

    serve_component(page, factory)
    wait_until(lambda: len(parts) == 1, page)
    return parts[0]


def test_a_tiny_swap_run_is_compared_with_steering_in_the_page(page, served):
    part = served
    picker = page.locator(".steer-compare-run select")
    expect(picker).to_contain_text("tiny-swap (done, 1 steps)")
    picker.select_option(label="tiny-swap (done, 1 steps)")
    wait_until(lambda: part.chosen_run().endswith("tiny-swap"), page)
    page.locator(".steer-compare-button button").click()
    expect(page.locator(".steer-compare-status")).to_contain_text("Done: 4 of 4 settings", timeout=TIMEOUT)
    expect(page.locator(".steer-compare-chart canvas").first).to_be_visible()
    chart = page.evaluate(CHART_JS)
    assert {"steering at L1", "direction ablated", "swap: control arm", "swap: swapped arm"} <= set(chart["legends"])
    metrics = ("pronoun_preference", "stereotype_alignment", "minimal_pairs", "heldout_loss")
    assert {f"steering-vs-swap-chart-{m}" for m in metrics} <= set(chart["figures"])
    table = page.locator(".steer-compare-table table")
    expect(table).to_be_visible()
    labels = table.locator("tr > th:first-child").all_inner_texts()
    assert len(labels) == 7 and labels[0] == ""             # the header row, then one row per setting
    assert labels[1:5] == ["steer α=-1", "steer α=+0", "steer α=+1", "direction ablated"], labels
    assert labels[5].startswith("swap control (step") and labels[6].startswith("swap swapped (step"), labels
    assert part.result.kinds == ("steer", "steer", "steer", "ablate", "control", "swapped")
