"""Postgres connections and the schema migration."""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from pathlib import Path

import asyncpg
import simplejson

SCHEMA_PATH = Path(__file__).resolve().parent / "schema.sql"  # shipped in the package: a plain install can migrate
MIGRATION_LOCK = 0x7265_6675_6E64  # advisory lock id: one migration at a time


async def _init_connection(conn: asyncpg.Connection) -> None:
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


async def connect(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn, server_settings={"application_name": application_name()})
    await _init_connection(conn)
    return conn


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without asyncpg's reset query: this project keeps no session state (no LISTEN,
    session advisory locks, SET or open cursors), and an open transaction is still rolled back."""


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection, reset=_keep_session,
        server_settings={"application_name": application_name()})


async def migrate(dsn: str) -> None:
    """Apply schema.sql; every statement in it is idempotent."""
    sql = SCHEMA_PATH.read_text()
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(sql)
    finally:
        await conn.close()
