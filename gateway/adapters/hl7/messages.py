"""The `hl7_messages` table: each HL7 v2 message received or to be sent, with its raw text
and where it stands. The only code that reads or writes the table."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from gateway.store.database import Database
from gateway.store.schema import hl7_messages as t
from gateway.store.timeparse import now_micros

IN, OUT = "in", "out"
RECEIVED, APPLIED, FAILED = "received", "applied", "failed"  # inbound
PENDING, SENT, ACKED, REJECTED = "pending", "sent", "acked", "rejected"  # outbound
OPEN_IN = (RECEIVED, FAILED)  # inbound messages that may still be applied


def insert(conn: Connection, **values: Any) -> int | None:
    """A new row's id; None when its (direction, sender, control id) or its source is
    already there: a resent message, an order already made."""
    build = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    now = now_micros()
    row = {"attempts": 0, "next_attempt": 0, "created_at": now, "updated_at": now, **values}
    stmt = build(t).values(**row).on_conflict_do_nothing().returning(t.c.id)
    found = conn.execute(stmt).scalar()
    return int(found) if found is not None else None


def receive(db: Database, raw: str, control_id: str | None, sender: tuple[str, str],
            message_type: str | None) -> tuple[Any, bool]:
    """Store an inbound message before anything else (committed on return); the row,
    and whether the same message had been received before."""
    # Whatever a sender puts in its header fits the columns (PostgreSQL would refuse an
    # over-long value, and the message would go unstored), and NUL, which no PostgreSQL
    # text may hold (nor any HL7 message), is kept as U+FFFD.
    key = {"control_id": _fit(control_id, t.c.control_id), "application":
           _fit(sender[0], t.c.application) or "", "facility": _fit(sender[1], t.c.facility) or ""}
    with db.write(notify=False) as conn:
        new = insert(conn, direction=IN, message_type=_fit(message_type, t.c.message_type),
                     raw=raw.replace("\x00", "\ufffd"), status=RECEIVED, **key)
        if new is not None:
            return get(conn, new), False
        return conn.execute(select(t).where(
            t.c.direction == IN, *(t.c[name] == value for name, value in key.items()))
        ).one(), True


def _fit(value: str | None, column: Any) -> str | None:
    return value[:column.type.length] if value is not None else None


def get(conn: Connection, message_id: int) -> Any:
    return conn.execute(select(t).where(t.c.id == message_id)).first()


def settle(conn: Connection, message_id: int, status: str, *, was: Iterable[str],
           **values: Any) -> bool:
    """Move a row on from one of the statuses `was`; False when another process already
    had (its row lock orders two racing writers on PostgreSQL)."""
    done = conn.execute(update(t).where(t.c.id == message_id, t.c.status.in_(tuple(was)))
                        .values(status=status, updated_at=now_micros(), **values))
    return bool(done.rowcount == 1)


def due(db: Database, now: int, limit: int) -> list[Any]:
    """Outbound messages whose time has come (a `sent` one whose ACK never came, too)."""
    with db.read() as conn:
        return list(conn.execute(select(t).where(
            t.c.direction == OUT, t.c.status.in_((PENDING, SENT)), t.c.next_attempt <= now)
            .order_by(t.c.next_attempt, t.c.id).limit(limit)))


def claim(db: Database, row: Any, until: int) -> bool:
    """Take a due row for one attempt: no other sender takes it before `until` (a sender
    that dies with it leaves it to be taken again then)."""
    with db.write(notify=False) as conn:
        done = conn.execute(update(t).where(
            t.c.id == row.id, t.c.status == row.status, t.c.next_attempt == row.next_attempt)
            .values(status=SENT, next_attempt=until, updated_at=now_micros()))
    return bool(done.rowcount == 1)


def record(db: Database, message_id: int, **values: Any) -> None:
    with db.write(notify=False) as conn:
        conn.execute(update(t).where(t.c.id == message_id)
                     .values(updated_at=now_micros(), **values))


def listing(db: Database, *, status: str | None = None, direction: str | None = None,
            limit: int = 100) -> list[Any]:
    """The newest messages first."""
    query = select(t).order_by(t.c.id.desc()).limit(limit)
    if status:
        query = query.where(t.c.status == status)
    if direction:
        query = query.where(t.c.direction == direction)
    with db.read() as conn:
        return list(conn.execute(query))


def inbound_ids(db: Database, statuses: Iterable[str]) -> list[int]:
    with db.read() as conn:
        return [int(i) for i in conn.execute(select(t.c.id).where(
            t.c.direction == IN, t.c.status.in_(tuple(statuses))).order_by(t.c.id)).scalars()]
