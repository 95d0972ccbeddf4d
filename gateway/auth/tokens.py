"""SMART Backend Services tokens: client assertions checked, access tokens issued,
introspected (RFC 7662) and revoked (RFC 7009).

https://hl7.org/fhir/smart-app-launch/backend-services.html. JOSE is joserfc's; the
only algorithms accepted are RS384 and ES384, each only with a key of its own family, and
assertions that point elsewhere for their key (jku, x5u, jwk, x5c) are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from functools import cached_property, lru_cache
from types import SimpleNamespace
from typing import Any

from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey
from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError

from gateway.auth.clients import Client, client_from_row, get_client
from gateway.auth.keys import JwksCache, KeyLookupError
from gateway.auth.people import USER_SCOPES, User, redeem_code
from gateway.auth.scopes import Scope, ScopeError, narrow, parse_scopes, render
from gateway.store.database import Database
from gateway.store.schema import oauth_jtis, oauth_tokens

log = logging.getLogger("atm.auth")

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHMS: dict[str, type[RSAKey] | type[ECKey]] = {"RS384": RSAKey, "ES384": ECKey}
TOKEN_SECONDS = 300
MAX_ASSERTION_SECONDS = 300
_FOREIGN_KEY_HEADERS = ("jku", "x5u", "jwk", "x5c")
_MICROS = 1_000_000


class InvalidClientError(Exception):
    """The client could not be authenticated. Its message is for the server's log only:
    the client hears `invalid_client` and nothing about which check failed."""


class InvalidScopeError(Exception):
    """The requested scopes are not understood or none of them may be granted."""


@dataclass(frozen=True)
class Grant:
    client: Client
    scopes: str
    expires_at: int  # seconds since the epoch

    @cached_property
    def scope_list(self) -> list[Scope]:
        """Parsed once per request, however many Bundle entries are checked against it."""
        return list(_parsed(self.scopes))


@lru_cache(maxsize=1024)
def _parsed(scopes: str) -> tuple[Scope, ...]:
    return tuple(parse_scopes(scopes))


def auth_urls(fhir_base: str) -> dict[str, str]:
    """The OAuth2 endpoints beside a FHIR base (…/fhir → …/auth/token)."""
    root = fhir_base[:-len("/fhir")] if fhir_base.endswith("/fhir") else fhir_base
    return {name: f"{root}/auth/{name}"
            for name in ("token", "introspect", "revoke", "authorize")}


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _unverified(assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims, read before the signature is checked (to find the key)."""
    try:
        compact = jws.extract_compact(assertion.encode())
        claims = json.loads(compact.payload)
    except (JoseError, ValueError) as exc:
        raise InvalidClientError(f"not a compact JWS: {exc}") from exc
    if not isinstance(claims, dict):
        raise InvalidClientError("the assertion's payload is not a JSON object")
    return dict(compact.protected), claims


def claimed_client_id(assertion: str | None) -> str | None:
    """The client id an assertion claims (its iss), unverified: for the audit record of
    a failed authentication."""
    if not assertion:
        return None
    try:
        issuer = _unverified(assertion)[1].get("iss")
    except InvalidClientError:
        return None
    return issuer[:64] if isinstance(issuer, str) else None


def client_key(client: Client, header: dict[str, Any], keys: JwksCache) -> RSAKey | ECKey:
    """The registered key a JWS header names (kid, alg), or InvalidClientError."""
    alg, kid = header.get("alg"), header.get("kid")
    if alg not in ALGORITHMS:
        raise InvalidClientError(f"alg {alg!r} is not accepted")
    if any(name in header for name in _FOREIGN_KEY_HEADERS):
        raise InvalidClientError("the assertion names a key outside the registration")
    if not kid:
        raise InvalidClientError("the assertion names no kid")
    try:
        key_set = keys.key_set(client)
    except KeyLookupError as exc:
        raise InvalidClientError(str(exc)) from exc
    found = [k for k in key_set.get("keys", []) if isinstance(k, dict) and k.get("kid") == kid]
    if len(found) != 1:
        raise InvalidClientError(f"kid {kid!r} matches {len(found)} registered keys")
    family = ALGORITHMS[alg]
    if found[0].get("kty") != family.key_type:
        raise InvalidClientError(f"kid {kid!r} is a {found[0].get('kty')} key, not for {alg}")
    try:
        return family.import_key(found[0])
    except (JoseError, ValueError) as exc:
        raise InvalidClientError(f"kid {kid!r} cannot be used: {exc}") from exc


def _check_claims(claims: dict[str, Any], client: Client, token_url: str, now: int) -> int:
    """The assertion's expiry, once its claims hold."""
    if claims.get("iss") != client.client_id or claims.get("sub") != client.client_id:
        raise InvalidClientError("iss and sub must both be the client_id")
    audience = claims.get("aud")
    if audience != token_url and not (isinstance(audience, list) and token_url in audience):
        raise InvalidClientError(f"aud {audience!r} is not the token endpoint")
    exp = claims.get("exp")
    if not isinstance(exp, int) or isinstance(exp, bool) or exp <= now:
        raise InvalidClientError("exp is missing or past")
    if exp > now + MAX_ASSERTION_SECONDS:
        raise InvalidClientError("exp is more than five minutes ahead")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not 0 < len(jti) <= 255:
        raise InvalidClientError("jti is missing")
    return exp


def authenticate(db: Database, keys: JwksCache, assertion_type: str | None,
                 assertion: str | None, token_url: str, now: int) -> Client:
    """The registered, enabled client whose signed assertion this is (used once)."""
    if assertion_type != ASSERTION_TYPE or not assertion:
        raise InvalidClientError("no private_key_jwt client assertion")
    header, claims = _unverified(assertion)
    client_id = claims.get("iss")
    client = get_client(db, client_id) if isinstance(client_id, str) else None
    if client is None or client.disabled:
        raise InvalidClientError(f"client {client_id!r} is unknown or disabled")
    if client.jwks is None and client.jwks_url is None:
        raise InvalidClientError(f"client {client_id!r} is public: it has no keys")
    key = client_key(client, header, keys)
    try:
        jwt.decode(assertion, key, algorithms=[header["alg"]])
    except (JoseError, ValueError) as exc:
        raise InvalidClientError(f"signature: {exc}") from exc
    exp = _check_claims(claims, client, token_url, now)
    _use_jti(db, client.client_id, claims["jti"], exp, now)
    return client


def _use_jti(db: Database, client_id: str, jti: str, exp: int, now: int) -> None:
    """Remember the jti until the assertion would have expired; a second use fails, in
    this process or any other sharing the database."""
    try:
        with db.write() as conn:
            conn.execute(delete(oauth_jtis).where(oauth_jtis.c.expires_at < now * _MICROS))
            conn.execute(oauth_jtis.insert().values(client_id=client_id, jti=jti,
                                                    expires_at=exp * _MICROS))
    except IntegrityError as exc:
        raise InvalidClientError(f"jti {jti!r} was already used") from exc


def issue_for_user(db: Database, client_id: str, user: User, now: int,
                   seconds: int) -> tuple[str, Grant]:
    """A person's access token (the authorization code grant), issued to the public
    client they signed in through, acting with the user's role and organisation."""
    token = secrets.token_urlsafe(32)
    grant = Grant(user.principal(), USER_SCOPES, now + seconds)
    with db.write() as conn:
        conn.execute(oauth_tokens.insert().values(
            token_hash=_digest(token), client_id=client_id, scopes=grant.scopes,
            issued_at=now * _MICROS, expires_at=grant.expires_at * _MICROS, revoked=False,
            username=user.username))
    return token, grant


def exchange_code(db: Database, *, client_id: str, code: str, redirect_uri: str,
                  verifier: str, now: int, seconds: int) -> tuple[str, Grant]:
    """The authorization code grant's token request (RFC 6749 §4.1.3, RFC 7636 §4.5):
    a signed-in person's code, redeemed once with its PKCE verifier, for a token.
    InvalidGrantError when the code does not hold."""
    user = redeem_code(db, client_id=client_id, code=code, redirect_uri=redirect_uri,
                       verifier=verifier, now=now)
    return issue_for_user(db, client_id, user, now, seconds)


def revoke_digest(db: Database, digest: str) -> None:
    """Revoke a token known by its digest (a dashboard session's, at sign-out)."""
    with db.write() as conn:
        conn.execute(update(oauth_tokens).where(oauth_tokens.c.token_hash == digest)
                     .values(revoked=True))
    forget_grants()


def issue(db: Database, client: Client, requested: str | None, now: int) -> tuple[str, Grant]:
    """A new access token: the requested scopes cut to the registration's (all of the
    registration's when none are asked for)."""
    try:
        wanted = parse_scopes(requested) if requested else client.scopes
    except ScopeError as exc:
        raise InvalidScopeError(str(exc)) from exc
    granted = narrow(wanted, client.scopes)
    if not granted:
        raise InvalidScopeError("none of the requested scopes is allowed to this client")
    token = secrets.token_urlsafe(32)
    grant = Grant(client, render(granted), now + TOKEN_SECONDS)
    with db.write() as conn:
        conn.execute(oauth_tokens.insert().values(
            token_hash=_digest(token), client_id=client.client_id, scopes=grant.scopes,
            issued_at=now * _MICROS, expires_at=grant.expires_at * _MICROS, revoked=False))
    return token, grant


_GRANT_SQL = ("SELECT c.client_id, c.name, c.role, c.organization, c.jwks, c.jwks_url, "
              "c.scopes, c.disabled, t.scopes, t.expires_at, t.revoked, u.username, "
              "u.display_name, u.role, u.organization, u.disabled FROM oauth_tokens t "
              "JOIN oauth_clients c ON c.client_id = t.client_id "
              "LEFT JOIN users u ON u.username = t.username WHERE t.token_hash = {mark}")


GRANT_SECONDS = 1.0
"""How long a worker trusts what it last read of a token: a token revoked or a client
disabled elsewhere (another worker, `atm clients disable`) is refused within this; in the
worker that revoked or disabled it, at once."""
_MAX_REMEMBERED = 10_000
_remembered: dict[str, tuple[float, Grant | None]] = {}  # token digest -> (until, grant)
_clock = time.monotonic


def active_grant(db: Database, token: str, now: int) -> Grant | None:
    """What a token grants, if it is known, unexpired, unrevoked and its client enabled.

    Asked on every request: the answer read from the database (one primary-key join) is
    trusted for GRANT_SECONDS, which spares nearly every request the lookup."""
    return grant_of(db, _digest(token), now)


def grant_of(db: Database, digest: str, now: int) -> Grant | None:
    """active_grant, for a token known by its digest (a dashboard session keeps only
    that)."""
    remembered = _remembered.get(digest)
    if remembered is not None and remembered[0] > _clock():
        grant = remembered[1]
        return grant if grant is None or grant.expires_at > now else None
    grant = _read_grant(db, digest, now)
    if len(_remembered) >= _MAX_REMEMBERED:
        _remembered.clear()
    _remembered[digest] = (_clock() + GRANT_SECONDS, grant)
    return grant


def forget_grants() -> None:
    """Read every token afresh (after a revocation or a client's disabling)."""
    _remembered.clear()


def _read_grant(db: Database, digest: str, now: int) -> Grant | None:
    """The grant as the database has it; on SQLite without a pooled transaction."""
    if db.is_sqlite:
        row = db.fetch_one(_GRANT_SQL.format(mark="?"), (digest,))
    else:
        with db.single_statement() as conn:
            row = conn.exec_driver_sql(_GRANT_SQL.format(mark="%s"), (digest,)).first()
    if row is None:
        return None
    registration, (scopes, expires_at, revoked, username, *person) = row[:8], row[8:]
    client = _registered(*registration)
    if username is not None:  # a person's token: the user's role and organisation apply
        if person[0] is None:  # the user is gone
            return None
        client = User(username, *person).principal()
    if revoked or expires_at <= now * _MICROS or client.disabled:
        return None
    return Grant(client, scopes, expires_at // _MICROS)


@lru_cache(maxsize=1024)
def _registered(*columns: Any) -> Client:
    """A client from its registry row (parsed once per distinct row)."""
    return client_from_row(SimpleNamespace(**dict(zip(_CLIENT_COLUMNS, columns,
                                                       strict=True))))


_CLIENT_COLUMNS = ("client_id", "name", "role", "organization", "jwks", "jwks_url", "scopes",
                   "disabled")


def introspect(db: Database, token: str, caller: Client, now: int) -> dict[str, Any]:
    """RFC 7662: a client learns about its own tokens; an admin client about any."""
    grant = active_grant(db, token, now)
    if grant is None or (caller.role != "admin"
                         and grant.client.client_id != caller.client_id):
        return {"active": False}
    return {"active": True, "client_id": grant.client.client_id, "scope": grant.scopes,
            "exp": grant.expires_at, "token_type": "bearer", "sub": grant.client.client_id,
            "organization": grant.client.organization, "role": grant.client.role}


def revoke(db: Database, token: str, caller: Client) -> None:
    """RFC 7009: revoke a token of the caller's own (any, for an admin); unknown tokens
    are ignored, as the RFC asks."""
    condition = oauth_tokens.c.token_hash == _digest(token)
    if caller.role != "admin":
        condition = condition & (oauth_tokens.c.client_id == caller.client_id)
    with db.write() as conn:
        conn.execute(update(oauth_tokens).where(condition).values(revoked=True))
    forget_grants()
