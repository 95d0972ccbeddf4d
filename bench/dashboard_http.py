"""The programme page over HTTP, as a person gets it (bench.run's dashboard part).

`python -m bench.dashboard_http SPEC.json`, against an `atm serve` on the database
bench.dashboard filled: adds an admin and one treatment centre's user, signs each in
through the real flow (/dashboard/login, the authorization server's form, the callback),
then GETs the programme page (unfiltered, for one site, for the last 30 days), its panels
(what open pages fetch on each live update) and, as the baseline, the FHIR search
`Task?status=ready&_count=50` with a client's token: `calls` rounds, one request of each
per round, one at a time. Each is timed at the client (wall) and by the server's own
`Server-Timing: app;dur=` header. The first page, which builds the board, is timed apart.
Prints one JSON object.
"""

from __future__ import annotations

import html
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from gateway.auth.credentials import Credentials, fetch_token
from gateway.auth.people import add_user
from gateway.settings import Settings
from gateway.store.database import Database, make_engine

PASSWORD = "bench dashboard password"
ADMIN, CENTRE = "bench-admin", "bench-centre"
_HIDDEN = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)"')
_SERVER_TIMING = re.compile(r"app;dur=([0-9.]+)")


@dataclass
class Spec:
    base_url: str  # the gateway's origin: http://127.0.0.1:<port>
    database_url: str
    centre: str  # Organization/<id> of the treatment centre whose user signs in
    credentials: dict[str, Any]  # a client's (Credentials.to_json), for the baseline
    calls: int = 50
    cpu: int | None = None


@dataclass(frozen=True)
class Probe:
    """One request measured each round."""

    name: str
    client: httpx.Client
    path: str


# -- signing in ---------------------------------------------------------------------------
def add_people(database_url: str, centre: str) -> None:
    db = Database(make_engine(Settings(database_url=database_url)))
    try:
        for username, role, organization in ((ADMIN, "admin", "Organization/ops"),
                                             (CENTRE, "treatment-centre", centre)):
            add_user(db, username=username, password=PASSWORD, role=role,
                     organization=organization, display_name=username.title(),
                     now=int(time.time()))
    finally:
        db.dispose()


def _expect(response: httpx.Response, status: int, step: str) -> httpx.Response:
    if response.status_code != status:
        raise RuntimeError(f"{step}: {response.status_code} {response.text[:300]}")
    return response


def signed_in(base_url: str, username: str) -> httpx.Client:
    """A client holding the dashboard's session cookie, after the flow a browser follows."""
    http = httpx.Client(base_url=base_url, timeout=120.0)
    start = _expect(http.get("/dashboard/login"), 303, "/dashboard/login")
    form = _expect(http.get(start.headers["location"]), 200, "the sign-in form")
    fields = {name: html.unescape(value) for name, value in _HIDDEN.findall(form.text)}
    posted = _expect(http.post("/auth/authorize", data={
        **fields, "username": username, "password": PASSWORD}), 303, "POST /auth/authorize")
    back = _expect(http.get(posted.headers["location"]), 303, "/dashboard/callback")
    if "atm_session" not in http.cookies or back.headers["location"] != "/dashboard":
        raise RuntimeError(f"signed in as {username}, but no session came back")
    return http


def with_token(base_url: str, credentials: dict[str, Any]) -> httpx.Client:
    http = httpx.Client(base_url=base_url, timeout=120.0)
    token = fetch_token(http, f"{base_url}/auth/token", Credentials.from_json(credentials))
    http.headers["Authorization"] = f"Bearer {token['access_token']}"
    return http


# -- measuring ----------------------------------------------------------------------------
def get(probe: Probe) -> tuple[float, float | None, int]:
    """(wall ms, the server's own ms if it said, body bytes) of one GET."""
    started = time.perf_counter()
    response = probe.client.get(probe.path)
    wall = (time.perf_counter() - started) * 1000
    _expect(response, 200, f"GET {probe.path}")
    timing = _SERVER_TIMING.search(response.headers.get("server-timing", ""))
    return wall, float(timing.group(1)) if timing else None, len(response.content)


def summary(ms: list[float]) -> dict[str, float] | None:
    if not ms:
        return None
    ordered = sorted(ms)
    return {"p50_ms": round(statistics.median(ordered), 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
            "max_ms": round(ordered[-1], 2)}


def rounds(probes: list[Probe], calls: int) -> dict[str, dict[str, Any]]:
    """Each probe once a round (a drift of the machine's speed touches all alike)."""
    found: dict[str, list[tuple[float, float | None, int]]] = {p.name: [] for p in probes}
    for probe in probes:
        get(probe)  # warm: templates compiled, the first query planned
    for _ in range(calls):
        for probe in probes:
            found[probe.name].append(get(probe))
    return {name: {"path": next(p.path for p in probes if p.name == name),
                   "wall": summary([w for w, _, _ in got]),
                   "server": summary([s for _, s, _ in got if s is not None]),
                   "bytes": got[-1][2], "calls": len(got)}
            for name, got in found.items()}


def first_page(admin: httpx.Client) -> dict[str, float | None]:
    """The first page after start-up: it builds the board (seconds)."""
    wall, server, _ = get(Probe("first", admin, "/dashboard"))
    return {"wall_ms": round(wall, 1), "server_ms": server}


def measure(spec: Spec) -> dict[str, Any]:
    add_people(spec.database_url, spec.centre)
    admin, centre = signed_in(spec.base_url, ADMIN), signed_in(spec.base_url, CENTRE)
    fhir = with_token(spec.base_url, spec.credentials)
    try:
        first = first_page(admin)
        since = (datetime.now(UTC) - timedelta(days=30)).date().isoformat()
        probes = [Probe("page", admin, "/dashboard"),
                  Probe("page_site", admin, f"/dashboard?site={spec.centre}"),
                  Probe("page_since", admin, f"/dashboard?since={since}"),
                  Probe("panels", admin, "/dashboard/panels"),
                  Probe("page_centre", centre, "/dashboard"),
                  Probe("search", fhir, "/fhir/Task?status=ready&_count=50")]
        return {"first": first, "calls": spec.calls, **rounds(probes, spec.calls)}
    finally:
        for http in (admin, centre, fhir):
            http.close()


# -- the table's lines --------------------------------------------------------------------
LABELS = {"page": "GET /dashboard (admin)", "page_site": "  ?site=<one centre>",
          "page_since": "  ?since=<30 days ago>", "panels": "GET /dashboard/panels",
          "page_centre": "GET /dashboard (one centre)",
          "search": "Task?status=ready&_count=50 (baseline)"}


def lines(result: dict[str, Any], target_ms: float, in_process_ms: float) -> list[str]:
    """One row per request: wall and server p50/p99, the server p99 against the target,
    the wall p50 against the FHIR search's, and the server p50 against programme()'s
    in-process p50 (an admin's, over varied filters)."""
    search = result["search"]["wall"]["p50_ms"]
    first = result["first"]
    rows = [f"  over HTTP, {result['calls']} rounds, one request at a time; first page "
            f"(builds the board) {first['wall_ms']:,.0f} ms wall, {first['server_ms']} ms "
            "server",
            f"  {'request':<40}{'wall p50':>9}{'p99':>8}{'server p50':>11}{'p99':>8}"
            f"{'KiB':>6}{'p99/target':>11}{'vs search':>10}{'vs programme()':>15}"]
    for name, label in LABELS.items():
        row = result[name]
        wall, server = row["wall"], row["server"] or {}
        s50, s99 = server.get("p50_ms"), server.get("p99_ms")
        rows.append(
            f"  {label:<40}{wall['p50_ms']:>9.1f}{wall['p99_ms']:>8.1f}{_ms(s50, 11)}"
            f"{_ms(s99, 8)}{row['bytes'] / 1024:>6.0f}{_ratio(s99, target_ms, '%'):>11}"
            f"{_ratio(wall['p50_ms'], search, 'x'):>10}{_ratio(s50, in_process_ms, 'x'):>15}")
    return rows


def _ms(value: float | None, width: int) -> str:
    return f"{value:>{width}.1f}" if value is not None else f"{'-':>{width}}"


def _ratio(value: float | None, base: float | None, unit: str) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.1%}" if unit == "%" else f"{value / base:.1f}x"


def main(argv: list[str]) -> None:
    with open(argv[0]) as file:
        spec = Spec(**json.load(file))
    if spec.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {spec.cpu})
    print(json.dumps(measure(spec)))


if __name__ == "__main__":
    main(sys.argv[1:])

