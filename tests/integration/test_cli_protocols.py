"""`atm protocols validate | compile | load`: exit codes and output, and loading into a real
database (in process) or a real server on loopback (--server)."""

from __future__ import annotations

import json
from pathlib import Path
from textwrap import dedent

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from gateway.app import create_app
from gateway.cli import app
from gateway.settings import Settings, get_settings
from mappings.protocols import CompiledProtocol, compile_protocol
from tests.integration.test_cli import free_port, run_atm

SHIPPED = sorted((Path(__file__).parents[2] / "orchestration" / "protocols").glob("*.yaml"))
CAR_T = next(p for p in SHIPPED if p.stem == "car-t-autologous")
BROKEN = dedent("""\
    protocol: broken
    roles:
      coordinator: Coordinator
    stages:
      - id: intake
        role: nurse
      - id: eligibility
        after: [intke]
        deadline: 3 days
    """)
BROKEN_LINES = [
    "{f}:6: `role`: unknown role 'nurse' (declared roles: coordinator)",
    "{f}:8: `after`: unknown stage 'intke'",
    "{f}:9: `deadline`: cannot read duration '3 days' (write a number and a unit: 30min, 12h, "
    "3d or 2wk)",
]
runner = CliRunner()


def _compiled(path: Path) -> CompiledProtocol:
    return compile_protocol(path.read_text(encoding="utf-8"), str(path))


def _broken(tmp_path: Path) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN, encoding="utf-8")
    return path


def _without_meta(resource: dict[str, object]) -> dict[str, object]:
    return {key: value for key, value in resource.items() if key != "meta"}


def _loaded_line(path: Path, target: str, outcome: str) -> str:
    compiled = _compiled(path)
    count = len(compiled.activity_definitions)
    return (f"{path}: loaded PlanDefinition/{compiled.id}|1.0.0 ({outcome}) and {count} "
            f"ActivityDefinitions ({count} {outcome}) into {target}")


# -- validate ----------------------------------------------------------------------------
def test_validate_shipped_protocols_prints_ok_with_stage_counts() -> None:
    result = runner.invoke(app, ["protocols", "validate", *map(str, SHIPPED)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"{SHIPPED[0]}: ok (17 stages)", f"{SHIPPED[1]}: ok (23 stages)",
        f"{SHIPPED[2]}: ok (22 stages)"]


def test_validate_broken_protocol_prints_every_problem_and_exits_1(tmp_path: Path) -> None:
    broken = _broken(tmp_path)
    result = runner.invoke(app, ["protocols", "validate", str(CAR_T), str(broken)])
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        f"{CAR_T}: ok (23 stages)", *(line.format(f=broken) for line in BROKEN_LINES)]


def test_validate_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["protocols", "validate", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


# -- compile -----------------------------------------------------------------------------
def test_compile_prints_the_transaction_bundle() -> None:
    result = runner.invoke(app, ["protocols", "compile", str(CAR_T)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == _compiled(CAR_T).bundle()


def test_compile_with_output_writes_the_bundle_file(tmp_path: Path) -> None:
    out = tmp_path / "car-t.json"
    result = runner.invoke(app, ["protocols", "compile", str(CAR_T), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"wrote {out}: PlanDefinition/car-t-autologous and 23 "
                             "ActivityDefinitions\n")
    assert json.loads(out.read_text(encoding="utf-8")) == _compiled(CAR_T).bundle()


def test_compile_broken_protocol_prints_problems_to_stderr_and_exits_1(tmp_path: Path) -> None:
    broken = _broken(tmp_path)
    result = runner.invoke(app, ["protocols", "compile", str(broken)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [line.format(f=broken) for line in BROKEN_LINES]


# -- load into the configured database ------------------------------------------------------
def test_load_into_a_fresh_sqlite_database_then_read_back_through_the_api(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/data/atm.db"
    result = run_atm(tmp_path, "protocols", "load", *map(str, SHIPPED))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [_loaded_line(p, url, "created") for p in SHIPPED]
    settings = Settings(database_url=url, base_url="http://testserver/fhir", log_json=False,
                        load_protocols=False, orchestrator=False, auth="off")
    with TestClient(create_app(settings, migrate=False)) as client:
        for path in SHIPPED:
            compiled = _compiled(path)
            read = client.get(f"/fhir/PlanDefinition/{compiled.id}")
            assert read.status_code == 200
            assert _without_meta(read.json()) == compiled.plan_definition
            for activity in compiled.activity_definitions:
                read = client.get(f"/fhir/ActivityDefinition/{activity['id']}")
                assert _without_meta(read.json()) == activity


def test_loading_twice_leaves_one_plan_definition(database_url: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    first = run_atm(tmp_path, "protocols", "load", str(CAR_T), ATM_DATABASE_URL=database_url)
    assert first.returncode == 0, first.stderr
    # The second load runs in this process: a real process proved the command above, and
    # each new one spends ~3 s building the FHIR models before it stores anything.
    monkeypatch.setenv("ATM_DATABASE_URL", database_url)
    get_settings.cache_clear()
    try:
        again = runner.invoke(app, ["protocols", "load", str(CAR_T)])
    finally:
        get_settings.cache_clear()
    assert again.exit_code == 0, again.output
    assert again.stdout.endswith("ActivityDefinitions (23 updated) into "
                                 f"{_masked(database_url)}\n")
    assert "(updated)" in again.stdout
    settings = Settings(database_url=database_url, base_url="http://testserver/fhir",
                        log_json=False, load_protocols=False, orchestrator=False,
                        auth="off")
    with TestClient(create_app(settings, migrate=False)) as client:
        found = client.get("/fhir/PlanDefinition", params={
            "url": "https://atm-gateway.org/fhir/PlanDefinition/car-t-autologous"}).json()
        activities = client.get("/fhir/ActivityDefinition", params={"_count": 100}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == ["car-t-autologous"]
    assert found["entry"][0]["resource"]["meta"]["versionId"] == "2"
    assert len(activities["entry"]) == 23


def _masked(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def test_load_with_a_broken_file_loads_nothing(tmp_path: Path) -> None:
    broken = _broken(tmp_path)
    result = run_atm(tmp_path, "protocols", "load", str(CAR_T), str(broken))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [line.format(f=broken) for line in BROKEN_LINES]
    assert not (tmp_path / "data" / "atm.db").exists()


# -- load into a server ------------------------------------------------------------------
def test_load_with_server_posts_each_protocol_to_a_live_server(live_server: str) -> None:
    result = runner.invoke(app, ["protocols", "load", *map(str, SHIPPED),
                                 "--server", live_server])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        _loaded_line(p, live_server, "created") for p in SHIPPED]
    for path in SHIPPED:
        compiled = _compiled(path)
        read = httpx.get(f"{live_server}/PlanDefinition/{compiled.id}")
        assert read.status_code == 200
        assert _without_meta(read.json()) == compiled.plan_definition
    again = runner.invoke(app, ["protocols", "load", str(CAR_T), "--server", live_server])
    assert again.stdout.splitlines() == [_loaded_line(CAR_T, live_server, "updated")]


def test_load_with_an_unreachable_server_fails() -> None:
    server = f"http://127.0.0.1:{free_port()}/fhir"
    result = runner.invoke(app, ["protocols", "load", str(CAR_T), "--server", server])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"cannot reach {server}: ")


def test_load_with_server_reports_a_refusal(live_server: str) -> None:
    result = runner.invoke(app, ["protocols", "load", str(CAR_T), "--server",
                                 live_server.removesuffix("/fhir") + "/nowhere"])
    assert result.exit_code == 1
    assert "refused the protocol (404)" in result.stderr
