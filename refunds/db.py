"""Postgres connections and the schema migration."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import simplejson

from .errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parent / "schema.sql"  # shipped in the package: a plain install can migrate
MIGRATION_LOCK = 0x7265_6675_6E64  # advisory lock id: one migration at a time
POOLER_FOUND = ("DATABASE_URL reaches Postgres through a connection pooler (PgBouncer?) but DATABASE_POOLER=none: "
                "set DATABASE_POOLER=transaction (or =prepared if it keeps prepared statements per client)")


def pooler_setting(pooler: str | None = None) -> str:
    """``pooler`` or DATABASE_POOLER, read afresh: a first connection must not fill
    ``get_settings``' cache before a tool or test has set the rest of the environment."""
    if pooler is not None:
        return pooler
    from pydantic import ValidationError

    from .settings import Settings, get_settings

    try:
        return Settings().database_pooler
    except ValidationError:
        return get_settings().database_pooler  # raises ConfigError naming the malformed setting


def _statement_options(pooler: str) -> dict:
    """asyncpg names the statements it caches; behind a transaction pooler the next transaction
    may run on another server connection, where that name is missing or is another client's
    statement. Without the cache every statement is unnamed and parsed with its own execution."""
    return {"statement_cache_size": 0} if pooler == "transaction" else {}


async def _refuse_pooler(conn: asyncpg.Connection) -> None:
    """A pooler answers the startup with its own backend key, so its pid is not the backend's.
    Run before any prepared statement (simple protocol) so a pooler cannot mix them up first."""
    status = await conn.execute(f"SELECT 1 WHERE pg_backend_pid() = {int(conn.get_server_pid())}")
    if status != "SELECT 1":
        raise ConfigError(POOLER_FOUND)


async def _init_connection(conn: asyncpg.Connection, *, pooler: str = "none") -> None:
    if pooler == "none":
        await _refuse_pooler(conn)
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog",
        encoder=lambda value: simplejson.dumps(value, use_decimal=True),
        decoder=lambda text: json.loads(text, parse_float=Decimal),
    )


def application_name() -> str:
    """Who a connection belongs to in pg_stat_activity: the running program's main module
    (``producers.http``, ``receiver``, ``workers.scheduler``, ``dramatiq`` for the workers)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = spec.name if spec is not None else Path(sys.argv[0] or "python").name
    return name.removesuffix(".__main__")[:63]


async def connect(dsn: str, *, pooler: str | None = None) -> asyncpg.Connection:
    """One connection; ``pooler`` defaults to DATABASE_POOLER."""
    pooler = pooler_setting(pooler)
    conn = await asyncpg.connect(dsn, server_settings={"application_name": application_name()},
                                 **_statement_options(pooler))
    try:
        await _init_connection(conn, pooler=pooler)
    except BaseException:
        conn.terminate()
        raise
    return conn


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without asyncpg's reset query: this project keeps no session state (no LISTEN,
    session advisory locks, SET or open cursors), and an open transaction is still rolled back."""


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10, pooler: str | None = None) -> asyncpg.Pool:
    """A pool; ``pooler`` defaults to DATABASE_POOLER."""
    pooler = pooler_setting(pooler)
    return await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=functools.partial(_init_connection, pooler=pooler),
        reset=_keep_session, server_settings={"application_name": application_name()}, **_statement_options(pooler))


class ConnectionBroken(asyncpg.ConnectionDoesNotExistError):
    """The session of a pooled connection had ended before a statement was sent on it (``acquire``).
    Class 08, like asyncpg's own errors for a lost connection: every outage handler knows it."""


@contextlib.asynccontextmanager
async def acquire(pool: asyncpg.Pool, *, timeout: float | None = None) -> AsyncIterator[asyncpg.Connection]:
    """``pool.acquire()``, where a statement refused because the session had already ended
    raises ConnectionBroken instead of asyncpg's InternalClientError.

    Postgres ends an idle session (a restart's fast shutdown, pg_terminate_backend) with a FATAL
    message and then closes the socket. asyncpg reads the FATAL on a connection that expects
    nothing and puts its protocol in an error state, but ``is_closed()``, which the pool checks
    before handing a connection out, turns true only once the loop has delivered the close
    (uvloop: a turn after it read both; a close in a later read: later still). Meanwhile
    ``pool.acquire()`` hands the connection out, and the first statement fails before anything
    is sent: InternalClientError "cannot switch to state 12; another operation (2) is in
    progress" (MagicStack/asyncpg#1069). asyncpg then aborts the connection, so it is never
    handed out again; but InternalClientError is not an outage error (it is also what a bug,
    such as a missing codec, raises, on a connection left open), so the services would answer
    500 with a traceback. A connection asyncpg has closed tells the two apart. The statement
    that raised it was not sent (statements before it in the block were)."""
    async with pool.acquire(timeout=timeout) as conn:
        try:
            yield conn
        except asyncpg.InternalClientError as exc:
            if not conn.is_closed():
                raise
            raise ConnectionBroken(f"the connection's session had ended before the statement was sent ({exc})") from exc


async def migrate(dsn: str, *, pooler: str | None = None) -> None:
    """Apply schema.sql; every statement in it is idempotent. One transaction: it may go through
    a transaction pooler too (with DATABASE_POOLER set for it)."""
    sql = SCHEMA_PATH.read_text()
    conn = await connect(dsn, pooler=pooler)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(sql)
    finally:
        await conn.close()
