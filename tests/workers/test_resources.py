"""The worker's resources as its boot hook opens them (workers.resources.Resources.open)."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from refunds.settings import get_settings


async def test_more_refunds_in_flight_than_redis_connections_wait_for_one_instead_of_failing(database_url):
    """Every refund in flight asks the rate limiter (Redis) as it leaves, up to WORKER_IN_FLIGHT
    (128) at once: redis-py refuses a 101st connection ("Too many connections"), which failed
    whole packs of refunds and sent them to dramatiq's retries; the worker's pool makes them wait."""
    from workers.resources import REDIS_CONNECTIONS, Resources

    get_settings.cache_clear()
    res = await Resources.open(pool_size=2)
    try:
        callers = get_settings().worker_in_flight + 72
        assert callers > 100 > REDIS_CONNECTIONS
        waits = await asyncio.gather(*(res.limiter.permit(f"m{i % 7}", Decimal(1000)) for i in range(callers)))
        assert len(waits) == callers
    finally:
        await res.close()
