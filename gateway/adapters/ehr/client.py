"""An HTTP client to one EHR: SMART Backend Services tokens, retries, a circuit breaker.

- Tokens: the token endpoint is discovered once (`.well-known/smart-configuration`, else
  the CapabilityStatement's oauth-uris); tokens are kept until shortly before they
  expire, and renewed once on a 401 (gateway.auth.credentials.SmartAuth).
- Retries (tenacity): a network error, 429 or 5xx is tried again, up to
  `ehr_attempts` times, after an exponential backoff with full jitter, or after the
  Retry-After the EHR asked for (capped at `ehr_backoff_max_seconds`).
- Circuit breaker, per endpoint and process: after `ehr_breaker_failures` failed calls
  in a row the endpoint is left alone for `ehr_breaker_seconds`; then one call may try.
  While it is open, calls fail at once with EhrUnavailable (and its retry time), so a
  dead EHR costs nobody a timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_result,
    stop_after_attempt,
    wait_random_exponential,
)

from gateway.adapters.ehr.endpoints import Endpoint
from gateway.auth.credentials import SmartAuth, TokenError, token_url
from gateway.settings import Settings

FHIR_JSON = "application/fhir+json"
RETRIED_STATUS = frozenset({429, 500, 502, 503, 504})


class EhrUnavailable(RuntimeError):
    """The EHR cannot be reached now; `retry_after` seconds is when to try again."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EhrRefused(RuntimeError):
    """The EHR answered, and refused (a 4xx other than 429): trying again changes nothing."""

    def __init__(self, message: str, response: httpx.Response | None = None) -> None:
        super().__init__(message)
        self.response = response


class CircuitBreaker:
    """Closed: calls go through. Open (after `failures` in a row): calls fail at once
    until `cooldown` seconds have passed, then one call may try (half-open)."""

    def __init__(self, failures: int, cooldown: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures, self.cooldown, self.clock = failures, cooldown, clock
        self._lock = threading.Lock()
        self._failed = 0
        self._open_until = 0.0
        self._trying = False

    def before(self) -> None:
        """Raise EhrUnavailable when the circuit is open; let one trial through after."""
        with self._lock:
            if self._failed < self.failures:
                return
            now = self.clock()
            if now < self._open_until or self._trying:
                raise EhrUnavailable("the circuit to this EHR is open after repeated "
                                     "failures", max(self._open_until - now, 1.0))
            self._trying = True  # half-open: this call decides

    def succeeded(self) -> None:
        with self._lock:
            self._failed, self._trying = 0, False

    def failed(self) -> None:
        with self._lock:
            self._failed += 1
            self._trying = False
            if self._failed >= self.failures:
                self._open_until = self.clock() + self.cooldown

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._failed >= self.failures and self.clock() < self._open_until


_BREAKERS: dict[str, CircuitBreaker] = {}
_AUTHS: dict[tuple[str, str, str, str], SmartAuth] = {}  # tokens kept across calls
_BREAKERS_LOCK = threading.Lock()


def breaker_for(endpoint: Endpoint, settings: Settings) -> CircuitBreaker:
    """The one breaker of an endpoint in this process, whoever calls it."""
    with _BREAKERS_LOCK:
        if endpoint.name not in _BREAKERS:
            _BREAKERS[endpoint.name] = CircuitBreaker(settings.ehr_breaker_failures,
                                                      settings.ehr_breaker_seconds)
        return _BREAKERS[endpoint.name]


def _retry_after(response: httpx.Response | None) -> float | None:
    """Seconds the server asked us to wait (Retry-After: seconds or an HTTP date)."""
    value = response.headers.get("retry-after") if response is not None else None
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class EhrClient:
    def __init__(self, endpoint: Endpoint, settings: Settings) -> None:
        self.endpoint, self.settings = endpoint, settings
        self.http = httpx.Client(base_url=endpoint.base_url + "/",
                                 timeout=settings.ehr_timeout_seconds,
                                 headers={"accept": FHIR_JSON})
        self.breaker = breaker_for(endpoint, settings)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> EhrClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- authentication ---------------------------------------------------------------
    def _token_url(self) -> str:
        try:
            found = self.http.get(".well-known/smart-configuration")
            if found.status_code == 200 and found.json().get("token_endpoint"):
                return str(found.json()["token_endpoint"])
            url = token_url(self.http, self.endpoint.base_url)
        except (httpx.HTTPError, ValueError) as exc:
            raise EhrUnavailable(f"cannot discover the token endpoint: {exc}", 5.0) from exc
        if url is None:
            raise EhrRefused("the EHR names no token endpoint (SMART Backend Services)")
        return url

    def _authentication(self) -> SmartAuth:
        """The endpoint's token source, shared by every call of this process: a token is
        fetched once and used until shortly before it expires."""
        endpoint = self.endpoint
        key = (endpoint.name, endpoint.base_url, endpoint.client_id,
               str(endpoint.key.get("kid", "")))
        with _BREAKERS_LOCK:
            found = _AUTHS.get(key)
        if found is None:
            found = SmartAuth(self._token_url(), endpoint.credentials, endpoint.scope)
            with _BREAKERS_LOCK:
                found = _AUTHS.setdefault(key, found)
        return found

    # -- calls ---------------------------------------------------------------------------
    def request(self, method: str, path: str, **options: Any) -> httpx.Response:
        """One call, retried and guarded by the breaker. 2xx, 3xx and 4xx answers other
        than 429 are returned (the caller judges them); EhrUnavailable when the EHR
        cannot be reached or keeps failing."""
        self.breaker.before()
        try:
            response = self._retrying(method, path, options)
        except EhrUnavailable:
            self.breaker.failed()
            raise
        except (httpx.TransportError, TokenError) as exc:
            self.breaker.failed()
            if isinstance(exc, TokenError) and " answered 4" in str(exc) and \
                    " answered 429" not in str(exc):
                raise EhrRefused(f"{self.endpoint.name} refused our credentials: {exc}") from exc
            raise EhrUnavailable(f"{self.endpoint.name} cannot be reached: {exc}",
                                 self.settings.ehr_backoff_max_seconds) from exc
        if response.status_code in RETRIED_STATUS:
            self.breaker.failed()
            raise EhrUnavailable(f"{self.endpoint.name} answered {response.status_code} "
                                 f"{self.settings.ehr_attempts} times",
                                 _retry_after(response) or self.settings.ehr_backoff_max_seconds)
        self.breaker.succeeded()
        return response

    def _retrying(self, method: str, path: str, options: dict[str, Any]) -> httpx.Response:
        backoff = wait_random_exponential(multiplier=self.settings.ehr_backoff_seconds,
                                          max=self.settings.ehr_backoff_max_seconds)

        def wait(state: RetryCallState) -> float:
            outcome = state.outcome
            asked = (_retry_after(outcome.result()) if outcome is not None
                     and not outcome.failed else None)
            if asked is not None:
                return min(asked, self.settings.ehr_backoff_max_seconds)
            return float(backoff(state))

        retrying = Retrying(
            stop=stop_after_attempt(self.settings.ehr_attempts), wait=wait, reraise=True,
            retry=(retry_if_exception_type(httpx.TransportError)
                   | retry_if_result(lambda r: r.status_code in RETRIED_STATUS)),
            # Out of tries: the last answer (a 429 or 5xx) is returned, the last network
            # error raised.
            retry_error_callback=lambda state: state.outcome.result())  # type: ignore[union-attr]
        auth = self._authentication()
        response: httpx.Response = retrying(
            lambda: self.http.request(method, path, auth=auth, **options))
        return response

    def read_json(self, path: str, **options: Any) -> dict[str, Any]:
        """A GET whose answer must be 200 FHIR JSON."""
        response = self.request("GET", path, **options)
        if response.status_code != 200:
            raise EhrRefused(f"GET {path} answered {response.status_code}: "
                             f"{response.text[:200]}", response)
        answer: dict[str, Any] = response.json()
        return answer
