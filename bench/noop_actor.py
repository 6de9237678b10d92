"""The baseline of bench/e2e_bench.py: dramatiq's own throughput for an actor that does nothing.

    REDIS_URL=redis://127.0.0.1:6379/14 dramatiq bench.noop_actor --processes 2 --threads 8

A plain RedisBroker with dramatiq's default middleware. ``noop`` is a synchronous no-op;
``noop_async`` (with BENCH_NOOP_ASYNC=1, which adds dramatiq's AsyncIO middleware as the
refund workers have) is an ``async def`` no-op, so each message also makes the hop to the
worker's event loop thread that ``send_refund`` makes.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

QUEUE = "bench_noop"
ACTOR = "bench_noop"

broker = RedisBroker(url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14"))
if os.environ.get("BENCH_NOOP_ASYNC"):
    from dramatiq.middleware import AsyncIO

    broker.add_middleware(AsyncIO())
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name=ACTOR, queue_name=QUEUE)
def noop() -> None:
    pass


if os.environ.get("BENCH_NOOP_ASYNC"):
    @dramatiq.actor(actor_name=ACTOR + "_async", queue_name=QUEUE + "_async")
    async def noop_async() -> None:
        pass
