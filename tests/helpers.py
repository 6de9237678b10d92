"""Helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

from refunds.payments import record_payment

ROOT = Path(__file__).resolve().parent.parent  # the project's checkout
FIXTURES = ROOT / "tests" / "fixtures"


async def paid(db, merchant: str = "m1", transaction: str = "CIP-1", amount: str = "100.00", *,
               currency: str = "PEN", method: str = "cash", days_ago: float = 0):
    """A paid transaction in our database (what a cip.paid notification records), paid
    ``days_ago`` days ago; returns the payment."""
    payment, _ = await record_payment(
        db, merchant_id=merchant, transaction_id=transaction, amount=Decimal(amount), currency=currency,
        method=method, paid_at=datetime.now(timezone.utc) - timedelta(days=days_ago))
    return payment
