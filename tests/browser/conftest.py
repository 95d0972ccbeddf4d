"""Browser fixtures: Debian's Chromium driven by Playwright against a real `atm serve`.

Browser tests run on SQLite only: the server logic behind each page is tested on SQLite
and PostgreSQL elsewhere (tests/integration, tests/e2e); here the browser is the subject.
Without /usr/bin/chromium they are skipped (`make test` installs it), unless
ATM_REQUIRE_BROWSER=1 makes a missing browser an error.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.integration.test_cli import atm_command

CHROMIUM = Path(os.environ.get("ATM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    # Without these Chromium calls Google's hosts, which this closed network refuses.
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 900}
ACTION_TIMEOUT_MS = 10_000
NAVIGATION_TIMEOUT_MS = 20_000
STARTUP_SECONDS = 60
STOP_SECONDS = 15
DEMO_PATIENTS = int(os.environ.get("ATM_BROWSER_DEMO_PATIENTS", "3"))
"""Three journeys played to the end, one of each shipped protocol (~11 s here)."""
DEMO_OPEN = int(os.environ.get("ATM_BROWSER_DEMO_OPEN", "4"))
"""And journeys left under way at different stages, for the dashboard to show."""
DEMO_SECONDS = 180
OFF_MACHINE = re.compile(r"^(?!https?://(127\.0\.0\.1|localhost|\[::1\])[:/])https?://")
"""URLs of any host but loopback."""
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "browser"
"""Screenshots and the server's log, kept for a look after the run (git-ignored)."""


def artifact_path(name: str, suffix: str = ".png") -> Path:
    """A file in ARTIFACTS named after `name`, with what a file name can't hold replaced."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") + suffix)


# -- the browser ------------------------------------------------------------------------

@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's), shared by tests/browser; each test gets its own context."""
    if not CHROMIUM.exists():
        message = f"no browser at {CHROMIUM} (`make test` installs Debian's chromium)"
        if os.environ.get("ATM_REQUIRE_BROWSER") == "1":
            pytest.fail(message + "; ATM_REQUIRE_BROWSER=1 requires it", pytrace=False)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    # launch() starts Chromium with a new, empty profile of its own (--user-data-dir in
    # args is refused: it would be launch_persistent_context).
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                              args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page_errors() -> list[str]:
    """What went wrong in the test's `page`: uncaught script errors, console.error
    messages (failed loads among them), and requests that left the machine (refused: a
    page must not need the internet). `assert not page_errors` in a test checks it."""
    return []


@pytest.fixture
def page(browser: Any, page_errors: list[str], request: pytest.FixtureRequest) -> Iterator[Any]:
    """A page in a fresh context (no cookies or storage from other tests), 1280x900; its
    last state is saved as tests/artifacts/browser/<test name>.png."""
    context = browser.new_context(viewport=VIEWPORT, locale="en-GB")
    context.set_default_timeout(ACTION_TIMEOUT_MS)
    context.set_default_navigation_timeout(NAVIGATION_TIMEOUT_MS)
    context.route(OFF_MACHINE, lambda route: _refuse(route, page_errors))
    opened = context.new_page()
    opened.on("pageerror", lambda error: page_errors.append(f"uncaught: {error}"))
    opened.on("console", lambda message: page_errors.append(
        f"console.error: {message.text}") if message.type == "error" else None)
    try:
        yield opened
    finally:
        _screenshot(opened, artifact_path(request.node.name))
        context.close()


def _refuse(route: Any, errors: list[str]) -> None:
    errors.append(f"request off the machine refused: {route.request.url}")
    route.abort("blockedbyclient")


def _screenshot(page: Any, path: Path) -> None:
    from playwright.sync_api import Error

    try:
        page.screenshot(path=str(path), full_page=True, timeout=ACTION_TIMEOUT_MS)
    except Error as exc:  # a crashed or closed page: the test says what went wrong
        sys.stderr.write(f"no screenshot {path.name}: {exc}\n")


@pytest.fixture
def snap(page: Any) -> Callable[[str], Path]:
    """`snap("dashboard-worklist")` keeps a full-page screenshot of the page as it is now
    in tests/artifacts/browser/dashboard-worklist.png, and returns its path."""
    def take(name: str) -> Path:
        path = artifact_path(name)
        page.screenshot(path=str(path), full_page=True, timeout=ACTION_TIMEOUT_MS)
        return path
    return take


# -- the server ---------------------------------------------------------------------------

@dataclass
class AtmServer:
    """A running `atm serve` and what it takes to run more `atm` commands beside it."""

    base_url: str
    """http://127.0.0.1:<port>, without /fhir."""
    database_url: str
    workdir: Path
    """The working directory of the server and of `atm(...)` commands (no .env here)."""
    env: dict[str, str]
    log: Path
    """The server's stdout and stderr."""

    @property
    def fhir_url(self) -> str:
        return f"{self.base_url}/fhir"

    def atm(self, *args: str, timeout: float = 120.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `atm <args>` against the server's database, e.g.
        `server.atm("demo", "--server", server.fhir_url, "--patients", "3")`."""
        result = subprocess.run([*atm_command(), *args], cwd=self.workdir, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"atm {' '.join(args)} exited with {result.returncode}\n"
                                 f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
        return result

    def server_log(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def server_env(database_url: str, **atm: str) -> dict[str, str]:
    """The environment without the caller's ATM_* settings: the server as an operator runs
    it (authentication, orchestrator, shipped protocols on), tuned only for speed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATM_")}
    env.update({"ATM_DATABASE_URL": database_url, "ATM_LOG_JSON": "false",
                "ATM_ORCHESTRATOR_POLL_SECONDS": "0.05",
                "ATM_RATE_LIMIT_PER_SECOND": "0",  # a page loads many things at once
                **atm})
    return env


@contextmanager
def atm_serving(workdir: Path, **atm: str) -> Iterator[AtmServer]:
    """`atm serve` on a free loopback port with a SQLite file in `workdir`; `atm` holds
    ATM_* settings that differ (ATM_AUTH="off", say). Stopped on exit."""
    database_url = f"sqlite:///{workdir / 'atm.db'}"
    env = server_env(database_url, **atm)
    port = free_port()
    log = workdir / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [*atm_command(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=workdir, env=env, stdout=sink, stderr=subprocess.STDOUT)
    server = AtmServer(f"http://127.0.0.1:{port}", database_url, workdir, env, log)
    try:
        wait_until_healthy(server, process)
        yield server
    finally:
        stop(process)


def wait_until_healthy(server: AtmServer, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"atm serve exited with {process.returncode}:\n"
                                 + server.server_log())
        try:
            if httpx.get(f"{server.base_url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.1)
    raise AssertionError(f"atm serve did not answer /healthz within {STARTUP_SECONDS} s:\n"
                         + server.server_log())


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_SECONDS)


@pytest.fixture(scope="package")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AtmServer]:
    """One `atm serve` for the browser tests (overrides tests/conftest.py's in-thread
    `live_server` here); its log is kept as tests/artifacts/browser/serve.log."""
    with atm_serving(tmp_path_factory.mktemp("atm-serve")) as server:
        try:
            yield server
        finally:
            shutil.copy(server.log, artifact_path("serve", ".log"))


@dataclass(frozen=True)
class DemoData:
    patients: int
    open: int
    seconds: float
    output: str
    """What `atm demo` printed: every step, then the summary table."""


@pytest.fixture(scope="package")
def demo_data(live_server: AtmServer) -> DemoData:
    """`atm demo` on the live server: DEMO_PATIENTS journeys played to the end (every
    shipped protocol, one failed QC release repeated) and DEMO_OPEN left under way, the
    demo's partner clients registered. The orchestrator inside the server advances them."""
    started = time.monotonic()
    result = live_server.atm("demo", "--server", live_server.fhir_url,
                             "--patients", str(DEMO_PATIENTS), "--open", str(DEMO_OPEN),
                             "--timeout", str(DEMO_SECONDS),
                             "--report", str(live_server.workdir / "custody-report.html"),
                             timeout=DEMO_SECONDS + 30)
    return DemoData(DEMO_PATIENTS, DEMO_OPEN, time.monotonic() - started, result.stdout)
