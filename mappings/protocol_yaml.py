"""Reading the protocol authoring format (orchestration/PROTOCOLS.md) from YAML.

Values are read from PyYAML's composed nodes (yaml.SafeLoader), not from constructed
Python objects, so that every problem can name its line. Reading reports what is wrong
in one place (a key, a value, a duration, a FHIRPath); protocol_checks reports what is
wrong between places (references, roles, cycles).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from mappings.fhirpath_syntax import syntax_error
from mappings.protocol_model import (
    ASSIGNS,
    COUNTRY_PATTERN,
    CUSTODY_EVENTS,
    ID_PATTERN,
    KINDS,
    MAX_CHAIN_STEPS,
    MAX_REPEATS,
    PRIORITIES,
    SERVICE_PATTERN,
    SIGNATURE_MEANINGS,
    SITE_PATTERN,
    After,
    Chain,
    ChainStep,
    Duration,
    EndsBefore,
    Handoff,
    Lead,
    LeadRule,
    OnFailure,
    Problem,
    Protocol,
    Ref,
    Role,
    SignatureRule,
    Stage,
)

Rule = TypeVar("Rule", SignatureRule, LeadRule)  # a `where` override, naming its place

PROTOCOL_KEYS = ("protocol", "version", "title", "description", "roles", "escalation",
                 "stages")
STAGE_KEYS = ("id", "title", "description", "kind", "role", "deadline", "after",
              "ends-before", "when", "escalate", "on-failure", "assigns", "custody", "books",
              "steps")
AFTER_KEYS = ("stage", "gap")
ENDS_BEFORE_KEYS = ("stage", "by")
ON_FAILURE_KEYS = ("back-to", "max-repeats")
CUSTODY_KEYS = ("event", "signatures", "where")
WHERE_KEYS = ("country", "site", "signatures")
NO_SIGNATURE = "write [] when none is needed"
BOOKS_KEYS = ("step", "service", "lead", "where")
LEAD_KEYS = ("min", "max")
LEAD_WHERE_KEYS = ("country", "site", "priority", "lead")
LEAD_HELP = "a mapping of `min` and `max` durations, such as {min: 2d, max: 7d}"
DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(min|h|d|wk)")
DURATION_HELP = "write a number and a unit: 30min, 12h, 3d or 2wk"
NULL = "tag:yaml.org,2002:null"
INT = "tag:yaml.org,2002:int"


def read_protocol(text: str) -> tuple[Protocol | None, list[Problem]]:
    """The protocol in `text` (None when it has no readable shape) and the problems found
    while reading it."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        return None, [Problem(line, f"not valid YAML: {exc.problem or exc.context}")]
    except yaml.YAMLError as exc:
        return None, [Problem(1, f"not valid YAML: {exc}")]
    reader = _Reader()
    return reader.protocol(root), reader.problems


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _is_null(node: Node | None) -> bool:
    return node is None or (isinstance(node, ScalarNode) and node.tag == NULL)


def _shape(node: Node) -> str:
    return "list" if isinstance(node, SequenceNode) else "mapping"


def _peek(node: MappingNode, key: str) -> Node | None:
    for key_node, value in node.value:
        if isinstance(key_node, ScalarNode) and key_node.value == key:
            return value  # type: ignore[no-any-return]
    return None


def _key_line(node: MappingNode, key: str) -> int:
    """The line of `key` itself: a block mapping or list under it starts a line later."""
    for key_node, _ in node.value:
        if isinstance(key_node, ScalarNode) and key_node.value == key:
            return _line(key_node)
    return _line(node)


def _suggest(name: str, keys: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else f" (expected one of: {', '.join(keys)})"


class _Reader:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def report(self, where: Node | int, message: str) -> None:
        self.problems.append(Problem(where if isinstance(where, int) else _line(where),
                                     message))

    # -- generic values --------------------------------------------------------------
    def fields(self, node: Node, keys: tuple[str, ...], what: str) -> dict[str, Node]:
        """The known keys of a mapping; unknown and repeated keys are reported."""
        if not isinstance(node, MappingNode):
            self.report(node, f"{what} must be a mapping")
            return {}
        found: dict[str, Node] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, ScalarNode) else None
            if name is None:
                self.report(key, f"a key in {what} must be text")
            elif name in found:
                self.report(key, f"`{name}` is given twice in {what}")
            elif name not in keys:
                self.report(key, f"unknown key `{name}` in {what}{_suggest(name, keys)}")
            else:
                found[name] = value
        return found

    def text(self, node: Node | None, what: str) -> str | None:
        if node is None or _is_null(node):
            return None
        if isinstance(node, ScalarNode):
            return str(node.value)
        self.report(node, f"`{what}` must be text, not a {_shape(node)}")
        return None

    def ident(self, node: Node | None, what: str) -> str | None:
        value = self.text(node, what)
        if value is not None and node is not None and not ID_PATTERN.fullmatch(value):
            self.report(node, f"`{what}` '{value}' must be 1 to 64 lower-case letters, "
                        "digits or hyphens")
        return value

    def ref(self, node: Node | None, what: str) -> Ref | None:
        value = self.text(node, what)
        return Ref(value, _line(node)) if value is not None and node is not None else None

    def duration(self, node: Node | None, what: str) -> Duration | None:
        raw = self.text(node, what)
        if raw is None or node is None:
            return None
        match = DURATION.fullmatch(raw.strip())
        if match is None:
            self.report(node, f"`{what}`: cannot read duration '{raw}' ({DURATION_HELP})")
            return None
        number, unit = match.groups()
        return Duration(float(number) if "." in number else int(number), unit)

    # -- the protocol ----------------------------------------------------------------
    def protocol(self, root: Node | None) -> Protocol | None:
        if root is None:
            self.report(1, "missing `protocol` (the protocol's id)")
            self.report(1, "missing `stages`")
            return None
        found = self.fields(root, PROTOCOL_KEYS, "the protocol")
        if not isinstance(root, MappingNode):
            return None
        for key, what in (("protocol", "`protocol` (the protocol's id)"),
                          ("stages", "`stages`")):
            if _is_null(found.get(key)):
                self.report(found.get(key) or root, f"missing {what}")
        id_node = found.get("protocol")
        return Protocol(
            id=self.ident(id_node, "protocol") or "",
            line=_line(id_node) if id_node is not None else _line(root),
            version=self.text(found.get("version"), "version"),
            title=self.text(found.get("title"), "title"),
            description=self.text(found.get("description"), "description"),
            roles=self.roles(found.get("roles")),
            escalation=self.ref(found.get("escalation"), "escalation"),
            stages=self.stage_list(found.get("stages"), "stages"),
        )

    def roles(self, node: Node | None) -> tuple[Role, ...]:
        if node is None or _is_null(node):
            return ()
        if not isinstance(node, MappingNode):
            self.report(node, "`roles` must be a mapping of role code to description")
            return ()
        roles: dict[str, Role] = {}
        for key, value in node.value:
            code = self.ident(key, "roles") if isinstance(key, ScalarNode) else None
            if code is None:
                self.report(key, "a role code must be text")
            elif code in roles:
                self.report(key, f"role '{code}' is declared twice")
            else:
                roles[code] = Role(code, self.text(value, f"roles.{code}") or code, _line(key))
        return tuple(roles.values())

    # -- stages ----------------------------------------------------------------------
    def stage_list(self, node: Node | None, what: str) -> tuple[Stage, ...]:
        if node is None or _is_null(node):
            return ()
        if not isinstance(node, SequenceNode):
            self.report(node, f"`{what}` must be a list of stages")
            return ()
        if not node.value:
            self.report(node, f"`{what}` is empty")
        stages = (self.stage(item) for item in node.value)
        return tuple(stage for stage in stages if stage is not None)

    def stage(self, node: Node) -> Stage | None:
        if not isinstance(node, MappingNode):
            self.report(node, "a stage must be a mapping with an `id`")
            return None
        id_node = _peek(node, "id")
        stage_id = self.ident(id_node, "id")
        if _is_null(id_node):
            self.report(id_node or node, "a stage needs an `id`")
        found = self.fields(node, STAGE_KEYS, f"stage '{stage_id}'" if stage_id else "a stage")
        return Stage(
            id=stage_id or "",
            line=_line(id_node) if id_node is not None else _line(node),
            title=self.text(found.get("title"), "title"),
            description=self.text(found.get("description"), "description"),
            kind=self.kind(found.get("kind")),
            role=self.ref(found.get("role"), "role"),
            deadline=self.deadline(found.get("deadline")),
            after=self.after(found.get("after")),
            ends_before=self.ends_before(found.get("ends-before")),
            when=self.when(found.get("when")),
            escalate=self.ref(found.get("escalate"), "escalate"),
            on_failure=self.on_failure(found.get("on-failure")),
            assigns=self.assigns(found.get("assigns")),
            custody=self.custody(found.get("custody"), stage_id),
            books=self.books(found.get("books"), node),
            steps=self.stage_list(found.get("steps"), "steps"),
        )

    def kind(self, node: Node | None) -> str:
        kind = self.text(node, "kind")
        if kind is None or node is None:
            return "task"
        if kind not in KINDS:
            self.report(node, f"`kind` must be task, service-request or appointment, "
                        f"not '{kind}'")
            return "task"
        return kind

    def deadline(self, node: Node | None) -> Duration | None:
        deadline = self.duration(node, "deadline")
        if deadline is not None and node is not None and deadline.value == 0:
            self.report(node, "`deadline` must be longer than 0")
            return None
        return deadline

    def when(self, node: Node | None) -> str | None:
        expression = self.text(node, "when")
        if expression is None or node is None:
            return None
        error = syntax_error(expression)
        if error is not None:
            self.report(node, f"`when` is not valid FHIRPath: {error}")
        return expression

    def after(self, node: Node | None) -> tuple[After, ...]:
        if node is None or _is_null(node):
            return ()
        items = node.value if isinstance(node, SequenceNode) else [node]
        found = []
        for item in items:
            if isinstance(item, MappingNode):
                fields = self.fields(item, AFTER_KEYS, "an `after` entry")
                stage = self.ref(fields.get("stage"), "stage")
                if stage is None:
                    self.report(item, "an `after` entry needs a `stage`")
                    continue
                found.append(After(stage, self.duration(fields.get("gap"), "gap")))
            else:
                stage = self.ref(item, "after")
                if stage is not None:
                    found.append(After(stage))
        return tuple(found)

    def ends_before(self, node: Node | None) -> EndsBefore | None:
        if node is None or _is_null(node):
            return None
        if isinstance(node, ScalarNode):
            stage = self.ref(node, "ends-before")
            return EndsBefore(stage) if stage is not None else None
        fields = self.fields(node, ENDS_BEFORE_KEYS, "`ends-before`")
        stage = self.ref(fields.get("stage"), "stage")
        if stage is None:
            if isinstance(node, MappingNode):
                self.report(node, "`ends-before` needs a `stage`")
            return None
        return EndsBefore(stage, self.duration(fields.get("by"), "by"))

    def on_failure(self, node: Node | None) -> OnFailure | None:
        if node is None or _is_null(node):
            return None
        fields = self.fields(node, ON_FAILURE_KEYS, "`on-failure`")
        if not isinstance(node, MappingNode):
            return None
        back_to = self.ref(fields.get("back-to"), "back-to")
        if back_to is None:
            self.report(node, "`on-failure` needs `back-to` (the stage to re-run from)")
        repeats = self.max_repeats(fields.get("max-repeats"), node)
        # Kept with a bad max-repeats (reported above, as 0) so that back-to is checked too.
        return OnFailure(back_to, repeats or 0) if back_to is not None else None

    def max_repeats(self, node: Node | None, parent: Node) -> int | None:
        if node is None or _is_null(node):
            self.report(parent, "`on-failure` needs `max-repeats` (1 to 10): a loop needs "
                        "an exit")
            return None
        value = node.value if isinstance(node, ScalarNode) and node.tag == INT else None
        if value is None or not value.isdigit() or int(value) not in MAX_REPEATS:
            shown = f"'{node.value}'" if isinstance(node, ScalarNode) else f"a {_shape(node)}"
            self.report(node, f"`max-repeats` must be a whole number from 1 to 10, not {shown}")
            return None
        return int(value)

    def assigns(self, node: Node | None) -> Ref | None:
        value = self.ref(node, "assigns")
        if value is not None and value.name not in ASSIGNS:
            self.report(value.line, f"`assigns` must be {' or '.join(ASSIGNS)}, "
                        f"not '{value.name}'")
            return None
        return value

    # -- custody handoffs ------------------------------------------------------------
    def custody(self, node: Node | None, stage_id: str | None) -> tuple[Handoff, ...]:
        if node is None or _is_null(node):
            return ()
        if not isinstance(node, SequenceNode):
            self.report(node, "`custody` must be a list of handoffs, each with an `event` and "
                        "its `signatures`")
            return ()
        first: dict[str, int] = {}
        handoffs = []
        for item in node.value:
            handoff = self.handoff(item)
            if handoff is None:
                continue
            if handoff.event in first:
                in_stage = f" in stage '{stage_id}'" if stage_id else ""
                self.report(handoff.line, f"custody event '{handoff.event}' is given twice"
                            f"{in_stage} (first at line {first[handoff.event]})")
                continue
            first[handoff.event] = handoff.line
            handoffs.append(handoff)
        return tuple(handoffs)

    def handoff(self, node: Node) -> Handoff | None:
        fields = self.fields(node, CUSTODY_KEYS, "a `custody` entry")
        if not isinstance(node, MappingNode):
            return None
        event_node = fields.get("event")
        event = self.text(event_node, "event")
        if event is None:
            self.report(event_node or node, "a `custody` entry needs an `event`")
        elif event not in CUSTODY_EVENTS:
            self.report(event_node or node, f"`event`: unknown custody event '{event}'"
                        f"{_suggest(event, CUSTODY_EVENTS)}")
            event = None
        signatures = self.signatures(fields.get("signatures"), node, "a `custody` entry")
        where = self.where(fields.get("where"))
        if event is None or event_node is None or signatures is None:
            return None
        return Handoff(event, _line(event_node), signatures, where)

    def signatures(self, node: Node | None, parent: Node, what: str
                   ) -> tuple[str, ...] | None:
        """The signature meanings a handoff needs; None when missing or unreadable."""
        if node is None or _is_null(node):
            self.report(node or parent, f"{what} needs `signatures` ({NO_SIGNATURE})")
            return None
        if not isinstance(node, SequenceNode):
            shown = "text" if isinstance(node, ScalarNode) else f"a {_shape(node)}"
            self.report(node, f"`signatures` must be a list of signature meanings "
                        f"({NO_SIGNATURE}), not {shown}")
            return None
        meanings: list[str] = []
        readable = True
        for item in node.value:
            meaning = self.text(item, "signatures")
            if meaning is None:
                readable = False
            elif meaning not in SIGNATURE_MEANINGS:
                self.report(item, f"`signatures`: unknown signature meaning '{meaning}'"
                            f"{_suggest(meaning, SIGNATURE_MEANINGS)}")
                readable = False
            elif meaning in meanings:
                self.report(item, f"`signatures`: '{meaning}' is given twice")
            else:
                meanings.append(meaning)
        return tuple(meanings) if readable else None

    def where(self, node: Node | None) -> tuple[SignatureRule, ...]:
        return self.overrides(node, self.signature_rule, "a `country` or a `site` and its "
                              "`signatures`")

    def overrides(self, node: Node | None, read: Callable[[Node], Rule | None],
                  each: str) -> tuple[Rule, ...]:
        """A `where` list, read entry by entry; a place named twice is reported (only the
        first match would ever apply)."""
        if node is None or _is_null(node):
            return ()
        if not isinstance(node, SequenceNode):
            self.report(node, f"`where` must be a list of overrides, each with {each}")
            return ()
        first: dict[tuple[str, str], int] = {}
        rules = []
        for item in node.value:
            rule = read(item)
            if rule is None:
                continue
            key = rule.place
            if key in first:
                self.report(rule.line, f"`where`: {key[0]} '{key[1]}' is given twice (first "
                            f"at line {first[key]}; only the first match applies)")
                continue
            first[key] = rule.line
            rules.append(rule)
        return tuple(rules)

    def signature_rule(self, node: Node) -> SignatureRule | None:
        fields = self.fields(node, WHERE_KEYS, "a `where` entry")
        if not isinstance(node, MappingNode):
            return None
        country_node, site_node = fields.get("country"), fields.get("site")
        country = self.text(country_node, "country")
        site = self.text(site_node, "site")
        readable = True
        if country is not None and site is not None:
            self.report(node, "a `where` entry names a `country` or a `site`, not both")
            readable = False
        elif country is None and site is None:
            self.report(node, "a `where` entry needs a `country` (ISO 3166 alpha-2) or a "
                        "`site` (Location/<id>)")
            readable = False
        if not self.place("country", country, country_node or node):
            readable = False
        if not self.place("site", site, site_node or node):
            readable = False
        signatures = self.signatures(fields.get("signatures"), node, "a `where` entry")
        if not readable or signatures is None:
            return None
        return SignatureRule(signatures, _line(node), country=country, site=site)

    def place(self, key: str, value: str | None, node: Node) -> bool:
        """Whether a `where` entry's `country`, `site` or `priority` is well formed (or
        not given); a malformed one is reported."""
        if value is None:
            return True
        if key == "country" and not COUNTRY_PATTERN.fullmatch(value):
            self.report(node, f"`country` '{value}' must be an ISO 3166 alpha-2 code: two "
                        "upper-case letters, such as DE")
            return False
        if key == "site" and not SITE_PATTERN.fullmatch(value):
            self.report(node, f"`site` '{value}' must be a Location reference: Location/ and "
                        "an id of 1 to 64 letters, digits, '-' or '.'")
            return False
        if key == "priority" and value not in PRIORITIES:
            self.report(node, f"`priority`: unknown request priority '{value}'"
                        f"{_suggest(value, PRIORITIES)}")
            return False
        return True

    # -- the chain a stage books -----------------------------------------------------
    def books(self, node: Node | None, stage_node: MappingNode) -> Chain | None:
        if node is None or _is_null(node):
            return None
        if not isinstance(node, SequenceNode):
            self.report(node, "`books` must be a list of chain steps, each with a `step` and "
                        "its `service`")
            return None
        if not node.value:
            self.report(node, "`books` is empty: list the steps the chain books, in time "
                        "order")
            return None
        if len(node.value) > MAX_CHAIN_STEPS:
            self.report(node, f"`books` has {len(node.value)} steps; a chain books "
                        f"{MAX_CHAIN_STEPS} at most")
        first: dict[str, int] = {}
        steps = []
        for index, item in enumerate(node.value):
            step = self.chain_step(item, index == 0)
            if step is None:
                continue
            if step.stage.name in first:
                self.report(step.stage.line, f"`step`: stage '{step.stage.name}' is booked "
                            f"twice in this chain (first at line {first[step.stage.name]})")
                continue
            first[step.stage.name] = step.stage.line
            steps.append(step)
        return Chain(tuple(steps), _key_line(stage_node, "books"))

    def chain_step(self, node: Node, is_first: bool) -> ChainStep | None:
        fields = self.fields(node, BOOKS_KEYS, "a `books` entry")
        if not isinstance(node, MappingNode):
            return None
        stage = self.ref(fields.get("step"), "step")
        if _is_null(fields.get("step")):
            self.report(fields.get("step") or node, "a `books` entry needs a `step` (the id "
                        "of the stage it books for)")
        service = self.service(fields.get("service"), node)
        lead: Lead | None = None
        where: tuple[LeadRule, ...] = ()
        if is_first:
            # Leads count from the previous step's start: the first step has none to count
            # from, so its lead and overrides are refused rather than read.
            for key in ("lead", "where"):
                if not _is_null(fields.get(key)):
                    self.report(_key_line(node, key), f"`{key}`: the first step of a chain "
                                "has no lead time (leads count from the previous step's "
                                "start)")
        else:
            lead = self.lead(fields.get("lead"))
            where = self.lead_rules(fields.get("where"))
            if _is_null(fields.get("lead")):
                self.report(node, "a `books` entry after the first needs a `lead` from the "
                            f"previous step's start ({LEAD_HELP})")
        if stage is None:
            return None
        # Kept with a bad service (reported above, as "") so that its stage is checked too.
        return ChainStep(stage, service or "", _line(node), lead, where)

    def service(self, node: Node | None, parent: Node) -> str | None:
        service = self.text(node, "service")
        if node is None or _is_null(node):
            self.report(node or parent, "a `books` entry needs a `service` (a scheduling "
                        "service code, such as apheresis)")
            return None
        if service is None:
            return None
        if not SERVICE_PATTERN.fullmatch(service):
            self.report(node, f"`service` '{service}' must be a scheduling service code: 1 "
                        "to 64 lower-case letters, digits or hyphens")
            return None
        return service

    def lead(self, node: Node | None) -> Lead | None:
        if node is None or _is_null(node):
            return None
        if not isinstance(node, MappingNode):
            self.report(node, f"`lead` must be {LEAD_HELP}")
            return None
        fields = self.fields(node, LEAD_KEYS, "`lead`")
        low = self.duration(fields.get("min"), "min")
        high = self.duration(fields.get("max"), "max")
        missing = [f"`{key}`" for key in LEAD_KEYS if _is_null(fields.get(key))]
        if missing:
            self.report(node, f"`lead` needs {' and '.join(missing)} ({LEAD_HELP})")
        if low is None or high is None:
            return None
        if low.minutes() > high.minutes():
            self.report(node, f"`lead`: `min` {fields['min'].value} is longer than `max` "
                        f"{fields['max'].value}")
            return None
        return Lead(low, high, _line(node))

    def lead_rules(self, node: Node | None) -> tuple[LeadRule, ...]:
        return self.overrides(node, self.lead_rule, "a `country`, a `site` or a `priority` "
                              "and its `lead`")

    def lead_rule(self, node: Node) -> LeadRule | None:
        fields = self.fields(node, LEAD_WHERE_KEYS, "a `where` entry")
        if not isinstance(node, MappingNode):
            return None
        places = {key: self.text(fields.get(key), key) for key in LEAD_WHERE_KEYS[:3]}
        given = [key for key, value in places.items() if value is not None]
        readable = len(given) == 1
        if len(given) > 1:
            self.report(node, "a `where` entry names one of `country`, `site` or `priority`, "
                        f"not {' and '.join(f'`{key}`' for key in given)}")
        elif not given:
            self.report(node, "a `where` entry needs a `country` (ISO 3166 alpha-2), a `site` "
                        f"(Location/<id>) or a `priority` ({', '.join(PRIORITIES)})")
        for key, value in places.items():
            if not self.place(key, value, fields.get(key) or node):
                readable = False
        lead = self.lead(fields.get("lead"))
        if _is_null(fields.get("lead")):
            self.report(node, f"a `where` entry needs a `lead` ({LEAD_HELP})")
        if not readable or lead is None:
            return None
        return LeadRule(lead, _line(node), country=places["country"], site=places["site"],
                        priority=places["priority"])
