"""History of an instance, a type and the whole server as Bundles, newest first, paged by
`_count` and windowed by `_since` (https://hl7.org/fhir/R4/http.html#history)."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from tests.factories import assert_outcome, patient, task

FHIR = {"Content-Type": "application/fhir+json"}
BASE = "http://testserver/fhir"
MAX_PAGES = 50


def create(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/fhir/{body['resourceType']}", json=body, headers=FHIR)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def update(client: TestClient, resource: dict[str, Any], **fields: Any) -> dict[str, Any]:
    ref = f"{resource['resourceType']}/{resource['id']}"
    body = {k: v for k, v in resource.items() if k != "meta"} | fields
    response = client.put(f"/fhir/{ref}", json=body, headers=FHIR)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def history(client: TestClient, path: str, **params: str) -> dict[str, Any]:
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/fhir+json; charset=utf-8"
    bundle: dict[str, Any] = response.json()
    assert (bundle["resourceType"], bundle["type"]) == ("Bundle", "history")
    return bundle


def versions(bundle: dict[str, Any]) -> list[str]:
    """Each entry as 'Type/id/version', in bundle order."""
    out = []
    for entry in bundle["entry"]:
        ref = entry["fullUrl"].removeprefix(f"{BASE}/")
        out.append(f"{ref}/{entry['response']['etag'][3:-1]}")
    return out


def next_link(bundle: dict[str, Any]) -> str | None:
    return next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)


def follow(client: TestClient, url: str) -> dict[str, Any]:
    path = url.removeprefix("http://testserver")
    response = client.get(path)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


@pytest.fixture
def lifecycle(client: TestClient) -> dict[str, Any]:
    """Task: created, updated, patched, deleted, recreated (5 versions)."""
    created = create(client, task(description="v1"))
    ref = f"/fhir/Task/{created['id']}"
    update(client, created, description="v2")
    ops = '[{"op": "replace", "path": "/description", "value": "v3"}]'
    patched = client.patch(ref, content=ops,
                           headers={"Content-Type": "application/json-patch+json"})
    assert patched.status_code == 200
    assert client.delete(ref).status_code == 200
    recreated = client.put(ref, json=task(id=created["id"], description="v5"), headers=FHIR)
    assert recreated.status_code == 201
    return created


# -- instance history ---------------------------------------------------------------------------
def test_instance_history_lists_every_version_newest_first(client: TestClient,
                                                           lifecycle: dict[str, Any]) -> None:
    ref = f"Task/{lifecycle['id']}"

    bundle = history(client, f"/fhir/{ref}/_history")

    assert versions(bundle) == [f"{ref}/{n}" for n in (5, 4, 3, 2, 1)]
    requests = [(e["request"]["method"], e["request"]["url"]) for e in bundle["entry"]]
    assert requests == [("PUT", ref), ("DELETE", ref), ("PATCH", ref), ("PUT", ref),
                        ("POST", "Task")]
    statuses = [e["response"]["status"] for e in bundle["entry"]]
    assert statuses[1:] == ["200 OK", "200 OK", "200 OK", "201 Created"]
    assert bundle["link"][0] == {"relation": "self", "url": f"{BASE}/{ref}/_history"}
    assert next_link(bundle) is None


def test_instance_history_entries_carry_each_version_and_its_metadata(
        client: TestClient, lifecycle: dict[str, Any]) -> None:
    ref = f"Task/{lifecycle['id']}"

    entries = history(client, f"/fhir/{ref}/_history")["entry"]

    descriptions = [e.get("resource", {}).get("description") for e in entries]
    assert descriptions == ["v5", None, "v3", "v2", "v1"]
    assert "resource" not in entries[1]
    assert entries[-1]["resource"] == lifecycle
    for entry in entries:
        assert entry["fullUrl"] == f"{BASE}/{ref}"
        version = client.get(f"/fhir/{ref}/_history/{entry['response']['etag'][3:-1]}")
        assert entry["response"]["etag"] == version.headers["etag"]
        if "resource" in entry:
            assert entry["resource"] == version.json()
            assert entry["response"]["lastModified"] == entry["resource"]["meta"]["lastUpdated"]


def test_instance_history_of_deleted_resource_is_still_served(client: TestClient) -> None:
    created = create(client, task())
    client.delete(f"/fhir/Task/{created['id']}")

    bundle = history(client, f"/fhir/Task/{created['id']}/_history")

    assert [e["request"]["method"] for e in bundle["entry"]] == ["DELETE", "POST"]


def test_history_says_201_for_a_put_that_recreated_a_deleted_resource(
        client: TestClient) -> None:
    created = create(client, task())
    path = f"/fhir/Task/{created['id']}"
    client.delete(path)
    body = {k: v for k, v in created.items() if k != "meta"}
    assert client.put(path, json=body, headers=FHIR).status_code == 201
    assert client.put(path, json=body | {"status": "ready"}, headers=FHIR).status_code == 200

    for url in (f"{path}/_history", "/fhir/Task/_history", "/fhir/_history"):
        entries = history(client, url)["entry"]
        assert [(e["request"]["method"], e["response"]["status"]) for e in entries] == [
            ("PUT", "200 OK"), ("PUT", "201 Created"), ("DELETE", "200 OK"),
            ("POST", "201 Created")], url


def test_instance_history_of_unknown_resource_returns_404(client: TestClient) -> None:
    assert_outcome(client.get("/fhir/Task/unknown/_history"), 404, "not-found",
                   "Task/unknown is not known")


# -- type and system history --------------------------------------------------------------------
def test_type_history_holds_only_that_type_newest_first(client: TestClient) -> None:
    first = create(client, task(description="a"))
    create(client, patient())
    second = create(client, task(description="b"))
    update(client, first, description="a2")

    bundle = history(client, "/fhir/Task/_history")

    assert versions(bundle) == [f"Task/{first['id']}/2", f"Task/{second['id']}/1",
                                f"Task/{first['id']}/1"]
    stamps = [e["response"]["lastModified"] for e in bundle["entry"]]
    assert stamps == sorted(stamps, reverse=True)


def test_system_history_holds_every_type(client: TestClient) -> None:
    a_task = create(client, task())
    a_patient = create(client, patient())

    bundle = history(client, "/fhir/_history")

    assert versions(bundle) == [f"Patient/{a_patient['id']}/1", f"Task/{a_task['id']}/1"]
    assert bundle["link"][0]["url"] == f"{BASE}/_history"


def test_history_of_empty_store_is_an_empty_bundle(client: TestClient) -> None:
    bundle = history(client, "/fhir/_history")

    assert bundle.get("entry", []) == []
    assert next_link(bundle) is None


def test_type_history_of_unknown_type_returns_404(client: TestClient) -> None:
    assert_outcome(client.get("/fhir/Foo/_history"), 404, "not-found", "Foo")


# -- paging -----------------------------------------------------------------------------------
def test_history_pages_by_count_and_visits_every_version_once(client: TestClient) -> None:
    created = create(client, task())
    for n in range(2, 8):
        update(client, created, description=f"v{n}")

    first = history(client, f"/fhir/Task/{created['id']}/_history", _count="3")
    seen, bundle, pages = versions(first), first, 1
    while (url := next_link(bundle)) is not None and pages < MAX_PAGES:
        assert "_count=3" in url
        bundle = follow(client, url)
        assert len(bundle["entry"]) <= 3
        seen += versions(bundle)
        pages += 1

    assert pages == 3
    assert seen == [f"Task/{created['id']}/{n}" for n in range(7, 0, -1)]


def test_history_paging_is_stable_while_versions_are_written(client: TestClient) -> None:
    tasks = [create(client, task(description=f"t{i}")) for i in range(4)]
    before = versions(history(client, "/fhir/_history", _count="100"))

    bundle = history(client, "/fhir/_history", _count="2")
    seen, pages = versions(bundle), 1
    while (url := next_link(bundle)) is not None and pages < MAX_PAGES:
        # Another client writes between page fetches: new versions and a new resource.
        update(client, tasks[pages % len(tasks)], description=f"during {pages}")
        create(client, patient())
        bundle = follow(client, url)
        seen += versions(bundle)
        pages += 1

    assert len(seen) == len(set(seen)), seen
    assert set(before) <= set(seen)
    assert seen[:len(before)] == before


def test_history_next_link_keeps_other_parameters(client: TestClient) -> None:
    for _ in range(3):
        create(client, task())

    bundle = history(client, "/fhir/Task/_history", _count="1", _since="2000-01-01T00:00:00Z")

    query = parse_qs(urlsplit(next_link(bundle) or "").query)
    assert query["_count"] == ["1"]
    assert query["_since"] == ["2000-01-01T00:00:00Z"]
    assert "_cursor" in query


def test_history_count_above_maximum_is_capped(client: TestClient) -> None:
    create(client, task())

    bundle = history(client, "/fhir/_history", _count="100000000000000000000")

    assert len(bundle["entry"]) == 1


# -- _since ----------------------------------------------------------------------------------
def test_history_since_keeps_only_later_versions(client: TestClient) -> None:
    created = create(client, task())
    latest = update(client, created, description="later")
    # Versions carry millisecond times: write until one lands in a later millisecond.
    while latest["meta"]["lastUpdated"] == created["meta"]["lastUpdated"]:
        assert int(latest["meta"]["versionId"]) < 100, "the clock does not move"
        latest = update(client, latest, description="later")

    bundle = history(client, f"/fhir/Task/{created['id']}/_history",
                     _since=latest["meta"]["lastUpdated"])

    assert versions(bundle) == [f"Task/{created['id']}/{latest['meta']['versionId']}"]


def test_history_since_the_future_is_empty(client: TestClient) -> None:
    create(client, task())

    bundle = history(client, "/fhir/_history", _since="2999-01-01T00:00:00Z")

    assert bundle.get("entry", []) == []


def test_history_since_the_past_holds_everything(client: TestClient) -> None:
    create(client, task())
    create(client, task())

    bundle = history(client, "/fhir/Task/_history", _since="2000-01-01T00:00:00+02:00")

    assert len(bundle["entry"]) == 2


# -- bad parameters -------------------------------------------------------------------------------
@pytest.mark.parametrize(("query", "diagnostics"), [
    ("foo=1", "Unknown history parameter(s): foo"),
    ("_sort=_lastUpdated", "Unknown history parameter(s): _sort"),
    ("_count=0", "_count must be a positive integer"),
    ("_count=-1", "_count must be a positive integer"),
    ("_count=ten", "_count must be a positive integer"),
    ("_count=%C2%B2", "_count must be a positive integer"),
    ("_since=yesterday", "_since must be a FHIR instant"),
    ("_since=2024-13-01", "_since must be a FHIR instant"),
    ("_cursor=not-a-cursor", "Malformed paging cursor"),
])
@pytest.mark.parametrize("path", ["/fhir/_history", "/fhir/Task/_history"])
def test_history_with_bad_parameter_returns_400(client: TestClient, path: str, query: str,
                                                diagnostics: str) -> None:
    create(client, task())

    response = client.get(f"{path}?{query}")

    assert_outcome(response, 400, "invalid", diagnostics)


@pytest.mark.parametrize("values", [["x", "Task", "a", 1], [1, 2, "a", 1],
                                    [1, "Task", "a", "9"], [1, "Task", "a", True],
                                    [1, "Task", "a"]])
def test_history_with_tampered_cursor_returns_400(client: TestClient,
                                                  values: list[Any]) -> None:
    raw = json.dumps({"v": values, "b": False}).encode()
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")

    response = client.get(f"/fhir/_history?_cursor={cursor}")

    assert response.status_code == 400, response.text
    assert response.json()["issue"][0]["code"] == "invalid"
