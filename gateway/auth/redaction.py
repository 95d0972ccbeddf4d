"""Patient details kept from partners who work by chain-of-identity code alone
(manufacturers, couriers, LIMS): every response body they receive is cleaned of them."""

from __future__ import annotations

from typing import Any

from gateway import jsonio

BLIND_ROLES = frozenset({"manufacturer", "courier", "lims"})
"""Roles that never receive a patient's name, birth date, address or contact details."""

PATIENT_DETAILS = ("name", "birthDate", "address", "telecom", "contact", "photo")
PERSONS = frozenset({"Patient", "RelatedPerson"})  # the patient, and the people close to them


def clean(value: Any) -> Any:
    """The value as a partner who works by chain of identity alone receives it."""
    if isinstance(value, list):
        return [clean(item) for item in value]
    if not isinstance(value, dict):
        return value
    cleaned = {key: clean(item) for key, item in value.items()
               # Narratives are free text that may name the patient, in any resource.
               if not (key == "text" and "resourceType" in value)}
    if cleaned.get("resourceType") in PERSONS:
        for key in PATIENT_DETAILS:
            cleaned.pop(key, None)
    if "resourceType" not in cleaned and ("reference" in cleaned or "identifier" in cleaned):
        cleaned.pop("display", None)  # a Reference's display may spell the name out
    return cleaned


def redact(body: bytes) -> bytes:
    """The body with patient details removed wherever they appear (resources, Bundles,
    contained resources, reference displays)."""
    return jsonio.dumps(clean(jsonio.loads(body)))
