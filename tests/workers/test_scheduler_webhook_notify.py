"""The webhook outbox's immediate hand-over: the trigger notifies, the real scheduler (its own
process, against real Postgres and Redis) LISTENs and hands the deliveries to the workers at
once, not at its next pass; its listening connection, terminated, is opened again."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from producers import enqueue_refund
from refundctl.processes import ServiceGroup, free_port
from refunds import webhooks
from tests.helpers import ROOT, paid
from tests.producers.test_producers import request
from tests.workers.test_scheduler_redis_loss import scheduler_passes
from workers.scheduler import LISTEN_APPLICATION

REDIS_DB = 5  # this module's own Redis database (tests/conftest.py ``queue``)
LONG_INTERVAL = "60"  # no pass between the first and the test's end: only a notification hands over
HANDED_OVER_WITHIN = 5.0  # seconds; a notified hand-over takes a fraction of one
WEBHOOK_MESSAGES = "dramatiq:webhooks.msgs"  # the workers' webhook queue (refunds.delivery)


@pytest.fixture
def scheduler(database_url, module_redis_url, tmp_path):
    """Start ``python -m workers.scheduler`` with ``settings``; stopped after the test."""
    groups = []

    def start(**settings: str):
        port = free_port()
        env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": module_redis_url,
               "SCHEDULER_METRICS_PORT": str(port), "PYTHONPATH": str(ROOT), **settings}
        group = ServiceGroup(env=env, log_dir=tmp_path)
        groups.append(group)
        service = group.start("scheduler", "-m", "workers.scheduler")
        wait_for(lambda: scheduler_passes(port), 30, service)  # its first pass is over
        return service

    yield start
    for group in groups:
        group.stop()


def wait_for(condition, timeout: float, service) -> float:
    """Poll ``condition()`` until true; the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert service.process.poll() is None, service.log_tail()
        assert time.monotonic() - started < timeout, f"not within {timeout:.0f} s:\n{service.log_tail()}"
        time.sleep(0.05)
    return time.monotonic() - started


def log_count(service, text: str) -> int:
    return service.log_path.read_text(errors="replace").count(text)


async def listener_pids(db) -> list[int]:
    return [row["pid"] for row in await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1",
        LISTEN_APPLICATION)]


async def subscribed(db, vault) -> None:
    """An endpoint of m1 for every event (never reached: no worker runs here)."""
    await webhooks.add_endpoint(db, vault, name="checkout", url="http://127.0.0.1:9/hooks", merchants=["m1"],
                                event_types=list(webhooks.EVENT_TYPES),
                                allowed_networks=webhooks.parse_networks("127.0.0.0/8"))


async def handed_over(db, queue, service, external_ref: str) -> float:
    """Accept a refund (its refund.accepted event and delivery written in the same transaction);
    the seconds until the scheduler leased that delivery and queued its message for the workers."""
    refund = (await enqueue_refund(db, **request(external_ref=external_ref))).refund
    [event_id] = [row["event_id"] for row in await db.fetch(
        "SELECT event_id FROM webhook_events WHERE refund_id = $1", refund.refund_id)]
    started = time.monotonic()
    while not any(event_id.encode() in raw for raw in queue.hvals(WEBHOOK_MESSAGES)):
        assert service.process.poll() is None, service.log_tail()
        assert time.monotonic() - started < HANDED_OVER_WITHIN, (
            f"{external_ref}: not handed over within {HANDED_OVER_WITHIN:.0f} s (scheduler every {LONG_INTERVAL} s):\n"
            f"{service.log_tail()}")
        await asyncio.sleep(0.02)
    elapsed = time.monotonic() - started
    assert await db.fetchval("SELECT state FROM webhook_deliveries WHERE event_id = $1", event_id) == "sending"
    # as its worker would (none runs here): delivered, so the endpoint is idle again
    await db.execute("UPDATE webhook_deliveries SET state = 'delivered', lease_until = NULL, delivered_at = now()"
                     " WHERE event_id = $1", event_id)
    return elapsed


@pytest.mark.slow
async def test_an_event_is_handed_over_at_once_and_after_the_listener_is_terminated(
        db, vault, make_merchant, queue, scheduler):
    await make_merchant("m1")
    await paid(db)
    await subscribed(db, vault)
    service = await asyncio.to_thread(scheduler, SCHEDULER_INTERVAL=LONG_INTERVAL)
    await asyncio.to_thread(wait_for, lambda: log_count(service, "listening for webhook deliveries") == 1, 10, service)
    await asyncio.sleep(0.5)  # the pass made when it started listening is over
    assert await handed_over(db, queue, service, "FIRST") < HANDED_OVER_WITHIN

    [listening] = await listener_pids(db)
    assert await db.fetchval("SELECT pg_terminate_backend($1)", listening)
    await asyncio.to_thread(wait_for, lambda: log_count(service, "listening for webhook deliveries") == 2, 15, service)
    [again] = await listener_pids(db)
    assert again != listening
    await asyncio.sleep(0.5)
    assert await handed_over(db, queue, service, "SECOND") < HANDED_OVER_WITHIN
    assert queue.hlen(WEBHOOK_MESSAGES) == 2
    assert service.process.poll() is None


@pytest.mark.slow
async def test_behind_a_transaction_pooler_deliveries_wait_for_the_pass_and_one_line_says_so(
        db, vault, make_merchant, queue, scheduler):
    await make_merchant("m1")
    await paid(db)
    await subscribed(db, vault)
    # DATABASE_POOLER=transaction works against Postgres itself too (no statement cache)
    service = await asyncio.to_thread(scheduler, SCHEDULER_INTERVAL="1", DATABASE_POOLER="transaction")
    assert log_count(service, "handed over at each pass only") == 1
    assert log_count(service, "DATABASE_POOLER=transaction") == 1
    assert await listener_pids(db) == []
    refund = (await enqueue_refund(db, **request(external_ref="POOLED"))).refund
    await asyncio.to_thread(wait_for, lambda: queue.hlen(WEBHOOK_MESSAGES) == 1, 10, service)
    assert await db.fetchval(
        """SELECT d.state FROM webhook_deliveries d JOIN webhook_events e USING (event_id)
           WHERE e.refund_id = $1""", refund.refund_id) == "sending"
    assert await listener_pids(db) == []


@pytest.mark.slow
async def test_a_notified_hand_over_starts_one_delivery_per_idle_endpoint_and_spaces_out_under_a_backlog(
        db, database_url, vault, make_merchant, queue):
    """A notified hand-over starts one delivery for an endpoint with none in flight (its worker
    takes the next ones in turn; the passes fill the endpoint's cap), so it never adds to a busy
    endpoint's deliveries in flight. due_deliveries reads every due row: with a backlog (20,000
    deliveries) the next hand-over waits WEBHOOK_LEASE_SHARE times what the lease took; with
    none, or once that time has passed, the shortest wait."""
    from refunds import db as dbmod
    from refunds.settings import Settings
    from workers.scheduler import (
        WEBHOOK_BUSY_SECONDS,
        WEBHOOK_COALESCE_SECONDS,
        WEBHOOK_LEASE_SHARE,
        Handover,
        dispatch_webhooks,
    )

    await make_merchant("m1")
    await paid(db)
    await subscribed(db, vault)
    pool = await dbmod.create_pool(database_url, max_size=1)
    try:
        handover, stop = Handover(pool, Settings()), asyncio.Event()
        refunds = [(await enqueue_refund(db, **request(external_ref=f"IDLE-{n}"))).refund for n in range(3)]
        handover.wake.set()
        assert await handover(stop) == 1  # three events due for the idle endpoint: one starts
        assert not handover.wake.is_set() and queue.hlen(WEBHOOK_MESSAGES) == 1
        assert handover.spacing == min(WEBHOOK_BUSY_SECONDS, WEBHOOK_LEASE_SHARE * handover.took)
        handover.wake.set()
        assert await handover(stop) == 0  # one in flight: not idle
        assert await dispatch_webhooks(pool, Settings()) == 2  # a pass fills the cap (4)
        assert queue.hlen(WEBHOOK_MESSAGES) == 3

        busy = await db.fetchval("SELECT endpoint_id FROM webhook_endpoints")
        await db.execute(
            """INSERT INTO webhook_events (event_id, refund_id, merchant_id, event_type, data, occurred_at)
               SELECT 'evt_backlog_' || n, $1, 'm1', 'refund.accepted', '{}'::jsonb,
                      now() - make_interval(secs => n / 1000.0) FROM generate_series(1, 20000) n""",
            refunds[0].refund_id)
        await db.execute("""INSERT INTO webhook_deliveries (event_id, endpoint_id, next_attempt_at)
                            SELECT event_id, $1, occurred_at FROM webhook_events WHERE event_id LIKE 'evt_backlog_%'""",
                         busy)
        await db.execute("ANALYZE webhook_deliveries")
        assert await handover(stop) == 0  # its endpoint busy
        assert handover.spacing == min(WEBHOOK_BUSY_SECONDS, WEBHOOK_LEASE_SHARE * handover.took)
        assert handover.wait_seconds() > WEBHOOK_COALESCE_SECONDS, handover.took  # 20,000 rows read: not a few ms
        assert queue.hlen(WEBHOOK_MESSAGES) == 3
        await asyncio.sleep(handover.spacing)  # the backlog's last hand-over was a while ago
        assert handover.wait_seconds() == WEBHOOK_COALESCE_SECONDS
    finally:
        await pool.close()
