"""The authorization endpoint (RFC 6749 §4.1): people sign in here with their username
and password, and are sent back to the public client they came from (the dashboard) with
a one-time code, which that client redeems at /auth/token with its PKCE verifier.

The form is protected against cross-site posting by a double-submit token (a random
value in a cookie of this path and in the form, which must match); a link that names an
unknown client or a foreign redirect is refused without redirecting anywhere.
"""

from __future__ import annotations

import secrets
import time
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from gateway.api.http import base_url, form_fields, header_dict
from gateway.auth import people
from gateway.dashboard.pages import render

router = APIRouter(tags=["auth"], include_in_schema=False)
CSRF_COOKIE = "atm_signin_csrf"
OAUTH_PARAMS = ("response_type", "client_id", "redirect_uri", "state", "code_challenge",
                "code_challenge_method")


def origin(request: Request) -> str:
    """The gateway's own origin (scheme://host[:port]), as links to it are built."""
    fhir_base = base_url(request.app.state.settings, request.scope, header_dict(request.scope))
    return fhir_base[:-len("/fhir")] if fhir_base.endswith("/fhir") else fhir_base


def _problem(message: str) -> Response:
    return render("problem.html", 400, heading="This sign-in link is not valid",
                  message=message)


def _checked(request: Request, params: dict[str, str]) -> Response | None:
    """None when the request may be answered with the form; else the answer: an error
    page for a bad client or redirect, a redirect with `error` for the rest."""
    client_id, redirect_uri = params.get("client_id", ""), params.get("redirect_uri", "")
    if client_id not in people.PUBLIC_CLIENTS:
        return _problem("It names no client of this gateway.")
    if not people.valid_redirect(client_id, redirect_uri, origin(request)):
        return _problem("It would send you to an address this client does not own.")
    error = None
    if params.get("response_type") != "code":
        error = ("unsupported_response_type", "only the authorization code flow")
    elif not params.get("code_challenge") or params.get("code_challenge_method") != "S256":
        error = ("invalid_request", "PKCE is required: code_challenge with method S256")
    if error is None:
        return None
    return _back(redirect_uri, {"error": error[0], "error_description": error[1],
                                "state": params.get("state", "")})


def _back(redirect_uri: str, values: dict[str, str]) -> Response:
    query = urlencode({k: v for k, v in values.items() if v})
    separator = "&" if "?" in redirect_uri else "?"
    return RedirectResponse(f"{redirect_uri}{separator}{query}", 303)


def _form_page(request: Request, params: dict[str, str], *, status: int = 200,
               error: str | None = None, username: str = "") -> Response:
    csrf = secrets.token_urlsafe(24)
    response = render("signin.html", status, error=error, username=username, csrf=csrf,
                      request_params={k: params.get(k, "") for k in OAUTH_PARAMS})
    response.set_cookie(CSRF_COOKIE, csrf, max_age=1800, path="/auth/authorize",
                        httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@router.get("/auth/authorize", summary="Sign in (authorization code with PKCE)")
async def authorize_form(request: Request) -> Response:
    params = dict(request.query_params)
    return _checked(request, params) or _form_page(request, params)


@router.post("/auth/authorize", summary="Sign in (authorization code with PKCE)")
async def authorize(request: Request) -> Response:
    form = await form_fields(request) or {}
    refused = _checked(request, form)
    if refused is not None:
        return refused
    expected = request.cookies.get(CSRF_COOKIE, "")
    if not expected or not secrets.compare_digest(expected, form.get("csrf", "")):
        return _form_page(request, form, status=400, username=form.get("username", ""),
                          error="The sign-in form had expired. Please sign in again.")
    db, now = request.app.state.db, int(time.time())
    user = await run_in_threadpool(people.sign_in, db, form.get("username", ""),
                                   form.get("password", ""), now)
    _audit_sign_in(request, form.get("username", ""), user)
    if user is None:
        return _form_page(request, form, status=401, username=form.get("username", ""),
                          error="The username or password is wrong, or the account is "
                                "locked for a few minutes after repeated failures.")
    code = await run_in_threadpool(
        people.issue_code, db, client_id=form["client_id"], user=user,
        redirect_uri=form["redirect_uri"], code_challenge=form["code_challenge"], now=now)
    response = _back(form["redirect_uri"], {"code": code, "state": form.get("state", "")})
    response.delete_cookie(CSRF_COOKIE, path="/auth/authorize")
    return response


def _audit_sign_in(request: Request, username: str, user: people.User | None) -> None:
    """Every sign-in, good or bad, in the audit trail (as a login event)."""
    from gateway.api.fhir_app import client_address

    trail = getattr(request.app.state, "audit", None)
    if trail is None:
        return
    settings = request.app.state.settings
    audit = trail.begin("POST", "auth/authorize", None,
                        client_address(settings, request.scope, header_dict(request.scope)),
                        request.scope.get("state", {}).get("request_id"), event_type="login")
    audit.subtype = "authorize"
    audit.identify(f"user:{username[:64]}", user.organization if user else None)
    audit.close(303 if user else 401)
