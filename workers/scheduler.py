"""Periodic duties (`python -m workers.scheduler`): the outbox sweep, status polling, gauges.

Postgres is the truth and Redis may lose everything; this loop hands again to Redis
every refund that should be moving but is not. Webhook deliveries are handed over on each
pass too, and between passes as soon as Postgres says some were written (``listen``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from datetime import datetime
from uuid import UUID

import asyncpg

from refunds import db, heartbeat, metrics, retention, service, webhooks
from refunds.delivery import QUEUE, deliver, deliver_webhooks, producer_broker
from refunds.settings import get_settings
from refunds.states import STATES

from . import metrics as worker_metrics

log = logging.getLogger("workers.scheduler")

OUTBOX_GRACE_SECONDS = 30
RETENTION_INTERVAL_SECONDS = 3600
SWEEP_BATCH = 500
WEBHOOK_BATCH = 500
# A key the scheduler keeps in Redis: gone, Redis lost its data (FLUSHALL, a restart without
# it), and with it every delivery; looked for every WATCH_SECONDS, between passes too.
REDIS_MARK = "refunds:scheduler:mark"
WATCH_SECONDS = 1.0
# The channel the webhook outbox trigger notifies (refunds/schema.sql) once it wrote deliveries.
# A notification is handed over WEBHOOK_COALESCE_SECONDS after it came, with the rest of its
# burst, in one ``dispatch_webhooks``; hand-overs are spaced up to WEBHOOK_BUSY_SECONDS apart
# when leasing is slow (see ``Handover``). The listening connection is checked every LISTEN_CHECK_SECONDS (a
# connection lost without a word, as a network partition leaves it) and opened again after a
# loss within LISTEN_RETRY_SECONDS, doubling up to LISTEN_RETRY_MAX_SECONDS.
WEBHOOK_CHANNEL = webhooks.NOTIFY_CHANNEL
WEBHOOK_COALESCE_SECONDS = 0.05
WEBHOOK_BUSY_SECONDS = 1.0
WEBHOOK_LEASE_SHARE = 20  # hand-overs are spaced at least this many times what the last lease took
LISTEN_APPLICATION = "workers.scheduler:listen"  # its application_name in pg_stat_activity
LISTEN_CHECK_SECONDS = 30.0
LISTEN_RETRY_SECONDS = 1.0
LISTEN_RETRY_MAX_SECONDS = 10.0


async def sweep_once(pool: asyncpg.Pool, *, grace_seconds: float = OUTBOX_GRACE_SECONDS,
                     lost_before: datetime | None = None) -> int:
    """Re-deliver stranded refunds; returns how many were handed to Redis.

    A refund handed over after the oldest message still waiting in the ready queue may be
    waiting behind it, not lost: under a backlog, re-delivering it would only add messages
    (each costing a lookup, a rate-limit check and a failed claim). So the grace counts from
    that oldest message's time when it is older than now. ``lost_before``: Redis lost all it
    held at that moment, delayed messages too: every refund goes again, in one statement and
    without grace, but those handed over since (a refund delayed since then may go twice:
    harmless, its claim lets one message through).
    """
    try:
        head = None if lost_before else await asyncio.to_thread(
            worker_metrics.oldest_ready_message_at, producer_broker().client, QUEUE)
    except Exception as exc:  # Redis away: deliveries would fail anyway; the grace counts from now
        head = None
        log.debug("ready queue head unavailable: %s", type(exc).__name__)
    async with db.acquire(pool) as conn:
        rows = await conn.fetch(
            """UPDATE refunds SET delivered_at = now()
               WHERE refund_id IN (
                   SELECT refund_id FROM refunds
                   WHERE CASE WHEN $4::timestamptz IS NULL
                              THEN COALESCE(delivered_at, created_at) < LEAST(now(), $3) - make_interval(secs => $1)
                              ELSE COALESCE(delivered_at, created_at) NOT BETWEEN $4 AND now() END
                     AND (state = 'queued'
                          OR (state = 'submitted' AND (claimed_until IS NULL OR claimed_until < now()))
                          OR (state = 'pending' AND next_check_at < now()))
                   ORDER BY created_at LIMIT $2
                   FOR UPDATE SKIP LOCKED)
               RETURNING refund_id""",
            grace_seconds, None if lost_before else SWEEP_BATCH, head, lost_before,
        )
    delivered = 0
    for row in rows:
        if await asyncio.to_thread(deliver, row["refund_id"]):
            delivered += 1
    if rows:
        log.info("outbox sweep re-delivered %d of %d refunds", delivered, len(rows))
    return delivered


async def lease_webhooks(pool: asyncpg.Pool, settings, *, per_endpoint: int | None = None) -> list[tuple[str, UUID]]:
    """Lease the webhook deliveries due now (refunds.webhooks.due_deliveries), up to
    ``per_endpoint`` in flight to an endpoint (default: WEBHOOK_ENDPOINT_CONCURRENCY)."""
    async with db.acquire(pool) as conn:
        return await webhooks.due_deliveries(conn, per_endpoint=per_endpoint or settings.webhook_endpoint_concurrency,
                                             limit=WEBHOOK_BATCH, lease_seconds=settings.webhook_lease_seconds)


async def dispatch_webhooks(pool: asyncpg.Pool, settings) -> int:
    """Hand the webhook deliveries due now to the workers; returns how many were handed over."""
    due = await lease_webhooks(pool, settings)
    return await asyncio.to_thread(deliver_webhooks, due) if due else 0


GAUGES = metrics.DatabaseGauges()


async def update_gauges(pool: asyncpg.Pool, gauges: metrics.DatabaseGauges = GAUGES) -> None:
    """Read refunds_in_state, the oldest queued and pending refunds' ages and the queue depth for the next scrape."""
    async with db.acquire(pool) as conn:
        counts = dict(await conn.fetch("SELECT state, count(*) FROM refunds GROUP BY state"))
        # a pending refund's updated_at is when it became pending: status checks do not touch it
        oldest = await conn.fetchrow(
            """SELECT EXTRACT(EPOCH FROM now() - min(created_at) FILTER (WHERE state = 'queued')) AS queued,
                      EXTRACT(EPOCH FROM now() - min(updated_at) FILTER (WHERE state = 'pending')) AS pending
               FROM refunds WHERE state IN ('queued', 'pending')"""
        )
        # the deliveries not yet made (the due index's rows): delivered and failed ones only grow
        hooks = dict(await conn.fetch(
            "SELECT state, count(*) FROM webhook_deliveries WHERE state IN ('pending', 'sending') GROUP BY state"))
        undelivered = await conn.fetchval(
            """SELECT EXTRACT(EPOCH FROM now() - min(e.occurred_at)) FROM webhook_deliveries d
               JOIN webhook_events e USING (event_id) WHERE d.state IN ('pending', 'sending')""")
    gauges.webhooks = {state: hooks.get(state, 0) for state in ("pending", "sending")}
    gauges.webhook_undelivered_oldest = float(undelivered or 0)
    gauges.in_state = {state: counts.get(state, 0) for state in STATES}
    gauges.outbox_oldest = float(oldest["queued"] or 0)
    gauges.pending_oldest = float(oldest["pending"] or 0)
    try:
        gauges.queue = await asyncio.to_thread(worker_metrics.read_queue_depth, producer_broker().client, QUEUE)
    except Exception as exc:  # Redis may be away; Postgres is the truth and the sweep still runs
        gauges.queue = {}
        log.warning("queue depth unavailable: %s", type(exc).__name__)
    gauges.last_pass = time.time()


async def purge_expired(pool: asyncpg.Pool, settings) -> None:
    """Retention: dedup rows after their window (≥ 30 days), audit rows after theirs (≥ 180 days).

    Small batches, each its own short transaction, so traffic never waits on a long lock.
    """
    async with db.acquire(pool) as conn:
        notifications = await retention.purge_notifications(conn, older_than_days=settings.notification_retention_days)
        events = await retention.purge_audit_events(conn, settings.audit_retention_days)
        hooks = await retention.purge_webhook_events(conn, settings.audit_retention_days)
    if notifications or events or hooks:
        log.info("retention purged %d notification rows, %d audit rows and %d webhook events", notifications, events,
                 hooks)


async def ask_redis(call) -> bool | None:
    """``call(client)`` on the delivery Redis; None when Redis is away."""
    try:
        return await asyncio.to_thread(call, producer_broker().client)
    except Exception as exc:
        log.debug("Redis unavailable: %s", type(exc).__name__)
        return None


async def sweep_lost(pool: asyncpg.Pool) -> None:
    """Redis lost its data: hand over again every refund that was waiting in it."""
    log.warning("Redis lost its data (the scheduler's mark is gone): re-delivering every waiting refund")
    async with db.acquire(pool) as conn:
        lost_before = await conn.fetchval("SELECT now()")
    await sweep_once(pool, lost_before=lost_before)


async def first_set(events: list[asyncio.Event], timeout: float) -> None:
    """Until one of ``events`` is set, or ``timeout`` seconds."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def pause(stop: asyncio.Event, interval: float, handover: Handover | None = None) -> None:
    """Until the next pass: ``interval``, or less once the mark is gone from Redis; meanwhile a
    ``handover`` each time the outbox trigger notifies (its ``wake``)."""
    deadline = time.monotonic() + interval
    watch_at = time.monotonic() + WATCH_SECONDS
    events = [stop] if handover is None else [stop, handover.wake]
    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        await first_set(events, min(left, max(0.0, watch_at - time.monotonic())))
        if handover is not None and handover.wake.is_set() and not stop.is_set():
            await handover(stop)
        if time.monotonic() >= watch_at:
            watch_at = time.monotonic() + WATCH_SECONDS
            if await ask_redis(lambda client: client.exists(REDIS_MARK)) == 0:
                return


class Handover:
    """Webhook deliveries handed over between passes, as the outbox trigger notifies (``wake``).

    It starts one delivery for each endpoint with none in flight: that delivery's worker takes
    the endpoint's next ones in turn (``workers.webhooks.deliver_in_turn``) and the passes fill
    the endpoint's cap. Leasing up to the cap here too would start more turns than the cap
    whenever it ran while a turn was between two deliveries (no longer counted in flight).

    A hand-over first waits WEBHOOK_COALESCE_SECONDS, for the rest of the burst, and at least
    until ``spacing`` has passed since the last one: WEBHOOK_LEASE_SHARE times what that one's
    lease took, up to WEBHOOK_BUSY_SECONDS. ``due_deliveries`` reads every due row (14 ms with
    5,000 pending, 40 ms with 20,000): under a backlog, hand-overs space out so that leasing
    takes about a twentieth of the time at most, while an idle endpoint's event (leasing is
    quick then, or was long ago) goes within WEBHOOK_COALESCE_SECONDS."""

    def __init__(self, pool: asyncpg.Pool, settings) -> None:
        self.pool, self.settings = pool, settings
        self.wake = asyncio.Event()
        self.took = self.spacing = 0.0  # seconds the last lease took; the least time to the next
        self.last = time.monotonic()  # when the last lease ended

    def wait_seconds(self) -> float:
        return max(WEBHOOK_COALESCE_SECONDS, self.last + self.spacing - time.monotonic())

    async def __call__(self, stop: asyncio.Event) -> int:
        await first_set([stop], self.wait_seconds())
        self.wake.clear()
        started = time.monotonic()
        handed = 0
        try:
            due = await lease_webhooks(self.pool, self.settings, per_endpoint=1)
            self.took, self.last = time.monotonic() - started, time.monotonic()
            if due:
                handed = await asyncio.to_thread(deliver_webhooks, due)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self.took, self.last = time.monotonic() - started, time.monotonic()
            log.warning("webhook hand-over failed: %s", exc)
        self.spacing = min(WEBHOOK_BUSY_SECONDS, WEBHOOK_LEASE_SHARE * self.took)
        return handed


def listen_url(settings) -> str | None:
    """Where to LISTEN for written webhook deliveries: DATABASE_URL when it reaches Postgres
    directly; None behind a pooler (DATABASE_POOLER=transaction or prepared), where a session's
    LISTEN would hold a server connection the pooler hands to others, and notifications go astray."""
    return settings.database_url if settings.database_pooler == "none" else None


async def listen(url: str, wake: asyncio.Event, stop: asyncio.Event) -> None:
    """Hold a connection of its own LISTENing on WEBHOOK_CHANNEL and set ``wake`` at each
    notification, until ``stop``. A lost connection (Postgres restarted, the backend
    terminated) is opened again, and ``wake`` set on each opening: deliveries written while
    none listened go then. Never raises: the interval's passes hand deliveries over meanwhile."""
    retry = LISTEN_RETRY_SECONDS
    while not stop.is_set():
        conn = None
        try:
            conn = await db.connect(url)
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
            await conn.execute(f"SET application_name = '{LISTEN_APPLICATION}'")
            await conn.add_listener(WEBHOOK_CHANNEL, lambda *_notification: wake.set())
            log.info("listening for webhook deliveries on channel %s", WEBHOOK_CHANNEL)
            wake.set()
            retry = LISTEN_RETRY_SECONDS
            while not stop.is_set() and not lost.is_set():
                await first_set([stop, lost], LISTEN_CHECK_SECONDS)
                if not stop.is_set() and not lost.is_set():
                    await conn.fetchval("SELECT 1", timeout=10)
            if lost.is_set():
                raise ConnectionError("the listening connection was closed")
        except Exception as exc:  # whatever it was, the scheduler runs on and tries again
            log.warning("webhook listener: %s; listening again in %.0fs (deliveries wait for a pass meanwhile)",
                        str(exc) or type(exc).__name__, retry)
            await first_set([stop], retry)
            retry = min(retry * 2, LISTEN_RETRY_MAX_SECONDS)
        finally:
            if conn is not None and not conn.is_closed():
                conn.terminate()


async def run(interval: float = 5.0) -> None:
    settings = get_settings()
    pool = await db.create_pool(settings.require("database_url"), max_size=3)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("scheduler running every %.1fs", interval)
    url = listen_url(settings)
    handover = Handover(pool, settings) if url else None
    if url is None:
        log.info("webhook deliveries are handed over at each pass only (every %.1fs): DATABASE_POOLER=%s, and "
                 "LISTEN needs a direct connection to Postgres", interval, settings.database_pooler)
    listener = asyncio.create_task(listen(url, handover.wake, stop)) if handover else None
    next_purge = 0.0
    marked = False  # this scheduler's mark was in Redis at a pass
    beats = heartbeat.folder("scheduler")
    try:
        while not stop.is_set():
            heartbeat.beat(beats)  # the liveness probe: a pass that hangs stops the beats
            try:
                # SET NX sets the mark only where it is absent: True then, else None
                absent = await ask_redis(lambda client: bool(client.set(REDIS_MARK, "1", nx=True)))
                if marked and absent:
                    await sweep_lost(pool)
                marked = marked or absent is not None
                await sweep_once(pool, grace_seconds=settings.refund_outbox_grace_seconds)
                await dispatch_webhooks(pool, settings)
                await update_gauges(pool)
                if time.monotonic() >= next_purge:
                    await purge_expired(pool, settings)
                    next_purge = time.monotonic() + RETENTION_INTERVAL_SECONDS
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("scheduler pass failed: %s", exc)
            await pause(stop, interval, handover)
    finally:
        if listener is not None:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        heartbeat.stop(beats)
        await pool.close()


def main() -> int:
    settings = service.load_settings("scheduler", lambda s: (s.require("database_url"), s.require("redis_url")))
    if settings is None:
        return service.USAGE
    try:
        worker_metrics.serve_scheduler_metrics(GAUGES, settings.scheduler_metrics_port)
    except OSError as exc:  # the sweep matters more than its metrics: run on; the target-down alert tells
        log.error("scheduler metrics: cannot listen on port %d (SCHEDULER_METRICS_PORT): %s",
                  settings.scheduler_metrics_port, exc.strerror or exc)
    return service.guarded("scheduler", lambda: asyncio.run(run(settings.scheduler_interval)))


if __name__ == "__main__":
    sys.exit(main())
