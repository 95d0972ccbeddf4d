"""The dashboard's web pages under /dashboard.

Signing in: /dashboard/login starts the OAuth2 authorization code flow with PKCE against
the gateway's own authorization server (/auth/authorize); /dashboard/callback redeems the
code and opens a session (gateway/dashboard/sessions.py). Every page needs a session;
every form that changes something carries the session's CSRF token; every action goes
through the FHIR services as the signed-in person (gateway/dashboard/calls.py).

Pages: the programme view (/dashboard), its panels alone (/dashboard/panels, which open
pages fetch when /dashboard/events says the figures changed), and one journey
(/dashboard/journeys/{id}) with its custody report. What people do from them is
gateway/dashboard/actions.py's.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

from gateway.api.auth_routes import session_seconds
from gateway.api.signin_routes import origin
from gateway.auth import people, tokens
from gateway.dashboard import actions, health, journey_view, sessions
from gateway.dashboard.board import Board
from gateway.dashboard.calls import Caller
from gateway.dashboard.guard import (
    ID,
    now_seconds,
    posted_form,
    problem,
    secure,
    signed_in,
)
from gateway.dashboard.journeys import Filters, Viewer
from gateway.dashboard.pages import SECURITY_HEADERS, STATIC, render, render_text
from gateway.dashboard.sessions import Session
from gateway.errors import FhirError

log = logging.getLogger("atm.dashboard")
router = APIRouter(prefix="/dashboard", include_in_schema=False)
SIGNIN_COOKIE = "atm_signin"  # the PKCE verifier and state of a sign-in under way
COOKIE_PATH = "/dashboard"
EVENTS_SECONDS = 300  # an event stream is closed after this; the browser reopens it
HEARTBEAT_SECONDS = 15
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


# -- the board, kept current beside the pages ---------------------------------------------
class BoardKeeper:
    """Builds the board on the first page that needs it, then refreshes it in a thread
    every `dashboard_refresh_seconds` (a gateway nobody looks at does no dashboard work)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.board: Board | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def get(self) -> Board:
        with self._lock:
            if self.board is None:
                board = Board(self.app.state.db)
                board.refresh()
                self.board = board
                self._thread = threading.Thread(target=self._keep, name="atm-dashboard",
                                                daemon=True)
                self._thread.start()
        return self.board

    def _keep(self) -> None:
        seconds = self.app.state.settings.dashboard_refresh_seconds
        while not self._stop.wait(seconds):
            try:
                assert self.board is not None
                self.board.refresh()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("the dashboard's figures could not be refreshed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _keeper(app: FastAPI) -> BoardKeeper:
    keeper: BoardKeeper | None = getattr(app.state, "board_keeper", None)
    if keeper is None:
        keeper = app.state.board_keeper = BoardKeeper(app)
    return keeper


def warm_up(app: FastAPI) -> None:
    """At start-up, when anyone may sign in to the dashboard: build the board in the
    background (seconds, with thousands of journeys), so no one's first page waits."""
    def build() -> None:
        try:
            if people.list_users(app.state.db):
                _keeper(app).get()
        except Exception:  # noqa: BLE001 - the first page builds it instead
            log.exception("the dashboard's figures could not be built at start-up")

    threading.Thread(target=build, name="atm-dashboard-warm-up", daemon=True).start()


def stop(app: FastAPI) -> None:
    """At shutdown: the refresher thread ends."""
    keeper: BoardKeeper | None = getattr(app.state, "board_keeper", None)
    if keeper is not None:
        keeper.stop()


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.include_router(actions.router)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC), name="dashboard-static")


@router.get("/login")
async def login(request: Request) -> Response:
    """Start signing in: off to the authorization server with a PKCE challenge."""
    wanted = request.query_params.get("next", "/dashboard")
    target = wanted if wanted.startswith("/dashboard") and "//" not in wanted else "/dashboard"
    verifier, state = secrets.token_urlsafe(48), secrets.token_urlsafe(16)
    query = urlencode({
        "response_type": "code", "client_id": people.DASHBOARD_CLIENT,
        "redirect_uri": origin(request) + people.DASHBOARD_CALLBACK, "state": state,
        "code_challenge": people.s256(verifier), "code_challenge_method": "S256"})
    response = RedirectResponse(f"/auth/authorize?{query}", 303)
    packed = base64.urlsafe_b64encode(target.encode()).decode()
    response.set_cookie(SIGNIN_COOKIE, f"{state}.{verifier}.{packed}", max_age=600,
                        path=COOKIE_PATH, httponly=True, samesite="lax",
                        secure=secure(request))
    return response


@router.get("/callback")
async def callback(request: Request) -> Response:
    """Back from signing in: redeem the code with the verifier, open the session."""
    params = request.query_params
    if params.get("error"):
        return problem(400, "Sign-in did not complete",
                       params.get("error_description") or params["error"])
    state, verifier, packed = (request.cookies.get(SIGNIN_COOKIE, "").split(".") + ["", ""])[:3]
    if not state or not secrets.compare_digest(state, params.get("state", "")):
        return problem(400, "Sign-in did not complete", "This sign-in was started in "
                       "another window or took too long. Please sign in again.")
    try:
        token, grant = await run_in_threadpool(
            tokens.exchange_code, request.app.state.db, client_id=people.DASHBOARD_CLIENT,
            code=params.get("code", ""), verifier=verifier, now=now_seconds(),
            redirect_uri=origin(request) + people.DASHBOARD_CALLBACK,
            seconds=session_seconds(request.app.state.settings))
    except people.InvalidGrantError:
        return problem(400, "Sign-in did not complete", "The sign-in code was not accepted "
                       "(used already, or expired). Please sign in again.")
    cookie, _ = await run_in_threadpool(sessions.start, request.app.state.db, token, grant,
                                        now_seconds())
    target = base64.urlsafe_b64decode(packed.encode() + b"==").decode(errors="replace")
    response = RedirectResponse(target if target.startswith("/dashboard") else "/dashboard",
                                303)
    response.set_cookie(sessions.COOKIE, cookie, path=COOKIE_PATH, httponly=True,
                        samesite="lax", secure=secure(request),
                        max_age=session_seconds(request.app.state.settings))
    response.delete_cookie(SIGNIN_COOKIE, path=COOKIE_PATH)
    return response


async def _logout(request: Request, session: Session) -> Response:
    if await posted_form(request, session) is None:
        return problem(400, "Not signed out", "The form had expired. Please try again.")
    await run_in_threadpool(sessions.end, request.app.state.db, session.session_hash)
    response = render("signed_out.html")
    response.delete_cookie(sessions.COOKIE, path=COOKIE_PATH)
    return response


router.add_api_route("/logout", signed_in(_logout), methods=["POST"])


# -- the programme view -------------------------------------------------------------------
def _viewer(session: Session) -> Viewer:
    return Viewer(session.role, session.organization)


def _filters(request: Request) -> tuple[Filters, str | None]:
    try:
        return Filters.from_query(dict(request.query_params)), None
    except ValueError as exc:
        return Filters(), str(exc)


def _programme_values(request: Request, session: Session) -> dict[str, Any]:
    """Everything the programme view shows (run in a thread: it reads the database)."""
    started = time.perf_counter()
    board = _keeper(request.app).get()
    board.refresh()
    viewer, (filters, problem) = _viewer(session), _filters(request)
    now = datetime.now(UTC)
    until = filters.until or now.date()
    since = filters.since or until - timedelta(weeks=12)
    db = request.app.state.db
    values = {
        "programme": board.programme(viewer, filters, now),
        "options": board.options(viewer), "filters": filters, "problem": problem,
        "custody": health.custody_exceptions(db, viewer, since, until),
        "sites": health.slot_use(db, viewer, now.date(), now.date() + timedelta(weeks=4)),
        "subscribers": health.subscription_health(db, viewer, now=now),
        "version": board.version, "query": request.url.query,
    }
    values["server_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return values


async def _programme(request: Request, session: Session) -> Response:
    values = await run_in_threadpool(_programme_values, request, session)
    note = await run_in_threadpool(sessions.take_flash, request.app.state.db, session)
    return render("programme.html", 400 if values["problem"] else 200,
                  headers={"Server-Timing": f"app;dur={values['server_ms']}"},
                  session=session, flash=note, **values)


async def _panels(request: Request, session: Session) -> Response:
    values = await run_in_threadpool(_programme_values, request, session)
    body = render_text("panels.html", session=session, **values)
    return HTMLResponse(body, headers={**SECURITY_HEADERS,
                                       "Server-Timing": f"app;dur={values['server_ms']}"})


async def _events(request: Request, session: Session) -> Response:
    """Server-sent events: `changed` whenever the programme's figures moved."""
    keeper = _keeper(request.app)
    board = await run_in_threadpool(keeper.get)

    async def stream() -> AsyncIterator[str]:
        seen = board.version
        yield f"retry: 5000\nevent: version\ndata: {seen}\n\n"
        quiet = 0.0
        ends = time.monotonic() + EVENTS_SECONDS
        while time.monotonic() < ends and not await request.is_disconnected():
            await asyncio.sleep(1.0)
            if board.version != seen:
                seen = board.version
                quiet = 0.0
                yield f"event: changed\ndata: {seen}\n\n"
            elif (quiet := quiet + 1.0) >= HEARTBEAT_SECONDS:
                quiet = 0.0
                yield ": still here\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


router.add_api_route("", signed_in(_programme), methods=["GET"])
router.add_api_route("/panels", signed_in(_panels), methods=["GET"])
router.add_api_route("/events", signed_in(_events), methods=["GET"])


# -- one journey --------------------------------------------------------------------------
async def _journey(request: Request, session: Session) -> Response:
    careplan_id = request.path_params["careplan_id"]
    if not ID.match(careplan_id):
        return problem(404, "No such journey", "There is no journey with that id.")
    call = Caller(request, session.grant)
    try:
        view = await journey_view.load(call, careplan_id, datetime.now(UTC))
    except FhirError as exc:
        if exc.status in (403, 404, 410):
            return problem(404, "No such journey", "There is no such journey, or it is "
                           "not one you may see.")
        raise
    note = await run_in_threadpool(sessions.take_flash, request.app.state.db, session)
    return render("journey.html", session=session, view=view, flash=note,
                  now=datetime.now(UTC))


async def _custody_report(request: Request, session: Session) -> Response:
    careplan_id = request.path_params["careplan_id"]
    if not ID.match(careplan_id):
        return problem(404, "No such journey", "There is no journey with that id.")
    try:
        result = await Caller(request, session.grant)(
            "GET", f"CarePlan/{careplan_id}/$custody-report", [("_format", "html")])
    except FhirError as exc:
        return problem(exc.status if exc.status < 500 else 502, "No custody report",
                       str(exc))
    return Response(result.body, 200, media_type="text/html; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="custody-report-{careplan_id}.html"',
        "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


router.add_api_route("/journeys/{careplan_id}", signed_in(_journey), methods=["GET"])
router.add_api_route("/journeys/{careplan_id}/custody-report", signed_in(_custody_report),
                     methods=["GET"])
