"""DATABASE_POOLER (refunds/db.py): direct connections are checked, pooled ones prepare no named statement.

The same behind a real PgBouncer: tests/system/test_pgbouncer.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from producers.enqueue import accept_refund
from refunds import db as dbmod
from refunds import reports
from refunds.errors import ConfigError
from tests.helpers import paid

NAMED = "SELECT count(*) FROM pg_prepared_statements"  # named statements of this session


def test_the_setting_is_validated(monkeypatch):
    from refunds.settings import Settings, get_settings

    monkeypatch.setenv("DATABASE_POOLER", "pgbouncer")
    get_settings.cache_clear()
    with pytest.raises(ConfigError, match="DATABASE_POOLER is malformed"):
        get_settings()
    get_settings.cache_clear()
    monkeypatch.setenv("DATABASE_POOLER", "transaction")
    assert Settings().database_pooler == dbmod.pooler_setting() == "transaction"
    monkeypatch.delenv("DATABASE_POOLER")
    assert dbmod.pooler_setting() == "none"


async def test_a_direct_connection_passes_the_check_and_keeps_the_statement_cache(database_url):
    conn = await dbmod.connect(database_url, pooler="none")
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval(NAMED) >= 1  # asyncpg's cache names what it prepares
    finally:
        await conn.close()


async def test_the_check_refuses_a_backend_that_is_not_the_one_that_answered_the_startup(database_url, monkeypatch):
    """What a pooler looks like from here: the backend key it gives is its own, not the backend's pid."""
    import asyncpg

    monkeypatch.setattr(asyncpg.Connection, "get_server_pid", lambda self: 0)
    with pytest.raises(ConfigError, match="DATABASE_POOLER=transaction") as refused:
        await dbmod.connect(database_url, pooler="none")
    assert "\n" not in str(refused.value) and "@" not in str(refused.value)  # one line, no DSN
    with pytest.raises(ConfigError):
        await dbmod.create_pool(database_url, pooler="none")
    conn = await dbmod.connect(database_url, pooler="transaction")  # told: no check
    await conn.close()


async def test_transaction_mode_prepares_no_named_statement(db, make_merchant, database_url, monkeypatch):
    """Nothing outlives a transaction on the server connection, the report's cursor included
    (read in several FETCH batches here)."""
    await make_merchant("m1")
    await paid(db, "m1", "CIP-1", "100.00")
    for index in range(5):
        await accept_refund(db, merchant_id="m1", original_transaction_id="CIP-1", amount="10.00",
                            currency="PEN", external_ref=f"R-{index}")
    monkeypatch.setattr(reports, "_BATCH", 2)
    pool = await dbmod.create_pool(database_url, max_size=1, pooler="transaction")
    try:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT $1::int + 1", 1) == 2
            now = datetime.now(timezone.utc)
            totals = reports.Totals()
            rows = [row async for row in reports.refund_rows(conn, now - timedelta(days=1), now + timedelta(days=1),
                                                            totals)]
            assert [row["external_ref"] for row in rows] == [f"R-{index}" for index in range(5)]
            assert totals.to_json()[0]["requested"] == "50.00"
            assert await conn.fetch("SELECT name, statement FROM pg_prepared_statements") == []
            assert await conn.fetchval("SELECT count(*) FROM pg_cursors WHERE name = 'refund_report'") == 0
    finally:
        await pool.close()
