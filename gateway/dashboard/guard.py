"""What every dashboard page shares: the session it needs, the answer for those without
one, the problem page, and the fields of a posted form (with its CSRF token checked)."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from gateway.api.signin_routes import origin
from gateway.dashboard import sessions
from gateway.dashboard.pages import render
from gateway.dashboard.sessions import Session

ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # a FHIR id, as a URL may name one


def now_seconds() -> int:
    return int(time.time())


def secure(request: Request) -> bool:
    return origin(request).startswith("https://")


async def current_session(request: Request) -> Session | None:
    return await run_in_threadpool(sessions.current, request.app.state.db,
                                   request.app.state.settings,
                                   request.cookies.get(sessions.COOKIE), now_seconds())


def to_sign_in(request: Request) -> RedirectResponse:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/dashboard/login?next={quote(here)}", 303)


def problem(status: int, heading: str, message: str) -> HTMLResponse:
    return render("problem.html", status, heading=heading, message=message)


Page = Callable[[Request, Session], Awaitable[Response]]


def signed_in(page: Page) -> Callable[[Request], Awaitable[Response]]:
    """A page for signed-in people; others are sent to sign in and brought back."""
    async def guarded(request: Request) -> Response:
        session = await current_session(request)
        if session is None:
            if request.method != "GET" or request.url.path.endswith(("/events", "/panels")):
                return problem(401, "Signed out",
                               "Your session has ended. Please sign in again.")
            return to_sign_in(request)
        return await page(request, session)
    guarded.__name__ = page.__name__
    return guarded


async def posted_form(request: Request, session: Session) -> list[tuple[str, str]] | None:
    """The posted form's fields, when its CSRF token is this session's; else None."""
    try:
        fields = parse_qsl((await request.body()).decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        return None
    csrf = next((v for k, v in fields if k == "csrf"), None)
    return fields if sessions.csrf_ok(session, csrf) else None


def field(fields: list[tuple[str, str]], name: str) -> str:
    return next((v for k, v in fields if k == name), "")
