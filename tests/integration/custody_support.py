"""What the custody tests share: an enrolment in the shipped CAR-T protocol with its
chain of identity, partners with registered signing keys, custody Tasks and a product,
and signed handoffs built as a partner's system would build them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi.testclient import TestClient

from gateway.auth.clients import add_client
from gateway.auth.credentials import Credentials, new_key, public_jwks
from gateway.custody import coi
from gateway.custody.handoffs import CUSTODY_EVENT, PARTY, SCANNED_COI
from gateway.custody.signatures import sign
from gateway.services.context import Context
from gateway.settings import Settings
from gateway.store.database import Database
from gateway.store.repository import Repository
from orchestration.state import KEY_SYSTEM, ROLE_ASSIGNMENT

FHIR = {"content-type": "application/fhir+json"}
CAR_T = "CarTAutologous"
STORAGE_RANGE = "https://atm-gateway.org/fhir/StructureDefinition/storage-range"


@dataclass(frozen=True)
class Party:
    """A partner organisation's signer: a registered client key and a named person."""

    credentials: Credentials
    organization: str
    who: dict[str, Any]

    def signs(self, provenance: dict[str, Any], targets: dict[str, dict[str, Any]],
              meaning: str, when: str = "2026-11-20T10:00:00Z") -> dict[str, Any]:
        return sign(self.credentials, provenance, targets, meaning, self.who, when,
                    {"reference": self.organization})


def post(client: TestClient, resource: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=FHIR)
    assert response.status_code == 201, response.text
    return dict(response.json())


def put(client: TestClient, resource: dict[str, Any]) -> dict[str, Any]:
    response = client.put(f"/fhir/{resource['resourceType']}/{resource['id']}",
                          json=resource, headers=FHIR)
    assert response.status_code in (200, 201), response.text
    return dict(response.json())


def versioned(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}/_history/{resource['meta']['versionId']}"


@dataclass
class Enrolment:
    client: TestClient
    db: Database
    careplan: dict[str, Any]
    patient: dict[str, Any]
    code: str
    parties: dict[str, Party]
    locations: dict[str, dict[str, Any]]
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def task(self, stage: str, owner: str = "courier") -> dict[str, Any]:
        """The stage's Task, as the orchestrator writes it (made once)."""
        if stage not in self.tasks:
            self.tasks[stage] = post(self.client, {
                "resourceType": "Task", "status": "in-progress", "intent": "order",
                "identifier": [{"system": KEY_SYSTEM,
                                "value": f"{self.careplan['id']}/{stage}/1"}],
                "code": {"text": stage},
                "basedOn": [{"reference": f"CarePlan/{self.careplan['id']}"}],
                "for": {"reference": f"Patient/{self.patient['id']}"},
                "owner": {"reference": self.parties[owner].organization}})
        return self.tasks[stage]

    def product(self) -> dict[str, Any]:
        return post(self.client, {
            "resourceType": "BiologicallyDerivedProduct", "productCategory": "cells",
            "status": "available",
            "identifier": [{"system": coi.COI_SYSTEM, "value": self.code}],
            "storage": [{"description": "vapour-phase liquid nitrogen",
                         "extension": [{"url": STORAGE_RANGE, "valueRange": {
                             "low": {"value": -196, "unit": "Cel", "code": "Cel"},
                             "high": {"value": -135, "unit": "Cel", "code": "Cel"}}}]}]})

    def read(self, reference: str) -> dict[str, Any]:
        response = self.client.get(f"/fhir/{reference}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def handoff(self, event: str, product: dict[str, Any], task: dict[str, Any], *,
                releasing: str | None, receiving: str | None,
                signers: list[tuple[str, str]], at: str = "2026-11-20T10:00:00Z",
                scanned: str | None = None, location: str = "apheresis") -> dict[str, Any]:
        """A custody Provenance over the product and Task as stored now, signed by each
        (party, meaning)."""
        product = self.read(f"{product['resourceType']}/{product['id']}")
        task = self.read(f"Task/{task['id']}")
        targets = {versioned(product): product, versioned(task): task}
        agents = []
        for kind, name in (("releasing", releasing), ("receiving", receiving)):
            if name is not None:
                agents.append({"type": {"coding": [{"system": PARTY, "code": kind}]},
                               "who": {"reference": self.parties[name].organization}})
        provenance: dict[str, Any] = {
            "resourceType": "Provenance", "target": [{"reference": r} for r in targets],
            "occurredDateTime": at, "recorded": at,
            "activity": {"coding": [{"system": CUSTODY_EVENT, "code": event}]},
            "location": {"reference": f"Location/{self.locations[location]['id']}"},
            "agent": agents,
            "extension": [{"url": SCANNED_COI, "valueString": scanned or
                           coi.eye_readable(self.code)}]}
        provenance["signature"] = [self.parties[name].signs(provenance, targets, meaning, at)
                                   for name, meaning in signers]
        return provenance


ROLES = {"apheresis": "apheresis-centre", "courier": "courier",
         "manufacturer": "manufacturer", "centre": "treatment-centre",
         "nurse": "treatment-centre"}


def enrol(client: TestClient, db: Database, settings: Settings,
          countries: dict[str, str] | None = None) -> Enrolment:
    """A patient enrolled in the CAR-T protocol, with its chain of identity assigned."""
    plans = client.get("/fhir/PlanDefinition", params={"name": CAR_T}).json()["entry"]
    canonical = f"{plans[0]['resource']['url']}|{plans[0]['resource']['version']}"
    parties = {}
    for name, role in ROLES.items():
        organization = f"Organization/{name}"
        put(client, {"resourceType": "Organization", "id": name, "name": f"The {name}"})
        practitioner = post(client, {"resourceType": "Practitioner",
                                     "name": [{"family": name.title(), "given": ["Sam"]}]})
        key = new_key()
        registered = add_client(db, name=f"{name} signer", role=role,
                                organization=organization, jwks=public_jwks(key),
                                scopes="system/*.cruds")
        parties[name] = Party(Credentials(registered.client_id, key), organization,
                              {"reference": f"Practitioner/{practitioner['id']}",
                               "display": f"Sam {name.title()}"})
    locations = {}
    for name, country in {"apheresis": "FR", "manufacturing": "NL", "bedside": "FR",
                          **(countries or {})}.items():
        locations[name] = post(client, {"resourceType": "Location", "name": name,
                                        "address": {"country": country}})
    patient = post(client, {"resourceType": "Patient",
                            "name": [{"family": "Durand", "given": ["Élodie"]}],
                            "managingOrganization": {"reference": "Organization/centre"}})
    careplan = post(client, {
        "resourceType": "CarePlan", "status": "active", "intent": "plan",
        "instantiatesCanonical": [canonical], "title": "Autologous CAR-T",
        "subject": {"reference": f"Patient/{patient['id']}"},
        "extension": [{"url": ROLE_ASSIGNMENT, "extension": [
            {"url": "role", "valueCode": role},
            {"url": "organization", "valueReference": {"reference": f"Organization/{name}"}}]}
            for name, role in ROLES.items() if name != "nurse"]})
    with db.write() as conn:
        code = coi.assign(Context(db=db, settings=settings, base_url="http://testserver/fhir"),
                          Repository(conn), careplan["id"])
    return Enrolment(client, db, careplan, patient, code, parties, locations)
