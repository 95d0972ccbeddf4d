"""Whole journeys of the three shipped protocols, played by `atm demo` over HTTP against a
real server, with authentication on, whose orchestrator advances them: each partner a
client of its own, parallel stages, sub-stages, a skipped condition, a failed QC and its
repeat, lead times and completion."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gateway.auth.clients import add_client, list_clients
from gateway.auth.credentials import Credentials, SmartAuth, new_key, public_jwks
from gateway.custody.coi import COI_SYSTEM
from gateway.store.database import Database
from mappings import isbt128
from orchestration.demo import CLIENT_NAME, run_demo
from tests.conftest import running_server


@pytest.fixture
def orchestrated_server(database_url: str) -> str:
    with running_server(database_url, orchestrator=True, load_protocols=True,
                        orchestrator_poll_seconds=0.05, auth="smart",
                        rate_limit_per_second=0) as base:
        yield base  # type: ignore[misc]


def admin_auth(db: Database, base: str) -> SmartAuth:
    key = new_key()
    client = add_client(db, name="inspector", role="admin", organization="Organization/ops",
                        jwks=public_jwks(key), scopes="system/*.cruds")
    token_url = base.removesuffix("/fhir") + "/auth/token"
    return SmartAuth(token_url, Credentials(client.client_id, key))


def test_demo_plays_every_shipped_protocol_to_completion(orchestrated_server: str,
                                                         db: Database, tmp_path: Path) -> None:
    said: list[str] = []
    report = tmp_path / "custody-report.html"
    summary = run_demo(orchestrated_server, patients=3, say=said.append, timeout=240, db=db,
                       report=report)
    header, *rows, totals, custody = summary
    assert len(rows) == 3
    assert all(" completed " in row for row in rows), "\n".join(said)
    allogeneic, car_t, gene_therapy = rows
    assert "AllogeneicCellTherapy" in allogeneic and " n/a " in allogeneic  # no collection
    assert "CarTAutologous" in car_t and car_t.split()[-1] == "1"  # one QC repeat
    assert any("QC release FAILED" in line for line in said)
    vein_to_vein = int(car_t.split(" d ")[0].split()[-1])
    assert 20 < vein_to_vein < 120
    demo_clients = {c.role for c in list_clients(db) if c.name.startswith(CLIENT_NAME)}
    assert demo_clients == {"treatment-centre", "apheresis-centre", "courier",
                            "manufacturer", "payer"}
    with httpx.Client(base_url=orchestrated_server + "/",
                      auth=admin_auth(db, orchestrated_server)) as client:
        apheresis = client.get("Task?code=apheresis&_summary=count").json()["total"]
        assert apheresis == 2  # the CAR-T patient's apheresis, run twice
        provenances = client.get("Provenance?_summary=count").json()["total"]
    tasks = int(totals.split()[0])
    assert provenances >= tasks > 50
    # Every handoff signed and verified; the report of the first journey written.
    assert ": verified," in custody and str(report) in custody, custody
    page = report.read_text(encoding="utf-8")
    assert "Chain of custody verified" in page and "Infusion" in page
    with httpx.Client(base_url=orchestrated_server + "/",
                      auth=admin_auth(db, orchestrated_server)) as client:
        plans = client.get("CarePlan?_count=10").json()["entry"]
        codes = [i["value"] for p in plans for i in p["resource"].get("identifier", [])
                 if i["system"] == COI_SYSTEM]
        assert len(codes) == 3 and all(isbt128.parse(c).value == c for c in codes)
        for plan in plans:  # the CAR-T journey's repeat included: every chain verifies
            found = client.get(f"CarePlan/{plan['resource']['id']}/$custody-report").json()
            summary_params = {p["name"]: p for p in found["entry"][0]["resource"]["parameter"]}
            assert summary_params["verified"]["valueBoolean"] is True, summary_params
            assert "vein-to-vein" in summary_params or "Allogeneic" in plan["resource"]["title"]
            if "CAR-T" in plan["resource"]["title"]:  # from the repeat's collection, as above
                hours = summary_params["vein-to-vein"]["valueQuantity"]["value"]
                assert abs(hours / 24 - vein_to_vein) <= 2, (hours, vein_to_vein)
    assert sum("custody: " in line for line in said) >= 15
    # Each patient's chain was booked by the coordinator in one go, and the Tasks of the
    # steps it booked are about those appointments.
    assert sum("chain booked: " in line for line in said) == 3, "\n".join(said)
    with httpx.Client(base_url=orchestrated_server + "/",
                      auth=admin_auth(db, orchestrated_server)) as client:
        booked = client.get("Appointment?status=booked&_count=50").json()["entry"]
        assert len(booked) == 3 + 3 + 1  # CAR-T, ex-vivo: three steps; allogeneic: one
        infusions = client.get("Task?code=infusion&_count=10").json()["entry"]
        named = {i["valueReference"]["reference"] for t in infusions
                 for i in t["resource"].get("input", [])}
        assert named == {f"Appointment/{a['resource']['id']}" for a in booked
                         if "infusion" in str(a["resource"]["extension"])}
