"""The FHIR endpoint's own edges: HEAD, transient database failures, route labels."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import DBAPIError

from gateway.api.fhir_app import INLINE_WRITE_BYTES, _is_single_write, route_template
from gateway.app import create_app
from gateway.settings import Settings
from tests.factories import task

FHIR = {"Content-Type": "application/fhir+json"}


class _Deadlock(Exception):
    sqlstate = "40P01"


class _DiskFull(Exception):
    sqlstate = "53100"


def test_head_answers_the_get_headers_without_a_body(client: TestClient) -> None:
    created = client.post("/fhir/Task", json=task(), headers=FHIR).json()
    response = client.head(f"/fhir/Task/{created['id']}")
    assert response.status_code == 200
    assert response.headers["etag"] == 'W/"1"'
    assert response.content == b""


@pytest.mark.parametrize(("cause", "status", "code"), [
    (_Deadlock, 409, "conflict"), (_DiskFull, 500, "exception")])
def test_database_failures_become_outcomes(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                           cause: type[Exception], status: int,
                                           code: str) -> None:
    def fail(*_args: Any) -> None:
        raise DBAPIError("UPDATE resources …", {}, cause("internal detail"))

    monkeypatch.setattr("gateway.services.router.dispatch", fail)
    with TestClient(create_app(settings, migrate=False),
                    raise_server_exceptions=False) as client:
        response = client.put("/fhir/Task/1", json=task(id="1"), headers=FHIR)
    assert response.status_code == status
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == code
    assert "internal detail" not in response.text
    if status == 409:
        assert response.headers["retry-after"] == "1"
        assert "Retry" in body["issue"][0]["diagnostics"]


@pytest.mark.parametrize(("path", "template"), [
    ("", "/fhir"), ("metadata", "/fhir/metadata"), ("Task", "/fhir/{type}"),
    ("Task/9", "/fhir/{type}/{id}"), ("Task/9/_history/2", "/fhir/{type}/{id}/_history/{vid}"),
    ("Task/$validate", "/fhir/{type}/$validate"), ("Task/9/$everything", "/fhir/{type}/{id}/$op"),
    ("a/b/c/d/e/f", "/fhir/{type}/{id}/_history/{vid}/…")])
def test_route_template_never_contains_ids(path: str, template: str) -> None:
    assert route_template(path).path == template


SMALL, LARGE = b"{}", b" " * (INLINE_WRITE_BYTES + 1)


@pytest.mark.parametrize(("method", "path", "query", "headers", "body", "inline"), [
    ("POST", "Task", [], {}, SMALL, True),
    ("PUT", "Task/t1", [], {}, SMALL, True),
    ("PATCH", "Task/t1", [], {}, SMALL, True),
    ("DELETE", "Task/t1", [], {}, None, True),
    ("POST", "Task", [], {"if-none-exist": "identifier=x|1"}, SMALL, False),
    ("PUT", "Task", [("identifier", "x|1")], {}, SMALL, False),
    ("DELETE", "Task", [("identifier", "x|1")], {}, None, False),
    ("POST", "", [], {}, SMALL, False),  # a Bundle
    ("POST", "Task/_search", [], {}, SMALL, False),
    ("POST", "Task/$validate", [], {}, SMALL, False),
    ("POST", "Task", [], {}, LARGE, False),
    ("GET", "Task/t1", [], {}, None, False),
])
def test_which_writes_run_on_the_event_loop(method: str, path: str,
                                            query: list[tuple[str, str]],
                                            headers: dict[str, str], body: bytes | None,
                                            inline: bool) -> None:
    assert _is_single_write(method, path, query, headers, body) is inline


def test_a_served_app_leaves_its_start_up_objects_out_of_garbage_collection(
        settings: Settings) -> None:
    """`atm serve` freezes what start-up built (a full collection walked all of it, ~100 ms
    a time), and gives it back to the collector at shutdown."""
    with TestClient(create_app(settings, migrate=False, freeze_after_start=True)) as client:
        assert gc.get_freeze_count() > 10_000
        assert client.get("/fhir/metadata").status_code == 200
    assert gc.get_freeze_count() == 0


def test_an_app_built_for_tests_freezes_nothing(settings: Settings) -> None:
    with TestClient(create_app(settings, migrate=False)):
        assert gc.get_freeze_count() == 0
