"""The operational surface: health, readiness, metrics, request ids, gzip, CORS and
links built behind a reverse proxy."""

from __future__ import annotations

import re
import socket
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import client_with
from tests.factories import ref, task

FHIR = {"Content-Type": "application/fhir+json"}
PORTAL = "https://portal.example"
PROXY = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "atm.example.org",
         "X-Forwarded-Prefix": "/gw"}


def request_count(client: TestClient, method: str, route: str, status: int) -> float:
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name != "atm_http_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels == {
                    "method": method, "route": route, "status": str(status)}:
                return sample.value
    return 0.0


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_healthz_answers_200_ok(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_with_reachable_database_answers_200(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


def test_readyz_with_unreachable_database_answers_503() -> None:
    # Nothing listens on the port: every connection attempt is refused at once.
    settings = Settings(database_url=f"postgresql://postgres@127.0.0.1:{closed_port()}/none",
                        log_json=False)
    with TestClient(create_app(settings, migrate=False)) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {"status": "unavailable", "database": "unreachable"}
        assert client.get("/healthz").status_code == 200


def test_metrics_count_requests_by_route_template(client: TestClient) -> None:
    created = client.post("/fhir/Task", json=task(), headers=FHIR).json()
    before = request_count(client, "GET", "/fhir/{type}/{id}", 200)
    assert client.get(f"/fhir/Task/{created['id']}").status_code == 200
    assert request_count(client, "GET", "/fhir/{type}/{id}", 200) == before + 1
    text = client.get("/metrics").text
    assert f"/fhir/Task/{created['id']}" not in text
    assert 'atm_http_request_duration_seconds_bucket{le="0.005",method="GET",' \
           'route="/fhir/{type}/{id}",status="200"}' in text


def test_metrics_label_unknown_paths_as_unmatched(client: TestClient) -> None:
    before = request_count(client, "GET", "unmatched", 404)
    assert client.get("/no/such/place").status_code == 404
    assert request_count(client, "GET", "unmatched", 404) == before + 1
    assert "/no/such/place" not in client.get("/metrics").text


def test_request_id_given_by_client_is_echoed(client: TestClient) -> None:
    response = client.get("/fhir/metadata", headers={"X-Request-ID": "trace-42.a_b:c"})
    assert response.headers["x-request-id"] == "trace-42.a_b:c"


@pytest.mark.parametrize("given", [None, "x" * 65, "bad id with spaces", ""])
def test_request_id_missing_or_unusable_is_generated(client: TestClient,
                                                     given: str | None) -> None:
    headers = {} if given is None else {"X-Request-ID": given}
    first = client.get("/healthz", headers=headers).headers["x-request-id"]
    second = client.get("/healthz", headers=headers).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first != second


def test_request_id_is_recorded_in_the_change_log(client: TestClient, db: Any) -> None:
    from sqlalchemy import text

    client.post("/fhir/Task", json=task(), headers={**FHIR, "X-Request-ID": "order-77"})
    with db.read() as conn:
        ids = conn.execute(text("SELECT request_id FROM change_log")).scalars().all()
    assert ids == ["order-77"]


def test_unexpected_error_answers_500_with_request_id_and_is_counted(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_args: Any) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr("gateway.api.fhir_app.handle", explode)
    app = create_app(settings, migrate=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        before = request_count(client, "GET", "/fhir/{type}/{id}", 500)
        response = client.get("/fhir/Task/1", headers={"X-Request-ID": "crash-1"})
        assert response.status_code == 500
        assert response.headers["x-request-id"] == "crash-1"
        assert response.json() == {"resourceType": "OperationOutcome", "issue": [{
            "severity": "error", "code": "exception",
            "diagnostics": "Internal error; quote correlation id crash-1 to the operators"}]}
        assert request_count(client, "GET", "/fhir/{type}/{id}", 500) == before + 1


def test_large_search_bundle_is_gzipped_when_client_accepts_it(client: TestClient) -> None:
    for n in range(12):
        client.post("/fhir/Task", json=task(owner=ref(f"Organization/org-{n}")), headers=FHIR)
    zipped = client.get("/fhir/Task?_count=50", headers={"Accept-Encoding": "gzip"})
    assert zipped.status_code == 200
    assert zipped.headers["content-encoding"] == "gzip"
    assert int(zipped.headers["content-length"]) < len(zipped.content)
    assert len(zipped.json()["entry"]) == 12
    plain = client.get("/fhir/Task?_count=50", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert plain.json()["entry"] == zipped.json()["entry"]


def test_cors_preflight_from_allowed_origin_is_answered(settings: Settings) -> None:
    with client_with(settings, cors_origins=[PORTAL]) as client:
        response = client.options("/fhir/Task", headers={
            "Origin": PORTAL, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,if-match"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == PORTAL
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "if-match" in response.headers["access-control-allow-headers"].lower()


def test_cors_simple_request_exposes_fhir_headers(settings: Settings) -> None:
    with client_with(settings, cors_origins=[PORTAL]) as client:
        response = client.post("/fhir/Task", json=task(), headers={**FHIR, "Origin": PORTAL})
    assert response.status_code == 201
    assert response.headers["access-control-allow-origin"] == PORTAL
    exposed = {h.strip().lower() for h in
               response.headers["access-control-expose-headers"].split(",")}
    assert {"etag", "location", "content-location", "x-request-id"} <= exposed


def test_cors_request_from_other_origin_gets_no_allow_origin(settings: Settings) -> None:
    with client_with(settings, cors_origins=[PORTAL]) as client:
        response = client.get("/fhir/metadata", headers={"Origin": "https://evil.example"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_cors_is_off_when_no_origin_is_configured(client: TestClient) -> None:
    response = client.get("/fhir/metadata", headers={"Origin": PORTAL})
    assert "access-control-allow-origin" not in response.headers


def test_forwarded_headers_build_links_when_trusted(settings: Settings) -> None:
    with client_with(settings, trust_forwarded_headers=True) as client:
        created = client.post("/fhir/Task", json=task(), headers={**FHIR, **PROXY})
        found = client.get("/fhir/Task?status=ready", headers=PROXY).json()
    resource_id = created.json()["id"]
    assert created.headers["location"] == (
        f"https://atm.example.org/gw/fhir/Task/{resource_id}/_history/1")
    assert found["entry"][0]["fullUrl"] == f"https://atm.example.org/gw/fhir/Task/{resource_id}"
    assert all(link["url"].startswith("https://atm.example.org/gw/fhir/Task?")
               for link in found["link"])


def test_forwarded_headers_are_ignored_unless_trusted(client: TestClient) -> None:
    created = client.post("/fhir/Task", json=task(), headers={**FHIR, **PROXY})
    found = client.get("/fhir/Task?status=ready", headers=PROXY).json()
    resource_id = created.json()["id"]
    assert created.headers["location"] == (
        f"http://testserver/fhir/Task/{resource_id}/_history/1")
    assert found["entry"][0]["fullUrl"] == f"http://testserver/fhir/Task/{resource_id}"
    assert all(link["url"].startswith("http://testserver/fhir/Task?") for link in found["link"])
