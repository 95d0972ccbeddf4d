"""The `atm` command: serve the gateway, manage its database, load therapy protocols."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from gateway.adapters.hl7 import cli as hl7_cli

if TYPE_CHECKING:
    from mappings.protocols import CompiledProtocol

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

app = typer.Typer(help="ATM Gateway: FHIR gateway and orchestrator for advanced therapies.",
                  no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
clients_app = typer.Typer(help="OAuth2 clients of partner systems (SMART Backend Services).",
                          no_args_is_help=True)
app.add_typer(clients_app, name="clients")
users_app = typer.Typer(help="People who sign in to the dashboard.", no_args_is_help=True)
app.add_typer(users_app, name="users")
protocols_app = typer.Typer(help="Therapy protocols: check, compile and load YAML protocols "
                            "(orchestration/PROTOCOLS.md).", no_args_is_help=True)
app.add_typer(protocols_app, name="protocols")
audit_app = typer.Typer(help="The audit trail: one AuditEvent for every request, chained.",
                        no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.add_typer(hl7_cli.app, name="hl7")  # the HL7 v2 bridge: gateway/adapters/hl7/cli.py


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="Interface to listen on"),
          port: int = typer.Option(8080, help="TCP port"),
          workers: int = typer.Option(1, help="Worker processes (PostgreSQL only)")) -> None:
    """Start the FHIR server (SQLite databases are migrated on start)."""
    import uvicorn

    from gateway.api.observability import log_config
    from gateway.settings import get_settings

    settings = get_settings()
    if workers > 1 and settings.is_sqlite:
        raise typer.BadParameter("several workers need PostgreSQL (ATM_DATABASE_URL)")
    base = f"http://{host}:{port}/fhir"
    typer.echo(f"ATM Gateway: FHIR R4 at {base}"
               + (", the orchestrator advancing enrolments" if settings.orchestrator else "")
               + (", the shipped protocols loaded" if settings.load_protocols else "")
               + (", subscription notifications delivered" if settings.subscriptions else "")
               + (f", HL7 v2 results taken on {settings.hl7_listen_host}:"
                  f"{settings.hl7_listen_port}" if settings.hl7_listen_port else "")
               + (f", orders sent to the LIMS at {settings.hl7_lims_host}:"
                  f"{settings.hl7_lims_port}" if settings.hl7_lims_port else "")
               + f".\nWatch whole therapy journeys: atm demo --server {base}"
               + ("\nWARNING: ATM_AUTH=off: no one is asked who they are; anyone can read "
                  "and change everything. For local exploration only."
                  if settings.auth == "off" else
                  "\nEvery request needs a token: atm clients add … --new-key FILE, then "
                  "atm token --credentials FILE"))
    with shared_metrics(workers):
        uvicorn.run("gateway.app:serving_app", factory=True, host=host, port=port,
                    workers=workers, loop="uvloop", http="httptools", access_log=False,
                    log_level="warning", log_config=log_config(settings),
                    # X-Forwarded-* are honoured by the gateway only when configured to
                    # (ATM_TRUST_FORWARDED_HEADERS), not by uvicorn for any local proxy.
                    proxy_headers=False)


@contextmanager
def shared_metrics(workers: int) -> Iterator[None]:
    """With several workers, each keeps its Prometheus samples in files of one directory
    (prometheus_client's multiprocess mode), so /metrics from any worker adds them all
    up. An operator's own PROMETHEUS_MULTIPROC_DIR is kept; ours is removed at exit."""
    if workers <= 1 or os.environ.get(MULTIPROC_ENV):
        yield
        return
    directory = tempfile.mkdtemp(prefix="atm-metrics-")
    os.environ[MULTIPROC_ENV] = directory  # the workers, spawned next, inherit it
    try:
        yield
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)


@app.command()
def orchestrate(poll: float = typer.Option(0.5, help="Seconds between looks at the change "
                                           "log when idle")) -> None:
    """Run only the orchestrator against ATM_DATABASE_URL (more of them, or beside
    `atm serve --workers N`, share the work safely). Stops on Ctrl-C or SIGTERM."""
    import signal
    import threading

    from gateway.settings import get_settings
    from gateway.store.database import Database, make_engine
    from orchestration.runner import Orchestrator

    settings = get_settings()
    db = Database(make_engine(settings))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    typer.echo(f"orchestrating enrolments in {_database_name()}")
    try:
        Orchestrator(db, settings, workers=settings.orchestrator_workers).serve(
            stop, poll, settings.deadline_check_seconds)
    finally:
        db.dispose()


@app.command()
def worker(orchestrate: bool = typer.Option(True, help="Advance enrolments too, as "
                                            "`atm orchestrate` does")) -> None:
    """Deliver subscription notifications (and advance enrolments) against
    ATM_DATABASE_URL, beside `atm serve` processes started with ATM_SUBSCRIPTIONS=false
    and ATM_ORCHESTRATOR=false. Any number of workers share the work. Stops on Ctrl-C
    or SIGTERM."""
    import signal
    import threading

    from gateway.audit.log import running_trail
    from gateway.settings import get_settings
    from gateway.store.database import Database, make_engine
    from gateway.subscriptions.worker import SubscriptionWorker
    from orchestration.runner import Orchestrator

    settings = get_settings()
    db = Database(make_engine(settings))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    threads = []
    if orchestrate:
        orchestrator = Orchestrator(db, settings, workers=settings.orchestrator_workers)
        threads.append(threading.Thread(
            target=orchestrator.serve, name="atm-orchestrator", daemon=True,
            args=(stop, settings.orchestrator_poll_seconds, settings.deadline_check_seconds)))
    also = " and orchestrating enrolments" if orchestrate else ""
    typer.echo(f"delivering subscription notifications{also} from {_database_name()}")
    try:
        with running_trail(db):  # chains the audit rows of delivery attempts
            for thread in threads:
                thread.start()
            SubscriptionWorker(db, settings).serve(stop)
            for thread in threads:
                thread.join(timeout=30)
    finally:
        db.dispose()



@app.command()
def demo(server: str = typer.Option("http://127.0.0.1:8080/fhir", help="FHIR base URL of "
                                    "a running `atm serve`"),
         patients: int = typer.Option(3, min=1, max=50, help="Synthetic patients, spread "
                                      "over the server's protocols"),
         open_journeys: int = typer.Option(0, "--open", min=0, max=200, help="More patients "
                                           "left part of the way, each at another stage, for "
                                           "the dashboard to show journeys under way"),
         timeout: float = typer.Option(300.0, help="Give up after this many seconds "
                                       "without every journey finished"),
         report: str = typer.Option("var/custody-report.html", help="Where to write "
                                     "the custody report of one finished journey")) -> None:
    """Play whole therapy journeys against a running server: enrol patients, act as
    every partner (one QC release fails and is repeated; custody handoffs are signed with
    each partner's key), sum up, and write one patient's custody report. When the server
    asks for tokens, the demo registers its partners' clients in ATM_DATABASE_URL (the
    server's database: run it beside the server)."""
    import httpx

    from gateway.auth.credentials import TokenError
    from orchestration.demo import DemoError, run_demo

    db = _database()
    try:
        summary = run_demo(server, patients, typer.echo, timeout=timeout, db=db,
                           report=Path(report), open_journeys=open_journeys)
    except (DemoError, TokenError, httpx.HTTPError) as exc:
        typer.echo(f"demo stopped: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        db.dispose()
    typer.echo("")
    typer.echo("\n".join(summary))


def _database() -> Any:
    from gateway.settings import get_settings
    from gateway.store.database import Database, make_engine
    from gateway.store.migrate import upgrade

    settings = get_settings()
    db = Database(make_engine(settings))
    if settings.is_sqlite:
        upgrade(db.engine)
    return db


@clients_app.command("add")
def clients_add(
        name: Annotated[str, typer.Option(help="What the partner system is called")],
        role: Annotated[str, typer.Option(help="treatment-centre, apheresis-centre, courier, "
                                          "manufacturer, payer, ehr, lims or admin")],
        organization: Annotated[str, typer.Option(help="Organization/<id> it acts for")],
        jwks_file: Annotated[Path | None, typer.Option(
            exists=True, dir_okay=False, help="Its public keys, a JWK Set file")] = None,
        jwks_url: Annotated[str | None, typer.Option(help="Where its JWK Set is")] = None,
        new_key: Annotated[Path | None, typer.Option(
            dir_okay=False, help="Make it a new key pair and write its credentials (client "
            "id and private key, for `atm token`) to this file")] = None,
        scopes: Annotated[str, typer.Option(help="Widest scopes its tokens may carry")]
        = "system/*.rs",
) -> None:
    """Register a client; print it (with its client_id) as JSON."""
    from gateway.auth import credentials
    from gateway.auth.clients import RegistrationError, add_client

    if new_key is not None and (jwks_file or jwks_url):
        _fail("--new-key makes the client's keys: give it without --jwks-file or --jwks-url")
    key = credentials.new_key() if new_key is not None else None
    try:
        jwks = json.loads(jwks_file.read_text(encoding="utf-8")) if jwks_file else None
    except (ValueError, UnicodeDecodeError) as exc:
        _fail(f"{jwks_file} is not a JSON JWK Set ({exc})")
    db = _database()
    try:
        client = add_client(db, name=name, role=role, organization=organization,
                            jwks=credentials.public_jwks(key) if key else jwks,
                            jwks_url=jwks_url, scopes=scopes)
    except RegistrationError as exc:
        _fail(str(exc))
    finally:
        db.dispose()
    if new_key is not None and key is not None:
        credentials.Credentials(client.client_id, key).save(new_key)
    typer.echo(json.dumps(client.summary(), indent=2))


@clients_app.command("list")
def clients_list() -> None:
    """Every registered client, as JSON lines."""
    from gateway.auth.clients import list_clients

    db = _database()
    try:
        for client in list_clients(db):
            typer.echo(json.dumps(client.summary()))
    finally:
        db.dispose()


@clients_app.command("disable")
def clients_disable(client_id: Annotated[str, typer.Argument(help="The client's id")]) -> None:
    """Refuse the client new tokens; its current tokens stop working within a second."""
    from gateway.auth.clients import set_disabled

    db = _database()
    try:
        found = set_disabled(db, client_id)
    finally:
        db.dispose()
    if not found:
        _fail(f"no client {client_id}")
    typer.echo(f"client {client_id} disabled")


@users_app.command("add")
def users_add(
        username: Annotated[str, typer.Argument(help="What the person signs in with")],
        role: Annotated[str, typer.Option(help="As for partner clients: treatment-centre "
                                          "(sees its own patients), admin (everything), "
                                          "apheresis-centre, manufacturer, …")],
        organization: Annotated[str, typer.Option(help="Organization/<id> they work for")],
        name: Annotated[str | None, typer.Option(help="Their name, as pages show it")] = None,
        password: Annotated[str, typer.Option(
            prompt=True, hide_input=True, confirmation_prompt=True,
            envvar="ATM_NEW_USER_PASSWORD",
            help="At least 12 characters; asked for when not given (or set "
                 "ATM_NEW_USER_PASSWORD)")] = "",
) -> None:
    """Add a person who signs in to the dashboard."""
    from gateway.auth.people import UserError, add_user

    db = _database()
    try:
        user = add_user(db, username=username, password=password, role=role,
                        organization=organization, display_name=name, now=int(time.time()))
    except UserError as exc:
        _fail(str(exc))
    finally:
        db.dispose()
    typer.echo(f"user {user.username} added ({user.role}, {user.organization})")


@users_app.command("list")
def users_list() -> None:
    """Every dashboard user, as JSON lines (never their passwords)."""
    from gateway.auth.people import list_users

    db = _database()
    try:
        for user in list_users(db):
            typer.echo(json.dumps({"username": user.username, "name": user.display_name,
                                   "role": user.role, "organization": user.organization,
                                   "disabled": user.disabled}))
    finally:
        db.dispose()


@users_app.command("disable")
def users_disable(username: Annotated[str, typer.Argument(help="The user")],
                  enable: Annotated[bool, typer.Option(
                      "--enable", help="Enable the user again instead")] = False) -> None:
    """Stop a user signing in; their open sessions end within a second."""
    from gateway.auth.people import set_disabled

    db = _database()
    try:
        found = set_disabled(db, username, not enable)
    finally:
        db.dispose()
    if not found:
        _fail(f"no user {username}")
    typer.echo(f"user {username} {'enabled' if enable else 'disabled'}")


@users_app.command("password")
def users_password(
        username: Annotated[str, typer.Argument(help="The user")],
        password: Annotated[str, typer.Option(
            prompt=True, hide_input=True, confirmation_prompt=True,
            envvar="ATM_NEW_USER_PASSWORD", help="The new password (12 characters or more)")
        ] = "") -> None:
    """Set a user's password (and unlock the account)."""
    from gateway.auth.people import UserError, set_password

    db = _database()
    try:
        found = set_password(db, username, password)
    except UserError as exc:
        _fail(str(exc))
    finally:
        db.dispose()
    if not found:
        _fail(f"no user {username}")
    typer.echo(f"password of {username} changed")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply schema migrations to ATM_DATABASE_URL."""
    from gateway.settings import get_settings
    from gateway.store.database import make_engine
    from gateway.store.migrate import upgrade

    engine = make_engine(get_settings())
    upgrade(engine)
    engine.dispose()
    typer.echo("database is at the newest schema")


@app.command()
def token(
        credentials_file: Annotated[Path, typer.Option(
            "--credentials", exists=True, dir_okay=False,
            help="A client's credentials, as `atm clients add --new-key` wrote them")],
        server: Annotated[str, typer.Option(help="FHIR base URL of the gateway")]
        = "http://127.0.0.1:8080/fhir",
        scope: Annotated[str | None, typer.Option(help="Scopes to ask for (default: all "
                                                  "the client is registered for)")] = None,
) -> None:
    """Print an access token for a registered client (SMART Backend Services)."""
    import httpx

    from gateway.auth.credentials import Credentials, TokenError, fetch_token, token_url

    try:
        creds = Credentials.load(credentials_file)
    except (ValueError, KeyError, TypeError) as exc:
        _fail(f"{credentials_file} holds no client credentials ({exc})")
    try:
        with httpx.Client(timeout=30.0) as http:
            url = token_url(http, server)
            if url is None:
                _fail(f"{server} asks for no token (it runs with ATM_AUTH=off)")
            typer.echo(fetch_token(http, url, creds, scope)["access_token"])
    except (TokenError, httpx.HTTPError) as exc:
        _fail(str(exc))


@audit_app.command("verify")
def audit_verify() -> None:
    """Walk the audit trail's hash chain: print a JSON report; exit 1 if it is broken."""
    from gateway.audit.chain import verify

    db = _database()
    try:
        report = verify(db)
    finally:
        db.dispose()
    typer.echo(json.dumps(report.to_json(), indent=2))
    if not report.intact:
        raise typer.Exit(1)


# -- protocols ---------------------------------------------------------------------------
ProtocolFiles = Annotated[list[Path], typer.Argument(
    exists=True, dir_okay=False, readable=True, metavar="FILE", help="Protocol YAML files")]


def _compile(path: Path) -> tuple[CompiledProtocol | None, list[str]]:
    """A protocol file's FHIR form, or the "FILE:LINE: message" lines of its problems."""
    from mappings.protocols import ProtocolError, compile_protocol

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None, [f"{path}:1: not UTF-8 text"]
    try:
        return compile_protocol(text, str(path)), []
    except ProtocolError as exc:
        return None, [p.format(str(path)) for p in exc.problems]


def _compile_all(files: list[Path]) -> list[CompiledProtocol]:
    """Every file's FHIR form; with any problem, they are printed and the command fails."""
    compiled, problems = [], []
    for path in files:
        protocol, found = _compile(path)
        problems += found
        if protocol is not None:
            compiled.append(protocol)
    if problems:
        typer.echo("\n".join(problems), err=True)
        raise typer.Exit(1)
    return compiled


@protocols_app.command("validate")
def protocols_validate(files: ProtocolFiles) -> None:
    """Check protocol files; print every problem with its line (exit 1 if any)."""
    failed = False
    for path in files:
        protocol, problems = _compile(path)
        if protocol is None:
            failed = True
            typer.echo("\n".join(problems))
        else:
            typer.echo(f"{path}: ok ({len(protocol.activity_definitions)} stages)")
    if failed:
        raise typer.Exit(1)


@protocols_app.command("compile")
def protocols_compile(
        file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True,
                                             metavar="FILE", help="A protocol YAML file")],
        output: Annotated[Path | None, typer.Option("--output", "-o",
                                                    help="Write the Bundle here")] = None,
) -> None:
    """Print (or write) the protocol's FHIR form as a transaction Bundle."""
    (protocol,) = _compile_all([file])
    text = json.dumps(protocol.bundle(), indent=2, ensure_ascii=False) + "\n"
    if output is None:
        typer.echo(text, nl=False)
        return
    output.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {output}: PlanDefinition/{protocol.id} and "
               f"{len(protocol.activity_definitions)} ActivityDefinitions")


@protocols_app.command("load")
def protocols_load(
        files: ProtocolFiles,
        server: Annotated[str | None, typer.Option(
            help="FHIR base URL to POST to; without it, the protocols go into "
            "ATM_DATABASE_URL")] = None,
) -> None:
    """Store protocols (PUT by id: loading again replaces them), one transaction each."""
    protocols = _compile_all(files)
    bundles = [p.bundle() for p in protocols]
    answers = _post_bundles(server, bundles) if server else _store_bundles(bundles)
    target = server or _database_name()
    # Each line as its protocol is stored: a later failure leaves the earlier ones loaded.
    for path, protocol, answer in zip(files, protocols, answers, strict=True):
        typer.echo(f"{path}: {_loaded(protocol, answer)} into {target}")


def _loaded(protocol: CompiledProtocol, answer: dict[str, Any]) -> str:
    """"PlanDefinition/x|1.0 (created) and 12 ActivityDefinitions (12 created)"."""
    outcomes = [_outcome(entry) for entry in answer.get("entry", [])]
    counts: dict[str, int] = {}
    for outcome in outcomes[1:]:
        counts[outcome] = counts.get(outcome, 0) + 1
    version = protocol.protocol.version
    plan = f"PlanDefinition/{protocol.id}" + (f"|{version}" if version else "")
    activities = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
    return (f"loaded {plan} ({outcomes[0] if outcomes else '?'}) and "
            f"{len(protocol.activity_definitions)} ActivityDefinitions ({activities})")


def _outcome(entry: dict[str, Any]) -> str:
    status = str(entry.get("response", {}).get("status", ""))
    return {"201": "created", "200": "updated"}.get(status[:3], status or "?")


def _database_name() -> str:
    from sqlalchemy.engine import make_url

    from gateway.settings import get_settings

    return make_url(get_settings().database_url).render_as_string(hide_password=True)


def _post_bundles(server: str, bundles: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """POST each transaction Bundle to a FHIR server's base; yield each response Bundle."""
    import httpx

    with httpx.Client(timeout=60) as client:
        for bundle in bundles:
            try:
                response = client.post(server.rstrip("/"), content=json.dumps(bundle),
                                       headers={"Content-Type": "application/fhir+json",
                                                "Accept": "application/fhir+json"})
            except httpx.HTTPError as exc:
                _fail(f"cannot reach {server}: {exc}")
            if response.status_code >= 300:
                _fail(f"{server} refused the protocol ({response.status_code}): "
                      f"{_diagnostics(response.text)}")
            yield response.json()


def _store_bundles(bundles: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Replay each transaction Bundle through the gateway's own services, as `atm serve`
    would for a POST to its base (SQLite databases are migrated first, as there); yield
    each response Bundle."""
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.errors import FhirError
    from gateway.services.context import Context, FhirRequest
    from gateway.services.router import handle
    from gateway.settings import get_settings
    from gateway.store.database import Database, make_engine
    from gateway.store.migrate import upgrade
    from gateway.store.repository import Actor

    settings = get_settings()
    db = Database(make_engine(settings))
    ctx = Context(db=db, settings=settings, base_url=settings.base_url or "",
                  actor=Actor(name="atm protocols load"))
    try:
        if settings.is_sqlite:
            upgrade(db.engine)
        for bundle in bundles:
            response = handle(ctx, FhirRequest("POST", "", resource=bundle))
            yield json.loads(response.body or b"{}")
    except FhirError as exc:
        _fail(f"the gateway refused the protocol ({exc.status}): "
              + "; ".join(issue.diagnostics for issue in exc.issues))
    except SQLAlchemyError as exc:
        _fail(f"cannot write to the database ({type(exc).__name__}); is its schema "
              "up to date (atm db upgrade)?")
    finally:
        db.dispose()


# -- EHR endpoints (gateway/adapters/ehr) ---------------------------------------------------
ehr_app = typer.Typer(help="EHR endpoints: SMART Backend Services clients of hospital EHRs, "
                      "patient intake and status written back.", no_args_is_help=True)
app.add_typer(ehr_app, name="ehr")


@ehr_app.command("key")
def ehr_key(out: Annotated[Path, typer.Option(
        dir_okay=False, help="Where our new private key goes (readable by its owner only)")],
            ) -> None:
    """Make our key pair for an EHR: keep the private JWK in OUT, and print the public JWK
    Set for the EHR's administrators to register us with."""
    from gateway.auth import credentials

    if out.exists():
        _fail(f"{out} exists: keys are never overwritten")
    key = credentials.new_key()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.touch(mode=0o600)
    out.write_text(json.dumps(key.as_dict(private=True), indent=2) + "\n", encoding="utf-8")
    typer.echo(json.dumps(credentials.public_jwks(key), indent=2))


@ehr_app.command("add")
def ehr_add(
        name: Annotated[str, typer.Option(help="What we call this EHR (a-z, 0-9, -)")],
        base_url: Annotated[str, typer.Option(help="The EHR's FHIR base URL")],
        key: Annotated[Path, typer.Option(
            exists=True, dir_okay=False, help="Our private key for it: a P-384 JWK, or the "
            "credentials file `atm clients add --new-key` writes")],
        organization: Annotated[str, typer.Option(
            help="Organization/<id>: the treatment centre whose EHR it is")],
        client_id: Annotated[str | None, typer.Option(
            help="The client id the EHR registered us under (else the key file's)")] = None,
        scope: Annotated[str | None, typer.Option(help="Scopes to ask the EHR for")] = None,
) -> None:
    """Register an EHR endpoint; print it as JSON."""
    from gateway.adapters.ehr.endpoints import Endpoint, EndpointError, add_endpoint, read_key_file

    try:
        jwk, file_client = read_key_file(key.read_text(encoding="utf-8"))
    except (EndpointError, UnicodeDecodeError) as exc:
        _fail(f"{key}: {exc}")
    if not (client_id or file_client):
        _fail("--client-id is needed: the key file does not name one")
    db = _database()
    try:
        endpoint = add_endpoint(db, Endpoint(name, base_url, client_id or str(file_client),
                                             jwk, organization, scope))
    except EndpointError as exc:
        _fail(str(exc))
    finally:
        db.dispose()
    typer.echo(json.dumps(endpoint.summary(), indent=2))


@ehr_app.command("list")
def ehr_list() -> None:
    """Every EHR endpoint, as JSON lines, with its write-back position and refusals."""
    from sqlalchemy import func, select

    from gateway.adapters.ehr.endpoints import list_endpoints
    from gateway.adapters.ehr.sync import read_cursor
    from gateway.store.schema import ehr_rejections

    db = _database()
    try:
        for endpoint in list_endpoints(db):
            with db.read() as conn:
                refused = conn.execute(select(func.count()).where(
                    ehr_rejections.c.endpoint == endpoint.name)).scalar()
                position = read_cursor(conn, f"ehr-writeback:{endpoint.name}"[:64])
            typer.echo(json.dumps({**endpoint.summary(), "written_back_to_change": position,
                                   "refused": refused}))
    finally:
        db.dispose()


@ehr_app.command("enable")
def ehr_enable(name: Annotated[str, typer.Argument(help="The endpoint's name")],
               off: Annotated[bool, typer.Option("--off", help="Disable it instead")] = False,
               ) -> None:
    """Enable (or with --off, disable) an endpoint: a disabled one is left alone."""
    from gateway.adapters.ehr.endpoints import set_enabled

    db = _database()
    try:
        if not set_enabled(db, name, not off):
            _fail(f"no EHR endpoint {name}")
    finally:
        db.dispose()


@ehr_app.command("intake")
def ehr_intake(
        identifier: Annotated[str, typer.Option(help="The patient's identifier in the EHR, "
                                                "system|value")],
        ehr: Annotated[str | None, typer.Option(help="The endpoint (else the only one)")]
        = None,
) -> None:
    """Import a patient and its eligibility data from the EHR; print what was imported."""
    from gateway.adapters.ehr.intake import endpoint_named, intake
    from gateway.errors import FhirError
    from gateway.services.context import Context
    from gateway.settings import get_settings
    from gateway.store.repository import Actor

    db = _database()
    try:
        settings = get_settings()
        ctx = Context(db=db, settings=settings, base_url=settings.base_url or "",
                      actor=Actor(name="atm ehr intake"))
        imported = intake(ctx, endpoint_named(ctx, ehr), identifier)
    except FhirError as exc:
        _fail(f"intake failed ({exc.status}): {exc.diagnostics}")
    finally:
        db.dispose()
    typer.echo(json.dumps({"patient": imported.patient, "imported": imported.counts}))


@ehr_app.command("sync")
def ehr_sync() -> None:
    """Write back what each EHR has not been told yet, and import referred patients, once
    (`atm serve` does it continuously)."""
    from gateway.adapters.ehr.sync import EhrSync
    from gateway.settings import get_settings

    db = _database()
    try:
        for name, result in EhrSync(db, get_settings()).run_once().items():
            typer.echo(json.dumps({"endpoint": name, "written": result.written,
                                   "refused": result.rejected,
                                   "waiting_seconds": round(result.waiting, 1)}))
    finally:
        db.dispose()


def _diagnostics(body: str) -> str:
    try:
        issues = json.loads(body).get("issue", [])
        return "; ".join(str(i.get("diagnostics") or i.get("code")) for i in issues) or body
    except (ValueError, AttributeError):
        return body[:500]


def _fail(message: str) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(1)


if __name__ == "__main__":
    app()
