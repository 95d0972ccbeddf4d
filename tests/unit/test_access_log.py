"""The request log writes JSON access lines and counts Prometheus samples in batches: soon
after a request, never lost at flush."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import REGISTRY

from gateway.api.observability import RequestLog

ANSWERED = ("GET", "/fhir/{type}/{id}", 200, 0.0001)


def test_a_line_is_written_shortly_after_the_request(capsys: pytest.CaptureFixture[str]) -> None:
    log = RequestLog()

    async def scenario() -> tuple[str, str]:
        log.add(*ANSWERED, "r1")
        before = capsys.readouterr().err
        await asyncio.sleep(RequestLog.FLUSH_SECONDS * 2)
        return before, capsys.readouterr().err

    before, after = asyncio.run(scenario())
    assert before == ""  # batched, not written per request
    line = json.loads(after)
    assert line["logger"] == "gateway.access"
    assert line["message"] == "GET /fhir/{type}/{id} 200"
    assert line["request_id"] == "r1" and line["status"] == 200
    assert line["ts"].endswith("Z")


def test_a_full_batch_is_written_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    log = RequestLog()

    async def scenario() -> str:
        for n in range(RequestLog.BATCH_LINES):
            log.add(*ANSWERED, f"r{n}")
        return capsys.readouterr().err

    lines = asyncio.run(scenario()).splitlines()
    assert [json.loads(x)["request_id"] for x in lines] == [
        f"r{n}" for n in range(RequestLog.BATCH_LINES)]


def test_without_an_event_loop_a_line_is_written_at_once(
        capsys: pytest.CaptureFixture[str]) -> None:
    log = RequestLog()
    log.add(*ANSWERED, "r1")
    assert len(capsys.readouterr().err.splitlines()) == 1
    log.flush()  # nothing left to write
    assert capsys.readouterr().err == ""


def test_lines_on_a_new_loop_are_written_when_the_old_loop_went_away(
        capsys: pytest.CaptureFixture[str]) -> None:
    log = RequestLog()

    async def request(n: int) -> None:
        log.add(*ANSWERED, f"r{n}")

    asyncio.run(request(1))  # its loop closes before the flush it scheduled
    capsys.readouterr()

    async def later() -> str:
        await request(2)
        await asyncio.sleep(RequestLog.FLUSH_SECONDS * 2)
        return capsys.readouterr().err

    ids = [json.loads(x)["request_id"] for x in asyncio.run(later()).splitlines()]
    assert ids == ["r1", "r2"]


def _counted(route: str) -> float:
    value = REGISTRY.get_sample_value("atm_http_requests_total",
                                      {"method": "GET", "route": route, "status": "200"})
    return value or 0.0


def _timed(route: str) -> float:
    value = REGISTRY.get_sample_value("atm_http_request_duration_seconds_count",
                                      {"method": "GET", "route": route, "status": "200"})
    return value or 0.0


def test_samples_are_counted_at_the_flush_not_per_request(
        capsys: pytest.CaptureFixture[str]) -> None:
    log = RequestLog()
    route = "/fhir/{type}/_history"  # counted by no other test of this module

    async def scenario() -> tuple[float, float]:
        before = _counted(route)
        log.add("GET", route, 200, 0.002, "r1")
        log.add("GET", route, 200, 0.004, "r2", line=False)
        return before, _counted(route)

    before, during = asyncio.run(scenario())
    assert during == before  # kept until the flush
    timed = _timed(route)
    log.flush()
    assert _counted(route) == before + 2
    assert _timed(route) == timed + 2
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(x)["request_id"] for x in lines] == ["r1"]  # r2 asked for no line
