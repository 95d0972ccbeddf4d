"""Translations between an EHR's resources and ours. Pure: dicts in, dicts out.

Inbound (intake): an EHR resource becomes our copy, keyed by the EHR's id (identifier
system `<EHR base URL>/<type>`), its references to the patient pointing at our copy and
its other relative references made absolute URLs into the EHR.

Outbound (write-back): what the EHR should know of an enrolment, in the EHR's terms:
the CarePlan's status, the booked Appointments and, at completion, the custody report as
a DocumentReference. Each carries our identifier (system `<our base>/<type>`), so that
the EHR stores it by a conditional update and a second write replaces the first.
"""

from __future__ import annotations

import base64
from typing import Any

Json = dict[str, Any]
DROPPED = ("id", "meta", "text")  # the EHR's own bookkeeping, not ours


def absolute(value: Any, base_url: str, patient_id: str, patient_reference: str) -> Any:
    """`value` with references to the EHR's patient pointing at `patient_reference`, and
    other relative references made absolute into the EHR."""
    if isinstance(value, list):
        return [absolute(v, base_url, patient_id, patient_reference) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: absolute(v, base_url, patient_id, patient_reference) for k, v in value.items()}
    target = value.get("reference")
    if isinstance(target, str):
        if target in (f"Patient/{patient_id}", f"{base_url}/Patient/{patient_id}"):
            out["reference"] = patient_reference
        elif not target.startswith(("#", "urn:", "http://", "https://")):
            out["reference"] = f"{base_url}/{target}"
    return out


def imported(resource: Json, base_url: str, patient_id: str, patient_reference: str,
             kept: list[Json], organization: str | None = None) -> Json:
    """Our copy of an EHR resource. `kept`: identifiers our earlier copy has that the EHR
    does not (the chain of identity), which an import never removes."""
    kind = resource["resourceType"]
    system = f"{base_url}/{kind}"
    copy = absolute({k: v for k, v in resource.items() if k not in DROPPED}, base_url,
                    patient_id, patient_reference)
    own = [i for i in copy.get("identifier", []) if i.get("system") != system]
    copy["identifier"] = [*own, {"system": system, "value": resource["id"]}, *kept]
    if kind == "Patient" and organization:
        copy["managingOrganization"] = {"reference": organization}
    return copy


def ehr_patient_id(patient: Json, base_url: str) -> str | None:
    """The EHR's id of a patient imported from it, None for anyone else's patient."""
    system = f"{base_url}/Patient"
    return next((i.get("value") for i in patient.get("identifier", [])
                 if i.get("system") == system), None)


# -- outbound --------------------------------------------------------------------------------
def ours(resource_type: str, resource_id: str, our_base: str) -> Json:
    return {"system": f"{our_base}/{resource_type}", "value": resource_id}


def careplan(plan: Json, ehr_patient: str, our_base: str) -> Json:
    """The enrolment as the EHR keeps it: status, intent, title, period, the patient."""
    out: Json = {"resourceType": "CarePlan",
                 "identifier": [ours("CarePlan", plan["id"], our_base)],
                 "status": plan.get("status", "unknown"), "intent": plan.get("intent", "plan"),
                 "subject": {"reference": f"Patient/{ehr_patient}"}}
    for element in ("title", "description", "period", "created"):
        if plan.get(element):
            out[element] = plan[element]
    return out


def appointment(booked: Json, ehr_patient: str, our_base: str) -> Json:
    """A booked step as the EHR keeps it: when, what, the patient, its status; the site
    by name (its resources are ours, not the EHR's)."""
    participants = [{"actor": {"reference": f"Patient/{ehr_patient}"},
                     "status": "accepted"}]
    for participant in booked.get("participant", []):
        actor = participant.get("actor", {})
        reference = actor.get("reference", "")
        if not reference.startswith("Patient/"):
            participants.append({"actor": {"display": actor.get("display") or reference},
                                 "status": participant.get("status", "accepted")})
    out: Json = {"resourceType": "Appointment",
                 "identifier": [ours("Appointment", booked["id"], our_base)],
                 "status": booked.get("status", "booked"), "participant": participants}
    for element in ("start", "end", "description", "serviceType", "cancelationReason",
                    "created"):
        if booked.get(element):
            out[element] = booked[element]
    return out


def custody_document(careplan_id: str, html: str, title: str, ehr_patient: str,
                     our_base: str, date: str) -> Json:
    """The printable custody report, as a DocumentReference the EHR files."""
    return {"resourceType": "DocumentReference",
            "identifier": [ours("DocumentReference", f"custody-report-{careplan_id}",
                                our_base)],
            "status": "current", "date": date, "description": title,
            "type": {"text": "Chain of identity and custody report"},
            "subject": {"reference": f"Patient/{ehr_patient}"},
            "content": [{"attachment": {
                "contentType": "text/html", "title": title,
                "data": base64.b64encode(html.encode("utf-8")).decode("ascii")}}]}
