"""The FHIR error family: each error knows its HTTP status and OperationOutcome issue code.

See https://hl7.org/fhir/R4/operationoutcome.html and the "Using HTTP" part of
https://hl7.org/fhir/R4/http.html for which status goes with which failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome.issue."""

    code: str
    diagnostics: str
    severity: str = "error"
    expression: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            out["expression"] = list(self.expression)
        return out


def operation_outcome(issues: list[Issue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in issues]}


class FhirError(Exception):
    """Base of every error a client may see; subclasses fix the status and issue code."""

    status = 500
    code = "exception"

    def __init__(self, diagnostics: str, *, issues: list[Issue] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        self.issues = issues or [Issue(self.code, diagnostics)]
        self.headers = headers or {}

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)


class InvalidError(FhirError):
    status, code = 400, "invalid"


class StructureError(InvalidError):
    code = "structure"


class NotSupportedError(FhirError):
    status, code = 400, "not-supported"


class UnauthorizedError(FhirError):
    status, code = 401, "login"


class ForbiddenError(FhirError):
    status, code = 403, "forbidden"


class NotFoundError(FhirError):
    status, code = 404, "not-found"


class MethodNotAllowedError(FhirError):
    status, code = 405, "not-supported"


class NotAcceptableError(FhirError):
    status, code = 406, "not-supported"


class ConflictError(FhirError):
    status, code = 409, "conflict"


class GoneError(FhirError):
    status, code = 410, "deleted"


class PreconditionFailedError(FhirError):
    status, code = 412, "conflict"


class TooLargeError(FhirError):
    status, code = 413, "too-costly"


class UnsupportedMediaTypeError(FhirError):
    status, code = 415, "not-supported"


class BusinessRuleError(FhirError):
    status, code = 422, "business-rule"


class UnprocessableError(FhirError):
    """A well-formed request the server cannot carry out on the resource as it now is,
    e.g. a JSON Patch whose `test` fails (RFC 5789 section 2.2)."""

    status, code = 422, "processing"


class MultipleMatchesError(PreconditionFailedError):
    code = "multiple-matches"


class ThrottledError(FhirError):
    """A client over its request rate (with Retry-After)."""

    status, code = 429, "throttled"


class TooCostlyError(FhirError):
    status, code = 400, "too-costly"


class BadGatewayError(FhirError):
    """A system the request depends on (an EHR) answered, and refused or failed."""

    status, code = 502, "exception"


class UnavailableError(FhirError):
    """A system the request depends on (an EHR) cannot be reached now (with Retry-After)."""

    status, code = 503, "transient"


class UnexpectedError(FhirError):
    """An unknown failure: the client sees only a correlation id, never the cause."""

    status, code = 500, "exception"


ALL_ERRORS: tuple[type[FhirError], ...] = (
    InvalidError, StructureError, NotSupportedError, UnauthorizedError, ForbiddenError,
    NotFoundError, MethodNotAllowedError, NotAcceptableError, ConflictError, GoneError,
    PreconditionFailedError, TooLargeError, UnsupportedMediaTypeError, BusinessRuleError,
    UnprocessableError, MultipleMatchesError, ThrottledError, TooCostlyError,
    BadGatewayError, UnavailableError, UnexpectedError,
)
