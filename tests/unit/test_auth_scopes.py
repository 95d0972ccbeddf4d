"""SMART system scopes: v2 and v1 syntax, and narrowing to a registration."""

from __future__ import annotations

import pytest

from gateway.auth.scopes import Scope, ScopeError, narrow, parse_scope, parse_scopes, render


@pytest.mark.parametrize(("text", "scope"), [
    ("system/Task.rs", Scope("Task", "rs")),
    ("system/*.cruds", Scope("*", "cruds")),
    ("system/Task.c", Scope("Task", "c")),
    ("system/Task.read", Scope("Task", "rs")),  # v1
    ("system/Task.write", Scope("Task", "cud")),  # v1
    ("system/*.*", Scope("*", "cruds")),  # v1
])
def test_scopes_read_in_both_syntaxes(text: str, scope: Scope) -> None:
    assert parse_scope(text) == scope


@pytest.mark.parametrize("text", ["user/Task.rs", "patient/*.read", "system/Task.sr",
                                  "system/Task.rr", "system/task.rs", "system/Task.",
                                  "launch", "system/Task.x"])
def test_other_scopes_are_refused(text: str) -> None:
    with pytest.raises(ScopeError):
        parse_scope(text)


@pytest.mark.parametrize(("asked", "allowed", "granted"), [
    ("system/Task.cruds", "system/Task.rs", "system/Task.rs"),
    ("system/*.rs", "system/Task.cruds system/Specimen.r",
     "system/Specimen.r system/Task.rs"),
    ("system/Task.rs", "system/*.cruds", "system/Task.rs"),
    ("system/*.cruds", "system/*.rs", "system/*.rs"),
    ("system/Patient.rs", "system/Task.rs", ""),
    ("system/Task.c system/Task.s", "system/Task.cruds", "system/Task.cs"),
])
def test_narrowing_never_grants_more_than_allowed(asked: str, allowed: str,
                                                  granted: str) -> None:
    assert render(narrow(parse_scopes(asked), parse_scopes(allowed))) == granted
