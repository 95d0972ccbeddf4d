"""Intake: a patient, and what eligibility needs, imported from the EHR.

The patient is found in the EHR by an identifier (an MRN, say). With it come its
Conditions, its Observations of the last `ehr_observation_days`, its Coverage and its
AllergyIntolerances. Each is stored here by a conditional update keyed by the EHR's own
id (identifier system `<EHR base URL>/<type>`), so importing again updates what was
imported instead of duplicating it, and identifiers given here (the chain of identity)
are kept. References to the patient point at our copy; references to what was not
imported (the EHR's Practitioners, Encounters…) become absolute URLs into the EHR
(mappings/ehr.py). One transaction Bundle stores it all, with a Provenance naming the
EHR versions it came from.

`POST Patient/$ehr-intake` (Parameters: `ehr`, `identifier` as system|value) and
`atm ehr intake` run it; so does a referral that names its patient by identifier.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway import jsonio
from gateway.adapters.ehr.client import EhrClient, EhrRefused, EhrUnavailable
from gateway.adapters.ehr.endpoints import Endpoint, get_endpoint, list_endpoints
from gateway.errors import (
    BadGatewayError,
    InvalidError,
    MultipleMatchesError,
    NotFoundError,
    UnavailableError,
)
from gateway.services import access, bundle
from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.services.parameters import arguments, text
from gateway.services.search import match_ids
from mappings import ehr as mapping

IMPORTED = ("Condition", "Observation", "Coverage", "AllergyIntolerance")
PAGE = 100  # of each type; the most recent Observations first
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
ENDPOINT_SYSTEM = "https://atm-gateway.org/fhir/sid/ehr-endpoint"


@dataclass(frozen=True)
class Imported:
    patient: str  # "Patient/<our id>"
    counts: dict[str, int]


def _searches(ehr_id: str, since: str) -> dict[str, dict[str, str]]:
    return {"Condition": {"patient": ehr_id, "_count": str(PAGE)},
            "Observation": {"patient": ehr_id, "date": f"ge{since}", "_sort": "-date",
                            "_count": str(PAGE)},
            "Coverage": {"beneficiary": f"Patient/{ehr_id}", "_count": str(PAGE)},
            "AllergyIntolerance": {"patient": ehr_id, "_count": str(PAGE)}}


def _matches(found: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in found.get("entry", [])
            if isinstance(e.get("resource"), dict)
            and e["resource"].get("resourceType") == resource_type
            and e.get("search", {}).get("mode", "match") == "match"]


def fetch(ehr: EhrClient, identifier: str, settings_days: int) -> tuple[
        dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The EHR's patient with this identifier, and its records by type."""
    patients = _matches(ehr.read_json("Patient", params={"identifier": identifier}), "Patient")
    if not patients:
        raise NotFoundError(f"EHR {ehr.endpoint.name} has no patient {identifier}")
    if len(patients) > 1:
        raise MultipleMatchesError(f"EHR {ehr.endpoint.name} has several patients "
                                   f"{identifier}")
    patient = patients[0]
    since = (datetime.now(UTC) - timedelta(days=settings_days)).date().isoformat()
    records = {kind: _matches(ehr.read_json(kind, params=query), kind)
               for kind, query in _searches(patient["id"], since).items()}
    return patient, records


# -- our copy ------------------------------------------------------------------------------
def _kept_here(ctx: Context, resource: dict[str, Any], system: str) -> list[dict[str, Any]]:
    """Identifiers our earlier copy carries that the EHR does not (the chain of
    identity): an import never removes them."""
    kind = resource["resourceType"]
    with ctx.reading() as repo:
        found = match_ids(replace(ctx, grant=None), repo, kind,
                          [("identifier", f"{system}|{resource['id']}")], limit=1)
        current = repo.read(kind, found[0]) if found else None
    if current is None or current.deleted:
        return []
    given = {(i.get("system"), i.get("value")) for i in resource.get("identifier", [])}
    return [i for i in current.resource().get("identifier", [])
            if i.get("system") != system and (i.get("system"), i.get("value")) not in given]


def transaction(ctx: Context, endpoint: Endpoint, patient: dict[str, Any],
                records: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The transaction Bundle that stores the patient, its records and the Provenance."""
    patient_urn = f"urn:uuid:{uuid.uuid4()}"
    entries = []
    sources = []
    for resource, urn in [(patient, patient_urn), *((r, f"urn:uuid:{uuid.uuid4()}")
                                                    for kind in IMPORTED
                                                    for r in records.get(kind, []))]:
        system = endpoint.source_system(resource["resourceType"])
        copy = mapping.imported(resource, endpoint.base_url, patient["id"], patient_urn,
                                _kept_here(ctx, resource, system), endpoint.organization)
        entries.append({"fullUrl": urn, "resource": copy, "request": {
            "method": "PUT",
            "url": f"{resource['resourceType']}?identifier={system}|{resource['id']}"}})
        version = resource.get("meta", {}).get("versionId")
        sources.append(f"{endpoint.base_url}/{resource['resourceType']}/{resource['id']}"
                       + (f"/_history/{version}" if version else ""))
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    entries.append({"resource": {
        "resourceType": "Provenance", "recorded": now,
        "target": [{"reference": e["fullUrl"]} for e in entries],
        "activity": {"coding": [{"system": DATA_OPERATION, "code": "UPDATE"}],
                     "text": f"imported from EHR {endpoint.name}"},
        "agent": [{"who": {"identifier": {"system": ENDPOINT_SYSTEM, "value": endpoint.name},
                           "display": f"EHR {endpoint.name} ({endpoint.base_url})"}}],
        "entity": [{"role": "source", "what": {"reference": s}} for s in sources]},
        "request": {"method": "POST", "url": "Provenance"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def intake(ctx: Context, endpoint: Endpoint, identifier: str) -> Imported:
    """Import the patient with this identifier from the EHR (503 while it is down)."""
    if "|" not in identifier:
        raise InvalidError("identifier is system|value, e.g. urn:oid:1.2.3|MRN-42")
    try:
        with EhrClient(endpoint, ctx.settings) as ehr:
            patient, records = fetch(ehr, identifier, ctx.settings.ehr_observation_days)
    except EhrUnavailable as exc:
        raise UnavailableError(f"EHR {endpoint.name} is unavailable: {exc}", headers={
            "Retry-After": str(max(1, round(exc.retry_after)))}) from exc
    except EhrRefused as exc:
        raise BadGatewayError(f"EHR {endpoint.name} refused: {exc}") from exc
    body = jsonio.dumps(transaction(ctx, endpoint, patient, records))
    answer = bundle.process(ctx, FhirRequest(method="POST", path="", body=body,
                                             content_type="application/fhir+json"))
    result = jsonio.loads(answer.body or b"{}")
    location = result["entry"][0]["response"]["location"]  # [base/]Patient/id/_history/n
    patient_id = location.split("/_history")[0].rsplit("/", 1)[-1]
    return Imported(f"Patient/{patient_id}",
                    {"Patient": 1, **{kind: len(records[kind]) for kind in IMPORTED}})


def endpoint_named(ctx: Context, name: str | None) -> Endpoint:
    """The endpoint asked for, or the only one there is."""
    if name is None:
        enabled = list_endpoints(ctx.db, enabled_only=True)
        if len(enabled) != 1:
            raise InvalidError("name the EHR (parameter ehr): "
                               f"{len(enabled)} endpoints are enabled")
        return enabled[0]
    found = get_endpoint(ctx.db, name)
    if found is None or not found.enabled:
        raise NotFoundError(f"No enabled EHR endpoint {name}")
    return found


def op_ehr_intake(ctx: Context, request: FhirRequest) -> FhirResponse:
    """POST Patient/$ehr-intake: Parameters `ehr` (a name) and `identifier`."""
    access.check_may_create(ctx.grant, "Patient")
    args = arguments(request)
    identifier = text(args, "identifier")
    if identifier is None:
        raise InvalidError("Patient/$ehr-intake needs an identifier (system|value)")
    imported = intake(ctx, endpoint_named(ctx, text(args, "ehr")), identifier)
    return FhirResponse(200, jsonio.dumps({"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueReference": {"reference": imported.patient}},
        *({"name": "imported", "part": [{"name": "type", "valueCode": kind},
                                        {"name": "count", "valueInteger": count}]}
          for kind, count in imported.counts.items())]}))
