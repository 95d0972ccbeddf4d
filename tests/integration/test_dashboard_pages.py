"""The dashboard's pages as signed-in people see them, on SQLite and PostgreSQL: the
programme view and its filters, who sees which journey, the live panels and their event
stream, one journey's stages, the actions taken from it (complete, reassign, acknowledge)
through the FHIR services as the person, the custody report download, the audit trail
and the security headers. Journeys are written in the orchestrator's shapes
(orchestration/writes.py) through /fhir, with authentication off for the test itself."""

from __future__ import annotations

import html
import re
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import select

from gateway.dashboard.journey_view import ACKNOWLEDGED
from gateway.dashboard.journeys import FLAG_ABOUT
from gateway.store.database import Database
from gateway.store.schema import audit_log
from orchestration.engine import BUSINESS_STATUS, OVERDUE
from orchestration.state import KEY_SYSTEM
from tests.factories.protocols import action, plan_definition
from tests.integration.dashboard_support import (
    CENTRE_A,
    CENTRE_B,
    csrf_of,
    new_user,
    sign_in,
)

FHIR = {"content-type": "application/fhir+json"}
APHERESIS, MAKER, OPS = ("Organization/apheresis-north", "Organization/cell-factory",
                         "Organization/ops")
NAMES = {CENTRE_A: "Centre A", CENTRE_B: "Centre B", APHERESIS: "Apheresis North",
         MAKER: "Cell Factory", OPS: "Programme Office"}
THERAPY = plan_definition(
    action("intake", role="coordinator", deadline_days=2),
    action("apheresis", "intake", role="apheresis-centre", deadline_days=5),
    action("manufacturing", "apheresis", role="manufacturer", deadline_days=30),
    plan_id="dash-therapy")
OTHER = {**plan_definition(action("intake", role="coordinator"), plan_id="dash-other"),
         "title": "Other therapy"}
NOW = datetime.now(UTC).replace(microsecond=0)
PATIENTS = {"a1": "Alice Arnaud", "a2": "Anna Adler", "b1": "Bruno Berger",
            "c1": "Carla Costa"}


def instant(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def put(client: TestClient, resource: dict[str, Any]) -> dict[str, Any]:
    answer = client.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource,
                        headers=FHIR)
    assert answer.status_code in (200, 201), answer.text
    return dict(answer.json())


def stored(client: TestClient, reference: str) -> dict[str, Any]:
    answer = client.get(f"/fhir/{reference}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def task(key: str, stage: str, status: str, owner: str, *,
         overdue: bool = False) -> dict[str, Any]:
    """A stage's Task as the orchestrator writes it, begun 3 days ago, due 2 days ago
    when `overdue` (the timer then marked it)."""
    due = NOW - timedelta(days=2 if overdue else -5)
    body: dict[str, Any] = {
        "resourceType": "Task", "id": f"{key}-{stage}", "status": status, "intent": "order",
        "identifier": [{"system": KEY_SYSTEM, "value": f"cp-{key}/{stage}/1"}],
        "description": stage.title(), "basedOn": [{"reference": f"CarePlan/cp-{key}"}],
        "for": {"reference": f"Patient/pt-{key}"}, "owner": {"reference": owner},
        "authoredOn": instant(NOW - timedelta(days=4)),
        "restriction": {"period": {"start": instant(NOW - timedelta(days=4)),
                                   "end": instant(due)}},
        "executionPeriod": {"start": instant(NOW - timedelta(days=3))}}
    if status == "completed":
        body["executionPeriod"]["end"] = instant(NOW - timedelta(days=1))
    if overdue:
        body["businessStatus"] = {"coding": [{"system": BUSINESS_STATUS, "code": OVERDUE,
                                              "display": "Overdue"}], "text": "overdue"}
    return body


def overdue_flag(key: str, stage: str) -> dict[str, Any]:
    """The escalation the timer raises with an overdue Task (writes.overdue_resources)."""
    return {"resourceType": "Flag", "id": f"flag-{key}-{stage}", "status": "active",
            "subject": {"reference": f"Patient/pt-{key}"},
            "period": {"start": instant(NOW - timedelta(days=1))},
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/flag-category",
                "code": "admin", "display": "Administrative"}]}],
            "code": {"text": f"Overdue: {stage.title()}"},
            "extension": [{"url": FLAG_ABOUT,
                           "valueReference": {"reference": f"Task/{key}-{stage}"}}]}


def journey(key: str, centre: str, tasks: list[dict[str, Any]],
            plan: dict[str, Any] = THERAPY) -> list[dict[str, Any]]:
    """A patient of `centre` enrolled 4 days ago, and the Tasks of their CarePlan."""
    given, family = PATIENTS[key].split()
    return [{"resourceType": "Patient", "id": f"pt-{key}",
             "name": [{"given": [given], "family": family}],
             "managingOrganization": {"reference": centre}},
            {"resourceType": "CarePlan", "id": f"cp-{key}", "status": "active",
             "intent": "plan", "instantiatesCanonical": [f"{plan['url']}|1"],
             "period": {"start": instant(NOW - timedelta(days=4))},
             "subject": {"reference": f"Patient/pt-{key}"}, "author": {"reference": centre}},
            *tasks]


def programme(client: TestClient) -> None:
    """Four running journeys, written in one transaction. Centre A: a1 (intake done,
    apheresis with Apheresis North) and a2 (intake in progress at Centre A, overdue,
    escalated). Centre B: b1 in the therapy, c1 in the other therapy."""
    resources = [
        *({"resourceType": "Organization", "id": ref.split("/")[1], "name": name}
          for ref, name in NAMES.items()),
        THERAPY, OTHER,
        *journey("a1", CENTRE_A, [task("a1", "intake", "completed", CENTRE_A),
                                  task("a1", "apheresis", "ready", APHERESIS)]),
        *journey("a2", CENTRE_A, [task("a2", "intake", "in-progress", CENTRE_A,
                                       overdue=True), overdue_flag("a2", "intake")]),
        *journey("b1", CENTRE_B, [task("b1", "intake", "ready", CENTRE_B)]),
        *journey("c1", CENTRE_B, [task("c1", "intake", "ready", CENTRE_B)], plan=OTHER)]
    answer = client.post("/fhir", headers=FHIR, json={
        "resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": r, "request": {"method": "PUT",
                                        "url": f"{r['resourceType']}/{r['id']}"}}
            for r in resources]})
    assert answer.status_code == 200, answer.text


USERS = {"ana": ("treatment-centre", CENTRE_A), "olga": ("admin", OPS)}


def as_user(client: TestClient, db: Database, username: str) -> None:
    """Sign in as ana (a treatment-centre user of Centre A) or olga (an admin)."""
    role, organization = USERS[username]
    new_user(db, username, role=role, organization=organization)
    sign_in(client, username)


# -- reading the pages ---------------------------------------------------------------------
def text_of(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def journeys_table(page: str) -> list[str]:
    """The programme's journeys table: each row's patient name."""
    section = page.split('id="journeys-title"', 1)[1].split("</section>", 1)[0]
    return [text_of(m) for m in re.findall(r'<a href="/dashboard/journeys/[^"]+">(.*?)</a>',
                                           section)]


def stage_rows(page: str) -> dict[str, tuple[str, str, bool]]:
    """The journey's stages table: title -> (owner, status, has a Complete button)."""
    section = page.split('id="stages-title"', 1)[1].split("</section>", 1)[0]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", section, re.S)[1:]:  # the header row first
        title = text_of(re.search(r"<th scope=\"row\">(.*?)</th>", row, re.S)[1])  # type: ignore[index]
        cells = [text_of(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        rows[title] = (cells[0], cells[1], "/complete" in row)
    return rows


def alert(page: str) -> tuple[str, str]:
    """The page's flash message: (ok | error, its text)."""
    found = re.search(r'<p class="alert (ok|error)" role="[a-z]+">(.*?)</p>', page, re.S)
    assert found, "no message on the page"
    return found[1], text_of(found[2])


def act(client: TestClient, path: str, **fields: str) -> httpx.Response:
    """Post a dashboard form and follow its 303 to the page that shows the outcome."""
    answer = client.post(path, data=fields, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    page = client.get(answer.headers["location"])
    assert page.status_code == 200, page.text
    return page


# -- the programme view ---------------------------------------------------------------------
def test_an_admin_sees_every_journey_and_a_centre_only_its_own(
        client: TestClient, db: Database) -> None:
    programme(client)
    as_user(client, db, "olga")
    page = client.get("/dashboard")
    assert page.status_code == 200
    assert sorted(journeys_table(page.text)) == sorted(PATIENTS.values())
    assert "Journeys (4)" in page.text
    assert '<span class="value" id="kpi-active">4</span>' in page.text
    assert '<span class="value" id="kpi-overdue">1</span>' in page.text
    assert "Open escalations (1)" in page.text
    as_user(client, db, "ana")
    mine = client.get("/dashboard")
    assert mine.status_code == 200
    assert sorted(journeys_table(mine.text)) == ["Alice Arnaud", "Anna Adler"]
    assert "Journeys (2)" in mine.text
    assert "Bruno" not in mine.text and "Carla" not in mine.text
    theirs = client.get("/dashboard/journeys/cp-b1")
    assert theirs.status_code == 404
    assert "No such journey" in theirs.text and "Bruno" not in theirs.text


def test_filters_narrow_the_journeys_and_a_bad_date_is_a_readable_400(
        client: TestClient, db: Database) -> None:
    programme(client)
    as_user(client, db, "olga")
    by_site = client.get("/dashboard", params={"site": CENTRE_B})
    assert by_site.status_code == 200
    assert sorted(journeys_table(by_site.text)) == ["Bruno Berger", "Carla Costa"]
    by_therapy = client.get("/dashboard", params={"therapy": OTHER["url"]})
    assert by_therapy.status_code == 200
    assert journeys_table(by_therapy.text) == ["Carla Costa"]
    both = client.get("/dashboard", params={"site": CENTRE_A, "therapy": OTHER["url"]})
    assert journeys_table(both.text) == [] and "Journeys (0)" in both.text
    bad = client.get("/dashboard", params={"since": "notadate"})
    assert bad.status_code == 400
    assert alert(bad.text) == ("error", "'since' must be a date written as YYYY-MM-DD, "
                               "such as 2026-03-01 (not 'notadate')")


def test_panels_need_a_session_and_the_event_stream_announces_the_version(
        client: TestClient, db: Database) -> None:
    programme(client)
    signed_out = client.get("/dashboard/panels", follow_redirects=False)
    assert signed_out.status_code == 401 and "Signed out" in signed_out.text
    assert client.get("/dashboard/events", follow_redirects=False).status_code == 401
    as_user(client, db, "ana")
    panels = client.get("/dashboard/panels")
    assert panels.status_code == 200 and panels.headers["content-type"].startswith("text/html")
    assert '<div class="kpis" data-version=' in panels.text and "<html" not in panels.text
    assert sorted(journeys_table(panels.text)) == ["Alice Arnaud", "Anna Adler"]
    version = re.search(r'data-version="(\d+)"', panels.text)[1]  # type: ignore[index]
    assert first_event(client) == ["retry: 5000", "event: version", f"data: {version}"]


def first_event(client: TestClient) -> list[str]:
    """The stream's first event, read in a thread so that a stream that never sends one
    fails the test instead of hanging it (closing the stream ends the server's side)."""
    lines: list[str] = []
    failure: list[BaseException] = []

    def read() -> None:
        try:
            with client.stream("GET", "/dashboard/events") as stream:
                assert stream.status_code == 200
                assert stream.headers["content-type"].startswith("text/event-stream")
                assert stream.headers["cache-control"] == "no-store"
                for line in stream.iter_lines():
                    if not line:
                        break
                    lines.append(line)
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            failure.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=15)
    assert not reader.is_alive(), "the event stream sent no event within 15 s"
    if failure:
        raise failure[0]
    return lines


# -- one journey ----------------------------------------------------------------------------
def test_a_journey_lists_its_stages_and_offers_complete_only_on_the_centres_open_tasks(
        client: TestClient, db: Database) -> None:
    programme(client)
    as_user(client, db, "ana")
    a1 = client.get("/dashboard/journeys/cp-a1")
    assert a1.status_code == 200
    assert "<h1>Alice Arnaud <span class=\"muted\">· Test therapy</span></h1>" in a1.text
    assert stage_rows(a1.text) == {
        "Intake": ("Centre A", "completed", False),  # its own, but done
        "Apheresis": ("Apheresis North", "ready", False),  # open, but not its own
        "Manufacturing": ("—", "not started", False)}
    a2 = client.get("/dashboard/journeys/cp-a2")
    assert stage_rows(a2.text)["Intake"] == ("Centre A", "in-progress · overdue", True)
    as_user(client, db, "olga")  # an admin may act on every open Task
    rows = stage_rows(client.get("/dashboard/journeys/cp-a1").text)
    assert rows["Apheresis"][2] and not rows["Intake"][2]


def test_a_journey_lists_its_open_escalation_with_an_acknowledge_button(
        client: TestClient, db: Database) -> None:
    programme(client)
    as_user(client, db, "ana")
    page = client.get("/dashboard/journeys/cp-a2").text
    assert 'id="escalations-title"' in page and "Overdue: Intake" in page
    assert 'action="/dashboard/flags/flag-a2-intake/acknowledge"' in page


def test_complete_finishes_the_task_and_says_so(client: TestClient, db: Database) -> None:
    programme(client)
    as_user(client, db, "ana")
    csrf = csrf_of(client, "/dashboard/journeys/cp-a2")
    page = act(client, "/dashboard/tasks/a2-intake/complete", csrf=csrf, journey="cp-a2")
    assert alert(page.text) == ("ok", "Intake is completed.")
    assert stage_rows(page.text)["Intake"] == ("Centre A", "completed", False)
    done = stored(client, "Task/a2-intake")
    assert done["status"] == "completed"
    assert done["executionPeriod"]["start"] == instant(NOW - timedelta(days=3))
    ended = datetime.fromisoformat(done["executionPeriod"]["end"])
    assert abs(ended - datetime.now(UTC)) < timedelta(minutes=1)


def test_an_action_without_the_sessions_csrf_token_changes_nothing(
        client: TestClient, db: Database) -> None:
    programme(client)
    as_user(client, db, "ana")
    before = stored(client, "Task/a2-intake")
    for fields in ({"csrf": "forged", "journey": "cp-a2"}, {"journey": "cp-a2"}):
        answer = client.post("/dashboard/tasks/a2-intake/complete", data=fields,
                             follow_redirects=False)
        assert answer.status_code == 400, fields
        assert "Nothing was changed" in answer.text and "The form had expired" in answer.text
    assert stored(client, "Task/a2-intake") == before


def test_a_centre_cannot_complete_another_centres_task(client: TestClient,
                                                       db: Database) -> None:
    programme(client)
    as_user(client, db, "ana")
    before = stored(client, "Task/b1-intake")
    csrf = csrf_of(client)
    page = act(client, "/dashboard/tasks/b1-intake/complete", csrf=csrf, journey="cp-a1")
    assert alert(page.text) == ("error", "Task/b1-intake is not known")
    assert stored(client, "Task/b1-intake") == before


def test_reassign_gives_the_task_to_another_organisation_to_start_afresh(
        client: TestClient, db: Database) -> None:
    programme(client)
    as_user(client, db, "ana")
    page = client.get("/dashboard/journeys/cp-a2")
    assert f'<option value="{APHERESIS}" >Apheresis North</option>' in page.text
    csrf = csrf_of(client, "/dashboard/journeys/cp-a2")
    after = act(client, "/dashboard/tasks/a2-intake/reassign", csrf=csrf, journey="cp-a2",
                owner=APHERESIS)
    assert alert(after.text) == ("ok", f"Intake is now {APHERESIS}'s.")
    assert stage_rows(after.text)["Intake"] == ("Apheresis North", "ready · overdue", False)
    moved = stored(client, "Task/a2-intake")
    assert (moved["owner"], moved["status"]) == ({"reference": APHERESIS}, "ready")


def test_reassign_without_an_organisation_is_shown_as_an_error(
        client: TestClient, db: Database) -> None:
    programme(client)
    as_user(client, db, "ana")
    before = stored(client, "Task/a2-intake")
    csrf = csrf_of(client, "/dashboard/journeys/cp-a2")
    page = act(client, "/dashboard/tasks/a2-intake/reassign", csrf=csrf, journey="cp-a2",
               owner="somebody")
    assert stored(client, "Task/a2-intake") == before
    assert alert(page.text) == ("error", "Choose the organisation to give the task to.")


def test_acknowledging_an_escalation_closes_it_and_names_who(
        client: TestClient, db: Database) -> None:
    programme(client)
    as_user(client, db, "ana")
    assert "Open escalations (1)" in client.get("/dashboard").text
    csrf = csrf_of(client, "/dashboard/journeys/cp-a2")
    page = act(client, "/dashboard/flags/flag-a2-intake/acknowledge", csrf=csrf,
               journey="cp-a2")
    assert alert(page.text) == ("ok", "Escalation acknowledged: Overdue: Intake")
    assert "/dashboard/flags/flag-a2-intake/acknowledge" not in page.text
    flag = stored(client, "Flag/flag-a2-intake")
    assert flag["status"] == "inactive" and "end" in flag["period"]
    [note] = [e for e in flag["extension"] if e["url"] == ACKNOWLEDGED]
    assert note["extension"][0] == {"url": "by", "valueString": "Ana"}
    assert note["extension"][1]["url"] == "at"
    assert flag["extension"][0]["url"] == FLAG_ABOUT  # what it was about is kept
    overview = client.get("/dashboard").text
    assert "Open escalations (0)" in overview and "No open escalation." in overview


def test_a_centre_cannot_acknowledge_another_centres_escalation(
        client: TestClient, db: Database) -> None:
    programme(client)
    put(client, overdue_flag("b1", "intake"))
    before = stored(client, "Flag/flag-b1-intake")
    as_user(client, db, "ana")
    csrf = csrf_of(client)
    page = act(client, "/dashboard/flags/flag-b1-intake/acknowledge", csrf=csrf,
               journey="cp-a1")
    assert stored(client, "Flag/flag-b1-intake") == before
    assert alert(page.text) == ("error", "Flag/flag-b1-intake is not known")


def test_completing_a_cancelled_task_shows_the_refusals_reason(
        client: TestClient, db: Database) -> None:
    programme(client)
    put(client, task("a2", "intake", "cancelled", CENTRE_A))
    before = stored(client, "Task/a2-intake")
    as_user(client, db, "olga")
    csrf = csrf_of(client)
    page = act(client, "/dashboard/tasks/a2-intake/complete", csrf=csrf, journey="cp-a2")
    assert alert(page.text) == ("error", "Task/a2-intake is cancelled already")
    assert stored(client, "Task/a2-intake") == before


def test_a_coordinator_acts_only_on_tasks_its_organisation_owns(
        client: TestClient, db: Database) -> None:
    programme(client)
    before = stored(client, "Task/a1-apheresis")  # Centre A's patient, another's Task
    as_user(client, db, "ana")
    csrf = csrf_of(client, "/dashboard/journeys/cp-a1")
    for verb, fields in (("complete", {}), ("reassign", {"owner": CENTRE_A})):
        page = act(client, f"/dashboard/tasks/a1-apheresis/{verb}", csrf=csrf,
                   journey="cp-a1", **fields)
        kind, text = alert(page.text)
        assert kind == "error" and "only its owner" in text
    assert stored(client, "Task/a1-apheresis") == before


def test_completing_a_completed_task_is_refused_and_keeps_its_end(
        client: TestClient, db: Database) -> None:
    programme(client)
    before = stored(client, "Task/a1-intake")
    as_user(client, db, "ana")
    csrf = csrf_of(client)
    page = act(client, "/dashboard/tasks/a1-intake/complete", csrf=csrf, journey="cp-a1")
    assert stored(client, "Task/a1-intake") == before
    assert alert(page.text)[0] == "error"


# -- the custody report, the audit trail, the headers --------------------------------------
def test_the_custody_report_downloads_as_an_html_attachment(
        client: TestClient, db: Database) -> None:
    programme(client)
    as_user(client, db, "ana")
    report = client.get("/dashboard/journeys/cp-a1/custody-report")
    assert report.status_code == 200
    assert report.headers["content-type"] == "text/html; charset=utf-8"
    assert report.headers["content-disposition"] == (
        'attachment; filename="custody-report-cp-a1.html"')
    assert report.headers["cache-control"] == "no-store"
    assert "<html" in report.text.lower()
    assert client.get("/dashboard/journeys/cp-b1/custody-report").status_code == 404


def test_every_action_is_audited_as_the_person_who_took_it(
        client: TestClient, db: Database) -> None:
    programme(client)
    as_user(client, db, "ana")
    csrf = csrf_of(client, "/dashboard/journeys/cp-a2")
    act(client, "/dashboard/flags/flag-a2-intake/acknowledge", csrf=csrf, journey="cp-a2")
    act(client, "/dashboard/tasks/a2-intake/reassign", csrf=csrf, journey="cp-a2",
        owner=MAKER)
    client.app.state.audit.flush()  # type: ignore[attr-defined]
    with db.read() as conn:
        rows = conn.execute(select(audit_log.c.entity, audit_log.c.organization,
                                   audit_log.c.outcome)
                            .where(audit_log.c.client_id == "user:ana",
                                   audit_log.c.method == "PUT")
                            .order_by(audit_log.c.seq)).all()
    assert [tuple(r) for r in rows] == [("Flag/flag-a2-intake", CENTRE_A, "0"),
                                        ("Task/a2-intake", CENTRE_A, "0")]


def test_pages_carry_the_security_headers(client: TestClient, db: Database) -> None:
    programme(client)
    as_user(client, db, "ana")
    for path, status in (("/dashboard", 200), ("/dashboard/panels", 200),
                         ("/dashboard/journeys/cp-a1", 200),
                         ("/dashboard/journeys/cp-b1", 404)):
        page = client.get(path)
        assert page.status_code == status, path
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy
        assert page.headers["cache-control"] == "no-store", path
        assert page.headers["x-content-type-options"] == "nosniff", path
