"""Batch and transaction Bundles, replayed entry by entry through the same interactions.

https://hl7.org/fhir/R4/http.html#transaction: a transaction is all-or-nothing; identities
(created ids, conditional matches) are resolved up front, `urn:uuid:` and conditional
references ("Patient?identifier=…") are rewritten, then entries run in the order DELETE,
POST, PUT/PATCH, GET. A batch runs each entry on its own (http.html#batch).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, urlencode

from sqlalchemy.exc import DBAPIError

from gateway import jsonio
from gateway.audit.events import answered
from gateway.errors import (
    ConflictError,
    FhirError,
    Issue,
    MultipleMatchesError,
    TooLargeError,
    UnexpectedError,
)
from gateway.services import search
from gateway.services.bundle_entries import (
    ORDER,
    Entry,
    entry_request,
    invalid,
    parse_entry,
    response_entry,
)
from gateway.services.bundle_references import References
from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.services.resources import body_json, check_type
from gateway.store.database import is_transient
from gateway.store.repository import Repository, new_id

log = logging.getLogger("gateway.bundle")

# A transaction that lost a deadlock (see database.is_transient) is replayed, as is one
# whose plan a concurrent writer made stale: nothing of the attempt was committed.
TRANSACTION_ATTEMPTS = 3


@dataclass
class Plan:
    """What a transaction decided before writing: ids of created or matched resources."""

    ids: dict[int, tuple[str, str]] = field(default_factory=dict)
    targets: dict[int, str] = field(default_factory=dict)  # entry -> "Type/id" it changes


def process(ctx: Context, request: FhirRequest) -> FhirResponse:
    data = body_json(request)
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        raise invalid("POST to the base takes a Bundle of type batch or transaction",
                      "Bundle")
    kind = data.get("type")
    if kind not in ("batch", "transaction"):
        raise invalid(f"Bundle.type must be batch or transaction, not {kind!r}",
                      "Bundle.type", "not-supported")
    raw_entries = data.get("entry") or []
    if not isinstance(raw_entries, list):
        raise invalid("Bundle.entry must be an array", "Bundle.entry", "structure")
    limit = ctx.settings.transaction_max_entries
    if len(raw_entries) > limit:
        raise TooLargeError(f"The Bundle has {len(raw_entries)} entries; at most {limit} "
                            "are accepted")
    prefer = request.header("prefer")
    if ctx.audit is not None:
        ctx.audit.subtype = kind
    if kind == "batch":
        answers = [_batch_entry(ctx, i, raw, prefer) for i, raw in enumerate(raw_entries)]
    else:
        entries = [parse_entry(ctx, i, raw) for i, raw in enumerate(raw_entries)]
        answers = _run_transaction(ctx, entries, prefer)
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": f"{kind}-response"}
    if answers:  # FHIR JSON has no empty arrays
        bundle["entry"] = answers
    return FhirResponse(200, jsonio.dumps(bundle))


def _answer(entry: Entry, response: FhirResponse) -> dict[str, Any]:
    """The response Bundle's entry for one request entry (HEAD: without the resource)."""
    return response_entry(response, with_resource=entry.method != "HEAD")


# -- batch -----------------------------------------------------------------------------
def _batch_entry(ctx: Context, index: int, raw: Any, prefer: str | None) -> dict[str, Any]:
    """Each batch entry succeeds or fails on its own, in its own database transaction."""
    from gateway.services.router import dispatch

    try:
        entry = parse_entry(ctx, index, raw)
        request = entry_request(entry, prefer)
        audit = None if ctx.audit is None else ctx.audit.entry(  # each entry is audited
            request.method, request.path, urlencode(request.query))
        return _answer(entry, answered(audit, lambda: dispatch(replace(ctx, audit=audit),
                                                                request)))
    except FhirError as exc:
        return response_entry(_error_response(exc))
    except Exception:  # noqa: BLE001 - one broken entry must not sink the batch
        log.exception("batch entry %d failed", index)
        return response_entry(_error_response(UnexpectedError(
            f"Bundle.entry[{index}] failed unexpectedly; the operators have the details")))


def _error_response(exc: FhirError) -> FhirResponse:
    return FhirResponse(exc.status, jsonio.dumps(exc.outcome()), exc.headers)


# -- transaction -----------------------------------------------------------------------
def _run_transaction(ctx: Context, entries: list[Entry], prefer: str | None
                     ) -> list[dict[str, Any]]:
    _check_full_urls(entries)
    for attempt in range(1, TRANSACTION_ATTEMPTS + 1):
        try:
            return _transaction(ctx, entries, prefer)
        except DBAPIError as exc:
            if not is_transient(exc):
                raise
            log.warning("transaction attempt %d hit a concurrent writer; replaying", attempt)
        except _StalePlanError as exc:
            log.info("transaction attempt %d planned on stale data (%s); replaying", attempt, exc)
    raise ConflictError("The transaction kept colliding with concurrent writers; retry it")


class _StalePlanError(Exception):
    """A concurrent writer changed what the plan was based on; replaying re-plans."""


def _transaction(ctx: Context, entries: list[Entry], prefer: str | None
                 ) -> list[dict[str, Any]]:
    from gateway.services.router import dispatch

    results: dict[int, FhirResponse] = {}
    if ctx.audit is not None:
        ctx.audit.pending.clear()  # a replay starts over
    with ctx.db.write() as conn:
        tx = ctx.within(conn)
        repo = Repository(conn, ctx.actor)
        plan = _plan_ids(tx, repo, entries)
        _check_overlaps(entries, plan)
        repo.lock_rows({_split_reference(t) for t in plan.targets.values()})
        requests = _rewrite_references(tx, repo, entries, plan, prefer)
        for entry in sorted(entries, key=lambda e: _run_order(e, plan)):
            with _blame(entry):
                response = dispatch(tx, requests[entry.index])
                _check_planned_id(entry, plan, response)
            results[entry.index] = response
        if ctx.audit is not None:  # committed with the Bundle's changes, or not at all
            ctx.audit.store_with(conn)
    # Shaped after the commit: the (SQLite) writer is not held for it.
    return [_answer(e, results[e.index]) for e in entries]


def _split_reference(reference: str) -> tuple[str, str]:
    resource_type, _, resource_id = reference.partition("/")
    return resource_type, resource_id


def _run_order(entry: Entry, plan: Plan) -> tuple[int, str, int]:
    """The spec's phases; inside a phase, writes go in resource order so that concurrent
    transactions lock rows in the same order (fewer deadlocks on PostgreSQL)."""
    phase = ORDER[entry.method]
    key = plan.targets.get(entry.index, "") if entry.method in ("DELETE", "PUT", "PATCH") else ""
    return phase, key, entry.index


@contextmanager
def _blame(entry: Entry) -> Iterator[None]:
    """Name the failing entry in the OperationOutcome of a failed transaction."""
    try:
        yield
    except FhirError as exc:
        raise _at_entry(exc, entry) from None


def _at_entry(exc: FhirError, entry: Entry) -> FhirError:
    if getattr(exc, "bundle_entry", None) is not None:
        return exc
    where, resource_type = entry.where, entry.resource_type
    prefix = f"{where} ({entry.method} {entry.path or '/'}): "

    def located(expression: tuple[str, ...]) -> tuple[str, ...]:
        if not expression:
            return (where,)
        return tuple(f"{where}.resource{e[len(resource_type):]}"
                     if resource_type and (e == resource_type or e.startswith(resource_type + "."))
                     else e for e in expression)

    exc.issues = [Issue(i.code, prefix + i.diagnostics, i.severity, located(i.expression))
                  for i in exc.issues]
    exc.diagnostics = prefix + exc.diagnostics
    exc.bundle_entry = entry.index  # type: ignore[attr-defined]
    return exc


def _check_full_urls(entries: list[Entry]) -> None:
    seen: dict[str, int] = {}
    for e in entries:
        if e.full_url is None:
            continue
        if e.full_url in seen:
            raise invalid(f"Bundle.entry[{seen[e.full_url]}] and {e.where} share the "
                          f"fullUrl {e.full_url}", f"{e.where}.fullUrl")
        seen[e.full_url] = e.index


def _check_overlaps(entries: list[Entry], plan: Plan) -> None:
    """Two entries may not change the same resource, conditional matches included: the
    spec says such a transaction SHALL fail."""
    seen: dict[str, int] = {}
    for e in entries:
        target = plan.targets.get(e.index)
        if target is None:
            continue
        if target in seen:
            raise invalid(f"Bundle.entry[{seen[target]}] and {e.where} both change "
                          f"{target}", e.where)
        seen[target] = e.index


# -- identities --------------------------------------------------------------------------
def _plan_ids(ctx: Context, repo: Repository, entries: list[Entry]) -> Plan:
    """Decide, before anything is written, which resource each write entry creates or
    changes: server ids for creates, the matches of conditional interactions."""
    plan = Plan()
    for e in entries:
        with _blame(e):
            if e.method == "POST" and e.path and "/" not in e.path:
                check_type(e.resource_type)
                found = _conditional_match(ctx, repo, e)
                plan.ids[e.index] = (e.resource_type, found or new_id())
            elif e.method in ("PUT", "PATCH", "DELETE"):
                _plan_change(ctx, repo, e, plan)
    return plan


def _plan_change(ctx: Context, repo: Repository, e: Entry, plan: Plan) -> None:
    if e.instance is not None:
        plan.targets[e.index] = e.instance
        if e.method == "PUT":
            plan.ids[e.index] = (e.resource_type, e.path.split("/")[1])
        return
    if "/" in e.path or not e.query:
        return  # not a resource change (or malformed): dispatch answers it
    check_type(e.resource_type)
    found = search.match_ids(ctx, repo, e.resource_type, e.query, limit=2)
    if len(found) > 1:
        raise MultipleMatchesError(f"The criteria match several {e.resource_type} resources")
    if e.method == "PUT":
        body_id = e.resource.get("id") if isinstance(e.resource, dict) else None
        resource_id = found[0] if found else body_id if isinstance(body_id, str) else new_id()
        plan.ids[e.index] = (e.resource_type, resource_id)
        plan.targets[e.index] = f"{e.resource_type}/{resource_id}"
    elif found:
        plan.targets[e.index] = f"{e.resource_type}/{found[0]}"


def _conditional_match(ctx: Context, repo: Repository, e: Entry) -> str | None:
    criteria = e.headers.get("if-none-exist")
    if not criteria:
        return None
    found = search.match_ids(ctx, repo, e.resource_type,
                             parse_qsl(criteria.lstrip("?"), keep_blank_values=True), 2)
    if len(found) > 1:
        raise MultipleMatchesError(f"ifNoneExist matched several {e.resource_type} resources")
    return found[0] if found else None


def _check_planned_id(entry: Entry, plan: Plan, response: FhirResponse) -> None:
    """A conditional create must land on the resource other entries were pointed at; it
    does not when another client created a match after the plan was made."""
    planned = plan.ids.get(entry.index)
    location = response.headers.get("Location")
    if entry.method != "POST" or planned is None or location is None:
        return
    landed = location.split("/_history/")[0].rsplit("/", 1)[-1]
    if landed != planned[1]:
        raise _StalePlanError(f"{entry.where} matched {planned[0]}/{landed}")


# -- references --------------------------------------------------------------------------
def _rewrite_references(ctx: Context, repo: Repository, entries: list[Entry], plan: Plan,
                        prefer: str | None) -> dict[int, FhirRequest]:
    """The request each entry runs, with `urn:uuid:`, fullUrl and conditional references
    replaced by Type/id (one pass over each body; lookups are dictionary hits)."""
    refs = References(ctx, repo, {e.full_url: "/".join(plan.ids[e.index]) for e in entries
                                  if e.full_url and e.index in plan.ids})
    requests: dict[int, FhirRequest] = {}
    for e in entries:
        with _blame(e):
            requests[e.index] = _rewritten_request(e, plan, refs, prefer)
    return requests


def _rewritten_request(e: Entry, plan: Plan, refs: References, prefer: str | None
                       ) -> FhirRequest:
    resource = e.resource
    if e.method != "DELETE":
        resource = refs.rewritten(e.resource, f"{e.where}.resource")
    # Search criteria may name an entry too ("Task?subject=urn:uuid:…"); other urn values
    # (identifier=urn:oid:…|1) are plain tokens.
    query = [(k, refs.by_full_url.get(v, v)) for k, v in e.query]
    if e.method == "POST":
        planned = plan.ids.get(e.index)
        return entry_request(e, prefer, query=query, resource=resource,
                        assigned_id=planned[1] if planned else None)
    target_id = plan.targets.get(e.index)
    if e.instance is None and target_id is not None:
        # A resolved conditional interaction runs as the plain one on its match.
        if e.method == "PUT" and isinstance(resource, dict) and "id" not in resource:
            resource = {**resource, "id": target_id.split("/")[1]}
        return entry_request(e, prefer, path=target_id, query=[], resource=resource)
    return entry_request(e, prefer, query=query, resource=resource)
