"""The benchmark runs end to end on SQLite (tiny and short: this checks the script, not
the speed), notifications to 10 subscribers included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.run import SCENARIOS

ROOT = Path(__file__).resolve().parents[2]


def test_bench_quick_prints_every_scenario_and_writes_json(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--tasks", "200", "--duration", "0.5",
         "--connections", "2", "--enrolments", "10", "--notify-events", "20",
         "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ATM Gateway benchmark: sqlite, 200 Tasks")
    for scenario in SCENARIOS:
        assert any(line.startswith(scenario.label) for line in lines), scenario.label
    written = list(tmp_path.glob("*-sqlite.json"))
    assert len(written) == 1
    report = json.loads(written[0].read_text())
    assert set(report["scenarios"]) == {s.name for s in SCENARIOS}
    assert report["load"]["tasks"] == 200
    assert all(row["errors"] == 0 for row in report["scenarios"].values())
    assert report["scenarios"]["read"]["ok"] > 0
    for name in ("create", "read"):  # the targets' own baseline runs, before and after
        row = report["scenarios"][name]
        before, after = row["adjacent_baseline_rps"]
        assert before > 0 and after > 0
        assert row["ratio"] == round(row["rps"] / ((before + after) / 2), 4)
    busy, light = report["journeys"]["busy"], report["journeys"]["light"]
    assert busy["completed_careplans"] == busy["enrolments"] == 10
    assert busy["advances"] == 70 and busy["errors"] == 0  # seven stages each
    assert busy["latency_p99_ms"] >= busy["latency_p50_ms"] > 0
    assert light["enrolments"] == 1 and light["concurrency"] == 2
    assert light["completed_careplans"] == 1 and light["errors"] == 0
    assert any(line.startswith("orchestration: 10 enrolments") for line in lines)
    check_notifications(report, lines, events=20, light=2)


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
    assert any(f"all {10 * (events + light)} events, each once" in line for line in lines)
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
