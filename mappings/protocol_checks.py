"""Checks between the parts of a protocol: unique ids, known roles, stage references that
resolve to the right stages, no dependency cycle through `after`, one stage at most
that `assigns` the chain of identity, and one at most that `books` a chain of stages
the protocol has, each step a sibling of the one before it.

Rules from orchestration/PROTOCOLS.md: `after` and `ends-before` name siblings; a loop
exists only through `on-failure`, whose `back-to` names a stage the failing stage depends
on (through `after`, among its siblings or its ancestors' siblings).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise

from mappings.protocol_model import FHIR_ID_LENGTH, ID_PATTERN, Problem, Protocol, Ref, Stage


def check_protocol(protocol: Protocol) -> list[Problem]:
    known = {stage.id for stage in protocol.all_stages() if stage.id}
    problems = [*_duplicates(protocol), *_id_lengths(protocol), *_roles(protocol),
                *_assigns(protocol), *_books(protocol, known)]
    _check_group(protocol.stages, frozenset(), known, problems)
    return problems


def _duplicates(protocol: Protocol) -> Iterable[Problem]:
    first: dict[str, int] = {}
    for stage in protocol.all_stages():
        if stage.id in first:
            yield Problem(stage.line, f"duplicate stage id '{stage.id}' (first at line "
                          f"{first[stage.id]})")
        elif stage.id:
            first[stage.id] = stage.line


def _id_lengths(protocol: Protocol) -> Iterable[Problem]:
    """Each stage's ActivityDefinition id is `<protocol>-<stage>`: a FHIR id, 64 at most."""
    if not ID_PATTERN.fullmatch(protocol.id):
        return
    for stage in protocol.all_stages():
        length = len(protocol.id) + 1 + len(stage.id)
        if ID_PATTERN.fullmatch(stage.id) and length > FHIR_ID_LENGTH:
            yield Problem(stage.line, f"ActivityDefinition id '{protocol.id}-{stage.id}' "
                          f"would have {length} characters (FHIR allows {FHIR_ID_LENGTH}); "
                          "shorten the stage or protocol id")


def _roles(protocol: Protocol) -> Iterable[Problem]:
    codes = [role.code for role in protocol.roles]
    declared = (f"declared roles: {', '.join(codes)}" if codes
                else "the protocol declares no `roles`")
    named: list[tuple[str, Ref | None]] = [("escalation", protocol.escalation)]
    for stage in protocol.all_stages():
        named += [("role", stage.role), ("escalate", stage.escalate)]
    for key, ref in named:
        if ref is not None and ref.name not in codes:
            yield Problem(ref.line, f"`{key}`: unknown role '{ref.name}' ({declared})")


def _assigns(protocol: Protocol) -> Iterable[Problem]:
    """An enrolment has one chain of identity: one stage at most may assign it."""
    first: dict[str, tuple[str, int]] = {}
    for stage in protocol.all_stages():
        ref = stage.assigns
        if ref is None:
            continue
        if ref.name in first:
            other, line = first[ref.name]
            yield Problem(ref.line, f"`assigns`: {ref.name} is already assigned by stage "
                          f"'{other}' (line {line}); only one stage may assign it")
        else:
            first[ref.name] = (stage.id, ref.line)


def _books(protocol: Protocol, known: set[str]) -> Iterable[Problem]:
    """An enrolment books its chain once, so one stage at most may book one; its steps
    name stages of the protocol, at any level, each a sibling of the step before it."""
    parents = _parents(protocol)
    first: tuple[str, int] | None = None
    for stage in protocol.all_stages():
        if stage.books is None:
            continue
        if first is not None:
            yield Problem(stage.books.line, f"`books`: stage '{first[0]}' already books a "
                          f"chain (line {first[1]}); only one stage may book one")
        else:
            first = (stage.id, stage.books.line)
        for step in stage.books.steps:
            if step.stage.name not in known:
                yield Problem(step.stage.line, f"`step`: unknown stage '{step.stage.name}'")
        # A step's lead becomes its action's relatedAction after-start on the previous
        # step's action, and a relatedAction names a sibling.
        for previous, step in pairwise(stage.books.steps):
            names = (previous.stage.name, step.stage.name)
            if all(name in known for name in names) \
                    and parents[names[0]] != parents[names[1]]:
                yield Problem(step.stage.line, "`step`: a chain step's lead runs from the "
                              "previous step, which must be a sibling stage (same parent); "
                              f"'{names[1]}' is not a sibling of '{names[0]}'")


def _parents(protocol: Protocol) -> dict[str, str | None]:
    """Each stage id's parent id (None at the top), the first of duplicates."""
    parents: dict[str, str | None] = {}

    def walk(stages: tuple[Stage, ...], parent: str | None) -> None:
        for stage in stages:
            parents.setdefault(stage.id, parent)
            walk(stage.steps, stage.id)

    walk(protocol.stages, None)
    return parents


@dataclass
class _Group:
    """Siblings by id (the first of duplicates), and each one's `after` siblings."""

    stages: dict[str, Stage] = field(default_factory=dict)
    edges: dict[str, list[Ref]] = field(default_factory=dict)

    def closure(self, stage_id: str) -> set[str]:
        """The siblings `stage_id` comes after, directly or through others."""
        seen: set[str] = set()
        todo = [stage_id]
        while todo:
            for ref in self.edges.get(todo.pop(), []):
                if ref.name not in seen:
                    seen.add(ref.name)
                    todo.append(ref.name)
        return seen


def _check_group(stages: tuple[Stage, ...], outer: frozenset[str], known: set[str],
                 problems: list[Problem]) -> None:
    """One level of siblings, then each one's steps; `outer` holds what the parent
    depends on (at its own level and above), where a sub-stage's back-to may also go."""
    group = _Group()
    for stage in stages:
        group.stages.setdefault(stage.id, stage)
    for stage in (s for s in stages if s.id):
        group.edges[stage.id] = _sibling_refs(stage, group, known, problems)
    problems.extend(_cycles(group))
    for stage in (s for s in stages if s.id):
        depends_on = group.closure(stage.id)
        problems.extend(_ends_before(stage, group, known, depends_on))
        problems.extend(_back_to(stage, depends_on | outer, known))
        _check_group(stage.steps, outer | depends_on, known, problems)


def _sibling_refs(stage: Stage, group: _Group, known: set[str],
                  problems: list[Problem]) -> list[Ref]:
    """The stage's `after` references that name a sibling; the others are reported."""
    refs = []
    for after in stage.after:
        ref = after.stage
        if ref.name == stage.id:
            problems.append(Problem(ref.line, f"`after`: '{stage.id}' cannot come after "
                                    "itself"))
        elif _is_sibling(ref, "after", stage, group, known, problems):
            refs.append(ref)
    return refs


def _is_sibling(ref: Ref, key: str, stage: Stage, group: _Group, known: set[str],
                problems: list[Problem]) -> bool:
    if ref.name in group.stages:
        return True
    if ref.name not in known:
        problems.append(Problem(ref.line, f"`{key}`: unknown stage '{ref.name}'"))
    else:
        problems.append(Problem(ref.line, f"`{key}`: '{ref.name}' is not a sibling of "
                                f"'{stage.id}' (`{key}` names stages with the same parent)"))
    return False


def _ends_before(stage: Stage, group: _Group, known: set[str],
                 depends_on: set[str]) -> list[Problem]:
    if stage.ends_before is None:
        return []
    ref = stage.ends_before.stage
    problems: list[Problem] = []
    if ref.name == stage.id:
        problems.append(Problem(ref.line, f"`ends-before`: '{stage.id}' cannot end before "
                                "itself"))
    elif _is_sibling(ref, "ends-before", stage, group, known, problems) \
            and ref.name in depends_on:
        problems.append(Problem(ref.line, f"`ends-before`: '{stage.id}' comes after "
                                f"'{ref.name}' (through `after`), so it cannot end before it"))
    return problems


def _back_to(stage: Stage, allowed: set[str] | frozenset[str], known: set[str]
             ) -> list[Problem]:
    if stage.on_failure is None:
        return []
    ref = stage.on_failure.back_to
    if ref.name not in known:
        message = f"unknown stage '{ref.name}'"
    elif ref.name == stage.id:
        message = (f"'{ref.name}' is the failing stage itself; name an earlier stage it "
                   "depends on")
    elif ref.name not in allowed:
        message = (f"'{stage.id}' does not depend on '{ref.name}' (back-to names a stage the "
                   "failing stage comes after, among its siblings or its parents' siblings)")
    else:
        return []
    return [Problem(ref.line, f"`on-failure.back-to`: {message}")]


def _cycles(group: _Group) -> list[Problem]:
    """One problem per set of stages that depend on each other through `after`."""
    problems = []
    for component in _strongly_connected(group):
        if len(component) < 2:
            continue
        start = min(component, key=lambda name: group.stages[name].line)
        path = _cycle_from(start, component, group)
        first_ref = next(r for r in group.edges[start] if r.name == path[1])
        problems.append(Problem(first_ref.line, "dependency cycle through `after`: "
                                f"{' -> '.join(path)} (a loop is allowed only through "
                                "`on-failure`, which has `max-repeats` as its exit)"))
    return problems


def _strongly_connected(group: _Group) -> list[set[str]]:
    """Tarjan's algorithm over the `after` edges of one group (a few dozen stages)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for ref in group.edges.get(node, []):
            if ref.name not in index:
                visit(ref.name)
                low[node] = min(low[node], low[ref.name])
            elif ref.name in stack:
                low[node] = min(low[node], index[ref.name])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for name in group.edges:
        if name not in index:
            visit(name)
    return components


def _cycle_from(start: str, component: set[str], group: _Group) -> list[str]:
    """A shortest path start -> ... -> start inside one strongly connected component."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for ref in group.edges.get(node, []):
                if ref.name == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if ref.name in component and ref.name not in previous:
                    previous[ref.name] = node
                    following.append(ref.name)
        frontier = following
    return [start, start]
