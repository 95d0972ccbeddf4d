"""The chain of identity: one code per enrolment, assigned once, carried everywhere.

`assign` gives an enrolment (CarePlan) its code, numbered per facility and year in the
ISBT 128 form (mappings/isbt128.py), and writes it as an identifier on the CarePlan, its
Patient and the ServiceRequests and Tasks already made for it. From then on the write
rule `keep_coi` holds for Patient, CarePlan, ServiceRequest, Specimen,
BiologicallyDerivedProduct and Task: a code once carried cannot be changed or removed,
a code nobody assigned cannot be added, and what is made for an enrolment (a Task or
ServiceRequest based on its CarePlan, a Specimen or product made for its order, a
product derived from another) is given the code without asking the writer for it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from gateway.errors import BusinessRuleError, Issue
from gateway.services.context import Context
from gateway.store.repository import Repository, Version
from gateway.store.schema import chains_of_identity, coi_sequences
from gateway.store.timeparse import now_micros
from mappings import isbt128

COI_SYSTEM = "https://atm-gateway.org/fhir/sid/chain-of-identity"
COI_TYPE = {"text": "Chain of identity (ISBT 128)"}
CARRIERS = ("Patient", "CarePlan", "ServiceRequest", "Specimen",
            "BiologicallyDerivedProduct", "Task")
# Where a new resource's enrolment is found: (element, the type it must point at).
_ORIGINS: dict[str, tuple[tuple[str, str], ...]] = {
    "Task": (("basedOn", "CarePlan"), ("basedOn", "ServiceRequest"), ("focus", "ServiceRequest")),
    "ServiceRequest": (("basedOn", "CarePlan"),),
    "Specimen": (("request", "ServiceRequest"), ("parent", "Specimen")),
    "BiologicallyDerivedProduct": (("request", "ServiceRequest"),
                                   ("parent", "BiologicallyDerivedProduct")),
}


class CoiError(BusinessRuleError):
    """A write that would change, remove or invent a chain-of-identity code."""


def refused(message: str, expression: str) -> BusinessRuleError:
    """A 422 naming the element at fault."""
    return CoiError(message, issues=[Issue(CoiError.code, message, expression=(expression,))])


def coi_of(resource: dict[str, Any] | None) -> str | None:
    """The code a resource carries, if any."""
    for identifier in (resource or {}).get("identifier", []):
        if isinstance(identifier, dict) and identifier.get("system") == COI_SYSTEM:
            value = identifier.get("value")
            return value if isinstance(value, str) else None
    return None


def carrying(resource: dict[str, Any], value: str) -> dict[str, Any]:
    """The resource with the code among its identifiers (unchanged if it has it)."""
    if coi_of(resource) == value:
        return resource
    identifier = {"use": "official", "type": COI_TYPE, "system": COI_SYSTEM, "value": value}
    return {**resource, "identifier": [*resource.get("identifier", []), identifier]}


def eye_readable(value: str) -> str:
    try:
        return isbt128.parse(value).eye_readable
    except isbt128.CoiFormatError:
        return value


# -- assignment ------------------------------------------------------------------------
def assigned(conn: Connection, careplan_id: str) -> str | None:
    return conn.execute(select(chains_of_identity.c.value)
                        .where(chains_of_identity.c.careplan_id == careplan_id)).scalar()


def assign(ctx: Context, repo: Repository, careplan_id: str) -> str:
    """The enrolment's code: the one it has, else a new one, written on the CarePlan, its
    Patient and the orders and Tasks made for it so far (in the caller's transaction)."""
    existing = assigned(repo.conn, careplan_id)
    if existing is not None:
        return existing
    careplan = repo.read("CarePlan", careplan_id)
    if careplan is None or careplan.deleted:
        raise BusinessRuleError(f"CarePlan/{careplan_id} does not exist")
    subject = careplan.resource().get("subject", {}).get("reference", "")
    patient_id = subject.split("/", 1)[1] if subject.startswith("Patient/") else None
    value = _next_code(repo.conn, ctx.settings.coi_facility)
    repo.conn.execute(insert(chains_of_identity).values(
        value=value, careplan_id=careplan_id, patient_id=patient_id,
        assigned_at=now_micros()))
    _carry(repo, careplan, value)
    if patient_id is not None:
        patient = repo.read("Patient", patient_id)
        if patient is not None and not patient.deleted:
            _carry(repo, patient, value)
    for resource_type in ("ServiceRequest", "Task"):
        for resource_id, _ in repo.referring(resource_type, "based-on", "CarePlan",
                                             [careplan_id]):
            found = repo.read(resource_type, resource_id)
            if found is not None and not found.deleted:
                _carry(repo, found, value)
    return value


def _carry(repo: Repository, version: Version, value: str) -> None:
    resource = version.resource()
    if coi_of(resource) is None:
        repo.update(carrying(resource, value), version.id, expected_version=version.version)


def _next_code(conn: Connection, facility: str) -> str:
    """The next code of this facility this year: the counter row is incremented in place
    (the row lock orders concurrent assignments; the code's primary key backs it up)."""
    year = datetime.now(UTC).year % 100
    key = (coi_sequences.c.facility == facility) & (coi_sequences.c.year == year)
    number = conn.execute(update(coi_sequences).where(key)
                          .values(last=coi_sequences.c.last + 1)
                          .returning(coi_sequences.c.last)).scalar()
    if number is None:
        repo_insert = Repository(conn)._insert_new  # INSERT unless a racing writer did
        if not repo_insert(coi_sequences, facility=facility, year=year, last=1):
            return _next_code(conn, facility)
        number = 1
    return isbt128.make(facility, year, int(number)).value


# -- the write rule ----------------------------------------------------------------------
def keep_coi(ctx: Context, repo: Repository, current: Version | None,
             resource: dict[str, Any]) -> None:
    """A code once carried stays; a new one must have been assigned; what is made for an
    enrolment is given its code (set on `resource` in place)."""
    resource_type = resource["resourceType"]
    new = coi_of(resource)
    old = coi_of(current.resource()) if current is not None and not current.deleted else None
    if old is not None:
        if new != old:
            raise refused(f"{resource_type} carries chain of identity "
                           f"{eye_readable(old)}; once assigned it cannot be changed or "
                           "removed", f"{resource_type}.identifier")
        return
    if new is not None:
        resource_id = current.id if current is not None else resource.get("id")
        _check_assigned(repo, resource_type, new, resource_id)
        return
    inherited = _inherited(repo, resource)
    if inherited is not None:
        resource["identifier"] = carrying(resource, inherited)["identifier"]


def _check_assigned(repo: Repository, resource_type: str, value: str,
                    resource_id: str | None) -> None:
    """A code added by a write must be well formed and assigned, and a CarePlan or
    Patient may carry only its own."""
    where = f"{resource_type}.identifier"
    try:
        isbt128.parse(value)
    except isbt128.CoiFormatError as exc:
        raise refused(str(exc), where) from exc
    row = repo.conn.execute(select(chains_of_identity)
                            .where(chains_of_identity.c.value == value)).first()
    if row is None:
        raise refused(f"chain of identity {eye_readable(value)} was never assigned to an "
                      "enrolment", where)
    owner = {"CarePlan": row.careplan_id, "Patient": row.patient_id}.get(resource_type, "")
    if owner != "" and owner != resource_id:
        raise refused(f"chain of identity {eye_readable(value)} belongs to another "
                      f"{resource_type}", where)


def _inherited(repo: Repository, resource: dict[str, Any]) -> str | None:
    """The code of the enrolment a new resource is made for, if it names one."""
    for element, target_type in _ORIGINS.get(resource["resourceType"], ()):
        value = resource.get(element)
        for reference in value if isinstance(value, list) else [value]:
            ref = reference.get("reference", "") if isinstance(reference, dict) else ""
            parts = ref.split("/")
            if len(parts) < 2 or parts[0] != target_type:
                continue
            found = repo.read(target_type, parts[1])
            code = coi_of(found.resource()) if found is not None and not found.deleted else None
            if code is not None:
                return code
    return None


def careplan_of_code(repo: Repository, value: str) -> Version | None:
    """The enrolment a code was assigned to."""
    careplan_id = repo.conn.execute(select(chains_of_identity.c.careplan_id)
                                    .where(chains_of_identity.c.value == value)).scalar()
    found = repo.read("CarePlan", careplan_id) if careplan_id else None
    return found if found is not None and not found.deleted else None
