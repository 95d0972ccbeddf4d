"""Parameters every resource has (https://hl7.org/fhir/R4/search.html#all): _id,
_lastUpdated, _tag, _profile, _security, at type level and at system level."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from tests.factories import patient, task
from tests.integration.search_support import put

FHIR = {"Content-Type": "application/fhir+json"}
PROFILE = "http://example.org/fhir/StructureDefinition/atm-task"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"


pytestmark = pytest.mark.usefixtures("search_plan")


def matches(client: TestClient, url: str) -> list[str]:
    """`Type/id` of each match, in the server's order."""
    response = client.get(url)
    assert response.status_code == 200, response.text
    return [f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in response.json().get("entry", []) if e["search"]["mode"] == "match"]


def test_id_search_returns_each_listed_id(client: TestClient) -> None:
    for name in ("a", "b", "c"):
        put(client, task(), name)
    assert set(matches(client, "/fhir/Task?_id=a,c")) == {"Task/a", "Task/c"}
    assert set(matches(client, "/fhir/Task?_id=a&_id=a,b")) == {"Task/a"}
    assert matches(client, "/fhir/Task?_id=zzz") == []
    assert set(matches(client, "/fhir/Task?_id:not=b")) == {"Task/a", "Task/c"}


def test_id_search_leaves_out_deleted_resources(client: TestClient) -> None:
    put(client, task(), "a")
    put(client, task(), "b")
    assert client.delete("/fhir/Task/b").status_code in (200, 204)
    assert matches(client, "/fhir/Task?_id=a,b") == ["Task/a"]


def test_last_updated_search_honours_prefixes(client: TestClient) -> None:
    stamps = [put(client, task(), name)["meta"]["lastUpdated"] for name in ("a", "b", "c")]
    assert stamps == sorted(stamps) and len(set(stamps)) == 3, stamps
    first, second, third = stamps
    cases = {
        f"eq{second}": {"Task/b"}, second: {"Task/b"}, f"ne{second}": {"Task/a", "Task/c"},
        f"gt{second}": {"Task/c"}, f"ge{second}": {"Task/b", "Task/c"},
        f"lt{second}": {"Task/a"}, f"le{second}": {"Task/a", "Task/b"},
        f"sa{first}": {"Task/b", "Task/c"}, f"eb{third}": {"Task/a", "Task/b"},
        f"ge{first[:4]}": {"Task/a", "Task/b", "Task/c"}, "lt2000": set(),
    }
    got = {value: set(matches(client, f"/fhir/Task?_lastUpdated={value}")) for value in cases}
    assert got == cases
    window = f"/fhir/Task?_lastUpdated=gt{first}&_lastUpdated=lt{third}"
    assert matches(client, window) == ["Task/b"]


def test_last_updated_search_reads_a_zone_offset(client: TestClient) -> None:
    stamp = put(client, task(), "a")["meta"]["lastUpdated"]
    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    shifted = moment.astimezone(timezone(timedelta(hours=1))).isoformat(timespec="milliseconds")
    assert shifted.endswith("+01:00")
    assert matches(client, f"/fhir/Task?_lastUpdated={quote(shifted)}") == ["Task/a"]
    assert matches(client, f"/fhir/Task?_lastUpdated=gt{quote(shifted)}") == []


def test_tag_profile_and_security_search_meta(client: TestClient) -> None:
    put(client, task(meta={"tag": [{"system": "urn:atm:tag", "code": "urgent"}],
                           "profile": [PROFILE],
                           "security": [{"system": CONFIDENTIALITY, "code": "R"}]}), "a")
    put(client, task(meta={"tag": [{"system": "urn:other", "code": "urgent"}]}), "b")
    put(client, task(), "c")
    cases = {
        "_tag=urn:atm:tag|urgent": {"Task/a"}, "_tag=urgent": {"Task/a", "Task/b"},
        "_tag:not=urn:atm:tag|urgent": {"Task/b", "Task/c"},
        "_tag:missing=true": {"Task/c"},
        f"_profile={PROFILE}": {"Task/a"}, "_profile=http://example.org/other": set(),
        "_profile:below=http://example.org/fhir/StructureDefinition": {"Task/a"},
        f"_security={CONFIDENTIALITY}|R": {"Task/a"}, "_security=N": set(),
        "_security:missing=false": {"Task/a"},
    }
    got = {query: set(matches(client, f"/fhir/Task?{query}")) for query in cases}
    assert got == cases


def test_system_search_by_id_spans_resource_types(client: TestClient) -> None:
    put(client, task(), "x1")
    put(client, patient(), "x1")
    put(client, patient(), "x2")
    response = client.get("/fhir?_id=x1")
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["type"] == "searchset"
    assert sorted(e["fullUrl"] for e in bundle["entry"]) == [
        "http://testserver/fhir/Patient/x1", "http://testserver/fhir/Task/x1"]
    assert bundle["link"][-1]["url"].startswith("http://testserver/fhir?")


def test_system_search_by_last_updated_and_tag(client: TestClient) -> None:
    put(client, task(meta={"tag": [{"system": "urn:atm:tag", "code": "urgent"}]}), "t1")
    stamp = put(client, patient(), "p1")["meta"]["lastUpdated"]
    assert matches(client, f"/fhir?_lastUpdated=ge{stamp}") == ["Patient/p1"]
    assert matches(client, "/fhir?_tag=urn:atm:tag|urgent") == ["Task/t1"]


def test_system_search_by_a_type_parameter_is_rejected(client: TestClient) -> None:
    response = client.get("/fhir?status=ready")
    assert response.status_code == 400
    assert response.json() == {"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": "invalid",
        "diagnostics": "'status' needs a resource type: search /fhir/Type?status=…"}]}
