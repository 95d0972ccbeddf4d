"""Parsing FHIR search query strings into criteria and result controls (no database)."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidError, NotSupportedError
from gateway.store.search_query import (
    Criterion,
    Include,
    RangeValue,
    RefValue,
    SearchQuery,
    TokenValue,
    parse,
    parse_criterion,
    parse_number,
    parse_quantity,
    parse_reference,
    parse_token,
)
from gateway.store.timeparse import date_range

OWNER_TARGETS = ("Organization", "Patient")


def task_query(*pairs: tuple[str, str], lenient: bool = False) -> SearchQuery:
    return parse("Task", list(pairs), lenient=lenient, default_count=20, max_count=100)


@pytest.mark.parametrize(("raw", "value"), [
    ("ready", TokenValue(None, "ready")),
    ("urn:s|a", TokenValue("urn:s", "a")),
    ("|a", TokenValue("", "a")),
    ("urn:s|", TokenValue("urn:s", None)),
    ("urn:s|a\\|b", TokenValue("urn:s", "a|b")),
])
def test_parse_token(raw: str, value: TokenValue) -> None:
    assert parse_token(raw) == value


def test_parse_token_with_two_pipes_is_malformed() -> None:
    with pytest.raises(InvalidError, match="Malformed token 'a|b|c'"):
        parse_token("a|b|c")


@pytest.mark.parametrize(("raw", "value"), [
    ("100", RangeValue("eq", 99.5, 100.5)),
    ("100.0", RangeValue("eq", 99.95, 100.05)),
    ("1e2", RangeValue("eq", 95, 105)),
    ("1.5E2", RangeValue("eq", 149.5, 150.5)),
    ("2.50e-1", RangeValue("eq", 0.24995, 0.25005)),
    ("ne5", RangeValue("ne", 4.5, 5.5)),
    ("gt5.25", RangeValue("gt", 5.25, 5.25)),
    ("le-3", RangeValue("le", -3, -3)),
    ("ap10", RangeValue("ap", 10, 10)),
])
def test_parse_number_gives_the_implicit_range_for_equality(raw: str,
                                                            value: RangeValue) -> None:
    assert parse_number(raw) == value


@pytest.mark.parametrize("raw", ["", "abc", "NaN", "Infinity", "1e400", "eq", "1,5"])
def test_parse_number_rejects_what_is_not_a_finite_decimal(raw: str) -> None:
    with pytest.raises(InvalidError, match="Malformed number"):
        parse_number(raw)


def test_parse_quantity_with_and_without_units() -> None:
    assert parse_quantity("5.4|http://unitsofmeasure.org|mg") == RangeValue(
        "eq", 5.35, 5.45, "http://unitsofmeasure.org", "mg")
    assert parse_quantity("gt5||mg") == RangeValue("gt", 5, 5, None, "mg")
    assert parse_quantity("5") == RangeValue("eq", 4.5, 5.5)
    with pytest.raises(InvalidError, match="Malformed quantity"):
        parse_quantity("5|mg")


@pytest.mark.parametrize(("raw", "targets", "modifier", "value"), [
    ("Patient/1", OWNER_TARGETS, None, RefValue("Patient", "1")),
    ("Patient/1/_history/2", OWNER_TARGETS, None, RefValue("Patient", "1")),
    ("1", ("Patient",), None, RefValue("Patient", "1")),
    ("1", OWNER_TARGETS, None, RefValue(None, "1")),
    ("1", OWNER_TARGETS, "Organization", RefValue("Organization", "1")),
    ("http://x.org/fhir/Patient/1/_history/2", OWNER_TARGETS, None,
     RefValue("Patient", "1", "http://x.org/fhir/Patient/1")),
    ("http://x.org/plans/7", OWNER_TARGETS, None, RefValue(None, None, "http://x.org/plans/7")),
    ("urn:uuid:1", OWNER_TARGETS, None, RefValue(None, None, "urn:uuid:1")),
])
def test_parse_reference(raw: str, targets: tuple[str, ...], modifier: str | None,
                         value: RefValue) -> None:
    assert parse_reference(raw, targets, modifier) == value


@pytest.mark.parametrize(("raw", "message"), [
    ("Nope/1", "Unknown resource type in reference 'Nope/1'"),
    ("a/b/c", "Malformed reference 'a/b/c'"),
])
def test_parse_reference_rejects_malformed_values(raw: str, message: str) -> None:
    with pytest.raises(InvalidError, match=message):
        parse_reference(raw, OWNER_TARGETS, None)


def test_criteria_of_each_type() -> None:
    query = task_query(("status", "ready,completed"), ("authored-on", "ge2024-03"),
                       ("owner:Organization", "o1"), ("business-status:text", "a\\,b"),
                       ("_id", "t1,t2"))
    low, high = date_range("2024-03") or (0, 0)
    assert query.criteria[0] == Criterion(
        "status", "token", None, (TokenValue(None, "ready"), TokenValue(None, "completed")))
    assert query.criteria[1] == Criterion("authored-on", "date", None,
                                          (RangeValue("ge", low, high),))
    assert query.criteria[2] == Criterion("owner", "reference", "Organization",
                                          (RefValue("Organization", "o1"),))
    assert query.criteria[3].values == ("a,b",)
    assert query.criteria[4] == Criterion("_id", "special", None, ("t1", "t2"))


def test_missing_takes_a_boolean() -> None:
    assert task_query(("owner:missing", "true")).criteria[0].values == (True,)
    with pytest.raises(InvalidError, match="owner:missing takes true or false"):
        task_query(("owner:missing", "yes"))


def test_chain_parses_against_the_target_type() -> None:
    [criterion] = task_query(("patient.identifier", "urn:x|1")).criteria
    assert criterion == Criterion("patient", "reference", None, (), chain=(
        "Patient", Criterion("identifier", "token", None, (TokenValue("urn:x", "1"),))))


def test_has_parses_against_the_referring_type() -> None:
    [criterion] = parse("Patient", [("_has:Task:patient:status", "ready")], lenient=False,
                        default_count=20, max_count=100).criteria
    assert criterion.has == ("Task", "patient",
                             Criterion("status", "token", None, (TokenValue(None, "ready"),)))


def test_result_controls() -> None:
    query = task_query(("_count", "500"), ("_sort", "-authored-on,_id"),
                       ("_include", "Task:patient,Task:owner:Organization"),
                       ("_include:iterate", "CarePlan:subject"), ("_revinclude", "Task:part-of"),
                       ("_summary", "data"), ("_elements", "status, code"),
                       ("_total", "accurate"), ("_cursor", "abc"), ("_format", "json"))
    assert query.count == 100
    assert query.sort == [("authored-on", True), ("_id", False)]
    assert query.includes == [Include("Task", "patient", None, False),
                              Include("Task", "owner", "Organization", False),
                              Include("CarePlan", "subject", None, True)]
    assert query.revincludes == [Include("Task", "part-of", None, False)]
    assert (query.summary, query.elements, query.total) == ("data", ["status", "code"],
                                                            "accurate")
    assert query.cursor == "abc"
    assert ("_cursor", "abc") not in query.raw and ("_count", "500") in query.raw


def test_summary_false_means_no_summary() -> None:
    assert task_query(("_summary", "false")).summary is None


@pytest.mark.parametrize(("pair", "error", "message"), [
    (("colour", "red"), InvalidError, "Unknown search parameter 'colour' for Task"),
    (("status:exact", "x"), NotSupportedError, "Modifier :exact is not supported"),
    (("status", ""), InvalidError, "Search parameter 'status' has no value"),
    (("_sort", "owner"), InvalidError, "Cannot sort by 'owner'"),
    (("_count", "-1"), InvalidError, "_count must be a non-negative integer"),
    (("_filter", "x"), NotSupportedError, "Search parameter '_filter' is not supported"),
    (("patient.organization.name", "x"), NotSupportedError, "only one level of chaining"),
    (("subject.name", "x"), InvalidError, "ambiguous"),
    (("_include", "Task"), InvalidError, "Malformed _include 'Task'"),
])
def test_malformed_queries_raise(pair: tuple[str, str], error: type[Exception],
                                 message: str) -> None:
    with pytest.raises(error, match=message):
        task_query(pair)


def test_lenient_parsing_drops_and_reports_bad_criteria_but_not_bad_controls() -> None:
    query = task_query(("colour", "red"), ("status", "ready"), lenient=True)
    assert [c.name for c in query.criteria] == ["status"]
    assert query.raw == [("status", "ready")]
    [issue] = query.ignored
    assert (issue.severity, issue.code, issue.expression) == ("warning", "invalid", ("colour",))
    with pytest.raises(InvalidError):
        task_query(("_count", "x"), lenient=True)


def test_system_level_search_takes_only_parameters_of_every_resource() -> None:
    query = parse(None, [("_id", "a"), ("_tag", "urn:t|x")], lenient=False, default_count=20,
                  max_count=100)
    assert [c.name for c in query.criteria] == ["_id", "_tag"]
    with pytest.raises(InvalidError, match="'status' needs a resource type"):
        parse(None, [("status", "ready")], lenient=False, default_count=20, max_count=100)


def test_parse_criterion_reads_a_zone_offset_whose_plus_became_a_space() -> None:
    criterion = parse_criterion("Task", "authored-on", "2024-03-01T10:00:00 02:00")
    assert criterion.values == (RangeValue("eq", *(date_range("2024-03-01T10:00:00+02:00")
                                                   or (0, 0))),)
