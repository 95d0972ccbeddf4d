"""Single writes on SQLite's event loop that run again after another writer's failure
undid their group (Database.write_on_loop): they answer from their second run, and the
audit trail records each request once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select

from gateway import jsonio
from gateway.api.fhir_app import _handle_write
from gateway.audit.events import RequestAudit
from gateway.errors import PreconditionFailedError
from gateway.services.context import Context, FhirRequest
from gateway.settings import Settings
from gateway.store.database import Database
from gateway.store.repository import Repository
from gateway.store.schema import audit_log
from tests.factories import task

BASE = "http://testserver/fhir"


def _put(db: Database, settings: Settings, queued: list[Any], task_id: str,
         description: str) -> tuple[Context, FhirRequest]:
    audit = RequestAudit(queued.append, "PUT", f"/fhir/Task/{task_id}", None, None,
                         f"request-{description}")
    body = jsonio.dumps(task(id=task_id, description=description))
    request = FhirRequest("PUT", f"Task/{task_id}", headers={"if-match": 'W/"1"'},
                          body=body, content_type="application/fhir+json")
    return Context(db=db, settings=settings, base_url=BASE, audit=audit), request


def _broken(db: Database) -> str:
    with db.write() as conn:
        Repository(conn).create(task())
        raise RuntimeError("refused after writing")


def test_write_run_again_and_refused_has_its_refusal_audited(
        db: Database, settings: Settings) -> None:
    """The first PUT succeeds, is undone by the failure behind it, and meanwhile the third
    PUT takes version 1: run again, the first is refused (412), and its audit record is
    not taken for stored by the first run, which was undone."""
    if not db.is_sqlite:
        pytest.skip("writes on the event loop are SQLite's")
    with db.write() as conn:
        task_id = Repository(conn).create(task()).id
    queued: list[Any] = []
    first, third = (_put(db, settings, queued, task_id, name) for name in ("first", "third"))

    async def scenario() -> list[Any]:
        return await asyncio.gather(db.write_on_loop(_handle_write, *first),
                                    db.write_on_loop(_broken, db),
                                    db.write_on_loop(_handle_write, *third),
                                    return_exceptions=True)

    refused, failed, updated = asyncio.run(scenario())

    assert isinstance(refused, PreconditionFailedError)
    assert isinstance(failed, RuntimeError)
    assert updated.status == 200
    assert jsonio.loads(updated.body)["description"] == "third"
    with db.read() as conn:
        stored = conn.execute(select(audit_log.c.request_id)).scalars().all()
    assert stored == ["request-third"]  # stored with its write; the first's was undone
    first[0].audit.close(412)  # type: ignore[union-attr]
    assert [record[1:3] for record in queued] == [(412, None)]
