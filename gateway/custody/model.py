"""What a custody report says, as plain values: built from the store by
gateway/custody/report.py, rendered as a FHIR Bundle there and as a printable HTML
document by gateway/custody/report_html.py."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class SignatureCheck:
    """One signature on a handoff, and whether it verifies now."""

    meaning: str  # released | received | verified | witnessed | performed
    signer: str  # the printed name (Signature.who.display, else the reference)
    who: str | None  # Reference of the signer
    organization: str | None  # on whose behalf
    when: datetime | None
    valid: bool
    problem: str | None = None  # why it does not verify


@dataclass(frozen=True)
class Handoff:
    """One custody event (a Provenance), in time order."""

    provenance: str  # Provenance/<id>/_history/<n>
    event: str  # code of https://atm-gateway.org/fhir/CodeSystem/custody-event
    event_display: str
    at: datetime
    product: str  # the versioned product (BiologicallyDerivedProduct or Specimen)
    task: str | None  # the versioned custody Task
    location: str | None  # its display, else its reference
    releasing: str | None  # display, else reference, of the party handing over
    receiving: str | None  # of the party taking custody
    scanned_coi: str | None
    coi_matches: bool
    required: tuple[str, ...]  # the meanings the policy asked for
    signatures: tuple[SignatureCheck, ...]
    releasing_ref: str | None = None  # the parties' references (gaps compare these)
    receiving_ref: str | None = None

    @property
    def complete(self) -> bool:
        """Every required meaning signed by a signature that verifies."""
        signed = {s.meaning for s in self.signatures if s.valid}
        return all(m in signed for m in self.required) and all(s.valid for s in self.signatures)


@dataclass(frozen=True)
class Gap:
    """Time in which nobody is known to have held the product."""

    start: datetime
    end: datetime | None  # None: still open when the report was made
    after: str  # the handoff before it (its event display)
    before: str | None  # the handoff after it
    reason: str


@dataclass(frozen=True)
class Excursion:
    """A temperature reading outside the product's storage range."""

    observation: str  # Observation/<id>
    at: datetime
    value: str  # as read, with its unit ("-120 Cel")
    allowed: str  # the range it left ("-196 to -150 Cel")
    flag: str | None  # Flag/<id> raised for it


@dataclass(frozen=True)
class CustodyReport:
    title: str
    coi: str | None  # the chain-of-identity code, eye-readable
    patient: str | None  # the patient's name, None for readers who work by COI alone
    careplan: str | None  # CarePlan/<id>
    products: tuple[str, ...]  # the products the report covers
    handoffs: tuple[Handoff, ...]
    gaps: tuple[Gap, ...]
    excursions: tuple[Excursion, ...]
    collected_at: datetime | None
    infused_at: datetime | None
    generated_at: datetime
    problems: tuple[str, ...] = ()  # what an inspector must look at (mismatches, unsigned)

    @property
    def vein_to_vein(self) -> timedelta | None:
        if self.collected_at is None or self.infused_at is None:
            return None
        return self.infused_at - self.collected_at

    @property
    def verified(self) -> bool:
        """Every handoff complete, its COI matching, and nothing else wrong."""
        return (all(h.complete and h.coi_matches for h in self.handoffs)
                and not self.problems)
