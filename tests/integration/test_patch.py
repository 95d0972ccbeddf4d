"""JSON Patch (RFC 6902) on single resources, plain and conditional
(https://hl7.org/fhir/R4/http.html#patch)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from tests.factories import assert_outcome, identifier, task

FHIR = {"Content-Type": "application/fhir+json"}
PATCH = {"Content-Type": "application/json-patch+json"}
SYSTEM = "urn:example:order"


@pytest.fixture
def stored(client: TestClient) -> dict[str, Any]:
    body = task(identifier=identifier(SYSTEM, "P1"), description="before",
                note=[{"text": "first"}, {"text": "second"}])
    response = client.post("/fhir/Task", json=body, headers=FHIR)
    assert response.status_code == 201
    return response.json()  # type: ignore[no-any-return]


def send(client: TestClient, resource: dict[str, Any], ops: list[dict[str, Any]],
         headers: dict[str, str] | None = None) -> Response:
    return client.patch(f"/fhir/Task/{resource['id']}", content=json.dumps(ops),
                        headers={**PATCH, **(headers or {})})


def current(client: TestClient, resource: dict[str, Any]) -> dict[str, Any]:
    return client.get(f"/fhir/Task/{resource['id']}").json()  # type: ignore[no-any-return]


def assert_unchanged(client: TestClient, resource: dict[str, Any]) -> None:
    assert current(client, resource) == resource
    bundle = client.get(f"/fhir/Task/{resource['id']}/_history").json()
    assert len(bundle["entry"]) == 1


# -- operations ---------------------------------------------------------------------------------
def test_patch_replace_stores_version_2(client: TestClient, stored: dict[str, Any]) -> None:
    response = send(client, stored, [{"op": "replace", "path": "/status",
                                      "value": "in-progress"}])

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["meta"]["versionId"]) == ("in-progress", "2")
    assert response.headers["etag"] == 'W/"2"'
    assert response.headers["location"].endswith(f"/Task/{stored['id']}/_history/2")
    assert current(client, stored) == body
    history = client.get(f"/fhir/Task/{stored['id']}/_history").json()
    assert history["entry"][0]["request"]["method"] == "PATCH"


def test_patch_add_remove_and_test_apply_in_order(client: TestClient,
                                                  stored: dict[str, Any]) -> None:
    ops = [{"op": "test", "path": "/description", "value": "before"},
           {"op": "add", "path": "/priority", "value": "urgent"},
           {"op": "add", "path": "/note/-", "value": {"text": "third"}},
           {"op": "remove", "path": "/note/0"},
           {"op": "remove", "path": "/description"}]

    response = send(client, stored, ops)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["priority"] == "urgent"
    assert body["note"] == [{"text": "second"}, {"text": "third"}]
    assert "description" not in body


def test_patch_cannot_set_meta_version(client: TestClient, stored: dict[str, Any]) -> None:
    response = send(client, stored, [{"op": "replace", "path": "/meta/versionId",
                                      "value": "42"}])

    assert response.status_code == 200
    assert response.json()["meta"]["versionId"] == "2"


def test_patch_keeps_decimal_precision(client: TestClient, stored: dict[str, Any]) -> None:
    value = [{"type": {"text": "dose"}, "valueDecimal": 1.50}]
    ops = '[{"op": "add", "path": "/input", "value": [{"type": {"text": "dose"}, ' \
          '"valueDecimal": 1.50}]}]'

    response = client.patch(f"/fhir/Task/{stored['id']}", content=ops, headers=PATCH)

    assert response.status_code == 200
    assert b'"valueDecimal":1.50' in response.content
    assert b'"valueDecimal":1.50' in client.get(f"/fhir/Task/{stored['id']}").content
    assert response.json()["input"] == value


# -- failures ---------------------------------------------------------------------------------
def test_patch_with_failing_test_op_returns_422_and_changes_nothing(
        client: TestClient, stored: dict[str, Any]) -> None:
    ops = [{"op": "replace", "path": "/status", "value": "failed"},
           {"op": "test", "path": "/description", "value": "something else"}]

    response = send(client, stored, ops)

    assert_outcome(response, 422, "processing", "JSON Patch test failed")
    assert_unchanged(client, stored)


def test_patch_producing_invalid_resource_returns_400_with_expression(
        client: TestClient, stored: dict[str, Any]) -> None:
    response = send(client, stored, [{"op": "replace", "path": "/status", "value": "bogus"}])

    assert_outcome(response, 400, "code-invalid", "bogus", expression="Task.status")
    assert_unchanged(client, stored)


def test_patch_removing_a_required_element_returns_400(client: TestClient,
                                                       stored: dict[str, Any]) -> None:
    response = send(client, stored, [{"op": "remove", "path": "/intent"}])

    assert_outcome(response, 400, "invalid", expression="Task.intent")
    assert_unchanged(client, stored)


def test_patch_adding_an_unknown_element_returns_400(client: TestClient,
                                                     stored: dict[str, Any]) -> None:
    response = send(client, stored, [{"op": "add", "path": "/colour", "value": "blue"}])

    assert_outcome(response, 400, "invalid", expression="Task.colour")
    assert_unchanged(client, stored)


@pytest.mark.parametrize(("path", "value", "expression"), [
    ("/id", "another-id", "Task.id"),
    ("/resourceType", "Patient", "resourceType"),
])
def test_patch_changing_identity_returns_400(client: TestClient, stored: dict[str, Any],
                                             path: str, value: str, expression: str) -> None:
    response = send(client, stored, [{"op": "replace", "path": path, "value": value}])

    assert_outcome(response, 400, "invalid", value, expression=expression)
    assert_unchanged(client, stored)
    assert client.get(f"/fhir/Task/{value}").status_code == 404


def test_patch_removing_id_returns_400(client: TestClient, stored: dict[str, Any]) -> None:
    response = send(client, stored, [{"op": "remove", "path": "/id"}])

    assert_outcome(response, 400, "required", "no id", expression="Task.id")
    assert_unchanged(client, stored)


@pytest.mark.parametrize(("ops", "diagnostics"), [
    ('{"op": "replace", "path": "/status", "value": "ready"}', "JSON array of operations"),
    ('[1, 2]', "JSON array of operations"),
    ('[{"op": "frobnicate", "path": "/status"}]', "cannot be applied"),
    ('[{"op": "replace", "value": "ready"}]', "cannot be applied"),
    ('[{"op": "replace", "path": "status", "value": "ready"}]', "cannot be applied"),
    ('[{"op": "replace", "path": "/note/9", "value": {"text": "x"}}]', "cannot be applied"),
    ('[{"op": "remove", "path": "/nothing/here"}]', "cannot be applied"),
    ('[{"op": "replace", "path": 5, "value": "ready"}]', "cannot be applied"),
    ('[{"op": "replace", "path": "", "value": []}]', "must leave a resource"),
    ("[{", "Malformed JSON"),
])
def test_patch_with_malformed_patch_returns_400(client: TestClient, stored: dict[str, Any],
                                                ops: str, diagnostics: str) -> None:
    response = client.patch(f"/fhir/Task/{stored['id']}", content=ops, headers=PATCH)

    assert_outcome(response, 400, "invalid", diagnostics)
    assert_unchanged(client, stored)


def test_patch_with_empty_body_returns_400(client: TestClient, stored: dict[str, Any]) -> None:
    response = client.patch(f"/fhir/Task/{stored['id']}", content=b"", headers=PATCH)

    assert_outcome(response, 400, "invalid", "no body")


@pytest.mark.parametrize("media", ["application/fhir+json", "application/json",
                                   "application/merge-patch+json", "text/plain"])
def test_patch_with_other_content_type_returns_415(client: TestClient, stored: dict[str, Any],
                                                   media: str) -> None:
    response = client.patch(f"/fhir/Task/{stored['id']}", headers={"Content-Type": media},
                            content='[{"op": "replace", "path": "/status", "value": "failed"}]')

    assert_outcome(response, 415, "not-supported", "application/json-patch+json")
    assert_unchanged(client, stored)


def test_patch_of_unknown_resource_returns_404(client: TestClient) -> None:
    response = send(client, {"id": "missing"}, [{"op": "remove", "path": "/description"}])

    assert_outcome(response, 404, "not-found", "Task/missing is not known")
    assert client.get("/fhir/Task/missing").status_code == 404


def test_patch_of_deleted_resource_returns_410(client: TestClient,
                                               stored: dict[str, Any]) -> None:
    client.delete(f"/fhir/Task/{stored['id']}")

    response = send(client, stored, [{"op": "remove", "path": "/description"}])

    assert_outcome(response, 410, "deleted", f"Task/{stored['id']} was deleted")


# -- If-Match ----------------------------------------------------------------------------------
@pytest.mark.parametrize("etag", ['W/"1"', '"1"', "1"])
def test_patch_with_matching_if_match_applies(client: TestClient, stored: dict[str, Any],
                                              etag: str) -> None:
    response = send(client, stored, [{"op": "remove", "path": "/description"}],
                    {"If-Match": etag})

    assert response.status_code == 200
    assert response.headers["etag"] == 'W/"2"'


def test_patch_with_stale_if_match_returns_412_and_changes_nothing(
        client: TestClient, stored: dict[str, Any]) -> None:
    response = send(client, stored, [{"op": "remove", "path": "/description"}],
                    {"If-Match": 'W/"3"'})

    assert_outcome(response, 412, "conflict", "Version 3 is not the current version")
    assert_unchanged(client, stored)


def test_patch_with_prefer_minimal_returns_no_body(client: TestClient,
                                                   stored: dict[str, Any]) -> None:
    response = send(client, stored, [{"op": "remove", "path": "/description"}],
                    {"Prefer": "return=minimal"})

    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["etag"] == 'W/"2"'


# -- conditional patch --------------------------------------------------------------------------
def test_conditional_patch_with_one_match_patches_it(client: TestClient,
                                                     stored: dict[str, Any]) -> None:
    response = client.patch(f"/fhir/Task?identifier={SYSTEM}|P1", headers=PATCH,
                            content='[{"op": "replace", "path": "/status", "value": "failed"}]')

    assert response.status_code == 200, response.text
    assert response.json()["id"] == stored["id"]
    assert current(client, stored)["status"] == "failed"


def test_conditional_patch_without_a_match_returns_404(client: TestClient,
                                                       stored: dict[str, Any]) -> None:
    response = client.patch(f"/fhir/Task?identifier={SYSTEM}|nope", headers=PATCH,
                            content='[{"op": "replace", "path": "/status", "value": "failed"}]')

    assert_outcome(response, 404, "not-found", "No Task matches")
    assert_unchanged(client, stored)


def test_conditional_patch_with_several_matches_returns_412(client: TestClient,
                                                            stored: dict[str, Any]) -> None:
    twin = client.post("/fhir/Task", json=task(identifier=identifier(SYSTEM, "P1")),
                       headers=FHIR).json()

    response = client.patch(f"/fhir/Task?identifier={SYSTEM}|P1", headers=PATCH,
                            content='[{"op": "replace", "path": "/status", "value": "failed"}]')

    assert_outcome(response, 412, "multiple-matches", "matched several Task")
    assert_unchanged(client, stored)
    assert current(client, twin) == twin


def test_conditional_patch_respects_if_match(client: TestClient,
                                             stored: dict[str, Any]) -> None:
    response = client.patch(f"/fhir/Task?identifier={SYSTEM}|P1",
                            headers={**PATCH, "If-Match": 'W/"9"'},
                            content='[{"op": "replace", "path": "/status", "value": "failed"}]')

    assert_outcome(response, 412, "conflict", stored["id"])
    assert_unchanged(client, stored)


def test_conditional_patch_without_criteria_returns_400(client: TestClient,
                                                        stored: dict[str, Any]) -> None:
    response = client.patch("/fhir/Task", headers=PATCH,
                            content='[{"op": "replace", "path": "/status", "value": "failed"}]')

    assert_outcome(response, 400, "invalid", "needs search criteria")
    assert_unchanged(client, stored)
