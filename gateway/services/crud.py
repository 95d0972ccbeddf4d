"""Instance and type interactions: create, read, vread, update, patch, delete (+ conditional).

https://hl7.org/fhir/R4/http.html
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import jsonpatch

from gateway import jsonio
from gateway.custody import coi, excursions, handoffs
from gateway.errors import (
    ConflictError,
    GoneError,
    InvalidError,
    MultipleMatchesError,
    NotFoundError,
    PreconditionFailedError,
    UnprocessableError,
    UnsupportedMediaTypeError,
)
from gateway.scheduling import directory, replan, slots
from gateway.services import access, subscriptions, task_states, visibility
from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.services.resources import (
    body_json,
    check_id,
    check_known_id,
    valid_resource,
)
from gateway.services.responses import outcome_bytes, version_headers, written
from gateway.services.search import match_ids
from gateway.store.repository import UPDATE_RETRIES, Guard, Repository, Version
from gateway.store.timeparse import parse_http_date

JSON_PATCH = "application/json-patch+json"

# Rules every update of a type must pass against the version it replaces (PUT,
# conditional update, PATCH, and the same in Bundles); creates pass none.
UPDATE_RULES: dict[str, Guard] = {"Task": task_states.check_update}
# Rules every write of a type passes, creates included (current: None), inside the
# write's transaction; they may refuse it or set what the server decides.
WriteRule = Callable[[Context, Repository, Version | None, dict[str, Any]], None]
WRITE_RULES: dict[str, WriteRule] = {"Subscription": subscriptions.prepare_subscription,
                                     "SubscriptionTopic": subscriptions.prepare_topic,
                                     "Provenance": handoffs.check_handoff,
                                     "Slot": slots.prepare_slot,
                                     "HealthcareService": directory.check_quotas,
                                     **dict.fromkeys(coi.CARRIERS, coi.keep_coi)}
# What follows a write of a type, in its transaction (alerts it raises, the rows that
# mirror it for scheduling).
AFTER_WRITES: dict[str, Callable[[Context, Repository, Version], None]] = {
    "Observation": excursions.check_excursion,
    "Slot": slots.project_slot,
    "Schedule": slots.project_schedule,
    "Appointment": slots.reconcile_appointment,
    "Task": replan.on_task_write,
    "BiologicallyDerivedProduct": replan.on_product_write}
# What must happen before a resource of a type is deleted, in the delete's transaction.
BEFORE_DELETES: dict[str, Callable[[Context, Repository, str], None]] = {
    "Slot": slots.before_slot_delete,
    "Appointment": slots.before_appointment_delete}



def _prepare_new(ctx: Context, repo: Repository, resource: dict[str, Any],
                 resource_id: str | None = None) -> None:
    """The write rules of a resource this write creates: a POST, or a PUT to an id that
    is not there (an update meets its rules in its guard, against what it replaces)."""
    rule = WRITE_RULES.get(resource["resourceType"])
    if rule is None:
        return
    if resource_id is not None:
        current = repo.read(resource["resourceType"], resource_id)
        if current is not None and not current.deleted:
            return
    rule(ctx, repo, None, resource)


def _guard(ctx: Context, repo: Repository, resource_type: str) -> Guard | None:
    """What an update must pass against the version it replaces: the type's rules, and
    for a partner, that it may see that version at all (else it does not exist: 404)."""
    rule, write_rule = UPDATE_RULES.get(resource_type), WRITE_RULES.get(resource_type)
    partner = visibility.criteria(ctx, resource_type) is not None
    if not partner and write_rule is None:
        return rule

    def guard(current: Version, resource: dict[str, Any]) -> None:
        if partner and not current.deleted:
            visibility.check_visible(ctx, repo, resource_type, current.id)
        if rule is not None:
            rule(current, resource)
        if write_rule is not None:
            write_rule(ctx, repo, current, resource)
    return guard


def _visible_after(ctx: Context, repo: Repository, version: Version,
                   created: bool = False) -> Version:
    """A partner's write must leave something it can see, and one that created needs the
    right to create (checked in the write's transaction, so a refusal undoes it)."""
    if created:
        access.check_may_create(ctx.grant, version.resource_type)
    if visibility.criteria(ctx, version.resource_type) is not None:
        visibility.check_still_visible(ctx, repo, version.resource_type, version.id)
    if (after := AFTER_WRITES.get(version.resource_type)) is not None:
        after(ctx, repo, version)
    return version


def _must_see(ctx: Context, version: Version | None, what: str) -> None:
    if version is not None and visibility.criteria(ctx, version.resource_type) is not None:
        with ctx.reading() as repo:
            visibility.check_visible(ctx, repo, version.resource_type, version.id, what)


def parse_etag(value: str | None) -> int | None:
    """If-Match takes W/"3", "3" or a bare 3."""
    if value is None:
        return None
    text = value.strip()
    text = text[2:] if text.startswith(("W/", "w/")) else text
    text = text.strip('"')
    if not (text.isascii() and text.isdigit()):
        raise InvalidError(f"Malformed ETag '{value}': expected W/\"<version>\"")
    return int(text)


# Parameters that shape a result page but select nothing: criteria made only of these
# would match every resource of the type (and conditional delete would delete one).
RESULT_PARAMS = frozenset({"_count", "_sort", "_summary", "_elements", "_include",
                           "_revinclude", "_total", "_contained", "_containedType",
                           "_format", "_pretty"})


def _criteria(request: FhirRequest, resource_type: str,
              raw: str | None = None) -> list[tuple[str, str]]:
    """The search criteria of a conditional interaction: the URL's query, or a header's
    value (If-None-Exist), which may also be written as `Type?criteria`."""
    if raw is not None:
        raw = raw.strip().removeprefix(f"{resource_type}?")
    pairs = parse_qsl(raw, keep_blank_values=True) if raw is not None else request.query
    pairs = [(k, v) for k, v in pairs if k not in RESULT_PARAMS]
    for key, value in pairs:
        jsonio.check_text(key + value)
    if not pairs:
        raise InvalidError("A conditional interaction needs search criteria that select "
                           f"{resource_type} resources, e.g. identifier=system|value")
    return pairs


def _canonical_criteria(pairs: list[tuple[str, str]]) -> str:
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


# -- create ------------------------------------------------------------------------
def create(ctx: Context, request: FhirRequest, resource_type: str) -> FhirResponse:
    resource = valid_resource(body_json(request), resource_type)
    if_none_exist = request.header("if-none-exist")
    with ctx.writing() as repo:
        _prepare_new(ctx, repo, resource)
        if if_none_exist is None:
            version = _visible_after(ctx, repo, repo.create(resource, request.assigned_id))
            return written(ctx, request, version, 201, f"Created {version.reference}")
        criteria = _criteria(request, resource_type, if_none_exist)
        return _conditional_create(ctx, request, repo, resource, criteria)


def _conditional_create(ctx: Context, request: FhirRequest, repo: Repository,
                        resource: dict[str, Any], criteria: list[tuple[str, str]]) -> FhirResponse:
    """If-None-Exist: one match → 200 with it; none → create; several → 412."""
    resource_type = resource["resourceType"]
    key = _canonical_criteria(criteria)
    repo.lock_criteria(resource_type, key)
    ids = match_ids(ctx, repo, resource_type, criteria, limit=2)
    if len(ids) > 1:
        raise MultipleMatchesError(f"If-None-Exist matched several {resource_type} resources")
    if ids:
        return _existing(ctx, request, repo, resource_type, ids[0])
    version = _visible_after(ctx, repo, repo.create(resource, request.assigned_id))
    repo.answer_criteria(resource_type, key, version.id)
    return written(ctx, request, version, 201, f"Created {version.reference}")


def _existing(ctx: Context, request: FhirRequest, repo: Repository, resource_type: str,
              resource_id: str) -> FhirResponse:
    version = repo.read(resource_type, resource_id)
    assert version is not None
    return written(ctx, request, version, 200, f"{version.reference} already exists")


# -- read ---------------------------------------------------------------------------
def read(ctx: Context, request: FhirRequest, resource_type: str, resource_id: str) -> FhirResponse:
    check_known_id(resource_type, resource_id)
    version = ctx.point_read(resource_type, resource_id)
    _must_see(ctx, version, f"{resource_type}/{resource_id}")
    return _serve(ctx, request, version, f"{resource_type}/{resource_id}")


def vread(ctx: Context, request: FhirRequest, resource_type: str, resource_id: str,
          version_id: str) -> FhirResponse:
    check_known_id(resource_type, resource_id)
    if not (version_id.isascii() and version_id.isdigit()) or len(version_id) > 9:
        raise NotFoundError(f"{resource_type}/{resource_id} has no version "
                            f"{ascii(version_id[:20])}")
    version = ctx.point_read(resource_type, resource_id, int(version_id))
    _must_see(ctx, version, f"{resource_type}/{resource_id}/_history/{version_id}")
    return _serve(ctx, request, version, f"{resource_type}/{resource_id}/_history/{version_id}")


def _serve(ctx: Context, request: FhirRequest, version: Version | None,
           what: str) -> FhirResponse:
    if version is None:
        raise NotFoundError(f"{what} is not known")
    headers = version_headers(ctx, version)
    if version.deleted:
        raise GoneError(f"{what} was deleted", headers=headers)
    if_none_match = request.header("if-none-match")
    if if_none_match and _etag_listed(if_none_match, version.version):
        return FhirResponse(304, None, headers)
    modified_since = request.header("if-modified-since")
    since = parse_http_date(modified_since) if modified_since else None
    if since is not None and version.last_updated // 1_000_000 <= since // 1_000_000:
        return FhirResponse(304, None, headers)
    return FhirResponse(200, version.content, headers)


def _etag_listed(header: str, version: int) -> bool:
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or any(_safe_etag(t) == version for t in tags)


def _safe_etag(tag: str) -> int | None:
    try:
        return parse_etag(tag)
    except InvalidError:
        return None


# -- update ---------------------------------------------------------------------------
def update(ctx: Context, request: FhirRequest, resource_type: str,
           resource_id: str) -> FhirResponse:
    check_id(resource_id)
    resource = valid_resource(body_json(request), resource_type, resource_id)
    expected = parse_etag(request.header("if-match"))
    with ctx.writing() as repo:
        _prepare_new(ctx, repo, resource, resource_id)
        version, created = repo.update(resource, resource_id, expected_version=expected,
                                       guard=_guard(ctx, repo, resource_type))
        _visible_after(ctx, repo, version, created)
    return written(ctx, request, version, 201 if created else 200,
                   f"{'Created' if created else 'Updated'} {version.reference}")


def conditional_update(ctx: Context, request: FhirRequest, resource_type: str) -> FhirResponse:
    data = body_json(request)
    criteria = _criteria(request, resource_type)
    expected = parse_etag(request.header("if-match"))
    with ctx.writing() as repo:
        repo.lock_criteria(resource_type, _canonical_criteria(criteria))
        ids = match_ids(ctx, repo, resource_type, criteria, limit=2)
        if len(ids) > 1:
            raise MultipleMatchesError(f"The criteria matched several {resource_type} resources")
        if not ids:
            body_id = data.get("id") if isinstance(data, dict) else None
            resource = valid_resource(data, resource_type, body_id)
            _prepare_new(ctx, repo, resource, body_id)
            if body_id is None:
                version, created = repo.create(resource, request.assigned_id), True
            else:
                check_id(body_id)
                version, created = repo.update(resource, body_id, expected_version=expected,
                                               guard=_guard(ctx, repo, resource_type))
            _visible_after(ctx, repo, version, created)
            return written(ctx, request, version, 201 if created else 200,
                           f"{'Created' if created else 'Updated'} {version.reference}")
        if isinstance(data, dict) and "id" not in data:
            data = {**data, "id": ids[0]}
        resource = valid_resource(data, resource_type, ids[0])
        version, _ = repo.update(resource, ids[0], expected_version=expected,
                                 guard=_guard(ctx, repo, resource_type))
        _visible_after(ctx, repo, version)
    return written(ctx, request, version, 200, f"Updated {version.reference}")


# -- patch ------------------------------------------------------------------------------
def patch(ctx: Context, request: FhirRequest, resource_type: str,
          resource_id: str | None) -> FhirResponse:
    operations = _patch_operations(request)
    expected = parse_etag(request.header("if-match"))
    with ctx.writing() as repo:
        if resource_id is None:
            resource_id = _single_match(ctx, request, repo, resource_type)
        check_known_id(resource_type, resource_id)
        for _ in range(UPDATE_RETRIES):
            current = _patchable(repo, resource_type, resource_id, expected)
            if visibility.criteria(ctx, resource_type) is not None:
                # Before the patch is applied: its errors must not tell what is there.
                visibility.check_visible(ctx, repo, resource_type, resource_id)
            resource = valid_resource(_apply_patch(current.resource(), operations),
                                      resource_type, resource_id)
            try:
                version, _ = repo.update(resource, resource_id,
                                         expected_version=current.version, method="PATCH",
                                         guard=_guard(ctx, repo, resource_type))
                _visible_after(ctx, repo, version)
                break
            except PreconditionFailedError:
                if expected is not None:
                    raise
                # Without If-Match the client asked for its patch on the latest version:
                # another writer got in between, so patch what it wrote.
        else:
            raise ConflictError(f"{resource_type}/{resource_id} is being changed by many "
                                "clients")
    return written(ctx, request, version, 200, f"Patched {version.reference}")


def _single_match(ctx: Context, request: FhirRequest, repo: Repository,
                  resource_type: str) -> str:
    """Conditional patch: the one resource the criteria match (R4: none → 404)."""
    ids = match_ids(ctx, repo, resource_type, _criteria(request, resource_type), limit=2)
    if len(ids) > 1:
        raise MultipleMatchesError(f"The criteria matched several {resource_type} resources")
    if not ids:
        raise NotFoundError(f"No {resource_type} matches the criteria")
    return ids[0]


def _patchable(repo: Repository, resource_type: str, resource_id: str,
               expected: int | None) -> Version:
    current = repo.read(resource_type, resource_id)
    if current is None:
        raise NotFoundError(f"{resource_type}/{resource_id} is not known")
    if current.deleted:
        raise GoneError(f"{resource_type}/{resource_id} was deleted")
    if expected is not None and expected != current.version:
        raise PreconditionFailedError(
            f"Version {expected} is not the current version of {current.reference} "
            f"(it is {current.version})")
    return current


def _patch_operations(request: FhirRequest) -> list[Any]:
    media = (request.content_type or "").split(";")[0].strip().lower()
    if request.resource is not None:
        ops = request.resource
        if isinstance(ops, dict) and ops.get("resourceType") == "Binary":
            ops = jsonio.loads(_binary_data(ops))
    elif media != JSON_PATCH:
        raise UnsupportedMediaTypeError(f"PATCH needs Content-Type {JSON_PATCH}, not "
                                        f"{media or 'none'}")
    elif not request.body:
        raise InvalidError("The request has no body: send a JSON Patch array")
    else:
        ops = jsonio.loads(request.body)
    if not isinstance(ops, list) or not all(isinstance(op, dict) for op in ops):
        raise InvalidError("A JSON Patch is a JSON array of operations")
    return ops


def _binary_data(binary: dict[str, Any]) -> bytes:
    """A transaction's PATCH entry carries its JSON Patch as a Binary (R4 http.html#patch)."""
    try:
        return base64.b64decode(binary.get("data") or "", validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise InvalidError("Binary.data of a PATCH entry is not base64") from exc


def _apply_patch(resource: dict[str, Any], operations: list[Any]) -> dict[str, Any]:
    try:
        result = jsonpatch.JsonPatch(operations).apply(resource)
    except jsonpatch.JsonPatchTestFailed as exc:
        # 422, not 412: 412 answers If-Match alone, so a client can tell a stale version
        # (re-read and retry) from content its patch did not expect.
        raise UnprocessableError(f"JSON Patch test failed: {exc}") from exc
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError,
            KeyError, IndexError, ValueError, AttributeError) as exc:
        raise InvalidError(f"JSON Patch cannot be applied: {exc}") from exc
    if not isinstance(result, dict):
        raise InvalidError("JSON Patch must leave a resource")
    return result


# -- delete -----------------------------------------------------------------------------
def delete(ctx: Context, request: FhirRequest, resource_type: str,
           resource_id: str) -> FhirResponse:
    check_known_id(resource_type, resource_id)
    expected = parse_etag(request.header("if-match"))
    with ctx.writing() as repo:
        if visibility.criteria(ctx, resource_type) is not None:
            current = repo.read(resource_type, resource_id)
            if current is not None and not current.deleted:
                visibility.check_visible(ctx, repo, resource_type, resource_id)
        if (before := BEFORE_DELETES.get(resource_type)) is not None:
            before(ctx, repo, resource_id)
        version = repo.delete(resource_type, resource_id, expected_version=expected)
    if version is None:
        return FhirResponse(200, outcome_bytes(f"{resource_type}/{resource_id} was not there"))
    return FhirResponse(200, outcome_bytes(f"Deleted {version.reference}"),
                        {"ETag": version.etag})


def conditional_delete(ctx: Context, request: FhirRequest, resource_type: str) -> FhirResponse:
    with ctx.writing() as repo:
        ids = match_ids(ctx, repo, resource_type, _criteria(request, resource_type), limit=2)
        if len(ids) > 1:
            raise MultipleMatchesError(
                f"The criteria matched several {resource_type} resources; delete one at a time")
        if not ids:
            return FhirResponse(200, outcome_bytes(f"No {resource_type} matched: nothing deleted"))
        if (before := BEFORE_DELETES.get(resource_type)) is not None:
            before(ctx, repo, ids[0])
        version = repo.delete(resource_type, ids[0])
    assert version is not None
    return FhirResponse(200, outcome_bytes(f"Deleted {version.reference}"), {"ETag": version.etag})
