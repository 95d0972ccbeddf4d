"""An audit log row as the FHIR AuditEvent it is served as, in the shape of IHE's Basic
Audit Log Patterns (https://profiles.ihe.net/ITI/BALP/): the client as Source Role ID
(requestor), its organisation, this server as Destination Role ID, the resources read
or changed as entities, a search's query as a Query entity."""

from __future__ import annotations

import base64
from typing import Any

from gateway.store.timeparse import format_instant

ATM = "https://atm-gateway.org/fhir"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."
CLIENT_SYSTEM = f"{ATM}/oauth-client"
_ENTITY_TYPE = {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                "code": "2", "display": "System Object"}
_PROFILE = {"C": "Create", "R": "Read", "U": "Update", "D": "Delete"}
_OUTCOME_TEXT = {"0": "Success", "4": "Minor failure", "8": "Serious failure"}
_LOGIN = {"system": DCM, "code": "110114", "display": "User Authentication"}
_EXPORT = {"system": DCM, "code": "110106", "display": "Export"}
_REST = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
         "display": "Restful Operation"}
_SERVER = {"type": {"coding": [{"system": DCM, "code": "110152",
                                "display": "Destination Role ID"}]},
           "who": {"display": "ATM Gateway"}, "requestor": False}
_SOURCE = {"site": "ATM Gateway", "observer": {"display": "ATM Gateway"},
           "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                     "code": "4", "display": "Application Server"}]}


def _profile(row: Any) -> list[str]:
    if row.event_type != "rest" or row.outcome != "0":
        return []
    if row.subtype.startswith("search"):
        return [BALP + "Query"]
    name = _PROFILE.get(row.action)
    return [BALP + name] if name else []


def _client(row: Any) -> dict[str, Any]:
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
        "requestor": True}
    if row.client_id:
        agent["who"] = {"identifier": {"system": CLIENT_SYSTEM, "value": row.client_id}}
        agent["altId"] = row.client_id
    else:
        agent["who"] = {"display": "unidentified caller"}
    if row.address:
        agent["network"] = {"address": row.address, "type": "2"}  # 2: IP address
    return agent


def _entities(row: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"what": {"reference": ref}, "type": _ENTITY_TYPE}
                                 for ref in (row.entities or "").split()]
    if row.query and row.subtype.startswith(("search", "history")):
        out.append({"type": _ENTITY_TYPE,
                    "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role",
                             "code": "24", "display": "Query"},
                    "query": base64.b64encode(row.query.encode()).decode("ascii"),
                    "description": row.query})
    return out


def audit_event(row: Any) -> dict[str, Any]:
    """The AuditEvent of one audit_log row (all its columns)."""
    event: dict[str, Any] = {"resourceType": "AuditEvent", "id": str(row.seq),
                             "meta": {"versionId": "1",
                                      "lastUpdated": format_instant(row.recorded)}}
    if profile := _profile(row):
        event["meta"]["profile"] = profile
    request = f"{row.method} {row.path or '[base]'}" + (f"?{row.query}" if row.query else "")
    event["extension"] = [{"url": f"{ATM}/StructureDefinition/audit-request",
                           "valueString": request}]
    if row.request_id:
        event["extension"].append({"url": f"{ATM}/StructureDefinition/request-id",
                                   "valueString": row.request_id})
    if row.event_type == "login":
        event["type"] = _LOGIN
        event["subtype"] = [{"system": f"{ATM}/CodeSystem/oauth-endpoint",
                             "code": row.subtype}]
    elif row.event_type == "notify":
        return _notification(event, row)
    else:
        event["type"] = _REST
        event["subtype"] = [{"system": "http://hl7.org/fhir/restful-interaction",
                             "code": row.subtype}]
    event["action"] = row.action
    event["recorded"] = format_instant(row.recorded)
    event["outcome"] = row.outcome
    event["outcomeDesc"] = _OUTCOME_TEXT[row.outcome] + (
        f" (HTTP {row.status})" if row.status is not None else " (stored with its change)")
    agents = [_client(row)]
    if row.organization:
        agents.append({"type": {"text": "organisation the client acts for"},
                       "who": {"reference": row.organization}, "requestor": False})
    event["agent"] = [*agents, _SERVER]
    event["source"] = _SOURCE
    if entities := _entities(row):
        event["entity"] = entities
    return event


def _notification(event: dict[str, Any], row: Any) -> dict[str, Any]:
    """A notification this server sent to a subscriber's endpoint: the server is the
    source, the endpoint the destination, the subscribing client the one it was for."""
    event["type"] = _EXPORT
    event["subtype"] = [{"system": f"{ATM}/CodeSystem/subscription-notification",
                         "code": row.subtype}]
    event["action"] = row.action
    event["recorded"] = format_instant(row.recorded)
    event["outcome"] = row.outcome
    answer = f"HTTP {row.status}" if row.status is not None else "no answer"
    event["outcomeDesc"] = _OUTCOME_TEXT[row.outcome] + f" ({row.query or answer})"
    server = {**_SERVER, "type": {"coding": [{"system": DCM, "code": "110153",
                                              "display": "Source Role ID"}]},
              "requestor": True}
    endpoint: dict[str, Any] = {
        "type": {"coding": [{"system": DCM, "code": "110152",
                             "display": "Destination Role ID"}]},
        "who": {"display": row.path}, "requestor": False}
    if row.address:
        endpoint["network"] = {"address": row.address, "type": "1"}  # 1: machine name
    agents = [server, endpoint]
    if row.client_id:
        agents.append({"type": {"text": "subscribing client"}, "requestor": False,
                       "who": {"identifier": {"system": CLIENT_SYSTEM,
                                              "value": row.client_id}},
                       "altId": row.client_id})
    if row.organization:
        agents.append({"type": {"text": "organisation the client acts for"},
                       "who": {"reference": row.organization}, "requestor": False})
    event["agent"] = agents
    event["source"] = _SOURCE
    if entities := _entities(row):
        event["entity"] = entities
    return event
