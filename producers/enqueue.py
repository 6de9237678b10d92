"""Accept a refund request: validate it against its payment, store it, then deliver it.

The same function serves the intake API, the CLI, CSV import and Python callers, so
every door has the same validation and the same idempotency.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import asyncpg

from refunds import metrics
from refunds.errors import IdempotencyConflict, RefundRefused
from refunds.merchants import find_merchant
from refunds.money import format_amount, parse_amount, parse_currency
from refunds.payments import find_payment
from refunds.records import Refund, find_by_external_ref, from_row, COLUMNS
from refunds.settings import get_settings
from refunds.states import record_event

from .delivery import deliver

EXTERNAL_REF = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_REASON = 255


@dataclass(frozen=True)
class EnqueueResult:
    refund: Refund
    created: bool  # False: an identical earlier request (replay)

    @property
    def http_status(self) -> int:
        return 202 if self.created else 200

    def to_json(self) -> dict:
        return {"refund_id": str(self.refund.refund_id), "external_ref": self.refund.external_ref, "state": self.refund.state}


@dataclass(frozen=True)
class RefundRequest:
    merchant_id: str
    original_transaction_id: str
    amount: Decimal
    currency: str
    external_ref: str
    reason: str | None = None

    @classmethod
    def parse(cls, *, merchant_id, original_transaction_id, amount, currency, external_ref, reason=None) -> "RefundRequest":
        """Check the shape of each field; raise RefundRefused naming the first bad one."""
        for name, value in (("merchant_id", merchant_id), ("original_transaction_id", original_transaction_id)):
            if not isinstance(value, str) or not value.strip() or len(value) > 64:
                raise RefundRefused("invalid_field", f"{name} must be a non-empty string of at most 64 characters", name)
        if not isinstance(external_ref, str) or not EXTERNAL_REF.fullmatch(external_ref):
            raise RefundRefused(
                "invalid_field", "external_ref must be 1-64 characters of letters, digits, and _ . : -", "external_ref"
            )
        if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON):
            raise RefundRefused("invalid_field", f"reason must be a string of at most {MAX_REASON} characters", "reason")
        return cls(
            merchant_id=merchant_id.strip(), original_transaction_id=original_transaction_id.strip(),
            amount=parse_amount(amount), currency=parse_currency(currency), external_ref=external_ref,
            reason=(reason or None),
        )


async def enqueue_refund(
    pool: asyncpg.Pool | asyncpg.Connection,
    *,
    merchant_id: str,
    original_transaction_id: str,
    amount: Decimal | str,
    currency: str,
    external_ref: str,
    reason: str | None = None,
    requested_by: str | None = None,
    now: datetime | None = None,
) -> EnqueueResult:
    """Validate and accept one refund; deliver it to the workers after COMMIT.

    Raises RefundRefused (422-like: nothing written) or IdempotencyConflict (409-like).
    """
    try:
        request = RefundRequest.parse(
            merchant_id=merchant_id, original_transaction_id=original_transaction_id, amount=amount,
            currency=currency, external_ref=external_ref, reason=reason,
        )
        result = await _accept(pool, request, requested_by, now or datetime.now(timezone.utc))
    except RefundRefused as refused:
        metrics.refunds_rejected_total.labels(refused.code).inc()
        raise
    if result.created:
        metrics.refunds_accepted_total.labels(metrics.merchant_label(request.merchant_id)).inc()
        if result.refund.state == "queued":
            await asyncio.to_thread(deliver, result.refund.refund_id)
    return result


async def _accept(pool, request: RefundRequest, requested_by: str | None, now: datetime) -> EnqueueResult:
    if isinstance(pool, asyncpg.Connection):
        return await _accept_on(pool, request, requested_by, now)
    async with pool.acquire() as conn:
        return await _accept_on(conn, request, requested_by, now)


async def _accept_on(conn: asyncpg.Connection, request: RefundRequest, requested_by: str | None, now: datetime) -> EnqueueResult:
    existing = await find_by_external_ref(conn, request.merchant_id, request.external_ref)
    if existing is not None:
        return _replay(existing, request)
    state = await _validate(conn, request, now)
    try:
        async with conn.transaction():
            row = await conn.fetchrow(
                f"""INSERT INTO refunds (refund_id, merchant_id, external_ref, original_transaction_id, amount,
                                         currency, reason, state, requested_by)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {COLUMNS}""",
                uuid.uuid4(), request.merchant_id, request.external_ref, request.original_transaction_id,
                request.amount, request.currency, request.reason, state, requested_by,
            )
            refund = from_row(row)
            await record_event(conn, refund.refund_id, None, state, actor=requested_by or "producer", message="accepted")
    except asyncpg.UniqueViolationError:
        # a concurrent request with the same external_ref won the race
        existing = await find_by_external_ref(conn, request.merchant_id, request.external_ref)
        assert existing is not None
        return _replay(existing, request)
    except asyncpg.CheckViolationError as exc:
        if exc.constraint_name != "refunds_within_paid_amount":
            raise
        payment = await find_payment(conn, request.merchant_id, request.original_transaction_id)
        left = format_amount(payment.refundable) if payment else "0.00"
        raise RefundRefused(
            "amount_over_refundable", f"amount {request.amount} is over the {left} still refundable on this payment", "amount"
        ) from None
    return EnqueueResult(refund, created=True)


def _replay(existing: Refund, request: RefundRequest) -> EnqueueResult:
    if existing.same_terms(
        original_transaction_id=request.original_transaction_id, amount=request.amount,
        currency=request.currency, reason=request.reason,
    ):
        return EnqueueResult(existing, created=False)
    raise IdempotencyConflict(
        f"external_ref {request.external_ref!r} was already used by this merchant for a different refund"
    )


async def _validate(conn: asyncpg.Connection, request: RefundRequest, now: datetime) -> str:
    """Check the request against the merchant and the payment; return the initial state."""
    merchant = await find_merchant(conn, request.merchant_id)
    if merchant is None:
        raise RefundRefused("unknown_merchant", f"merchant {request.merchant_id!r} does not exist", "merchant_id")
    if merchant.refund_mode == "off":
        raise RefundRefused("refunds_disabled", f"refunds are switched off for merchant {request.merchant_id!r}", "merchant_id")
    payment = await find_payment(conn, request.merchant_id, request.original_transaction_id)
    if payment is None:
        raise RefundRefused(
            "unknown_transaction",
            f"transaction {request.original_transaction_id!r} is unknown or not paid for this merchant",
            "original_transaction_id",
        )
    if payment.currency != request.currency:
        raise RefundRefused(
            "currency_mismatch", f"currency {request.currency} differs from the payment's {payment.currency}", "currency"
        )
    window_days = get_settings().refund_window_days.get(payment.method, 90)
    closes = payment.paid_at + timedelta(days=window_days)
    if now > closes:
        raise RefundRefused(
            "refund_window_closed",
            f"the {window_days}-day refund window for {payment.method} payments closed on {closes.date().isoformat()}",
            "original_transaction_id",
        )
    if request.amount > payment.refundable:
        raise RefundRefused(
            "amount_over_refundable",
            f"amount {request.amount} is over the {format_amount(payment.refundable)} still refundable on this payment",
            "amount",
        )
    needs_approval = merchant.refund_mode == "approval" or (
        merchant.approval_threshold is not None and request.amount > merchant.approval_threshold
    )
    return "awaiting_approval" if needs_approval else "queued"
