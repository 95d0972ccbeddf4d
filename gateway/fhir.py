"""The one module that imports fhir.resources: R4B models, used to validate R4 resources.

We speak FHIR R4 (4.0.1) on the wire; the R4B models are identical to R4 for the
resources this product uses. Models are imported lazily, one resource type at a time.
"""

from __future__ import annotations

import datetime
import decimal
import json
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from fhir.resources.R4B import get_fhir_model_class
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from fhir_core.utils import is_list_type, is_primitive_type
from pydantic import ValidationError

from gateway.errors import Issue

FHIR_VERSION = "4.0.1"
_TABLE = Path(__file__).parent / "r4_definitions.json"


# R4B's SubscriptionTopic, served beside the R4 types as the Subscriptions Backport IG
# allows (https://hl7.org/fhir/uv/subscriptions-backport/STU1.1/): topics are what a
# Subscription's `criteria` names. Its search parameters are R4B's.
ADDED_TYPES: dict[str, dict[str, dict[str, Any]]] = {
    "SubscriptionTopic": {
        "url": {"expression": "SubscriptionTopic.url", "type": "uri"},
        "version": {"expression": "SubscriptionTopic.version", "type": "token"},
        "status": {"expression": "SubscriptionTopic.status", "type": "token"},
        "title": {"expression": "SubscriptionTopic.title", "type": "string"},
        "resource": {"expression": "SubscriptionTopic.resourceTrigger.resource",
                     "type": "uri"},
        "derived-or-self": {"expression": "SubscriptionTopic.url | "
                            "SubscriptionTopic.derivedFrom", "type": "uri"},
    },
}


@cache
def definitions() -> dict[str, Any]:
    """Resource types, search parameters and required codes of FHIR R4 (generated table),
    with the types of ADDED_TYPES."""
    table = json.loads(_TABLE.read_text())
    for name, params in ADDED_TYPES.items():
        table["params"][name] = params
        if name not in table["resourceTypes"]:
            table["resourceTypes"].append(name)
    return table  # type: ignore[no-any-return]


# fhir_core validates every element of a payload with two validators of its base model
# that redo, element by element, work that depends only on the element's model: which of
# its ~30 fields are lists of complex elements (for nulls in them: ~40% of a Task's model
# validation), and which fields are required (a mapping of every field's alias each
# time). Below, each is replaced by the same check with that work done once per model,
# which hands over to fhir_core's own code wherever a check can fail, so that the errors
# are fhir_core's. They are installed before any model class exists: models pick up
# their base's validators by name when they are built.
_NULL_CHECK = "reject_null_complex_elements"
_AFTER_CHECK = "validate_after_model_construction"
_fhir_core_null_check = FHIRAbstractModel.reject_null_complex_elements.__func__  # type: ignore[attr-defined]


@cache
def _complex_lists(model: Any) -> tuple[tuple[str, str | None], ...]:
    """(field name, alias) of each list of complex elements of a model, as fhir_core picks
    them (its `<name>__ext` lists of primitive extensions keep their nulls)."""
    return tuple((name, field.alias) for name, field in model.model_fields.items()
                 if is_list_type(field) and not is_primitive_type(field)
                 and not name.endswith("__ext"))


def _reject_null_complex_elements(model: Any, data: Any) -> Any:
    """fhir_core's check, asked of the lists that can fail it only: it rejects data if and
    only if fhir_core's does, with fhir_core's errors."""
    if isinstance(data, dict):
        for name, alias in _complex_lists(model):
            value = data.get(alias if alias and alias in data else name)
            if isinstance(value, list) and any(item is None for item in value):
                return _fhir_core_null_check(model, data)  # raises, naming every null
    return data


@cache
def _after_checks(model: Any) -> tuple[tuple[str, ...], bool]:
    """(field names of the required primitives, whether there are choice elements) of a
    model: fhir_core's lists, the same for every element of it, asked of an empty one."""
    empty = model.model_construct()
    field_names = empty.get_alias_mapping()
    return (tuple(field_names[name] for name, _ in empty.get_required_fields()),
            bool(empty.get_one_of_many_fields()))


def _validate_after_model_construction(element: Any) -> Any:
    """fhir_core's checks of a built element, in its order: each required primitive has a
    value or an extension in its place (checked by fhir_core when one has no value), and
    at most one type of each choice element (value[x]) is given."""
    required, has_choices = _after_checks(element.__class__)
    if any(getattr(element, name) is None for name in required):
        element._validate_required_primitive_elements()
    if has_choices:
        element._validate_one_of_many()
    return element


setattr(FHIRAbstractModel, _NULL_CHECK, classmethod(_reject_null_complex_elements))
setattr(FHIRAbstractModel, _AFTER_CHECK, _validate_after_model_construction)


_ABSTRACT_TYPES = frozenset({"Resource", "DomainResource"})


@cache
def r4_resource_types() -> frozenset[str]:
    """The concrete R4 resource types that also have an R4B model (those we can validate).

    Only codes of R4's ResourceType value set count: the table also lists R4B's
    SubscriptionStatus, which an R4 client cannot use, and abstract DomainResource."""
    r4_codes = {*definitions()["requiredCodes"]["CapabilityStatement.rest.resource.type"],
                *ADDED_TYPES}
    return frozenset(n for n in definitions()["resourceTypes"]
                     if n in r4_codes and n not in _ABSTRACT_TYPES and _has_model(n))


def _has_model(resource_type: str) -> bool:
    """Whether R4B has a model of this type, asked without importing the model: importing
    all ~145 took every process 3.7 s at start-up (each `atm` command, each server)."""
    from fhir.resources.R4B import fhirtypes

    return hasattr(fhirtypes, resource_type + "Type")


@cache
def _required_codes(resource_type: str) -> tuple[tuple[tuple[str, ...], frozenset[str]], ...]:
    prefix = resource_type + "."
    return tuple(
        (tuple(path[len(prefix):].split(".")), frozenset(codes))
        for path, codes in definitions()["requiredCodes"].items()
        if path.startswith(prefix)
    )


def _values_at(node: Any, path: tuple[str, ...], where: str) -> list[tuple[str, Any]]:
    if not path:
        return [(where, node)]
    found: list[tuple[str, Any]] = []
    items = node if isinstance(node, list) else [node]
    for index, item in enumerate(items):
        at = f"{where}[{index}]" if isinstance(node, list) else where
        if isinstance(item, dict) and path[0] in item:
            found.extend(_values_at(item[path[0]], path[1:], f"{at}.{path[0]}"))
    return found


def _check_required_codes(resource: dict[str, Any]) -> list[Issue]:
    """Codes bound to a required value set (Task.status…) must come from that value set."""
    issues = []
    for path, allowed in _required_codes(resource["resourceType"]):
        for where, value in _values_at(resource, path, resource["resourceType"]):
            for code in value if isinstance(value, list) else [value]:
                if isinstance(code, str) and code not in allowed:
                    issues.append(Issue(
                        "code-invalid", f"'{code}' is not one of: {', '.join(sorted(allowed))}",
                        expression=(where,)))
    return issues


@cache
def _model(resource_type: str) -> Any:
    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError, ImportError, AttributeError):
        return None


def is_resource_type(name: str) -> bool:
    return name in r4_resource_types()


def _expression(resource_type: str, loc: tuple[int | str, ...]) -> str:
    parts = [resource_type]
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]"
        elif item not in ("__root__",) and not item.startswith("function-"):
            parts.append(str(item))
    return ".".join(parts)


# The models coerce lax input (authoredOn: 123 → 1970-01-01, valueBoolean: "true" → True),
# but FHIR JSON fixes each primitive's JSON type: https://hl7.org/fhir/R4/json.html#primitive
_JSON_KINDS: dict[type, tuple[type, ...]] = {
    bool: (bool,), int: (int,), decimal.Decimal: (int, float, decimal.Decimal),
    str: (str,), datetime.datetime: (str,), datetime.date: (str,), datetime.time: (str,),
    bytes: (str,),
}
_JSON_NAMES = {bool: "boolean", int: "integer", decimal.Decimal: "number"}


@cache
def _field_kinds(model: Any) -> dict[str, Any]:
    """JSON name → python base type (primitives) or element model, for one model class."""
    kinds: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        kind = info.annotation
        while typing.get_origin(kind) in (typing.Union, types.UnionType, list, typing.Annotated):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        kinds[info.alias or name] = kind.get_model_klass() if hasattr(
            kind, "get_model_klass") else kind
    return kinds


class _JsonKind(NamedTuple):
    """What one element of a model may be in JSON: a primitive's JSON types (None for a
    complex element), whether it is a boolean, the JSON type's name for messages, and a
    complex element's model."""

    types: tuple[type, ...] | None
    boolean: bool
    name: str
    element: Any


@cache
def _json_kinds(model: Any) -> dict[str, _JsonKind]:
    """JSON name → its _JsonKind, for the elements of one model class that are checked
    (primitives and complex elements), worked out once per model."""
    kinds = {}
    for name, kind in _field_kinds(model).items():
        if isinstance(kind, type) and kind in _JSON_KINDS:
            kinds[name] = _JsonKind(_JSON_KINDS[kind], kind is bool,
                                    _JSON_NAMES.get(kind, "string"), None)
        elif hasattr(kind, "model_fields"):
            kinds[name] = _JsonKind(None, False, "object", kind)
    return kinds


def _check_json_types(node: dict[str, Any], model: Any, where: str) -> list[Issue]:
    named = node.get("resourceType")
    if isinstance(named, str) and named != model.__name__:
        model = _model(named) or model  # contained, Bundle.entry.resource
    kinds = _json_kinds(model)
    issues: list[Issue] = []
    for key, value in node.items():
        kind = kinds.get(key)
        if kind is None:
            continue
        many = isinstance(value, list)
        for index, item in enumerate(value if many else (value,)):
            if kind.types is not None:
                bad = isinstance(item, bool) and not kind.boolean
                if item is not None and (bad or not isinstance(item, kind.types)):
                    issues.append(Issue("invalid", f"Expected a JSON {kind.name}",
                                        expression=(_location(where, key, index, many),)))
            elif isinstance(item, dict):
                issues.extend(_check_json_types(item, kind.element,
                                                _location(where, key, index, many)))
    return issues


def _location(where: str, key: str, index: int, many: bool) -> str:
    return f"{where}.{key}[{index}]" if many else f"{where}.{key}"


def validate(resource: dict[str, Any]) -> list[Issue]:
    """Validate a resource dict against its model; return one Issue per problem."""
    resource_type = resource.get("resourceType")
    model = _model(resource_type) if isinstance(resource_type, str) else None
    if model is None or resource_type not in r4_resource_types():
        return [Issue("not-supported", f"Unknown resource type '{resource_type}'",
                      expression=("resourceType",))]
    wrong_types = _check_json_types(resource, model, resource_type)
    if wrong_types:
        return wrong_types
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        return [
            Issue("invalid", err["msg"], expression=(_expression(resource_type, err["loc"]),))
            for err in exc.errors(include_url=False, include_context=False, include_input=False)
        ]
    except (ValueError, TypeError) as exc:
        return [Issue("invalid", f"Invalid {resource_type}: {type(exc).__name__}",
                      expression=(resource_type,))]
    return _check_required_codes(resource)


def warm_up(resource_types: tuple[str, ...] = ("Task", "Patient", "CarePlan", "Bundle")) -> None:
    """Import and exercise the hottest models so the first request is not slow."""
    for name in resource_types:
        validate({"resourceType": name})


@cache
def element_names(resource_type: str) -> frozenset[str]:
    """The JSON names of a resource type's elements, choice elements (value[x]) apart:
    those appear only as their typed names (valueQuantity…)."""
    model = _model(resource_type)
    if model is None:
        return frozenset()
    return frozenset(info.alias or name for name, info in model.model_fields.items())


@cache
def element_sets(resource_type: str) -> tuple[frozenset[str], frozenset[str]]:
    """(summary elements, mandatory elements) of a type, as JSON property names."""
    summary, mandatory = set(), set()
    for name, info in _model(resource_type).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        alias = info.alias or name
        if extra.get("summary_element_property"):
            summary.add(alias)
        if extra.get("element_required"):
            mandatory.add(alias)
    return frozenset(summary), frozenset(mandatory)
