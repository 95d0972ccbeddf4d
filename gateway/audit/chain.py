"""Tamper evidence for the audit log: every row is chained behind its predecessor.

A row's hash is SHA-256 over its predecessor's hash, its place in the chain and every
column it records. Changing a stored row, deleting one, or reordering them breaks the
chain from that row on; `verify` walks it and names the first row that does not follow.
`audit_chain` keeps the newest row's place and hash, so a deleted tail shows too.

The trail's writer thread extends the chain (`extend`): in one transaction it chains the
rows that writes stored with their changes since its last turn, then inserts the queued
records already chained. Rows are chained in the order the writer finds them: on
PostgreSQL a row's seq is taken before its transaction commits, so seq order is not
commit order, and chaining by the writer's own count needs no wait for gaps. Writers of
several replicas take turns on the `audit_chain` row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from types import SimpleNamespace
from typing import Any

import orjson
from sqlalchemy import Connection, func, select, update

from gateway.audit.events import ROW_COLUMNS, Row
from gateway.store.database import Database
from gateway.store.driver import Driver
from gateway.store.schema import audit_chain, audit_log

GENESIS = "0" * 64
SEAL_BATCH = 2000
VERIFY_PAGE = 5000
_EMPTY = SimpleNamespace(chain_seq=0, hash=GENESIS)  # the head of a trail never chained
_RECORDED = [audit_log.c[name] for name in ROW_COLUMNS]


def digest(previous: str, position: int, row: Row) -> str:
    """The hash of a row at `position`, after `previous`: SHA-256 of the predecessor's
    hash, a newline, and the JSON array [position, ROW_COLUMNS values...] in UTF-8,
    without spaces or escapes beyond JSON's own (Python's json.dumps with
    separators=(",", ":") and ensure_ascii=False writes the same bytes, ~3x slower)."""
    data = orjson.dumps([position, *row])
    return hashlib.sha256(previous.encode() + b"\n" + data).hexdigest()


@cache
def _statements(dialect: str) -> tuple[str, str]:
    mark = "?" if dialect == "sqlite" else "%s"
    columns = [*ROW_COLUMNS, "chain_seq", "hash"]
    insert = (f"INSERT INTO audit_log ({', '.join(columns)}) "
              f"VALUES ({', '.join([mark] * len(columns))})")
    chain = f"UPDATE audit_log SET chain_seq = {mark}, hash = {mark} WHERE seq = {mark}"
    return insert, chain


def unchained_exists(db: Database) -> bool:
    with db.read() as conn:
        return conn.execute(select(audit_log.c.seq).where(audit_log.c.chain_seq.is_(None))
                            .limit(1)).first() is not None


def extend(conn: Connection, new_rows: Sequence[Row] = (), limit: int = SEAL_BATCH) -> int:
    """In the caller's write transaction: chain up to `limit` stored, unchained rows, then
    insert `new_rows` chained after them (rows naming one resource at most). How many
    rows it chained, inserted ones included."""
    head = conn.execute(select(audit_chain.c.chain_seq, audit_chain.c.hash)
                        .where(audit_chain.c.id == 1).with_for_update()).first()
    if head is None:  # an empty trail (a concurrent first writer loses on the key)
        conn.execute(audit_chain.insert().values(id=1, chain_seq=0, hash=GENESIS))
    position, previous = (0, GENESIS) if head is None else head
    stored = conn.execute(select(audit_log.c.seq, *_RECORDED)
                          .where(audit_log.c.chain_seq.is_(None))
                          .order_by(audit_log.c.seq).limit(limit)).all()
    insert, chain = _statements(conn.dialect.name)
    updates, inserts = [], []
    for seq, *recorded in stored:
        position += 1
        previous = digest(previous, position, tuple(recorded))
        updates.append((position, previous, seq))
    for new in new_rows:
        position += 1
        previous = digest(previous, position, new)
        inserts.append((*new, position, previous))
    if not updates and not inserts:
        return 0
    driver = Driver(conn)
    if updates:
        driver.execute_many(chain, updates)
    if inserts:
        driver.execute_many(insert, inserts)
    conn.execute(update(audit_chain).where(audit_chain.c.id == 1)
                 .values(chain_seq=position, hash=previous))
    return len(updates) + len(inserts)


def seal(db: Database, limit: int = SEAL_BATCH) -> int:
    """Chain up to `limit` stored rows behind the newest chained one; how many it chained."""
    if not unchained_exists(db):  # the usual case: no write transaction at all
        return 0
    with db.write(notify=False) as conn:
        return extend(conn, (), limit)


@dataclass(frozen=True)
class ChainReport:
    """What `verify` found: intact, or the first row that does not follow."""

    intact: bool
    checked: int  # rows verified in chain order
    pending: int  # rows stored but not chained yet (chained within a second by a server)
    broken_seq: int | None = None  # the AuditEvent id where the chain breaks
    position: int | None = None  # its place in the chain
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"intact": self.intact, "checked": self.checked,
                               "pending": self.pending}
        if not self.intact:
            out |= {"brokenAt": None if self.broken_seq is None
                    else f"AuditEvent/{self.broken_seq}",
                    "position": self.position, "reason": self.reason}
        return out


def _any_chained(db: Database) -> bool:
    with db.read() as conn:
        return conn.execute(select(audit_log.c.seq).where(audit_log.c.chain_seq.is_not(None))
                            .limit(1)).first() is not None


def verify(db: Database, page: int = VERIFY_PAGE) -> ChainReport:
    """Walk the chain from its first row and check every link."""
    with db.read() as conn:
        head = conn.execute(select(audit_chain.c.chain_seq, audit_chain.c.hash)
                            .where(audit_chain.c.id == 1)).first() or _EMPTY
        pending = conn.execute(select(func.count()).select_from(audit_log)
                               .where(audit_log.c.chain_seq.is_(None))).scalar_one()
        previous, expected, checked = GENESIS, 1, 0
        while True:
            rows = conn.execute(
                select(audit_log.c.seq, audit_log.c.chain_seq, audit_log.c.hash, *_RECORDED)
                .where(audit_log.c.chain_seq >= expected,
                       audit_log.c.chain_seq <= head.chain_seq)
                .order_by(audit_log.c.chain_seq).limit(page)).all()
            for seq, position, stored_hash, *row in rows:
                if position != expected:
                    return ChainReport(False, checked, pending, seq, position,
                                       f"the record(s) at chain position {expected} to "
                                       f"{position - 1}, before this one, are missing")
                if digest(previous, expected, tuple(row)) != stored_hash:
                    return ChainReport(False, checked, pending, seq, expected,
                                       "this record, or the one before it in the chain, "
                                       "was changed after it was recorded")
                previous, expected, checked = stored_hash, expected + 1, checked + 1
            if len(rows) < page:
                break
    if head is _EMPTY and _any_chained(db):
        return ChainReport(False, 0, pending, None, None,
                           "the record of the chain's newest position is missing")
    if checked != head.chain_seq or previous != head.hash:
        return ChainReport(False, checked, pending, None, checked + 1,
                           f"the chain ends at position {checked}, but {head.chain_seq} "
                           "records were chained: the newest ones are missing")
    return ChainReport(True, checked, pending)
