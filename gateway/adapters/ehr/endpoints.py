"""The EHR endpoints the gateway talks to, as `atm ehr add` registers them.

Each has a name, the EHR's FHIR base URL, the client id the EHR registered us under and
the private key we sign SMART Backend Services assertions with (a JWK; kept in the
gateway's database, which holds patient data anyway and must be protected as such), the
scopes to ask for, and the treatment centre whose EHR it is: patients imported from it
are that organisation's (Patient.managingOrganization), so its partner clients see them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from joserfc.errors import JoseError
from joserfc.jwk import ECKey
from sqlalchemy import delete, insert, select, update

from gateway.auth.credentials import Credentials
from gateway.store.database import Database
from gateway.store.schema import ehr_endpoints
from gateway.store.timeparse import now_micros

NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
ORGANIZATION = re.compile(r"Organization/[A-Za-z0-9\-.]{1,64}")


class EndpointError(ValueError):
    """An endpoint that cannot be registered (the message says why)."""


@dataclass(frozen=True)
class Endpoint:
    name: str
    base_url: str
    client_id: str
    key: dict[str, Any]  # the private JWK
    organization: str
    scope: str | None = None
    enabled: bool = True

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.client_id, _import_key(self.key))

    def source_system(self, resource_type: str) -> str:
        """The identifier system of what was imported from this EHR: its base URL and
        the resource type, so that the EHR's ids stay unique and recognisable here."""
        return f"{self.base_url}/{resource_type}"

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "base_url": self.base_url, "client_id": self.client_id,
                "organization": self.organization, "scope": self.scope,
                "enabled": self.enabled, "key": self.key.get("kid", "(no kid)")}


def _import_key(jwk: dict[str, Any]) -> ECKey:
    """Our assertions are ES384 (as `atm token`'s): a P-384 EC key."""
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-384":
        raise EndpointError("the key must be a P-384 EC private JWK (ES384), not "
                            f"kty {jwk.get('kty')!r} crv {jwk.get('crv')!r}")
    return ECKey.import_key(jwk)


def read_key_file(text: str) -> tuple[dict[str, Any], str | None]:
    """A private key from a file: a bare JWK, or credentials as `atm clients add
    --new-key` writes them ({client_id, keys: [JWK]}). Returns (JWK, client id if given)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise EndpointError(f"the key file is not JSON ({exc})") from exc
    client_id = None
    if isinstance(data, dict) and isinstance(data.get("keys"), list) and data["keys"]:
        client_id = data.get("client_id")
        data = data["keys"][0]
    if not isinstance(data, dict):
        raise EndpointError("the key file holds no JWK")
    try:
        key = _import_key(data)
    except (JoseError, ValueError, TypeError) as exc:
        raise EndpointError(f"the key file's JWK cannot be read ({exc})") from exc
    if not key.is_private:
        raise EndpointError("the key file holds a public key: the private key signs "
                            "our assertions")
    return data, client_id


def add_endpoint(db: Database, endpoint: Endpoint) -> Endpoint:
    if not NAME.fullmatch(endpoint.name):
        raise EndpointError("a name is lower-case letters, digits and hyphens")
    if not endpoint.base_url.startswith(("https://", "http://")):
        raise EndpointError("the base URL is the EHR's FHIR base, http(s)://…")
    if not ORGANIZATION.fullmatch(endpoint.organization):
        raise EndpointError("the organisation is a reference Organization/<id>")
    _import_key(endpoint.key)
    with db.write() as conn:
        exists = conn.execute(select(ehr_endpoints.c.name).where(
            ehr_endpoints.c.name == endpoint.name)).first()
        if exists is not None:
            raise EndpointError(f"an endpoint named {endpoint.name} exists: remove it first")
        conn.execute(insert(ehr_endpoints).values(
            name=endpoint.name, base_url=endpoint.base_url.rstrip("/"),
            client_id=endpoint.client_id, private_jwk=json.dumps(endpoint.key),
            organization=endpoint.organization, scope=endpoint.scope,
            enabled=endpoint.enabled, created_at=now_micros()))
    found = get_endpoint(db, endpoint.name)
    assert found is not None
    return found


def _endpoint(row: Any) -> Endpoint:
    return Endpoint(row.name, row.base_url, row.client_id, json.loads(row.private_jwk),
                    row.organization, row.scope, bool(row.enabled))


def get_endpoint(db: Database, name: str) -> Endpoint | None:
    with db.read() as conn:
        row = conn.execute(select(ehr_endpoints).where(ehr_endpoints.c.name == name)).first()
    return _endpoint(row) if row is not None else None


def list_endpoints(db: Database, enabled_only: bool = False) -> list[Endpoint]:
    query = select(ehr_endpoints).order_by(ehr_endpoints.c.name)
    if enabled_only:
        query = query.where(ehr_endpoints.c.enabled.is_(True))
    with db.read() as conn:
        return [_endpoint(row) for row in conn.execute(query)]


def set_enabled(db: Database, name: str, enabled: bool) -> bool:
    with db.write() as conn:
        return bool(conn.execute(update(ehr_endpoints).where(ehr_endpoints.c.name == name)
                                 .values(enabled=enabled)).rowcount)


def remove_endpoint(db: Database, name: str) -> bool:
    with db.write() as conn:
        return bool(conn.execute(delete(ehr_endpoints).where(
            ehr_endpoints.c.name == name)).rowcount)
