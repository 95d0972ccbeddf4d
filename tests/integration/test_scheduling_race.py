"""Coordinators racing for the same chain through a real server on 127.0.0.1: as many win
as the slots have room for, every other gets 409 with fresh chains, and no slot is ever
booked past its capacity."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier, Event, Thread

import httpx
from sqlalchemy import func, insert, select

from gateway.scheduling.slots import Claim, SlotTakenError, take
from gateway.settings import Settings
from gateway.store.database import Database, make_engine
from gateway.store.repository import Repository
from gateway.store.schema import schedule_claims, schedule_slots
from tests.conftest import running_server
from tests.integration.scheduling_support import FHIR, build, slot_parameters

RACERS = 6
ROOM = 2  # places in every slot: the first booking does not fill it, so only the count guards

def test_racing_coordinators_never_double_book(database_url: str) -> None:
    with running_server(database_url, load_protocols=True) as base, \
            httpx.Client(base_url=base.removesuffix("/fhir"), timeout=30) as client:
        network = build(client, capacity=ROOM)
        careplans = [network.enrol(f"Racer{i}") for i in range(RACERS)]
        chain = network.chains(careplans[0], count="1")[0]
        start = Barrier(RACERS)

        def race(index: int) -> httpx.Response:
            with httpx.Client(base_url=base, timeout=30) as own:
                start.wait()
                return own.post(f"CarePlan/{careplans[index]['id']}/$book-chain",
                                json=slot_parameters(chain), headers=FHIR)

        with ThreadPoolExecutor(RACERS) as pool:
            answers = list(pool.map(race, range(RACERS)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * ROOM + [409] * (RACERS - ROOM), [a.text for a in answers]
    for lost in (a for a in answers if a.status_code == 409):
        assert lost.json()["contained"][0]["id"] == "alternatives"
    database = Database(make_engine(Settings(database_url=database_url)))
    with database.read() as conn:
        over = conn.execute(select(func.count()).where(
            schedule_slots.c.booked > schedule_slots.c.capacity)).scalar()
        claims = conn.execute(select(func.count()).where(
            schedule_claims.c.appointment_id.is_not(None))).scalar()
    database.dispose()
    assert over == 0
    assert claims == 3 * ROOM  # the winners' three appointments each, nobody else's


def test_a_claim_waits_for_the_one_before_it_to_commit(database_url: str) -> None:
    """The last place, claimed by a transaction that has not committed yet: a second
    claim waits for it, then finds the slot full (it never reads a stale count)."""
    database = Database(make_engine(Settings(database_url=database_url)))
    with database.write() as conn:
        conn.execute(insert(schedule_slots).values(
            slot_id="last-place", schedule_id="s", service="HealthcareService/mfg", start=0,
            end=1, capacity=1, booked=0, open=True))
    first_took, outcome = Event(), {}

    def claim(name: str, hold_open: float) -> None:
        try:
            with database.write() as conn:
                take(Repository(conn), Claim(0, 1, "last-place", appointment_id=name))
                first_took.set()
                time.sleep(hold_open)  # still uncommitted while the other one tries
            outcome[name] = "booked"
        except SlotTakenError:
            outcome[name] = "full"

    first = Thread(target=claim, args=("first", 0.5))
    first.start()
    assert first_took.wait(10)
    claim("second", 0)
    first.join(10)
    with database.read() as conn:
        booked = conn.execute(select(schedule_slots.c.booked)).scalar()
    database.dispose()
    assert outcome == {"first": "booked", "second": "full"}
    assert booked == 1
