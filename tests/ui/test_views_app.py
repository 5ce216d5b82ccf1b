"""Issue 15's visual defects in a real browser: readable alerts, the probe tabs, landing at the top
of a tab, a sweep prompt that leaves the single ablation's alone, long prompts kept whole."""
from __future__ import annotations

import re

import pytest

pytest.importorskip("playwright")

from panel.tests.util import wait_until  # noqa: E402
from playwright.sync_api import expect  # noqa: E402

from browser import serve_explorer  # noqa: E402
from widgets.chart_style import contrast  # noqa: E402
from widgets.live import dispatch  # noqa: E402

RUN_TIMEOUT = 120_000  # ms: the default model on a shared CPU

# The host's colours and those of the text inside its shadow root.
COLORS_JS = """el => { const inner = el.shadowRoot && el.shadowRoot.querySelector('p');
  const host = getComputedStyle(el);
  return [host.color, host.backgroundColor, inner ? getComputedStyle(inner).color : host.color] }"""
# The page's main scroll box (panel-material-ui's Page scrolls this, not the window).
MAIN_SCROLL_JS = """() => { let found = null; const walk = (root) => { for (const el of root.querySelectorAll('*')) {
  if (!found && String(el.className).includes('main-content')) found = el; if (el.shadowRoot) walk(el.shadowRoot) } };
  walk(document); return found }"""


def hex_of(rgb: str) -> str:
    r, g, b = (int(v) for v in re.findall(r"\d+", rgb)[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def tab(page, name: str):
    return page.locator(".explorer-tabs .bk-tab", has_text=re.compile(f"^{re.escape(name)}$"))


def test_alerts_meet_wcag_aa_and_say_what_to_do(page, default_session):
    app, messages = serve_explorer(page, default_session)
    page.locator(".lens-prompt textarea").fill("   ")
    page.locator(".lens-run button").click()
    error = page.locator(".lens-error")
    expect(error).to_contain_text("Could not run the lens", timeout=RUN_TIMEOUT)
    expect(error).to_contain_text("type")  # the engine's message says what to do
    fg, bg, inner = error.evaluate(COLORS_JS)
    assert contrast(hex_of(fg), hex_of(bg)) >= 4.5, (fg, bg)
    assert contrast(hex_of(inner), hex_of(bg)) >= 4.5, (inner, bg)
    # The Generate and Train SAE tabs' alerts too (they used the theme's white on pink).
    doc = next(iter(app._tabs._models.values()))[0].document
    for name, view, css in (("Generate", app.generate, ".gen-error"), ("Train SAE", app.sae, ".sae-error")):
        tab(page, name).click()
        dispatch(doc, lambda view=view: setattr(view, "error", "**Could not run:** check the inputs."))
        expect(page.locator(css)).to_contain_text("check the inputs", timeout=RUN_TIMEOUT)
        fg, bg, inner = page.locator(css).evaluate(COLORS_JS)
        assert contrast(hex_of(fg), hex_of(bg)) >= 4.5 and contrast(hex_of(inner), hex_of(bg)) >= 4.5, (css, fg, bg)
    # Save / Export look like buttons: a filled background, readable text on it.
    for css in (".save-snapshot .bk-btn", ".export-html .bk-btn"):
        fg, bg = page.locator(css).evaluate("el => [getComputedStyle(el).color, getComputedStyle(el).backgroundColor]")
        assert "rgba(0, 0, 0, 0)" not in bg and contrast(hex_of(fg), hex_of(bg)) >= 4.5, (css, fg, bg)


def test_probe_tabs_render(page, default_session):
    app, messages = serve_explorer(page, default_session)
    tab(page, "Probes").click()
    expect(page.locator(".probes-run button")).to_be_visible()
    expect(page.locator(".tab-help")).to_contain_text("linear probe")
    tab(page, "Patchscope").click()
    expect(page.locator(".patchscope-prompt textarea")).to_be_visible()
    expect(page.locator(".tab-help")).to_contain_text("Patchscope")
    assert app.probes.history is app.history and app.patchscope.history is app.history
    assert [m.text for m in messages if m.type == "error"] == []


def test_a_tab_switch_lands_at_the_top_and_sections_keep_their_own_prompts(page, default_session):
    app, _ = serve_explorer(page, default_session, "Ablation", ".ablation-components input")
    page.locator(".ablation-components input").fill("3.1")
    page.locator(".ablation-run button").click()
    expect(page.locator(".ablation-status p")).to_contain_text("ablated 3.1", timeout=RUN_TIMEOUT)
    expect(page.locator(".ablation-lens-ablated canvas").first).to_be_visible()
    main = page.evaluate_handle(MAIN_SCROLL_JS)
    main.evaluate("el => { el.scrollTop = 900 }")
    wait_until(lambda: main.evaluate("el => el.scrollTop") > 100, page)
    tab(page, "Heads").click()
    wait_until(lambda: main.evaluate("el => el.scrollTop") == 0, page)
    # the click reaches the server after the page has scrolled: wait for it, or it lands after the
    # request below and takes the page back to Heads
    wait_until(lambda: app._tabs.active == 1, page)
    # "Ablate this neuron" from the neuron tab: the ablation tab at its top, the field in view.
    doc = next(iter(app._tabs._models.values()))[0].document
    dispatch(doc, lambda: app.neurons.request_ablation(("5:12",)))  # on the page's loop, as a click is
    wait_until(lambda: app._tabs.active == 2 and app.ablation.single.components == "5:12", page)
    expect(page.locator(".ablation-components input")).to_have_value("5:12")
    expect(page.locator(".ablation-components input")).to_be_in_viewport()
    # The sweep's prompt is its own: editing it leaves the single ablation's prompt alone.
    page.locator(".ablation-sections .bk-tab", has_text=re.compile("^Sweep$")).click()
    page.locator(".sweep-prompt textarea").fill("A sweep prompt")
    page.locator(".sweep-prompt textarea").blur()
    wait_until(lambda: app.ablation.sweep.prompt == "A sweep prompt", page)
    assert app.ablation.single.prompt == "The capital of France is"
    # A 6,000-character prompt is kept whole (no silent cut at 5,000).
    long = "word " * 1200
    page.locator(".sweep-prompt textarea").fill(long)
    page.locator(".sweep-prompt textarea").blur()
    wait_until(lambda: app.ablation.sweep.prompt == long, page)
