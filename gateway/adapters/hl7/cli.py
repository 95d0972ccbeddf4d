"""`atm hl7`: run the bridge alone, list and show kept messages, replay failed ones, send
pending orders now. (Registered in gateway/cli.py; heavy imports stay inside commands.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from gateway.settings import Settings
    from gateway.store.database import Database

app = typer.Typer(help="HL7 v2 bridge to a LIMS: MLLP listener, manufacturing orders, kept "
                  "messages.", no_args_is_help=True)


@contextmanager
def _opened(**overrides: Any) -> Iterator[tuple[Database, Settings]]:
    """The configured database (SQLite migrated first, as `atm serve` does)."""
    from gateway.settings import get_settings
    from gateway.store.database import Database, make_engine
    from gateway.store.migrate import upgrade

    settings = get_settings().model_copy(update=overrides)
    db = Database(make_engine(settings))
    try:
        if settings.is_sqlite:
            upgrade(db.engine)
        yield db, settings
    finally:
        db.dispose()


@app.command("listen")
def listen(host: Annotated[str | None, typer.Option(help="Interface to listen on "
                                                    "(ATM_HL7_LISTEN_HOST)")] = None,
           port: Annotated[int | None, typer.Option(help="MLLP port (ATM_HL7_LISTEN_PORT)")]
           = None) -> None:
    """Accept ORU^R01 from the LIMS over MLLP, without the API (and send the pending
    orders too when ATM_HL7_LIMS_HOST and _PORT are set). Stops on Ctrl-C or SIGTERM."""
    import signal
    import threading

    from gateway.adapters.hl7.bridge import Bridge, sends

    overrides = {k: v for k, v in (("hl7_listen_host", host), ("hl7_listen_port", port))
                 if v is not None}
    with _opened(**overrides) as (db, settings):
        if settings.hl7_listen_port is None:
            _fail("give --port (or set ATM_HL7_LISTEN_PORT)")
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        bridge = Bridge(db, settings)
        thread = threading.Thread(target=bridge.serve, args=(stop,), name="atm-hl7")
        thread.start()
        bridge.started.wait(10)
        if bridge.address is None:
            stop.set()
            thread.join(timeout=30)
            _fail(f"cannot listen on {settings.hl7_listen_host}:{settings.hl7_listen_port}")
        also = (f"; orders go to {settings.hl7_lims_host}:{settings.hl7_lims_port}"
                if sends(settings) else "")
        typer.echo(f"HL7 v2 (MLLP) listening on {bridge.address[0]}:{bridge.address[1]}{also}",
                   err=False)
        while thread.is_alive():
            thread.join(timeout=0.5)


@app.command("list")
def list_messages(
        status: Annotated[str | None, typer.Option(
            help="received, applied, failed (in); pending, sent, acked, rejected (out)")]
        = None,
        direction: Annotated[str | None, typer.Option(help="in or out")] = None,
        limit: Annotated[int, typer.Option(help="The newest this many")] = 100) -> None:
    """Kept messages, newest first, as JSON lines (raw text: `atm hl7 show ID`)."""
    from gateway.adapters.hl7 import messages

    with _opened() as (db, _):
        for row in messages.listing(db, status=status, direction=direction, limit=limit):
            typer.echo(json.dumps(summary(row), ensure_ascii=False))


def summary(row: Any) -> dict[str, Any]:
    return {"id": row.id, "direction": row.direction, "type": row.message_type,
            "control_id": row.control_id, "sender": f"{row.application}^{row.facility}",
            "coi": row.coi, "source": row.source, "status": row.status,
            "attempts": row.attempts, "reason": row.reason, "created": _when(row.created_at),
            "updated": _when(row.updated_at)}


def _when(micros: int) -> str:
    return datetime.fromtimestamp(micros / 1_000_000, UTC).isoformat(timespec="seconds")


@app.command("show")
def show(message_id: Annotated[int, typer.Argument(help="Its id (atm hl7 list)")]) -> None:
    """One message's raw text (a segment a line), and the ACK answered or received."""
    from gateway.adapters.hl7 import messages

    with _opened() as (db, _), db.read() as conn:
        row = messages.get(conn, message_id)
    if row is None:
        _fail(f"no HL7 message {message_id}")
    typer.echo(json.dumps(summary(row), ensure_ascii=False))
    typer.echo(row.raw.replace("\r", "\n").rstrip("\n"))
    if row.ack:
        typer.echo("-- ACK\n" + row.ack.replace("\r", "\n").rstrip("\n"))


@app.command("replay")
def replay(message_ids: Annotated[list[int] | None, typer.Argument(
               metavar="[ID]...", help="Inbound messages to apply again")] = None,
           failed: Annotated[bool, typer.Option(
               "--failed", help="Every inbound message kept as failed")] = False) -> None:
    """Apply kept inbound messages again, after a fix; exit 1 if any still fails. The new
    answer is stored, not sent (the sender has long had the first)."""
    from gateway.adapters.hl7 import inbound, messages

    if not message_ids and not failed:
        _fail("name the messages (IDs) or give --failed")
    with _opened() as (db, settings):
        ids = [*(message_ids or []), *(messages.inbound_ids(db, messages.OPEN_IN)
                                       if failed else [])]
        outcomes = inbound.replay(db, settings, list(dict.fromkeys(ids)))
    for outcome in outcomes:
        typer.echo(f"{outcome.message_id}: {outcome.status}"
                   + (f" ({outcome.reason})" if outcome.reason else ""))
    if any(o.status not in (messages.APPLIED,) for o in outcomes):
        raise typer.Exit(1)


@app.command("send-pending")
def send_pending() -> None:
    """Make the orders the change log calls for and send every one that is due, now (the
    LIMS from ATM_HL7_LIMS_HOST and ATM_HL7_LIMS_PORT)."""
    import asyncio

    from gateway.adapters.hl7.bridge import sends
    from gateway.adapters.hl7.orders import OrderBook
    from gateway.adapters.hl7.sender import OrderSender

    with _opened() as (db, settings):
        if not sends(settings):
            _fail("set ATM_HL7_LIMS_HOST and ATM_HL7_LIMS_PORT")
        book = OrderBook(db, settings)
        while book.run_once() >= book.batch:
            pass
        sent = asyncio.run(OrderSender(db, settings).send_due(limit=10_000))
    typer.echo(f"{sent} sent (atm hl7 list --direction out: how each went)")


def _fail(message: str) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(1)
