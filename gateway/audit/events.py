"""What one request's audit record says: who asked, from where, for what, and how it ended.

A request that changes data stores its record in the same database transaction as the
change (`RequestAudit.store_with`, called by Context.writing and by transaction Bundles):
the change and its record commit together or not at all, and a change whose record cannot
be stored fails. Every other request (reads, searches, refusals, failures, a write that
changed nothing) hands its record to the trail's writer when it ends (`RequestAudit.close`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gateway.errors import FhirError
from gateway.store.timeparse import now_micros

ROW_COLUMNS = ("recorded", "event_type", "subtype", "action", "outcome", "status",
               "client_id", "organization", "address", "request_id", "method", "path",
               "query", "entity", "entities")
"""An audit row's recorded columns, in the order `RequestAudit.row` gives them."""

Row = tuple[Any, ...]
Closed = tuple[int, int, "str | None", "RequestAudit"]
"""What `close` queues: (recorded µs, HTTP status, ETag, the request's audit); the trail's
writer thread turns it into a row, so the request pays only for a queue put."""


def outcome_of(status: int) -> str:
    """BALP's outcome codes by HTTP status."""
    if status < 400:
        return "0"
    return "4" if status < 500 else "8"


_ACTION = {"create": "C", "read": "R", "vread": "R", "update": "U", "patch": "U",
           "delete": "D"}


def interaction(method: str, path: str) -> str:
    """The FHIR restful-interaction code of a request (path relative to the FHIR base)."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return "transaction" if method == "POST" else "search-system"
    head, rest = parts[0], parts[1:]
    if head == "metadata":
        return "capabilities"
    if head in ("_history", "_search"):
        return "history-system" if head == "_history" else "search-system"
    if any(p.startswith("$") for p in parts):
        return "operation"
    if not rest:
        return {"GET": "search-type", "POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete"}.get(method, "operation")
    if rest[0] == "_search":
        return "search-type"
    if rest[0] == "_history":
        return "history-type" if len(rest) == 1 else "read"
    if len(rest) >= 2 and rest[1] == "_history":
        return "history-instance" if len(rest) == 2 else "vread"
    return {"GET": "read", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
        method, "operation")


def action_of(subtype: str) -> str:
    return _ACTION.get(subtype, "E")


def _target(path: str) -> str | None:
    """The resource a request names (Type/id[/_history/n]), if it names one."""
    parts = [p for p in path.split("/") if p]
    if len(parts) < 2 or parts[1].startswith(("_", "$")) or parts[0].startswith(("_", "$")):
        return None
    if len(parts) >= 4 and parts[2] == "_history":
        return "/".join(parts[:4])
    return "/".join(parts[:2])


def unversioned(reference: str) -> str:
    """Type/id of Type/id/_history/n."""
    return "/".join(reference.split("/")[:2])


def _version(etag: str | None) -> str | None:
    if not etag:
        return None
    value = etag.removeprefix("W/").strip('"')
    return value if value.isdigit() else None


class RequestAudit:
    """One request's record in the making. Writes add the resources they changed; the
    record is stored with the write, or, when nothing was stored so, queued at `close`."""

    __slots__ = ("_queue", "method", "path", "query", "address", "request_id", "client_id",
                 "organization", "subtype", "event_type", "pending", "stored")

    def __init__(self, queue: Callable[[Closed], None], method: str, path: str,
                 query: str | None, address: str | None, request_id: str | None,
                 event_type: str = "rest") -> None:
        self._queue = queue
        self.method, self.path, self.query = method, path, query or None
        self.address, self.request_id = address, request_id
        self.client_id: str | None = None
        self.organization: str | None = None
        self.subtype: str | None = None  # set when the path alone does not tell (Bundles)
        self.event_type = event_type
        self.pending: list[str] = []  # changed inside a transaction Bundle, not yet stored
        self.stored = False

    def identify(self, client_id: str | None, organization: str | None) -> None:
        self.client_id, self.organization = client_id, organization

    def entry(self, method: str, path: str, query: str | None) -> RequestAudit:
        """A batch entry's own record (each entry is an interaction of its own)."""
        child = RequestAudit(self._queue, method, path, query, self.address, self.request_id)
        child.identify(self.client_id, self.organization)
        return child

    def note_written(self, references: Sequence[str]) -> None:
        """Resources changed inside a transaction Bundle: stored with its commit."""
        self.pending.extend(references)

    def store_with(self, conn: Any, references: Sequence[str] = ()) -> None:
        """Store the record of these changes (and any noted) in the caller's transaction."""
        from gateway.audit.log import insert_rows  # the store's side of the trail

        changed = (*self.pending, *references)
        self.pending.clear()
        if changed:
            insert_rows(conn, [self.row(now_micros(), None, changed)])
            self.stored = True

    def start_over(self) -> None:
        """The request's write runs again: whatever its first run stored was undone."""
        self.pending.clear()
        self.stored = False

    def close(self, status: int, etag: str | None = None) -> None:
        """The request is answered: queue its record unless its write stored it."""
        if not self.stored:
            self._queue((now_micros(), status, etag, self))

    def closed_row(self, recorded: int, status: int, etag: str | None) -> Row:
        """The row of a request that ended without storing its record: the resource it
        named, if any, with the version it was answered."""
        target = _target(self.path) if self.event_type == "rest" else None
        version = _version(etag) if status < 300 else None
        if target and version and "/_history/" not in target:
            target = f"{target}/_history/{version}"
        return self.row(recorded, status, (target,) if target else ())

    def row(self, recorded: int, status: int | None, entities: Sequence[str]) -> Row:
        """The audit row's columns (ROW_COLUMNS); `status` None: stored with its write."""
        subtype = self.subtype or (self.event_type if self.event_type != "rest"
                                   else interaction(self.method, self.path))
        return (recorded, self.event_type, subtype, action_of(subtype),
                "0" if status is None else outcome_of(status), status, self.client_id,
                self.organization, self.address, self.request_id, self.method, self.path,
                self.query, unversioned(entities[0]) if entities else None,
                " ".join(entities) or None)


def answered(audit: RequestAudit | None, call: Callable[[], Any]) -> Any:
    """Run one interaction (returning a FhirResponse) and close its audit record with how
    it ended, failures included."""
    if audit is None:
        return call()
    try:
        response = call()
    except FhirError as exc:
        audit.close(exc.status)
        raise
    except Exception:
        audit.close(500)
        raise
    audit.close(response.status, response.headers.get("ETag"))
    return response
