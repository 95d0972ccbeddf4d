"""Whole journeys of the three shipped protocols, played by `atm demo` over HTTP against a
real server whose orchestrator advances them: parallel stages, sub-stages, a skipped
condition, a failed QC and its repeat, lead times and completion."""

from __future__ import annotations

import httpx
import pytest

from orchestration.demo import run_demo
from tests.conftest import running_server


@pytest.fixture
def orchestrated_server(database_url: str) -> str:
    with running_server(database_url, orchestrator=True, load_protocols=True,
                        orchestrator_poll_seconds=0.05) as base:
        yield base  # type: ignore[misc]


def test_demo_plays_every_shipped_protocol_to_completion(orchestrated_server: str) -> None:
    said: list[str] = []
    summary = run_demo(orchestrated_server, patients=3, say=said.append, timeout=240)
    header, *rows, totals = summary
    assert len(rows) == 3
    assert all(" completed " in row for row in rows), "\n".join(said)
    allogeneic, car_t, gene_therapy = rows
    assert "AllogeneicCellTherapy" in allogeneic and " n/a " in allogeneic  # no collection
    assert "CarTAutologous" in car_t and car_t.split()[-1] == "1"  # one QC repeat
    assert any("QC release FAILED" in line for line in said)
    vein_to_vein = int(car_t.split(" d ")[0].split()[-1])
    assert 20 < vein_to_vein < 120
    with httpx.Client(base_url=orchestrated_server + "/") as client:
        apheresis = client.get("Task?code=apheresis&_summary=count").json()["total"]
        assert apheresis == 2  # the CAR-T patient's apheresis, run twice
        provenances = client.get("Provenance?_summary=count").json()["total"]
    tasks = int(totals.split()[0])
    assert provenances >= tasks > 50
