"""The custody part of `atm demo`: each handoff a protocol step records, signed by the
parties as the step's policy asks, and the custody report of a finished journey.

The treatment centre labels what travels (it creates the Specimen at collection and the
product at release, each carrying the enrolment's chain of identity, and points the
custody Task at it, so that every partner working that Task can read it); then the
releasing party records the handoff: the Provenance over the exact product and Task
versions, the code scanned on the spot, and a signature per required meaning, each made
with the signing party's registered key (gateway/custody/signatures.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gateway.auth.credentials import Credentials
from gateway.custody.coi import COI_SYSTEM, coi_of, eye_readable
from gateway.custody.excursions import STORAGE_RANGE
from gateway.custody.handoffs import CUSTODY_EVENT, PARTY, SCANNED_COI
from gateway.custody.signatures import sign
from orchestration.protocol import Handoff, Stage

Call = Callable[..., Any]  # Demo._call: (method, path, body=None, *, by=None)
COUNTRY = "FR"  # where the demo's sites are
# Who takes custody at each event: a partner role, or "custodian" (it stays), or None
# (the patient: at infusion the cells leave the chain).
RECEIVER = {"collection": "apheresis-centre", "pick-up": "courier",
            "hand-over": "custodian", "receipt-at-manufacturing": "manufacturer",
            "release": "custodian", "receipt-at-site": "treatment-centre",
            "thaw": "custodian", "infusion": None}
BEFORE_MANUFACTURING = ("collection", "pick-up", "hand-over", "receipt-at-manufacturing")


@dataclass
class Chain:
    """What one journey has in custody, and who holds it."""

    careplan_id: str
    code: str | None = None
    specimen: dict[str, Any] | None = None
    product: dict[str, Any] | None = None
    custodian: str | None = None  # Organization reference
    recorded: int = 0


@dataclass
class Custody:
    """Records and signs handoffs for the demo's partners."""

    call: Call
    organization_of: Callable[[str], str]  # partner role -> its Organization reference
    credentials: Callable[[str], Credentials | None]  # Organization -> its signing key
    centre: str
    chains: dict[str, Chain] = field(default_factory=dict)
    _registered: set[str] = field(default_factory=set)  # Locations, Practitioners written

    def chain(self, careplan_id: str) -> Chain:
        return self.chains.setdefault(careplan_id, Chain(careplan_id))

    def record(self, stage: Stage, task_id: str, begin: datetime, end: datetime) -> list[str]:
        """Every handoff of the stage, spread over its execution; what was recorded."""
        task = self.call("GET", f"Task/{task_id}")
        careplan_id = task["basedOn"][0]["reference"].split("/", 1)[1]
        chain = self.chain(careplan_id)
        done = []
        for number, handoff in enumerate(stage.handoffs, start=1):
            at = begin + (end - begin) * number / (len(stage.handoffs) + 1)
            done.append(self._handoff(chain, stage, task_id, handoff, at))
        return done

    def _handoff(self, chain: Chain, stage: Stage, task_id: str, handoff: Handoff,
                 at: datetime) -> str:
        item = self._item(chain, handoff.event)
        task = self._focused(task_id, item)
        owner = task.get("owner", {}).get("reference", self.centre)
        receiver = RECEIVER.get(handoff.event, "custodian")
        releasing = None if handoff.event == "collection" else (
            chain.custodian or self.organization_of("manufacturer"))  # an allogeneic product
        receiving = (chain.custodian or owner) if receiver == "custodian" else (
            self.organization_of(receiver) if receiver else None)
        site = self._site(receiving or releasing or owner)
        item = self.call("GET", f"{item['resourceType']}/{item['id']}")
        targets = {_versioned(item): item, _versioned(task): task}
        when = at.isoformat()
        provenance: dict[str, Any] = {
            "resourceType": "Provenance", "target": [{"reference": r} for r in targets],
            "occurredDateTime": when, "recorded": when,
            "activity": {"coding": [{"system": CUSTODY_EVENT, "code": handoff.event}]},
            "location": {"reference": site},
            "agent": [{"type": {"coding": [{"system": PARTY, "code": kind}]},
                       "who": {"reference": party}}
                      for kind, party in (("releasing", releasing), ("receiving", receiving))
                      if party],
            "extension": [{"url": SCANNED_COI, "valueString": eye_readable(chain.code or "")}]}
        signers = self._signers(handoff, releasing, receiving, owner)
        provenance["signature"] = [
            sign(credentials, provenance, targets, meaning, who, when,
                 {"reference": organization})
            for meaning, organization, who, credentials in signers]
        stored = self.call("POST", "Provenance", provenance, by=releasing or receiving)
        chain.custodian = receiving
        chain.recorded += 1
        return f"{handoff.event} (Provenance/{stored['id']}, {len(signers)} signed)"

    def _item(self, chain: Chain, event: str) -> dict[str, Any]:
        """What changes hands: the cells collected (a Specimen) until manufacturing
        receives them, the product from then on; each labelled when first met."""
        if chain.code is None:
            careplan = self.call("GET", f"CarePlan/{chain.careplan_id}")
            chain.code = coi_of(careplan)
            if chain.code is None:
                raise RuntimeError(f"CarePlan/{chain.careplan_id} has no chain of identity "
                                   "yet: its assignment step comes before any handoff")
        label = [{"system": COI_SYSTEM, "value": chain.code}]
        if event == "collection":  # a repeat collection brings new cells, and a new product
            chain.specimen, chain.product = self.call("POST", "Specimen", {
                "resourceType": "Specimen", "identifier": label,
                "type": {"text": "Leukapheresis product"}}), None
            return chain.specimen
        if event in BEFORE_MANUFACTURING and chain.specimen and chain.product is None:
            return chain.specimen
        if chain.product is None:
            chain.product = self.call("POST", "BiologicallyDerivedProduct", {
                "resourceType": "BiologicallyDerivedProduct", "identifier": label,
                "productCategory": "cells", "status": "available",
                "storage": [{"description": "Vapour-phase liquid nitrogen", "extension": [{
                    "url": STORAGE_RANGE, "valueRange": {
                        "low": {"value": -196, "unit": "Cel", "code": "Cel"},
                        "high": {"value": -135, "unit": "Cel", "code": "Cel"}}}]}]})
        return chain.product

    def _focused(self, task_id: str, item: dict[str, Any]) -> dict[str, Any]:
        """The custody Task pointed at what changes hands (so its owner may read it)."""
        task = self.call("GET", f"Task/{task_id}")
        reference = f"{item['resourceType']}/{item['id']}"
        if task.get("focus", {}).get("reference") != reference:
            task = self.call("PUT", f"Task/{task_id}", {**task, "focus": {"reference": reference}})
        return dict(task)

    def _site(self, organization: str) -> str:
        site = "site-" + organization.split("/", 1)[1]
        if f"Location/{site}" in self._registered:
            return f"Location/{site}"
        self._registered.add(f"Location/{site}")
        self.call("PUT", f"Location/{site}", {
            "resourceType": "Location", "id": site, "status": "active",
            "name": f"Site of {organization.split('/', 1)[1]}", "address": {"country": COUNTRY},
            "managingOrganization": {"reference": organization}})
        return f"Location/{site}"

    def _signers(self, handoff: Handoff, releasing: str | None, receiving: str | None,
                 owner: str) -> list[tuple[str, str, dict[str, Any], Credentials]]:
        """(meaning, organisation, who, key) of each signature the policy asks for here."""
        by_meaning = {"released": (releasing, 1), "received": (receiving, 1),
                      "performed": (owner, 1), "verified": (owner, 2),
                      "witnessed": (self.centre, 3)}
        signers = []
        for meaning in handoff.required(COUNTRY, None):
            organization, person = by_meaning[meaning]
            organization = organization or owner
            credentials = self.credentials(organization)
            if credentials is None:
                raise RuntimeError("the demo signs handoffs with its partners' keys: run it "
                                   "with the server's database")
            who = self._person(organization, person)
            signers.append((meaning, organization, who, credentials))
        return signers

    def _person(self, organization: str, number: int) -> dict[str, Any]:
        """A named signer of the organisation (a Practitioner the centre registers)."""
        org = organization.split("/", 1)[1]
        person = f"{org}-{number}"
        names = ["Camille", "Noah", "Inès"]
        given = names[(number - 1) % len(names)]
        family = org.removeprefix("atm-demo-").replace("-", " ").title()
        if f"Practitioner/{person}" not in self._registered:
            self._registered.add(f"Practitioner/{person}")
            self.call("PUT", f"Practitioner/{person}", {
                "resourceType": "Practitioner", "id": person, "active": True,
                "name": [{"given": [given], "family": family}]})
        return {"reference": f"Practitioner/{person}", "display": f"{given} {family}"}


def _versioned(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}/_history/{resource['meta']['versionId']}"

