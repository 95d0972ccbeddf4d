"""_include, _revinclude and :iterate (https://hl7.org/fhir/R4/search.html#include):
referenced resources come once each, marked search.mode include, bounded in number."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.settings import Settings
from tests.conftest import client_with
from tests.factories import organization, patient, ref, task
from tests.integration.search_support import put, search

FHIR = {"Content-Type": "application/fhir+json"}


def by_mode(bundle: dict[str, Any], mode: str) -> list[str]:
    return [f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


@pytest.fixture
def clinic(client: TestClient) -> TestClient:
    for pid in ("p1", "p2", "p3", "p4"):
        put(client, patient(), pid)
    put(client, organization(), "o1")
    put(client, organization(name="South"), "o2")
    put(client, {"resourceType": "CarePlan", "status": "active", "intent": "plan",
                 "subject": ref("Patient/p2")}, "cp1")
    put(client, task(**{"for": ref("Patient/p1")}, owner=ref("Organization/o1"),
                     basedOn=[ref("CarePlan/cp1")]), "t1")
    put(client, task(**{"for": ref("Patient/p2")}, owner=ref("Organization/o2"),
                     partOf=[ref("Task/t1")]), "t2")
    put(client, task(**{"for": ref("Patient/p1")}, owner=ref("Patient/p2")), "t3")
    put(client, task(**{"for": ref("http://testserver/fhir/Patient/p3")}, status="completed"),
        "t4")
    put(client, task(**{"for": ref("http://elsewhere.org/fhir/Patient/p4")},
                     status="completed"), "t5")
    return client


def test_include_adds_each_referenced_resource_once(clinic: TestClient) -> None:
    bundle = search(clinic, "/fhir/Task?status=ready&_include=Task:patient&_sort=_id")
    assert by_mode(bundle, "match") == ["Task/t1", "Task/t2", "Task/t3"]
    assert sorted(by_mode(bundle, "include")) == ["Patient/p1", "Patient/p2"]
    assert [e["fullUrl"] for e in bundle["entry"]][-2:] == sorted(
        f"http://testserver/fhir/{key}" for key in by_mode(bundle, "include"))
    assert bundle["total"] == 3


def test_include_with_a_target_type_keeps_only_that_type(clinic: TestClient) -> None:
    typed = search(clinic, "/fhir/Task?_include=Task:owner:Organization")
    assert sorted(by_mode(typed, "include")) == ["Organization/o1", "Organization/o2"]
    untyped = search(clinic, "/fhir/Task?_include=Task:owner")
    assert sorted(by_mode(untyped, "include")) == [
        "Organization/o1", "Organization/o2", "Patient/p2"]


def test_include_follows_absolute_references_only_on_our_base(clinic: TestClient) -> None:
    bundle = search(clinic, "/fhir/Task?status=completed&_include=Task:patient")
    assert sorted(by_mode(bundle, "match")) == ["Task/t4", "Task/t5"]
    assert by_mode(bundle, "include") == ["Patient/p3"]


def test_include_does_not_repeat_a_resource_that_is_already_a_match(
        clinic: TestClient) -> None:
    bundle = search(clinic, "/fhir/Task?_id=t1,t2&_include=Task:part-of")
    assert sorted(by_mode(bundle, "match")) == ["Task/t1", "Task/t2"]
    assert by_mode(bundle, "include") == []


def test_include_leaves_out_deleted_targets(clinic: TestClient) -> None:
    assert clinic.delete("/fhir/Patient/p1").status_code in (200, 204)
    bundle = search(clinic, "/fhir/Task?_id=t1,t2&_include=Task:patient")
    assert by_mode(bundle, "include") == ["Patient/p2"]


def test_revinclude_adds_the_resources_that_refer_to_matches(clinic: TestClient) -> None:
    bundle = search(clinic, "/fhir/Patient?_id=p1,p3,p4&_revinclude=Task:patient")
    assert sorted(by_mode(bundle, "match")) == ["Patient/p1", "Patient/p3", "Patient/p4"]
    assert sorted(by_mode(bundle, "include")) == ["Task/t1", "Task/t3", "Task/t4"]


def test_include_iterate_follows_references_of_included_resources(clinic: TestClient) -> None:
    plain = search(clinic, "/fhir/Task?_id=t1&_include=Task:based-on"
                           "&_include=CarePlan:subject")
    assert by_mode(plain, "include") == ["CarePlan/cp1"]
    iterated = search(clinic, "/fhir/Task?_id=t1&_include=Task:based-on"
                              "&_include:iterate=CarePlan:subject")
    assert by_mode(iterated, "match") == ["Task/t1"]
    assert by_mode(iterated, "include") == ["CarePlan/cp1", "Patient/p2"]


def test_revinclude_iterate_reaches_two_hops(clinic: TestClient) -> None:
    bundle = search(clinic, "/fhir/Organization?_id=o1&_revinclude=Task:owner"
                            "&_revinclude:iterate=Task:part-of")
    assert by_mode(bundle, "include") == ["Task/t1", "Task/t2"]


def test_includes_belong_to_their_page(clinic: TestClient) -> None:
    first = search(clinic, "/fhir/Task?status=ready&_sort=_id&_count=1&_include=Task:patient")
    assert by_mode(first, "match") == ["Task/t1"]
    assert by_mode(first, "include") == ["Patient/p1"]
    second = search(clinic, next(x["url"] for x in first["link"] if x["relation"] == "next"))
    assert by_mode(second, "match") == ["Task/t2"]
    assert by_mode(second, "include") == ["Patient/p2"]


@pytest.mark.parametrize(("value", "diagnostics"), [
    ("Task", "Malformed _include 'Task': expected Type:param[:target]"),
    ("*", "Malformed _include '*': expected Type:param[:target]"),
    ("Task:status", "'status' is not a reference parameter of Task"),
    ("Task:owner:Nope", "Unknown target type 'Nope' in 'Task:owner:Nope'"),
])
def test_malformed_include_is_rejected(clinic: TestClient, value: str,
                                       diagnostics: str) -> None:
    response = clinic.get(f"/fhir/Task?_include={value}")
    assert response.status_code == 400
    assert response.json() == {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "diagnostics": diagnostics}]}


@pytest.fixture
def capped_client(settings: Settings) -> Iterator[TestClient]:
    """A server that adds at most two included resources to a page."""
    with client_with(settings, max_include=2) as client:
        yield client


def test_includes_are_bounded_and_the_cut_is_reported(capped_client: TestClient) -> None:
    put(capped_client, patient(), "p1")
    for n in range(5):
        put(capped_client, task(**{"for": ref("Patient/p1")}), f"t{n}")
    bundle = search(capped_client, "/fhir/Patient?_revinclude=Task:patient")
    assert by_mode(bundle, "match") == ["Patient/p1"]
    assert len(by_mode(bundle, "include")) == 2
    outcome = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome == [{"resourceType": "OperationOutcome", "issue": [{
        "severity": "warning", "code": "too-costly",
        "diagnostics": "Included resources were cut at 2 (the server's limit per page)"}]}]
