"""The custody report: an enrolment's identity and custody chain, as an inspector reads it.

`BiologicallyDerivedProduct/{id}/$custody-report`, `Specimen/{id}/$custody-report` and
`CarePlan/{id}/$custody-report` answer the same report: the enrolment (found through the
product's chain-of-identity code, or the CarePlan itself), every custody handoff recorded
against its Tasks in time order with each signature verified now, the gaps in which no
custodian is recorded, the temperature excursions, and vein-to-vein time. As a FHIR Bundle
(a summary Parameters first, then the records it rests on), or, with `_format=html` or
`Accept: text/html`, as a printable document (gateway/custody/report_html.py).

`Provenance/{id}/$verify-signatures` verifies one record's signatures on demand.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gateway import jsonio
from gateway.auth.redaction import BLIND_ROLES
from gateway.custody import excursions, handoffs
from gateway.custody.coi import COI_SYSTEM, careplan_of_code, coi_of, eye_readable
from gateway.custody.model import CustodyReport, Excursion, Gap, Handoff, SignatureCheck
from gateway.custody.report_html import render
from gateway.errors import MethodNotAllowedError, NotFoundError
from gateway.services import visibility
from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.services.search import match_ids
from gateway.store.repository import Repository, Version
from gateway.store.timeparse import format_instant, now_micros

HTML = "text/html; charset=utf-8"
PRODUCT_TYPES = handoffs.PRODUCTS
REPORTED = ("CarePlan", *PRODUCT_TYPES)  # the types $custody-report is asked of
MAX_RECORDS = 10_000  # Tasks, Provenances or Observations one report reads


def _instant(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _name(repo: Repository, reference: dict[str, Any] | None) -> str | None:
    """How a reference reads: its display, else the name of what it points at (an
    Organization, Location or Practitioner), else the reference itself."""
    if not reference:
        return None
    if reference.get("display"):
        return str(reference["display"])
    target = reference.get("reference")
    parts = target.split("/") if isinstance(target, str) else []
    if len(parts) == 2 and parts[0] in ("Organization", "Location", "Practitioner"):
        found = repo.read(parts[0], parts[1])
        name = found.resource().get("name") if found and not found.deleted else None
        if isinstance(name, str) and name:
            return name
        if isinstance(name, list) and name and isinstance(name[0], dict):
            text = " ".join([*name[0].get("given", []), name[0].get("family", "")]).strip()
            if text:
                return text
    return target if isinstance(target, str) else None


# -- finding the chain ----------------------------------------------------------------------
def _visible(ctx: Context, repo: Repository, resource_type: str, resource_id: str) -> Version:
    found = repo.read(resource_type, resource_id)
    if found is None or found.deleted:
        raise NotFoundError(f"{resource_type}/{resource_id} is not known")
    if visibility.criteria(ctx, resource_type) is not None:
        visibility.check_visible(ctx, repo, resource_type, resource_id)
    return found


def _custody_records(repo: Repository, task_ids: list[str],
                     product_keys: list[tuple[str, str]]) -> list[Version]:
    """The custody Provenances naming any of these Tasks or products."""
    ids: dict[str, None] = {}
    for provenance_id, _ in repo.referring("Provenance", "target", "Task", task_ids):
        ids[provenance_id] = None
    for product_type, product_id in product_keys:
        for provenance_id, _ in repo.referring("Provenance", "target", product_type,
                                               [product_id]):
            ids[provenance_id] = None
    found = repo.read_many([("Provenance", i) for i in list(ids)[:MAX_RECORDS]])
    return [v for v in found.values() if handoffs.custody_event(v.resource())]


def build(ctx: Context, repo: Repository, careplan: Version | None,
          product: Version | None) -> CustodyReport:
    """The report of an enrolment (and of the product asked about, if any)."""
    task_ids = ([i for i, _ in repo.referring("Task", "based-on", "CarePlan", [careplan.id])]
                if careplan is not None else [])
    keys = [(product.resource_type, product.id)] if product is not None else []
    records = _custody_records(repo, task_ids[:MAX_RECORDS], keys)
    chain = sorted((_handoff(ctx, repo, r) for r in records), key=lambda h: h.at)
    products = sorted({h.product.split("/_history")[0] for h in chain}
                      | {f"{t}/{i}" for t, i in keys})
    plan = careplan.resource() if careplan is not None else {}
    code = coi_of(plan) or (coi_of(product.resource()) if product is not None else None)
    problems = [f"{h.event_display} at {h.at:%Y-%m-%d %H:%M} is not completely signed"
                for h in chain if not h.complete]
    problems += [f"{h.event_display}: scanned chain of identity does not match"
                 for h in chain if not h.coi_matches]
    gaps = _gaps(chain)
    problems += [f"no custodian recorded from {g.start:%Y-%m-%d %H:%M}: {g.reason}"
                 for g in gaps]
    infused = next((h.at for h in chain if h.event == "infusion"), None)
    # The cells infused are the last ones collected before (a failed batch means a new
    # collection): vein-to-vein runs from that collection.
    collected = max((h.at for h in chain if h.event == "collection"
                     and (infused is None or h.at <= infused)), default=None)
    return CustodyReport(
        title=f"Chain of identity and custody — {plan.get('title') or 'enrolment'}",
        coi=eye_readable(code) if code else None, patient=_patient(ctx, repo, plan),
        careplan=f"CarePlan/{careplan.id}" if careplan is not None else None,
        products=tuple(products), handoffs=tuple(chain), gaps=tuple(gaps),
        excursions=tuple(_excursions(ctx, repo, products)),
        collected_at=collected, infused_at=infused, generated_at=datetime.now(UTC),
        problems=tuple(problems))


def _patient(ctx: Context, repo: Repository, plan: dict[str, Any]) -> str | None:
    """The patient's name, for readers who may see it (never for blind partners)."""
    if ctx.grant is not None and ctx.grant.client.role in BLIND_ROLES:
        return None
    reference = plan.get("subject", {}).get("reference", "")
    if not reference.startswith("Patient/"):
        return None
    found = repo.read("Patient", reference.split("/", 1)[1])
    if found is None or found.deleted:
        return None
    names = found.resource().get("name", [])
    if not names:
        return reference
    name = names[0]
    return " ".join([*name.get("given", []), name.get("family", "")]).strip() or reference


def _handoff(ctx: Context, repo: Repository, record: Version) -> Handoff:
    """One record as the report shows it, every check made now."""
    provenance = record.resource()
    event = handoffs.custody_event(provenance) or ""
    versions: dict[str, dict[str, Any] | None] = {}
    product = task = None
    expected = None
    for target in provenance.get("target", []):
        reference = target.get("reference", "")
        parts = reference.split("/")
        found = (repo.vread(parts[0], parts[1], int(parts[3]))
                 if len(parts) == 4 and parts[3].isdigit() else None)
        versions[reference] = found.resource() if found and not found.deleted else None
        if parts[0] in PRODUCT_TYPES:
            product = reference
            expected = coi_of(versions[reference])
        elif parts[0] == "Task":
            task = reference
    scanned = handoffs.scanned_coi(provenance)
    matches = bool(scanned and expected and handoffs.scan_problem(scanned, expected) is None)
    checks = []
    for signature in provenance.get("signature", []):
        check = handoffs.verify_one(repo, signature, provenance, versions)
        checks.append(SignatureCheck(
            meaning=check.meaning or "?", signer=_name(repo, signature.get("who")) or "?",
            who=signature.get("who", {}).get("reference"),
            organization=_name(repo, signature.get("onBehalfOf")),
            when=_instant(signature.get("when")), valid=check.valid, problem=check.problem))
    return Handoff(
        provenance=f"Provenance/{record.id}/_history/{record.version}", event=event,
        event_display=handoffs.EVENTS.get(event, event),
        at=_instant(provenance.get("occurredDateTime")) or _instant(provenance.get("recorded"))
        or datetime.fromtimestamp(record.last_updated / 1e6, UTC),
        product=product or "?", task=task, location=_name(repo, provenance.get("location")),
        releasing=_name(repo, handoffs.party(provenance, "releasing")),
        receiving=_name(repo, handoffs.party(provenance, "receiving")),
        scanned_coi=scanned, coi_matches=matches,
        required=_required(ctx, repo, provenance, task, event), signatures=tuple(checks),
        releasing_ref=(handoffs.party(provenance, "releasing") or {}).get("reference"),
        receiving_ref=(handoffs.party(provenance, "receiving") or {}).get("reference"))


def _required(ctx: Context, repo: Repository, provenance: dict[str, Any], task: str | None,
              event: str) -> tuple[str, ...]:
    parts = (task or "").split("/")
    found = repo.vread("Task", parts[1], int(parts[3])) if len(parts) == 4 else None
    stage = handoffs.stage_of(ctx, repo, found.resource()) if found and not found.deleted \
        else None
    rule = stage.handoff(event) if stage is not None else None
    return rule.required(*handoffs.site_of(repo, provenance)) if rule is not None else ()


def _gaps(chain: list[Handoff]) -> list[Gap]:
    """Where the party that took the product is not the one that hands it on next, or a
    handoff left nobody holding it."""
    gaps = []
    for before, after in zip(chain, chain[1:], strict=False):
        if before.receiving_ref is None:
            gaps.append(Gap(before.at, after.at, before.event_display, after.event_display,
                            f"{before.event_display} names no receiving party"))
        elif after.releasing_ref is not None and after.releasing_ref != before.receiving_ref:
            gaps.append(Gap(before.at, after.at, before.event_display, after.event_display,
                            f"{before.receiving} took custody, but {after.releasing} handed "
                            "it on"))
    if chain and chain[-1].receiving_ref is None and chain[-1].event != "infusion":
        gaps.append(Gap(chain[-1].at, None, chain[-1].event_display, None,
                        f"{chain[-1].event_display} names no receiving party"))
    return gaps


def _excursions(ctx: Context, repo: Repository, products: list[str]) -> list[Excursion]:
    found = []
    for product in products:
        product_type, product_id = product.split("/", 1)
        ids = [i for i, _ in repo.referring("Observation", "focus", product_type,
                                            [product_id])]
        for observation in repo.read_many([("Observation", i) for i in ids]).values():
            resource = observation.resource()
            hit = excursions.excursion(repo, resource)
            if hit is None:
                continue
            reading, allowed, _ = hit
            flags = match_ids(ctx, repo, "Flag", [
                ("identifier", f"{excursions.FLAGGED}|{observation.reference}")], limit=1)
            at = (_instant(resource.get("effectiveDateTime"))
                  or _instant(resource.get("effectivePeriod", {}).get("start"))
                  or datetime.fromtimestamp(observation.last_updated / 1e6, UTC))
            found.append(Excursion(observation.reference, at, reading.text(), allowed.text(),
                                   f"Flag/{flags[0]}" if flags else None))
    return sorted(found, key=lambda e: e.at)


# -- the operations ---------------------------------------------------------------------------
def op_custody_report(ctx: Context, request: FhirRequest, resource_type: str,
                      resource_id: str) -> FhirResponse:
    if request.method != "GET":
        raise MethodNotAllowedError("$custody-report is read with GET", headers={"Allow": "GET"})
    with ctx.reading() as repo:
        asked = _visible(ctx, repo, resource_type, resource_id)
        careplan: Version | None = asked
        product: Version | None = None
        if resource_type != "CarePlan":
            code = coi_of(asked.resource())
            careplan, product = (careplan_of_code(repo, code) if code else None), asked
        report = build(ctx, repo, careplan, product)
        bundle = _bundle(ctx, repo, report)
    if wants_html(request):
        return FhirResponse(200, render(report).encode(), {"Content-Type": HTML})
    return FhirResponse(200, jsonio.dumps(bundle))


def wants_html(request: FhirRequest) -> bool:
    fmt = next((v for k, v in reversed(request.query) if k == "_format"), None)
    if fmt is not None:
        return fmt in ("html", "text/html")
    return "text/html" in (request.header("accept") or "")


def _bundle(ctx: Context, repo: Repository, report: CustodyReport) -> dict[str, Any]:
    """A collection Bundle: the summary Parameters, then each record it rests on."""
    references = [h.provenance for h in report.handoffs] + [
        e.observation for e in report.excursions] + [
        e.flag for e in report.excursions if e.flag]
    entries: list[dict[str, Any]] = [{"resource": summary(report)}]
    for reference in references:
        parts = reference.split("/")
        version: Version | None = (repo.vread(parts[0], parts[1], int(parts[3]))
                                   if len(parts) == 4 else repo.read(parts[0], parts[1]))
        if version is not None and not version.deleted:
            entries.append({"fullUrl": ctx.url(parts[0], parts[1]),
                            "resource": version.resource()})
    return {"resourceType": "Bundle", "type": "collection",
            "timestamp": format_instant(now_micros()), "entry": entries}


def summary(report: CustodyReport) -> dict[str, Any]:
    """The report's findings as a Parameters resource."""
    params: list[dict[str, Any]] = [
        {"name": "verified", "valueBoolean": report.verified}]
    if report.coi:
        params.append({"name": "chain-of-identity",
                       "valueIdentifier": {"system": COI_SYSTEM,
                                           "value": report.coi.replace(" ", "")}})
    if report.careplan:
        params.append({"name": "careplan", "valueReference": {"reference": report.careplan}})
    if report.vein_to_vein is not None:
        params.append({"name": "vein-to-vein", "valueQuantity": {
            "value": round(report.vein_to_vein.total_seconds() / 3600, 1), "unit": "h",
            "system": "http://unitsofmeasure.org", "code": "h"}})
    for handoff in report.handoffs:
        parts = [{"name": "provenance", "valueReference": {"reference": handoff.provenance}},
                 {"name": "event", "valueCode": handoff.event},
                 {"name": "at", "valueDateTime": handoff.at.isoformat()},
                 {"name": "chain-of-identity-matches", "valueBoolean": handoff.coi_matches},
                 {"name": "complete", "valueBoolean": handoff.complete}]
        parts += [{"name": "required", "valueCode": m} for m in handoff.required]
        parts += [signature_parameter(check) for check in handoff.signatures]
        params.append({"name": "handoff", "part": parts})
    for gap in report.gaps:
        part = [{"name": "start", "valueDateTime": gap.start.isoformat()},
                {"name": "reason", "valueString": gap.reason}]
        if gap.end is not None:
            part.append({"name": "end", "valueDateTime": gap.end.isoformat()})
        params.append({"name": "gap", "part": part})
    for found in report.excursions:
        params.append({"name": "excursion", "part": [
            {"name": "observation", "valueReference": {"reference": found.observation}},
            {"name": "reading", "valueString": found.value},
            {"name": "allowed", "valueString": found.allowed}]})
    params += [{"name": "problem", "valueString": p} for p in report.problems]
    return {"resourceType": "Parameters", "parameter": params}


def signature_parameter(check: SignatureCheck) -> dict[str, Any]:
    """One signature's verification, as a Parameters part."""
    part: list[dict[str, Any]] = [{"name": "meaning", "valueCode": check.meaning},
                                  {"name": "signer", "valueString": check.signer},
                                  {"name": "verified", "valueBoolean": check.valid}]
    if check.problem:
        part.append({"name": "problem", "valueString": check.problem})
    return {"name": "signature", "part": part}


def op_verify_signatures(ctx: Context, request: FhirRequest, provenance_id: str) -> FhirResponse:
    """Provenance/{id}/$verify-signatures: each signature checked against the versions it
    names, as they are stored now."""
    with ctx.reading() as repo:
        record = _visible(ctx, repo, "Provenance", provenance_id)
        handoff = _handoff(ctx, repo, record)
    params: list[dict[str, Any]] = [{"name": "verified", "valueBoolean": bool(
        handoff.signatures) and all(s.valid for s in handoff.signatures)}]
    params += [signature_parameter(check) for check in handoff.signatures]
    return FhirResponse(200, jsonio.dumps({"resourceType": "Parameters", "parameter": params}))
