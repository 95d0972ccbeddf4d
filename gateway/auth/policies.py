"""What each partner role may do, as data: resource types and interactions (c r u d s),
and which instances of a type it sees, as search criteria relative to its own
organisation (`{org}`). A request must be allowed by both the token's scopes and its
client's role; a resource outside the role's criteria does not exist for the client."""

from __future__ import annotations

ALL = "cruds"
RECORDS = {"Provenance": "crs", "AuditEvent": "rs"}  # every partner signs what it does
PROTOCOLS = {"PlanDefinition": "rs", "ActivityDefinition": "rs"}
DIRECTORY = {"Organization": "rs", "Location": "rs", "HealthcareService": "rs",
             "PractitionerRole": "rs", "Device": "rs",
             # Every partner may subscribe to what it may read (gateway/subscriptions).
             "Subscription": "cruds", "SubscriptionTopic": "rs"}

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
        "Observation": "crus",  # data-logger readings of its shipments
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


ORG = "{org}"
OWNED_TASKS = [("owner", ORG)]
# An appointment at one of its services (HealthcareService.providedBy): what a site or
# a manufacturer booked through a chain sees of it.
AT_OWN_SERVICE = [("actor:HealthcareService.organization", ORG)]
FOCUSED_BY_OWN_TASK = [("_has:Task:focus:owner", ORG)]
PERFORMED = [("performer", ORG)]
SIGNED = [("agent", ORG)]
# A Subscription is its organisation's: the server tags it so when it is created.
SUBSCRIBED = [("_tag", "https://atm-gateway.org/fhir/CodeSystem/subscriber-organization|"
               + ORG)]

ROLE_INSTANCES: dict[str, dict[str, list[tuple[str, str]]]] = {
    "treatment-centre": {
        "Patient": [("organization", ORG)],
        "CarePlan": [("subject:Patient.organization", ORG)],
        "ServiceRequest": [("subject:Patient.organization", ORG)],
        "Task": [("patient.organization", ORG)],
        "Flag": [("patient.organization", ORG)],
        "AuditEvent": SIGNED, "Subscription": SUBSCRIBED},
    "apheresis-centre": {
        "Task": OWNED_TASKS, "Appointment": AT_OWN_SERVICE,
        "Schedule": [("actor", ORG)], "Slot": [("schedule.actor", ORG)],
        "Specimen": FOCUSED_BY_OWN_TASK, "ServiceRequest": PERFORMED,
        "CarePlan": [("_has:Task:based-on:owner", ORG)],
        "Patient": [("_has:Task:patient:owner", ORG)],
        "Provenance": SIGNED, "AuditEvent": SIGNED, "Subscription": SUBSCRIBED},
    "courier": {
        "Task": OWNED_TASKS, "Specimen": FOCUSED_BY_OWN_TASK,
        "BiologicallyDerivedProduct": FOCUSED_BY_OWN_TASK, "Observation": PERFORMED,
        "Provenance": SIGNED, "AuditEvent": SIGNED, "Subscription": SUBSCRIBED},
    "manufacturer": {
        "ServiceRequest": PERFORMED, "Task": OWNED_TASKS, "Specimen": FOCUSED_BY_OWN_TASK,
        "BiologicallyDerivedProduct": FOCUSED_BY_OWN_TASK, "Schedule": [("actor", ORG)],
        "Slot": [("schedule.actor", ORG)], "Appointment": AT_OWN_SERVICE,
        "Observation": PERFORMED, "DiagnosticReport": PERFORMED,
        "Patient": [("_has:ServiceRequest:subject:performer", ORG)],
        "Provenance": SIGNED, "AuditEvent": SIGNED, "Subscription": SUBSCRIBED},
    "lims": {
        "Task": OWNED_TASKS, "ServiceRequest": PERFORMED, "Specimen": FOCUSED_BY_OWN_TASK,
        "Observation": PERFORMED, "DiagnosticReport": PERFORMED,
        "BiologicallyDerivedProduct": FOCUSED_BY_OWN_TASK,
        "Patient": [("_has:ServiceRequest:subject:performer", ORG)],
        "Provenance": SIGNED, "AuditEvent": SIGNED, "Subscription": SUBSCRIBED},
    "payer": {
        "Task": OWNED_TASKS, "Coverage": [("payor", ORG)], "Claim": [("insurer", ORG)],
        "ClaimResponse": [("insurer", ORG)],
        "CarePlan": [("_has:Task:based-on:owner", ORG)],
        "ServiceRequest": [("_has:Task:based-on:owner", ORG)],
        "Patient": [("_has:Coverage:beneficiary:payor", ORG)],
        "Provenance": SIGNED, "AuditEvent": SIGNED, "Subscription": SUBSCRIBED},
}


def instance_criteria(role: str, organization: str,
                      resource_type: str) -> list[tuple[str, str]] | None:
    """The search criteria a resource of this type must meet to exist for a client of
    this role and organisation; None when every instance does."""
    rules = ROLE_INSTANCES.get(role, {}).get(resource_type)
    if rules is None:
        return None
    return [(name, value.replace(ORG, organization)) for name, value in rules]


def sees_everything(role: str) -> bool:
    """Roles with no instance rules at all (admin, ehr): only they may search across
    types or join in other types (includes, chains, _has)."""
    return not ROLE_INSTANCES.get(role)
