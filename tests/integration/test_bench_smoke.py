"""The benchmark runs end to end on SQLite (tiny and short: this checks the script, not
the speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.run import SCENARIOS

ROOT = Path(__file__).resolve().parents[2]


def test_bench_quick_prints_every_scenario_and_writes_json(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--tasks", "200", "--duration", "0.5",
         "--connections", "2", "--enrolments", "10", "--results-dir", str(tmp_path)],
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
