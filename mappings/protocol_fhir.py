"""The FHIR form of a protocol: a PlanDefinition (workflow-definition) whose actions point
to one ActivityDefinition per stage, as orchestration/PROTOCOLS.md ("The FHIR form") fixes
it. https://hl7.org/fhir/R4/plandefinition.html, activitydefinition.html
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from mappings.protocol_model import (
    KINDS,
    Chain,
    ChainStep,
    Duration,
    Handoff,
    Lead,
    LeadRule,
    OnFailure,
    Protocol,
    Ref,
    Role,
    SignatureRule,
    Stage,
)

ATM = "https://atm-gateway.org/fhir"
PARTNER_ROLES = f"{ATM}/CodeSystem/partner-role"
STAGE_CODES = f"{ATM}/CodeSystem/stage"
ESCALATION_ROLE = f"{ATM}/StructureDefinition/escalation-role"
PARTNER_ROLE = f"{ATM}/StructureDefinition/partner-role"
ON_FAILURE = f"{ATM}/StructureDefinition/on-failure"
ASSIGNS = f"{ATM}/StructureDefinition/assigns"
CUSTODY_HANDOFF = f"{ATM}/StructureDefinition/custody-handoff"
BOOKS_CHAIN = f"{ATM}/StructureDefinition/books-chain"
SCHEDULING_SERVICES = f"{ATM}/CodeSystem/scheduling-service"
PLAN_TYPES = "http://terminology.hl7.org/CodeSystem/plan-definition-type"
UCUM = "http://unitsofmeasure.org"
FHIRPATH = "text/fhirpath"

Json = dict[str, Any]


def pascal_case(identifier: str) -> str:
    """A computer-friendly name: "car-t-autologous" -> "CarTAutologous"."""
    return "".join(part[:1].upper() + part[1:] for part in identifier.split("-"))


def plan_definition_url(protocol_id: str) -> str:
    return f"{ATM}/PlanDefinition/{protocol_id}"


def activity_definition_id(protocol: Protocol, stage: Stage) -> str:
    return f"{protocol.id}-{stage.id}"


def activity_definition_url(protocol: Protocol, stage: Stage) -> str:
    return f"{ATM}/ActivityDefinition/{activity_definition_id(protocol, stage)}"


def _versioned(protocol: Protocol, url: str) -> str:
    return f"{url}|{protocol.version}" if protocol.version else url


def _drop_empty(resource: Json) -> Json:
    """FHIR JSON has no null values and no empty arrays."""
    return {key: value for key, value in resource.items() if value not in (None, [], {})}


def duration(value: Duration) -> Json:
    return {"value": value.value, "unit": value.unit, "system": UCUM, "code": value.unit}


def _participant(role: Ref | None) -> list[Json]:
    if role is None:
        return []
    return [{"type": "practitioner",
             "role": {"coding": [{"system": PARTNER_ROLES, "code": role.name}]}}]


def _escalation(code: str) -> Json:
    return {"url": ESCALATION_ROLE, "valueCode": code}


def _partner_role(role: Role) -> Json:
    return {"url": PARTNER_ROLE,
            "valueCoding": {"system": PARTNER_ROLES, "code": role.code, "display": role.text}}


def _on_failure(on_failure: OnFailure) -> Json:
    return {"url": ON_FAILURE, "extension": [
        {"url": "back-to", "valueId": on_failure.back_to.name},
        {"url": "max-repeats", "valueUnsignedInt": on_failure.max_repeats},
    ]}


def _assigns(code: str) -> Json:
    return {"url": ASSIGNS, "valueCode": code}


def _signatures(meanings: tuple[str, ...]) -> list[Json]:
    return [{"url": "signature", "valueCode": meaning} for meaning in meanings]


def _place(name: str, value: str | None) -> Json:
    """A `where` entry's country or priority (valueCode) or site (valueReference)."""
    if name == "site":
        return {"url": "site", "valueReference": {"reference": value}}
    return {"url": name, "valueCode": value}


def _where(rule: SignatureRule) -> Json:
    place = (_place("country", rule.country) if rule.country is not None
             else _place("site", rule.site))
    return {"url": "where", "extension": [place, *_signatures(rule.signatures)]}


def _custody_handoff(handoff: Handoff) -> Json:
    return {"url": CUSTODY_HANDOFF, "extension": [
        {"url": "event", "valueCode": handoff.event},
        *_signatures(handoff.signatures),
        *(_where(rule) for rule in handoff.where),
    ]}


def _lead(lead: Lead) -> list[Json]:
    return [{"url": "lead-min", "valueDuration": duration(lead.min)},
            {"url": "lead-max", "valueDuration": duration(lead.max)}]


def _lead_rule(rule: LeadRule) -> Json:
    return {"url": "where", "extension": [_place(*rule.place), *_lead(rule.lead)]}


def _chain_step(step: ChainStep) -> Json:
    # The default lead is the step's relatedAction after-start (see _chain_lead); only the
    # overrides, which FHIR has no standard place for, stay in the extension.
    return {"url": "step", "extension": [
        {"url": "stage", "valueId": step.stage.name},
        {"url": "service", "valueCoding": {"system": SCHEDULING_SERVICES, "code": step.service}},
        *(_lead_rule(rule) for rule in step.where),
    ]}


def _books_chain(chain: Chain) -> Json:
    """One extension for the whole chain, its steps in chain (time) order."""
    return {"url": BOOKS_CHAIN, "extension": [_chain_step(step) for step in chain.steps]}


def plan_definition(protocol: Protocol) -> Json:
    extensions = [_partner_role(role) for role in protocol.roles]
    if protocol.escalation is not None:
        extensions.append(_escalation(protocol.escalation.name))
    return _drop_empty({
        "resourceType": "PlanDefinition",
        "id": protocol.id,
        "extension": extensions,
        "url": plan_definition_url(protocol.id),
        "version": protocol.version,
        "name": pascal_case(protocol.id),
        "title": protocol.title,
        "type": {"coding": [{"system": PLAN_TYPES, "code": "workflow-definition",
                             "display": "Workflow Definition"}]},
        "status": "active",
        "description": protocol.description,
        "action": [action(protocol, stage) for stage in protocol.stages],
    })


def action(protocol: Protocol, stage: Stage) -> Json:
    extensions = []
    if stage.escalate is not None:
        extensions.append(_escalation(stage.escalate.name))
    if stage.on_failure is not None:
        extensions.append(_on_failure(stage.on_failure))
    if stage.assigns is not None:
        extensions.append(_assigns(stage.assigns.name))
    extensions += [_custody_handoff(handoff) for handoff in stage.custody]
    if stage.books is not None:
        extensions.append(_books_chain(stage.books))
    return _drop_empty({
        "id": stage.id,
        "extension": extensions,
        "title": stage.display,
        "description": stage.description,
        "condition": _condition(stage.when),
        "relatedAction": _related_actions(protocol, stage),
        "timingDuration": duration(stage.deadline) if stage.deadline else None,
        "participant": _participant(stage.role),
        "definitionCanonical": _versioned(protocol, activity_definition_url(protocol, stage)),
        "action": [action(protocol, step) for step in stage.steps],
    })


def _condition(expression: str | None) -> list[Json]:
    if expression is None:
        return []
    return [{"kind": "applicability",
             "expression": {"language": FHIRPATH, "expression": expression}}]


def _related_actions(protocol: Protocol, stage: Stage) -> list[Json]:
    related = [_related(after.stage.name, "after-end", after.gap) for after in stage.after]
    if stage.ends_before is not None:
        related.append(_related(stage.ends_before.stage.name, "before-start",
                                stage.ends_before.by))
    lead = _chain_lead(protocol, stage)
    if lead is not None:
        related.append(_lead_related(*lead))
    return related


def _chain_lead(protocol: Protocol, stage: Stage) -> tuple[str, Lead] | None:
    """The previous chain step's stage and the lead from its start, when `stage` is a
    booked step after the first."""
    for booking in protocol.all_stages():
        steps = booking.books.steps if booking.books is not None else ()
        for previous, step in pairwise(steps):
            if step.stage.name == stage.id and step.lead is not None:
                return previous.stage.name, step.lead
    return None


def _lead_related(action_id: str, lead: Lead) -> Json:
    """A chain step's default lead, the standard way: it starts `min` to `max` after the
    previous step's start."""
    return {"actionId": action_id, "relationship": "after-start",
            "offsetRange": {"low": duration(lead.min), "high": duration(lead.max)}}


def _related(action_id: str, relationship: str, offset: Duration | None) -> Json:
    return _drop_empty({"actionId": action_id, "relationship": relationship,
                        "offsetDuration": duration(offset) if offset else None})


def activity_definition(protocol: Protocol, stage: Stage) -> Json:
    return _drop_empty({
        "resourceType": "ActivityDefinition",
        "id": activity_definition_id(protocol, stage),
        "url": activity_definition_url(protocol, stage),
        "version": protocol.version,
        "name": pascal_case(activity_definition_id(protocol, stage)),
        "title": stage.display,
        "status": "active",
        "description": stage.description,
        "kind": KINDS[stage.kind],
        "code": {"coding": [{"system": STAGE_CODES, "code": stage.id,
                             "display": stage.display}]},
        "timingDuration": duration(stage.deadline) if stage.deadline else None,
        "participant": _participant(stage.role),
    })
