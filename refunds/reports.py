"""The reconciliation export: every refund linked to its original transaction.

Rows stream from a server-side cursor, so a month of refunds never sits in memory;
totals per merchant and currency are summed on the way. The cursor is SQL (DECLARE, FETCH)
rather than asyncpg's, which prepares a named statement: behind a transaction pooler
(DATABASE_POOLER=transaction) that name would outlive the transaction on a shared connection.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

import asyncpg

from .money import format_amount

COLUMNS = (
    "refund_id", "merchant_id", "external_ref", "original_transaction_id", "transaction_code",
    "payment_amount", "payment_currency", "payment_method", "paid_at",
    "amount", "currency", "state", "provider_refund_id", "provider_code", "provider_message",
    "requested_by", "attempts", "created_at", "updated_at", "completed_at",
)

_QUERY = """
SELECT r.refund_id, r.merchant_id, r.external_ref, r.original_transaction_id, p.transaction_code,
       p.amount AS payment_amount, p.currency AS payment_currency, p.method AS payment_method, p.paid_at,
       r.amount, r.currency, r.state, r.provider_refund_id, r.provider_code, r.provider_message,
       r.requested_by, r.attempts, r.created_at, r.updated_at, r.completed_at
FROM refunds r
JOIN payments p ON p.merchant_id = r.merchant_id AND p.transaction_id = r.original_transaction_id
WHERE r.created_at >= $1 AND r.created_at < $2
ORDER BY r.created_at, r.refund_id
"""
_BATCH = 500  # rows per FETCH


@dataclass
class Totals:
    """Per (merchant, currency): how many refunds and how much, by final outcome."""

    rows: dict[tuple[str, str], dict[str, Decimal | int]] = field(
        default_factory=lambda: defaultdict(lambda: {"refunds": 0, "requested": Decimal(0), "succeeded": Decimal(0)})
    )

    def add(self, row: dict) -> None:
        entry = self.rows[(row["merchant_id"], row["currency"])]
        entry["refunds"] += 1
        entry["requested"] += row["amount"]
        if row["state"] == "succeeded":
            entry["succeeded"] += row["amount"]

    def to_json(self) -> list[dict]:
        return [
            {"merchant_id": merchant, "currency": currency, "refunds": values["refunds"],
             "requested": format_amount(values["requested"]), "succeeded": format_amount(values["succeeded"])}
            for (merchant, currency), values in sorted(self.rows.items())
        ]


async def refund_rows(conn: asyncpg.Connection, date_from: datetime, date_to: datetime,
                      totals: Totals | None = None) -> AsyncIterator[dict]:
    """Every refund created in [date_from, date_to), with its payment, as plain values."""
    if date_from.tzinfo is None or date_to.tzinfo is None:
        raise ValueError("report bounds must be timezone-aware")
    async with conn.transaction(readonly=True, isolation="repeatable_read"):
        await conn.execute(f"DECLARE refund_report NO SCROLL CURSOR FOR {_QUERY}", date_from, date_to)
        while records := await conn.fetch(f"FETCH {_BATCH} FROM refund_report"):
            for record in records:
                row = dict(record)
                if totals is not None:
                    totals.add(row)
                yield row


def as_text(row: dict) -> dict[str, str]:
    """A row with every value as text: amounts with two places, times in ISO 8601."""
    out = {}
    for name in COLUMNS:
        value = row[name]
        if isinstance(value, Decimal):
            out[name] = format_amount(value)
        elif isinstance(value, datetime):
            out[name] = value.isoformat()
        else:
            out[name] = "" if value is None else str(value)
    return out
