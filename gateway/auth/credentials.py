"""The client side of SMART Backend Services, for the gateway's own tools (`atm token`,
`atm demo`, the benchmark) and for anyone scripting against the gateway: a key pair,
the signed client assertion, and access tokens fetched (and renewed) from the server's
token endpoint, which it names in its CapabilityStatement."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from joserfc import jwt
from joserfc.jwk import ECKey

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHM = "ES384"
ASSERTION_SECONDS = 240  # under the five minutes the token endpoint accepts
RENEW_BEFORE_SECONDS = 30  # a token this close to expiry is renewed before use


class TokenError(RuntimeError):
    """The token endpoint refused (the message carries its answer)."""


def new_key() -> ECKey:
    """A fresh P-384 key pair for ES384 assertions, with a kid."""
    return ECKey.generate_key("P-384", parameters={"kid": uuid.uuid4().hex[:16],
                                                   "alg": ALGORITHM, "use": "sig"},
                              private=True)


def public_jwks(key: ECKey) -> dict[str, Any]:
    """The JWK Set a client registers: its public key only."""
    return {"keys": [key.as_dict(private=False)]}


@dataclass(frozen=True)
class Credentials:
    """A registered client's id and private key: what it needs to get tokens."""

    client_id: str
    key: ECKey

    def to_json(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "keys": [self.key.as_dict(private=True)]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Credentials:
        return cls(data["client_id"], ECKey.import_key(data["keys"][0]))

    def save(self, path: Path) -> None:
        """Write them to a file only its owner may read."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Credentials:
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))

    def assertion(self, token_url: str, now: int | None = None) -> str:
        """A signed private_key_jwt client assertion for this token endpoint, used once."""
        issued = int(time.time()) if now is None else now
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": token_url,
                  "exp": issued + ASSERTION_SECONDS, "jti": str(uuid.uuid4())}
        return jwt.encode({"alg": ALGORITHM, "kid": self.key.kid, "typ": "JWT"}, claims,
                          self.key, algorithms=[ALGORITHM])

    def token_form(self, token_url: str, scope: str | None = None) -> dict[str, str]:
        form = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": self.assertion(token_url)}
        return form | ({"scope": scope} if scope else {})


def token_url(http: httpx.Client, fhir_base: str) -> str | None:
    """The token endpoint a server names in /metadata; None when it asks for no token
    (ATM_AUTH=off)."""
    statement = http.get(f"{fhir_base.rstrip('/')}/metadata").raise_for_status().json()
    for ext in statement["rest"][0].get("security", {}).get("extension", []):
        if ext.get("url", "").endswith("/oauth-uris"):
            return next((e["valueUri"] for e in ext.get("extension", [])
                         if e.get("url") == "token"), None)
    return None


def fetch_token(http: httpx.Client, url: str, credentials: Credentials,
                scope: str | None = None) -> dict[str, Any]:
    """The token endpoint's answer (access_token, expires_in, scope)."""
    response = http.post(url, data=credentials.token_form(url, scope))
    if response.status_code != 200:
        raise TokenError(f"{url} answered {response.status_code}: {response.text[:200]}")
    answer: dict[str, Any] = response.json()
    return answer


class SmartAuth(httpx.Auth):
    """httpx authentication with SMART Backend Services tokens: fetched when first needed,
    renewed shortly before they expire, and once more if the server answers 401."""

    requires_response_body = True

    def __init__(self, url: str, credentials: Credentials, scope: str | None = None) -> None:
        self.url, self.credentials, self.scope = url, credentials, scope
        self._token: str | None = None
        self._renew_at = 0.0

    def _token_request(self) -> httpx.Request:
        return httpx.Request("POST", self.url,
                             data=self.credentials.token_form(self.url, self.scope))

    def _keep(self, response: httpx.Response) -> None:
        if response.status_code != 200:
            raise TokenError(f"{self.url} answered {response.status_code}: "
                             f"{response.text[:200]}")
        answer = response.json()
        self._token = answer["access_token"]
        self._renew_at = time.monotonic() + answer["expires_in"] - RENEW_BEFORE_SECONDS

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response,
                                                              None]:
        if self._token is None or time.monotonic() >= self._renew_at:
            self._keep((yield self._token_request()))
        request.headers["Authorization"] = f"Bearer {self._token}"
        response = yield request
        if response.status_code == 401:  # revoked or expired early: one fresh try
            self._keep((yield self._token_request()))
            request.headers["Authorization"] = f"Bearer {self._token}"
            yield request
