"""Subscriptions in the REST API: the rules a Subscription or SubscriptionTopic must pass
to be written, the shipped topics, and the operations `$status`, `$events` and
`$get-ws-binding-token` (Subscriptions Backport IG).

Whose a Subscription is: the server tags it, when created, with the client and the
organisation that created it. Partners see and change only their organisation's
Subscriptions (gateway/auth/policies.py), and notifications carry only what that client
may read.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from sqlalchemy import delete, insert, select

from gateway import jsonio
from gateway.errors import InvalidError, NotFoundError
from gateway.services import visibility
from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.services.search import match_ids
from gateway.store.repository import Repository, Version
from gateway.store.schema import subscription_events, subscription_ws_tokens, subscriptions
from gateway.store.timeparse import format_instant, now_micros
from gateway.subscriptions import notifications
from gateway.subscriptions.spec import check_against, read_spec, refused
from gateway.subscriptions.topics import Topic, TopicError, compile_topic, shipped_topics

ATM = "https://atm-gateway.org/fhir"
SUBSCRIBER_CLIENT = f"{ATM}/CodeSystem/subscriber-client"
SUBSCRIBER_ORGANIZATION = f"{ATM}/CodeSystem/subscriber-organization"
OWNER_TAGS = (SUBSCRIBER_CLIENT, SUBSCRIBER_ORGANIZATION)
CLIENT_STATUSES = ("requested", "off")  # what a client may set; the server sets the rest
WS_TOKEN_SECONDS = 300
MAX_EVENTS_PAGE = 1000


# -- topics --------------------------------------------------------------------------------
_TOPIC_IDS: dict[str, str] = {}  # url -> id of the SubscriptionTopic last found for it
_COMPILED: dict[tuple[str, int], Topic] = {}  # (id, version) -> the topic compiled


def stored_topic(ctx: Context, repo: Repository, url: str) -> Topic | None:
    """The stored topic with this url, compiled once per version (matching and delivery
    ask for it with every change and every notification); None when there is none.
    TopicError when it cannot be run (one stored before a rule tightened)."""
    topic_id = _TOPIC_IDS.get(url)
    version = repo.read("SubscriptionTopic", topic_id) if topic_id else None
    if version is None or version.deleted or version.resource().get("url") != url:
        ids = match_ids(ctx.within(repo.conn), repo, "SubscriptionTopic", [("url", url)],
                        limit=1)
        version = repo.read("SubscriptionTopic", ids[0]) if ids else None
        if version is None or version.deleted:
            return None
        _TOPIC_IDS[url] = version.id
    key = (version.id, version.version)
    if key not in _COMPILED:
        _COMPILED[key] = compile_topic(version.resource())
    return _COMPILED[key]


def topic_includes(ctx: Context, repo: Repository, url: str) -> dict[str, tuple[str, ...]]:
    """A topic's `include`s by resource type (a notification's additional context); none
    when the topic is gone or cannot be run."""
    try:
        topic = stored_topic(ctx, repo, url)
    except TopicError:
        return {}
    return topic.includes if topic is not None else {}


# -- the rules of writes ------------------------------------------------------------------
def topic_by_url(ctx: Context, repo: Repository, url: str) -> Topic:
    topic = stored_topic(ctx, repo, url)
    if topic is None:
        raise refused(f"No SubscriptionTopic has url {url!r} (GET SubscriptionTopic lists "
                      "them)", "Subscription.criteria")
    return topic


def owner_tags(resource: dict[str, Any]) -> dict[str, str]:
    """system -> code of the owner tags a stored Subscription carries."""
    return {t["system"]: t.get("code", "") for t in resource.get("meta", {}).get("tag", [])
            if isinstance(t, dict) and t.get("system") in OWNER_TAGS}


def prepare_subscription(ctx: Context, repo: Repository, current: Version | None,
                         resource: dict[str, Any]) -> None:
    """Check a Subscription about to be written, and set what the server decides: its
    status (a new one is `requested` until its handshake) and whose it is."""
    spec = read_spec(resource, ctx.settings)
    check_against(spec, topic_by_url(ctx, repo, spec.topic))
    previous = current.resource() if current is not None and not current.deleted else None
    asked = resource.get("status")
    if previous is None:
        status = "off" if asked == "off" else "requested"
        owner = {}
        if ctx.grant is not None:
            owner = {SUBSCRIBER_CLIENT: ctx.grant.client.client_id,
                     SUBSCRIBER_ORGANIZATION: ctx.grant.client.organization}
    else:
        status = asked if asked in CLIENT_STATUSES else previous.get("status", "requested")
        owner = owner_tags(previous)
    resource["status"] = status
    meta = resource.setdefault("meta", {})
    tags = [t for t in meta.get("tag", []) if not (isinstance(t, dict)
                                                   and t.get("system") in OWNER_TAGS)]
    tags += [{"system": system, "code": code} for system, code in owner.items()]
    if tags:
        meta["tag"] = tags
    else:
        meta.pop("tag", None)


def prepare_topic(ctx: Context, repo: Repository, current: Version | None,
                  resource: dict[str, Any]) -> None:
    compile_topic(resource)


def load_shipped_topics(ctx: Context) -> list[str]:
    """Store the shipped topics unless the stored ones are the same; ids written."""
    from gateway.services.router import handle

    written = []
    for topic in shipped_topics():
        current = ctx.point_read("SubscriptionTopic", topic["id"])
        if current is not None and not current.deleted and {
                k: v for k, v in current.resource().items() if k != "meta"} == topic:
            continue
        handle(ctx, FhirRequest("PUT", f"SubscriptionTopic/{topic['id']}", resource=topic))
        written.append(topic["id"])
    return written


# -- operations ----------------------------------------------------------------------------
def _subscription(ctx: Context, subscription_id: str) -> tuple[dict[str, Any], Any]:
    """The Subscription (as the caller may see it) and its delivery row."""
    with ctx.reading() as repo:
        version = repo.read("Subscription", subscription_id)
        if version is None or version.deleted:
            raise NotFoundError(f"Subscription/{subscription_id} is not known")
        visibility.check_visible(ctx, repo, "Subscription", subscription_id)
        row = repo.conn.execute(select(subscriptions).where(
            subscriptions.c.id == subscription_id)).first()
    return version.resource(), row


def _parameters(request: FhirRequest) -> dict[str, str]:
    params = dict(request.query)
    if request.method == "POST" and request.body:
        body = jsonio.loads(request.body)
        if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
            raise InvalidError("POST a Parameters resource to this operation")
        for p in body.get("parameter", []):
            if isinstance(p, dict) and "name" in p:
                value = next((v for k, v in p.items() if k.startswith("value")), None)
                params[p["name"]] = str(value)
    return params


def op_status(ctx: Context, request: FhirRequest, subscription_id: str | None) -> FhirResponse:
    """Subscription/{id}/$status, or Subscription/$status?id=…: a searchset of statuses."""
    ids = [subscription_id] if subscription_id else [
        i for raw in (v for k, v in request.query if k == "id") for i in raw.split(",") if i]
    if not ids:
        raise InvalidError("Name the Subscriptions: Subscription/{id}/$status or ?id=")
    entries = []
    for one in ids:
        resource, row = _subscription(ctx, one)
        status = notifications.status_parameters(ctx.base_url, resource, row, "query-status")
        entries.append({"resource": status, "search": {"mode": "match"}})
    bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(entries),
              "timestamp": format_instant(now_micros()), "entry": entries}
    return FhirResponse(200, jsonio.dumps(bundle))


def _number(params: dict[str, str], name: str) -> int | None:
    raw = params.get(name)
    if raw is None:
        return None
    if not raw.isdigit():
        raise InvalidError(f"{name} must be an event number (1, 2, …)")
    return int(raw)


def op_events(ctx: Context, request: FhirRequest, subscription_id: str) -> FhirResponse:
    """Subscription/{id}/$events: the events numbered eventsSinceNumber..eventsUntilNumber
    again, rendered as notifications are (at most MAX_EVENTS_PAGE)."""
    params = _parameters(request)
    resource, row = _subscription(ctx, subscription_id)
    if row is None:
        raise NotFoundError(f"Subscription/{subscription_id} has no events yet")
    low = _number(params, "eventsSinceNumber") or 1
    high = min(_number(params, "eventsUntilNumber") or row.events, low + MAX_EVENTS_PAGE - 1)
    content = params.get("content") or read_spec(resource, ctx.settings).content
    if content not in ("empty", "id-only", "full-resource"):
        raise InvalidError("content is one of empty, id-only, full-resource")
    with ctx.reading() as repo:
        events = repo.conn.execute(
            select(subscription_events)
            .where(subscription_events.c.subscription_id == subscription_id,
                   subscription_events.c.number.between(low, high))
            .order_by(subscription_events.c.number)).all()
        reader = notifications.Reader.of_row(row, repo.conn)
        topic = topic_by_url(ctx, repo, row.topic)
        bundle = notifications.notification(
            repo, ctx, resource, row, "query-event", events, content, reader,
            topic.includes)
    return FhirResponse(200, notifications.body(bundle, reader))


def op_ws_token(ctx: Context, request: FhirRequest, subscription_id: str) -> FhirResponse:
    """Subscription/{id}/$get-ws-binding-token: a short-lived token a websocket client
    binds to the Subscription with (`bind-with-token <token>`); whoever may read the
    Subscription (its organisation's clients, admin and EHR clients) may ask."""
    resource, _ = _subscription(ctx, subscription_id)
    if (resource.get("channel") or {}).get("type") != "websocket":
        raise refused("Only websocket Subscriptions take binding tokens",
                      "Subscription.channel.type")
    token = secrets.token_urlsafe(32)
    expires = now_micros() + WS_TOKEN_SECONDS * 1_000_000
    with ctx.db.write() as conn:
        conn.execute(delete(subscription_ws_tokens).where(
            subscription_ws_tokens.c.expires_at < now_micros()))
        conn.execute(insert(subscription_ws_tokens).values(
            token_hash=hashlib.sha256(token.encode()).hexdigest(),
            subscription_id=subscription_id, expires_at=expires))
    ws_url = ctx.base_url.replace("https://", "wss://").replace("http://", "ws://")
    parameters = {"resourceType": "Parameters", "parameter": [
        {"name": "token", "valueString": token},
        {"name": "expiration", "valueDateTime": format_instant(expires)},
        {"name": "subscription", "valueString": f"Subscription/{subscription_id}"},
        {"name": "websocket-url", "valueUrl": f"{ws_url}/$subscription-ws"}]}
    return FhirResponse(200, jsonio.dumps(parameters))
