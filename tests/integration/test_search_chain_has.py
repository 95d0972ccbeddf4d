"""Chained parameters and reverse chaining with _has
(https://hl7.org/fhir/R4/search.html#chaining, #has)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.factories import identifier, organization, patient, ref, task
from tests.integration.search_support import put

FHIR = {"Content-Type": "application/fhir+json"}


pytestmark = pytest.mark.usefixtures("search_plan")


def found(client: TestClient, url: str) -> set[str]:
    response = client.get(url)
    assert response.status_code == 200, response.text
    return {e["resource"]["id"] for e in response.json().get("entry", [])
            if e["search"]["mode"] == "match"}


def assert_error(client: TestClient, url: str, code: str, diagnostics: str) -> None:
    response = client.get(url)
    assert response.status_code == 400, response.text
    assert response.json() == {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": code, "diagnostics": diagnostics}]}


@pytest.fixture
def clinic(client: TestClient) -> TestClient:
    """Two patients, two organisations, tasks between them (one pointing elsewhere)."""
    put(client, patient(identifier=identifier("urn:x", "1")), "p1")
    put(client, patient(identifier=identifier("urn:x", "2"), name=[{"family": "Martin"}]), "p2")
    put(client, patient(identifier=identifier("urn:x", "3")), "p3")
    put(client, patient(identifier=identifier("urn:x", "4")), "p4")
    put(client, organization(name="North Apheresis Centre"), "o1")
    put(client, organization(name="South"), "o2")
    put(client, task(**{"for": ref("Patient/p1")}, owner=ref("Organization/o1")), "t1")
    put(client, task(**{"for": ref("Patient/p2")}, owner=ref("Organization/o2")), "t2")
    put(client, task(**{"for": ref("Patient/p1")}, owner=ref("Organization/o2"),
                     status="completed"), "t3")
    put(client, task(), "t4")
    put(client, task(**{"for": ref("http://testserver/fhir/Patient/p3")}), "t5")
    put(client, task(**{"for": ref("http://elsewhere.org/fhir/Patient/p4")}), "t6")
    return client


CHAIN_CASES = {
    "patient.identifier=urn:x|1": {"t1", "t3"},
    "patient.identifier=urn:x|2,urn:x|1": {"t1", "t2", "t3"},
    "patient.identifier=urn:x|3": {"t5"},
    "patient.identifier=urn:x|4": set(),
    "patient.name=martin": {"t2"},
    "subject:Patient.identifier=urn:x|2": {"t2"},
    "owner:Organization.name=North": {"t1"},
    "owner:Organization.name:exact=South": {"t2", "t3"},
    "owner:Organization._id=o2": {"t2", "t3"},
    "patient.identifier=urn:x|1&status=ready": {"t1"},
    "patient.identifier=urn:x|1&owner:Organization.name=south": {"t3"},
}


def test_chained_search_matches_through_the_reference(clinic: TestClient) -> None:
    got = {query: found(clinic, f"/fhir/Task?{query}") for query in CHAIN_CASES}
    assert got == CHAIN_CASES


def test_chained_search_ignores_deleted_targets(clinic: TestClient) -> None:
    assert clinic.delete("/fhir/Patient/p2").status_code in (200, 204)
    assert found(clinic, "/fhir/Task?patient.identifier=urn:x|2") == set()


def test_chain_through_many_target_types_is_rejected_as_ambiguous(clinic: TestClient) -> None:
    assert_error(clinic, "/fhir/Task?owner.name=North", "invalid",
                 "Chain 'owner.name' is ambiguous: name the target type (HealthcareService, "
                 "Organization, Patient, Practitioner, RelatedPerson), "
                 "e.g. owner:HealthcareService.name")


def test_two_level_chain_is_rejected_as_not_supported(clinic: TestClient) -> None:
    assert_error(clinic, "/fhir/Task?patient.organization.name=North", "not-supported",
                 "Chain 'patient.organization.name' has more than one level: "
                 "only one level of chaining is supported")


@pytest.mark.parametrize(("query", "diagnostics"), [
    ("status.name=x", "'status' is not a reference: it cannot be chained"),
    ("patient.foo=1", "No target type of 'patient' has a search parameter 'foo'"),
    ("owner:Observation.code=x", "'owner' cannot refer to Observation"),
    ("patient.birthdate=1980-99", "Malformed date '1980-99': expected e.g. 2024-03-01 "
                                  "or ge2024-03"),
])
def test_malformed_chain_is_rejected(clinic: TestClient, query: str, diagnostics: str) -> None:
    assert_error(clinic, f"/fhir/Task?{query}", "invalid", diagnostics)


HAS_CASES = {
    "_has:Task:patient:status=ready": {"p1", "p2", "p3"},
    "_has:Task:patient:status=completed": {"p1"},
    "_has:Task:patient:status=cancelled": set(),
    "_has:Task:patient:owner=Organization/o2": {"p1", "p2"},
    "_has:Task:patient:status:not=ready": {"p1"},
    "_has:Task:patient:status=ready&identifier=urn:x|2": {"p2"},
    "_has:Task:patient:_id=t1,t2": {"p1", "p2"},
}


def test_has_search_finds_resources_referred_to_by_matching_ones(clinic: TestClient) -> None:
    got = {query: found(clinic, f"/fhir/Patient?{query}") for query in HAS_CASES}
    assert got == HAS_CASES
    assert found(clinic, "/fhir/Organization?_has:Task:owner:status=completed") == {"o2"}


def test_has_search_ignores_deleted_referrers(clinic: TestClient) -> None:
    assert clinic.delete("/fhir/Task/t2").status_code in (200, 204)
    assert found(clinic, "/fhir/Patient?_has:Task:patient:status=ready") == {"p1", "p3"}


@pytest.mark.parametrize(("query", "diagnostics"), [
    ("_has:Task:status", "Malformed _has '_has:Task:status': expected "
                         "_has:Type:reference:param"),
    ("_has:Nope:patient:status", "Malformed _has '_has:Nope:patient:status': expected "
                                 "_has:Type:reference:param"),
    ("_has:Task:status:status", "'status' is not a reference parameter of Task"),
    ("_has:Task:patient:foo", "Unknown search parameter 'foo' for Task"),
])
def test_malformed_has_is_rejected(clinic: TestClient, query: str, diagnostics: str) -> None:
    assert_error(clinic, f"/fhir/Patient?{query}=ready", "invalid", diagnostics)
