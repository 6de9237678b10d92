"""The scheduler's gauges read from Postgres: what the long-pending and outbox alerts watch."""

from prometheus_client import CollectorRegistry, generate_latest

from producers import enqueue_refund
from refunds import db as dbmod
from refunds import metrics
from tests.helpers import paid
from tests.producers.test_producers import request

REDIS_DB = 4  # this module's own Redis database (tests/conftest.py ``queue``)


async def test_gauges_give_the_age_of_the_oldest_queued_and_pending_refunds(db, database_url, make_merchant, queue):
    from workers.scheduler import update_gauges

    await make_merchant("m1")
    await paid(db, amount="500.00")
    queued = (await enqueue_refund(db, **request(external_ref="Q"))).refund
    pending = (await enqueue_refund(db, **request(external_ref="P"))).refund
    await db.execute("UPDATE refunds SET created_at = now() - interval '2 hours' WHERE refund_id = $1", queued.refund_id)
    # pending for 27 hours, accepted 28 hours ago: the age counts from when it became pending
    await db.execute("""UPDATE refunds SET state = 'pending', created_at = now() - interval '28 hours',
                        updated_at = now() - interval '27 hours' WHERE refund_id = $1""", pending.refund_id)
    gauges = metrics.DatabaseGauges()
    pool = await dbmod.create_pool(database_url, max_size=1)
    try:
        await update_gauges(pool, gauges)
        assert 27 * 3600 - 5 < gauges.pending_oldest < 27 * 3600 + 60
        assert 2 * 3600 - 5 < gauges.outbox_oldest < 2 * 3600 + 60
        await db.execute("UPDATE refunds SET state = 'succeeded', completed_at = now()")
        await update_gauges(pool, gauges)
    finally:
        await pool.close()
    assert gauges.pending_oldest == 0 and gauges.outbox_oldest == 0
    registry = CollectorRegistry()
    registry.register(gauges)
    scraped = generate_latest(registry).decode()
    for name in ("refund_pending_oldest_seconds 0.0", "refund_outbox_oldest_seconds 0.0",
                 "refund_scheduler_last_pass_timestamp_seconds"):
        assert name in scraped
