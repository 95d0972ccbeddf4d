"""Measure the gateway against bare endpoints on this machine.

`python -m bench.run [--backend sqlite|postgres] [--tasks 100000] [--duration 10]
[--quick] [--only NAME,...]`: starts `atm serve` (uvloop + httptools, one worker) on a
fresh database and two baselines under the same settings (a bare FastAPI endpoint, which
the targets refer to, and a raw ASGI callable, the ceiling of the server itself), loads
Tasks through 100-entry transactions, then drives each scenario from a separate
load-generator process (the last, $find-chain, on a network of sites and slots loaded for
it by bench.findchain), the orchestrator's journeys (bench.journeys) and Subscription
notifications to 10 receivers (bench.notify). Prints a table and writes JSON to
bench/results/.
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

FIND_CHAIN = "find-chain"
"""The scenario with a data set of its own (bench.findchain), loaded just before it."""
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
    # One coordinator searching (latency, as the target is stated), on its own data set.
    Scenario(FIND_CHAIN, "$find-chain 6x3 sites", "GET", max_connections=1),
]
SCENARIO_BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}
JOURNEYS, NOTIFICATIONS, DASHBOARD = "journeys", "notifications", "dashboard"
"""The parts of a run besides SCENARIOS, by their --only names (all run after them)."""
PARTS = [*SCENARIO_BY_NAME, JOURNEYS, NOTIFICATIONS, DASHBOARD]
# Targets for SQLite on one worker: share of the bare FastAPI endpoint's req/s, and search
# latency at 100k Tasks.
MIN_RATIO = {"create": 0.20, "read": 0.50}
MAX_SEARCH_P99_MS = 25.0
# The chain search's target, at 6 sites x 3 steps x 90 days of 30-minute slots; stated
# for the search, not for an engine, so it is judged on either backend.
MAX_FIND_CHAIN_P99_MS, FIND_CHAIN_DAYS = 200.0, 90
ADJACENT_BASELINE = {*MIN_RATIO, FIND_CHAIN}
"""Scenarios whose baseline is measured right before and right after them."""
MIN_BASELINE_SECONDS = 0.5
"""Those baselines run half a scenario's time, but no less: in a shorter window on a busy
machine the load generator can finish no request at all."""


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
    parser.add_argument("--subscribers", type=int, default=10,
                        help="receivers of the notifications scenario (default 10)")
    parser.add_argument("--notify-events", type=int,
                        help="Tasks created in the notifications scenario, each an event "
                             "for every subscriber (default 2000; --quick: 200)")
    parser.add_argument("--notify-filter", action="store_true",
                        help="subscribe with a filter (Task?owner=…), as partners would; the "
                             "server then tests it on every Task change per Subscription")
    parser.add_argument("--dashboard-journeys", type=int,
                        help="running journeys on the dashboard's own fresh database "
                             "(default 5000; --quick: 50)")
    parser.add_argument("--chain-days", type=int,
                        help="days of 30-minute slots per Schedule for find-chain "
                             f"(default {FIND_CHAIN_DAYS}; --quick: 1)")
    parser.add_argument("--only", type=_names, default=None, metavar="NAME,...",
                        help="run only these parts (Tasks are loaded all the same): "
                             f"{', '.join(PARTS)}; a target's baselines are measured beside "
                             "it, other ratios need their baseline named too (e.g. "
                             "fastapi-post,notifications)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small and short")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin server and load generator to separate cores")
    args = parser.parse_args(argv)
    args.tasks = args.tasks or (2000 if args.quick else 100_000)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.enrolments = args.enrolments or (50 if args.quick else 1000)
    args.notify_events = args.notify_events or (200 if args.quick else 2000)
    args.chain_days = args.chain_days or (1 if args.quick else FIND_CHAIN_DAYS)
    args.dashboard_journeys = args.dashboard_journeys or (50 if args.quick else 5000)
    args.only = args.only or list(PARTS)
    if args.backend is None:
        args.backend = "postgres" if args.postgres_url else "sqlite"
    if args.backend == "postgres" and not args.postgres_url:
        parser.error("--backend postgres needs --postgres-url or ATM_BENCH_POSTGRES_URL")
    return args


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or 'nothing'}: "
                                         f"choose from {', '.join(PARTS)}")
    return [name for name in PARTS if name in names]  # in the run's own order


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


def run_notifications(port: int, args: argparse.Namespace, cpu: int | None, workdir: Path,
                      client: BenchClient) -> dict[str, Any]:
    """Subscription notifications (bench.notify): `--subscribers` receivers on topic
    task-status; a tenth of `--notify-events` Tasks created one at a time (latency with
    no queue), then `--notify-events` Tasks with the usual connections (a burst)."""
    spec = {"base_url": f"http://127.0.0.1:{port}/fhir", "subscribers": args.subscribers,
            "events": args.notify_events, "light": max(1, args.notify_events // 10),
            "concurrency": args.connections, "filter": args.notify_filter, "cpu": cpu,
            "credentials": client.credentials.to_json()}
    path = workdir / "spec-notifications.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", "bench.notify", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the notifications scenario failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def run_dashboard(args: argparse.Namespace, cpus: tuple[int | None, int | None],
                  workdir: Path) -> dict[str, Any]:
    """The programme view on a fresh database of its own: `--dashboard-journeys` running
    journeys and a tenth as many finished ones, loaded and measured in-process
    (bench.dashboard); then the page as a signed-in person gets it from an `atm serve` of
    its own on that database (bench.dashboard_http), under `http`."""
    (workdir / "dashboard").mkdir()
    database = FreshDatabase(args.backend, args.postgres_url, workdir / "dashboard")
    try:
        result = _run_json("bench.dashboard", workdir / "spec-dashboard.json", {
            "database_url": database.url, "journeys": args.dashboard_journeys,
            "completed": args.dashboard_journeys // 10, "cpu": cpus[1]})
        result["http"] = dashboard_over_http(args, database, cpus, workdir / "dashboard")
    finally:
        database.drop()
    return result


def dashboard_over_http(args: argparse.Namespace, database: FreshDatabase,
                        cpus: tuple[int | None, int | None], workdir: Path) -> dict[str, Any]:
    """`atm serve` on the dashboard's database, as deployed (authentication on) but with
    the orchestrator off: it would otherwise catch up with 5,000 journeys loaded behind
    its back, in the same process, while the page is measured."""
    port = free_port()
    env = {**os.environ, "ATM_DATABASE_URL": database.url, "ATM_AUTH": "smart",
           "ATM_RATE_LIMIT_PER_SECOND": "0", "ATM_ORCHESTRATOR": "false",
           "ATM_BASE_URL": f"http://127.0.0.1:{port}/fhir"}
    server = Server("dashboard-gateway", [sys.executable, "-m", "gateway.cli", "serve",
                                          "--host", "127.0.0.1", "--port", str(port)],
                    port, workdir, env, "/healthz", cpus[0])
    try:
        client = BenchClient(database.url, port)
        return _run_json("bench.dashboard_http", workdir / "spec-dashboard-http.json", {
            "base_url": f"http://127.0.0.1:{port}", "database_url": database.url,
            "centre": "Organization/centre-0", "credentials": client.credentials.to_json(),
            "calls": 10 if args.quick else 100, "cpu": cpus[1]})
    except Exception:
        sys.stderr.write(f"--- {server.name} log ---\n{server.tail()}\n")
        raise
    finally:
        server.stop()


def _run_json(module: str, path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Run `python -m module SPEC.json` (written from `spec`); the JSON it prints."""
    path.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", module, str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{module} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


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


def load_chain_network(port: int, args: argparse.Namespace, cpu: int | None,
                       workdir: Path, client: BenchClient) -> dict[str, Any]:
    """The find-chain scenario's data set (bench.findchain): 6 sites for each of CAR-T's
    three steps with `--chain-days` days of 30-minute slots each, routes, a quota, a few
    enrolments and booked chains, written through the FHIR API."""
    spec = {"base_url": f"http://127.0.0.1:{port}/fhir", "days": args.chain_days,
            "cpu": cpu, "credentials": client.credentials.to_json()}
    path = workdir / "spec-find-chain.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", "bench.findchain", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"loading the find-chain network failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


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
        # Notifications go to the benchmark's receivers on this machine; matching and
        # delivery run beside the API, as `atm serve` does by default.
        env = {**os.environ, "ATM_DATABASE_URL": database.url, "ATM_AUTH": "smart",
               "ATM_RATE_LIMIT_PER_SECOND": "0",
               "ATM_BASE_URL": f"http://127.0.0.1:{gateway_port}/fhir",
               "ATM_SUBSCRIPTIONS": "true", "ATM_LOAD_TOPICS": "true",
               "ATM_SUBSCRIPTION_ALLOWED_HOSTS": '["127.0.0.1"]'}
        servers.append(Server("gateway", [sys.executable, "-m", "gateway.cli", "serve",
                                          "--host", "127.0.0.1", "--port", str(gateway_port)],
                              gateway_port, workdir, env, "/healthz", server_cpu))
        client = BenchClient(database.url, gateway_port)
        loaded = load_tasks(gateway_port, args, client_cpu, workdir, client.authorization())
        database.analyze()
        check_dataset(gateway_port, args.tasks, client.authorization())
        results: dict[str, Any] = {}

        def connections_of(scenario: Scenario) -> int:
            return min(args.connections, scenario.max_connections or args.connections)

        def drive(scenario: Scenario, duration: float, connections: int | None = None,
                  params: dict[str, Any] | None = None) -> dict[str, Any]:
            connections = connections or connections_of(scenario)
            result = run_loadgen(
                ports[scenario.server], scenario.name, connections=connections,
                duration=duration, params={"tasks": args.tasks, "connections": connections,
                                           **(params or {})},
                cpu=client_cpu, workdir=workdir,
                authorization=client.authorization() if scenario.server == "gateway"
                else None)
            result["connections"] = connections
            return result

        chain_network: dict[str, Any] | None = None
        for scenario in SCENARIOS:
            if scenario.name not in args.only:
                continue
            params: dict[str, Any] = {}
            if scenario.name == FIND_CHAIN:  # last of SCENARIOS: its load disturbs no other
                chain_network = load_chain_network(gateway_port, args, client_cpu, workdir,
                                                   client)
                database.analyze()
                params = {k: chain_network[k] for k in ("careplans", "first_day", "days")}
            if scenario.name not in ADJACENT_BASELINE:
                results[scenario.name] = drive(scenario, args.duration, params=params)
                continue
            # This machine's speed drifts within minutes: a target's baseline is measured
            # again right before and right after it, with the scenario's connections, and
            # the ratio taken against both.
            assert scenario.method is not None
            baseline = SCENARIO_BY_NAME[f"{TARGET_BASELINE}-{scenario.method.lower()}"]
            seconds = max(args.duration / 2, MIN_BASELINE_SECONDS)
            before = drive(baseline, seconds, connections_of(scenario))
            results[scenario.name] = drive(scenario, args.duration, params=params)
            after = drive(baseline, seconds, connections_of(scenario))
            results[scenario.name]["adjacent_baseline_rps"] = [before["rps"], after["rps"]]
            results[scenario.name]["adjacent_baseline_p50_ms"] = [before["p50_ms"],
                                                                  after["p50_ms"]]
        measured = {"load": loaded, "scenarios": results,
                    "pinned": {"server_cpu": server_cpu, "client_cpu": client_cpu}}
        if chain_network is not None:
            measured["find_chain"] = {k: v for k, v in chain_network.items()
                                      if k != "careplans"}
        if JOURNEYS in args.only:
            measured["journeys"] = run_journeys(gateway_port, args, client_cpu, workdir,
                                                client)
        # Last: its Subscriptions (deleted at its end) see no other scenario's writes.
        if NOTIFICATIONS in args.only:
            measured["notifications"] = run_notifications(gateway_port, args, client_cpu,
                                                           workdir, client)
        if DASHBOARD in args.only:
            measured["dashboard"] = run_dashboard(args, (server_cpu, client_cpu), workdir)
        return measured
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
        ratio = results[name].get("ratio") if name in results else None
        if ratio is not None:
            ok = ratio >= minimum
            out[name] = (f">= {minimum:.0%} of {BASELINES[TARGET_BASELINE]}: {ratio:.1%} "
                         f"{'ok' if ok else 'MISSED'}")
    if "search-1" not in results:
        return out
    p99 = results["search-1"]["p99_ms"]
    scale = "" if tasks >= 100_000 else f" (only {tasks} Tasks)"
    ok = p99 is not None and p99 < MAX_SEARCH_P99_MS
    out["search-1"] = f"p99 < {MAX_SEARCH_P99_MS:g} ms at 100k: {'ok' if ok else 'MISSED'}{scale}"
    return out


def find_chain_verdict(row: dict[str, Any], days: int) -> str:
    p99 = row["p99_ms"]
    ok = p99 is not None and p99 < MAX_FIND_CHAIN_P99_MS
    scale = "" if days >= FIND_CHAIN_DAYS else f" (only {_count(days, 'day')})"
    return (f"p99 < {MAX_FIND_CHAIN_P99_MS:g} ms at 6x3 sites x {FIND_CHAIN_DAYS} d: "
            f"{'ok' if ok else 'MISSED'}{scale}")


def add_ratios(results: dict[str, Any]) -> None:
    """`ratio` against the target's baseline, `ratio_<name>` against each baseline."""
    for scenario in SCENARIOS:
        if scenario.method is None or scenario.name not in results:
            continue
        row = results[scenario.name]
        for name in BASELINES:
            base = results.get(f"{name}-{scenario.method.lower()}", {}).get("rps")
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
        if scenario.name not in results:
            continue
        row = results[scenario.name]
        ratios = "".join(f"{_share(row.get(f'ratio_{name}')):>12}" for name in BASELINES)
        label = scenario.label
        if row.get("connections") != report["connections"]:
            count = row.get("connections")
            label = f"{label} ({count} conn{'s' if count != 1 else ''})"
        lines.append(f"{label:<36}{row['rps']:>10,.1f}{_ms(row['p50_ms'])}"
                     f"{_ms(row['p99_ms'])}{row['errors']:>8}{ratios}  "
                     f"{targets.get(scenario.name, '')}".rstrip())
    if "notifications" in report:
        lines += notification_rows(report)
    tail = [find_chain_line(report)] if "find_chain" in report else []
    if "journeys" in report:
        tail.append(journeys_line(report))
    if "notifications" in report:
        tail.append(notifications_line(report))
    if "dashboard" in report:
        from bench import dashboard

        tail.append(dashboard.line(report["dashboard"]))
    return "\n".join([*lines, *(["", *tail] if tail else [])])


def add_notification_ratios(report: dict[str, Any]) -> None:
    """The burst's Task creates against each POST baseline (as the create row is) and
    against plain Task creates in this run (`ratio_create`): what the subscribers cost
    writers. Events have no baseline counterpart; their pace is taken against the
    writes instead (`pace`: 1.0 when the last event arrives as the last write ends)."""
    notifications = report.get("notifications")
    if notifications is None:
        return
    results, writes = report["scenarios"], notifications["writes"]
    for name in BASELINES:
        base = results.get(f"{name}-post", {}).get("rps")
        writes[f"ratio_{name}"] = round(writes["rps"] / base, 4) if base else None
    creates = results.get("create", {}).get("rps")
    writes["ratio_create"] = round(writes["rps"] / creates, 4) if creates else None
    delivery = notifications["delivery"]
    delivery["pace"] = (round(writes["seconds"] / delivery["seconds"], 4)
                        if delivery["seconds"] > 0 else None)


def notification_rows(report: dict[str, Any]) -> list[str]:
    """Rows in the scenarios' columns. The burst's writes: ratios to the POST baselines,
    as the create row; `target` shows their share of plain creates. The events, of the
    burst and of one write at a time: events/s across subscribers; p50/p99 from commit
    to receipt; errors are events missing, duplicated or unexpected; no baseline (n/a)."""
    notifications = report["notifications"]
    writes, check = notifications["writes"], notifications["check"]
    subscribers, connections = notifications["subscribers"], notifications["concurrency"]
    conns = f" ({connections} conns)" if connections != report["connections"] else ""
    ratios = "".join(f"{_share(writes.get(f'ratio_{name}')):>12}" for name in BASELINES)
    creates = writes.get("ratio_create")
    versus = f"{_share(creates)} of create Task req/s" if creates is not None else ""
    label = f"notify: create Task, {subscribers} subs{conns}"
    rows = [f"{label:<36}{writes['rps']:>10,.1f}{_ms(writes['p50_ms'])}"
            f"{_ms(writes['p99_ms'])}{writes['errors']:>8}{ratios}  {versus}".rstrip()]
    errors = check["missing"] + check["duplicates"] + check["unexpected"]
    total = check["events_per_subscriber"] * subscribers
    verdict = (f"all {total:,} events, each once" if check["complete"] and not errors else
               f"{check['missing']:,} MISSING, {check['duplicates']} duplicated, "
               f"{check['unexpected']} unexpected of {total:,} events")
    na = "".join(f"{'n/a':>12}" for _ in BASELINES)
    for part, label, note in (
            ("delivery", f"notify: events, burst{conns}", verdict),
            ("light", "notify: events, 1 write at a time", "")):
        row = notifications[part]
        rows.append(f"{label:<36}{row['events_per_s']:>10,.1f}{_ms(row['latency_p50_ms'])}"
                    f"{_ms(row['latency_p99_ms'])}{errors if note else '':>8}{na}  "
                    f"{note}".rstrip())
    return rows


def notifications_line(report: dict[str, Any]) -> str:
    """The notifications' figures beyond the table: the spread of latencies, the sizes of
    the notifications, and what the check found."""
    notifications = report["notifications"]
    writes, check = notifications["writes"], notifications["check"]
    pace = _share(notifications["delivery"].get("pace"))
    delivery, light = ({k: "-" if v is None else v for k, v in notifications[part].items()}
                       for part in ("delivery", "light"))
    filtered = " (filtered by owner)" if notifications.get("filter") else ""
    return (f"notifications: {notifications['subscribers']} rest-hook subscribers on topic "
            f"task-status{filtered}, active {notifications['active_after_s']} s after asked"
            f"; burst: {writes['ok']:,} Tasks created by {notifications['concurrency']} "
            f"connections in {writes['seconds']:g} s, {delivery['received']:,} of "
            f"{delivery['expected']:,} events received {delivery['seconds']:g} s after the "
            f"first write (pace {pace} of the writes'); commit -> receipt p50 "
            f"{delivery['latency_p50_ms']} ms, p90 {delivery['latency_p90_ms']} ms, p99 "
            f"{delivery['latency_p99_ms']} ms, max {delivery['latency_max_ms']} ms (from the "
            f"201's arrival p50 {delivery['after_response_p50_ms']} ms)\n"
            f"  one write at a time: {light['tasks']} Task(s), commit -> receipt p50 "
            f"{light['latency_p50_ms']} ms, p90 {light['latency_p90_ms']} ms, p99 "
            f"{light['latency_p99_ms']} ms, max {light['latency_max_ms']} ms; "
            f"{check['notifications']:,} notifications of "
            f"{check['events_per_notification'] or 0} events on average; missing "
            f"{check['missing']}, duplicated {check['duplicates']}, unexpected "
            f"{check['unexpected']}")


def find_chain_line(report: dict[str, Any]) -> str:
    """What the find-chain scenario searched, and its latencies beyond the table's, with
    its p50 against the bare FastAPI GET's at one connection, measured beside it."""
    network, row = report["find_chain"], report["scenarios"][FIND_CHAIN]
    first, days = network["step_first_days"], _count(network["days"], "day")
    loaded = (f"find-chain: {network['sites']} sites x {len(network['steps'])} steps = "
              f"{network['schedules']} Schedules, {days} of 30-minute Slots each around "
              f"the clock ({network['slots_per_schedule']:,} per Schedule, "
              f"{network['slots']:,} in all; apheresis from day {first['apheresis']}, "
              f"manufacturing from day {first['manufacturing']}, infusion from day "
              f"{first['infusion']}), PUT in transactions of {network['bundle']} in "
              f"{network['slot_seconds']} s ({network['slots_per_s']:,} Slots/s); routes: "
              f"{network['routes']['priority_1']} of priority 1, "
              f"{network['routes']['priority_2']} of priority 2; quota {network['quota']}; "
              f"{_count(network['booked_chains'], 'chain')} booked first")
    searched = (f"  1 connection, {network['patients']} patients, start on a random half "
                f"hour of the {days} (window: 90 days from there), 1 in 4 urgent: "
                f"{row['ok']} searches, p50 {row['p50_ms']} ms, p90 {row['p90_ms']} ms, "
                f"p99 {row['p99_ms']} ms, max {row['max_ms']} ms")
    baseline = [p for p in row.get("adjacent_baseline_p50_ms", []) if p]
    if baseline and row["p50_ms"]:
        base = sum(baseline) / len(baseline)
        searched += (f"; p50 = {row['p50_ms'] / base:,.0f}x the "
                     f"{BASELINES[TARGET_BASELINE]} GET's ({base:.2f} ms at 1 connection, "
                     "just before and after)")
    return f"{loaded}\n{searched}"


def journeys_line(report: dict[str, Any]) -> str:
    """The orchestration figures, with their ratio to plain Task creates in this run."""
    busy, light = report["journeys"]["busy"], report["journeys"]["light"]
    creates = report["scenarios"].get("create", {}).get("rps")  # not in every --only
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


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


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
              "connections": args.connections, "quick": args.quick, "only": args.only,
              "machine": machine, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              **measured}
    add_notification_ratios(report)
    # The targets are the embedded engine's; PostgreSQL's figures are reported as measured.
    report["targets"] = (verdicts(measured["scenarios"], args.tasks)
                         if args.backend == "sqlite" else {})
    # Except the chain search's, stated for the search on any engine.
    if FIND_CHAIN in measured["scenarios"]:
        report["targets"][FIND_CHAIN] = find_chain_verdict(
            measured["scenarios"][FIND_CHAIN], args.chain_days)
    print(table(report))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{args.backend}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults: {out}")
    failed = any(r["errors"] for r in measured["scenarios"].values())
    journeys = measured.get("journeys", {}).values()
    notifications = measured.get("notifications")
    if notifications is not None and notifications["errors"]:
        failed = True
        sys.stderr.write("notifications FAILED: " + "; ".join(notifications["failures"])
                         + "\n" + json.dumps(notifications["per_subscriber"]) + "\n")
    return 1 if failed or any(j["errors"] for j in journeys) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
