"""Regenerate assets/screenshot.png: serve the real app, run the lens, capture the page.

    .venv/bin/python tests/ui/make_screenshot.py [--out assets/screenshot.png] [--compare]

Uses the embedded default model and Debian's chromium (/usr/bin/chromium), headless.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "The capital of France is"
PROMPT_B = "The capital of France is London. The capital of France is"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "assets" / "screenshot.png"))
    parser.add_argument("--compare", action="store_true", help="also run compare mode (full page)")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()

    import panel as pn
    from playwright.sync_api import expect, sync_playwright

    from explorer import ModelSession
    from widgets.app import app_factory

    session = ModelSession.load(device="cpu", dtype="float32")
    port = free_port()
    server = pn.serve(app_factory(session), port=port, address="127.0.0.1", threaded=True, show=False,
                      verbose=False, websocket_origin=[f"127.0.0.1:{port}"], liveness=True)
    try:
        # Poll /liveness, not "/": a GET of "/" would open (and leak) one more app session.
        wait_for_http(f"http://127.0.0.1:{port}/liveness")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator(".lens-prompt textarea").fill(PROMPT)
            if args.compare:
                page.locator(".lens-compare input").check()
                page.locator(".lens-prompt-b textarea").fill(PROMPT_B)
            page.locator(".lens-run button").click()
            expect(page.locator(".lens-topk td").nth(1)).to_contain_text("Paris", timeout=60_000)
            expect(page.locator(".lens-heatmap canvas").first).to_be_visible()
            page.wait_for_timeout(500)  # let the canvas paint its last frame (screenshots only)
            page.screenshot(path=args.out, full_page=args.compare)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        server.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 30.0) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


if __name__ == "__main__":
    main()
