"""Accessibility checks of a Playwright page, run in the page itself (a11y.js): names of
controls, buttons, links and images; WCAG 2.x text contrast; keyboard order and visible
focus; the document's language, title, heading and landmark. Each returns problems as
sentences; `assert_accessible` fails on any. A subset of WCAG 2.2 AA, not an audit."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

MAX_TABS = 80
"""Tab presses a keyboard walk makes at most (a page with more stops is cut short)."""


@cache
def _script() -> str:
    return (Path(__file__).with_name("a11y.js")).read_text(encoding="utf-8")


def _run(page: Any, check: str, arg: object = None) -> Any:
    return page.evaluate(f"([check, arg]) => ({_script()})(check, arg)", [check, arg])


def name_problems(page: Any) -> list[str]:
    """Visible form controls without a label (`<label for>`, a wrapping `<label>`,
    aria-label, aria-labelledby), buttons and links without text, images without
    alt/aria-label/title (alt="" marks decoration and passes)."""
    return list(_run(page, "names"))


def contrast_problems(page: Any) -> list[str]:
    """Visible text below 4.5:1 against what is behind it (3:1 from 24px, or 18.66px
    bold), the background being the first opaque one up the ancestors over white. Text
    over a background image and text of disabled controls are not checked."""
    return list(_run(page, "contrast"))


def document_problems(page: Any) -> list[str]:
    """A `lang` on <html>, a <title>, exactly one <h1> and one <main> landmark."""
    return list(_run(page, "document"))


@dataclass(frozen=True)
class FocusStop:
    """Where one Tab press put the focus."""

    tag: str
    name: str
    description: str
    indicator: bool | None
    """Whether its outline or box-shadow differs from when unfocused (None: unknown)."""


def tab_order(page: Any, max_tabs: int = MAX_TABS) -> list[FocusStop]:
    """The elements Tab visits from the top of the page, in order, until the focus leaves
    the page or comes back to one already visited (at most `max_tabs` presses). Tab
    stays on one element while it walks the element's own parts (a date input's day,
    month and year): that element is listed once."""
    _run(page, "startWalk")
    stops: list[FocusStop] = []
    seen: set[int] = set()
    last = None
    for _ in range(max_tabs):
        page.keyboard.press("Tab")
        found = _run(page, "focused")
        if found is not None and found["id"] == last:
            continue
        if found is None or found["id"] in seen:
            break
        last = found["id"]
        seen.add(found["id"])
        stops.append(FocusStop(found["tag"], found["name"], found["description"],
                               found["indicator"]))
    return stops


def focus_problems(page: Any, max_tabs: int = MAX_TABS) -> list[str]:
    """Elements reached with Tab that show no focus indicator, or have no name."""
    problems = []
    for stop in tab_order(page, max_tabs):
        if stop.indicator is False:
            problems.append(f"no visible focus indicator (outline or box-shadow): "
                            f"{stop.description}")
        if not stop.name:
            problems.append(f"focusable element without a name: {stop.description}")
    return problems


def problems(page: Any, *, keyboard: bool = True) -> list[str]:
    """Every check's problems; `keyboard` walks the page with Tab (it moves the focus)."""
    found = [*document_problems(page), *name_problems(page), *contrast_problems(page)]
    if keyboard:
        found += focus_problems(page)
    return found


def assert_accessible(page: Any, *, keyboard: bool = True) -> None:
    found = problems(page, keyboard=keyboard)
    assert not found, f"{len(found)} accessibility problems on {page.url}:\n" + "\n".join(
        f"- {problem}" for problem in found)
