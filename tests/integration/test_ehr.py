"""The gateway as a client of an EHR. The EHR is a second ATM Gateway on 127.0.0.1, with
its own database and authentication on, that registered us as a SMART Backend Services
client: intake, referrals, write-back, the EHR going down and coming back, a restart in
the middle of the queue. Our side runs on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from gateway.adapters.ehr.endpoints import Endpoint, add_endpoint
from gateway.adapters.ehr.sync import EhrSync
from gateway.auth.clients import add_client
from gateway.auth.credentials import Credentials, SmartAuth, new_key, public_jwks
from gateway.custody import coi
from gateway.services.context import Context
from gateway.settings import Settings
from gateway.store.database import Database, make_engine
from gateway.store.migrate import upgrade
from gateway.store.repository import Repository
from gateway.store.schema import ehr_rejections
from orchestration.runner import Orchestrator
from tests.conftest import client_with, free_port, running_server

FHIR = {"content-type": "application/fhir+json"}
MRN = "urn:oid:1.2.826.0.1.3680043.2|MRN-4711"
FAST = {"ehr_attempts": 2, "ehr_backoff_seconds": 0.01, "ehr_backoff_max_seconds": 0.05,
        "ehr_timeout_seconds": 3.0, "ehr_breaker_failures": 3, "ehr_breaker_seconds": 60.0}


@dataclass
class Ehr:
    """The hospital's EHR: another gateway, its database, its port, our registration."""

    database_url: str
    port: int
    client_id: str
    key: Any
    admin: Credentials

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    @contextmanager
    def up(self) -> Iterator[httpx.Client]:
        """The EHR serving; yields a client of its own staff (an admin)."""
        with running_server(self.database_url, port=self.port, auth="smart",
                            rate_limit_per_second=0) as base, \
                httpx.Client(base_url=base + "/", timeout=10,
                             auth=SmartAuth(base.removesuffix("/fhir") + "/auth/token",
                                            self.admin)) as staff:
            yield staff


@pytest.fixture
def ehr(tmp_path: Path) -> Ehr:
    url = f"sqlite:///{tmp_path / 'ehr.db'}"
    database = Database(make_engine(Settings(database_url=url)))
    upgrade(database.engine)
    ours, staff = new_key(), new_key()
    gateway = add_client(database, name="ATM Gateway", role="ehr",
                         organization="Organization/atm", jwks=public_jwks(ours),
                         scopes="system/*.cruds")
    admin = add_client(database, name="EHR staff", role="admin",
                       organization="Organization/hospital", jwks=public_jwks(staff),
                       scopes="system/*.cruds")
    database.dispose()
    return Ehr(url, free_port(), gateway.client_id, ours, Credentials(admin.client_id, staff))


def register(db: Database, ehr: Ehr) -> Endpoint:
    """Our side: the endpoint, under a name of its own (breakers are per name)."""
    return add_endpoint(db, Endpoint(f"hospital-{uuid.uuid4().hex[:8]}", ehr.base,
                                     ehr.client_id, ehr.key.as_dict(private=True),
                                     "Organization/centre"))


def seed(staff: httpx.Client) -> dict[str, Any]:
    """A patient in the EHR with what eligibility needs (and one old Observation)."""
    def post(resource: dict[str, Any]) -> dict[str, Any]:
        response = staff.post(resource["resourceType"], json=resource, headers=FHIR)
        assert response.status_code == 201, response.text
        return dict(response.json())

    system, value = MRN.split("|")
    patient = post({"resourceType": "Patient", "name": [{"family": "Durand",
                                                           "given": ["Élodie"]}],
                    "identifier": [{"system": system, "value": value}],
                    "generalPractitioner": [{"reference": "Practitioner/gp-1"}]})
    subject = {"reference": f"Patient/{patient['id']}"}
    recent = datetime.now(UTC) - timedelta(days=3)
    post({"resourceType": "Condition", "subject": subject,
          "code": {"text": "Diffuse large B-cell lymphoma"}})
    for days, value_ in ((3, 1.1), (400, 0.9)):
        post({"resourceType": "Observation", "status": "final", "subject": subject,
              "code": {"text": "Creatinine"},
              "effectiveDateTime": (recent - timedelta(days=days - 3)).isoformat(),
              "valueQuantity": {"value": value_, "unit": "mg/dL"}})
    post({"resourceType": "Coverage", "status": "active", "beneficiary": subject,
          "payor": [{"reference": "Organization/insurer"}]})
    post({"resourceType": "AllergyIntolerance", "patient": subject,
          "code": {"text": "Penicillin"}})
    return patient


def intake(client: TestClient, endpoint: Endpoint) -> Any:
    return client.post("/fhir/Patient/$ehr-intake", headers=FHIR, json={
        "resourceType": "Parameters", "parameter": [
            {"name": "ehr", "valueString": endpoint.name},
            {"name": "identifier", "valueString": MRN}]})


def search(client: TestClient | httpx.Client, query: str) -> list[dict[str, Any]]:
    answer = client.get(query).json()
    return [e["resource"] for e in answer.get("entry", [])]


# -- intake ------------------------------------------------------------------------------------
def test_intake_imports_the_patient_and_what_eligibility_needs_once(
        settings: Settings, db: Database, ehr: Ehr) -> None:
    endpoint = register(db, ehr)
    with ehr.up() as staff, client_with(settings, **FAST) as client:
        theirs = seed(staff)
        response = intake(client, endpoint)
        assert response.status_code == 200, response.text
        counts = {p["part"][0]["valueCode"]: p["part"][1]["valueInteger"]
                  for p in response.json()["parameter"] if p["name"] == "imported"}
        assert counts == {"Patient": 1, "Condition": 1, "Observation": 1, "Coverage": 1,
                          "AllergyIntolerance": 1}  # the 400-day-old Observation stays out
        patient_ref = response.json()["parameter"][0]["valueReference"]["reference"]
        patient = client.get(f"/fhir/{patient_ref}").json()
        assert {"system": f"{ehr.base}/Patient", "value": theirs["id"]} in patient["identifier"]
        assert patient["managingOrganization"] == {"reference": "Organization/centre"}
        assert patient["generalPractitioner"] == [{"reference": f"{ehr.base}/Practitioner/gp-1"}]
        condition = search(client, f"/fhir/Condition?subject={patient_ref}")
        assert len(condition) == 1
        # The chain of identity given here survives a second import, which duplicates nothing.
        careplan = client.post("/fhir/CarePlan", headers=FHIR, json={
            "resourceType": "CarePlan", "status": "active", "intent": "plan",
            "subject": {"reference": patient_ref}}).json()
        with db.write() as conn:
            code = coi.assign(Context(db=db, settings=settings, base_url=""), Repository(conn),
                              careplan["id"])
        again = intake(client, endpoint)
        assert again.status_code == 200, again.text
        assert again.json()["parameter"][0]["valueReference"]["reference"] == patient_ref
        for kind in ("Patient", "Condition", "Observation", "Coverage", "AllergyIntolerance"):
            assert len(search(client, f"/fhir/{kind}?_count=50")) == 1, kind
        kept = client.get(f"/fhir/{patient_ref}").json()
        assert coi.coi_of(kept) == code
        # Where each came from: a Provenance naming the EHR's versions.
        sources = search(client, f"/fhir/Provenance?target={patient_ref}")
        assert len(sources) == 2
        assert any(e["what"]["reference"].startswith(f"{ehr.base}/Patient/{theirs['id']}")
                   for e in sources[0]["entity"])


def test_intake_of_an_unknown_patient_and_of_a_down_ehr(settings: Settings, db: Database,
                                                        ehr: Ehr) -> None:
    endpoint = register(db, ehr)
    with client_with(settings, **FAST) as client:
        with ehr.up():
            missing = client.post("/fhir/Patient/$ehr-intake", headers=FHIR, json={
                "resourceType": "Parameters", "parameter": [
                    {"name": "ehr", "valueString": endpoint.name},
                    {"name": "identifier", "valueString": "urn:x|nobody"}]})
            assert missing.status_code == 404
        # The EHR is down: 503 with Retry-After, nothing stored; after a few, the circuit
        # opens and calls fail at once.
        for _ in range(FAST["ehr_breaker_failures"]):
            down = intake(client, endpoint)
            assert down.status_code == 503
            assert "Retry-After" in down.headers
        started = time.monotonic()
        fast = intake(client, endpoint)
        assert fast.status_code == 503 and "circuit" in fast.json()["issue"][0]["diagnostics"]
        assert time.monotonic() - started < 0.5
        assert search(client, "/fhir/Patient") == []


# -- referral and write-back -------------------------------------------------------------------
def _sync(db: Database, settings: Settings) -> EhrSync:
    return EhrSync(db, settings.model_copy(update=FAST))


def test_a_referral_from_the_ehr_enrols_its_patient_and_status_goes_back(
        settings: Settings, db: Database, ehr: Ehr) -> None:
    register(db, ehr)
    with ehr.up() as staff, client_with(settings, load_protocols=True, **FAST) as client:
        seed(staff)
        plan = search(client, "/fhir/PlanDefinition?name=CarTAutologous")[0]
        system, value = MRN.split("|")
        referral = client.post("/fhir/ServiceRequest", headers=FHIR, json={
            "resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "meta": {"source": ehr.base},
            "category": [{"text": "referral"}],
            "instantiatesCanonical": [f"{plan['url']}|{plan['version']}"],
            "subject": {"identifier": {"system": system, "value": value}}})
        assert referral.status_code == 201, referral.text
        sync = _sync(db, settings)
        sync.run_once()
        imported = client.get(f"/fhir/ServiceRequest/{referral.json()['id']}").json()
        patient_ref = imported["subject"]["reference"]
        assert patient_ref.startswith("Patient/")
        Orchestrator(db, settings.model_copy(update={"orchestrator": True})).run_once()
        careplans = search(client, f"/fhir/CarePlan?subject={patient_ref}")
        assert len(careplans) == 1
        # Write-back: the enrolment appears in the EHR, by our identifier, once.
        sync.run_once()
        theirs = search(staff, "CarePlan")
        assert len(theirs) == 1 and theirs[0]["status"] == "active"
        assert theirs[0]["subject"]["reference"].startswith("Patient/")
        ours = careplans[0]
        client.put(f"/fhir/CarePlan/{ours['id']}", headers=FHIR,
                   json={**ours, "status": "completed"})
        sync.run_once()
        theirs = search(staff, "CarePlan")
        assert [c["status"] for c in theirs] == ["completed"]
        report = search(staff, "DocumentReference")
        assert len(report) == 1 and report[0]["content"][0]["attachment"]["contentType"] == \
            "text/html"


def test_write_back_waits_for_a_down_ehr_and_drains_in_order_after_a_restart(
        settings: Settings, db: Database, ehr: Ehr) -> None:
    endpoint = register(db, ehr)
    with client_with(settings, **FAST) as client:
        with ehr.up() as staff:
            seed(staff)
            patient_ref = intake(client, endpoint).json()["parameter"][0]["valueReference"][
                "reference"]
            careplan = client.post("/fhir/CarePlan", headers=FHIR, json={
                "resourceType": "CarePlan", "status": "draft", "intent": "plan",
                "title": "Autologous CAR-T", "subject": {"reference": patient_ref}}).json()
            first = _sync(db, settings)
            assert first.run_once()[endpoint.name].written == 1
        # The EHR goes down; the enrolment changes three times meanwhile.
        statuses = ["active", "on-hold", "active"]
        for status in statuses:
            careplan = client.put(f"/fhir/CarePlan/{careplan['id']}", headers=FHIR,
                                  json={**careplan, "status": status}).json()
        appointment = client.post("/fhir/Appointment", headers=FHIR, json={
            "resourceType": "Appointment", "status": "booked",
            "start": "2027-02-01T09:00:00Z", "end": "2027-02-01T13:00:00Z",
            "participant": [{"actor": {"reference": patient_ref}, "status": "accepted"}]}).json()
        waiting = first.run_once()[endpoint.name]
        assert waiting.waiting > 0 and waiting.written == 0
        # We restart (a new process) while the EHR is still down: the queue is kept.
        del first
        with ehr.up() as staff:
            second = _sync(db, settings)
            drained = second.run_once()[endpoint.name]
            assert drained.written == len(statuses) + 1 and drained.rejected == 0
            theirs = search(staff, "CarePlan")
            assert [c["status"] for c in theirs] == ["active"]
            history = search(staff, f"CarePlan/{theirs[0]['id']}/_history")
            assert [v["status"] for v in reversed(history)] == ["draft", *statuses]
            booked = search(staff, "Appointment")
            assert [a["start"][:16] for a in booked] == ["2027-02-01T09:00"]
            assert booked[0]["identifier"][0]["value"] == appointment["id"]
            assert second.run_once()[endpoint.name].written == 0  # nothing twice
        with db.read() as conn:
            assert conn.execute(select(ehr_rejections)).all() == []


def test_a_change_the_ehr_refuses_is_kept_and_the_queue_goes_on(
        settings: Settings, db: Database, ehr: Ehr) -> None:
    # The EHR registered us a second time, to read only: every write-back is refused (403).
    reader = new_key()
    ehr_db = Database(make_engine(Settings(database_url=ehr.database_url)))
    registered = add_client(ehr_db, name="ATM Gateway, reading", role="ehr",
                            organization="Organization/atm", jwks=public_jwks(reader),
                            scopes="system/*.rs")
    ehr_db.dispose()
    endpoint = add_endpoint(db, Endpoint(f"reader-{uuid.uuid4().hex[:8]}", ehr.base,
                                         registered.client_id, reader.as_dict(private=True),
                                         "Organization/centre"))
    with ehr.up() as staff, client_with(settings, **FAST) as client:
        seed(staff)
        patient_ref = intake(client, endpoint).json()["parameter"][0]["valueReference"][
            "reference"]
        for title in ("first", "second"):
            client.post("/fhir/CarePlan", headers=FHIR, json={
                "resourceType": "CarePlan", "status": "active", "intent": "plan",
                "title": title, "subject": {"reference": patient_ref}})
        result = _sync(db, settings).run_once()[endpoint.name]
        assert (result.written, result.rejected, result.waiting) == (0, 2, 0)
        assert search(staff, "CarePlan") == []
    with db.read() as conn:
        refused = conn.execute(select(ehr_rejections)).all()
    assert [r.status for r in refused] == [403, 403]
    assert all(r.reference.startswith("CarePlan/") for r in refused)


def test_the_operator_registers_an_ehr_and_imports_a_patient_from_the_command_line(
        tmp_path: Path, ehr: Ehr) -> None:
    from tests.integration.test_cli import run_atm

    key_file = tmp_path / "hospital-key.json"
    made = run_atm(tmp_path, "ehr", "key", "--out", str(tmp_path / "new-key.json"))
    assert made.returncode == 0, made.stderr
    public = json.loads(made.stdout)["keys"][0]
    assert public["crv"] == "P-384" and "d" not in public  # only the public half is shown
    assert "d" in json.loads((tmp_path / "new-key.json").read_text())
    Credentials(ehr.client_id, ehr.key).save(key_file)  # as the EHR registered it
    with ehr.up() as staff:
        seed(staff)
        added = run_atm(tmp_path, "ehr", "add", "--name", "hospital", "--base-url", ehr.base,
                        "--key", str(key_file), "--organization", "Organization/centre")
        assert added.returncode == 0, added.stderr
        assert json.loads(added.stdout)["client_id"] == ehr.client_id  # from the key file
        again = run_atm(tmp_path, "ehr", "add", "--name", "hospital", "--base-url", ehr.base,
                        "--key", str(key_file), "--organization", "Organization/centre")
        assert again.returncode == 1 and "exists" in again.stderr
        imported = run_atm(tmp_path, "ehr", "intake", "--identifier", MRN)
        assert imported.returncode == 0, imported.stderr
        assert json.loads(imported.stdout)["imported"]["Condition"] == 1
        synced = run_atm(tmp_path, "ehr", "sync")
        assert synced.returncode == 0, synced.stderr
        assert json.loads(synced.stdout)["endpoint"] == "hospital"
    listed = run_atm(tmp_path, "ehr", "list")
    assert json.loads(listed.stdout)["refused"] == 0
