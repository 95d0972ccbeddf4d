"""Racing clients against a real server: conditional creates, If-Match updates and plain
updates sent in parallel over real sockets, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier
from typing import Any

import httpx
import pytest

from tests.factories import identifier, task

FHIR = {"Content-Type": "application/fhir+json"}
SYSTEM = "urn:example:order"


@pytest.fixture
def http(live_server: str) -> Iterator[httpx.Client]:
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    with httpx.Client(base_url=live_server, timeout=60, limits=limits) as client:
        yield client


def race(count: int, send: Callable[[int], httpx.Response]) -> list[httpx.Response]:
    """Run `send(i)` for i < count on `count` threads released together by a barrier."""
    barrier = Barrier(count, timeout=30)

    def go(i: int) -> httpx.Response:
        barrier.wait()
        return send(i)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(go, range(count)))


def search_ids(http: httpx.Client, query: str) -> list[str]:
    bundle = http.get(f"/Task?{query}").json()
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def history_versions(http: httpx.Client, ref: str) -> list[int]:
    bundle = http.get(f"/{ref}/_history", params={"_count": "100"}).json()
    return [int(e["response"]["etag"][3:-1]) for e in bundle["entry"]]


def test_racing_conditional_creates_store_exactly_one_resource(http: httpx.Client) -> None:
    headers = {**FHIR, "If-None-Exist": f"identifier={SYSTEM}|race-1"}
    body = task(identifier=identifier(SYSTEM, "race-1"))

    responses = race(8, lambda _: http.post("/Task", json=body, headers=headers))

    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: 1, 200: 7}, [r.text for r in responses]
    created = next(r.json() for r in responses if r.status_code == 201)
    assert {r.json()["id"] for r in responses} == {created["id"]}
    assert search_ids(http, f"identifier={SYSTEM}|race-1") == [created["id"]]


def test_racing_conditional_creates_after_the_match_was_deleted_store_one_new(
        http: httpx.Client) -> None:
    headers = {**FHIR, "If-None-Exist": f"identifier={SYSTEM}|again"}
    body = task(identifier=identifier(SYSTEM, "again"))
    first = http.post("/Task", json=body, headers=headers).json()
    assert http.delete(f"/Task/{first['id']}").status_code == 200

    responses = race(8, lambda _: http.post("/Task", json=body, headers=headers))

    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: 1, 200: 7}, [r.text for r in responses]
    survivors = search_ids(http, f"identifier={SYSTEM}|again")
    assert len(survivors) == 1 and survivors[0] != first["id"]
    assert {r.json()["id"] for r in responses} == set(survivors)


def test_racing_conditional_updates_without_a_match_create_exactly_one(
        http: httpx.Client) -> None:
    body = task(identifier=identifier(SYSTEM, "cond-put"))

    responses = race(8, lambda i: http.put(f"/Task?identifier={SYSTEM}|cond-put",
                                           json={**body, "description": f"w{i}"},
                                           headers=FHIR))

    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: 1, 200: 7}, [r.text for r in responses]
    ids = search_ids(http, f"identifier={SYSTEM}|cond-put")
    assert len(ids) == 1
    assert history_versions(http, f"Task/{ids[0]}") == list(range(8, 0, -1))


def test_racing_conditional_creates_with_different_criteria_each_create(
        http: httpx.Client) -> None:
    def send(i: int) -> httpx.Response:
        headers = {**FHIR, "If-None-Exist": f"identifier={SYSTEM}|each-{i}"}
        return http.post("/Task", json=task(identifier=identifier(SYSTEM, f"each-{i}")),
                         headers=headers)

    responses = race(6, send)

    assert [r.status_code for r in responses] == [201] * 6, [r.text for r in responses]
    assert len(search_ids(http, f"identifier={SYSTEM}|&_count=50")) == 6


def test_racing_if_match_updates_let_exactly_one_win(http: httpx.Client) -> None:
    created = http.post("/Task", json=task(), headers=FHIR).json()
    ref = f"Task/{created['id']}"

    def send(i: int) -> httpx.Response:
        body = task(id=created["id"], description=f"writer {i}")
        return http.put(f"/{ref}", json=body, headers={**FHIR, "If-Match": 'W/"1"'})

    responses = race(20, send)

    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 1, 412: 19}, [r.text for r in responses]
    winner = next(r for r in responses if r.status_code == 200)
    for loser in (r for r in responses if r.status_code == 412):
        issue = loser.json()["issue"][0]
        assert (issue["severity"], issue["code"]) == ("error", "conflict")
        assert ref in issue["diagnostics"]
    current = http.get(f"/{ref}")
    assert current.headers["etag"] == 'W/"2"'
    assert current.json()["description"] == winner.json()["description"]
    assert history_versions(http, ref) == [2, 1]


def test_racing_plain_updates_all_succeed_with_consecutive_versions(http: httpx.Client) -> None:
    created = http.post("/Task", json=task(), headers=FHIR).json()
    ref = f"Task/{created['id']}"

    def send(i: int) -> httpx.Response:
        return http.put(f"/{ref}", json=task(id=created["id"], description=f"writer {i}"),
                        headers=FHIR)

    responses = race(12, send)

    assert [r.status_code for r in responses] == [200] * 12, [r.text for r in responses]
    assert sorted(int(r.json()["meta"]["versionId"]) for r in responses) == list(range(2, 14))
    assert history_versions(http, ref) == list(range(13, 0, -1))
    final = http.get(f"/{ref}").json()
    last_writer: dict[str, Any] = next(r.json() for r in responses
                                       if r.json()["meta"]["versionId"] == "13")
    assert final == last_writer


def test_racing_creates_with_the_same_client_id_keep_one_version_chain(
        http: httpx.Client) -> None:
    def send(i: int) -> httpx.Response:
        return http.put("/Task/shared-id", json=task(id="shared-id", description=f"w{i}"),
                        headers=FHIR)

    responses = race(8, send)

    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: 1, 200: 7}, [r.text for r in responses]
    assert history_versions(http, "Task/shared-id") == list(range(8, 0, -1))


def test_racing_patches_without_if_match_all_apply(http: httpx.Client) -> None:
    created = http.post("/Task", json=task(), headers=FHIR).json()
    headers = {"Content-Type": "application/json-patch+json"}

    def send(i: int) -> httpx.Response:
        ops = [{"op": "add", "path": "/note/-" if i else "/note", "value":
                {"text": f"n{i}"} if i else [{"text": "n0"}]}]
        return http.patch(f"/Task/{created['id']}", json=ops, headers=headers)

    first = send(0)
    responses = race(10, lambda i: send(i + 1))

    assert first.status_code == 200
    assert [r.status_code for r in responses] == [200] * 10, [r.text for r in responses]
    notes = http.get(f"/Task/{created['id']}").json()["note"]
    assert sorted(n["text"] for n in notes) == sorted(f"n{i}" for i in range(11))
    assert history_versions(http, f"Task/{created['id']}") == list(range(12, 0, -1))
