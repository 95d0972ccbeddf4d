"""The Task state machine: which changes of Task.status an update may make.

https://hl7.org/fhir/R4/task.html#statemachine and the codes of
https://hl7.org/fhir/R4/valueset-task-status.html.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import BusinessRuleError, Issue
from gateway.store.repository import Version

# The codes in the value set's order, which is also the order diagnostics list them in.
STATUSES = ("draft", "requested", "received", "accepted", "rejected", "ready", "cancelled",
            "in-progress", "on-hold", "failed", "completed", "entered-in-error")

_FINAL = frozenset({"entered-in-error"})

# The spec's "typical" machine. Every live status may still be cancelled (task.html: "a
# task in any non-terminal state may also be Cancelled") and every status but
# entered-in-error may be marked entered-in-error (the record should never have existed).
# Two edges the spec's text names are kept on purpose:
# - draft -> ready: "once they have been assigned to an owner they transition to the
#   Ready state" (ready stands in for requested/received/accepted when assignment and
#   acceptance are a given);
# - in-progress -> ready: "an In-progress task can also be stopped, returning it to a
#   Ready state" (reassignment, or a retry after a temporary failure).
# ready -> completed is allowed because systems often complete a ready Task directly.
# on-hold is only entered from ready or in-progress: the code means "started but work
# has been paused", so a draft is not suspended. Terminal statuses only go to
# entered-in-error; the spec lets some workflows reopen them, this server does not.
ALLOWED: dict[str, frozenset[str]] = {
    "draft": frozenset({"requested", "ready", "cancelled", "entered-in-error"}),
    "requested": frozenset({"received", "accepted", "rejected", "ready", "in-progress",
                            "cancelled", "entered-in-error"}),
    "received": frozenset({"accepted", "rejected", "ready", "in-progress", "cancelled",
                           "entered-in-error"}),
    "accepted": frozenset({"ready", "in-progress", "cancelled", "entered-in-error"}),
    "ready": frozenset({"in-progress", "on-hold", "cancelled", "failed", "completed",
                        "entered-in-error"}),
    "in-progress": frozenset({"ready", "on-hold", "completed", "failed", "cancelled",
                              "entered-in-error"}),
    "on-hold": frozenset({"in-progress", "ready", "cancelled", "failed",
                          "entered-in-error"}),
    "completed": _FINAL,
    "failed": _FINAL,
    "cancelled": _FINAL,
    "rejected": _FINAL,
    "entered-in-error": frozenset(),
}


def can_change(old: str, new: str) -> bool:
    """Keeping a status is always allowed; a status outside the value set is not ruled on
    here (resource validation refuses those)."""
    return old == new or old not in ALLOWED or new in ALLOWED[old]


def refusal(reference: str, old: str, new: str) -> BusinessRuleError:
    """The 422 for a change the machine does not allow, naming the ones it does."""
    targets = [s for s in STATUSES if s in ALLOWED.get(old, ())]
    then = (f"it can only change to {', '.join(targets)}" if targets
            else "it cannot change any more")
    message = f"{reference}: status cannot change from {old} to {new}; from {old} {then}"
    return BusinessRuleError(message, issues=[
        Issue("business-rule", message, expression=("Task.status",))])


def check_update(current: Version, resource: dict[str, Any]) -> None:
    """Refuse a Task update whose status change the machine does not allow. A deleted
    Task has no status: writing it again is a create, which may use any status."""
    if current.deleted:
        return
    old, new = current.resource().get("status"), resource.get("status")
    if isinstance(old, str) and isinstance(new, str) and not can_change(old, new):
        raise refusal(current.reference, old, new)
