"""The whole system as separate processes: `refundctl demo` against the session's Postgres and Redis."""

import os
import re
import subprocess
import sys
from decimal import Decimal

import pytest


@pytest.mark.slow
async def test_demo_every_service_in_its_own_process(db, database_url, redis_url, tmp_path):
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url}
    env.pop("REFUNDS_DEMO_LOG_DIR", None)
    run = subprocess.run(
        [sys.executable, "-m", "refundctl", "demo", "--refunds", "90", "--merchants", "3",
         "--log-dir", str(tmp_path / "logs")],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    kept = {path.name for path in (tmp_path / "logs").glob("*.log")}  # kept where --log-dir says, after the run
    assert kept >= {"intake.log", "receiver.log", "worker.log", "scheduler.log", "sandbox.log"}, kept
    assert re.search(r"ledger agrees with database\s*│\s*yes", run.stdout)
    assert re.search(r"final state: succeeded\s*│\s*87", run.stdout)
    # the database agrees with itself: every refund final, every payment's reserve equals its refunds
    states = dict(await db.fetch("SELECT state, count(*) FROM refunds GROUP BY state"))
    assert states == {"succeeded": 87}
    mismatched = await db.fetch(
        """SELECT p.transaction_id FROM payments p
           LEFT JOIN refunds r ON r.merchant_id = p.merchant_id AND r.original_transaction_id = p.transaction_id
                               AND r.state NOT IN ('failed', 'rejected')
           GROUP BY p.merchant_id, p.transaction_id, p.refunded_amount
           HAVING p.refunded_amount <> COALESCE(sum(r.amount), 0)""")
    assert mismatched == []
    assert await db.fetchval("SELECT count(*) FROM notifications WHERE event_type = 'refund.succeeded'") == 87
    assert await db.fetchval("SELECT sum(amount) FROM payments WHERE transaction_id LIKE 'OLD-%'") == Decimal("900.00")
