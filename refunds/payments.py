"""Original paid transactions (PagoEfectivo CIPs) that refunds are checked against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

from .money import format_amount

METHODS = ("cash", "bank_transfer")


@dataclass(frozen=True)
class Payment:
    merchant_id: str
    transaction_id: str
    amount: Decimal
    currency: str
    method: str
    paid_at: datetime
    refunded_amount: Decimal
    transaction_code: str | None = None

    @property
    def refundable(self) -> Decimal:
        return self.amount - self.refunded_amount

    def to_json(self) -> dict:
        return {
            "merchant_id": self.merchant_id,
            "transaction_id": self.transaction_id,
            "amount": format_amount(self.amount),
            "currency": self.currency,
            "method": self.method,
            "paid_at": self.paid_at.isoformat(),
            "refunded_amount": format_amount(self.refunded_amount),
            "transaction_code": self.transaction_code,
        }


_FIELDS = ("merchant_id", "transaction_id", "amount", "currency", "method", "paid_at", "refunded_amount",
           "transaction_code")
_COLUMNS = ", ".join(_FIELDS)


async def record_payment(
    conn: asyncpg.Connection,
    *,
    merchant_id: str,
    transaction_id: str,
    amount: Decimal,
    currency: str,
    method: str = "cash",
    paid_at: datetime,
    transaction_code: str | None = None,
) -> tuple[Payment, bool]:
    """Record a paid transaction once; returns it and whether this call created it."""
    if paid_at.tzinfo is None:
        raise ValueError("paid_at must be timezone-aware")
    row = await conn.fetchrow(
        f"""INSERT INTO payments (merchant_id, transaction_id, amount, currency, method, paid_at, transaction_code)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            ON CONFLICT (merchant_id, transaction_id) DO NOTHING
            RETURNING {_COLUMNS}""",
        merchant_id, transaction_id, amount, currency, method, paid_at, transaction_code,
    )
    if row is not None:
        return Payment(**row), True
    return await get_payment(conn, merchant_id, transaction_id), False


async def find_payment(conn: asyncpg.Connection, merchant_id: str, transaction_id: str) -> Payment | None:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM payments WHERE merchant_id = $1 AND transaction_id = $2",
        merchant_id, transaction_id,
    )
    return Payment(**row) if row else None


async def find_payments(conn: asyncpg.Connection, keys: Sequence[tuple[str, str]]) -> list[Payment | None]:
    """``find_payment`` for many (merchant_id, transaction_id) keys in one statement, in order."""
    rows = await conn.fetch(
        f"""SELECT k.i, p.* FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k (m, t, i)
            -- one index lookup per key (LIMIT keeps it one whatever unnest's guessed row count)
            CROSS JOIN LATERAL (SELECT {_COLUMNS} FROM payments
                                WHERE merchant_id = k.m AND transaction_id = k.t LIMIT 1) p""",
        [merchant_id for merchant_id, _ in keys], [transaction_id for _, transaction_id in keys],
    )
    found = {row["i"]: Payment(**{name: row[name] for name in _FIELDS}) for row in rows}
    return [found.get(i) for i in range(1, len(keys) + 1)]


async def get_payment(conn: asyncpg.Connection, merchant_id: str, transaction_id: str) -> Payment:
    payment = await find_payment(conn, merchant_id, transaction_id)
    assert payment is not None, "payment vanished"
    return payment


async def list_payments(conn: asyncpg.Connection, merchant_id: str | None = None) -> list[Payment]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM payments WHERE $1::text IS NULL OR merchant_id = $1 ORDER BY recorded_at, transaction_id",
        merchant_id,
    )
    return [Payment(**row) for row in rows]
