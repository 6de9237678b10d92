"""The notifications table read back for operators.

A notification the receiver kept but could not apply (``unknown``: a refund we never
created or an event type we do not handle; ``mismatch``: it contradicts our record) is
answered 200, so PagoEfectivo will not send it again; an operator has to look at it.
``refundctl notifications list --result unknown`` shows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

# notifications.result values (see events.py); "received" only exists inside the applying transaction
RESULTS = ("applied", "already", "late", "unknown", "mismatch")
DEFAULT_LIMIT = 100


@dataclass(frozen=True)
class StoredNotification:
    merchant_id: str
    operation_number: str
    event_type: str
    result: str
    received_at: datetime
    body: Any

    @property
    def data(self) -> dict:
        data = self.body.get("data") if isinstance(self.body, dict) else None
        return data if isinstance(data, dict) else {}

    @property
    def reference(self) -> str | None:
        """What it is about: the refund's externalRef, else the payment's cip."""
        value = self.data.get("externalRef") or self.data.get("cip")
        return None if value is None else str(value)

    @property
    def amount(self) -> str | None:
        value = self.data.get("refundAmount", self.data.get("amount"))
        return None if value is None else str(value)

    def to_json(self) -> dict:
        return {
            "merchant_id": self.merchant_id,
            "operation_number": self.operation_number,
            "event_type": self.event_type,
            "result": self.result,
            "received_at": self.received_at.isoformat(),
            "reference": self.reference,
            "amount": self.amount,
            "currency": self.data.get("currency"),
            "body": self.body,
        }


async def list_notifications(
    conn: asyncpg.Connection, *, result: str | None = None, merchant_id: str | None = None,
    event_type: str | None = None, limit: int = DEFAULT_LIMIT,
) -> list[StoredNotification]:
    """Newest first."""
    rows = await conn.fetch(
        """SELECT merchant_id, operation_number, event_type, result, received_at, body
             FROM notifications
            WHERE ($1::text IS NULL OR result = $1) AND ($2::text IS NULL OR merchant_id = $2)
              AND ($3::text IS NULL OR event_type = $3)
            ORDER BY received_at DESC, merchant_id, operation_number
            LIMIT $4""",
        result, merchant_id, event_type, limit,
    )
    return [StoredNotification(**row) for row in rows]
