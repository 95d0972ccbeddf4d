"""Search-index rows extracted from resources, one table per parameter type."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from gateway.store import indexing
from gateway.store.fhirpath import roots
from gateway.store.indexing import MAX_TOKEN, index_rows, normalize
from gateway.store.search_params import indexed_params
from gateway.store.timeparse import date_range


def rows(resource: dict[str, Any], kind: str, param: str) -> list[dict[str, Any]]:
    """The rows of one parameter, without the param key."""
    return [{k: v for k, v in row.items() if k != "param"}
            for row in index_rows(resource)[kind] if row["param"] == param]


def test_normalize_drops_case_and_accents() -> None:
    assert normalize("Élodie") == "elodie"
    assert normalize("ÇA VA") == "ca va"
    assert normalize("Straße") == "strasse"
    assert len(normalize("x" * 1000)) == MAX_TOKEN


def test_string_rows_keep_normalized_and_exact_text_of_each_name_part() -> None:
    patient = {"resourceType": "Patient",
               "name": [{"family": "Durand", "given": ["Élodie", "Élodie"], "text": "É. D."}]}
    assert rows(patient, "string", "name") == [
        {"value": "e. d.", "exact": "É. D."}, {"value": "durand", "exact": "Durand"},
        {"value": "elodie", "exact": "Élodie"}]
    assert rows(patient, "string", "family") == [{"value": "durand", "exact": "Durand"}]


def test_string_rows_of_an_address_cover_its_parts() -> None:
    patient = {"resourceType": "Patient",
               "address": [{"line": ["1 rue Haute"], "city": "Lyon", "postalCode": "69001"}]}
    assert [r["exact"] for r in rows(patient, "string", "address")] == [
        "1 rue Haute", "Lyon", "69001"]
    assert rows(patient, "string", "address-city") == [{"value": "lyon", "exact": "Lyon"}]


def test_token_rows_of_codes_codings_identifiers_and_booleans() -> None:
    task = {"resourceType": "Task", "status": "ready",
            "code": {"coding": [{"system": "urn:s", "code": "a", "display": "Aphérèse"}],
                     "text": "Cell Collection"},
            "identifier": [{"system": "urn:id", "value": "42"}, {"value": "7"}]}
    assert rows(task, "token", "status") == [{"system": None, "code": "ready", "text": None}]
    assert rows(task, "token", "code") == [
        {"system": "urn:s", "code": "a", "text": "apherese"},
        {"system": None, "code": None, "text": "cell collection"}]
    assert rows(task, "token", "identifier") == [
        {"system": "urn:id", "code": "42", "text": None},
        {"system": None, "code": "7", "text": None}]
    patient = {"resourceType": "Patient", "active": False,
               "telecom": [{"system": "email", "value": "a@b.org"},
                           {"system": "phone", "value": "0102"}]}
    assert rows(patient, "token", "active") == [{"system": None, "code": "false", "text": None}]
    assert rows(patient, "token", "email") == [
        {"system": "email", "code": "a@b.org", "text": None}]


def test_token_rows_of_meta_tags_and_security() -> None:
    task = {"resourceType": "Task", "status": "ready",
            "meta": {"tag": [{"system": "urn:t", "code": "urgent"}],
                     "security": [{"system": "urn:c", "code": "R"}]}}
    assert rows(task, "token", "_tag") == [{"system": "urn:t", "code": "urgent", "text": None}]
    assert rows(task, "token", "_security") == [{"system": "urn:c", "code": "R", "text": None}]


def test_reference_rows_of_relative_absolute_contained_and_logical_references() -> None:
    task = {"resourceType": "Task", "status": "ready",
            "basedOn": [{"reference": "CarePlan/1/_history/2"},
                        {"reference": "http://x.org/fhir/CarePlan/3/_history/1"},
                        {"reference": "#contained"},
                        {"reference": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"},
                        {"identifier": {"system": "urn:plan", "value": "P9"}}]}
    assert rows(task, "reference", "based-on") == [
        {"target_type": "CarePlan", "target_id": "1", "url": None},
        {"target_type": "CarePlan", "target_id": "3", "url": "http://x.org/fhir/CarePlan/3"},
        {"target_type": None, "target_id": None, "url": "#contained"},
        {"target_type": None, "target_id": None,
         "url": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"},
        {"target_type": None, "target_id": None, "url": None}]
    assert rows(task, "token", "based-on:identifier") == [
        {"system": "urn:plan", "code": "P9", "text": None}]


def test_typed_reference_parameter_keeps_only_its_target_type() -> None:
    patient_task = {"resourceType": "Task", "status": "ready", "for": {"reference": "Patient/p"}}
    group_task = {"resourceType": "Task", "status": "ready", "for": {"reference": "Group/g"}}
    assert rows(patient_task, "reference", "patient") == [
        {"target_type": "Patient", "target_id": "p", "url": None}]
    assert rows(group_task, "reference", "patient") == []
    assert rows(group_task, "reference", "subject") == [
        {"target_type": "Group", "target_id": "g", "url": None}]


def test_date_rows_are_ranges_at_the_value_precision() -> None:
    patient = {"resourceType": "Patient", "birthDate": "1980-04"}
    low, high = date_range("1980-04") or (0, 0)
    assert rows(patient, "date", "birthdate") == [{"low": low, "high": high}]


def test_date_rows_of_periods_and_timings() -> None:
    open_end = {"resourceType": "Task", "status": "ready",
                "executionPeriod": {"start": "2024-03-01"}}
    [row] = rows(open_end, "date", "period")
    assert row == {"low": (date_range("2024-03-01") or (0,))[0], "high": 2**62}
    timing = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
              "effectiveTiming": {"event": ["2024-03-05", "2024-03-01T10:00:00Z"]}}
    [span] = rows(timing, "date", "date")
    assert span == {"low": (date_range("2024-03-01T10:00:00Z") or (0,))[0],
                    "high": (date_range("2024-03-05") or (0, 0))[1]}


def test_number_and_quantity_rows() -> None:
    risk = {"resourceType": "RiskAssessment", "status": "final",
            "prediction": [{"probabilityDecimal": Decimal("0.25")},
                           {"probabilityRange": {"low": {"value": 1}}}]}
    assert rows(risk, "number", "probability") == [{"value": 0.25}]
    observation = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                   "valueQuantity": {"value": Decimal("5.4"), "unit": "kilogram"}}
    assert rows(observation, "quantity", "value-quantity") == [
        {"value": 5.4, "system": None, "code": "kilogram"}]
    coded = {**observation, "valueQuantity": {"value": 7, "system": "http://unitsofmeasure.org",
                                              "code": "kg", "unit": "kilogram"}}
    assert rows(coded, "quantity", "value-quantity") == [
        {"value": 7.0, "system": "http://unitsofmeasure.org", "code": "kg"}]


def test_uri_rows() -> None:
    value_set = {"resourceType": "ValueSet", "status": "active", "url": "http://x.org/vs",
                 "meta": {"profile": ["http://x.org/p"]}}
    assert rows(value_set, "uri", "url") == [{"value": "http://x.org/vs"}]
    assert rows(value_set, "uri", "_profile") == [{"value": "http://x.org/p"}]


def test_id_and_last_updated_are_not_indexed() -> None:
    task = {"resourceType": "Task", "id": "t1", "status": "ready",
            "meta": {"lastUpdated": "2024-01-01T00:00:00Z"}}
    params = {row["param"] for table in index_rows(task).values() for row in table}
    assert "_id" not in params and "_lastUpdated" not in params


SKIPPING_EXAMPLES = [
    {"resourceType": "Task", "status": "ready", "intent": "order",
     "for": {"reference": "Patient/p1"}, "owner": {"reference": "Organization/o1"},
     "meta": {"tag": [{"system": "urn:t", "code": "x"}]}, "authoredOn": "2025-01-15"},
    {"resourceType": "Observation", "status": "final", "code": {"text": "weight"},
     "valueQuantity": {"value": 72.5, "unit": "kg", "system": "http://unitsofmeasure.org",
                       "code": "kg"}, "effectiveDateTime": "2025-03-01T10:00:00Z",
     "subject": {"reference": "Patient/p1"}},
    {"resourceType": "Patient", "name": [{"family": "Ng", "given": ["Ana"]}],
     "birthDate": "1980-02-03", "deceasedBoolean": False, "gender": "female"},
    {"resourceType": "CarePlan", "status": "active", "intent": "plan",
     "subject": {"reference": "Patient/p1"}, "period": {"start": "2025-01-01"},
     "activity": [{"reference": {"reference": "Task/t1"}}]},
]


@pytest.mark.parametrize("resource", SKIPPING_EXAMPLES,
                         ids=[r["resourceType"] for r in SKIPPING_EXAMPLES])
def test_skipping_absent_elements_changes_no_index_row(
        resource: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Parameters whose elements are absent are skipped; choice elements (value[x],
    effective[x], deceased[x]) never are."""
    skipped = index_rows(resource)
    monkeypatch.setattr(indexing, "_index_plan", lambda resource_type: tuple(
        (param, None) for param in indexed_params(resource_type)))
    assert skipped == index_rows(resource)
    assert any(skipped[kind] for kind in skipped)


def test_roots_of_expressions() -> None:
    assert roots("Task.for.reference") == {"for"}
    assert roots("Observation.value as Quantity") is None  # not compiled: could be anywhere
    assert roots("(Observation.value as Quantity) | Observation.component.value") == {
        "value", "component"}
    assert roots("Task.for.where(resolve() is Patient)") == {"for"}
