from fastapi.testclient import TestClient

from tests.factories import task

FHIR = {"Content-Type": "application/fhir+json"}


def test_create_then_read_returns_the_stored_resource(client: TestClient) -> None:
    created = client.post("/fhir/Task", json=task(), headers=FHIR)
    assert created.status_code == 201, created.text
    body = created.json()
    read = client.get(f"/fhir/Task/{body['id']}")
    assert read.status_code == 200
    assert read.json() == body
    assert read.headers["etag"] == 'W/"1"'
