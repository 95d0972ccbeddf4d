"""Result controls (https://hl7.org/fhir/R4/search.html#return): _sort, _count, _summary,
_elements and _total."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.settings import Settings
from tests.conftest import client_with
from tests.factories import patient, task
from tests.integration.search_support import put, search

FHIR = {"Content-Type": "application/fhir+json"}
SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
             "code": "SUBSETTED", "display": "subsetted"}

pytestmark = pytest.mark.usefixtures("search_plan")


def ids(client: TestClient, url: str) -> list[str]:
    return [e["resource"]["id"] for e in search(client, url).get("entry", [])]


def assert_invalid(client: TestClient, url: str, diagnostics: str) -> None:
    response = client.get(url)
    assert response.status_code == 400
    assert response.json() == {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "diagnostics": diagnostics}]}


# -- _sort ------------------------------------------------------------------------------
@pytest.fixture
def people(client: TestClient) -> TestClient:
    put(client, patient(name=[{"family": "Zola"}], birthDate="1990-01-01", gender="female"), "a")
    put(client, patient(name=[{"family": "adams"}], birthDate="1980", gender="male"), "b")
    put(client, patient(name=[{"family": "Martin"}], birthDate="1985-05-05", gender="female"),
        "c")
    put(client, {"resourceType": "Patient"}, "d")
    put(client, patient(name=[{"family": "Émile"}], birthDate="1985-05-05", gender="female"),
        "e")
    return client


SORT_CASES = {
    "family": ["b", "e", "c", "a", "d"],
    "-family": ["a", "c", "e", "b", "d"],
    "birthdate": ["b", "c", "e", "a", "d"],
    "-birthdate": ["a", "c", "e", "b", "d"],
    "gender,-birthdate": ["a", "c", "e", "b", "d"],
    "gender,family": ["e", "c", "a", "b", "d"],
    "-gender,family": ["b", "e", "c", "a", "d"],
    "_id": ["a", "b", "c", "d", "e"],
    "-_id": ["e", "d", "c", "b", "a"],
    "_lastUpdated": ["a", "b", "c", "d", "e"],
    "-_lastUpdated": ["e", "d", "c", "b", "a"],
}


def test_sort_orders_by_keys_with_missing_values_last(people: TestClient) -> None:
    got = {sort: ids(people, f"/fhir/Patient?_sort={sort}") for sort in SORT_CASES}
    assert got == SORT_CASES


def test_search_without_sort_returns_oldest_change_first(people: TestClient) -> None:
    assert ids(people, "/fhir/Patient") == ["a", "b", "c", "d", "e"]
    response = people.put("/fhir/Patient/b", json={"resourceType": "Patient", "id": "b"},
                          headers=FHIR)
    assert response.status_code == 200
    assert ids(people, "/fhir/Patient") == ["a", "c", "d", "e", "b"]


def test_sort_by_token_orders_by_code(client: TestClient) -> None:
    for name, status in (("t1", "ready"), ("t2", "completed"), ("t3", "cancelled")):
        put(client, task(status=status), name)
    assert ids(client, "/fhir/Task?_sort=status") == ["t3", "t2", "t1"]
    assert ids(client, "/fhir/Task?_sort=-status") == ["t1", "t2", "t3"]


@pytest.mark.parametrize(("sort", "diagnostics"), [
    ("nope", "Cannot sort by 'nope'"),
    ("subject", "Cannot sort by 'subject'"),
    ("status,", "Cannot sort by ''"),
])
def test_sort_by_an_unknown_or_reference_parameter_is_rejected(
        client: TestClient, sort: str, diagnostics: str) -> None:
    assert_invalid(client, f"/fhir/Task?_sort={sort}", diagnostics)


# -- _count -----------------------------------------------------------------------------
def test_count_defaults_to_twenty_and_sets_the_page_size(client: TestClient) -> None:
    for n in range(23):
        put(client, task(), f"t{n:02d}")
    first = search(client, "/fhir/Task?_sort=_id")
    assert [e["resource"]["id"] for e in first["entry"]] == [f"t{n:02d}" for n in range(20)]
    assert "next" in {link["relation"] for link in first["link"]}
    assert ids(client, "/fhir/Task?_sort=_id&_count=5") == [f"t{n:02d}" for n in range(5)]
    assert len(ids(client, "/fhir/Task?_count=23")) == 23


def test_count_zero_returns_only_the_total(client: TestClient) -> None:
    for n in range(3):
        put(client, task(), f"t{n}")
    put(client, task(status="completed"), "t9")
    bundle = search(client, "/fhir/Task?status=ready&_count=0")
    assert bundle["total"] == 3
    assert "entry" not in bundle
    assert [link["relation"] for link in bundle["link"]] == ["self"]


@pytest.mark.parametrize("count", ["-1", "abc", "1.5", ""])
def test_count_that_is_not_a_number_is_rejected(client: TestClient, count: str) -> None:
    assert_invalid(client, f"/fhir/Task?_count={count}",
                   "_count must be a non-negative integer")


@pytest.fixture
def small_pages_client(settings: Settings) -> Iterator[TestClient]:
    with client_with(settings, max_page_size=4) as client:
        yield client


def test_count_is_capped_at_the_maximum_page_size(small_pages_client: TestClient) -> None:
    for n in range(6):
        put(small_pages_client, task(), f"t{n}")
    bundle = search(small_pages_client, "/fhir/Task?_count=100&_sort=_id")
    assert [e["resource"]["id"] for e in bundle["entry"]] == ["t0", "t1", "t2", "t3"]
    assert "next" in {link["relation"] for link in bundle["link"]}


# -- _summary and _elements -------------------------------------------------------------
@pytest.fixture
def detailed(client: TestClient) -> TestClient:
    put(client, patient(text={"status": "generated", "div": '<div xmlns="http://www.w3.org/'
                                                            '1999/xhtml">Élodie</div>'},
                        maritalStatus={"text": "married"}, gender="female"), "p1")
    put(client, task(text={"status": "generated",
                           "div": '<div xmlns="http://www.w3.org/1999/xhtml">T</div>'},
                     description="Collect cells", priority="urgent",
                     meta={"tag": [{"system": "urn:t", "code": "x"}]}), "t1")
    return client


def resource(bundle: dict[str, Any]) -> dict[str, Any]:
    [entry] = bundle["entry"]
    return dict(entry["resource"])


def test_summary_count_returns_the_total_without_entries(detailed: TestClient) -> None:
    bundle = search(detailed, "/fhir/Patient?_summary=count")
    assert bundle["total"] == 1 and "entry" not in bundle


def test_summary_true_keeps_summary_elements_and_marks_subsetted(detailed: TestClient) -> None:
    found = resource(search(detailed, "/fhir/Patient?_summary=true"))
    assert set(found) == {"resourceType", "id", "meta", "name", "birthDate", "gender", "active"}
    assert found["meta"]["tag"] == [SUBSETTED]
    task_found = resource(search(detailed, "/fhir/Task?_summary=true"))
    assert "priority" not in task_found and task_found["description"] == "Collect cells"
    assert task_found["meta"]["tag"] == [{"system": "urn:t", "code": "x"}, SUBSETTED]


def test_summary_text_keeps_text_and_mandatory_elements(detailed: TestClient) -> None:
    found = resource(search(detailed, "/fhir/Task?_summary=text"))
    assert set(found) == {"resourceType", "id", "meta", "text", "status", "intent"}
    assert SUBSETTED in found["meta"]["tag"]


def test_summary_data_drops_only_the_text(detailed: TestClient) -> None:
    found = resource(search(detailed, "/fhir/Patient?_summary=data"))
    assert "text" not in found and found["maritalStatus"] == {"text": "married"}
    assert found["meta"]["tag"] == [SUBSETTED]


def test_summary_false_returns_whole_resources(detailed: TestClient) -> None:
    found = resource(search(detailed, "/fhir/Patient?_summary=false"))
    assert "text" in found and "tag" not in found["meta"]


def test_elements_keeps_the_listed_and_mandatory_elements(detailed: TestClient) -> None:
    found = resource(search(detailed, "/fhir/Task?_elements=priority,description"))
    assert set(found) == {"resourceType", "id", "meta", "status", "intent", "priority",
                          "description"}
    assert SUBSETTED in found["meta"]["tag"]
    patient_found = resource(search(detailed, "/fhir/Patient?_elements=gender"))
    assert set(patient_found) == {"resourceType", "id", "meta", "gender"}


def test_unknown_summary_value_is_rejected(client: TestClient) -> None:
    assert_invalid(client, "/fhir/Task?_summary=all",
                   "_summary must be one of count, data, false, text, true")


# -- _total -----------------------------------------------------------------------------
@pytest.fixture
def five_tasks(client: TestClient) -> TestClient:
    for n in range(5):
        put(client, task(), f"t{n}")
    return client


def test_total_accurate_counts_all_matches_on_every_page(five_tasks: TestClient) -> None:
    first = search(five_tasks, "/fhir/Task?_count=2&_total=accurate")
    assert first["total"] == 5
    following = next(link["url"] for link in first["link"] if link["relation"] == "next")
    assert search(five_tasks, following)["total"] == 5


def test_total_none_leaves_the_total_out(five_tasks: TestClient) -> None:
    assert "total" not in search(five_tasks, "/fhir/Task?_total=none")


def test_total_estimate_or_default_gives_the_total_of_a_single_page(
        five_tasks: TestClient) -> None:
    assert search(five_tasks, "/fhir/Task?_total=estimate")["total"] == 5
    assert search(five_tasks, "/fhir/Task")["total"] == 5


def test_unknown_total_value_is_rejected(client: TestClient) -> None:
    assert_invalid(client, "/fhir/Task?_total=some",
                   "_total must be one of accurate, estimate, none")
