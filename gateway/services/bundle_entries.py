"""Bundle entries in and out: parsing a request entry, shaping its response entry.

https://hl7.org/fhir/R4/bundle.html (Bundle.entry.request / Bundle.entry.response) and
https://hl7.org/fhir/R4/http.html#patch (a PATCH entry carries its JSON Patch in a Binary).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from gateway import jsonio
from gateway.errors import InvalidError, Issue, UnsupportedMediaTypeError
from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.store.timeparse import format_instant, parse_http_date

# The methods an entry may use, and their phase in a transaction (http.html#trules).
ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
REASONS = {200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified",
           400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 406: "Not Acceptable", 409: "Conflict", 410: "Gone",
           412: "Precondition Failed", 413: "Payload Too Large",
           415: "Unsupported Media Type", 422: "Unprocessable Entity",
           500: "Internal Server Error"}
JSON_PATCH = "application/json-patch+json"


@dataclass(frozen=True)
class Entry:
    """One parsed Bundle.entry: the request it carries, relative to the FHIR base."""

    index: int
    method: str
    path: str
    query: list[tuple[str, str]]
    full_url: str | None
    resource: Any
    headers: dict[str, str]

    @property
    def where(self) -> str:
        return f"Bundle.entry[{self.index}]"

    @property
    def resource_type(self) -> str:
        return self.path.split("/")[0]

    @property
    def instance(self) -> str | None:
        """The "Type/id" the url names, or None when it names no single resource."""
        parts = self.path.split("/")
        return "/".join(parts) if len(parts) == 2 and not self.query else None


def invalid(message: str, expression: str, code: str = "invalid") -> InvalidError:
    return InvalidError(message, issues=[Issue(code, message, expression=(expression,))])



def parse_entry(ctx: Context, index: int, raw: Any) -> Entry:
    """Bundle.entry[index] as an Entry; InvalidError (400) naming it when malformed."""
    where = f"Bundle.entry[{index}]"
    if not isinstance(raw, dict) or not isinstance(raw.get("request"), dict):
        raise invalid(f"{where} has no request", f"{where}.request", "required")
    req = raw["request"]
    method, url = req.get("method"), req.get("url")
    if not isinstance(method, str) or method not in ORDER or not isinstance(url, str) \
            or not url.strip():
        raise invalid(f"{where}.request needs a method (GET, HEAD, POST, PUT, PATCH, "
                      "DELETE) and a url", f"{where}.request")
    full_url = raw.get("fullUrl")
    if full_url is not None and not isinstance(full_url, str):
        raise invalid(f"{where}.fullUrl must be a string", f"{where}.fullUrl", "structure")
    path, query = _split_url(ctx, where, url)
    if method == "POST" and not path:
        raise invalid(f"{where}: a batch or transaction cannot be nested in a Bundle",
                      f"{where}.request.url", "not-supported")
    headers = {name: req[key] for key, name in (
        ("ifMatch", "if-match"), ("ifNoneMatch", "if-none-match"),
        ("ifNoneExist", "if-none-exist"), ("ifModifiedSince", "if-modified-since"))
        if isinstance(req.get(key), str)}
    resource = raw.get("resource")
    if method in ("POST", "PUT", "PATCH") and resource is None:
        raise invalid(f"{where} needs a resource for {method}", f"{where}.resource",
                      "required")
    if method == "PATCH":
        resource = _patch_operations(where, resource)
    return Entry(index, method, path, query, full_url, resource, headers)


def _split_url(ctx: Context, where: str, url: str) -> tuple[str, list[tuple[str, str]]]:
    if url.startswith(ctx.base_url + "/") or url.startswith(ctx.base_url + "?"):
        url = url[len(ctx.base_url):]
    parts = urlsplit(url)
    if parts.scheme or parts.netloc:
        raise invalid(f"{where}.request.url {url} is not on this server ({ctx.base_url})",
                      f"{where}.request.url", "not-supported")
    return parts.path.strip("/"), parse_qsl(parts.query, keep_blank_values=True)


def _patch_operations(where: str, resource: Any) -> Any:
    """A PATCH entry carries its JSON Patch as a Binary (http.html#patch); unwrap it."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Binary":
        return resource
    media = str(resource.get("contentType") or "").split(";")[0].strip().lower()
    if media != JSON_PATCH:
        raise UnsupportedMediaTypeError(f"{where}: a PATCH Binary must have contentType "
                                        f"{JSON_PATCH}, not {media or 'none'}")
    try:
        raw = base64.b64decode(str(resource.get("data") or ""), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid(f"{where}.resource.data is not base64", f"{where}.resource.data") from exc
    return jsonio.loads(raw)


def entry_request(entry: Entry, prefer: str | None, path: str | None = None,
             query: list[tuple[str, str]] | None = None, resource: Any = None,
             assigned_id: str | None = None) -> FhirRequest:
    headers = dict(entry.headers)
    if prefer:
        headers["prefer"] = prefer
    method = "GET" if entry.method == "HEAD" else entry.method
    return FhirRequest(method, entry.path if path is None else path,
                       entry.query if query is None else query, headers, None,
                       entry.resource if resource is None else resource,
                       "application/fhir+json", assigned_id)


def response_entry(response: FhirResponse, with_resource: bool = True) -> dict[str, Any]:
    """Bundle.entry.response; the stored bytes are embedded as they are, not re-encoded."""
    out: dict[str, Any] = {"status": f"{response.status} {REASONS.get(response.status, '')}"
                           .strip()}
    headers = response.headers
    if "Location" in headers:
        out["location"] = headers["Location"]
    if "ETag" in headers:
        out["etag"] = headers["ETag"]
    entry: dict[str, Any] = {}
    body = response.body
    if body:
        head = orjson.loads(body)
        last_updated = (head.get("meta") or {}).get("lastUpdated")
        if last_updated:
            out["lastModified"] = last_updated
        if response.status >= 400 or head.get("resourceType") == "OperationOutcome":
            out["outcome"] = orjson.Fragment(body)
        elif with_resource:
            if "Location" in headers:
                entry["fullUrl"] = headers["Location"].split("/_history/")[0]
            entry["resource"] = orjson.Fragment(body)
    if "lastModified" not in out and "Last-Modified" in headers:
        micros = parse_http_date(headers["Last-Modified"])
        if micros is not None:
            out["lastModified"] = format_instant(micros)
    entry["response"] = out
    return entry
