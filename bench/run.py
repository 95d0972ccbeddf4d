"""Measure the gateway against bare endpoints on this machine.

`python -m bench.run [--backend sqlite|postgres] [--tasks 100000] [--duration 10]
[--quick]`: starts `atm serve` (uvloop + httptools, one worker) on a fresh database and
two baselines under the same settings (a bare FastAPI endpoint, which the targets refer
to, and a raw ASGI callable, the ceiling of the server itself), loads Tasks through
100-entry transactions, then drives each scenario from a separate load-generator
process. Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import workload

ROOT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 90
SERVER_CPU, CLIENT_CPU = 0, 1


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    method: str | None = None
    """GET or POST: the baselines' scenarios this one is compared with."""
    max_connections: int | None = None
    """Fewer connections where queueing behind one writer would only add latency."""
    server: str = "gateway"


# The baseline servers, by bench.bare --framework name, and their labels.
BASELINES = {"fastapi": "bare FastAPI", "asgi": "bare ASGI"}
TARGET_BASELINE = "fastapi"
"""What the targets' ratios are taken against: an empty endpoint in the gateway's own
framework, as measured in PERFORMANCE.md (~5,500 GET / ~5,800 POST req/s there)."""

SCENARIOS = [
    *(Scenario(f"{name}-{method.lower()}", f"{label} {method} (baseline)", server=name)
      for name, label in BASELINES.items() for method in ("GET", "POST")),
    Scenario("create", "create Task (POST)", "POST"),
    Scenario("read", "read Task (GET by id)", "GET"),
    Scenario("update", "update Task (PUT)", "POST"),
    Scenario("search", "search Task status+owner", "GET"),
    # Latency without queueing behind other clients: the search target applies here.
    Scenario("search-1", "search Task status+owner", "GET", max_connections=1),
    Scenario("transaction", "transaction, 100 entries", "POST", max_connections=4),
]
SCENARIO_BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}
# Targets for SQLite on one worker: share of the bare FastAPI endpoint's req/s, and search
# latency at 100k Tasks.
MIN_RATIO = {"create": 0.20, "read": 0.50}
MAX_SEARCH_P99_MS = 25.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default=None)
    parser.add_argument("--postgres-url", default=os.environ.get("ATM_BENCH_POSTGRES_URL"),
                        help="server to use for --backend postgres (a fresh schema is "
                             "created and dropped); default $ATM_BENCH_POSTGRES_URL")
    parser.add_argument("--tasks", type=int, help="Tasks loaded before the scenarios "
                                                  "(default 100000; --quick: 2000)")
    parser.add_argument("--duration", type=float, help="measured seconds per scenario "
                                                       "(default 10; --quick: 3)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--enrolments", type=int, help="enrolments driven to completion "
                        "through the orchestrator (default 1000; --quick: 50)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small and short")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin server and load generator to separate cores")
    args = parser.parse_args(argv)
    args.tasks = args.tasks or (2000 if args.quick else 100_000)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.enrolments = args.enrolments or (50 if args.quick else 1000)
    if args.backend is None:
        args.backend = "postgres" if args.postgres_url else "sqlite"
    if args.backend == "postgres" and not args.postgres_url:
        parser.error("--backend postgres needs --postgres-url or ATM_BENCH_POSTGRES_URL")
    return args


# -- processes ------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server subprocess on a loopback port, its output in a log file."""

    def __init__(self, name: str, command: list[str], port: int, workdir: Path,
                 env: dict[str, str], health: str, cpu: int | None) -> None:
        self.name, self.port = name, port
        self.log = workdir / f"{name}.log"
        with self.log.open("w") as sink:
            self.process = subprocess.Popen(command, cwd=workdir, env=env, stdout=sink,
                                            stderr=subprocess.STDOUT)
        if cpu is not None:
            os.sched_setaffinity(self.process.pid, {cpu})
        self._wait_healthy(health)

    def _wait_healthy(self, path: str) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)  # not listening yet
        raise RuntimeError(f"{self.name} did not start in {STARTUP_SECONDS} s:\n{self.tail()}")

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def run_loadgen(port: int, scenario: str, *, connections: int, duration: float = 0.0,
                requests: int = 0, params: dict[str, Any], cpu: int | None,
                workdir: Path, authorization: str | None = None) -> dict[str, Any]:
    spec = {"host": "127.0.0.1", "port": port, "scenario": scenario,
            "connections": connections, "duration": duration, "requests": requests,
            "warmup": min(1.0, duration * 0.2) if duration else 0.0,
            "params": params, "cpu": cpu, "authorization": authorization}
    path = workdir / f"spec-{scenario}.json"
    path.write_text(json.dumps(spec))
    limit = (duration + 120) if duration else 900
    done = subprocess.run([sys.executable, "-m", "bench.loadgen", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=limit)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed for {scenario}:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def run_journeys(port: int, args: argparse.Namespace, cpu: int | None, workdir: Path,
                 client: BenchClient) -> dict[str, Any]:
    """Enrolments driven to completion through the orchestrator (bench.journeys): as many
    as asked with twice the connections as partners (throughput, the queue full), then a
    tenth of them with two partners (latency with no queue)."""
    runs = {"busy": (args.enrolments, args.connections * 2),
            "light": (max(1, args.enrolments // 10), 2)}
    results: dict[str, Any] = {}
    for name, (enrolments, partners) in runs.items():
        spec = {"base_url": f"http://127.0.0.1:{port}/fhir", "enrolments": enrolments,
                "concurrency": partners, "cpu": cpu,
                "credentials": client.credentials.to_json()}
        path = workdir / f"spec-journeys-{name}.json"
        path.write_text(json.dumps(spec))
        done = subprocess.run([sys.executable, "-m", "bench.journeys", str(path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"the journeys failed:\n{done.stderr}")
        results[name] = json.loads(done.stdout)
    return results


class BenchClient:
    """The benchmark's own OAuth2 client (an admin, SMART Backend Services): the gateway
    runs as deployed, with authentication and the audit trail on."""

    def __init__(self, database_url: str, port: int) -> None:
        from gateway.auth.clients import add_client
        from gateway.auth.credentials import Credentials, new_key, public_jwks
        from gateway.settings import Settings
        from gateway.store.database import Database, make_engine

        key = new_key()
        db = Database(make_engine(Settings(database_url=database_url)))
        try:
            client = add_client(db, name="benchmark", role="admin",
                                organization="Organization/benchmark",
                                jwks=public_jwks(key), scopes="system/*.cruds")
        finally:
            db.dispose()
        self.credentials = Credentials(client.client_id, key)
        self.token_url = f"http://127.0.0.1:{port}/auth/token"

    def authorization(self) -> str:
        """A fresh token's header value (tokens live 300 s: one per scenario)."""
        import httpx

        from gateway.auth.credentials import fetch_token

        with httpx.Client(timeout=30.0) as http:
            return f"Bearer {fetch_token(http, self.token_url, self.credentials)['access_token']}"


# -- databases ------------------------------------------------------------------------
class FreshDatabase:
    """A SQLite file in the work directory, or a new PostgreSQL schema dropped at the end."""

    def __init__(self, backend: str, postgres_url: str | None, workdir: Path) -> None:
        self.backend, self.schema, self.admin_url = backend, "", postgres_url
        if backend == "sqlite":
            self.url = f"sqlite:///{workdir / 'bench.db'}"
            return
        assert postgres_url
        self.schema = f"atm_bench_{uuid.uuid4().hex[:10]}"
        self._admin(f'CREATE SCHEMA "{self.schema}"')
        sep = "&" if "?" in postgres_url else "?"
        self.url = f"{postgres_url}{sep}options=-csearch_path%3D{self.schema}"
        from gateway.settings import Settings
        from gateway.store.database import make_engine
        from gateway.store.migrate import upgrade

        engine = make_engine(Settings(database_url=self.url))
        upgrade(engine)  # `atm serve` migrates SQLite only
        engine.dispose()

    def _admin(self, sql: str) -> None:
        from sqlalchemy import create_engine, text

        from gateway.settings import Settings

        assert self.admin_url
        engine = create_engine(Settings(database_url=self.admin_url).sqlalchemy_url)
        with engine.begin() as conn:
            conn.execute(text(sql))
        engine.dispose()

    def analyze(self) -> None:
        """Refresh PostgreSQL's statistics after the bulk load, as autovacuum would (this
        machine's server runs with autovacuum off): without them it plans searches for
        empty tables."""
        if self.schema:
            from gateway.store.schema import metadata

            for table in metadata.sorted_tables:
                self._admin(f'ANALYZE "{self.schema}"."{table.name}"')

    def drop(self) -> None:
        if self.schema:
            self._admin(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')


# -- the run --------------------------------------------------------------------------
def pinning(args: argparse.Namespace) -> tuple[int | None, int | None]:
    can = hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2 and not args.no_pin
    return (SERVER_CPU, CLIENT_CPU) if can else (None, None)


def load_tasks(port: int, args: argparse.Namespace, client_cpu: int | None,
               workdir: Path, authorization: str) -> dict[str, Any]:
    bundles = math.ceil(args.tasks / workload.BUNDLE_SIZE)
    started = time.perf_counter()
    result = run_loadgen(port, "load", connections=min(4, bundles), requests=bundles,
                         params={"tasks": args.tasks}, cpu=client_cpu, workdir=workdir,
                         authorization=authorization)
    seconds = time.perf_counter() - started
    if result["errors"]:
        raise RuntimeError(f"loading Tasks failed: {result['failures']}")
    return {"tasks": args.tasks, "seconds": round(seconds, 1),
            "tasks_per_s": round(args.tasks / seconds, 1)}


def check_dataset(port: int, tasks: int, authorization: str) -> None:
    """Fail loudly when the searched data is not what the figures claim."""
    base = f"http://127.0.0.1:{port}/fhir"
    headers = {"Authorization": authorization}
    read = urllib.request.Request(f"{base}/Task/{workload.task_id(tasks - 1)}", headers=headers)
    with urllib.request.urlopen(read, timeout=30) as r:
        assert json.load(r)["id"] == workload.task_id(tasks - 1)
    url = f"{base}/Task?status=ready&owner=Organization/org-0&_count=20"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                timeout=30) as response:
        bundle = json.load(response)
    expected = min(20, len(range(0, tasks, len(workload.STATUSES) * workload.ORGANISATIONS)))
    found = len(bundle.get("entry", []))
    if found < expected:
        raise RuntimeError(f"search found {found} Tasks, expected {expected}")


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    server_cpu, client_cpu = pinning(args)
    database = FreshDatabase(args.backend, args.postgres_url, workdir)
    servers: list[Server] = []
    try:
        ports = {}
        for name in BASELINES:
            ports[name] = port = free_port()
            servers.append(Server(name, [sys.executable, "-m", "bench.bare", "--port",
                                         str(port), "--framework", name], port, workdir,
                                  {**os.environ, "PYTHONPATH": str(ROOT)}, "/bare",
                                  server_cpu))
        ports["gateway"] = gateway_port = free_port()
        # As deployed (authentication and the audit trail on), without the per-client
        # rate limit: the benchmark's one client is meant to go as fast as it can.
        env = {**os.environ, "ATM_DATABASE_URL": database.url, "ATM_AUTH": "smart",
               "ATM_RATE_LIMIT_PER_SECOND": "0",
               "ATM_BASE_URL": f"http://127.0.0.1:{gateway_port}/fhir"}
        servers.append(Server("gateway", [sys.executable, "-m", "gateway.cli", "serve",
                                          "--host", "127.0.0.1", "--port", str(gateway_port)],
                              gateway_port, workdir, env, "/healthz", server_cpu))
        client = BenchClient(database.url, gateway_port)
        loaded = load_tasks(gateway_port, args, client_cpu, workdir, client.authorization())
        database.analyze()
        check_dataset(gateway_port, args.tasks, client.authorization())
        results: dict[str, Any] = {}

        def drive(scenario: Scenario, duration: float) -> dict[str, Any]:
            connections = min(args.connections, scenario.max_connections or args.connections)
            result = run_loadgen(
                ports[scenario.server], scenario.name, connections=connections,
                duration=duration, params={"tasks": args.tasks, "connections": connections},
                cpu=client_cpu, workdir=workdir,
                authorization=client.authorization() if scenario.server == "gateway"
                else None)
            result["connections"] = connections
            return result

        for scenario in SCENARIOS:
            if scenario.name not in MIN_RATIO:
                results[scenario.name] = drive(scenario, args.duration)
                continue
            # This machine's speed drifts within minutes: a target's baseline is measured
            # again right before and right after it, and the ratio taken against both.
            assert scenario.method is not None
            baseline = SCENARIO_BY_NAME[f"{TARGET_BASELINE}-{scenario.method.lower()}"]
            before = drive(baseline, args.duration / 2)
            results[scenario.name] = drive(scenario, args.duration)
            after = drive(baseline, args.duration / 2)
            results[scenario.name]["adjacent_baseline_rps"] = [before["rps"], after["rps"]]
        journeys = run_journeys(gateway_port, args, client_cpu, workdir, client)
        return {"load": loaded, "scenarios": results, "journeys": journeys,
                "pinned": {"server_cpu": server_cpu, "client_cpu": client_cpu}}
    except Exception:
        for server in servers:
            sys.stderr.write(f"--- {server.name} log ---\n{server.tail()}\n")
        raise
    finally:
        for server in servers:
            server.stop()
        database.drop()


def verdicts(results: dict[str, Any], tasks: int) -> dict[str, str]:
    out = {}
    for name, minimum in MIN_RATIO.items():
        ratio = results[name].get("ratio")
        if ratio is not None:
            ok = ratio >= minimum
            out[name] = (f">= {minimum:.0%} of {BASELINES[TARGET_BASELINE]}: {ratio:.1%} "
                         f"{'ok' if ok else 'MISSED'}")
    p99 = results["search-1"]["p99_ms"]
    scale = "" if tasks >= 100_000 else f" (only {tasks} Tasks)"
    ok = p99 is not None and p99 < MAX_SEARCH_P99_MS
    out["search-1"] = f"p99 < {MAX_SEARCH_P99_MS:g} ms at 100k: {'ok' if ok else 'MISSED'}{scale}"
    return out


def add_ratios(results: dict[str, Any]) -> None:
    """`ratio` against the target's baseline, `ratio_<name>` against each baseline."""
    for scenario in SCENARIOS:
        if scenario.method is None:
            continue
        row = results[scenario.name]
        for name in BASELINES:
            base = results[f"{name}-{scenario.method.lower()}"]["rps"]
            row[f"ratio_{name}"] = round(row["rps"] / base, 4) if base else None
        row["ratio"] = row[f"ratio_{TARGET_BASELINE}"]
        adjacent = row.get("adjacent_baseline_rps")
        if adjacent and all(adjacent):  # the target's ratio, against its own baseline runs
            row["ratio"] = row[f"ratio_{TARGET_BASELINE}"] = round(
                row["rps"] / (sum(adjacent) / len(adjacent)), 4)


def table(report: dict[str, Any]) -> str:
    results, targets = report["scenarios"], report["targets"]
    header = (f"ATM Gateway benchmark: {report['backend']}, {report['tasks']} Tasks "
              f"(loaded in {report['load']['seconds']} s, {report['load']['tasks_per_s']}"
              f" Tasks/s), {report['connections']} connections, {report['duration']:g} s "
              "per scenario, 1 worker")
    lines = [header, "",
             f"{'scenario':<36}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
             + "".join(f"{'vs ' + name:>12}" for name in BASELINES) + "  target"]
    for scenario in SCENARIOS:
        row = results[scenario.name]
        ratios = "".join(f"{_share(row.get(f'ratio_{name}')):>12}" for name in BASELINES)
        label = scenario.label
        if row.get("connections") != report["connections"]:
            count = row.get("connections")
            label = f"{label} ({count} conn{'s' if count != 1 else ''})"
        lines.append(f"{label:<36}{row['rps']:>10,.1f}{_ms(row['p50_ms'])}"
                     f"{_ms(row['p99_ms'])}{row['errors']:>8}{ratios}  "
                     f"{targets.get(scenario.name, '')}".rstrip())
    return "\n".join([*lines, "", journeys_line(report)])


def journeys_line(report: dict[str, Any]) -> str:
    """The orchestration figures, with their ratio to plain Task creates in this run."""
    busy, light = report["journeys"]["busy"], report["journeys"]["light"]
    creates = report["scenarios"]["create"]["rps"]
    rate = busy["advances_per_s"]
    ratio = _share(rate / creates) if creates and rate else "-"
    return (f"orchestration: {busy['enrolments']} enrolments driven to completion by "
            f"{busy['concurrency']} partners in {busy['seconds']} s "
            f"({busy['completed_careplans']} CarePlans completed, {busy['errors']} errors): "
            f"{rate:,.1f} advances/s = {ratio} of create Task req/s; Task completion -> "
            f"successor Task p50 {busy['latency_p50_ms']} ms, p99 {busy['latency_p99_ms']} "
            f"ms\n  with {light['concurrency']} partners ({light['enrolments']} enrolments, "
            f"{light['errors']} errors): {light['advances_per_s']:,.1f} advances/s, p50 "
            f"{light['latency_p50_ms']} ms, p99 {light['latency_p99_ms']} ms")


def _share(ratio: float | None) -> str:
    return f"{ratio:.1%}" if ratio is not None else "-"


def _ms(value: float | None) -> str:
    return f"{value:>9.2f}" if value is not None else f"{'-':>9}"


def describe_machine() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True, check=False).stdout.strip()
    return {"commit": commit or None, "python": platform.python_version(),
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    machine = describe_machine()
    workdir = Path(tempfile.mkdtemp(prefix="atm-bench-"))
    try:
        measured = measure(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    add_ratios(measured["scenarios"])
    report = {"backend": args.backend, "tasks": args.tasks, "duration": args.duration,
              "connections": args.connections, "quick": args.quick, "machine": machine,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **measured}
    # The targets are the embedded engine's; PostgreSQL's figures are reported as measured.
    report["targets"] = (verdicts(measured["scenarios"], args.tasks)
                         if args.backend == "sqlite" else {})
    print(table(report))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{args.backend}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults: {out}")
    failed = any(r["errors"] for r in measured["scenarios"].values())
    journeys = measured["journeys"].values()
    return 1 if failed or any(j["errors"] for j in journeys) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
