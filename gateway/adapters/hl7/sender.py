"""Sending the stored orders to the LIMS over MLLP until each is acknowledged: AA (or CA)
settles it; AR (or CR) rejects it at once; AE is retried a few times, then rejected; a
LIMS that cannot be reached or does not answer is retried without end, backing off
exponentially with jitter. Rows, attempts and next times live in `hl7_messages`: a
restart, or a second process sending, loses or doubles nothing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from dataclasses import dataclass
from typing import Any

from hl7.mllp import InvalidBlockError, open_hl7_connection
from sqlalchemy import func, select

from gateway.adapters.hl7 import messages
from gateway.settings import Settings
from gateway.store.database import Database
from gateway.store.schema import hl7_messages
from gateway.store.timeparse import now_micros
from mappings import hl7v2

log = logging.getLogger("atm.hl7")
ACCEPTED, REFUSED, ERRORS = ("AA", "CA"), ("AR", "CR"), ("AE", "CE")
_UNREACHABLE = (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                InvalidBlockError, ValueError)


@dataclass(frozen=True)
class Attempt:
    status: str  # pending (to be retried), acked or rejected
    reason: str | None
    ack: str | None = None


class OrderSender:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings = db, settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def nudge(self) -> None:
        """New orders were stored (from any thread): look for work now."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def serve(self, stop: threading.Event) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        while not stop.is_set():
            self._wake.clear()
            try:
                await self.send_due()
                wait = await asyncio.to_thread(self._until_next)
            except Exception:  # noqa: BLE001 - the database is away: try again soon
                log.exception("sending HL7 orders failed; retrying")
                wait = self.settings.hl7_poll_seconds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def send_due(self, limit: int = 50) -> int:
        """Send every order whose time has come, one after the other; how many were."""
        sent = 0
        for row in await asyncio.to_thread(messages.due, self.db, now_micros(), limit):
            lease = now_micros() + int(3 * self.settings.hl7_timeout_seconds * 1_000_000)
            if await asyncio.to_thread(messages.claim, self.db, row, lease):
                await self.send(row)
                sent += 1
        return sent

    async def send(self, row: Any) -> Attempt:
        attempt = await self._attempt(row)
        attempts = row.attempts + 1
        values: dict[str, Any] = {"status": attempt.status, "reason": attempt.reason,
                                  "attempts": attempts, "ack": attempt.ack}
        if attempt.status == messages.PENDING:
            values["next_attempt"] = now_micros() + self._backoff(attempts)
        await asyncio.to_thread(messages.record, self.db, row.id, **values)
        log.log(logging.INFO if attempt.status == messages.ACKED else logging.WARNING,
                "%s %s (%s) to the LIMS, attempt %d: %s%s", row.message_type, row.control_id,
                row.source, attempts, attempt.status,
                f" ({attempt.reason})" if attempt.reason else "")
        return attempt

    async def _attempt(self, row: Any) -> Attempt:
        try:
            answer = await self._exchange(str(row.raw))
        except _UNREACHABLE as exc:
            return Attempt(messages.PENDING, f"no answer from the LIMS: {_said(exc)}")
        try:
            ack = hl7v2.read_ack(answer)
        except hl7v2.Hl7Error as exc:
            return Attempt(messages.PENDING, f"the LIMS answered no ACK: {exc}", answer)
        if ack.control_id != row.control_id:
            return Attempt(messages.PENDING, f"the LIMS acknowledged {ack.control_id!r}, "
                           "another message", answer)
        if ack.code in ACCEPTED:
            return Attempt(messages.ACKED, None, answer)
        said = f"the LIMS answered {ack.code}" + (f": {ack.text}" if ack.text else "")
        if ack.code in REFUSED or row.attempts + 1 >= self.settings.hl7_error_attempts:
            return Attempt(messages.REJECTED, said, answer)
        return Attempt(messages.PENDING, said, answer)

    async def _exchange(self, raw: str) -> str:
        """One connection, one message, one answer (each step within the timeout)."""
        timeout = self.settings.hl7_timeout_seconds
        host, port = self.settings.hl7_lims_host, self.settings.hl7_lims_port
        reader, writer = await asyncio.wait_for(open_hl7_connection(
            host, port, limit=self.settings.hl7_max_message_bytes), timeout)
        try:
            writer.writeblock(raw.encode("utf-8"))
            await asyncio.wait_for(writer.drain(), timeout)
            block = await asyncio.wait_for(reader.readblock(), timeout)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), timeout)
        return bytes(block).decode("utf-8", errors="replace")

    def _backoff(self, attempts: int) -> int:
        """µs before the next attempt: doubled each time up to the maximum, with jitter so
        that orders failed together do not all come back at once."""
        seconds = min(self.settings.hl7_retry_max_seconds,
                      self.settings.hl7_retry_seconds * 2 ** min(attempts - 1, 30))
        return int(seconds * random.uniform(0.5, 1.0) * 1_000_000)  # noqa: S311 - jitter

    def _until_next(self) -> float:
        """Seconds until the next order is due (at most the poll interval)."""
        with self.db.read() as conn:
            soonest = conn.execute(select(func.min(hl7_messages.c.next_attempt)).where(
                hl7_messages.c.direction == messages.OUT,
                hl7_messages.c.status.in_((messages.PENDING, messages.SENT)))).scalar()
        poll = self.settings.hl7_poll_seconds
        if soonest is None:
            return poll
        return max(0.01, min(poll, (int(soonest) - now_micros()) / 1_000_000))


def _said(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
