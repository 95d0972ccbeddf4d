"""Matching: reads the change log after its cursor and gives each Subscription its events.

For every change, in change-log order: a change to a Subscription updates its delivery
row (a new one starts at event 0); a change to a resource some topic triggers on is
tested, for each live Subscription of that topic, against the topic's trigger (query
criteria on the previous and current versions, FHIRPath over `%previous`/`%current`),
the Subscription's filters (on the version the change wrote), and whether the
subscriber may read the resource at all. A match becomes that Subscription's next event.

The events and the cursor move in one transaction, under a lock on the cursor's row: an
event is numbered once, without gaps, whichever process matched it and however often one
died mid-round; a second matcher (another `atm worker`) waits its turn and finds the work
done.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, insert, select, update

from gateway.errors import FhirError
from gateway.services.context import Context
from gateway.settings import Settings
from gateway.store.database import Database, gap_cutoff, safe_position, start_position
from gateway.store.driver import changes_after
from gateway.store.repository import Actor, Repository
from gateway.store.schema import change_log, reactor_cursors, subscription_events, subscriptions
from gateway.store.timeparse import now_micros
from gateway.subscriptions import notifications
from gateway.subscriptions.scratch import Loaded, Scratch
from gateway.subscriptions.spec import Spec, read_spec
from gateway.subscriptions.topics import Topic, Trigger, compiled_fhirpath

log = logging.getLogger("atm.subscriptions")

CURSOR = "subscriptions"
ACTOR = Actor(name="subscriptions")  # the server's own writes of Subscription statuses
CURSOR_SAVE_SECONDS = 1.0
LIVE_READ_SECONDS = 1.0
"""How long the live Subscriptions read for one round serve the next rounds, when no
Subscription or SubscriptionTopic changed in between (see Matcher._live_for)."""
FOLLOWED_TYPES = ("Subscription", "SubscriptionTopic")
LIVE = ("requested", "active", "error")
FOLLOWED = ("version", "topic", "channel", "status", "handshake", "failures", "next_attempt",
            "last_error")


@dataclass
class Live:
    """A Subscription as matching sees it during one round."""

    row: dict[str, Any]
    spec: Spec | None
    topic: Topic | None
    new_events: list[dict[str, Any]] = field(default_factory=list)
    followed: bool = False  # its Subscription changed this round: FOLLOWED are stored
    reader: notifications.Reader | None = None  # looked up once a round


class Matcher:
    def __init__(self, db: Database, settings: Settings, batch: int = 500) -> None:
        self.db, self.settings, self.batch = db, settings, batch
        self._ctx = Context(db=db, settings=settings, base_url=settings.base_url or "",
                            actor=ACTOR)
        self._scratch = Scratch(self._ctx)
        self._gap_warned = 0.0
        self._position: int | None = None  # how far this process has matched
        self._stored = 0  # the cursor as this process last read or stored it
        self._saved_at = 0.0
        # The live Subscriptions as last read (row, spec, topic), and when.
        self._live_read: dict[str, tuple[dict[str, Any], Spec | None, Topic | None]] | None = None
        self._live_read_at = 0.0

    def close(self) -> None:
        self._scratch.close()

    # -- one round ------------------------------------------------------------------------
    def run_once(self) -> tuple[int, int]:
        """Match the changes after the cursor: (changes read, events made)."""
        if self._position is None:
            self._position = self._stored = self._cursor()
            self._live_read = None  # changes before the new cursor went unseen here
        cursor = self._position
        with self.db.read() as conn:
            cutoff = gap_cutoff(conn)  # before the read: see gap_cutoff
            rows = changes_after(conn, cursor, self.batch)
            if not rows:
                return 0, 0
            position = safe_position(cursor, rows, cutoff)
            if position < rows[-1].seq and time.monotonic() - self._gap_warned > 60:
                self._gap_warned = time.monotonic()
                log.warning("subscription matching waits at change %d for a transaction "
                            "still open in the database", position + 1)
            rows = [r for r in rows if r.seq <= position]
            if not rows:
                return 0, 0  # a transaction still open before the rest: wait for it
            live = self._live_for(conn, rows)
            changed = self._match(conn, rows, live)
        if not changed and time.monotonic() - self._saved_at < CURSOR_SAVE_SECONDS:
            # Nothing to store: the cursor moves in memory, and is stored at most once a
            # second (a write transaction per commit would queue behind clients' writes).
            self._position = position
            return len(rows), 0
        # Not `notify`: the events are this process's own news (the worker nudges delivery).
        with self.db.write(notify=False) as conn:
            if not self._lock_cursor(conn, self._stored):
                self._position = None  # another matcher moved it: start again from there
                return len(rows), 0
            made = self._store(conn, live, changed)
            self._move_cursor(conn, position)
        self._position = self._stored = position
        self._saved_at = time.monotonic()
        if changed:  # websocket streams here wait on `committed` for their Subscriptions
            self.db.committed.set()
        return len(rows), made

    def _cursor(self) -> int:
        with self.db.read() as conn:
            seq = conn.execute(select(reactor_cursors.c.seq)
                               .where(reactor_cursors.c.name == CURSOR)).scalar()
            if seq is not None:
                return int(seq)
            # First start: nothing can match before the first Subscription was written,
            # and one may be in a transaction still open, numbered before changes that
            # have committed (start_position stops short of its gap).
            start = start_position(conn)
            first = conn.execute(select(change_log.c.seq)
                                 .where(change_log.c.res_type == "Subscription")
                                 .order_by(change_log.c.seq).limit(1)).scalar()
        return start if first is None else min(int(first) - 1, start)

    def _lock_cursor(self, conn: Connection, expected: int) -> bool:
        """Hold the cursor's row for this transaction; False when it has moved."""
        stmt = select(reactor_cursors.c.seq).where(reactor_cursors.c.name == CURSOR)
        if conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        current = conn.execute(stmt).scalar()
        if current is None:
            conn.execute(insert(reactor_cursors).values(name=CURSOR, seq=expected,
                                                        updated_at=now_micros()))
            if conn.dialect.name == "postgresql":
                conn.execute(stmt)  # a racing first matcher fails on the primary key
            return True
        return int(current) == expected

    def _move_cursor(self, conn: Connection, seq: int) -> None:
        conn.execute(update(reactor_cursors).where(reactor_cursors.c.name == CURSOR)
                     .values(seq=seq, updated_at=now_micros()))

    # -- what is live ---------------------------------------------------------------------
    def _live_for(self, conn: Connection, rows: list[Any]) -> dict[str, Live]:
        """The live Subscriptions for a round over these changes.

        Reading them costs more than matching a busy second's changes, and rounds follow
        every commit, so a reading serves later rounds while nothing that decides them
        changes. Only a client's change to a Subscription moves it in or out of LIVE
        (delivery moves it between active and error), a SubscriptionTopic change can
        change what it matches, and both pass through the change log, so a round over
        either reads them again, as does the round after it (this round stores what
        they changed). LIVE_READ_SECONDS bounds the age of a reading all the same."""
        follows = any(row.res_type in FOLLOWED_TYPES for row in rows)
        if follows or self._live_read is None or (
                time.monotonic() - self._live_read_at >= LIVE_READ_SECONDS):
            live = self._live(conn)
            self._live_read_at = time.monotonic()
            self._live_read = None if follows else {
                key: (state.row, state.spec, state.topic) for key, state in live.items()}
            return live
        return {key: Live(row, spec, topic)
                for key, (row, spec, topic) in self._live_read.items()}

    def _live(self, conn: Connection) -> dict[str, Live]:
        repo = Repository(conn)
        live: dict[str, Live] = {}
        for row in conn.execute(select(subscriptions).where(subscriptions.c.status.in_(LIVE))):
            state = dict(row._mapping)
            version = repo.read("Subscription", row.id)
            live[row.id] = self._with_spec(repo, state, version.resource()
                                           if version and not version.deleted else None)
        return live

    def _with_spec(self, repo: Repository, row: dict[str, Any],
                   subscription: dict[str, Any] | None) -> Live:
        if subscription is None:
            return Live(row, None, None)
        try:
            spec = read_spec(subscription, self.settings)
        except Exception as exc:  # noqa: BLE001 - e.g. the allow-list was narrowed since
            log.warning("Subscription/%s cannot be served: %s", row["id"], exc)
            return Live(row, None, None)
        return Live(row, spec, self._topic(repo, spec.topic))

    def _topic(self, repo: Repository, url: str) -> Topic | None:
        from gateway.services.subscriptions import stored_topic  # the services build on us

        try:
            return stored_topic(self._ctx, repo, url)
        except FhirError as exc:  # stored before a rule tightened
            log.error("SubscriptionTopic %s cannot be run: %s", url, exc)
            return None

    # -- matching ---------------------------------------------------------------------------
    def _match(self, conn: Connection, rows: list[Any], live: dict[str, Live]) -> set[str]:
        """Add each live Subscription's new events; the ids whose rows changed."""
        repo = Repository(conn)
        changed: set[str] = set()
        for change in rows:
            if change.res_type == "Subscription":
                if change.actor != ACTOR.name:
                    self._subscription_changed(repo, change, live)
                    changed.add(change.res_id)
                continue
            interested = [s for s in live.values() if s.row["status"] in LIVE
                          and s.topic is not None and s.spec is not None
                          and s.topic.triggers_for(change.res_type)
                          and not s.spec.ended(change.at)]
            if not interested:
                continue
            current, previous = self._versions(repo, change)
            with self._scratch.loaded(previous, current) as (was, now):
                fired: dict[str, bool] = {}  # a topic's triggers, tested once per change
                for state in interested:
                    if self._fires(state, change, was, now, fired) and self._may_read(
                            repo, state, change):
                        state.new_events.append({
                            "change_seq": change.seq, "res_type": change.res_type,
                            "res_id": change.res_id, "version": change.version,
                            "interaction": change.interaction, "at": change.at})
                        changed.add(state.row["id"])
        return changed

    def _versions(self, repo: Repository, change: Any) -> tuple[dict[str, Any] | None,
                                                                dict[str, Any] | None]:
        now = repo.vread(change.res_type, change.res_id, change.version)
        before = repo.vread(change.res_type, change.res_id, change.version - 1) if (
            change.version > 1) else None
        return ((now.resource() if now and not now.deleted else None),
                (before.resource() if before and not before.deleted else None))

    def _fires(self, state: Live, change: Any, previous: Loaded | None,
               current: Loaded | None, fired: dict[str, bool]) -> bool:
        topic = state.topic
        assert topic is not None and state.spec is not None
        if topic.url not in fired:
            fired[topic.url] = any(self._trigger_fires(t, change.interaction, previous, current)
                                   for t in topic.triggers_for(change.res_type))
        if not fired[topic.url]:
            return False
        focus = current if current is not None else previous
        criteria = state.spec.filters.get(change.res_type, ())
        return focus is not None and focus.matches(criteria)

    @staticmethod
    def _trigger_fires(trigger: Trigger, interaction: str, previous: Loaded | None,
                       current: Loaded | None) -> bool:
        if interaction not in trigger.interactions:
            return False
        tests = []
        if trigger.previous is not None:
            tests.append(trigger.passes_without_previous if previous is None
                         else previous.matches(trigger.previous))
        if trigger.current is not None:
            tests.append(trigger.passes_without_current if current is None
                         else current.matches(trigger.current))
        if tests and not (all(tests) if trigger.require_both else any(tests)):
            return False
        if trigger.fhirpath is None:
            return True
        before = previous.resource if previous is not None else None
        after = current.resource if current is not None else None
        try:
            result = compiled_fhirpath(trigger.fhirpath)(
                after or before or {}, {"previous": before or [], "current": after or []})
        except Exception as exc:  # noqa: BLE001 - a criterion that fails matches nothing
            log.warning("FHIRPath criterion %r failed: %s", trigger.fhirpath, exc)
            return False
        return bool(result == [True])

    def _may_read(self, repo: Repository, state: Live, change: Any) -> bool:
        if state.reader is None:
            state.reader = notifications.Reader.of_row(_Row(state.row), repo.conn)
        return state.reader.may_read(self._ctx, repo, change.res_type, change.res_id)

    def _subscription_changed(self, repo: Repository, change: Any,
                              live: dict[str, Live]) -> None:
        """A client created, changed or deleted a Subscription: its row follows."""
        version = repo.vread("Subscription", change.res_id, change.version)
        resource = version.resource() if version and not version.deleted else None
        state = live.get(change.res_id)
        row = state.row if state is not None else self._stored_row(repo.conn, change.res_id)
        asked = resource.get("status") if resource is not None else "off"
        if row is None:
            owner = _owner(resource or {})
            row = {"id": change.res_id, "version": change.version, "topic": "",
                   "channel": "", "status": asked, "client_id": owner[0],
                   "organization": owner[1], "events": 0, "delivered": 0, "handshake": False,
                   "failures": 0, "next_attempt": 0, "last_sent": now_micros(),
                   "heartbeat_due": None, "lease_owner": None, "lease_until": 0,
                   "last_error": None, "_new": True}
        elif asked == "off" or (asked == "requested" and row["status"] != "requested"):
            row.update(status=asked, handshake=False, failures=0, next_attempt=0,
                       last_error=None)
        row.update(version=change.version,
                   topic=(resource or {}).get("criteria", row["topic"]),
                   channel=((resource or {}).get("channel") or {}).get("type", row["channel"]))
        updated = self._with_spec(repo, row, resource)
        updated.followed = True
        if state is not None:
            updated.new_events = state.new_events
        live[change.res_id] = updated

    @staticmethod
    def _stored_row(conn: Connection, subscription_id: str) -> dict[str, Any] | None:
        row = conn.execute(select(subscriptions).where(
            subscriptions.c.id == subscription_id)).first()
        return dict(row._mapping) if row is not None else None

    # -- storing ------------------------------------------------------------------------------
    def _store(self, conn: Connection, live: dict[str, Live], changed: set[str]) -> int:
        made = 0
        for subscription_id in sorted(changed):
            state = live[subscription_id]
            row = {k: v for k, v in state.row.items() if k != "_new"}
            if state.row.pop("_new", False):
                conn.execute(insert(subscriptions).values(**row))
            elif state.followed:
                # The columns a client's change decides; delivery writes the others.
                conn.execute(update(subscriptions).where(subscriptions.c.id == subscription_id)
                             .values({k: row[k] for k in FOLLOWED}))
            if state.new_events:
                made += self._number(conn, subscription_id, state.new_events)
        return made

    @staticmethod
    def _number(conn: Connection, subscription_id: str, events: list[dict[str, Any]]) -> int:
        """Number the events after the Subscription's last, in order, without gaps."""
        stmt = select(subscriptions.c.events).where(subscriptions.c.id == subscription_id)
        if conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        last = int(conn.execute(stmt).scalar_one())
        conn.execute(insert(subscription_events), [
            {"subscription_id": subscription_id, "number": last + n, **event}
            for n, event in enumerate(events, start=1)])
        conn.execute(update(subscriptions).where(subscriptions.c.id == subscription_id)
                     .values(events=last + len(events)))
        return len(events)


@dataclass(frozen=True)
class _Row:
    """A row dict seen as a result row (client_id, organization) for Reader.of_row."""

    data: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        return self.data[name]


def _owner(subscription: dict[str, Any]) -> tuple[str | None, str | None]:
    from gateway.services.subscriptions import (
        SUBSCRIBER_CLIENT,
        SUBSCRIBER_ORGANIZATION,
        owner_tags,
    )

    tags = owner_tags(subscription)
    return tags.get(SUBSCRIBER_CLIENT), tags.get(SUBSCRIBER_ORGANIZATION)

