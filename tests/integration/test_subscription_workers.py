"""Real `atm worker` processes delivering notifications: one killed (SIGKILL) while a
notification is on its way and started again, and two side by side on one PostgreSQL.
Every event arrives, with its number, in order; none twice in normal operation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.settings import Settings
from tests.conftest import client_with
from tests.integration.subscription_support import (
    FHIR,
    Receiver,
    receiving,
    subscription,
    task,
)

ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    def __init__(self, settings: Settings, log: Path) -> None:
        self.env = {**os.environ, "ATM_DATABASE_URL": settings.database_url,
                    "ATM_BASE_URL": settings.base_url or "", "ATM_LOG_JSON": "false",
                    "ATM_SUBSCRIPTION_ALLOWED_HOSTS": json.dumps(["127.0.0.1"]),
                    "ATM_SUBSCRIPTION_POLL_SECONDS": "0.05",
                    "ATM_SUBSCRIPTION_LEASE_SECONDS": "2",
                    "ATM_SUBSCRIPTION_RETRY_SECONDS": "0.1",
                    "ATM_SUBSCRIPTION_RETRY_MAX_SECONDS": "0.5"}
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "worker", "--no-orchestrate"],
                cwd=ROOT, env=self.env, stdout=sink, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    """The API alone: matching and delivery are the worker processes' work."""
    with client_with(settings, load_topics=True,
                     subscription_allowed_hosts=["127.0.0.1"]) as client:
        yield client


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started = [WorkerProcess(settings, tmp_path / f"worker-{n}.log") for n in range(2)]
    yield started
    for worker in started:
        worker.stop()


def subscribe(client: TestClient, receiver: Receiver, path: str = "/hook") -> str:
    response = client.post("/fhir/Subscription", json=subscription(receiver.url(path)),
                           headers=FHIR)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def create_task(client: TestClient) -> None:
    assert client.post("/fhir/Task", json=task(), headers=FHIR).status_code == 201


def logs(workers: list[WorkerProcess]) -> str:
    return "\n".join(w.log.read_text(errors="replace")[-2000:] for w in workers
                     if w.log.exists())


def test_a_worker_killed_mid_delivery_is_replaced_and_nothing_is_lost(
        api: TestClient, workers: list[WorkerProcess]) -> None:
    worker = workers[0]
    with receiving() as receiver:
        subscribe(api, receiver)
        worker.start()
        receiver.wait_for(lambda r: bool(r.of_kind("handshake")), seconds=30)
        receiver.delay = 30  # event 1 is sent, and hangs
        create_task(api)
        receiver.wait_for(lambda r: r.arrived == 2, seconds=30)
        worker.kill()  # between the commit and the acknowledgement
        receiver.delay = 0
        create_task(api)  # committed while no worker runs: event 2, not yet matched
        worker.start()
        try:
            receiver.wait_for(lambda r: 2 in r.event_numbers(), seconds=30)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{logs(workers)}") from exc
        numbers = receiver.event_numbers()
        assert sorted(set(numbers)) == [1, 2]
        assert numbers == sorted(numbers)  # in order, each at least once


def test_two_workers_on_postgresql_deliver_each_event_once(
        api: TestClient, settings: Settings, workers: list[WorkerProcess]) -> None:
    if settings.is_sqlite:
        pytest.skip("workers side by side are PostgreSQL's way to scale out")
    paths = [f"/lims-{n}" for n in range(4)]
    with receiving() as receiver:
        for path in paths:
            subscribe(api, receiver, path)
        for worker in workers:
            worker.start()
        receiver.wait_for(lambda r: len(r.of_kind("handshake")) == len(paths), seconds=30)
        tasks = 30
        for _ in range(tasks):
            create_task(api)
        try:
            receiver.wait_for(lambda r: all(len(r.event_numbers(p)) >= tasks for p in paths),
                              seconds=60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{logs(workers)}") from exc
        time.sleep(0.5)  # anything sent twice would have arrived by now
        for path in paths:
            assert receiver.event_numbers(path) == list(range(1, tasks + 1)), path
        assert len(receiver.of_kind("handshake")) == len(paths)
