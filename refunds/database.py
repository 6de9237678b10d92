"""A service's Postgres pool: created lazily, and every outage reported as one error.

The receiver and the intake API must start (and answer /healthz) while Postgres is down,
and answer 503 to what they cannot persist so that the sender retries. So the pool is made on
first use rather than at import or start, a failed attempt is retried at most once per
``retry_interval``, and every "the database is not there right now" error becomes
``Unavailable``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from . import db as dbmod

log = logging.getLogger(__name__)

# Errors that mean "try again later", not "this request is wrong".
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,                       # class 08: connection failures (db.ConnectionBroken)
    asyncpg.exceptions.OperatorInterventionError,          # 57: admin/crash shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,         # 53: too many connections, disk full
    asyncpg.exceptions.TransactionRollbackError,           # 40: serialization failure, deadlock
    asyncpg.InterfaceError,                                # connection closed under us
    OSError,                                               # refused, unreachable, reset
    TimeoutError,                                          # connect / acquire / query took too long
)


class Unavailable(Exception):
    """Postgres cannot be used right now; the caller answers 503."""


class Database:
    def __init__(
        self,
        dsn: str,
        *,
        connect_timeout: float = 5.0,
        acquire_timeout: float = 5.0,
        work_timeout: float = 15.0,
        retry_interval: float = 1.0,
        max_size: int = 10,
    ):
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._acquire_timeout = acquire_timeout
        self._work_timeout = work_timeout
        self._retry_interval = retry_interval
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._lock: asyncio.Lock | None = None
        self._failed_at: float | None = None
        self._closed = False

    async def start(self) -> None:
        """Try to connect now; a database that is down is only logged (requests will retry)."""
        try:
            await self._ensure_pool()
        except Unavailable as exc:
            log.warning("Postgres not reachable at start (%s); will retry on demand", exc)

    async def close(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except (TimeoutError, *OUTAGE_ERRORS):
                pool.terminate()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; outages inside the block (or reaching it) raise Unavailable.

        The whole block is bounded by ``work_timeout`` so a Postgres that hangs (rather
        than refuses) still yields a prompt 503 instead of holding the sender's request.
        """
        pool = await self._ensure_pool()
        try:
            async with asyncio.timeout(self._work_timeout):
                async with dbmod.acquire(pool, timeout=self._acquire_timeout) as conn:
                    yield conn
        except OUTAGE_ERRORS as exc:
            raise Unavailable(describe(exc)) from exc

    async def pool(self) -> asyncpg.Pool:
        """The pool itself (for callers that acquire their own connections)."""
        return await self._ensure_pool()

    async def _ensure_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        if self._closed:
            raise Unavailable("the service is shutting down")
        if self._lock is None:
            self._lock = asyncio.Lock()  # made here, so on the running loop
        async with self._lock:
            if self._pool is not None:
                return self._pool
            now = time.monotonic()
            if self._failed_at is not None and now - self._failed_at < self._retry_interval:
                raise Unavailable("Postgres unreachable (recent attempt failed)")
            try:
                self._pool = await asyncio.wait_for(
                    dbmod.create_pool(self._dsn, min_size=1, max_size=self._max_size),
                    timeout=self._connect_timeout,
                )
            except asyncpg.ClientConfigurationError:  # DATABASE_URL itself is wrong: no retry mends it
                raise
            except OUTAGE_ERRORS as exc:
                self._failed_at = time.monotonic()
                raise Unavailable(describe(exc)) from exc
            except asyncpg.PostgresError as exc:
                # e.g. the database does not exist (yet) or auth fails: still "not ready"
                self._failed_at = time.monotonic()
                raise Unavailable(describe(exc)) from exc
            self._failed_at = None
            return self._pool


def describe(exc: BaseException) -> str:
    """The error's class and message: never the DSN (it may carry a password)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
