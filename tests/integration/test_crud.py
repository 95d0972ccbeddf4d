"""Create, read, vread, update and delete of one resource over HTTP, with the headers that
go with them (https://hl7.org/fhir/R4/http.html), on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from tests.factories import assert_outcome, task

FHIR = {"Content-Type": "application/fhir+json"}
BASE = "http://testserver/fhir"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
INSTANT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def create(client: TestClient, body: dict[str, Any] | None = None) -> Response:
    response = client.post("/fhir/Task", json=body or task(), headers=FHIR)
    assert response.status_code == 201, response.text
    return response


def put(client: TestClient, resource_id: str, headers: dict[str, str] | None = None,
        **fields: Any) -> Response:
    return client.put(f"/fhir/Task/{resource_id}", json=task(id=resource_id, **fields),
                      headers={**FHIR, **(headers or {})})


def history_etags(client: TestClient, resource_id: str) -> list[str]:
    bundle = client.get(f"/fhir/Task/{resource_id}/_history").json()
    return [e["response"]["etag"] for e in bundle["entry"]]


# -- create ------------------------------------------------------------------------------
def test_create_returns_201_with_versioned_location_and_stored_resource(
        client: TestClient) -> None:
    response = client.post("/fhir/Task", json=task(description="collect cells"), headers=FHIR)

    assert response.status_code == 201
    body = response.json()
    assert UUID.match(body["id"])
    assert response.headers["location"] == f"{BASE}/Task/{body['id']}/_history/1"
    assert response.headers["etag"] == 'W/"1"'
    assert response.headers["content-type"] == "application/fhir+json; charset=utf-8"
    assert body["meta"]["versionId"] == "1"
    assert INSTANT.match(body["meta"]["lastUpdated"])
    modified = parsedate_to_datetime(response.headers["last-modified"])
    stamped = datetime.fromisoformat(body["meta"]["lastUpdated"].replace("Z", "+00:00"))
    assert modified == stamped.replace(microsecond=0)
    assert {k: v for k, v in body.items() if k not in ("id", "meta")} == task(
        description="collect cells")


def test_create_ignores_the_id_the_client_put_in_the_body(client: TestClient) -> None:
    body = create(client, task(id="chosen-by-client")).json()

    assert body["id"] != "chosen-by-client"
    assert client.get("/fhir/Task/chosen-by-client").status_code == 404
    assert client.get(f"/fhir/Task/{body['id']}").status_code == 200


def test_create_replaces_client_meta_version_and_time_but_keeps_its_tags(
        client: TestClient) -> None:
    tag = {"system": "urn:example:tag", "code": "trial"}
    meta = {"versionId": "99", "lastUpdated": "2001-01-01T00:00:00Z", "tag": [tag]}

    body = create(client, task(meta=meta)).json()

    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"] != "2001-01-01T00:00:00Z"
    assert body["meta"]["tag"] == [tag]


# -- read / vread ------------------------------------------------------------------------------
def test_read_returns_the_stored_resource_with_etag_and_last_modified(
        client: TestClient) -> None:
    created = create(client)

    read = client.get(f"/fhir/Task/{created.json()['id']}")

    assert read.status_code == 200
    assert read.json() == created.json()
    assert read.headers["etag"] == 'W/"1"'
    assert read.headers["last-modified"] == created.headers["last-modified"]
    assert read.headers["content-type"] == "application/fhir+json; charset=utf-8"


def test_read_unknown_resource_returns_404_outcome(client: TestClient) -> None:
    assert_outcome(client.get("/fhir/Task/no-such-task"), 404, "not-found",
                   "Task/no-such-task is not known")


def test_vread_returns_each_version_as_it_was(client: TestClient) -> None:
    resource_id = create(client, task(description="first")).json()["id"]
    put(client, resource_id, description="second")

    first = client.get(f"/fhir/Task/{resource_id}/_history/1")
    second = client.get(f"/fhir/Task/{resource_id}/_history/2")

    assert (first.status_code, second.status_code) == (200, 200)
    assert first.json()["description"] == "first"
    assert second.json()["description"] == "second"
    assert (first.headers["etag"], second.headers["etag"]) == ('W/"1"', 'W/"2"')
    assert first.json()["meta"]["versionId"] == "1"


@pytest.mark.parametrize("version", ["3", "0", "abc", "-1"])
def test_vread_unknown_version_returns_404_outcome(client: TestClient, version: str) -> None:
    resource_id = create(client).json()["id"]

    assert_outcome(client.get(f"/fhir/Task/{resource_id}/_history/{version}"), 404,
                   "not-found", f"Task/{resource_id}")


# -- update --------------------------------------------------------------------------------
def test_update_returns_200_with_version_2(client: TestClient) -> None:
    created = create(client).json()

    response = put(client, created["id"], status="in-progress")

    assert response.status_code == 200
    body = response.json()
    assert body["meta"]["versionId"] == "2"
    assert body["status"] == "in-progress"
    assert response.headers["etag"] == 'W/"2"'
    assert response.headers["location"] == f"{BASE}/Task/{created['id']}/_history/2"
    assert client.get(f"/fhir/Task/{created['id']}").json() == body


def test_update_of_unknown_id_creates_it_with_201(client: TestClient) -> None:
    response = put(client, "client-chosen-1")

    assert response.status_code == 201
    assert response.json()["id"] == "client-chosen-1"
    assert response.json()["meta"]["versionId"] == "1"
    assert response.headers["location"] == f"{BASE}/Task/client-chosen-1/_history/1"
    assert client.get("/fhir/Task/client-chosen-1").status_code == 200


def test_update_keeps_no_trace_of_elements_the_new_version_drops(client: TestClient) -> None:
    created = create(client, task(description="to be dropped")).json()

    body = put(client, created["id"]).json()

    assert "description" not in body
    assert client.get(f"/fhir/Task/{created['id']}/_history/1").json()["description"] == \
        "to be dropped"


# -- delete --------------------------------------------------------------------------------
def test_delete_then_read_returns_410_with_deleted_outcome(client: TestClient) -> None:
    resource_id = create(client).json()["id"]

    deleted = client.delete(f"/fhir/Task/{resource_id}")

    assert deleted.status_code == 200
    assert deleted.headers["etag"] == 'W/"2"'
    assert deleted.json()["resourceType"] == "OperationOutcome"
    assert f"Deleted Task/{resource_id}" in deleted.json()["issue"][0]["diagnostics"]
    gone = client.get(f"/fhir/Task/{resource_id}")
    assert_outcome(gone, 410, "deleted", f"Task/{resource_id} was deleted")
    assert gone.headers["etag"] == 'W/"2"'


def test_delete_keeps_old_versions_readable_and_in_history(client: TestClient) -> None:
    created = create(client).json()
    client.delete(f"/fhir/Task/{created['id']}")

    old = client.get(f"/fhir/Task/{created['id']}/_history/1")

    assert old.status_code == 200
    assert old.json() == created
    bundle = client.get(f"/fhir/Task/{created['id']}/_history").json()
    assert [e["request"]["method"] for e in bundle["entry"]] == ["DELETE", "POST"]
    assert "resource" not in bundle["entry"][0]
    assert bundle["entry"][1]["resource"] == created
    assert_outcome(client.get(f"/fhir/Task/{created['id']}/_history/2"), 410, "deleted")


def test_delete_twice_is_harmless(client: TestClient) -> None:
    resource_id = create(client).json()["id"]
    client.delete(f"/fhir/Task/{resource_id}")

    again = client.delete(f"/fhir/Task/{resource_id}")

    assert again.status_code == 200
    assert again.json()["resourceType"] == "OperationOutcome"
    assert history_etags(client, resource_id) == ['W/"2"', 'W/"1"']


def test_delete_of_unknown_resource_returns_200(client: TestClient) -> None:
    response = client.delete("/fhir/Task/never-existed")

    assert response.status_code == 200
    assert response.json()["issue"][0]["severity"] == "information"
    assert client.get("/fhir/Task/never-existed").status_code == 404


def test_update_after_delete_recreates_with_the_next_version(client: TestClient) -> None:
    resource_id = create(client).json()["id"]
    client.delete(f"/fhir/Task/{resource_id}")

    response = put(client, resource_id, status="requested")

    assert response.status_code == 201
    assert response.json()["meta"]["versionId"] == "3"
    assert response.headers["location"] == f"{BASE}/Task/{resource_id}/_history/3"
    assert client.get(f"/fhir/Task/{resource_id}").json()["status"] == "requested"
    assert history_etags(client, resource_id) == ['W/"3"', 'W/"2"', 'W/"1"']


def test_delete_with_stale_if_match_returns_412_and_keeps_the_resource(
        client: TestClient) -> None:
    resource_id = create(client).json()["id"]
    put(client, resource_id)

    response = client.delete(f"/fhir/Task/{resource_id}", headers={"If-Match": 'W/"1"'})

    assert_outcome(response, 412, "conflict", "Version 1 is not the current version")
    assert client.get(f"/fhir/Task/{resource_id}").status_code == 200
    ok = client.delete(f"/fhir/Task/{resource_id}", headers={"If-Match": 'W/"2"'})
    assert ok.status_code == 200


# -- If-Match ------------------------------------------------------------------------------
@pytest.mark.parametrize("etag", ['W/"1"', '"1"', "1", ' W/"1" '])
def test_update_with_matching_if_match_returns_200(client: TestClient, etag: str) -> None:
    resource_id = create(client).json()["id"]

    response = put(client, resource_id, {"If-Match": etag})

    assert response.status_code == 200, response.text
    assert response.headers["etag"] == 'W/"2"'


@pytest.mark.parametrize("etag", ['W/"2"', '"0"', "7"])
def test_update_with_stale_if_match_returns_412_and_stores_nothing(
        client: TestClient, etag: str) -> None:
    resource_id = create(client).json()["id"]

    response = put(client, resource_id, {"If-Match": etag}, status="failed")

    assert_outcome(response, 412, "conflict", f"Task/{resource_id}")
    assert client.get(f"/fhir/Task/{resource_id}").json()["status"] == "ready"
    assert history_etags(client, resource_id) == ['W/"1"']


def test_update_with_if_match_on_unknown_id_returns_412(client: TestClient) -> None:
    response = put(client, "not-there", {"If-Match": 'W/"1"'})

    assert_outcome(response, 412, "conflict", "Task/not-there does not exist")
    assert client.get("/fhir/Task/not-there").status_code == 404


def test_update_with_malformed_if_match_returns_400(client: TestClient) -> None:
    resource_id = create(client).json()["id"]

    assert_outcome(put(client, resource_id, {"If-Match": "W/\"abc\""}), 400, "invalid",
                   "Malformed ETag")


# -- conditional read ---------------------------------------------------------------------------
@pytest.mark.parametrize("header", ['W/"1"', '"1"', '"7", W/"1"', "*"])
def test_read_with_matching_if_none_match_returns_304_without_body(
        client: TestClient, header: str) -> None:
    resource_id = create(client).json()["id"]

    response = client.get(f"/fhir/Task/{resource_id}", headers={"If-None-Match": header})

    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == 'W/"1"'
    assert "content-length" not in response.headers  # it would describe the 200's body


def test_read_with_stale_if_none_match_returns_200(client: TestClient) -> None:
    resource_id = create(client).json()["id"]
    put(client, resource_id)

    response = client.get(f"/fhir/Task/{resource_id}", headers={"If-None-Match": 'W/"1"'})

    assert response.status_code == 200
    assert response.json()["meta"]["versionId"] == "2"


def test_read_if_modified_since_last_modified_returns_304(client: TestClient) -> None:
    created = create(client)

    response = client.get(f"/fhir/Task/{created.json()['id']}",
                          headers={"If-Modified-Since": created.headers["last-modified"]})

    assert response.status_code == 304
    assert response.content == b""


def test_read_if_modified_since_earlier_date_returns_200(client: TestClient) -> None:
    created = create(client)
    earlier = parsedate_to_datetime(created.headers["last-modified"]) - timedelta(days=1)

    response = client.get(f"/fhir/Task/{created.json()['id']}",
                          headers={"If-Modified-Since": format_datetime(earlier, usegmt=True)})

    assert response.status_code == 200
    assert response.json() == created.json()


def test_read_if_modified_since_future_date_returns_304(client: TestClient) -> None:
    created = create(client)
    later = datetime.now(UTC) + timedelta(days=1)

    response = client.get(f"/fhir/Task/{created.json()['id']}",
                          headers={"If-Modified-Since": format_datetime(later, usegmt=True)})

    assert response.status_code == 304


def test_read_with_unparseable_if_modified_since_ignores_it(client: TestClient) -> None:
    resource_id = create(client).json()["id"]

    response = client.get(f"/fhir/Task/{resource_id}",
                          headers={"If-Modified-Since": "yesterday-ish"})

    assert response.status_code == 200


# -- Prefer: return= -------------------------------------------------------------------------------
def test_create_with_prefer_minimal_returns_headers_and_no_body(client: TestClient) -> None:
    response = client.post("/fhir/Task", json=task(),
                           headers={**FHIR, "Prefer": "return=minimal"})

    assert response.status_code == 201
    assert response.content == b""
    assert response.headers["etag"] == 'W/"1"'
    assert "last-modified" in response.headers
    location = response.headers["location"]
    assert location.startswith(f"{BASE}/Task/") and location.endswith("/_history/1")
    resource_id = location.split("/")[-3]
    assert client.get(f"/fhir/Task/{resource_id}").status_code == 200


def test_update_with_prefer_operation_outcome_returns_an_outcome(client: TestClient) -> None:
    resource_id = create(client).json()["id"]

    response = put(client, resource_id, {"Prefer": "return=OperationOutcome"})

    assert response.status_code == 200
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "information"
    assert f"Updated Task/{resource_id}" in body["issue"][0]["diagnostics"]
    assert response.headers["etag"] == 'W/"2"'


@pytest.mark.parametrize("prefer", [None, "return=representation", "respond-async"])
def test_create_returns_the_resource_by_default(client: TestClient,
                                                prefer: str | None) -> None:
    headers = {**FHIR, **({"Prefer": prefer} if prefer else {})}

    response = client.post("/fhir/Task", json=task(), headers=headers)

    assert response.status_code == 201
    assert response.json()["resourceType"] == "Task"


# -- media types -------------------------------------------------------------------------------
@pytest.mark.parametrize("media", ["application/fhir+json", "application/json",
                                   "application/json+fhir",
                                   "application/fhir+json; charset=utf-8",
                                   "application/fhir+json;fhirVersion=4.0"])
def test_create_accepts_every_json_media_type(client: TestClient, media: str) -> None:
    response = client.post("/fhir/Task", json=task(), headers={"Content-Type": media})

    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/fhir+json; charset=utf-8"


@pytest.mark.parametrize("media", ["text/plain", "application/xml", "application/fhir+xml",
                                   "application/x-www-form-urlencoded"])
def test_create_with_non_json_body_returns_415(client: TestClient, media: str) -> None:
    response = client.post("/fhir/Task", content=b'{"resourceType":"Task"}',
                           headers={"Content-Type": media})

    assert_outcome(response, 415, "not-supported", media)
    assert client.get("/fhir/Task?_summary=count").json()["total"] == 0


@pytest.mark.parametrize("accept", ["application/xml", "application/fhir+xml", "text/html"])
def test_read_accepting_only_non_json_returns_406(client: TestClient, accept: str) -> None:
    resource_id = create(client).json()["id"]

    response = client.get(f"/fhir/Task/{resource_id}", headers={"Accept": accept})

    assert_outcome(response, 406, "not-supported", accept)


@pytest.mark.parametrize("accept", ["application/fhir+json", "application/json", "*/*",
                                    "application/xml;q=0.9, application/fhir+json;q=0.5"])
def test_read_answers_fhir_json_to_any_accept_allowing_json(client: TestClient,
                                                          accept: str) -> None:
    resource_id = create(client).json()["id"]

    response = client.get(f"/fhir/Task/{resource_id}", headers={"Accept": accept})

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/fhir+json; charset=utf-8"


def test_read_with_format_xml_returns_406(client: TestClient) -> None:
    resource_id = create(client).json()["id"]

    assert_outcome(client.get(f"/fhir/Task/{resource_id}?_format=xml"), 406,
                   "not-supported", "_format=xml")


def test_read_with_format_json_returns_the_resource(client: TestClient) -> None:
    resource_id = create(client).json()["id"]

    response = client.get(f"/fhir/Task/{resource_id}?_format=json")

    assert response.status_code == 200
    assert response.json()["id"] == resource_id


# -- decimal precision -------------------------------------------------------------------------
def test_decimals_keep_their_written_precision_on_every_path(client: TestClient) -> None:
    raw = (b'{"resourceType": "Task", "status": "ready", "intent": "order", "input": ['
           b'{"type": {"text": "dose"}, "valueDecimal": 1.50},'
           b'{"type": {"text": "ratio"}, "valueDecimal": 0.000100}]}')
    wire = b'"valueDecimal":1.50},{"type":{"text":"ratio"},"valueDecimal":0.000100}'

    created = client.post("/fhir/Task", content=raw, headers=FHIR)
    resource_id = created.json()["id"]

    assert created.status_code == 201
    for path in (f"/fhir/Task/{resource_id}", f"/fhir/Task/{resource_id}/_history/1",
                 f"/fhir/Task/{resource_id}/_history", f"/fhir/Task?_id={resource_id}"):
        assert wire in client.get(path).content, path
    assert wire in created.content
    updated = client.put(f"/fhir/Task/{resource_id}", headers=FHIR,
                         content=raw[:-1] + b', "id": "' + resource_id.encode() + b'"}')
    assert wire in updated.content
