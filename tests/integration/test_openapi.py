"""The committed OpenAPI document (openapi/openapi.json) is current, valid and the one the
server serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate

from gateway.app import create_app
from gateway.openapi_dump import document, render
from gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "openapi" / "openapi.json"
STALE = ("openapi/openapi.json is stale: the HTTP surface changed. Run `make openapi` and "
         "commit the result.")


@pytest.fixture(scope="module")
def committed() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(COMMITTED.read_text(encoding="utf-8"))
    return loaded


def test_committed_openapi_matches_the_code(committed: dict[str, Any]) -> None:
    assert committed == document(), STALE


def test_committed_openapi_is_valid_openapi_31(committed: dict[str, Any]) -> None:
    assert committed["openapi"].startswith("3.1.")
    validate(committed)


def test_openapi_resource_schema_requires_resource_type(committed: dict[str, Any]) -> None:
    resource = committed["components"]["schemas"]["Resource"]
    assert resource["type"] == "object"
    assert resource["required"] == ["resourceType"]
    assert resource["properties"]["resourceType"]["type"] == "string"
    assert resource["additionalProperties"] is True


def test_openapi_documents_every_fhir_interaction(committed: dict[str, Any]) -> None:
    paths = committed["paths"]
    assert set(paths["/fhir/{type}"]) == {"get", "post", "put", "patch", "delete"}
    assert set(paths["/fhir/{type}/{id}"]) == {"get", "put", "patch", "delete"}
    assert set(paths["/fhir"]) == {"get", "post"}
    for path in ("/fhir/metadata", "/fhir/{type}/{id}/_history/{vid}", "/healthz",
                 "/readyz", "/metrics"):
        assert "get" in paths[path], path
    operation_ids = [op["operationId"] for item in paths.values() for op in item.values()]
    assert len(operation_ids) == len(set(operation_ids))


def test_openapi_dump_ignores_the_environment(tmp_path: Path) -> None:
    env = {**os.environ, "ATM_BASE_URL": "https://elsewhere.example/fhir",
           "ATM_CORS_ORIGINS": '["https://portal.example"]', "ATM_LOG_JSON": "false",
           "ATM_DATABASE_URL": f"sqlite:///{tmp_path}/other.db", "TZ": "Pacific/Kiritimati"}
    result = subprocess.run([sys.executable, "-m", "gateway.openapi_dump"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout == COMMITTED.read_text(encoding="utf-8"), STALE


def test_openapi_dump_writes_a_file_when_given_a_path(tmp_path: Path) -> None:
    target = tmp_path / "openapi.json"
    subprocess.run([sys.executable, "-m", "gateway.openapi_dump", str(target)], cwd=ROOT,
                   capture_output=True, timeout=120, check=True)
    assert target.read_text(encoding="utf-8") == render(document())


def test_served_openapi_equals_the_dump() -> None:
    client = TestClient(create_app(Settings.model_construct(log_json=False)))
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.json() == document()



def test_building_several_apps_repeats_no_route(committed: dict[str, Any]) -> None:
    # A repeated route would also warn "Duplicate Operation ID" (an error under pytest).
    apps = [create_app(Settings.model_construct(log_json=False)) for _ in range(3)]
    assert apps[-1].openapi() == committed
