"""People who sign in (to the dashboard): their accounts, and the OAuth2 authorization
code grant with PKCE (RFC 6749 §4.1, RFC 7636) that signs them in.

A user has a role and an organisation exactly as a partner client has
(gateway/auth/policies.py): a treatment centre's coordinator sees its own patients only.
Passwords are kept as scrypt hashes (the standard library's; no password is ever stored
or logged). Five wrong passwords in a row lock the account for five minutes, which turns
guessing into years of work without letting a stranger lock someone out for long.

The dashboard is a public client built into the gateway (`atm-dashboard`): it has no
keys, so it cannot use client credentials; it may only send people back to its own
callback; and it must prove each code with the PKCE verifier of the code's challenge.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from gateway.auth.clients import ROLES, Client
from gateway.auth.scopes import parse_scopes
from gateway.store.database import Database
from gateway.store.schema import oauth_clients, oauth_codes, users

DASHBOARD_CLIENT = "atm-dashboard"
DASHBOARD_CALLBACK = "/dashboard/callback"
PUBLIC_CLIENTS = {DASHBOARD_CLIENT: (DASHBOARD_CALLBACK,)}
"""Public clients and the paths (on the gateway's own origin) they may be sent back to."""
USER_SCOPES = "system/*.cruds"  # a person's token: bounded by the user's role and organisation
CODE_SECONDS = 60
MAX_FAILED_LOGINS = 5
LOCK_SECONDS = 300
MIN_PASSWORD = 12
_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}  # ~50 ms and 16 MiB per check on this machine
_MICROS = 1_000_000


class UserError(ValueError):
    """A user that cannot be added or changed (the message says why)."""


class InvalidGrantError(Exception):
    """An authorization code that is unknown, used, expired, or not this client's, this
    redirect's or this verifier's (RFC 6749 §5.2 `invalid_grant`)."""


@dataclass(frozen=True)
class User:
    username: str
    display_name: str
    role: str
    organization: str
    disabled: bool

    def principal(self) -> Client:
        """The user as the caller of FHIR interactions: the same checks as a partner
        client of the same role and organisation; the audit trail names the person."""
        return Client(f"user:{self.username}", self.display_name, self.role,
                      self.organization, None, None, parse_scopes(USER_SCOPES), self.disabled)


# -- passwords ---------------------------------------------------------------------------
def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)
    return "scrypt${n}${r}${p}${salt}${digest}".format(
        **_SCRYPT, salt=base64.b64encode(salt).decode(), digest=base64.b64encode(digest).decode())


def password_matches(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n),
                             r=int(r), p=int(p), dklen=len(expected))
    except ValueError:
        return False
    return kind == "scrypt" and hmac.compare_digest(got, expected)


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password needs at least {MIN_PASSWORD} characters")


# -- accounts ----------------------------------------------------------------------------
def _user(row: Any) -> User:
    return User(row.username, row.display_name, row.role, row.organization, row.disabled)


def add_user(db: Database, *, username: str, password: str, role: str, organization: str,
             display_name: str | None = None, now: int) -> User:
    if not username or len(username) > 64 or not username.replace(".", "").replace(
            "-", "").replace("_", "").replace("@", "").isalnum():
        raise UserError("a username is 1-64 letters, digits and . - _ @")
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    if not organization.startswith("Organization/") or len(organization) <= 13:
        raise UserError("organization must be a reference: Organization/<id>")
    _check_password(password)
    user = User(username, display_name or username, role, organization, False)
    try:
        with db.write() as conn:
            conn.execute(users.insert().values(
                username=username, display_name=user.display_name, role=role,
                organization=organization, password_hash=hash_password(password),
                disabled=False, failed_logins=0, locked_until=0, created_at=now * _MICROS))
    except IntegrityError as exc:
        raise UserError(f"user {username!r} already exists") from exc
    return user


def get_user(db: Database, username: str) -> User | None:
    with db.read() as conn:
        row = conn.execute(select(users).where(users.c.username == username)).first()
    return _user(row) if row else None


def list_users(db: Database) -> list[User]:
    with db.read() as conn:
        return [_user(row) for row in conn.execute(select(users).order_by(users.c.username))]


def set_password(db: Database, username: str, password: str) -> bool:
    _check_password(password)
    with db.write() as conn:
        done = conn.execute(update(users).where(users.c.username == username).values(
            password_hash=hash_password(password), failed_logins=0, locked_until=0))
    return bool(done.rowcount)


def set_disabled(db: Database, username: str, disabled: bool = True) -> bool:
    """A disabled user's tokens, and so its dashboard sessions, stop working at once in
    this process and within a second in every other (gateway/auth/tokens.py)."""
    from gateway.auth.tokens import forget_grants

    with db.write() as conn:
        done = conn.execute(update(users).where(users.c.username == username)
                            .values(disabled=disabled))
    forget_grants()
    return bool(done.rowcount)


def sign_in(db: Database, username: str, password: str, now: int) -> User | None:
    """The user, when the password is right and the account enabled and not locked.
    Whatever failed, the caller only learns that signing in did not work."""
    with db.write() as conn:
        row = conn.execute(select(users).where(users.c.username == username)).first()
        if row is None:
            password_matches(password, _dummy_hash())  # as slow as a known name's check
            return None
        if row.disabled or row.locked_until > now * _MICROS:
            return None
        if password_matches(password, row.password_hash):
            if row.failed_logins:
                conn.execute(update(users).where(users.c.username == username)
                             .values(failed_logins=0))
            return _user(row)
        failed = row.failed_logins + 1
        locked = (now + LOCK_SECONDS) * _MICROS if failed >= MAX_FAILED_LOGINS else 0
        conn.execute(update(users).where(users.c.username == username).values(
            failed_logins=0 if locked else failed, locked_until=locked))
    return None


@cache
def _dummy_hash() -> str:
    """A hash to check unknown names against (made on first use: scrypt takes ~60 ms)."""
    return hash_password(secrets.token_urlsafe(16))


# -- the authorization code grant --------------------------------------------------------
def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def s256(verifier: str) -> str:
    """The PKCE S256 challenge of a verifier (RFC 7636 §4.2)."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(
        b"=").decode()


def valid_redirect(client_id: str, redirect_uri: str, origin: str) -> bool:
    """A public client may only be sent back to one of its paths on our own origin."""
    allowed = PUBLIC_CLIENTS.get(client_id)
    if allowed is None:
        return False
    parts, ours = urlsplit(redirect_uri), urlsplit(origin)
    return ((parts.scheme, parts.netloc) == (ours.scheme, ours.netloc)
            and parts.path in allowed and not parts.fragment)


def ensure_client(db: Database, client_id: str, now: int) -> None:
    """The row a public client's tokens hang from (tokens name their client)."""
    with db.read() as conn:
        if conn.execute(select(oauth_clients.c.client_id)
                        .where(oauth_clients.c.client_id == client_id)).first():
            return
    try:
        with db.write() as conn:
            conn.execute(oauth_clients.insert().values(
                client_id=client_id, name="ATM dashboard", role="admin",
                organization="Organization/atm-gateway", jwks=None, jwks_url=None,
                scopes=USER_SCOPES, disabled=False, created_at=now * _MICROS))
    except IntegrityError:
        pass  # another worker registered it first


def issue_code(db: Database, *, client_id: str, user: User, redirect_uri: str,
               code_challenge: str, now: int) -> str:
    ensure_client(db, client_id, now)
    code = secrets.token_urlsafe(32)
    with db.write() as conn:
        conn.execute(delete(oauth_codes).where(oauth_codes.c.expires_at < now * _MICROS))
        conn.execute(oauth_codes.insert().values(
            code_hash=_digest(code), client_id=client_id, username=user.username,
            redirect_uri=redirect_uri, code_challenge=code_challenge, scopes=USER_SCOPES,
            expires_at=(now + CODE_SECONDS) * _MICROS, used=False))
    return code


def redeem_code(db: Database, *, client_id: str, code: str, redirect_uri: str,
                verifier: str, now: int) -> User:
    """The user a code was issued for; the code is spent whether or not the rest holds
    (a code tried with a wrong verifier is not tried again)."""
    with db.write() as conn:  # spent first, committed whatever the checks find
        spent = conn.execute(update(oauth_codes).where(
            oauth_codes.c.code_hash == _digest(code), oauth_codes.c.used.is_(False))
            .values(used=True).returning(*oauth_codes.c)).first()
    if spent is None:
        raise InvalidGrantError("the code is unknown or was already used")
    if spent.expires_at <= now * _MICROS:
        raise InvalidGrantError("the code expired")
    if spent.client_id != client_id or spent.redirect_uri != redirect_uri:
        raise InvalidGrantError("the code was issued to another client or redirect")
    if not hmac.compare_digest(s256(verifier), spent.code_challenge):
        raise InvalidGrantError("the code_verifier does not match the code_challenge")
    user = get_user(db, spent.username)
    if user is None or user.disabled:
        raise InvalidGrantError("the user is unknown or disabled")
    return user
