"""Subscription topics: SubscriptionTopic resources, compiled into what matching needs.

A topic says which changes are events (`resourceTrigger`: a resource type, the
interactions, query criteria on the previous and current versions, a FHIRPath criterion
over `%previous` and `%current`), which filters a Subscription may add (`canFilterBy`)
and what a notification carries beside the changed resource (`notificationShape`).
https://hl7.org/fhir/R4B/subscriptiontopic.html

Topics are data: the shipped ones (shipped_topics/*.json) are stored at start-up, and a user may
add their own with a POST; a topic that cannot be compiled is refused when written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import fhirpathpy
from fhirpathpy.models import models as fhirpath_models

from gateway import fhir
from gateway.errors import InvalidError, Issue, UnprocessableError
from gateway.store import search_query as sq
from gateway.store.search_params import params_for
from mappings.fhirpath_syntax import syntax_error

SHIPPED = Path(__file__).parent / "shipped_topics"
STRUCTURE = "http://hl7.org/fhir/StructureDefinition/"
INTERACTIONS = frozenset({"create", "update", "delete"})


class TopicError(UnprocessableError):
    """A SubscriptionTopic the server could not run (422 when written)."""


@dataclass(frozen=True)
class Trigger:
    resource_type: str
    interactions: frozenset[str]
    previous: tuple[tuple[str, str], ...] | None  # search criteria on the version before
    current: tuple[tuple[str, str], ...] | None  # … and on the version written
    passes_without_previous: bool  # resultForCreate: the previous test on a create
    passes_without_current: bool  # resultForDelete: the current test on a delete
    require_both: bool
    fhirpath: str | None


@dataclass(frozen=True)
class Topic:
    url: str
    title: str
    triggers: tuple[Trigger, ...]
    filters: dict[str, frozenset[str]]  # resource type -> parameters a filter may use
    includes: dict[str, tuple[str, ...]]  # resource type -> "Type:param" of the context

    def triggers_for(self, resource_type: str) -> list[Trigger]:
        return [t for t in self.triggers if t.resource_type == resource_type]

    @property
    def resource_types(self) -> frozenset[str]:
        return frozenset(t.resource_type for t in self.triggers)


def shipped_topics() -> list[dict[str, Any]]:
    return [json.loads(path.read_text(encoding="utf-8"))
            for path in sorted(SHIPPED.glob("*.json"))]


def _type_of(url: Any, where: str) -> str:
    name = url.removeprefix(STRUCTURE) if isinstance(url, str) else ""
    if not fhir.is_resource_type(name):
        raise _error(f"{url!r} is not a resource type this server serves "
                     f"(write {STRUCTURE}Task, for instance)", where)
    return name


def _criteria(raw: Any, resource_type: str, where: str) -> tuple[tuple[str, str], ...] | None:
    if raw is None:
        return None
    pairs = tuple(parse_qsl(str(raw).removeprefix(f"{resource_type}?"),
                            keep_blank_values=True))
    check_criteria(resource_type, pairs, where)
    return pairs


def check_criteria(resource_type: str, pairs: tuple[tuple[str, str], ...] | list[tuple[str, str]],
                   where: str) -> None:
    """Criteria tested on one resource alone: no chains, _has or result parameters."""
    for name, _ in pairs:
        if "." in name or name.startswith(("_has", "_include", "_revinclude", "_sort",
                                           "_count", "_summary", "_elements", "_total")):
            raise _error(f"'{name}' cannot be tested on one resource: use the type's own "
                         "search parameters", where)
    try:
        sq.parse(resource_type, list(pairs), lenient=False, default_count=1, max_count=1)
    except InvalidError as exc:
        raise _error(f"{exc.diagnostics}", where) from exc


@lru_cache(maxsize=256)
def compiled_fhirpath(expression: str) -> Any:
    return fhirpathpy.compile(expression, model=fhirpath_models["r4"])


def _fhirpath(raw: Any, where: str) -> str | None:
    if raw is None:
        return None
    if (problem := syntax_error(str(raw))) is not None:
        raise _error(f"FHIRPath {raw!r} does not parse: {problem}", where)
    return str(raw)


def _trigger(raw: dict[str, Any], where: str) -> Trigger:
    resource_type = _type_of(raw.get("resource"), f"{where}.resource")
    interactions = frozenset(raw.get("supportedInteraction") or INTERACTIONS)
    if not interactions <= INTERACTIONS:
        raise _error(f"supportedInteraction may hold {', '.join(sorted(INTERACTIONS))}",
                     f"{where}.supportedInteraction")
    query = raw.get("queryCriteria") or {}
    return Trigger(
        resource_type, interactions,
        _criteria(query.get("previous"), resource_type, f"{where}.queryCriteria.previous"),
        _criteria(query.get("current"), resource_type, f"{where}.queryCriteria.current"),
        query.get("resultForCreate", "test-passes") == "test-passes",
        query.get("resultForDelete", "test-passes") == "test-passes",
        bool(query.get("requireBoth", False)),
        _fhirpath(raw.get("fhirPathCriteria"), f"{where}.fhirPathCriteria"))


def _filters(topic: dict[str, Any], triggered: set[str]) -> dict[str, frozenset[str]]:
    filters: dict[str, set[str]] = {}
    for n, item in enumerate(topic.get("canFilterBy", [])):
        where = f"SubscriptionTopic.canFilterBy[{n}]"
        resource_type = _type_of(item.get("resource", ""), f"{where}.resource") if (
            item.get("resource", "").startswith(STRUCTURE)) else item.get("resource")
        if resource_type not in triggered:
            raise _error(f"canFilterBy names {resource_type!r}, which no trigger of this "
                         "topic is about", f"{where}.resource")
        name = item.get("filterParameter")
        if name not in params_for(resource_type):
            raise _error(f"{resource_type} has no search parameter {name!r}",
                         f"{where}.filterParameter")
        filters.setdefault(resource_type, set()).add(name)
    return {k: frozenset(v) for k, v in filters.items()}


def _includes(topic: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    includes: dict[str, tuple[str, ...]] = {}
    for n, shape in enumerate(topic.get("notificationShape", [])):
        resource_type = shape.get("resource", "").removeprefix(STRUCTURE)
        for m, include in enumerate(shape.get("include", [])):
            source, _, name = include.partition(":")
            param = params_for(source).get(name) if source == resource_type else None
            if param is None or param.type != "reference":
                raise _error(f"include {include!r} is not a reference parameter of "
                             f"{resource_type}", f"SubscriptionTopic.notificationShape[{n}]"
                                                 f".include[{m}]")
        includes[resource_type] = tuple(shape.get("include", []))
    return includes


def compile_topic(topic: dict[str, Any]) -> Topic:
    """The topic as matching uses it; TopicError (422) says what cannot be run."""
    url = topic.get("url")
    if not url:
        raise _error("A SubscriptionTopic needs a url: Subscriptions name it by that",
                     "SubscriptionTopic.url")
    triggers = tuple(_trigger(raw, f"SubscriptionTopic.resourceTrigger[{n}]")
                     for n, raw in enumerate(topic.get("resourceTrigger", [])))
    if not triggers:
        raise _error("A SubscriptionTopic needs at least one resourceTrigger (event "
                     "triggers are not supported)", "SubscriptionTopic.resourceTrigger")
    triggered = {t.resource_type for t in triggers}
    return Topic(url, topic.get("title") or url, triggers, _filters(topic, triggered),
                 _includes(topic))


def _error(message: str, where: str) -> TopicError:
    return TopicError(message, issues=[Issue("processing", message, expression=(where,))])
