"""Chain of identity and chain of custody, end to end over the FHIR API (SQLite and
PostgreSQL): codes assigned, carried and kept; signed handoffs verified on receipt and on
demand; a wrong scan stopping the step; tampering and moved signatures detected; the
signature policy per step and country; excursions; the custody report."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from gateway.custody import coi
from gateway.settings import Settings
from gateway.store.database import Database
from mappings import isbt128
from tests.conftest import client_with
from tests.integration.custody_support import (
    FHIR,
    Enrolment,
    enrol,
    post,
    put,
)


@pytest.fixture
def server(settings: Settings) -> Iterator[TestClient]:
    with client_with(settings, load_protocols=True) as client:
        yield client


@pytest.fixture
def enrolment(server: TestClient, db: Database, settings: Settings) -> Enrolment:
    return enrol(server, db, settings, countries={"berlin": "DE"})


def params(resource: dict[str, Any]) -> dict[str, Any]:
    return {p["name"]: p for p in resource["parameter"]}


def outcome_text(response: Any) -> str:
    return " ".join(i["diagnostics"] for i in response.json()["issue"])


# -- chain of identity ------------------------------------------------------------------
def test_the_code_is_assigned_once_and_carried(enrolment: Enrolment, db: Database,
                                               settings: Settings) -> None:
    code = enrolment.code
    assert isbt128.parse(code).value == code  # well formed, check character right
    assert code.startswith(settings.coi_facility)
    careplan = enrolment.read(f"CarePlan/{enrolment.careplan['id']}")
    patient = enrolment.read(f"Patient/{enrolment.patient['id']}")
    assert coi.coi_of(careplan) == coi.coi_of(patient) == code
    task = enrolment.task("shipment-to-manufacturer")
    assert coi.coi_of(task) == code  # made for the enrolment: given its code
    request = post(enrolment.client, {
        "resourceType": "ServiceRequest", "status": "active", "intent": "order",
        "subject": {"reference": f"Patient/{enrolment.patient['id']}"},
        "basedOn": [{"reference": f"CarePlan/{enrolment.careplan['id']}"}]})
    ordered = {"reference": f"ServiceRequest/{request['id']}"}
    specimen = post(enrolment.client, {"resourceType": "Specimen", "request": [ordered]})
    assert coi.coi_of(request) == coi.coi_of(specimen) == code
    found = enrolment.client.get("/fhir/Task", params={
        "identifier": f"{coi.COI_SYSTEM}|{code}"}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [task["id"]]
    other = enrol(enrolment.client, db, settings)  # the next enrolment: the next number
    assert isbt128.parse(other.code).sequence == isbt128.parse(code).sequence + 1


def test_a_code_cannot_be_changed_removed_or_invented(enrolment: Enrolment) -> None:
    task = enrolment.task("shipment-to-manufacturer")
    client = enrolment.client
    removed = {**task, "identifier": [i for i in task["identifier"]
                                      if i.get("system") != coi.COI_SYSTEM]}
    response = client.put(f"/fhir/Task/{task['id']}", json=removed, headers=FHIR)
    assert response.status_code == 422
    assert "cannot be changed or removed" in outcome_text(response)
    other = isbt128.make(isbt128.parse(enrolment.code).facility, 26, 999_999).value
    changed = coi.carrying(removed, other)
    assert client.put(f"/fhir/Task/{task['id']}", json=changed,
                      headers=FHIR).status_code == 422
    invented = post(client, {"resourceType": "Patient"})
    response = client.put(f"/fhir/Patient/{invented['id']}",
                          json=coi.carrying(invented, other), headers=FHIR)
    assert response.status_code == 422 and "never assigned" in outcome_text(response)
    theirs = coi.carrying(invented, enrolment.code)  # another patient's code
    response = client.put(f"/fhir/Patient/{invented['id']}", json=theirs, headers=FHIR)
    assert response.status_code == 422 and "belongs to another" in outcome_text(response)
    bad_check = enrolment.code[:-1] + ("0" if enrolment.code[-1] != "0" else "1")
    response = client.post("/fhir/Specimen", json={
        "resourceType": "Specimen", "identifier": [{"system": coi.COI_SYSTEM,
                                                    "value": bad_check}]}, headers=FHIR)
    assert response.status_code == 422 and "check character" in outcome_text(response)
    kept = put(client, {**task, "status": "in-progress", "note": [{"text": "on the way"}]})
    assert coi.coi_of(kept) == enrolment.code  # an update that keeps it passes
    assert enrolment.read(f"Task/{task['id']}")["meta"]["versionId"] == "2"


# -- signed handoffs ----------------------------------------------------------------------
def test_a_signed_handoff_is_stored_and_verifies(enrolment: Enrolment) -> None:
    product, task = enrolment.product(), enrolment.task("shipment-to-manufacturer")
    provenance = enrolment.handoff("pick-up", product, task, releasing="apheresis",
                                   receiving="courier",
                                   signers=[("apheresis", "released"), ("courier", "received")])
    stored = post(enrolment.client, provenance)
    assert [s["who"]["display"] for s in stored["signature"]] == ["Sam Apheresis",
                                                                  "Sam Courier"]
    checked = enrolment.client.get(f"/fhir/Provenance/{stored['id']}/$verify-signatures")
    assert checked.status_code == 200
    assert params(checked.json())["verified"]["valueBoolean"] is True


def test_the_dual_signature_policy_is_enforced(enrolment: Enrolment) -> None:
    product, task = enrolment.product(), enrolment.task("shipment-to-manufacturer")
    for signers, wanted in [
            ([("apheresis", "released")], "missing: received"),
            ([], "missing: released, received"),
            ([("courier", "released"), ("courier", "received")], "another signer")]:
        provenance = enrolment.handoff("pick-up", product, task, releasing="apheresis",
                                       receiving="courier", signers=signers)
        response = enrolment.client.post("/fhir/Provenance", json=provenance, headers=FHIR)
        assert response.status_code == 422, response.text
        assert wanted in outcome_text(response)
    assert enrolment.client.get("/fhir/Provenance", params={
        "target": f"Task/{task['id']}"}).json()["entry"] == []


def test_the_policy_follows_the_country(enrolment: Enrolment) -> None:
    """Infusion needs performed and verified; in Germany a witness as well."""
    product, task = enrolment.product(), enrolment.task("infusion", owner="centre")
    two = [("nurse", "performed"), ("centre", "verified")]
    here = enrolment.handoff("infusion", product, task, releasing="centre", receiving=None,
                             signers=two, location="bedside")
    assert enrolment.client.post("/fhir/Provenance", json=here,
                                 headers=FHIR).status_code == 201
    there = enrolment.handoff("infusion", product, task, releasing="centre", receiving=None,
                              signers=two, location="berlin", at="2026-11-21T10:00:00Z")
    response = enrolment.client.post("/fhir/Provenance", json=there, headers=FHIR)
    assert response.status_code == 422 and "missing: witnessed" in outcome_text(response)
    witnessed = enrolment.handoff("infusion", product, task, releasing="centre",
                                  receiving=None, location="berlin",
                                  signers=[*two, ("manufacturer", "witnessed")],
                                  at="2026-11-21T10:00:00Z")
    assert enrolment.client.post("/fhir/Provenance", json=witnessed,
                                 headers=FHIR).status_code == 201


def test_an_invalid_signature_is_refused(enrolment: Enrolment) -> None:
    product, task = enrolment.product(), enrolment.task("shipment-to-manufacturer")
    provenance = enrolment.handoff("pick-up", product, task, releasing="apheresis",
                                   receiving="courier",
                                   signers=[("apheresis", "released"), ("courier", "received")])
    provenance["occurredDateTime"] = "2026-11-20T11:00:00Z"  # changed after signing
    response = enrolment.client.post("/fhir/Provenance", json=provenance, headers=FHIR)
    assert response.status_code == 422
    assert "made for another record" in outcome_text(response)
    assert response.json()["issue"][0]["expression"] == ["Provenance.signature[0]"]
    forged = enrolment.handoff("pick-up", product, task, releasing="apheresis",
                               receiving="courier",
                               signers=[("apheresis", "released"), ("courier", "received")])
    forged["signature"][1]["who"] = enrolment.parties["apheresis"].who  # not the signer's
    response = enrolment.client.post("/fhir/Provenance", json=forged, headers=FHIR)
    assert response.status_code == 422, response.text
    garbage = {**forged, "signature": [{**forged["signature"][0], "data": "bm90IGEgSldT"}]}
    response = enrolment.client.post("/fhir/Provenance", json=garbage, headers=FHIR)
    assert response.status_code == 422 and "not a base64 JWS" in outcome_text(response)


def test_a_moved_signature_fails(enrolment: Enrolment) -> None:
    product, task = enrolment.product(), enrolment.task("shipment-to-manufacturer")
    signers = [("apheresis", "released"), ("courier", "received")]
    first = post(enrolment.client, enrolment.handoff(
        "pick-up", product, task, releasing="apheresis", receiving="courier",
        signers=signers))
    second = enrolment.handoff("receipt-at-manufacturing", product, task,
                               releasing="courier", receiving="manufacturer",
                               signers=[("courier", "released"), ("manufacturer", "received")],
                               at="2026-11-20T18:00:00Z", location="manufacturing")
    second["signature"] = first["signature"]  # copied from the earlier record
    response = enrolment.client.post("/fhir/Provenance", json=second, headers=FHIR)
    assert response.status_code == 422
    assert "made for another record" in outcome_text(response)


def test_tampering_with_a_signed_version_is_detected(enrolment: Enrolment,
                                                    db: Database) -> None:
    product, task = enrolment.product(), enrolment.task("shipment-to-manufacturer")
    stored = post(enrolment.client, enrolment.handoff(
        "pick-up", product, task, releasing="apheresis", receiving="courier",
        signers=[("apheresis", "released"), ("courier", "received")]))
    with db.write() as conn:  # someone with database access edits the signed version
        for table in ("resource_history", "resources"):
            row = conn.execute(text(f"SELECT content FROM {table} WHERE res_type = 'Task' "
                                    "AND res_id = :i AND version = 1"),
                               {"i": task["id"]}).first()
            if row is not None:
                content = bytes(row[0]).replace(b'"in-progress"', b'"completed"')
                conn.execute(text(f"UPDATE {table} SET content = :c WHERE res_type = 'Task' "
                                  "AND res_id = :i AND version = 1"),
                             {"c": content, "i": task["id"]})
    checked = enrolment.client.get(f"/fhir/Provenance/{stored['id']}/$verify-signatures")
    found = params(checked.json())
    assert found["verified"]["valueBoolean"] is False
    problems = [p["valueString"] for s in checked.json()["parameter"] if s["name"] == "signature"
                for p in s["part"] if p["name"] == "problem"]
    assert problems and all("has changed" in p for p in problems)
    report = enrolment.client.get(
        f"/fhir/CarePlan/{enrolment.careplan['id']}/$custody-report").json()
    assert params(report["entry"][0]["resource"])["verified"]["valueBoolean"] is False


# -- a wrong scan stops the step ---------------------------------------------------------------
@pytest.mark.parametrize("scan", ["other", "bad-check"])
def test_a_wrong_scan_stops_the_step(enrolment: Enrolment, scan: str) -> None:
    product, task = enrolment.product(), enrolment.task("shipment-to-manufacturer")
    parsed = isbt128.parse(enrolment.code)
    scanned = (isbt128.make(parsed.facility, parsed.year, parsed.sequence + 7).eye_readable
               if scan == "other" else coi.eye_readable(enrolment.code)[:-1] + "*")
    provenance = enrolment.handoff("pick-up", product, task, releasing="apheresis",
                                   receiving="courier", scanned=scanned,
                                   signers=[("apheresis", "released"), ("courier", "received")])
    response = enrolment.client.post("/fhir/Provenance", json=provenance, headers=FHIR)
    assert response.status_code == 422
    said = outcome_text(response)
    assert ("mismatch" in said) if scan == "other" else ("check character" in said)
    held = enrolment.read(f"Task/{task['id']}")
    assert held["status"] == "on-hold"
    assert held["statusReason"]["text"].startswith(("chain of identity mismatch",
                                                    "the scanned chain of identity"))
    flags = enrolment.client.get("/fhir/Flag", params={
        "patient": f"Patient/{enrolment.patient['id']}"}).json()["entry"]
    assert [f["resource"]["category"][0]["coding"][0]["code"] for f in flags] == ["safety"]
    told = enrolment.client.get("/fhir/Communication", params={
        "based-on": f"CarePlan/{enrolment.careplan['id']}"}).json()["entry"]
    recipients = {r["reference"] for r in told[0]["resource"]["recipient"]}
    assert {"Organization/centre", "Organization/manufacturer"} <= recipients
    assert enrolment.client.get("/fhir/Provenance", params={
        "target": f"Task/{task['id']}"}).json()["entry"] == []  # the handoff was not stored


def test_a_handoff_without_a_scan_is_refused_and_changes_nothing(enrolment: Enrolment) -> None:
    product, task = enrolment.product(), enrolment.task("shipment-to-manufacturer")
    provenance = enrolment.handoff("pick-up", product, task, releasing="apheresis",
                                   receiving="courier",
                                   signers=[("apheresis", "released"), ("courier", "received")])
    provenance.pop("extension")
    response = enrolment.client.post("/fhir/Provenance", json=provenance, headers=FHIR)
    assert response.status_code == 422 and "scanned" in outcome_text(response)
    assert enrolment.read(f"Task/{task['id']}")["status"] == "in-progress"


INCOMPLETE: list[tuple[Callable[[dict[str, Any]], Any], str]] = [
    (lambda p: p.update(target=[{"reference": p["target"][0]["reference"].split("/_history")[0]},
                                p["target"][1]]), "exact versions"),
    (lambda p: p.update(target=p["target"][:1]), "one custody Task"),
    (lambda p: p["activity"]["coding"][0].update(code="teleport"), "not a custody event"),
    (lambda p: p["activity"]["coding"][0].update(code="thaw"), "records no 'thaw'"),
    (lambda p: p.pop("occurredDateTime"), "occurredDateTime"),
]


def test_incomplete_handoffs_are_refused(enrolment: Enrolment) -> None:
    product, task = enrolment.product(), enrolment.task("shipment-to-manufacturer")
    for change, wanted in INCOMPLETE:
        provenance = enrolment.handoff("pick-up", product, task, releasing="apheresis",
                                       receiving="courier",
                                       signers=[("apheresis", "released"),
                                                ("courier", "received")])
        change(provenance)
        response = enrolment.client.post("/fhir/Provenance", json=provenance, headers=FHIR)
        assert response.status_code == 422, response.text
        assert wanted in outcome_text(response)


def test_custody_records_are_never_changed_or_deleted(enrolment: Enrolment) -> None:
    product, task = enrolment.product(), enrolment.task("shipment-to-manufacturer")
    stored = post(enrolment.client, enrolment.handoff(
        "pick-up", product, task, releasing="apheresis", receiving="courier",
        signers=[("apheresis", "released"), ("courier", "received")]))
    changed = {**stored, "occurredDateTime": "2026-11-19T10:00:00Z"}
    response = enrolment.client.put(f"/fhir/Provenance/{stored['id']}", json=changed,
                                    headers=FHIR)
    assert response.status_code == 405
    assert enrolment.client.delete(f"/fhir/Provenance/{stored['id']}").status_code == 405
    assert enrolment.read(f"Provenance/{stored['id']}")["meta"]["versionId"] == "1"


# -- temperature ---------------------------------------------------------------------------------
def test_an_excursion_raises_a_flag_and_an_escalation(enrolment: Enrolment) -> None:
    product = enrolment.product()
    reading = {"resourceType": "Observation", "status": "final",
               "code": {"coding": [{"system": "https://atm-gateway.org/fhir/CodeSystem/"
                                              "custody-observation",
                                    "code": "shipment-temperature"}]},
               "focus": [{"reference": f"BiologicallyDerivedProduct/{product['id']}"}],
               "effectiveDateTime": "2026-11-20T12:00:00Z"}
    post(enrolment.client, {**reading, "valueQuantity": {"value": -160, "unit": "Cel",
                                                         "code": "Cel"}})
    assert enrolment.client.get("/fhir/Flag").json()["entry"] == []  # within range
    summary = post(enrolment.client, {**reading, "effectiveDateTime": "2026-11-20T13:00:00Z",
                                      "component": [{"code": {"text": "logger"},
                                                     "valueRange": {
                                                         "low": {"value": -170, "code": "Cel"},
                                                         "high": {"value": -120, "code": "Cel"}}}]})
    flags = enrolment.client.get("/fhir/Flag").json()["entry"]
    assert len(flags) == 1
    flag = flags[0]["resource"]
    assert flag["subject"]["reference"] == f"Patient/{enrolment.patient['id']}"
    assert "-170 to -120 Cel" in flag["code"]["text"] and "-196 to -135 Cel" in flag["code"]["text"]
    told = enrolment.client.get("/fhir/Communication").json()["entry"]
    assert {"Organization/centre", "Organization/manufacturer", "Organization/courier"} <= {
        r["reference"] for r in told[0]["resource"]["recipient"]}
    report = enrolment.client.get(
        f"/fhir/BiologicallyDerivedProduct/{product['id']}/$custody-report").json()
    found = [p for p in report["entry"][0]["resource"]["parameter"] if p["name"] == "excursion"]
    assert [p["part"][0]["valueReference"]["reference"] for p in found] == [
        f"Observation/{summary['id']}"]


# -- the report ---------------------------------------------------------------------------------
def full_chain(enrolment: Enrolment) -> dict[str, Any]:
    """Every handoff of the CAR-T journey, signed as the protocol asks; the product."""
    collected = post(enrolment.client, {"resourceType": "Specimen",
                                        "identifier": [{"system": coi.COI_SYSTEM,
                                                        "value": enrolment.code}]})
    product = enrolment.product()
    steps = [
        ("collection", collected, "collection", None, "apheresis", "apheresis",
         [("apheresis", "performed")], "2026-11-01T08:00:00Z", "apheresis"),
        ("pick-up", collected, "shipment-to-manufacturer", "apheresis", "courier",
         "courier", [("apheresis", "released"), ("courier", "received")],
         "2026-11-01T12:00:00Z", "apheresis"),
        ("receipt-at-manufacturing", collected, "shipment-to-manufacturer", "courier",
         "manufacturer", "courier", [("courier", "released"), ("manufacturer", "received")],
         "2026-11-02T09:00:00Z", "manufacturing"),
        ("release", product, "qc-release", "manufacturer", "manufacturer", "manufacturer",
         [("manufacturer", "released")], "2026-11-16T09:00:00Z", "manufacturing"),
        ("pick-up", product, "shipment-to-treatment-centre", "manufacturer", "courier",
         "courier", [("manufacturer", "released"), ("courier", "received")],
         "2026-11-16T15:00:00Z", "manufacturing"),
        ("receipt-at-site", product, "receipt", "courier", "centre", "centre",
         [("courier", "released"), ("centre", "received")], "2026-11-17T10:00:00Z",
         "bedside"),
        ("thaw", product, "infusion", "centre", "centre", "centre",
         [("nurse", "performed")], "2026-11-19T09:30:00Z", "bedside"),
        ("infusion", product, "infusion", "centre", None, "centre",
         [("nurse", "performed"), ("centre", "verified")], "2026-11-19T10:00:00Z",
         "bedside"),
    ]
    for event, item, stage, releasing, receiving, owner, signers, at, place in steps:
        task = enrolment.task(stage, owner=owner)
        post(enrolment.client, enrolment.handoff(event, item, task, releasing=releasing,
                                                 receiving=receiving, signers=signers,
                                                 at=at, location=place))
    return product


def test_the_report_shows_every_handoff_signed_and_verified(enrolment: Enrolment) -> None:
    product = full_chain(enrolment)
    client = enrolment.client
    by_plan = client.get(f"/fhir/CarePlan/{enrolment.careplan['id']}/$custody-report")
    by_product = client.get(f"/fhir/BiologicallyDerivedProduct/{product['id']}/$custody-report")
    assert by_plan.status_code == by_product.status_code == 200
    assert by_plan.headers["content-type"].startswith("application/fhir+json")
    bundle = by_plan.json()
    assert bundle["type"] == "collection"
    found = params(bundle["entry"][0]["resource"])
    assert found["verified"]["valueBoolean"] is True, bundle["entry"][0]["resource"]
    assert found["chain-of-identity"]["valueIdentifier"]["value"] == enrolment.code
    assert found["vein-to-vein"]["valueQuantity"]["value"] == 18 * 24 + 2  # hours
    handoffs = [p for p in bundle["entry"][0]["resource"]["parameter"] if p["name"] == "handoff"]
    events = [next(x["valueCode"] for x in h["part"] if x["name"] == "event") for h in handoffs]
    assert events == ["collection", "pick-up", "receipt-at-manufacturing", "release",
                      "pick-up", "receipt-at-site", "thaw", "infusion"]
    signatures = [s for h in handoffs for s in h["part"] if s["name"] == "signature"]
    assert len(signatures) == 13
    assert all(next(x["valueBoolean"] for x in s["part"] if x["name"] == "verified")
               for s in signatures)
    assert not [p for p in bundle["entry"][0]["resource"]["parameter"] if p["name"] == "gap"]
    provenances = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Provenance"]
    assert len(provenances) == 8
    same = params(by_product.json()["entry"][0]["resource"])
    assert same["verified"]["valueBoolean"] is True
    page = client.get(f"/fhir/CarePlan/{enrolment.careplan['id']}/$custody-report",
                      params={"_format": "html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Chain of custody verified" in page.text
    assert coi.eye_readable(enrolment.code) in page.text and "Élodie" in page.text
    assert "Sam Courier" in page.text and "18 d 2 h" in page.text
    accepted = client.get(f"/fhir/BiologicallyDerivedProduct/{product['id']}/$custody-report",
                          headers={"accept": "text/html"})
    assert accepted.headers["content-type"].startswith("text/html")
    elsewhere = client.get(f"/fhir/Patient/{enrolment.patient['id']}",
                           headers={"accept": "text/html"})
    assert elsewhere.status_code == 406  # HTML is the report's alone


def test_the_report_shows_gaps_between_custodians(enrolment: Enrolment) -> None:
    product = enrolment.product()
    release_task = enrolment.task("qc-release", owner="manufacturer")
    post(enrolment.client, enrolment.handoff(
        "release", product, release_task, releasing="manufacturer", receiving="manufacturer",
        signers=[("manufacturer", "released")], at="2026-11-16T09:00:00Z",
        location="manufacturing"))
    task = enrolment.task("receipt", owner="centre")  # no pick-up: the courier took it
    post(enrolment.client, enrolment.handoff(
        "receipt-at-site", product, task, releasing="courier", receiving="centre",
        signers=[("courier", "released"), ("centre", "received")],
        at="2026-11-17T10:00:00Z", location="bedside"))
    report = enrolment.client.get(
        f"/fhir/CarePlan/{enrolment.careplan['id']}/$custody-report").json()
    gaps = [p for p in report["entry"][0]["resource"]["parameter"] if p["name"] == "gap"]
    assert len(gaps) == 1
    assert params(report["entry"][0]["resource"])["verified"]["valueBoolean"] is False
    reason = next(x["valueString"] for x in gaps[0]["part"] if x["name"] == "reason")
    assert "The manufacturer took custody, but The courier handed it on" in reason
    page = enrolment.client.get(
        f"/fhir/CarePlan/{enrolment.careplan['id']}/$custody-report",
        params={"_format": "html"}).text
    assert "not yet infused" in page and "The courier handed it on" in page


def test_report_errors_are_operation_outcomes(server: TestClient) -> None:
    missing = server.get("/fhir/CarePlan/nope/$custody-report")
    assert missing.status_code == 404 and missing.json()["resourceType"] == "OperationOutcome"
    posted = server.post("/fhir/CarePlan/nope/$custody-report", json={}, headers=FHIR)
    assert posted.status_code in (404, 405)
    unknown = server.get("/fhir/Patient/nope/$custody-report")
    assert unknown.status_code == 404


# -- partners, with authentication on -------------------------------------------------------
def bearer_of(client: TestClient, party: Any) -> dict[str, str]:
    form = party.credentials.token_form("http://testserver/auth/token")
    token = client.post("/auth/token", data=form).json()["access_token"]
    return {**FHIR, "authorization": f"Bearer {token}"}


def test_partners_work_by_the_code_and_never_see_the_patient(settings: Settings,
                                                             db: Database) -> None:
    with client_with(settings, load_protocols=True) as open_server:
        enrolment = enrol(open_server, db, settings)  # set up by the treatment centre
        product = enrolment.product()
        task = enrolment.task("shipment-to-manufacturer")
        put(open_server, {**enrolment.read(f"Task/{task['id']}"),
                          "focus": {"reference": f"BiologicallyDerivedProduct/{product['id']}"}})
        handoff = enrolment.handoff("pick-up", product, task, releasing="apheresis",
                                    receiving="courier",
                                    signers=[("apheresis", "released"), ("courier", "received")])
        release = enrolment.task("qc-release", owner="manufacturer")
        put(open_server, {**enrolment.read(f"Task/{release['id']}"),
                          "focus": {"reference": f"BiologicallyDerivedProduct/{product['id']}"}})
    with client_with(settings, load_protocols=True, auth="smart") as server:
        courier = bearer_of(server, enrolment.parties["courier"])
        manufacturer = bearer_of(server, enrolment.parties["manufacturer"])
        # The courier records the handoff it signed, and finds its Task by the code.
        assert server.post("/fhir/Provenance", json=handoff,
                           headers=courier).status_code == 201
        found = server.get("/fhir/Task", headers=courier, params={
            "identifier": f"{coi.COI_SYSTEM}|{enrolment.code}"}).json()
        assert [e["resource"]["id"] for e in found["entry"]] == [task["id"]]
        # Its data logger's readings are its own to post; an excursion is flagged.
        reading = server.post("/fhir/Observation", headers=courier, json={
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "https://atm-gateway.org/fhir/CodeSystem/"
                                           "custody-observation",
                                 "code": "shipment-temperature"}]},
            "performer": [{"reference": "Organization/courier"}],
            "focus": [{"reference": f"BiologicallyDerivedProduct/{product['id']}"}],
            "valueQuantity": {"value": -80, "unit": "Cel", "code": "Cel"}})
        assert reading.status_code == 201, reading.text
        # The manufacturer reads the chain by its product, without the patient's name.
        operation = f"/fhir/BiologicallyDerivedProduct/{product['id']}/$custody-report"
        bundle = server.get(operation, headers=manufacturer)
        page = server.get(operation, headers={**manufacturer, "accept": "text/html"})
        assert bundle.status_code == page.status_code == 200, page.text
        assert params(bundle.json()["entry"][0]["resource"])["verified"]["valueBoolean"]
        for text_ in (bundle.text, page.text):
            assert "Durand" not in text_ and "Élodie" not in text_
        assert "identified by chain of identity only" in page.text
        assert coi.eye_readable(enrolment.code) in page.text
        elsewhere = server.get(f"/fhir/CarePlan/{enrolment.careplan['id']}/$custody-report",
                               headers=manufacturer)
        assert elsewhere.status_code == 403  # a manufacturer reads no CarePlan
        admin = bearer_of(server, enrolment.parties["centre"])
        page = server.get(f"/fhir/CarePlan/{enrolment.careplan['id']}/$custody-report",
                          params={"_format": "html"}, headers=admin)
        assert page.status_code == 200 and "Élodie" in page.text
        flagged = server.get("/fhir/Flag", headers=admin).json()["entry"]
        assert len(flagged) == 1 and "-80 Cel" in flagged[0]["resource"]["code"]["text"]
