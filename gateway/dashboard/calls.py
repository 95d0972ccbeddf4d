"""FHIR interactions on behalf of a signed-in person: the same services, checks and audit
records as a partner's request over /fhir with the person's token.

Everything the dashboard shows of one journey, and every action taken from it (complete
or reassign a Task, book a chain, acknowledge an escalation), goes through here, so what
a coordinator may see and do is exactly what their role and organisation allow anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from gateway import jsonio
from gateway.api.fhir_app import client_address
from gateway.api.http import base_url, header_dict
from gateway.auth.redaction import BLIND_ROLES, redact
from gateway.auth.tokens import Grant
from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.services.router import handle
from gateway.store.repository import Actor

FHIR_JSON = "application/fhir+json"
T = TypeVar("T")


class Caller:
    """Makes FHIR calls as one person, from one dashboard request."""

    def __init__(self, request: Request, grant: Grant) -> None:
        self.request, self.grant = request, grant
        self.app = request.app
        self.headers = header_dict(request.scope)

    def context(self, audit: Any = None) -> Context:
        settings = self.app.state.settings
        return Context(db=self.app.state.db, settings=settings,
                       base_url=base_url(settings, self.request.scope, self.headers),
                       actor=Actor(name=self.grant.client.client_id,
                                   request_id=self.request.scope.get("state", {})
                                   .get("request_id")),
                       grant=self.grant, audit=audit)

    async def __call__(self, method: str, path: str, query: list[tuple[str, str]] | None = None,
                       body: dict[str, Any] | None = None,
                       headers: dict[str, str] | None = None) -> FhirResponse:
        """One interaction; FhirError (an OperationOutcome's worth) when it is refused."""
        query = query or []
        audit = self._begin(method, path, query)
        call = FhirRequest(method=method, path=path, query=query,
                           headers={"accept": FHIR_JSON, **(headers or {})},
                           body=jsonio.dumps(body) if body is not None else None,
                           content_type=FHIR_JSON if body is not None else None)
        try:
            result = await run_in_threadpool(handle, self.context(audit), call)
        except Exception as exc:
            if audit is not None:
                audit.close(getattr(exc, "status", 500))
            raise
        if audit is not None:
            audit.close(result.status, result.headers.get("ETag"))
        if self.grant.client.role in BLIND_ROLES and result.body \
                and "Content-Type" not in result.headers:
            result.body = redact(result.body)
        return result

    async def run(self, path: str, work: Callable[[Context], T]) -> T:
        """Server-side work that reads as this person (the custody report's model, say),
        audited as a read of `path`."""
        audit = self._begin("GET", path, [])
        try:
            result = await run_in_threadpool(work, self.context(audit))
        except Exception as exc:
            if audit is not None:
                audit.close(getattr(exc, "status", 500))
            raise
        if audit is not None:
            audit.close(200)
        return result

    async def json(self, method: str, path: str, query: list[tuple[str, str]] | None = None,
                   body: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> dict[str, Any]:
        result = await self(method, path, query, body, headers)
        if result.resource is not None:
            return result.resource
        return jsonio.loads_trusted(result.body) if result.body else {}

    async def search(self, resource_type: str,
                     query: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Every match's resource (the search's own page size; one page)."""
        bundle = await self.json("GET", resource_type, query)
        return [e["resource"] for e in bundle.get("entry", [])
                if e.get("search", {}).get("mode", "match") == "match" and "resource" in e]

    def _begin(self, method: str, path: str, query: list[tuple[str, str]]) -> Any:
        trail = getattr(self.app.state, "audit", None)
        if trail is None:
            return None
        audit = trail.begin(method, path, urlencode(query) or None,
                            client_address(self.app.state.settings, self.request.scope,
                                           self.headers),
                            self.request.scope.get("state", {}).get("request_id"))
        audit.identify(self.grant.client.client_id, self.grant.client.organization)
        return audit
