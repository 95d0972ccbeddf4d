"""Transactions resolve identities before writing: `urn:uuid:` fullUrls, conditional
references, ifNoneExist and conditional updates (https://hl7.org/fhir/R4/http.html#trules)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from gateway.store.database import Database
from tests.factories import identifier, patient, ref, task
from tests.integration.bundles_support import (
    BASE,
    create,
    entry,
    ids_of,
    location_id,
    outcome,
    patch_binary,
    post_bundle,
    read,
    row_counts,
    transaction,
)

PATIENT_URN = "urn:uuid:6d1b8a3e-5f0c-4b8e-9c51-0a3c1f1e2d01"
TASK_URN = "urn:uuid:6d1b8a3e-5f0c-4b8e-9c51-0a3c1f1e2d02"


def _ok(client: TestClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = post_bundle(client, body)
    assert response.status_code == 200, response.text
    return list(response.json()["entry"])


# -- urn:uuid ------------------------------------------------------------------------------
def test_urn_uuid_references_point_to_the_created_resources(client: TestClient) -> None:
    entries = _ok(client, transaction(
        # The first Task refers forward to the Patient and the second Task.
        entry("POST", "Task", task(**{"for": ref(PATIENT_URN)}, partOf=[ref(TASK_URN)])),
        entry("POST", "Patient", patient(), PATIENT_URN),
        entry("POST", "Task", task(input=[{"type": {"text": "donor"},
                                           "valueReference": ref(PATIENT_URN)}]), TASK_URN),
    ))
    assert [e["response"]["status"] for e in entries] == ["201 Created"] * 3
    ids = [location_id(e["response"]["location"]) for e in entries]
    assert ids == [e["resource"]["id"] for e in entries]
    first = read(client, f"Task/{ids[0]}").json()
    assert first["for"] == {"reference": f"Patient/{ids[1]}"}
    assert first["partOf"] == [{"reference": f"Task/{ids[2]}"}]
    nested = read(client, f"Task/{ids[2]}").json()
    assert nested["input"][0]["valueReference"] == {"reference": f"Patient/{ids[1]}"}
    assert ids_of(client, f"Task?subject=Patient/{ids[1]}") == [ids[0]]


def test_full_urls_in_uri_elements_and_narrative_links_are_rewritten_too(
        client: TestClient) -> None:
    """http.html#trules: links in elements of type uri/canonical and the narrative's
    href/src are replaced as references are; other text is left alone."""
    narrative = {"status": "generated", "div": (
        f'<div xmlns="http://www.w3.org/1999/xhtml"><a href="{PATIENT_URN}">donor</a> '
        f'{PATIENT_URN} <a href="https://example.org/x">elsewhere</a></div>')}
    entries = _ok(client, transaction(
        entry("POST", "Patient", patient(identifier=[
            {"system": "urn:ietf:rfc:3986", "value": PATIENT_URN}]), PATIENT_URN),
        entry("POST", "Task", task(text=narrative, instantiatesUri=PATIENT_URN,
                                   description=f"see {PATIENT_URN}",
                                   input=[{"type": {"text": "x"}, "valueUri": PATIENT_URN},
                                          {"type": {"text": "y"}, "valueString": "Patient"}])),
    ))
    patient_id = location_id(entries[0]["response"]["location"])
    stored = read(client, f"Task/{location_id(entries[1]['response']['location'])}").json()
    assert stored["instantiatesUri"] == f"Patient/{patient_id}"
    assert stored["input"][0]["valueUri"] == f"Patient/{patient_id}"
    assert stored["input"][1]["valueString"] == "Patient"
    assert stored["description"] == f"see {PATIENT_URN}"  # not a whole link: text, kept
    assert f'href="Patient/{patient_id}"' in stored["text"]["div"]
    assert f"> {PATIENT_URN} <" in stored["text"]["div"]  # text, not an attribute
    assert 'href="https://example.org/x"' in stored["text"]["div"]
    # An identifier recording the entry's own urn keeps it.
    assert read(client, f"Patient/{patient_id}").json()["identifier"][0]["value"] == PATIENT_URN


def test_urn_uuid_naming_no_entry_fails_400_at_its_reference(
        client: TestClient, db: Database) -> None:
    before = row_counts(db)
    response = post_bundle(client, transaction(
        entry("POST", "Patient", patient(), PATIENT_URN),
        entry("POST", "Task", task(input=[{"type": {"text": "x"},
                                           "valueReference": ref(TASK_URN)}])),
    ))
    assert outcome(400, response) == [{
        "severity": "error", "code": "invalid",
        "diagnostics": f"Bundle.entry[1] (POST Task): Reference {TASK_URN} names no entry of "
                       "this Bundle",
        "expression": ["Bundle.entry[1].resource.input[0].valueReference.reference"]}]
    assert row_counts(db) == before


def test_absolute_full_url_references_are_rewritten_to_the_new_id(client: TestClient) -> None:
    entries = _ok(client, transaction(
        entry("POST", "Patient", patient(), f"{BASE}/Patient/client-side-1"),
        entry("POST", "Task", task(**{"for": ref("Patient/client-side-1")})),
    ))
    patient_id = entries[0]["resource"]["id"]
    assert patient_id != "client-side-1"
    assert entries[1]["resource"]["for"] == {"reference": f"Patient/{patient_id}"}


def test_search_entry_may_name_a_created_resource_by_its_urn(client: TestClient) -> None:
    entries = _ok(client, transaction(
        entry("GET", f"Task?subject={PATIENT_URN}"),
        entry("POST", "Patient", patient(), PATIENT_URN),
        entry("POST", "Task", task(**{"for": ref(PATIENT_URN)})),
    ))
    found = [e["resource"]["id"] for e in entries[0]["resource"]["entry"]]
    assert found == [entries[2]["resource"]["id"]]


# -- conditional references ----------------------------------------------------------------
def test_conditional_reference_resolves_to_the_single_match(client: TestClient) -> None:
    donor = create(client, patient(identifier=identifier("urn:x", "1")))
    entries = _ok(client, transaction(
        entry("POST", "Task", task(**{"for": ref("Patient?identifier=urn:x|1")})),
        entry("POST", "Task", task(focus=ref("Patient?identifier=urn:x|1"))),
    ))
    assert entries[0]["resource"]["for"] == {"reference": f"Patient/{donor['id']}"}
    assert entries[1]["resource"]["focus"] == {"reference": f"Patient/{donor['id']}"}


def test_conditional_reference_without_match_fails_400(client: TestClient, db: Database) -> None:
    before = row_counts(db)
    response = post_bundle(client, transaction(
        entry("POST", "Patient", patient()),
        entry("POST", "Task", task(**{"for": ref("Patient?identifier=urn:x|none")})),
    ))
    assert outcome(400, response) == [{
        "severity": "error", "code": "invalid",
        "diagnostics": "Bundle.entry[1] (POST Task): Conditional reference "
                       "Patient?identifier=urn:x|none matches no resource",
        "expression": ["Bundle.entry[1].resource.for.reference"]}]
    assert row_counts(db) == before


def test_conditional_reference_with_several_matches_fails_412(
        client: TestClient, db: Database) -> None:
    for _ in range(2):
        create(client, patient(identifier=identifier("urn:x", "twin")))
    before = row_counts(db)
    response = post_bundle(client, transaction(
        entry("POST", "Task", task(**{"for": ref("Patient?identifier=urn:x|twin")})),
    ))
    assert outcome(412, response) == [{
        "severity": "error", "code": "multiple-matches",
        "diagnostics": "Bundle.entry[0] (POST Task): Conditional reference "
                       "Patient?identifier=urn:x|twin matches several resources",
        "expression": ["Bundle.entry[0].resource.for.reference"]}]
    assert row_counts(db) == before


# -- ifNoneExist and conditional update ----------------------------------------------------
def test_if_none_exist_with_a_match_answers_200_and_redirects_references(
        client: TestClient) -> None:
    donor = create(client, patient(identifier=identifier("urn:x", "1")))
    entries = _ok(client, transaction(
        entry("POST", "Patient", patient(identifier=identifier("urn:x", "1")), PATIENT_URN,
              ifNoneExist="identifier=urn:x|1"),
        entry("POST", "Task", task(**{"for": ref(PATIENT_URN)})),
    ))
    assert entries[0]["response"]["status"] == "200 OK"
    assert entries[0]["resource"] == donor
    assert entries[0]["response"]["location"] == f"{BASE}/Patient/{donor['id']}/_history/1"
    assert entries[1]["resource"]["for"] == {"reference": f"Patient/{donor['id']}"}
    assert ids_of(client, "Patient?identifier=urn:x|1") == [donor["id"]]


def test_if_none_exist_without_a_match_creates_201(client: TestClient) -> None:
    entries = _ok(client, transaction(
        entry("POST", "Patient", patient(identifier=identifier("urn:x", "2")), PATIENT_URN,
              ifNoneExist="identifier=urn:x|2"),
        entry("POST", "Task", task(**{"for": ref(PATIENT_URN)})),
    ))
    assert entries[0]["response"]["status"] == "201 Created"
    new_id = location_id(entries[0]["response"]["location"])
    assert entries[1]["resource"]["for"] == {"reference": f"Patient/{new_id}"}
    assert ids_of(client, "Patient?identifier=urn:x|2") == [new_id]


def test_conditional_put_with_a_match_updates_it_and_redirects_references(
        client: TestClient) -> None:
    donor = create(client, patient(identifier=identifier("urn:x", "3")))
    entries = _ok(client, transaction(
        entry("POST", "Task", task(**{"for": ref(PATIENT_URN)})),
        entry("PUT", "Patient?identifier=urn:x|3",
              patient(identifier=identifier("urn:x", "3"), active=False), PATIENT_URN),
    ))
    assert entries[1]["response"]["status"] == "200 OK"
    assert entries[1]["resource"]["id"] == donor["id"]
    assert entries[1]["resource"]["meta"]["versionId"] == "2"
    assert entries[1]["resource"]["active"] is False
    assert entries[0]["resource"]["for"] == {"reference": f"Patient/{donor['id']}"}


def test_conditional_put_without_a_match_creates_and_redirects_references(
        client: TestClient) -> None:
    entries = _ok(client, transaction(
        entry("PUT", "Patient?identifier=urn:x|4", patient(identifier=identifier("urn:x", "4")),
              PATIENT_URN),
        entry("POST", "Task", task(**{"for": ref(PATIENT_URN)})),
    ))
    assert entries[0]["response"]["status"] == "201 Created"
    new_id = entries[0]["resource"]["id"]
    assert location_id(entries[0]["response"]["location"]) == new_id
    assert entries[1]["resource"]["for"] == {"reference": f"Patient/{new_id}"}
    assert ids_of(client, "Patient?identifier=urn:x|4") == [new_id]


def test_conditional_put_with_several_matches_fails_412(client: TestClient) -> None:
    for _ in range(2):
        create(client, patient(identifier=identifier("urn:x", "twin")))
    response = post_bundle(client, transaction(
        entry("PUT", "Patient?identifier=urn:x|twin", patient()),
    ))
    assert outcome(412, response) == [{
        "severity": "error", "code": "multiple-matches",
        "diagnostics": "Bundle.entry[0] (PUT Patient): The criteria match several Patient "
                       "resources",
        "expression": ["Bundle.entry[0]"]}]


# -- one change per resource ---------------------------------------------------------------
def test_two_entries_changing_the_same_resource_fail_400(client: TestClient) -> None:
    donor = create(client, patient())
    response = post_bundle(client, transaction(
        entry("PUT", f"Patient/{donor['id']}", {**patient(active=False), "id": donor["id"]}),
        entry("DELETE", f"Patient/{donor['id']}"),
    ))
    assert outcome(400, response) == [{
        "severity": "error", "code": "invalid",
        "diagnostics": f"Bundle.entry[0] and Bundle.entry[1] both change Patient/{donor['id']}",
        "expression": ["Bundle.entry[1]"]}]
    assert read(client, f"Patient/{donor['id']}").json() == donor


def test_conditional_update_resolving_to_a_changed_resource_fails_400(
        client: TestClient) -> None:
    donor = create(client, patient(identifier=identifier("urn:x", "5")))
    response = post_bundle(client, transaction(
        entry("DELETE", f"Patient/{donor['id']}"),
        entry("PUT", "Patient?identifier=urn:x|5", patient(identifier=identifier("urn:x", "5"))),
    ))
    issues = outcome(400, response)
    assert issues == [{
        "severity": "error", "code": "invalid",
        "diagnostics": f"Bundle.entry[0] and Bundle.entry[1] both change Patient/{donor['id']}",
        "expression": ["Bundle.entry[1]"]}]


def test_conditional_deletes_of_different_resources_do_not_overlap(client: TestClient) -> None:
    first = create(client, patient(identifier=identifier("urn:x", "a")))
    second = create(client, patient(identifier=identifier("urn:x", "b")))
    entries = _ok(client, transaction(
        entry("DELETE", "Patient?identifier=urn:x|a"),
        entry("DELETE", "Patient?identifier=urn:x|b"),
    ))
    assert [e["response"]["status"] for e in entries] == ["200 OK", "200 OK"]
    for gone in (first, second):
        assert read(client, f"Patient/{gone['id']}").status_code == 410


def test_conditional_patch_runs_on_its_single_match(client: TestClient) -> None:
    step = create(client, task(identifier=identifier("urn:step", "7")))
    entries = _ok(client, transaction(entry(
        "PATCH", "Task?identifier=urn:step|7",
        patch_binary([{"op": "replace", "path": "/status", "value": "completed"}]))))
    assert entries[0]["response"]["status"] == "200 OK"
    assert entries[0]["response"]["location"] == f"{BASE}/Task/{step['id']}/_history/2"
    assert read(client, f"Task/{step['id']}").json()["status"] == "completed"


def test_conditional_patch_and_update_of_the_same_resource_fail_400(
        client: TestClient) -> None:
    step = create(client, task(identifier=identifier("urn:step", "8")))
    response = post_bundle(client, transaction(
        entry("PATCH", "Task?identifier=urn:step|8",
              patch_binary([{"op": "replace", "path": "/status", "value": "completed"}])),
        entry("PUT", f"Task/{step['id']}", step),
    ))
    assert outcome(400, response) == [{
        "severity": "error", "code": "invalid",
        "diagnostics": f"Bundle.entry[0] and Bundle.entry[1] both change Task/{step['id']}",
        "expression": ["Bundle.entry[1]"]}]


def test_duplicate_full_url_fails_400(client: TestClient, db: Database) -> None:
    before = row_counts(db)
    response = post_bundle(client, transaction(
        entry("POST", "Patient", patient(), PATIENT_URN),
        entry("POST", "Patient", patient(), PATIENT_URN),
    ))
    assert outcome(400, response) == [{
        "severity": "error", "code": "invalid",
        "diagnostics": f"Bundle.entry[0] and Bundle.entry[1] share the fullUrl {PATIENT_URN}",
        "expression": ["Bundle.entry[1].fullUrl"]}]
    assert row_counts(db) == before
