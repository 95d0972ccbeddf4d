"""The websocket of topic-based Subscriptions: /fhir/$subscription-ws, the `websocket-url`
that Subscription/{id}/$get-ws-binding-token hands out (gateway/subscriptions/websocket.py).

FhirEndpoint answers the HTTP requests under /fhir itself and passes websockets on to
FastAPI, which routes them here. The binding token is the client's credential: browsers
cannot set an Authorization header on a websocket.
"""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from gateway.api.http import base_url, header_dict
from gateway.subscriptions.websocket import Session, Watcher

PATH = "/fhir/$subscription-ws"
router = APIRouter()


@router.websocket(PATH)
async def subscription_ws(websocket: WebSocket) -> None:
    await Session(websocket, _watcher(websocket), _http_base(websocket)).run()


def _watcher(websocket: WebSocket) -> Watcher:
    """The application's one Watcher, made when the first socket opens."""
    state = websocket.app.state
    watcher: Watcher | None = getattr(state, "subscription_watcher", None)
    if watcher is None:
        watcher = state.subscription_watcher = Watcher(state.db, state.settings)
    return watcher


def _http_base(websocket: WebSocket) -> str:
    """The FHIR base URL the notifications' references use: the one this socket was
    opened under, with its http(s) scheme (as an HTTP request would see it)."""
    base = base_url(websocket.app.state.settings, websocket.scope,
                    header_dict(websocket.scope))
    scheme, sep, rest = base.partition("://")
    return {"ws": "http", "wss": "https"}.get(scheme, scheme) + sep + rest
