"""The demo's scheduling: the site network a treatment centre books in, and a coordinator
booking each patient's chain with $find-chain and $book-chain.

Two sites for each service the protocols' chains need (apheresis chairs, manufacturing
capacity, infusion beds), each with a Schedule and a slot a day for half a year. Slots
have fixed ids, so that running the demo again against the same server publishes the
same slots instead of new ones.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode

from orchestration.chains import SERVICE_SYSTEM

Call = Callable[..., Any]
CAPACITY = "https://atm-gateway.org/fhir/StructureDefinition/slot-capacity"
DAYS = 180
# service -> its sites (id, name, country), and each day's slot: start hour, hours, places.
SITES = {
    "apheresis": ([("demo-apheresis-lyon", "Apheresis unit, Lyon", "FR"),
                   ("demo-apheresis-lille", "Apheresis unit, Lille", "FR")], (8, 4, 2)),
    "manufacturing": ([("demo-factory-leiden", "Cell factory, Leiden", "NL"),
                       ("demo-factory-gent", "Cell factory, Ghent", "BE")], (8, 8, 3)),
    "infusion": ([("demo-ward-lyon", "Cell therapy ward, Lyon", "FR"),
                  ("demo-ward-paris", "Cell therapy ward, Paris", "FR")], (9, 4, 2)),
}


def publish(call: Call, services: set[str], first_day: datetime,
            providers: dict[str, str]) -> int:
    """The sites of these services (each provided by the organisation `providers` names
    for its service, which thereby sees the appointments booked there), their Schedules
    and a slot a day from `first_day`; the number of slots published."""
    published = 0
    for service in sorted(services & set(SITES)):
        sites, (hour, hours, places) = SITES[service]
        for site_id, name, country in sites:
            call("PUT", f"Location/{site_id}", {
                "resourceType": "Location", "id": site_id, "name": name,
                "address": {"country": country}})
            call("PUT", f"HealthcareService/{site_id}", {
                "resourceType": "HealthcareService", "id": site_id, "name": name,
                "type": [{"coding": [{"system": SERVICE_SYSTEM, "code": service}]}],
                "providedBy": {"reference": providers[service]},
                "location": [{"reference": f"Location/{site_id}"}]})
            call("PUT", f"Schedule/{site_id}", {
                "resourceType": "Schedule", "id": site_id,
                "actor": [{"reference": f"HealthcareService/{site_id}"},
                          {"reference": f"Location/{site_id}"}]})
            published += _slots(call, site_id, first_day, hour, hours, places)
    return published


def _slots(call: Call, site_id: str, first_day: datetime, hour: int, hours: int,
           places: int) -> int:
    entries = []
    for day in range(DAYS):
        date = (first_day + timedelta(days=day)).date()
        start = datetime.combine(date, time(hour), first_day.tzinfo)
        slot_id = f"{site_id}-{date:%Y%m%d}"
        entries.append({"resource": {
            "resourceType": "Slot", "id": slot_id, "schedule": {"reference": f"Schedule/{site_id}"},
            "status": "free", "start": start.isoformat(),
            "end": (start + timedelta(hours=hours)).isoformat(),
            "extension": [{"url": CAPACITY, "valueUnsignedInt": places}]},
            "request": {"method": "PUT", "url": f"Slot/{slot_id}"}})
    call("POST", "", {"resourceType": "Bundle", "type": "transaction", "entry": entries})
    return len(entries)


def book(call: Call, careplan_id: str, earliest: datetime) -> dict[str, tuple[datetime, str]]:
    """The first chain $find-chain offers from `earliest`, booked: stage -> (start, where)."""
    query = urlencode({"start": earliest.isoformat(), "count": "1"})
    found = call("GET", f"CarePlan/{careplan_id}/$find-chain?{query}")
    chains = [p for p in found.get("parameter", []) if p["name"] == "chain"]
    if not chains:
        reasons = [i.get("diagnostics") for p in found.get("parameter", [])
                   if p["name"] == "outcome" for i in p["resource"]["issue"]]
        raise RuntimeError(f"no chain to book for CarePlan/{careplan_id}: {reasons}")
    call("POST", f"CarePlan/{careplan_id}/$book-chain",
         {"resourceType": "Parameters", "parameter": chains})
    booked = {}
    for step in (p for p in chains[0]["part"] if p["name"] == "step"):
        parts = {p["name"]: p for p in step["part"]}
        booked[parts["stage"]["valueId"]] = (
            datetime.fromisoformat(parts["start"]["valueInstant"].replace("Z", "+00:00")),
            parts["service"]["valueReference"].get("display", ""))
    return booked
