"""The subscription health panel: how each Subscription's notifications are getting
through, from the delivery tables (`subscriptions`, `subscription_events`) and the audit
trail."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Connection, and_, select

from gateway.dashboard.health.scope import Viewer, unrestricted
from gateway.services.subscriptions import SUBSCRIBER_ORGANIZATION
from gateway.store.database import Database
from gateway.store.schema import (
    audit_log,
    resources,
    sp_token,
    sp_uri,
    subscription_events,
    subscriptions,
)
from gateway.store.timeparse import micros_of, moment_of, now_micros
from gateway.subscriptions.matcher import LIVE

R = resources


@dataclass(frozen=True)
class SubscriptionHealth:
    """How one Subscription's notifications are getting through."""

    id: str
    organization: str | None  # the subscriber-organization tag (None: made with auth off)
    topic: str
    channel: str  # rest-hook | websocket
    endpoint: str | None  # scheme://host[:port]/path: no credentials, query or headers
    status: str  # requested | active | error | off
    events: int  # numbered since the subscription started
    lag: int  # events not yet acknowledged by the endpoint (websocket: 0, none are)
    oldest_undelivered: datetime | None  # when the oldest of those happened
    lag_age: timedelta | None  # how long it has been waiting
    failures: int  # attempts failed in a row (0 after a success)
    last_error: str | None
    last_error_at: datetime | None
    lagging: bool  # live, and its oldest undelivered event is older than the threshold
    failing: bool  # live, and in error or its last attempts failed


def subscription_health(db: Database, viewer: Viewer, *,
                        lag_threshold: timedelta = timedelta(minutes=5),
                        now: datetime | None = None) -> list[SubscriptionHealth]:
    """Every Subscription the viewer owns (unrestricted roles: every one), those in
    trouble first. Read from the delivery tables (`subscriptions`: counters, failures,
    last error; `subscription_events`: when the oldest unacknowledged event happened) and
    the audit trail (when the last attempt failed)."""
    at = micros_of(now) if now is not None else now_micros()
    with db.read() as conn:
        rows = list(conn.execute(_health_query(viewer)))
        failed_at = {row.id: _last_failure(conn, row.id) for row in rows if row.last_error}
    found = [_health(row, failed_at.get(row.id), at, lag_threshold) for row in rows]
    return sorted(found, key=lambda h: (not h.failing, not h.lagging,
                                        h.organization or "", h.id))


def _health_query(viewer: Viewer) -> Any:
    """One row per current Subscription: its delivery row, owner tag, endpoint and the
    time of its first unacknowledged event."""
    s = subscriptions.c
    tag, url, first = sp_token.alias("owner"), sp_uri.alias("endpoint"), subscription_events
    query = (select(s.id, s.topic, s.channel, s.status, s.events, s.delivered, s.failures,
                    s.last_error, tag.c.code.label("organization"),
                    url.c.value.label("endpoint"), first.c.at.label("oldest"))
             .join_from(subscriptions, R, and_(R.c.res_type == "Subscription",
                                               R.c.res_id == s.id, R.c.deleted.is_(False)))
             .outerjoin(tag, and_(tag.c.res_type == "Subscription", tag.c.res_id == s.id,
                                  tag.c.param == "_tag",
                                  tag.c.system == SUBSCRIBER_ORGANIZATION))
             .outerjoin(url, and_(url.c.res_type == "Subscription", url.c.res_id == s.id,
                                  url.c.param == "url"))
             .outerjoin(first, and_(first.c.subscription_id == s.id,
                                    first.c.number == s.delivered + 1)))
    if not unrestricted(viewer):
        query = query.where(tag.c.code == viewer.organization)
    return query


def _last_failure(conn: Connection, subscription_id: str) -> int | None:
    """When delivery last failed: the newest failed notification in the audit trail
    (walked from the newest record of the Subscription, through its entity index)."""
    a = audit_log.c
    return conn.execute(select(a.recorded).where(
        a.entity == f"Subscription/{subscription_id}", a.event_type == "notify",
        a.outcome == "8").order_by(a.seq.desc()).limit(1)).scalar()


def _health(row: Any, failed_at: int | None, now: int,
            threshold: timedelta) -> SubscriptionHealth:
    live = row.status in LIVE
    # A websocket acknowledges nothing: each socket keeps its own place, `delivered`
    # stays (gateway/subscriptions/websocket.py), and there is no lag to tell.
    lag = max(0, int(row.events) - int(row.delivered)) if row.channel == "rest-hook" else 0
    oldest = moment_of(row.oldest) if lag and row.oldest is not None else None
    age = moment_of(now) - oldest if oldest is not None else None
    endpoint = _safe_endpoint(row.endpoint)
    error = row.last_error.replace(row.endpoint, endpoint or "its endpoint") \
        if row.last_error and row.endpoint else row.last_error
    return SubscriptionHealth(
        row.id, row.organization, row.topic, row.channel, endpoint,
        row.status, int(row.events), lag, oldest, age, int(row.failures), error,
        moment_of(failed_at) if failed_at is not None else None,
        live and age is not None and age > threshold,
        live and (row.status == "error" or row.failures > 0))


def _safe_endpoint(endpoint: str | None) -> str | None:
    """The endpoint without what may be a secret (user:password@, ?query, #fragment)."""
    if not endpoint:
        return None
    parts = urlsplit(endpoint)
    if not parts.scheme or not parts.hostname:
        return None
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"
