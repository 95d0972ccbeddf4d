"""/fhir/metadata: the CapabilityStatement says what this R4 server really supports.

https://hl7.org/fhir/R4/capabilitystatement.html
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

FHIR = {"Content-Type": "application/fhir+json"}
TYPE_INTERACTIONS = {"read", "vread", "update", "patch", "delete", "history-instance",
                     "history-type", "create", "search-type"}
PARAM_TYPES = {"number", "date", "string", "token", "reference", "composite", "quantity",
               "uri", "special"}
PRODUCT_TYPES = ["Task", "CarePlan", "PlanDefinition", "BiologicallyDerivedProduct",
                 "ServiceRequest", "Patient", "Organization", "Practitioner", "Specimen",
                 "Provenance", "AuditEvent", "Subscription", "Bundle"]
# Added by R4B (4.3.0): an R4 client cannot use them, so an R4 server must not offer them.
R4B_ONLY_TYPES = ["AdministrableProductDefinition", "Citation", "ClinicalUseDefinition",
                  "EvidenceReport", "Ingredient", "ManufacturedItemDefinition",
                  "NutritionProduct", "PackagedProductDefinition", "RegulatedAuthorization",
                  "SubscriptionStatus", "SubscriptionTopic"]
SAMPLE_VALUES = {"token": "x", "string": "x", "date": "2024-01-01", "reference": "Patient/1",
                 "uri": "http://example.org/x", "number": "1", "quantity": "1"}


@pytest.fixture
def statement(client: TestClient) -> dict[str, Any]:
    response = client.get("/fhir/metadata")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def by_type(statement: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["type"]: r for r in statement["rest"][0]["resource"]}


def test_metadata_is_an_r4_capability_statement(client: TestClient) -> None:
    response = client.get("/fhir/metadata")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "CapabilityStatement"
    assert body["fhirVersion"] == "4.0.1"
    assert body["kind"] == "instance"
    assert body["status"] == "active"
    assert "application/fhir+json" in body["format"]
    assert body["implementation"]["url"] == "http://testserver/fhir"
    assert [r["mode"] for r in body["rest"]] == ["server"]


@pytest.mark.parametrize("accept", ["application/fhir+json", "application/json", "*/*"])
def test_metadata_needs_no_body_and_answers_fhir_json(client: TestClient, accept: str) -> None:
    response = client.get("/fhir/metadata", headers={"Accept": accept})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/fhir+json; charset=utf-8"
    assert response.json()["resourceType"] == "CapabilityStatement"


def test_metadata_lists_the_product_resource_types_once(statement: dict[str, Any]) -> None:
    types = [r["type"] for r in statement["rest"][0]["resource"]]
    assert len(types) == len(set(types))
    assert set(PRODUCT_TYPES) <= set(types)
    assert len(types) > 100


def test_metadata_lists_no_r4b_only_or_abstract_types(statement: dict[str, Any]) -> None:
    types = set(by_type(statement))
    assert types.isdisjoint(R4B_ONLY_TYPES)
    assert types.isdisjoint({"Resource", "DomainResource"})


def test_metadata_gives_every_type_interactions_and_typed_search_params(
        statement: dict[str, Any]) -> None:
    for resource_type, resource in by_type(statement).items():
        codes = {i["code"] for i in resource["interaction"]}
        assert codes and codes <= TYPE_INTERACTIONS, resource_type
        params = resource["searchParam"]
        assert [p["name"] for p in params][:2] == ["_id", "_lastUpdated"], resource_type
        for param in params:
            assert param["type"] in PARAM_TYPES, (resource_type, param)
            assert param["definition"].startswith("http://hl7.org/fhir/SearchParameter/")


def test_metadata_audit_event_is_read_and_searched_only(statement: dict[str, Any]) -> None:
    audit = by_type(statement)["AuditEvent"]
    assert {i["code"] for i in audit["interaction"]} == {"read", "vread", "search-type"}
    assert {"date", "entity", "altid", "agent", "outcome"} <= {
        p["name"] for p in audit["searchParam"]}
    assert [o["name"] for o in audit["operation"]] == ["verify-chain"]


def test_metadata_task_entry_has_the_searches_the_orchestrator_uses(
        statement: dict[str, Any]) -> None:
    task = by_type(statement)["Task"]
    assert {i["code"] for i in task["interaction"]} == TYPE_INTERACTIONS
    params = {p["name"]: p["type"] for p in task["searchParam"]}
    assert params["status"] == "token"
    assert params["owner"] == "reference"
    assert params["authored-on"] == "date"
    assert params["based-on"] == "reference"
    assert "Task:owner" in task["searchInclude"]
    assert task["versioning"] == "versioned-update"
    system = {i["code"] for i in statement["rest"][0]["interaction"]}
    assert system == {"transaction", "batch", "search-system", "history-system"}


@pytest.mark.parametrize("resource_type", ["Task", "CarePlan", "PlanDefinition",
                                           "BiologicallyDerivedProduct"])
def test_metadata_search_params_are_accepted_by_search(client: TestClient,
                                                       statement: dict[str, Any],
                                                       resource_type: str) -> None:
    strict = {"Prefer": "handling=strict"}
    for param in by_type(statement)[resource_type]["searchParam"]:
        value = SAMPLE_VALUES.get(param["type"])
        if value is None:
            continue
        response = client.get(f"/fhir/{resource_type}", params={param["name"]: value},
                              headers=strict)
        assert response.status_code == 200, (param, response.text)
        assert response.json()["resourceType"] == "Bundle"


def test_metadata_validates_with_the_servers_own_validate(client: TestClient) -> None:
    statement = client.get("/fhir/metadata").content
    response = client.post("/fhir/CapabilityStatement/$validate", content=statement,
                           headers=FHIR)
    assert response.status_code == 200
    assert response.json() == {"resourceType": "OperationOutcome", "issue": [{
        "severity": "information", "code": "informational",
        "diagnostics": "Validation successful"}]}


def test_metadata_rejects_post_with_405_outcome(client: TestClient) -> None:
    response = client.post("/fhir/metadata", content=b"{}", headers=FHIR)
    assert response.status_code == 405
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert [(i["severity"], i["code"]) for i in outcome["issue"]] == [("error", "not-supported")]
    assert "POST" in outcome["issue"][0]["diagnostics"]


def test_metadata_lists_subscription_topics_and_operations(statement: dict[str, Any]) -> None:
    """The Subscriptions Backport IG's discovery: Subscription names the shipped topics
    and the operations. SubscriptionTopic is served (R4B's) but is no R4 resource type, so
    an R4 CapabilityStatement tells of it in Subscription's documentation only."""
    subscription = by_type(statement)["Subscription"]
    assert "[base]/SubscriptionTopic" in subscription["documentation"]
    topics = {e["valueCanonical"] for e in subscription["extension"]}
    assert "https://atm-gateway.org/fhir/SubscriptionTopic/task-status" in topics
    assert len(topics) >= 6
    assert {"status", "events", "get-ws-binding-token"} <= {
        o["name"] for o in subscription["operation"]}
