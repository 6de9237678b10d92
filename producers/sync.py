"""``enqueue_refund`` for synchronous code (Django views, scripts, Celery tasks).

A ``RefundProducer`` owns one event loop, running in its own daemon thread, and one
asyncpg pool on it, both made on first use from DATABASE_URL (or the URL given). Calls
from any number of threads are run on that loop, so they share the pool and get exactly
what ``enqueue_refund`` gives: the same validation, idempotency and results.

It also works when called from inside another program's event loop (the call blocks
that loop for the duration, as any synchronous call does); async code should rather
``await producers.enqueue_refund(pool, ...)`` on its own pool.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from decimal import Decimal

import asyncpg

from refunds import db as dbmod
from refunds.delivery import Courier
from refunds.settings import get_settings

from .enqueue import EnqueueResult, enqueue_refund

DEFAULT_TIMEOUT = 30.0


class RefundProducer:
    """A thread-safe, synchronous door to ``enqueue_refund``; ``close()`` when done (or use ``with``)."""

    def __init__(self, database_url: str | None = None, *, pool_size: int = 4, timeout: float = DEFAULT_TIMEOUT):
        self._dsn = database_url
        self._pool_size = pool_size
        self._timeout = timeout
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: asyncio.Future[asyncpg.Pool] | None = None  # on the producer's loop
        self._pid: int | None = None
        self._courier = Courier()  # hands the refunds over, on the producer's loop

    def enqueue(
        self, *, merchant_id: str, original_transaction_id: str, amount: Decimal | str, currency: str,
        external_ref: str, reason: str | None = None, requested_by: str | None = None,
    ) -> EnqueueResult:
        """Accept one refund, as ``producers.enqueue_refund``; raises RefundRefused / IdempotencyConflict.

        On a timeout (TimeoutError) the outcome is unknown: repeating the call with the same
        external_ref is safe and tells.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("RefundProducer.enqueue called from its own event loop; await enqueue_refund instead")
        future = asyncio.run_coroutine_threadsafe(self._enqueue(dict(
            merchant_id=merchant_id, original_transaction_id=original_transaction_id, amount=amount,
            currency=currency, external_ref=external_ref, reason=reason, requested_by=requested_by,
        )), self._running_loop())
        try:
            return future.result(self._timeout)
        except FutureTimeout:
            future.cancel()
            raise TimeoutError(f"enqueue_refund did not answer within {self._timeout:g}s") from None

    def close(self) -> None:
        """Close the pool and stop the thread; the producer may be used again afterwards (it restarts)."""
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
            if loop is None or self._pid != os.getpid():
                self._pool = None
                return
        try:
            asyncio.run_coroutine_threadsafe(self._close_pool(), loop).result(self._timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(self._timeout)
            loop.close()

    def __enter__(self) -> "RefundProducer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is not None and self._pid != os.getpid():
                # forked: the thread was not copied; the parent's pool belongs to the parent
                self._loop = self._thread = self._pool = None
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="refund-producer", daemon=True)
                thread.start()
                self._loop, self._thread, self._pid, self._courier = loop, thread, os.getpid(), Courier()
            return self._loop

    async def _enqueue(self, kwargs: dict) -> EnqueueResult:
        return await enqueue_refund(await self._get_pool(), courier=self._courier, **kwargs)

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is None:  # set without an await in between: concurrent first calls share one pool
            dsn = self._dsn or get_settings().require("database_url")
            self._pool = asyncio.ensure_future(dbmod.create_pool(dsn, min_size=1, max_size=self._pool_size))
        try:
            return await asyncio.shield(self._pool)
        except Exception:
            self._pool = None  # Postgres was down: the next call tries again
            raise

    async def _close_pool(self) -> None:
        """End the loop's other tasks, then close the courier's Redis client and the pool."""
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self._courier.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await (await pool).close()
            except Exception:  # it never opened: nothing to close
                pass


_default: RefundProducer | None = None
_default_lock = threading.Lock()


def default_producer() -> RefundProducer:
    """The process-wide producer behind ``enqueue_refund_sync`` (closed at exit)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = RefundProducer()
            atexit.register(_default.close)
        return _default


def enqueue_refund_sync(**request) -> EnqueueResult:
    """``enqueue_refund`` from synchronous code, on the process-wide producer (DATABASE_URL)."""
    return default_producer().enqueue(**request)
