"""The protocol authoring format as typed values, each remembering its line in the YAML.

See orchestration/PROTOCOLS.md. Reading (protocol_yaml), cross-checks (protocol_checks)
and the FHIR form (protocol_fhir) all work on these values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ID_PATTERN = re.compile(r"[a-z0-9-]{1,64}")
KINDS = {"task": "Task", "service-request": "ServiceRequest", "appointment": "Appointment"}
MAX_REPEATS = range(1, 11)
FHIR_ID_LENGTH = 64
ASSIGNS = ("chain-of-identity",)
# CodeSystem ATM/CodeSystem/custody-event: the custody handoffs a stage may record.
CUSTODY_EVENTS = ("collection", "pick-up", "hand-over", "receipt-at-manufacturing", "release",
                  "receipt-at-site", "thaw", "infusion")
# CodeSystem ATM/CodeSystem/signature-meaning: what a signature on a handoff attests.
SIGNATURE_MEANINGS = ("released", "received", "verified", "witnessed", "performed")
COUNTRY_PATTERN = re.compile(r"[A-Z]{2}")  # ISO 3166-1 alpha-2
SITE_PATTERN = re.compile(r"Location/[A-Za-z0-9\-.]{1,64}")
# CodeSystem ATM/CodeSystem/scheduling-service: open, so a code only has the id's shape.
SERVICE_PATTERN = ID_PATTERN
# FHIR request priorities (http://hl7.org/fhir/request-priority), most routine first.
PRIORITIES = ("routine", "urgent", "asap", "stat")
MAX_CHAIN_STEPS = 10
MINUTES = {"min": 1, "h": 60, "d": 24 * 60, "wk": 7 * 24 * 60}  # per unit of a Duration


@dataclass(frozen=True, order=True)
class Problem:
    """One mistake in a protocol file, at a 1-based line."""

    line: int
    message: str

    def format(self, source: str) -> str:
        return f"{source}:{self.line}: {self.message}"


class ProtocolError(ValueError):
    """A protocol file that cannot be compiled; carries every problem found in it."""

    def __init__(self, problems: list[Problem], source: str = "<protocol>") -> None:
        self.problems = sorted(problems)
        self.source = source
        super().__init__("\n".join(p.format(source) for p in self.problems))


@dataclass(frozen=True)
class Ref:
    """A name that must resolve elsewhere (a stage or a role), or a code checked across
    stages (`assigns`), and where it was written."""

    name: str
    line: int


@dataclass(frozen=True)
class Duration:
    """A UCUM duration: `value` in `unit` (min, h, d or wk)."""

    value: int | float
    unit: str

    def minutes(self) -> float:
        """The length in minutes, to compare durations written in different units."""
        return self.value * MINUTES[self.unit]


@dataclass(frozen=True)
class After:
    stage: Ref
    gap: Duration | None = None


@dataclass(frozen=True)
class EndsBefore:
    stage: Ref
    by: Duration | None = None


@dataclass(frozen=True)
class OnFailure:
    back_to: Ref
    max_repeats: int


@dataclass(frozen=True)
class SignatureRule:
    """A `where` override of a handoff's signatures: in one country or at one site."""

    signatures: tuple[str, ...]
    line: int
    country: str | None = None
    site: str | None = None  # "Location/<id>"

    @property
    def place(self) -> tuple[str, str]:
        """What the override names: ("country", "DE") or ("site", "Location/x")."""
        return ("country", self.country) if self.country else ("site", self.site or "")


@dataclass(frozen=True)
class Handoff:
    """A `custody` entry: a handoff the stage records and the signature meanings it needs."""

    event: str
    line: int
    signatures: tuple[str, ...] = ()
    where: tuple[SignatureRule, ...] = ()


@dataclass(frozen=True)
class Lead:
    """A lead time from the previous chain step's start: at least `min`, at most `max`."""

    min: Duration
    max: Duration
    line: int


@dataclass(frozen=True)
class LeadRule:
    """A `where` override of a step's lead time: in one country, at one site or for one
    request priority (exactly one is set)."""

    lead: Lead
    line: int
    country: str | None = None
    site: str | None = None  # "Location/<id>"
    priority: str | None = None

    @property
    def place(self) -> tuple[str, str]:
        """What the override names: ("country", "DE"), ("site", "Location/x") or
        ("priority", "urgent")."""
        if self.country is not None:
            return "country", self.country
        if self.site is not None:
            return "site", self.site
        return "priority", self.priority or ""


@dataclass(frozen=True)
class ChainStep:
    """A `books` entry: the stage it books for, the scheduling service it needs and, after
    the first step, its lead time."""

    stage: Ref
    service: str
    line: int
    lead: Lead | None = None
    where: tuple[LeadRule, ...] = ()


@dataclass(frozen=True)
class Chain:
    """A stage's `books`: the steps booked in one go, in time order; `line` is the key's,
    where a second booking stage is reported."""

    steps: tuple[ChainStep, ...]
    line: int


@dataclass(frozen=True)
class Stage:
    """One stage; `id` is "" when the file gave none (a problem is reported for it)."""

    id: str
    line: int
    title: str | None = None
    description: str | None = None
    kind: str = "task"
    role: Ref | None = None
    deadline: Duration | None = None
    after: tuple[After, ...] = ()
    ends_before: EndsBefore | None = None
    when: str | None = None
    escalate: Ref | None = None
    on_failure: OnFailure | None = None
    assigns: Ref | None = None  # "chain-of-identity": assigned when the stage completes
    custody: tuple[Handoff, ...] = ()
    books: Chain | None = None
    steps: tuple[Stage, ...] = ()

    @property
    def display(self) -> str:
        """The title, or one made from the id ("qc-release" -> "Qc release")."""
        return self.title or self.id.replace("-", " ").capitalize()


@dataclass(frozen=True)
class Role:
    code: str
    text: str
    line: int


@dataclass(frozen=True)
class Protocol:
    id: str
    line: int
    version: str | None = None
    title: str | None = None
    description: str | None = None
    roles: tuple[Role, ...] = ()
    escalation: Ref | None = None
    stages: tuple[Stage, ...] = ()

    def all_stages(self) -> list[Stage]:
        """Every stage, sub-stages included, in document order."""
        found: list[Stage] = []

        def walk(stages: tuple[Stage, ...]) -> None:
            for stage in stages:
                found.append(stage)
                walk(stage.steps)

        walk(self.stages)
        return found
