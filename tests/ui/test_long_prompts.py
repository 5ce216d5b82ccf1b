"""A long prompt's charts in a real browser: no canvas over the browsers' limit, nothing blank or
broken, and a position window that really pans (issue 15, defects 1.2 and 1.4).

The page is standalone (bokeh's file_html with inline resources, opened from file://): every chart
builder's output for the results of a 1,200-token prompt (synthetic: tests/long_results.py), as a
snapshot's HTML export or a view shows them.
"""
from __future__ import annotations

import pytest

pytest.importorskip("playwright")

import long_results as lr
from bokeh.embed import file_html
from bokeh.layouts import column
from bokeh.resources import INLINE

from browser import FRAME_JS
from widgets import ablation_charts as ac
from widgets import charts
from widgets import heads_charts as hc
from widgets import neuron_charts as nc
from widgets.chart_style import MAX_CANVAS_PX, chart_window

N = 1200  # tokens: the 1,150-word prompt was about this long

# Per canvas: its backing size, its size on the page, and how many sampled pixels are painted.
CANVASES_JS = """cs => cs.map(c => {
  const box = c.getBoundingClientRect()
  let painted = 0
  const ctx = c.width && c.height ? c.getContext('2d') : null
  if (ctx) {
    const data = ctx.getImageData(0, 0, c.width, c.height).data
    for (let i = 3; i < data.length; i += 4 * 97) if (data[i] > 0) painted++
  }
  return {width: c.width, height: c.height, css_width: box.width, css_height: box.height, painted}
})"""

# A model's x range (start, end, bounds) in the browser, found by name.
RANGE_JS = """(name) => {
  for (const doc of Bokeh.documents) {
    const fig = doc.get_model_by_name(name)
    if (fig) return [fig.x_range.start, fig.x_range.end, fig.x_range.bounds]
  }
  return null
}"""


def long_charts():
    lens = lr.lens(N)
    pattern = lr.pattern(N)
    base, ablated = ac.lens_pair(lr.ablation(N))
    return [
        charts.lens_heatmap(lens, "prob", position=N - 1), charts.target_curve(lens, N - 1),
        charts.comparison_chart(lr.comparison(N), 0.1),
        hc.pattern_heatmaps([pattern, lr.pattern(N, 2, 0)], 9, 3), hc.pattern_lines([pattern], 9, 3),
        base, ablated, ac.target_pair(lr.ablation(N)),
        ac.sweep_chart(lr.sweep("neurons", n_neurons=1536, n=N)), ac.patch_chart(lr.patch(N)),
        nc.prompt_activation_chart(lr.prompt_activation(N)),
    ]


def test_long_prompt_charts_render_within_the_canvas_limit(browser, tmp_path):
    models = long_charts()
    windowed = [m for m in models if chart_window(m) is not None]
    assert len(windowed) >= 6  # lens, patterns, lines, both ablation lenses, patching, prompt bars
    page_path = tmp_path / "long.html"
    page_path.write_text(file_html(column(*models), INLINE, "long prompt"))

    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # Importing panel (as the app does) adds its es-module-shims to bokeh's inline resources as a
    # relative URL that a file:// page cannot load: harmless here, and not the charts' doing.
    page.on("requestfailed", lambda r: None if "es-module-shims" in r.url else errors.append(r.url))
    page.goto(page_path.as_uri())
    page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=60_000)
    page.locator("canvas").nth(2 * len(models) - 1).wait_for(state="attached", timeout=60_000)
    page.wait_for_timeout(500)  # the last frames paint

    canvases = page.locator("canvas").evaluate_all(CANVASES_JS)
    assert len(canvases) >= 2 * len(models)
    for c in canvases:
        assert c["width"] <= MAX_CANVAS_PX and c["height"] <= MAX_CANVAS_PX, c
        assert c["css_width"] <= MAX_CANVAS_PX and c["css_height"] <= MAX_CANVAS_PX, c
    big = [c for c in canvases if c["width"] > 100 and c["height"] > 100]
    assert sum(1 for c in big if c["painted"] > 0) >= len(models)  # every chart drew something
    # No broken images anywhere (bokeh draws its icons as CSS; an <img> here must have loaded).
    assert page.locator("img").evaluate_all("is => is.filter(i => !i.complete || i.naturalWidth === 0).length") == 0

    # The window is real: dragging the lens heatmap pans it toward earlier positions, within bounds.
    start, end, bounds = page.evaluate(RANGE_JS, charts.HEATMAP)
    held = chart_window(models[0])
    assert (start, end) == (held[3] - 0.5, held[4] - 0.5) and bounds == [held[0] - 0.5, held[1] - 0.5]
    frame = page.evaluate(FRAME_JS, charts.HEATMAP)
    y = frame["top"] + frame["height"] / 2
    page.mouse.move(frame["left"] + 100, y)
    page.mouse.down()
    page.mouse.move(frame["left"] + 100 + frame["width"] / 2, y, steps=8)
    page.mouse.up()
    moved = page.evaluate(RANGE_JS, charts.HEATMAP)
    assert moved[0] < start and moved[0] >= bounds[0] and moved[1] - moved[0] == pytest.approx(end - start)
    context.close()
    assert not errors, errors
