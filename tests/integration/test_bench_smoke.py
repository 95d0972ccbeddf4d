"""The benchmark runs end to end on SQLite (tiny and short: this checks the script, not
the speed), notifications to 10 subscribers included."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.run import SCENARIOS
from tests.conftest import SLOW_TESTS

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Size:
    tasks: int
    duration: float
    """Measured seconds per scenario (each also starts a load-generator process)."""
    enrolments: int
    events: int
    timeout: float

    @property
    def light_enrolments(self) -> int:
        return max(1, self.enrolments // 10)

    @property
    def light_events(self) -> int:
        return max(1, self.events // 10)


# Bounded: 0.2 s per scenario is enough for every one of them to make requests (17 load
# generator runs: 0.5 s each took ~5 s more). ATM_SLOW_TESTS=1: the sizes of `--quick`.
SIZE = (Size(tasks=2000, duration=3.0, enrolments=50, events=200, timeout=900) if SLOW_TESTS
        else Size(tasks=200, duration=0.2, enrolments=10, events=20, timeout=180))


@pytest.mark.slow
def test_bench_quick_prints_every_scenario_and_writes_json(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--tasks", str(SIZE.tasks),
         "--duration", str(SIZE.duration), "--connections", "2",
         "--enrolments", str(SIZE.enrolments), "--notify-events", str(SIZE.events),
         "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=SIZE.timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"ATM Gateway benchmark: sqlite, {SIZE.tasks} Tasks")
    for scenario in SCENARIOS:
        assert any(line.startswith(scenario.label) for line in lines), scenario.label
    written = list(tmp_path.glob("*-sqlite.json"))
    assert len(written) == 1
    report = json.loads(written[0].read_text())
    assert set(report["scenarios"]) == {s.name for s in SCENARIOS}
    assert report["load"]["tasks"] == SIZE.tasks
    assert all(row["errors"] == 0 for row in report["scenarios"].values())
    assert report["scenarios"]["read"]["ok"] > 0
    for name in ("create", "read"):  # the targets' own baseline runs, before and after
        row = report["scenarios"][name]
        before, after = row["adjacent_baseline_rps"]
        assert before > 0 and after > 0
        assert row["ratio"] == round(row["rps"] / ((before + after) / 2), 4)
    busy, light = report["journeys"]["busy"], report["journeys"]["light"]
    assert busy["completed_careplans"] == busy["enrolments"] == SIZE.enrolments
    assert busy["advances"] == 7 * SIZE.enrolments  # seven stages each
    assert busy["errors"] == 0
    assert busy["latency_p99_ms"] >= busy["latency_p50_ms"] > 0
    assert light["enrolments"] == SIZE.light_enrolments and light["concurrency"] == 2
    assert light["completed_careplans"] == SIZE.light_enrolments and light["errors"] == 0
    assert any(line.startswith(f"orchestration: {SIZE.enrolments} enrolments")
               for line in lines)
    check_notifications(report, lines, events=SIZE.events, light=SIZE.light_events)
    check_find_chain(report, lines, days=1)  # --quick's


def check_find_chain(report: dict[str, Any], lines: list[str], days: int) -> None:
    """The chain search ran on its own network (18 Schedules of `days` days of half
    hours), one search at a time, with its baseline beside it and its target marked as
    judged on fewer days."""
    network, row = report["find_chain"], report["scenarios"]["find-chain"]
    assert network["schedules"] == 18 and network["slots"] == 18 * days * 48
    # Every patient's search found chains (the loader checks): the load generator's few
    # searches in a window this short may all have begun in its warm-up.
    assert network["booked_chains"] >= 1 and network["chains_min"] >= 1
    assert row["connections"] == 1 and row["errors"] == 0
    assert len(row["adjacent_baseline_rps"]) == 2  # measured before and after it
    unit = "day" if days == 1 else "days"
    assert report["targets"]["find-chain"].endswith(f"(only {days} {unit})")
    assert any(line.startswith("find-chain: 6 sites x 3 steps") for line in lines)


def test_bench_only_names_find_chain() -> None:
    from bench.run import parse_args

    assert parse_args(["--only", "find-chain"]).only == ["find-chain"]


def check_notifications(report: dict[str, Any], lines: list[str], events: int,
                        light: int) -> None:
    """10 receivers got every event, each once: `light` Tasks one at a time, then `events`
    Tasks in a burst."""
    notifications = report["notifications"]
    assert notifications["subscribers"] == 10 and notifications["errors"] == 0, notifications
    assert notifications["writes"]["ok"] == events
    check = notifications["check"]
    assert check["events_per_subscriber"] == events + light
    assert (check["missing"], check["duplicates"], check["unexpected"]) == (0, 0, 0)
    assert all(s["events"] == events + light and s["handshakes"] == 1
               for s in notifications["per_subscriber"])
    delivery, one_by_one = notifications["delivery"], notifications["light"]
    assert delivery["received"] == delivery["expected"] == 10 * events
    assert one_by_one["received"] == one_by_one["expected"] == 10 * light
    assert delivery["events_per_s"] > 0
    for row in (delivery, one_by_one):
        assert row["latency_p99_ms"] >= row["latency_p50_ms"] > 0
    for label in ("notify: create Task, 10 subs", "notify: events, burst",
                  "notify: events, 1 write at a time"):
        assert any(line.startswith(label) for line in lines), label
    assert any(f"all {10 * (events + light):,} events, each once" in line for line in lines)
    assert any(line.startswith("notifications: 10 rest-hook subscribers") for line in lines)


def test_bench_only_notifications(tmp_path: Path) -> None:
    """--only runs one part: here the notifications alone, with no other scenario."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--backend", "sqlite", "--only", "notifications",
         "--tasks", "100", "--connections", "2", "--notify-events", "10",
         "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(next(tmp_path.glob("*-sqlite.json")).read_text())
    assert report["only"] == ["notifications"]
    assert report["scenarios"] == {} and "journeys" not in report
    check_notifications(report, result.stdout.splitlines(), events=10, light=1)
