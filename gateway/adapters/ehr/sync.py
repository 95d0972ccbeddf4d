"""What the gateway tells each EHR, and the referrals it imports patients for, driven
from the change log with a cursor per endpoint.

Write-back. For each change after the endpoint's cursor, in order: the version of a
CarePlan of one of the EHR's patients that the change made is written to it (status,
title, period), and at completion its custody report as a DocumentReference; an
Appointment of one of its patients likewise.
Each is a conditional update by our identifier, so repeating one is harmless. The cursor
moves past a change once the EHR has it; when the EHR cannot be reached (its circuit
open, or every retry failed), the endpoint's queue stops where it is and is tried again
later, in the same order; a restart resumes from the stored cursor. A change the EHR
refuses (4xx) is recorded in `ehr_rejections` with its answer, and the queue goes on.

Referrals. An EHR may POST a referral ServiceRequest (with `instantiatesCanonical` a
protocol) naming its patient by identifier only (`subject.identifier`). The patient is
imported from the EHR the referral came from (`meta.source` is its base URL, or the only
endpoint there is), and the referral's subject then points at our copy, upon which the
orchestrator enrols the patient.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select, update

from gateway import jsonio
from gateway.adapters.ehr.client import EhrClient, EhrRefused, EhrUnavailable
from gateway.adapters.ehr.endpoints import Endpoint, list_endpoints
from gateway.adapters.ehr.intake import intake
from gateway.background import in_thread
from gateway.custody import report
from gateway.custody.report_html import render
from gateway.errors import FhirError
from gateway.services.context import Context
from gateway.settings import Settings
from gateway.store.database import Database, gap_cutoff, safe_position
from gateway.store.driver import changes_after
from gateway.store.repository import Actor, Repository, Version
from gateway.store.schema import ehr_rejections, reactor_cursors
from gateway.store.timeparse import format_instant, now_micros
from mappings import ehr as mapping

log = logging.getLogger("atm.ehr")
ACTOR = Actor(name="ehr-sync")
BATCH = 200
CURSOR_SAVE_SECONDS = 1.0
WRITTEN_BACK = ("CarePlan", "Appointment")


@dataclass
class Round:
    """What one pass over an endpoint's queue did."""

    written: int = 0
    rejected: int = 0
    waiting: float = 0.0  # seconds until the EHR may be tried again (0: not waiting)


def _cursor_name(endpoint: Endpoint, what: str) -> str:
    return f"ehr-{what}:{endpoint.name}"[:64]


def read_cursor(conn: Connection, name: str) -> int:
    seq = conn.execute(select(reactor_cursors.c.seq)
                       .where(reactor_cursors.c.name == name)).scalar()
    return int(seq or 0)


def _store_cursor(db: Database, name: str, seq: int) -> None:
    with db.write(notify=False) as conn:
        changed = conn.execute(update(reactor_cursors).where(reactor_cursors.c.name == name)
                               .values(seq=seq, updated_at=now_micros())).rowcount
        if not changed:
            conn.execute(insert(reactor_cursors).values(name=name, seq=seq,
                                                        updated_at=now_micros()))


def _changes(db: Database, after: int) -> tuple[list[Any], int]:
    """The next changes after `after`, and how far a cursor may move over them."""
    with db.read() as conn:
        cutoff = gap_cutoff(conn)
        rows = changes_after(conn, after, BATCH)
    position = safe_position(after, rows, cutoff)
    return [r for r in rows if r.seq <= position], position


class EhrSync:
    """Write-back and referral intake for every enabled endpoint, one pass at a time."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings = db, settings
        self.our_base = settings.base_url or "urn:atm-gateway"
        self._waiting_until: dict[str, float] = {}
        self._stored: dict[str, tuple[int, float]] = {}  # cursor -> (seq, when stored)
        self._position: dict[str, int] = {}  # cursor -> how far this process has got
        self._only_one = False  # whether a single endpoint is enabled (this pass)

    def _keep(self, name: str, seq: int, moved_something: bool) -> None:
        """Store a cursor when something was written, else at most once a second: a
        write transaction per commit would queue behind clients' writes, and re-reading
        a second of changes after a restart costs nothing (the writes are idempotent)."""
        stored, at = self._stored.get(name, (-1, 0.0))
        if seq == stored:
            return
        if moved_something or time.monotonic() - at >= CURSOR_SAVE_SECONDS:
            _store_cursor(self.db, name, seq)
            self._stored[name] = (seq, time.monotonic())

    def _cursor(self, name: str) -> int:
        """Where a queue stands: as this process last moved it, else as stored."""
        if name in self._position:
            return self._position[name]
        with self.db.read() as conn:
            return read_cursor(conn, name)

    def _context(self) -> Context:
        return Context(db=self.db, settings=self.settings, base_url=self.settings.base_url
                       or "", actor=ACTOR)

    def run_once(self) -> dict[str, Round]:
        """One pass over each enabled endpoint not waiting for its EHR to come back."""
        done = {}
        endpoints = list_endpoints(self.db, enabled_only=True)
        self._only_one = len(endpoints) == 1  # read once a pass, not once a referral
        for endpoint in endpoints:
            if time.monotonic() < self._waiting_until.get(endpoint.name, 0.0):
                continue
            result = self.write_back(endpoint)
            if not result.waiting:
                result.written += self.referrals(endpoint)
            if result.waiting:
                self._waiting_until[endpoint.name] = time.monotonic() + result.waiting
            done[endpoint.name] = result
        return done

    # -- write-back ----------------------------------------------------------------------
    def write_back(self, endpoint: Endpoint) -> Round:
        """Drain the endpoint's queue as far as the EHR lets us."""
        name = _cursor_name(endpoint, "writeback")
        result = Round()
        cursor = self._cursor(name)
        with EhrClient(endpoint, self.settings) as ehr:
            while True:
                rows, position = _changes(self.db, cursor)
                if not rows:
                    break
                for row in rows:
                    if row.res_type not in WRITTEN_BACK:
                        cursor = row.seq
                        continue
                    try:
                        written = self._write(ehr, endpoint, row)
                    except EhrUnavailable as exc:
                        log.warning("EHR %s unavailable (%s); %s waits at change %d",
                                    endpoint.name, exc, name, row.seq)
                        result.waiting = max(exc.retry_after, 1.0)
                        self._position[name] = cursor
                        self._keep(name, cursor, True)
                        return result
                    except EhrRefused as exc:
                        self._reject(endpoint, row, exc)
                        result.rejected += 1
                    else:
                        result.written += written
                    cursor = row.seq
                cursor = max(cursor, position)
                self._position[name] = cursor
                self._keep(name, cursor, bool(result.written or result.rejected))
        return result

    def _write(self, ehr: EhrClient, endpoint: Endpoint, row: Any) -> int:
        """Write one change to the EHR, as the version it made (so that the EHR's history
        has every step, in order); how many resources were written."""
        ctx = self._context()
        with ctx.reading() as repo:
            current = repo.vread(row.res_type, row.res_id, row.version)
            if current is None or current.deleted:
                return 0
            resource = current.resource()
            patient = self._ehr_patient(repo, endpoint, resource)
            if patient is None:
                return 0  # not a patient of this EHR
            writes: list[dict[str, Any]] = []
            if row.res_type == "CarePlan":
                writes.append(mapping.careplan(resource, patient, self.our_base))
                if resource.get("status") == "completed":
                    writes.append(self._custody_document(ctx, repo, current, patient))
            else:
                writes.append(mapping.appointment(resource, patient, self.our_base))
        for body in writes:
            self._put(ehr, body)
        return len(writes)

    def _ehr_patient(self, repo: Repository, endpoint: Endpoint,
                     resource: dict[str, Any]) -> str | None:
        references = [resource.get("subject", {}).get("reference", "")] + [
            p.get("actor", {}).get("reference", "") for p in resource.get("participant", [])]
        for reference in references:
            if reference.startswith("Patient/"):
                patient = repo.read("Patient", reference.split("/", 1)[1])
                if patient is not None and not patient.deleted:
                    return mapping.ehr_patient_id(patient.resource(), endpoint.base_url)
        return None

    def _custody_document(self, ctx: Context, repo: Repository, careplan: Version,
                          patient: str) -> dict[str, Any]:
        built = report.build(ctx, repo, careplan, None)
        return mapping.custody_document(careplan.id, render(built), built.title,
                                        patient, self.our_base, format_instant(now_micros()))

    def _put(self, ehr: EhrClient, body: dict[str, Any]) -> None:
        key = body["identifier"][0]
        response = ehr.request("PUT", body["resourceType"],
                               params={"identifier": f"{key['system']}|{key['value']}"},
                               content=jsonio.dumps(body),
                               headers={"content-type": "application/fhir+json"})
        if response.status_code >= 400:
            raise EhrRefused(f"PUT {body['resourceType']} answered {response.status_code}: "
                             f"{response.text[:500]}", response)

    def _reject(self, endpoint: Endpoint, row: Any, exc: EhrRefused) -> None:
        status = exc.response.status_code if exc.response is not None else 0
        log.error("EHR %s refused %s/%s: %s", endpoint.name, row.res_type, row.res_id, exc)
        with self.db.write(notify=False) as conn:
            conn.execute(insert(ehr_rejections).values(
                endpoint=endpoint.name, seq=row.seq, reference=f"{row.res_type}/{row.res_id}",
                status=status, answer=str(exc)[:4000], at=now_micros()))

    # -- referrals -------------------------------------------------------------------------
    def referrals(self, endpoint: Endpoint) -> int:
        """Import the patients of new referrals from this EHR; how many were imported."""
        name = _cursor_name(endpoint, "referrals")
        cursor = self._cursor(name)
        imported = 0
        while True:
            rows, position = _changes(self.db, cursor)
            if not rows:
                break
            for row in rows:
                if row.res_type == "ServiceRequest":
                    try:
                        imported += self._referral(endpoint, row.res_id)
                    except FhirError as exc:
                        if exc.status == 503:
                            self._position[name] = cursor
                            self._keep(name, cursor, True)
                            return imported  # the EHR is down: this referral waits
                        self._reject(endpoint, row, EhrRefused(exc.diagnostics))
                cursor = row.seq
            cursor = max(cursor, position)
            self._position[name] = cursor
            self._keep(name, cursor, bool(imported))
        return imported

    def _referral(self, endpoint: Endpoint, request_id: str) -> int:
        ctx = self._context()
        with ctx.reading() as repo:
            found = repo.read("ServiceRequest", request_id)
        if found is None or found.deleted:
            return 0
        request = found.resource()
        subject = request.get("subject", {})
        identifier = subject.get("identifier", {})
        if (subject.get("reference") or not identifier.get("value")
                or not request.get("instantiatesCanonical")
                or not _from(request, endpoint, self._only_one)):
            return 0
        patient = intake(ctx, endpoint, f"{identifier.get('system', '')}|{identifier['value']}")
        with ctx.writing() as repo:
            current = repo.read("ServiceRequest", request_id)
            if current is None or current.resource().get("subject", {}).get("reference"):
                return 1
            repo.update({**current.resource(), "subject": {**subject,
                                                           "reference": patient.patient}},
                        request_id)
        return 1


def _from(request: dict[str, Any], endpoint: Endpoint, only_one: bool) -> bool:
    """The referral came from this EHR: its meta.source, or the only endpoint there is."""
    source = request.get("meta", {}).get("source")
    if source:
        return str(source).rstrip("/").startswith(endpoint.base_url)
    return only_one


# -- running beside the server -----------------------------------------------------------------
def serve(sync: EhrSync, stop: threading.Event) -> None:
    """Pass over every endpoint after each commit (at most every poll interval when
    another process commits); with no endpoint registered, only look now and then."""
    committed = sync.db.committed.listen()
    poll = sync.settings.ehr_poll_seconds
    while not stop.is_set():
        committed.clear()
        try:
            endpoints = sync.run_once()
        except Exception:  # noqa: BLE001 - an unexpected failure must not stop write-back
            log.exception("EHR sync failed; retrying")
            endpoints = {}
        if endpoints:
            committed.wait(poll)
        else:
            stop.wait(poll * 5)


@contextmanager
def running_beside(db: Database, settings: Settings) -> Iterator[EhrSync | None]:
    """Write-back and referral intake in a thread beside the API (ATM_EHR_SYNC)."""
    if not settings.ehr_sync:
        yield None
        return
    sync = EhrSync(db, settings)
    with in_thread(lambda stop: serve(sync, stop), "atm-ehr"):
        yield sync
