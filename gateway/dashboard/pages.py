"""HTML pages of the dashboard and of the sign-in form: Jinja2 templates (escaped by
default) and the security headers every page carries."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.responses import HTMLResponse

HERE = Path(__file__).parent
STATIC = HERE / "static"
# Scripts and styles come from the gateway only (no inline script can run), pages may not
# be framed, and forms only post back to the gateway.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _day(value: date | datetime | None) -> str:
    if value is None:
        return "—"
    return value.strftime("%d %b %Y")


def _moment(value: datetime | str | None) -> str:
    """A moment as people read it (FHIR instants as text too)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return str(value)
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%d %b %Y %H:%M UTC")


def _days(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} d"


_env = Environment(loader=FileSystemLoader(HERE / "templates"),
                   autoescape=select_autoescape(["html"]), undefined=StrictUndefined,
                   trim_blocks=True, lstrip_blocks=True)
_env.filters.update(day=_day, moment=_moment, days=_days)


def render(template: str, status: int = 200, headers: dict[str, str] | None = None,
           **values: Any) -> HTMLResponse:
    body = _env.get_template(template).render(**values)
    return HTMLResponse(body, status, headers={**SECURITY_HEADERS, **(headers or {})})


def render_text(template: str, **values: Any) -> str:
    """A template's text alone (a fragment the page swaps in when figures change)."""
    return _env.get_template(template).render(**values)
