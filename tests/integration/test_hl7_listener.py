"""The HL7 v2 listener over a real MLLP socket on 127.0.0.1, beside the API as `atm serve`
runs it (SQLite and PostgreSQL): ORU^R01 results applied by chain of identity and
acknowledged, malformed messages kept and refused, resends answered once, kept messages
replayed after a fix, and `atm hl7 listen` as a process of its own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.adapters.hl7 import inbound, messages
from gateway.adapters.hl7.apply import apply
from gateway.adapters.hl7.inbound import replay
from gateway.custody import coi
from gateway.errors import PreconditionFailedError
from gateway.scheduling.replan import EXPECTED_RELEASE
from gateway.services.context import Context
from gateway.settings import Settings
from gateway.store.database import Database
from gateway.store.repository import Repository
from mappings import isbt128
from orchestration.state import KEY_SYSTEM
from tests.conftest import client_with
from tests.integration.custody_support import Enrolment, enrol, post
from tests.integration.hl7_support import (
    FAILED,
    QC_RESULTS,
    RELEASED,
    START,
    TIMEOUT,
    ack_of,
    exchange,
    framed,
    oru,
    wait_for,
)
from tests.integration.scheduling_support import DAY, build, instant, params, part
from tests.integration.test_cli import atm_command, free_port


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def server(settings: Settings, port: int) -> Iterator[TestClient]:
    with client_with(settings, load_protocols=True, hl7_listen_port=port) as client:
        yield client


@pytest.fixture
def enrolment(server: TestClient, db: Database, settings: Settings) -> Enrolment:
    return enrol(server, db, settings)


def search(client: TestClient, resource_type: str, **query: str) -> list[dict[str, Any]]:
    response = client.get(f"/fhir/{resource_type}", params=query)
    assert response.status_code == 200, response.text
    return [e["resource"] for e in response.json().get("entry", [])]


def inbound_rows(db: Database) -> list[Any]:
    return list(reversed(messages.listing(db, direction=messages.IN)))


def manufacturing(enrolment: Enrolment) -> dict[str, Any]:
    """The manufacturing order and its Task, as the orchestrator writes them."""
    careplan = {"reference": f"CarePlan/{enrolment.careplan['id']}"}
    order = post(enrolment.client, {
        "resourceType": "ServiceRequest", "status": "active", "intent": "order",
        "subject": {"reference": f"Patient/{enrolment.patient['id']}"}, "basedOn": [careplan]})
    post(enrolment.client, {
        "resourceType": "Task", "status": "in-progress", "intent": "order",
        "identifier": [{"system": KEY_SYSTEM,
                        "value": f"{enrolment.careplan['id']}/manufacturing/1"}],
        "basedOn": [careplan], "focus": {"reference": f"ServiceRequest/{order['id']}"}})
    return order


# -- results and release ------------------------------------------------------------------
def test_qc_results_and_release_are_applied_and_acknowledged(
        enrolment: Enrolment, db: Database, port: int) -> None:
    qc = enrolment.task("qc-release", owner="manufacturer")
    order = manufacturing(enrolment)
    text = oru(enrolment.code, *QC_RESULTS, *RELEASED)
    (answer,) = exchange(port, framed(text))
    assert (ack_of(answer).code, ack_of(answer).control_id) == ("AA", "LIMS000123")
    careplan = f"CarePlan/{enrolment.careplan['id']}"
    observations = search(enrolment.client, "Observation", **{"based-on": careplan})
    assert len(observations) == 3
    viability = next(o for o in observations if o["code"]["coding"][0]["code"] == "VIAB")
    assert viability["valueQuantity"]["value"] == 92.5
    assert viability["basedOn"] == [{"reference": f"CarePlan/{enrolment.careplan['id']}"},
                                    {"reference": f"ServiceRequest/{order['id']}"}]
    assert viability["subject"] == {"reference": f"Patient/{enrolment.patient['id']}"}
    assert viability["performer"] == [{"reference": "Organization/manufacturer"}]
    assert viability["identifier"][0]["value"] == "MES-LIMS|CELLFAB-NL|LIMS000123|1"
    task = enrolment.read(f"Task/{qc['id']}")
    assert task["status"] == "completed"
    assert task["executionPeriod"]["end"] == "2026-11-20T10:00:00+01:00"
    assert task["note"] == [{"text": "Certified by QP J. Smit"}]
    (provenance,) = search(enrolment.client, "Provenance", target=f"Task/{qc['id']}")
    assert provenance["agent"][0]["who"] == {"reference": "Device/hl7-MES-LIMS-CELLFAB-NL"}
    assert provenance["entity"][0]["what"]["identifier"]["value"] == (
        "MES-LIMS|CELLFAB-NL|LIMS000123")
    assert len(provenance["target"]) == 5  # 3 Observations, the Task, the LIMS's Device
    assert enrolment.read("Device/hl7-MES-LIMS-CELLFAB-NL")["status"] == "active"
    (row,) = inbound_rows(db)
    assert (row.status, row.coi, row.raw, row.ack) == ("applied", enrolment.code, text, answer)


def test_a_failed_batch_fails_the_qc_release_task_with_the_reason(
        enrolment: Enrolment, port: int) -> None:
    qc = enrolment.task("qc-release", owner="manufacturer")
    (answer,) = exchange(port, framed(oru(enrolment.code, *FAILED)))
    assert ack_of(answer).code == "AA"
    task = enrolment.read(f"Task/{qc['id']}")
    assert task["status"] == "failed"
    assert task["statusReason"] == {"text": "Sterility positive; Gram-positive cocci on day 5"}


def test_a_later_expected_release_is_set_on_the_manufacturing_task_and_replans(
        server: TestClient, db: Database, settings: Settings, port: int) -> None:
    network = build(server)
    careplan = network.enrol()
    with db.write() as conn:
        code = coi.assign(Context(db=db, settings=settings, base_url="http://testserver/fhir"),
                          Repository(conn), careplan["id"])
    chain = network.chains(careplan, count="1")[0]
    booked = server.post(f"/fhir/CarePlan/{careplan['id']}/$book-chain",
                         json={"resourceType": "Parameters", "parameter": [chain]})
    assert booked.status_code == 200, booked.text
    manufacturing = next(server.get(f"/fhir/{part(a, 'appointment')['reference']}").json()
                         for a in params(booked.json())["appointment"]
                         if part(a, "stage") == "manufacturing")
    task = server.post("/fhir/Task", json={
        "resourceType": "Task", "status": "in-progress", "intent": "order",
        "identifier": [{"system": KEY_SYSTEM, "value": f"{careplan['id']}/manufacturing/1"}],
        "basedOn": [{"reference": f"CarePlan/{careplan['id']}"}]}).json()
    late = datetime.fromisoformat(manufacturing["end"].replace("Z", "+00:00")) + 12 * DAY
    release = late.strftime("%Y%m%d%H%M%S+0000")
    (answer,) = exchange(port, framed(oru(
        code, f"OBX|1|DTM|EXPECTED-RELEASE^Expected release^99ATM||{release}||||||F")))
    assert ack_of(answer).code == "AA", answer
    stored = server.get(f"/fhir/Task/{task['id']}").json()
    assert stored["extension"] == [{"url": EXPECTED_RELEASE, "valueDateTime": instant(late)}]
    told = search(server, "Communication", **{"based-on": f"CarePlan/{careplan['id']}"})
    assert len(told) == 1 and "Manufacturing delay" in told[0]["payload"][0]["contentString"]


# -- what cannot be taken -----------------------------------------------------------------
def test_malformed_messages_are_kept_and_refused_and_nothing_is_applied(
        enrolment: Enrolment, db: Database, port: int) -> None:
    other = isbt128.make("A9999", 26, 999_999).value  # well formed, never assigned
    sent = [
        framed("HELLO, LIMS"),
        b"MSH|^~\\&|no start block\x1c\r",
        framed(oru(other, *QC_RESULTS, control_id="BAD-COI")),
        # a good first result and a bad second one: nothing of the message is applied
        framed(oru(enrolment.code, QC_RESULTS[0],
                   "OBX|2|NM|ENDOTOXIN^Endotoxin^99ATM||lots|EU/mL", control_id="BAD-NM")),
        framed(oru(enrolment.code, *RELEASED, control_id="NO-TASK")),  # no qc-release yet
        # header values longer than any column, and a NUL (which PostgreSQL text refuses)
        framed(f"MSH|^~\\&|{'L' * 300}|F|||2026||ORU^R01^{'Y' * 40}|LONG|P|2.5.1\rPID|\x00"),
    ]
    answers = [ack_of(a) for a in exchange(port, *sent)]
    assert [(a.code, a.control_id) for a in answers] == [
        ("AR", ""), ("AR", ""), ("AE", "BAD-COI"), ("AE", "BAD-NM"), ("AE", "NO-TASK"),
        ("AE", "LONG")]
    assert "does not begin with an MSH" in answers[0].text
    assert "does not begin with <VT>" in answers[1].text
    assert f"chain of identity {isbt128.parse(other).eye_readable} was never assigned" in (
        answers[2].text)
    assert "OBX-5 (the 2nd OBX): 'lots' is not a number" in answers[3].text
    assert "no qc-release Task yet" in answers[4].text
    rows = inbound_rows(db)
    assert [r.status for r in rows] == ["failed"] * 6
    assert [r.raw for r in rows[:5]] == [s.removeprefix(START)[:-2].decode() for s in sent[:5]]
    assert rows[5].raw.endswith("PID|\ufffd") and len(rows[5].application) == 255
    assert all(r.reason and r.ack for r in rows)
    assert search(enrolment.client, "Observation") == []
    # A block cut off by a close is kept too (there is nobody left to answer).
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(START + b"MSH|^~\\&|MES-LIMS|CELLFAB-NL|||2026||ORU^R01|CUT|P|2.5.1\rPID|")
    cut = wait_for(lambda: next((r for r in inbound_rows(db) if "CUT" in r.raw
                                 and r.status != "received"), None),
                   what="the cut-off block stored and settled")
    assert cut.status == "failed" and "closed before the end" in cut.reason


def test_a_resent_message_gets_the_same_answer_and_changes_nothing_again(
        enrolment: Enrolment, db: Database, port: int) -> None:
    enrolment.task("qc-release", owner="manufacturer")
    text = oru(enrolment.code, *QC_RESULTS, *RELEASED)
    (first,) = exchange(port, framed(text))
    second, third = exchange(port, framed(text), framed(text))  # another connection
    assert first == second == third and ack_of(first).code == "AA"
    assert len(search(enrolment.client, "Observation")) == 3
    assert len(search(enrolment.client, "Provenance", agent="Device/hl7-MES-LIMS-CELLFAB-NL")
               ) == 1
    # A refused one is refused again the same way, also without a second try.
    bad = oru(enrolment.code, "OBX|1|NM|X^X^99ATM||lots", control_id="LIMS000124")
    assert exchange(port, framed(bad)) == exchange(port, framed(bad))
    rows = inbound_rows(db)
    assert [(r.control_id, r.status, r.attempts) for r in rows] == [
        ("LIMS000123", "applied", 1), ("LIMS000124", "failed", 1)]


# -- after a fix ----------------------------------------------------------------------------
def test_a_kept_message_is_applied_by_replay_once_its_enrolment_exists(
        enrolment: Enrolment, db: Database, settings: Settings, port: int,
        database_url: str, tmp_path: Path) -> None:
    assigned = isbt128.parse(enrolment.code)
    following = isbt128.make(assigned.facility, assigned.year, assigned.sequence + 1).value
    (answer,) = exchange(port, framed(oru(following, *QC_RESULTS, *RELEASED)))
    assert ack_of(answer).code == "AE"
    later = enrol(enrolment.client, db, settings)  # the enrolment the LIMS was ahead of
    assert later.code == following
    qc = later.task("qc-release", owner="manufacturer")
    listed = run_atm(tmp_path, database_url, "hl7", "list", "--status", "failed")
    assert listed.returncode == 0, listed.stderr
    assert '"status": "failed"' in listed.stdout and "was never assigned" in listed.stdout
    replayed = run_atm(tmp_path, database_url, "hl7", "replay", "--failed")
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.strip() == f"{inbound_rows(db)[0].id}: applied"
    assert later.read(f"Task/{qc['id']}")["status"] == "completed"
    assert len(search(later.client, "Observation")) == 3
    (row,) = inbound_rows(db)
    assert (row.status, row.attempts, ack_of(row.ack).code) == ("applied", 2, "AA")
    (again,) = replay(db, settings, [row.id])  # nothing is applied twice
    assert (again.status, again.reason) == ("applied", "already applied")


def run_atm(tmp_path: Path, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*atm_command(), *args], cwd=tmp_path, env=_env(database_url),
                          capture_output=True, text=True, timeout=120)


def _env(database_url: str, **atm: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATM_")}
    return {**env, "ATM_DATABASE_URL": database_url, "ATM_LOG_JSON": "false", **atm}


def test_atm_hl7_listen_serves_mllp_on_its_own(db: Database, database_url: str,
                                              tmp_path: Path, port: int) -> None:
    with subprocess.Popen([*atm_command(), "hl7", "listen", "--port", str(port)],
                          cwd=tmp_path, env=_env(database_url), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        try:
            assert process.stdout is not None and process.stderr is not None
            line = process.stdout.readline()  # printed once it listens
            assert f"listening on 127.0.0.1:{port}" in line, process.stderr.read()
            (answer,) = exchange(port, framed(oru(isbt128.make("A9999", 26, 5).value,
                                                   *QC_RESULTS, control_id="SOLO")))
            assert (ack_of(answer).code, ack_of(answer).control_id) == ("AE", "SOLO")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    assert process.returncode == 0
    (row,) = inbound_rows(db)
    assert (row.control_id, row.status) == ("SOLO", "failed")


def test_a_message_that_loses_a_race_to_another_writer_is_tried_again(
        enrolment: Enrolment, db: Database, port: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the orchestrator changed the qc-release Task between our read and our write:
    the first attempt is undone whole, the next one applies on what is stored then."""
    qc = enrolment.task("qc-release", owner="manufacturer")
    calls = []

    def first_loses(ctx: Any, report: Any, now: Any) -> list[str]:
        calls.append(report.header.control_id)
        written = apply(ctx, report, now)  # written, then undone with the race lost
        if len(calls) == 1:
            raise PreconditionFailedError("Task changed meanwhile")
        return written

    monkeypatch.setattr(inbound, "apply", first_loses)
    (answer,) = exchange(port, framed(oru(enrolment.code, *QC_RESULTS, *RELEASED)))
    assert ack_of(answer).code == "AA" and calls == ["LIMS000123", "LIMS000123"]
    assert len(search(enrolment.client, "Observation")) == 3  # the first try left nothing
    assert enrolment.read(f"Task/{qc['id']}")["status"] == "completed"
    (row,) = inbound_rows(db)
    assert (row.status, row.attempts) == ("applied", 1)
