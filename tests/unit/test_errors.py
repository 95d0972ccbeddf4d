"""The FHIR error family: every error has an HTTP status, an OperationOutcome issue code
from the R4 IssueType value set, and renders as a valid OperationOutcome."""

from __future__ import annotations

import inspect

import pytest

from gateway import errors, fhir
from gateway.errors import (
    ALL_ERRORS,
    FhirError,
    InvalidError,
    Issue,
    operation_outcome,
)

ISSUE_TYPES = fhir.definitions()["requiredCodes"]["OperationOutcome.issue.code"]
SEVERITIES = fhir.definitions()["requiredCodes"]["OperationOutcome.issue.severity"]
EXPECTED = {
    "InvalidError": (400, "invalid"), "StructureError": (400, "structure"),
    "NotSupportedError": (400, "not-supported"), "UnauthorizedError": (401, "login"),
    "ForbiddenError": (403, "forbidden"), "NotFoundError": (404, "not-found"),
    "MethodNotAllowedError": (405, "not-supported"),
    "NotAcceptableError": (406, "not-supported"), "ConflictError": (409, "conflict"),
    "GoneError": (410, "deleted"), "PreconditionFailedError": (412, "conflict"),
    "TooLargeError": (413, "too-costly"), "UnsupportedMediaTypeError": (415, "not-supported"),
    "BusinessRuleError": (422, "business-rule"), "UnprocessableError": (422, "processing"),
    "MultipleMatchesError": (412, "multiple-matches"), "TooCostlyError": (400, "too-costly"),
    "ThrottledError": (429, "throttled"),
    "UnexpectedError": (500, "exception"),
    "BadGatewayError": (502, "exception"),
    "UnavailableError": (503, "transient"),
}


def test_all_errors_lists_every_error_class_in_the_module() -> None:
    defined = {obj for _, obj in inspect.getmembers(errors, inspect.isclass)
               if issubclass(obj, FhirError) and obj is not FhirError}

    assert defined == set(ALL_ERRORS)
    assert len(ALL_ERRORS) == len(set(ALL_ERRORS))


@pytest.mark.parametrize("error_class", ALL_ERRORS, ids=lambda c: c.__name__)
def test_each_error_has_an_http_error_status_and_an_issue_type(
        error_class: type[FhirError]) -> None:
    assert 400 <= error_class.status <= 599
    assert error_class.code in ISSUE_TYPES
    assert (error_class.status, error_class.code) == EXPECTED[error_class.__name__]


@pytest.mark.parametrize("error_class", ALL_ERRORS, ids=lambda c: c.__name__)
def test_each_error_renders_a_valid_operation_outcome(error_class: type[FhirError]) -> None:
    error = error_class("Something specific went wrong")

    outcome = error.outcome()

    assert fhir.validate(outcome) == []
    assert outcome == {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": error_class.code,
         "diagnostics": "Something specific went wrong"}]}
    assert str(error) == "Something specific went wrong"
    assert error.headers == {}


def test_error_with_several_issues_keeps_each_with_its_expression() -> None:
    issues = [Issue("required", "status is required", expression=("Task.status",)),
              Issue("code-invalid", "bad intent", expression=("Task.intent",))]

    outcome = InvalidError("Invalid Task", issues=issues).outcome()

    assert fhir.validate(outcome) == []
    assert outcome["issue"] == [
        {"severity": "error", "code": "required", "diagnostics": "status is required",
         "expression": ["Task.status"]},
        {"severity": "error", "code": "code-invalid", "diagnostics": "bad intent",
         "expression": ["Task.intent"]}]


def test_error_carries_response_headers() -> None:
    error = errors.MethodNotAllowedError("no", headers={"Allow": "GET"})

    assert error.headers == {"Allow": "GET"}


@pytest.mark.parametrize("severity", ["fatal", "error", "warning", "information"])
def test_issue_severities_are_from_the_value_set(severity: str) -> None:
    assert severity in SEVERITIES
    outcome = operation_outcome([Issue("informational", "note", severity=severity)])

    assert fhir.validate(outcome) == []
    assert outcome["issue"][0]["severity"] == severity
