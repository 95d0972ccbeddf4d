"""Transactions at the benchmark's size, and beside concurrent writers on a live server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import event

from tests.factories import identifier, organization, patient, ref, task
from tests.integration.bundles_support import FHIR, create, entry, post_bundle, transaction

PATIENT_URN = "urn:uuid:0b6f3c1e-7a35-4c1d-9d8e-1f00000000aa"
OWNER = "Organization?identifier=urn:org|north"


def _care_plan_transaction(tasks: int) -> dict[str, Any]:
    """The benchmark shape: one new Patient and `tasks` Tasks pointing at it and at an
    existing Organization by a conditional reference."""
    return transaction(
        entry("POST", "Patient", patient(), PATIENT_URN),
        *(entry("POST", "Task", task(**{"for": ref(PATIENT_URN)}, owner=ref(OWNER),
                                     identifier=identifier("urn:step", str(n))))
          for n in range(tasks)))


@contextmanager
def _counted_statements(client: TestClient) -> Iterator[list[str]]:
    statements: list[str] = []
    engine = client.app.state.db.engine  # type: ignore[attr-defined]

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_hundred_entry_transaction_creates_every_task_linked_to_its_patient(
        client: TestClient) -> None:
    owner = create(client, organization(identifier=identifier("urn:org", "north")))
    response = post_bundle(client, _care_plan_transaction(99), prefer="return=minimal")
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert len(entries) == 100
    assert {e["response"]["status"] for e in entries} == {"201 Created"}
    patient_id = entries[0]["response"]["location"].split("/")[-3]
    by_patient = client.get(f"/fhir/Task?subject=Patient/{patient_id}&_summary=count").json()
    by_owner = client.get(f"/fhir/Task?owner=Organization/{owner['id']}&_summary=count").json()
    assert by_patient["total"] == 99
    assert by_owner["total"] == 99


def test_transaction_work_grows_linearly_with_its_entries(client: TestClient) -> None:
    """Ten times the entries may cost ten times the SQL, not a hundred times."""
    create(client, organization(identifier=identifier("urn:org", "north")))
    post_bundle(client, _care_plan_transaction(1))  # warm caches (types, validators)
    with _counted_statements(client) as small:
        assert post_bundle(client, _care_plan_transaction(10)).status_code == 200
    with _counted_statements(client) as large:
        assert post_bundle(client, _care_plan_transaction(100)).status_code == 200
    assert len(large) <= 11 * len(small), (len(small), len(large))


# -- concurrency -------------------------------------------------------------------------
def _put(base: str, resource: dict[str, Any]) -> httpx.Response:
    url = f"{base}/{resource['resourceType']}/{resource['id']}"
    return httpx.put(url, json=resource, headers=FHIR, timeout=60)


def _post_transaction(base: str, *entries: dict[str, Any]) -> httpx.Response:
    return httpx.post(base, json=transaction(*entries), headers=FHIR, timeout=60)


def _jobs(base: str, a: dict[str, Any], b: dict[str, Any], x: dict[str, Any],
          y: dict[str, Any]) -> list[Callable[[], httpx.Response]]:
    def swap(n: int) -> httpx.Response:
        # Both orders on purpose: two transactions updating A and B may meet crosswise.
        pair = [a, b] if n % 2 else [b, a]
        return _post_transaction(base, *(
            entry("PUT", f"Patient/{p['id']}", {**p, "active": n % 3 == 0}) for p in pair),
            entry("POST", "Task", task(**{"for": ref(f"Patient/{a['id']}")})))

    def cross(n: int) -> httpx.Response:
        # DELETE runs before PUT, so these lock X and Y in opposite orders.
        gone, kept = (x, y) if n % 2 else (y, x)
        return _post_transaction(base, entry("DELETE", f"Task/{gone['id']}"),
                                 entry("PUT", f"Task/{kept['id']}", kept))

    def single(n: int) -> httpx.Response:
        return _put(base, {**a, "active": n % 2 == 0})

    jobs: list[Callable[[], httpx.Response]] = []
    for n in range(8):
        jobs += [lambda n=n: swap(n), lambda n=n: cross(n), lambda n=n: single(n)]
    return jobs


def test_concurrent_transactions_and_writers_neither_deadlock_nor_fail(
        live_server: str) -> None:
    def seed(resource: dict[str, Any]) -> dict[str, Any]:
        created = httpx.post(f"{live_server}/{resource['resourceType']}", json=resource,
                             headers=FHIR, timeout=60)
        assert created.status_code == 201, created.text
        return dict(created.json())

    a, b = seed(patient()), seed(patient())
    x, y = seed(task()), seed(task())
    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda job: job(), _jobs(live_server, a, b, x, y)))
    for response in responses:
        assert response.status_code == 200, response.text
        for answer in response.json().get("entry", []):
            assert answer["response"]["status"] in ("200 OK", "201 Created"), answer
    final_a = httpx.get(f"{live_server}/Patient/{a['id']}", timeout=60).json()
    final_b = httpx.get(f"{live_server}/Patient/{b['id']}", timeout=60).json()
    assert final_a["meta"]["versionId"] == str(1 + 8 + 8)  # 8 transactions, 8 plain PUTs
    assert final_b["meta"]["versionId"] == str(1 + 8)
    tasks_of_a = httpx.get(f"{live_server}/Task?subject=Patient/{a['id']}&_summary=count",
                           timeout=60).json()
    assert tasks_of_a["total"] == 8


def test_concurrent_conditional_creates_agree_on_one_resource(live_server: str) -> None:
    """Racing transactions that create-if-none-exist the same Patient end up pointing
    their Tasks at the single Patient that won."""
    def enrol(n: int) -> httpx.Response:
        return _post_transaction(
            live_server,
            entry("POST", "Patient", patient(identifier=identifier("urn:x", "shared")),
                  PATIENT_URN, ifNoneExist="identifier=urn:x|shared"),
            entry("POST", "Task", task(**{"for": ref(PATIENT_URN)},
                                       identifier=identifier("urn:step", str(n)))))

    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(enrol, range(6)))
    for response in responses:
        assert response.status_code == 200, response.text
    answers = [r.json()["entry"] for r in responses]
    assert sorted(a[0]["response"]["status"] for a in answers) == ["200 OK"] * 5 + [
        "201 Created"]
    (winner,) = {a[0]["resource"]["id"] for a in answers}
    assert {a[1]["resource"]["for"]["reference"] for a in answers} == {f"Patient/{winner}"}
    found = httpx.get(f"{live_server}/Patient?identifier=urn:x|shared", timeout=60).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [winner]
