"""A Subscription as the Subscriptions Backport IG shapes it, read into what delivery needs,
and the checks a Subscription must pass to be stored.

https://hl7.org/fhir/uv/subscriptions-backport/STU1.1/StructureDefinition-backport-subscription.html
`criteria` is the topic's canonical URL; filters are `backport-filter-criteria`
extensions on `_criteria` (`Task?owner=Organization/x`); the channel carries the payload
content (`empty | id-only | full-resource`), heartbeat period, timeout and max count as
extensions; `channel.header` holds HTTP headers sent with every notification.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from gateway.errors import Issue, UnprocessableError
from gateway.settings import Settings
from gateway.store.timeparse import date_range
from gateway.subscriptions.topics import Topic, TopicError, check_criteria

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
FILTER = BACKPORT + "backport-filter-criteria"
PAYLOAD = BACKPORT + "backport-payload-content"
HEARTBEAT = BACKPORT + "backport-heartbeat-period"
TIMEOUT = BACKPORT + "backport-timeout"
MAX_COUNT = BACKPORT + "backport-max-count"
CHANNELS = ("rest-hook", "websocket")
CONTENTS = ("empty", "id-only", "full-resource")
MEDIA = ("application/fhir+json", "application/json")
MAX_TIMEOUT = 120
MAX_HEADERS = 20


@dataclass(frozen=True)
class Spec:
    id: str
    topic: str
    filters: dict[str, tuple[tuple[str, str], ...]]  # resource type -> criteria
    channel: str
    endpoint: str | None
    headers: tuple[tuple[str, str], ...]
    content: str
    heartbeat: int | None  # seconds
    timeout: float
    max_count: int
    end: int | None = None  # µs: no events after it, nor heartbeats

    def ended(self, at: int) -> bool:
        return self.end is not None and at >= self.end


def _extension(element: dict[str, Any] | None, url: str) -> dict[str, Any] | None:
    for ext in (element or {}).get("extension", []):
        if isinstance(ext, dict) and ext.get("url") == url:
            return ext
    return None


def _int_extension(channel: dict[str, Any], url: str, name: str, low: int,
                   high: int | None = None) -> int | None:
    ext = _extension(channel, url)
    if ext is None:
        return None
    value = ext.get("valueUnsignedInt", ext.get("valuePositiveInt"))
    if not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"from {low}" + (f" to {high}" if high is not None else "")
        raise refused(f"The {name} extension needs a whole number {bounds}",
                      "Subscription.channel.extension")
    return value


def read_spec(subscription: dict[str, Any], settings: Settings) -> Spec:
    """The Subscription's delivery settings; `refused` (422) says what is not supported."""
    channel = subscription.get("channel") or {}
    kind = channel.get("type")
    if kind not in CHANNELS:
        raise refused(f"Channel type {kind!r} is not supported: use "
                      f"{' or '.join(CHANNELS)}", "Subscription.channel.type")
    payload = channel.get("payload")
    content_ext = _extension(channel.get("_payload"), PAYLOAD)
    content = content_ext.get("valueCode") if content_ext else ("id-only" if payload else "empty")
    if content not in CONTENTS:
        raise refused(f"Payload content {content!r} is not supported: use one of "
                      f"{', '.join(CONTENTS)}", "Subscription.channel.payload")
    if payload is not None and payload.split(";")[0].strip() not in MEDIA:
        raise refused(f"Payload type {payload!r} is not supported: notifications are "
                      "application/fhir+json", "Subscription.channel.payload")
    endpoint = channel.get("endpoint")
    if kind == "rest-hook":
        check_endpoint(endpoint, settings)
    headers = tuple(_header(raw, n) for n, raw in enumerate(channel.get("header", [])))
    if len(headers) > MAX_HEADERS:
        raise refused(f"At most {MAX_HEADERS} headers", "Subscription.channel.header")
    timeout = _int_extension(channel, TIMEOUT, "backport-timeout", 1, MAX_TIMEOUT)
    return Spec(
        id=subscription.get("id", ""), topic=subscription.get("criteria", ""),
        filters=_filters(subscription), channel=kind, endpoint=endpoint, headers=headers,
        content=content,
        heartbeat=_int_extension(channel, HEARTBEAT, "backport-heartbeat-period", 1),
        timeout=float(timeout or settings.subscription_timeout_seconds),
        max_count=_int_extension(channel, MAX_COUNT, "backport-max-count", 1, 1000)
        or settings.subscription_max_count,
        end=_end(subscription.get("end")))


def _end(raw: Any) -> int | None:
    if raw is None:
        return None
    span = date_range(str(raw))
    if span is None:
        raise refused(f"end {raw!r} is not an instant", "Subscription.end")
    return span[0]


def _filters(subscription: dict[str, Any]) -> dict[str, tuple[tuple[str, str], ...]]:
    filters: dict[str, list[tuple[str, str]]] = {}
    for ext in (subscription.get("_criteria") or {}).get("extension", []):
        if not isinstance(ext, dict) or ext.get("url") != FILTER:
            continue
        raw = ext.get("valueString")
        resource_type, mark, query = str(raw or "").partition("?")
        if not mark or not resource_type:
            raise refused(f"Filter {raw!r} must read Type?param=value (e.g. "
                          "Task?owner=Organization/acme)", "Subscription.criteria.extension")
        filters.setdefault(resource_type, []).extend(parse_qsl(query, keep_blank_values=True))
    return {k: tuple(v) for k, v in filters.items()}


def check_against(spec: Spec, topic: Topic) -> None:
    """Each filter must be one the topic offers (`canFilterBy`)."""
    for resource_type, pairs in spec.filters.items():
        allowed = topic.filters.get(resource_type, frozenset())
        for name, _ in pairs:
            if name.split(":")[0] not in allowed:
                offered = ", ".join(f"{t}?{p}" for t, ps in sorted(topic.filters.items())
                                    for p in sorted(ps)) or "none"
                raise refused(f"Topic {topic.url} cannot filter {resource_type} by "
                              f"{name!r} (it offers: {offered})",
                              "Subscription.criteria.extension")
        try:
            check_criteria(resource_type, pairs, "Subscription.criteria.extension")
        except TopicError as exc:
            raise refused(exc.diagnostics, "Subscription.criteria.extension") from exc


def _header(raw: Any, n: int) -> tuple[str, str]:
    name, colon, value = str(raw).partition(":")
    if not colon or not name.strip() or any(c in str(raw) for c in "\r\n") or (
            not name.strip().replace("-", "").isalnum()):
        raise refused(f"Header {n + 1} must read 'Name: value' on one line",
                      f"Subscription.channel.header[{n}]")
    return name.strip(), value.strip()


def check_endpoint(endpoint: Any, settings: Settings) -> None:
    """A rest-hook endpoint must be http(s) on a host of ATM_SUBSCRIPTION_ALLOWED_HOSTS:
    a Subscription must not make the server call into networks it can reach and the
    subscriber cannot (server-side request forgery)."""
    where = "Subscription.channel.endpoint"
    parts = urlsplit(str(endpoint or ""))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise refused("A rest-hook channel needs an http(s) endpoint URL", where)
    if parts.username or parts.password:
        raise refused("Put credentials in channel.header, not in the endpoint URL", where)
    if not host_allowed(parts.hostname, parts.port, settings.subscription_allowed_hosts):
        allowed = ", ".join(settings.subscription_allowed_hosts) or "none yet"
        raise refused(f"Notifications may not be sent to {parts.hostname}: it is not one "
                      f"of ATM_SUBSCRIPTION_ALLOWED_HOSTS ({allowed})", where)


def host_allowed(host: str, port: int | None, allowed: list[str]) -> bool:
    """`host`, `host:port`, `*.domain` and IP networks (`10.0.0.0/8`) are allowed forms."""
    host = host.lower().strip("[]")
    for entry in allowed:
        pattern, _, pattern_port = entry.lower().rpartition(":") if (
            entry.count(":") == 1) else (entry.lower(), "", "")
        if pattern_port and str(port) != pattern_port:
            continue
        if "/" in pattern and _in_network(host, pattern):
            return True
        if fnmatch.fnmatchcase(host, pattern.strip("[]")):
            return True
    return False


def _in_network(host: str, network: str) -> bool:
    try:
        return ipaddress.ip_address(host) in ipaddress.ip_network(network, strict=False)
    except ValueError:
        return False


def refused(message: str, where: str) -> UnprocessableError:
    return UnprocessableError(message, issues=[Issue("processing", message,
                                                     expression=(where,))])
