"""What a worker process owns: the asyncpg pool, the aiohttp session, the gateway client,
the vault (and the credentials it opened), the rate limiter, and the statements its
refunds in flight share. Opened on the worker's event loop at boot and closed at shutdown,
never at import time (dramatiq imports actor modules in every process).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

import aiohttp
import asyncpg
import dramatiq
import redis.asyncio as aioredis
import uvloop
from dramatiq.asyncio import get_event_loop_thread

from pagoefectivo.client import Credentials, PagoEfectivoClient
from refunds import db, heartbeat, logs, metrics, service
from refunds.coalesce import Coalescer
from refunds.merchants import Merchant
from refunds.ratelimit import RateLimiter
from refunds.records import Refund, find_with_merchants
from refunds.settings import Settings, get_settings
from refunds.states import Move, claim_many, transition_many
from refunds.vault import Vault, vault_from_settings
from refunds.webhooks import parse_networks

from .claims import Claims
from .webhooks import webhook_session

log = logging.getLogger(__name__)

ACTOR = "worker"  # who the audit rows of the worker's moves name
GATEWAY_LOG = logging.getLogger("pagoefectivo.client")  # where gateway exchanges are logged (REFUNDS_LOG_BODIES=1)
# The rate limiter's Redis connections per worker process. The questions its refunds in flight
# ask at once share calls (refunds.ratelimit); a caller beyond the pool waits for a free
# connection instead of failing its message ("Too many connections", redis-py's own cap).
REDIS_CONNECTIONS = 32
REDIS_WAIT_SECONDS = 10.0


def gateway_client(session: aiohttp.ClientSession, settings: Settings, **options) -> PagoEfectivoClient:
    """The gateway client as a worker uses it: PAGOEFECTIVO_TIMEOUT_SECONDS (at most half a claim),
    its exchanges logged, redacted, when REFUNDS_LOG_BODIES=1."""
    options.setdefault("timeout", settings.pagoefectivo_timeout_seconds)
    return PagoEfectivoClient(session, base_url=settings.base_url, env=settings.pagoefectivo_env,
                              on_exchange=functools.partial(logs.log_exchange, GATEWAY_LOG), **options)


@dataclass
class Resources:
    settings: Settings
    pool: asyncpg.Pool
    session: aiohttp.ClientSession
    client: PagoEfectivoClient
    vault: Vault
    redis: aioredis.Redis
    limiter: RateLimiter
    # webhooks: a guarded resolver, their own timeout (workers.webhooks); None where none are sent
    webhook_session: aiohttp.ClientSession | None = None
    # merchant row -> its opened credentials (vault opened, RSA key parsed once). Keyed by the
    # whole row, sealed secrets included, so a rotation or any other change is a new entry.
    credentials: Callable[[Merchant], Credentials] = field(init=False)

    # the refunds in flight on this process read, claim and move together (see refunds.coalesce)
    load: Coalescer[UUID, tuple[Refund, Merchant] | None] = field(init=False)
    claim: Coalescer[UUID, tuple[Refund, str] | None] = field(init=False)
    move: Coalescer[Move, Refund | None] = field(init=False)
    # the refunds this process works on at once (WORKER_IN_FLIGHT), whichever messages carry them
    in_flight: asyncio.Semaphore = field(init=False)
    # the claims it holds, renewed while it works on them (workers.claims)
    claims: Claims = field(init=False)

    def __post_init__(self) -> None:
        self.credentials = functools.lru_cache(maxsize=1024)(
            lambda merchant: Credentials(**merchant.gateway_credentials(self.vault)))
        # two deliveries of one refund never share a claim batch (the Coalescer's keys): the second
        # waits for the next and finds the refund claimed
        self.load = Coalescer(self._on_connection(find_with_merchants))
        self.claim = Coalescer(self._on_connection(functools.partial(
            claim_many, actor=ACTOR, claim_seconds=self.settings.refund_claim_seconds)))
        # two batches moving refunds of the same payments may lock those payment rows in opposite
        # orders (the refund trigger updates them): Postgres undoes one, whose moves then go alone
        self.move = Coalescer(self._on_connection(functools.partial(transition_many, actor=ACTOR)),
                              keys=lambda move: (move.refund_id,), alone_on=(asyncpg.DeadlockDetectedError,),
                              name="refund moves")
        self.in_flight = asyncio.Semaphore(self.settings.worker_in_flight)
        self.claims = Claims(self.pool, self.settings.refund_claim_seconds)

    def _on_connection(self, statement):
        """``statement(conn, items)`` on a pooled connection. A batch refused on a connection whose
        session had ended raises ConnectionBroken, an outage error (refunds.db.acquire), and is not
        run again here: at a Postgres shutdown the other connections' sessions are ending too, and
        the batch sent on one of them could commit unbeknown to its callers. The messages' retries
        run it later."""
        async def run(items):
            async with db.acquire(self.pool) as conn:
                return await statement(conn, items)
        return run

    @classmethod
    async def open(cls, settings: Settings | None = None, *, pool_size: int = 10) -> "Resources":
        settings = settings or get_settings()
        vault = vault_from_settings(settings)
        pool = await db.create_pool(settings.require("database_url"), min_size=1, max_size=pool_size)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=settings.worker_in_flight,
                                                                      limit_per_host=settings.worker_in_flight))
        client = gateway_client(session, settings)
        redis_client = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            settings.require("redis_url"), max_connections=REDIS_CONNECTIONS, timeout=REDIS_WAIT_SECONDS))
        hooks = webhook_session(parse_networks(settings.webhook_allowed_networks), settings.webhook_timeout_seconds)
        return cls(settings, pool, session, client, vault, redis_client, RateLimiter(redis_client), hooks)

    async def close(self) -> None:
        await self.claims.close()
        if self.webhook_session is not None:
            await self.webhook_session.close()
        await self.session.close()
        await self.redis.aclose()
        await self.pool.close()


_current: Resources | None = None


def current() -> Resources:
    if _current is None:
        raise RuntimeError("worker resources are not open (the worker has not booted)")
    return _current


class UvloopPolicy(dramatiq.Middleware):
    """Makes the event loop that the AsyncIO middleware creates libuv's: added before AsyncIO,
    in worker processes only (a global policy would also reach anything else importing workers)."""

    def before_worker_boot(self, broker, worker):
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class WorkerResources(dramatiq.Middleware):
    """Opens Resources on the AsyncIO middleware's event loop before the worker's threads take
    any message, and closes them after those threads have finished theirs (an in-flight refund
    is never cut off by a closed pool). Added after AsyncIO: its boot hook runs after AsyncIO
    made the loop, its shutdown hook before AsyncIO stops it (dramatiq runs after_* in reverse)."""

    def before_worker_boot(self, broker, worker):
        """dramatiq logs and swallows a hook's exception, so a worker whose resources cannot
        open would report ready and fail every message: it stops instead, with the one line and
        exit status of every service (2: a setting is wrong; 3: the database or Redis is away)."""
        global _current
        threads = getattr(worker, "worker_threads", 8)
        try:
            _current = get_event_loop_thread().run_coroutine(Resources.open(pool_size=min(max(4, threads + 2), 20)))
        except Exception as exc:
            known = service.failure(exc)
            if known is None:
                raise
            status, line = known
            log.critical("worker resources cannot open: %s", line)
            logging.shutdown()
            os._exit(status)
        log.info("worker resources open")
        try:
            get_event_loop_thread().run_coroutine(metrics.initialise_known_merchants(_current.pool))
        except (OSError, asyncpg.PostgresError) as exc:  # metrics only: the worker works without them
            log.warning("merchant metric series not initialised: %s", exc)
        # the liveness probe: beats from the event loop every refund runs on, so a blocked loop stops them
        self.beats = asyncio.run_coroutine_threadsafe(heartbeat.beat_forever(heartbeat.folder("worker")),
                                                      get_event_loop_thread().loop)

    def after_worker_shutdown(self, broker, worker):
        global _current
        if getattr(self, "beats", None) is not None:
            self.beats.cancel()
            heartbeat.stop(heartbeat.folder("worker"))
        if _current is not None:
            loop_thread = get_event_loop_thread()
            if loop_thread is not None:
                loop_thread.run_coroutine(asyncio.wait_for(_current.close(), 10))
            _current = None
