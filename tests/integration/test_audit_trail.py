"""Every request leaves an AuditEvent: reads, searches, writes, refusals and failures; a
write's record commits with the write; records are served as BALP AuditEvents, searched,
hidden from other partners, never written by clients, and chained so that an edited or
deleted row is named."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.auditevent import AuditEvent
from sqlalchemy import delete, update

from gateway.audit import log as audit_log_module
from gateway.audit.chain import seal, verify
from gateway.audit.events import Row
from gateway.auth.clients import add_client
from gateway.settings import Settings
from gateway.store.database import Database
from gateway.store.schema import audit_chain, audit_log
from tests.conftest import client_with
from tests.factories import task
from tests.integration.auth_support import FHIR, A, B, bearer
from tests.integration.test_auth_tokens import (
    ASSERTION_TYPE,
    RSA,
    assertion,
    public_set,
    token_request,
)


@pytest.fixture
def open_client(settings: Settings) -> Iterator[TestClient]:
    with client_with(settings, auth="off") as test_client:
        yield test_client


@pytest.fixture
def guarded(settings: Settings) -> Iterator[TestClient]:
    with client_with(settings, auth="smart") as test_client:
        yield test_client


def flush(client: TestClient) -> None:
    client.app.state.audit.flush()  # type: ignore[attr-defined]


def trail(client: TestClient, headers: dict[str, str] | None = None,
          **params: str) -> list[dict[str, Any]]:
    """The audit records, oldest first (after what was queued is stored)."""
    flush(client)
    answer = client.get("/fhir/AuditEvent", headers=headers,
                        params={"_sort": "date", "_count": "1000", **params})
    assert answer.status_code == 200, answer.text
    return [e["resource"] for e in answer.json().get("entry", [])]


def subtype(event: dict[str, Any]) -> str:
    return event["subtype"][0]["code"]


def entities(event: dict[str, Any]) -> list[str]:
    return [e["what"]["reference"] for e in event.get("entity", []) if "what" in e]



def test_every_interaction_leaves_one_balp_record(open_client: TestClient) -> None:
    created = open_client.post("/fhir/Task", json=task(), headers=FHIR).json()
    ref = f"Task/{created['id']}"
    open_client.get(f"/fhir/{ref}")
    open_client.get("/fhir/Task", params={"status": "requested"})
    open_client.put(f"/fhir/{ref}", json={**created, "description": "changed"},
                    headers=FHIR)
    open_client.get(f"/fhir/{ref}/_history/1")
    open_client.delete(f"/fhir/{ref}")
    open_client.get(f"/fhir/{ref}")  # 410 Gone
    open_client.get("/fhir/Task/never-was")
    open_client.post("/fhir/Task", content=b"{not json", headers=FHIR)
    events = trail(open_client)
    seen = [(subtype(e), e["action"], e["outcome"], entities(e)) for e in events]
    assert seen == [
        ("create", "C", "0", [f"{ref}/_history/1"]),
        ("read", "R", "0", [f"{ref}/_history/1"]),
        ("search-type", "E", "0", []),
        ("update", "U", "0", [f"{ref}/_history/2"]),
        ("vread", "R", "0", [f"{ref}/_history/1"]),
        ("delete", "D", "0", [f"{ref}/_history/3"]),
        ("read", "R", "4", [ref]),
        ("read", "R", "4", ["Task/never-was"]),
        ("create", "C", "4", []),
    ]
    for event in events:
        AuditEvent.model_validate(event)  # a valid R4 AuditEvent
        assert event["source"]["observer"]["display"] == "ATM Gateway"
        assert event["agent"][0]["requestor"] is True
        assert event["agent"][0]["network"]["address"] == "testclient"
    assert events[0]["meta"]["profile"] == [
        "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.Create"]
    query = [e for e in events[2]["entity"] if e.get("role", {}).get("code") == "24"]
    assert query[0]["description"] == "status=requested"
    assert events[-1]["outcomeDesc"] == "Minor failure (HTTP 400)"
    assert [e["recorded"] for e in events] == sorted(e["recorded"] for e in events)


def test_a_write_whose_record_cannot_be_stored_fails_and_stores_nothing(
        open_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    real = audit_log_module.insert_rows

    def refuse(conn: Any, rows: list[Row]) -> None:
        raise RuntimeError("audit table unavailable")

    monkeypatch.setattr(audit_log_module, "insert_rows", refuse)
    answer = open_client.post("/fhir/Task", json=task(), headers=FHIR)
    assert answer.status_code == 500
    assert "audit table" not in answer.text
    monkeypatch.setattr(audit_log_module, "insert_rows", real)
    assert open_client.get("/fhir/Task").json().get("total", 0) == 0
    assert not open_client.get("/fhir/_history").json().get("entry")
    failed = trail(open_client, subtype="create")
    assert [(e["outcome"], e["outcomeDesc"]) for e in failed] == [
        ("8", "Serious failure (HTTP 500)")]


def test_a_read_that_cannot_be_recorded_is_not_served(
        open_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    created = open_client.post("/fhir/Task", json=task(), headers=FHIR).json()
    monkeypatch.setattr(audit_log_module, "MAX_WAITING", 0)  # as if the database refused
    answer = open_client.get(f"/fhir/Task/{created['id']}")
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "5"
    assert answer.json()["issue"][0]["code"] == "transient"
    assert created["id"] not in answer.text


def test_a_transaction_is_one_record_naming_every_change(open_client: TestClient) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": task(),
         "request": {"method": "POST", "url": "Task"}},
        {"resource": {"resourceType": "Specimen", "id": "s1", "status": "available"},
         "request": {"method": "PUT", "url": "Specimen/s1"}}]}
    answer = open_client.post("/fhir", json=bundle, headers=FHIR)
    assert answer.status_code == 200, answer.text
    task_id = answer.json()["entry"][0]["response"]["location"].split("Task/")[1].split("/")[0]
    batch = {**bundle, "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Task/{task_id}"}},
        {"request": {"method": "GET", "url": "Task/missing"}}]}
    assert open_client.post("/fhir", json=batch, headers=FHIR).status_code == 200
    events = trail(open_client)
    assert [(subtype(e), e["outcome"]) for e in events] == [
        ("transaction", "0"), ("read", "0"), ("read", "4"), ("batch", "0")]
    assert sorted(entities(events[0])) == [
        "Specimen/s1/_history/1", f"Task/{task_id}/_history/1"]
    assert trail(open_client, entity="Specimen/s1")[0]["id"] == events[0]["id"]


def test_clients_cannot_create_change_or_delete_audit_events(
        guarded: TestClient, db: Database) -> None:
    admin = bearer(guarded, db, "admin", "Organization/ops")
    body = {"resourceType": "AuditEvent", "type": {"code": "rest"},
            "recorded": "2026-11-23T07:00:00Z",
            "agent": [{"requestor": True, "who": {"reference": "Device/d"}}],
            "source": {"observer": {"reference": "Device/d"}}}
    assert guarded.post("/fhir/AuditEvent", json=body, headers=admin).status_code == 405
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": task(), "request": {"method": "POST", "url": "Task"}},
        {"resource": body, "request": {"method": "POST", "url": "AuditEvent"}}]}
    assert guarded.post("/fhir", json=transaction, headers=admin).status_code == 405
    assert guarded.get("/fhir/Task", headers=admin).json().get("total", 0) == 0
    first = trail(guarded, admin)[0]["id"]
    for answer in (guarded.put(f"/fhir/AuditEvent/{first}", json=body, headers=admin),
                   guarded.delete(f"/fhir/AuditEvent/{first}", headers=admin)):
        assert answer.status_code == 405
    assert guarded.get(f"/fhir/AuditEvent/{first}", headers=admin).status_code == 200


def test_refusals_and_failed_authentications_are_recorded_with_who_and_where(
        guarded: TestClient, db: Database) -> None:
    ehr = bearer(guarded, db, "ehr", "Organization/hospital")
    theirs = guarded.post("/fhir/Task", headers=ehr,
                          json=task(owner={"reference": B})).json()["id"]
    courier = bearer(guarded, db, "courier", A, scopes="system/Task.rs")
    assert guarded.get(f"/fhir/Task/{theirs}", headers=courier).status_code == 404
    assert guarded.post("/fhir/Task", json=task(), headers=courier).status_code == 403
    assert guarded.get("/fhir/Task", headers={"authorization": "Bearer nope"}
                       ).status_code == 401
    assert guarded.post("/auth/token", data={
        "grant_type": "client_credentials", "client_assertion": "x.y.z",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
    }).status_code == 401
    events = trail(guarded, ehr)
    by_courier = [e for e in events if e["agent"][0].get("altId") == courier["x-client"]]
    assert [(subtype(e), e["outcome"], entities(e)) for e in by_courier] == [
        ("token", "0", []), ("read", "4", [f"Task/{theirs}"]), ("create", "4", [])]
    assert by_courier[1]["agent"][1]["who"]["reference"] == A
    unauthenticated = [e for e in events if "altId" not in e["agent"][0]]
    assert [(e["type"]["code"], subtype(e), e["outcome"]) for e in unauthenticated] == [
        ("rest", "search-type", "4"), ("110114", "token", "4")]
    assert unauthenticated[0]["outcomeDesc"] == "Minor failure (HTTP 401)"


def test_introspection_and_revocation_are_recorded(guarded: TestClient, db: Database) -> None:
    registered = add_client(db, name="lims", role="lims", organization=A,
                            jwks=public_set(RSA), scopes="system/Task.rs")
    token = token_request(guarded, assertion(registered)).json()["access_token"]
    form = {"token": token, "client_assertion": assertion(registered),
            "client_assertion_type": ASSERTION_TYPE}
    assert guarded.post("/auth/introspect", data=form).json()["active"] is True
    assert guarded.post("/auth/revoke", data={
        **form, "client_assertion": assertion(registered)}).status_code == 200
    admin = bearer(guarded, db, "admin", "Organization/ops")
    mine = trail(guarded, admin, altid=registered.client_id)
    assert [(e["type"]["code"], subtype(e), e["outcome"]) for e in mine] == [
        ("110114", "token", "0"), ("110114", "introspect", "0"), ("110114", "revoke", "0")]


def test_each_cross_partner_attempt_is_recorded_as_refused(
        guarded: TestClient, db: Database) -> None:
    ehr = bearer(guarded, db, "ehr", "Organization/hospital")
    theirs = guarded.post("/fhir/Task", headers=ehr,
                          json=task(owner={"reference": B})).json()
    courier = bearer(guarded, db, "courier", A)
    ref = f"Task/{theirs['id']}"
    attempts = [
        ("read", guarded.get(f"/fhir/{ref}", headers=courier)),
        ("vread", guarded.get(f"/fhir/{ref}/_history/1", headers=courier)),
        ("update", guarded.put(f"/fhir/{ref}", headers=courier,
                               json={**theirs, "description": "mine now"})),
        ("delete", guarded.delete(f"/fhir/{ref}", headers=courier)),
        ("transaction", guarded.post("/fhir", headers=courier, json={
            "resourceType": "Bundle", "type": "transaction", "entry": [
                {"request": {"method": "DELETE", "url": ref}}]})),
    ]
    # Invisible: 404 like a missing Task; deleting is no courier's right at all: 403.
    assert [(name, answer.status_code) for name, answer in attempts] == [
        ("read", 404), ("vread", 404), ("update", 404), ("delete", 403),
        ("transaction", 403)]
    assert guarded.get(f"/fhir/{ref}", headers=ehr).json()["meta"]["versionId"] == "1"
    recorded = [(subtype(e), e["outcome"], e["outcomeDesc"])
                for e in trail(guarded, ehr, altid=courier["x-client"])
                if subtype(e) != "token"]
    assert recorded == [(name, "4", f"Minor failure (HTTP {answer.status_code})")
                        for name, answer in attempts]


def test_a_partner_sees_only_its_own_organisations_records(
        guarded: TestClient, db: Database) -> None:
    courier_a = bearer(guarded, db, "courier", A)
    courier_b = bearer(guarded, db, "courier", B)
    admin = bearer(guarded, db, "admin", "Organization/ops")
    guarded.get("/fhir/Task", headers=courier_a)
    guarded.get("/fhir/Task", headers=courier_b)
    flush(guarded)
    mine = trail(guarded, courier_a)
    assert mine and {e["agent"][1]["who"]["reference"] for e in mine} == {A}
    everyone = trail(guarded, admin)
    theirs = next(e for e in everyone if e["agent"][0].get("altId") == courier_b["x-client"])
    assert guarded.get(f"/fhir/AuditEvent/{theirs['id']}", headers=courier_a
                       ).status_code == 404
    assert guarded.get(f"/fhir/AuditEvent/{theirs['id']}", headers=admin).json() == theirs
    assert guarded.get("/fhir/AuditEvent/$verify-chain", headers=courier_a
                       ).status_code == 403
    assert trail(guarded, courier_a, agent=B) == []


def test_search_parameters_and_paging(open_client: TestClient) -> None:
    ids = [open_client.post("/fhir/Task", json=task(), headers=FHIR).json()["id"]
           for _ in range(3)]
    open_client.get(f"/fhir/Task/{ids[0]}")
    assert [subtype(e) for e in trail(open_client, entity=f"Task/{ids[0]}")] == [
        "create", "read"]
    assert [subtype(e) for e in trail(open_client, action="R")] == ["read"]
    assert len(trail(open_client, subtype="create", outcome="0")) == 3
    assert trail(open_client, date="lt2000-01-01") == []
    assert len(trail(open_client, date="ge2000-01-01")) >= 4
    seen, url = [], "/fhir/AuditEvent?_count=2&subtype=create"
    while url:
        page = open_client.get(url).json()
        seen += [entities(e["resource"])[0].split("/")[1] for e in page.get("entry", [])]
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), "")
    assert seen == ids[::-1]  # newest first by default
    counted = open_client.get("/fhir/AuditEvent", params={"_summary": "count",
                                                          "subtype": "create"}).json()
    assert counted["total"] == 3 and "entry" not in counted
    for bad in ({"colour": "red"}, {"date": "yesterday"}, {"_sort": "outcome"}):
        answer = open_client.get("/fhir/AuditEvent", params=bad)
        assert answer.status_code == 400
        assert answer.json()["resourceType"] == "OperationOutcome"


def test_the_chain_is_intact_and_names_an_edited_or_deleted_record(
        open_client: TestClient, db: Database) -> None:
    for _ in range(5):
        open_client.post("/fhir/Task", json=task(), headers=FHIR)
    flush(open_client)
    report = open_client.get("/fhir/AuditEvent/$verify-chain").json()
    values = {p["name"]: next(v for k, v in p.items() if k.startswith("value"))
              for p in report["parameter"]}
    assert values["intact"] is True and values["checked"] >= 5 and values["pending"] == 0
    events = trail(open_client)
    edited = events[2]["id"]
    with db.write() as conn:  # an insider edits one record in the database itself
        conn.execute(update(audit_log).where(audit_log.c.seq == int(edited))
                     .values(outcome="4"))
    broken = verify(db)
    assert (broken.intact, broken.broken_seq) == (False, int(edited))
    answer = open_client.get("/fhir/AuditEvent/$verify-chain").json()
    assert {"name": "brokenAt", "valueReference": {"reference": f"AuditEvent/{edited}"}} \
        in answer["parameter"]


def test_a_deleted_record_and_a_deleted_tail_are_found(db: Database,
                                                       open_client: TestClient) -> None:
    for _ in range(4):
        open_client.post("/fhir/Task", json=task(), headers=FHIR)
    ids = [int(e["id"]) for e in trail(open_client)]
    flush(open_client)  # the listing's own record too: nothing is stored after the edits
    with db.write() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq == ids[1]))
    report = verify(db)
    assert (report.intact, report.broken_seq) == (False, ids[2])
    assert "missing" in (report.reason or "")
    with db.write() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq >= ids[1]))
    tail = verify(db)
    assert not tail.intact and "newest ones are missing" in (tail.reason or "")


def test_concurrent_sealers_build_one_chain(db: Database, open_client: TestClient) -> None:
    """Eight chainers at once (replicas, and the server's own writer) take turns on the
    chain's head: none fails and the chain comes out whole."""
    import threading

    for _ in range(30):
        open_client.get("/fhir/metadata")
    flush(open_client)
    with db.write() as conn:  # unchain everything, then let the sealers race
        conn.execute(update(audit_log).values(chain_seq=None, hash=None))
        conn.execute(update(audit_chain).values(chain_seq=0, hash="0" * 64))
    failures: list[BaseException] = []

    def sealer() -> None:
        try:
            seal(db, 7)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=sealer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    while seal(db):
        pass
    report = verify(db)
    assert report.intact and report.pending == 0 and report.checked >= 30
