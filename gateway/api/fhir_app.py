"""The FHIR REST endpoint under /fhir, as a plain ASGI middleware in front of FastAPI.

FHIR's URL grammar is dispatched by gateway.services.router, so FastAPI's per-route
machinery (matching ~20 patterns, dependency solving) would only add latency to every
FHIR request; the FastAPI app keeps /healthz, /metrics and the docs. The synchronous
store runs in the thread pool, except on SQLite single-resource reads (a primary-key
lookup takes microseconds, less than the hop to a thread) and single-resource writes,
which run on the event loop and share commits (Database.write_on_loop).
"""

from __future__ import annotations

import gzip
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.api.errors import outcome_response, unexpected_response
from gateway.api.http import FHIR_JSON_UTF8, base_url, check_accept, header_dict, read_body
from gateway.audit.events import RequestAudit
from gateway.audit.log import AuditTrail
from gateway.auth.ratelimit import RateLimiter
from gateway.auth.redaction import BLIND_ROLES, redact
from gateway.auth.tokens import Grant, active_grant
from gateway.errors import FhirError, ThrottledError, UnauthorizedError
from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.services.router import handle
from gateway.store.repository import Actor

PREFIX = "/fhir"
WELL_KNOWN = PREFIX + "/.well-known/"
GZIP_MIN_BYTES = 1024
GZIP_LEVEL = 5  # most of level 9's saving on JSON at a fraction of its time
INLINE_WRITE_BYTES = 64 * 1024  # larger bodies are written from a thread (see below)
_FHIR_JSON_UTF8 = FHIR_JSON_UTF8.encode()
_NO_LENGTH = frozenset({204, 304})  # answers that must not (204) or need not describe a body


def _is_instance_read(method: str, path: str) -> bool:
    """GET Type/id or Type/id/_history/n: one primary-key lookup."""
    if method not in ("GET", "HEAD"):
        return False
    parts = path.split("/")
    return (len(parts) == 2 and not parts[1].startswith(("_", "$"))) or (
        len(parts) == 4 and parts[2] == "_history")


def _is_single_write(method: str, path: str, query: list[tuple[str, str]],
                     headers: dict[str, str], body: bytes | None) -> bool:
    """A create, update, patch or delete of one resource named by id: short enough to run
    on the event loop (conditional ones search first, Bundles can be long, and a large
    body takes long to validate; those keep to threads, which let reads through)."""
    if method not in ("POST", "PUT", "PATCH", "DELETE") or query or "if-none-exist" in headers:
        return False
    if body is not None and len(body) > INLINE_WRITE_BYTES:
        return False
    parts = path.split("/")
    if parts[0] in ("", "metadata") or any(p.startswith(("_", "$")) for p in parts):
        return False
    return len(parts) == (1 if method == "POST" else 2)


@dataclass(frozen=True)
class RouteTemplate:
    """What metrics label a FHIR request with (as FastAPI's routes carry `.path`)."""

    path: str


_LITERALS = frozenset({"metadata", "_history", "_search", "$validate"})


def route_template(path: str) -> RouteTemplate:
    """'/fhir/{type}/{id}/_history/{vid}' for 'Task/1/_history/2': few, bounded values."""
    names = ("{type}", "{id}", "_history", "{vid}")
    parts = path.split("/") if path else []
    shape = [p if p in _LITERALS else ("$op" if p.startswith("$") else names[min(i, 3)])
             for i, p in enumerate(parts[:4])]
    return RouteTemplate("/".join([PREFIX, *shape]) + ("/…" if len(parts) > 4 else ""))


class FhirEndpoint:
    """ASGI middleware: requests under /fhir are answered here, the rest pass through to
    `inner` (FastAPI's own stack). `app` is the FastAPI application whose state (database,
    settings) the FHIR requests use.

    It reads the ASGI scope and sends the response messages itself: Starlette's Request,
    URL and Response objects cost ~15 µs a request, a tenth of a read."""

    def __init__(self, inner: ASGIApp, app: Any) -> None:
        self.inner = inner
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == PREFIX or path.startswith(PREFIX + "/")) \
                or path.startswith(WELL_KNOWN):  # SMART discovery is FastAPI's
            await self.inner(scope, receive, send)
            return
        scope["app"] = self.app
        scope["route"] = route_template(path[len(PREFIX):].strip("/"))
        headers = header_dict(scope)
        try:
            result = await answer(self.app, scope, receive, headers)
        except FhirError as exc:
            await outcome_response(exc)(scope, receive, send)
            return
        except Exception:  # noqa: BLE001 - the client gets an id to quote, never the cause
            await unexpected_response(Request(scope))(scope, receive, send)
            return
        body = result.body or b""
        raw = [(name.lower().encode("latin-1"), value.encode("latin-1"))
               for name, value in result.headers.items()]
        if result.body is not None and "Content-Type" not in result.headers:
            raw.append((b"content-type", _FHIR_JSON_UTF8))
            if len(body) >= GZIP_MIN_BYTES and "gzip" in headers.get("accept-encoding", ""):
                body = gzip.compress(body, compresslevel=GZIP_LEVEL)
                raw += [(b"content-encoding", b"gzip"), (b"vary", b"Accept-Encoding")]
        if result.status not in _NO_LENGTH:
            raw.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": result.status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


async def respond(request: Request) -> Response:
    """Answer one FHIR request; every failure becomes an OperationOutcome."""
    # The documented FastAPI routes' endpoint: FhirEndpoint's answer as a Response.
    try:
        result = await answer(request.app, request.scope, request.receive,
                              header_dict(request.scope))
    except FhirError as exc:
        return outcome_response(exc)
    except Exception:  # noqa: BLE001 - the client gets an id to quote, never the cause
        return unexpected_response(request)
    if result.body is None:
        return Response(status_code=result.status, headers=result.headers)
    return Response(result.body, result.status, result.headers,
                    media_type=result.headers.get("Content-Type", FHIR_JSON_UTF8))


async def _grant(db: Any, headers: dict[str, str], path: str) -> Grant | None:
    """The caller's grant, from its bearer token; 401 without a valid one. The
    CapabilityStatement is open to all (clients read it to find the token endpoint)."""
    if path == "metadata":
        return None
    scheme, _, token = headers.get("authorization", "").partition(" ")
    grant = None
    if scheme.lower() == "bearer" and token.strip():
        if db.is_sqlite:  # one primary-key lookup: less than the hop to a thread
            grant = active_grant(db, token.strip(), int(time.time()))
        else:
            grant = await run_in_threadpool(active_grant, db, token.strip(), int(time.time()))
    if grant is None:
        message = ("A SMART Backend Services access token is required (Authorization: "
                   "Bearer …); it is missing, expired, revoked, or not one of ours")
        raise UnauthorizedError(message, headers={
            "WWW-Authenticate": 'Bearer realm="atm", error="invalid_token"'})
    return grant


def _state(app: Any, name: str) -> Any:
    """What the app keeps under `name` (None if nothing). Through its mapping interface:
    Starlette's State answers `app.state.name` only after an ordinary attribute lookup
    has failed and built an AttributeError, which several lookups a request paid for."""
    try:
        return app.state[name]
    except KeyError:
        return None


def _throttle(app: Any, grant: Grant) -> None:
    """429 with Retry-After for a client over its rate; the others are not slowed."""
    limiter: RateLimiter | None = _state(app, "rate_limiter")
    if limiter is None:
        settings = app.state["settings"]
        limiter = app.state["rate_limiter"] = RateLimiter(settings.rate_limit_per_second,
                                                          settings.rate_limit_burst)
    wait = limiter.retry_after(grant.client.client_id, time.monotonic())
    if wait is not None:
        raise ThrottledError(f"This client is over its rate of {limiter.per_second:g} "
                             f"requests a second; retry in {wait} s",
                             headers={"Retry-After": str(wait)})


def client_address(settings: Any, scope: Scope, headers: dict[str, str]) -> str | None:
    """Where the request came from (the proxy's X-Forwarded-For when trusted)."""
    forwarded = headers.get("x-forwarded-for") if settings.trust_forwarded_headers else None
    if forwarded:
        return forwarded.split(",")[0].strip()[:255]
    client = scope.get("client")
    return client[0] if client else None


async def answer(app: Any, scope: Scope, receive: Receive,
                 headers: dict[str, str]) -> FhirResponse:
    """Answer one FHIR request; failures raise (FhirError for the client's mistakes).
    Every request, refused and failed ones too, leaves an audit record."""
    trail: AuditTrail | None = _state(app, "audit")
    audit = None if trail is None else trail.begin(
        "GET" if scope["method"] == "HEAD" else scope["method"],
        scope["path"][len(PREFIX):].strip("/"), scope["query_string"].decode("latin-1"),
        client_address(app.state["settings"], scope, headers),
        scope.get("state", {}).get("request_id"))
    try:
        result = await _serve(app, scope, receive, headers, audit)
    except FhirError as exc:
        if audit is not None:
            audit.close(exc.status)
        raise
    except Exception:
        if audit is not None:
            audit.close(500)
        raise
    if audit is not None:
        audit.close(result.status, result.headers.get("ETag"))
    return result


def _handle_write(ctx: Context, request: FhirRequest) -> FhirResponse:
    """A single write on the event loop, which runs again if another writer's failure
    undid its work (Database.write_on_loop), and with it the audit record it stored."""
    if ctx.audit is not None:
        ctx.audit.start_over()
    return handle(ctx, request)


async def _serve(app: Any, scope: Scope, receive: Receive, headers: dict[str, str],
                 audit: RequestAudit | None) -> FhirResponse:
    settings, db = app.state["settings"], app.state["db"]
    raw_query = scope["query_string"]
    query = parse_qsl(raw_query.decode("latin-1"), keep_blank_values=True) if raw_query else []
    path = scope["path"][len(PREFIX):].strip("/")
    check_accept(query, headers, html=path.endswith("$custody-report"))
    method = "GET" if scope["method"] == "HEAD" else scope["method"]
    body = await read_body(scope["method"], headers, receive, settings.max_body_bytes)
    fhir_request = FhirRequest(method=method, path=path, query=query, headers=headers,
                               body=body, content_type=headers.get("content-type"))
    grant = await _grant(db, headers, path) if settings.auth == "smart" else None
    if grant is not None:
        if audit is not None:
            audit.identify(grant.client.client_id, grant.client.organization)
        _throttle(app, grant)
    ctx = Context(db=db, settings=settings, base_url=base_url(settings, scope, headers),
                  actor=Actor(name=grant.client.client_id if grant else None,
                              request_id=scope.get("state", {}).get("request_id")),
                  grant=grant, audit=audit)
    if db.is_sqlite and _is_instance_read(method, path):
        result = handle(ctx, fhir_request)
    elif db.is_sqlite and _is_single_write(method, path, query, headers, body):
        result = await db.write_on_loop(_handle_write, ctx, fhir_request)
    else:
        result = await run_in_threadpool(handle, ctx, fhir_request)
    if grant is not None and grant.client.role in BLIND_ROLES and result.body \
            and "Content-Type" not in result.headers:  # JSON (the HTML report is its own)
        result.body = redact(result.body)
    return result
