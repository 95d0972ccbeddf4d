"""HTTP details of FHIR REST: content negotiation, body limits, the absolute base URL."""

from __future__ import annotations

from fastapi import Request

from gateway.errors import NotAcceptableError, TooLargeError

FHIR_JSON_UTF8 = "application/fhir+json; charset=utf-8"
_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir", "*/*",
               "application/*", "text/json")
_FORMATS = {"json", "application/json", "application/fhir+json", "application/json+fhir"}


def check_accept(request: Request) -> None:
    """We answer JSON only: a client that accepts only XML (or asks _format=xml) gets 406."""
    fmt = request.query_params.get("_format")
    if fmt is not None and fmt not in _FORMATS:
        raise NotAcceptableError(f"_format={fmt} is not supported: this server speaks JSON")
    accept = request.headers.get("accept")
    if not accept:
        return
    media = [m.split(";")[0].strip().lower() for m in accept.split(",")]
    if not any(m in _JSON_TYPES or m.endswith("+json") for m in media):
        raise NotAcceptableError(f"Cannot answer in {accept}: this server speaks "
                                 "application/fhir+json")


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, refusing more than `limit` bytes (declared or streamed) with 413."""
    if request.method in ("GET", "HEAD", "DELETE") and not request.headers.get("content-length"):
        return None
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise TooLargeError(f"Body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLargeError(f"Body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks) or None


def base_url(request: Request) -> str:
    """ATM_BASE_URL, or the proxy's X-Forwarded-* view of it when configured to trust it."""
    settings = request.app.state.settings
    headers = request.headers
    if not settings.trust_forwarded_headers:
        if settings.base_url:
            return str(settings.base_url)
        return f"{request.url.scheme}://{headers.get('host', request.url.netloc)}/fhir"
    proto = headers.get("x-forwarded-proto", request.url.scheme).split(",")[0].strip()
    host = headers.get("x-forwarded-host", headers.get("host", request.url.netloc))
    prefix = headers.get("x-forwarded-prefix", "").rstrip("/")
    return f"{proto}://{host.split(',')[0].strip()}{prefix}/fhir"
