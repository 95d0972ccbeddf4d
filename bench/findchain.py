"""$find-chain's data set: a network of sites with 30-minute slots, loaded through a
running gateway's FHIR API as the sites and a coordinator would write it.

`python -m bench.findchain SPEC.json` writes:

- `sites` sites for each step of the shipped CAR-T protocol's booking stage (apheresis,
  manufacturing, infusion): a Location, a HealthcareService typed with the step's service
  and a Schedule serving it (18 Schedules at 6 sites); one infusion ward is in Germany,
  where the protocol's infusion lead is longer;
- per Schedule, `days` days of 30-minute Slots around the clock (48 a day), PUT with ids
  of the site's own in transaction Bundles of `bundle` entries. Each step's days begin
  where a chain started on day 0 first needs it (apheresis day 0, manufacturing day 2,
  infusion day 30: the protocol's shortest leads), so that a first step on any of the
  `days` days has complete chains and no loaded slot lies out of every chain's reach;
- routes (OrganizationAffiliation `chain-route`): priority 1, sites 1-2 of each step for
  every centre and sites 3-5 for centre 2 only; priority 2, every site;
- a quota: manufacturing site 1 takes one booking per ISO week;
- `patients` enrolments in CAR-T (CarePlans instantiating the stored PlanDefinition, the
  coordinator at one of two centres), the first of them (`booked`, at most one a week of
  the window) with a chain booked through $book-chain on route 1, on Mondays spread over
  the window: those slots are full, and manufacturing site 1's quota is used up in those
  weeks;

then checks that $find-chain finds chains for every patient at both ends of the window,
and prints one JSON object: what was loaded, how long it took, and what the load
generator's requests need (the CarePlan ids and the first day).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from gateway.auth.credentials import Credentials, SmartAuth
from gateway.scheduling.directory import QUOTA, ROUTE_CODE, ROUTE_PRIORITY, ROUTE_SYSTEM
from orchestration.chains import SERVICE_SYSTEM
from orchestration.state import ROLE_ASSIGNMENT

FHIR = {"content-type": "application/fhir+json", "accept": "application/fhir+json"}
SLOT = timedelta(minutes=30)
SLOTS_PER_DAY = 48
# Where each step's days begin: the protocol's shortest leads (manufacturing 2 d after
# apheresis, infusion 28 d after manufacturing), from a chain that starts on day 0.
STEPS = {"apheresis": 0, "manufacturing": 2, "infusion": 30}
COUNTRIES = {"apheresis": "FR", "manufacturing": "NL", "infusion": "FR"}
GERMAN_WARD = "infusion-6"  # its infusion lead is 30-45 d, not 28-42 d
CENTRES = ("Organization/centre-1", "Organization/centre-2")


@dataclass
class Spec:
    base_url: str
    """http://127.0.0.1:PORT/fhir"""
    sites: int = 6
    days: int = 90
    patients: int = 12
    booked: int = 8
    bundle: int = 480
    """Slots per transaction (ten days of one Schedule)."""
    concurrency: int = 4
    cpu: int | None = None
    credentials: dict[str, Any] | None = None


def site_id(step: str, number: int) -> str:
    return f"{step}-{number}"


def slot_id(site: str, index: int) -> str:
    return f"{site}-{index:05d}"


def first_day() -> datetime:
    """Midnight UTC on the Monday at least a week ahead: every slot is in the future."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today + timedelta(days=14 - today.weekday())


def slot_start(day0: datetime, step: str, index: int) -> datetime:
    return day0 + timedelta(days=STEPS[step]) + index * SLOT


def instant(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def transaction(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def put(resource: dict[str, Any]) -> dict[str, Any]:
    return {"resource": resource,
            "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}}


# -- the network ----------------------------------------------------------------------------
def site_entries(step: str, number: int) -> list[dict[str, Any]]:
    """A site's Location, HealthcareService (with manufacturing site 1's quota) and
    Schedule."""
    site = site_id(step, number)
    country = "DE" if site == GERMAN_WARD else COUNTRIES[step]
    service: dict[str, Any] = {
        "resourceType": "HealthcareService", "id": site, "name": f"{step} at site {number}",
        "type": [{"coding": [{"system": SERVICE_SYSTEM, "code": step}]}],
        "location": [{"reference": f"Location/{site}"}]}
    if site == site_id("manufacturing", 1):
        service["extension"] = [{"url": QUOTA, "extension": [
            {"url": "period", "valueCode": "week"}, {"url": "limit", "valueUnsignedInt": 1}]}]
    return [put({"resourceType": "Location", "id": site, "name": f"site {site}",
                 "address": {"country": country}}),
            put(service),
            put({"resourceType": "Schedule", "id": site, "actor": [
                {"reference": f"HealthcareService/{site}"}, {"reference": f"Location/{site}"}]})]


def route(route_id: str, priority: int, numbers: range, centre: str | None) -> dict[str, Any]:
    affiliation: dict[str, Any] = {
        "resourceType": "OrganizationAffiliation", "id": route_id, "active": True,
        "code": [{"coding": [{"system": ROUTE_SYSTEM, "code": ROUTE_CODE}]}],
        "healthcareService": [{"reference": f"HealthcareService/{site_id(step, n)}"}
                              for step in STEPS for n in numbers],
        "extension": [{"url": ROUTE_PRIORITY, "valueUnsignedInt": priority}]}
    if centre is not None:
        affiliation["organization"] = {"reference": centre}
    return put(affiliation)


def routes(sites: int) -> list[dict[str, Any]]:
    return [route("route-1", 1, range(1, 3), None),
            route("route-2", 1, range(3, min(sites, 5) + 1), CENTRES[1]),
            route("route-all", 2, range(1, sites + 1), None)]


def slot_bundles(spec: Spec, day0: datetime) -> list[dict[str, Any]]:
    """Every Schedule's slots, `spec.bundle` to a transaction."""
    entries = []
    for step in STEPS:
        for number in range(1, spec.sites + 1):
            site = site_id(step, number)
            for index in range(spec.days * SLOTS_PER_DAY):
                start = slot_start(day0, step, index)
                entries.append(put({
                    "resourceType": "Slot", "id": slot_id(site, index),
                    "schedule": {"reference": f"Schedule/{site}"}, "status": "free",
                    "start": instant(start), "end": instant(start + SLOT)}))
    return [transaction(entries[n:n + spec.bundle])
            for n in range(0, len(entries), spec.bundle)]


def enrolment(canonical: str, number: int) -> dict[str, Any]:
    return {"resourceType": "CarePlan", "status": "active", "intent": "plan",
            "instantiatesCanonical": [canonical],
            "subject": {"reference": f"Patient/find-chain-{number}"},
            "extension": [{"url": ROLE_ASSIGNMENT, "extension": [
                {"url": "role", "valueCode": "coordinator"},
                {"url": "organization",
                 "valueReference": {"reference": CENTRES[number % len(CENTRES)]}}]}]}


def booked_chains(spec: Spec) -> list[dict[str, Any]]:
    """The chains booked before the search: on route 1, at 09:00 on Mondays spread over
    the window (one a week at most: manufacturing site 1 takes one booking a week), with
    manufacturing at the shortest lead, so each uses up site 1's quota in its week."""
    weeks = -(-spec.days // 7)
    count = min(spec.booked, spec.patients, weeks)
    chains = []
    for number in range(count):
        first = (number * weeks // count) * 7 * SLOTS_PER_DAY + 18  # 09:00 that Monday
        site = 1 + number % 2
        # Manufacturing's day 0 is apheresis' day 2 and infusion's is manufacturing's day
        # 28: the same index is the shortest lead at each step.
        references = [slot_id(site_id("apheresis", site), first),
                      slot_id(site_id("manufacturing", 1), first),
                      slot_id(site_id("infusion", site), first)]
        chains.append({"resourceType": "Parameters", "parameter": [
            {"name": "slot", "valueReference": {"reference": f"Slot/{r}"}}
            for r in references]})
    return chains


# -- the run --------------------------------------------------------------------------------
class Loader:
    def __init__(self, client: httpx.AsyncClient, spec: Spec) -> None:
        self.client, self.spec = client, spec

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None,
                   params: dict[str, str] | None = None) -> dict[str, Any]:
        response = await self.client.request(method, path, json=body, params=params,
                                             headers=FHIR)
        if response.status_code != 200:
            raise RuntimeError(f"{method} {path} answered {response.status_code}: "
                               f"{response.text[:500]}")
        answer: dict[str, Any] = response.json()
        return answer

    async def canonical(self) -> str:
        found = await self.call("GET", "PlanDefinition", params={"name": "CarTAutologous"})
        if not found.get("entry"):
            raise RuntimeError("the server has no CAR-T PlanDefinition: start it with the "
                               "shipped protocols loaded")
        plan = found["entry"][0]["resource"]
        return f"{plan['url']}|{plan['version']}"

    async def network(self) -> None:
        entries = [e for step in STEPS for n in range(1, self.spec.sites + 1)
                   for e in site_entries(step, n)]
        await self.call("POST", "", transaction(entries))
        await self.call("POST", "", transaction(routes(self.spec.sites)))

    async def slots(self, day0: datetime) -> int:
        """Every Slot, `concurrency` transactions at a time; how many."""
        bundles = slot_bundles(self.spec, day0)
        queue = list(reversed(bundles))

        async def sender() -> None:
            while queue:
                await self.call("POST", "", queue.pop())

        await asyncio.gather(*(sender() for _ in range(self.spec.concurrency)))
        return sum(len(b["entry"]) for b in bundles)

    async def enrol(self, canonical: str) -> list[str]:
        answer = await self.call("POST", "", transaction([
            {"resource": enrolment(canonical, n), "request": {"method": "POST",
                                                              "url": "CarePlan"}}
            for n in range(self.spec.patients)]))
        # location: [base/]CarePlan/<id>/_history/1
        return [e["response"]["location"].split("CarePlan/", 1)[1].split("/")[0]
                for e in answer["entry"]]

    async def book(self, careplans: list[str]) -> int:
        chains = booked_chains(self.spec)
        for careplan, chain in zip(careplans, chains, strict=False):
            await self.call("POST", f"CarePlan/{careplan}/$book-chain", chain)
        return len(chains)

    async def check(self, careplans: list[str], day0: datetime) -> dict[str, Any]:
        """Every patient has chains at both ends of the window; the first answer's size."""
        chains: list[int] = []
        for careplan in careplans:
            for day in (0, self.spec.days - 1):
                start = instant(day0 + timedelta(days=day))
                answer = await self.call("GET", f"CarePlan/{careplan}/$find-chain",
                                         params={"start": start})
                found = [p for p in answer.get("parameter", []) if p["name"] == "chain"]
                if not found:
                    raise RuntimeError(f"$find-chain found no chain for CarePlan/{careplan} "
                                       f"from {start}: {json.dumps(answer)[:500]}")
                chains.append(len(found))
        return {"chains_min": min(chains), "chains_max": max(chains)}


async def run(spec: Spec) -> dict[str, Any]:
    auth = None
    if spec.credentials is not None:
        auth = SmartAuth(spec.base_url.removesuffix("/fhir") + "/auth/token",
                         Credentials.from_json(spec.credentials))
    async with httpx.AsyncClient(base_url=spec.base_url.rstrip("/") + "/", timeout=300.0,
                                 auth=auth) as client:
        loader, day0 = Loader(client, spec), first_day()
        canonical = await loader.canonical()
        started = time.monotonic()
        await loader.network()
        slots = await loader.slots(day0)
        slot_seconds = time.monotonic() - started
        careplans = await loader.enrol(canonical)
        booked = await loader.book(careplans)
        seconds = time.monotonic() - started
        checked = await loader.check(careplans, day0)
    return {"sites": spec.sites, "steps": list(STEPS), "schedules": spec.sites * len(STEPS),
            "days": spec.days, "slots": slots,
            "slots_per_schedule": spec.days * SLOTS_PER_DAY,
            "first_day": instant(day0), "step_first_days": STEPS,
            "routes": {"priority_1": 2, "priority_2": 1}, "quota": "manufacturing-1: 1/week",
            "patients": len(careplans), "careplans": careplans, "booked_chains": booked,
            "bundle": spec.bundle, "slot_seconds": round(slot_seconds, 1),
            "slots_per_s": round(slots / slot_seconds, 1) if slot_seconds else None,
            "seconds": round(seconds, 1), **checked}


def main(argv: list[str]) -> None:
    with open(argv[0]) as file:
        spec = Spec(**json.load(file))
    if spec.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {spec.cpu})
    print(json.dumps(asyncio.run(run(spec))))


if __name__ == "__main__":
    main(sys.argv[1:])
