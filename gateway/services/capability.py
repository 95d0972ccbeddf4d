"""The CapabilityStatement at /metadata: what this server really supports.

https://hl7.org/fhir/R4/capabilitystatement.html. Built from the same tables the
server runs on (resource types, search parameters), so it cannot drift from them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from gateway import __version__, jsonio
from gateway.auth.tokens import auth_urls
from gateway.fhir import ADDED_TYPES, FHIR_VERSION, r4_resource_types
from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.store.search_params import TABLE_PARAMS, params_for

SP_BASE = "http://hl7.org/fhir/SearchParameter"
ATM = "https://atm-gateway.org/fhir"
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
BACKPORT_OPERATIONS = "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/"
TYPE_INTERACTIONS = ["read", "vread", "update", "patch", "delete", "history-instance",
                     "history-type", "create", "search-type"]
STARTED = datetime.now(UTC).date().isoformat()
RESULT_PARAMS = ["_count", "_sort", "_include", "_revinclude", "_summary", "_elements",
                 "_total", "_has"]


def _search_params(resource_type: str) -> list[dict[str, Any]]:
    out = [{"name": "_id", "type": "token", "definition": f"{SP_BASE}/Resource-id"},
           {"name": "_lastUpdated", "type": "date",
            "definition": f"{SP_BASE}/Resource-lastUpdated"}]
    for code, param in params_for(resource_type).items():
        if code in TABLE_PARAMS:
            continue
        owner = "Resource" if code.startswith("_") else resource_type
        out.append({"name": code, "type": param.type,
                    "definition": f"{SP_BASE}/{owner}-{code.lstrip('_')}"})
    return out


def _resource(resource_type: str) -> dict[str, Any]:
    refs = [c for c, p in params_for(resource_type).items() if p.type == "reference"]
    return {
        "type": resource_type,
        "profile": f"http://hl7.org/fhir/StructureDefinition/{resource_type}",
        "interaction": [{"code": c} for c in TYPE_INTERACTIONS],
        "versioning": "versioned-update",
        "readHistory": True,
        "updateCreate": True,
        "conditionalCreate": True,
        "conditionalRead": "full-support",
        "conditionalUpdate": True,
        "conditionalDelete": "single",
        "referencePolicy": ["literal", "logical"],
        "searchInclude": [f"{resource_type}:{c}" for c in refs],
        "searchRevInclude": [],
        "searchParam": _search_params(resource_type),
        "operation": [{"name": "validate",
                       "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"}],
    }


def _audit_event() -> dict[str, Any]:
    """AuditEvent is the server's own trail (gateway/audit): read and searched only."""
    params = [("_id", "token", "Resource-id"), ("_lastUpdated", "date", "Resource-lastUpdated"),
              ("date", "date", "AuditEvent-date"),
              ("altid", "token", "AuditEvent-altid"), ("agent", "reference", "AuditEvent-agent"),
              ("entity", "reference", "AuditEvent-entity"),
              ("action", "token", "AuditEvent-action"),
              ("outcome", "token", "AuditEvent-outcome"),
              ("subtype", "token", "AuditEvent-subtype"), ("type", "token", "AuditEvent-type"),
              ("address", "token", "AuditEvent-address")]
    return {
        "type": "AuditEvent",
        "profile": "http://hl7.org/fhir/StructureDefinition/AuditEvent",
        "documentation": "One record for every request, written by this server in the same "
                         "transaction as any change it made, hash-chained; clients cannot "
                         "create, change or delete records.",
        "interaction": [{"code": c} for c in ("read", "vread", "search-type")],
        "readHistory": False,
        "searchParam": [{"name": n, "type": t, "definition": f"{SP_BASE}/{d}"}
                        for n, t, d in params],
        "operation": [{"name": "verify-chain",
                       "definition": f"{ATM}/OperationDefinition/AuditEvent-verify-chain"}],
    }


def _subscription() -> dict[str, Any]:
    """Subscription as the Subscriptions Backport IG asks a server to say: the topics it
    ships (users may add their own: GET SubscriptionTopic) and the operations."""
    from gateway.subscriptions.topics import shipped_topics  # data files, read once

    resource = _resource("Subscription")
    resource["documentation"] = (
        "Topic-based Subscriptions (Subscriptions Backport IG): criteria is a topic's "
        "canonical URL. The topics are SubscriptionTopic resources (R4B's), served at "
        "[base]/SubscriptionTopic; rest-hook and websocket channels; payloads empty, "
        "id-only and full-resource.")
    resource["extension"] = [
        {"url": f"{BACKPORT}capabilitystatement-subscriptiontopic-canonical",
         "valueCanonical": topic["url"]} for topic in shipped_topics()]
    resource["operation"] += [
        {"name": name, "definition": f"{BACKPORT_OPERATIONS}backport-subscription-{name}"}
        for name in ("status", "events", "get-ws-binding-token")]
    return resource


# Operations some types have beside $validate (gateway/custody/report.py).
EXTRA_OPERATIONS = {
    "CarePlan": ("custody-report", "find-chain", "hold-chain", "book-chain", "cancel-chain"),
    "BiologicallyDerivedProduct": ("custody-report",),
    "Specimen": ("custody-report",), "Provenance": ("verify-signatures",),
    "Appointment": ("reschedule",)}


def _with_operations(resource: dict[str, Any]) -> dict[str, Any]:
    resource["operation"] += [
        {"name": name, "definition": f"{ATM}/OperationDefinition/{resource['type']}-{name}"}
        for name in EXTRA_OPERATIONS.get(resource["type"], ())]
    return resource


AUTH_OFF_WARNING = ("ATM_AUTH=off: this server asks no one who they are, and anyone "
                    "can read and change everything. For local exploration only.")


def _security(base_url: str, auth_on: bool) -> dict[str, Any]:
    """SMART on FHIR, and where its OAuth2 endpoints are (the oauth-uris extension); with
    authentication off, a warning in its place."""
    if not auth_on:
        return {"description": AUTH_OFF_WARNING}
    urls = auth_urls(base_url)
    return {
        "service": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
            "code": "SMART-on-FHIR"}], "text": "SMART Backend Services (OAuth2)"}],
        "extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [{"url": name, "valueUri": urls[name]}
                          for name in ("authorize", "token", "introspect", "revoke")]}]}


@lru_cache(maxsize=8)
def capability_statement(base_url: str, software_date: str, auth_on: bool = True) -> bytes:
    statement = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": software_date,
        "publisher": "ATM Gateway",
        "kind": "instance",
        "software": {"name": "ATM Gateway", "version": __version__},
        "implementation": {"description": "ATM Gateway FHIR R4 server", "url": base_url},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            "resource": [_audit_event() if t == "AuditEvent" else
                         _subscription() if t == "Subscription" else
                         _with_operations(_resource(t))
                         # R4's ResourceType value set has no SubscriptionTopic: it is
                         # served, and told of in Subscription's documentation.
                         for t in sorted(r4_resource_types() - ADDED_TYPES.keys())],
            "interaction": [{"code": c} for c in ("transaction", "batch", "search-system",
                                                  "history-system")],
            "searchParam": [{"name": n, "type": "special" if n == "_has" else "string"}
                            for n in RESULT_PARAMS],
            "security": _security(base_url, auth_on),
        }],
    }
    return jsonio.dumps(statement)


def capability_response(ctx: Context, request: FhirRequest) -> FhirResponse:
    return FhirResponse(200, capability_statement(ctx.base_url, STARTED,
                                                  ctx.settings.auth == "smart"))
