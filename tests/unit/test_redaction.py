"""What manufacturers, couriers and LIMS receive: no patient details anywhere."""

from __future__ import annotations

from gateway import jsonio
from gateway.auth.redaction import redact


def test_patient_details_go_wherever_they_are() -> None:
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": {"resourceType": "Task", "status": "ready", "intent": "order",
                      "text": {"status": "generated", "div": "<div>for Élodie</div>"},
                      "for": {"reference": "Patient/1", "display": "Élodie Durand"},
                      "owner": {"identifier": {"value": "x"}, "display": "Dr Martin"},
                      "code": {"coding": [{"code": "qc", "display": "QC release"}]},
                      "contained": [{"resourceType": "Patient", "id": "p",
                                     "name": [{"family": "Durand"}],
                                     "identifier": [{"value": "COI-42"}]}]}},
        {"resource": {"resourceType": "RelatedPerson", "patient": {"reference": "Patient/1"},
                      "name": [{"family": "Durand"}], "telecom": [{"value": "555"}]}}]}
    cleaned = jsonio.loads(redact(jsonio.dumps(bundle)))
    task, related = (e["resource"] for e in cleaned["entry"])
    assert "text" not in task
    assert task["for"] == {"reference": "Patient/1"}
    assert task["owner"] == {"identifier": {"value": "x"}}
    assert task["code"]["coding"][0]["display"] == "QC release"  # a code's display stays
    assert task["contained"][0] == {"resourceType": "Patient", "id": "p",
                                    "identifier": [{"value": "COI-42"}]}
    assert related == {"resourceType": "RelatedPerson", "patient": {"reference": "Patient/1"}}
