"""A protocol as the engine sees it, read from its FHIR form (a workflow-definition
PlanDefinition, see orchestration/PROTOCOLS.md). Pure: dicts in, frozen values out."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from itertools import pairwise
from typing import Any

from orchestration.chains import PRIORITIES, SERVICE_SYSTEM, ChainStep, Lead, LeadRule

ATM = "https://atm-gateway.org/fhir"
EXT = f"{ATM}/StructureDefinition/"
ESCALATION_ROLE = EXT + "escalation-role"
ON_FAILURE = EXT + "on-failure"
PARTNER_ROLE = EXT + "partner-role"
ROLE_SYSTEM = f"{ATM}/CodeSystem/partner-role"
STAGE_SYSTEM = f"{ATM}/CodeSystem/stage"
ASSIGNS = EXT + "assigns"
CUSTODY_HANDOFF = EXT + "custody-handoff"
BOOKS_CHAIN = EXT + "books-chain"

# What a stage's completion may assign to the enrolment.
ASSIGNABLE = ("chain-of-identity",)
# CodeSystem ATM/CodeSystem/custody-event and ATM/CodeSystem/signature-meaning.
CUSTODY_EVENTS = ("collection", "pick-up", "hand-over", "receipt-at-manufacturing", "release",
                  "receipt-at-site", "thaw", "infusion")
SIGNATURE_MEANINGS = ("released", "received", "verified", "witnessed", "performed")
_COUNTRY = re.compile(r"[A-Z]{2}")
_SITE = re.compile(r"Location/[A-Za-z0-9\-.]{1,64}")
_SERVICE = re.compile(r"[a-z0-9-]{1,64}")  # a code of ATM/CodeSystem/scheduling-service
MAX_CHAIN_STEPS = 10

# UCUM units a duration may be written in, as timedelta keyword arguments.
_UNITS = {"s": "seconds", "min": "minutes", "h": "hours", "d": "days", "wk": "weeks"}


class ProtocolFormError(ValueError):
    """A PlanDefinition the engine cannot run (the message says which element)."""


@dataclass(frozen=True)
class Link:
    """A relatedAction: `stage` is the other action, `offset` the gap or lead time."""

    stage: str
    offset: timedelta = timedelta(0)


@dataclass(frozen=True)
class OnFailure:
    back_to: str
    max_repeats: int


@dataclass(frozen=True)
class SignatureRule:
    """An override of a handoff's signatures at one site or in one country."""

    signatures: tuple[str, ...]
    country: str | None = None
    site: str | None = None  # "Location/<id>"


@dataclass(frozen=True)
class Handoff:
    """A custody handoff a stage records, and the signature meanings it needs by default."""

    event: str
    signatures: tuple[str, ...]
    where: tuple[SignatureRule, ...] = ()

    def required(self, country: str | None, site: str | None) -> tuple[str, ...]:
        """The meanings needed for this handoff at this site (a Location reference) or in
        this country: the first matching override, else the default."""
        country = country.upper() if country else None
        for rule in self.where:
            if ((rule.country is not None and rule.country == country)
                    or (rule.site is not None and rule.site == site)):
                return rule.signatures
        return self.signatures


@dataclass(frozen=True)
class Stage:
    id: str
    title: str
    definition: str | None  # the ActivityDefinition canonical
    kind: str  # Task | ServiceRequest | Appointment
    role: str | None
    after: tuple[Link, ...] = ()
    ends_before: tuple[Link, ...] = ()
    deadline: timedelta | None = None
    condition: str | None = None  # FHIRPath
    escalation_role: str | None = None
    on_failure: OnFailure | None = None
    parent: str | None = None
    children: tuple[str, ...] = ()
    assigns: str | None = None  # "chain-of-identity": assigned when the stage's Task completes
    handoffs: tuple[Handoff, ...] = ()
    books: tuple[ChainStep, ...] = ()  # the chain this stage books in one go, in time order

    def handoff(self, event: str) -> Handoff | None:
        """The custody handoff `event` this stage records, if it records one."""
        return next((h for h in self.handoffs if h.event == event), None)


@dataclass(frozen=True)
class Protocol:
    url: str
    version: str | None
    title: str
    stages: dict[str, Stage]  # in document order, parents before their children
    escalation_role: str | None = None

    @property
    def canonical(self) -> str:
        return f"{self.url}|{self.version}" if self.version else self.url

    def siblings(self, stage_id: str) -> list[Stage]:
        parent = self.stages[stage_id].parent
        return [s for s in self.stages.values() if s.parent == parent]

    def top_level(self) -> list[Stage]:
        return [s for s in self.stages.values() if s.parent is None]

    def booking_stage(self) -> Stage | None:
        """The stage that books the enrolment's chain of appointments, if one does."""
        return next((s for s in self.stages.values() if s.books), None)


def duration(value: dict[str, Any], where: str) -> timedelta:
    """A FHIR Duration in one of the UCUM units above."""
    unit = value.get("code") or value.get("unit")
    number = value.get("value")
    if unit not in _UNITS or not isinstance(number, int | float):
        raise ProtocolFormError(f"{where}: a duration needs a value and a unit of "
                                f"{', '.join(_UNITS)}")
    return timedelta(**{_UNITS[unit]: number})


def _extension(element: dict[str, Any], url: str) -> dict[str, Any] | None:
    return next((e for e in element.get("extension", []) if e.get("url") == url), None)


def _role(element: dict[str, Any]) -> str | None:
    for participant in element.get("participant", []):
        for coding in participant.get("role", {}).get("coding", []):
            if coding.get("system") == ROLE_SYSTEM and coding.get("code"):
                return str(coding["code"])
    return None


_RELATIONSHIPS = ("after-end", "after", "before-start", "before", "after-start")
"""The relatedAction relationships the engine reads: "starts after X ends" and "ends
before X starts", which sequence stages, and "starts after X starts" (with an
offsetRange), which is only a booked chain's lead time (see _leads) and holds nothing
back. Others (concurrent-with-start…) are refused rather than silently ignored."""


def _links(action: dict[str, Any], relationships: tuple[str, ...]) -> tuple[Link, ...]:
    links = []
    for related in action.get("relatedAction", []):
        if related.get("relationship") not in _RELATIONSHIPS:
            raise ProtocolFormError(
                f"action {action.get('id')}: relatedAction {related.get('actionId')} has "
                f"relationship {related.get('relationship')!r}; supported: "
                f"{', '.join(_RELATIONSHIPS)}")
        if related.get("relationship") in relationships:
            offset = related.get("offsetDuration")
            where = f"action {action.get('id')} relatedAction {related.get('actionId')}"
            links.append(Link(related["actionId"],
                              duration(offset, where) if offset else timedelta(0)))
    return tuple(links)


def _leads(action: dict[str, Any]) -> dict[str, Lead]:
    """The action's relatedAction after-start, by the action each runs from: lead times
    of a booked chain, which _with_leads gives to its steps."""
    leads: dict[str, Lead] = {}
    for related in action.get("relatedAction", []):
        if related.get("relationship") != "after-start":
            continue
        other = related.get("actionId")
        if not isinstance(other, str) or not other:
            raise ProtocolFormError(f"action {action.get('id')}: a relatedAction after-start "
                                    "needs an actionId")
        where = f"action {action.get('id')} relatedAction {other}"
        if other in leads:
            raise ProtocolFormError(f"{where}: after-start is given twice")
        leads[other] = _offset_range(related.get("offsetRange"), where)
    return leads


def _offset_range(value: Any, where: str) -> Lead:
    """An after-start's offsetRange as a lead time: both ends, 0 <= low <= high. A lead
    always has a longest wait: without one the chain search would have no bound."""
    low, high = ((value.get(end) if isinstance(value, dict) else None)
                 for end in ("low", "high"))
    if not isinstance(low, dict) or not isinstance(high, dict):
        raise ProtocolFormError(f"{where}: after-start needs an offsetRange with a low and a "
                                "high duration")
    shortest = duration(low, f"{where} offsetRange low")
    longest = duration(high, f"{where} offsetRange high")
    if shortest < timedelta(0) or longest < shortest:
        raise ProtocolFormError(f"{where}: an offsetRange needs 0 <= low <= high (low "
                                f"{shortest}, high {longest})")
    return Lead(shortest, longest)


def _condition(action: dict[str, Any]) -> str | None:
    for condition in action.get("condition", []):
        expression = condition.get("expression", {})
        if condition.get("kind") == "applicability" and expression.get("expression"):
            if expression.get("language", "text/fhirpath") != "text/fhirpath":
                raise ProtocolFormError(f"action {action.get('id')}: only FHIRPath "
                                        "conditions are supported")
            return str(expression["expression"])
    return None


def _on_failure(action: dict[str, Any]) -> OnFailure | None:
    extension = _extension(action, ON_FAILURE)
    if extension is None:
        return None
    parts = {e.get("url"): e for e in extension.get("extension", [])}
    back_to = parts.get("back-to", {}).get("valueId")
    repeats = parts.get("max-repeats", {}).get("valueUnsignedInt")
    if not back_to or not isinstance(repeats, int):
        raise ProtocolFormError(f"action {action.get('id')}: on-failure needs back-to and "
                                "max-repeats")
    return OnFailure(back_to, repeats)


def _assigns(action: dict[str, Any]) -> str | None:
    extension = _extension(action, ASSIGNS)
    if extension is None:
        return None
    code = extension.get("valueCode")
    if code not in ASSIGNABLE:
        raise ProtocolFormError(f"action {action.get('id')}: assigns has valueCode {code!r}; "
                                f"supported: {', '.join(ASSIGNABLE)}")
    return str(code)


def _code(part: dict[str, Any], allowed: tuple[str, ...], where: str) -> str:
    code = part.get("valueCode")
    if code not in allowed:
        raise ProtocolFormError(f"{where}: {part.get('url')} has valueCode {code!r}; "
                                f"supported: {', '.join(allowed)}")
    return str(code)


def _meanings(parts: list[dict[str, Any]], where: str) -> tuple[str, ...]:
    meanings = tuple(_code(p, SIGNATURE_MEANINGS, where) for p in parts
                     if p.get("url") == "signature")
    if len(set(meanings)) != len(meanings):
        raise ProtocolFormError(f"{where}: a signature meaning is given twice")
    return meanings


def _unknown(urls: list[Any], known: tuple[str, ...]) -> str:
    """The sub-extensions not in `known`, as " (unknown: a, b)"; "" when there are none."""
    unknown = sorted({str(url) for url in urls if url not in known})
    return f" (unknown: {', '.join(unknown)})" if unknown else ""


def _signature_rule(extension: dict[str, Any], where: str) -> SignatureRule:
    parts = extension.get("extension", [])
    urls = [p.get("url") for p in parts]
    unknown = _unknown(urls, ("country", "site", "signature"))
    if unknown or urls.count("country") + urls.count("site") != 1:
        raise ProtocolFormError(f"{where}: a where needs one country or one site, and its "
                                f"signatures{unknown}")
    country = site = None
    for part in parts:
        if part.get("url") == "country":
            country = part.get("valueCode")
            if not isinstance(country, str) or not _COUNTRY.fullmatch(country):
                raise ProtocolFormError(f"{where}: where country {country!r} is not an ISO "
                                        "3166 alpha-2 code in upper case")
        elif part.get("url") == "site":
            site = (part.get("valueReference") or {}).get("reference")
            if not isinstance(site, str) or not _SITE.fullmatch(site):
                raise ProtocolFormError(f"{where}: where site {site!r} is not a Location "
                                        "reference")
    return SignatureRule(_meanings(parts, where), country=country, site=site)


def _handoff(extension: dict[str, Any], where: str) -> Handoff:
    parts = extension.get("extension", [])
    urls = [p.get("url") for p in parts]
    unknown = _unknown(urls, ("event", "signature", "where"))
    if unknown or urls.count("event") != 1:
        raise ProtocolFormError(f"{where}: custody-handoff needs one event{unknown}")
    event = _code(next(p for p in parts if p.get("url") == "event"), CUSTODY_EVENTS, where)
    where = f"{where} custody-handoff {event}"
    return Handoff(event, _meanings(parts, where),
                   tuple(_signature_rule(p, where) for p in parts if p.get("url") == "where"))


def _handoffs(action: dict[str, Any]) -> tuple[Handoff, ...]:
    where = f"action {action.get('id')}"
    handoffs: list[Handoff] = []
    for extension in action.get("extension", []):
        if extension.get("url") != CUSTODY_HANDOFF:
            continue
        handoff = _handoff(extension, where)
        if any(h.event == handoff.event for h in handoffs):
            raise ProtocolFormError(f"{where}: custody-handoff {handoff.event} is given twice")
        handoffs.append(handoff)
    return tuple(handoffs)


def _parts(extension: dict[str, Any], known: tuple[str, ...], what: str, where: str
           ) -> list[dict[str, Any]]:
    """The sub-extensions of `extension`; any url not in `known` is refused by name."""
    parts: list[dict[str, Any]] = extension.get("extension", [])
    unknown = _unknown([p.get("url") for p in parts], known)
    if unknown:
        raise ProtocolFormError(f"{where}: {what} has sub-extensions it does not "
                                f"support{unknown}; supported: {', '.join(known)}")
    return parts


def _lead(parts: list[dict[str, Any]], where: str) -> Lead | None:
    """The lead-min and lead-max among `parts`, both or neither."""
    urls = [p.get("url") for p in parts]
    if urls.count("lead-min") == urls.count("lead-max") == 0:
        return None
    if urls.count("lead-min") != 1 or urls.count("lead-max") != 1:
        raise ProtocolFormError(f"{where}: a lead needs one lead-min and one lead-max")
    low, high = (next(p for p in parts if p.get("url") == url).get("valueDuration")
                 for url in ("lead-min", "lead-max"))
    if not isinstance(low, dict) or not isinstance(high, dict):
        raise ProtocolFormError(f"{where}: lead-min and lead-max need a valueDuration")
    shortest, longest = duration(low, f"{where} lead-min"), duration(high, f"{where} lead-max")
    if shortest < timedelta(0) or longest < shortest:
        raise ProtocolFormError(f"{where}: a lead needs 0 <= lead-min <= lead-max "
                                f"(lead-min {shortest}, lead-max {longest})")
    return Lead(shortest, longest)


def _lead_rule(extension: dict[str, Any], where: str) -> LeadRule:
    parts = _parts(extension, ("country", "site", "priority", "lead-min", "lead-max"),
                   "where", where)
    places = [p for p in parts if p.get("url") in ("country", "site", "priority")]
    lead = _lead(parts, f"{where} where")
    if len(places) != 1 or lead is None:
        raise ProtocolFormError(f"{where}: a where needs one country, site or priority, and "
                                "a lead")
    place = places[0]
    if place["url"] == "site":
        site = (place.get("valueReference") or {}).get("reference")
        if not isinstance(site, str) or not _SITE.fullmatch(site):
            raise ProtocolFormError(f"{where}: where site {site!r} is not a Location "
                                    "reference")
        return LeadRule(lead, site=site)
    if place["url"] == "priority":
        return LeadRule(lead, priority=_code(place, PRIORITIES, f"{where} where"))
    country = place.get("valueCode")
    if not isinstance(country, str) or not _COUNTRY.fullmatch(country):
        raise ProtocolFormError(f"{where}: where country {country!r} is not an ISO 3166 "
                                "alpha-2 code in upper case")
    return LeadRule(lead, country=country)


def _service(parts: list[dict[str, Any]], where: str) -> str:
    coding = next(p for p in parts if p.get("url") == "service").get("valueCoding")
    code = coding.get("code") if isinstance(coding, dict) else None
    if not isinstance(coding, dict) or coding.get("system") != SERVICE_SYSTEM \
            or not isinstance(code, str) or not _SERVICE.fullmatch(code):
        raise ProtocolFormError(f"{where}: service needs a valueCoding with system "
                                f"{SERVICE_SYSTEM} and a code")
    return code


def _chain_step(extension: dict[str, Any], is_first: bool, where: str) -> ChainStep:
    """A step without its default lead: that is a relatedAction on the step's own action,
    read by _leads and given to the step by _with_leads."""
    parts = _parts(extension, ("stage", "service", "where"), "step", where)
    urls = [p.get("url") for p in parts]
    stage = next((p.get("valueId") for p in parts if p.get("url") == "stage"), None)
    if urls.count("stage") != 1 or urls.count("service") != 1 or not isinstance(stage, str) \
            or not stage:
        raise ProtocolFormError(f"{where}: a step needs one stage (valueId) and one service")
    where = f"{where} step {stage}"
    rules = tuple(_lead_rule(p, where) for p in parts if p.get("url") == "where")
    # Leads count from the previous step's start: the first step has nothing to count from.
    if is_first and rules:
        raise ProtocolFormError(f"{where}: the first step of a chain has no lead (nor where)")
    return ChainStep(stage, _service(parts, where), None, rules)


def _books(action: dict[str, Any]) -> tuple[ChainStep, ...]:
    where = f"action {action.get('id')}"
    chains = [e for e in action.get("extension", []) if e.get("url") == BOOKS_CHAIN]
    if not chains:
        return ()
    if len(chains) > 1:
        raise ProtocolFormError(f"{where}: books-chain is given twice; one holds every step")
    parts = _parts(chains[0], ("step",), "books-chain", where)
    if not 1 <= len(parts) <= MAX_CHAIN_STEPS:
        raise ProtocolFormError(f"{where}: books-chain has {len(parts)} steps; it needs 1 "
                                f"to {MAX_CHAIN_STEPS}")
    where = f"{where} books-chain"
    steps = [_chain_step(part, index == 0, where) for index, part in enumerate(parts)]
    booked = [step.stage for step in steps]
    twice = sorted({stage for stage in booked if booked.count(stage) > 1})
    if twice:
        raise ProtocolFormError(f"{where}: stage {', '.join(twice)} is booked twice")
    return tuple(steps)


def _kind(definition: str | None, kinds: dict[str, str]) -> str:
    if definition is None:
        return "Task"
    return kinds.get(definition.split("|")[0], "Task")


def _stages(actions: list[dict[str, Any]], parent: str | None,
            kinds: dict[str, str]) -> Iterator[tuple[Stage, dict[str, Lead]]]:
    """Each action's stage, with its lead times (see _leads): a chain step's lead lives on
    the step's action, but the chain on the booking stage's, so they meet only once every
    action is read."""
    for action in actions:
        stage_id = action.get("id")
        if not stage_id:
            raise ProtocolFormError("every action needs an id")
        children = action.get("action", [])
        deadline = action.get("timingDuration")
        escalation = _extension(action, ESCALATION_ROLE)
        stage = Stage(
            id=stage_id, title=action.get("title") or stage_id,
            definition=action.get("definitionCanonical"),
            kind=_kind(action.get("definitionCanonical"), kinds), role=_role(action),
            after=_links(action, ("after-end", "after")),
            ends_before=_links(action, ("before-start", "before")),
            deadline=duration(deadline, f"action {stage_id} timing") if deadline else None,
            condition=_condition(action),
            escalation_role=escalation.get("valueCode") if escalation else None,
            on_failure=_on_failure(action), parent=parent,
            children=tuple(child.get("id", "") for child in children),
            assigns=_assigns(action), handoffs=_handoffs(action), books=_books(action))
        yield stage, _leads(action)
        yield from _stages(children, stage_id, kinds)


def definitions(actions: Sequence[dict[str, Any]]) -> list[str]:
    """Every action's definitionCanonical, nested actions included."""
    found: list[str] = []
    for action in actions:
        if action.get("definitionCanonical"):
            found.append(action["definitionCanonical"])
        found += definitions(action.get("action", []))
    return found


def from_plan_definition(plan: dict[str, Any],
                         activities: Sequence[dict[str, Any]] = ()) -> Protocol:
    """The protocol a PlanDefinition describes; `activities` give each stage's kind."""
    if plan.get("resourceType") != "PlanDefinition" or not plan.get("url"):
        raise ProtocolFormError("a protocol is a PlanDefinition with a url")
    kinds = {a["url"]: a.get("kind", "Task") for a in activities if a.get("url")}
    stages: dict[str, Stage] = {}
    leads: dict[str, dict[str, Lead]] = {}
    for stage, stage_leads in _stages(plan.get("action", []), None, kinds):
        if stage.id in stages:
            raise ProtocolFormError(f"action id {stage.id} is used twice")
        stages[stage.id] = stage
        leads[stage.id] = stage_leads
    _check_links(stages)
    _check_assigns(stages)
    _check_books(stages)
    stages = _with_leads(stages, leads)
    escalation = _extension(plan, ESCALATION_ROLE)
    return Protocol(url=plan["url"], version=plan.get("version"),
                    title=plan.get("title") or plan["url"], stages=stages,
                    escalation_role=escalation.get("valueCode") if escalation else None)


def _check_links(stages: dict[str, Stage]) -> None:
    for stage in stages.values():
        for link in (*stage.after, *stage.ends_before):
            other = stages.get(link.stage)
            if other is None or other.parent != stage.parent:
                raise ProtocolFormError(f"action {stage.id}: related action {link.stage} is "
                                        "not one of its siblings")
        if stage.on_failure and stage.on_failure.back_to not in stages:
            raise ProtocolFormError(f"action {stage.id}: on-failure goes back to unknown "
                                    f"action {stage.on_failure.back_to}")


def _check_assigns(stages: dict[str, Stage]) -> None:
    assigning = [stage.id for stage in stages.values() if stage.assigns is not None]
    if len(assigning) > 1:
        raise ProtocolFormError(f"actions {', '.join(assigning)} all assign the chain of "
                                "identity; one at most may")


def _check_books(stages: dict[str, Stage]) -> None:
    booking = [stage for stage in stages.values() if stage.books]
    if len(booking) > 1:
        raise ProtocolFormError(f"actions {', '.join(s.id for s in booking)} all book a "
                                "chain; one at most may")
    for stage in booking:
        unknown = [step.stage for step in stage.books if step.stage not in stages]
        if unknown:
            raise ProtocolFormError(f"action {stage.id}: books-chain books unknown action "
                                    f"{', '.join(unknown)}")


def _with_leads(stages: dict[str, Stage], leads: dict[str, dict[str, Lead]]
                ) -> dict[str, Stage]:
    """The stages with the booking stage's chain steps given their leads: each step after
    the first has one, on its action, from the previous step's action (a sibling). Any
    other after-start is refused: the engine would silently not run it."""
    booking = next((s for s in stages.values() if s.books), None)
    steps = booking.books if booking is not None else ()
    chained = {(step.stage, previous.stage) for previous, step in pairwise(steps)}
    for stage_id, links in leads.items():
        for other in links:
            if (stage_id, other) not in chained:
                raise ProtocolFormError(
                    f"action {stage_id}: relatedAction {other} after-start is used only for "
                    "the lead times of a booked chain (on a step's action, from the previous "
                    "step's)")
            if stages[other].parent != stages[stage_id].parent:
                raise ProtocolFormError(f"action {stage_id}: related action {other} is not "
                                        "one of its siblings")
    if booking is None:
        return stages
    led = [steps[0], *(_step_with_lead(step, previous, leads, booking.id)
                       for previous, step in pairwise(steps))]
    return {**stages, booking.id: replace(booking, books=tuple(led))}


def _step_with_lead(step: ChainStep, previous: ChainStep, leads: dict[str, dict[str, Lead]],
         booking: str) -> ChainStep:
    lead = leads[step.stage].get(previous.stage)
    if lead is None:
        raise ProtocolFormError(
            f"action {booking} books-chain step {step.stage}: every step after the first "
            f"needs a lead: a relatedAction after-start on action {step.stage}, from "
            f"{previous.stage}, with an offsetRange")
    return replace(step, lead=lead)
