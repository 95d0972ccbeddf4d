"""The registry of OAuth2 clients: each partner system, its role, its organisation, its
public keys (a JWK Set inline or at a URL) and the widest scopes its tokens may carry."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from gateway.auth.scopes import Scope, parse_scopes, render
from gateway.store.database import Database
from gateway.store.schema import oauth_clients
from gateway.store.timeparse import now_micros

ROLES = ("treatment-centre", "apheresis-centre", "courier", "manufacturer", "payer", "ehr",
         "lims", "admin")


class RegistrationError(ValueError):
    """A client that cannot be registered (the message says why)."""


@dataclass(frozen=True)
class Client:
    client_id: str
    name: str
    role: str
    organization: str
    jwks: dict[str, Any] | None
    jwks_url: str | None
    scopes: list[Scope]
    disabled: bool

    def summary(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "name": self.name, "role": self.role,
                "organization": self.organization, "scopes": render(self.scopes),
                "jwks": "inline" if self.jwks else self.jwks_url, "disabled": self.disabled}


def client_from_row(row: Any) -> Client:
    return Client(row.client_id, row.name, row.role, row.organization,
                  json.loads(row.jwks) if row.jwks else None, row.jwks_url,
                  parse_scopes(row.scopes), row.disabled)


def _check_jwks(jwks: dict[str, Any]) -> None:
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(keys, list) or not keys:
        raise RegistrationError("the JWK Set needs a non-empty \"keys\" list")
    for key in keys:
        if not isinstance(key, dict) or not key.get("kid"):
            raise RegistrationError("every key needs a \"kid\" (assertions name it)")
        if "d" in key:
            raise RegistrationError(f"key {key['kid']} is a private key: register the "
                                    "public one only")
        if key.get("kty") not in ("RSA", "EC"):
            raise RegistrationError(f"key {key['kid']}: kty must be RSA or EC (RS384, ES384)")


def add_client(db: Database, *, name: str, role: str, organization: str,
               jwks: dict[str, Any] | None = None, jwks_url: str | None = None,
               scopes: str = "system/*.rs") -> Client:
    if role not in ROLES:
        raise RegistrationError(f"role must be one of {', '.join(ROLES)}")
    if not organization.startswith("Organization/") or len(organization) <= 13:
        raise RegistrationError("organization must be a reference: Organization/<id>")
    if (jwks is None) == (jwks_url is None):
        raise RegistrationError("give the client's public keys: a JWK Set or its URL")
    if jwks is not None:
        _check_jwks(jwks)
    if jwks_url is not None and not jwks_url.startswith(("https://", "http://")):
        raise RegistrationError("the JWK Set URL must be http(s)")
    try:
        parsed = parse_scopes(scopes)
    except ValueError as exc:
        raise RegistrationError(str(exc)) from exc
    client = Client(str(uuid.uuid4()), name, role, organization, jwks, jwks_url, parsed, False)
    with db.write() as conn:
        conn.execute(oauth_clients.insert().values(
            client_id=client.client_id, name=name, role=role, organization=organization,
            jwks=json.dumps(jwks) if jwks else None, jwks_url=jwks_url,
            scopes=render(parsed), disabled=False, created_at=now_micros()))
    return client


def get_client(db: Database, client_id: str) -> Client | None:
    with db.read() as conn:
        row = conn.execute(select(oauth_clients).where(
            oauth_clients.c.client_id == client_id)).first()
    return client_from_row(row) if row else None


def list_clients(db: Database) -> list[Client]:
    with db.read() as conn:
        rows = conn.execute(select(oauth_clients).order_by(oauth_clients.c.created_at))
        return [client_from_row(row) for row in rows]


def set_disabled(db: Database, client_id: str, disabled: bool = True) -> bool:
    """False when there is no such client. Its tokens stop working at once in this
    process, and within GRANT_SECONDS in every other (gateway/auth/tokens.py)."""
    from gateway.auth.tokens import forget_grants  # tokens build on the registry

    with db.write() as conn:
        done = conn.execute(oauth_clients.update().where(
            oauth_clients.c.client_id == client_id).values(disabled=disabled))
    forget_grants()
    return bool(done.rowcount)
