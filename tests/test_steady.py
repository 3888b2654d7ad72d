"""static/steady.js on a bare page (Debian's chromium, no hive): a button that a live
redraw morphs in place under the resting pointer (the same element, another action: an
agent's row going from "stop" to "start") takes no click for the hold, as a button that
moved there does; one left as it was takes the click."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page

from web_fixture import browser  # noqa: F401 (fixture)

STEADY = Path(__file__).resolve().parents[1] / "src" / "hyperhive" / "core" / "static" / "steady.js"
PAGE = """<html><body style="margin:0"><div id="row-ag">
<form id="f" action="/api/agents/ag/stop" onsubmit="event.preventDefault(); window.posted.push(this.getAttribute('action'))">
<button id="b" style="height:30px">stop</button></form></div>
<script>window.posted = []; window.told = [];</script><script>%s</script>
<script>window.hiveSteady(function (text) { window.told.push(text); });</script></body></html>"""
MORPH = """(to) => {
  // a live redraw as htmx's SSE extension frames it; idiomorph keeps the button element
  document.body.dispatchEvent(new Event("htmx:sseBeforeMessage"));
  if (to) { document.getElementById("f").setAttribute("action", "/api/agents/ag/" + to);
            document.getElementById("b").textContent = to; }
  document.body.dispatchEvent(new Event("htmx:sseMessage"));
}"""


@pytest.fixture
def tab(browser: Browser) -> Iterator[Page]:
    ctx = browser.new_context(viewport={"width": 600, "height": 400})
    try:
        page = ctx.new_page()
        page.set_content(PAGE % STEADY.read_text())
        box = page.locator("#b").bounding_box()
        assert box
        page.mouse.move(box["x"] + 5, box["y"] + 10)
        yield page
    finally:
        ctx.close()


def test_a_button_morphed_in_place_under_the_pointer_is_held(tab: Page) -> None:
    tab.evaluate(MORPH, "start")
    box = tab.locator("#b").bounding_box()
    assert box
    tab.mouse.click(box["x"] + 5, box["y"] + 10)
    assert tab.evaluate("window.posted") == []
    assert len(tab.evaluate("window.told")) == 1
    tab.wait_for_timeout(900)  # past the hold: the operator's second click is meant
    tab.mouse.click(box["x"] + 5, box["y"] + 10)
    assert tab.evaluate("window.posted") == ["/api/agents/ag/start"]


def test_a_button_a_redraw_left_as_it_was_takes_the_click(tab: Page) -> None:
    tab.evaluate(MORPH, "")
    box = tab.locator("#b").bounding_box()
    assert box
    tab.mouse.click(box["x"] + 5, box["y"] + 10)
    assert tab.evaluate("window.posted") == ["/api/agents/ag/stop"]
    assert tab.evaluate("window.told") == []
