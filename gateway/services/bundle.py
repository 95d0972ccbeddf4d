"""Batch and transaction Bundles, replayed entry by entry through the same interactions.

https://hl7.org/fhir/R4/http.html#transaction: a transaction is all-or-nothing, its
entries run in the order DELETE, POST, PUT/PATCH, GET, `urn:uuid:` and conditional
references ("Patient?identifier=…") are resolved before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from gateway import jsonio
from gateway.errors import (
    FhirError,
    InvalidError,
    Issue,
    MultipleMatchesError,
    TooLargeError,
    UnexpectedError,
)
from gateway.services import search
from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.services.resources import body_json, check_type
from gateway.store.repository import Repository, new_id
from gateway.store.timeparse import format_instant, parse_http_date

ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
REASONS = {200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified",
           400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           410: "Gone", 412: "Precondition Failed", 415: "Unsupported Media Type",
           422: "Unprocessable Entity", 500: "Internal Server Error"}


@dataclass
class Entry:
    index: int
    method: str
    path: str
    query: list[tuple[str, str]]
    full_url: str | None
    resource: Any
    headers: dict[str, str]


def process(ctx: Context, request: FhirRequest) -> FhirResponse:
    data = body_json(request)
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        raise InvalidError("POST to the base takes a Bundle of type batch or transaction")
    kind = data.get("type")
    if kind not in ("batch", "transaction"):
        raise InvalidError(f"Bundle.type must be batch or transaction, not {kind!r}",
                           issues=[Issue("invalid", "Unsupported Bundle.type",
                                         expression=("Bundle.type",))])
    raw_entries = data.get("entry") or []
    if not isinstance(raw_entries, list):
        raise InvalidError("Bundle.entry must be an array")
    if len(raw_entries) > ctx.settings.transaction_max_entries:
        raise TooLargeError(f"At most {ctx.settings.transaction_max_entries} entries per Bundle")
    entries = [_entry(ctx, i, e) for i, e in enumerate(raw_entries)]
    prefer = request.header("prefer")
    if kind == "batch":
        responses = [_run_batch_entry(ctx, e, prefer) for e in entries]
    else:
        responses = _run_transaction(ctx, entries, prefer)
    bundle = {"resourceType": "Bundle", "type": f"{kind}-response",
              "entry": [_response_entry(r) for r in responses]}
    return FhirResponse(200, jsonio.dumps(bundle))


def _entry(ctx: Context, index: int, raw: Any) -> Entry:
    where = f"Bundle.entry[{index}]"
    if not isinstance(raw, dict) or not isinstance(raw.get("request"), dict):
        raise InvalidError(f"{where} has no request", issues=[
            Issue("required", "entry.request is required", expression=(f"{where}.request",))])
    req = raw["request"]
    method, url = req.get("method"), req.get("url")
    if method not in ORDER or not isinstance(url, str) or not url:
        raise InvalidError(f"{where}.request needs a method (GET, POST, PUT, PATCH, DELETE) "
                           "and a url", issues=[Issue("invalid", "Bad request method or url",
                                                      expression=(f"{where}.request",))])
    path, query = _split_url(ctx, url)
    headers = {name: req[key] for key, name in (
        ("ifMatch", "if-match"), ("ifNoneMatch", "if-none-match"),
        ("ifNoneExist", "if-none-exist"), ("ifModifiedSince", "if-modified-since"))
        if isinstance(req.get(key), str)}
    return Entry(index, method, path, query, raw.get("fullUrl"), raw.get("resource"), headers)


def _split_url(ctx: Context, url: str) -> tuple[str, list[tuple[str, str]]]:
    if url.startswith(ctx.base_url + "/"):
        url = url[len(ctx.base_url) + 1:]
    parts = urlsplit(url)
    if parts.scheme or parts.netloc:
        raise InvalidError(f"Entry url {url} is not on this server")
    return parts.path.strip("/"), parse_qsl(parts.query, keep_blank_values=True)


def _fhir_request(entry: Entry, prefer: str | None, assigned_id: str | None = None) -> FhirRequest:
    headers = dict(entry.headers)
    if prefer:
        headers["prefer"] = prefer
    return FhirRequest(entry.method, entry.path, entry.query, headers, None, entry.resource,
                       "application/fhir+json", assigned_id)


# -- batch ------------------------------------------------------------------------------
def _run_batch_entry(ctx: Context, entry: Entry, prefer: str | None) -> FhirResponse:
    from gateway.services.router import dispatch

    try:
        _check_body(entry)
        return dispatch(ctx, _fhir_request(entry, prefer))
    except FhirError as exc:
        return _error_response(exc)
    except Exception as exc:  # noqa: BLE001 - one broken entry must not sink the batch
        return _error_response(UnexpectedError(f"Entry {entry.index} failed unexpectedly "
                                               f"({type(exc).__name__})"))


def _check_body(entry: Entry) -> None:
    if entry.method in ("POST", "PUT", "PATCH") and entry.resource is None:
        raise InvalidError(f"Bundle.entry[{entry.index}] needs a resource for {entry.method}")


def _error_response(exc: FhirError) -> FhirResponse:
    return FhirResponse(exc.status, jsonio.dumps(exc.outcome()))


# -- transaction ----------------------------------------------------------------------
def _run_transaction(ctx: Context, entries: list[Entry], prefer: str | None) -> list[FhirResponse]:
    from gateway.services.router import dispatch

    _check_overlaps(entries)
    results: dict[int, FhirResponse] = {}
    current: Entry | None = None
    with ctx.db.write() as conn:
        tx = ctx.within(conn)
        repo = Repository(conn, ctx.actor)
        try:
            ids = _plan_ids(tx, repo, entries)
            _rewrite_references(tx, repo, entries, ids)
            for current in sorted(entries, key=lambda e: (ORDER[e.method], e.index)):
                _check_body(current)
                assigned = ids[current.index][1] if current.index in ids else None
                results[current.index] = dispatch(tx, _fhir_request(current, prefer, assigned))
        except FhirError as exc:
            raise _at_entry(exc, current) from exc
    return [results[e.index] for e in entries]


def _at_entry(exc: FhirError, entry: Entry | None) -> FhirError:
    if entry is None:
        return exc
    prefix = f"Bundle.entry[{entry.index}] ({entry.method} {entry.path}): "
    exc.issues = [Issue(i.code, prefix + i.diagnostics, i.severity,
                        i.expression or (f"Bundle.entry[{entry.index}]",)) for i in exc.issues]
    exc.diagnostics = prefix + exc.diagnostics
    return exc


def _check_overlaps(entries: list[Entry]) -> None:
    """Two entries may not write the same resource (the spec leaves the result undefined)."""
    seen: dict[str, int] = {}
    for e in entries:
        if e.method == "GET" or "?" in e.path or e.method == "POST":
            continue
        key = "/".join(e.path.split("/")[:2])
        if key in seen:
            raise InvalidError(f"Bundle.entry[{seen[key]}] and Bundle.entry[{e.index}] both "
                               f"change {key}")
        seen[key] = e.index
    full_urls = [e.full_url for e in entries if e.full_url]
    if len(full_urls) != len(set(full_urls)):
        raise InvalidError("Two entries share a fullUrl")


def _plan_ids(ctx: Context, repo: Repository, entries: list[Entry]) -> dict[int, tuple[str, str]]:
    """Decide each created resource's id up front: (resource type, id) per entry index."""
    ids: dict[int, tuple[str, str]] = {}
    for e in entries:
        resource_type = e.path.split("/")[0] if e.path else ""
        if e.method == "POST" and e.path and "/" not in e.path:
            check_type(resource_type)
            found = _conditional_match(ctx, repo, resource_type, e.headers.get("if-none-exist"))
            ids[e.index] = (resource_type, found or new_id())
        elif e.method == "PUT" and e.query:
            check_type(resource_type)
            found = search.match_ids(ctx, repo, resource_type, e.query, limit=2)
            if len(found) > 1:
                raise MultipleMatchesError(f"Bundle.entry[{e.index}]: the criteria match "
                                           f"several {resource_type} resources")
            body_id = e.resource.get("id") if isinstance(e.resource, dict) else None
            ids[e.index] = (resource_type, found[0] if found else body_id or new_id())
        elif e.method == "PUT" and "/" in e.path:
            ids[e.index] = (resource_type, e.path.split("/")[1])
    return ids


def _conditional_match(ctx: Context, repo: Repository, resource_type: str,
                       criteria: str | None) -> str | None:
    if not criteria:
        return None
    found = search.match_ids(ctx, repo, resource_type, parse_qsl(criteria.lstrip("?"),
                                                                  keep_blank_values=True), 2)
    if len(found) > 1:
        raise MultipleMatchesError(f"If-None-Exist matched several {resource_type} resources")
    return found[0] if found else None


def _rewrite_references(ctx: Context, repo: Repository, entries: list[Entry],
                        ids: dict[int, tuple[str, str]]) -> None:
    """Replace `urn:uuid:` fullUrls and conditional references with Type/id."""
    by_full_url = {e.full_url: f"{ids[e.index][0]}/{ids[e.index][1]}"
                   for e in entries if e.full_url and e.index in ids}
    resolved: dict[str, str] = {}

    def target(ref: str) -> str | None:
        if ref in by_full_url:
            return by_full_url[ref]
        if "?" in ref and not ref.startswith(("http:", "https:")):
            if ref not in resolved:
                resolved[ref] = _resolve_conditional(ctx, repo, ref)
            return resolved[ref]
        if ref.startswith("urn:uuid:") or ref.startswith("urn:oid:"):
            raise InvalidError(f"Reference {ref} names no entry of this Bundle")
        return None

    for e in entries:
        if e.resource is not None and e.method in ("POST", "PUT"):
            _walk_references(e.resource, target)
        if e.method == "PUT" and e.query and isinstance(e.resource, dict):
            e.resource.setdefault("id", ids[e.index][1])
            e.path, e.query = f"{ids[e.index][0]}/{ids[e.index][1]}", []


def _resolve_conditional(ctx: Context, repo: Repository, ref: str) -> str:
    resource_type, _, criteria = ref.partition("?")
    check_type(resource_type)
    found = search.match_ids(ctx, repo, resource_type,
                             parse_qsl(criteria, keep_blank_values=True), limit=2)
    if len(found) != 1:
        problem = "no" if not found else "several"
        error = MultipleMatchesError if found else InvalidError
        raise error(f"Conditional reference {ref} matches {problem} resources")
    return f"{resource_type}/{found[0]}"


def _walk_references(node: Any, target: Any) -> None:
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str):
            new = target(ref)
            if new is not None:
                node["reference"] = new
        for value in node.values():
            if isinstance(value, dict | list):
                _walk_references(value, target)
    elif isinstance(node, list):
        for item in node:
            _walk_references(item, target)


# -- responses ------------------------------------------------------------------------
def _response_entry(response: FhirResponse) -> dict[str, Any]:
    reason = REASONS.get(response.status, "")
    out: dict[str, Any] = {"status": f"{response.status} {reason}".strip()}
    headers = response.headers
    if "Location" in headers:
        out["location"] = headers["Location"]
    if "ETag" in headers:
        out["etag"] = headers["ETag"]
    body = jsonio.loads_trusted(response.body) if response.body else None
    last_updated = (body or {}).get("meta", {}).get("lastUpdated")
    if last_updated:
        out["lastModified"] = last_updated
    elif "Last-Modified" in headers:
        micros = parse_http_date(headers["Last-Modified"])
        if micros is not None:
            out["lastModified"] = format_instant(micros)
    entry: dict[str, Any] = {"response": out}
    if body is not None:
        if response.status >= 400 or body.get("resourceType") == "OperationOutcome":
            out["outcome"] = body
        else:
            entry["resource"] = body
            if "Location" in headers:
                entry["fullUrl"] = headers["Location"].split("/_history/")[0]
    return entry
