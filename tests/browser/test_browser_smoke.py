"""The browser test machinery on its own: Chromium against a real `atm serve`, screenshots,
demo journeys, and the accessibility checks (a11y.py) on small pages made to pass or fail."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.browser import a11y
from tests.browser.conftest import AtmServer, DemoData

# One worker of `pytest -n` (make test) runs every browser test: they share one server
# and its demo data (package fixtures), which a second worker would build again.
pytestmark = pytest.mark.xdist_group("browser")

PNG = b"\x89PNG\r\n\x1a\n"

GOOD_PAGE = """<!doctype html>
<html lang="en"><head><title>Worklist</title>
<style>
  body { font: 16px sans-serif; color: #1a1a1a; background: #fff; }
  a, button, input { outline: none; }
  a:focus-visible, button:focus-visible, input:focus-visible { outline: 3px solid #1d4ed8; }
  .muted { color: #595959; }
  .banner { background: #1d4ed8; color: #fff; padding: 4px; }
</style></head>
<body>
  <a href="#main">Skip to content</a>
  <main id="main">
    <h1>Worklist</h1>
    <p class="muted">Three journeys need you today.</p>
    <p class="banner">Infusion booked</p>
    <form>
      <label for="email">Email</label> <input id="email" type="email">
      <label>Site <select><option>Paris</option></select></label>
      <input type="hidden" name="csrf" value="x">
      <span tabindex="-1">not in the tab order</span>
      <button type="submit">Send</button>
      <button type="button" aria-label="Close"><svg role="img" aria-label="Cross"
        width="10" height="10"></svg></button>
    </form>
    <img src="data:," alt="">
  </main>
</body></html>"""

BAD_PAGE = """<!doctype html>
<html><head><style>button:focus { outline: none; }</style></head>
<body>
  <h1>One</h1><h1>Two</h1>
  <input id="search" placeholder="Search" title="Search">
  <p id="faint" style="color: #aaaaaa">Faint text</p>
  <button id="bare"></button>
  <a href="/x" id="empty-link"><span aria-hidden="true">→</span></a>
  <img src="data:," id="no-alt" width="10" height="10">
</body></html>"""


def test_browser_loads_a_page_of_the_live_server_and_keeps_a_screenshot(
        page: Any, live_server: AtmServer, snap: Callable[[str], Path]) -> None:
    response = page.goto(f"{live_server.base_url}/healthz")
    assert response is not None and response.status == 200
    assert '"status":"ok"' in page.inner_text("body").replace(" ", "")
    shot = snap("smoke-healthz")
    assert shot.name == "smoke-healthz.png"
    assert shot.read_bytes().startswith(PNG)


def test_page_errors_keep_script_errors_and_refused_internet_requests(
        page: Any, page_errors: list[str]) -> None:
    page.set_content('<script>console.error("not found"); throw new Error("boom")</script>'
                     '<img src="https://cdn.example.org/logo.png" alt="Logo">')
    page.wait_for_function("document.images[0].complete")
    assert "uncaught: boom" in page_errors
    assert "console.error: not found" in page_errors
    assert ("request off the machine refused: https://cdn.example.org/logo.png"
            in page_errors)


def test_live_server_runs_atm_commands_against_its_database(live_server: AtmServer) -> None:
    result = live_server.atm("db", "upgrade")
    assert "newest schema" in result.stdout
    assert live_server.database_url.endswith("atm.db")
    assert "the orchestrator advancing enrolments" in live_server.server_log()


def test_demo_data_plays_journeys_to_completion_and_leaves_some_open(
        demo_data: DemoData, live_server: AtmServer) -> None:
    rows = [line for line in demo_data.output.splitlines()
            if ") " in line and (" completed " in line or " open " in line)]
    assert sum(" completed " in row for row in rows) == demo_data.patients, demo_data.output
    assert sum(" open " in row for row in rows) == demo_data.open, demo_data.output
    path = live_server.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        plans = conn.execute("SELECT count(*) FROM resources "
                             "WHERE res_type = 'CarePlan' AND NOT deleted").fetchone()[0]
    assert plans >= demo_data.patients + demo_data.open


def test_good_page_passes_every_accessibility_check(page: Any) -> None:
    page.set_content(GOOD_PAGE)
    a11y.assert_accessible(page)


def test_bad_page_is_reported_by_every_check(page: Any) -> None:
    page.set_content(BAD_PAGE)
    assert a11y.document_problems(page) == [
        "<html> has no lang attribute",
        "the document has no <title>",
        "the document has 2 <h1> elements, not exactly one",
        "the document has 0 <main> landmarks, not one",
    ]
    names = a11y.name_problems(page)
    assert len(names) == 4, names
    assert "form control without a label" in names[0] and 'input#search' in names[0]
    assert "button without text" in names[1] and "#bare" in names[1]
    assert "link without text" in names[2] and "#empty-link" in names[2]
    assert "image without alt" in names[3] and "#no-alt" in names[3]
    contrast = a11y.contrast_problems(page)
    assert len(contrast) == 1 and "p#faint" in contrast[0], contrast
    assert contrast[0].startswith("contrast 2.32:1 below 4.5:1")
    with pytest.raises(AssertionError, match="accessibility problems"):
        a11y.assert_accessible(page)


def test_tab_visits_the_focusable_elements_in_order(page: Any) -> None:
    page.set_content(GOOD_PAGE)
    page.focus("#email")  # the walk starts from the top wherever the focus is
    stops = [(stop.tag, stop.name) for stop in a11y.tab_order(page)]
    assert stops == [("a", "Skip to content"), ("input", "Email"), ("select", "Site"),
                     ("button", "Send"), ("button", "Close")]


def test_focus_without_outline_or_shadow_is_reported(page: Any) -> None:
    page.set_content("""<main><a href="#">Ringed</a>
        <button style="outline: none">Plain</button>
        <button class="shadow">Shadowed</button></main>
        <style>.shadow { outline: none; transition: box-shadow .2s; }
        .shadow:focus { box-shadow: 0 0 0 3px #1d4ed8; }</style>""")
    stops = a11y.tab_order(page)
    assert [(s.name, s.indicator) for s in stops] == [
        ("Ringed", True), ("Plain", False), ("Shadowed", True)]
    problems = a11y.focus_problems(page)
    assert len(problems) == 1 and '"Plain"' in problems[0], problems


@pytest.mark.parametrize(("style", "reported"), [
    pytest.param("color: #777; font-size: 16px", True, id="4.48-small"),
    pytest.param("color: #767676; font-size: 16px", False, id="4.54-small"),
    pytest.param("color: #949494; font-size: 24px", False, id="3.03-large"),
    pytest.param("color: #949494; font-size: 19px; font-weight: bold", False, id="3.03-bold"),
    pytest.param("color: #949494; font-size: 19px", True, id="3.03-not-bold"),
    pytest.param("color: rgba(0, 0, 0, 0.3)", True, id="translucent-text"),
    pytest.param("color: #fff; background: rgba(0, 0, 0, 0.5)", True,  # over white: #808080
                 id="translucent-background"),
    pytest.param("color: #fff; background: #000", False, id="white-on-black"),
    pytest.param("color: #aaa; display: none", False, id="display-none"),
    pytest.param("color: #aaa; visibility: hidden", False, id="visibility-hidden"),
])
def test_contrast_by_size_weight_and_transparency(page: Any, style: str,
                                                   reported: bool) -> None:
    page.set_content(f'<div style="background: #fff"><p style="{style}">Some text</p></div>')
    assert bool(a11y.contrast_problems(page)) is reported


def test_contrast_takes_the_background_of_an_ancestor(page: Any) -> None:
    page.set_content('<section style="background: #222"><div><span style="color: #444">'
                     'Dark on dark</span></div></section>')
    found = a11y.contrast_problems(page)
    assert len(found) == 1 and "on rgb(34, 34, 34)" in found[0], found


@pytest.mark.parametrize(("html", "reported"), [
    pytest.param('<label>Name <input></label>', False, id="wrapping-label"),
    pytest.param('<span id="l">Name</span><input aria-labelledby="l">', False,
                 id="aria-labelledby"),
    pytest.param('<input aria-label="Name">', False, id="aria-label"),
    pytest.param('<input placeholder="Name">', True, id="placeholder-only"),
    pytest.param('<label for="other">Name</label><input>', True, id="label-for-another"),
    pytest.param('<textarea></textarea>', True, id="bare-textarea"),
    pytest.param('<input type="checkbox">', True, id="bare-checkbox"),
    pytest.param('<input type="submit">', False, id="submit-named-by-default"),
    pytest.param('<input hidden>', False, id="hidden-input"),
    pytest.param('<button><img src="data:," alt="Save"></button>', False,
                 id="button-with-image-alt"),
    pytest.param('<a href="/"><svg role="img"><title>Home</title></svg></a>', False,
                 id="link-with-svg-title"),
    pytest.param('<svg role="img" width="9" height="9"></svg>', True, id="unnamed-svg"),
])
def test_names_of_controls_buttons_links_and_images(page: Any, html: str,
                                                    reported: bool) -> None:
    page.set_content(html)
    assert bool(a11y.name_problems(page)) is reported
