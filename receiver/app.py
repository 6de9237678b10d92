"""The notify_url service: HTTP in front of ``events``.

Order of checks on a notification, cheapest and least trusting first: source address (403,
only with an allow list, see ``sources``) → path → declared size → merchant (404) → body
read with a hard cap (413) → HMAC signature over the raw bytes (401) → JSON (400) → stored
and applied atomically (200; ``events``, ``batch``). Nothing from the body, including its
event type, is believed before the signature is checked. When the database is not there, a
verified notification is written to the local journal and answered 200 (``journal``:
PagoEfectivo tries only twice), and replayed through the same parse and store once Postgres
is back; 503 only when the journal cannot take it (or without a journal, or when the
merchant's secret cannot be read). Nothing a sender can send yields a 500.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import aiohttp
import asyncpg
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from pagoefectivo.protocol import SIGNATURE_HEADER
from refunds import metrics
from refunds.errors import VaultError
from refunds.http_api import REQUEST_ID, error_answer, error_response, request_ids
from refunds.merchants import NOTIFY_PATH
from refunds.vault import Vault

from . import events
from .batch import PaymentBatcher, RefundOutcomeBatcher
from .credentials import KeyCache
from .journal import Entry, Journal, JournalError, JournalFull, Replayer
from .sources import FORWARDED_FOR, SourcePolicy, refused_total
from refunds.database import Database, Unavailable

log = logging.getLogger("receiver")

MAX_BODY = 64 * 1024
BODY_TIMEOUT = 30.0  # seconds to receive a body of at most MAX_BODY; a stalled sender gets 408
MERCHANT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # as the merchants table's CHECK

DATABASE = web.AppKey("database", Database)
KEYS = web.AppKey("keys", KeyCache)
PAYMENTS = web.AppKey("payments", PaymentBatcher)
REFUND_OUTCOMES = web.AppKey("refund_outcomes", RefundOutcomeBatcher)
SOURCES = web.AppKey("sources", SourcePolicy)
JOURNAL = web.AppKey("journal", Journal)
REPLAYER = web.AppKey("replayer", Replayer)


def create_app(*, database_url: str, vault: Vault, key_ttl: float = 60.0, sources: SourcePolicy | None = None,
               keys: KeyCache | None = None, journal: Journal | None = None) -> web.Application:
    """The receiver application; its Postgres pool is made on start (or first use), never here.

    ``sources`` restricts who may deliver (default: anyone); ``keys`` replaces the merchant
    secrets read from the database (tests); ``journal`` (opened) takes verified notifications
    while Postgres cannot, and is replayed from start to cleanup (without one: 503).
    """
    app = web.Application(client_max_size=MAX_BODY, middlewares=[request_ids])
    database = Database(database_url)
    app[DATABASE] = database
    app[PAYMENTS] = PaymentBatcher(database)
    app[REFUND_OUTCOMES] = RefundOutcomeBatcher(database)
    app[KEYS] = keys or KeyCache.from_database(database, vault, ttl=key_ttl)
    app[SOURCES] = sources or SourcePolicy()
    if journal is not None:
        app[JOURNAL] = journal
        app[REPLAYER] = Replayer(journal, lambda entry: replay(app, entry))
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    app.router.add_post(NOTIFY_PATH, notification, expect_handler=expect_continue)
    app.router.add_get("/healthz", healthz, expect_handler=expect_continue)
    app.router.add_get("/readyz", readyz, expect_handler=expect_continue)
    # everything else (/metrics too: it is on RECEIVER_METRICS_PORT only), so that no request
    # reaches aiohttp's own routes and their expect handler
    app.router.add_route("*", "/{path:.*}", not_found, expect_handler=expect_continue)
    return app


async def not_found(request: web.Request) -> web.Response:
    return error_response(request, "not_found", "no such path")


async def expect_continue(request: web.Request) -> None:
    """``Expect: 100-continue`` as aiohttp does it; any other expectation is 417.

    aiohttp's own handler echoes the header into its 417 text and fails with a 500 when the
    value is not valid UTF-8 (found by tests/receiver/test_receiver_fuzz.py).
    """
    expect = request.headers.get("Expect", "")
    if request.version != aiohttp.HttpVersion11:
        return
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text="unsupported Expect header")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0


async def _start(app: web.Application) -> None:
    metrics.initialise_receiver_series(events.KNOWN_EVENTS)
    await app[DATABASE].start()
    await _initialise_merchant_series(app[DATABASE])
    if REPLAYER in app:
        app[REPLAYER].start()


async def _initialise_merchant_series(database: Database) -> None:
    """Known merchants' completion series at 0, as the workers start theirs, so that increase()
    counts a merchant's first completion settled by a notification; their contradiction series too,
    so that the first one pages. Metrics only: a receiver whose Postgres is away at start serves
    without them (a merchant's completions then start at its first completion, its contradictions
    at its first notification here: ``events``)."""
    try:
        async with database.connection() as conn:
            await metrics.initialise_known_merchants(conn, contradictions=events.CONTRADICTIONS)
    except (Unavailable, asyncpg.PostgresError) as exc:
        log.warning("merchant metric series not initialised: %s", exc)


async def _stop(app: web.Application) -> None:
    if REPLAYER in app:
        await app[REPLAYER].stop()
    await app[DATABASE].close()


# --- notifications ------------------------------------------------------------------------

@dataclass
class Delivery:
    """What one request did: the metric labels and the log line are made from it."""

    merchant: str
    status: int = 500
    event_type: str = "unknown"        # metric label: unknown until the signature is checked
    result: str | None = None          # metric result; None: not counted
    operation_number: str | None = None
    raw_event_type: str | None = None
    stored: str | None = None          # notifications.result
    detail: str | None = None
    source: str | None = None          # the sender's address, when an allow list asks for it
    journal: str | None = None         # "written": answered from the journal; "replayed": applied from it
    received_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    request_id: str | None = None

    def reply(self, status: int, body: dict, *, result: str | None = None, detail: str | None = None) -> web.Response:
        self.status, self.result = status, result
        if detail:
            self.detail = detail
        return web.json_response(body, status=status)

    def refuse(self, code: str, message: str, *, result: str | None = None, detail: str | None = None) -> web.Response:
        """An error answer in the body every service of ours uses, with its code's status (``refunds.http_api``)."""
        status, body = error_answer(code, message, request_id=self.request_id)
        return self.reply(status, body, result=result, detail=detail)


async def notification(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    delivery = Delivery(merchant=request.match_info["merchant_id"][:64], request_id=request.get(REQUEST_ID))
    try:
        return await _receive(request, delivery)
    finally:
        elapsed = time.perf_counter() - started
        metrics.refund_notification_seconds.observe(elapsed)
        if delivery.result is not None:
            metrics.refund_notifications_total.labels(delivery.event_type, delivery.result).inc()
        _log(delivery, elapsed)


async def _receive(request: web.Request, d: Delivery) -> web.StreamResponse:
    sources = request.app[SOURCES]
    if sources.active:
        address = sources.client(request.remote, request.headers.getall(FORWARDED_FOR, ()))
        d.source = str(address) if address is not None else "unknown"
        if not sources.allows(address):
            refused_total.labels("source").inc()
            response = d.refuse("forbidden", "this source may not send notifications", detail="source not allowed")
            response.force_close()  # the body is not read
            return response
    merchant_id = request.match_info["merchant_id"]
    if not MERCHANT_ID.fullmatch(merchant_id):
        return d.refuse("not_found", "no such merchant", result="unknown", detail="no such merchant")
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _too_large(d)

    keys_cache = request.app[KEYS]
    try:
        keys = await keys_cache.get(merchant_id)
    except Unavailable as exc:
        return d.refuse("unavailable", "the notification store is unavailable; retry later", detail=str(exc))
    except VaultError:
        log.error("merchant %s: its secret does not open with this master key", merchant_id)
        return d.refuse("unavailable", "the notification store is unavailable; retry later", detail="merchant secret does not open")
    if keys is None:
        return d.refuse("not_found", "no such merchant", result="unknown", detail="no such merchant")

    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            body = await _read_limited(request, MAX_BODY)
    except TimeoutError:
        return d.refuse("request_timeout", "the body did not arrive in time", result="malformed", detail="body too slow")
    except (OSError, aiohttp.ClientPayloadError, HttpProcessingError):
        return d.refuse("malformed", "the body was not received", result="malformed", detail="body not received")
    if body is None:
        return _too_large(d)

    signature = request.headers.get(SIGNATURE_HEADER)
    if not keys.verifies(body, signature):
        # the secret may have been rotated since it was cached: reload once, then decide
        try:
            fresh = await keys_cache.reload_if_stale(merchant_id)
        except Unavailable as exc:  # cannot tell a rotated secret from a forgery now: the sender retries
            return d.refuse("unavailable", "the notification store is unavailable; retry later", detail=f"secret not reloaded: {exc}")
        except VaultError:
            fresh = None
        if fresh is None or not fresh.verifies(body, signature):
            detail = "no signature" if not signature else "signature does not match"
            return d.refuse("invalid_signature", "PE-Signature does not verify", result="invalid_signature", detail=detail)

    try:
        note = events.parse(body)
    except events.Malformed as exc:
        return _malformed(d, exc)
    d.event_type = events.event_label(note.event_type)
    d.raw_event_type = note.event_type
    d.operation_number = note.operation_number

    journal = request.app.get(JOURNAL)
    if journal is not None and journal.holds(merchant_id):
        # older notifications of this merchant wait in the journal: this one goes behind them
        response = await _journal(journal, d, merchant_id, body, request, "behind older journal entries")
        if response is not None:
            return response
    try:
        return await _apply(request.app, d, merchant_id, note)
    except Unavailable as exc:
        if journal is None:
            return d.refuse("unavailable", "the notification store is unavailable; retry later", detail=str(exc))
        response = await _journal(journal, d, merchant_id, body, request, str(exc))
        return response or d.refuse("unavailable", "the notification store is unavailable; retry later", detail=f"{exc}; {d.detail}")


async def _journal(journal: Journal, d: Delivery, merchant_id: str, body: bytes, request: web.Request,
                   why: str) -> web.Response | None:
    """200 once the verified body is durably in the journal; None when the journal cannot take it."""
    try:
        await journal.append(merchant_id, body, request.headers, d.received_at)
    except JournalError as exc:
        d.detail = f"journal: {exc}"
        if not isinstance(exc, JournalFull):
            log.error("journal cannot take a notification of %s: %s", merchant_id, exc)
        return None
    d.journal = d.stored = "journalled"
    return d.reply(200, {"result": "journalled"}, detail=why)


async def _apply(app: web.Application, d: Delivery, merchant_id: str, note: events.Notification) -> web.Response:
    """Store and apply a verified, parsed notification: live, or replayed from the journal.

    Raises ``Unavailable`` when Postgres cannot take it now.
    """
    try:
        if isinstance(note.event, events.CipPaid):  # most of the traffic: stored together with its neighbours
            outcome = await app[PAYMENTS].store(merchant_id, note)
        elif isinstance(note.event, events.RefundOutcome):  # likewise, with the refunds' moves
            outcome = await app[REFUND_OUTCOMES].store(merchant_id, note)
        else:
            async with app[DATABASE].connection() as conn:
                outcome = await events.store_and_apply(conn, merchant_id, note)
    except events.Malformed as exc:
        return _malformed(d, exc)
    if outcome.completed is not None:
        metrics.observe_completion(outcome.completed, outcome.completed.state)
    d.stored = None if outcome.result == "duplicate" else outcome.result
    return d.reply(200, {"result": outcome.result}, result=outcome.metric_result, detail=outcome.detail)


async def _read_limited(request: web.Request, limit: int) -> bytes | None:
    """The raw body, or None as soon as it passes ``limit`` bytes (the rest is not kept)."""
    received = bytearray()
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return bytes(received)
        received += chunk
        if len(received) > limit:
            return None


async def replay(app: web.Application, entry: Entry) -> int:
    """A journal entry through the live path's parse and store; its status (200, 400, or 503: again later).

    Its signature was verified when it arrived and is not checked again: a secret rotated since
    must not lose it. Counted and logged like a live notification, marked ``journal: replayed``.
    """
    started = time.perf_counter()
    d = Delivery(merchant=entry.merchant_id, journal="replayed", received_at=entry.received_at)
    try:
        try:
            note = events.parse(entry.body)
        except events.Malformed as exc:  # it parsed when it arrived: only a change of this code gets here
            return _malformed(d, exc).status
        d.event_type = events.event_label(note.event_type)
        d.raw_event_type = note.event_type
        d.operation_number = note.operation_number
        try:
            return (await _apply(app, d, entry.merchant_id, note)).status
        except Unavailable as exc:
            d.status, d.detail = 503, str(exc)
            return 503
    finally:
        if d.result is not None:
            metrics.refund_notifications_total.labels(d.event_type, d.result).inc()
        if d.status != 503:  # a replay waiting for Postgres is logged once by the replayer
            _log(d, time.perf_counter() - started)


def _too_large(d: Delivery) -> web.Response:
    response = d.refuse("body_too_large", f"the body is over {MAX_BODY} bytes", result="malformed", detail=f"over {MAX_BODY} bytes")
    response.force_close()  # do not keep a connection whose request body we did not read
    return response


def _malformed(d: Delivery, exc: events.Malformed) -> web.Response:
    if exc.event_type is not None:
        d.event_type = events.event_label(exc.event_type)
        d.raw_event_type = exc.event_type
    return d.refuse("malformed", str(exc), result="malformed", detail=str(exc))


def _log(d: Delivery, elapsed: float) -> None:
    """One line per notification, its facts as fields (refunds.logs writes them as JSON);
    never the body, the signature or a secret."""
    result = d.stored or d.result
    fields = {
        "event": "notification",
        "merchant": d.merchant,
        "operation_number": d.operation_number,
        "event_type": (d.raw_event_type or "")[:64] or None,
        "status": d.status,
        "result": result,
        "detail": d.detail,
        "ms": round(elapsed * 1000, 1),
    }
    if d.source is not None:
        fields["source"] = d.source
    if d.journal is not None:
        fields["journal"] = d.journal
        fields["received_at"] = d.received_at.isoformat()
    level = logging.INFO if d.status < 400 else logging.WARNING
    log.log(level, "notification %s %s %s", d.merchant, d.status, result, extra=fields)


# --- probes -------------------------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready while notifications can be kept: Postgres answers, or the journal has room.

    With a journal a Postgres outage must not take every replica out of the load balancer:
    that would refuse the notifications the journal is there to keep.
    """
    try:
        async with request.app[DATABASE].connection() as conn:
            await conn.fetchval("SELECT 1")
    except Unavailable as exc:
        log.warning("readyz: Postgres unavailable (%s)", exc)
        journal = request.app.get(JOURNAL)
        if journal is not None and journal.bytes + 2 * MAX_BODY <= journal.max_bytes:
            return web.json_response({"status": "journalling", "database": "unavailable"})
        return web.json_response({"status": "unavailable"}, status=503)
    return web.json_response({"status": "ok"})
