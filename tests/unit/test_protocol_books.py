"""`books` on a stage (orchestration/PROTOCOLS.md): the chain of appointments booked in one
go, each mistake at its line, the FHIR form, and the chain steps the engine reads back."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway import fhir
from mappings import protocol_fhir, protocol_model
from mappings.protocols import Problem, compile_protocol, validate_protocol
from orchestration import chains
from orchestration.chains import ChainStep, Lead, LeadRule
from orchestration.effects import StartStage
from orchestration.engine import decide
from orchestration.protocol import Protocol, ProtocolFormError, from_plan_definition
from orchestration.state import plan_state
from tests.factories.protocols import DAYS, action, plan_definition

SHIPPED = sorted((Path(__file__).parents[2] / "orchestration" / "protocols").glob("*.yaml"))
GUIDE = Path(__file__).parents[2] / "orchestration" / "PROTOCOLS.md"
ATM = "https://atm-gateway.org/fhir"
BOOKS = f"{ATM}/StructureDefinition/books-chain"
SERVICES = f"{ATM}/CodeSystem/scheduling-service"
UCUM = "http://unitsofmeasure.org"

# Lines 1-5 name the stages a chain may book; the cases start on line 6.
HEAD = "protocol: demo\nstages:\n  - id: a\n  - id: b\n  - id: c\n"
# Lines 6-7; the chain's entries start on line 8, the second step on line 10.
BOOK = "  - id: book\n    books:\n"
FIRST = "      - step: a\n        service: apheresis\n"
PRIORITY_LIST = "routine, urgent, asap, stat"
LEAD_HELP = "a mapping of `min` and `max` durations, such as {min: 2d, max: 7d}"
NOT_SIBLINGS = ("`step`: a chain step's lead runs from the previous step, which must be a "
                "sibling stage (same parent)")


def _days(low: float, high: float) -> Lead:
    return Lead(timedelta(days=low), timedelta(days=high))


def _read_back(text: str) -> Protocol:
    compiled = compile_protocol(text)
    assert [fhir.validate(r) for r in compiled.resources()] == [[]] * len(compiled.resources())
    return from_plan_definition(compiled.plan_definition, compiled.activity_definitions)


def _second(lead: str = "{min: 2d, max: 7d}", extra: str = "") -> str:
    """A second step, booking b, starting on line 10."""
    return f"      - step: b\n        service: manufacturing\n        lead: {lead}\n{extra}"


EXAMPLE = HEAD + """\
  - id: slot-booking
    title: Manufacturing slot booked
    kind: appointment
    deadline: 2d
    books:
      - step: a
        service: apheresis
      - step: b
        service: manufacturing
        lead: {min: 2d, max: 7d}
        where:
          - priority: urgent
            lead: {min: 1d, max: 3d}
      - step: c
        service: infusion
        lead:
          min: 28d
          max: 6wk
        where:
          - country: DE
            lead: {min: 30d, max: 45d}
          - site: Location/infusion-ward-b
            lead: {min: 29d, max: 42d}
"""
EXAMPLE_CHAIN = (
    ChainStep("a", "apheresis"),
    ChainStep("b", "manufacturing", _days(2, 7), (LeadRule(_days(1, 3), priority="urgent"),)),
    ChainStep("c", "infusion", _days(28, 42), (
        LeadRule(_days(30, 45), country="DE"),
        LeadRule(_days(29, 42), site="Location/infusion-ward-b"))),
)


def test_a_chain_compiles_and_reads_back() -> None:
    protocol = _read_back(EXAMPLE)
    booking = protocol.booking_stage()
    assert booking is not None and booking.id == "slot-booking"
    assert booking.books == EXAMPLE_CHAIN
    assert [s.id for s in protocol.stages.values() if s.books] == ["slot-booking"]


def test_a_protocol_without_books_has_no_booking_stage() -> None:
    protocol = _read_back(HEAD)
    assert protocol.booking_stage() is None
    assert all(s.books == () for s in protocol.stages.values())


GOOD: list[tuple[str, str, tuple[ChainStep, ...]]] = [
    ("one-step", BOOK + FIRST, (ChainStep("a", "apheresis"),)),
    ("sibling-sub-stages", "  - id: d\n    steps:\n      - id: e\n      - id: f\n"
     "  - id: book\n    books:\n      - step: e\n        service: infusion\n"
     "      - step: f\n        service: follow-up\n        lead: {min: 0d, max: 0d}\n",
     (ChainStep("e", "infusion"), ChainStep("f", "follow-up", _days(0, 0)))),
    ("one-step-on-a-sub-stage", "  - id: d\n    steps:\n      - id: e\n"
     "  - id: book\n    books:\n      - step: e\n        service: infusion\n",
     (ChainStep("e", "infusion"),)),
    ("booked-on-a-sub-stage", "  - id: d\n    steps:\n      - id: book\n        books:\n"
     "          - step: a\n            service: apheresis\n",
     (ChainStep("a", "apheresis"),)),
    ("units-mixed", BOOK + FIRST + _second("{min: 36h, max: 1.5d}"),
     (ChainStep("a", "apheresis"),
      ChainStep("b", "manufacturing", Lead(timedelta(hours=36), timedelta(days=1.5))))),
    ("ten-steps", BOOK + FIRST + "".join(
        f"      - step: s{i}\n        service: x\n        lead: {{min: 1d, max: 2d}}\n"
        for i in range(9)) + "".join(f"  - id: s{i}\n" for i in range(9)),
     (ChainStep("a", "apheresis"), *(ChainStep(f"s{i}", "x", _days(1, 2)) for i in range(9)))),
    ("the-booking-stage-itself", BOOK + "      - step: book\n        service: apheresis\n",
     (ChainStep("book", "apheresis"),)),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in GOOD],
                         ids=[name for name, _, _ in GOOD])
def test_good_chains_compile_and_read_back(text: str, expected: tuple[ChainStep, ...]
                                           ) -> None:
    booking = _read_back(HEAD + text).booking_stage()
    assert booking is not None
    assert booking.books == expected


def _ucum(value: int, unit: str = "d") -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def test_the_fhir_form_of_books() -> None:
    compiled = compile_protocol(EXAMPLE)
    a, b, c, slot = compiled.plan_definition["action"]

    def lead(low: int, high: int) -> list[dict[str, Any]]:
        return [{"url": "lead-min", "valueDuration": _ucum(low)},
                {"url": "lead-max", "valueDuration": _ucum(high)}]

    def service(code: str) -> dict[str, Any]:
        return {"url": "service", "valueCoding": {"system": SERVICES, "code": code}}

    # The overrides stay in the extension: FHIR has no standard place for them.
    assert slot["extension"] == [{"url": BOOKS, "extension": [
        {"url": "step", "extension": [{"url": "stage", "valueId": "a"}, service("apheresis")]},
        {"url": "step", "extension": [
            {"url": "stage", "valueId": "b"}, service("manufacturing"),
            {"url": "where", "extension": [{"url": "priority", "valueCode": "urgent"},
                                           *lead(1, 3)]}]},
        {"url": "step", "extension": [
            {"url": "stage", "valueId": "c"}, service("infusion"),
            {"url": "where", "extension": [{"url": "country", "valueCode": "DE"},
                                           *lead(30, 45)]},
            {"url": "where", "extension": [
                {"url": "site", "valueReference": {"reference": "Location/infusion-ward-b"}},
                *lead(29, 42)]}]},
    ]}]
    # Each default lead is the step's own action's relatedAction, from the previous step.
    assert a == {"id": "a", "title": "A", "definitionCanonical": f"{ATM}/ActivityDefinition/demo-a"}
    assert b == {"id": "b", "title": "B", "relatedAction": [
        {"actionId": "a", "relationship": "after-start",
         "offsetRange": {"low": _ucum(2), "high": _ucum(7)}}],
        "definitionCanonical": f"{ATM}/ActivityDefinition/demo-b"}
    assert c == {"id": "c", "title": "C", "relatedAction": [
        {"actionId": "b", "relationship": "after-start",
         "offsetRange": {"low": _ucum(28), "high": _ucum(6, "wk")}}],
        "definitionCanonical": f"{ATM}/ActivityDefinition/demo-c"}
    assert "relatedAction" not in slot
    assert all("extension" not in definition for definition in compiled.activity_definitions)


def test_a_step_s_lead_follows_its_after_in_related_action() -> None:
    compiled = compile_protocol(HEAD.replace("  - id: b\n", "  - id: b\n    after: [a]\n")
                                + BOOK + FIRST + _second())
    assert compiled.plan_definition["action"][1]["relatedAction"] == [
        {"actionId": "a", "relationship": "after-end"},
        {"actionId": "a", "relationship": "after-start",
         "offsetRange": {"low": _ucum(2), "high": _ucum(7)}}]


@pytest.mark.parametrize("after", ["", "    after: [a]\n"], ids=["unordered", "after-a"])
def test_a_lead_is_no_sequencing_dependency(after: str) -> None:
    """Stage b's lead from a's start is for booking; b still starts on its own `after`."""
    protocol = _read_back(HEAD.replace("  - id: b\n", "  - id: b\n" + after)
                          + BOOK + FIRST + _second())
    assert [link.stage for link in protocol.stages["b"].after] == (["a"] if after else [])
    assert protocol.stages["b"].ends_before == ()
    careplan = {"resourceType": "CarePlan", "id": "cp", "status": "active", "intent": "plan",
                "subject": {"reference": "Patient/p"}}
    effects = decide(protocol, plan_state(careplan, []), datetime(2026, 3, 2, tzinfo=UTC))
    started = {e.stage for e in effects if isinstance(e, StartStage)}
    assert started == ({"a", "c", "book"} if after else {"a", "b", "c", "book"})


def test_books_comes_after_the_other_extensions_of_a_stage() -> None:
    compiled = compile_protocol(HEAD + "  - id: book\n    assigns: chain-of-identity\n"
                                "    custody: [{event: release, signatures: [released]}]\n"
                                "    books:\n" + FIRST)
    assert [e["url"].rsplit("/", 1)[1] for e in compiled.plan_definition["action"][3][
        "extension"]] == ["assigns", "custody-handoff", "books-chain"]


def test_the_fhir_form_names_the_systems_the_engine_reads() -> None:
    assert protocol_fhir.SCHEDULING_SERVICES == chains.SERVICE_SYSTEM == SERVICES
    assert protocol_model.PRIORITIES == chains.PRIORITIES


@pytest.mark.parametrize(("country", "site", "priority", "expected"), [
    (None, None, None, _days(28, 42)),
    ("FR", "Location/elsewhere", "routine", _days(28, 42)),
    ("DE", None, None, _days(30, 45)),
    ("de", None, None, _days(30, 45)),
    (None, "Location/infusion-ward-b", None, _days(29, 42)),
    # first match wins: the country rule comes before the site rule
    ("DE", "Location/infusion-ward-b", None, _days(30, 45)),
    ("FR", "Location/infusion-ward-b", "stat", _days(29, 42)),
    (None, None, "urgent", _days(28, 42)),
], ids=["default", "no-match", "country", "country-lower-case", "site", "country-first",
        "site-not-country", "priority-of-another-step"])
def test_lead_for_picks_the_first_matching_override(country: str | None, site: str | None,
                                                    priority: str | None, expected: Lead
                                                    ) -> None:
    booking = _read_back(EXAMPLE).booking_stage()
    assert booking is not None
    assert booking.books[2].lead_for(country, site, priority) == expected


def test_lead_for_reads_a_priority_override_and_the_first_step_has_none() -> None:
    booking = _read_back(EXAMPLE).booking_stage()
    assert booking is not None
    first, manufacturing = booking.books[:2]
    assert manufacturing.lead_for(priority="urgent") == _days(1, 3)
    assert manufacturing.lead_for("DE", priority="routine") == _days(2, 7)
    assert first.lead_for("DE", "Location/x", "urgent") is None


PROBLEMS = [
    ("not-a-list", "  - id: book\n    books: {step: a, service: apheresis}\n",
     [(7, "`books` must be a list of chain steps, each with a `step` and its `service`")]),
    ("empty", "  - id: book\n    books: []\n",
     [(7, "`books` is empty: list the steps the chain books, in time order")]),
    ("eleven-steps", BOOK + FIRST + "".join(
        f"      - step: s{i}\n        service: x\n        lead: {{min: 1d, max: 2d}}\n"
        for i in range(10)) + "".join(f"  - id: s{i}\n" for i in range(10)),
     [(8, "`books` has 11 steps; a chain books 10 at most")]),
    ("entry-not-a-mapping", BOOK + "      - a\n", [(8, "a `books` entry must be a mapping")]),
    ("unknown-key", BOOK + FIRST + "        serivce: chair\n",
     [(10, "unknown key `serivce` in a `books` entry (did you mean `service`?)")]),
    ("unknown-key-far", BOOK + FIRST + "        resource: chair\n",
     [(10, "unknown key `resource` in a `books` entry (expected one of: step, service, "
           "lead, where)")]),
    ("missing-step", BOOK + "      - service: apheresis\n",
     [(8, "a `books` entry needs a `step` (the id of the stage it books for)")]),
    ("step-not-text", BOOK + "      - step: [a]\n        service: apheresis\n",
     [(8, "`step` must be text, not a list")]),
    ("missing-service", BOOK + "      - step: a\n",
     [(8, "a `books` entry needs a `service` (a scheduling service code, such as "
          "apheresis)")]),
    ("bad-service", BOOK + "      - step: a\n        service: Apheresis Chair\n",
     [(9, "`service` 'Apheresis Chair' must be a scheduling service code: 1 to 64 "
          "lower-case letters, digits or hyphens")]),
    ("unknown-stage", BOOK + FIRST + "      - step: manufacturing\n        service: x\n"
     "        lead: {min: 1d, max: 2d}\n",
     [(10, "`step`: unknown stage 'manufacturing'")]),
    ("stage-twice", BOOK + FIRST + _second() + "      - step: a\n        service: x\n"
     "        lead: {min: 1d, max: 2d}\n",
     [(13, "`step`: stage 'a' is booked twice in this chain (first at line 8)")]),
    ("lead-on-the-first-step", BOOK + FIRST + "        lead: {min: 1d, max: 2d}\n",
     [(10, "`lead`: the first step of a chain has no lead time (leads count from the "
           "previous step's start)")]),
    ("where-on-the-first-step", BOOK + FIRST + "        where:\n          - country: DE\n"
     "            lead: {min: 1d, max: 2d}\n",
     [(10, "`where`: the first step of a chain has no lead time (leads count from the "
           "previous step's start)")]),
    ("missing-lead", BOOK + FIRST + "      - step: b\n        service: manufacturing\n",
     [(10, f"a `books` entry after the first needs a `lead` from the previous step's start "
           f"({LEAD_HELP})")]),
    ("lead-not-a-mapping", BOOK + FIRST + _second("2d"),
     [(12, f"`lead` must be {LEAD_HELP}")]),
    ("lead-without-max", BOOK + FIRST + _second("{min: 2d}"),
     [(12, f"`lead` needs `max` ({LEAD_HELP})")]),
    ("lead-empty", BOOK + FIRST + _second("{}"),
     [(12, f"`lead` needs `min` and `max` ({LEAD_HELP})")]),
    ("lead-unknown-key", BOOK + FIRST + _second("{min: 2d, max: 7d, typical: 3d}"),
     [(12, "unknown key `typical` in `lead` (expected one of: min, max)")]),
    ("lead-bad-duration", BOOK + FIRST + _second("{min: 2 days, max: 7d}"),
     [(12, "`min`: cannot read duration '2 days' (write a number and a unit: 30min, 12h, 3d "
           "or 2wk)")]),
    ("lead-min-after-max", BOOK + FIRST + _second("\n          min: 2wk\n          max: 7d"),
     [(13, "`lead`: `min` 2wk is longer than `max` 7d")]),
    ("where-not-a-list", BOOK + FIRST + _second(
        extra="        where: {country: DE, lead: {min: 1d, max: 2d}}\n"),
     [(13, "`where` must be a list of overrides, each with a `country`, a `site` or a "
           "`priority` and its `lead`")]),
    ("where-two-places", BOOK + FIRST + _second(
        extra="        where:\n          - country: DE\n            priority: urgent\n"
              "            lead: {min: 1d, max: 2d}\n"),
     [(14, "a `where` entry names one of `country`, `site` or `priority`, not `country` and "
           "`priority`")]),
    ("where-no-place", BOOK + FIRST + _second(
        extra="        where:\n          - lead: {min: 1d, max: 2d}\n"),
     [(14, "a `where` entry needs a `country` (ISO 3166 alpha-2), a `site` (Location/<id>) "
           f"or a `priority` ({PRIORITY_LIST})")]),
    ("where-bad-country", BOOK + FIRST + _second(
        extra="        where:\n          - country: Germany\n            lead: {min: 1d, "
              "max: 2d}\n"),
     [(14, "`country` 'Germany' must be an ISO 3166 alpha-2 code: two upper-case letters, "
           "such as DE")]),
    ("where-bad-site", BOOK + FIRST + _second(
        extra="        where:\n          - lead: {min: 1d, max: 2d}\n"
              "            site: Organization/ward\n"),
     [(15, "`site` 'Organization/ward' must be a Location reference: Location/ and an id of "
           "1 to 64 letters, digits, '-' or '.'")]),
    ("where-bad-priority", BOOK + FIRST + _second(
        extra="        where:\n          - priority: urgnet\n            lead: {min: 1d, "
              "max: 2d}\n"),
     [(14, "`priority`: unknown request priority 'urgnet' (did you mean `urgent`?)")]),
    ("where-bad-priority-far", BOOK + FIRST + _second(
        extra="        where: [{priority: elective, lead: {min: 1d, max: 2d}}]\n"),
     [(13, f"`priority`: unknown request priority 'elective' (expected one of: "
           f"{PRIORITY_LIST})")]),
    ("where-missing-lead", BOOK + FIRST + _second(
        extra="        where:\n          - country: DE\n"),
     [(14, f"a `where` entry needs a `lead` ({LEAD_HELP})")]),
    ("where-bad-lead", BOOK + FIRST + _second(
        extra="        where:\n          - country: DE\n            lead: {min: 3d, max: 1d}\n"),
     [(15, "`lead`: `min` 3d is longer than `max` 1d")]),
    ("where-unknown-key", BOOK + FIRST + _second(
        extra="        where:\n          - region: EU\n            lead: {min: 1d, max: 2d}\n"),
     [(14, "a `where` entry needs a `country` (ISO 3166 alpha-2), a `site` (Location/<id>) "
           f"or a `priority` ({PRIORITY_LIST})"),
      (14, "unknown key `region` in a `where` entry (expected one of: country, site, "
           "priority, lead)")]),
    ("where-signatures", BOOK + FIRST + _second(
        extra="        where:\n          - country: DE\n            signatures: []\n"),
     [(14, f"a `where` entry needs a `lead` ({LEAD_HELP})"),
      (15, "unknown key `signatures` in a `where` entry (expected one of: country, site, "
           "priority, lead)")]),
    ("where-same-priority-twice", BOOK + FIRST + _second(
        extra="        where:\n          - priority: urgent\n            lead: {min: 1d, "
              "max: 2d}\n          - priority: urgent\n            lead: {min: 0d, "
              "max: 1d}\n"),
     [(16, "`where`: priority 'urgent' is given twice (first at line 14; only the first "
           "match applies)")]),
    ("two-booking-stages", BOOK + FIRST + "  - id: rebook\n    steps:\n      - id: inner\n"
     "        books:\n          - step: b\n            service: x\n",
     [(13, "`books`: stage 'book' already books a chain (line 7); only one stage may book "
           "one")]),
    ("steps-not-siblings", "  - id: d\n    steps:\n      - id: e\n"
     "  - id: book\n    books:\n      - step: e\n        service: infusion\n"
     "      - step: d\n        service: follow-up\n        lead: {min: 0d, max: 0d}\n",
     [(13, f"{NOT_SIBLINGS}; 'd' is not a sibling of 'e'")]),
    ("a-later-step-not-a-sibling", BOOK + FIRST + _second() + "      - step: e\n"
     "        service: infusion\n        lead: {min: 1d, max: 2d}\n"
     "  - id: d\n    steps:\n      - id: e\n",
     [(13, f"{NOT_SIBLINGS}; 'e' is not a sibling of 'b'")]),
    ("sub-stages-of-different-parents", "  - id: d\n    steps:\n      - id: e\n"
     "  - id: f\n    steps:\n      - id: g\n"
     "  - id: book\n    books:\n      - step: e\n        service: x\n"
     "      - step: g\n        service: y\n        lead: {min: 0d, max: 1d}\n",
     [(16, f"{NOT_SIBLINGS}; 'g' is not a sibling of 'e'")]),
    ("every-mistake-in-one-step", BOOK + FIRST + "      - step: nowhere\n"
     "        service: Chair\n        lead: {min: 9d, max: 1d}\n"
     "        where:\n          - country: de\n            site: ward\n",
     [(10, "`step`: unknown stage 'nowhere'"),
      (11, "`service` 'Chair' must be a scheduling service code: 1 to 64 lower-case "
           "letters, digits or hyphens"),
      (12, "`lead`: `min` 9d is longer than `max` 1d"),
      (14, "`country` 'de' must be an ISO 3166 alpha-2 code: two upper-case letters, such "
           "as DE"),
      (14, "a `where` entry names one of `country`, `site` or `priority`, not `country` and "
           "`site`"),
      (14, f"a `where` entry needs a `lead` ({LEAD_HELP})"),
      (15, "`site` 'ward' must be a Location reference: Location/ and an id of 1 to 64 "
           "letters, digits, '-' or '.'")]),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in PROBLEMS],
                         ids=[name for name, _, _ in PROBLEMS])
def test_each_books_problem_is_reported_at_its_line(text: str,
                                                    expected: list[tuple[int, str]]) -> None:
    assert validate_protocol(HEAD + text, "demo.yaml") == [
        Problem(line, message) for line, message in expected]


# -- the FHIR form, written by hand -------------------------------------------------


def _duration(days: int) -> dict[str, Any]:
    return {"value": days, **DAYS}


def _lead(low: int, high: int) -> list[dict[str, Any]]:
    return [{"url": "lead-min", "valueDuration": _duration(low)},
            {"url": "lead-max", "valueDuration": _duration(high)}]


def _service(code: str = "x", system: str = SERVICES) -> dict[str, Any]:
    return {"url": "service", "valueCoding": {"system": system, "code": code}}


def _step(stage: str, *parts: dict[str, Any], service: bool = True) -> dict[str, Any]:
    head = [{"url": "stage", "valueId": stage}, *([_service()] if service else [])]
    return {"url": "step", "extension": [*head, *parts]}


def _where(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"url": "where", "extension": list(parts)}


def _chain(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"url": BOOKS, "extension": list(steps)}


def _after_start(other: str, low: int, high: int) -> dict[str, Any]:
    """A step's default lead: it starts `low` to `high` days after `other` starts."""
    return {"actionId": other, "relationship": "after-start",
            "offsetRange": {"low": _duration(low), "high": _duration(high)}}


FIRST_STEP = _step("a")
SECOND_STEP = _step("b")
CHAIN = _chain(FIRST_STEP, SECOND_STEP, _step("c"))
LEADS = {"b": [_after_start("a", 2, 7)], "c": [_after_start("b", 28, 42)]}


def _plan(*extensions: dict[str, Any], related: dict[str, list[dict[str, Any]]] | None = None,
          more: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    """Actions a, b and c; a carries the extensions, `related` adds relatedActions by
    action id."""
    related = related or {}
    actions = [{**action("a"), "extension": list(extensions)}, action("b"), action("c")]
    return plan_definition(*({**a, "relatedAction": related[a["id"]]} if a["id"] in related
                             else a for a in actions), *more)


def test_a_hand_written_form_reads_back() -> None:
    protocol = from_plan_definition(_plan(_chain(
        FIRST_STEP, _step("b", _where({"url": "priority", "valueCode": "stat"},
                                      *_lead(0, 1)))),
        related={"b": [_after_start("a", 2, 7)]}))
    assert protocol.stages["a"].books == (
        ChainStep("a", "x"),
        ChainStep("b", "x", _days(2, 7), (LeadRule(_days(0, 1), priority="stat"),)))
    assert protocol.booking_stage() is protocol.stages["a"]


def test_leads_are_no_sequencing_dependency_in_the_engine() -> None:
    """after-start only gives the chain its leads: the stages it links stay unordered,
    and one with its own `after` keeps exactly that."""
    protocol = from_plan_definition(_plan(CHAIN, related={
        "b": [_after_start("a", 2, 7)],
        "c": [{"actionId": "a", "relationship": "after-end"}, _after_start("b", 28, 42)]}))
    assert [step.lead for step in protocol.stages["a"].books] == [
        None, _days(2, 7), _days(28, 42)]
    assert protocol.stages["b"].after == ()
    assert [link.stage for link in protocol.stages["c"].after] == ["a"]
    assert all(stage.ends_before == () for stage in protocol.stages.values())


def test_a_lead_between_sub_stages_reads_back() -> None:
    inner = {**action("d"), "action": [action("e"), {
        **action("f"), "relatedAction": [_after_start("e", 1, 2)]}]}
    protocol = from_plan_definition(_plan(_chain(_step("e"), _step("f")), more=(inner,)))
    assert protocol.stages["a"].books == (ChainStep("e", "x"), ChainStep("f", "x", _days(1, 2)))
    assert protocol.stages["f"].after == ()


def test_a_lead_from_a_stage_that_is_not_a_sibling_is_refused() -> None:
    inner = {**action("d"), "action": [{**action("e"), "relatedAction": [
        _after_start("b", 1, 2)]}]}
    with pytest.raises(ProtocolFormError,
                       match="action e: related action b is not one of its siblings"):
        from_plan_definition(_plan(_chain(FIRST_STEP, _step("b"), _step("e")),
                                   related={"b": [_after_start("a", 1, 2)]}, more=(inner,)))


FORM_ERRORS = [
    ("twice", [_chain(FIRST_STEP), _chain(FIRST_STEP)],
     "action a: books-chain is given twice; one holds every step"),
    ("no-step", [_chain()], "action a: books-chain has 0 steps; it needs 1 to 10"),
    ("eleven-steps", [_chain(FIRST_STEP, *(_step("b") for _ in range(10)))],
     "action a: books-chain has 11 steps; it needs 1 to 10"),
    ("unknown-chain-part", [_chain(FIRST_STEP, {"url": "priority", "valueCode": "stat"},
                                   {"url": "route", "valueString": "x"})],
     r"action a: books-chain has sub-extensions it does not support \(unknown: priority, "
     r"route\); supported: step"),
    ("unknown-step-part", [_chain(_step("a", {"url": "site", "valueString": "x"}))],
     r"action a books-chain: step has sub-extensions it does not support \(unknown: site\); "
     "supported: stage, service, where"),
    # The default lead is the step's relatedAction, and nowhere else.
    ("lead-in-the-step", [_chain(FIRST_STEP, _step("b", *_lead(2, 7)))],
     r"action a books-chain: step has sub-extensions it does not support \(unknown: "
     r"lead-max, lead-min\); supported: stage, service, where"),
    ("step-without-stage", [_chain({"url": "step", "extension": [_service()]})],
     r"action a books-chain: a step needs one stage \(valueId\) and one service"),
    ("step-stage-not-an-id", [_chain({"url": "step", "extension": [
        {"url": "stage", "valueString": "a"}, _service()]})],
     r"action a books-chain: a step needs one stage \(valueId\) and one service"),
    ("step-without-service", [_chain(_step("a", service=False))],
     r"action a books-chain: a step needs one stage \(valueId\) and one service"),
    ("step-two-services", [_chain(_step("a", _service("y")))],
     r"action a books-chain: a step needs one stage \(valueId\) and one service"),
    ("service-other-system", [_chain({"url": "step", "extension": [
        {"url": "stage", "valueId": "a"}, _service(system="http://snomed.info/sct")]})],
     f"action a books-chain step a: service needs a valueCoding with system {SERVICES} "
     "and a code"),
    ("service-bad-code", [_chain({"url": "step", "extension": [
        {"url": "stage", "valueId": "a"}, _service("Apheresis Chair")]})],
     "action a books-chain step a: service needs a valueCoding"),
    ("service-as-code", [_chain({"url": "step", "extension": [
        {"url": "stage", "valueId": "a"}, {"url": "service", "valueCode": "apheresis"}]})],
     "action a books-chain step a: service needs a valueCoding"),
    ("service-coding-as-text", [_chain({"url": "step", "extension": [
        {"url": "stage", "valueId": "a"}, {"url": "service", "valueCoding": "apheresis"}]})],
     "action a books-chain step a: service needs a valueCoding"),
    ("where-on-the-first-step", [_chain(_step("a", _where(
        {"url": "country", "valueCode": "DE"}, *_lead(1, 2))))],
     r"action a books-chain step a: the first step of a chain has no lead \(nor where\)"),
    ("missing-lead", [_chain(FIRST_STEP, SECOND_STEP)],
     "action a books-chain step b: every step after the first needs a lead: a "
     "relatedAction after-start on action b, from a, with an offsetRange"),
    ("where-two-places", [_chain(FIRST_STEP, _step("b", _where(
        {"url": "country", "valueCode": "DE"}, {"url": "priority", "valueCode": "stat"},
        *_lead(1, 2))))],
     "action a books-chain step b: a where needs one country, site or priority, and a lead"),
    ("where-no-place", [_chain(FIRST_STEP, _step("b", _where(*_lead(1, 2))))],
     "action a books-chain step b: a where needs one country, site or priority, and a lead"),
    ("where-no-lead", [_chain(FIRST_STEP, _step("b", _where(
        {"url": "country", "valueCode": "DE"})))],
     "action a books-chain step b: a where needs one country, site or priority, and a lead"),
    ("where-half-a-lead", [_chain(FIRST_STEP, _step("b", _where(
        {"url": "country", "valueCode": "DE"}, _lead(1, 2)[1])))],
     "action a books-chain step b where: a lead needs one lead-min and one lead-max"),
    ("where-lead-twice", [_chain(FIRST_STEP, _step("b", _where(
        {"url": "country", "valueCode": "DE"}, *_lead(1, 2), *_lead(1, 2))))],
     "action a books-chain step b where: a lead needs one lead-min and one lead-max"),
    ("where-lead-not-a-duration", [_chain(FIRST_STEP, _step("b", _where(
        {"url": "country", "valueCode": "DE"}, {"url": "lead-min", "valueString": "2d"},
        _lead(1, 7)[1])))],
     "action a books-chain step b where: lead-min and lead-max need a valueDuration"),
    ("where-lead-min-after-max", [_chain(FIRST_STEP, _step("b", _where(
        {"url": "country", "valueCode": "DE"}, *_lead(7, 2))))],
     "action a books-chain step b where: a lead needs 0 <= lead-min <= lead-max"),
    ("where-unknown-part", [_chain(FIRST_STEP, _step("b", _where(
        {"url": "country", "valueCode": "DE"}, {"url": "signature", "valueCode": "released"},
        *_lead(1, 2))))],
     r"action a books-chain step b: where has sub-extensions it does not support \(unknown: "
     r"signature\); supported: country, site, priority, lead-min, lead-max"),
    ("where-bad-country", [_chain(FIRST_STEP, _step("b", _where(
        {"url": "country", "valueCode": "de"}, *_lead(1, 2))))],
     "action a books-chain step b: where country 'de' is not an ISO 3166 alpha-2 code"),
    ("where-bad-site", [_chain(FIRST_STEP, _step("b", _where(
        {"url": "site", "valueReference": {"reference": "Organization/x"}}, *_lead(1, 2))))],
     "action a books-chain step b: where site 'Organization/x' is not a Location reference"),
    ("where-bad-priority", [_chain(FIRST_STEP, _step("b", _where(
        {"url": "priority", "valueCode": "elective"}, *_lead(1, 2))))],
     "action a books-chain step b where: priority has valueCode 'elective'; supported: "
     f"{PRIORITY_LIST}"),
    ("stage-twice", [_chain(FIRST_STEP, SECOND_STEP, _step("a"))],
     "action a books-chain: stage a is booked twice"),
    ("unknown-stage", [_chain(FIRST_STEP, _step("manufacturing"))],
     "action a: books-chain books unknown action manufacturing"),
]


@pytest.mark.parametrize(("extensions", "message"), [(e, m) for _, e, m in FORM_ERRORS],
                         ids=[name for name, _, _ in FORM_ERRORS])
def test_a_malformed_books_chain_is_refused(extensions: list[dict[str, Any]], message: str
                                           ) -> None:
    with pytest.raises(ProtocolFormError, match=message):
        from_plan_definition(_plan(*extensions))


NOT_A_LEAD = ("relatedAction {} after-start is used only for the lead times of a booked "
              "chain")
# (name, the books-chain extensions on action a, relatedActions by action, the error)
LEAD_ERRORS: list[tuple[str, list[dict[str, Any]], dict[str, list[dict[str, Any]]], str]] = [
    ("after-start-without-offset-range", [CHAIN],
     {**LEADS, "b": [{"actionId": "a", "relationship": "after-start"}]},
     "action b relatedAction a: after-start needs an offsetRange with a low and a high "
     "duration"),
    ("after-start-with-offset-duration", [CHAIN],
     {**LEADS, "b": [{"actionId": "a", "relationship": "after-start",
                      "offsetDuration": _duration(2)}]},
     "action b relatedAction a: after-start needs an offsetRange with a low and a high "
     "duration"),
    ("offset-range-without-high", [CHAIN],
     {**LEADS, "b": [{"actionId": "a", "relationship": "after-start",
                      "offsetRange": {"low": _duration(2)}}]},
     "action b relatedAction a: after-start needs an offsetRange with a low and a high "
     "duration"),
    ("offset-range-bad-unit", [CHAIN],
     {**LEADS, "b": [{"actionId": "a", "relationship": "after-start", "offsetRange": {
         "low": _duration(2), "high": {"value": 1, "code": "mo"}}}]},
     "action b relatedAction a offsetRange high: a duration needs a value and a unit"),
    ("offset-range-low-after-high", [CHAIN], {**LEADS, "b": [_after_start("a", 7, 2)]},
     "action b relatedAction a: an offsetRange needs 0 <= low <= high"),
    ("offset-range-negative", [CHAIN], {**LEADS, "b": [_after_start("a", -1, 2)]},
     "action b relatedAction a: an offsetRange needs 0 <= low <= high"),
    ("after-start-without-action-id", [CHAIN],
     {**LEADS, "b": [{"relationship": "after-start",
                      "offsetRange": {"low": _duration(1), "high": _duration(2)}}]},
     "action b: a relatedAction after-start needs an actionId"),
    ("after-start-twice", [CHAIN],
     {**LEADS, "b": [_after_start("a", 2, 7), _after_start("a", 1, 2)]},
     "action b relatedAction a: after-start is given twice"),
    ("between-non-consecutive-steps", [CHAIN],
     {**LEADS, "c": [_after_start("b", 28, 42), _after_start("a", 30, 49)]},
     "action c: " + NOT_A_LEAD.format("a")),
    ("instead-of-the-previous-step", [CHAIN], {**LEADS, "c": [_after_start("a", 30, 49)]},
     "action c: " + NOT_A_LEAD.format("a")),
    ("backwards", [CHAIN], {**LEADS, "a": [_after_start("b", 1, 2)]},
     "action a: " + NOT_A_LEAD.format("b")),
    ("on-a-stage-in-no-chain", [_chain(FIRST_STEP, SECOND_STEP)], LEADS,
     "action c: " + NOT_A_LEAD.format("b")),
    ("without-a-chain", [], {"b": [_after_start("a", 2, 7)]},
     "action b: " + NOT_A_LEAD.format("a")),
    ("missing-lead-of-a-later-step", [CHAIN], {"b": LEADS["b"]},
     "action a books-chain step c: every step after the first needs a lead: a "
     "relatedAction after-start on action c, from b, with an offsetRange"),
]


@pytest.mark.parametrize(("extensions", "related", "message"),
                         [(e, r, m) for _, e, r, m in LEAD_ERRORS],
                         ids=[name for name, _, _, _ in LEAD_ERRORS])
def test_a_malformed_lead_is_refused(extensions: list[dict[str, Any]],
                                     related: dict[str, list[dict[str, Any]]], message: str
                                     ) -> None:
    with pytest.raises(ProtocolFormError, match=re.escape(message)):
        from_plan_definition(_plan(*extensions, related=related))


def test_two_booking_stages_are_refused() -> None:
    other = {**action("d"), "extension": [_chain(_step("b"))]}
    with pytest.raises(ProtocolFormError, match="actions a, d all book a chain; one at most "
                                                "may"):
        from_plan_definition(_plan(_chain(FIRST_STEP), more=(other,)))


# -- the shipped protocols and the format guide ---------------------------------------


def _shipped(stem: str) -> Protocol:
    path = next(p for p in SHIPPED if p.stem == stem)
    return _read_back(path.read_text(encoding="utf-8"))


def test_car_t_books_chair_slot_and_bed_in_one_go() -> None:
    booking = _shipped("car-t-autologous").booking_stage()
    assert booking is not None and booking.id == "slot-booking"
    assert booking.books == (
        ChainStep("apheresis", "apheresis"),
        ChainStep("manufacturing", "manufacturing", _days(2, 7),
                  (LeadRule(_days(1, 3), priority="urgent"),)),
        ChainStep("infusion", "infusion", _days(28, 42), (LeadRule(_days(30, 45), country="DE"),)),
    )
    assert booking.books[1].lead_for("DE", priority="urgent") == _days(1, 3)
    assert booking.books[2].lead_for("DE", priority="urgent") == _days(30, 45)


def test_ex_vivo_gene_therapy_books_collection_manufacturing_and_infusion() -> None:
    protocol = _shipped("ex-vivo-gene-therapy")
    booking = protocol.booking_stage()
    assert booking is not None and booking.id == "slot-booking"
    assert booking.books == (
        ChainStep("collection", "apheresis"),
        ChainStep("manufacturing", "manufacturing", _days(1, 5)),
        ChainStep("infusion", "infusion", _days(56, 86)),
    )
    # The longest leads add up the deadlines between the steps (see the protocol's comment).
    deadline = {k: s.deadline or timedelta(0) for k, s in protocol.stages.items()}
    assert _days(1, 5).max == deadline["collection"] + deadline["shipment-to-manufacturer"]
    assert _days(56, 86).max == sum(
        (deadline[k] for k in ("manufacturing", "qc-release", "shipment-to-treatment-centre",
                               "receipt", "conditioning")), timedelta(days=2))


def test_allogeneic_books_the_infusion_bed_once_a_lot_is_reserved() -> None:
    protocol = _shipped("allogeneic-cell-therapy")
    booking = protocol.booking_stage()
    assert booking is not None and booking.id == "infusion-booking"
    assert booking.role == "coordinator"
    assert [link.stage for link in booking.after] == ["product-allocation"]
    assert booking.books == (ChainStep("infusion", "infusion"),)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_each_shipped_protocol_books_one_chain(path: Path) -> None:
    protocol = _read_back(path.read_text(encoding="utf-8"))
    booking = protocol.booking_stage()
    assert booking is not None
    assert [s.id for s in protocol.stages.values() if s.books] == [booking.id]
    assert all(step.stage in protocol.stages for step in booking.books)


def test_the_example_in_the_format_guide_books_a_chain() -> None:
    example = GUIDE.read_text(encoding="utf-8").split("```yaml\n", 1)[1].split("```", 1)[0]
    booking = _read_back(example).booking_stage()
    assert booking is not None and booking.id == "slot-booking"
    assert [(s.stage, s.service) for s in booking.books] == [
        ("apheresis", "apheresis"), ("manufacturing", "manufacturing"),
        ("infusion", "infusion")]
