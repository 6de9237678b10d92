"""Calls awaited together run as one batch: many refunds, one statement.

A round trip to Postgres costs more CPU (on both sides) than the work of the statement
that rides it, and a worker has many refunds in flight at once. So the worker's state
changes go through a ``Coalescer``: each call queues its item and awaits its own result;
calls made in the same turn of the event loop share a batch, and while a batch is being run
the calls that arrive queue up and share the next one. Nothing waits for a batch to fill:
an idle coalescer runs what it has at once.

A batch never holds two items that share a key (``keys``; by default an item's one key is
its value: the same refund twice would make one statement claim or move one row for two
callers); the later one waits for the next batch.

A statement Postgres undoes as a whole for one row's sake (a CHECK, a value it refuses, a
deadlock with another batch) would fail every caller of the batch; with ``alone_on`` naming
those errors, such a batch runs again item by item (a single item once more: a deadlock
is worth a second try), so that only the caller whose item is at fault gets the error.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    """``await coalescer(item)`` runs ``run_batch([item, ...])`` with the items awaited meanwhile.

    ``run_batch`` returns one result per item, in order; if it raises, every call of that
    batch raises the same exception, except one of ``alone_on``: then each item runs alone.
    """

    def __init__(self, run_batch: Callable[[list[Item]], Awaitable[Sequence[Result]]], *,
                 keys: Callable[[Item], Iterable[Hashable]] = lambda item: (item,),
                 max_batch: int = 100, max_inflight: int = 2,
                 alone_on: tuple[type[Exception], ...] = (), name: str = "items"):
        self._run_batch = run_batch
        self._alone_on = alone_on
        self._name = name  # what the items are, for the log
        self._keys = keys
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._queue: deque[tuple[Item, asyncio.Future]] = deque()
        self._runs: set[asyncio.Task] = set()

    async def __call__(self, item: Item) -> Result:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if len(self._runs) < self._max_inflight:
            task = asyncio.create_task(self._drain())
            self._runs.add(task)
            task.add_done_callback(self._runs.discard)
        # shielded: a caller that gives up does not cancel a statement that others share
        return await asyncio.shield(future)

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._take()
                if not batch:
                    continue
                try:
                    await self._settle(batch)
                except BaseException:  # cancelled: the callers still waiting learn it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(asyncio.CancelledError())
                    raise
        finally:
            # Leave the set at once, with no await since the empty queue was seen: its done
            # callback runs a turn later, and a call in that turn would find the set full and
            # its item would wait for a drain that never comes.
            self._runs.discard(asyncio.current_task())

    async def _settle(self, batch: list[tuple[Item, asyncio.Future]], *, alone: bool = False) -> None:
        """Run the batch and give each caller its result, or the batch's error; after an error of
        ``alone_on``, each item once more on its own."""
        try:
            results = await self._run_batch([item for item, _ in batch])
        except self._alone_on as exc:
            if alone:
                _fail(batch, exc)
                return
            log.warning("a batch of %d %s failed as a whole (%s); running each alone",
                        len(batch), self._name, type(exc).__name__)
            for one in batch:
                await self._settle([one], alone=True)
            return
        except Exception as exc:
            _fail(batch, exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    def _take(self) -> list[tuple[Item, asyncio.Future]]:
        batch, held, keys = [], [], set()
        while self._queue and len(batch) < self._max_batch:
            item, future = self._queue.popleft()
            if future.done():
                continue
            item_keys = set(self._keys(item))
            if not keys.isdisjoint(item_keys):
                held.append((item, future))
                continue
            keys.update(item_keys)
            batch.append((item, future))
        self._queue.extendleft(reversed(held))
        return batch


def _fail(batch: list[tuple[object, asyncio.Future]], exc: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
