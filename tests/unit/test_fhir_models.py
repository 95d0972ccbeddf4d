"""gateway.fhir's checks that stand in for two of fhir_core's validators (nulls in lists
of complex elements; required primitives and choice elements of a built element):
installed in every model, and answering exactly as fhir_core's would."""

from __future__ import annotations

from typing import Any

import pytest
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from pydantic import ValidationError

from gateway import fhir

TASK = {"resourceType": "Task", "status": "ready", "intent": "order"}
# fhir_core's own validators, as its base model still holds them.
FHIR_CORE = {name: decorator.func for name, decorator
             in FHIRAbstractModel.__pydantic_decorators__.model_validators.items()}
GATEWAY = {fhir._NULL_CHECK: fhir._reject_null_complex_elements,
           fhir._AFTER_CHECK: fhir._validate_after_model_construction}


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


def _answer(check: Any, *args: Any) -> Any:
    """What a check does with its arguments: returns the last, or raises these errors."""
    try:
        return ("returned", check(*args) is args[-1])
    except ValidationError as exc:
        return ("raised", exc.title, exc.errors(include_url=False))
    except ValueError as exc:
        return ("raised", str(exc))


def test_every_model_of_a_task_and_its_elements_runs_the_gateways_checks() -> None:
    models = _models_reachable_from("Task")

    assert len(models) > 20  # Task, Reference, CodeableConcept, Coding, Period, Annotation…
    for model in models:
        for name, check in GATEWAY.items():
            func = model.__pydantic_decorators__.model_validators[name].func
            assert getattr(func, "__func__", func) is check, (model, name)


@pytest.mark.parametrize("resource_type", sorted(fhir.r4_resource_types()))
def test_null_check_answers_as_fhir_cores_for_every_list_of_every_resource(
        resource_type: str) -> None:
    model = fhir._model(resource_type)
    for name, field in model.model_fields.items():
        key = field.alias or name
        for value in ([None], [{}, None], [{}], [], None):
            data = {key: value}
            assert (_answer(fhir._reject_null_complex_elements, model, data)
                    == _answer(FHIR_CORE[fhir._NULL_CHECK].__func__, model, data)), (key, value)


@pytest.mark.parametrize("resource_type", sorted(fhir.r4_resource_types()))
def test_after_check_answers_as_fhir_cores_for_every_resource(resource_type: str) -> None:
    model = fhir._model(resource_type)
    empty = model.model_construct()
    required = [name for name, _ in empty.get_required_fields()]
    choices = list(empty.get_one_of_many_fields().values())
    given = {name: "x" for name in required}
    elements = [
        model.model_construct(),  # every required element missing
        model.model_construct(**given),
        *(model.model_construct(**{**given, name: None}) for name in required),
        *(model.model_construct(**given, **{names[0]: "x"}) for names in choices),
        *(model.model_construct(**given, **{names[0]: "x", names[1]: "y"})
          for names in choices if len(names) > 1),  # two types of one choice element
    ]
    for element in elements:
        assert (_answer(fhir._validate_after_model_construction, element)
                == _answer(FHIR_CORE[fhir._AFTER_CHECK], element)), element


def test_null_in_a_list_of_codings_is_rejected_and_one_in_a_list_of_strings_is_kept() -> None:
    with_null_coding = {**TASK, "code": {"coding": [{"code": "a"}, None]}}
    with_null_given = {"resourceType": "Patient", "name": [{
        "given": [None, "Ada"], "_given": [{"extension": [
            {"url": "http://example.org/why", "valueString": "unknown"}]}, None]}]}

    assert fhir.validate(with_null_coding) == [fhir.Issue(
        "invalid", "None is not allowed as an element of coding",
        expression=("Task.code.coding",))]
    assert fhir.validate(with_null_given) == []


def test_required_primitive_may_be_replaced_by_an_extension_but_not_left_out() -> None:
    why = {"extension": [{"url": "http://example.org/why", "valueString": "unknown"}]}

    assert fhir.validate({**TASK, "status": None, "_status": why}) == []
    assert fhir.validate({"resourceType": "Task", "intent": "order"}) == [fhir.Issue(
        "invalid", "Value for the field 'status' is required.", expression=("Task.status",))]


def test_two_types_of_one_choice_element_are_rejected() -> None:
    given = {**TASK, "input": [{"type": {"text": "dose"}, "valueString": "5",
                                "valueInteger": 5}]}

    [issue] = fhir.validate(given)

    assert issue.expression == ("Task.input[0]",)
    assert "but got multiple" in issue.diagnostics
