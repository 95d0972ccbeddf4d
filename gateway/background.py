"""Work that runs in a thread beside the API while the server is up: the orchestrator,
subscription matching and delivery, EHR sync, the HL7 bridge."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def in_thread(serve: Callable[[threading.Event], None], name: str,
              join_seconds: float = 30.0) -> Iterator[threading.Event]:
    """`serve(stop)` in a daemon thread while the block runs; afterwards `stop` is set
    and the thread given `join_seconds` to finish what it is doing."""
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(stop,), name=name, daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(timeout=join_seconds)
