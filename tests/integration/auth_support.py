"""Partners of the isolation and audit tests: a client per role and organisation, and
the headers its requests carry."""

from __future__ import annotations

from fastapi.testclient import TestClient

from gateway.auth.clients import add_client
from gateway.store.database import Database
from tests.integration.test_auth_tokens import RSA, assertion, public_set, token_request

FHIR = {"content-type": "application/fhir+json"}
A, B = "Organization/courier-a", "Organization/courier-b"


def bearer(client: TestClient, db: Database, role: str, organization: str,
           scopes: str = "system/*.cruds") -> dict[str, str]:
    """The headers of a new client's requests (`x-client`: its id, for the test only)."""
    registered = add_client(db, name=f"{role} {organization}", role=role,
                            organization=organization, jwks=public_set(RSA), scopes=scopes)
    token = token_request(client, assertion(registered)).json()["access_token"]
    return {**FHIR, "authorization": f"Bearer {token}", "x-client": registered.client_id}
