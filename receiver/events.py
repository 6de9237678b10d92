"""What a PagoEfectivo notification means, and applying it exactly once.

A notification is first read into a typed event (``parse``), so that anything the
receiver cannot interpret is refused with 400 before a row is written. ``store_and_apply``
then inserts the ``notifications`` row and applies the event in one transaction: the row's
primary key (merchant, operationNumber) is the deduplication, so a redelivered or
concurrently delivered notification finds the row (or waits for the first delivery's
transaction) and applies nothing again.

What happened is kept in ``notifications.result``:

- ``applied``   the event changed something (payment recorded, refund moved to final)
- ``already``   the database already said so (payment recorded before, refund already in
                that state, e.g. settled by the gateway's synchronous answer)
- ``late``      the refund is in another state this event may not move it from (a late or
                reordered event); nothing changed
- ``unknown``   an event type we do not handle, or a refund we never created
- ``mismatch``  the event contradicts our record (amount, currency, merchant, payment);
                nothing changed, a warning is logged for an operator

The metric ``refund_notifications_total`` has fewer results (CONTRACT §5); ``METRIC_RESULT``
maps them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg

from pagoefectivo.protocol import LIMA, dumps, loads, parse_timestamp
from refunds.errors import RefundRefused
from refunds.money import parse_amount, parse_currency
from refunds.payments import METHODS, record_payment
from refunds.records import Refund, find_by_external_ref
from refunds.states import transition

log = logging.getLogger(__name__)

ACTOR = "notification"
CIP_PAID = "cip.paid"
REFUND_TARGETS = {"refund.succeeded": "succeeded", "refund.failed": "failed"}
KNOWN_EVENTS = frozenset({CIP_PAID, *REFUND_TARGETS})
MAX_IDENTIFIER = 128  # operationNumber, cip, externalRef...: they are looked up through btree indexes
MAX_EVENT_TYPE = 64
EARLIEST_PAYMENT = datetime(2000, 1, 1, tzinfo=timezone.utc)
CLOCK_SLACK = timedelta(days=1)  # a paymentDate further in the future than this is not believed

METRIC_RESULT = {
    "applied": "applied",
    "already": "applied",
    "late": "duplicate",
    "duplicate": "duplicate",
    "unknown": "unknown",
    "mismatch": "unknown",
}


def event_label(event_type: str | None) -> str:
    """The bounded ``event_type`` metric label: a known type, else ``other``."""
    return event_type if event_type in KNOWN_EVENTS else "other"


class Malformed(ValueError):
    """The body is not a notification we can read; answer 400 and write nothing."""

    def __init__(self, message: str, event_type: str | None = None):
        super().__init__(message)
        self.event_type = event_type


# --- reading --------------------------------------------------------------------------

@dataclass(frozen=True)
class CipPaid:
    cip: str
    amount: Decimal
    currency: str
    method: str
    paid_at: datetime | None
    transaction_code: str | None
    merchant_id: str | None


@dataclass(frozen=True)
class RefundOutcome:
    to_state: str
    external_ref: str
    amount: Decimal
    currency: str
    provider_refund_id: str | None
    original_transaction_id: str | None
    merchant_id: str | None
    code: str | None
    reason: str | None


@dataclass(frozen=True)
class Notification:
    operation_number: str
    event_type: str
    event: CipPaid | RefundOutcome | None  # None: a type this receiver does not handle
    body_json: str  # the body as stored in notifications.body (amounts kept as Decimal)


def parse(raw: bytes) -> Notification:
    """Read a notification body (Decimal numbers) or raise Malformed."""
    try:
        body = loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, too-long ints, too deep
        raise Malformed("body is not JSON") from None
    if not isinstance(body, dict):
        raise Malformed("body is not a JSON object")
    event_type = body.get("eventType")
    if not isinstance(event_type, str) or not event_type or len(event_type) > MAX_EVENT_TYPE:
        raise Malformed("eventType is missing or invalid")
    operation_number = _identifier(body.get("operationNumber"), "operationNumber", event_type)
    data = body.get("data")
    if not isinstance(data, dict):
        raise Malformed("data is missing or not an object", event_type)
    try:
        if event_type == CIP_PAID:
            event: CipPaid | RefundOutcome | None = _cip_paid(data)
        elif event_type in REFUND_TARGETS:
            event = _refund_outcome(data, REFUND_TARGETS[event_type])
        else:
            event = None
    except Malformed as exc:
        raise Malformed(str(exc), event_type) from None
    except RefundRefused as exc:  # from the shared money parsers
        raise Malformed(f"data.{exc.field}: {exc.message}", event_type) from None
    try:
        body_json = dumps(body).decode("utf-8")
    except ValueError:  # NaN/Infinity, lone surrogates: JSON Python reads but jsonb cannot hold
        raise Malformed("body holds values that cannot be stored (NaN, Infinity or a lone surrogate)",
                        event_type) from None
    return Notification(operation_number, event_type, event, body_json)


def _cip_paid(data: dict) -> CipPaid:
    method = data.get("method") or "cash"
    if method not in METHODS:
        raise Malformed(f"data.method must be one of {', '.join(METHODS)}")
    return CipPaid(
        cip=_identifier(data.get("cip"), "data.cip"),
        amount=parse_amount(data.get("amount"), "amount"),
        currency=parse_currency(data.get("currency"), "currency"),
        method=method,
        paid_at=_payment_date(data.get("paymentDate")),
        transaction_code=_optional_identifier(data.get("transactionCode"), "data.transactionCode"),
        merchant_id=_optional_identifier(data.get("merchantId"), "data.merchantId"),
    )


def _refund_outcome(data: dict, to_state: str) -> RefundOutcome:
    reason = data.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise Malformed("data.reason must be a string")
    return RefundOutcome(
        to_state=to_state,
        external_ref=_identifier(data.get("externalRef"), "data.externalRef"),
        amount=parse_amount(data.get("refundAmount"), "refundAmount"),
        currency=parse_currency(data.get("currency"), "currency"),
        provider_refund_id=_optional_identifier(data.get("refundId"), "data.refundId"),
        original_transaction_id=_optional_identifier(data.get("originalTransactionId"), "data.originalTransactionId"),
        merchant_id=_optional_identifier(data.get("merchantId"), "data.merchantId"),
        code=_optional_identifier(data.get("code"), "data.code"),
        reason=reason or None,
    )


def _identifier(value: Any, name: str, event_type: str | None = None) -> str:
    """A non-empty string or integer id (PagoEfectivo sends some ids as numbers)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise Malformed(f"{name} is missing or invalid", event_type)
    text = str(value)
    if len(text) > MAX_IDENTIFIER:
        raise Malformed(f"{name} is longer than {MAX_IDENTIFIER} characters", event_type)
    return text


def _optional_identifier(value: Any, name: str) -> str | None:
    return None if value is None or value == "" else _identifier(value, name)


def _payment_date(value: Any) -> datetime | None:
    """paymentDate with its offset; one without an offset is Lima time (PagoEfectivo's clock)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise Malformed("data.paymentDate must be an ISO-8601 string")
    try:
        moment = parse_timestamp(value)
    except ValueError:
        try:
            moment = datetime.fromisoformat(value).replace(tzinfo=LIMA)
        except ValueError:
            raise Malformed("data.paymentDate is not an ISO-8601 timestamp") from None
    if not EARLIEST_PAYMENT <= moment <= datetime.now(timezone.utc) + CLOCK_SLACK:
        raise Malformed("data.paymentDate is out of range")
    return moment


# --- applying -------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    result: str                     # notifications.result, or "duplicate" when no row was written
    detail: str | None = None       # for the log line
    completed: Refund | None = None  # a refund this event moved to a final state

    @property
    def metric_result(self) -> str:
        return METRIC_RESULT[self.result]


async def store_and_apply(conn: asyncpg.Connection, merchant_id: str, note: Notification) -> Outcome:
    """Insert the notification row and apply its event, all in one transaction."""
    async with conn.transaction():
        try:
            inserted = await conn.fetchval(
                """INSERT INTO notifications (merchant_id, operation_number, event_type, result, body)
                   VALUES ($1, $2, $3, 'received', $4::text::jsonb)
                   ON CONFLICT (merchant_id, operation_number) DO NOTHING
                   RETURNING true""",
                merchant_id, note.operation_number, note.event_type, note.body_json,
            )
        except asyncpg.DataError as exc:
            # valid JSON that jsonb refuses (\u0000 in a string, a number out of range)
            raise Malformed(f"body cannot be stored: {type(exc).__name__}", note.event_type) from None
        if not inserted:
            return Outcome("duplicate")
        outcome = await _apply(conn, merchant_id, note)
        await conn.execute(
            "UPDATE notifications SET result = $3 WHERE merchant_id = $1 AND operation_number = $2",
            merchant_id, note.operation_number, outcome.result,
        )
    return outcome


async def _apply(conn: asyncpg.Connection, merchant_id: str, note: Notification) -> Outcome:
    if isinstance(note.event, CipPaid):
        return await _apply_payment(conn, merchant_id, note.event)
    if isinstance(note.event, RefundOutcome):
        return await _apply_refund_outcome(conn, merchant_id, note.operation_number, note.event)
    return Outcome("unknown", "event type not handled")


async def _apply_payment(conn: asyncpg.Connection, merchant_id: str, paid: CipPaid) -> Outcome:
    if paid.merchant_id is not None and paid.merchant_id != merchant_id:
        log.warning("cip.paid for cip %s names merchant %r, signed by %r: not recorded",
                    paid.cip, paid.merchant_id, merchant_id)
        return Outcome("mismatch", "merchantId differs from the notify URL's merchant")
    payment, created = await record_payment(
        conn, merchant_id=merchant_id, transaction_id=paid.cip, amount=paid.amount, currency=paid.currency,
        method=paid.method, paid_at=paid.paid_at or datetime.now(timezone.utc),
        transaction_code=paid.transaction_code,
    )
    if created:
        return Outcome("applied", f"payment {paid.cip} recorded")
    if payment.amount == paid.amount and payment.currency == paid.currency:
        return Outcome("already", f"payment {paid.cip} was already recorded")
    log.warning("cip.paid for cip %s of merchant %s differs from the recorded payment (amount/currency)",
                paid.cip, merchant_id)
    return Outcome("mismatch", f"payment {paid.cip} recorded earlier with other terms")


async def _apply_refund_outcome(
    conn: asyncpg.Connection, merchant_id: str, operation_number: str, ev: RefundOutcome
) -> Outcome:
    refund = await find_by_external_ref(conn, merchant_id, ev.external_ref)
    if refund is None:
        return Outcome("unknown", "no refund with this externalRef")
    differs = [
        name for name, ours, theirs in (
            ("refundAmount", refund.amount, ev.amount),
            ("currency", refund.currency, ev.currency),
            ("merchantId", refund.merchant_id, ev.merchant_id),
            ("originalTransactionId", refund.original_transaction_id, ev.original_transaction_id),
        )
        if theirs is not None and ours != theirs
    ]
    if differs:
        log.warning("notification %s for refund %s contradicts our record (%s): not applied",
                    operation_number, refund.refund_id, ", ".join(differs))
        return Outcome("mismatch", f"refund {refund.refund_id}: {', '.join(differs)} differ")
    moved = await transition(
        conn, refund.refund_id, ev.to_state, actor=ACTOR, code=ev.code, message=ev.reason,
        provider_refund_id=ev.provider_refund_id,
    )
    if moved is not None:
        return Outcome("applied", f"refund {refund.refund_id} {refund.state} -> {ev.to_state}", completed=moved)
    current = await find_by_external_ref(conn, merchant_id, ev.external_ref)
    state = current.state if current else refund.state
    if state == ev.to_state:
        return Outcome("already", f"refund {refund.refund_id} already {state}")
    return Outcome("late", f"refund {refund.refund_id} is {state}; {ev.to_state} not applied")
