"""Tamper evidence for the audit log: every row is chained behind its predecessor.

A row's hash is SHA-256 over its predecessor's hash, its place in the chain and every
column it was stored with. Changing a stored row, deleting one, or reordering them breaks
the chain from that row on; `verify` walks it and names the first row that does not
follow. `audit_chain` keeps the newest row's place and hash, so a deleted tail shows too.

Rows are chained shortly after they are stored (`seal`, run by the audit writer thread
and at shutdown), in the order the sealer finds them: on PostgreSQL a row's seq is taken
before its transaction commits, so seq order is not commit order, and chaining by the
sealer's own count needs no wait for gaps. Concurrent sealers (several replicas) take
turns on the `audit_chain` row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, bindparam, func, select, update

from gateway.store.database import Database
from gateway.store.schema import audit_chain, audit_log

GENESIS = "0" * 64
SEAL_BATCH = 2000
VERIFY_PAGE = 5000
_EMPTY = SimpleNamespace(chain_seq=0, hash=GENESIS)  # the head of a trail never chained
_CONTENT = [c for c in audit_log.columns if c.name not in ("chain_seq", "hash")]


def digest(previous: str, position: int, row: Any) -> str:
    """The hash a row at `position` carries, following a row whose hash is `previous`."""
    content = [position, *(getattr(row, c.name) for c in _CONTENT)]
    data = json.dumps(content, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{previous}\n{data}".encode()).hexdigest()


def _unchained_exists(db: Database) -> bool:
    with db.read() as conn:
        return conn.execute(select(audit_log.c.seq).where(audit_log.c.chain_seq.is_(None))
                            .limit(1)).first() is not None


def seal(db: Database, limit: int = SEAL_BATCH) -> int:
    """Chain up to `limit` stored rows behind the newest chained one; how many it chained."""
    if not _unchained_exists(db):  # the usual case: no write transaction at all
        return 0
    with db.write() as conn:
        head = conn.execute(select(audit_chain.c.chain_seq, audit_chain.c.hash)
                            .where(audit_chain.c.id == 1).with_for_update()).first()
        if head is None:  # an empty trail (a concurrent first sealer loses on the key)
            conn.execute(audit_chain.insert().values(id=1, chain_seq=0, hash=GENESIS))
        rows = conn.execute(select(*_CONTENT).where(audit_log.c.chain_seq.is_(None))
                            .order_by(audit_log.c.seq).limit(limit)).all()
        position, previous = (0, GENESIS) if head is None else head
        chained = []
        for row in rows:
            position += 1
            previous = digest(previous, position, row)
            chained.append({"s": row.seq, "p": position, "h": previous})
        if chained:
            _write_chain(conn, chained, position, previous)
        return len(chained)


def _write_chain(conn: Connection, chained: list[dict[str, Any]], position: int,
                 newest: str) -> None:
    conn.execute(update(audit_log).where(audit_log.c.seq == bindparam("s"))
                 .values(chain_seq=bindparam("p"), hash=bindparam("h")),
                 chained)
    conn.execute(update(audit_chain).where(audit_chain.c.id == 1)
                 .values(chain_seq=position, hash=newest))


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
                select(*_CONTENT, audit_log.c.chain_seq, audit_log.c.hash)
                .where(audit_log.c.chain_seq >= expected,
                       audit_log.c.chain_seq <= head.chain_seq)
                .order_by(audit_log.c.chain_seq).limit(page)).all()
            for row in rows:
                if row.chain_seq != expected:
                    return ChainReport(False, checked, pending, row.seq, row.chain_seq,
                                       f"the record(s) at chain position {expected} to "
                                       f"{row.chain_seq - 1}, before this one, are missing")
                if digest(previous, expected, row) != row.hash:
                    return ChainReport(False, checked, pending, row.seq, expected,
                                       "this record, or the one before it in the chain, "
                                       "was changed after it was recorded")
                previous, expected, checked = row.hash, expected + 1, checked + 1
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
