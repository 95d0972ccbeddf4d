"""The access log writes JSON lines in batches: soon after a request, never lost at flush."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.api.observability import AccessLog

FIELDS = {"method": "GET", "route": "/fhir/{type}/{id}", "status": 200, "duration_ms": 0.1,
          "request_id": "r1"}


def test_a_line_is_written_shortly_after_the_request(capsys: pytest.CaptureFixture[str]) -> None:
    log = AccessLog()

    async def scenario() -> tuple[str, str]:
        log.add(FIELDS)
        before = capsys.readouterr().err
        await asyncio.sleep(AccessLog.FLUSH_SECONDS * 2)
        return before, capsys.readouterr().err

    before, after = asyncio.run(scenario())
    assert before == ""  # batched, not written per request
    line = json.loads(after)
    assert line["logger"] == "gateway.access"
    assert line["message"] == "GET /fhir/{type}/{id} 200"
    assert line["request_id"] == "r1" and line["status"] == 200
    assert line["ts"].endswith("Z")


def test_a_full_batch_is_written_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    log = AccessLog()

    async def scenario() -> str:
        for n in range(AccessLog.BATCH_LINES):
            log.add({**FIELDS, "request_id": f"r{n}"})
        return capsys.readouterr().err

    lines = asyncio.run(scenario()).splitlines()
    assert [json.loads(x)["request_id"] for x in lines] == [
        f"r{n}" for n in range(AccessLog.BATCH_LINES)]


def test_without_an_event_loop_a_line_is_written_at_once(
        capsys: pytest.CaptureFixture[str]) -> None:
    log = AccessLog()
    log.add(FIELDS)
    assert len(capsys.readouterr().err.splitlines()) == 1
    log.flush()  # nothing left to write
    assert capsys.readouterr().err == ""


def test_lines_on_a_new_loop_are_written_when_the_old_loop_went_away(
        capsys: pytest.CaptureFixture[str]) -> None:
    log = AccessLog()

    async def request(n: int) -> None:
        log.add({**FIELDS, "request_id": f"r{n}"})

    asyncio.run(request(1))  # its loop closes before the flush it scheduled
    capsys.readouterr()

    async def later() -> str:
        await request(2)
        await asyncio.sleep(AccessLog.FLUSH_SECONDS * 2)
        return capsys.readouterr().err

    ids = [json.loads(x)["request_id"] for x in asyncio.run(later()).splitlines()]
    assert ids == ["r1", "r2"]
