"""Per-client request rates: a token bucket each, so one busy partner is answered 429
at once while the others go on unslowed. Kept in the process (per worker)."""

from __future__ import annotations

import math
import threading


class RateLimiter:
    def __init__(self, per_second: float, burst: int) -> None:
        self.per_second, self.burst = per_second, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)
        self._lock = threading.Lock()

    def retry_after(self, client_id: str, now: float) -> int | None:
        """None when the request may go ahead (it is counted), else whole seconds until
        the client may try again."""
        if self.per_second <= 0:
            return None
        with self._lock:
            tokens, at = self._buckets.get(client_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.per_second)
            if tokens >= 1.0:
                self._buckets[client_id] = (tokens - 1.0, now)
                return None
            self._buckets[client_id] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / self.per_second))
