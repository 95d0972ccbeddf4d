"""HL7 v2 mapping, table by table, without I/O: ORU^R01 results read by chain of identity
(QC results, batch release, expected release), every refusal naming its segment and
field, ACKs both ways, and OML^O21 orders that carry the code and never the patient."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import hl7
import pytest

from mappings import hl7v2, isbt128
from mappings.hl7v2_fields import Where, escape, fhir_datetime, hl7_datetime

COI = isbt128.make("A9999", 26, 17).value
OTHER = isbt128.make("A9999", 26, 18).value
MSH = ("MSH|^~\\&|MES-LIMS|CELLFAB-NL|ATM-GATEWAY|ATM|20261120101500+0100||ORU^R01^ORU_R01|"
       "LIMS000123|P|2.5.1")
PID = f"PID|1||{COI}^^^ATM^COI~4711^^^CELLFAB^PI"
OBR = "OBR|1|sr-1^ATM-GATEWAY|B2026-0042^MES-LIMS|CART^CAR-T release testing^99ATM"
NOW = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
US = ("ATM-GATEWAY", "ATM")


def oru(*obx: str, msh: str = MSH, pid: str = PID) -> str:
    return "\r".join([msh, pid, OBR, *obx]) + "\r"


RESULTS = [
    "OBX|1|NM|26464-8^Leukocytes^LN||4.5|10*9/L^^UCUM|3.5-10.5|N|||F|||20261119090000",
    "OBX|2|NM|VIAB^Viability CD3+^99ATM||92.5|%^percent^UCUM|>=70||||F",
    "OBX|3|CWE|STERILITY^Sterility^99ATM||NEG^No growth^99ATM||||||F",
    "NTE|1||14-day culture",
    "OBX|4|SN|ENDOTOXIN^Endotoxin^99ATM||<^0.5|EU/mL^^UCUM|||||F",
    "OBX|5|ST|IDENT^Identity (flow)^99ATM||CD19 CAR+ 38\\F\\ of CD3+||||||F",
    "OBX|6|DT|MFGDATE^Manufacturing date^99ATM||20261118||||||F",
    "OBX|7||MYCO^Mycoplasma^99ATM||||||||X",  # could not be obtained: no value
]


# -- reading ORU^R01 -------------------------------------------------------------------
def test_qc_results_become_observation_contents_keyed_by_the_code() -> None:
    report = hl7v2.read_oru(oru(*RESULTS))
    assert report.coi == COI and str(report.coi_at) == "PID-3"
    assert report.header == hl7v2.Header("LIMS000123", "MES-LIMS", "CELLFAB-NL", "ORU^R01",
                                         "2.5.1", "20261120101500+0100")
    assert report.release is None and report.expected_release is None
    values = [r.observation for r in report.results]
    assert values[0] == {
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "26464-8",
                             "display": "Leukocytes"}]},
        "valueQuantity": {"value": 4.5, "unit": "10*9/L",
                          "system": "http://unitsofmeasure.org", "code": "10*9/L"},
        "effectiveDateTime": "2026-11-19T09:00:00+01:00",  # MSH-7's offset
        "referenceRange": [{"text": "3.5-10.5"}],
        "interpretation": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
            "code": "N"}]}]}
    assert values[1]["valueQuantity"] == {"value": 92.5, "unit": "percent",
                                          "system": "http://unitsofmeasure.org", "code": "%"}
    assert values[2]["valueCodeableConcept"]["text"] == "No growth"
    assert values[2]["note"] == [{"text": "14-day culture"}]
    assert values[3]["valueQuantity"]["comparator"] == "<"
    assert values[4]["valueString"] == "CD19 CAR+ 38| of CD3+"  # \F\ unescaped
    assert values[5]["valueDateTime"] == "2026-11-18"
    assert values[6] == {"status": "cancelled", "code": {"coding": [{
        "system": "https://atm-gateway.org/fhir/CodeSystem/hl7v2-99ATM", "code": "MYCO",
        "display": "Mycoplasma"}]}}
    assert [r.identifier for r in report.results] == ["1", "2", "3", "4", "5", "6", "7"]


@pytest.mark.parametrize("obx, released, reason, at", [
    (["OBX|1|CWE|BATCH-RELEASE^Batch release^99ATM||RELEASED||||||F|||20261120100000"],
     True, None, "2026-11-20T10:00:00+01:00"),
    (["OBX|1|CWE|BATCH-RELEASE^Batch release^99ATM||FAILED^Sterility positive||||||F",
      "NTE|1||Gram-positive cocci on day 5"],
     False, "Sterility positive; Gram-positive cocci on day 5", None),
    (["OBX|1|CE|BATCH-RELEASE^^99ATM||failed||||||C"], False, None, None),
])
def test_batch_release_decisions(obx: list[str], released: bool, reason: str | None,
                                 at: str | None) -> None:
    release = hl7v2.read_oru(oru(*obx)).release
    assert release is not None
    assert (release.released, release.reason, release.at) == (released, reason, at)


@pytest.mark.parametrize("kind, value, expected", [
    ("DT", "20261215", "2026-12-15T23:59:59+01:00"),  # a date: the end of that day
    ("DTM", "202612151200", "2026-12-15T12:00:00+01:00"),
    ("DTM", "20261215120000-0500", "2026-12-15T12:00:00-05:00"),
    ("TS", "20261215083000+0000", "2026-12-15T08:30:00Z"),
])
def test_expected_release_is_an_instant(kind: str, value: str, expected: str) -> None:
    report = hl7v2.read_oru(oru(f"OBX|1|{kind}|EXPECTED-RELEASE^Expected release^99ATM||"
                                f"{value}"))
    assert report.expected_release == (Where("OBX", 5, 1), expected)
    assert not report.results


@pytest.mark.parametrize("pid, spm", [
    (PID, f"SPM|1|{COI}&ATM"),
    ("PID|1||4711^^^CELLFAB^PI", f"SPM|1|{COI}&ATM"),  # the code on the product only
    (f"PID|1||{isbt128.make('A9999', 26, 17).eye_readable}^^^ATM^COI", ""),
])
def test_the_code_is_read_from_pid_3_or_spm_2(pid: str, spm: str) -> None:
    text = oru(RESULTS[0], pid=pid) + (spm + "\r" if spm else "")
    assert hl7v2.read_oru(text).coi == COI


def test_line_feeds_between_segments_are_accepted() -> None:
    assert hl7v2.read_oru(oru(RESULTS[0]).replace("\r", "\n")).coi == COI


REFUSALS: list[tuple[str, str, str, str, str]] = [
    # message, ACK code, where (str), HL7 error code, words of the reason
    ("PID|1||x", "AR", "MSH", "100", "does not begin with an MSH"),
    (MSH.replace("LIMS000123", "") + "\r" + PID, "AR", "MSH-10", "101", "no message control id"),
    (oru(RESULTS[0], msh=MSH.replace("ORU^R01", "ADT^A08")), "AR", "MSH-9", "200",
     "ADT^A08 is not accepted"),
    (oru(RESULTS[0], msh=MSH.replace("ORU^R01", "ORU^R30")), "AR", "MSH-9.2", "201",
     "only ORU^R01"),
    (oru(RESULTS[0], pid="PID|1||4711^^^CELLFAB^PI"), "AE", "PID-3", "101",
     "no chain of identity"),
    (oru(RESULTS[0], pid=PID.replace(COI, COI[:-1] + ("A" if COI[-1] != "A" else "B"))),
     "AE", "PID-3", "102", "check character"),
    (oru(RESULTS[0]) + f"SPM|1|{OTHER}", "AE", "SPM-2", "102",
     "a message reports on one chain of identity"),
    (oru(), "AE", "OBX", "101", "nothing to apply"),
    (oru("OBX|1|NM|26464-8^Leukocytes^LN||four|10*9/L"), "AE", "OBX-5", "102",
     "'four' is not a number"),
    (oru("OBX|1|ED|PDF^Report^99ATM||^AP^PDF^Base64^JVBERi0="), "AE", "OBX-2", "102",
     "value type ED is not supported"),
    (oru("OBX|1|SN|TITER^Titer^99ATM||^1^:^128"), "AE", "OBX-5", "102",
     "ranges and ratios are not supported"),
    (oru("OBX|1|NM|26464-8^Leukocytes^LN||4.5||||||Q"), "AE", "OBX-11", "103",
     "result status Q"),
    (oru("OBX|1||||4.5"), "AE", "OBX-3", "101", "no code"),
    (oru(RESULTS[0], "OBX|2|CWE|BATCH-RELEASE^^99ATM||MAYBE||||||F"),
     "AE", "OBX-5 (the 2nd OBX)", "103", "BATCH-RELEASE is MAYBE"),
    (oru("OBX|1|CWE|BATCH-RELEASE^^99ATM||RELEASED||||||P"), "AE", "OBX-11", "103",
     "must be final"),
    (oru("OBX|1|CWE|BATCH-RELEASE^^99ATM||RELEASED||||||F",
         "OBX|2|CWE|BATCH-RELEASE^^99ATM||FAILED||||||F"), "AE", "OBX-3 (the 2nd OBX)", "100",
     "one decision per message"),
    (oru("OBX|1|ST|EXPECTED-RELEASE^^99ATM||soon"), "AE", "OBX-2", "102", "DT, DTM or TS"),
    (oru("OBX|1|DT|EXPECTED-RELEASE^^99ATM||20261345"), "AE", "OBX-5", "102",
     "not a real date"),
    (oru("OBX|1|DT|EXPECTED-RELEASE^^99ATM||202612"), "AE", "OBX-5", "102", "names no day"),
    (oru("OBX|1|DTM|26464-8^Leukocytes^LN||2026-12-01"), "AE", "OBX-5", "102",
     "not an HL7 date/time"),
]


@pytest.mark.parametrize("text, code, where, error, words", REFUSALS)
def test_what_cannot_be_mapped_is_refused_with_where_and_why(
        text: str, code: str, where: str, error: str, words: str) -> None:
    with pytest.raises(hl7v2.Hl7Error) as caught:
        hl7v2.read_oru(text)
    refusal = caught.value
    assert (refusal.ack_code, str(refusal.where), refusal.code) == (code, where, error)
    assert words in refusal.reason


# -- acknowledgements -------------------------------------------------------------------
def test_an_aa_answers_the_senders_control_id() -> None:
    header, _ = hl7v2.parse(oru(RESULTS[0]))
    text = hl7v2.ack("AA", header=header, control_id="ACK7", sender=US, now=NOW)
    assert text == ("MSH|^~\\&|ATM-GATEWAY|ATM|MES-LIMS|CELLFAB-NL|20261120093000+0000||"
                    "ACK^R01^ACK|ACK7|P|2.5.1\rMSA|AA|LIMS000123\r")


def test_an_ae_carries_the_reason_in_msa_3_and_err() -> None:
    header, _ = hl7v2.parse(oru(RESULTS[0]))
    error = hl7v2.Hl7MappingError("'four' is not a number | really", Where("OBX", 5, 2), "102")
    text = hl7v2.ack("AE", header=header, control_id="ACK8", sender=US, now=NOW, error=error)
    message = hl7.parse(text)
    assert str(message.segment("MSA")(1)) == "AE"
    assert message.segment("MSA").extract_field(1, 3) == (
        "OBX-5 (the 2nd OBX): 'four' is not a number | really")
    err = message.segment("ERR")
    assert str(err(2)) == "OBX^2^5^1"
    assert err.extract_field(1, 3, 1, 1) == "102" and str(err(4)) == "E"
    assert err.extract_field(1, 8) == "'four' is not a number | really"
    assert hl7v2.read_ack(text) == hl7v2.Acknowledgement(
        "AE", "LIMS000123", "'four' is not a number | really; OBX-5 (the 2nd OBX): 'four' is "
        "not a number | really")


def test_an_unreadable_message_is_answered_ar_without_a_control_id() -> None:
    error = hl7v2.Hl7ParseError("the message does not begin with an MSH segment",
                                Where("MSH"), "100")
    text = hl7v2.ack("AR", header=None, control_id="ACK9", sender=US, now=NOW, error=error)
    assert hl7v2.read_ack(text).code == "AR" and hl7v2.read_ack(text).control_id == ""


@pytest.mark.parametrize("text, expected", [
    ("MSH|^~\\&|LIMS|F|ATM|ATM|20261120||ACK^O21^ACK|9|P|2.5.1\rMSA|AA|ATM1\r",
     hl7v2.Acknowledgement("AA", "ATM1", "")),
    ("MSH|^~\\&|LIMS|F|ATM|ATM|20261120||ACK|9|P|2.3\rMSA|CA|ATM1\r",
     hl7v2.Acknowledgement("CA", "ATM1", "")),
    ("MSH|^~\\&|LIMS|F|ATM|ATM|20261120||ACK|9|P|2.3\rMSA|AR|ATM1|Unknown product\r",
     hl7v2.Acknowledgement("AR", "ATM1", "Unknown product")),
    ("MSH|^~\\&|LIMS|F|ATM|ATM|20261120||ACK|9|P|2.5\rMSA|AE|ATM1\r"
     "ERR||OBR^1^4|103^Table value not found^HL70357|E\r",
     hl7v2.Acknowledgement("AE", "ATM1", "Table value not found")),
])
def test_acks_from_a_lims_are_read(text: str, expected: hl7v2.Acknowledgement) -> None:
    assert hl7v2.read_ack(text) == expected


@pytest.mark.parametrize("text", ["", "HELLO", "MSH|^~\\&|LIMS|F|||||ACK|9|P|2.5\r"])
def test_what_is_no_ack_is_refused(text: str) -> None:
    with pytest.raises(hl7v2.Hl7ParseError):
        hl7v2.read_ack(text)


# -- OML^O21 ----------------------------------------------------------------------------
ORDER = hl7v2.ManufacturingOrder(
    control_id="ATM0123456789ABCDEF0", coi=COI, placer_order="0193a0c2-sr",
    product=("car-t-autologous", "Autologous CAR-T cell therapy"),
    start="2026-12-01T08:00:00Z", end="2026-12-21T16:00:00+01:00", priority="urgent",
    sender=US, receiver=("MES-LIMS", "CELLFAB-NL"), now=NOW)


def test_an_order_carries_the_code_the_product_and_the_requested_period() -> None:
    text = hl7v2.oml_o21(ORDER)
    message = hl7.parse(text)
    assert [str(s[0]) for s in message] == ["MSH", "PID", "ORC", "TQ1", "OBR", "SPM"]
    assert message["MSH.F9"] == "OML" and message["MSH.F10"] == "ATM0123456789ABCDEF0"
    assert message["MSH.F5"] == "MES-LIMS" and message["MSH.F18"] == "UNICODE UTF-8"
    assert message["PID.F3.R1.C1"] == COI and message["PID.F3.R1.C5"] == "COI"
    assert message["ORC.F1"] == "NW" and message["ORC.F2.R1.C1"] == "0193a0c2-sr"
    assert message["TQ1.F7"] == "20261201080000+0000"
    assert message["TQ1.F8"] == "20261221160000+0100" and message["TQ1.F9"] == "A"
    assert message["OBR.F4.R1.C1"] == "car-t-autologous"
    assert message["SPM.F2.R1.C1.S1"] == COI
    assert len(message.segment("PID")) == 4  # PID-1 to PID-3: no name, no demographics


def test_an_order_read_back_as_an_oru_would_find_the_same_code() -> None:
    """What we send keys the order where an answer keys it back (PID-3 type COI, SPM-2)."""
    text = hl7v2.oml_o21(ORDER).replace("OML^O21^OML_O21", "ORU^R01^ORU_R01")
    assert hl7v2.read_oru(text + "OBX|1|ST|NOTE^^99ATM||ok\r").coi == COI


def test_order_values_are_escaped() -> None:
    order = hl7v2.ManufacturingOrder(**{**ORDER.__dict__,
                                        "product": ("p|1", "A^B & C~D \\ E")})
    message = hl7.parse(hl7v2.oml_o21(order))
    assert message.segment("OBR").extract_field(1, 4, 1, 1) == "p|1"
    assert message.segment("OBR").extract_field(1, 4, 1, 2) == "A^B & C~D \\ E"


# -- fields ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtm, instant, expected", [
    ("2026", False, "2026"),
    ("202611", False, "2026-11"),
    ("20261120", False, "2026-11-20"),
    ("20261120", True, "2026-11-20T23:59:59+02:00"),
    ("2026112009", False, "2026-11-20T09:00:00+02:00"),
    ("20261120093015.1234", False, "2026-11-20T09:30:15+02:00"),
    ("20261120093015+0000", False, "2026-11-20T09:30:15Z"),
])
def test_hl7_times_become_fhir_date_times(dtm: str, instant: bool, expected: str) -> None:
    zone = timezone(timedelta(hours=2))
    assert fhir_datetime(dtm, Where("OBX", 14), zone, instant=instant) == expected


@pytest.mark.parametrize("value, expected", [
    ("2026-12-01", "20261201"),
    ("2026-12-01T08:00:00Z", "20261201080000+0000"),
    ("2026-12-01T08:00:00-05:00", "20261201080000-0500"),
])
def test_fhir_times_become_hl7_dtm(value: str, expected: str) -> None:
    assert hl7_datetime(value) == expected


def test_escape_round_trips_through_python_hl7() -> None:
    value = "a|b^c&d~e\\f"
    message = hl7.parse(f"MSH|^~\\&|X\rNTE|1||{escape(value)}")
    assert message.segment("NTE").extract_field(1, 3) == value
