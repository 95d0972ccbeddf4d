"""Bundles the server must refuse, as a whole or per entry, with an OperationOutcome."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.settings import Settings
from gateway.store.database import Database
from tests.conftest import client_with
from tests.factories import patient, task
from tests.integration.bundles_support import (
    FHIR,
    batch,
    create,
    entry,
    outcome,
    patch_binary,
    post_bundle,
    read,
    row_counts,
    transaction,
)


@pytest.fixture
def small_client(settings: Settings) -> Iterator[TestClient]:
    """A server that takes at most three entries per Bundle."""
    with client_with(settings, transaction_max_entries=3) as test_client:
        yield test_client


def _issue(code: str, diagnostics: str, expression: str | None = None) -> list[dict[str, Any]]:
    issue: dict[str, Any] = {"severity": "error", "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = [expression]
    return [issue]


def test_posting_a_resource_that_is_not_a_bundle_fails_400(client: TestClient) -> None:
    response = post_bundle(client, patient())
    assert outcome(400, response) == _issue(
        "invalid", "POST to the base takes a Bundle of type batch or transaction", "Bundle")


@pytest.mark.parametrize("kind", ["collection", "searchset", "document", None])
def test_bundle_of_a_type_other_than_batch_or_transaction_fails_400(
        client: TestClient, kind: str | None) -> None:
    body: dict[str, Any] = {"resourceType": "Bundle",
                            "entry": [entry("POST", "Task", task())]}
    if kind:
        body["type"] = kind
    response = post_bundle(client, body)
    assert outcome(400, response) == _issue(
        "not-supported", f"Bundle.type must be batch or transaction, not {kind!r}",
        "Bundle.type")


def test_bundle_entry_that_is_not_an_array_fails_400(client: TestClient) -> None:
    response = post_bundle(client, {"resourceType": "Bundle", "type": "transaction",
                                    "entry": {"request": {"method": "GET", "url": "Task"}}})
    assert outcome(400, response) == _issue(
        "structure", "Bundle.entry must be an array", "Bundle.entry")


BAD_ENTRIES = {
    "no request": ({"resource": task()}, _issue(
        "required", "Bundle.entry[1] has no request", "Bundle.entry[1].request")),
    "entry not an object": ("Task", _issue(
        "required", "Bundle.entry[1] has no request", "Bundle.entry[1].request")),
    "unknown method": (entry("FETCH", "Task"), _issue(
        "invalid", "Bundle.entry[1].request needs a method (GET, HEAD, POST, PUT, PATCH, "
        "DELETE) and a url", "Bundle.entry[1].request")),
    "method not a string": ({"request": {"method": ["GET"], "url": "Task"}}, _issue(
        "invalid", "Bundle.entry[1].request needs a method (GET, HEAD, POST, PUT, PATCH, "
        "DELETE) and a url", "Bundle.entry[1].request")),
    "no url": ({"request": {"method": "GET"}}, _issue(
        "invalid", "Bundle.entry[1].request needs a method (GET, HEAD, POST, PUT, PATCH, "
        "DELETE) and a url", "Bundle.entry[1].request")),
    "url on another server": (entry("GET", "https://elsewhere.example/fhir/Task/1"), _issue(
        "not-supported", "Bundle.entry[1].request.url https://elsewhere.example/fhir/Task/1 "
        "is not on this server (http://testserver/fhir)", "Bundle.entry[1].request.url")),
    "post without resource": (entry("POST", "Task"), _issue(
        "required", "Bundle.entry[1] needs a resource for POST", "Bundle.entry[1].resource")),
    "put without resource": (entry("PUT", "Task/x"), _issue(
        "required", "Bundle.entry[1] needs a resource for PUT", "Bundle.entry[1].resource")),
    "nested bundle": (entry("POST", "/", transaction()), _issue(
        "not-supported", "Bundle.entry[1]: a batch or transaction cannot be nested in a "
        "Bundle", "Bundle.entry[1].request.url")),
    "fullUrl not a string": ({**entry("POST", "Task", task()), "fullUrl": {"x": 1}}, _issue(
        "structure", "Bundle.entry[1].fullUrl must be a string", "Bundle.entry[1].fullUrl")),
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_transaction_with_a_malformed_entry_fails_400_and_writes_nothing(
        client: TestClient, db: Database, case: str) -> None:
    bad, issues = BAD_ENTRIES[case]
    before = row_counts(db)
    response = post_bundle(client, transaction(entry("POST", "Patient", patient()), bad))
    assert outcome(400, response) == issues
    assert row_counts(db) == before


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_batch_with_a_malformed_entry_answers_400_for_that_entry_only(
        client: TestClient, case: str) -> None:
    bad, issues = BAD_ENTRIES[case]
    response = post_bundle(client, batch(entry("POST", "Patient", patient()), bad))
    assert response.status_code == 200, response.text
    good, refused = response.json()["entry"]
    assert good["response"]["status"] == "201 Created"
    assert refused == {"response": {"status": "400 Bad Request", "outcome": {
        "resourceType": "OperationOutcome", "issue": issues}}}


def test_entry_url_under_this_servers_base_is_accepted(client: TestClient) -> None:
    existing = create(client, task())
    response = post_bundle(client, transaction(
        entry("GET", f"http://testserver/fhir/Task/{existing['id']}")))
    assert response.status_code == 200, response.text
    assert response.json()["entry"][0]["resource"] == existing


def test_transaction_patch_with_binary_json_patch_applies_it(client: TestClient) -> None:
    existing = create(client, task())
    response = post_bundle(client, transaction(entry(
        "PATCH", f"Task/{existing['id']}",
        patch_binary([{"op": "test", "path": "/status", "value": "ready"},
                      {"op": "replace", "path": "/status", "value": "on-hold"}]),
        ifMatch='W/"1"')))
    assert response.status_code == 200, response.text
    (patched,) = response.json()["entry"]
    assert patched["response"]["status"] == "200 OK"
    assert patched["response"]["etag"] == 'W/"2"'
    assert patched["resource"]["status"] == "on-hold"
    assert read(client, f"Task/{existing['id']}").json() == patched["resource"]


def test_transaction_patch_binary_that_is_not_base64_fails_400(client: TestClient) -> None:
    existing = create(client, task())
    binary = {**patch_binary([]), "data": "%%% not base64 %%%"}
    response = post_bundle(client, transaction(entry("PATCH", f"Task/{existing['id']}",
                                                     binary)))
    assert outcome(400, response) == _issue(
        "invalid", "Bundle.entry[0].resource.data is not base64",
        "Bundle.entry[0].resource.data")


def test_transaction_patch_binary_of_another_media_type_fails_415(client: TestClient) -> None:
    existing = create(client, task())
    binary = {"resourceType": "Binary", "contentType": "text/plain",
              "data": base64.b64encode(b"[]").decode()}
    response = post_bundle(client, transaction(entry("PATCH", f"Task/{existing['id']}",
                                                     binary)))
    assert outcome(415, response) == _issue(
        "not-supported", "Bundle.entry[0]: a PATCH Binary must have contentType "
        "application/json-patch+json, not text/plain")


@pytest.mark.parametrize("make", [transaction, batch])
def test_bundle_with_more_entries_than_allowed_fails_413(small_client: TestClient,
                                                         make: Any) -> None:
    body = make(*(entry("POST", "Task", task()) for _ in range(4)))
    response = small_client.post("/fhir", json=body, headers=FHIR)
    assert outcome(413, response) == _issue(
        "too-costly", "The Bundle has 4 entries; at most 3 are accepted")
    assert small_client.get("/fhir/Task").json().get("total") == 0


def test_bundle_at_the_entry_limit_is_accepted(small_client: TestClient) -> None:
    body = transaction(*(entry("POST", "Task", task()) for _ in range(3)))
    response = small_client.post("/fhir", json=body, headers=FHIR)
    assert response.status_code == 200, response.text
    assert len(response.json()["entry"]) == 3

