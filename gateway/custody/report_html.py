"""The custody report as a printable HTML document an inspector can read.

One self-contained HTML5 page (inline CSS, no scripts, no external resources) laid out
for A4. Every value comes from partners' resources, so each one goes through
``html.escape`` before it reaches the page; the only unescaped text is the markup here.
Times are shown in UTC; a naive ``datetime`` is taken to be UTC already."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from html import escape

from gateway.custody.model import CustodyReport, Excursion, Gap, Handoff, SignatureCheck

NONE = "—"
OK = "✓"
FAIL = "✗"

# Colours are backed by text and a symbol everywhere; each pair is at least 4.5:1
# (dark green on pale green ~8:1, dark red on pale red ~7:1, grey text on white ~7:1).
CSS = """
@page { size: A4; margin: 15mm 12mm 18mm 12mm; }
* { box-sizing: border-box; }
body { font-family: "Helvetica Neue", Arial, sans-serif; font-size: 10pt; color: #111;
       background: #fff; line-height: 1.35; margin: 0 auto; max-width: 186mm; }
h1 { font-size: 16pt; margin: 0 0 4mm 0; }
h2 { font-size: 12pt; margin: 6mm 0 2mm 0; border-bottom: 1px solid #444; }
dl.header { display: grid; grid-template-columns: max-content 1fr; gap: 1mm 4mm; margin: 0; }
dl.header dt { font-weight: bold; }
dl.header dd { margin: 0; }
.coi { font-family: "Courier New", Courier, monospace; font-size: 18pt; font-weight: bold;
       letter-spacing: 0.15em; word-spacing: 0.5em; }
.coi span { white-space: nowrap; }
.verdict { border: 2px solid; padding: 3mm 4mm; margin: 5mm 0; }
.verdict p { margin: 0; font-size: 14pt; font-weight: bold; }
.verdict ul { margin: 2mm 0 0 0; padding-left: 6mm; }
.verdict.ok { color: #1b5e20; background: #e8f5e9; border-color: #1b5e20; }
.verdict.fail { color: #8e0000; background: #ffebee; border-color: #8e0000; }
.summary { margin: 0; }
table { width: 100%; border-collapse: collapse; font-size: 8.5pt; }
caption { text-align: left; font-weight: bold; padding-bottom: 1mm; }
th, td { border: 1px solid #666; padding: 1mm 1.5mm; text-align: left; vertical-align: top; }
th { background: #eee; }
td ul { list-style: none; margin: 0; padding: 0; }
td li + li { margin-top: 1mm; }
.ref { display: block; font-size: 7pt; color: #444; word-break: break-all; }
.mono { font-family: "Courier New", Courier, monospace; }
.bad { color: #8e0000; font-weight: bold; }
.good { color: #1b5e20; }
footer { margin-top: 6mm; border-top: 1px solid #444; padding-top: 2mm; font-size: 8pt; }
@media print {
  body { max-width: none; }
  tr, .verdict, dl.header { page-break-inside: avoid; break-inside: avoid; }
  thead { display: table-header-group; }
  h2 { page-break-after: avoid; break-after: avoid; }
}
"""


def render(report: CustodyReport) -> str:
    """The report as one self-contained HTML5 document (inline CSS, no scripts, no
    external resources), laid out for printing on A4."""
    body = "\n".join([
        _header(report),
        _verdict(report),
        _summary(report),
        _handoffs(report.handoffs),
        _gaps(report.gaps),
        _excursions(report.excursions),
        _footer(report),
    ])
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(report.title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


# -- values -------------------------------------------------------------------------------

def _e(value: object) -> str:
    """A value as HTML text: escaped, and None as a dash."""
    return NONE if value is None else escape(str(value), quote=True)


def _time(moment: datetime | None) -> str:
    """A moment in UTC, e.g. ``2026-11-23 14:05 UTC`` (escaped already: digits only)."""
    if moment is None:
        return NONE
    utc = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%d %H:%M UTC")


def _duration(span: timedelta) -> str:
    """A span in whole days and hours, e.g. ``12 d 4 h``."""
    sign = "−" if span < timedelta(0) else ""
    hours = int(abs(span).total_seconds() // 3600)
    days, hours = divmod(hours, 24)
    return f"{sign}{days} d {hours} h"


def _coi(code: str | None) -> str:
    """The chain-of-identity code, its groups kept as given and spaced for reading."""
    if not code:
        return '<span class="bad">no chain-of-identity code recorded</span>'
    groups = " ".join(f"<span>{_e(group)}</span>" for group in code.split())
    return f'<span class="coi">{groups}</span>'


def _mark(ok: bool, good: str, bad: str) -> str:
    """A result as symbol and words, so colour is never the only signal."""
    if ok:
        return f'<span class="good">{OK} {good}</span>'
    return f'<span class="bad">{FAIL} {bad}</span>'


def _list(items: Iterable[str]) -> str:
    """Already-built HTML fragments as a list, one per line."""
    lines = "".join(f"<li>{item}</li>" for item in items)
    return f"<ul>{lines}</ul>" if lines else NONE


def _table(caption: str, headings: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """A table of already-built HTML cells, with a caption and column headers."""
    head = "".join(f'<th scope="col">{heading}</th>' for heading in headings)
    body = "\n".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                     for row in rows)
    return (f"<table>\n<caption>{caption}</caption>\n<thead><tr>{head}</tr></thead>\n"
            f"<tbody>\n{body}\n</tbody>\n</table>")


# -- sections -----------------------------------------------------------------------------

def _header(report: CustodyReport) -> str:
    patient = (_e(report.patient) if report.patient is not None
               else "<em>identified by chain of identity only</em>")
    products = _list(f'<span class="mono">{_e(p)}</span>' for p in report.products)
    fields = [
        ("Chain of identity", _coi(report.coi)),
        ("Patient", patient),
        ("CarePlan", f'<span class="mono">{_e(report.careplan)}</span>'),
        ("Products", products),
        ("Generated", _time(report.generated_at)),
    ]
    rows = "\n".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in fields)
    return (f"<header>\n<h1>{_e(report.title)}</h1>\n"
            f'<dl class="header">\n{rows}\n</dl>\n</header>')


def _verdict(report: CustodyReport) -> str:
    if report.verified:
        return ('<section class="verdict ok" aria-label="Verdict">\n'
                f"<p>{OK} Chain of custody verified</p>\n</section>")
    incomplete = sum(1 for h in report.handoffs if not h.complete)
    failed = sum(1 for h in report.handoffs for s in h.signatures if not s.valid)
    mismatched = sum(1 for h in report.handoffs if not h.coi_matches)
    counts = [
        f"{incomplete} of {len(report.handoffs)} handoffs incomplete",
        f"{failed} failed signature{'' if failed == 1 else 's'}",
        f"{mismatched} chain-of-identity mismatch{'' if mismatched == 1 else 'es'}",
    ]
    items = [_e(problem) for problem in report.problems] + counts
    return ('<section class="verdict fail" aria-label="Verdict">\n'
            f"<p>{FAIL} NOT VERIFIED</p>\n{_list(items)}\n</section>")


def _summary(report: CustodyReport) -> str:
    span = report.vein_to_vein
    if span is not None:
        v2v = _duration(span)
    elif report.infused_at is None:
        v2v = "not yet infused"
    else:
        v2v = "unknown (collection time not recorded)"
    parts = [
        f"<strong>Vein-to-vein:</strong> {v2v}",
        f"<strong>Collected:</strong> {_time(report.collected_at)}",
        f"<strong>Infused:</strong> {_time(report.infused_at)}",
        f"<strong>Handoffs:</strong> {len(report.handoffs)}",
        f"<strong>Gaps:</strong> {len(report.gaps)}",
        f"<strong>Excursions:</strong> {len(report.excursions)}",
    ]
    return '<p class="summary">' + " · ".join(parts) + "</p>"


def _signature(sig: SignatureCheck) -> str:
    on_behalf = f" ({_e(sig.organization)})" if sig.organization else ""
    failed = f"FAILED: {_e(sig.problem or 'reason not recorded')}"
    result = _mark(sig.valid, "verified", failed)
    return (f"<strong>{_e(sig.signer)}</strong>{on_behalf}<br>"
            f"{_e(sig.meaning)} · {_time(sig.when)} · {result}")


def _required(handoff: Handoff) -> str:
    signed = {s.meaning for s in handoff.signatures if s.valid}
    return _list(_mark(m in signed, _e(m), f"{_e(m)} (missing)") for m in handoff.required)


def _scanned(handoff: Handoff) -> str:
    scanned = (f'<span class="mono">{_e(handoff.scanned_coi)}</span>'
               if handoff.scanned_coi else "not scanned")
    return f"{scanned}<br>{_mark(handoff.coi_matches, 'match', 'mismatch')}"


def _handoff_row(handoff: Handoff) -> list[str]:
    event = (f"{_e(handoff.event_display)}"
             f'<span class="ref">{_e(handoff.provenance)}</span>')
    return [
        _time(handoff.at),
        event,
        _e(handoff.location),
        _e(handoff.releasing),
        _e(handoff.receiving),
        _scanned(handoff),
        _required(handoff),
        _list(_signature(s) for s in handoff.signatures),
    ]


def _handoffs(handoffs: tuple[Handoff, ...]) -> str:
    heading = "<h2>Handoffs</h2>"
    if not handoffs:
        return f"<section>\n{heading}\n<p>No custody handoffs recorded.</p>\n</section>"
    table = _table(
        "Custody handoffs in time order, with each signature as verified now",
        ["Time", "Event", "Location", "From (releasing)", "To (receiving)",
         "Scanned COI", "Required", "Signatures"],
        (_handoff_row(h) for h in handoffs))
    return f"<section>\n{heading}\n{table}\n</section>"


def _gap_row(gap: Gap) -> list[str]:
    end = _time(gap.end) if gap.end is not None else '<span class="bad">open</span>'
    before = _e(gap.before) if gap.before is not None else "no later handoff"
    return [_time(gap.start), end, f"{_e(gap.after)} → {before}", _e(gap.reason)]


def _gaps(gaps: tuple[Gap, ...]) -> str:
    heading = "<h2>Gaps in custody</h2>"
    if not gaps:
        return (f"<section>\n{heading}\n"
                "<p>No gaps: a custodian is recorded for the whole chain.</p>\n</section>")
    table = _table("Times with no custodian recorded",
                   ["Start", "End", "Between", "Reason"], (_gap_row(g) for g in gaps))
    return f"<section>\n{heading}\n{table}\n</section>"


def _excursion_row(excursion: Excursion) -> list[str]:
    reading = f'{_e(excursion.value)}<span class="ref">{_e(excursion.observation)}</span>'
    return [_time(excursion.at), reading, _e(excursion.allowed),
            f'<span class="mono">{_e(excursion.flag)}</span>']


def _excursions(excursions: tuple[Excursion, ...]) -> str:
    heading = "<h2>Temperature excursions</h2>"
    if not excursions:
        return f"<section>\n{heading}\n<p>No temperature excursions recorded.</p>\n</section>"
    table = _table("Readings outside the storage range",
                   ["Time", "Reading", "Allowed range", "Flag"],
                   (_excursion_row(x) for x in excursions))
    return f"<section>\n{heading}\n{table}\n</section>"


def _footer(report: CustodyReport) -> str:
    return (
        "<footer>\n<p>Each electronic signature is shown with the elements required by "
        "21 CFR Part 11 §11.50: the printed name of the signer, the date and time of "
        "signing (UTC), and the meaning of the signature (such as review, approval, "
        "responsibility or authorship). Signature verification results were computed when "
        f"this report was generated, at {_time(report.generated_at)}.</p>\n</footer>"
    )
