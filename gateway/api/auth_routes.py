"""OAuth2 endpoints of SMART Backend Services: discovery, token, introspection and
revocation. Error answers follow RFC 6749 §5.2 (`{"error": ...}`), never saying which
check of a client assertion failed."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from gateway.api.fhir_app import client_address
from gateway.api.http import base_url, form_fields, header_dict
from gateway.audit.events import RequestAudit
from gateway.audit.log import AuditTrail
from gateway.auth import people, tokens
from gateway.auth.clients import Client
from gateway.auth.keys import JwksCache
from gateway.auth.tokens import auth_urls

router = APIRouter(tags=["auth"])
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
SCOPES_SUPPORTED = ["system/*.cruds", "system/*.rs", "system/Task.cruds", "system/Task.rs"]


def _urls(request: Request) -> dict[str, str]:
    settings = request.app.state.settings
    return auth_urls(base_url(settings, request.scope, header_dict(request.scope)))


def _error(status: int, code: str, description: str | None = None) -> JSONResponse:
    body = {"error": code, **({"error_description": description} if description else {})}
    return JSONResponse(body, status, headers=NO_STORE)


def _keys(request: Request) -> JwksCache:
    cache: JwksCache | None = getattr(request.app.state, "jwks", None)
    if cache is None:
        cache = request.app.state.jwks = JwksCache()
    return cache


async def _authenticated(request: Request, form: dict[str, str],
                         audit: RequestAudit | None) -> Client | None:
    try:
        client = await run_in_threadpool(
            tokens.authenticate, request.app.state.db, _keys(request),
            form.get("client_assertion_type"), form.get("client_assertion"),
            _urls(request)["token"], int(time.time()))
    except tokens.InvalidClientError as exc:
        tokens.log.info("client authentication failed: %s", exc)
        if audit is not None:  # who it claimed to be, for whoever investigates
            audit.identify(tokens.claimed_client_id(form.get("client_assertion")), None)
        return None
    if audit is not None:
        audit.identify(client.client_id, client.organization)
    return client


async def _audited(request: Request, endpoint: str,
                   answer: Callable[[RequestAudit | None], Awaitable[JSONResponse]]
                   ) -> JSONResponse:
    """Answer a call to an OAuth2 endpoint and record it in the audit trail, however it
    ends (a failure of the server's included)."""
    trail: AuditTrail | None = getattr(request.app.state, "audit", None)
    audit = None if trail is None else trail.begin(
        "POST", f"auth/{endpoint}", None,
        client_address(request.app.state.settings, request.scope, header_dict(request.scope)),
        request.scope.get("state", {}).get("request_id"), event_type="login")
    if audit is not None:
        audit.subtype = endpoint
    try:
        response = await answer(audit)
    except Exception:
        if audit is not None:
            audit.close(500)
        raise
    if audit is not None:
        audit.close(response.status_code)
    return response


@router.get("/fhir/.well-known/smart-configuration", summary="SMART discovery",
            operation_id="smart_configuration", response_class=JSONResponse)
async def smart_configuration(request: Request) -> JSONResponse:
    urls = _urls(request)
    body: dict[str, Any] = {
        "token_endpoint": urls["token"], "introspection_endpoint": urls["introspect"],
        "revocation_endpoint": urls["revoke"],
        "grant_types_supported": ["client_credentials", "authorization_code"],
        "authorization_endpoint": urls["authorize"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": sorted(tokens.ALGORITHMS),
        "scopes_supported": SCOPES_SUPPORTED,
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
    }
    return JSONResponse(body)


@router.post("/auth/token", summary="Access token (client_credentials, private_key_jwt)",
             operation_id="token", response_class=JSONResponse)
async def token(request: Request) -> JSONResponse:
    return await _audited(request, "token", lambda audit: _token(request, audit))


async def _token(request: Request, audit: RequestAudit | None) -> JSONResponse:
    form = await form_fields(request)
    if form is None:
        return _error(400, "invalid_request", "send application/x-www-form-urlencoded")
    if form.get("grant_type") == "authorization_code":
        return await _person_token(request, form, audit)
    if form.get("grant_type") != "client_credentials":
        return _error(400, "unsupported_grant_type",
                      "client_credentials, or authorization_code for people")
    client = await _authenticated(request, form, audit)
    if client is None:
        return _error(401, "invalid_client")
    try:
        value, grant = await run_in_threadpool(tokens.issue, request.app.state.db, client,
                                               form.get("scope"), int(time.time()))
    except tokens.InvalidScopeError as exc:
        return _error(400, "invalid_scope", str(exc))
    return JSONResponse({"access_token": value, "token_type": "bearer",
                         "expires_in": tokens.TOKEN_SECONDS, "scope": grant.scopes},
                        headers=NO_STORE)


async def _person_token(request: Request, form: dict[str, str],
                        audit: RequestAudit | None) -> JSONResponse:
    """A signed-in person's code, redeemed by the public client it was issued to."""
    client_id = form.get("client_id", "")
    if audit is not None:
        audit.identify(client_id[:64] or None, None)
    if client_id not in people.PUBLIC_CLIENTS:
        return _error(401, "invalid_client")
    if not all(form.get(name) for name in ("code", "redirect_uri", "code_verifier")):
        return _error(400, "invalid_request", "send code, redirect_uri and code_verifier")
    try:
        value, grant = await run_in_threadpool(
            tokens.exchange_code, request.app.state.db, client_id=client_id,
            code=form["code"], redirect_uri=form["redirect_uri"],
            verifier=form["code_verifier"], now=int(time.time()),
            seconds=session_seconds(request.app.state.settings))
    except people.InvalidGrantError as exc:
        tokens.log.info("authorization code refused: %s", exc)
        return _error(400, "invalid_grant")
    if audit is not None:
        audit.identify(grant.client.client_id, grant.client.organization)
    return JSONResponse({"access_token": value, "token_type": "bearer",
                         "expires_in": grant.expires_at - int(time.time()),
                         "scope": grant.scopes}, headers=NO_STORE)


def session_seconds(settings: Any) -> int:
    """A person's token lasts as long as a dashboard sign-in may."""
    return int(settings.dashboard_session_hours * 3600)


async def _token_and_caller(request: Request, audit: RequestAudit | None
                            ) -> tuple[str, Client] | JSONResponse:
    """The token a client asks about and the client itself (authenticated by its own
    assertion), or the error to answer."""
    form = await form_fields(request)
    if form is None or not form.get("token"):
        return _error(400, "invalid_request", "send the token, form-encoded")
    caller = await _authenticated(request, form, audit)
    if caller is None:
        return _error(401, "invalid_client")
    return form["token"], caller


@router.post("/auth/introspect", summary="Token introspection (RFC 7662)",
             operation_id="introspect", response_class=JSONResponse)
async def introspect(request: Request) -> JSONResponse:
    async def answer(audit: RequestAudit | None) -> JSONResponse:
        asked = await _token_and_caller(request, audit)
        if isinstance(asked, JSONResponse):
            return asked
        found = await run_in_threadpool(tokens.introspect, request.app.state.db, *asked,
                                        int(time.time()))
        return JSONResponse(found, headers=NO_STORE)

    return await _audited(request, "introspect", answer)


@router.post("/auth/revoke", summary="Token revocation (RFC 7009)", operation_id="revoke",
             response_class=JSONResponse)
async def revoke(request: Request) -> JSONResponse:
    async def answer(audit: RequestAudit | None) -> JSONResponse:
        asked = await _token_and_caller(request, audit)
        if isinstance(asked, JSONResponse):
            return asked
        await run_in_threadpool(tokens.revoke, request.app.state.db, *asked)
        return JSONResponse({}, headers=NO_STORE)

    return await _audited(request, "revoke", answer)
