"""The playground page in a real browser: Debian's headless Chromium, driven by Playwright, against a
server on a loopback port. It types a prompt, generates with two models side by side, hovers a token
for its alternatives, stops a generation, scores a text and checks the colours, and opens the models
table. Screenshots go to pytest's temporary directory, never into the repository.

These tests skip only where the browser is missing (CI installs it: see .ci/run)."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest
from serve_helpers import MODEL_IDS, make_endless, thread_server, tiny_study

from picollm.serve.app import Settings, create_app
from picollm.serve.catalog import load_catalog

CHROMIUM = os.environ.get("PICOLLM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
HOW_TO_ENABLE = ("the browser tests need Debian's chromium at /usr/bin/chromium (apt-get install -y chromium; "
                 "or set PICOLLM_CHROMIUM) and playwright (pip install -e '.[dev]')")

if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
    pytest.skip(HOW_TO_ENABLE, allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason=HOW_TO_ENABLE)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, sample_path):
    return load_catalog([str(tiny_study(tmp_path_factory, sample_path))])


@pytest.fixture(scope="module")
def app(catalog):
    return create_app(catalog, Settings())


@pytest.fixture(scope="module")
def url(app):
    with thread_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, url):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(url + "/")
    page.wait_for_selector("#model-list .chip")
    yield page
    assert errors == [], errors
    assert all(r.startswith(url) for r in requests), [r for r in requests if not r.startswith(url)]
    context.close()


def test_side_by_side_generation_and_alternatives(page, tmp_path):
    chips = page.locator("#model-list input[type=checkbox]")
    assert chips.count() == 2 and all(chips.nth(i).is_checked() for i in range(2))
    page.fill("#prompt", "The little bird wanted to fly")
    page.select_option("#strategy", "greedy")
    page.fill("#max-tokens", "24")
    page.click("#generate")
    page.wait_for_selector("#columns .column.finished >> nth=1", timeout=20000)
    columns = page.locator("#columns .column")
    assert [columns.nth(i).get_attribute("data-model") for i in range(2)] == MODEL_IDS
    for i in range(2):
        column = columns.nth(i)
        assert column.locator(".prompt").inner_text() == "The little bird wanted to fly"
        assert column.locator(".tok").count() >= 1
        assert "tokens" in column.locator(".status").inner_text()
    page.screenshot(path=str(tmp_path / "generate.png"))

    token = columns.nth(1).locator(".tok", has_text=re.compile(r"\S")).first  # not a bare line break
    token.hover()
    tip = page.locator("#tip")
    tip.wait_for(state="visible")
    rows = tip.locator("tr")
    assert rows.count() == 10
    assert rows.first.get_attribute("class") == "chosen"  # greedy: the chosen token is the likeliest
    assert "transformer-pico" in tip.locator(".tip-head").inner_text()
    percents = [float(rows.nth(i).locator("td").last.inner_text().rstrip("%")) for i in range(10)]
    assert percents == sorted(percents, reverse=True) and 0 < sum(percents) <= 100.01
    page.screenshot(path=str(tmp_path / "alternatives.png"))


def test_stop_cancels_every_column(page, app, catalog, monkeypatch):
    for model_id in MODEL_IDS:
        make_endless(monkeypatch, catalog.models[model_id].model, delay_s=0.02)
    engine = app.app.state.engine
    cancelled = engine.stats["cancelled"]
    page.fill("#max-tokens", "1000")
    page.select_option("#strategy", "sample")
    page.click("#generate")
    page.wait_for_selector("#columns .column >> nth=1 >> .tok")
    page.click("#stop")
    page.wait_for_function("document.querySelectorAll('#columns .status').length === 2 && "
                           "[...document.querySelectorAll('#columns .status')].every(s => s.textContent.startsWith"
                           "('stopped after'))")
    deadline = time.monotonic() + 5
    while engine.active:
        assert time.monotonic() < deadline, "the server kept generating after Stop"
        time.sleep(0.02)
    assert engine.stats["cancelled"] == cancelled + 1
    assert page.locator("#generate").is_enabled() and not page.locator("#stop").is_enabled()


def test_scoring_colours_every_token_and_the_difference(page, tmp_path):
    page.click("nav [data-tab=score]")
    page.fill("#score-text", "Once upon a time, there was a girl who liked to sing. Zzyzx quibbled!")
    page.click("#score")
    page.wait_for_selector("#scores .column >> nth=1 >> .tok.scored")
    columns = page.locator("#scores .column")
    for i in range(2):
        column = columns.nth(i)
        status = column.locator(".status").inner_text()
        assert "bits per byte" in status and "perplexity" in status
        text = "".join(column.locator(".tok").all_inner_texts())
        assert text == "Once upon a time, there was a girl who liked to sing. Zzyzx quibbled!"
        colours = column.locator(".tok.scored").evaluate_all(
            "spans => spans.map(s => getComputedStyle(s).backgroundColor)")
        assert all(c.startswith("rgb(") and c != "rgba(0, 0, 0, 0)" for c in colours)
        assert len(set(colours)) >= 3  # surprising tokens look different from expected ones
    diff = page.locator("#diff-box")
    assert diff.is_visible()
    assert page.locator("#diff-a").input_value() == MODEL_IDS[0]
    assert page.locator("#diff-b").input_value() == MODEL_IDS[1]
    spans = page.locator("#diff .diff")
    assert "".join(spans.all_inner_texts()) == "Once upon a time, there was a girl who liked to sing. Zzyzx quibbled!"
    coloured = spans.evaluate_all("spans => spans.map(s => getComputedStyle(s).backgroundColor)")
    assert any(c != "rgba(0, 0, 0, 0)" for c in coloured)
    columns.nth(0).locator(".tok").nth(3).hover()
    assert page.locator("#tip tr").count() == 10
    page.mouse.move(1, 1)  # leaving the token closes its alternatives
    assert page.locator("#tip").is_hidden()
    page.screenshot(path=str(tmp_path / "score.png"), full_page=True)


def test_models_table_links_the_study_report(page):
    page.click("nav [data-tab=models]")
    rows = page.locator("#models-table tbody tr")
    assert rows.count() == 2
    cells = rows.nth(0).locator("td").all_inner_texts()
    assert cells[:3] == ["lstm-pico", "lstm", "pico"] and cells[5] == "bpe:512"
    link = rows.nth(1).locator("a")
    assert link.inner_text() == "serve test study" and link.get_attribute("href") == "/studies/0/report"
    with page.context.expect_page() as report:
        link.click()
    report.value.wait_for_load_state()
    assert report.value.title() == "serve test study"
