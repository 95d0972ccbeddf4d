"""Tables of the resource store: current versions, history, search index, change log.

Times are integer microseconds since the epoch (UTC): exact, sortable, engine-neutral.
Resource bodies are the canonical JSON bytes served to clients, never re-serialised.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()

TYPE = 64  # longest resource type name is well under this
ID = 64    # FHIR ids are at most 64 characters
TOKEN = 255
# Each engine gets an integer primary key that it auto-increments.
SEQ = BigInteger().with_variant(Integer(), "sqlite")


def _key_columns(primary_key: bool = False) -> list[Column]:
    return [Column("res_type", String(TYPE), nullable=False, primary_key=primary_key),
            Column("res_id", String(ID), nullable=False, primary_key=primary_key)]


resources = Table(
    "resources", metadata,
    *_key_columns(primary_key=True),
    Column("version", Integer, nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("content", LargeBinary, nullable=True),
    Index("ix_resources_type_updated", "res_type", "last_updated"),
)

resource_history = Table(
    "resource_history", metadata,
    *_key_columns(primary_key=True),
    Column("version", Integer, nullable=False, primary_key=True),
    Column("last_updated", BigInteger, nullable=False),
    Column("method", String(8), nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("content", LargeBinary, nullable=True),
    Index("ix_history_updated", "last_updated"),
    Index("ix_history_type_updated", "res_type", "last_updated"),
)

change_log = Table(
    "change_log", metadata,
    Column("seq", SEQ, primary_key=True, autoincrement=True),
    *_key_columns(),
    Column("version", Integer, nullable=False),
    Column("interaction", String(16), nullable=False),
    Column("at", BigInteger, nullable=False),
    Column("actor", String(255), nullable=True),
    Column("request_id", String(64), nullable=True),
)

# How far each reactor to the change log (the orchestrator...) has got: its last seq.
reactor_cursors = Table(
    "reactor_cursors", metadata,
    Column("name", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

# OAuth2 clients (SMART Backend Services): who may ask for tokens, with which keys.
oauth_clients = Table(
    "oauth_clients", metadata,
    Column("client_id", String(ID), primary_key=True),
    Column("name", String(TOKEN), nullable=False),
    Column("role", String(32), nullable=False),
    Column("organization", String(TOKEN), nullable=False),
    Column("jwks", Text, nullable=True),  # a JWK Set as JSON, or
    Column("jwks_url", Text, nullable=True),  # where to fetch it
    Column("scopes", Text, nullable=False),  # the widest a token may carry, space-separated
    Column("disabled", Boolean, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

# Client-assertion ids already used (a jti is accepted once, until it would expire anyway).
oauth_jtis = Table(
    "oauth_jtis", metadata,
    Column("client_id", String(ID), primary_key=True),
    Column("jti", String(TOKEN), primary_key=True),
    Column("expires_at", BigInteger, nullable=False),
)

# Access tokens, by the SHA-256 of their value (the value itself is never stored).
oauth_tokens = Table(
    "oauth_tokens", metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("client_id", String(ID), nullable=False),
    Column("scopes", Text, nullable=False),
    Column("issued_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("revoked", Boolean, nullable=False),
    # A person's token (authorization code grant): the user it acts for, whose role and
    # organisation bound what it reaches. None: the client's own (client credentials).
    Column("username", String(ID), nullable=True),
)

# People who sign in to the dashboard (`atm users add`): a scrypt hash of the password,
# never the password; a role and an organisation as for partner clients; failed sign-ins
# counted, and the account locked for a while after too many.
users = Table(
    "users", metadata,
    Column("username", String(ID), primary_key=True),
    Column("display_name", String(TOKEN), nullable=False),
    Column("role", String(32), nullable=False),
    Column("organization", String(TOKEN), nullable=False),
    Column("password_hash", Text, nullable=False),
    Column("disabled", Boolean, nullable=False),
    Column("failed_logins", Integer, nullable=False),
    Column("locked_until", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

# Authorization codes, by the SHA-256 of their value: used once, within a minute, by the
# client they were issued to, with the PKCE verifier of their challenge.
oauth_codes = Table(
    "oauth_codes", metadata,
    Column("code_hash", String(64), primary_key=True),
    Column("client_id", String(ID), nullable=False),
    Column("username", String(ID), nullable=False),
    Column("redirect_uri", Text, nullable=False),
    Column("code_challenge", String(128), nullable=False),
    Column("scopes", Text, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("used", Boolean, nullable=False),
)

# Dashboard sessions, by the SHA-256 of the cookie's value: the access token they act
# with (its hash), the CSRF token of their forms, an idle and an absolute expiry, and the
# message to show on the next page (after an action).
dashboard_sessions = Table(
    "dashboard_sessions", metadata,
    Column("session_hash", String(64), primary_key=True),
    Column("username", String(ID), nullable=False),
    Column("token_hash", String(64), nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("last_seen", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("flash", Text, nullable=True),
)

# The audit trail: one row per request (IHE BALP AuditEvent, rendered from these columns).
# A row is written once, chained behind its predecessor (`chain_seq`, `hash`) when it is
# written or, for a write's own record, shortly after (gateway/audit/chain.py).
audit_log = Table(
    "audit_log", metadata,
    Column("seq", SEQ, primary_key=True, autoincrement=True),
    Column("recorded", BigInteger, nullable=False),
    Column("event_type", String(16), nullable=False),  # rest | login
    Column("subtype", String(32), nullable=False),  # read, search-type, create, …
    Column("action", String(1), nullable=False),  # C R U D E
    Column("outcome", String(2), nullable=False),  # 0 success, 4 minor, 8 serious failure
    Column("status", Integer, nullable=True),  # HTTP status; NULL: stored with its write
    Column("client_id", String(ID), nullable=True),
    Column("organization", String(TOKEN), nullable=True),
    Column("address", String(TOKEN), nullable=True),
    Column("request_id", String(64), nullable=True),
    Column("method", String(8), nullable=False),
    Column("path", Text, nullable=False),
    Column("query", Text, nullable=True),
    Column("entity", String(TYPE + ID + 1), nullable=True),  # the first, as Type/id
    Column("entities", Text, nullable=True),  # space-separated Type/id[/_history/n]
    Column("chain_seq", BigInteger, nullable=True),
    Column("hash", String(64), nullable=True),
    Index("ix_audit_log_recorded", "recorded"),
    # Rows without a value stay out of these (metadata reads, searches, auth off): every
    # index costs each of the many audit inserts a B-tree insert.
    *(Index(f"ix_audit_log_{column}", column, "seq",
            sqlite_where=text(f"{column} IS NOT NULL"),
            postgresql_where=text(f"{column} IS NOT NULL"))
      for column in ("entity", "client_id", "organization")),
    Index("ix_audit_log_chain", "chain_seq", unique=True),
    Index("ix_audit_log_unchained", "seq", sqlite_where=text("chain_seq IS NULL"),
          postgresql_where=text("chain_seq IS NULL")),
)

# The resources of rows that name several (transactions), for AuditEvent?entity=Type/id.
audit_entities = Table(
    "audit_entities", metadata,
    Column("reference", String(TYPE + ID + 1), primary_key=True),  # Type/id
    Column("seq", BigInteger, primary_key=True),
)

# The newest chained row: a deleted tail of the chain shows against it.
audit_chain = Table(
    "audit_chain", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("chain_seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

# Subscriptions (gateway/subscriptions): each one's delivery state, one row per
# Subscription, written by the matcher and the delivery workers only.
subscriptions = Table(
    "subscriptions", metadata,
    Column("id", String(ID), primary_key=True),
    Column("version", Integer, nullable=False),  # of the Subscription this row follows
    Column("topic", Text, nullable=False),
    Column("channel", String(16), nullable=False),  # rest-hook | websocket
    Column("status", String(16), nullable=False),  # requested | active | error | off
    Column("client_id", String(ID), nullable=True),  # who subscribed (None: auth off)
    Column("organization", String(TOKEN), nullable=True),
    Column("events", BigInteger, nullable=False),  # events since subscription start
    Column("delivered", BigInteger, nullable=False),  # the last event number acknowledged
    Column("handshake", Boolean, nullable=False),  # done, for this activation
    Column("failures", Integer, nullable=False),  # attempts failed in a row
    Column("next_attempt", BigInteger, nullable=False),  # not before (µs)
    Column("last_sent", BigInteger, nullable=False),  # µs; heartbeats count from it
    Column("heartbeat_due", BigInteger, nullable=True),  # µs; None: no heartbeats
    Column("lease_owner", String(64), nullable=True),  # the worker delivering now
    Column("lease_until", BigInteger, nullable=False),
    Column("last_error", Text, nullable=True),
    Index("ix_subscriptions_due", "status", "next_attempt"),
)

# Each subscription's events, numbered 1, 2, 3… without gaps, kept for $events.
subscription_events = Table(
    "subscription_events", metadata,
    Column("subscription_id", String(ID), primary_key=True),
    Column("number", BigInteger, primary_key=True),
    Column("change_seq", BigInteger, nullable=False),
    *_key_columns(),
    Column("version", Integer, nullable=False),
    Column("interaction", String(16), nullable=False),
    Column("at", BigInteger, nullable=False),
)

# Websocket binding tokens ($get-ws-binding-token), by the SHA-256 of their value.
subscription_ws_tokens = Table(
    "subscription_ws_tokens", metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("subscription_id", String(ID), nullable=False),
    Column("expires_at", BigInteger, nullable=False),
)

# Chain-of-identity codes (gateway/custody/coi.py): one per enrolment, never reused.
chains_of_identity = Table(
    "chains_of_identity", metadata,
    Column("value", String(16), primary_key=True),  # compact, with its check character
    Column("careplan_id", String(ID), nullable=False, unique=True),
    Column("patient_id", String(ID), nullable=True),
    Column("assigned_at", BigInteger, nullable=False),
)

# The last sequence number given per facility (FIN) and year: codes are numbered in order.
coi_sequences = Table(
    "coi_sequences", metadata,
    Column("facility", String(8), primary_key=True),
    Column("year", Integer, primary_key=True),
    Column("last", Integer, nullable=False),
)

conditional_keys = Table(
    "conditional_keys", metadata,
    Column("res_type", String(TYPE), nullable=False, primary_key=True),
    Column("criteria_hash", String(64), nullable=False, primary_key=True),
    Column("res_id", String(ID), nullable=False),
    Column("criteria", Text, nullable=False),
)


def _index_table(name: str, *columns: Column, indexes: tuple[tuple[str, ...], ...]) -> Table:
    """An index table: (type, id, lastUpdated, param, values…), looked up by (type, param,
    values…), each index ending with res_id unless it names it earlier.

    Every index costs each write a B-tree insert, and index rows are most of what a create
    costs, so there is one index per way searches read and no more: `system|` tokens and
    _has/_revinclude are answered through the (type, param, …) indexes. The resource's
    lastUpdated is copied into its rows so that a search sorted by it can walk one
    criterion's matches in order (a token code, a reference), instead of every resource."""
    table = Table(name, metadata, *_key_columns(),
                  Column("last_updated", BigInteger, nullable=False),
                  Column("param", String(64), nullable=False), *columns)
    Index(f"ix_{name}_resource", table.c.res_type, table.c.res_id)
    for n, cols in enumerate(indexes):
        tail = () if "res_id" in cols else ("res_id",)
        Index(f"ix_{name}_{n}", table.c.res_type, table.c.param,
              *(table.c[c] for c in (*cols, *tail)))
    return table


sp_string = _index_table(
    "sp_string", Column("value", String(TOKEN), nullable=False),
    Column("exact", Text, nullable=False), indexes=(("value",),))
sp_token = _index_table(
    "sp_token", Column("system", String(TOKEN), nullable=True),
    Column("code", String(TOKEN), nullable=True), Column("text", String(TOKEN), nullable=True),
    indexes=(("code", "last_updated", "res_id", "system"),))
sp_reference = _index_table(
    "sp_reference", Column("target_type", String(TYPE), nullable=True),
    Column("target_id", String(TOKEN), nullable=True), Column("url", Text, nullable=True),
    indexes=(("target_id", "target_type", "last_updated"),))
sp_date = _index_table(
    "sp_date", Column("low", BigInteger, nullable=False),
    Column("high", BigInteger, nullable=False), indexes=(("low", "high"), ("high",)))
sp_number = _index_table("sp_number", Column("value", Float, nullable=False),
                         indexes=(("value",),))
sp_quantity = _index_table(
    "sp_quantity", Column("value", Float, nullable=False),
    Column("system", String(TOKEN), nullable=True), Column("code", String(TOKEN), nullable=True),
    indexes=(("value",), ("code", "value")))
sp_uri = _index_table("sp_uri", Column("value", String(TOKEN * 4), nullable=False),
                      indexes=(("value",),))

INDEX_TABLES: dict[str, Table] = {
    "string": sp_string, "token": sp_token, "reference": sp_reference, "date": sp_date,
    "number": sp_number, "quantity": sp_quantity, "uri": sp_uri,
}

# Multi-step scheduling (gateway/scheduling). Each published Slot, as the chain search
# reads it: its service (the HealthcareService its Schedule serves), time, capacity and
# how many appointments it holds. Kept in step with the Slot resource by its write rule.
schedule_slots = Table(
    "schedule_slots", metadata,
    Column("slot_id", String(ID), primary_key=True),
    Column("schedule_id", String(ID), nullable=False),
    Column("service", String(TOKEN), nullable=True),  # "HealthcareService/<id>"
    Column("start", BigInteger, nullable=False),
    Column("end", BigInteger, nullable=False),
    Column("capacity", Integer, nullable=False),
    Column("booked", Integer, nullable=False),  # claims of appointments
    Column("open", Boolean, nullable=False),  # not busy-unavailable nor entered-in-error
    Index("ix_schedule_slots_service_start", "service", "start"),
    Index("ix_schedule_slots_schedule", "schedule_id"),
)

# What takes a slot's room or a patient's time: an active Appointment (one row per slot it
# books, or one without a slot for a booking made without a published slot), or a
# time-limited hold ($hold-chain) that no appointment has consumed yet.
schedule_claims = Table(
    "schedule_claims", metadata,
    Column("id", SEQ, primary_key=True, autoincrement=True),
    Column("slot_id", String(ID), nullable=True),
    Column("service", String(TOKEN), nullable=True),
    Column("appointment_id", String(ID), nullable=True),
    Column("hold_id", String(ID), nullable=True),
    Column("careplan_id", String(ID), nullable=True),
    Column("patient", String(TOKEN), nullable=True),  # "Patient/<id>"
    Column("organization", String(TOKEN), nullable=True),  # the treatment centre, for quotas
    Column("start", BigInteger, nullable=False),
    Column("end", BigInteger, nullable=False),
    Column("expires", BigInteger, nullable=True),  # holds only
    Index("ix_schedule_claims_slot", "slot_id"),
    Index("ix_schedule_claims_appointment", "appointment_id"),
    Index("ix_schedule_claims_hold", "hold_id"),
    Index("ix_schedule_claims_patient", "patient", "start"),
    Index("ix_schedule_claims_service", "service", "start"),
)

# EHR endpoints the gateway is a SMART Backend Services client of (gateway/adapters/ehr).
ehr_endpoints = Table(
    "ehr_endpoints", metadata,
    Column("name", String(64), primary_key=True),
    Column("base_url", Text, nullable=False),
    Column("client_id", String(TOKEN), nullable=False),
    Column("private_jwk", Text, nullable=False),
    Column("organization", String(TOKEN), nullable=False),  # the treatment centre
    Column("scope", Text, nullable=True),
    Column("enabled", Boolean, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

# Changes an EHR refused (4xx) when written back: kept, with its answer, instead of
# blocking every later change behind them; `atm ehr list` counts them.
ehr_rejections = Table(
    "ehr_rejections", metadata,
    Column("id", SEQ, primary_key=True, autoincrement=True),
    Column("endpoint", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),  # the change-log entry
    Column("reference", String(TOKEN), nullable=False),  # what was being written
    Column("status", Integer, nullable=False),
    Column("answer", Text, nullable=False),
    Column("at", BigInteger, nullable=False),
    Index("ix_ehr_rejections_endpoint", "endpoint", "seq"),
)

# The HL7 v2 bridge to a LIMS (gateway/adapters/hl7): every message received or to be
# sent, kept with its raw text, so that none is lost. Inbound (`in`): received, then
# applied or failed (kept with the reason for `atm hl7 replay`); a resend of the same
# control id from the same sender is found by the unique key and answered the same ACK.
# Outbound (`out`): pending, sent (awaiting its ACK), acked or rejected; one per order.
hl7_messages = Table(
    "hl7_messages", metadata,
    Column("id", SEQ, primary_key=True, autoincrement=True),
    Column("direction", String(3), nullable=False),  # in | out
    Column("control_id", String(199), nullable=True),  # MSH-10; None: no readable MSH
    Column("application", String(TOKEN), nullable=False),  # MSH-3 of the sender
    Column("facility", String(TOKEN), nullable=False),  # MSH-4 of the sender
    Column("message_type", String(16), nullable=True),  # MSH-9, e.g. ORU^R01
    Column("coi", String(32), nullable=True),  # the chain of identity it is about
    Column("source", String(TYPE + ID + 1), nullable=True),  # out: ServiceRequest/<id>
    Column("raw", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", Text, nullable=True),
    Column("ack", Text, nullable=True),  # the ACK answered (in) or received (out)
    Column("attempts", Integer, nullable=False),
    Column("next_attempt", BigInteger, nullable=False),  # µs; out: not before
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Index("ux_hl7_messages_control_id", "direction", "application", "facility", "control_id",
          unique=True),
    Index("ux_hl7_messages_source", "source", unique=True),
    Index("ix_hl7_messages_due", "direction", "status", "next_attempt"),
)
