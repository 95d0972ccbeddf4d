"""Search by parameter type (https://hl7.org/fhir/R4/search.html#ptypes): string, token,
reference, date, number, quantity and uri, their modifiers and prefixes, on both backends."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.factories import identifier, organization, patient, ref, task
from tests.integration.search_support import put

FHIR = {"Content-Type": "application/fhir+json"}
UCUM = "http://unitsofmeasure.org"


pytestmark = pytest.mark.usefixtures("search_plan")


def ids(client: TestClient, url: str) -> list[str]:
    """Ids of the matches (in the server's order) of a search that must succeed."""
    response = client.get(url)
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    return [e["resource"]["id"] for e in bundle.get("entry", [])
            if e["search"]["mode"] == "match"]


def found(client: TestClient, url: str) -> set[str]:
    return set(ids(client, url))


def assert_cases(client: TestClient, resource_type: str, cases: dict[str, set[str]]) -> None:
    """Run every query of a table; a failure shows all the queries that went wrong."""
    got = {query: found(client, f"/fhir/{resource_type}?{query}") for query in cases}
    assert got == cases


# -- string -----------------------------------------------------------------------------
@pytest.fixture
def people(client: TestClient) -> TestClient:
    put(client, patient(identifier=identifier("urn:x", "1"), gender="female",
                        telecom=[{"system": "email", "value": "elodie@example.org"},
                                 {"system": "phone", "value": "0102"}]), "p1")
    put(client, patient(name=[{"family": "Martin", "given": ["Ève"]}], birthDate="1975",
                        gender="male", identifier=[{"value": "1"}]), "p2")
    put(client, {"resourceType": "Patient", "name": [{"family": "Dupont"}],
                 "identifier": identifier("urn:y", "7")}, "p3")
    return client


STRING_CASES = {
    "name=elo": {"p1"},
    "name=ÉLO": {"p1"},
    "name=eve": {"p2"},
    "family=du": {"p1", "p3"},
    "family=DUR": {"p1"},
    "family=rand": set(),
    "family:exact=Durand": {"p1"},
    "family:exact=durand": set(),
    "family:exact=Dur": set(),
    "given:exact=Ève": {"p2"},
    "family:contains=ran": {"p1"},
    "family:contains=PON": {"p3"},
    "name=martin,dupont": {"p2", "p3"},
    "given:missing=true": {"p3"},
    "given:missing=false": {"p1", "p2"},
}

def test_string_search_matches_start_case_and_accent_insensitively(people: TestClient) -> None:
    assert_cases(people, "Patient", STRING_CASES)


def test_string_search_treats_like_wildcards_literally(client: TestClient) -> None:
    put(client, organization(name="50% Blood_Bank"), "o1")
    put(client, organization(name="50 Blood Bank"), "o2")
    assert found(client, "/fhir/Organization?name=50%25") == {"o1"}
    assert found(client, "/fhir/Organization?name:contains=d_b") == {"o1"}


def test_string_search_unescapes_a_comma_in_a_value(client: TestClient) -> None:
    put(client, organization(name="North, Site A"), "o1")
    put(client, organization(name="North"), "o2")
    assert found(client, "/fhir/Organization?name:exact=North\\, Site A") == {"o1"}
    assert found(client, "/fhir/Organization?name:exact=North,Site A") == {"o2"}


# -- token ------------------------------------------------------------------------------
TOKEN_CASES = {
    "gender=female": {"p1"},
    "gender=male,female": {"p1", "p2"},
    "gender=Female": set(),
    "identifier=urn:x|1": {"p1"},
    "identifier=1": {"p1", "p2"},
    "identifier=|1": {"p2"},
    "identifier=urn:y|": {"p3"},
    "identifier=urn:x|7": set(),
    "gender:not=male": {"p1", "p3"},
    "gender:not=male,female": {"p3"},
    "gender:missing=true": {"p3"},
    "gender:missing=false": {"p1", "p2"},
    "email=elodie@example.org": {"p1"},
    "phone=elodie@example.org": set(),
    "phone=0102": {"p1"},
    "telecom=email|elodie@example.org": {"p1"},
    "active=true": {"p1", "p2"},
}

def test_token_search_matches_system_and_code(people: TestClient) -> None:
    assert_cases(people, "Patient", TOKEN_CASES)


def test_token_text_modifier_matches_codeable_concept_text_and_display(
        client: TestClient) -> None:
    put(client, task(code={"text": "Apheresis collection"}), "t1")
    put(client, task(code={"coding": [{"system": "urn:s", "code": "x",
                                       "display": "Cell infusion"}]}), "t2")
    put(client, task(), "t3")
    assert found(client, "/fhir/Task?code:text=apher") == {"t1"}
    assert found(client, "/fhir/Task?code:text=CELL") == {"t2"}
    assert found(client, "/fhir/Task?code=apheresis") == {"t3"}
    assert found(client, "/fhir/Task?code=http://example.org/atm-step|apheresis") == {"t3"}


def test_token_search_unescapes_a_pipe_in_a_code(client: TestClient) -> None:
    put(client, task(identifier=identifier("urn:s", "a|b")), "t1")
    put(client, task(identifier=identifier("a", "b")), "t2")
    assert found(client, "/fhir/Task?identifier=urn:s|a\\|b") == {"t1"}
    assert found(client, "/fhir/Task?identifier=a|b") == {"t2"}


# -- reference --------------------------------------------------------------------------
@pytest.fixture
def tasks_with_refs(client: TestClient) -> TestClient:
    put(client, organization(identifier=identifier("urn:org", "north")), "o1")
    put(client, organization(name="South"), "o2")
    put(client, patient(), "p1")
    put(client, task(**{"for": ref("Patient/p1")}, owner=ref("Organization/o1")), "t1")
    put(client, task(**{"for": ref("http://testserver/fhir/Patient/p2")},
                     owner={"identifier": {"system": "urn:org", "value": "south"}}), "t2")
    put(client, task(**{"for": ref("Group/p1")}, owner=ref("Organization/o2")), "t3")
    put(client, task(**{"for": ref("http://elsewhere.org/fhir/Patient/p1")}), "t4")
    put(client, task(), "t5")
    return client


REFERENCE_CASES = {
    "patient=Patient/p1": {"t1"},
    "patient=p1": {"t1"},
    "patient=Patient/p1/_history/3": {"t1"},
    "patient=http://testserver/fhir/Patient/p1": {"t1"},
    "patient=p2": {"t2"},
    "patient=Patient/p1,Patient/p2": {"t1", "t2"},
    "subject=Patient/p1": {"t1"},
    "subject:Patient=p1": {"t1"},
    "subject:Group=p1": {"t3"},
    "subject=Group/p1": {"t3"},
    "subject=http://elsewhere.org/fhir/Patient/p1": {"t4"},
    "owner=Organization/o1": {"t1"},
    "owner:Organization=o2": {"t3"},
    "owner:identifier=urn:org|south": {"t2"},
    "owner:identifier=south": {"t2"},
    "owner:identifier=urn:org|north": set(),
    "subject:missing=true": {"t5"},
    "owner:missing=true": {"t4", "t5"},
    "owner:missing=false": {"t1", "t2", "t3"},
}

def test_reference_search_matches_type_id_url_and_identifier(tasks_with_refs: TestClient) -> None:
    assert_cases(tasks_with_refs, "Task", REFERENCE_CASES)


# -- date -------------------------------------------------------------------------------
BIRTHDATE_CASES = {
    "birthdate=1980": {"p1"},
    "birthdate=1980-04": {"p1"},
    "birthdate=1980-04-12": {"p1"},
    "birthdate=eq1980-04-12": {"p1"},
    "birthdate=1980-04-13": set(),
    "birthdate=1975-06-01": set(),
    "birthdate=1975": {"p2"},
    "birthdate=ne1980-04-12": {"p2"},
    "birthdate=gt1979": {"p1"},
    "birthdate=gt1980-04-12": set(),
    "birthdate=lt1979": {"p2"},
    "birthdate=lt1980-04-12": {"p2"},
    "birthdate=ge1980-04-12": {"p1"},
    "birthdate=le1980-04-12": {"p1", "p2"},
    "birthdate=sa1979-12-31": {"p1"},
    "birthdate=sa1975-06-01": {"p1"},
    "birthdate=eb1980": {"p2"},
    "birthdate=ap1981-04-10": {"p1"},
    "birthdate=ap1977": {"p1", "p2"},
    "birthdate=ap1999": set(),
    "birthdate=1975,1980": {"p1", "p2"},
    "birthdate=ge1970&birthdate=le1979": {"p2"},
    "birthdate:missing=true": {"p3"},
    "birthdate:missing=false": {"p1", "p2"},
}

def test_date_search_honours_prefixes_and_precision(people: TestClient) -> None:
    assert_cases(people, "Patient", BIRTHDATE_CASES)


def observation(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Observation", "status": "final",
                            "code": {"coding": [{"system": "urn:c", "code": "cd34"}]}}
    body.update(overrides)
    return body


DATETIME_CASES = {
    "date=2024-03-01T08:00:00Z": {"o1"},
    "date=2024-03-01T08:00:00%2B00:00": {"o1"},
    "date=2024-03-01T10:00:00%2B02:00": {"o1"},
    "date=2024-03-01T10:00:00 02:00": {"o1"},
    "date=2024-03-01T10:00:00Z": set(),
    "date=2024-03-01T08:00Z": {"o1"},
    "date=2024-03-01": {"o1"},
    "date=gt2024-03-01T08:00:00Z": {"o2", "o3"},
    "date=ge2024-03-01T08:00:00Z": {"o1", "o2", "o3"},
    "date=lt2024-03-01T08:00:01Z": {"o1", "o2"},
    "date=2024-03-02": set(),
    "date=2024-03": {"o1", "o2"},
    "date=ge2024-03-03": {"o2", "o3"},
    "date=lt2024-03-02": {"o1", "o2"},
    "date=sa2024-02-29": {"o1", "o2", "o3"},
    "date=eb2024-03-02": {"o1"},
    "date=gt2030": {"o3"},
    "date=lt2000": set(),
}

def test_date_search_on_datetime_with_zone_and_period(client: TestClient) -> None:
    put(client, observation(effectiveDateTime="2024-03-01T10:00:00+02:00"), "o1")
    put(client, observation(effectivePeriod={"start": "2024-03-01", "end": "2024-03-05"}), "o2")
    put(client, observation(effectivePeriod={"start": "2024-04-01T00:00:00Z"}), "o3")
    assert_cases(client, "Observation", DATETIME_CASES)


# -- number and quantity ----------------------------------------------------------------
QUANTITY_CASES = {
    "value-quantity=100": {"o1"},
    "value-quantity=100.4": {"o1"},
    "value-quantity=100.40": {"o1"},
    "value-quantity=100.6": {"o2"},
    "value-quantity=100|http://unitsofmeasure.org|mg": {"o1"},
    "value-quantity=100||mg": {"o1"},
    "value-quantity=100|http://unitsofmeasure.org|kg": set(),
    "value-quantity=5.4|http://unitsofmeasure.org|kg": {"o3"},
    "value-quantity=5.4||kilogram": {"o4"},
    "value-quantity=gt100": {"o1", "o2"},
    "value-quantity=gt100.4": {"o2"},
    "value-quantity=lt100.5": {"o1", "o3", "o4"},
    "value-quantity=ge100.6": {"o2"},
    "value-quantity=le5.4": {"o3", "o4"},
    "value-quantity=ne100": {"o2", "o3", "o4"},
    "value-quantity=ap100": {"o1", "o2"},
    "value-quantity=ap6": {"o3", "o4"},
    "value-quantity=sa100.5": {"o2"},
    "value-quantity=eb6": {"o3", "o4"},
    "value-quantity=gt1e2": {"o1", "o2"},
    "value-quantity=1e2": {"o1", "o2"},  # [95, 105]
    "value-quantity=1.0e2": {"o1"},  # [99.5, 100.5]: one digit further than written
    "value-quantity:missing=true": {"o5"},
    "value-quantity:missing=false": {"o1", "o2", "o3", "o4"},
}

def test_quantity_search_honours_prefixes_units_and_implicit_precision(client: TestClient) -> None:
    put(client, observation(valueQuantity={"value": 100.4, "system": UCUM, "code": "mg"}), "o1")
    put(client, observation(valueQuantity={"value": 100.6, "system": UCUM, "code": "mg"}), "o2")
    put(client, observation(valueQuantity={"value": 5.4, "system": UCUM, "code": "kg"}), "o3")
    put(client, observation(valueQuantity={"value": 5.4, "unit": "kilogram"}), "o4")
    put(client, observation(valueString="pending"), "o5")
    assert_cases(client, "Observation", QUANTITY_CASES)


def risk(probability: float | None) -> dict[str, Any]:
    prediction = {} if probability is None else {"probabilityDecimal": probability}
    return {"resourceType": "RiskAssessment", "status": "final",
            "subject": ref("Patient/p1"),
            "prediction": [{**prediction, "outcome": {"text": "relapse"}}]}


NUMBER_CASES = {
    "probability=0.25": {"r1"},
    "probability=0.3": {"r1"},
    "probability=0.250": set(),
    "probability=0.7": {"r2"},
    "probability=gt0.25": {"r1", "r2"},
    "probability=gt0.254": {"r2"},
    "probability=ge0.254": {"r1", "r2"},
    "probability=lt0.7": {"r1"},
    "probability=le0.7": {"r1", "r2"},
    "probability=ne0.7": {"r1"},
    "probability=0.25,0.7": {"r1", "r2"},
    "probability:missing=true": {"r3"},
}

def test_number_search_honours_prefixes_and_implicit_precision(client: TestClient) -> None:
    put(client, risk(0.254), "r1")
    put(client, risk(0.7), "r2")
    put(client, risk(None), "r3")
    assert_cases(client, "RiskAssessment", NUMBER_CASES)


# -- uri --------------------------------------------------------------------------------
URI_CASES = {
    "url=http://example.org/fhir/ValueSet/a": {"v1"},
    "url=http://example.org/fhir/ValueSet/A": set(),
    "url=http://example.org/fhir/ValueSet": set(),
    "url:below=http://example.org/fhir": {"v1", "v2", "v3"},
    "url:below=http://example.org/fhir/ValueSet/a": {"v1", "v2"},
    "url:above=http://example.org/fhir/ValueSet/a/b/c": {"v1", "v2"},
    "url:missing=true": {"v5"},
    "url:missing=false": {"v1", "v2", "v3", "v4"},
}

def test_uri_search_matches_exactly_below_and_above(client: TestClient) -> None:
    urls = {"v1": "http://example.org/fhir/ValueSet/a",
            "v2": "http://example.org/fhir/ValueSet/a/b",
            "v3": "http://example.org/fhir/ValueSet/ab",
            "v4": "http://other.org/ValueSet/a", "v5": None}
    for vs_id, url in urls.items():
        body = {"resourceType": "ValueSet", "status": "active"}
        put(client, {**body, "url": url} if url else body, vs_id)
    assert_cases(client, "ValueSet", URI_CASES)
