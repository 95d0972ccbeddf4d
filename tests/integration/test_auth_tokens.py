"""SMART Backend Services: discovery, the token endpoint's checks of a client assertion
(each way an attacker or a broken client gets it wrong), scopes, introspection,
revocation, JWK Sets fetched from a URL, and the `atm clients` commands."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from typer.testing import CliRunner

from gateway.auth.clients import Client, RegistrationError, add_client, set_disabled
from gateway.cli import app as cli
from gateway.store.database import Database
from tests.conftest import client_with

TOKEN_URL = "http://testserver/auth/token"
FORM = {"content-type": "application/x-www-form-urlencoded"}
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
RSA = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
EC = ECKey.generate_key("P-384", parameters={"kid": "ec-1"})


def public_set(*keys: Any) -> dict[str, Any]:
    return {"keys": [key.as_dict(private=False) for key in keys]}


def assertion(client: Client, key: Any = RSA, *, alg: str = "RS384", **changes: Any) -> str:
    now = int(time.time())
    header = {"alg": alg, "kid": key.kid, "typ": "JWT", **changes.pop("header", {})}
    claims = {"iss": client.client_id, "sub": client.client_id, "aud": TOKEN_URL,
              "exp": now + 240, "jti": str(uuid.uuid4()), **changes}
    return jwt.encode(header, claims, key, algorithms=[alg])


def token_request(client: TestClient, signed: str, scope: str | None = None) -> Any:
    form = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": signed, **({"scope": scope} if scope else {})}
    return client.post("/auth/token", data=form, headers=FORM)


@pytest.fixture
def courier(db: Database) -> Client:
    return add_client(db, name="Fast Courier", role="courier",
                      organization="Organization/fast-courier",
                      jwks=public_set(RSA, EC), scopes="system/Task.rs system/Specimen.rs")


def test_discovery_in_both_places_clients_look(client: TestClient, settings: Any) -> None:
    config = client.get("/fhir/.well-known/smart-configuration")
    assert config.status_code == 200
    body = config.json()
    assert body["token_endpoint"] == TOKEN_URL
    assert body["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert body["token_endpoint_auth_signing_alg_values_supported"] == ["ES384", "RS384"]
    assert "client-confidential-asymmetric" in body["capabilities"]
    assert body["authorization_endpoint"] == "http://testserver/auth/authorize"
    assert body["code_challenge_methods_supported"] == ["S256"]
    with client_with(settings, auth="smart") as guarded:
        security = guarded.get("/fhir/metadata").json()["rest"][0]["security"]
    [uris] = security["extension"]
    assert {e["url"]: e["valueUri"] for e in uris["extension"]} == {
        "token": TOKEN_URL, "introspect": "http://testserver/auth/introspect",
        "revoke": "http://testserver/auth/revoke",
        "authorize": "http://testserver/auth/authorize"}


@pytest.mark.parametrize(("key", "alg"), [(RSA, "RS384"), (EC, "ES384")])
def test_a_signed_assertion_gets_a_short_lived_token(client: TestClient, courier: Client,
                                                     key: Any, alg: str) -> None:
    response = token_request(client, assertion(courier, key, alg=alg), "system/Task.rs")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "bearer" and body["expires_in"] == 300
    assert body["scope"] == "system/Task.rs"
    assert response.headers["cache-control"] == "no-store"


def _unsigned_parts(courier: Client, header: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    claims = {"iss": courier.client_id, "sub": courier.client_id, "aud": TOKEN_URL,
              "exp": int(time.time()) + 60, "jti": str(uuid.uuid4())}
    return f"{part(header)}.{part(claims)}"


def _hs256_with_public_key(courier: Client) -> str:
    """The classic confusion: the RSA public key's PEM used as an HMAC secret (made by
    hand: joserfc itself refuses to build such a key)."""
    signing_input = _unsigned_parts(courier, {"alg": "HS256", "kid": "rsa-1"})
    secret = RSA.as_pem(private=False)
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def _alg_none(courier: Client) -> str:
    return _unsigned_parts(courier, {"alg": "none", "kid": "rsa-1"}) + "."


BAD_ASSERTIONS = {
    "wrong aud": lambda c: assertion(c, aud="http://testserver/fhir"),
    "exp too far ahead": lambda c: assertion(c, exp=int(time.time()) + 600),
    "exp past": lambda c: assertion(c, exp=int(time.time()) - 5),
    "no jti": lambda c: assertion(c, jti=""),
    "sub is not the client": lambda c: assertion(c, sub="someone-else"),
    "unknown kid": lambda c: assertion(c, RSAKey.generate_key(2048, parameters={"kid": "x"})),
    "signed by another key with a registered kid": lambda c: assertion(
        c, RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})),
    "RS384 header on the EC key": lambda c: assertion(c, EC, alg="ES384",
                                                      header={"kid": "rsa-1"}),
    "jku header": lambda c: assertion(c, header={"jku": "https://evil.example/jwks"}),
    "alg none": _alg_none,
    "HS256 with the public key": _hs256_with_public_key,
    "not a JWT": lambda c: "not-a-jwt",
}


@pytest.mark.parametrize("case", sorted(BAD_ASSERTIONS))
def test_a_bad_assertion_is_invalid_client_without_saying_why(
        client: TestClient, courier: Client, case: str) -> None:
    response = token_request(client, BAD_ASSERTIONS[case](courier))
    assert response.status_code == 401
    assert response.json() == {"error": "invalid_client"}


def test_a_replayed_jti_is_refused(client: TestClient, courier: Client) -> None:
    signed = assertion(courier)
    assert token_request(client, signed).status_code == 200
    replay = token_request(client, signed)
    assert replay.status_code == 401 and replay.json() == {"error": "invalid_client"}


def test_a_jti_is_remembered_across_restarts(settings: Any, courier: Client) -> None:
    signed = assertion(courier)
    with client_with(settings) as first:
        assert token_request(first, signed).status_code == 200
    with client_with(settings) as restarted:
        assert token_request(restarted, signed).status_code == 401


def test_another_clients_key_cannot_speak_for_it(client: TestClient, db: Database,
                                                  courier: Client) -> None:
    other_key = RSAKey.generate_key(2048, parameters={"kid": "m-1"})
    add_client(db, name="Cell Factory", role="manufacturer",
               organization="Organization/cell-factory", jwks=public_set(other_key))
    response = token_request(client, assertion(courier, other_key))  # iss = the courier
    assert response.status_code == 401


def test_a_disabled_client_gets_no_token(client: TestClient, db: Database,
                                         courier: Client) -> None:
    assert set_disabled(db, courier.client_id)
    assert token_request(client, assertion(courier)).status_code == 401


@pytest.mark.parametrize(("asked", "granted"), [
    (None, "system/Specimen.rs system/Task.rs"),  # none asked: the registration's
    ("system/Task.cruds", "system/Task.rs"),  # narrowed, never wider
    ("system/*.rs", "system/Specimen.rs system/Task.rs"),
    ("system/Task.read", "system/Task.rs"),  # v1 syntax
])
def test_scopes_are_never_wider_than_the_registration(
        client: TestClient, courier: Client, asked: str | None, granted: str) -> None:
    response = token_request(client, assertion(courier), asked)
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == granted


@pytest.mark.parametrize("asked", ["system/Patient.rs", "user/Task.rs", "system/Task.xyz"])
def test_scopes_that_cannot_be_granted_are_invalid_scope(
        client: TestClient, courier: Client, asked: str) -> None:
    response = token_request(client, assertion(courier), asked)
    assert response.status_code == 400 and response.json()["error"] == "invalid_scope"


def test_only_client_credentials_and_forms(client: TestClient, courier: Client) -> None:
    wrong_grant = client.post("/auth/token", headers=FORM, data={
        "grant_type": "password", "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion(courier)})
    assert wrong_grant.status_code == 400
    assert wrong_grant.json()["error"] == "unsupported_grant_type"
    as_json = client.post("/auth/token", json={"grant_type": "client_credentials"})
    assert as_json.status_code == 400 and as_json.json()["error"] == "invalid_request"


def _form(courier: Client, token: str) -> dict[str, str]:
    return {"token": token, "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion(courier)}


def test_introspection_and_revocation(client: TestClient, db: Database,
                                      courier: Client) -> None:
    token = token_request(client, assertion(courier)).json()["access_token"]
    seen = client.post("/auth/introspect", data=_form(courier, token), headers=FORM).json()
    assert seen["active"] is True and seen["client_id"] == courier.client_id
    assert seen["scope"] == "system/Specimen.rs system/Task.rs"
    assert seen["exp"] - time.time() <= 300
    # Another partner learns nothing about the courier's token, and cannot revoke it.
    other_key = RSAKey.generate_key(2048, parameters={"kid": "m-1"})
    maker = add_client(db, name="Cell Factory", role="manufacturer",
                       organization="Organization/cell-factory", jwks=public_set(other_key))
    theirs = {**_form(maker, token), "client_assertion": assertion(maker, other_key)}
    assert client.post("/auth/introspect", data=theirs, headers=FORM).json() == {
        "active": False}
    theirs["client_assertion"] = assertion(maker, other_key)
    assert client.post("/auth/revoke", data=theirs, headers=FORM).status_code == 200
    still = client.post("/auth/introspect", data=_form(courier, token), headers=FORM).json()
    assert still["active"] is True
    assert client.post("/auth/revoke", data=_form(courier, token),
                       headers=FORM).status_code == 200
    gone = client.post("/auth/introspect", data=_form(courier, token), headers=FORM).json()
    assert gone == {"active": False}


class _JwksServer(BaseHTTPRequestHandler):
    body = b""
    hits = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "max-age=60")
        self.end_headers()
        self.wfile.write(type(self).body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def jwks_url() -> Iterator[str]:
    _JwksServer.body, _JwksServer.hits = json.dumps(public_set(RSA)).encode(), 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JwksServer)
    # Checking for shutdown every 50 ms, not the default 0.5 s: shutdown() waits for it.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_keys_at_a_url_are_fetched_once_while_the_cache_allows(
        client: TestClient, db: Database, jwks_url: str) -> None:
    lims = add_client(db, name="LIMS", role="lims", organization="Organization/lab",
                      jwks_url=jwks_url, scopes="system/Task.cruds")
    for _ in range(3):
        assert token_request(client, assertion(lims)).status_code == 200
    assert _JwksServer.hits == 1  # max-age=60


@pytest.mark.parametrize(("changes", "message"), [
    ({"role": "pirate"}, "role must be one of"),
    ({"organization": "Patient/1"}, "organization must be a reference"),
    ({"jwks": {"keys": [RSA.as_dict(private=True)]}}, "is a private key"),
    ({"jwks": None}, "give the client's public keys"),
    ({"scopes": "system/Task.write-ish"}, "is not a system scope"),
])
def test_registration_refuses_what_would_not_work(db: Database, changes: dict[str, Any],
                                                   message: str) -> None:
    values = {"name": "x", "role": "courier", "organization": "Organization/c",
              "jwks": public_set(RSA), **changes}
    with pytest.raises(RegistrationError, match=message):
        add_client(db, **values)


def test_clients_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          database_url: str) -> None:
    from gateway.settings import get_settings

    monkeypatch.setenv("ATM_DATABASE_URL", database_url)
    get_settings.cache_clear()
    keys = tmp_path / "jwks.json"
    keys.write_text(json.dumps(public_set(RSA)))
    runner = CliRunner()
    try:
        added = runner.invoke(cli, ["clients", "add", "--name", "Fast Courier", "--role",
                                    "courier", "--organization", "Organization/fc",
                                    "--jwks-file", str(keys), "--scopes", "system/Task.rs"])
        assert added.exit_code == 0, added.output
        client_id = json.loads(added.output)["client_id"]
        listed = runner.invoke(cli, ["clients", "list"])
        assert [json.loads(line)["client_id"] for line in listed.output.splitlines()] == [
            client_id]
        assert runner.invoke(cli, ["clients", "disable", client_id]).exit_code == 0
        listed = runner.invoke(cli, ["clients", "list"])
        assert json.loads(listed.output)["disabled"] is True
        bad = runner.invoke(cli, ["clients", "add", "--name", "x", "--role", "pirate",
                                  "--organization", "Organization/x", "--jwks-file",
                                  str(keys)])
        assert bad.exit_code == 1 and "role must be one of" in bad.output
    finally:
        get_settings.cache_clear()
