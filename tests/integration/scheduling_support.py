"""What the scheduling tests share: a small network of sites (two apheresis centres, one
manufacturer, two infusion wards) with their Schedules and Slots, and patients enrolled
in the shipped CAR-T protocol, whose booking stage books apheresis, manufacturing and
infusion (manufacturing 2–7 days after apheresis, infusion 28–42 days after that)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from gateway.scheduling.directory import QUOTA, ROUTE_CODE, ROUTE_PRIORITY, ROUTE_SYSTEM
from gateway.scheduling.slots import CAPACITY
from orchestration.chains import SERVICE_SYSTEM
from orchestration.state import KEY_SYSTEM, ROLE_ASSIGNMENT

FHIR = {"content-type": "application/fhir+json"}
DAY = timedelta(days=1)
# Slots start on a Monday a few weeks ahead, so that "now" is always before them.
_today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
MONDAY = _today + timedelta(days=14 - _today.weekday())
SITES = {"aph-a": ("apheresis", "FR"), "aph-b": ("apheresis", "FR"),
         "mfg": ("manufacturing", "NL"), "inf-a": ("infusion", "FR"),
         "inf-b": ("infusion", "FR")}


def instant(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def post(client: httpx.Client, resource: dict[str, Any], status: int = 201) -> dict[str, Any]:
    response = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=FHIR)
    assert response.status_code == status, response.text
    return dict(response.json())


def put(client: httpx.Client, resource: dict[str, Any]) -> dict[str, Any]:
    response = client.put(f"/fhir/{resource['resourceType']}/{resource['id']}",
                          json=resource, headers=FHIR)
    assert response.status_code in (200, 201), response.text
    return dict(response.json())


def params(resource: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for parameter in resource.get("parameter", []):
        found.setdefault(parameter["name"], []).append(parameter)
    return found


def part(parameter: dict[str, Any], name: str) -> Any:
    value = next(p for p in parameter["part"] if p["name"] == name)
    return next(v for k, v in value.items() if k.startswith("value") or k == "part")


def steps_of(chain: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """stage -> {slot, start, service} of one chain of a $find-chain answer."""
    return {part(s, "stage"): {"slot": part(s, "slot")["reference"],
                               "start": part(s, "start"),
                               "service": part(s, "service")["reference"]}
            for s in chain["part"] if s["name"] == "step"}


def slot_parameters(chain: dict[str, Any]) -> dict[str, Any]:
    """The chain as $hold-chain and $book-chain take it back."""
    return {"resourceType": "Parameters", "parameter": [chain]}


@dataclass
class Network:
    client: httpx.Client
    canonical: str
    services: dict[str, str] = field(default_factory=dict)  # site -> HealthcareService ref
    schedules: dict[str, str] = field(default_factory=dict)

    def site(self, name: str, *, quota: dict[str, Any] | None = None) -> None:
        kind, country = SITES[name]
        location = put(self.client, {"resourceType": "Location", "id": name, "name": name,
                                     "address": {"country": country}})
        service: dict[str, Any] = {
            "resourceType": "HealthcareService", "id": name, "name": f"{kind} at {name}",
            "providedBy": {"reference": f"Organization/{name}"},
            "type": [{"coding": [{"system": SERVICE_SYSTEM, "code": kind}]}],
            "location": [{"reference": f"Location/{location['id']}"}]}
        if quota is not None:
            service["extension"] = [quota]
        put(self.client, service)
        self.services[name] = f"HealthcareService/{name}"
        put(self.client, {"resourceType": "Schedule", "id": f"{name}-schedule",
                          "actor": [{"reference": f"HealthcareService/{name}"},
                                    {"reference": f"Location/{name}"}]})
        self.schedules[name] = f"Schedule/{name}-schedule"

    def slots(self, name: str, days: range, *, hour: int = 9, hours: int = 4,
              capacity: int = 1) -> list[str]:
        """One slot a day at a site; a transaction Bundle writes them all."""
        entries = []
        for day in days:
            start = MONDAY + day * DAY + timedelta(hours=hour)
            slot: dict[str, Any] = {
                "resourceType": "Slot", "schedule": {"reference": self.schedules[name]},
                "status": "free", "start": instant(start),
                "end": instant(start + timedelta(hours=hours))}
            if capacity != 1:
                slot["extension"] = [{"url": CAPACITY, "valueUnsignedInt": capacity}]
            entries.append({"resource": slot, "request": {"method": "POST", "url": "Slot"}})
        response = self.client.post("/fhir", json={"resourceType": "Bundle",
                                                   "type": "transaction", "entry": entries},
                                    headers=FHIR)
        assert response.status_code == 200, response.text
        return [e["response"]["location"].split("/_history")[0]
                for e in response.json()["entry"]]

    def route(self, priority: int, sites: list[str], centre: str | None = None) -> None:
        affiliation: dict[str, Any] = {
            "resourceType": "OrganizationAffiliation", "active": True,
            "code": [{"coding": [{"system": ROUTE_SYSTEM, "code": ROUTE_CODE}]}],
            "healthcareService": [{"reference": self.services[s]} for s in sites],
            "extension": [{"url": ROUTE_PRIORITY, "valueUnsignedInt": priority}]}
        if centre is not None:
            affiliation["organization"] = {"reference": centre}
        post(self.client, affiliation)

    def enrol(self, family: str = "Durand", booking_task: bool = True) -> dict[str, Any]:
        """A patient enrolled in CAR-T, with the booking stage's Task ready."""
        patient = post(self.client, {"resourceType": "Patient", "name": [{"family": family}]})
        careplan = post(self.client, {
            "resourceType": "CarePlan", "status": "active", "intent": "plan",
            "instantiatesCanonical": [self.canonical],
            "subject": {"reference": f"Patient/{patient['id']}"},
            "extension": [{"url": ROLE_ASSIGNMENT, "extension": [
                {"url": "role", "valueCode": "coordinator"},
                {"url": "organization", "valueReference": {"reference": "Organization/centre"}}]}]})
        if booking_task:
            post(self.client, {
                "resourceType": "Task", "status": "ready", "intent": "order",
                "identifier": [{"system": KEY_SYSTEM,
                                "value": f"{careplan['id']}/slot-booking/1"}],
                "basedOn": [{"reference": f"CarePlan/{careplan['id']}"}],
                "for": {"reference": f"Patient/{patient['id']}"}})
        return careplan

    def find(self, careplan: dict[str, Any], **query: Any) -> dict[str, Any]:
        response = self.client.get(f"/fhir/CarePlan/{careplan['id']}/$find-chain",
                                   params={"start": instant(MONDAY), **query})
        assert response.status_code == 200, response.text
        return dict(response.json())

    def chains(self, careplan: dict[str, Any], **query: Any) -> list[dict[str, Any]]:
        return params(self.find(careplan, **query)).get("chain", [])


def quota(limit: int, period: str = "week", centre: str | None = None) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"url": "period", "valueCode": period},
                                   {"url": "limit", "valueUnsignedInt": limit}]
    if centre is not None:
        parts.append({"url": "organization", "valueReference": {"reference": centre}})
    return {"url": QUOTA, "extension": parts}


def build(client: httpx.Client, *, mfg_capacity: int = 1, capacity: int = 1,
          mfg_quota: dict[str, Any] | None = None) -> Network:
    """Five sites with a slot a day: apheresis for two weeks, manufacturing for four,
    infusion from day 28 to day 59 (each slot with room for `capacity` bookings, or
    `mfg_capacity` at the manufacturer)."""
    plans = client.get("/fhir/PlanDefinition", params={"name": "CarTAutologous"}).json()
    plan = plans["entry"][0]["resource"]
    network = Network(client, f"{plan['url']}|{plan['version']}")
    for name in SITES:
        network.site(name, quota=mfg_quota if name == "mfg" else None)
    network.slots("aph-a", range(0, 14), capacity=capacity)
    network.slots("aph-b", range(0, 14), hour=13, capacity=capacity)
    network.slots("mfg", range(0, 28), hour=8, hours=8, capacity=max(mfg_capacity, capacity))
    network.slots("inf-a", range(28, 60), hour=10, capacity=capacity)
    network.slots("inf-b", range(28, 60), hour=14, capacity=capacity)
    return network
