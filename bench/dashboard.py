"""The programme view's read model at scale (gateway/dashboard/board.py).

`python -m bench.dashboard SPEC.json` fills a fresh store with `journeys` running journeys
and `completed` finished ones, played by the orchestration engine (bench.dashboard_data).
It then measures, in this process:

- the board's first build (`Board.refresh()` on an empty board), and a second one;
- `Board.programme()` for an admin and for one treatment centre, `calls` calls each with
  varied filters (none, each therapy, a site, the last 30 days, a closed range);
- `refresh()` with nothing changed, and after `updates` Tasks were completed;
- baselines on the same database: one FHIR search `Task?status=ready&_count=50` through
  the gateway's own services (what any API request costs here, minus HTTP), and the read
  and parse of every Task once (what a page without the board would do per request).

It prints one JSON object; the figures are checked against the generated numbers first.
The page over HTTP is bench.dashboard_http's, on the same database.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import select

from bench.dashboard_data import Network, analyze, load, network
from gateway.dashboard.board import Board, Filters, Viewer
from gateway.services.context import Context, FhirRequest
from gateway.services.router import handle
from gateway.settings import Settings
from gateway.store.database import Database, make_engine
from gateway.store.migrate import upgrade
from gateway.store.repository import Actor, Repository
from gateway.store.schema import resources
from orchestration import writes

TARGET_MS = 500.0  # the programme page's server time at 5,000 running journeys


@dataclass
class Spec:
    database_url: str
    journeys: int = 5000
    completed: int = 500
    calls: int = 50
    updates: int = 100
    seed: int = 7
    cpu: int | None = None



# -- measuring ----------------------------------------------------------------------------
def timed(fn: Callable[[], Any], times: int) -> list[float]:
    """Milliseconds of each call."""
    found = []
    for _ in range(times):
        started = time.perf_counter()
        fn()
        found.append((time.perf_counter() - started) * 1000)
    return found


def summary(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    return {"p50_ms": round(statistics.median(ordered), 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
            "max_ms": round(ordered[-1], 2), "calls": len(ordered)}


def varied_filters(net: Network, now: datetime) -> list[Filters]:
    today = now.date()
    return [Filters(), *(Filters(therapy=p.url) for _, p in net.protocols),
            Filters(site=net.centres[0]), Filters(since=today - timedelta(days=30)),
            Filters(since=today - timedelta(days=120), until=today - timedelta(days=60))]


def measure_programme(board: Board, viewer: Viewer, filters: list[Filters], calls: int,
                      now: datetime) -> dict[str, float]:
    picks = iter([filters[n % len(filters)] for n in range(calls)])
    return summary(timed(lambda: board.programme(viewer, next(picks), now), calls))


def complete_tasks(db: Database, count: int) -> int:
    """Partners complete `count` open Tasks, one transaction each."""
    with db.read() as conn:
        rows = conn.execute(select(resources.c.res_id, resources.c.content).where(
            resources.c.res_type == "Task", resources.c.deleted.is_(False))).all()
    open_tasks = [orjson.loads(c) for _, c in rows]
    open_tasks = [t for t in open_tasks if t["status"] == "ready"][:count]
    for task in open_tasks:
        with db.write() as conn:
            ended = writes.instant(datetime.now(UTC))
            Repository(conn, Actor("bench")).update(
                task | {"status": "completed", "executionPeriod": {"end": ended}}, task["id"])
    return len(open_tasks)


def read_every_task(db: Database) -> int:
    """What the page would cost without the board: every Task read and parsed once."""
    with db.read() as conn:
        return sum(1 for (content,) in conn.execute(select(resources.c.content).where(
            resources.c.res_type == "Task", resources.c.deleted.is_(False)))
            if orjson.loads(content))


def check(board: Board, spec: Spec, now: datetime) -> None:
    """The figures describe what was generated, or the timings mean nothing."""
    counts = board.programme(Viewer("admin", "Organization/ops"), now=now).counts
    running = counts.active + counts.on_hold
    if counts.total != spec.journeys + spec.completed or running != spec.journeys:
        raise RuntimeError(f"the board counts {counts}; generated {spec.journeys} running "
                           f"and {spec.completed} completed journeys")


def run(spec: Spec) -> dict[str, Any]:
    engine = make_engine(Settings(database_url=spec.database_url))
    upgrade(engine)
    db = Database(engine)
    try:
        return measure(db, spec)
    finally:
        db.dispose()


def measure(db: Database, spec: Spec) -> dict[str, Any]:
    net, now = network(), datetime.now(UTC)
    started = time.perf_counter()
    written = load(context(db, spec), net, now, running=spec.journeys,
                   finished=spec.completed, seed=spec.seed)
    load_s = time.perf_counter() - started
    analyze(db)
    board = Board(db)
    build_ms = timed(board.refresh, 1)[0]
    rebuild_ms = timed(Board(db).refresh, 1)[0]
    check(board, spec, now)
    filters = varied_filters(net, now)
    admin = measure_programme(board, Viewer("admin", "Organization/ops"), filters,
                              spec.calls, now)
    centre = measure_programme(board, Viewer("treatment-centre", net.centres[0]),
                               [replace(f, site=None) for f in filters], spec.calls, now)
    unchanged = summary(timed(board.refresh, 20))
    version = board.version
    updated = complete_tasks(db, spec.updates)
    refresh_ms = timed(board.refresh, 1)[0]
    if board.version != version + 1:
        raise RuntimeError("the refresh after the updates changed nothing")
    search = baseline_search(db, spec, spec.calls)
    naive_ms = statistics.median(timed(lambda: read_every_task(db), 3))
    return {
        "backend": "sqlite" if db.is_sqlite else "postgres", "written": written,
        "journeys": spec.journeys, "completed": spec.completed,
        "load_s": round(load_s, 1),
        "resources_per_s": round(sum(written.values()) / load_s, 1),
        "build_ms": round(build_ms, 1), "rebuild_ms": round(rebuild_ms, 1),
        "programme_admin": admin, "programme_centre": centre,
        "refresh_unchanged": unchanged,
        "refresh_after_updates": {"updates": updated, "ms": round(refresh_ms, 2)},
        "baseline_search": search, "baseline_read_every_task_ms": round(naive_ms, 1),
        "target_ms": TARGET_MS}


def context(db: Database, spec: Spec) -> Context:
    """The gateway's services on this database, with no one to authenticate."""
    return Context(db=db, settings=Settings(database_url=spec.database_url, auth="off"),
                   base_url="http://bench/fhir")


def baseline_search(db: Database, spec: Spec, calls: int) -> dict[str, float]:
    """`Task?status=ready&_count=50` through the gateway's own services, as a FHIR API
    request is served (parse, search, Bundle), without HTTP."""
    ctx = context(db, spec)
    request = FhirRequest("GET", "Task", query=[("status", "ready"), ("_count", "50")])

    def search() -> None:
        response = handle(ctx, request)
        assert response.status == 200 and response.body and b'"entry"' in response.body

    search()  # warm: the first search imports and plans
    return summary(timed(search, calls))


def line(result: dict[str, Any]) -> str:
    """The figures for bench.run's table: programme()'s p99 against the page's 500 ms
    target, its p50 against one FHIR search on the same database and against reading
    every Task; then the page over HTTP, if measured."""
    admin, centre = result["programme_admin"], result["programme_centre"]
    search, naive = result["baseline_search"]["p50_ms"], result["baseline_read_every_task_ms"]
    after = result["refresh_after_updates"]
    return (f"dashboard: {result['journeys']:,} running + {result['completed']:,} finished "
            f"journeys, {result['written'].get('Task', 0):,} Tasks, loaded in "
            f"{result['load_s']} s; board built in {result['build_ms']:,.0f} ms (again "
            f"{result['rebuild_ms']:,.0f} ms)\n"
            f"  programme(): admin p50 {admin['p50_ms']} ms, p99 {admin['p99_ms']} ms "
            f"({admin['p99_ms'] / result['target_ms']:.1%} of the {result['target_ms']:g} ms "
            f"target); one centre p50 {centre['p50_ms']} ms, p99 {centre['p99_ms']} ms; "
            f"admin p50 = {admin['p50_ms'] / search:.1f}x one Task?status=ready&_count=50 "
            f"search ({search} ms), 1/{naive / admin['p50_ms']:.0f} of reading every Task "
            f"({naive:,.0f} ms)\n"
            f"  refresh(): nothing changed p50 {result['refresh_unchanged']['p50_ms']} ms; "
            f"after {after['updates']} Task updates {after['ms']} ms"
            + "".join("\n" + row for row in _http_lines(result)))


def _http_lines(result: dict[str, Any]) -> list[str]:
    """The page over HTTP (bench.dashboard_http), when it was measured."""
    if "http" not in result:
        return []
    from bench import dashboard_http

    return dashboard_http.lines(result["http"], result["target_ms"],
                                result["programme_admin"]["p50_ms"])


def main(argv: list[str]) -> None:
    with open(argv[0]) as file:
        spec = Spec(**json.load(file))
    if spec.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {spec.cpu})
    print(json.dumps(run(spec)))


if __name__ == "__main__":
    main(sys.argv[1:])
