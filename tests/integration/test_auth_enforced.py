"""With ATM_AUTH=smart every FHIR request needs a token whose scopes allow it: checked
for plain requests and for each entry of a batch or transaction alike."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from gateway.auth import tokens
from gateway.auth.clients import Client, add_client, set_disabled
from gateway.settings import Settings
from gateway.store.database import Database
from gateway.store.schema import oauth_tokens
from tests.conftest import client_with
from tests.factories import patient, task
from tests.integration.test_auth_tokens import RSA, assertion, public_set, token_request

FHIR = {"content-type": "application/fhir+json"}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with client_with(settings, auth="smart") as test_client:
        yield test_client


def register(db: Database, scopes: str, role: str = "ehr") -> Client:
    return add_client(db, name=f"client for {scopes}", role=role,
                      organization="Organization/lab", jwks=public_set(RSA), scopes=scopes)


def bearer(client: TestClient, registered: Client) -> dict[str, str]:
    response = token_request(client, assertion(registered))
    assert response.status_code == 200, response.text
    return {**FHIR, "authorization": f"Bearer {response.json()['access_token']}"}


@pytest.fixture
def writer(client: TestClient, db: Database) -> dict[str, str]:
    return bearer(client, register(db, "system/*.cruds"))


@pytest.fixture
def task_reader(client: TestClient, db: Database) -> dict[str, str]:
    return bearer(client, register(db, "system/Task.rs"))


def count(client: TestClient, headers: dict[str, str], resource_type: str) -> int:
    return int(client.get(f"/fhir/{resource_type}?_summary=count", headers=headers)
               .json()["total"])


def test_without_a_token_it_is_401_with_the_way_to_get_one(client: TestClient) -> None:
    response = client.get("/fhir/Task")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="atm", error="invalid_token"'
    assert response.json() == {"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": "login", "diagnostics":
        "A SMART Backend Services access token is required (Authorization: Bearer …); it "
        "is missing, expired, revoked, or not one of ours"}]}
    assert client.get("/fhir/Task", headers={"authorization": "Bearer nonsense"}
                      ).status_code == 401


def test_metadata_and_discovery_need_no_token(client: TestClient) -> None:
    metadata = client.get("/fhir/metadata")
    assert metadata.status_code == 200
    assert metadata.json()["rest"][0]["security"]["service"][0]["coding"][0]["code"] == \
        "SMART-on-FHIR"
    assert client.get("/fhir/.well-known/smart-configuration").status_code == 200


def test_scopes_decide_type_and_interaction(client: TestClient, writer: dict[str, str],
                                            task_reader: dict[str, str]) -> None:
    created = client.post("/fhir/Task", json=task(), headers=writer)
    assert created.status_code == 201
    task_id = created.json()["id"]
    assert client.get(f"/fhir/Task/{task_id}", headers=task_reader).status_code == 200
    assert client.get("/fhir/Task?status=ready", headers=task_reader).status_code == 200
    refused = client.post("/fhir/Task", json=task(), headers=task_reader)
    assert refused.status_code == 403
    assert refused.json()["issue"][0] == {
        "severity": "error", "code": "forbidden", "diagnostics":
        "This client's scopes (system/Task.rs) do not allow create on Task"}
    assert client.delete(f"/fhir/Task/{task_id}", headers=task_reader).status_code == 403
    assert client.get("/fhir/Patient", headers=task_reader).status_code == 403
    assert client.get("/fhir/_history", headers=task_reader).status_code == 403
    assert count(client, writer, "Task") == 1  # nothing the refused requests wanted


def test_each_bundle_entry_is_checked(client: TestClient, db: Database,
                                      writer: dict[str, str]) -> None:
    task_writer = bearer(client, register(db, "system/Task.cruds"))
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": task(), "request": {"method": "POST", "url": "Task"}},
        {"resource": patient(), "request": {"method": "POST", "url": "Patient"}}]}
    response = client.post("/fhir", json=bundle, headers=task_writer)
    assert response.status_code == 403
    assert count(client, writer, "Task") == 0 and count(client, writer, "Patient") == 0
    bundle["type"] = "batch"
    answers = client.post("/fhir", json=bundle, headers=task_writer).json()["entry"]
    assert [a["response"]["status"][:3] for a in answers] == ["201", "403"]


def test_a_revoked_or_disabled_clients_token_stops_working_at_once(
        client: TestClient, db: Database) -> None:
    registered = register(db, "system/Task.rs")
    headers = bearer(client, registered)
    assert client.get("/fhir/Task", headers=headers).status_code == 200
    set_disabled(db, registered.client_id)
    assert client.get("/fhir/Task", headers=headers).status_code == 401


def test_a_token_revoked_by_another_worker_stops_working_within_a_second(
        client: TestClient, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    headers = bearer(client, register(db, "system/Task.rs"))
    assert client.get("/fhir/Task", headers=headers).status_code == 200
    with db.write() as conn:  # as another worker or `atm clients disable` would
        conn.execute(update(oauth_tokens).values(revoked=True))
    assert client.get("/fhir/Task", headers=headers).status_code == 200  # still trusted
    now = time.monotonic()
    monkeypatch.setattr(tokens, "_clock", lambda: now + tokens.GRANT_SECONDS + 0.01)
    assert client.get("/fhir/Task", headers=headers).status_code == 401


def test_a_token_expires(client: TestClient, db: Database,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    headers = bearer(client, register(db, "system/Task.rs"))
    later = time.time() + 301
    monkeypatch.setattr(time, "time", lambda: later)
    assert client.get("/fhir/Task", headers=headers).status_code == 401


def test_with_auth_off_metadata_says_so(settings: Settings) -> None:
    with client_with(settings, auth="off") as open_client:
        security = open_client.get("/fhir/metadata").json()["rest"][0]["security"]
    assert security == {"description": "ATM_AUTH=off: this server asks no one who they "
                        "are, and anyone can read and change everything. For local "
                        "exploration only."}


@pytest.mark.parametrize("resource_type", ["Provenance", "AuditEvent"])
def test_records_of_what_happened_are_immutable_for_everyone(
        settings: Settings, db: Database, resource_type: str) -> None:
    provenance = {"resourceType": "Provenance", "target": [{"reference": "Task/1"}],
                  "recorded": "2026-11-23T07:00:00Z",
                  "agent": [{"who": {"reference": "Device/d"}}]}
    with client_with(settings, auth="smart") as guarded:
        admin = bearer(guarded, register(db, "system/*.cruds", role="admin"))
        if resource_type == "Provenance":
            created = guarded.post("/fhir/Provenance", json=provenance, headers=admin)
            assert created.status_code == 201, created.text
            record = created.json()
        else:  # the server's own: one for the request above, say
            guarded.app.state.audit.flush()  # type: ignore[attr-defined]
            record = guarded.get("/fhir/AuditEvent", headers=admin).json()["entry"][0][
                "resource"]
        path = f"/fhir/{resource_type}/{record['id']}"
        for response in (guarded.put(path, json=record, headers=admin),
                         guarded.patch(path, json=[], headers={
                             **admin, "content-type": "application/json-patch+json"}),
                         guarded.delete(path, headers=admin)):
            assert response.status_code == 405
            assert response.headers["allow"] == (
                "GET, HEAD" if resource_type == "AuditEvent" else "GET, HEAD, POST")
            assert "never changed or deleted" in response.json()["issue"][0]["diagnostics"]
        assert guarded.get(path, headers=admin).json()["meta"]["versionId"] == "1"
    with client_with(settings, auth="off") as open_client:  # not even with auth off
        assert open_client.delete(path).status_code == 405


def test_a_client_over_its_rate_gets_429_and_the_others_go_on(
        settings: Settings, db: Database) -> None:
    with client_with(settings, auth="smart", rate_limit_per_second=0.5,
                     rate_limit_burst=3) as guarded:
        busy = bearer(guarded, register(db, "system/Task.rs"))
        calm = bearer(guarded, register(db, "system/Task.rs"))
        statuses = [guarded.get("/fhir/Task", headers=busy).status_code for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
        throttled = guarded.get("/fhir/Task", headers=busy)
        assert throttled.headers["retry-after"] == "2"
        assert throttled.json()["issue"][0]["code"] == "throttled"
        assert guarded.get("/fhir/Task", headers=calm).status_code == 200


def test_rate_limiter_refills_at_its_rate() -> None:
    from gateway.auth.ratelimit import RateLimiter

    limiter = RateLimiter(per_second=2.0, burst=2)
    assert [limiter.retry_after("c", 0.0) for _ in range(3)] == [None, None, 1]
    assert limiter.retry_after("c", 0.5) is None  # one token back after half a second
    assert limiter.retry_after("c", 0.5) == 1
    assert limiter.retry_after("other", 0.5) is None


@pytest.mark.parametrize("query", ["_include=Task:owner", "_revinclude=Provenance:target",
                                   "_has:Provenance:target:agent=Device/x",
                                   "patient.name=Durand", "focus:Specimen.type=x"])
def test_a_type_scoped_client_cannot_reach_other_types_through_a_search(
        client: TestClient, task_reader: dict[str, str], query: str) -> None:
    response = client.get(f"/fhir/Task?{query}", headers=task_reader)
    assert response.status_code == 403
    assert "need system/*.r" in response.json()["issue"][0]["diagnostics"]
    posted = client.post("/fhir/Task/_search", content=query.encode(), headers={
        **task_reader, "content-type": "application/x-www-form-urlencoded"})
    assert posted.status_code == 403


def test_a_client_that_reads_every_type_may_include(client: TestClient, db: Database) -> None:
    reader = bearer(client, register(db, "system/*.rs"))
    assert client.get("/fhir/Task?_include=Task:owner", headers=reader).status_code == 200


PLANTED = ("Durand", "Élodie", "1980-04-12", "rue des Lilas", "+33 6 12 34 56 78")


def _planted_patient() -> dict[str, Any]:
    return patient(address=[{"line": ["3 rue des Lilas"], "city": "Lyon"}],
                   telecom=[{"system": "phone", "value": "+33 6 12 34 56 78"}],
                   text={"status": "generated",
                         "div": '<div xmlns="http://www.w3.org/1999/xhtml">Élodie Durand</div>'})


def test_manufacturers_never_receive_patient_details(client: TestClient, db: Database,
                                                     writer: dict[str, str]) -> None:
    person = client.post("/fhir/Patient", json=_planted_patient(), headers=writer).json()
    ref = {"reference": f"Patient/{person['id']}", "display": "Élodie Durand"}
    lab = {"reference": "Organization/lab"}  # the manufacturer's organisation
    client.post("/fhir/Task", json=task(**{"for": ref, "owner": lab}), headers=writer)
    client.post("/fhir/ServiceRequest", headers=writer, json={
        "resourceType": "ServiceRequest", "status": "active", "intent": "order",
        "subject": ref, "performer": [lab]})
    maker = bearer(client, register(db, "system/*.cruds", role="manufacturer"))
    ehr = bearer(client, register(db, "system/*.cruds", role="ehr"))
    reads = [f"/fhir/Patient/{person['id']}", "/fhir/Patient",
             f"/fhir/Patient/{person['id']}/_history", f"/fhir/Patient/{person['id']}/_history/1",
             "/fhir/Task",
             f"/fhir/Task?patient=Patient/{person['id']}"]
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Patient/{person['id']}"}}]}
    observation = {"resourceType": "Observation", "status": "final",
                   "code": {"text": "CD3+ count"}, "subject": ref, "performer": [lab]}
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": observation, "request": {"method": "POST", "url": "Observation"}}]}
    for headers, sees in ((maker, False), (ehr, True)):
        answers = [client.get(path, headers=headers) for path in reads]
        answers.append(client.post("/fhir", json=batch, headers=headers))
        answers.append(client.post("/fhir", json=transaction, headers={
            **headers, "prefer": "return=representation"}))
        assert [a.status_code for a in answers] == [200] * len(answers)
        bodies = [a.content for a in answers]
        found = {word for body in bodies for word in PLANTED
                 if word.encode() in body or word.encode("unicode_escape") in body}
        assert found == (set(PLANTED) if sees else set()), found
    # What the manufacturer works by is still there.
    kept = client.get(f"/fhir/Patient/{person['id']}", headers=maker).json()
    assert kept["id"] == person["id"] and kept["active"] is True and "name" not in kept


@pytest.mark.parametrize(("role", "request_line", "status"), [
    ("courier", "GET /fhir/Task", 200),
    ("courier", "GET /fhir/Patient", 403),
    ("courier", "POST /fhir/Task", 403),
    ("courier", "GET /fhir/_history", 403),
    ("manufacturer", "POST /fhir/Observation", 201),
    ("manufacturer", "DELETE /fhir/Task/x", 403),
    ("lims", "POST /fhir/Observation", 201),
    ("payer", "GET /fhir/Specimen", 403),
    ("treatment-centre", "GET /fhir/_history", 403),
    ("ehr", "GET /fhir/_history", 200),
])
def test_a_role_opens_only_its_own_doors_whatever_its_scopes(
        client: TestClient, db: Database, role: str, request_line: str, status: int) -> None:
    headers = bearer(client, register(db, "system/*.cruds", role=role))
    method, path = request_line.split()
    body = {"BiologicallyDerivedProduct": {"resourceType": "BiologicallyDerivedProduct"},
            "Observation": {"resourceType": "Observation", "status": "final",
                            "code": {"text": "viability"},
                            "performer": [{"reference": "Organization/lab"}]},
            "Task": task()}.get(path.split("/")[2])
    response = client.request(method, path, json=body if method == "POST" else None,
                              headers=headers)
    assert response.status_code == status, response.text
    if status == 403:
        assert response.json()["issue"][0]["diagnostics"].startswith(f"A {role} client may not")
