"""The websocket channel of Subscriptions against a real server: a client binds with a
token from $get-ws-binding-token and is sent a handshake, then each new event in number
order, and heartbeats; bad tokens are refused; partners hear only of what they may read;
every notification sent is audited."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import update
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from gateway.auth.clients import add_client
from gateway.settings import Settings
from gateway.store.database import Database, make_engine
from gateway.store.schema import subscription_ws_tokens
from tests.conftest import running_server
from tests.integration.subscription_support import Received, subscription, task
from tests.integration.test_auth_tokens import RSA, assertion, public_set

FHIR = {"content-type": "application/fhir+json"}
SETTINGS = {"subscriptions": True, "load_topics": True, "subscription_poll_seconds": 0.05,
            "subscription_allowed_hosts": ["127.0.0.1"]}
RECEIVE_SECONDS = 5.0  # the longest any frame is waited for
QUIET_SECONDS = 0.5  # how long "nothing more arrives" is watched for


@pytest.fixture
def server(database_url: str) -> Iterator[str]:
    with running_server(database_url, **SETTINGS) as base:
        yield base


@pytest.fixture
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, headers=FHIR, timeout=10) as client:
        yield client


class Socket:
    """A bound websocket client that reads notification Bundles, never waiting long."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection

    def next(self, seconds: float = RECEIVE_SECONDS) -> Received:
        frame = self.connection.recv(timeout=seconds)
        assert isinstance(frame, str), "notifications are text frames"
        return Received("websocket", {}, json.loads(frame), time.monotonic())

    def next_of(self, kind: str) -> Received:
        """The next notification of `kind`, skipping heartbeats."""
        deadline = time.monotonic() + RECEIVE_SECONDS
        while (received := self.next(max(0.0, deadline - time.monotonic()))).kind != kind:
            assert received.kind == "heartbeat", f"{kind} expected, {received.kind} came"
        return received

    def event_numbers(self, count: int) -> list[int]:
        """The event numbers of the next notifications, until `count` have come."""
        numbers: list[int] = []
        while len(numbers) < count:
            numbers += [int(e["event-number"])
                        for e in self.next_of("event-notification").events]
        return numbers

    def nothing_more(self) -> None:
        """No event notification in QUIET_SECONDS (heartbeats may come)."""
        deadline = time.monotonic() + QUIET_SECONDS
        while (left := deadline - time.monotonic()) > 0:
            try:
                received = self.next(left)
            except TimeoutError:
                return
            assert received.kind == "heartbeat", f"unexpected {received.kind}"

    def closed_with(self) -> tuple[dict[str, Any], int]:
        """The OperationOutcome the server said last, and the close code it closed with."""
        outcome = json.loads(self.connection.recv(timeout=RECEIVE_SECONDS))
        with pytest.raises(ConnectionClosed) as closed:
            self.connection.recv(timeout=RECEIVE_SECONDS)
        assert closed.value.rcvd is not None
        return outcome, closed.value.rcvd.code


def subscribe(http: httpx.Client, **options: Any) -> str:
    response = http.post("/Subscription", json=subscription(
        "", channel="websocket", filters=("Task?owner=Organization/lims",), **options))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def binding(http: httpx.Client, subscription_id: str) -> tuple[str, str]:
    """A binding token and the websocket URL, from $get-ws-binding-token."""
    response = http.post(f"/Subscription/{subscription_id}/$get-ws-binding-token")
    assert response.status_code == 200, response.text
    values = {p["name"]: next(v for k, v in p.items() if k.startswith("value"))
              for p in response.json()["parameter"]}
    assert values["subscription"] == f"Subscription/{subscription_id}"
    return values["token"], values["websocket-url"]


@contextmanager
def opened(url: str) -> Iterator[Socket]:
    with connect(url, open_timeout=RECEIVE_SECONDS, close_timeout=1) as connection:
        yield Socket(connection)


@contextmanager
def bound(http: httpx.Client, subscription_id: str) -> Iterator[Socket]:
    """A socket bound to the Subscription, past its handshake."""
    token, url = binding(http, subscription_id)
    with opened(url) as socket:
        socket.connection.send(f"bind-with-token {token}")
        handshake = socket.next()
        assert handshake.kind == "handshake"
        assert handshake.param("subscription")["reference"].endswith(
            f"Subscription/{subscription_id}")
        yield socket


def create_task(http: httpx.Client, headers: dict[str, str] | None = None,
                **options: Any) -> dict[str, Any]:
    response = http.post("/Task", json=task(**options), headers=headers)
    assert response.status_code == 201, response.text
    return dict(response.json())


def events_since_start(http: httpx.Client, subscription_id: str) -> int:
    found = http.get(f"/Subscription/{subscription_id}/$status").json()
    status = Received("", {}, {"entry": [found["entry"][0]]}, 0)
    return int(status.param("events-since-subscription-start"))


def wait_events(http: httpx.Client, subscription_id: str, count: int) -> None:
    deadline = time.monotonic() + RECEIVE_SECONDS
    while events_since_start(http, subscription_id) < count:
        assert time.monotonic() < deadline, "the events were not matched in time"
        time.sleep(0.02)


# -- binding ---------------------------------------------------------------------------------
def test_bind_is_answered_with_a_handshake(server: str, http: httpx.Client) -> None:
    subscription_id = subscribe(http)
    token, url = binding(http, subscription_id)
    assert url == server.replace("http://", "ws://") + "/$subscription-ws"
    with opened(url) as socket:
        socket.connection.send(f"bind-with-token {token}")
        handshake = socket.next()
    assert handshake.kind == "handshake"
    assert handshake.events == []
    assert handshake.param("events-since-subscription-start") == "0"
    assert handshake.bundle["type"] == "history"


@pytest.mark.parametrize("message", ["bind-with-token not-a-token", "hello", ""])
def test_a_bad_bind_is_refused_and_closed(http: httpx.Client, message: str) -> None:
    _, url = binding(http, subscribe(http))
    with opened(url) as socket:
        socket.connection.send(message)
        outcome, code = socket.closed_with()
    assert code == 1008
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "error"


def test_an_expired_token_is_refused(http: httpx.Client, database_url: str) -> None:
    subscription_id = subscribe(http)
    token, url = binding(http, subscription_id)
    db = Database(make_engine(Settings(database_url=database_url)))
    try:
        with db.write() as conn:
            conn.execute(update(subscription_ws_tokens).values(expires_at=0))
    finally:
        db.dispose()
    with opened(url) as socket:
        socket.connection.send(f"bind-with-token {token}")
        outcome, code = socket.closed_with()
    assert code == 1008
    assert "expired" in outcome["issue"][0]["diagnostics"]


def test_a_token_binds_again_until_it_expires(http: httpx.Client) -> None:
    subscription_id = subscribe(http)
    token, url = binding(http, subscription_id)
    for _ in range(2):
        with opened(url) as socket:
            socket.connection.send(f"bind-with-token {token}")
            assert socket.next().kind == "handshake"


# -- events ----------------------------------------------------------------------------------
def test_events_follow_in_number_order(http: httpx.Client) -> None:
    subscription_id = subscribe(http)
    with bound(http, subscription_id) as socket:
        create_task(http)
        assert socket.event_numbers(1) == [1]
        create_task(http)
        assert socket.event_numbers(1) == [2]
        create_task(http, owner="Organization/elsewhere")  # filtered out
        socket.nothing_more()


def test_events_matched_here_are_sent_at_once_not_at_the_next_poll(
        database_url: str) -> None:
    with running_server(database_url, **{**SETTINGS, "subscription_poll_seconds": 2}) as base, \
            httpx.Client(base_url=base, headers=FHIR, timeout=10) as http:
        started = time.monotonic()
        with bound(http, subscribe(http)) as socket:
            assert time.monotonic() - started < 1  # the new row woke the stream
            started = time.monotonic()
            create_task(http)
            assert socket.event_numbers(1) == [1]
            assert time.monotonic() - started < 1


def test_max_count_splits_a_burst_without_gaps(http: httpx.Client) -> None:
    subscription_id = subscribe(http, max_count=2)
    with bound(http, subscription_id) as socket:
        for _ in range(5):
            create_task(http)
        sizes = []
        numbers: list[int] = []
        while len(numbers) < 5:
            events = socket.next_of("event-notification").events
            sizes.append(len(events))
            numbers += [int(e["event-number"]) for e in events]
    assert numbers == [1, 2, 3, 4, 5]
    assert max(sizes) <= 2


def test_a_stream_starts_after_the_events_made_before_it_was_bound(
        http: httpx.Client) -> None:
    subscription_id = subscribe(http)
    create_task(http)
    wait_events(http, subscription_id, 1)
    token, url = binding(http, subscription_id)
    with opened(url) as socket:
        socket.connection.send(f"bind-with-token {token}")
        handshake = socket.next()
        assert handshake.param("events-since-subscription-start") == "1"
        create_task(http)
        assert socket.event_numbers(1) == [2]


def test_several_sockets_follow_one_subscription(http: httpx.Client) -> None:
    subscription_id = subscribe(http)
    with bound(http, subscription_id) as first, bound(http, subscription_id) as second:
        create_task(http)
        assert first.event_numbers(1) == [1]
        assert second.event_numbers(1) == [1]


@pytest.mark.parametrize("content", ["id-only", "full-resource"])
def test_payload_content(http: httpx.Client, content: str) -> None:
    subscription_id = subscribe(http, content=content)
    with bound(http, subscription_id) as socket:
        created = create_task(http)
        notification = socket.next_of("event-notification")
    [event] = notification.events
    assert event["focus"].endswith(f"Task/{created['id']}/_history/1")
    entry = notification.bundle["entry"][1]
    assert entry["fullUrl"].endswith(f"Task/{created['id']}")
    if content == "id-only":
        assert "resource" not in entry
    else:
        assert entry["resource"]["id"] == created["id"]
        assert entry["resource"]["owner"] == {"reference": "Organization/lims"}


def test_heartbeats_when_nothing_happens(http: httpx.Client) -> None:
    subscription_id = subscribe(http, heartbeat=1)
    with bound(http, subscription_id) as socket:
        started = time.monotonic()
        heartbeat = socket.next(seconds=3)
        waited = time.monotonic() - started
    assert heartbeat.kind == "heartbeat"
    assert 0.5 < waited < 2.5


def test_turning_a_subscription_off_closes_its_sockets(http: httpx.Client) -> None:
    subscription_id = subscribe(http)
    with bound(http, subscription_id) as socket:
        stored = http.get(f"/Subscription/{subscription_id}").json()
        response = http.put(f"/Subscription/{subscription_id}", json={**stored, "status": "off"})
        assert response.status_code == 200, response.text
        outcome, code = socket.closed_with()
    assert code == 1000
    assert "off" in outcome["issue"][0]["diagnostics"]


def test_a_server_shutting_down_closes_its_sockets(database_url: str) -> None:
    with ExitStack() as sockets:
        with running_server(database_url, **SETTINGS) as base, \
                httpx.Client(base_url=base, headers=FHIR, timeout=10) as http:
            socket = sockets.enter_context(bound(http, subscribe(http)))
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 3, "the bound socket held the server up"
        with pytest.raises(ConnectionClosed):
            socket.connection.recv(timeout=RECEIVE_SECONDS)


def test_every_notification_sent_is_audited(http: httpx.Client) -> None:
    subscription_id = subscribe(http)
    with bound(http, subscription_id) as socket:
        create_task(http)
        socket.event_numbers(1)
    deadline = time.monotonic() + RECEIVE_SECONDS
    while True:
        found = http.get("/AuditEvent", params={
            "entity": f"Subscription/{subscription_id}", "_count": 50}).json()
        events = [e["resource"] for e in found.get("entry", [])]
        sent = [e for e in events if e["subtype"][0]["code"] == "event-notification"]
        if sent or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(sent) == 1, [(e["subtype"][0]["code"], e["outcome"]) for e in events]
    assert sent[0]["outcome"] == "0"
    assert any(e["what"]["reference"].startswith("Task/") for e in sent[0]["entity"])


# -- partners ----------------------------------------------------------------------------------
def test_a_partner_hears_only_of_what_it_may_read(database_url: str) -> None:
    with running_server(database_url, **SETTINGS, auth="smart",
                        rate_limit_per_second=0) as base:
        origin = f"{urlsplit(base).scheme}://{urlsplit(base).netloc}"
        db = Database(make_engine(Settings(database_url=database_url)))
        try:
            admin = _bearer(db, origin, "admin", "Organization/atm")
            lims_a = _bearer(db, origin, "lims", "Organization/lims-a")
            lims_b = _bearer(db, origin, "lims", "Organization/lims-b")
        finally:
            db.dispose()
        with httpx.Client(base_url=base, timeout=10) as http:
            ids = {}
            for who, headers in (("a", lims_a), ("b", lims_b)):
                body = subscription("", channel="websocket", content="full-resource")
                response = http.post("/Subscription", json=body, headers=headers)
                assert response.status_code == 201, response.text
                ids[who] = response.json()["id"]
            http.headers.update(lims_a)
            with bound(http, ids["a"]) as socket_a:
                http.headers.update(lims_b)
                with bound(http, ids["b"]) as socket_b:
                    mine = create_task(http, admin, owner="Organization/lims-a")
                    notification = socket_a.next_of("event-notification")
                    assert notification.bundle["entry"][1]["resource"]["id"] == mine["id"]
                    socket_b.nothing_more()
                    theirs = create_task(http, admin, owner="Organization/lims-b")
                    notification = socket_b.next_of("event-notification")
                    assert notification.bundle["entry"][1]["resource"]["id"] == theirs["id"]
                    socket_a.nothing_more()


def _bearer(db: Database, origin: str, role: str, organization: str) -> dict[str, str]:
    """The headers of a new client's requests to the live server."""
    registered = add_client(db, name=f"{role} {organization}", role=role,
                            organization=organization, jwks=public_set(RSA),
                            scopes="system/*.cruds")
    token_url = f"{origin}/auth/token"
    response = httpx.post(token_url, data={
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion(registered, aud=token_url)})
    assert response.status_code == 200, response.text
    return {**FHIR, "authorization": f"Bearer {response.json()['access_token']}"}
