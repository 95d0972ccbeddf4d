"""What a search rejects, what `Prefer: handling=lenient` lets through, and POST _search
(https://hl7.org/fhir/R4/search.html#errors, #Introduction)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from fastapi.testclient import TestClient

from tests.factories import patient, task
from tests.integration.search_support import put

FHIR = {"Content-Type": "application/fhir+json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
LENIENT = {"Prefer": "handling=lenient"}


def outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": code, "diagnostics": diagnostics}]}


def match_ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])
            if e["search"]["mode"] == "match"]


@pytest.mark.parametrize(("query", "code", "diagnostics"), [
    ("colour=red", "invalid", "Unknown search parameter 'colour' for Task"),
    ("status:exact=ready", "not-supported",
     "Modifier :exact is not supported on status (token)"),
    ("authored-on:contains=2024", "not-supported",
     "Modifier :contains is not supported on authored-on (date)"),
    ("owner:Nope=1", "not-supported", "Modifier :Nope is not supported on owner (reference)"),
    ("owner:Observation=1", "invalid", "owner cannot refer to Observation"),
    ("authored-on=2024-13-01", "invalid",
     "Malformed date '2024-13-01': expected e.g. 2024-03-01 or ge2024-03"),
    ("authored-on=yesterday", "invalid",
     "Malformed date 'yesterday': expected e.g. 2024-03-01 or ge2024-03"),
    ("authored-on=gt", "invalid", "Malformed date 'gt': expected e.g. 2024-03-01 or ge2024-03"),
    ("status=a|b|c", "invalid", "Malformed token 'a|b|c'"),
    ("owner=Nope/1", "invalid", "Unknown resource type in reference 'Nope/1'"),
    ("status:missing=maybe", "invalid", "status:missing takes true or false"),
    ("status=", "invalid", "Search parameter 'status' has no value"),
    ("_text=cells", "not-supported", "Search parameter '_text' is not supported"),
    ("_lastUpdated=soon", "invalid",
     "Malformed date 'soon': expected e.g. 2024-03-01 or ge2024-03"),
    ("_id:exact=1", "not-supported", "Modifier :exact is not supported on _id"),
])
def test_malformed_task_search_is_rejected_naming_the_parameter(
        client: TestClient, query: str, code: str, diagnostics: str) -> None:
    response = client.get(f"/fhir/Task?{query}")
    assert response.status_code == 400
    assert response.json() == outcome(code, diagnostics)


@pytest.mark.parametrize(("query", "diagnostics"), [
    ("probability=high", "Malformed number 'high'"),
    ("probability=NaN", "Malformed number 'NaN'"),
    ("probability=gtInfinity", "Malformed number 'gtInfinity'"),
    ("probability=1e999999999999", "Malformed number '1e999999999999'"),
])
def test_malformed_number_is_rejected(client: TestClient, query: str, diagnostics: str) -> None:
    response = client.get(f"/fhir/RiskAssessment?{query}")
    assert response.status_code == 400
    assert response.json() == outcome("invalid", diagnostics)


def test_malformed_quantity_is_rejected(client: TestClient) -> None:
    response = client.get("/fhir/Observation?value-quantity=5|mg")
    assert response.status_code == 400
    assert response.json() == outcome(
        "invalid", "Malformed quantity '5|mg': expected [prefix]number|system|code")


def test_lenient_search_ignores_and_reports_unknown_parameters(client: TestClient) -> None:
    put(client, task(), "t1")
    put(client, task(status="completed"), "t2")
    response = client.get("/fhir/Task?colour=red&status=ready&status:exact=x", headers=LENIENT)
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert match_ids(bundle) == ["t1"]
    [reported] = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert reported == {"search": {"mode": "outcome"}, "resource": {
        "resourceType": "OperationOutcome", "issue": [
            {"severity": "warning", "code": "invalid",
             "diagnostics": "Ignored: Unknown search parameter 'colour' for Task",
             "expression": ["colour"]},
            {"severity": "warning", "code": "invalid",
             "diagnostics": "Ignored: Modifier :exact is not supported on status (token)",
             "expression": ["status:exact"]}]}}
    self_link = next(x["url"] for x in bundle["link"] if x["relation"] == "self")
    assert parse_qsl(urlsplit(self_link).query) == [("status", "ready")]


def test_lenient_count_only_search_still_reports_what_it_ignored(client: TestClient) -> None:
    put(client, task(), "t1")
    response = client.get("/fhir/Task?colour=red&_summary=count", headers=LENIENT)
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["total"] == 1
    assert [e["search"]["mode"] for e in bundle["entry"]] == ["outcome"]
    assert bundle["entry"][0]["resource"]["issue"][0]["diagnostics"] == (
        "Ignored: Unknown search parameter 'colour' for Task")


def test_lenient_search_still_rejects_malformed_result_controls(client: TestClient) -> None:
    response = client.get("/fhir/Task?_count=many", headers=LENIENT)
    assert response.status_code == 400
    assert response.json() == outcome("invalid", "_count must be a non-negative integer")


def test_strict_handling_is_the_default_and_can_be_asked_for(client: TestClient) -> None:
    response = client.get("/fhir/Task?colour=red", headers={"Prefer": "handling=strict"})
    assert response.status_code == 400
    assert response.json() == outcome("invalid", "Unknown search parameter 'colour' for Task")


def test_unknown_resource_type_in_the_path_is_not_found(client: TestClient) -> None:
    response = client.get("/fhir/Nope?x=1")
    assert response.status_code == 404
    assert response.json() == outcome("not-found", "Unknown resource type 'Nope'")


# -- POST _search -----------------------------------------------------------------------
def test_post_search_with_a_form_gives_the_same_results_as_get(client: TestClient) -> None:
    put(client, patient(), "p1")
    for n, status in enumerate(["ready", "completed", "ready", "ready"]):
        put(client, task(status=status, **{"for": {"reference": "Patient/p1"}}), f"t{n}")
    query = "status=ready&patient=Patient/p1&_sort=-_id&_count=2&_include=Task:patient"
    got = client.get(f"/fhir/Task?{query}")
    posted = client.post("/fhir/Task/_search", content=query, headers=FORM)
    assert posted.status_code == 200, posted.text
    assert posted.json() == got.json()
    assert match_ids(posted.json()) == ["t3", "t2"]


def test_post_search_merges_url_and_form_parameters(client: TestClient) -> None:
    put(client, task(), "t1")
    put(client, task(status="completed"), "t2")
    put(client, task(status="completed", priority="urgent"), "t3")
    posted = client.post("/fhir/Task/_search?status=completed", content="priority=urgent",
                         headers=FORM)
    assert posted.status_code == 200, posted.text
    assert match_ids(posted.json()) == ["t3"]


def test_post_system_search_by_id(client: TestClient) -> None:
    put(client, task(), "x1")
    put(client, patient(), "x1")
    posted = client.post("/fhir/_search", content="_id=x1&_sort=_id", headers=FORM)
    assert posted.status_code == 200, posted.text
    assert sorted(e["fullUrl"] for e in posted.json()["entry"]) == [
        "http://testserver/fhir/Patient/x1", "http://testserver/fhir/Task/x1"]


def test_post_search_rejects_a_body_that_is_not_a_form(client: TestClient) -> None:
    posted = client.post("/fhir/Task/_search", content=b'{"status": "ready"}', headers=FHIR)
    assert posted.status_code == 400
    assert posted.json() == outcome(
        "invalid", "POST _search takes application/x-www-form-urlencoded parameters")


def test_post_search_reports_unknown_parameters_like_get(client: TestClient) -> None:
    posted = client.post("/fhir/Task/_search", content="colour=red", headers=FORM)
    assert posted.status_code == 400
    assert posted.json() == outcome("invalid", "Unknown search parameter 'colour' for Task")
