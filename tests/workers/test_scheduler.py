"""The scheduler's duties against real Postgres and Redis: outbox sweep and retention."""

import json
import os
import subprocess
import sys
from decimal import Decimal

import pytest

from refunds import db as dbmod
from refunds.settings import Settings
from tests.producers.test_producers import request
from producers import enqueue_refund
from tests.helpers import paid

REDIS_DB = 9  # this module's own Redis database (tests/conftest.py ``queue``)


def queued_ids(client) -> list[str]:
    return [json.loads(raw)["args"][0] for raw in client.hgetall("dramatiq:refunds.msgs").values()]


async def test_outbox_sweep_redelivers_only_refunds_redis_lost(db, database_url, make_merchant, queue):
    from workers.scheduler import sweep_once

    await make_merchant("m1")
    await paid(db)
    stranded = (await enqueue_refund(db, **request(external_ref="OLD"))).refund
    fresh = (await enqueue_refund(db, **request(external_ref="NEW"))).refund
    queue.flushdb()  # Redis lost everything
    await db.execute("UPDATE refunds SET created_at = now() - interval '1 minute' WHERE refund_id = $1",
                     stranded.refund_id)
    pool = await dbmod.create_pool(database_url, max_size=2)
    try:
        assert await sweep_once(pool, grace_seconds=30) == 1
        assert queued_ids(queue) == [str(stranded.refund_id)]
        assert await sweep_once(pool, grace_seconds=30) == 0  # handed over again: not twice in a row
    finally:
        await pool.close()
    assert fresh.state == "queued"



async def test_outbox_sweep_leaves_refunds_waiting_behind_an_older_queued_message(db, database_url, make_merchant,
                                                                                  queue):
    """A backlog is not a loss: a refund handed over after the head of the ready queue is waiting, not lost."""
    import time

    import dramatiq
    from refunds.delivery import QUEUE, SEND_REFUND, producer_broker
    from workers.scheduler import sweep_once

    await make_merchant("m1")
    await paid(db)
    waiting = (await enqueue_refund(db, **request(external_ref="BEHIND"))).refund
    await db.execute("UPDATE refunds SET created_at = now() - interval '1 minute', delivered_at = NULL"
                     " WHERE refund_id = $1", waiting.refund_id)
    queue.flushdb()
    head = dramatiq.Message(queue_name=QUEUE, actor_name=SEND_REFUND, args=("00000000-0000-0000-0000-000000000000",),
                            kwargs={}, options={}, message_timestamp=int((time.time() - 120) * 1000))
    producer_broker().enqueue(head)  # queued two minutes ago and still not taken: a backlog
    pool = await dbmod.create_pool(database_url, max_size=2)
    try:
        assert await sweep_once(pool, grace_seconds=30) == 0
        queue.flushdb()  # the queue drained (or Redis lost it): now the refund is stranded
        assert await sweep_once(pool, grace_seconds=30) == 1
        assert queued_ids(queue) == [str(waiting.refund_id)]
    finally:
        await pool.close()

async def test_retention_purges_old_dedup_rows_and_keeps_audit_for_its_window(db, database_url, make_merchant, queue):
    from workers.scheduler import purge_expired

    await make_merchant("m1")
    await paid(db)
    refund = (await enqueue_refund(db, **request())).refund
    for number, age in (("old", 60), ("recent", 10)):
        await db.execute(
            """INSERT INTO notifications (merchant_id, operation_number, event_type, result, body, received_at)
               VALUES ('m1', $1, 'cip.paid', 'applied', '{}'::jsonb, now() - make_interval(days => $2))""",
            number, age)
    await db.execute("UPDATE refund_events SET occurred_at = now() - interval '300 days'")
    pool = await dbmod.create_pool(database_url, max_size=2)
    try:
        await purge_expired(pool, Settings(notification_retention_days=45, audit_retention_days=400))
    finally:
        await pool.close()
    assert [r["operation_number"] for r in await db.fetch("SELECT operation_number FROM notifications")] == ["recent"]
    assert await db.fetchval("SELECT count(*) FROM refund_events WHERE refund_id = $1", refund.refund_id) == 1
    assert (await db.fetchval("SELECT amount FROM refunds")) == Decimal("10.00")


@pytest.mark.slow
@pytest.mark.parametrize("name, value", [("AUDIT_RETENTION_DAYS", "100"), ("NOTIFICATION_RETENTION_DAYS", "7")])
def test_retention_below_the_rules_stops_the_scheduler_with_one_line(name, value):
    run = subprocess.run([sys.executable, "-m", "workers.scheduler"], env={**os.environ, name: value},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert name in run.stderr and len(run.stderr.strip().splitlines()) == 1
