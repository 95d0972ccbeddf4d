"""`atm demo`: whole therapy journeys against a running gateway, over HTTP.

It enrols synthetic patients in the protocols the server holds, then plays every partner.
Each partner organisation (treatment centre, apheresis centre, courier, manufacturer,
payer) is a client of its own, registered by the demo in the server's database when the
server asks for tokens, and sees and does only what its role allows. Each open Task is
started and completed by the partner that owns it (one QC release fails once, so the
journey goes back to collection), with execution times on a simulated clock so that the
lead times and vein-to-vein days are those of a real journey. The orchestrator inside the
server does the rest; the demo only watches it, prints each step as it happens, and sums
up at the end.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from gateway.auth.clients import ROLES, add_client, list_clients, set_disabled
from gateway.auth.credentials import Credentials, SmartAuth, new_key, public_jwks, token_url
from gateway.store.database import Database
from orchestration import demo_scheduling
from orchestration.demo_custody import Custody
from orchestration.protocol import Protocol, definitions, from_plan_definition
from orchestration.state import ROLE_ASSIGNMENT, parse_instant, task_run_key

FHIR_JSON = "application/fhir+json"
COLLECTION_STAGES = ("apheresis", "collection")  # where the patient's cells are taken
FAILING_STAGE = "qc-release"
OPEN = "open"  # the status of a journey the demo leaves under way
NAMES = [("Durand", "Élodie"), ("Okafor", "Chidi"), ("Lindqvist", "Maja"),
         ("Tanaka", "Hiro"), ("Moreau", "Louis"), ("Silva", "Ana")]
Say = Callable[[str], None]
CLIENT_NAME = "ATM demo: "  # the demo's clients; each run disables the previous run's
TREATMENT_CENTRE = "treatment-centre"
DEMO_ORGANIZATION = "Organization/atm-demo-"  # + the client role it plays
# Protocol roles played by people of the treatment centre; the others are client roles.
CLIENT_ROLE = {"physician": TREATMENT_CENTRE, "coordinator": TREATMENT_CENTRE}


class DemoError(RuntimeError):
    """The journeys could not be played (the message says why)."""


@dataclass
class Journey:
    """One synthetic patient going through one protocol."""

    label: str
    protocol: Protocol
    careplan_id: str
    fail_qc: bool
    clock: datetime  # the simulated time this patient's journey has reached
    started: datetime
    done: set[str] = field(default_factory=set)  # Task ids already completed by the demo
    repeats: int = 0
    status: str = "active"
    booked: dict[str, tuple[datetime, str]] = field(default_factory=dict)  # stage -> when, where
    stop_at: str | None = None  # a journey left open stops before this stage's Task

    def stage_times(self, tasks: list[dict[str, Any]], stage: str) -> datetime | None:
        ends = [parse_instant(t.get("executionPeriod", {}).get("end")) for t in tasks
                if _stage_of(t) == stage and t.get("status") == "completed"]
        found = [e for e in ends if e]
        return max(found) if found else None


def _stage_of(task: dict[str, Any]) -> str:
    key = task_run_key(task)
    return key[1] if key else ""


def organization_of(protocol_role: str) -> str:
    """The demo partner organisation that plays a protocol role."""
    role = CLIENT_ROLE.get(protocol_role, protocol_role)
    return DEMO_ORGANIZATION + (role if role in ROLES else TREATMENT_CENTRE)


class Partners:
    """The demo's partner systems: one OAuth2 client per organisation (SMART Backend
    Services), registered in the server's database; none when the server asks for no
    token (ATM_AUTH=off)."""

    def __init__(self, http: httpx.Client, base_url: str, db: Database | None) -> None:
        self.token_url = token_url(http, base_url)
        self.db = db
        self._auth: dict[str, SmartAuth] = {}
        self._credentials: dict[str, Credentials] = {}
        if self.token_url is not None and db is None:
            raise DemoError("the server asks for tokens: run `atm demo` beside it, with its "
                            "ATM_DATABASE_URL, so that the demo can register its partners")
        if db is not None:
            for client in list_clients(db):  # the previous run's keys are gone
                if client.name.startswith(CLIENT_NAME) and not client.disabled:
                    set_disabled(db, client.client_id)

    def auth(self, organization: str) -> SmartAuth | None:
        """The client acting for this organisation (registered when first needed)."""
        if self.token_url is None:
            return None
        credentials = self.credentials(organization)
        if credentials is None:
            return None
        if organization not in self._auth:
            self._auth[organization] = SmartAuth(self.token_url, credentials)
        return self._auth[organization]

    def credentials(self, organization: str) -> Credentials | None:
        """The organisation's client id and key: it gets tokens and signs custody
        handoffs with them (None without the server's database to register it in)."""
        if self.db is None:
            return None
        if organization not in self._credentials:
            role = organization.removeprefix(DEMO_ORGANIZATION)
            key = new_key()
            client = add_client(self.db, name=f"{CLIENT_NAME}{role}", role=role,
                                organization=organization, jwks=public_jwks(key),
                                scopes="system/*.cruds")
            self._credentials[organization] = Credentials(client.client_id, key)
        return self._credentials[organization]


class Demo:
    def __init__(self, client: httpx.Client, partners: Partners, say: Say, *,
                 timeout: float = 120.0) -> None:
        self.client, self.partners, self.say, self.timeout = client, partners, say, timeout
        self.centre = organization_of(TREATMENT_CENTRE)
        self.custody = Custody(self._call, organization_of, partners.credentials, self.centre)

    # -- HTTP ------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, *,
              by: str | None = None) -> Any:
        """One request as the partner organisation `by` (the treatment centre unless
        said otherwise)."""
        auth = self.partners.auth(by or self.centre)
        response = self.client.request(method, path, json=body,
                                       headers={"content-type": FHIR_JSON,
                                                "accept": FHIR_JSON},
                                       auth=auth or httpx.USE_CLIENT_DEFAULT)
        if response.status_code >= 400:
            raise DemoError(f"{method} {path} answered {response.status_code}: "
                            f"{response.text[:300]}")
        return response.json() if response.content else None

    def _search(self, query: str) -> list[dict[str, Any]]:
        bundle = self._call("GET", f"{query}&_count=500")
        return [e["resource"] for e in bundle.get("entry", [])]

    # -- set-up ----------------------------------------------------------------------
    def protocols(self) -> list[tuple[dict[str, Any], Protocol]]:
        plans = self._search("PlanDefinition?status=active&_sort=url")
        found = []
        for plan in plans:
            urls = sorted({c.split("|")[0] for c in definitions(plan.get("action", []))})
            activities = [a for i in range(0, len(urls), 20) for a in
                          self._search("ActivityDefinition?url=" + ",".join(urls[i:i + 20]))]
            found.append((plan, from_plan_definition(plan, activities)))
        if not found:
            raise DemoError("the server holds no protocol: start it with the shipped ones "
                            "(`atm serve` loads them) or `atm protocols load FILE`")
        return found

    def enrol(self, number: int, plan: dict[str, Any], protocol: Protocol,
              fail_qc: bool, start: datetime) -> Journey:
        family, given = NAMES[number % len(NAMES)]
        patient = self._call("POST", "Patient", {
            "resourceType": "Patient", "name": [{"family": family, "given": [given]}],
            "identifier": [{"system": "https://atm-gateway.org/demo/patient",
                            "value": str(uuid.uuid4())}], "birthDate": "1971-05-02",
            "managingOrganization": {"reference": self.centre}})
        roles = sorted({s.role for s in protocol.stages.values() if s.role})
        assignments = []
        for role in roles:
            organization = organization_of(role)
            self._call("PUT", organization, {
                "resourceType": "Organization", "id": organization.split("/")[1],
                "name": "Demo " + organization.removeprefix(DEMO_ORGANIZATION).replace("-", " ")})
            reference = {"reference": organization}
            assignments.append({"url": ROLE_ASSIGNMENT, "extension": [
                {"url": "role", "valueCode": role},
                {"url": "organization", "valueReference": reference}]})
        careplan = self._call("POST", "CarePlan", {
            "resourceType": "CarePlan", "status": "active", "intent": "plan",
            "instantiatesCanonical": [protocol.canonical], "title": protocol.title,
            "subject": {"reference": f"Patient/{patient['id']}"},
            "period": {"start": start.isoformat()}, "extension": assignments})
        label = f"{given} {family} ({plan.get('name', plan['id'])})"
        self.say(f"enrolled {label}: CarePlan/{careplan['id']}"
                 + (" — its first QC release will fail" if fail_qc else ""))
        return Journey(label, protocol, careplan["id"], fail_qc, start, start)

    # -- playing the partners --------------------------------------------------------
    def play(self, journeys: list[Journey]) -> None:
        deadline = time.monotonic() + self.timeout
        while any(j.status == "active" for j in journeys):
            if time.monotonic() > deadline:
                stuck = [j.label for j in journeys if j.status == "active"]
                raise DemoError(f"no progress within {self.timeout:.0f} s for {stuck}")
            moved = False
            for journey in journeys:
                if journey.status == "active":
                    moved |= self._step(journey)
            if not moved:
                time.sleep(0.05)  # the orchestrator has not written the next Tasks yet

    def _step(self, journey: Journey) -> bool:
        plan = self._call("GET", f"CarePlan/{journey.careplan_id}")
        if plan["status"] != "active":
            journey.status = plan["status"]
            reason = plan.get("note", [{}])[-1].get("text", "")
            self.say(f"{journey.label}: CarePlan {plan['status']} — {reason}")
            return True
        tasks = self._search(f"Task?based-on=CarePlan/{journey.careplan_id}&status=ready")
        moved = False
        for task in sorted(tasks, key=lambda t: t.get("restriction", {}).get("period", {})
                           .get("start", "")):
            stage = journey.protocol.stages.get(_stage_of(task))
            if stage is None or stage.children or task["id"] in journey.done:
                continue  # a stage with sub-stages is completed by the orchestrator
            if stage.id == journey.stop_at:
                journey.status = OPEN
                self.say(f"{journey.label}: left open at {stage.title}, for the dashboard")
                return True
            self._perform(journey, task)
            moved = True
        return moved

    def sites(self, protocols: list[Protocol], first_day: datetime) -> None:
        """Publish the sites and slots the protocols' chains are booked in."""
        services = {step.service for protocol in protocols
                    if (booking := protocol.booking_stage()) for step in booking.books}
        providers = {"apheresis": organization_of("apheresis-centre"),
                     "manufacturing": organization_of("manufacturer"),
                     "infusion": self.centre}
        published = demo_scheduling.publish(self._call, services, first_day, providers)
        if published:
            self.say(f"published {published} slots at {2 * len(services)} sites "
                     f"({', '.join(sorted(services))})")

    def _book_chain(self, journey: Journey, task: dict[str, Any]) -> None:
        """The coordinator books the whole chain; the server completes the Task."""
        try:
            journey.booked = demo_scheduling.book(self._call, journey.careplan_id,
                                                  journey.clock)
        except RuntimeError as exc:
            raise DemoError(str(exc)) from exc
        journey.done.add(task["id"])
        day = (journey.clock - journey.started).days
        chain = ", ".join(f"{stage} {when:%d %b} at {where}"
                          for stage, (when, where) in journey.booked.items())
        self.say(f"{journey.label}: day {day:>3}  chain booked: {chain}")

    def _perform(self, journey: Journey, task: dict[str, Any]) -> None:
        stage = journey.protocol.stages[_stage_of(task)]
        if stage.books:
            self._book_chain(journey, task)
            return
        window = task.get("restriction", {}).get("period", {})
        begin = max(journey.clock, parse_instant(window.get("start")) or journey.clock)
        booked = journey.booked.get(stage.id) or journey.booked.get(stage.parent or "")
        if booked is not None:  # its appointment (or its parent's) is booked: then it is
            begin = max(begin, booked[0])
        took = (stage.deadline or timedelta(hours=4)) / 2
        end = begin + took
        journey.clock = max(journey.clock, end)
        fail = journey.fail_qc and stage.id == FAILING_STAGE and journey.repeats == 0
        owner = task.get("owner", {}).get("reference", "")
        owner = owner if owner.startswith(DEMO_ORGANIZATION) else self.centre
        started = self._call("PUT", f"Task/{task['id']}", {
            **task, "status": "in-progress",
            "executionPeriod": {"start": begin.isoformat()}}, by=owner)
        if stage.handoffs and not fail and self.partners.db is not None:  # keys to sign
            try:
                handed = self.custody.record(stage, task["id"], begin, end)
            except RuntimeError as exc:
                raise DemoError(str(exc)) from exc
            for line in handed:
                self.say(f"{journey.label}:          custody: {line}")
            task = started = self._call("GET", f"Task/{task['id']}")  # as custody left it
        # From the treatment centre's copy: a partner's view may leave details out.
        finished = {**task, "meta": started["meta"],
                    "status": "failed" if fail else "completed",
                    "executionPeriod": {"start": begin.isoformat(), "end": end.isoformat()}}
        if fail:
            finished["statusReason"] = {"text": "Sterility test failed: batch not released"}
            journey.repeats += 1
        self._call("PUT", f"Task/{task['id']}", finished, by=owner)
        journey.done.add(task["id"])
        day = (end - journey.started).days
        self.say(f"{journey.label}: day {day:>3}  {stage.title} "
                 f"{'FAILED — going back' if fail else 'done'}")

    # -- the summary -----------------------------------------------------------------
    def summary(self, journeys: list[Journey]) -> list[str]:
        lines = [f"{'patient':<44} {'outcome':<10} {'vein-to-vein':>12} "
                 f"{'referral-to-infusion':>20} {'Tasks':>6} {'repeats':>7}"]
        total_tasks = 0
        for journey in journeys:
            tasks = self._search(f"Task?based-on=CarePlan/{journey.careplan_id}")
            total_tasks += len(tasks)
            infused = journey.stage_times(tasks, "infusion")
            collected = next((t for s in COLLECTION_STAGES
                              if (t := journey.stage_times(tasks, s))), None)
            vein = f"{(infused - collected).days} d" if infused and collected else "n/a"
            referral = f"{(infused - journey.started).days} d" if infused else "n/a"
            lines.append(f"{journey.label:<44} {journey.status:<10} {vein:>12} "
                         f"{referral:>20} {len(tasks):>6} {journey.repeats:>7}")
        provenances = self._call("GET", "Provenance?_summary=count&agent=Device/atm-orchestrator")
        lines.append(f"{total_tasks} Tasks written by the orchestrator, "
                     f"{provenances.get('total', 0)} Provenances naming it")
        return lines

    def custody_report(self, journeys: list[Journey], path: Path) -> str | None:
        """Write the printable custody report of the journey with the most handoffs; the
        line that says what it found."""
        recorded = {j.careplan_id: c.recorded for j in journeys
                    if (c := self.custody.chains.get(j.careplan_id)) is not None}
        for journey in sorted(journeys, key=lambda j: -recorded.get(j.careplan_id, 0))[:1]:
            chain = self.custody.chains.get(journey.careplan_id)
            if chain is None or not chain.recorded:
                continue
            operation = f"CarePlan/{journey.careplan_id}/$custody-report"
            found = {p["name"]: p for p in self._call("GET", operation)["entry"][0]
                     ["resource"]["parameter"]}
            response = self.client.get(operation, params={"_format": "html"},
                                       auth=self.partners.auth(self.centre)
                                       or httpx.USE_CLIENT_DEFAULT)
            response.raise_for_status()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(response.text, encoding="utf-8")
            verdict = "verified" if found["verified"]["valueBoolean"] else "NOT verified"
            return (f"custody report of {journey.label}: {verdict}, {chain.recorded} signed "
                    f"handoffs -> {path}")
        return None


def stop_stage(protocol: Protocol, number: int) -> str:
    """Where an open journey stops: a different stage for each, past the first few."""
    stages = [s.id for s in protocol.stages.values() if not s.children and s.role]
    return stages[2 + number % max(1, len(stages) - 4)]


def run_demo(base_url: str, patients: int, say: Say, *, timeout: float = 120.0,
             db: Database | None = None, report: Path | None = None,
             open_journeys: int = 0) -> list[str]:
    """Enrol `patients` across the server's protocols, play them through, and return the
    summary lines (the second patient's first QC release fails). `db` is the server's
    database, where the partners' clients (their token and signing keys) are registered.
    `report`: where the custody report of one finished journey is written (HTML).
    `open_journeys` more patients are played only part of the way, each stopping at
    another stage, so that the dashboard has journeys under way to show."""
    start = datetime.now(UTC).replace(microsecond=0)
    with httpx.Client(base_url=base_url.rstrip("/") + "/", timeout=30.0) as client:
        demo = Demo(client, Partners(client, base_url, db), say, timeout=timeout)
        available = demo.protocols()
        say(f"{len(available)} protocols on {base_url}: "
            + ", ".join(p.title for _, p in available))
        demo.sites([p for _, p in available], start)
        journeys = []
        for number in range(patients):
            plan, protocol = available[number % len(available)]
            can_fail = any(s == FAILING_STAGE for s in protocol.stages)
            journeys.append(demo.enrol(number, plan, protocol,
                                       fail_qc=can_fail and number == 1, start=start))
        for number in range(patients, patients + open_journeys):
            plan, protocol = available[number % len(available)]
            journey = demo.enrol(number, plan, protocol, fail_qc=False, start=start)
            journey.stop_at = stop_stage(protocol, number)
            journeys.append(journey)
        demo.play(journeys)
        lines = demo.summary(journeys)
        written = demo.custody_report(journeys, report) if report is not None else None
        return [*lines, written] if written else lines
