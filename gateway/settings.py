"""Configuration from `ATM_*` environment variables (and a `.env` file)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATM_", env_file=".env", extra="ignore")

    database_url: str = "sqlite:///./var/atm.db"
    """SQLAlchemy URL; `postgresql://…` (psycopg 3) for PostgreSQL."""
    base_url: str | None = None
    """Absolute FHIR base for Location headers and Bundle links, e.g.
    https://atm.example.org/fhir. Unset: taken from the request's Host."""
    trust_forwarded_headers: bool = False
    """Build links from X-Forwarded-Proto/Host/Prefix (only behind a trusted proxy)."""
    cors_origins: list[str] = []
    max_body_bytes: int = 16 * 1024 * 1024
    default_page_size: int = 20
    max_page_size: int = 1000
    max_include: int = 1000
    """Upper bound on resources added by _include/_revinclude to one page."""
    transaction_max_entries: int = 10_000
    auth: Literal["smart", "off"] = "smart"
    """smart: every FHIR request needs a SMART Backend Services access token whose
    scopes allow it (/metadata and discovery excepted). off: anyone may do anything
    (local exploration only; the server warns at start-up and in /metadata)."""
    rate_limit_per_second: float = 200.0
    """Requests a second each client may make (ATM_AUTH=smart; 0: no limit)."""
    rate_limit_burst: int = 400
    """Requests a client may make at once before its rate applies."""
    orchestrator: bool = True
    """Advance enrolments (CarePlans of a loaded protocol) in a thread beside the API."""
    orchestrator_workers: int = 4
    """Enrolments the orchestrator advances at once (each in its own transaction)."""
    orchestrator_poll_seconds: float = 0.2
    """How soon the orchestrator sees a change when it is idle."""
    deadline_check_seconds: float = 60.0
    """How often every active enrolment is re-evaluated for passed deadlines."""
    subscriptions: bool = True
    """Match changes to Subscriptions and deliver their notifications in a thread beside
    the API (`atm worker` does it in processes of its own)."""
    load_topics: bool = True
    """Store the shipped SubscriptionTopics (gateway/subscriptions/shipped_topics/*.json) at
    start-up."""
    subscription_allowed_hosts: list[str] = []
    """Hosts rest-hook notifications may be sent to: names (`lims.example.org`),
    `*.example.org`, `host:port`, IP networks (`10.1.0.0/16`). Empty: none."""
    subscription_error_after: int = 3
    """Failed attempts in a row after which a Subscription's status becomes `error`
    (delivery goes on, backing off; it is `active` again once the endpoint answers)."""
    subscription_retry_seconds: float = 1.0
    """The first retry's delay; each further one doubles it, up to the maximum."""
    subscription_retry_max_seconds: float = 300.0
    subscription_timeout_seconds: float = 10.0
    """How long a notification may take when the Subscription sets no backport-timeout."""
    subscription_max_count: int = 20
    """Events per notification when the Subscription sets no backport-max-count."""
    subscription_lease_seconds: float = 60.0
    """How long a worker holds a subscription it delivers; a worker that dies holding it
    is replaced by another after this long."""
    subscription_poll_seconds: float = 0.2
    """How soon delivery sees a change made by another process."""
    coi_facility: str = "A9999"
    """The ISBT 128 Facility Identification Number (FIN) that chain-of-identity codes
    begin with: the one ICCBBA assigned to the facility that issues them."""
    load_protocols: bool = True
    """Load the shipped protocols (orchestration/protocols/*.yaml) at start-up."""
    # -- EHR endpoints (gateway/adapters/ehr; registered with `atm ehr add`) ------------
    ehr_sync: bool = True
    """Import referred patients from their EHR and write status back, beside the API."""
    ehr_timeout_seconds: float = 10.0
    """How long one call to an EHR may take."""
    ehr_attempts: int = 4
    """Tries of a call that meets a network error, 429 or 5xx."""
    ehr_backoff_seconds: float = 0.5
    """The first retry waits up to this long, each next one up to twice as long."""
    ehr_backoff_max_seconds: float = 30.0
    """The longest wait between tries, Retry-After included."""
    ehr_breaker_failures: int = 5
    """Failed calls in a row after which an EHR is left alone for a while."""
    ehr_breaker_seconds: float = 30.0
    """How long an EHR is left alone before one call may try again."""
    ehr_poll_seconds: float = 1.0
    """How soon write-back sees a change made by another process."""
    ehr_observation_days: int = 180
    """How far back intake imports a patient's Observations."""

    # -- HL7 v2 bridge to a LIMS (gateway/adapters/hl7; README "HL7 v2 bridge") ----------
    hl7_listen_host: str = "127.0.0.1"
    """Interface the MLLP listener binds (MLLP has no authentication: keep it internal)."""
    hl7_listen_port: int | None = None
    """Accept ORU^R01 results over MLLP on this port beside the API (unset: no listener)."""
    hl7_lims_host: str | None = None
    hl7_lims_port: int | None = None
    """Where OML^O21 manufacturing orders are sent over MLLP (unset: none are)."""
    hl7_application: str = "ATM-GATEWAY"
    """MSH-3 of what the gateway sends and answers."""
    hl7_facility: str = "ATM"
    """MSH-4 of what the gateway sends and answers."""
    hl7_lims_application: str = "LIMS"
    hl7_lims_facility: str = ""
    """MSH-5 and MSH-6 of the orders: the LIMS's application and facility."""
    hl7_retry_seconds: float = 1.0
    """The first retry's delay for an order not acknowledged; doubled per attempt (with
    jitter) up to the maximum."""
    hl7_retry_max_seconds: float = 300.0
    hl7_error_attempts: int = 5
    """AE answers (application error) after which an order is given up as rejected; an AR
    is final at once; a LIMS that does not answer at all is retried without end."""
    hl7_timeout_seconds: float = 10.0
    """How long connecting, and then waiting for the ACK, may each take."""
    hl7_poll_seconds: float = 0.5
    """How soon orders made by another process are sent."""
    hl7_max_message_bytes: int = 1_048_576
    """Longest message the listener takes (a longer one is refused and the link closed)."""
    # -- end of the HL7 v2 bridge ------------------------------------------------------

    # -- the dashboard (gateway/dashboard; README "Operations dashboard") ---------------
    dashboard_session_hours: float = 8.0
    """How long a dashboard sign-in lasts at most, however active (its token too)."""
    dashboard_idle_minutes: float = 30.0
    """A dashboard session left this long without a request ends."""
    dashboard_refresh_seconds: float = 2.0
    """How often the programme view's figures catch up with changes (and open pages are
    told, to update without a reload)."""

    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else None

    @property
    def sqlalchemy_url(self) -> str:
        """The URL with the psycopg 3 driver for PostgreSQL."""
        url = self.database_url
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix):]
        return url

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def ensure_sqlite_dir(self) -> None:
        if self.is_sqlite and ":///" in self.database_url:
            path = self.database_url.split(":///", 1)[1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)


@cache
def get_settings() -> Settings:
    return Settings()
