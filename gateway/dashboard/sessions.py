"""Dashboard sessions: what the session cookie stands for.

The dashboard is a confidential back end for the browser: the person's access token
stays on the server (the session row keeps only its hash), and the browser holds an
opaque, HttpOnly session cookie. A session ends when it has been idle too long, when its
absolute lifetime (and its token's) runs out, when the user signs out, or as soon as the
token is revoked or the user disabled. Every form carries the session's CSRF token, which
a cross-site page cannot read.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, select, update

from gateway.auth.tokens import Grant, grant_of, revoke_digest
from gateway.settings import Settings
from gateway.store.database import Database
from gateway.store.schema import dashboard_sessions

COOKIE = "atm_session"
TOUCH_SECONDS = 30  # last_seen is written at most this often (not once a request)
_MICROS = 1_000_000


@dataclass(frozen=True)
class Session:
    session_hash: str
    username: str
    csrf: str
    grant: Grant  # what the person may do: their role and organisation

    @property
    def role(self) -> str:
        return self.grant.client.role

    @property
    def organization(self) -> str:
        return self.grant.client.organization

    @property
    def display_name(self) -> str:
        return self.grant.client.name


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def start(db: Database, token: str, grant: Grant, now: int) -> tuple[str, Session]:
    """A new session acting with a freshly issued token; the cookie value to set."""
    cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    username = grant.client.client_id.removeprefix("user:")
    with db.write() as conn:
        conn.execute(delete(dashboard_sessions).where(
            dashboard_sessions.c.expires_at < now * _MICROS))
        conn.execute(dashboard_sessions.insert().values(
            session_hash=_digest(cookie), username=username, token_hash=_digest(token),
            csrf=csrf, created_at=now * _MICROS, last_seen=now * _MICROS,
            expires_at=grant.expires_at * _MICROS, flash=None))
    return cookie, Session(_digest(cookie), username, csrf, grant)


def current(db: Database, settings: Settings, cookie: str | None, now: int) -> Session | None:
    """The live session a cookie names, or None (unknown, idle too long, expired, or its
    token no longer good)."""
    if not cookie:
        return None
    key = _digest(cookie)
    with db.read() as conn:
        row = conn.execute(select(dashboard_sessions).where(
            dashboard_sessions.c.session_hash == key)).first()
    if row is None:
        return None
    idle_limit = int(settings.dashboard_idle_minutes * 60 * _MICROS)
    if row.expires_at <= now * _MICROS or row.last_seen + idle_limit <= now * _MICROS:
        end(db, key, row.token_hash)
        return None
    grant = grant_of(db, row.token_hash, now)
    if grant is None:  # revoked, or the user disabled
        return None
    if now * _MICROS - row.last_seen > TOUCH_SECONDS * _MICROS:
        with db.write() as conn:
            conn.execute(update(dashboard_sessions).where(
                dashboard_sessions.c.session_hash == key).values(last_seen=now * _MICROS))
    return Session(key, row.username, row.csrf, grant)


def end(db: Database, session_hash: str, token_hash: str | None = None) -> None:
    """Sign out: the session is gone and its token revoked."""
    with db.write() as conn:
        if token_hash is None:
            token_hash = conn.execute(select(dashboard_sessions.c.token_hash).where(
                dashboard_sessions.c.session_hash == session_hash)).scalar()
        conn.execute(delete(dashboard_sessions).where(
            dashboard_sessions.c.session_hash == session_hash))
    if token_hash:
        revoke_digest(db, token_hash)


def csrf_ok(session: Session, submitted: str | None) -> bool:
    return bool(submitted) and secrets.compare_digest(session.csrf, submitted or "")


def flash(db: Database, session: Session, message: str) -> None:
    """A message for the next page this session sees (what an action did, or why not)."""
    with db.write() as conn:
        conn.execute(update(dashboard_sessions).where(
            dashboard_sessions.c.session_hash == session.session_hash).values(
            flash=message[:2000]))


def take_flash(db: Database, session: Session) -> str | None:
    with db.read() as conn:
        message = conn.execute(select(dashboard_sessions.c.flash).where(
            dashboard_sessions.c.session_hash == session.session_hash)).scalar()
    if message:
        with db.write() as conn:
            conn.execute(update(dashboard_sessions).where(
                dashboard_sessions.c.session_hash == session.session_hash).values(flash=None))
    return message or None
