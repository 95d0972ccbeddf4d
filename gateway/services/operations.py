"""Operations ($name): `$validate` at type and instance level, `PlanDefinition/{id}/$apply`,
and the Subscription operations of gateway/services/subscriptions.py.

https://hl7.org/fhir/R4/resource-operation-validate.html
"""

from __future__ import annotations

from typing import Any

from gateway import fhir, jsonio
from gateway.custody import report
from gateway.errors import InvalidError, Issue, NotFoundError, operation_outcome
from gateway.scheduling import operations as scheduling
from gateway.scheduling import replan
from gateway.services import subscriptions
from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.services.resources import body_json

VALIDATE_MODES = {"create", "update", "delete"}
SUBSCRIPTION_OPERATIONS = {"status": subscriptions.op_status,
                           "events": subscriptions.op_events,
                           "get-ws-binding-token": subscriptions.op_ws_token}
CHAIN_OPERATIONS = {"find-chain": scheduling.op_find_chain,
                    "hold-chain": scheduling.op_hold_chain,
                    "book-chain": scheduling.op_book_chain,
                    "cancel-chain": replan.op_cancel_chain}


def _unknown(name: str) -> NotFoundError:
    return NotFoundError(f"Operation ${name} is not supported here")


def system_operation(ctx: Context, request: FhirRequest, name: str) -> FhirResponse:
    raise _unknown(name)


def type_operation(ctx: Context, request: FhirRequest, resource_type: str,
                   name: str) -> FhirResponse:
    if name == "validate":
        return validate(ctx, request, resource_type, None)
    if name == "status" and resource_type == "Subscription":
        return subscriptions.op_status(ctx, request, None)
    if name == "find-chain" and resource_type == "CarePlan":
        return scheduling.op_find_chain(ctx, request, None)
    if name == "ehr-intake" and resource_type == "Patient":
        from gateway.adapters.ehr.intake import op_ehr_intake  # an adapter, at the edge

        return op_ehr_intake(ctx, request)
    raise _unknown(name)


def instance_operation(ctx: Context, request: FhirRequest, resource_type: str,
                       resource_id: str, name: str) -> FhirResponse:
    if name == "validate":
        return validate(ctx, request, resource_type, resource_id)
    if name == "apply" and resource_type == "PlanDefinition":
        from gateway.services.protocols import op_apply  # the orchestration engine's view

        return op_apply(ctx, request, resource_id)
    if resource_type == "Subscription" and name in SUBSCRIPTION_OPERATIONS:
        return SUBSCRIPTION_OPERATIONS[name](ctx, request, resource_id)
    if name == "custody-report" and resource_type in report.REPORTED:
        return report.op_custody_report(ctx, request, resource_type, resource_id)
    if name == "verify-signatures" and resource_type == "Provenance":
        return report.op_verify_signatures(ctx, request, resource_id)
    if resource_type == "CarePlan" and name in CHAIN_OPERATIONS:
        return CHAIN_OPERATIONS[name](ctx, request, resource_id)
    if name == "reschedule" and resource_type == "Appointment":
        return replan.op_reschedule(ctx, request, resource_id)
    raise _unknown(name)


def _validate_input(data: Any) -> tuple[Any, str | None]:
    """The resource to check: the body itself, or a Parameters with resource and mode."""
    if isinstance(data, dict) and data.get("resourceType") == "Parameters":
        params = {p.get("name"): p for p in data.get("parameter", []) if isinstance(p, dict)}
        mode = params.get("mode", {}).get("valueCode")
        if mode is not None and mode not in VALIDATE_MODES:
            raise InvalidError(f"mode must be one of {', '.join(sorted(VALIDATE_MODES))}")
        if "resource" not in params:
            raise InvalidError("Parameters for $validate need a 'resource' parameter")
        return params["resource"].get("resource"), mode
    return data, None


def validate(ctx: Context, request: FhirRequest, resource_type: str,
             resource_id: str | None) -> FhirResponse:
    """Always 200 with an OperationOutcome: the outcome, not the status, carries the verdict."""
    if request.method != "POST":
        raise InvalidError("$validate is invoked with POST")
    resource, mode = _validate_input(body_json(request))
    issues: list[Issue] = []
    if not isinstance(resource, dict) or resource.get("resourceType") != resource_type:
        issues.append(Issue("invalid", f"Expected a {resource_type} resource",
                            expression=("resourceType",)))
    else:
        issues.extend(fhir.validate(resource))
        if mode == "update" and resource.get("id") != resource_id:
            issues.append(Issue("invalid", "For mode=update the id must match the URL",
                                expression=(f"{resource_type}.id",)))
    if not issues:
        issues.append(Issue("informational", "Validation successful", severity="information"))
    return FhirResponse(200, jsonio.dumps(operation_outcome(issues)))
