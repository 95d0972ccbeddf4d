"""Matching and delivery running together: beside the API in `atm serve`, or alone in
`atm worker` processes (any number against one PostgreSQL)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.background import in_thread
from gateway.settings import Settings
from gateway.store.database import BUSY_ROUND_CHANGES, Database
from gateway.subscriptions.delivery import Deliverer
from gateway.subscriptions.matcher import Matcher

log = logging.getLogger("atm.subscriptions")
ROUND_GAP_SECONDS = 0.05
"""After a busy round of matching (BUSY_ROUND_CHANGES), the next changes gather this
long: in a burst of writes, notifications then leave in fuller batches, sooner, than
with a round per commit (which also took CPU from the writers)."""


class SubscriptionWorker:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings = db, settings
        self.matcher = Matcher(db, settings)
        self.deliverer = Deliverer(db, settings)

    def serve(self, stop: threading.Event) -> None:
        """Match in one thread, deliver on an event loop in this one, until `stop`."""
        matching = threading.Thread(target=self._match, args=(stop,), daemon=True,
                                    name="atm-subscription-matching")
        matching.start()
        try:
            asyncio.run(self.deliverer.serve(stop))
        finally:
            stop.set()
            matching.join(timeout=30)
            self.matcher.close()

    def _match(self, stop: threading.Event) -> None:
        committed = self.db.committed.listen()
        poll = self.settings.subscription_poll_seconds
        while not stop.is_set():
            committed.clear()  # before reading: a commit after it wakes the wait
            try:
                changes, events = self.matcher.run_once()
            except Exception:  # noqa: BLE001 - keep matching; the cursor did not move
                log.exception("subscription matching failed; retrying")
                changes, events = 0, 0
                stop.wait(poll)
            if events:
                self.deliverer.nudge()
            if changes < self.matcher.batch:
                if changes >= BUSY_ROUND_CHANGES:
                    stop.wait(ROUND_GAP_SECONDS)
                committed.wait(poll)


@contextmanager
def running_beside(db: Database, settings: Settings) -> Iterator[SubscriptionWorker | None]:
    """Matching and delivery in threads beside the API while the block runs (if enabled)."""
    if not settings.subscriptions:
        yield None
        return
    worker = SubscriptionWorker(db, settings)
    with in_thread(worker.serve, "atm-subscriptions", join_seconds=60):
        yield worker
