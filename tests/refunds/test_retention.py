"""Retention: old deduplication rows go in small batches; audit history only of long-settled refunds."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from refunds.payments import record_payment
from refunds.retention import MIN_AUDIT_DAYS, purge_audit_events, purge_notifications
from tests.helpers import ROOT


async def add_notifications(db, prefix: str, count: int, age_days: float) -> None:
    await db.execute(
        """INSERT INTO notifications (merchant_id, operation_number, event_type, result, body, received_at)
           SELECT 'm1', $1 || i, 'cip.paid', 'applied', '{}'::jsonb, now() - $3::float8 * interval '1 day'
             FROM generate_series(1, $2) AS i""",
        prefix, count, age_days,
    )


async def count(db, prefix: str) -> int:
    return await db.fetchval("SELECT count(*) FROM notifications WHERE operation_number LIKE $1 || '%'", prefix)


async def test_old_notifications_are_purged_in_batches_and_fresh_ones_stay(db):
    await add_notifications(db, "old-", 25, age_days=45)
    await add_notifications(db, "edge-", 3, age_days=29.9)
    await add_notifications(db, "new-", 5, age_days=0)
    assert await purge_notifications(db, older_than_days=30, batch=4) == 25
    assert (await count(db, "old-"), await count(db, "edge-"), await count(db, "new-")) == (0, 3, 5)
    assert await purge_notifications(db, batch=4) == 0  # nothing left to do


async def test_a_longer_window_keeps_more(db):
    await add_notifications(db, "a-", 4, age_days=40)
    await add_notifications(db, "b-", 6, age_days=100)
    assert await purge_notifications(db, older_than_days=90) == 6
    assert await count(db, "a-") == 4


@pytest.mark.parametrize("days", [0, 7, 29, -1, 30.5, True])
async def test_notifications_are_kept_at_least_30_days(db, days):
    await add_notifications(db, "old-", 2, age_days=45)
    with pytest.raises(ValueError):
        await purge_notifications(db, older_than_days=days)
    assert await count(db, "old-") == 2


async def test_a_purge_refuses_to_run_inside_a_transaction(db):
    async with db.transaction():
        with pytest.raises(RuntimeError):
            await purge_notifications(db)


async def test_the_notification_purge_never_touches_audit_rows(db, make_merchant):
    await make_merchant("m1")
    refund_id = await add_refund(db, "R-1", "succeeded", age_days=400)
    await add_notifications(db, "old-", 3, age_days=400)
    assert await purge_notifications(db) == 3
    assert await events_of(db, refund_id) == 2


# --- audit rows ---------------------------------------------------------------------------

async def add_refund(db, external_ref: str, state: str, *, age_days: float) -> uuid.UUID:
    """A refund last changed ``age_days`` ago, with two audit rows of that age."""
    transaction_id = f"CIP-{external_ref}"
    await record_payment(db, merchant_id="m1", transaction_id=transaction_id, amount=Decimal("100.00"),
                         currency="PEN", method="cash", paid_at=datetime.now(timezone.utc))
    refund_id = uuid.uuid4()
    await db.execute(
        """INSERT INTO refunds (refund_id, merchant_id, external_ref, original_transaction_id, amount, currency,
                                state, created_at, updated_at)
           VALUES ($1, 'm1', $2, $3, 10, 'PEN', $4, now() - $5::float8 * interval '1 day',
                   now() - $5::float8 * interval '1 day')""",
        refund_id, external_ref, transaction_id, state, age_days,
    )
    await db.execute(
        """INSERT INTO refund_events (refund_id, from_state, to_state, actor, occurred_at)
           VALUES ($1, NULL, 'queued', 'test', now() - $3::float8 * interval '1 day'),
                  ($1, 'queued', $2, 'test', now() - $3::float8 * interval '1 day')""",
        refund_id, state, age_days,
    )
    return refund_id


async def events_of(db, refund_id) -> int:
    return await db.fetchval("SELECT count(*) FROM refund_events WHERE refund_id = $1", refund_id)


async def test_audit_rows_go_only_for_long_settled_refunds(db, make_merchant):
    await make_merchant("m1")
    gone = [await add_refund(db, f"S-{state}", state, age_days=200) for state in ("succeeded", "failed", "rejected")]
    kept = {
        "open": await add_refund(db, "OPEN", "pending", age_days=200),
        "review": await add_refund(db, "REVIEW", "manual_review", age_days=200),
        "recent": await add_refund(db, "RECENT", "succeeded", age_days=100),
    }
    assert await purge_audit_events(db, MIN_AUDIT_DAYS, batch=2) == 6
    assert [await events_of(db, r) for r in gone] == [0, 0, 0]
    assert {name: await events_of(db, r) for name, r in kept.items()} == {"open": 2, "review": 2, "recent": 2}
    assert await db.fetchval("SELECT count(*) FROM refunds") == 6  # the refunds themselves stay


async def test_a_refund_that_moved_recently_keeps_its_whole_history(db, make_merchant):
    await make_merchant("m1")
    refund_id = await add_refund(db, "R-1", "succeeded", age_days=300)
    await db.execute("UPDATE refunds SET updated_at = now() - interval '10 days' WHERE refund_id = $1", refund_id)
    assert await purge_audit_events(db, MIN_AUDIT_DAYS) == 0
    assert await events_of(db, refund_id) == 2


@pytest.mark.parametrize("days", [0, 30, 179])
async def test_audit_rows_are_kept_at_least_180_days(db, make_merchant, days):
    await make_merchant("m1")
    refund_id = await add_refund(db, "R-1", "succeeded", age_days=400)
    with pytest.raises(ValueError):
        await purge_audit_events(db, days)
    assert await events_of(db, refund_id) == 2


# --- refundctl ------------------------------------------------------------------------------

def refundctl(database_url, *args):
    return subprocess.run([sys.executable, "-m", "refundctl", *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "DATABASE_URL": database_url}, timeout=60)


async def test_refundctl_purges_old_notification_rows(db, database_url):
    await add_notifications(db, "old-", 3, age_days=31)
    await add_notifications(db, "new-", 2, age_days=1)
    done = await asyncio.to_thread(refundctl, database_url, "notifications", "purge", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"deleted": 3, "older_than_days": 30}
    assert (await count(db, "old-"), await count(db, "new-")) == (0, 2)
    refused = await asyncio.to_thread(refundctl, database_url, "notifications", "purge", "--older-than-days", "7")
    assert refused.returncode == 2 and "at least 30 days" in refused.stderr
