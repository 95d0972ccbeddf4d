"""The printable custody report: what an inspector reads, escaped and well formed."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from html.parser import HTMLParser

from gateway.custody.model import CustodyReport, Excursion, Gap, Handoff, SignatureCheck
from gateway.custody.report_html import render

COI = "W1234 26 123456 A"
COLLECTED = datetime(2026, 11, 11, 9, 30, tzinfo=UTC)
INFUSED = COLLECTED + timedelta(days=12, hours=4, minutes=35)
GENERATED = datetime(2026, 11, 23, 14, 5, 59, tzinfo=UTC)
VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link",
                  "meta", "source", "track", "wbr"})


def signature(meaning: str, signer: str, when: datetime, *, organization: str | None = None,
              valid: bool = True, problem: str | None = None) -> SignatureCheck:
    return SignatureCheck(meaning=meaning, signer=signer, who=f"Practitioner/{signer[:3]}",
                          organization=organization, when=when, valid=valid, problem=problem)


def handoff(n: int, event: str, at: datetime, signatures: tuple[SignatureCheck, ...], *,
            required: tuple[str, ...] = ("released", "received"),
            scanned: str | None = COI, matches: bool = True) -> Handoff:
    return Handoff(provenance=f"Provenance/p{n}/_history/1", event=event.lower(),
                   event_display=event, at=at, product="BiologicallyDerivedProduct/bdp1/_history/2",
                   task=f"Task/t{n}/_history/1", location=f"Site {n}",
                   releasing=f"Releaser {n}", receiving=f"Receiver {n}",
                   scanned_coi=scanned, coi_matches=matches, required=required,
                   signatures=signatures)


def verified_report(**changes: object) -> CustodyReport:
    pickup = COLLECTED + timedelta(hours=3)
    receipt = COLLECTED + timedelta(days=1, hours=2)
    fields: dict[str, object] = dict(
        title="Chain of custody: CAR-T journey 42",
        coi=COI,
        patient="Élodie Durand",
        careplan="CarePlan/cp42",
        products=("BiologicallyDerivedProduct/bdp1/_history/2", "Specimen/apheresis1"),
        handoffs=(
            handoff(1, "Courier pickup", pickup, (
                signature("released", "Ana Silva", pickup, organization="Hospital A"),
                signature("received", "Ben Okafor", pickup + timedelta(minutes=4),
                          organization="FastCourier"))),
            handoff(2, "Manufacturer receipt", receipt, (
                signature("released", "Ben Okafor", receipt, organization="FastCourier"),
                signature("received", "Chloé Martin", receipt + timedelta(minutes=10),
                          organization="CellWorks"))),
        ),
        gaps=(), excursions=(),
        collected_at=COLLECTED, infused_at=INFUSED, generated_at=GENERATED,
    )
    fields.update(changes)
    return CustodyReport(**fields)  # type: ignore[arg-type]


def failing_report() -> CustodyReport:
    base = verified_report()
    at = COLLECTED + timedelta(days=2)
    bad = handoff(3, "Return shipment", at, (
        signature("released", "Chloé Martin", at, organization="CellWorks", valid=False,
                  problem="certificate revoked"),
        signature("received", "Dan Reyes", at + timedelta(minutes=2))),
        scanned="W1234 26 999999 B", matches=False)
    return verified_report(
        handoffs=(*base.handoffs, bad),
        gaps=(Gap(start=COLLECTED + timedelta(hours=1), end=COLLECTED + timedelta(hours=3),
                  after="Collection", before="Courier pickup", reason="no custodian signed"),
              Gap(start=at + timedelta(hours=1), end=None, after="Return shipment",
                  before=None, reason="awaiting receipt")),
        excursions=(Excursion(observation="Observation/t7", at=at + timedelta(hours=5),
                              value="-120 Cel", allowed="-196 to -150 Cel", flag="Flag/f1"),),
        infused_at=None,
        problems=("Provenance/p3: scanned COI does not match the registered one",),
    )


class Checker(HTMLParser):
    """Every element closed, in order; counts opened tables."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tables = 0
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables += 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.stack[-1:] != ["style"]:
            self.text.append(data)


def check(page: str) -> Checker:
    checker = Checker()
    checker.feed(page)
    checker.close()
    assert checker.errors == []
    assert checker.stack == []
    return checker


def text_of(page: str) -> str:
    """The text a reader sees, element by element, whitespace collapsed."""
    return re.sub(r"\s+", " ", " ".join(check(page).text))


def rows(page: str) -> list[str]:
    """Each table row's text, whitespace collapsed."""
    return [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", row))
            for row in re.findall(r"<tr>(.*?)</tr>", page, re.S)]


def test_a_verified_chain_reads_as_verified() -> None:
    report = verified_report()
    assert report.verified
    page = render(report)
    text = text_of(page)
    assert page.startswith("<!DOCTYPE html>")
    assert '<html lang="en">' in page and '<meta charset="utf-8">' in page
    assert "<title>Chain of custody: CAR-T journey 42</title>" in page
    assert "✓ Chain of custody verified" in text
    assert "NOT VERIFIED" not in text
    assert "Élodie Durand" in text and "CarePlan/cp42" in text
    assert "Specimen/apheresis1" in text
    assert "Generated 2026-11-23 14:05 UTC" in text
    for group in COI.split():
        assert f"<span>{group}</span>" in page
    assert 'class="coi"' in page
    assert "Vein-to-vein: 12 d 4 h" in text
    assert "Collected: 2026-11-11 09:30 UTC" in text
    assert "Infused: 2026-11-23 14:05 UTC" in text
    assert "Handoffs: 2" in text and "Gaps: 0" in text and "Excursions: 0" in text

    handoff_rows = rows(page)[1:3]  # the header row first
    for row, h in zip(handoff_rows, report.handoffs, strict=True):
        assert h.at.strftime("%Y-%m-%d %H:%M UTC") in row
        for value in (h.event_display, h.location, h.releasing, h.receiving, h.provenance):
            assert value is not None and value in row
        assert "✓ match" in row
        for s in h.signatures:
            assert s.when is not None
            line = (f"{s.signer} ({s.organization}) {s.meaning} · "
                    f"{s.when:%Y-%m-%d %H:%M} UTC · ✓ verified")
            assert line in row
    assert '<th scope="col">Signatures</th>' in page
    assert "<caption>" in page
    assert "No gaps: a custodian is recorded for the whole chain." in text
    assert "No temperature excursions recorded." in text
    assert "21 CFR Part 11 §11.50" in text and "printed name" in text
    assert "computed when this report was generated" in text


def test_a_failing_chain_shows_every_problem() -> None:
    report = failing_report()
    assert not report.verified
    page = render(report)
    text = text_of(page)
    assert "✗ NOT VERIFIED" in text
    assert "Provenance/p3: scanned COI does not match the registered one" in text
    assert "1 of 3 handoffs incomplete" in text
    assert "1 failed signature" in text
    assert "1 chain-of-identity mismatch" in text
    assert "✗ FAILED: certificate revoked" in text
    assert "W1234 26 999999 B" in text and "✗ mismatch" in text
    assert "✗ released (missing)" in text
    assert "Vein-to-vein: not yet infused" in text
    assert "Infused: —" in text
    assert "Gaps: 2" in text and "Excursions: 1" in text

    gap_rows = [r for r in rows(page) if "no custodian signed" in r or "awaiting" in r]
    assert len(gap_rows) == 2
    assert "2026-11-11 10:30 UTC" in gap_rows[0] and "Collection → Courier pickup" in gap_rows[0]
    assert "open" in gap_rows[1] and "Return shipment → no later handoff" in gap_rows[1]

    (excursion_row,) = [r for r in rows(page) if "-120 Cel" in r]
    for value in ("2026-11-13 14:30 UTC", "-196 to -150 Cel", "Flag/f1", "Observation/t7"):
        assert value in excursion_row
    assert "No gaps" not in text and "No temperature excursions" not in text


def test_partner_values_are_escaped() -> None:
    at = COLLECTED + timedelta(hours=3)
    hostile = "<script>alert(1)</script>"
    report = verified_report(
        title='Report "<b>x</b>"',
        handoffs=(handoff(1, "Pickup <img src=x>", at, (
            signature("released", hostile, at, organization="O'Brien & Co"),
            signature("received", "Ben", at, valid=False, problem="<i>bad</i>"))),),
        problems=("<iframe>",))
    page = render(report)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "O&#x27;Brien &amp; Co" in page
    assert "&lt;img src=x&gt;" in page and "<img" not in page
    assert "&lt;i&gt;bad&lt;/i&gt;" in page and "&lt;iframe&gt;" in page
    assert "<title>Report &quot;&lt;b&gt;x&lt;/b&gt;&quot;</title>" in page
    assert hostile in text_of(page)  # a reader sees the name as written


def test_no_scripts_or_external_resources_and_print_layout() -> None:
    page = render(failing_report())
    lowered = page.lower()
    for forbidden in ("<script", "<link", "src=", "href=", "url(", "@import", "http://",
                      "https://"):
        assert forbidden not in lowered
    assert "@media print" in page and "size: A4" in page
    assert "page-break-inside: avoid" in page


def test_a_patient_known_by_coi_alone() -> None:
    text = text_of(render(verified_report(patient=None)))
    assert "Patient identified by chain of identity only" in text


def test_tables_open_and_close() -> None:
    assert check(render(verified_report())).tables == 1
    assert check(render(failing_report())).tables == 3
    empty = verified_report(handoffs=(), coi=None, careplan=None, products=(),
                            collected_at=None, infused_at=None)
    text = text_of(render(empty))
    assert check(render(empty)).tables == 0
    assert "No custody handoffs recorded." in text
    assert "no chain-of-identity code recorded" in text
    assert "Vein-to-vein: not yet infused" in text


def test_times_are_shown_in_utc() -> None:
    paris = timezone(timedelta(hours=1))
    report = verified_report(collected_at=datetime(2026, 11, 11, 10, 30, tzinfo=paris),
                             infused_at=datetime(2026, 11, 23, 15, 5, tzinfo=paris),
                             generated_at=datetime(2026, 11, 24, 0, 0))  # naive: UTC
    text = text_of(render(report))
    assert "Collected: 2026-11-11 09:30 UTC" in text
    assert "Infused: 2026-11-23 14:05 UTC" in text
    assert "Generated 2026-11-24 00:00 UTC" in text
