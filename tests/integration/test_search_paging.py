"""Paging through searchset Bundles (https://hl7.org/fhir/R4/http.html#paging): next and
previous links carry a keyset cursor, so pages stay exact while other clients write."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
import pytest
from fastapi.testclient import TestClient

from tests.factories import patient, task
from tests.integration.search_support import put, search

FHIR = {"Content-Type": "application/fhir+json"}
BASE = "http://testserver/fhir"
MAX_PAGES = 50

pytestmark = pytest.mark.usefixtures("search_plan")


def link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((x["url"] for x in bundle["link"] if x["relation"] == relation), None)


def page_ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def walk(client: TestClient, url: str, relation: str = "next") -> list[list[str]]:
    """Every page from `url` on, following `relation` links (bounded)."""
    pages = []
    current: str | None = url
    while current is not None:
        assert len(pages) < MAX_PAGES, "paging does not end"
        bundle = search(client, current)
        pages.append(page_ids(bundle))
        current = link(bundle, relation)
    return pages


def flat(pages: list[list[str]]) -> list[str]:
    return [i for page in pages for i in page]


def test_next_links_return_every_match_once_in_order(client: TestClient) -> None:
    for n in range(23):
        put(client, task(status="ready" if n % 4 else "completed"), f"t{n:02d}")
    ready = [f"t{n:02d}" for n in range(23) if n % 4]
    pages = walk(client, "/fhir/Task?status=ready&_sort=_id&_count=5")
    assert [len(p) for p in pages] == [5, 5, 5, 2]
    assert flat(pages) == ready
    unsorted = walk(client, "/fhir/Task?status=ready&_count=4")
    assert flat(unsorted) == ready  # oldest change first: the creation order here


def test_paging_by_a_sort_key_with_ties_and_missing_values_matches_one_page(
        client: TestClient) -> None:
    births = ["1980", "1975-06-01", None, "1980", "1990-02-03", None, "1975-06-01", "1980",
              "2001", None, "1990-02-03"]
    for n, birth in enumerate(births):
        body = patient(birthDate=birth) if birth else {"resourceType": "Patient"}
        put(client, body, f"p{n:02d}")
    for sort in ("birthdate", "-birthdate", "gender,-birthdate,-_id"):
        whole = page_ids(search(client, f"/fhir/Patient?_sort={sort}&_count=100"))
        assert len(whole) == len(births)
        for size in (1, 2, 3, 4):
            pages = walk(client, f"/fhir/Patient?_sort={sort}&_count={size}")
            assert flat(pages) == whole, (sort, size)


def test_previous_links_go_back_through_the_same_pages(client: TestClient) -> None:
    for n in range(11):
        put(client, task(), f"t{n:02d}")
    url = "/fhir/Task?_sort=-_id&_count=3"
    forward = walk(client, url)
    assert forward == [["t10", "t09", "t08"], ["t07", "t06", "t05"], ["t04", "t03", "t02"],
                       ["t01", "t00"]]
    last_url = url
    for _ in range(len(forward) - 1):
        last_url = link(search(client, last_url), "next") or ""
    backward = walk(client, last_url, relation="previous")
    assert backward == list(reversed(forward))
    first = search(client, url)
    assert link(first, "previous") is None


def test_pages_stay_exact_while_others_create_and_delete(client: TestClient) -> None:
    for n in range(0, 30, 2):
        put(client, task(), f"t{n:02d}")
    url: str | None = "/fhir/Task?_sort=_id&_count=4"
    seen: list[str] = []
    for step in range(MAX_PAGES):
        if url is None:
            break
        bundle = search(client, url)
        seen.extend(page_ids(bundle))
        put(client, task(), f"t{2 * step + 1:02d}")  # lands behind the cursor: not served
        if step == 0:
            put(client, task(), "t29")  # lands ahead of the cursor: served in its turn
        assert client.delete(f"/fhir/Task/t{28 - 2 * step:02d}").status_code in (200, 204)
        url = link(bundle, "next")
    assert len(seen) == len(set(seen)), seen
    assert seen == sorted(seen)
    survivors = [f"t{n:02d}" for n in range(0, 30, 2) if n < 28 - 2 * 3]
    assert [i for i in seen if i in survivors] == survivors
    assert "t29" in seen and "t01" not in seen


def test_pages_sorted_by_last_change_stay_exact_while_others_write(client: TestClient) -> None:
    for n in range(10):
        put(client, task(), f"t{n}")
    url: str | None = "/fhir/Task?_count=3"
    seen: list[str] = []
    for step in range(MAX_PAGES):
        if url is None:
            break
        bundle = search(client, url)
        seen.extend(page_ids(bundle))
        put(client, task(), f"new{step}")
        url = link(bundle, "next")
    assert len(seen) == len(set(seen))
    assert seen[:10] == [f"t{n}" for n in range(10)]


def test_links_are_absolute_on_the_base_and_repeat_the_query(client: TestClient) -> None:
    for n in range(5):
        put(client, task(), f"t{n}")
    first = search(client, "/fhir/Task?status=ready&_sort=_id&_count=2")
    relations = {x["relation"]: x["url"] for x in first["link"]}
    assert set(relations) == {"self", "first", "next"}
    for url in relations.values():
        assert url.startswith(f"{BASE}/Task?")
    assert parse_qsl(urlsplit(relations["self"]).query) == [
        ("status", "ready"), ("_sort", "_id"), ("_count", "2")]
    second = search(client, relations["next"])
    assert set(x["relation"] for x in second["link"]) == {"self", "first", "next", "previous"}
    assert link(second, "self") == relations["next"]
    assert link(second, "first") == relations["first"]


def test_system_search_pages_across_types(client: TestClient) -> None:
    for n in range(3):
        put(client, task(), f"x{n}")
        put(client, patient(), f"x{n}")
    pages = walk(client, "/fhir?_id=x0,x1,x2&_count=4")
    assert [len(p) for p in pages] == [4, 2]
    first = search(client, "/fhir?_id=x0,x1,x2&_count=4")
    assert (link(first, "next") or "").startswith(f"{BASE}?")


def cursor(payload: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(payload)).decode().rstrip("=")


@pytest.mark.parametrize(("value", "diagnostics"), [
    ("garbage!", "Malformed paging cursor"),
    ("eyJ2IjpbMV19", "Malformed paging cursor"),
    (cursor({"v": [1], "b": False}), "Paging cursor does not belong to this search"),
    (cursor({"v": "ab", "b": False}), "Paging cursor does not belong to this search"),
    (cursor({"v": [{"x": 1}, "t1"], "b": False}), "Malformed paging cursor"),
    (cursor({"v": ["late", "t1"], "b": False}), "Malformed paging cursor"),
    (cursor({"v": [2**63, "t1"], "b": False}), "Malformed paging cursor"),
    (cursor({"v": [1, 7], "b": False}), "Malformed paging cursor"),
    (cursor({"v": [1, "t\u0000"], "b": False}), "Malformed paging cursor"),
    (cursor({"v": [True, "t1"], "b": False}), "Malformed paging cursor"),
])
def test_tampered_cursor_is_rejected(client: TestClient, value: str, diagnostics: str) -> None:
    put(client, task(), "t1")
    response = client.get("/fhir/Task", params={"_cursor": value})
    assert response.status_code == 400
    assert response.json() == {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "diagnostics": diagnostics}]}


def test_cursor_of_a_float_sort_key_survives_the_round_trip(client: TestClient) -> None:
    for n, value in enumerate([0.1, 0.30000000000000004, 0.3, 0.7, 0.1]):
        put(client, {"resourceType": "RiskAssessment", "status": "final",
                     "subject": {"reference": "Patient/p"},
                     "prediction": [{"probabilityDecimal": value}]}, f"r{n}")
    pages = walk(client, "/fhir/RiskAssessment?_sort=probability&_count=1")
    assert flat(pages) == ["r0", "r4", "r2", "r1", "r3"]
