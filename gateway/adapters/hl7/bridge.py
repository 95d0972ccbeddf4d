"""The HL7 v2 bridge running: the MLLP listener and the order sender on an event loop in
one thread, the order book (reading the change log) in another; beside the API in
`atm serve`, or alone in `atm hl7 listen`. Each part runs only when configured."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.adapters.hl7 import listener
from gateway.adapters.hl7.orders import OrderBook
from gateway.adapters.hl7.sender import OrderSender
from gateway.background import in_thread
from gateway.settings import Settings
from gateway.store.database import Database

log = logging.getLogger("atm.hl7")
START_SECONDS = 10.0


def listens(settings: Settings) -> bool:
    return settings.hl7_listen_port is not None


def sends(settings: Settings) -> bool:
    return bool(settings.hl7_lims_host) and settings.hl7_lims_port is not None


class Bridge:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings = db, settings
        self.sender = OrderSender(db, settings) if sends(settings) else None
        self.book = (OrderBook(db, settings, on_order=self.sender.nudge)
                     if self.sender is not None else None)
        self.started = threading.Event()  # set once listening (or once that failed)
        self.address: tuple[str, int] | None = None  # where it listens

    def serve(self, stop: threading.Event) -> None:
        """Listen and send until `stop`; the order book reads the change log meanwhile."""
        threads = []
        if self.book is not None:
            self.book.prime()
            threads.append(threading.Thread(target=self.book.serve, args=(stop,),
                                            name="atm-hl7-orders", daemon=True))
        for thread in threads:
            thread.start()
        try:
            asyncio.run(self._serve(stop))
        finally:
            self.started.set()
            stop.set()
            for thread in threads:
                thread.join(timeout=30)

    async def _serve(self, stop: threading.Event) -> None:
        server = await self._listen()
        self.started.set()
        try:
            if self.sender is not None:
                await self.sender.serve(stop)
            while not stop.is_set():
                await asyncio.sleep(0.1)
        finally:
            if server is not None:
                server.close()
                await server.wait_closed()

    async def _listen(self) -> asyncio.Server | None:
        if not listens(self.settings):
            return None
        host, port = self.settings.hl7_listen_host, self.settings.hl7_listen_port
        assert port is not None
        try:
            server = await listener.start(self.db, self.settings, host, port)
        except OSError:
            log.exception("the HL7 listener cannot listen on %s:%s", host, port)
            return None
        self.address = server.sockets[0].getsockname()[:2]
        log.info("HL7 v2 (MLLP) listening on %s:%s", *self.address)
        return server


@contextmanager
def running_beside(db: Database, settings: Settings) -> Iterator[Bridge | None]:
    """The bridge in threads beside the API while the block runs (if configured)."""
    if not listens(settings) and not sends(settings):
        yield None
        return
    bridge = Bridge(db, settings)
    with in_thread(bridge.serve, "atm-hl7"):
        bridge.started.wait(START_SECONDS)
        yield bridge
