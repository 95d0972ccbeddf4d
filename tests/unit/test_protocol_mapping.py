"""mappings.protocols: every validation problem at its line, the exact FHIR form, and the
shipped protocols (orchestration/protocols/*.yaml) as valid R4 resources."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from gateway import fhir
from mappings.fhirpath_syntax import syntax_error
from mappings.protocols import (
    CompiledProtocol,
    Duration,
    Problem,
    ProtocolError,
    compile_protocol,
    parse_protocol,
    validate_protocol,
)

SHIPPED = sorted((Path(__file__).parents[2] / "orchestration" / "protocols").glob("*.yaml"))
ATM = "https://atm-gateway.org/fhir"
ROLES = f"{ATM}/CodeSystem/partner-role"
UCUM = "http://unitsofmeasure.org"

# Lines 1-5; the stages of each case start on line 6.
HEAD = dedent("""\
    protocol: demo
    roles:
      coordinator: Coordinator
      manufacturer: Manufacturer
    stages:
    """)
NOT_DEPENDENCY = ("(back-to names a stage the failing stage comes after, among its siblings "
                  "or its parents' siblings)")
CYCLE_EXIT = "(a loop is allowed only through `on-failure`, which has `max-repeats` as its exit)"

PROBLEMS = [
    ("missing-protocol", "stages:\n  - id: a\n",
     [(1, "missing `protocol` (the protocol's id)")]),
    ("missing-stages", "protocol: demo\ntitle: Demo\n", [(1, "missing `stages`")]),
    ("empty-file", "", [(1, "missing `protocol` (the protocol's id)"), (1, "missing `stages`")]),
    ("empty-stages", "protocol: demo\nstages: []\n", [(2, "`stages` is empty")]),
    ("not-a-mapping", "- id: a\n", [(1, "the protocol must be a mapping")]),
    ("yaml-syntax", HEAD + "  - id: a\n    after: [b\n",
     [(8, "not valid YAML: expected ',' or ']', but got '<stream end>'")]),
    ("unknown-protocol-key", "protocol: demo\nowner: me\nstages:\n  - id: a\n",
     [(2, "unknown key `owner` in the protocol (expected one of: protocol, version, title, "
          "description, roles, escalation, stages)")]),
    ("unknown-stage-key", HEAD + "  - id: a\n  - id: b\n    aftr: [a]\n",
     [(8, "unknown key `aftr` in stage 'b' (did you mean `after`?)")]),
    ("unknown-after-key", HEAD + "  - id: a\n  - id: b\n    after: [{stage: a, lag: 1d}]\n",
     [(8, "unknown key `lag` in an `after` entry (expected one of: stage, gap)")]),
    ("key-twice", HEAD + "  - id: a\n    title: A\n    title: B\n",
     [(8, "`title` is given twice in stage 'a'")]),
    ("bad-protocol-id", "protocol: Demo_1\nstages:\n  - id: a\n",
     [(1, "`protocol` 'Demo_1' must be 1 to 64 lower-case letters, digits or hyphens")]),
    ("bad-stage-id", HEAD + "  - id: Intake\n",
     [(6, "`id` 'Intake' must be 1 to 64 lower-case letters, digits or hyphens")]),
    ("missing-stage-id", HEAD + "  - title: Intake\n", [(6, "a stage needs an `id`")]),
    ("too-long-for-an-id", HEAD + f"  - id: {'s' * 60}\n",
     [(6, f"ActivityDefinition id 'demo-{'s' * 60}' would have 65 characters (FHIR allows "
          "64); shorten the stage or protocol id")]),
    ("duplicate-id", HEAD + "  - id: a\n  - id: b\n    steps:\n      - id: a\n",
     [(9, "duplicate stage id 'a' (first at line 6)")]),
    ("after-unknown", HEAD + "  - id: a\n    after: [ghost]\n",
     [(7, "`after`: unknown stage 'ghost'")]),
    ("after-not-sibling", HEAD + "  - id: a\n    steps:\n      - id: a1\n  - id: b\n"
     "    after: [a1]\n",
     [(10, "`after`: 'a1' is not a sibling of 'b' (`after` names stages with the same "
           "parent)")]),
    ("after-parent", HEAD + "  - id: a\n    steps:\n      - id: a1\n        after: [a]\n",
     [(9, "`after`: 'a' is not a sibling of 'a1' (`after` names stages with the same "
          "parent)")]),
    ("after-itself", HEAD + "  - id: a\n    after: [a]\n",
     [(7, "`after`: 'a' cannot come after itself")]),
    ("ends-before-unknown", HEAD + "  - id: a\n    ends-before: {stage: ghost, by: 1d}\n",
     [(7, "`ends-before`: unknown stage 'ghost'")]),
    ("ends-before-not-sibling", HEAD + "  - id: a\n    ends-before: {stage: b1, by: 1d}\n"
     "  - id: b\n    steps:\n      - id: b1\n",
     [(7, "`ends-before`: 'b1' is not a sibling of 'a' (`ends-before` names stages with "
          "the same parent)")]),
    ("ends-before-earlier", HEAD + "  - id: a\n  - id: b\n    after: [a]\n"
     "    ends-before: {stage: a}\n",
     [(9, "`ends-before`: 'b' comes after 'a' (through `after`), so it cannot end before it")]),
    ("back-to-unknown", HEAD + "  - id: a\n    on-failure: {back-to: ghost, max-repeats: 1}\n",
     [(7, "`on-failure.back-to`: unknown stage 'ghost'")]),
    ("back-to-later", HEAD + "  - id: a\n    on-failure: {back-to: b, max-repeats: 1}\n"
     "  - id: b\n    after: [a]\n",
     [(7, f"`on-failure.back-to`: 'a' does not depend on 'b' {NOT_DEPENDENCY}")]),
    ("back-to-itself", HEAD + "  - id: a\n    on-failure:\n      back-to: a\n"
     "      max-repeats: 1\n",
     [(8, "`on-failure.back-to`: 'a' is the failing stage itself; name an earlier stage it "
          "depends on")]),
    ("back-to-cousin", HEAD + "  - id: a\n    steps:\n      - id: a1\n  - id: b\n"
     "    after: [a]\n    on-failure: {back-to: a1, max-repeats: 1}\n",
     [(11, f"`on-failure.back-to`: 'b' does not depend on 'a1' {NOT_DEPENDENCY}")]),
    ("role-unknown", HEAD + "  - id: a\n    role: nurse\n",
     [(7, "`role`: unknown role 'nurse' (declared roles: coordinator, manufacturer)")]),
    ("escalate-unknown", HEAD + "  - id: a\n    escalate: nurse\n",
     [(7, "`escalate`: unknown role 'nurse' (declared roles: coordinator, manufacturer)")]),
    ("escalation-unknown", "protocol: demo\nescalation: nurse\nstages:\n  - id: a\n",
     [(2, "`escalation`: unknown role 'nurse' (the protocol declares no `roles`)")]),
    ("cycle", HEAD + "  - id: a\n    after: [c]\n  - id: b\n    after: [a]\n"
     "  - id: c\n    after: [b]\n",
     [(7, f"dependency cycle through `after`: a -> c -> b -> a {CYCLE_EXIT}")]),
    ("cycle-in-steps", HEAD + "  - id: a\n    steps:\n      - id: x\n        after: [y]\n"
     "      - id: y\n        after: [x]\n",
     [(9, f"dependency cycle through `after`: x -> y -> x {CYCLE_EXIT}")]),
    ("max-repeats-missing", HEAD + "  - id: a\n  - id: b\n    after: [a]\n"
     "    on-failure: {back-to: a}\n",
     [(9, "`on-failure` needs `max-repeats` (1 to 10): a loop needs an exit")]),
    ("max-repeats-zero", HEAD + "  - id: a\n  - id: b\n    after: [a]\n"
     "    on-failure: {back-to: a, max-repeats: 0}\n",
     [(9, "`max-repeats` must be a whole number from 1 to 10, not '0'")]),
    ("max-repeats-eleven", HEAD + "  - id: a\n  - id: b\n    after: [a]\n"
     "    on-failure:\n      back-to: a\n      max-repeats: 11\n",
     [(11, "`max-repeats` must be a whole number from 1 to 10, not '11'")]),
    ("max-repeats-text", HEAD + "  - id: a\n  - id: b\n    after: [a]\n"
     "    on-failure: {back-to: a, max-repeats: two}\n",
     [(9, "`max-repeats` must be a whole number from 1 to 10, not 'two'")]),
    ("back-to-missing", HEAD + "  - id: a\n    on-failure: {max-repeats: 2}\n",
     [(7, "`on-failure` needs `back-to` (the stage to re-run from)")]),
    ("when-broken", HEAD + "  - id: a\n    when: \"%careplan.status = \"\n",
     [(7, "`when` is not valid FHIRPath: at column 20: the expression ends too early")]),
    ("when-trailing", HEAD + "  - id: a\n    when: \"status = 'active')\"\n",
     [(7, "`when` is not valid FHIRPath: at column 18: unexpected ')'")]),
    ("duration-unreadable", HEAD + "  - id: a\n    deadline: 3 days\n",
     [(7, "`deadline`: cannot read duration '3 days' (write a number and a unit: 30min, 12h, "
          "3d or 2wk)")]),
    ("duration-without-unit", HEAD + "  - id: a\n  - id: b\n    after:\n      - stage: a\n"
     "        gap: 2\n",
     [(10, "`gap`: cannot read duration '2' (write a number and a unit: 30min, 12h, 3d or "
           "2wk)")]),
    ("deadline-zero", HEAD + "  - id: a\n    deadline: 0d\n",
     [(7, "`deadline` must be longer than 0")]),
    ("kind-unknown", HEAD + "  - id: a\n    kind: job\n",
     [(7, "`kind` must be task, service-request or appointment, not 'job'")]),
    ("text-expected", HEAD + "  - id: a\n    title: [A]\n",
     [(7, "`title` must be text, not a list")]),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in PROBLEMS],
                         ids=[name for name, _, _ in PROBLEMS])
def test_each_problem_is_reported_at_its_line(text: str, expected: list[tuple[int, str]]
                                              ) -> None:
    assert validate_protocol(text, "demo.yaml") == [Problem(line, msg) for line, msg in expected]


def test_every_problem_is_reported_not_only_the_first() -> None:
    text = HEAD + dedent("""\
          - id: a
            role: nurse
            deadline: soon
          - id: b
            after: [ghost]
            kind: job
        """)
    with pytest.raises(ProtocolError) as raised:
        compile_protocol(text, "demo.yaml")
    assert str(raised.value).splitlines() == [
        "demo.yaml:7: `role`: unknown role 'nurse' (declared roles: coordinator, manufacturer)",
        "demo.yaml:8: `deadline`: cannot read duration 'soon' (write a number and a unit: "
        "30min, 12h, 3d or 2wk)",
        "demo.yaml:10: `after`: unknown stage 'ghost'",
        "demo.yaml:11: `kind` must be task, service-request or appointment, not 'job'",
    ]
    assert raised.value.source == "demo.yaml"
    assert [p.line for p in raised.value.problems] == [7, 8, 10, 11]


@pytest.mark.parametrize(("written", "value", "unit"), [
    ("30min", 30, "min"), ("12h", 12, "h"), ("3d", 3, "d"), ("2wk", 2, "wk"),
    ("3 d", 3, "d"), ("1.5h", 1.5, "h"), ("'7 wk'", 7, "wk"),
])
def test_durations_are_read_as_ucum(written: str, value: float, unit: str) -> None:
    protocol = parse_protocol(HEAD + f"  - id: a\n    deadline: {written}\n")
    assert protocol.stages[0].deadline == Duration(value, unit)


@pytest.mark.parametrize("expression", [
    "%careplan.status = 'active'",
    "%careplan.extension.where(url = 'https://atm-gateway.org/fhir/StructureDefinition/"
    "bridging').value = true",
    "Task.where(status in ('completed' | 'cancelled')).exists() and 1 > 0",
])
def test_valid_fhirpath_has_no_syntax_error(expression: str) -> None:
    assert syntax_error(expression) is None


@pytest.mark.parametrize(("expression", "error"), [
    ("%careplan.status = ", "at column 20: the expression ends too early"),
    ("status = 'active", "at column 10: cannot read ''active'"),
    ("(status", "at column 8: missing ')' at the end"),
    ("status active", "at column 8: unexpected 'active'"),
])
def test_broken_fhirpath_is_explained(expression: str, error: str) -> None:
    assert syntax_error(expression) == error


SMALL = dedent("""\
    protocol: demo-therapy
    version: "2.1"
    title: Demo therapy
    description: A small protocol.
    roles:
      coordinator: Treatment centre coordinator
      manufacturer: Manufacturer
    escalation: coordinator
    stages:
      - id: intake
        role: coordinator
        deadline: 3d
      - id: manufacturing
        title: Manufacturing
        description: The batch is made.
        kind: service-request
        role: manufacturer
        after:
          - stage: intake
            gap: 1d
        deadline: 21d
        escalate: manufacturer
        on-failure: {back-to: intake, max-repeats: 2}
      - id: bridging
        after: [intake]
        when: "%careplan.status = 'active'"
      - id: conditioning
        after: [manufacturing]
        ends-before: {stage: treatment, by: 12h}
      - id: treatment
        kind: appointment
        after: [conditioning, bridging]
        steps:
          - id: infusion
          - id: observation
            after: [infusion]
    """)


def _duration(value: int, unit: str) -> dict[str, object]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def _role(code: str) -> list[dict[str, object]]:
    return [{"type": "practitioner", "role": {"coding": [{"system": ROLES, "code": code}]}}]


def _canonical(stage: str) -> str:
    return f"{ATM}/ActivityDefinition/demo-therapy-{stage}|2.1"


def test_the_fhir_form_of_a_small_protocol() -> None:
    compiled = compile_protocol(SMALL)
    assert compiled.plan_definition == {
        "resourceType": "PlanDefinition",
        "id": "demo-therapy",
        "extension": [
            {"url": f"{ATM}/StructureDefinition/partner-role",
             "valueCoding": {"system": ROLES, "code": "coordinator",
                             "display": "Treatment centre coordinator"}},
            {"url": f"{ATM}/StructureDefinition/partner-role",
             "valueCoding": {"system": ROLES, "code": "manufacturer",
                             "display": "Manufacturer"}},
            {"url": f"{ATM}/StructureDefinition/escalation-role", "valueCode": "coordinator"},
        ],
        "url": f"{ATM}/PlanDefinition/demo-therapy",
        "version": "2.1",
        "name": "DemoTherapy",
        "title": "Demo therapy",
        "type": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/plan-definition-type",
            "code": "workflow-definition", "display": "Workflow Definition"}]},
        "status": "active",
        "description": "A small protocol.",
        "action": [
            {"id": "intake", "title": "Intake", "timingDuration": _duration(3, "d"),
             "participant": _role("coordinator"),
             "definitionCanonical": _canonical("intake")},
            {"id": "manufacturing",
             "extension": [
                 {"url": f"{ATM}/StructureDefinition/escalation-role",
                  "valueCode": "manufacturer"},
                 {"url": f"{ATM}/StructureDefinition/on-failure", "extension": [
                     {"url": "back-to", "valueId": "intake"},
                     {"url": "max-repeats", "valueUnsignedInt": 2}]},
             ],
             "title": "Manufacturing", "description": "The batch is made.",
             "relatedAction": [{"actionId": "intake", "relationship": "after-end",
                                "offsetDuration": _duration(1, "d")}],
             "timingDuration": _duration(21, "d"), "participant": _role("manufacturer"),
             "definitionCanonical": _canonical("manufacturing")},
            {"id": "bridging", "title": "Bridging",
             "condition": [{"kind": "applicability", "expression": {
                 "language": "text/fhirpath", "expression": "%careplan.status = 'active'"}}],
             "relatedAction": [{"actionId": "intake", "relationship": "after-end"}],
             "definitionCanonical": _canonical("bridging")},
            {"id": "conditioning", "title": "Conditioning",
             "relatedAction": [
                 {"actionId": "manufacturing", "relationship": "after-end"},
                 {"actionId": "treatment", "relationship": "before-start",
                  "offsetDuration": _duration(12, "h")}],
             "definitionCanonical": _canonical("conditioning")},
            {"id": "treatment", "title": "Treatment",
             "relatedAction": [{"actionId": "conditioning", "relationship": "after-end"},
                               {"actionId": "bridging", "relationship": "after-end"}],
             "definitionCanonical": _canonical("treatment"),
             "action": [
                 {"id": "infusion", "title": "Infusion",
                  "definitionCanonical": _canonical("infusion")},
                 {"id": "observation", "title": "Observation",
                  "relatedAction": [{"actionId": "infusion", "relationship": "after-end"}],
                  "definitionCanonical": _canonical("observation")},
             ]},
        ],
    }
    assert [a["id"] for a in compiled.activity_definitions] == [
        "demo-therapy-intake", "demo-therapy-manufacturing", "demo-therapy-bridging",
        "demo-therapy-conditioning", "demo-therapy-treatment", "demo-therapy-infusion",
        "demo-therapy-observation"]
    assert compiled.activity_definitions[1] == {
        "resourceType": "ActivityDefinition",
        "id": "demo-therapy-manufacturing",
        "url": f"{ATM}/ActivityDefinition/demo-therapy-manufacturing",
        "version": "2.1",
        "name": "DemoTherapyManufacturing",
        "title": "Manufacturing",
        "status": "active",
        "description": "The batch is made.",
        "kind": "ServiceRequest",
        "code": {"coding": [{"system": f"{ATM}/CodeSystem/stage", "code": "manufacturing",
                             "display": "Manufacturing"}]},
        "timingDuration": _duration(21, "d"),
        "participant": _role("manufacturer"),
    }
    assert compiled.activity_definitions[4] == {
        "resourceType": "ActivityDefinition",
        "id": "demo-therapy-treatment",
        "url": f"{ATM}/ActivityDefinition/demo-therapy-treatment",
        "version": "2.1",
        "name": "DemoTherapyTreatment",
        "title": "Treatment",
        "status": "active",
        "kind": "Appointment",
        "code": {"coding": [{"system": f"{ATM}/CodeSystem/stage", "code": "treatment",
                             "display": "Treatment"}]},
    }
    assert [fhir.validate(r) for r in compiled.resources()] == [[]] * 8


def test_without_a_version_canonicals_are_plain() -> None:
    compiled = compile_protocol("protocol: demo\nstages:\n  - id: a\n")
    assert "version" not in compiled.plan_definition
    assert compiled.plan_definition["action"] == [{
        "id": "a", "title": "A", "definitionCanonical": f"{ATM}/ActivityDefinition/demo-a"}]


def test_the_bundle_puts_every_resource_by_id() -> None:
    compiled = compile_protocol(SMALL)
    bundle = compiled.bundle()
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "transaction"
    assert [e["request"] for e in bundle["entry"]] == [
        {"method": "PUT", "url": "PlanDefinition/demo-therapy"},
        *({"method": "PUT", "url": f"ActivityDefinition/{a['id']}"}
          for a in compiled.activity_definitions)]
    assert [e["resource"] for e in bundle["entry"]] == compiled.resources()
    assert fhir.validate(bundle) == []


def _shipped(path: Path) -> CompiledProtocol:
    return compile_protocol(path.read_text(encoding="utf-8"), str(path))


def test_three_protocols_are_shipped() -> None:
    assert [p.name for p in SHIPPED] == ["allogeneic-cell-therapy.yaml",
                                         "car-t-autologous.yaml", "ex-vivo-gene-therapy.yaml"]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_protocol_compiles_to_valid_r4_resources(path: Path) -> None:
    compiled = _shipped(path)
    assert compiled.id == path.stem
    for resource in [*compiled.resources(), compiled.bundle()]:
        assert fhir.validate(resource) == [], resource.get("id")
    stages = compiled.protocol.all_stages()
    assert len(compiled.activity_definitions) == len(stages)
    assert any(stage.steps for stage in stages)
    assert all(stage.role is not None for stage in stages)


def test_car_t_follows_the_reference_journey() -> None:
    compiled = _shipped(next(p for p in SHIPPED if p.stem == "car-t-autologous"))
    actions = {a["id"]: a for a in compiled.plan_definition["action"]}
    assert {r["actionId"] for r in actions["manufacturer-approval"]["relatedAction"]} == {
        "eligibility", "consent", "benefits"}
    assert actions["qc-release"]["extension"] == [
        {"url": f"{ATM}/StructureDefinition/on-failure",
         "extension": [{"url": "back-to", "valueId": "apheresis"},
                       {"url": "max-repeats", "valueUnsignedInt": 2}]},
        {"url": f"{ATM}/StructureDefinition/custody-handoff",
         "extension": [{"url": "event", "valueCode": "release"},
                       {"url": "signature", "valueCode": "released"}]}]
    assert {"actionId": "infusion", "relationship": "before-start",
            "offsetDuration": _duration(2, "d")} in actions["lymphodepletion"]["relatedAction"]
    assert "condition" in actions["bridging"]
    assert [a["id"] for a in actions["apheresis"]["action"]] == [
        "identity-check", "collection", "labelling"]
    follow_ups = {k: a["relatedAction"][0]["offsetDuration"]["value"]
                  for k, a in actions.items() if k.startswith("follow-up")}
    assert follow_ups == {"follow-up-day-7": 7, "follow-up-day-14": 14,
                          "follow-up-day-28": 28, "follow-up-day-90": 90}
    assert actions["manufacturing"]["timingDuration"] == _duration(21, "d")


def test_the_example_in_the_format_guide_is_a_valid_protocol() -> None:
    from pathlib import Path

    from mappings.protocols import validate_protocol

    guide = (Path(__file__).resolve().parents[2] / "orchestration" / "PROTOCOLS.md").read_text()
    example = guide.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert validate_protocol(example) == []
