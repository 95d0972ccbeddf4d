"""A client's public keys: its registered JWK Set, or the one at its URL, fetched with
httpx and kept as long as the response's Cache-Control allows (5 minutes without one)."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import httpx

from gateway.auth.clients import Client

DEFAULT_SECONDS = 300
MAX_SECONDS = 24 * 3600
FETCH_TIMEOUT = 5.0
_MAX_AGE = re.compile(r"max-age=(\d+)")


class KeyLookupError(Exception):
    """The client's keys could not be had (never shown to the client)."""


class JwksCache:
    def __init__(self, transport: httpx.BaseTransport | None = None) -> None:
        self._entries: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._transport = transport

    def key_set(self, client: Client) -> dict[str, Any]:
        if client.jwks is not None:
            return client.jwks
        assert client.jwks_url is not None
        with self._lock:
            cached = self._entries.get(client.jwks_url)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        fetched, seconds = self._fetch(client.jwks_url)
        with self._lock:
            self._entries[client.jwks_url] = (time.monotonic() + seconds, fetched)
        return fetched

    def _fetch(self, url: str) -> tuple[dict[str, Any], float]:
        try:
            with httpx.Client(timeout=FETCH_TIMEOUT, transport=self._transport,
                              follow_redirects=False) as http:
                response = http.get(url, headers={"accept": "application/json"})
                response.raise_for_status()
                body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise KeyLookupError(f"JWK Set at {url}: {exc}") from exc
        if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
            raise KeyLookupError(f"{url} did not answer a JWK Set")
        return body, _lifetime(response.headers.get("cache-control", ""))


def _lifetime(cache_control: str) -> float:
    if "no-store" in cache_control or "no-cache" in cache_control:
        return 0.0
    match = _MAX_AGE.search(cache_control)
    return float(min(int(match.group(1)), MAX_SECONDS)) if match else DEFAULT_SECONDS
