"""Webhooks to calling services: endpoints, their sealed secrets, and the deliveries' ledger.

Events are written by the database itself, in the transaction of the state move that causes
them (``refund_events_to_webhooks`` in schema.sql), for every enabled endpoint subscribed to
that merchant and event type. The scheduler hands due deliveries to the workers
(``due_deliveries``), at most ``per_endpoint`` at a time for one endpoint, so a slow or dead
endpoint never holds the others; the worker sends one (``workers.webhooks``) and records the
attempt (``record_attempt``): delivered on a 2xx, else retried with exponential backoff and
jitter until ``RETRY_HORIZON`` has passed since the event, then failed.

Signatures follow the Standard Webhooks specification (docs/WEBHOOKS.md): ``webhook-id``,
``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``
under the secret ``whsec_<base64 key>``; during a rotation's overlap both secrets sign.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import random
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import asyncpg

from .errors import NotFound, RefundRefused
from .vault import Vault

EVENT_TYPES = ("refund.accepted", "refund.pending", "refund.succeeded", "refund.failed", "refund.rejected",
               "refund.manual_review")
RETRY_HORIZON = timedelta(days=3)
FIRST_RETRY_SECONDS = 5.0
MAX_RETRY_SECONDS = 6 * 3600.0
LEASE_SECONDS = 60  # by default, a delivery handed to a worker goes again if nothing is recorded by then
SECRET_PREFIX = "whsec_"


def sealed_identity(endpoint_id: uuid.UUID, what: str) -> str:
    """What a sealed value of this endpoint is bound to (the vault's associated data), so a value
    copied to another endpoint or field does not open; refunds.rekey re-wraps by it."""
    return f"webhook:{endpoint_id}:{what}"


@dataclass(frozen=True)
class Endpoint:
    endpoint_id: uuid.UUID
    name: str
    url: str
    merchants: list[str]
    event_types: list[str]
    created_at: datetime
    disabled_at: datetime | None
    secret_sealed: bytes = field(repr=False)
    previous_secret_sealed: bytes | None = field(default=None, repr=False)
    previous_secret_valid_until: datetime | None = None
    owner: str | None = None  # the intake token (its name) that created it; None: an operator's (refundctl)

    @classmethod
    def from_row(cls, row) -> Endpoint:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})

    def secrets(self, vault: Vault, now: datetime | None = None) -> list[str]:
        """The secrets that sign now: the current one, and the previous one until its overlap ends."""
        current = [vault.open(self.secret_sealed, sealed_identity(self.endpoint_id, "secret")).decode()]
        now = now or datetime.now(timezone.utc)
        if self.previous_secret_sealed and self.previous_secret_valid_until and now < self.previous_secret_valid_until:
            current.append(vault.open(self.previous_secret_sealed, sealed_identity(self.endpoint_id, "previous_secret")).decode())
        return current

    def to_json(self) -> dict:
        return {"endpoint_id": str(self.endpoint_id), "name": self.name, "url": self.url,
                "merchants": list(self.merchants), "event_types": list(self.event_types),
                "created_at": self.created_at.isoformat(),
                "disabled_at": self.disabled_at.isoformat() if self.disabled_at else None,
                "previous_secret_valid_until": (self.previous_secret_valid_until.isoformat()
                                                if self.previous_secret_valid_until else None)}


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<signature>`` of one secret (Standard Webhooks)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets_: list[str], message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one ``v1,...`` per secret, space-separated."""
    return " ".join(sign(secret, message_id, timestamp, body) for secret in secrets_)


def check_url(url: str, *, allowed_networks: tuple = ()) -> str:
    """An http(s) URL whose literal address (if it names one) is public or allowed; RefundRefused otherwise.
    A host name is checked again when it is resolved, at each delivery (``destination_allowed``)."""
    try:
        parts = urlsplit(url)  # raises for a malformed host ("http://[::1"); the request models refuse it first
    except ValueError:
        raise RefundRefused("invalid_url", "url must be an http(s) URL with a host", "url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RefundRefused("invalid_url", "url must be an http(s) URL with a host", "url")
    try:
        address = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return url
    if not destination_allowed(address, allowed_networks):
        raise RefundRefused("url_not_allowed", f"{parts.hostname} is a loopback, link-local or private address"
                            " (allow it with WEBHOOK_ALLOWED_NETWORKS)", "url")
    return url


def destination_allowed(address, allowed_networks: tuple = ()) -> bool:
    """Public addresses, and those inside an allowed network: no loopback, link-local, private,
    multicast or unspecified target unless configured (an SSRF guard)."""
    address = ipaddress.ip_address(address)
    if any(address in network for network in allowed_networks):
        return True
    return address.is_global and not address.is_multicast


def parse_networks(text: str) -> tuple:
    """``WEBHOOK_ALLOWED_NETWORKS``: CIDRs separated by commas (e.g. ``127.0.0.1/32,10.0.0.0/8``)."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())


def retry_delay(attempts: int) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: exponential from 5 s to at
    most 6 h, jittered within its upper half (endpoints that failed together do not come back together)."""
    ceiling = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** max(0, attempts - 1))
    return random.uniform(ceiling / 2, ceiling)


# --- endpoints -----------------------------------------------------------------------------------

def _checked_events(event_types: list[str]) -> list[str]:
    unknown = sorted(set(event_types) - set(EVENT_TYPES))
    if unknown or not event_types:
        raise RefundRefused("invalid_event_types", f"event types must be among {', '.join(EVENT_TYPES)}"
                            + (f"; unknown: {', '.join(unknown)}" if unknown else ""), "event_types")
    return list(dict.fromkeys(event_types))


async def add_endpoint(conn: asyncpg.Connection, vault: Vault, *, name: str, url: str, merchants: list[str],
                       event_types: list[str], allowed_networks: tuple = (),
                       owner: str | None = None) -> tuple[Endpoint, str]:
    """A new endpoint and its secret (shown once: only its sealed form is kept). ``owner``: the name of
    the intake token that asks, the only caller that manages it through the intake; None for an
    operator's endpoint (refundctl), which the intake never shows."""
    check_url(url, allowed_networks=allowed_networks)
    types = _checked_events(event_types)
    if not merchants:
        raise RefundRefused("missing_field", "an endpoint receives the events of at least one merchant", "merchants")
    known = {r["merchant_id"] for r in await conn.fetch(
        "SELECT merchant_id FROM merchants WHERE merchant_id = ANY($1::text[])", merchants)}
    if missing := sorted(set(merchants) - known):
        raise NotFound(f"no merchant {', '.join(missing)}")
    endpoint_id, secret = uuid.uuid4(), new_secret()
    row = await conn.fetchrow(
        """INSERT INTO webhook_endpoints (endpoint_id, name, url, merchants, event_types, secret_sealed, owner)
           VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *""",
        endpoint_id, name, url, sorted(set(merchants)), types,
        vault.seal(secret.encode(), sealed_identity(endpoint_id, "secret")), owner)
    return Endpoint.from_row(row), secret


async def get_endpoint(conn: asyncpg.Connection, endpoint_id: uuid.UUID) -> Endpoint:
    row = await conn.fetchrow("SELECT * FROM webhook_endpoints WHERE endpoint_id = $1", endpoint_id)
    if row is None:
        raise NotFound(f"no webhook endpoint {endpoint_id}")
    return Endpoint.from_row(row)


async def list_endpoints(conn: asyncpg.Connection, *, owner: str | None = None) -> list[Endpoint]:
    """Every endpoint (refundctl), or only those ``owner`` created through the intake."""
    return [Endpoint.from_row(r) for r in await conn.fetch(
        "SELECT * FROM webhook_endpoints WHERE $1::text IS NULL OR owner = $1 ORDER BY created_at", owner)]


async def disable_endpoint(conn: asyncpg.Connection, endpoint_id: uuid.UUID) -> Endpoint:
    """No new events for it; deliveries not yet made are failed (their events stay, for a replay)."""
    async with conn.transaction():
        row = await conn.fetchrow(
            """UPDATE webhook_endpoints SET disabled_at = COALESCE(disabled_at, now())
               WHERE endpoint_id = $1 RETURNING *""", endpoint_id)
        if row is None:
            raise NotFound(f"no webhook endpoint {endpoint_id}")
        await conn.execute(
            """UPDATE webhook_deliveries SET state = 'failed', last_error = 'endpoint disabled', lease_until = NULL
               WHERE endpoint_id = $1 AND state IN ('pending', 'sending')""", endpoint_id)
    return Endpoint.from_row(row)


async def rotate_secret(conn: asyncpg.Connection, vault: Vault, endpoint_id: uuid.UUID, *,
                        overlap: timedelta) -> tuple[Endpoint, str]:
    """A new secret (shown once); the old one keeps signing beside it for ``overlap``."""
    endpoint = await get_endpoint(conn, endpoint_id)
    current = vault.open(endpoint.secret_sealed, sealed_identity(endpoint_id, "secret"))
    secret = new_secret()
    row = await conn.fetchrow(
        """UPDATE webhook_endpoints SET secret_sealed = $2, previous_secret_sealed = $3,
                  previous_secret_valid_until = now() + make_interval(secs => $4)
           WHERE endpoint_id = $1 RETURNING *""",
        endpoint_id, vault.seal(secret.encode(), sealed_identity(endpoint_id, "secret")),
        vault.seal(current, sealed_identity(endpoint_id, "previous_secret")), overlap.total_seconds())
    return Endpoint.from_row(row), secret


# --- deliveries ----------------------------------------------------------------------------------

# Deliveries made due are announced here (the outbox trigger in schema.sql, a replay): the
# scheduler LISTENs and hands them to the workers at once instead of at its next pass.
NOTIFY_CHANNEL = "webhook_deliveries"


async def due_deliveries(conn: asyncpg.Connection, *, per_endpoint: int, limit: int,
                         lease_seconds: float = LEASE_SECONDS) -> list[tuple[str, uuid.UUID]]:
    """Lease the deliveries due now, at most ``per_endpoint`` in flight for one endpoint: the
    (event_id, endpoint_id) pairs to hand to the workers. A lease that ran out (its worker died,
    its message was lost) makes the delivery due again."""
    rows = await conn.fetch(
        """WITH busy AS (
               SELECT endpoint_id, count(*) AS sending FROM webhook_deliveries
               WHERE state = 'sending' AND lease_until > now() GROUP BY endpoint_id),
           due AS (
               SELECT event_id, endpoint_id,
                      row_number() OVER (PARTITION BY endpoint_id ORDER BY next_attempt_at, event_id) AS rank
               FROM webhook_deliveries
               WHERE (state = 'pending' OR (state = 'sending' AND lease_until <= now()))
                 AND next_attempt_at <= now()),
           chosen AS (
               SELECT due.event_id, due.endpoint_id FROM due LEFT JOIN busy USING (endpoint_id)
               WHERE due.rank <= $1 - COALESCE(busy.sending, 0)
               ORDER BY due.rank LIMIT $2)
           UPDATE webhook_deliveries d SET state = 'sending', lease_until = now() + make_interval(secs => $3)
           FROM chosen
           WHERE d.event_id = chosen.event_id AND d.endpoint_id = chosen.endpoint_id
             AND (d.state = 'pending' OR d.lease_until <= now())
           RETURNING d.event_id, d.endpoint_id""",
        per_endpoint, limit, lease_seconds)
    return [(row["event_id"], row["endpoint_id"]) for row in rows]


async def next_due(conn: asyncpg.Connection, endpoint_id: uuid.UUID, *,
                   lease_seconds: float = LEASE_SECONDS) -> str | None:
    """Lease the endpoint's next due delivery for the worker that just delivered one to it (its
    slot of the endpoint's cap passes on): the event id, or None when none is due."""
    return await conn.fetchval(
        """UPDATE webhook_deliveries d SET state = 'sending', lease_until = now() + make_interval(secs => $2)
           WHERE (d.event_id, d.endpoint_id) = (
               SELECT event_id, endpoint_id FROM webhook_deliveries
               WHERE endpoint_id = $1 AND state = 'pending' AND next_attempt_at <= now()
               ORDER BY next_attempt_at, event_id LIMIT 1 FOR UPDATE SKIP LOCKED)
           RETURNING d.event_id""", endpoint_id, lease_seconds)


@dataclass(frozen=True)
class Outgoing:
    """What a worker needs to send one delivery."""

    event_id: str
    endpoint: Endpoint
    body: bytes
    occurred_at: datetime
    attempts: int


async def outgoing(conn: asyncpg.Connection, event_id: str, endpoint_id: uuid.UUID) -> Outgoing | None:
    """The leased delivery's request, or None when it is no longer this worker's to send."""
    row = await conn.fetchrow(
        """SELECT e.event_type, e.data, e.occurred_at, d.attempts, d.state, w.*
           FROM webhook_deliveries d JOIN webhook_events e USING (event_id)
           JOIN webhook_endpoints w ON w.endpoint_id = d.endpoint_id
           WHERE d.event_id = $1 AND d.endpoint_id = $2""", event_id, endpoint_id)
    if row is None or row["state"] != "sending" or row["disabled_at"] is not None:
        return None
    data = json.loads(row["data"]) if isinstance(row["data"], str) else row["data"]
    body = json.dumps({"id": event_id, "type": row["event_type"], "timestamp": row["occurred_at"].isoformat(),
                       "data": data}, separators=(",", ":")).encode()
    return Outgoing(event_id, Endpoint.from_row(row), body, row["occurred_at"], row["attempts"])


async def record_attempt(conn: asyncpg.Connection, delivery: Outgoing, *, status: int | None, error: str | None,
                         latency_ms: int) -> str:
    """Record one attempt and what follows: delivered (2xx), pending again later, or failed past
    the retry horizon. Returns the delivery's new state."""
    attempt = delivery.attempts + 1
    if status is not None and 200 <= status < 300:
        state, next_at = "delivered", None
    elif datetime.now(timezone.utc) - delivery.occurred_at >= RETRY_HORIZON:
        state, next_at = "failed", None
    else:
        state, next_at = "pending", retry_delay(attempt)
    async with conn.transaction():
        await conn.execute(
            """INSERT INTO webhook_attempts (event_id, endpoint_id, attempt, status, error, latency_ms)
               VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING""",
            delivery.event_id, delivery.endpoint.endpoint_id, attempt, status, error, latency_ms)
        await conn.execute(
            """UPDATE webhook_deliveries SET state = $3, attempts = $4, last_status = $5, last_error = $6,
                      lease_until = NULL, delivered_at = CASE WHEN $3 = 'delivered' THEN now() END,
                      next_attempt_at = CASE WHEN $7::float8 IS NULL THEN next_attempt_at
                                             ELSE now() + make_interval(secs => $7::float8) END
               WHERE event_id = $1 AND endpoint_id = $2 AND state = 'sending'""",
            delivery.event_id, delivery.endpoint.endpoint_id, state, attempt, status, error, next_at)
    return state


async def replay(conn: asyncpg.Connection, *, event_id: str | None = None, since: datetime | None = None,
                 until: datetime | None = None, endpoint_id: uuid.UUID | None = None) -> int:
    """Deliver events again (one, or those of a time range) to their endpoints (or one): their
    deliveries become due now, with the same event ids, so receivers can deduplicate."""
    rows = await conn.fetch(
        """UPDATE webhook_deliveries d SET state = 'pending', next_attempt_at = now(), lease_until = NULL
           FROM webhook_events e, webhook_endpoints w
           WHERE e.event_id = d.event_id AND w.endpoint_id = d.endpoint_id AND w.disabled_at IS NULL
             AND ($1::text IS NULL OR d.event_id = $1)
             AND ($2::timestamptz IS NULL OR e.occurred_at >= $2) AND ($3::timestamptz IS NULL OR e.occurred_at < $3)
             AND ($4::uuid IS NULL OR d.endpoint_id = $4)
             AND d.state <> 'sending'
           RETURNING d.event_id""", event_id, since, until, endpoint_id)
    if rows:
        await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
    return len(rows)


async def list_deliveries(conn: asyncpg.Connection, *, endpoint_id: uuid.UUID | None = None,
                          state: str | None = None, limit: int = 100) -> list[dict]:
    rows = await conn.fetch(
        """SELECT d.event_id, d.endpoint_id, e.event_type, e.refund_id, d.state, d.attempts, d.last_status,
                  d.last_error, d.next_attempt_at, d.delivered_at, e.occurred_at
           FROM webhook_deliveries d JOIN webhook_events e USING (event_id)
           WHERE ($1::uuid IS NULL OR d.endpoint_id = $1) AND ($2::text IS NULL OR d.state = $2)
           ORDER BY e.occurred_at DESC, d.event_id LIMIT $3""", endpoint_id, state, limit)
    return [{key: (value.isoformat() if isinstance(value, datetime) else
                   str(value) if isinstance(value, uuid.UUID) else value) for key, value in row.items()}
            for row in rows]
