"""Hostile and broken requests: each gets a clean 4xx OperationOutcome, never a 500, a stack
trace or FastAPI's {"detail": ...}, and nothing reaches the store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from tests.factories import assert_outcome, task

FHIR = {"Content-Type": "application/fhir+json"}
VALID = json.dumps(task())


def assert_clean(response: Response) -> None:
    """No server error, no Python internals, no framework error shape."""
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text
    assert "File \"" not in response.text
    if response.content:
        assert "detail" not in response.json(), response.text


def assert_nothing_stored(client: TestClient) -> None:
    history = client.get("/fhir/_history").json()
    assert history.get("entry", []) == [], history


def post(client: TestClient, body: bytes | str, path: str = "/fhir/Task") -> Response:
    response = client.post(path, content=body, headers=FHIR)
    assert_clean(response)
    return response


def with_field(name: str, raw: str) -> str:
    """A valid Task with one more property written verbatim (to send what json.dumps won't)."""
    return VALID[:-1] + f', "{name}": {raw}}}'


# -- JSON that is not acceptable ------------------------------------------------------------------
@pytest.mark.parametrize(("body", "diagnostics"), [
    (b"{", "Malformed JSON at line 1 column 2"),
    (b'{"resourceType": "Task",}', "Malformed JSON"),
    (b"{'resourceType': 'Task'}", "Malformed JSON"),
    (VALID.encode() + b" trailing", "Extra data"),
    (with_field("description", "NaN").encode(), "NaN is not a valid JSON number"),
    (with_field("description", "Infinity").encode(), "Infinity is not a valid JSON number"),
    (with_field("description", "-Infinity").encode(), "-Infinity is not a valid JSON number"),
    (with_field("description", "1e999").encode(), "Number out of range"),
    (with_field("description", "1e-999").encode(), "Number out of range"),
    (with_field("description", "1" * 400).encode(), "Number out of range"),
    (with_field("description", "-" + "9" * 400).encode(), "Number out of range"),
    (with_field("description", "9223372036854775808").encode(), "Number out of range"),
    (with_field("description", "0." + "1" * 400).encode(), "Number too long"),
    (with_field("status", '"ready"').encode(), "Duplicate JSON property 'status'"),
    (b'{"resourceType": "Task", "resourceType": "Patient"}',
     "Duplicate JSON property 'resourceType'"),
    (with_field("description", '"caf\xe9"').encode("latin-1"), "not valid UTF-8"),
    (b"\xff\xfe{\x00}\x00", "not valid UTF-8"),
    (with_field("description", '"nul \\u0000 inside"').encode(), "U+0000"),
    (with_field("description", '"bell \\u0007"').encode(), "U+0007"),
    (with_field("description", '"half a pair \\ud800"').encode(), "U+D800"),
    (("[" * 10_000 + "]" * 10_000).encode(), "Malformed JSON: nesting"),
    (('{"a":' * 10_000 + "1" + "}" * 10_000).encode(), "Malformed JSON: nesting"),
    (with_field("extension", "[" * 70 + "]" * 70).encode(), "nested deeper than 64"),
])
def test_create_with_unacceptable_json_returns_400(client: TestClient, body: bytes,
                                                   diagnostics: str) -> None:
    assert_outcome(post(client, body), 400, "invalid", diagnostics)
    assert_nothing_stored(client)


def test_create_with_a_byte_order_mark_is_accepted(client: TestClient) -> None:
    response = post(client, "\ufeff".encode() + VALID.encode())

    assert response.status_code == 201


def test_create_with_empty_body_returns_400(client: TestClient) -> None:
    assert_outcome(post(client, b""), 400, "invalid", "The request has no body")
    assert_nothing_stored(client)


@pytest.mark.parametrize("body", [b"[]", b'[{"resourceType": "Task"}]', b'"Task"', b"42",
                                  b"null", b"true", b'{"resourceType": 5}'])
def test_create_with_non_object_or_untyped_body_returns_400(client: TestClient,
                                                            body: bytes) -> None:
    assert_outcome(post(client, body), 400, "structure", "JSON object with a resourceType",
                   expression="resourceType")
    assert_nothing_stored(client)


def test_create_without_resource_type_returns_400_required(client: TestClient) -> None:
    body = json.dumps({k: v for k, v in task().items() if k != "resourceType"})

    assert_outcome(post(client, body), 400, "required", "resourceType",
                   expression="resourceType")
    assert_nothing_stored(client)


# -- resource types and ids ------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/fhir/Foo", "/fhir/task", "/fhir/DomainResource",
                                  "/fhir/Resource"])
def test_create_at_unknown_type_url_returns_404(client: TestClient, path: str) -> None:
    assert_outcome(post(client, VALID, path), 404, "not-found", "Unknown resource type")
    assert_nothing_stored(client)


def test_read_of_unknown_type_returns_404(client: TestClient) -> None:
    response = client.get("/fhir/Foo/1")

    assert_clean(response)
    assert_outcome(response, 404, "not-found", "Unknown resource type 'Foo'")


@pytest.mark.parametrize(("body_type", "url_type"), [("Foo", "Task"), ("Patient", "Task"),
                                                     ("Task", "Patient")])
def test_create_with_body_type_other_than_url_type_returns_400(
        client: TestClient, body_type: str, url_type: str) -> None:
    body = json.dumps({**task(), "resourceType": body_type})

    assert_outcome(post(client, body, f"/fhir/{url_type}"), 400, "invalid",
                   f"The body is a {body_type} but the URL is for {url_type}",
                   expression="resourceType")
    assert_nothing_stored(client)


def test_update_with_body_id_other_than_url_id_returns_400(client: TestClient) -> None:
    response = client.put("/fhir/Task/one", json=task(id="two"), headers=FHIR)

    assert_clean(response)
    assert_outcome(response, 400, "invalid", "The body's id 'two' differs from 'one'",
                   expression="Task.id")
    assert_nothing_stored(client)


def test_update_without_body_id_returns_400(client: TestClient) -> None:
    response = client.put("/fhir/Task/one", json=task(), headers=FHIR)

    assert_clean(response)
    assert_outcome(response, 400, "required", "The body has no id", expression="Task.id")
    assert_nothing_stored(client)


@pytest.mark.parametrize("resource_id", ["a_b", "a b", "caf%C3%A9", "a!", "x" * 65, "a%2Cb"])
def test_update_with_invalid_id_returns_400(client: TestClient, resource_id: str) -> None:
    response = client.put(f"/fhir/Task/{resource_id}", json=task(id=resource_id),
                          headers=FHIR)

    assert_clean(response)
    assert_outcome(response, 400, "invalid", "is not a valid id")
    assert_nothing_stored(client)


def test_update_with_non_string_id_returns_400(client: TestClient) -> None:
    response = client.put("/fhir/Task/5", content=VALID[:-1] + ', "id": 5}', headers=FHIR)

    assert_clean(response)
    assert_outcome(response, 400, "invalid", expression="Task.id")
    assert_nothing_stored(client)


@pytest.mark.parametrize("path", ["/fhir/Task/%00", "/fhir/Task/" + "x" * 5000,
                                  "/fhir/Task/a_b", "/fhir/Task/%00/_history",
                                  "/fhir/Task/%00/_history/1", "/fhir/Task/ok/_history/1%00",
                                  "/fhir/Task/ok/_history/99999999999",
                                  "/fhir/Task/ok/_history/%C2%B2",
                                  "/fhir/Task/ok/_history/%EF%BC%91"])
def test_read_of_impossible_id_or_version_returns_404(client: TestClient, path: str) -> None:
    response = client.get(path)

    assert_clean(response)
    body = assert_outcome(response, 404, "not-found")
    assert len(body["issue"][0]["diagnostics"]) < 200


def test_delete_of_impossible_id_returns_404_and_writes_nothing(client: TestClient) -> None:
    response = client.delete("/fhir/Task/%00")

    assert_clean(response)
    assert_outcome(response, 404, "not-found", "not a valid id")
    assert_nothing_stored(client)


# -- invalid resources -------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "code", "expression", "diagnostics"), [
    ({"status": "bogus"}, "code-invalid", "Task.status", "'bogus' is not one of"),
    ({"intent": "whenever"}, "code-invalid", "Task.intent", "'whenever' is not one of"),
    ({"foo": 1}, "invalid", "Task.foo", "Extra inputs are not permitted"),
    ({"authoredOn": 123}, "invalid", "Task.authoredOn", "Expected a JSON string"),
    ({"authoredOn": "2024-02-30"}, "invalid", "Task.authoredOn", ""),
    ({"authoredOn": "yesterday"}, "invalid", "Task.authoredOn", ""),
    ({"description": 7}, "invalid", "Task.description", ""),
    ({"description": ""}, "invalid", "Task.description", ""),
    ({"note": {"text": "not a list"}}, "invalid", "Task.note", ""),
    ({"note": [{"text": "kept"}, None]}, "invalid", "Task.note",
     "None is not allowed as an element of note"),
    ({"code": {"coding": [None]}}, "invalid", "Task.code.coding",
     "None is not allowed as an element of coding"),
    ({"input": [{"type": {"text": "dose"}, "valueBoolean": "true"}]}, "invalid",
     "Task.input[0].valueBoolean", "Expected a JSON boolean"),
    ({"input": [{"type": {"text": "dose"}, "valueInteger": "5"}]}, "invalid",
     "Task.input[0].valueInteger", "Expected a JSON integer"),
    ({"input": [{"type": {"text": "dose"}, "valueDecimal": "1.5"}]}, "invalid",
     "Task.input[0].valueDecimal", "Expected a JSON number"),
    ({"input": [{"type": {"text": "dose"}, "valueInteger": True}]}, "invalid",
     "Task.input[0].valueInteger", "Expected a JSON integer"),
    ({"meta": {"lastUpdated": 0}}, "invalid", "Task.meta.lastUpdated",
     "Expected a JSON string"),
    ({"contained": [{"resourceType": "Patient", "active": "yes"}]}, "invalid",
     "Task.contained[0].active", "Expected a JSON boolean"),
])
def test_create_of_invalid_task_returns_400_naming_the_element(
        client: TestClient, fields: dict[str, Any], code: str, expression: str,
        diagnostics: str) -> None:
    body = assert_outcome(post(client, json.dumps(task(**fields))), 400, code, diagnostics,
                          expression=expression)
    assert all(issue["severity"] == "error" for issue in body["issue"])
    assert_nothing_stored(client)


def test_create_missing_required_elements_lists_each(client: TestClient) -> None:
    body = {"resourceType": "Task"}

    outcome = assert_outcome(post(client, json.dumps(body)), 400, "invalid")

    expressions = {e for issue in outcome["issue"] for e in issue["expression"]}
    assert {"Task.status", "Task.intent"} <= expressions


def test_update_with_invalid_resource_keeps_the_current_version(client: TestClient) -> None:
    created = client.post("/fhir/Task", json=task(), headers=FHIR).json()

    response = client.put(f"/fhir/Task/{created['id']}",
                          json=task(id=created["id"], status="bogus"), headers=FHIR)

    assert_clean(response)
    assert_outcome(response, 400, "code-invalid", expression="Task.status")
    assert client.get(f"/fhir/Task/{created['id']}").json() == created


# -- size, media, routes ---------------------------------------------------------------------------
def test_create_over_the_size_limit_returns_413(client: TestClient) -> None:
    body = with_field("description", json.dumps("x" * 1_000_001))

    response = post(client, body)

    assert_outcome(response, 413, "too-costly", "exceeds the limit of 1000000")
    assert_nothing_stored(client)


def test_streamed_create_over_the_size_limit_returns_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield VALID[:-1].encode() + b', "description": "'
        for _ in range(20):
            yield b"x" * 100_000
        yield b'"}'

    response = client.post("/fhir/Task", content=chunks(), headers=FHIR)

    assert "content-length" not in response.request.headers
    assert_clean(response)
    assert_outcome(response, 413, "too-costly", "exceeds the limit of 1000000 bytes")
    assert_nothing_stored(client)


def test_create_just_under_the_size_limit_is_accepted(client: TestClient) -> None:
    padding = 1_000_000 - len(with_field("description", '""'))
    body = with_field("description", json.dumps("x" * padding))
    assert len(body) == 1_000_000

    assert post(client, body).status_code == 201


@pytest.mark.parametrize("media", ["text/plain", "application/xml", "multipart/form-data"])
def test_create_with_unsupported_media_type_returns_415(client: TestClient,
                                                        media: str) -> None:
    response = client.post("/fhir/Task", content=VALID, headers={"Content-Type": media})

    assert_clean(response)
    assert_outcome(response, 415, "not-supported", f"Content-Type {media} is not supported")
    assert_nothing_stored(client)


@pytest.mark.parametrize("path", ["/nope", "/fhir/Task/1/_history/1/extra",
                                  "/fhir/Task/1/whatever", "/fhir/Task/1/_history/1/2/3"])
def test_unknown_route_returns_404_outcome(client: TestClient, path: str) -> None:
    response = client.get(path)

    assert_clean(response)
    assert_outcome(response, 404, "not-found")


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("DELETE", "/fhir/metadata", "GET"),
    ("POST", "/fhir/Task/1", "DELETE, GET, PATCH, PUT"),
    ("PUT", "/fhir/Task/1/_history", "GET"),
    ("DELETE", "/fhir/Task/1/_history/1", "GET"),
    ("PATCH", "/fhir/_history", "GET"),
    ("PUT", "/fhir", "GET, POST"),
])
def test_wrong_method_returns_405_with_allow(client: TestClient, method: str, path: str,
                                             allowed: str) -> None:
    response = client.request(method, path, content=VALID, headers=FHIR)

    assert_clean(response)
    assert_outcome(response, 405, "not-supported", f"{method} is not allowed")
    assert response.headers["allow"] == allowed
    assert_nothing_stored(client)


def test_malformed_if_match_on_update_returns_400(client: TestClient) -> None:
    response = client.put("/fhir/Task/one", json=task(id="one"),
                          headers={**FHIR, "If-Match": "banana"})

    assert_clean(response)
    assert_outcome(response, 400, "invalid", "Malformed ETag")
    assert_nothing_stored(client)


def test_conditional_create_with_control_characters_in_criteria_returns_400(
        client: TestClient) -> None:
    response = client.post("/fhir/Task", content=VALID,
                           headers={**FHIR, "If-None-Exist": "identifier=a%00b"})

    assert_clean(response)
    assert_outcome(response, 400, "invalid", "U+0000")
    assert_nothing_stored(client)


def test_update_with_non_ascii_digit_if_match_returns_400(client: TestClient) -> None:
    response = client.put("/fhir/Task/one", json=task(id="one"),
                          headers=[("Content-Type", "application/fhir+json"),
                                   ("If-Match", b"\xb2")])

    assert_clean(response)
    assert_outcome(response, 400, "invalid", "Malformed ETag")
    assert_nothing_stored(client)
