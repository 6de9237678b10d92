"""What a worker process owns: the asyncpg pool, the aiohttp session, the gateway client,
the vault (and the credentials it opened) and the rate limiter. Opened on the worker's event loop at boot and closed at
shutdown, never at import time (dramatiq imports actor modules in every process).
"""

from __future__ import annotations

import asyncio
import logging
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import dramatiq
import redis.asyncio as aioredis
from dramatiq.asyncio import get_event_loop_thread

from pagoefectivo.client import Credentials, PagoEfectivoClient
from refunds import db
from refunds.merchants import Merchant
from refunds.settings import Settings, get_settings
from refunds.vault import Vault, vault_from_settings

from .ratelimit import RateLimiter

log = logging.getLogger(__name__)


@dataclass
class Resources:
    settings: Settings
    pool: asyncpg.Pool
    session: aiohttp.ClientSession
    client: PagoEfectivoClient
    vault: Vault
    redis: aioredis.Redis
    limiter: RateLimiter
    # merchant row -> its opened credentials (vault opened, RSA key parsed once). Keyed by the
    # whole row, sealed secrets included, so a rotation or any other change is a new entry.
    credentials: Callable[[Merchant], Credentials] = field(init=False)

    def __post_init__(self) -> None:
        self.credentials = functools.lru_cache(maxsize=1024)(lambda merchant: merchant.credentials(self.vault))

    @classmethod
    async def open(cls, settings: Settings | None = None, *, pool_size: int = 10) -> "Resources":
        settings = settings or get_settings()
        vault = vault_from_settings(settings)
        pool = await db.create_pool(settings.require("database_url"), min_size=1, max_size=pool_size)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200, limit_per_host=200))
        client = PagoEfectivoClient(session, base_url=settings.base_url, env=settings.pagoefectivo_env)
        redis_client = aioredis.from_url(settings.require("redis_url"))
        return cls(settings, pool, session, client, vault, redis_client, RateLimiter(redis_client))

    async def close(self) -> None:
        await self.session.close()
        await self.redis.aclose()
        await self.pool.close()


_current: Resources | None = None


def current() -> Resources:
    if _current is None:
        raise RuntimeError("worker resources are not open (the worker has not booted)")
    return _current


class WorkerResources(dramatiq.Middleware):
    """Opens Resources on the AsyncIO middleware's event loop when the worker boots, and closes
    them after the worker threads have finished their messages (so an in-flight refund is never
    cut off by a closed pool). Must be added before AsyncIO, whose shutdown stops the loop."""

    def after_worker_boot(self, broker, worker):
        global _current
        threads = getattr(worker, "worker_threads", 8)
        _current = get_event_loop_thread().run_coroutine(Resources.open(pool_size=min(max(4, threads + 2), 20)))
        log.info("worker resources open")

    def after_worker_shutdown(self, broker, worker):
        global _current
        if _current is not None:
            loop_thread = get_event_loop_thread()
            if loop_thread is not None:
                loop_thread.run_coroutine(asyncio.wait_for(_current.close(), 10))
            _current = None
