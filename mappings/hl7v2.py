"""HL7 v2 for the LIMS bridge: ORU^R01 results in, OML^O21 manufacturing orders out, and
the acknowledgements of both. Pure: text in, plain values out, keyed by chain of
identity (python-hl7 parses; nothing here touches a socket, a database or a clock).

The ORU^R01 we accept (v2.3 to v2.8; segments we do not use are ignored):

  MSH-3, MSH-4, MSH-10  sending application, facility, control id: the message's identity
                        (a duplicate has the same three)
  MSH-7                 when sent; its UTC offset applies to times sent without one (else UTC)
  MSH-9                 ORU^R01 (anything else is rejected: AR)
  PID-3 of type COI     the chain-of-identity code (CX-5 identifier type `COI`), and/or
  SPM-2                 the same code as the product's identifier; given twice, they agree
  OBX-3 BATCH-RELEASE   (coding system 99ATM) OBX-5 RELEASED or FAILED; the reason in
                        OBX-5.2 and the NTEs after it; OBX-11 F or C; OBX-14 when
  OBX-3 EXPECTED-RELEASE (99ATM) OBX-2 DT, DTM or TS; OBX-5 the date (alone: end of day)
  any other OBX         a QC result: OBX-2 NM, SN (comparator and number), ST, TX, FT, CE,
                        CWE, CNE, DT, DTM, TS; OBX-3 code (LN: LOINC, SCT: SNOMED CT,
                        others local); OBX-6 unit; OBX-7 range; OBX-8 flags; OBX-11
                        status; OBX-14 time; the NTEs after it: notes

The OML^O21 we send: MSH (MSH-10 unique), PID with only PID-3 (the code, type COI; no
name, birth date, sex or address: the manufacturer works by the code alone), ORC (NW,
placer order number), TQ1 (requested start, end, priority), OBR (the product), SPM-2
(the code again, as the starting material's identifier).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import hl7

from mappings import isbt128
from mappings.hl7v2_fields import (
    DATA_TYPE,
    ERROR_TEXT,
    REQUIRED_MISSING,
    SEGMENT_SEQUENCE,
    TABLE_VALUE,
    UNSUPPORTED_EVENT,
    UNSUPPORTED_TYPE,
    Hl7Error,
    Hl7MappingError,
    Hl7ParseError,
    Where,
    coding,
    escape,
    fhir_datetime,
    hl7_datetime,
    offset_of,
    repetitions,
    value,
)

__all__ = ["Hl7Error", "Hl7MappingError", "Hl7ParseError", "Where"]
LOCAL = "99ATM"  # our v2 coding system (table 0396: 99zzz is a local one)
RELEASE, EXPECTED_RELEASE, COI_TYPE = "BATCH-RELEASE", "EXPECTED-RELEASE", "COI"
VERSION = "2.5.1"
STATUS = {"F": "final", "C": "corrected", "P": "preliminary", "R": "preliminary",
          "S": "preliminary", "I": "registered", "A": "amended", "X": "cancelled",
          "D": "entered-in-error", "W": "entered-in-error", "U": "final"}
PRIORITY = {"stat": "S", "asap": "A", "urgent": "A", "routine": "R"}  # TQ1-9, table 0485
_TEXT, _CODED, _TIMES = ("ST", "TX", "FT"), ("CE", "CWE", "CNE"), ("DT", "DTM", "TS")
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


@dataclass(frozen=True)
class Header:
    control_id: str
    application: str
    facility: str
    message_type: str  # "ORU^R01"
    version: str
    sent_at: str
    processing_id: str = "P"


@dataclass(frozen=True)
class QcResult:
    where: Where
    observation: dict[str, Any]  # an Observation's content, without references
    identifier: str  # OBX-1, or its position when OBX-1 is empty


@dataclass(frozen=True)
class Release:
    where: Where
    released: bool
    reason: str | None
    at: str | None


@dataclass(frozen=True)
class LimsReport:
    """What one ORU^R01 tells about one chain of identity."""

    header: Header
    coi: str
    coi_at: Where
    results: tuple[QcResult, ...]
    release: Release | None
    expected_release: tuple[Where, str] | None


def normalise(text: str) -> str:
    """Segments separated by CR, as HL7 has them (files and some senders use LF)."""
    return text.strip().replace("\r\n", "\r").replace("\n", "\r")


def parse(text: str) -> tuple[Header, Any]:
    """The header and python-hl7's message; Hl7ParseError (AR) if either is unreadable."""
    text = normalise(text)
    if not text.startswith("MSH") or len(text) < 8:
        raise Hl7ParseError("the message does not begin with an MSH segment",
                            Where("MSH"), SEGMENT_SEQUENCE)
    try:
        message = hl7.parse(text)
    except Exception as exc:  # noqa: BLE001 - python-hl7 raises several kinds on bad text
        raise Hl7ParseError(f"python-hl7 cannot parse it ({exc})", Where("MSH")) from exc
    msh = message.segment("MSH")
    header = Header(value(msh, 10), value(msh, 3), value(msh, 4),
                    f"{value(msh, 9)}^{value(msh, 9, 2)}", value(msh, 12) or VERSION,
                    value(msh, 7), value(msh, 11) or "P")
    if not header.control_id:
        raise Hl7ParseError("no message control id", Where("MSH", 10), REQUIRED_MISSING)
    return header, message


def read_oru(text: str) -> LimsReport:
    """An ORU^R01 as what it means; Hl7Error naming the segment and field at fault."""
    header, message = parse(text)
    if value(message.segment("MSH"), 9) != "ORU":
        raise Hl7ParseError(f"{header.message_type} is not accepted: only ORU^R01",
                            Where("MSH", 9), UNSUPPORTED_TYPE)
    if value(message.segment("MSH"), 9, 2) != "R01":
        raise Hl7ParseError(f"{header.message_type} is not accepted: only ORU^R01",
                            Where("MSH", 9, component=2), UNSUPPORTED_EVENT)
    coi, coi_at = _coi(message)
    zone = offset_of(header.sent_at)
    results: list[QcResult] = []
    release: Release | None = None
    expected: tuple[Where, str] | None = None
    for n, (obx, notes) in enumerate(_observations(message), start=1):
        code = (value(obx, 3), value(obx, 3, 3))
        if code == (RELEASE, LOCAL):
            if release is not None:
                raise Hl7MappingError("a second BATCH-RELEASE: one decision per message",
                                      Where("OBX", 3, n), SEGMENT_SEQUENCE)
            release = _release(obx, n, notes, zone)
        elif code == (EXPECTED_RELEASE, LOCAL):
            expected = (Where("OBX", 5, n), _expected_release(obx, n, zone))
        else:
            results.append(_result(obx, n, notes, zone))
    if not results and release is None and expected is None:
        raise Hl7MappingError("the message has no OBX segment: nothing to apply",
                              Where("OBX"), REQUIRED_MISSING)
    return LimsReport(header, coi, coi_at, tuple(results), release, expected)


def _segments(message: Any, segment_id: str) -> list[Any]:
    return [s for s in message if str(s[0]) == segment_id]


def _coi(message: Any) -> tuple[str, Where]:
    """The one code the message is about, from PID-3 (type COI) and SPM-2."""
    found: list[tuple[str, Where]] = []
    for n, pid in enumerate(_segments(message, "PID"), start=1):
        found += [(value(pid, 3, 1, r), Where("PID", 3, n)) for r in
                  range(1, repetitions(pid, 3) + 1) if value(pid, 3, 5, r).upper() == COI_TYPE]
    for n, spm in enumerate(_segments(message, "SPM"), start=1):
        if code := value(spm, 2):
            found.append((code, Where("SPM", 2, n)))
    if not found:
        raise Hl7MappingError("no chain of identity: PID-3 with identifier type COI, or "
                              "SPM-2, must carry it", Where("PID", 3), REQUIRED_MISSING)
    codes: list[tuple[str, Where]] = []
    for raw, where in found:
        try:
            codes.append((isbt128.parse(raw).value, where))
        except isbt128.CoiFormatError as exc:
            raise Hl7MappingError(str(exc), where, DATA_TYPE) from exc
    for code, where in codes[1:]:
        if code != codes[0][0]:
            raise Hl7MappingError(f"{code} differs from {codes[0][0]} at {codes[0][1]}: a "
                                  "message reports on one chain of identity", where,
                                  DATA_TYPE)
    return codes[0]


def _observations(message: Any) -> list[tuple[Any, list[str]]]:
    """Each OBX with the comments (NTE-3) that follow it."""
    found: list[tuple[Any, list[str]]] = []
    for segment in message:
        kind = str(segment[0])
        if kind == "OBX":
            found.append((segment, []))
        elif kind == "NTE" and found and (comment := value(segment, 3)):
            found[-1][1].append(comment)
    return found


def _release(obx: Any, n: int, notes: list[str], zone: Any) -> Release:
    decision = value(obx, 5).upper()
    if decision not in ("RELEASED", "FAILED"):
        raise Hl7MappingError(f"BATCH-RELEASE is {decision or 'empty'}: RELEASED or FAILED",
                              Where("OBX", 5, n), TABLE_VALUE)
    if value(obx, 11) not in ("", "F", "C"):
        raise Hl7MappingError(f"a batch release must be final (F or C), not "
                              f"{value(obx, 11)}", Where("OBX", 11, n), TABLE_VALUE)
    reason = "; ".join(r for r in (value(obx, 5, 2), *notes) if r) or None
    at = value(obx, 14)
    return Release(Where("OBX", 5, n), decision == "RELEASED", reason,
                   fhir_datetime(at, Where("OBX", 14, n), zone) if at else None)


def _expected_release(obx: Any, n: int, zone: Any) -> str:
    if value(obx, 2) not in _TIMES:
        raise Hl7MappingError(f"EXPECTED-RELEASE has value type {value(obx, 2) or 'none'}: "
                              "DT, DTM or TS", Where("OBX", 2, n), DATA_TYPE)
    if not value(obx, 5):
        raise Hl7MappingError("EXPECTED-RELEASE has no date", Where("OBX", 5, n),
                              REQUIRED_MISSING)
    return fhir_datetime(value(obx, 5), Where("OBX", 5, n), zone, instant=True)


def _result(obx: Any, n: int, notes: list[str], zone: Any) -> QcResult:
    """A QC result as an Observation's content."""
    if not value(obx, 3):
        raise Hl7MappingError("the result has no code", Where("OBX", 3, n), REQUIRED_MISSING)
    status = STATUS.get(value(obx, 11) or "F")
    if status is None:
        raise Hl7MappingError(f"result status {value(obx, 11)} is not one of table 0085",
                              Where("OBX", 11, n), TABLE_VALUE)
    observation: dict[str, Any] = {
        "status": status,
        "code": {"coding": [coding(value(obx, 3), value(obx, 3, 2), value(obx, 3, 3))]},
        **_value(obx, n, zone)}
    if at := value(obx, 14):
        observation["effectiveDateTime"] = fhir_datetime(at, Where("OBX", 14, n), zone)
    if limits := value(obx, 7):
        observation["referenceRange"] = [{"text": limits}]
    flags = [value(obx, 8, 1, r) for r in range(1, repetitions(obx, 8) + 1)]
    if flags := [f for f in flags if f]:
        observation["interpretation"] = [{"coding": [{"system": _INTERPRETATION, "code": f}]}
                                         for f in flags]
    if notes:
        observation["note"] = [{"text": note} for note in notes]
    return QcResult(Where("OBX", 0, n), observation, value(obx, 1) or str(n))


def _value(obx: Any, n: int, zone: Any) -> dict[str, Any]:
    """OBX-5 as the Observation's value[x], by OBX-2."""
    kind, text, where = value(obx, 2), value(obx, 5), Where("OBX", 5, n)
    if len(obx) <= 5 or not str(obx[5]).strip("^"):
        return {}  # a result without a value (e.g. cancelled): its status says why
    if kind not in ("NM", "SN", *_TEXT, *_CODED, *_TIMES):
        raise Hl7MappingError(f"value type {kind or 'none'} is not supported (NM, SN, ST, TX, "
                              "FT, CE, CWE, CNE, DT, DTM, TS are)", Where("OBX", 2, n), DATA_TYPE)
    if kind in ("NM", "SN"):
        comparator, number = (value(obx, 5, 1), value(obx, 5, 2)) if kind == "SN" else ("", text)
        if kind == "SN" and value(obx, 5, 3):
            raise Hl7MappingError("structured numeric ranges and ratios are not supported",
                                  where, DATA_TYPE)
        return {"valueQuantity": _quantity(obx, n, number, comparator)}
    if kind in _TEXT:
        return {"valueString": text}
    if kind in _CODED:
        concept: dict[str, Any] = {"coding": [coding(text, value(obx, 5, 2), value(obx, 5, 3))]}
        return {"valueCodeableConcept": {**concept, **({"text": value(obx, 5, 2)}
                                                       if value(obx, 5, 2) else {})}}
    return {"valueDateTime": fhir_datetime(text, where, zone)}


def _quantity(obx: Any, n: int, number: str, comparator: str) -> dict[str, Any]:
    try:
        amount = Decimal(number.strip())
    except InvalidOperation as exc:
        raise Hl7MappingError(f"{number!r} is not a number", Where("OBX", 5, n),
                              DATA_TYPE) from exc
    if not amount.is_finite():
        raise Hl7MappingError(f"{number!r} is not a number", Where("OBX", 5, n), DATA_TYPE)
    if comparator not in ("", "<", "<=", ">=", ">"):
        raise Hl7MappingError(f"comparator {comparator!r} is not <, <=, >= or >",
                              Where("OBX", 5, n, 1), TABLE_VALUE)
    quantity: dict[str, Any] = {"value": int(amount) if amount == amount.to_integral_value()
                                and "." not in number else float(amount)}
    if comparator:
        quantity["comparator"] = comparator
    if unit := value(obx, 6):
        quantity["unit"] = value(obx, 6, 2) or unit
        if value(obx, 6, 3).upper() == "UCUM":
            quantity.update(system="http://unitsofmeasure.org", code=unit)
    return quantity


# -- acknowledgements --------------------------------------------------------------------
@dataclass(frozen=True)
class Acknowledgement:
    code: str  # MSA-1: AA, AE, AR (or CA, CE, CR)
    control_id: str  # MSA-2: the message acknowledged
    text: str  # MSA-3 and ERR-8, what the receiver said


def ack(code: str, *, header: Header | None, control_id: str, sender: tuple[str, str],
        now: datetime, error: Hl7Error | None = None) -> str:
    """Our answer to a message (`header`: None when even its MSH was unreadable)."""
    theirs = header or Header("", "", "", "", VERSION, "")
    trigger = theirs.message_type.partition("^")[2]
    segments = [
        ["MSH", "^~\\&", escape(sender[0]), escape(sender[1]), escape(theirs.application),
         escape(theirs.facility), hl7_datetime(now), "", f"ACK^{escape(trigger)}^ACK",
         escape(control_id), escape(theirs.processing_id), escape(theirs.version)],
        ["MSA", code, escape(theirs.control_id)]]
    if error is not None:
        segments[1].append(escape(str(error)[:200]))
        segments.append(["ERR", "", error.where.erl(),
                         f"{error.code}^{ERROR_TEXT.get(error.code, '')}^HL70357", "E",
                         "", "", "", escape(error.reason)])
    return "\r".join("|".join(s) for s in segments) + "\r"


def read_ack(text: str) -> Acknowledgement:
    """A receiver's ACK; Hl7ParseError when it is none."""
    _, message = parse(text)
    msa = next(iter(_segments(message, "MSA")), None)
    if msa is None or not value(msa, 1):
        raise Hl7ParseError("the answer has no MSA segment", Where("MSA", 1), REQUIRED_MISSING)
    said = [*(value(e, 8) or value(e, 3, 2) for e in _segments(message, "ERR")), value(msa, 3)]
    return Acknowledgement(value(msa, 1).upper(), value(msa, 2),
                           "; ".join(dict.fromkeys(s for s in said if s)))


# -- manufacturing orders ----------------------------------------------------------------
@dataclass(frozen=True)
class ManufacturingOrder:
    control_id: str
    coi: str
    placer_order: str  # the ServiceRequest's id
    product: tuple[str, str]  # code, display
    start: str | None  # FHIR dateTime of the requested period
    end: str | None
    priority: str  # ServiceRequest.priority
    sender: tuple[str, str]  # our application, facility
    receiver: tuple[str, str]  # the LIMS's
    now: datetime


def oml_o21(order: ManufacturingOrder) -> str:
    """The order as OML^O21: the chain of identity, never the patient's details."""
    coi, placer = escape(order.coi), f"{escape(order.placer_order)}^{escape(order.sender[0])}"
    now = hl7_datetime(order.now)
    segments = [
        ["MSH", "^~\\&", *map(escape, (*order.sender, *order.receiver)), now, "",
         "OML^O21^OML_O21", escape(order.control_id), "P", VERSION, "", "", "", "", "",
         "UNICODE UTF-8"],  # MSH-15/16 empty: original mode, an AA/AE/AR answer
        ["PID", "1", "", f"{coi}^^^{escape(order.sender[0])}^{COI_TYPE}"],
        ["ORC", "NW", placer, "", "", "", "", "", "", now],
        ["TQ1", "1", "", "", "", "", "", *(hl7_datetime(t) if t else ""
                                             for t in (order.start, order.end)),
         PRIORITY.get(order.priority, "R")],
        ["OBR", "1", placer, "", f"{escape(order.product[0])}^{escape(order.product[1])}^{LOCAL}"],
        ["SPM", "1", f"{coi}&{escape(order.sender[0])}", "", f"CELLS^Starting material^{LOCAL}"]]
    return "\r".join("|".join(s) for s in segments) + "\r"
