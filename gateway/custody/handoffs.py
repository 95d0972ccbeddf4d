"""Custody handoffs: the rule every custody Provenance passes before it is stored.

A handoff (collection, pick-up, hand-over, receipt, release, thaw, infusion) is a
Provenance whose activity is a code of CUSTODY_EVENT. It targets the exact versions of
the product (BiologicallyDerivedProduct or Specimen) and of the custody Task, names the
parties (agent.type releasing / receiving), the place (location) and the time
(occurredDateTime), carries the chain-of-identity code scanned on the spot (extension
SCANNED_COI), and the signatures the protocol asks of this handoff at this site or in
this country (gateway/custody/signatures.py). The rule:

1. refuses what is incomplete or inconsistent (422, nothing stored);
2. checks the scanned code: a bad check character or another enrolment's code stops
   the step (StepStoppedError: 422, and once the refused write is undone the Task is put
   on hold with the reason, a Flag is raised and the treatment centre and manufacturer
   are told: `record_stop`);
3. verifies every signature and that the required meanings are signed, each by another
   signer (dual control): an invalid or missing one is refused (422).
Like every Provenance, a custody record is never changed or deleted (405): a correction
is a new Provenance.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from gateway.auth.clients import Client, client_from_row
from gateway.auth.keys import JwksCache
from gateway.custody import signatures
from gateway.custody.coi import coi_of, eye_readable
from gateway.custody.excursions import alert
from gateway.errors import BusinessRuleError, Issue
from gateway.services.context import Context
from gateway.services.protocols import plan_definition_id, protocol_from_store
from gateway.store.repository import Actor, Repository, Version
from gateway.store.schema import oauth_clients
from mappings import isbt128
from orchestration.protocol import ATM, EXT, Handoff, Protocol, ProtocolFormError, Stage
from orchestration.state import task_run_key

CUSTODY_EVENT = f"{ATM}/CodeSystem/custody-event"
EVENTS = {"collection": "Collection", "pick-up": "Pick-up", "hand-over": "Hand-over",
          "receipt-at-manufacturing": "Receipt at manufacturing", "release": "Release",
          "receipt-at-site": "Receipt at the treatment site", "thaw": "Thaw",
          "infusion": "Infusion"}
PARTY = f"{ATM}/CodeSystem/custody-party"  # agent.type: releasing | receiving
SCANNED_COI = EXT + "scanned-coi"
PRODUCTS = ("BiologicallyDerivedProduct", "Specimen")
TOLD_ROLES = ("treatment-centre", "coordinator", "manufacturer")  # told of a stopped step
CUSTODY = Actor(name="custody")  # the server's own writes when a step is stopped
KEYS = JwksCache()


class StepStoppedError(BusinessRuleError):
    """The scanned chain of identity is not the expected one: the step stops here."""

    def __init__(self, reason: str, task: Version, event: str) -> None:
        message = (f"{reason}. The {EVENTS.get(event, event).lower()} is stopped: "
                   f"Task/{task.id} is put on hold and a Flag raised")
        super().__init__(message, issues=[Issue("business-rule", message,
                                                expression=(f"Provenance.extension('{SCANNED_COI}')",))])
        self.reason, self.task, self.event = reason, task, event


def refused(message: str, expression: str) -> BusinessRuleError:
    return BusinessRuleError(message, issues=[Issue("business-rule", message,
                                                    expression=(expression,))])


def custody_event(provenance: dict[str, Any]) -> str | None:
    for coding in provenance.get("activity", {}).get("coding", []):
        if isinstance(coding, dict) and coding.get("system") == CUSTODY_EVENT:
            return str(coding.get("code"))
    return None


def party(provenance: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The agent who is the releasing or receiving party."""
    for agent in provenance.get("agent", []):
        codes = [c.get("code") for c in agent.get("type", {}).get("coding", [])
                 if c.get("system") == PARTY]
        if kind in codes:
            return dict(agent.get("who", {}))
    return None


def scanned_coi(provenance: dict[str, Any]) -> str | None:
    return next((e.get("valueString") for e in provenance.get("extension", [])
                 if e.get("url") == SCANNED_COI), None)


@dataclass
class Targets:
    """A handoff's targets, read at the versions it names."""

    product: Version
    task: Version
    versions: dict[str, dict[str, Any] | None] = field(default_factory=dict)


# -- the write rule ----------------------------------------------------------------------
def check_handoff(ctx: Context, repo: Repository, current: Version | None,
                  provenance: dict[str, Any]) -> None:
    """The Provenance write rule (see the module's text); other Provenances pass. (A
    Provenance is never updated or deleted through the API: gateway/services/access.py.)"""
    event = custody_event(provenance)
    if event is None:
        return
    if event not in EVENTS:
        raise refused(f"{event!r} is not a custody event ({', '.join(EVENTS)})",
                      "Provenance.activity")
    targets = read_targets(repo, provenance)
    expected = coi_of(targets.product.resource())
    if expected is None:
        raise refused(f"{targets.product.reference} carries no chain of identity: a product "
                      "is labelled with its enrolment's code before it changes hands",
                      "Provenance.target")
    if coi_of(targets.task.resource()) not in (None, expected):
        raise StepStoppedError(f"{targets.task.reference} belongs to chain of identity "
                               f"{eye_readable(coi_of(targets.task.resource()) or '')}, the "
                               f"product to {eye_readable(expected)}", targets.task, event)
    for element in ("occurredDateTime", "location", "agent"):
        if not provenance.get(element):
            raise refused(f"a custody handoff names its {element}", f"Provenance.{element}")
    check_scan(provenance, expected, targets.task, event)
    handoff = _policy(ctx, repo, targets.task, event)
    required = handoff.required(*site_of(repo, provenance))
    check_signatures(repo, provenance, targets, required)


def read_targets(repo: Repository, provenance: dict[str, Any]) -> Targets:
    """The product and custody Task versions a handoff names (each exactly once)."""
    products: list[Version] = []
    tasks: list[Version] = []
    versions: dict[str, dict[str, Any] | None] = {}
    for index, target in enumerate(provenance.get("target", [])):
        reference = target.get("reference", "")
        parts = reference.split("/")
        where = f"Provenance.target[{index}]"
        if len(parts) != 4 or parts[2] != "_history" or not parts[3].isdigit():
            raise refused(f"{reference!r}: a custody handoff targets exact versions "
                          "(Type/id/_history/n)", where)
        version = repo.vread(parts[0], parts[1], int(parts[3]))
        if version is None or version.deleted:
            raise refused(f"{reference} does not exist", where)
        versions[reference] = version.resource()
        if parts[0] in PRODUCTS:
            products.append(version)
        elif parts[0] == "Task":
            tasks.append(version)
    if len(products) != 1 or len(tasks) != 1:
        raise refused("a custody handoff targets one product (BiologicallyDerivedProduct or "
                      "Specimen) version and one custody Task version", "Provenance.target")
    return Targets(products[0], tasks[0], versions)


def check_scan(provenance: dict[str, Any], expected: str, task: Version, event: str) -> None:
    scanned = scanned_coi(provenance)
    if not scanned:
        raise refused("every handoff verifies the chain of identity scanned on the spot "
                      f"(extension {SCANNED_COI}, valueString)", "Provenance.extension")
    problem = scan_problem(scanned, expected)
    if problem is not None:
        raise StepStoppedError(problem, task, event)


def scan_problem(scanned: str, expected: str) -> str | None:
    """Why a scanned code is not the expected one (None when it is)."""
    try:
        code = isbt128.parse(scanned)
    except isbt128.CoiFormatError as exc:
        return f"the scanned chain of identity is not valid: {exc}"
    if code.value != expected:
        return (f"chain of identity mismatch: scanned {code.eye_readable}, expected "
                f"{eye_readable(expected)}")
    return None


def _policy(ctx: Context, repo: Repository, task: Version, event: str) -> Handoff:
    """The protocol step's rule for this handoff; refused when the step records none."""
    stage = stage_of(ctx, repo, task.resource())
    if stage is None:
        raise refused(f"{task.reference} is not a step of an enrolment's protocol: custody is "
                      "recorded against the protocol's custody Tasks", "Provenance.target")
    handoff = stage.handoff(event)
    if handoff is None:
        recorded = ", ".join(h.event for h in stage.handoffs) or "none"
        raise refused(f"step {stage.id!r} records no {event!r} handoff (it records: "
                      f"{recorded})", "Provenance.activity")
    return handoff


def stage_of(ctx: Context, repo: Repository, task: dict[str, Any]) -> Stage | None:
    """The protocol stage a Task is a run of (None for a Task outside any protocol)."""
    key = task_run_key(task)
    if key is None:
        return None
    careplan = repo.read("CarePlan", key[0])
    if careplan is None or careplan.deleted:
        return None
    protocol = compiled_protocol(ctx, repo, careplan.resource())
    return protocol.stages.get(key[1]) if protocol is not None else None


def compiled_protocol(ctx: Context, repo: Repository, resource: dict[str, Any]) -> Protocol | None:
    """The protocol a CarePlan (or anything with instantiatesCanonical) follows, compiled
    once per PlanDefinition version; None when it follows none of this server's."""
    plan_id = plan_definition_id(ctx, repo, resource)
    plan = repo.read("PlanDefinition", plan_id) if plan_id else None
    if plan is None or plan.deleted:
        return None
    return _compiled(ctx, repo, plan)


_PROTOCOLS: OrderedDict[tuple[str, int, int], Protocol | None] = OrderedDict()
_PROTOCOLS_KEPT = 64
_PROTOCOLS_LOCK = threading.Lock()


def _compiled(ctx: Context, repo: Repository, plan: Version) -> Protocol | None:
    """The protocol of a PlanDefinition version, compiled once (as the orchestrator does:
    a changed protocol is a new version)."""
    key = (plan.id, plan.version, plan.last_updated)
    with _PROTOCOLS_LOCK:
        if key in _PROTOCOLS:
            _PROTOCOLS.move_to_end(key)
            return _PROTOCOLS[key]
    try:
        protocol: Protocol | None = protocol_from_store(ctx, repo, plan.resource())
    except ProtocolFormError:
        protocol = None
    with _PROTOCOLS_LOCK:
        _PROTOCOLS[key] = protocol
        while len(_PROTOCOLS) > _PROTOCOLS_KEPT:
            _PROTOCOLS.popitem(last=False)
    return protocol


def site_of(repo: Repository, provenance: dict[str, Any]) -> tuple[str | None, str | None]:
    """(country, site) of the handoff: its Location's address country and reference."""
    site = provenance.get("location", {}).get("reference")
    country = None
    if isinstance(site, str) and site.startswith("Location/"):
        found = repo.read("Location", site.split("/", 1)[1])
        if found is not None and not found.deleted:
            country = found.resource().get("address", {}).get("country")
    return (country.upper() if isinstance(country, str) else None), site


def check_signatures(repo: Repository, provenance: dict[str, Any], targets: Targets,
                     required: tuple[str, ...]) -> None:
    """Every signature verifies; each required meaning is signed, each by another signer."""
    signers: dict[str, str] = {}  # meaning -> who
    for index, signature in enumerate(provenance.get("signature", [])):
        check = verify_one(repo, signature, provenance, targets.versions)
        if not check.valid:
            raise refused(f"signature {index + 1} ({check.meaning or 'no meaning'}) does not "
                          f"verify: {check.problem}", f"Provenance.signature[{index}]")
        assert check.meaning is not None
        signers.setdefault(check.meaning, signature.get("who", {}).get("reference", ""))
    missing = [m for m in required if m not in signers]
    if missing:
        raise refused(f"this handoff needs the signatures {', '.join(required) or 'none'}; "
                      f"missing: {', '.join(missing)}", "Provenance.signature")
    who = [signers[m] for m in required]
    if len(set(who)) != len(who):
        raise refused(f"the signatures {', '.join(required)} must each be by another signer "
                      "(dual control)", "Provenance.signature")


def verify_one(repo: Repository, signature: dict[str, Any], provenance: dict[str, Any],
               versions: dict[str, dict[str, Any] | None]) -> signatures.Check:
    def find_client(client_id: str) -> Client | None:
        row = repo.conn.execute(select(oauth_clients)
                                .where(oauth_clients.c.client_id == client_id)).first()
        return client_from_row(row) if row is not None else None

    return signatures.verify(signature, provenance, versions, find_client, KEYS)


# -- a stopped step ------------------------------------------------------------------------
def record_stop(ctx: Context, stopped: StepStoppedError) -> None:
    """After the refused handoff was undone: the Task on hold with the reason, a Flag on
    the patient, and a Communication to the treatment centre and the manufacturer."""
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    with ctx.db.write() as conn:
        repo = Repository(conn, CUSTODY)
        task = repo.read("Task", stopped.task.id)
        if task is None or task.deleted:
            return
        resource = task.resource()
        if resource.get("status") in ("ready", "in-progress", "accepted", "received",
                                      "requested"):
            resource |= {"status": "on-hold", "statusReason": {"text": stopped.reason},
                         "lastModified": now}
            repo.update(resource, task.id, expected_version=task.version)
        key = task_run_key(resource)
        careplan = repo.read("CarePlan", key[0]) if key else None
        plan = careplan.resource() if careplan is not None and not careplan.deleted else {}
        about = {"reference": f"Task/{task.id}"}
        subject = plan.get("subject") or resource.get("for") or about
        flag = repo.create({
            "resourceType": "Flag", "status": "active", "subject": subject,
            "period": {"start": now},
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/flag-category",
                "code": "safety", "display": "Safety"}]}],
            "code": {"text": f"Chain of identity: {stopped.reason}"},
            "extension": [{"url": EXT + "flag-about", "valueReference": about}]})
        alert(repo, careplan if careplan is not None and not careplan.deleted else None,
              [about, {"reference": flag.reference}],
              f"{EVENTS.get(stopped.event, stopped.event)} stopped: {stopped.reason}. "
              f"Task/{task.id} is on hold until the identity is resolved.", TOLD_ROLES, now)
