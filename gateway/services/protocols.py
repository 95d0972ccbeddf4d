"""Stored protocols (PlanDefinition + ActivityDefinitions) as the orchestration engine
reads them, and `PlanDefinition/{id}/$apply`: the CarePlan an enrolment would start.

https://hl7.org/fhir/R4/plandefinition-operation-apply.html
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway import jsonio
from gateway.errors import FhirError, InvalidError, Issue, NotFoundError, UnprocessableError
from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.services.resources import body_json
from gateway.services.search import match_ids
from gateway.store.repository import Repository
from orchestration.effects import StartStage
from orchestration.engine import decide
from orchestration.protocol import (
    Protocol,
    ProtocolFormError,
    definitions,
    from_plan_definition,
)
from orchestration.state import plan_state
from orchestration.writes import instant


def _by_canonical(ctx: Context, repo: Repository, resource_type: str,
                  canonical: str) -> str | None:
    url, _, version = canonical.partition("|")
    ids = match_ids(ctx, repo, resource_type,
                    [("url", url), *([("version", version)] if version else [])], limit=1)
    return ids[0] if ids else None


def protocol_from_store(ctx: Context, repo: Repository, plan: dict[str, Any]) -> Protocol:
    """The protocol of a stored PlanDefinition, with its ActivityDefinitions' kinds."""
    activities = []
    for canonical in definitions(plan.get("action", [])):
        found_id = _by_canonical(ctx, repo, "ActivityDefinition", canonical)
        found = repo.read("ActivityDefinition", found_id) if found_id else None
        if found is not None and not found.deleted:
            activities.append(found.resource())
    return from_plan_definition(plan, activities)


def plan_definition_id(ctx: Context, repo: Repository,
                       resource: dict[str, Any]) -> str | None:
    """The stored PlanDefinition a CarePlan or ServiceRequest instantiates, if any."""
    for canonical in resource.get("instantiatesCanonical", []):
        found = _by_canonical(ctx, repo, "PlanDefinition", canonical)
        if found:
            return found
    return None


# -- $apply ----------------------------------------------------------------------------
def op_apply(ctx: Context, request: FhirRequest, plan_id: str) -> FhirResponse:
    """The CarePlan enrolling `subject` would create, not stored: every stage as a
    not-started activity, the ones due at once with the window they would get."""
    subject, author = _apply_parameters(request)
    with ctx.reading() as repo:
        stored = repo.read("PlanDefinition", plan_id)
        if stored is None or stored.deleted:
            raise NotFoundError(f"PlanDefinition/{plan_id} is not known")
        plan = stored.resource()
        try:
            protocol = protocol_from_store(ctx, repo, plan)
        except ProtocolFormError as exc:
            raise _located(UnprocessableError, f"PlanDefinition/{plan_id} cannot be "
                           f"applied: {exc}", "PlanDefinition") from exc
    # Decided as if active (the engine leaves other plans alone), answered as a draft.
    careplan: dict[str, Any] = {
        "resourceType": "CarePlan", "id": "proposed", "status": "active", "intent": "plan",
        "instantiatesCanonical": [protocol.canonical], "title": protocol.title,
        "subject": {"reference": subject}}
    if author:
        careplan["author"] = {"reference": author}
    now = datetime.now(UTC)
    due = {e.stage: e for e in decide(protocol, plan_state(careplan, []), now)
           if isinstance(e, StartStage)}
    careplan["activity"] = [{"detail": _activity(protocol, stage_id, due.get(stage_id))}
                            for stage_id in protocol.stages]
    careplan["status"] = "draft"
    del careplan["id"]
    return FhirResponse(200, jsonio.dumps(careplan))


def _activity(protocol: Protocol, stage_id: str, due: StartStage | None) -> dict[str, Any]:
    stage = protocol.stages[stage_id]
    detail: dict[str, Any] = {"kind": stage.kind, "status": "not-started",
                              "code": {"text": stage.title}, "description": stage.title}
    if stage.definition:
        detail["instantiatesCanonical"] = [stage.definition]
    if due is not None:
        detail["scheduledPeriod"] = {"start": instant(due.start),
                                     **({"end": instant(due.end)} if due.end else {})}
    return detail


def _apply_parameters(request: FhirRequest) -> tuple[str, str | None]:
    """`subject` (required) and `organization`/`practitioner` (the author), from the query
    (GET) or a Parameters body (POST)."""
    values: dict[str, str] = {}
    if request.method == "POST" and request.body:
        data = body_json(request)
        if not isinstance(data, dict) or data.get("resourceType") != "Parameters":
            raise _located(InvalidError, "$apply takes a Parameters resource", "Parameters")
        for parameter in data.get("parameter", []):
            value = (parameter.get("valueString") or parameter.get("valueReference", {})
                     .get("reference"))
            if parameter.get("name") and isinstance(value, str):
                values[parameter["name"]] = value
    else:
        values.update(request.query)
    subject = values.get("subject")
    if not subject or "/" not in subject:
        raise _located(InvalidError, "$apply needs a subject parameter, e.g. "
                       "subject=Patient/123", "subject")
    return subject, values.get("organization") or values.get("practitioner")


def _located(kind: type[FhirError], message: str, expression: str) -> FhirError:
    return kind(message, issues=[Issue(kind.code, message, expression=(expression,))])


# -- the shipped protocols -------------------------------------------------------------
SHIPPED = Path(__file__).resolve().parents[2] / "orchestration" / "protocols"


def load_shipped(ctx: Context, directory: Path = SHIPPED) -> list[str]:
    """Store the protocols shipped as YAML (each as one transaction) unless the stored
    PlanDefinition is already the same; the ids of those written."""
    from gateway.services.router import handle
    from mappings.protocols import compile_protocol

    written = []
    for path in sorted(directory.glob("*.yaml")):
        compiled = compile_protocol(path.read_text(encoding="utf-8"), str(path))
        current = ctx.point_read("PlanDefinition", compiled.id)
        if current is not None and not current.deleted and _same(current.resource(),
                                                                 compiled.plan_definition):
            continue
        handle(ctx, FhirRequest("POST", "", resource=compiled.bundle()))
        written.append(compiled.id)
    return written


def _same(stored: dict[str, Any], new: dict[str, Any]) -> bool:
    return {k: v for k, v in stored.items() if k != "meta"} == new
