"""The EHR client against a scripted HTTP server on 127.0.0.1: retries with backoff that
honour Retry-After, tokens kept across calls and renewed on a 401, the circuit breaker."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gateway.adapters.ehr.client import CircuitBreaker, EhrClient, EhrRefused, EhrUnavailable
from gateway.adapters.ehr.endpoints import Endpoint
from gateway.auth.credentials import new_key
from gateway.settings import Settings

Answer = tuple[int, dict[str, str], dict[str, Any]]
OK: Answer = (200, {}, {"resourceType": "Bundle", "type": "searchset", "entry": []})


class Script:
    """What the server answers to each GET /fhir/Patient, in turn, and what it saw."""

    def __init__(self, answers: list[Answer]) -> None:
        self.answers = answers
        self.calls: list[tuple[float, str]] = []  # (when, Authorization header)
        self.tokens = 0


@pytest.fixture
def script() -> Script:
    return Script([])


@pytest.fixture
def server(script: Script) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def _send(self, status: int, headers: dict[str, str], body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in {"content-type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
            if self.path.endswith("/.well-known/smart-configuration"):
                port = self.server.server_address[1]
                self._send(200, {}, {"token_endpoint": f"http://127.0.0.1:{port}/token"})
                return
            script.calls.append((time.monotonic(), self.headers.get("authorization", "")))
            self._send(*(script.answers.pop(0) if script.answers else OK))

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("content-length", 0)))
            script.tokens += 1
            self._send(200, {}, {"access_token": f"token-{script.tokens}",
                                 "token_type": "bearer", "expires_in": 300})

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/fhir"
    httpd.shutdown()
    httpd.server_close()


def client(base: str, **settings: Any) -> EhrClient:
    endpoint = Endpoint(f"scripted-{uuid.uuid4().hex[:8]}", base, "us",
                        new_key().as_dict(private=True), "Organization/centre")
    options = {"ehr_attempts": 3, "ehr_backoff_seconds": 0.01, "ehr_backoff_max_seconds": 2.0,
               "ehr_breaker_failures": 2, "ehr_breaker_seconds": 60.0, **settings}
    return EhrClient(endpoint, Settings(**options))


def test_a_503_is_retried_after_the_time_the_ehr_asked_for(server: str, script: Script) -> None:
    script.answers = [(503, {"Retry-After": "1"}, {}), OK]
    with client(server) as ehr:
        assert ehr.read_json("Patient")["type"] == "searchset"
    (first, _), (second, _) = script.calls
    assert 0.9 <= second - first < 2.0


def test_backoff_grows_and_ends_in_unavailable(server: str, script: Script) -> None:
    script.answers = [(429, {}, {})] * 3
    with client(server, ehr_backoff_seconds=0.05) as ehr, \
            pytest.raises(EhrUnavailable) as caught:
        ehr.read_json("Patient")
    assert len(script.calls) == 3
    assert "429 3 times" in str(caught.value)


def test_a_4xx_is_not_retried(server: str, script: Script) -> None:
    script.answers = [(404, {}, {"resourceType": "OperationOutcome"})]
    with client(server) as ehr, pytest.raises(EhrRefused):
        ehr.read_json("Patient")
    assert len(script.calls) == 1


def test_the_token_is_kept_across_calls_and_renewed_on_a_401(server: str,
                                                             script: Script) -> None:
    ehr = client(server)
    with ehr:
        ehr.read_json("Patient")
        ehr.read_json("Patient")
    with EhrClient(ehr.endpoint, ehr.settings) as again:  # another call, same process
        again.read_json("Patient")
        assert script.tokens == 1
        script.answers = [(401, {}, {}), OK]
        again.read_json("Patient")
    assert script.tokens == 2
    assert [auth for _, auth in script.calls[-2:]] == ["Bearer token-1", "Bearer token-2"]


def test_the_circuit_opens_after_failures_and_lets_one_call_try_later() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=2, cooldown=30.0, clock=lambda: now[0])
    breaker.before()
    breaker.failed()
    breaker.before()  # one failure: still closed
    breaker.failed()
    with pytest.raises(EhrUnavailable) as caught:
        breaker.before()
    assert caught.value.retry_after == pytest.approx(30.0)
    now[0] = 31.0
    breaker.before()  # half-open: this one tries
    with pytest.raises(EhrUnavailable):
        breaker.before()  # and no other meanwhile
    breaker.succeeded()
    breaker.before()
    assert not breaker.is_open


def test_an_unreachable_ehr_opens_its_circuit() -> None:
    with client("http://127.0.0.1:9/fhir", ehr_backoff_max_seconds=0.01) as ehr:
        for _ in range(2):
            with pytest.raises(EhrUnavailable):
                ehr.read_json("Patient")
        started = time.monotonic()
        with pytest.raises(EhrUnavailable, match="circuit"):
            ehr.read_json("Patient")
        assert time.monotonic() - started < 0.1
