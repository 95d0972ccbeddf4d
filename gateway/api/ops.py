"""Operational endpoints: liveness, readiness (database reachable), Prometheus metrics."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.concurrency import run_in_threadpool

from gateway.api.observability import REQUEST_LOG

router = APIRouter(tags=["operations"])


def _status_schema(*states: str) -> dict[str, Any]:
    return {"application/json": {"schema": {
        "type": "object", "required": ["status"],
        "properties": {"status": {"type": "string", "enum": list(states)},
                       "database": {"type": "string"}}}}}


@router.get("/healthz", summary="Liveness: the process answers", operation_id="healthz",
            response_class=JSONResponse,
            responses={200: {"description": "Alive", "content": _status_schema("ok")}})
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/readyz", summary="Readiness: the database answers", operation_id="readyz",
            response_class=JSONResponse,
            responses={200: {"description": "Ready", "content": _status_schema("ok")},
                       503: {"description": "The database is unreachable",
                             "content": _status_schema("unavailable")}})
async def readyz(request: Request) -> JSONResponse:
    try:
        await run_in_threadpool(request.app.state.db.ping)
    except Exception:  # noqa: BLE001 - any failure means not ready
        return JSONResponse({"status": "unavailable", "database": "unreachable"}, 503)
    return JSONResponse({"status": "ok", "database": "ok"})


@router.get("/metrics", summary="Prometheus metrics", operation_id="metrics",
            response_class=Response,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics() -> Response:
    REQUEST_LOG.flush()  # the samples of requests answered since the last flush
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # several workers: all of their samples
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
