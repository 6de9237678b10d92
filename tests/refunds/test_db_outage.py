"""A pooled connection whose session Postgres has ended (refunds.db.acquire, refunds.database).

When Postgres ends an idle session (a restart's fast shutdown, pg_terminate_backend) it sends
FATAL and closes the socket; asyncpg counts the connection closed only once its loop has seen
the close, and meanwhile the pool hands the connection out. Here a real Postgres ends the
session with pg_terminate_backend, behind a proxy that forwards the FATAL at once but the close
only when the test is done with it: the moment between the two, a loop turn or so on its own,
lasts as long as the test needs. Each test runs on asyncio's loop and on uvloop (the workers').
"""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import uvloop

from refunds import db as dbmod
from refunds import service
from refunds.database import OUTAGE_ERRORS, Database, Unavailable

STATEMENT = "SELECT x FROM unnest($1::int[]) AS x"  # one statement with arguments, as the worker's batches
LOOPS = pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop],
                                ids=["asyncio", "uvloop"])


class CloseLater:
    """A TCP proxy to Postgres that forwards everything at once, except a close by the server:
    the client's socket stays open (the server's last bytes delivered) until ``stop_holding()``."""

    def __init__(self, host: str, port: int):
        self._target = (host, port)
        self._release = asyncio.Event()
        self._ended = asyncio.Condition()
        self.ended = 0  # server sides that have closed
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def wait_ended(self, count: int) -> None:
        async with self._ended:
            await asyncio.wait_for(self._ended.wait_for(lambda: self.ended >= count), 10)

    def stop_holding(self) -> None:
        """Closes held sockets, and every later one at once (a pool's close waits for them)."""
        self._release.set()

    async def close(self) -> None:
        self.stop_holding()
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        server_in, server_out = await asyncio.open_connection(*self._target)
        up = asyncio.create_task(self._pump(client_in, server_out))
        self._tasks.add(up)
        try:
            await self._pump(server_in, client_out, close=False)
            async with self._ended:
                self.ended += 1
                self._ended.notify_all()
            await self._release.wait()
        finally:
            client_out.close()
            server_out.close()

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, close: bool = True) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        if close:
            sink.close()


def run(loop_factory, coro) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(coro)


@contextlib.asynccontextmanager
async def proxied(database_url: str):
    """The test database's URL through a CloseLater proxy, and the proxy."""
    parts = urlsplit(database_url)
    proxy = CloseLater(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = await proxy.start()
    netloc = parts.netloc.rpartition("@")[0] + "@" if "@" in parts.netloc else ""
    try:
        yield urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{port}")), proxy
    finally:
        await proxy.close()


async def end_session(database_url: str, proxy: CloseLater, pid: int) -> None:
    """pg_terminate_backend on our own session, then a moment for asyncpg to read the FATAL."""
    ended = proxy.ended
    admin = await asyncpg.connect(database_url)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    await proxy.wait_ended(ended + 1)
    await asyncio.sleep(0.2)  # the FATAL is read; the close is held by the proxy


@LOOPS
def test_a_batch_on_an_ended_session_fails_as_an_outage_and_the_next_runs_on_a_new_one(database_url, loop_factory):
    """The worker's batches (Resources._on_connection, pool.acquire() per batch): the statement on
    the ended session is refused before it is sent, with an outage error (class 08, which
    refunds.database and refunds.service count as one), not InternalClientError; asyncpg drops
    the connection and the next batch runs on a new session."""
    from workers.resources import Resources

    async def scenario():
        async with proxied(database_url) as (url, proxy):
            pool = await dbmod.create_pool(url, min_size=1, max_size=1, pooler="none")
            try:
                pids = []

                async def batch(conn, items):
                    pids.append(conn.get_server_pid())
                    return [row["x"] for row in await conn.fetch(STATEMENT, items)]

                run_batch = Resources._on_connection(SimpleNamespace(pool=pool), batch)
                assert await run_batch([1, 2]) == [1, 2]  # the statement is prepared and cached
                await end_session(database_url, proxy, pids[0])

                with pytest.raises(OUTAGE_ERRORS) as raised:
                    await run_batch([3, 4])
                assert isinstance(raised.value, asyncpg.PostgresConnectionError)
                assert "session had ended before the statement was sent" in str(raised.value)
                assert service.failure(raised.value) == (service.UNAVAILABLE, f"database unavailable: {raised.value}")

                assert await run_batch([5]) == [5]
                assert len(pids) == 3 and pids[1] == pids[0] and pids[2] != pids[0]
            finally:
                proxy.stop_holding()
                await pool.close()

    run(loop_factory, scenario())


@LOOPS
def test_a_statement_on_an_ended_session_is_an_outage_and_the_connection_is_dropped(database_url, loop_factory):
    """The services (refunds.database.Database): a 503, not asyncpg's InternalClientError; and
    refunds.db.acquire: ConnectionBroken, an outage error (class 08)."""

    async def scenario():
        async with proxied(database_url) as (url, proxy):
            database = Database(url, max_size=1)
            await database.start()
            try:
                async with database.connection() as conn:
                    pid = conn.get_server_pid()
                    assert [r["x"] for r in await conn.fetch(STATEMENT, [1])] == [1]
                await end_session(database_url, proxy, pid)
                with pytest.raises(Unavailable, match="ConnectionBroken"):
                    async with database.connection() as conn:
                        await conn.fetch(STATEMENT, [2])
                async with database.connection() as conn:  # a new session: the ended one was dropped
                    assert conn.get_server_pid() != pid
                    assert [r["x"] for r in await conn.fetch(STATEMENT, [3])] == [3]

                pool = await database.pool()
                async with dbmod.acquire(pool) as conn:
                    pid = conn.get_server_pid()
                    await conn.fetch(STATEMENT, [4])
                await end_session(database_url, proxy, pid)
                with pytest.raises(dbmod.ConnectionBroken) as raised:
                    async with dbmod.acquire(pool) as conn:
                        await conn.fetch(STATEMENT, [5])
                assert isinstance(raised.value, asyncpg.PostgresConnectionError)
                assert isinstance(raised.value.__cause__, asyncpg.InternalClientError)
            finally:
                proxy.stop_holding()
                await database.close()

    run(loop_factory, scenario())
