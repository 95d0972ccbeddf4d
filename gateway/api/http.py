"""HTTP details of FHIR REST: content negotiation, body limits, the absolute base URL.

They work on the ASGI scope and a dict of the request's headers (lower-case names), so
the FHIR endpoint needs no framework Request object per request.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.types import Receive, Scope

from gateway.errors import InvalidError, NotAcceptableError, TooLargeError
from gateway.settings import Settings

FHIR_JSON_UTF8 = "application/fhir+json; charset=utf-8"
_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir", "*/*",
               "application/*", "text/json")
_FORMATS = {"json", "application/json", "application/fhir+json", "application/json+fhir"}
_HTML_FORMATS = {"html", "text/html"}
_BODILESS = ("GET", "HEAD", "DELETE")


def header_dict(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (ASGI servers lower-case them)."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def check_accept(query: list[tuple[str, str]], headers: dict[str, str],
                 html: bool = False) -> None:
    """We answer JSON only (and HTML where `html`: the printable custody report): a
    client that accepts only XML (or asks _format=xml) gets 406."""
    fmt = next((v for k, v in reversed(query) if k == "_format"), None)
    if fmt is not None and fmt not in _FORMATS and not (html and fmt in _HTML_FORMATS):
        raise NotAcceptableError(f"_format={fmt} is not supported: this server speaks JSON")
    accept = headers.get("accept")
    if accept and not _answerable(accept, html):
        raise NotAcceptableError(f"Cannot answer in {accept}: this server speaks "
                                 "application/fhir+json")


@lru_cache(maxsize=256)
def _answerable(accept: str, html: bool) -> bool:
    """Whether an Accept header admits JSON (or HTML where `html`): clients send the same
    few values on every request."""
    media = [m.split(";")[0].strip().lower() for m in accept.split(",")]
    return any(m in _JSON_TYPES or m.endswith("+json") or (html and m == "text/html")
               for m in media)


async def read_body(method: str, headers: dict[str, str], receive: Receive,
                    limit: int) -> bytes | None:
    """The body, refusing more than `limit` bytes (declared or streamed) with 413."""
    declared = headers.get("content-length")
    if method in _BODILESS and not declared:
        return None
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise TooLargeError(f"Body of {declared} bytes exceeds the limit of {limit}")
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidError("The client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLargeError(f"Body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks) or None


def base_url(settings: Settings, scope: Scope, headers: dict[str, str]) -> str:
    """ATM_BASE_URL, or the proxy's X-Forwarded-* view of it when configured to trust it."""
    if not settings.trust_forwarded_headers:
        if settings.base_url:
            return settings.base_url
        return f"{scope['scheme']}://{headers.get('host') or _server(scope)}/fhir"
    scheme: str = scope["scheme"]
    proto = headers.get("x-forwarded-proto", scheme).split(",")[0].strip()
    host = headers.get("x-forwarded-host", headers.get("host") or _server(scope))
    prefix = headers.get("x-forwarded-prefix", "").rstrip("/")
    return f"{proto}://{host.split(',')[0].strip()}{prefix}/fhir"


def _server(scope: Scope) -> str:
    server: Any = scope.get("server")
    return f"{server[0]}:{server[1]}" if server else "localhost"


async def form_fields(request: Request) -> dict[str, str] | None:
    """An HTML or OAuth2 form's fields (application/x-www-form-urlencoded), or None when
    the body is not one."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        return None
    try:
        return dict(parse_qsl((await request.body()).decode("utf-8"), keep_blank_values=True))
    except UnicodeDecodeError:
        return None
