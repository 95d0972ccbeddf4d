"""The `atm` command: serve the gateway, manage its database."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import typer

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

app = typer.Typer(help="ATM Gateway: FHIR gateway and orchestrator for advanced therapies.",
                  no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")


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
    with shared_metrics(workers):
        uvicorn.run("gateway.app:create_app", factory=True, host=host, port=port,
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


if __name__ == "__main__":
    app()
