"""Signing people in to the dashboard in tests, through the real flow: /dashboard/login,
the authorization server's form, the callback."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
from fastapi.testclient import TestClient

from gateway.auth.people import add_user
from gateway.store.database import Database

PASSWORD = "correct horse battery"
CENTRE_A, CENTRE_B = "Organization/centre-a", "Organization/centre-b"


def new_user(db: Database, username: str, role: str = "treatment-centre",
             organization: str = CENTRE_A, password: str = PASSWORD) -> None:
    add_user(db, username=username, password=password, role=role, organization=organization,
             display_name=username.title(), now=int(time.time()))


def hidden(html: str, name: str) -> str:
    found = re.search(rf'name="{re.escape(name)}" value="([^"]*)"', html)
    assert found, f"no hidden field {name} in the page"
    return found.group(1).replace("&amp;", "&")


def form_of(page: str) -> dict[str, str]:
    """The sign-in form's hidden fields, as a browser would post them back."""
    return {name: value.replace("&amp;", "&") for name, value in
            re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page)}


def sign_in_form(client: TestClient, target: str = "/dashboard") -> httpx.Response:
    """Follow /dashboard/login to the authorization server's form."""
    start = client.get(f"/dashboard/login?next={target}", follow_redirects=False)
    assert start.status_code == 303, start.text
    assert start.headers["location"].startswith("/auth/authorize?")
    page = client.get(start.headers["location"])
    assert page.status_code == 200, page.text
    return page


def submit(client: TestClient, page: httpx.Response, username: str,
           password: str = PASSWORD, **changes: Any) -> httpx.Response:
    fields = {**form_of(page.text), "username": username, "password": password, **changes}
    return client.post("/auth/authorize", data=fields, follow_redirects=False)


def sign_in(client: TestClient, username: str, password: str = PASSWORD,
            target: str = "/dashboard") -> httpx.Response:
    """The whole flow; the callback's answer (a redirect into the dashboard)."""
    answer = submit(client, sign_in_form(client, target), username, password)
    assert answer.status_code == 303, answer.text
    back = client.get(answer.headers["location"], follow_redirects=False)
    assert back.status_code == 303, back.text
    return back


def csrf_of(client: TestClient, path: str = "/dashboard") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    return hidden(page.text, "csrf")
