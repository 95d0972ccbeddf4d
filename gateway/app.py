"""The ASGI application: FHIR routes, operations endpoints, middleware, start-up."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy.exc import SQLAlchemyError
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp

from gateway import __version__, fhir
from gateway.api import (
    auth_routes,
    errors,
    fhir_routes,
    observability,
    ops,
    signin_routes,
    subscription_ws,
)
from gateway.api.fhir_app import FhirEndpoint
from gateway.audit.log import running_trail
from gateway.dashboard import routes as dashboard_routes
from gateway.services.capability import AUTH_OFF_WARNING
from gateway.settings import Settings, get_settings
from gateway.store.database import Database, make_engine
from gateway.store.migrate import upgrade

log = logging.getLogger("atm.app")
EXPOSED = ["ETag", "Location", "Content-Location", "Last-Modified", "X-Request-ID"]
# What the FHIR routes' request and response bodies refer to: any R4 resource as JSON; the
# server validates it against its resourceType, which no single JSON Schema here could.
RESOURCE_SCHEMA = {
    "title": "Resource", "type": "object", "required": ["resourceType"],
    "description": "A FHIR R4 resource in JSON (https://hl7.org/fhir/R4/json.html)",
    "properties": {"resourceType": {"type": "string", "pattern": "^[A-Z][A-Za-z]+$"},
                   "id": {"type": "string"}, "meta": {"type": "object"}},
    "additionalProperties": True,
}


def serving_app() -> FastAPI:
    """The app as `atm serve` runs it: once started, what start-up built is left out of
    later garbage collections (see _freeze_startup_objects)."""
    return create_app(freeze_after_start=True)


def create_app(settings: Settings | None = None, *, migrate: bool | None = None,
               freeze_after_start: bool = False) -> FastAPI:
    """Build the app. SQLite is migrated at start-up; PostgreSQL by `atm db upgrade`
    unless `migrate` says otherwise."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(make_engine(settings))
        if migrate if migrate is not None else settings.is_sqlite:
            upgrade(db.engine)
        fhir.warm_up()
        app.state.db = db
        if settings.auth == "off":
            log.warning("%s Set ATM_AUTH=smart and register clients with `atm clients "
                        "add` before any real data goes in.", AUTH_OFF_WARNING)
        from gateway.adapters.ehr import sync as ehr_sync
        from gateway.adapters.hl7 import bridge as hl7_bridge
        from gateway.services.protocols import load_shipped
        from gateway.services.subscriptions import load_shipped_topics
        from gateway.subscriptions import worker  # they build on the services
        from orchestration.runner import running_beside

        if settings.load_topics:
            _load_shipped(db, settings, "SubscriptionTopic", load_shipped_topics)
        if settings.load_protocols:
            _load_shipped(db, settings, "protocol PlanDefinition", load_shipped)
        dashboard_routes.warm_up(app)
        with running_trail(db) as app.state.audit, running_beside(db, settings), \
                worker.running_beside(db, settings), ehr_sync.running_beside(db, settings), \
                hl7_bridge.running_beside(db, settings):
            if freeze_after_start:
                _freeze_startup_objects()
            try:
                yield
            finally:
                if freeze_after_start:
                    gc.unfreeze()  # the objects go back to the collector's care
            dashboard_routes.stop(app)
        observability.REQUEST_LOG.flush()
        db.dispose()

    app = FastAPI(title="ATM Gateway", version=__version__, lifespan=lifespan,
                  description="FHIR R4 server for advanced therapy management.",
                  docs_url="/docs", redoc_url=None,
                  # The gateway's own Prometheus metrics and JSON logs cover every request;
                  # FastAPI's OpenTelemetry hooks would only look for providers each time.
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.settings = settings
    errors.install(app)
    app.include_router(auth_routes.router)  # before /fhir/{type}/{id} can claim .well-known
    app.include_router(signin_routes.router)
    dashboard_routes.install(app)
    fhir_routes.register(app)
    app.include_router(ops.router)
    app.include_router(subscription_ws.router)  # /fhir/$subscription-ws
    app.add_middleware(GZipMiddleware, minimum_size=1024)
    observability.install(app, settings, lambda inner: _front(app, settings, inner))
    app.openapi = _openapi_with_resource_schema(app)  # type: ignore[method-assign]
    return app


def _freeze_startup_objects() -> None:
    """Leave what start-up built (modules, ~145 resource models, schemas, caches) out of
    every later garbage collection. Python's full collection walks every tracked object:
    here it took ~100 ms, every ~20,000 reads, and stalled every request in flight;
    frozen, it takes ~1.5 ms. Those objects live as long as the server anyway."""
    gc.collect()
    gc.freeze()


def _load_shipped(db: Database, settings: Settings, what: str,
                  loader: Callable[[Any], list[str]]) -> None:
    """Store what the gateway ships (protocols, subscription topics) unless the stored
    copies are the same; the server starts even when the database is out (/readyz tells)."""
    from gateway.services.context import Context
    from gateway.store.repository import Actor

    ctx = Context(db=db, settings=settings, base_url=settings.base_url or "",
                  actor=Actor(name="atm serve"))
    try:
        for written in loader(ctx):
            log.info("loaded %s %s", what, written)
    except SQLAlchemyError:
        log.exception("the shipped %s could not be loaded (is the database up and "
                      "migrated?)", what)


def _front(app: FastAPI, settings: Settings, inner: ASGIApp) -> ASGIApp:
    """What every request meets first: CORS, then the FHIR endpoint, which answers /fhir
    itself (compressing its own responses) and hands the rest to FastAPI's stack."""
    front: ASGIApp = FhirEndpoint(inner, app)
    if settings.cors_origins:
        front = CORSMiddleware(front, allow_origins=settings.cors_origins, allow_methods=["*"],
                               allow_headers=["*"], expose_headers=EXPOSED)
    return front


def _openapi_with_resource_schema(app: FastAPI) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            schema.setdefault("components", {}).setdefault("schemas", {})["Resource"] = (
                RESOURCE_SCHEMA)
        return app.openapi_schema  # type: ignore[return-value]
    return build

