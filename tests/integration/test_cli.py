"""The `atm` command as an operator runs it: a real process, configured by ATM_* variables."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

STARTUP_SECONDS = 60


def atm_command() -> list[str]:
    """The installed console script when there is one, else the module."""
    script = Path(sys.executable).parent / "atm"
    if script.exists():
        return [str(script)]
    found = shutil.which("atm")
    return [found] if found else [sys.executable, "-m", "gateway.cli"]


def clean_env(tmp_path: Path, **atm: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATM_")}
    env.update({"ATM_DATABASE_URL": f"sqlite:///{tmp_path}/data/atm.db", **atm})
    return env


def run_atm(tmp_path: Path, *args: str, **atm: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*atm_command(), *args], cwd=tmp_path, env=clean_env(tmp_path, **atm),
                          capture_output=True, text=True, timeout=120)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_help_lists_serve_and_db(tmp_path: Path) -> None:
    result = run_atm(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout
    assert "db" in result.stdout


def test_db_upgrade_creates_the_tables_in_a_fresh_sqlite_file(tmp_path: Path) -> None:
    result = run_atm(tmp_path, "db", "upgrade")
    assert result.returncode == 0, result.stderr
    assert "newest schema" in result.stdout
    with sqlite3.connect(tmp_path / "data" / "atm.db") as conn:
        tables = {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    assert {"resources", "resource_history", "change_log", "alembic_version"} <= tables
    assert len(version) == 1
    again = run_atm(tmp_path, "db", "upgrade")
    assert again.returncode == 0, again.stderr


def test_serve_with_several_workers_on_sqlite_is_refused(tmp_path: Path) -> None:
    result = run_atm(tmp_path, "serve", "--port", str(free_port()), "--workers", "2")
    assert result.returncode == 2
    assert "several workers need PostgreSQL" in result.stderr


@dataclass
class Served:
    address: str
    log: Path
    """Its stdout and stderr."""
    workdir: Path
    """Its working directory: `atm` commands run here use its database."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`atm serve` on a free port, shared by this module's tests: each new one spends
    seconds starting (migrating, storing the shipped protocols and topics)."""
    workdir = tmp_path_factory.mktemp("served")
    port = free_port()
    log = workdir / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen([*atm_command(), "serve", "--port", str(port)],
                                   cwd=workdir, env=clean_env(workdir), stdout=sink,
                                   stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(address, process)
        yield Served(address, log, workdir)
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_until_healthy(address: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"atm serve exited with {process.returncode}")
        try:
            if httpx.get(f"{address}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)  # not listening yet
    raise AssertionError(f"atm serve did not answer within {STARTUP_SECONDS} s")


def access_lines(log: Path, request_id: str) -> list[dict[str, object]]:
    """The JSON log lines of one request; the line is written just after the response."""
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
        found = [x for x in lines if x.get("request_id") == request_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_serve_answers_healthz_fhir_and_logs_json(served: Served) -> None:
    address, log = served.address, served.log
    response = httpx.get(f"{address}/healthz", headers={"X-Request-ID": "cli-check"})
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert httpx.get(f"{address}/readyz").json() == {"status": "ok", "database": "ok"}
    metadata = httpx.get(f"{address}/fhir/metadata")
    assert metadata.json()["resourceType"] == "CapabilityStatement"
    access = access_lines(log, "cli-check")
    assert len(access) == 1
    assert access[0]["logger"] == "gateway.access"
    assert access[0]["route"] == "/healthz"
    assert access[0]["status"] == 200
    assert access[0]["method"] == "GET"
    assert access[0]["duration_ms"] >= 0


def test_serve_asks_for_tokens_and_a_client_made_with_new_key_gets_one(
        served: Served) -> None:
    address, workdir = served.address, served.workdir
    assert httpx.get(f"{address}/fhir/Task").status_code == 401  # ATM_AUTH=smart by default
    added = run_atm(workdir, "clients", "add", "--name", "explorer", "--role", "admin",
                    "--organization", "Organization/ops", "--scopes", "system/*.cruds",
                    "--new-key", "var/explorer.json")
    assert added.returncode == 0, added.stderr
    saved = workdir / "var" / "explorer.json"
    assert saved.stat().st_mode & 0o077 == 0  # its owner's eyes only
    credentials = json.loads(saved.read_text())
    assert credentials["client_id"] == json.loads(added.stdout)["client_id"]
    assert "d" in credentials["keys"][0]  # the private key, kept by the client alone
    token = run_atm(workdir, "token", "--credentials", "var/explorer.json",
                    "--server", f"{address}/fhir")
    assert token.returncode == 0, token.stderr
    bearer = {"Authorization": f"Bearer {token.stdout.strip()}"}
    assert httpx.get(f"{address}/fhir/Task", headers=bearer).status_code == 200
    refused = run_atm(workdir, "clients", "add", "--name", "x", "--role", "admin",
                      "--organization", "Organization/ops", "--new-key", "var/x.json",
                      "--jwks-url", "https://example.org/jwks")
    assert refused.returncode != 0 and "--new-key" in refused.stderr


def test_audit_verify_reports_an_intact_chain_then_names_an_edited_record(
        served: Served) -> None:
    address, workdir = served.address, served.workdir
    for _ in range(3):
        httpx.get(f"{address}/fhir/metadata")
    deadline = time.monotonic() + 10
    while True:  # the server chains its records within a fraction of a second
        result = run_atm(workdir, "audit", "verify")
        report = json.loads(result.stdout)
        if report["checked"] >= 3 and report["pending"] == 0:
            break
        assert time.monotonic() < deadline, report
        time.sleep(0.1)
    assert result.returncode == 0 and report["intact"] is True
    database = workdir / "data" / "atm.db"
    with sqlite3.connect(database) as conn:
        (address_before,) = conn.execute(
            "SELECT address FROM audit_log WHERE seq = 2").fetchone()
        conn.execute("UPDATE audit_log SET address = '10.0.0.9' WHERE seq = 2")  # an insider
    try:
        broken = run_atm(workdir, "audit", "verify")
    finally:  # the server is shared with the module's other tests: undo the edit
        with sqlite3.connect(database) as conn:
            conn.execute("UPDATE audit_log SET address = ? WHERE seq = 2", (address_before,))
    assert broken.returncode == 1
    assert json.loads(broken.stdout)["brokenAt"] == "AuditEvent/2"


def _requests_counted(text: str, route: str) -> float:
    """The sum of atm_http_requests_total over every label set of one route."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("atm_http_requests_total{") and f'route="{route}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_of_several_workers_add_up(tmp_path: Path, pg_schema_url: str) -> None:
    """With --workers 2 each scrape reaches one worker; it must report both workers'
    requests, not its own."""
    port = free_port()
    log = tmp_path / "serve.log"
    env = clean_env(tmp_path, ATM_DATABASE_URL=pg_schema_url)
    with log.open("w") as sink:
        process = subprocess.Popen(
            [*atm_command(), "serve", "--port", str(port), "--workers", "2"],
            cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(address, process)
        sent = 40
        for _ in range(sent):  # a new connection each: the kernel spreads them over workers
            assert httpx.get(f"{address}/fhir/metadata", timeout=10).status_code == 200
        counts = [_requests_counted(httpx.get(f"{address}/metrics", timeout=10).text,
                                    "/fhir/metadata") for _ in range(6)]
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert counts == [sent] * 6, log.read_text()[-2000:]
