"""Signing in to the dashboard: the authorization code flow with PKCE against the
gateway's own authorization server, passwords, lockout, sessions and their expiry, CSRF."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from fastapi.testclient import TestClient

from gateway.auth import people
from gateway.auth.clients import get_client
from gateway.settings import Settings
from gateway.store.database import Database
from tests.conftest import client_with
from tests.integration.dashboard_support import (
    CENTRE_A,
    CENTRE_B,
    PASSWORD,
    csrf_of,
    new_user,
    sign_in,
    sign_in_form,
    submit,
)
from tests.integration.test_auth_tokens import assertion, token_request

CALLBACK = "http://testserver/dashboard/callback"
FHIR = {"content-type": "application/fhir+json"}


def _authorize_query(verifier: str = "v" * 50, **changes: str) -> str:
    return urlencode({"response_type": "code", "client_id": people.DASHBOARD_CLIENT,
                      "redirect_uri": CALLBACK, "state": "s1",
                      "code_challenge": people.s256(verifier),
                      "code_challenge_method": "S256", **changes})


def _code(client: TestClient, username: str, verifier: str = "v" * 50) -> str:
    page = client.get(f"/auth/authorize?{_authorize_query(verifier)}")
    answer = submit(client, page, username)
    assert answer.status_code == 303, answer.text
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    assert query["state"] == ["s1"]
    return query["code"][0]


def _redeem(client: TestClient, code: str, verifier: str = "v" * 50):  # type: ignore[no-untyped-def]
    return client.post("/auth/token", data={
        "grant_type": "authorization_code", "client_id": people.DASHBOARD_CLIENT,
        "code": code, "redirect_uri": CALLBACK, "code_verifier": verifier})


def test_a_page_sends_people_to_sign_in_and_back(client: TestClient, db: Database) -> None:
    new_user(db, "ana")
    answer = client.get("/dashboard/journeys/x1", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/dashboard/login?next=/dashboard/journeys/x1"
    back = sign_in(client, "ana", target="/dashboard/journeys/x1")
    assert back.headers["location"] == "/dashboard/journeys/x1"
    cookie = next(c for c in client.cookies.jar if c.name == "atm_session")
    assert cookie.path == "/dashboard" and cookie.has_nonstandard_attr("HttpOnly")


def test_a_wrong_password_is_refused_and_repeated_failures_lock_the_account(
        client: TestClient, db: Database) -> None:
    new_user(db, "ana")
    page = sign_in_form(client)
    refused = submit(client, page, "ana", "not the password")
    assert refused.status_code == 401 and "wrong" in refused.text
    assert "atm_session" not in client.cookies
    unknown = submit(client, sign_in_form(client), "nobody", PASSWORD)
    assert unknown.status_code == 401  # the same answer as a wrong password
    for _ in range(people.MAX_FAILED_LOGINS - 1):
        submit(client, sign_in_form(client), "ana", "still wrong")
    locked = submit(client, sign_in_form(client), "ana", PASSWORD)
    assert locked.status_code == 401, "the right password must not open a locked account"


def test_the_form_is_refused_without_its_csrf_token(client: TestClient, db: Database) -> None:
    new_user(db, "ana")
    page = sign_in_form(client)
    client.cookies.delete("atm_signin_csrf", path="/auth/authorize")
    answer = submit(client, page, "ana")
    assert answer.status_code == 400 and "expired" in answer.text


def test_pkce_is_required_and_a_code_works_once_with_its_verifier(
        client: TestClient, db: Database) -> None:
    new_user(db, "ana")
    no_pkce = client.get(f"/auth/authorize?{_authorize_query(code_challenge_method='plain')}",
                         follow_redirects=False)
    assert no_pkce.status_code == 303
    assert "error=invalid_request" in no_pkce.headers["location"]
    code = _code(client, "ana")
    wrong = _redeem(client, code, verifier="w" * 50)
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    assert _redeem(client, code).json()["error"] == "invalid_grant", "a tried code is spent"
    good = _redeem(client, _code(client, "ana"))
    assert good.status_code == 200 and good.json()["token_type"] == "bearer"
    assert _redeem(client, code).status_code == 400


def test_foreign_redirects_and_unknown_clients_are_never_followed(
        client: TestClient) -> None:
    for changes in ({"redirect_uri": "https://evil.example/dashboard/callback"},
                    {"redirect_uri": "http://testserver/elsewhere"},
                    {"client_id": "someone-else"}):
        answer = client.get(f"/auth/authorize?{_authorize_query(**changes)}",
                            follow_redirects=False)
        assert answer.status_code == 400 and "location" not in answer.headers


def test_the_public_client_cannot_use_client_credentials(client: TestClient,
                                                         db: Database) -> None:
    """Even with a well-formed signed assertion in its name: it has no keys to check."""
    people.ensure_client(db, people.DASHBOARD_CLIENT, int(time.time()))
    dashboard = get_client(db, people.DASHBOARD_CLIENT)
    assert dashboard is not None
    answer = token_request(client, assertion(dashboard))
    assert answer.status_code == 401 and answer.json()["error"] == "invalid_client"


def test_a_persons_token_acts_with_their_role_and_organisation(
        client: TestClient, settings: Settings, db: Database) -> None:
    new_user(db, "ana", organization=CENTRE_A)
    for org, patient in ((CENTRE_A, "pa"), (CENTRE_B, "pb")):  # authentication off here
        body = {"resourceType": "Patient", "id": patient,
                "managingOrganization": {"reference": org}}
        assert client.put(f"/fhir/Patient/{patient}", json=body, headers=FHIR).status_code == 201
    with client_with(settings, auth="smart") as smart:
        token = _redeem(smart, _code(smart, "ana")).json()["access_token"]
        headers = {**FHIR, "authorization": f"Bearer {token}"}
        seen = smart.get("/fhir/Patient", headers=headers).json()
        assert [e["resource"]["id"] for e in seen.get("entry", [])] == ["pa"]
        assert smart.get("/fhir/Patient/pb", headers=headers).status_code == 404
        people.set_disabled(db, "ana")
        assert smart.get("/fhir/Patient/pa", headers=headers).status_code == 401


def test_sign_out_ends_the_session_and_needs_the_csrf_token(
        client: TestClient, db: Database) -> None:
    new_user(db, "ana")
    sign_in(client, "ana")
    refused = client.post("/dashboard/logout", data={"csrf": "forged"})
    assert refused.status_code == 400
    csrf = csrf_of(client)
    assert client.post("/dashboard/logout", data={"csrf": csrf}).status_code == 200
    after = client.get("/dashboard", follow_redirects=False)
    assert after.status_code == 303 and after.headers["location"].startswith("/dashboard/login")


@pytest.mark.parametrize("limit", ["dashboard_idle_minutes", "dashboard_session_hours"])
def test_sessions_expire(settings: Settings, db: Database, limit: str) -> None:
    """Sessions and their tokens are timed in whole seconds: a 3-second limit ends 2 to 3
    seconds after sign-in, which leaves the first request 2 seconds however the clock
    falls (asked for 1.5 seconds, a session lasted one whole second: a sign-in late in
    its second could find it ended at its first request)."""
    new_user(db, "ana")
    short = 3 / 60 if limit == "dashboard_idle_minutes" else 3 / 3600
    with client_with(settings, **{limit: short}) as client:
        sign_in(client, "ana")
        assert client.get("/dashboard/journeys/none", follow_redirects=False).status_code == 404
        time.sleep(3.1)
        gone = client.get("/dashboard/journeys/none", follow_redirects=False)
        assert gone.status_code == 303 and "/dashboard/login" in gone.headers["location"]


def test_disabling_a_user_ends_their_sessions(client: TestClient, db: Database) -> None:
    new_user(db, "ana")
    sign_in(client, "ana")
    assert client.get("/dashboard/journeys/none", follow_redirects=False).status_code == 404
    people.set_disabled(db, "ana")
    assert client.get("/dashboard/journeys/none", follow_redirects=False).status_code == 303


def test_passwords_are_stored_hashed_and_short_ones_refused(db: Database) -> None:
    with pytest.raises(people.UserError):
        new_user(db, "bo", password="short")
    new_user(db, "ana")
    with db.read() as conn:
        stored = conn.exec_driver_sql("SELECT password_hash FROM users").scalar()
    assert PASSWORD not in stored and stored.startswith("scrypt$")
    assert people.password_matches(PASSWORD, stored)
    assert not people.password_matches(PASSWORD + "x", stored)
