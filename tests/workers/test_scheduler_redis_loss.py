"""Redis emptied under a running scheduler: its lost deliveries are handed over again within
seconds, not after the outbox grace (30 s) that protects a mere backlog from duplicates."""

import json
import os
import time
import urllib.request

import pytest

from producers import enqueue_refund
from refundctl.processes import ServiceGroup, free_port
from tests.helpers import ROOT, paid
from tests.producers.test_producers import request

REDIS_DB = 8  # this module's own Redis database (tests/conftest.py ``queue``)


def queued_ids(client) -> list[str]:
    """The refunds of the messages in the queue and its delay queue (a rate-limit slot ahead)."""
    ids = []
    for key in ("dramatiq:refunds.msgs", "dramatiq:refunds.DQ.msgs"):
        for raw in client.hgetall(key).values():
            first = json.loads(raw)["args"][0]
            ids += first if isinstance(first, list) else [first]
    return sorted(ids)


def scheduler_passes(port: int) -> bool:
    """True once the scheduler finished a pass (its gauges carry the time of the last one)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            return b"refund_scheduler_last_pass_timestamp_seconds" in response.read()
    except OSError:
        return False


@pytest.mark.slow
async def test_deliveries_lost_with_redis_are_handed_over_again_within_seconds(
        db, database_url, module_redis_url, make_merchant, queue, tmp_path):
    await make_merchant("m1")
    await paid(db)
    refund = (await enqueue_refund(db, **request(external_ref="LOST"))).refund
    # a retry delayed by 20 s (as workers.sender defers one): its delayed message is lost too
    delayed = (await enqueue_refund(db, **request(external_ref="DELAYED"))).refund
    await db.execute("UPDATE refunds SET delivered_at = now() + interval '20 seconds' WHERE refund_id = $1",
                     delayed.refund_id)
    both = sorted([str(refund.refund_id), str(delayed.refund_id)])
    assert queued_ids(queue) == both
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": module_redis_url,
           "SCHEDULER_METRICS_PORT": str(port), "PYTHONPATH": str(ROOT)}
    for name in ("SCHEDULER_INTERVAL", "REFUND_OUTBOX_GRACE_SECONDS"):  # the defaults: 5 s, 30 s
        env.pop(name, None)
    group = ServiceGroup(env=env, log_dir=tmp_path)
    scheduler = group.start("scheduler", "-m", "workers.scheduler")
    try:
        deadline = time.monotonic() + 30
        while not scheduler_passes(port):
            assert scheduler.process.poll() is None, scheduler.log_tail()
            assert time.monotonic() < deadline, scheduler.log_tail()
            time.sleep(0.1)
        assert queued_ids(queue) == both  # Redis kept them: not handed over twice
        queue.flushdb()  # Redis lost everything (as FLUSHALL or a restart without data does)
        lost_at = time.monotonic()
        while queued_ids(queue) != both:
            assert time.monotonic() - lost_at < 5, f"not handed over again within 5 s:\n{scheduler.log_tail()}"
            time.sleep(0.1)
    finally:
        group.stop()
