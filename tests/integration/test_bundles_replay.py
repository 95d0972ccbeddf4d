"""A transaction that PostgreSQL aborts as a deadlock victim is replayed from scratch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError

from gateway import jsonio
from gateway.errors import ConflictError
from gateway.services.context import Context, FhirRequest
from gateway.services.router import dispatch
from gateway.settings import Settings
from gateway.store.database import Database
from tests.factories import patient, ref, task
from tests.integration.bundles_support import BASE, entry, row_counts, transaction

PATIENT_URN = "urn:uuid:3f1d2c4b-0000-4000-8000-00000000cafe"


class _Deadlock(Exception):
    """What psycopg raises for SQLSTATE 40P01."""

    sqlstate = "40P01"


class DeadlockingDatabase:
    """The real store, except that the first `failures` write transactions are chosen as
    deadlock victims after doing all their work (so it must all roll back)."""

    def __init__(self, db: Database, failures: int) -> None:
        self.db, self.failures, self.attempts = db, failures, 0

    @contextmanager
    def write(self) -> Iterator[Connection]:
        self.attempts += 1
        with self.db.write() as conn:
            yield conn
            if self.failures:
                self.failures -= 1
                raise OperationalError("COMMIT", {}, _Deadlock("deadlock detected"))

    def read(self) -> Any:
        return self.db.read()


def _post(db: DeadlockingDatabase, settings: Settings, body: dict[str, Any]) -> Any:
    ctx = Context(db=cast(Database, db), settings=settings, base_url=BASE)
    request = FhirRequest("POST", "", body=jsonio.dumps(body),
                          content_type="application/fhir+json")
    return dispatch(ctx, request)


def _patient_and_task() -> dict[str, Any]:
    return transaction(entry("POST", "Patient", patient(), PATIENT_URN),
                       entry("POST", "Task", task(**{"for": ref(PATIENT_URN)})))


def test_transaction_replayed_after_deadlock_stores_its_entries_once(
        db: Database, settings: Settings) -> None:
    before = row_counts(db)
    flaky = DeadlockingDatabase(db, failures=2)
    response = _post(flaky, settings, _patient_and_task())
    assert response.status == 200
    assert flaky.attempts == 3
    created, linked = jsonio.loads(response.body)["entry"]
    # The replay rewrote the urn afresh: the Task points at the Patient that exists.
    assert linked["resource"]["for"] == {"reference": f"Patient/{created['resource']['id']}"}
    after = row_counts(db)
    for table in ("resources", "resource_history", "change_log"):
        assert after[table] == before[table] + 2, table


def test_transaction_deadlocked_on_every_attempt_fails_409_and_stores_nothing(
        db: Database, settings: Settings) -> None:
    before = row_counts(db)
    flaky = DeadlockingDatabase(db, failures=10)
    with pytest.raises(ConflictError) as caught:
        _post(flaky, settings, _patient_and_task())
    assert caught.value.status == 409
    assert caught.value.outcome() == {"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": "conflict",
        "diagnostics": "The transaction kept colliding with concurrent writers; retry it"}]}
    assert row_counts(db) == before
    assert flaky.attempts == 3
