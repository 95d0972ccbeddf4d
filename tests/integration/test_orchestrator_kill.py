"""Real `atm orchestrate` processes: one killed (SIGKILL) in the middle of its work and
started again, two running against one database at once. No Task is written twice and
none is skipped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.settings import Settings
from tests.integration.test_orchestrator import enrol, search, set_status, tasks_by_stage

ROOT = Path(__file__).resolve().parents[2]
ENROLMENTS = 12


class OrchestratorProcess:
    def __init__(self, settings: Settings, log: Path) -> None:
        self.env = {**os.environ, "ATM_DATABASE_URL": settings.database_url,
                    "ATM_BASE_URL": settings.base_url or "", "ATM_LOG_JSON": "false"}
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "orchestrate", "--poll", "0.05"],
                cwd=ROOT, env=self.env, stdout=sink, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def kill_and_restart_once(self, started: Callable[[], bool]) -> None:
        """SIGKILL as soon as `started` says some of the work is done, then start again."""
        wait_until(started, 60, self.log)
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)


@pytest.fixture
def orchestrator_process(settings: Settings, tmp_path: Path) -> Iterator[OrchestratorProcess]:
    process = OrchestratorProcess(settings, tmp_path / "orchestrate.log")
    yield process
    process.stop()


def count_stage(client: TestClient, stage: str) -> int:
    # Only the count: this is polled every 50 ms while the processes work, and reading
    # whole Tasks would take CPU from them.
    response = client.get("/fhir/Task", params={"code": stage, "_summary": "count"})
    assert response.status_code == 200, response.text
    return int(response.json()["total"])


def wait_until(predicate: object, seconds: float, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.05)


def test_killed_orchestrator_restarts_without_duplicates_or_gaps(
        client: TestClient, orchestrator_process: OrchestratorProcess) -> None:
    careplans = [enrol(client) for _ in range(ENROLMENTS)]
    orchestrator_process.start()
    # Killed as soon as it has started some of the enrolments, not all.
    orchestrator_process.kill_and_restart_once(lambda: count_stage(client, "intake") > 0)
    wait_until(lambda: count_stage(client, "intake") == ENROLMENTS, 60,
               orchestrator_process.log)
    for careplan in careplans:
        set_status(client, tasks_by_stage(client, careplan["id"])["intake"][0], "completed")
    orchestrator_process.kill_and_restart_once(
        lambda: count_stage(client, "eligibility") > 0)
    wait_until(lambda: count_stage(client, "consent") == ENROLMENTS, 60,
               orchestrator_process.log)
    for careplan in careplans:
        stages = tasks_by_stage(client, careplan["id"])
        assert {stage: len(runs) for stage, runs in stages.items()} == {
            "intake": 1, "eligibility": 1, "consent": 1}
        plan = client.get(f"/fhir/CarePlan/{careplan['id']}").json()
        assert sorted(a["reference"]["reference"] for a in plan["activity"]) == sorted(
            f"Task/{runs[0]['id']}" for runs in stages.values())


def test_two_orchestrator_processes_share_the_work_without_duplicates(
        client: TestClient, settings: Settings, tmp_path: Path) -> None:
    careplans = [enrol(client) for _ in range(ENROLMENTS)]
    processes = [OrchestratorProcess(settings, tmp_path / f"orchestrate-{n}.log")
                 for n in range(2)]
    try:
        for process in processes:
            process.start()
        log = processes[0].log
        wait_until(lambda: count_stage(client, "intake") == ENROLMENTS, 60, log)
        for careplan in careplans:
            set_status(client, tasks_by_stage(client, careplan["id"])["intake"][0],
                       "completed")
        wait_until(lambda: count_stage(client, "consent") == ENROLMENTS, 60, log)
        wait_until(lambda: count_stage(client, "eligibility") == ENROLMENTS, 60, log)
    finally:
        for process in processes:
            process.stop()
    for careplan in careplans:
        stages = tasks_by_stage(client, careplan["id"])
        assert {stage: len(runs) for stage, runs in stages.items()} == {
            "intake": 1, "eligibility": 1, "consent": 1}
        plan = client.get(f"/fhir/CarePlan/{careplan['id']}").json()
        assert len(plan["activity"]) == 3
        provenances = search(client, f"Provenance?target=Task/{stages['consent'][0]['id']}")
        assert len(provenances) == 1
