"""Notification Bundles as the Subscriptions Backport IG (R4) shapes them: a `history`
Bundle whose first entry is the subscription's status (a Parameters), with
`events-since-subscription-start` and, per event, its `event-number`, `focus` and
`additional-context`; then the resources, as the payload content asks.
https://hl7.org/fhir/uv/subscriptions-backport/STU1.1/notifications.html

What a notification carries is what its subscriber may read: resources outside the
client's role and organisation are left out, and patient details are removed for roles
that work by chain-of-identity code alone (gateway/auth/redaction.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select

from gateway import jsonio
from gateway.auth.clients import client_from_row
from gateway.auth.policies import role_allows
from gateway.auth.redaction import BLIND_ROLES, redact
from gateway.auth.scopes import render
from gateway.auth.tokens import Grant
from gateway.services import visibility
from gateway.services.context import Context
from gateway.store.indexing import references_in
from gateway.store.repository import Repository
from gateway.store.schema import oauth_clients
from gateway.store.search_params import params_for
from gateway.store.timeparse import format_instant, now_micros

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
NOTIFICATION_PROFILE = BACKPORT + "backport-subscription-notification-r4"
STATUS_PROFILE = BACKPORT + "backport-subscription-status-r4"
_METHOD = {"create": ("POST", "201"), "update": ("PUT", "200"), "delete": ("DELETE", "204")}


@dataclass(frozen=True)
class Reader:
    """Who a notification is for: None when the server runs without authentication, or
    the Subscription was made by an internal caller."""

    grant: Grant | None
    disabled: bool = False

    @staticmethod
    def of_row(row: Any, conn: Connection | None = None) -> Reader:
        """The reader of a subscriptions row (its client looked up on `conn`)."""
        if row is None or row.client_id is None or conn is None:
            return Reader(None)
        found = conn.execute(select(oauth_clients).where(
            oauth_clients.c.client_id == row.client_id)).first()
        if found is None:
            return Reader(None, disabled=True)  # the client was removed: nobody to tell
        client = client_from_row(found)
        return Reader(Grant(client, render(client.scopes), 0), disabled=client.disabled)

    @property
    def blind(self) -> bool:
        return self.grant is not None and self.grant.client.role in BLIND_ROLES

    def may_read(self, ctx: Context, repo: Repository, resource_type: str,
                 resource_id: str) -> bool:
        if self.grant is None:
            return True
        if self.disabled:
            return False
        role = self.grant.client.role
        if not role_allows(role, resource_type, "r") or not any(
                scope.covers(resource_type, "r") for scope in self.grant.scope_list):
            return False
        as_reader = Context(db=ctx.db, settings=ctx.settings, base_url=ctx.base_url,
                            grant=self.grant, conn=repo.conn)
        return visibility.visible(as_reader, repo, resource_type, resource_id)


def _url(base_url: str, path: str) -> str:
    return f"{base_url}/{path}" if base_url else path


def _full_url(base_url: str, path: str) -> dict[str, str]:
    """A Bundle entry's fullUrl is absolute: without ATM_BASE_URL there is none to give."""
    return {"fullUrl": f"{base_url}/{path}"} if base_url else {}


def status_parameters(base_url: str, subscription: dict[str, Any], row: Any, kind: str,
                      events: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The SubscriptionStatus (R4: a Parameters) of a notification or a $status answer."""
    parameter: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {
            "reference": _url(base_url, f"Subscription/{subscription['id']}")}},
        {"name": "topic", "valueCanonical": subscription.get("criteria", "")},
        {"name": "status", "valueCode": row.status if row is not None
         else subscription.get("status", "requested")},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start",
         "valueString": str(row.events if row is not None else 0)}]
    for event in events:
        parts: list[dict[str, Any]] = [
            {"name": "event-number", "valueString": str(event["number"])},
            {"name": "timestamp", "valueInstant": format_instant(event["at"])}]
        if "focus" in event:
            parts.append({"name": "focus", "valueReference": {"reference": event["focus"]}})
        parts += [{"name": "additional-context", "valueReference": {"reference": ref}}
                  for ref in event.get("context", ())]
        parameter.append({"name": "notification-event", "part": parts})
    if row is not None and row.last_error and kind == "query-status":
        parameter.append({"name": "error", "valueCodeableConcept": {"text": row.last_error}})
    return {"resourceType": "Parameters", "id": str(uuid.uuid4()),
            "meta": {"profile": [STATUS_PROFILE]}, "parameter": parameter}


def _context_references(resource: dict[str, Any], includes: Sequence[str]) -> list[str]:
    """Type/id of the local resources the topic's `include`s name on this resource."""
    found: list[str] = []
    for include in includes:
        source, _, name = include.partition(":")
        param = params_for(source).get(name) if source == resource["resourceType"] else None
        if param is None:
            continue
        for target_type, target_id in references_in(param.extract(resource)):
            reference = f"{target_type}/{target_id}"
            if reference not in found:
                found.append(reference)
    return found


def notification(repo: Repository, ctx: Context, subscription: dict[str, Any], row: Any,
                 kind: str, events: Sequence[Any], content: str, reader: Reader,
                 includes: dict[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """A notification Bundle of `kind` (handshake, heartbeat, event-notification,
    query-event) for these subscription_events rows."""
    base = ctx.base_url
    described: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    for event in events:
        described_event: dict[str, Any] = {"number": event.number, "at": event.at}
        if content != "empty":
            focus = f"{event.res_type}/{event.res_id}"
            described_event["focus"] = _url(base, f"{focus}/_history/{event.version}")
            version = repo.vread(event.res_type, event.res_id, event.version)
            method, answer = _METHOD.get(event.interaction, ("PUT", "200"))
            entry: dict[str, Any] = {
                **_full_url(base, focus),
                "request": {"method": method, "url": focus if method != "POST"
                            else event.res_type},
                "response": {"status": answer, "etag": f'W/"{event.version}"'}}
            resource = version.resource() if version is not None and not version.deleted \
                else None
            if content == "full-resource" and resource is not None:
                entry["resource"] = resource
            entries.append(entry)
            named = _context_references(resource or {}, (includes or {}).get(
                event.res_type, ()))
            context = [ref for ref in named
                       if reader.may_read(ctx, repo, *ref.split("/", 1))]
            described_event["context"] = [_url(base, ref) for ref in context]
            entries += _context_entries(repo, base, context, content)
        described.append(described_event)
    status = status_parameters(base, subscription, row, kind, described)
    first: dict[str, Any] = {"fullUrl": f"urn:uuid:{status['id']}", "resource": status,
             "request": {"method": "GET",
                         "url": f"Subscription/{subscription['id']}/$status"},
             "response": {"status": "200"}}
    return {"resourceType": "Bundle", "id": str(uuid.uuid4()),
            "meta": {"profile": [NOTIFICATION_PROFILE]}, "type": "history",
            "timestamp": format_instant(now_micros()), "entry": [first, *entries]}


def _context_entries(repo: Repository, base: str, references: list[str],
                     content: str) -> list[dict[str, Any]]:
    entries = []
    for reference in references:
        resource_type, resource_id = reference.split("/", 1)
        version = repo.read(resource_type, resource_id)
        if version is None or version.deleted:
            continue
        entry: dict[str, Any] = {**_full_url(base, reference),
                                 "request": {"method": "GET", "url": reference},
                                 "response": {"status": "200", "etag": version.etag}}
        if content == "full-resource":
            entry["resource"] = version.resource()
        entries.append(entry)
    return entries


def body(bundle: dict[str, Any], reader: Reader) -> bytes:
    """The Bundle as the bytes sent: cleaned of patient details for blind roles."""
    data = jsonio.dumps(bundle)
    return redact(data) if reader.blind else data
