"""Takes docs/images/playground.png: the playground's side-by-side view on two models, in headless
Chromium driven by Playwright (the setup of tests/test_serve_browser.py).

    python docs/images/playground_screenshot.py RUN_A RUN_B [--out docs/images/playground.png]

The README's screenshot: transformer-pico and lstm-pico trained on the sample with the quick study's
recipe and 819,200 tokens each (docs/serve.md has the commands).
"""

from __future__ import annotations

import argparse
import re
import threading
import time
from pathlib import Path

from picollm.serve.app import create_app
from picollm.serve.catalog import load_catalog
from picollm.serve.server import bind, url_of

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs=2)
    parser.add_argument("--out", default=str(Path(__file__).with_name("playground.png")))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()

    import uvicorn
    from playwright.sync_api import sync_playwright

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(load_catalog(args.runs)), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    url = url_of(sock)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1180, "height": 640})
        page.goto(url + "/")
        page.wait_for_selector("#model-list .chip")
        page.select_option("#strategy", "top-p")
        page.fill("#max-tokens", "48")
        page.fill("#seed", "1")
        page.click("#generate")
        page.wait_for_selector("#columns .column.finished >> nth=1", timeout=60000)
        words = page.locator("#columns .column").nth(0).locator(".tok", has_text=re.compile(r"^ ?[a-z]{4,}$"))
        for i in range(words.count()):  # a word the model found likely: it is among its ten alternatives
            words.nth(i).hover()
            page.locator("#tip").wait_for(state="visible")
            if page.locator("#tip tr.chosen").count():
                break
        page.screenshot(path=args.out)
        browser.close()
    server.should_exit = True
    print(args.out)


if __name__ == "__main__":
    main()
