"""One inbound HL7 v2 message: stored first (committed), then mapped and applied in one
transaction, and answered. A resent message (same control id from the same sender) gets
the answer the first one got, and changes nothing again; a message that cannot be mapped
or applied is kept with the reason, to be replayed after a fix (`atm hl7 replay`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection

from gateway.adapters.hl7 import messages
from gateway.adapters.hl7.apply import apply
from gateway.errors import ConflictError, PreconditionFailedError
from gateway.services.context import Context
from gateway.settings import Settings
from gateway.store.database import Database, is_transient
from gateway.store.repository import Actor
from mappings import hl7v2
from mappings.hl7v2_fields import INTERNAL, Hl7Error, Hl7MappingError, Where

log = logging.getLogger("atm.hl7")
RACE_ATTEMPTS = 3


@dataclass(frozen=True)
class Outcome:
    message_id: int
    status: str  # applied | failed | received (not settled yet)
    ack: str | None
    reason: str | None


class _SettledElsewhereError(Exception):
    """Another process settled the message first: what it wrote stands, ours is undone."""


def receive(db: Database, settings: Settings, raw: str) -> str:
    """The answer to one message received over MLLP. Raises only when the message could
    not be stored or settled (the database is away): then no answer is sent, and the
    sender, which keeps an unanswered message, sends it again."""
    header = _header(raw)
    sender = (header.application, header.facility) if header else ("", "")
    row, resent = messages.receive(db, raw, header.control_id if header else None, sender,
                                   header.message_type if header else None)
    if resent and row.status != messages.RECEIVED and row.ack is not None:
        log.info("HL7 message %s from %s^%s received again: answered as before (%s)",
                 row.control_id, *sender, row.status)
        return str(row.ack)
    outcome = process(db, settings, row.id, raw)
    if outcome.ack is None:
        raise RuntimeError(f"HL7 message {row.id} is stored but could not be settled")
    return outcome.ack


def refuse(db: Database, settings: Settings, raw: str, error: Hl7Error) -> str | None:
    """Keep what arrived unframed or cut off as failed, with the reason; the answer."""
    row, _ = messages.receive(db, raw, None, ("", ""), None)
    return _fail(db, settings, row.id, _header(raw), error).ack


def replay(db: Database, settings: Settings, message_ids: list[int]) -> list[Outcome]:
    """Apply kept inbound messages again (after a fix); their new answer is stored, not
    sent: the sender has long had the first."""
    outcomes = []
    for message_id in message_ids:
        with db.read() as conn:
            row = messages.get(conn, message_id)
        if row is None or row.direction != messages.IN:
            outcomes.append(Outcome(message_id, "unknown", None, "no such inbound message"))
        elif row.status not in messages.OPEN_IN:
            outcomes.append(Outcome(message_id, row.status, row.ack, "already applied"))
        else:
            outcomes.append(process(db, settings, message_id, row.raw))
    return outcomes


def process(db: Database, settings: Settings, message_id: int, raw: str) -> Outcome:
    """Map and apply a stored message, settling its row in the same transaction. A write
    that lost a race (a Task changed meanwhile, a PostgreSQL deadlock) is tried again on
    what is stored then."""
    header = _header(raw)
    try:
        report = hl7v2.read_oru(raw)
    except Hl7Error as exc:
        return _fail(db, settings, message_id, header, exc)
    for attempt in range(1, RACE_ATTEMPTS + 1):
        try:
            return _apply(db, settings, message_id, report)
        except _SettledElsewhereError:
            return _as_stored(db, message_id)
        except Hl7Error as exc:
            return _fail(db, settings, message_id, header, exc, report.coi)
        except Exception as exc:  # noqa: BLE001 - kept with the reason, replayed after a fix
            if _lost_race(exc) and attempt < RACE_ATTEMPTS:
                time.sleep(0.05 * attempt)
                continue
            log.exception("applying HL7 message %s failed", message_id)
            return _fail(db, settings, message_id, header, Hl7MappingError(
                f"the gateway could not apply it ({type(exc).__name__}); it is kept: "
                "atm hl7 replay once fixed", Where("MSH", 10), INTERNAL), report.coi)
    raise AssertionError("unreachable: the last attempt returns")


def _apply(db: Database, settings: Settings, message_id: int,
           report: hl7v2.LimsReport) -> Outcome:
    now = datetime.now(UTC)
    ack = _answer(settings, message_id, report.header, now)
    sender = f"{report.header.application}^{report.header.facility}"
    with db.write() as conn:
        if not messages.settle(conn, message_id, messages.APPLIED, was=messages.OPEN_IN,
                               ack=ack, reason=None, coi=report.coi,
                               attempts=_attempts(conn, message_id)):
            raise _SettledElsewhereError
        ctx = Context(db=db, settings=settings, base_url=settings.base_url or "",
                      actor=Actor(name=f"hl7 {sender}"[:255])).within(conn)
        written = apply(ctx, report, now)
    log.info("HL7 %s %s from %s applied: %d resources written", report.header.message_type,
             report.header.control_id, sender, len(written))
    return Outcome(message_id, messages.APPLIED, ack, None)


def _lost_race(exc: BaseException) -> bool:
    return isinstance(exc, PreconditionFailedError | ConflictError) or is_transient(exc)


def _fail(db: Database, settings: Settings, message_id: int, header: hl7v2.Header | None,
          error: Hl7Error, coi: str | None = None) -> Outcome:
    """Keep the message as failed, with the reason; answer AE (or AR: unreadable)."""
    ack = _answer(settings, message_id, header, datetime.now(UTC), error)
    with db.write(notify=False) as conn:
        settled = messages.settle(conn, message_id, messages.FAILED, was=messages.OPEN_IN,
                                  ack=ack, reason=str(error), coi=coi,
                                  attempts=_attempts(conn, message_id))
    if not settled:
        return _as_stored(db, message_id)
    log.warning("HL7 message %s refused (%s): %s", message_id, error.ack_code, error)
    return Outcome(message_id, messages.FAILED, ack, str(error))


def _answer(settings: Settings, message_id: int, header: hl7v2.Header | None, now: datetime,
            error: Hl7Error | None = None) -> str:
    return hl7v2.ack(error.ack_code if error else "AA", header=header,
                     control_id=f"ACK{message_id}", now=now, error=error,
                     sender=(settings.hl7_application, settings.hl7_facility))


def _header(raw: str) -> hl7v2.Header | None:
    try:
        return hl7v2.parse(raw)[0]
    except Hl7Error:
        return None


def _attempts(conn: Connection, message_id: int) -> int:
    row = messages.get(conn, message_id)
    return int(row.attempts) + 1 if row is not None else 1


def _as_stored(db: Database, message_id: int) -> Outcome:
    with db.read() as conn:
        row = messages.get(conn, message_id)
    return Outcome(message_id, row.status, row.ack, row.reason)
