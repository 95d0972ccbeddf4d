"""The ASGI application: FHIR routes, operations endpoints, middleware, start-up."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware

from gateway import __version__, fhir
from gateway.api import errors, fhir_routes, ops
from gateway.settings import Settings, get_settings
from gateway.store.database import Database, make_engine
from gateway.store.migrate import upgrade

EXPOSED = ["ETag", "Location", "Content-Location", "Last-Modified", "X-Request-ID"]


def create_app(settings: Settings | None = None, *, migrate: bool | None = None) -> FastAPI:
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
        yield
        db.dispose()

    app = FastAPI(title="ATM Gateway", version=__version__, lifespan=lifespan,
                  description="FHIR R4 server for advanced therapy management.",
                  docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    errors.install(app)
    fhir_routes.register(app)
    app.include_router(ops.router)
    app.middleware("http")(_request_id)
    app.add_middleware(GZipMiddleware, minimum_size=1024)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["*"], allow_headers=["*"], expose_headers=EXPOSED)
    return app


async def _request_id(request: Request,
                      call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    request.state.request_id = request_id[:64]
    response = await call_next(request)
    response.headers["X-Request-ID"] = request.state.request_id
    return response
