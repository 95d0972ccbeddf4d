"""Conditional create (If-None-Exist), update, and delete: what zero, one and several
matches do (https://hl7.org/fhir/R4/http.html#ccreate, #cond-update, #cdelete)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.factories import assert_outcome, identifier, task

FHIR = {"Content-Type": "application/fhir+json"}
SYSTEM = "urn:example:order"


def ordered(value: str, **fields: Any) -> dict[str, Any]:
    return task(identifier=identifier(SYSTEM, value), **fields)


def stored(client: TestClient, value: str, **fields: Any) -> dict[str, Any]:
    response = client.post("/fhir/Task", json=ordered(value, **fields), headers=FHIR)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def matches(client: TestClient, value: str) -> list[dict[str, Any]]:
    bundle = client.get(f"/fhir/Task?identifier={SYSTEM}|{value}").json()
    return [e["resource"] for e in bundle.get("entry", [])]


def task_count(client: TestClient) -> int:
    return int(client.get("/fhir/Task?_summary=count").json()["total"])


# -- conditional create ----------------------------------------------------------------------
def test_conditional_create_without_a_match_creates(client: TestClient) -> None:
    response = client.post("/fhir/Task", json=ordered("A1"),
                           headers={**FHIR, "If-None-Exist": f"identifier={SYSTEM}|A1"})

    assert response.status_code == 201
    assert response.headers["etag"] == 'W/"1"'
    assert [r["id"] for r in matches(client, "A1")] == [response.json()["id"]]


def test_conditional_create_with_one_match_returns_200_and_the_existing_resource(
        client: TestClient) -> None:
    existing = stored(client, "A1", description="original")

    response = client.post("/fhir/Task", json=ordered("A1", description="duplicate"),
                           headers={**FHIR, "If-None-Exist": f"identifier={SYSTEM}|A1"})

    assert response.status_code == 200
    assert response.json() == existing
    assert response.headers["etag"] == 'W/"1"'
    assert response.headers["location"].endswith(f"/Task/{existing['id']}/_history/1")
    assert task_count(client) == 1


def test_conditional_create_with_several_matches_returns_412_and_creates_nothing(
        client: TestClient) -> None:
    stored(client, "A1")
    stored(client, "A1")

    response = client.post("/fhir/Task", json=ordered("A1"),
                           headers={**FHIR, "If-None-Exist": f"identifier={SYSTEM}|A1"})

    assert_outcome(response, 412, "multiple-matches", "matched several Task")
    assert task_count(client) == 2


def test_conditional_create_accepts_criteria_written_as_a_search_url(
        client: TestClient) -> None:
    existing = stored(client, "A1")

    response = client.post("/fhir/Task", json=ordered("A1"),
                           headers={**FHIR, "If-None-Exist": f"Task?identifier={SYSTEM}|A1"})

    assert response.status_code == 200
    assert response.json()["id"] == existing["id"]


def test_conditional_create_combines_criteria_with_and(client: TestClient) -> None:
    stored(client, "A1", status="ready")

    response = client.post(
        "/fhir/Task", json=ordered("A1", status="requested"),
        headers={**FHIR, "If-None-Exist": f"identifier={SYSTEM}|A1&status=requested"})

    assert response.status_code == 201
    assert len(matches(client, "A1")) == 2


def test_conditional_create_after_the_match_was_deleted_creates_again(
        client: TestClient) -> None:
    headers = {**FHIR, "If-None-Exist": f"identifier={SYSTEM}|A1"}
    first = client.post("/fhir/Task", json=ordered("A1"), headers=headers).json()
    client.delete(f"/fhir/Task/{first['id']}")

    second = client.post("/fhir/Task", json=ordered("A1"), headers=headers)

    assert second.status_code == 201
    assert second.json()["id"] != first["id"]
    again = client.post("/fhir/Task", json=ordered("A1"), headers=headers)
    assert (again.status_code, again.json()["id"]) == (200, second.json()["id"])


@pytest.mark.parametrize("criteria", ["", "  ", "_count=1", "_summary=true&_format=json"])
def test_conditional_create_without_selecting_criteria_returns_400(
        client: TestClient, criteria: str) -> None:
    stored(client, "A1")

    response = client.post("/fhir/Task", json=ordered("A2"),
                           headers={**FHIR, "If-None-Exist": criteria})

    assert_outcome(response, 400, "invalid", "needs search criteria")
    assert task_count(client) == 1


def test_conditional_create_with_unknown_parameter_returns_400(client: TestClient) -> None:
    response = client.post("/fhir/Task", json=ordered("A1"),
                           headers={**FHIR, "If-None-Exist": "colour=blue"})

    assert_outcome(response, 400, "invalid", "colour")
    assert task_count(client) == 0


def test_conditional_create_with_invalid_body_returns_400_even_when_a_match_exists(
        client: TestClient) -> None:
    stored(client, "A1")

    response = client.post("/fhir/Task", json=ordered("A1", status="bogus"),
                           headers={**FHIR, "If-None-Exist": f"identifier={SYSTEM}|A1"})

    assert_outcome(response, 400, "code-invalid", expression="Task.status")


# -- conditional update -----------------------------------------------------------------------
def test_conditional_update_without_a_match_creates(client: TestClient) -> None:
    response = client.put(f"/fhir/Task?identifier={SYSTEM}|U1", json=ordered("U1"),
                          headers=FHIR)

    assert response.status_code == 201
    body = response.json()
    assert body["meta"]["versionId"] == "1"
    assert [r["id"] for r in matches(client, "U1")] == [body["id"]]


def test_conditional_update_without_a_match_uses_the_body_id(client: TestClient) -> None:
    response = client.put(f"/fhir/Task?identifier={SYSTEM}|U1",
                          json=ordered("U1", id="chosen-id"), headers=FHIR)

    assert response.status_code == 201
    assert response.json()["id"] == "chosen-id"
    assert client.get("/fhir/Task/chosen-id").status_code == 200


def test_conditional_update_with_one_match_updates_it(client: TestClient) -> None:
    existing = stored(client, "U1")

    response = client.put(f"/fhir/Task?identifier={SYSTEM}|U1",
                          json=ordered("U1", status="in-progress"), headers=FHIR)

    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["meta"]["versionId"]) == (existing["id"], "2")
    assert body["status"] == "in-progress"
    assert client.get(f"/fhir/Task/{existing['id']}").json() == body
    assert task_count(client) == 1


def test_conditional_update_with_one_match_and_other_body_id_returns_400(
        client: TestClient) -> None:
    existing = stored(client, "U1")

    response = client.put(f"/fhir/Task?identifier={SYSTEM}|U1",
                          json=ordered("U1", id="someone-else"), headers=FHIR)

    assert_outcome(response, 400, "invalid", "differs from", expression="Task.id")
    assert client.get(f"/fhir/Task/{existing['id']}").headers["etag"] == 'W/"1"'


def test_conditional_update_with_several_matches_returns_412_and_changes_nothing(
        client: TestClient) -> None:
    first, second = stored(client, "U1"), stored(client, "U1")

    response = client.put(f"/fhir/Task?identifier={SYSTEM}|U1",
                          json=ordered("U1", status="failed"), headers=FHIR)

    assert_outcome(response, 412, "multiple-matches", "matched several Task")
    for original in (first, second):
        assert client.get(f"/fhir/Task/{original['id']}").json() == original


def test_conditional_update_respects_if_match(client: TestClient) -> None:
    existing = stored(client, "U1")
    url = f"/fhir/Task?identifier={SYSTEM}|U1"

    stale = client.put(url, json=ordered("U1"), headers={**FHIR, "If-Match": 'W/"2"'})
    fresh = client.put(url, json=ordered("U1"), headers={**FHIR, "If-Match": 'W/"1"'})

    assert_outcome(stale, 412, "conflict", existing["id"])
    assert fresh.status_code == 200
    assert fresh.json()["meta"]["versionId"] == "2"


def test_conditional_update_without_criteria_returns_400(client: TestClient) -> None:
    stored(client, "U1")

    response = client.put("/fhir/Task", json=ordered("U1"), headers=FHIR)

    assert_outcome(response, 400, "invalid", "needs search criteria")
    assert task_count(client) == 1


# -- conditional delete ------------------------------------------------------------------------
def test_conditional_delete_with_one_match_deletes_it(client: TestClient) -> None:
    doomed, kept = stored(client, "D1"), stored(client, "D2")

    response = client.delete(f"/fhir/Task?identifier={SYSTEM}|D1")

    assert response.status_code == 200
    assert f"Deleted Task/{doomed['id']}" in response.json()["issue"][0]["diagnostics"]
    assert response.headers["etag"] == 'W/"2"'
    assert_outcome(client.get(f"/fhir/Task/{doomed['id']}"), 410, "deleted")
    assert client.get(f"/fhir/Task/{kept['id']}").status_code == 200


def test_conditional_delete_with_several_matches_returns_412_and_deletes_none(
        client: TestClient) -> None:
    stored(client, "D1")
    stored(client, "D1")

    response = client.delete(f"/fhir/Task?identifier={SYSTEM}|D1")

    assert_outcome(response, 412, "multiple-matches", "delete one at a time")
    assert len(matches(client, "D1")) == 2


def test_conditional_delete_without_a_match_returns_200(client: TestClient) -> None:
    kept = stored(client, "D1")

    response = client.delete(f"/fhir/Task?identifier={SYSTEM}|nothing")

    assert response.status_code == 200
    body = response.json()
    assert body["issue"][0]["severity"] == "information"
    assert "nothing deleted" in body["issue"][0]["diagnostics"]
    assert client.get(f"/fhir/Task/{kept['id']}").status_code == 200


@pytest.mark.parametrize("query", ["", "?_count=1", "?_sort=-_lastUpdated"])
def test_conditional_delete_without_selecting_criteria_deletes_nothing(
        client: TestClient, query: str) -> None:
    kept = stored(client, "D1")

    response = client.delete(f"/fhir/Task{query}")

    assert_outcome(response, 400, "invalid", "needs search criteria")
    assert client.get(f"/fhir/Task/{kept['id']}").status_code == 200


def test_conditional_delete_with_unknown_parameter_deletes_nothing(
        client: TestClient) -> None:
    kept = stored(client, "D1")

    assert_outcome(client.delete("/fhir/Task?colour=blue"), 400, "invalid", "colour")
    assert client.get(f"/fhir/Task/{kept['id']}").status_code == 200
