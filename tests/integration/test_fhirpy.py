"""A third-party FHIR client, fhirpy, works against a real server unchanged: CRUD, search
filters, paging through `next` links, fetch_all, count, $validate; sync (requests) and
async (aiohttp)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fhirpy import AsyncFHIRClient, SyncFHIRClient
from fhirpy.base.exceptions import ResourceNotFound

from tests.factories import ref, task

STATUSES = ["ready", "in-progress", "completed"]


@pytest.fixture
def fhir(live_server: str) -> SyncFHIRClient:
    return SyncFHIRClient(live_server)


def load_tasks(fhir: SyncFHIRClient, count: int) -> list[Any]:
    """`count` Tasks spread over three statuses and three owners, saved one by one."""
    saved = []
    for n in range(count):
        resource = fhir.resource("Task", **task(status=STATUSES[n % 3],
                                                owner=ref(f"Organization/org-{n % 3}")))
        resource.save()
        saved.append(resource)
    return saved


def test_fhirpy_create_assigns_id_and_version(fhir: SyncFHIRClient) -> None:
    created = fhir.resource("Task", **task())
    created.save()
    assert created.id
    assert created["meta"]["versionId"] == "1"
    read = fhir.reference("Task", created.id).to_resource()
    assert read.serialize() == created.serialize()


def test_fhirpy_save_of_changed_resource_makes_version_2(fhir: SyncFHIRClient) -> None:
    created = fhir.resource("Task", **task())
    created.save()
    created["status"] = "in-progress"
    created.save()
    assert created["meta"]["versionId"] == "2"
    read = fhir.reference("Task", created.id).to_resource()
    assert read["status"] == "in-progress"
    assert read["meta"]["versionId"] == "2"
    assert created.refresh()["meta"]["versionId"] == "2"


def test_fhirpy_delete_then_read_raises_not_found(fhir: SyncFHIRClient) -> None:
    created = fhir.resource("Task", **task())
    created.save()
    created.delete()
    with pytest.raises(ResourceNotFound) as raised:
        fhir.reference("Task", created.id).to_resource()
    assert "deleted" in str(raised.value).lower()


def test_fhirpy_search_with_filters_returns_only_matches(fhir: SyncFHIRClient) -> None:
    saved = load_tasks(fhir, 9)
    found = fhir.resources("Task").search(status="ready", owner="Organization/org-0")
    expected = {t.id for t in saved
                if t["status"] == "ready" and t["owner"]["reference"] == "Organization/org-0"}
    assert {t.id for t in found.fetch_all()} == expected == {saved[0].id, saved[3].id,
                                                             saved[6].id}
    assert found.search(_id=saved[3].id).get().id == saved[3].id
    assert fhir.resources("Task").search(status="cancelled").first() is None


def test_fhirpy_iterating_a_search_visits_every_page_once(fhir: SyncFHIRClient) -> None:
    saved = load_tasks(fhir, 23)
    search = fhir.resources("Task").limit(5)
    assert len(search.fetch()) == 5
    seen = [t.id for t in search]
    assert len(seen) == 23
    assert sorted(seen) == sorted(t.id for t in saved)


def test_fhirpy_fetch_all_follows_next_links(fhir: SyncFHIRClient) -> None:
    saved = load_tasks(fhir, 23)
    ready = [t.id for t in saved if t["status"] == "ready"]
    assert sorted(t.id for t in fhir.resources("Task").limit(5).fetch_all()) == sorted(
        t.id for t in saved)
    found = fhir.resources("Task").search(status="ready").limit(3).fetch_all()
    assert sorted(t.id for t in found) == sorted(ready)


def test_fhirpy_count_gives_total(fhir: SyncFHIRClient) -> None:
    # fhirpy's count() sends `_totalMethod=count` (Aidbox's spelling of _total=accurate).
    load_tasks(fhir, 7)
    assert fhir.resources("Task").count() == 7
    assert fhir.resources("Task").search(status="completed").count() == 2


def test_fhirpy_is_valid_asks_the_servers_validate(fhir: SyncFHIRClient) -> None:
    assert fhir.resource("Task", **task()).is_valid() is True
    assert fhir.resource("Task", **task(status="not-a-status")).is_valid() is False


def test_fhirpy_async_client_saves_and_pages(live_server: str) -> None:
    async def scenario() -> tuple[list[str], list[str], int]:
        client = AsyncFHIRClient(live_server)
        ids = []
        for n in range(12):
            resource = client.resource("Task", **task(status=STATUSES[n % 3]))
            await resource.save()
            ids.append(resource.id)
        paged = [t.id async for t in client.resources("Task").limit(5)]
        gone = client.resource("Task", **task())
        await gone.save()
        await gone.delete()
        ready = await client.resources("Task").search(status="ready").limit(2).fetch_all()
        return ids, paged, len(ready)

    ids, paged, ready = asyncio.run(scenario())
    assert sorted(paged) == sorted(ids)
    assert ready == 4
