"""Temperature excursions: a logistics partner's readings checked against the product's
storage range as they are stored.

A reading is an Observation coded TEMPERATURE (a data-logger reading, or an excursion
summary with the minimum and maximum seen as a Range), whose `focus` is the product
(BiologicallyDerivedProduct or Specimen) and, usually, `partOf` or `basedOn` the
shipment's Task. The product states its range with the STORAGE_RANGE extension (a
Range in Cel, K or [degF]) on itself or on one of its `storage` entries. A reading
outside it raises, in the same transaction, a Flag on the patient and an escalation: a
Communication to the treatment centre, the manufacturer and the protocol's escalation
role. The custody report lists every excursion.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.custody.coi import careplan_of_code, coi_of
from gateway.services.context import Context
from gateway.store.repository import Repository, Version
from orchestration.protocol import ATM, EXT
from orchestration.state import role_assignments

OBSERVATION_CODES = f"{ATM}/CodeSystem/custody-observation"
TEMPERATURE = "shipment-temperature"
STORAGE_RANGE = EXT + "storage-range"
EXCURSION_FLAG = "temperature-excursion"
FLAG_CODES = f"{ATM}/CodeSystem/custody-flag"
FLAGGED = f"{ATM}/sid/flag-for"  # a Flag's identifier: what raised it (Observation/id/_history/n)
TOLD_ROLES = ("treatment-centre", "coordinator", "manufacturer", "courier")


@dataclass(frozen=True)
class Reading:
    low: float
    high: float  # the same as low for a single reading

    def text(self) -> str:
        return f"{_num(self.low)} Cel" if self.low == self.high else \
            f"{_num(self.low)} to {_num(self.high)} Cel"


def _num(value: float) -> str:
    return f"{value:g}"


def celsius(quantity: dict[str, Any] | None) -> float | None:
    """A Quantity's value in degrees Celsius (UCUM Cel, K or [degF]); None otherwise."""
    if not isinstance(quantity, dict) or not isinstance(quantity.get("value"), int | float):
        return None
    value = float(quantity["value"])
    unit = quantity.get("code") or quantity.get("unit")
    if unit in ("Cel", "°C"):
        return value
    if unit == "K":
        return value - 273.15
    if unit in ("[degF]", "°F"):
        return (value - 32) * 5 / 9
    return None


def _range(value: dict[str, Any] | None) -> Reading | None:
    if not isinstance(value, dict):
        return None
    low, high = celsius(value.get("low")), celsius(value.get("high"))
    if low is None and high is None:
        return None
    return Reading(low if low is not None else float("-inf"),
                   high if high is not None else float("inf"))


def storage_range(product: dict[str, Any]) -> Reading | None:
    """The range the product must stay in, as it states it."""
    places = [product, *product.get("storage", [])]
    for place in places:
        for extension in place.get("extension", []) if isinstance(place, dict) else []:
            if extension.get("url") == STORAGE_RANGE:
                return _range(extension.get("valueRange"))
    return None


def readings(observation: dict[str, Any]) -> list[Reading]:
    """Every temperature the Observation reports (its value and its components')."""
    found = []
    for holder in [observation, *observation.get("component", [])]:
        if (value := celsius(holder.get("valueQuantity"))) is not None:
            found.append(Reading(value, value))
        if (span := _range(holder.get("valueRange"))) is not None:
            found.append(span)
    return found


def is_temperature(observation: dict[str, Any]) -> bool:
    return any(c.get("system") == OBSERVATION_CODES and c.get("code") == TEMPERATURE
               for c in observation.get("code", {}).get("coding", []))


def product_of(repo: Repository, observation: dict[str, Any]) -> Version | None:
    for focus in observation.get("focus", []):
        parts = focus.get("reference", "").split("/")
        if len(parts) >= 2 and parts[0] in ("BiologicallyDerivedProduct", "Specimen"):
            found = repo.read(parts[0], parts[1])
            if found is not None and not found.deleted:
                return found
    return None


def excursion(repo: Repository, observation: dict[str, Any]) -> tuple[Reading, Reading,
                                                                        Version] | None:
    """(what was read outside the range, the range, the product), or None."""
    if not is_temperature(observation) or observation.get("status") == "entered-in-error":
        return None
    product = product_of(repo, observation)
    allowed = storage_range(product.resource()) if product is not None else None
    if product is None or allowed is None:
        return None
    for reading in readings(observation):
        if reading.low < allowed.low or reading.high > allowed.high:
            return reading, allowed, product
    return None


# -- the after-write hook -----------------------------------------------------------------
def check_excursion(ctx: Context, repo: Repository, version: Version) -> None:
    """After an Observation is written: an excursion raises its Flag and escalation."""
    observation = version.resource()
    found = excursion(repo, observation)
    if found is None:
        return
    reading, allowed, product = found
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    about = {"reference": version.reference}
    careplan = _careplan_of(repo, product.resource())
    plan = careplan.resource() if careplan is not None else {}
    text = (f"Temperature excursion: {reading.text()} read for {product.reference}, "
            f"outside its storage range {allowed.text()}")
    flag = repo.create({
        "resourceType": "Flag", "status": "active",
        "identifier": [{"system": FLAGGED, "value": version.reference}],
        "subject": plan.get("subject") or {"reference": product.reference},
        "period": {"start": now},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/flag-category",
                                  "code": "safety", "display": "Safety"}]}],
        "code": {"coding": [{"system": FLAG_CODES, "code": EXCURSION_FLAG,
                             "display": "Temperature excursion"}], "text": text},
        "extension": [{"url": EXT + "flag-about", "valueReference": about}]})
    alert(repo, careplan, [about, {"reference": flag.reference},
                           {"reference": product.reference}],
          f"{text}. Assess the product before it is used.", TOLD_ROLES, now)


def alert(repo: Repository, careplan: Version | None, about: list[dict[str, Any]],
          text: str, roles: tuple[str, ...], now: str) -> None:
    """An urgent Communication about these records, to the organisations the enrolment
    assigned to these roles."""
    plan = careplan.resource() if careplan is not None else {}
    assigned = role_assignments(plan)
    told = sorted({assigned[r] for r in roles if r in assigned})
    communication: dict[str, Any] = {
        "resourceType": "Communication", "status": "completed", "sent": now,
        "priority": "urgent", "about": about, "payload": [{"contentString": text}]}
    if careplan is not None:
        communication["basedOn"] = [{"reference": f"CarePlan/{careplan.id}"}]
    if plan.get("subject"):
        communication["subject"] = plan["subject"]
    if told:
        communication["recipient"] = [{"reference": r} for r in told]
    repo.create(communication)


def _careplan_of(repo: Repository, product: dict[str, Any]) -> Version | None:
    code = coi_of(product)
    return careplan_of_code(repo, code) if code else None
