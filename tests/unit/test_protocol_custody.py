"""`assigns` and `custody` on a stage (orchestration/PROTOCOLS.md): each mistake at its
line, the FHIR form, and the frozen values the engine reads back from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway import fhir
from mappings.protocols import Problem, compile_protocol, validate_protocol
from orchestration.protocol import (
    Handoff,
    ProtocolFormError,
    SignatureRule,
    Stage,
    from_plan_definition,
)
from tests.factories.protocols import action, plan_definition

SHIPPED = sorted((Path(__file__).parents[2] / "orchestration" / "protocols").glob("*.yaml"))
ATM = "https://atm-gateway.org/fhir"
ASSIGNS = f"{ATM}/StructureDefinition/assigns"
HANDOFF = f"{ATM}/StructureDefinition/custody-handoff"

# Lines 1-2; the stages of each case start on line 3.
HEAD = "protocol: demo\nstages:\n"
EVENTS = ("collection, pick-up, hand-over, receipt-at-manufacturing, release, receipt-at-site, "
          "thaw, infusion")
MEANINGS = "released, received, verified, witnessed, performed"


def _stages(text: str) -> dict[str, Stage]:
    """The stages the engine reads back from the compiled protocol."""
    compiled = compile_protocol(HEAD + text)
    assert [fhir.validate(r) for r in compiled.resources()] == [[]] * len(compiled.resources())
    return from_plan_definition(compiled.plan_definition, compiled.activity_definitions).stages


GOOD: list[tuple[str, str, dict[str, Any]]] = [
    ("nothing", "  - id: a\n", {"a": ((), None)}),
    ("assigns", "  - id: a\n    assigns: chain-of-identity\n", {"a": ((), "chain-of-identity")}),
    ("assigns-on-a-step", "  - id: a\n    steps:\n      - id: b\n"
     "        assigns: chain-of-identity\n",
     {"a": ((), None), "b": ((), "chain-of-identity")}),
    ("one-handoff", "  - id: a\n    custody:\n      - event: collection\n"
     "        signatures: [performed]\n",
     {"a": ((Handoff("collection", ("performed",)),), None)}),
    ("no-signature-needed", "  - id: a\n    custody: [{event: thaw, signatures: []}]\n",
     {"a": ((Handoff("thaw", ()),), None)}),
    ("meanings-keep-their-order", "  - id: a\n    custody:\n      - event: infusion\n"
     "        signatures: [verified, performed, witnessed]\n",
     {"a": ((Handoff("infusion", ("verified", "performed", "witnessed")),), None)}),
    ("two-handoffs-and-overrides", """\
  - id: a
    assigns: chain-of-identity
    custody:
      - event: pick-up
        signatures: [released, received]
      - event: hand-over
        signatures: [released, received]
        where:
          - country: DE
            signatures: [released, received, verified]
          - site: Location/apheresis-berlin
            signatures: [released]
          - country: "NO"
            signatures: []
""", {"a": ((Handoff("pick-up", ("released", "received")),
             Handoff("hand-over", ("released", "received"), (
                 SignatureRule(("released", "received", "verified"), country="DE"),
                 SignatureRule(("released",), site="Location/apheresis-berlin"),
                 SignatureRule((), country="NO")))),
            "chain-of-identity")}),
    ("norway-unquoted", "  - id: a\n    custody:\n      - event: thaw\n        signatures: []\n"
     "        where: [{country: NO, signatures: [witnessed]}]\n",
     {"a": ((Handoff("thaw", (), (SignatureRule(("witnessed",), country="NO"),)),), None)}),
    ("same-event-on-two-stages", "  - id: a\n    custody: [{event: pick-up, signatures: []}]\n"
     "  - id: b\n    custody: [{event: pick-up, signatures: [received]}]\n",
     {"a": ((Handoff("pick-up", ()),), None),
      "b": ((Handoff("pick-up", ("received",)),), None)}),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in GOOD],
                         ids=[name for name, _, _ in GOOD])
def test_good_forms_compile_and_read_back(text: str, expected: dict[str, Any]) -> None:
    stages = _stages(text)
    assert {k: (s.handoffs, s.assigns) for k, s in stages.items()} == expected


def test_the_fhir_form_of_assigns_and_custody() -> None:
    compiled = compile_protocol(HEAD + GOOD[6][1])
    assert compiled.plan_definition["action"][0]["extension"] == [
        {"url": ASSIGNS, "valueCode": "chain-of-identity"},
        {"url": HANDOFF, "extension": [
            {"url": "event", "valueCode": "pick-up"},
            {"url": "signature", "valueCode": "released"},
            {"url": "signature", "valueCode": "received"}]},
        {"url": HANDOFF, "extension": [
            {"url": "event", "valueCode": "hand-over"},
            {"url": "signature", "valueCode": "released"},
            {"url": "signature", "valueCode": "received"},
            {"url": "where", "extension": [
                {"url": "country", "valueCode": "DE"},
                {"url": "signature", "valueCode": "released"},
                {"url": "signature", "valueCode": "received"},
                {"url": "signature", "valueCode": "verified"}]},
            {"url": "where", "extension": [
                {"url": "site", "valueReference": {"reference": "Location/apheresis-berlin"}},
                {"url": "signature", "valueCode": "released"}]},
            {"url": "where", "extension": [{"url": "country", "valueCode": "NO"}]}]},
    ]
    assert "extension" not in compiled.activity_definitions[0]


HAND_OVER = Handoff("hand-over", ("released", "received"), (
    SignatureRule(("released", "received", "verified"), country="DE"),
    SignatureRule(("released",), site="Location/apheresis-berlin"),
    SignatureRule(("witnessed",), site="Location/apheresis-munich"),
    SignatureRule(("performed",), country="FR"),
))


@pytest.mark.parametrize(("country", "site", "expected"), [
    (None, None, ("released", "received")),
    ("NL", "Location/elsewhere", ("released", "received")),
    ("DE", None, ("released", "received", "verified")),
    ("de", None, ("released", "received", "verified")),
    (None, "Location/apheresis-berlin", ("released",)),
    ("NL", "Location/apheresis-berlin", ("released",)),
    # first match wins: the country rule comes before the site rule
    ("DE", "Location/apheresis-berlin", ("released", "received", "verified")),
    ("DE", "Location/apheresis-munich", ("released", "received", "verified")),
    ("FR", "Location/apheresis-munich", ("witnessed",)),
    ("FR", None, ("performed",)),
    (None, "apheresis-berlin", ("released", "received")),
], ids=["default", "no-match", "country", "country-lower-case", "site", "site-not-country",
        "country-first", "country-before-later-site", "site-before-later-country",
        "later-country", "site-needs-location-prefix"])
def test_required_picks_the_first_matching_override(country: str | None, site: str | None,
                                                    expected: tuple[str, ...]) -> None:
    assert HAND_OVER.required(country, site) == expected


def test_stage_handoff_finds_an_event() -> None:
    stage = _stages(GOOD[6][1])["a"]
    assert stage.handoff("pick-up") == Handoff("pick-up", ("released", "received"))
    assert stage.handoff("hand-over") is stage.handoffs[1]
    assert stage.handoff("thaw") is None


CUSTODY = "  - id: a\n    custody:\n"  # lines 3-4; entries start on line 5

PROBLEMS = [
    ("assigns-unknown", "  - id: a\n    assigns: batch-number\n",
     [(4, "`assigns` must be chain-of-identity, not 'batch-number'")]),
    ("assigns-list", "  - id: a\n    assigns: [chain-of-identity]\n",
     [(4, "`assigns` must be text, not a list")]),
    ("assigns-twice", "  - id: a\n    assigns: chain-of-identity\n  - id: b\n    steps:\n"
     "      - id: c\n        assigns: chain-of-identity\n",
     [(8, "`assigns`: chain-of-identity is already assigned by stage 'a' (line 4); only "
          "one stage may assign it")]),
    ("custody-not-a-list", "  - id: a\n    custody: {event: thaw, signatures: []}\n",
     [(4, "`custody` must be a list of handoffs, each with an `event` and its "
          "`signatures`")]),
    ("entry-not-a-mapping", CUSTODY + "      - thaw\n",
     [(5, "a `custody` entry must be a mapping")]),
    ("unknown-key", CUSTODY + "      - event: thaw\n        signatures: []\n"
     "        signers: [performed]\n",
     [(7, "unknown key `signers` in a `custody` entry (did you mean `signatures`?)")]),
    ("unknown-stage-key", "  - id: a\n    chain-of-custody: []\n",
     [(4, "unknown key `chain-of-custody` in stage 'a' (did you mean `custody`?)")]),
    ("unknown-stage-key-far", "  - id: a\n    handoffs: []\n",
     [(4, "unknown key `handoffs` in stage 'a' (expected one of: id, title, description, "
          "kind, role, deadline, after, ends-before, when, escalate, on-failure, assigns, "
          "custody, books, steps)")]),
    ("unknown-event", CUSTODY + "      - event: pickup\n        signatures: []\n",
     [(5, "`event`: unknown custody event 'pickup' (did you mean `pick-up`?)")]),
    ("unknown-event-far", CUSTODY + "      - signatures: []\n        event: storage\n",
     [(6, f"`event`: unknown custody event 'storage' (expected one of: {EVENTS})")]),
    ("missing-event", CUSTODY + "      - signatures: [released]\n",
     [(5, "a `custody` entry needs an `event`")]),
    ("missing-signatures", CUSTODY + "      - event: thaw\n",
     [(5, "a `custody` entry needs `signatures` (write [] when none is needed)")]),
    ("signatures-not-a-list", CUSTODY + "      - event: thaw\n        signatures: performed\n",
     [(6, "`signatures` must be a list of signature meanings (write [] when none is "
          "needed), not text")]),
    ("duplicate-event", CUSTODY + "      - event: pick-up\n        signatures: []\n"
     "      - event: release\n        signatures: []\n"
     "      - event: pick-up\n        signatures: [released]\n",
     [(9, "custody event 'pick-up' is given twice in stage 'a' (first at line 5)")]),
    ("unknown-meaning", CUSTODY + "      - event: pick-up\n        signatures:\n"
     "          - released\n          - signed\n",
     [(8, f"`signatures`: unknown signature meaning 'signed' (expected one of: {MEANINGS})")]),
    ("unknown-meaning-close", CUSTODY + "      - event: pick-up\n"
     "        signatures: [released, recieved]\n",
     [(6, "`signatures`: unknown signature meaning 'recieved' (did you mean `received`?)")]),
    ("duplicate-meaning", CUSTODY + "      - event: pick-up\n        signatures:\n"
     "          - released\n          - received\n          - released\n",
     [(9, "`signatures`: 'released' is given twice")]),
    ("where-not-a-list", CUSTODY + "      - event: thaw\n        signatures: []\n"
     "        where: {country: DE, signatures: [witnessed]}\n",
     [(7, "`where` must be a list of overrides, each with a `country` or a `site` and its "
          "`signatures`")]),
    ("both-country-and-site", CUSTODY + "      - event: thaw\n        signatures: []\n"
     "        where:\n          - country: DE\n            site: Location/berlin\n"
     "            signatures: [witnessed]\n",
     [(8, "a `where` entry names a `country` or a `site`, not both")]),
    ("neither-country-nor-site", CUSTODY + "      - event: thaw\n        signatures: []\n"
     "        where:\n          - country: DE\n            signatures: [witnessed]\n"
     "          - signatures: [verified]\n",
     [(10, "a `where` entry needs a `country` (ISO 3166 alpha-2) or a `site` "
           "(Location/<id>)")]),
    ("bad-country-lower-case", CUSTODY + "      - event: thaw\n        signatures: []\n"
     "        where:\n          - country: de\n            signatures: [witnessed]\n",
     [(8, "`country` 'de' must be an ISO 3166 alpha-2 code: two upper-case letters, such "
          "as DE")]),
    ("bad-country-alpha-3", CUSTODY + "      - event: thaw\n        signatures: []\n"
     "        where:\n          - signatures: [witnessed]\n            country: DEU\n",
     [(9, "`country` 'DEU' must be an ISO 3166 alpha-2 code: two upper-case letters, such "
          "as DE")]),
    ("bad-site-not-a-reference", CUSTODY + "      - event: thaw\n        signatures: []\n"
     "        where:\n          - site: apheresis-berlin\n            signatures: []\n",
     [(8, "`site` 'apheresis-berlin' must be a Location reference: Location/ and an id of "
          "1 to 64 letters, digits, '-' or '.'")]),
    ("bad-site-organization", CUSTODY + "      - event: thaw\n        signatures: []\n"
     "        where:\n          - signatures: []\n            site: Organization/berlin\n",
     [(9, "`site` 'Organization/berlin' must be a Location reference: Location/ and an id "
          "of 1 to 64 letters, digits, '-' or '.'")]),
    ("bad-site-id", CUSTODY + "      - event: thaw\n        signatures: []\n"
     "        where: [{site: Location/apheresis_berlin, signatures: []}]\n",
     [(7, "`site` 'Location/apheresis_berlin' must be a Location reference: Location/ and "
          "an id of 1 to 64 letters, digits, '-' or '.'")]),
    ("where-missing-signatures", CUSTODY + "      - event: thaw\n        signatures: []\n"
     "        where:\n          - country: DE\n",
     [(8, "a `where` entry needs `signatures` (write [] when none is needed)")]),
    ("where-unknown-key", CUSTODY + "      - event: thaw\n        signatures: []\n"
     "        where:\n          - region: EU\n            country: DE\n"
     "            signatures: []\n",
     [(8, "unknown key `region` in a `where` entry (expected one of: country, site, "
          "signatures)")]),
    ("where-unknown-meaning", CUSTODY + "      - event: thaw\n        signatures: []\n"
     "        where:\n          - country: DE\n            signatures: [notarised]\n",
     [(9, f"`signatures`: unknown signature meaning 'notarised' (expected one of: "
          f"{MEANINGS})")]),
    ("where-same-country-twice", CUSTODY + "      - event: thaw\n        signatures: []\n"
     "        where:\n          - country: DE\n            signatures: [witnessed]\n"
     "          - country: DE\n            signatures: []\n",
     [(10, "`where`: country 'DE' is given twice (first at line 8; only the first match "
           "applies)")]),
    ("every-mistake-in-one-entry", CUSTODY + "      - event: unpacking\n"
     "        signatures: [released, released, sealed]\n"
     "        where:\n          - country: Germany\n            site: Berlin\n"
     "            signatures: []\n",
     [(5, f"`event`: unknown custody event 'unpacking' (expected one of: {EVENTS})"),
      (6, "`signatures`: 'released' is given twice"),
      (6, f"`signatures`: unknown signature meaning 'sealed' (expected one of: {MEANINGS})"),
      (8, "`country` 'Germany' must be an ISO 3166 alpha-2 code: two upper-case letters, "
          "such as DE"),
      (8, "a `where` entry names a `country` or a `site`, not both"),
      (9, "`site` 'Berlin' must be a Location reference: Location/ and an id of 1 to 64 "
          "letters, digits, '-' or '.'")]),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in PROBLEMS],
                         ids=[name for name, _, _ in PROBLEMS])
def test_each_custody_problem_is_reported_at_its_line(text: str,
                                                      expected: list[tuple[int, str]]) -> None:
    assert validate_protocol(HEAD + text, "demo.yaml") == [
        Problem(line, message) for line, message in expected]


def _handoff(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"url": HANDOFF, "extension": list(parts)}


def _code(url: str, code: str) -> dict[str, Any]:
    return {"url": url, "valueCode": code}


def _with(*extensions: dict[str, Any]) -> dict[str, Any]:
    return {**action("a"), "extension": list(extensions)}


EVENT = _code("event", "thaw")

FORM_ERRORS = [
    ("assigns-unknown", [_with(_code(ASSIGNS, "batch"))],
     "action a: assigns has valueCode 'batch'; supported: chain-of-identity"),
    ("assigns-without-code", [_with({"url": ASSIGNS})],
     "action a: assigns has valueCode None"),
    ("assigns-twice", [_with(_code(ASSIGNS, "chain-of-identity")),
                       {**action("b"), "extension": [_code(ASSIGNS, "chain-of-identity")]}],
     "actions a, b all assign the chain of identity; one at most may"),
    ("no-event", [_with(_handoff(_code("signature", "released")))],
     "action a: custody-handoff needs one event"),
    ("two-events", [_with(_handoff(EVENT, _code("event", "infusion")))],
     "action a: custody-handoff needs one event"),
    ("unknown-part", [_with(_handoff(EVENT, _code("signer", "released")))],
     r"action a: custody-handoff needs one event \(unknown: signer\)"),
    ("unknown-event", [_with(_handoff(_code("event", "storage")))],
     "action a: event has valueCode 'storage'; supported: collection, pick-up"),
    ("unknown-meaning", [_with(_handoff(EVENT, _code("signature", "signed")))],
     "action a custody-handoff thaw: signature has valueCode 'signed'; supported: released"),
    ("duplicate-meaning", [_with(_handoff(EVENT, _code("signature", "performed"),
                                          _code("signature", "performed")))],
     "action a custody-handoff thaw: a signature meaning is given twice"),
    ("duplicate-event", [_with(_handoff(EVENT), _handoff(EVENT))],
     "action a: custody-handoff thaw is given twice"),
    ("where-both", [_with(_handoff(EVENT, {"url": "where", "extension": [
        _code("country", "DE"), {"url": "site", "valueReference": {"reference": "Location/x"}}]}))],
     "action a custody-handoff thaw: a where needs one country or one site"),
    ("where-neither", [_with(_handoff(EVENT, {"url": "where", "extension": [
        _code("signature", "witnessed")]}))],
     "action a custody-handoff thaw: a where needs one country or one site"),
    ("where-bad-country", [_with(_handoff(EVENT, {"url": "where", "extension": [
        _code("country", "Deutschland")]}))],
     "action a custody-handoff thaw: where country 'Deutschland' is not an ISO 3166"),
    ("where-bad-site", [_with(_handoff(EVENT, {"url": "where", "extension": [
        {"url": "site", "valueReference": {"reference": "Organization/x"}}]}))],
     "action a custody-handoff thaw: where site 'Organization/x' is not a Location"),
    ("where-site-without-reference", [_with(_handoff(EVENT, {"url": "where", "extension": [
        {"url": "site", "valueString": "Location/x"}]}))],
     "action a custody-handoff thaw: where site None is not a Location"),
]


@pytest.mark.parametrize(("actions", "message"), [(a, m) for _, a, m in FORM_ERRORS],
                         ids=[name for name, _, _ in FORM_ERRORS])
def test_a_malformed_extension_is_refused(actions: list[dict[str, Any]], message: str
                                          ) -> None:
    with pytest.raises(ProtocolFormError, match=message):
        from_plan_definition(plan_definition(*actions))


def _read_back(path: Path) -> dict[str, Stage]:
    compiled = compile_protocol(path.read_text(encoding="utf-8"), str(path))
    return from_plan_definition(compiled.plan_definition, compiled.activity_definitions).stages


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_each_shipped_protocol_assigns_the_chain_of_identity_once(path: Path) -> None:
    stages = _read_back(path)
    assert [s.assigns for s in stages.values() if s.assigns] == ["chain-of-identity"]
    assert stages["receipt"].handoff("receipt-at-site") == Handoff(
        "receipt-at-site", ("released", "received"))


def test_car_t_records_custody_from_collection_to_infusion() -> None:
    stages = _read_back(next(p for p in SHIPPED if p.stem == "car-t-autologous"))
    assert stages["coi-assignment"].assigns == "chain-of-identity"
    both = ("released", "received")
    assert {k: s.handoffs for k, s in stages.items() if s.handoffs} == {
        "collection": (Handoff("collection", ("performed",)),),
        "shipment-to-manufacturer": (Handoff("pick-up", both),
                                     Handoff("receipt-at-manufacturing", both)),
        "qc-release": (Handoff("release", ("released",)),),
        "shipment-to-treatment-centre": (Handoff("pick-up", both),),
        "receipt": (Handoff("receipt-at-site", both),),
        "infusion": (Handoff("thaw", ("performed",)),
                     Handoff("infusion", ("performed", "verified"), (
                         SignatureRule(("performed", "verified", "witnessed"), country="DE"),
                     ))),
    }
    infusion = stages["infusion"].handoff("infusion")
    assert infusion is not None
    assert infusion.required("DE", None) == ("performed", "verified", "witnessed")
    assert infusion.required("FR", "Location/any") == ("performed", "verified")
