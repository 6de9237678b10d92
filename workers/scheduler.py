"""Periodic duties (`python -m workers.scheduler`): the outbox sweep, status polling, gauges.

Postgres is the truth and Redis may lose everything; this loop hands again to Redis
every refund that should be moving but is not.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from datetime import datetime

import asyncpg

from refunds import db, metrics, retention, service, webhooks
from refunds.delivery import QUEUE, deliver, deliver_webhooks, producer_broker
from refunds.settings import get_settings
from refunds.states import STATES

from . import heartbeat
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
    async with pool.acquire() as conn:
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


async def dispatch_webhooks(pool: asyncpg.Pool, settings) -> int:
    """Hand the webhook deliveries due now to the workers (refunds.webhooks leases them);
    returns how many were handed over."""
    async with pool.acquire() as conn:
        due = await webhooks.due_deliveries(conn, per_endpoint=settings.webhook_endpoint_concurrency,
                                            limit=WEBHOOK_BATCH, lease_seconds=settings.webhook_lease_seconds)
    return await asyncio.to_thread(deliver_webhooks, due) if due else 0


GAUGES = metrics.DatabaseGauges()


async def update_gauges(pool: asyncpg.Pool, gauges: metrics.DatabaseGauges = GAUGES) -> None:
    """Read refunds_in_state, the oldest queued and pending refunds' ages and the queue depth for the next scrape."""
    async with pool.acquire() as conn:
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
    async with pool.acquire() as conn:
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
    async with pool.acquire() as conn:
        lost_before = await conn.fetchval("SELECT now()")
    await sweep_once(pool, lost_before=lost_before)


async def pause(stop: asyncio.Event, interval: float) -> None:
    """Until the next pass: ``interval``, or less once the mark is gone from Redis."""
    deadline = time.monotonic() + interval
    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        try:
            await asyncio.wait_for(stop.wait(), min(left, WATCH_SECONDS))
        except asyncio.TimeoutError:
            pass
        if await ask_redis(lambda client: client.exists(REDIS_MARK)) == 0:
            return


async def run(interval: float = 5.0) -> None:
    settings = get_settings()
    pool = await db.create_pool(settings.require("database_url"), max_size=3)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("scheduler running every %.1fs", interval)
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
            await pause(stop, interval)
    finally:
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
