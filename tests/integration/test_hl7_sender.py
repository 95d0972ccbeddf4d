"""Manufacturing orders to the LIMS over a real MLLP socket on 127.0.0.1 (SQLite and
PostgreSQL): a manufacturing ServiceRequest becomes one OML^O21 that names the chain of
identity and never the patient, retried with backoff until acknowledged, given up on
refusal, and kept across a restart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import hl7
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from gateway.adapters.hl7 import messages
from gateway.adapters.hl7.orders import CURSOR, OrderBook
from gateway.custody import coi
from gateway.services.context import Context
from gateway.settings import Settings
from gateway.store.database import Database, make_engine
from gateway.store.repository import Repository
from gateway.store.schema import change_log, reactor_cursors
from orchestration.protocol import STAGE_SYSTEM
from orchestration.state import KEY_SYSTEM
from tests.conftest import client_with
from tests.integration.custody_support import FHIR, Enrolment, enrol, post
from tests.integration.hl7_support import FakeLims, wait_for
from tests.integration.test_cli import free_port

FAST = {"hl7_retry_seconds": 0.05, "hl7_retry_max_seconds": 0.2, "hl7_poll_seconds": 0.05,
        "hl7_timeout_seconds": 2.0, "hl7_lims_host": "127.0.0.1",
        "hl7_lims_application": "MES-LIMS", "hl7_lims_facility": "CELLFAB-NL"}


@contextmanager
def gateway(settings: Settings, lims_port: int, **more: Any) -> Iterator[TestClient]:
    with client_with(settings, load_protocols=True, hl7_lims_port=lims_port,
                     **FAST, **more) as client:
        yield client


def order(enrolment: Enrolment, stage: str = "manufacturing") -> dict[str, Any]:
    """A stage's ServiceRequest and its Task in one transaction, as the orchestrator
    writes them; the ServiceRequest as stored."""
    careplan = {"reference": f"CarePlan/{enrolment.careplan['id']}"}
    code = {"coding": [{"system": STAGE_SYSTEM, "code": stage}]}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:8b0c7c3e-0f6a-4a63-9a55-1c1f6f0c2a01", "request": {
            "method": "POST", "url": "ServiceRequest"}, "resource": {
            "resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "code": code, "subject": {"reference": f"Patient/{enrolment.patient['id']}"},
            "basedOn": [careplan]}},
        {"request": {"method": "POST", "url": "Task"}, "resource": {
            "resourceType": "Task", "status": "ready", "intent": "order", "code": code,
            "identifier": [{"system": KEY_SYSTEM,
                            "value": f"{enrolment.careplan['id']}/{stage}/1"}],
            "basedOn": [careplan],
            "focus": {"reference": "urn:uuid:8b0c7c3e-0f6a-4a63-9a55-1c1f6f0c2a01"},
            "restriction": {"period": {"start": "2026-12-01T08:00:00Z",
                                       "end": "2026-12-21T16:00:00Z"}}}}]}
    response = enrolment.client.post("/fhir", json=bundle, headers=FHIR)
    assert response.status_code == 200, response.text
    location = response.json()["entry"][0]["response"]["location"].split("/_history")[0]
    return enrolment.read(location.split("/fhir/", 1)[-1])


def outbound(db: Database) -> list[Any]:
    return list(reversed(messages.listing(db, direction=messages.OUT)))


def settled(db: Database, status: str) -> Any:
    return wait_for(lambda: next((r for r in outbound(db) if r.status == status), None),
                    what=f"an order {status}")


def test_an_order_is_retried_with_backoff_until_acknowledged(
        settings: Settings, db: Database) -> None:
    with FakeLims(["close", "AE", "AA"]) as lims, gateway(settings, lims.port) as client:
        enrolment = enrol(client, db, settings)
        request = order(enrolment)
        order(enrolment, stage="apheresis")  # not a manufacturing order: nothing sent
        row = settled(db, messages.ACKED)
    assert len(outbound(db)) == 1
    assert (row.source, row.coi, row.attempts) == (f"ServiceRequest/{request['id']}",
                                                   enrolment.code, 3)
    assert row.ack and "MSA|AA|" + row.control_id in row.ack
    times, texts = zip(*lims.received, strict=True)
    assert texts == (row.raw,) * 3  # the same message, the same control id, each time
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] >= 0.05 * 0.5 and gaps[1] >= 0.1 * 0.5  # doubled, with jitter
    message = hl7.parse(row.raw)
    assert message["MSH.F9"] == "OML" and message["MSH.F10"] == row.control_id
    assert message["MSH.F5"] == "MES-LIMS" and message["MSH.F6"] == "CELLFAB-NL"
    assert message["PID.F3.R1.C1"] == enrolment.code and message["SPM.F2.R1.C1.S1"] == (
        enrolment.code)
    assert message["ORC.F2.R1.C1"] == request["id"]
    assert message["OBR.F4.R1.C1"] == "car-t-autologous"
    assert (message["TQ1.F7"], message["TQ1.F8"]) == ("20261201080000+0000",
                                                      "20261221160000+0000")
    for detail in ("Durand", "Élodie", "Elodie", enrolment.patient["id"]):
        assert detail not in row.raw  # the manufacturer works by the code alone


@pytest.mark.parametrize("script, attempts", [(["AR"], 1), (["AE"], 2)])
def test_a_refused_order_is_rejected_with_the_reason_and_not_retried(
        settings: Settings, db: Database, script: list[str], attempts: int) -> None:
    with FakeLims(script) as lims, gateway(settings, lims.port,
                                           hl7_error_attempts=2) as client:
        order(enrol(client, db, settings))
        row = settled(db, messages.REJECTED)
        time.sleep(0.3)  # several retry periods (0.05 to 0.2 s): none follows a rejection
    assert row.attempts == attempts and len(lims.received) == attempts
    assert row.reason == f"the LIMS answered {script[0]}: Product code unknown at this site"
    assert [r.status for r in messages.listing(db, status=messages.REJECTED)] == ["rejected"]


def test_orders_made_while_the_lims_is_down_are_sent_after_a_restart(
        settings: Settings, db: Database) -> None:
    port = free_port()  # nothing listens there yet
    with gateway(settings, port) as client:
        enrolment = enrol(client, db, settings)
        request = order(enrolment)
        waiting = wait_for(lambda: next((r for r in outbound(db) if r.attempts >= 2), None),
                           what="two failed attempts")
    assert waiting.status in (messages.PENDING, messages.SENT)
    assert waiting.reason.startswith("no answer from the LIMS: ConnectionRefusedError")
    with FakeLims(["AA"], port=port) as lims, gateway(settings, port):
        row = settled(db, messages.ACKED)
    assert row.source == f"ServiceRequest/{request['id']}" and len(outbound(db)) == 1
    assert [text for _, text in lims.received] == [row.raw]  # sent once, ordered once


def test_orders_wait_for_their_chain_of_identity_and_the_past_is_not_ordered(
        settings: Settings, db: Database) -> None:
    with client_with(settings, load_protocols=True) as client:  # no LIMS configured yet
        before = order(enrol(client, db, settings))
    with FakeLims(["AA"]) as lims, gateway(settings, lims.port) as client:
        patient = post(client, {"resourceType": "Patient", "name": [{"family": "Nowak"}]})
        careplan = post(client, {"resourceType": "CarePlan", "status": "active",
                                 "intent": "plan", "title": "CAR-T",
                                 "subject": {"reference": f"Patient/{patient['id']}"}})
        request = post(client, {
            "resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "code": {"coding": [{"system": STAGE_SYSTEM, "code": "manufacturing"}]},
            "subject": {"reference": f"Patient/{patient['id']}"},
            "basedOn": [{"reference": f"CarePlan/{careplan['id']}"}]})
        wait_for(lambda: cursor(db) >= last_change(db), what="the order book's round")
        assert outbound(db) == []  # no chain of identity yet: nothing to send
        with db.write() as conn:
            code = coi.assign(Context(db=db, settings=settings, base_url=""),
                              Repository(conn), careplan["id"])  # carried to the request
        row = settled(db, messages.ACKED)
    assert (row.source, row.coi) == (f"ServiceRequest/{request['id']}", code)
    assert [r.source for r in outbound(db)] == [row.source]  # not the earlier order
    assert f"ServiceRequest/{before['id']}" != row.source and len(lims.received) == 1


def test_the_first_cursor_stops_short_of_an_order_still_being_written(
        settings: Settings, db: Database) -> None:
    """The order book's first start passes the past, but not an order in a transaction
    still open then, numbered before a change that has already committed."""
    if settings.is_sqlite:
        pytest.skip("SQLite commits changes in their order: no gap is ever open")
    writer = Database(make_engine(settings))
    try:
        with writer.write() as conn:  # stays open while a later change commits
            pending = Repository(conn).create({
                "resourceType": "ServiceRequest", "status": "active", "intent": "order",
                "subject": {"reference": "Patient/p1"}})
            with db.write() as other:
                Repository(other).create({"resourceType": "Patient"})
            OrderBook(db, settings).prime()
    finally:
        writer.dispose()
    with db.read() as conn:
        numbered = conn.execute(select(change_log.c.seq)
                                .where(change_log.c.res_id == pending.id)).scalar_one()
    assert cursor(db) < numbered < last_change(db)


def cursor(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(select(reactor_cursors.c.seq).where(
            reactor_cursors.c.name == CURSOR)).scalar() or 0)


def last_change(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(select(func.max(change_log.c.seq))).scalar() or 0)
