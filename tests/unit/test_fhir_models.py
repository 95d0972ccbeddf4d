"""gateway.fhir's check for nulls in lists of complex elements, which stands in for
fhir_core's own: installed in every model, and answering exactly as fhir_core's would."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gateway import fhir

TASK = {"resourceType": "Task", "status": "ready", "intent": "order"}


def _models_reachable_from(resource_type: str) -> set[Any]:
    seen: set[Any] = set()
    todo = [fhir._model(resource_type)]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        todo.extend(kind.element for kind in fhir._json_kinds(model).values()
                    if kind.element is not None)
    return seen


def _answer(check: Any, model: Any, data: dict[str, Any]) -> Any:
    """What a check does with data: returns it, or raises these errors."""
    try:
        return ("returned", check(model, data) is data)
    except ValidationError as exc:
        return ("raised", exc.title, exc.errors(include_url=False))


def test_every_model_of_a_task_and_its_elements_runs_the_gateways_check() -> None:
    models = _models_reachable_from("Task")

    assert len(models) > 20  # Task, Reference, CodeableConcept, Coding, Period, Annotation…
    for model in models:
        decorator = model.__pydantic_decorators__.model_validators[fhir._NULL_CHECK]
        assert decorator.func.__func__ is fhir._reject_null_complex_elements, model


@pytest.mark.parametrize("resource_type", sorted(fhir.r4_resource_types()))
def test_null_check_answers_as_fhir_cores_for_every_list_of_every_resource(
        resource_type: str) -> None:
    model = fhir._model(resource_type)
    for name, field in model.model_fields.items():
        key = field.alias or name
        for value in ([None], [{}, None], [{}], [], None):
            data = {key: value}
            assert (_answer(fhir._reject_null_complex_elements, model, data)
                    == _answer(fhir._fhir_core_null_check, model, data)), (key, value)


def test_null_in_a_list_of_codings_is_rejected_and_one_in_a_list_of_strings_is_kept() -> None:
    with_null_coding = {**TASK, "code": {"coding": [{"code": "a"}, None]}}
    with_null_given = {"resourceType": "Patient", "name": [{
        "given": [None, "Ada"], "_given": [{"extension": [
            {"url": "http://example.org/why", "valueString": "unknown"}]}, None]}]}

    assert fhir.validate(with_null_coding) == [fhir.Issue(
        "invalid", "None is not allowed as an element of coding",
        expression=("Task.code.coding",))]
    assert fhir.validate(with_null_given) == []
