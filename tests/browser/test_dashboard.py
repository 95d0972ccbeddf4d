"""The dashboard in a real browser: a coordinator signs in through the authorization
server, reads the programme view built from the demo's journeys, filters it, opens a
journey, completes a Task from it, and watches another person's action arrive without a
reload. Each view is kept as a screenshot (tests/artifacts/browser/) and passes the
accessibility checks of tests/browser/a11y.py."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.browser import a11y
from tests.browser.conftest import AtmServer, DemoData

# One worker of `pytest -n` (make test) runs every browser test: they share one server
# and its demo data (package fixtures), which a second worker would build again.
pytestmark = pytest.mark.xdist_group("browser")

PASSWORD = "correct horse battery staple"
CENTRE = "Organization/atm-demo-treatment-centre"  # where the demo's patients are treated
USERS = {"coordinator": ("treatment-centre", CENTRE, "Camille Coordinator"),
         "manager": ("admin", "Organization/atm-programme", "Morgan Manager"),
         "outsider": ("treatment-centre", "Organization/another-centre", "Olga Outsider")}


@pytest.fixture(scope="module")
def people(live_server: AtmServer, demo_data: DemoData) -> dict[str, str]:
    """Dashboard users added with `atm users add`, as an administrator would."""
    for username, (role, organization, name) in USERS.items():
        live_server.env["ATM_NEW_USER_PASSWORD"] = PASSWORD
        live_server.atm("users", "add", username, "--role", role, "--organization",
                        organization, "--name", name)
    live_server.env.pop("ATM_NEW_USER_PASSWORD")
    return {username: name for username, (_, _, name) in USERS.items()}


def sign_in(page: Any, server: AtmServer, username: str, path: str = "/dashboard") -> None:
    page.goto(server.base_url + path)
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", level=1).wait_for()


def open_journey_with_a_task(page: Any, server: AtmServer) -> str:
    """From the programme view, the first journey with a Task the user may complete."""
    links = page.locator("#panels section[aria-labelledby=journeys-title] tbody a")
    hrefs = [link.get_attribute("href") for link in links.all()]
    for href in hrefs:
        page.goto(server.base_url + href)
        if page.get_by_role("button", name=re.compile(r"^Complete ")).count():
            return str(href)
    raise AssertionError(f"no journey of {hrefs} has a Task to complete")


def test_signing_in_leads_to_the_programme_view(page: Any, live_server: AtmServer,
                                                people: dict[str, str],
                                                snap: Callable[[str], Path],
                                                page_errors: list[str]) -> None:
    page.goto(live_server.base_url + "/dashboard")
    assert "/auth/authorize" in page.url, "an anonymous visitor is sent to sign in"
    page.get_by_role("heading", name="Sign in").wait_for()
    snap("01-sign-in")
    a11y.assert_accessible(page)
    page.get_by_label("Username").fill("coordinator")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    assert "wrong" in page.get_by_role("alert").inner_text()
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Programme").wait_for()
    assert page.url.endswith("/dashboard")
    assert people["coordinator"] in page.get_by_role("navigation", name="Account").inner_text()
    assert [e for e in page_errors if "status of 401" not in e] == []  # the wrong password


def test_the_programme_view_shows_the_demo_journeys(page: Any, live_server: AtmServer,
                                                   demo_data: DemoData,
                                                   people: dict[str, str],
                                                   snap: Callable[[str], Path],
                                                   page_errors: list[str]) -> None:
    sign_in(page, live_server, "coordinator")
    under_way = int(page.locator("#kpi-active").inner_text())
    assert under_way >= demo_data.open
    rows = page.locator("#panels section[aria-labelledby=journeys-title] tbody tr")
    assert rows.count() == demo_data.patients + demo_data.open
    stages = page.get_by_role("img", name=re.compile("Journeys under way in each stage"))
    assert stages.is_visible()
    assert page.get_by_role("img", name=re.compile("Vein-to-vein days")).is_visible()
    assert "Demo apheresis centre" in page.locator("#sites-title + table").inner_text()
    snap("02-programme")
    a11y.assert_accessible(page)
    assert not page_errors


def test_filtering_by_therapy_narrows_the_journeys(page: Any, live_server: AtmServer,
                                                   people: dict[str, str],
                                                   snap: Callable[[str], Path]) -> None:
    sign_in(page, live_server, "manager")
    therapies = page.get_by_label("Therapy").locator("option").all_inner_texts()
    chosen = next(t for t in therapies if "CAR-T" in t)
    page.get_by_label("Therapy").select_option(label=chosen)
    page.get_by_role("button", name="Apply filters").click()
    page.wait_for_url(re.compile(r"therapy="))
    journeys = page.locator("#panels section[aria-labelledby=journeys-title] tbody tr")
    therapy_cells = journeys.locator("td:nth-child(2)").all_inner_texts()
    assert therapy_cells and set(therapy_cells) == {chosen}
    assert page.get_by_label("Therapy").input_value() != "", "the filter stays chosen"
    snap("03-programme-filtered")


def test_another_centre_sees_none_of_these_patients(page: Any, live_server: AtmServer,
                                                    people: dict[str, str]) -> None:
    sign_in(page, live_server, "outsider")
    assert page.locator("#kpi-active").inner_text() == "0"
    assert page.locator("section[aria-labelledby=journeys-title] tbody tr").count() == 0


def test_a_coordinator_books_a_chain_and_moves_an_appointment(
        page: Any, live_server: AtmServer, people: dict[str, str],
        snap: Callable[[str], Path], page_errors: list[str]) -> None:
    sign_in(page, live_server, "coordinator")
    book = page.get_by_role("link", name="Find slots and book the chain")
    journeys = page.locator("#panels section[aria-labelledby=journeys-title] tbody a")
    for href in [link.get_attribute("href") for link in journeys.all()]:
        page.goto(live_server.base_url + href)
        if book.count():
            break
    else:
        pytest.fail("no demo journey is waiting for its chain to be booked")
    book.click()
    page.get_by_role("heading", name="Book a chain of appointments").wait_for()
    snap("07-chain-options")
    a11y.assert_accessible(page)
    page.get_by_role("button", name="Book option 1").click()
    page.get_by_role("status").filter(has_text="The chain is booked").wait_for()
    appointments = page.locator("section[aria-labelledby=appointments-title] tbody tr")
    assert appointments.count() >= 1 and "booked" in appointments.first.inner_text()
    booked_at = appointments.first.locator("td:nth-child(3)").inner_text()
    page.get_by_role("link", name=re.compile("^Reschedule")).first.click()
    page.get_by_role("radio").last.check()
    snap("08-reschedule")
    page.get_by_role("button", name="Move the appointment").click()
    page.get_by_role("status").filter(has_text="is moved").wait_for()
    assert appointments.first.locator("td:nth-child(3)").inner_text() != booked_at
    assert not page_errors


def test_a_coordinator_completes_a_task_from_the_journey_view(
        page: Any, live_server: AtmServer, people: dict[str, str],
        snap: Callable[[str], Path], page_errors: list[str]) -> None:
    sign_in(page, live_server, "coordinator")
    href = open_journey_with_a_task(page, live_server)
    assert page.get_by_role("img", name=re.compile(r"^Stages from")).is_visible()
    assert page.get_by_role("heading", name="Chain of custody").is_visible()
    snap("04-journey")
    a11y.assert_accessible(page)
    page.goto(live_server.base_url + href)
    button = page.get_by_role("button", name=re.compile(r"^Complete ")).first
    stage = button.get_attribute("aria-label").removeprefix("Complete ")
    button.click()
    page.get_by_role("status").filter(has_text="is completed").wait_for()
    row = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=stage))
    assert "completed" in row.first.inner_text()
    snap("05-journey-after-completing")
    assert not page_errors


def test_the_programme_view_updates_without_a_reload(browser: Any, page: Any,
                                                     live_server: AtmServer,
                                                     people: dict[str, str],
                                                     snap: Callable[[str], Path]) -> None:
    sign_in(page, live_server, "manager")
    page.get_by_role("status").filter(has_text="Live").wait_for()
    page.evaluate("window.notReloaded = true")
    before = page.locator("#panels").inner_html()
    other = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        colleague = other.new_page()
        sign_in(colleague, live_server, "coordinator")
        open_journey_with_a_task(colleague, live_server)
        colleague.get_by_role("button", name=re.compile(r"^Complete ")).first.click()
        colleague.get_by_role("status").filter(has_text="is completed").wait_for()
    finally:
        other.close()
    page.get_by_role("status").filter(has_text="Updated").wait_for(timeout=20_000)
    assert page.evaluate("window.notReloaded") is True
    assert page.locator("#panels").inner_html() != before
    snap("06-programme-updated-live")


def test_the_custody_report_downloads_from_the_journey_view(
        page: Any, live_server: AtmServer, people: dict[str, str]) -> None:
    sign_in(page, live_server, "manager")
    link = page.locator("#panels section[aria-labelledby=journeys-title] tbody a").first
    link.click()
    page.get_by_role("heading", name="Chain of custody").wait_for()
    with page.expect_download() as download:
        page.get_by_role("link", name="Download the custody report").click()
    saved = download.value
    assert saved.suggested_filename.startswith("custody-report-")
    assert "Chain of identity and custody" in Path(saved.path()).read_text(encoding="utf-8")


def test_the_keyboard_reaches_the_filters_and_the_journeys(
        page: Any, live_server: AtmServer, people: dict[str, str]) -> None:
    sign_in(page, live_server, "manager")
    names = [stop.name for stop in a11y.tab_order(page, max_tabs=30)]
    assert names[0] == "Skip to content"
    for control in ("Therapy", "Site", "Started from", "Started until", "Apply filters"):
        assert control in names, names
    page.keyboard.press("Escape")
    page.locator("section[aria-labelledby=journeys-title] tbody a").first.focus()
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Stages and tasks").wait_for()


def test_signing_out_ends_the_session(page: Any, live_server: AtmServer,
                                      people: dict[str, str]) -> None:
    sign_in(page, live_server, "coordinator")
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("heading", name="You are signed out").wait_for()
    page.goto(live_server.base_url + "/dashboard")
    assert "/auth/authorize" in page.url
