"""The orchestrator against a real store: enrolment, advancement over REST changes,
repeats, holds, deadlines, Provenance, crash safety and two orchestrators at once."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.settings import Settings
from gateway.store.database import Database, make_engine
from orchestration import applier
from orchestration.runner import Orchestrator
from orchestration.state import ROLE_ASSIGNMENT, task_run_key
from tests.conftest import client_with
from tests.factories import organization, patient
from tests.factories.protocols import action, plan_definition

FHIR = "application/fhir+json"
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

QC_PROTOCOL = plan_definition(
    action("intake", role="coordinator", deadline_days=2),
    action("eligibility", "intake"), action("consent", "intake"),
    action("apheresis", "eligibility", "consent", role="apheresis-centre"),
    action("qc", "apheresis", role="manufacturer", back_to=("apheresis", 1)),
    action("bridging", "qc", when="%careplan.extension.where(url = "
                                  "'https://example.org/bridging').exists()"),
    action("infusion", "bridging", steps=[action("verify-identity"),
                                          action("infuse", "verify-identity")]),
    action("day-7", ("infusion", 7)),
    escalation="coordinator", plan_id="qc-therapy")


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def orchestrator(db: Database, settings: Settings, clock: Clock) -> Orchestrator:
    return Orchestrator(db, settings, clock=clock)


def created(client: TestClient, resource: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/fhir/{resource['resourceType']}", json=resource,
                           headers={"content-type": FHIR})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def search(client: TestClient, query: str) -> list[dict[str, Any]]:
    response = client.get(f"/fhir/{query}&_count=200")
    assert response.status_code == 200, response.text
    return [e["resource"] for e in response.json().get("entry", [])]


def enrol(client: TestClient, **extra: Any) -> dict[str, Any]:
    response = client.put("/fhir/PlanDefinition/qc-therapy", json=QC_PROTOCOL,
                          headers={"content-type": FHIR})
    assert response.status_code in (200, 201), response.text
    person = created(client, patient())
    manufacturer = created(client, organization(name="Cell Factory"))
    centre = created(client, organization(name="Treatment Centre"))
    return created(client, {
        "resourceType": "CarePlan", "status": "active", "intent": "plan",
        "instantiatesCanonical": [QC_PROTOCOL["url"]],
        "subject": {"reference": f"Patient/{person['id']}"},
        "author": {"reference": f"Organization/{centre['id']}"},
        "extension": [{"url": ROLE_ASSIGNMENT, "extension": [
            {"url": "role", "valueCode": "manufacturer"},
            {"url": "organization",
             "valueReference": {"reference": f"Organization/{manufacturer['id']}"}}]}],
        **extra})


def tasks_by_stage(client: TestClient, careplan_id: str) -> dict[str, list[dict[str, Any]]]:
    stages: dict[str, list[dict[str, Any]]] = {}
    for task in search(client, f"Task?based-on=CarePlan/{careplan_id}"):
        key = task_run_key(task)
        assert key is not None and key[0] == careplan_id
        stages.setdefault(key[1], []).append(task)
    for runs in stages.values():
        runs.sort(key=lambda t: t["identifier"][0]["value"])
    return stages


def set_status(client: TestClient, task: dict[str, Any], status: str,
               at: datetime | None = None) -> None:
    """The Task's performer changes its status (and says when it ended)."""
    current = client.get(f"/fhir/Task/{task['id']}").json()
    current["status"] = status
    if at is not None:
        current["executionPeriod"] = {"end": at.isoformat()}
    response = client.put(f"/fhir/Task/{task['id']}", json=current,
                          headers={"content-type": FHIR})
    assert response.status_code == 200, response.text


def finish(client: TestClient, orchestrator: Orchestrator, careplan_id: str, stage: str,
           status: str = "completed") -> None:
    set_status(client, tasks_by_stage(client, careplan_id)[stage][-1], status,
               orchestrator.clock())
    orchestrator.run_once()


def open_stages(client: TestClient, careplan_id: str) -> list[str]:
    return sorted(stage for stage, runs in tasks_by_stage(client, careplan_id).items()
                  if runs[-1]["status"] in ("ready", "requested", "in-progress"))


def test_enrolment_creates_the_first_task_with_owner_window_and_provenance(
        client: TestClient, orchestrator: Orchestrator) -> None:
    careplan = enrol(client)
    orchestrator.ensure_device()
    assert orchestrator.run_once() > 0
    [intake] = tasks_by_stage(client, careplan["id"])["intake"]
    assert intake["status"] == "ready" and intake["intent"] == "order"
    assert intake["basedOn"] == [{"reference": f"CarePlan/{careplan['id']}"}]
    assert intake["owner"] == careplan["author"]  # no organisation assigned to coordinator
    assert intake["for"] == careplan["subject"]
    assert intake["restriction"]["period"] == {"start": "2026-03-02T09:00:00Z",
                                               "end": "2026-03-04T09:00:00Z"}
    plan = client.get(f"/fhir/CarePlan/{careplan['id']}").json()
    assert plan["activity"][0]["reference"]["reference"] == f"Task/{intake['id']}"
    [provenance] = search(client, f"Provenance?target=Task/{intake['id']}")
    assert provenance["agent"][0]["who"] == {"reference": "Device/atm-orchestrator"}
    assert provenance["entity"] == [{"role": "source", "what": {
        "reference": f"CarePlan/{careplan['id']}/_history/1"}}]
    assert {t["reference"] for t in provenance["target"]} == {
        f"Task/{intake['id']}/_history/1", f"CarePlan/{careplan['id']}/_history/2"}
    assert client.get("/fhir/Device/atm-orchestrator").status_code == 200


def test_journey_runs_parallel_stages_sub_stages_and_completes(
        client: TestClient, orchestrator: Orchestrator, clock: Clock) -> None:
    careplan = enrol(client)
    orchestrator.run_once()
    finish(client, orchestrator, careplan["id"], "intake")
    assert open_stages(client, careplan["id"]) == ["consent", "eligibility"]
    finish(client, orchestrator, careplan["id"], "eligibility")
    assert open_stages(client, careplan["id"]) == ["consent"]  # the join waits
    finish(client, orchestrator, careplan["id"], "consent")
    [apheresis] = tasks_by_stage(client, careplan["id"])["apheresis"]
    manufacturer = next(e for e in careplan["extension"] if e["url"] == ROLE_ASSIGNMENT)
    assert apheresis["owner"] == careplan["author"]
    finish(client, orchestrator, careplan["id"], "apheresis")
    [qc] = tasks_by_stage(client, careplan["id"])["qc"]
    assert qc["owner"] == manufacturer["extension"][1]["valueReference"]
    finish(client, orchestrator, careplan["id"], "qc")
    # bridging's condition is false: skipped, and infusion starts with its first step.
    assert open_stages(client, careplan["id"]) == ["infusion", "verify-identity"]
    stages = tasks_by_stage(client, careplan["id"])
    assert stages["verify-identity"][0]["partOf"] == [
        {"reference": f"Task/{stages['infusion'][0]['id']}"}]
    finish(client, orchestrator, careplan["id"], "verify-identity")
    clock.now += timedelta(hours=1)
    finish(client, orchestrator, careplan["id"], "infuse")
    stages = tasks_by_stage(client, careplan["id"])
    assert stages["infusion"][0]["status"] == "completed"  # by the orchestrator
    assert stages["day-7"][0]["restriction"]["period"]["start"] == "2026-03-09T10:00:00Z"
    finish(client, orchestrator, careplan["id"], "day-7")
    plan = client.get(f"/fhir/CarePlan/{careplan['id']}").json()
    assert plan["status"] == "completed"
    skipped = [a["detail"] for a in plan["activity"] if "detail" in a]
    assert [(d["code"]["coding"][0]["code"], d["status"]) for d in skipped] == [
        ("bridging", "cancelled")]
    # Every Task the orchestrator wrote has a Provenance naming it.
    for runs in tasks_by_stage(client, careplan["id"]).values():
        assert search(client, f"Provenance?target=Task/{runs[0]['id']}")


def drive_to_qc(client: TestClient, orchestrator: Orchestrator, careplan_id: str) -> None:
    orchestrator.run_once()
    for stage in ("intake", "eligibility", "consent", "apheresis"):
        finish(client, orchestrator, careplan_id, stage)


def test_failed_qc_repeats_apheresis_then_holds_the_plan(
        client: TestClient, orchestrator: Orchestrator) -> None:
    careplan = enrol(client)
    drive_to_qc(client, orchestrator, careplan["id"])
    finish(client, orchestrator, careplan["id"], "qc", "failed")
    assert [t["status"] for t in tasks_by_stage(client, careplan["id"])["apheresis"]] == [
        "completed", "ready"]
    finish(client, orchestrator, careplan["id"], "apheresis")
    assert len(tasks_by_stage(client, careplan["id"])["qc"]) == 2
    finish(client, orchestrator, careplan["id"], "qc", "failed")
    plan = client.get(f"/fhir/CarePlan/{careplan['id']}").json()
    assert plan["status"] == "on-hold"
    assert "apheresis was already repeated 1 of at most 1 times" in plan["note"][-1]["text"]
    assert len(tasks_by_stage(client, careplan["id"])["apheresis"]) == 2


def test_referral_service_request_enrols_once(client: TestClient,
                                              orchestrator: Orchestrator) -> None:
    client.put("/fhir/PlanDefinition/qc-therapy", json=QC_PROTOCOL,
               headers={"content-type": FHIR})
    person = created(client, patient())
    referral = created(client, {
        "resourceType": "ServiceRequest", "status": "active", "intent": "order",
        "instantiatesCanonical": [QC_PROTOCOL["url"] + "|1"],
        "subject": {"reference": f"Patient/{person['id']}"}})
    orchestrator.run_once()
    orchestrator.run_once()
    [plan] = search(client, f"CarePlan?subject=Patient/{person['id']}")
    assert plan["basedOn"] == [{"reference": f"ServiceRequest/{referral['id']}"}]
    assert plan["status"] == "active"
    assert list(tasks_by_stage(client, plan["id"])) == ["intake"]


def test_overdue_task_is_flagged_and_escalated_by_the_timer(
        client: TestClient, orchestrator: Orchestrator, clock: Clock) -> None:
    careplan = enrol(client)
    orchestrator.run_once()
    assert orchestrator.check_deadlines() == 0
    clock.now += timedelta(days=2, minutes=1)  # intake's 2-day deadline has passed
    assert orchestrator.check_deadlines() == 1
    [intake] = tasks_by_stage(client, careplan["id"])["intake"]
    assert intake["businessStatus"]["coding"][0]["code"] == "overdue"
    [flag] = search(client, f"Flag?subject={careplan['subject']['reference']}")
    assert flag["status"] == "active" and "Intake" in flag["code"]["text"]
    [message] = search(client, f"Communication?subject={careplan['subject']['reference']}")
    assert message["recipient"] == [careplan["author"]]
    assert orchestrator.check_deadlines() == 0  # once


def test_a_crash_mid_advance_writes_nothing_and_the_restart_writes_everything_once(
        client: TestClient, orchestrator: Orchestrator, monkeypatch: pytest.MonkeyPatch,
        db: Database, settings: Settings, clock: Clock) -> None:
    careplan = enrol(client)
    orchestrator.run_once()
    set_status(client, tasks_by_stage(client, careplan["id"])["intake"][0], "completed")

    def crash(self: Any) -> None:
        raise KeyboardInterrupt("killed after writing Tasks, before the CarePlan")

    monkeypatch.setattr(applier.Writer, "_save_careplan", crash)
    with pytest.raises(KeyboardInterrupt):
        orchestrator.run_once()
    assert sorted(tasks_by_stage(client, careplan["id"])) == ["intake"]  # nothing half-written
    monkeypatch.undo()
    restarted = Orchestrator(db, settings, clock=clock)
    restarted.run_once()
    restarted.run_once()
    stages = tasks_by_stage(client, careplan["id"])
    assert {stage: len(runs) for stage, runs in stages.items()} == {
        "intake": 1, "eligibility": 1, "consent": 1}


def test_two_orchestrators_never_write_a_task_twice(
        client: TestClient, settings: Settings, clock: Clock) -> None:
    careplans = [enrol(client) for _ in range(4)]
    databases = [Database(make_engine(settings)) for _ in range(2)]
    workers = [Orchestrator(database, settings, clock=clock) for database in databases]
    stop = threading.Event()
    threads = [threading.Thread(target=w.serve, args=(stop, 0.01, 3600.0)) for w in workers]
    for thread in threads:
        thread.start()
    try:
        for careplan in careplans:
            for stage in ("intake", "eligibility", "consent"):
                _wait_for(client, careplan["id"], stage)
                set_status(client, tasks_by_stage(client, careplan["id"])[stage][-1],
                           "completed")
            _wait_for(client, careplan["id"], "apheresis")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        for database in databases:
            database.dispose()
    for careplan in careplans:
        stages = tasks_by_stage(client, careplan["id"])
        assert {stage: len(runs) for stage, runs in stages.items()} == {
            "intake": 1, "eligibility": 1, "consent": 1, "apheresis": 1}
        plan = client.get(f"/fhir/CarePlan/{careplan['id']}").json()
        assert len(plan["activity"]) == 4


def _wait_for(client: TestClient, careplan_id: str, stage: str) -> None:
    deadline = datetime.now(UTC) + timedelta(seconds=20)
    while stage not in tasks_by_stage(client, careplan_id):
        assert datetime.now(UTC) < deadline, f"{stage} never started"
        threading.Event().wait(0.02)


def test_served_app_advances_enrolments_by_itself(settings: Settings) -> None:
    with client_with(settings, orchestrator=True, orchestrator_poll_seconds=0.02) as client:
        careplan = enrol(client)
        _wait_for(client, careplan["id"], "intake")
        set_status(client, tasks_by_stage(client, careplan["id"])["intake"][0], "completed")
        _wait_for(client, careplan["id"], "consent")
        assert client.get("/fhir/Device/atm-orchestrator").status_code == 200


def test_apply_returns_the_careplan_an_enrolment_would_start_without_storing_it(
        client: TestClient) -> None:
    client.put("/fhir/PlanDefinition/qc-therapy", json=QC_PROTOCOL,
               headers={"content-type": FHIR})
    response = client.get("/fhir/PlanDefinition/qc-therapy/$apply?subject=Patient/p1")
    assert response.status_code == 200, response.text
    plan = response.json()
    assert plan["resourceType"] == "CarePlan" and plan["status"] == "draft"
    assert plan["subject"] == {"reference": "Patient/p1"}
    assert plan["instantiatesCanonical"] == [QC_PROTOCOL["url"] + "|1"]
    details = {a["detail"]["code"]["text"]: a["detail"] for a in plan["activity"]}
    assert len(details) == 10 and details["Intake"]["status"] == "not-started"
    assert "scheduledPeriod" in details["Intake"]
    assert "scheduledPeriod" not in details["Consent"]
    posted = client.post("/fhir/PlanDefinition/qc-therapy/$apply", headers={
        "content-type": FHIR}, json={"resourceType": "Parameters", "parameter": [
            {"name": "subject", "valueReference": {"reference": "Patient/p2"}}]})
    assert posted.json()["subject"] == {"reference": "Patient/p2"}
    assert client.get("/fhir/CarePlan?_summary=count").json()["total"] == 0


def test_apply_without_a_subject_is_a_400_naming_it(client: TestClient) -> None:
    client.put("/fhir/PlanDefinition/qc-therapy", json=QC_PROTOCOL,
               headers={"content-type": FHIR})
    response = client.get("/fhir/PlanDefinition/qc-therapy/$apply")
    assert response.status_code == 400
    assert response.json() == {"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": "invalid", "expression": ["subject"],
        "diagnostics": "$apply needs a subject parameter, e.g. subject=Patient/123"}]}
    assert client.get("/fhir/PlanDefinition/nope/$apply?subject=Patient/1").status_code == 404


def test_start_up_loads_the_shipped_protocols_once(settings: Settings) -> None:
    for _ in range(2):  # a restart finds them unchanged and writes nothing
        with client_with(settings, load_protocols=True) as client:
            plans = search(client, "PlanDefinition?status=active")
            assert sorted((p["id"], p["meta"]["versionId"]) for p in plans) == [
                ("allogeneic-cell-therapy", "1"), ("car-t-autologous", "1"),
                ("ex-vivo-gene-therapy", "1")]


def test_orchestrator_updates_keep_the_plans_tags_and_security_labels(
        client: TestClient, orchestrator: Orchestrator) -> None:
    label = {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
             "code": "R"}
    careplan = enrol(client, meta={"security": [label], "tag": [{"code": "trial-7"}]})
    orchestrator.run_once()
    plan = client.get(f"/fhir/CarePlan/{careplan['id']}").json()
    assert plan["meta"]["versionId"] == "2"  # the orchestrator linked the intake Task
    assert plan["meta"]["security"] == [label] and plan["meta"]["tag"] == [{"code": "trial-7"}]


def test_a_role_can_be_assigned_to_a_care_team(client: TestClient,
                                               orchestrator: Orchestrator) -> None:
    team = created(client, {"resourceType": "CareTeam", "name": "Apheresis nurses"})
    careplan = enrol(client)
    plan = client.get(f"/fhir/CarePlan/{careplan['id']}").json()
    plan["extension"].append({"url": ROLE_ASSIGNMENT, "extension": [
        {"url": "role", "valueCode": "apheresis-centre"},
        {"url": "organization", "valueReference": {"reference": f"CareTeam/{team['id']}"}}]})
    assert client.put(f"/fhir/CarePlan/{plan['id']}", json=plan,
                      headers={"content-type": FHIR}).status_code == 200
    drive_to_qc(client, orchestrator, careplan["id"])
    [apheresis] = tasks_by_stage(client, careplan["id"])["apheresis"]
    assert apheresis["owner"] == {"reference": f"CareTeam/{team['id']}"}
