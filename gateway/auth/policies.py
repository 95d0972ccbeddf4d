"""What each partner role may do, as data: resource types and interactions (c r u d s).
A request must be allowed by both the token's scopes and its client's role.

Which instances of a type a partner sees (a courier: the Tasks it owns) is the next
layer; these rules say which doors exist at all."""

from __future__ import annotations

ALL = "cruds"
RECORDS = {"Provenance": "crs", "AuditEvent": "rs"}  # every partner signs what it does
PROTOCOLS = {"PlanDefinition": "rs", "ActivityDefinition": "rs"}
DIRECTORY = {"Organization": "rs", "Location": "rs", "HealthcareService": "rs",
             "PractitionerRole": "rs", "Device": "rs"}

ROLE_POLICIES: dict[str, dict[str, str]] = {
    "admin": {"*": ALL},
    "ehr": {"*": ALL},
    "treatment-centre": {"*": ALL},
    "apheresis-centre": {
        "Task": "rus", "Appointment": "rus", "Slot": "rs", "Schedule": "rs",
        "Specimen": "crus", "ServiceRequest": "rs", "CarePlan": "rs", "Patient": "rs",
        **RECORDS, **PROTOCOLS, **DIRECTORY},
    "courier": {
        "Task": "rus", "Specimen": "rs", "BiologicallyDerivedProduct": "rs",
        **RECORDS, **DIRECTORY},
    "manufacturer": {
        "ServiceRequest": "rus", "Task": "rus", "Specimen": "rus",
        "BiologicallyDerivedProduct": "crus", "Slot": "crus", "Schedule": "crus",
        "Appointment": "rus", "Observation": "crus", "DiagnosticReport": "crus",
        "Patient": "rs", **RECORDS, **PROTOCOLS, **DIRECTORY},
    "lims": {
        "Task": "rus", "ServiceRequest": "rs", "Specimen": "crus", "Observation": "crus",
        "DiagnosticReport": "crus", "BiologicallyDerivedProduct": "rus", "Patient": "rs",
        **RECORDS, **DIRECTORY},
    "payer": {
        "CarePlan": "rs", "ServiceRequest": "rs", "Task": "rus", "Coverage": "rs",
        "Claim": "crus", "ClaimResponse": "crus", "Patient": "rs", **RECORDS, **DIRECTORY},
}


def role_allows(role: str, resource_type: str, right: str) -> bool:
    """True when the role may use `right` on `resource_type` ("*": on every type)."""
    policy = ROLE_POLICIES.get(role, {})
    if right in policy.get("*", ""):
        return True
    return resource_type != "*" and right in policy.get(resource_type, "")
