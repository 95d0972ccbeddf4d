"""The FHIRPath subset of search-parameter definitions, compiled to dict walks."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.store.fhirpath import Value, compile_expression, split_union


def values(expression: str, resource: dict[str, Any]) -> list[Any]:
    return [v.value for v in compile_expression(expression)(resource)]


@pytest.mark.parametrize(("expression", "parts"), [
    ("Task.status", ["Task.status"]),
    ("Organization.name | Organization.alias", ["Organization.name", "Organization.alias"]),
    ("(Observation.value as Quantity) | (Observation.value as SampledData)",
     ["(Observation.value as Quantity)", "(Observation.value as SampledData)"]),
    ("Patient.telecom.where(system='a|b') | Patient.name",
     ["Patient.telecom.where(system='a|b')", "Patient.name"]),
    ("A.b.where(x = (1 | 2)) | A.c", ["A.b.where(x = (1 | 2))", "A.c"]),
])
def test_split_union_splits_only_at_top_level(expression: str, parts: list[str]) -> None:
    assert split_union(expression) == parts


PATIENT = {"resourceType": "Patient",
           "name": [{"family": "Durand", "given": ["Élodie", "Anne"]}, {"family": "Roux"}],
           "telecom": [{"system": "phone", "value": "0102"},
                       {"system": "email", "value": "e@example.org"}],
           "deceasedDateTime": "2020-01-02"}


def test_plain_path_flattens_lists_in_document_order() -> None:
    assert values("Patient.name.family", PATIENT) == ["Durand", "Roux"]
    assert values("Patient.name.given", PATIENT) == ["Élodie", "Anne"]
    assert values("Patient.photo", PATIENT) == []


def test_union_concatenates_both_sides() -> None:
    org = {"resourceType": "Organization", "name": "North", "alias": ["N1", "N2"]}
    assert values("Organization.name | Organization.alias", org) == ["North", "N1", "N2"]


def test_choice_element_resolves_to_its_typed_name() -> None:
    observation = {"resourceType": "Observation", "valueQuantity": {"value": 5}}
    assert values("Observation.value", observation) == [{"value": 5}]


def test_choice_resolution_ignores_elements_that_merely_share_a_prefix() -> None:
    task = {"resourceType": "Task", "statusReason": {"text": "why"}}
    assert values("Task.status", task) == []


@pytest.mark.parametrize("expression", ["(Observation.value as Quantity)",
                                        "Observation.value.as(Quantity)"])
def test_as_cast_keeps_only_the_named_type(expression: str) -> None:
    quantity = {"resourceType": "Observation", "valueQuantity": {"value": 5}}
    text = {"resourceType": "Observation", "valueString": "five"}
    assert compile_expression(expression)(quantity) == [Value({"value": 5}, "Quantity")]
    assert compile_expression(expression)(text) == []


def test_as_cast_then_path_reads_inside_the_cast_value() -> None:
    observation = {"resourceType": "Observation",
                   "valueCodeableConcept": {"text": "positive", "coding": []}}
    extract = compile_expression("(Observation.value as CodeableConcept).text")
    assert extract(observation) == [Value("positive", None)]


def test_as_cast_to_date_time_of_a_primitive_choice() -> None:
    assert values("(Patient.deceased as dateTime)", PATIENT) == ["2020-01-02"]
    assert values("(Patient.deceased as dateTime)",
                  {"resourceType": "Patient", "deceasedBoolean": True}) == []


def test_where_resolve_is_keeps_references_of_that_type() -> None:
    task = {"resourceType": "Task", "for": {"reference": "Patient/1"}}
    group = {"resourceType": "Task", "for": {"reference": "Group/1"}}
    absolute = {"resourceType": "Task",
                "for": {"reference": "http://x.org/fhir/Patient/2/_history/3"}}
    typed = {"resourceType": "Task", "for": {"type": "Patient", "identifier": {"value": "9"}}}
    expression = "Task.for.where(resolve() is Patient)"
    assert values(expression, task) == [{"reference": "Patient/1"}]
    assert values(expression, group) == []
    assert values(expression, absolute) == [absolute["for"]]
    assert values(expression, typed) == [typed["for"]]


def test_where_field_equals_literal_filters_elements() -> None:
    assert values("Patient.telecom.where(system='email')", PATIENT) == [
        {"system": "email", "value": "e@example.org"}]
    assert values("Patient.telecom.where(system = 'phone').value", PATIENT) == ["0102"]
    assert values("Patient.telecom.where(system='fax')", PATIENT) == []


def test_other_expressions_fall_back_to_fhirpathpy() -> None:
    expression = "Patient.deceased.exists() and Patient.deceased != false"
    assert values(expression, PATIENT) == [True]
    assert values(expression, {"resourceType": "Patient", "deceasedBoolean": False}) == [False]
    assert values("Patient.name.given.count()", PATIENT) == [2]
