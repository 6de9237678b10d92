"""What a PagoEfectivo notification means, and applying it exactly once.

A notification is first read into a typed event (``parse``), so that anything the
receiver cannot interpret is refused with 400 before a row is written. ``store_and_apply``
then writes the ``notifications`` row and applies the event atomically (one statement;
``store_payments`` and ``store_refund_outcomes`` do it for many notifications of a kind at
once, see batch.py): the row's primary key (merchant, operationNumber) is the deduplication,
so a redelivered or concurrently delivered notification finds the row (or loses the race to
insert it, and then changes nothing) and applies nothing again.

What happened is kept in ``notifications.result``:

- ``applied``   the event changed something (payment recorded, refund moved to final)
- ``already``   the database already said so (payment recorded before, refund already in
                that state, e.g. settled by the gateway's synchronous answer)
- ``late``      the gateway contradicts a state of ours this event may not move it from:
                ``MOVES`` lets an outcome settle any refund that was sent and is not final,
                so this is a success for a refund we hold ``failed`` (money went out while its
                amount was given back to the payment), a failure for one we hold
                ``succeeded`` (the customer was not refunded), or either for one we never
                sent (``awaiting_approval``, ``rejected``). Never a harmless reordering:
                nothing changed, it is logged at ERROR and counted in
                ``refund_outcome_contradictions_total``, which pages (docs/OPERATIONS.md
                RefundOutcomeContradiction). The stored name stays ``late`` for the rows
                and ``refundctl notifications list --result late`` that already use it.
- ``unknown``   an event type we do not handle, or a refund we never created
- ``mismatch``  the event contradicts our record (amount, currency, merchant, payment);
                nothing changed, a warning is logged for an operator

The metric ``refund_notifications_total`` has fewer results (docs/OPERATIONS.md); ``METRIC_RESULT``
maps them. ``late`` counts there as ``unknown``: kept, not applied, for a person.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

from pagoefectivo.protocol import LIMA, dumps, loads, parse_timestamp
from refunds import metrics
from refunds.errors import RefundRefused
from refunds.money import parse_amount, parse_currency
from refunds.payments import METHODS
from refunds.records import Refund, from_row
from refunds.states import STATES, Move, move_parameters, moved_if, sources_of

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
    "late": "unknown",  # a contradiction, not a duplicate: refund_outcome_contradictions_total counts it
    "duplicate": "duplicate",
    "unknown": "unknown",
    "mismatch": "unknown",
}
# (our state, the gateway's) of every ``late`` verdict: the states an outcome may not move a
# refund from, other than that outcome itself. The labels of refund_outcome_contradictions_total.
CONTRADICTIONS = tuple((ours, gateway) for gateway in REFUND_TARGETS.values() for ours in STATES
                       if ours != gateway and ours not in sources_of(gateway))


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
#
# Every round trip to Postgres costs more than everything else a notification needs, so each
# kind is stored with as few as possible: an unhandled type is one INSERT; payments are one
# statement (dedup row and payment together, atomic as any single statement); refund outcomes
# are one read (seen before? which refund?) and, when there is something to write, one
# statement holding the state machine's moves and the dedup rows. The receiver stores the
# payments, and the refund outcomes, that arrive together with those same statements (see
# batch.py). A duplicate costs one statement and writes nothing.

@dataclass(frozen=True)
class Outcome:
    result: str                     # notifications.result, or "duplicate" when no row was written
    detail: str | None = None       # for the log line
    completed: Refund | None = None  # a refund this event moved to a final state

    @property
    def metric_result(self) -> str:
        return METRIC_RESULT[self.result]


DUPLICATE = Outcome("duplicate")


async def store_and_apply(conn: asyncpg.Connection, merchant_id: str, note: Notification) -> Outcome:
    """Store the notification row and apply its event once; ``duplicate`` when stored before."""
    try:
        if isinstance(note.event, CipPaid):
            [outcome] = await store_payments(conn, [(merchant_id, note)])
            return outcome
        if isinstance(note.event, RefundOutcome):
            [outcome] = await store_refund_outcomes(conn, [(merchant_id, note)])
            return outcome
        return await _store(conn, merchant_id, note, Outcome("unknown", "event type not handled"))
    except asyncpg.DataError as exc:
        # what the sender wrote and Postgres refuses: \u0000 in a string, a number jsonb cannot hold
        raise Malformed(f"body cannot be stored: {type(exc).__name__}", note.event_type) from None


_STORE = """
INSERT INTO notifications (merchant_id, operation_number, event_type, result, body)
VALUES ($1, $2, $3, $4, $5::text::jsonb)
ON CONFLICT (merchant_id, operation_number) DO NOTHING
RETURNING true"""


async def _store(conn: asyncpg.Connection, merchant_id: str, note: Notification, outcome: Outcome) -> Outcome:
    """Only the row (nothing to apply): ``outcome``, or DUPLICATE if it was there."""
    stored = await conn.fetchval(_STORE, merchant_id, note.operation_number, note.event_type, outcome.result,
                                 note.body_json)
    return outcome if stored else DUPLICATE


# cip.paid, for one or many notifications at once (receiver.batch gathers those that arrive
# together): the verdict comes from the payment as it was before the statement; a payment is
# inserted only where the same statement inserted the notification row with the verdict
# "applied". (The same INSERT as refunds.payments.record_payment, made part of the statement.)
# A batch never holds the same notification or the same payment twice (see batch.py), and
# rows are inserted in key order, so that two batches running at once cannot deadlock.
_PAYMENTS = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::numeric[], $7::text[],
                         $8::text[], $9::timestamptz[], $10::text[], $11::bool[])
           WITH ORDINALITY AS i (merchant_id, operation_number, event_type, body, cip, amount, currency,
                                 method, paid_at, transaction_code, same_merchant, n)
), verdict AS (
    SELECT i.*, CASE WHEN NOT i.same_merchant THEN 'mismatch'
                     WHEN p.transaction_id IS NULL THEN 'applied'
                     WHEN p.amount = i.amount AND p.currency = i.currency THEN 'already'
                     ELSE 'mismatch' END AS result
      FROM input i
      LEFT JOIN payments p ON p.merchant_id = i.merchant_id AND p.transaction_id = i.cip
), note AS (
    INSERT INTO notifications (merchant_id, operation_number, event_type, result, body)
    SELECT merchant_id, operation_number, event_type, result, body::jsonb FROM verdict
     ORDER BY merchant_id, operation_number
    ON CONFLICT (merchant_id, operation_number) DO NOTHING
    RETURNING merchant_id, operation_number, result
), paid AS (
    INSERT INTO payments (merchant_id, transaction_id, amount, currency, method, paid_at, transaction_code)
    SELECT v.merchant_id, v.cip, v.amount, v.currency, v.method, v.paid_at, v.transaction_code
      FROM verdict v JOIN note USING (merchant_id, operation_number)
     WHERE note.result = 'applied'
     ORDER BY v.merchant_id, v.cip
    ON CONFLICT (merchant_id, transaction_id) DO NOTHING
    RETURNING merchant_id, transaction_id
)
SELECT v.n, note.result, paid.transaction_id IS NOT NULL AS recorded
  FROM verdict v
  LEFT JOIN note USING (merchant_id, operation_number)
  LEFT JOIN paid ON paid.merchant_id = v.merchant_id AND paid.transaction_id = v.cip
 ORDER BY v.n"""


async def store_payments(conn: asyncpg.Connection, notes: list[tuple[str, Notification]]) -> list[Outcome]:
    """Store and apply cip.paid notifications ``(merchant_id, note)`` with one statement.

    Raises ``asyncpg.DataError`` for the whole batch when Postgres refuses one of the bodies
    (the caller stores them one by one to find it).
    """
    _meet(merchant_id for merchant_id, _ in notes)
    now = datetime.now(timezone.utc)
    columns: list[list] = [[] for _ in range(11)]
    for merchant_id, note in notes:
        paid = note.event
        assert isinstance(paid, CipPaid)
        for column, value in zip(columns, (
            merchant_id, note.operation_number, note.event_type, note.body_json, paid.cip, paid.amount,
            paid.currency, paid.method, paid.paid_at or now, paid.transaction_code,
            paid.merchant_id is None or paid.merchant_id == merchant_id,
        ), strict=True):
            column.append(value)
    rows = await conn.fetch(_PAYMENTS, *columns)
    outcomes = []
    for (merchant_id, note), row in zip(notes, rows, strict=True):
        result = row["result"]
        if result == "applied" and not row["recorded"]:
            # another notification recorded this cip between our read and our insert: judge again
            result = await _payment_recorded_meanwhile(conn, merchant_id, note, note.event)
        outcomes.append(_payment_outcome(merchant_id, note.event, result))
    return outcomes


def _meet(merchant_ids) -> None:
    """Contradiction series at 0 for a merchant added since the receiver started (those of the store
    then were made at start), before its first contradiction: one born at 1 shows no increase()."""
    metrics.initialise_contradiction_series(merchant_ids, CONTRADICTIONS)


def _payment_outcome(merchant_id: str, paid: CipPaid, result: str | None) -> Outcome:
    if result is None:
        return DUPLICATE
    if result == "applied":
        return Outcome("applied", f"payment {paid.cip} recorded")
    if result == "already":
        return Outcome("already", f"payment {paid.cip} was already recorded")
    if paid.merchant_id is not None and paid.merchant_id != merchant_id:
        log.warning("cip.paid for cip %s names merchant %r, signed by %r: not recorded",
                    paid.cip, paid.merchant_id, merchant_id)
        return Outcome("mismatch", "merchantId differs from the notify URL's merchant")
    log.warning("cip.paid for cip %s of merchant %s differs from the recorded payment (amount/currency)",
                paid.cip, merchant_id)
    return Outcome("mismatch", f"payment {paid.cip} recorded earlier with other terms")


async def _payment_recorded_meanwhile(conn: asyncpg.Connection, merchant_id: str, note: Notification,
                                      paid: CipPaid) -> str:
    result = await conn.fetchval(
        """UPDATE notifications n
              SET result = CASE WHEN p.amount = $4 AND p.currency = $5 THEN 'already' ELSE 'mismatch' END
             FROM payments p
            WHERE n.merchant_id = $1 AND n.operation_number = $2 AND p.merchant_id = $1 AND p.transaction_id = $3
        RETURNING n.result""",
        merchant_id, note.operation_number, paid.cip, paid.amount, paid.currency,
    )
    return result or "applied"


# refund outcomes, for one or many notifications at once (receiver.batch gathers those that
# arrive together): first one read, which of them were seen before and the refund each names
# (terms never change after acceptance, so reading them outside the transaction is safe; the
# move itself is conditional), then one statement storing the others.
_REFUND_LOOKUP = """
SELECT EXISTS (SELECT 1 FROM notifications n
                WHERE n.merchant_id = i.merchant_id AND n.operation_number = i.operation_number) AS seen,
       r.refund_id, r.state, r.amount, r.currency, r.merchant_id, r.original_transaction_id
  FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS i (merchant_id, operation_number, external_ref, n)
  LEFT JOIN refunds r ON r.merchant_id = i.merchant_id AND r.external_ref = i.external_ref
 ORDER BY i.n"""


# The moves and the notification rows in one statement (one round trip, atomic): each row is
# stored with the verdict its locked refund's state gives ("applied" when the state machine
# allows the move, "already" when the refund is in that state, "late" (a contradiction)
# otherwise; "unknown" if the refund is gone), or with the verdict given (``given``: "unknown",
# "mismatch") when there is nothing to move; a refund moves only if its notification's row is
# new: a concurrent delivery that stored it first wins, and this one changes nothing. A batch
# never holds the same notification or the same refund twice (see batch.py), so each refund has
# at most one row here; refunds are locked in id order and rows inserted in key order, so two
# batches running at once do not wait on each other in a cycle through them. Beside the state
# machine's moves, the notifications: for each, the refund it would move (NULL when none) and
# to what.
_MOVE_AND_STORE = moved_if(
    """input AS (SELECT * FROM unnest($note_merchant_ids::text[], $operation_numbers::text[],
                                     $event_types::text[], $bodies::text[], $note_refund_ids::uuid[],
                                     $note_to_states::text[], $given::text[])
                        WITH ORDINALITY AS i (merchant_id, operation_number, event_type, body, refund_id,
                                              to_state, given, n)),
       verdict AS (SELECT i.*, previous.state AS was,
                          CASE WHEN i.given IS NOT NULL THEN i.given
                               WHEN previous.state IS NULL THEN 'unknown'
                               WHEN previous.state || '>' || i.to_state = ANY($allowed::text[]) THEN 'applied'
                               WHEN previous.state = i.to_state THEN 'already' ELSE 'late' END AS result
                     FROM input i LEFT JOIN previous USING (refund_id)),
       stored AS (INSERT INTO notifications (merchant_id, operation_number, event_type, result, body)
                  SELECT merchant_id, operation_number, event_type, result, body::jsonb FROM verdict
                   ORDER BY merchant_id, operation_number
                  ON CONFLICT (merchant_id, operation_number) DO NOTHING
                  RETURNING merchant_id, operation_number, result),""",
    """EXISTS (SELECT 1 FROM stored JOIN verdict USING (merchant_id, operation_number)
                WHERE verdict.refund_id = previous.refund_id)""",
    """SELECT v.n, v.was, stored.result AS stored, moved.*
         FROM verdict v
         LEFT JOIN stored USING (merchant_id, operation_number)
         LEFT JOIN moved ON moved.refund_id = v.refund_id
        ORDER BY v.n""",
)


@dataclass(frozen=True)
class _ToStore:
    """A refund outcome not seen before: the refund it names, and the verdict the lookup already
    gives it (None: the locked refund's state decides, and the refund moves if it may)."""
    merchant_id: str
    note: Notification
    refund_id: UUID | None
    given: Outcome | None = None
    differs: tuple[str, ...] = ()

    @property
    def moves(self) -> bool:
        return self.given is None


async def store_refund_outcomes(conn: asyncpg.Connection, notes: list[tuple[str, Notification]]) -> list[Outcome]:
    """Store and apply refund outcomes ``(merchant_id, note)``: one read, then one statement.

    The batch must not hold the same notification or the same externalRef twice (batch.py).
    Raises ``asyncpg.DataError`` for the whole batch when Postgres refuses one of the bodies
    (the caller stores them one by one to find it).
    """
    _meet(merchant_id for merchant_id, _ in notes)
    found = await conn.fetch(_REFUND_LOOKUP, [merchant_id for merchant_id, _ in notes],
                             [note.operation_number for _, note in notes],
                             [_refund_event(note).external_ref for _, note in notes])
    outcomes: list[Outcome] = [DUPLICATE] * len(notes)  # seen before: nothing to write
    to_store = {index: _judge(merchant_id, note, row)
                for index, ((merchant_id, note), row) in enumerate(zip(notes, found, strict=True)) if not row["seen"]}
    if to_store:
        stored = await conn.fetch(_MOVE_AND_STORE.text,
                                  *_MOVE_AND_STORE.args(**_move_and_store_parameters(list(to_store.values()))))
        for (index, pending), row in zip(to_store.items(), stored, strict=True):
            outcomes[index] = _stored_outcome(pending, row)
    return outcomes


def _refund_event(note: Notification) -> RefundOutcome:
    assert isinstance(note.event, RefundOutcome)
    return note.event


def _judge(merchant_id: str, note: Notification, found: asyncpg.Record) -> _ToStore:
    """What the lookup already decides: an unknown refund, or terms that contradict ours."""
    ev = _refund_event(note)
    refund_id = found["refund_id"]
    if refund_id is None:
        return _ToStore(merchant_id, note, None, Outcome("unknown", "no refund with this externalRef"))
    differs = tuple(
        name for name, ours, theirs in (
            ("refundAmount", found["amount"], ev.amount),
            ("currency", found["currency"], ev.currency),
            ("merchantId", found["merchant_id"], ev.merchant_id),
            ("originalTransactionId", found["original_transaction_id"], ev.original_transaction_id),
        )
        if theirs is not None and ours != theirs
    )
    if differs:
        return _ToStore(merchant_id, note, refund_id,
                        Outcome("mismatch", f"refund {refund_id}: {', '.join(differs)} differ"), differs)
    return _ToStore(merchant_id, note, refund_id)


def _move_and_store_parameters(pending: list[_ToStore]) -> dict:
    moves = [Move(p.refund_id, ev.to_state, ev.code, ev.reason, ev.provider_refund_id)
             for p in pending if p.moves for ev in [_refund_event(p.note)]]
    return {
        **move_parameters(moves, actor=ACTOR),
        "note_merchant_ids": [p.merchant_id for p in pending],
        "operation_numbers": [p.note.operation_number for p in pending],
        "event_types": [p.note.event_type for p in pending], "bodies": [p.note.body_json for p in pending],
        "note_refund_ids": [p.refund_id if p.moves else None for p in pending],
        "note_to_states": [_refund_event(p.note).to_state for p in pending],
        "given": [None if p.moves else p.given.result for p in pending],
    }


def _stored_outcome(pending: _ToStore, row: asyncpg.Record) -> Outcome:
    if pending.differs:  # logged once the batch is stored, not again when it is stored one by one
        log.warning("notification %s for refund %s contradicts our record (%s): not applied",
                    pending.note.operation_number, pending.refund_id, ", ".join(pending.differs))
    if row["stored"] is None:
        return DUPLICATE  # another delivery stored its row first: this one applied nothing
    if pending.given is not None:
        return pending.given
    ev, refund_id = _refund_event(pending.note), pending.refund_id
    if row["was"] is None:  # the refund was there a moment ago; refunds are never deleted, but be exact
        return Outcome("unknown", "no refund with this externalRef")
    if row["stored"] == "applied":
        return Outcome("applied", f"refund {refund_id} {row['was']} -> {ev.to_state}", completed=from_row(row))
    if row["stored"] == "already":
        return Outcome("already", f"refund {refund_id} already {row['was']}")
    return _contradiction(pending, row["was"])


def _contradiction(pending: _ToStore, ours: str) -> Outcome:
    """A ``late`` verdict, once (this delivery stored its row; a redelivery is a duplicate): the
    gateway and our books disagree about money, so an operator is paged, not just told."""
    ev, refund_id, merchant_id = _refund_event(pending.note), pending.refund_id, pending.merchant_id
    log.error("refund %s of merchant %s: PagoEfectivo says %s, we hold it %s; not applied, to reconcile by hand "
              "(notification %s)", refund_id, merchant_id, ev.to_state, ours, pending.note.operation_number,
              extra={"event": "refund_outcome_contradiction", "refund_id": str(refund_id), "merchant": merchant_id,
                     "external_ref": ev.external_ref, "ours": ours, "gateway": ev.to_state,
                     "operation_number": pending.note.operation_number, "provider_refund_id": ev.provider_refund_id,
                     "provider_code": ev.code})
    metrics.refund_outcome_contradictions_total.labels(metrics.merchant_label(merchant_id), ours, ev.to_state).inc()
    return Outcome("late", f"refund {refund_id} is {ours}; PagoEfectivo says {ev.to_state}: contradiction, not applied")
