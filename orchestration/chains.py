"""The chain a protocol books in one go (multi-step scheduling), as the engine sees it.

A booking stage of a protocol (YAML key `books:`, see orchestration/PROTOCOLS.md) lists
the steps to be booked together, in time order: each names the stage it books for, the
service it needs (a HealthcareService type: apheresis, manufacturing, infusion…) and,
after the first, the lead time from the previous step's start, which a site, a country or
the request's priority may override. Pure values: the chain search
(orchestration/scheduling.py) and the protocol reader (orchestration/protocol.py) share
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

# CodeSystem ATM/CodeSystem/scheduling-service: the services a chain step may need.
SERVICE_SYSTEM = "https://atm-gateway.org/fhir/CodeSystem/scheduling-service"
# FHIR request priorities (http://hl7.org/fhir/request-priority), most routine first.
PRIORITIES = ("routine", "urgent", "asap", "stat")


@dataclass(frozen=True)
class Lead:
    """How long after the previous step's start this step may start: at least `min`,
    at most `max`."""

    min: timedelta
    max: timedelta

    def __post_init__(self) -> None:
        if self.min < timedelta(0) or self.max < self.min:
            raise ValueError(f"a lead time needs 0 <= min <= max (min {self.min}, "
                             f"max {self.max})")


@dataclass(frozen=True)
class LeadRule:
    """An override of a step's lead time: at one site (a Location reference), in one
    country (ISO 3166 alpha-2), or for one request priority. Exactly one is set."""

    lead: Lead
    country: str | None = None
    site: str | None = None
    priority: str | None = None

    def matches(self, country: str | None, site: str | None, priority: str | None) -> bool:
        return ((self.country is not None and self.country == (country or "").upper())
                or (self.site is not None and self.site == site)
                or (self.priority is not None and self.priority == priority))


@dataclass(frozen=True)
class ChainStep:
    """One step of a chain: the stage it books for, the service it needs, and (after the
    first step) its lead time from the previous step's start."""

    stage: str
    service: str
    lead: Lead | None = None
    where: tuple[LeadRule, ...] = ()

    def lead_for(self, country: str | None = None, site: str | None = None,
                 priority: str | None = None) -> Lead | None:
        """The lead time at this site and country for this priority: the first matching
        override, else the default."""
        for rule in self.where:
            if rule.matches(country, site, priority):
                return rule.lead
        return self.lead
