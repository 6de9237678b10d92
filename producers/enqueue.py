"""Accept a refund request: validate it against its payment, store it, then deliver it.

The same function serves the intake API, the CLI, CSV import and Python callers, so
every door has the same validation (``refunds.requests.RefundRequest``) and the same
idempotency.

One statement (one round trip, one implicit transaction) decides and writes, because
intake throughput is bounded by round trips to Postgres. It takes the requests as arrays,
one row each (``unnest ... WITH ORDINALITY``): a door accepting one refund passes
one-element arrays (``accept_alone``), and the intake passes the requests that arrive
together (``producers.accept_batch``, which keeps two requests for the same external_ref
or the same payment out of one batch, so each row is judged as it would be alone). From
one snapshot it reads, per row, the earlier refund with this ``external_ref`` (if any), the
merchant and the payment, takes the verdict (a replay is recognised before anything else
is judged), and only when the verdict is to accept inserts the refund and its first audit
row. ``ON CONFLICT DO NOTHING`` turns a concurrent identical request into a replay, and
the trigger's CHECK on the payment row refuses the refund that would take the payment over
its paid amount (whatever the snapshot said). Python then phrases each verdict
(``judge``); the rules are in ``_ACCEPT`` below, in the order of the ``CASE``.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import asyncpg

from refunds import db, metrics
from refunds.delivery import Courier, deliver_async
from refunds.errors import IdempotencyConflict, RefundRefused
from refunds.money import format_amount
from refunds.records import COLUMNS, Refund, find_by_external_ref
from refunds.requests import RefundRequest
from refunds.settings import get_settings
from refunds.sql import Statement
from refunds.states import first_events
from refunds.tokens import ACTIVE_TOKEN_SQL, TokenRevoked

DEFAULT_WINDOW_DAYS = 90

_REFUND_FIELDS = tuple(name.strip() for name in COLUMNS.split(","))
ACCEPTED_STATES = ("queued", "awaiting_approval")
# One row per request: its refund_id, merchant_id, external_ref, original_transaction_id, amount,
# currency, reason, requested_by, audit actor, now, the hash of the API token that asks (NULL
# for other doors), re-checked here: see refunds.tokens, and the intake call's request id. Not
# per request: the refund window's days per payment method. Requests come as arrays of equal length (``_ACCEPT_MANY``) or, for a request
# alone, as plain values (``_ACCEPT_ONE``: the same statement, whose plan Postgres keeps, where an
# array of unknown length makes it plan again at every call). The refund's first audit row is the
# state machine's (``first_events``), written in the same statement. Refunds are inserted in
# payment order, so that two batches take their payments' row locks (the trigger) in the same order.
_ASKED = (("q_refund_id", "uuid"), ("q_merchant_id", "text"), ("q_external_ref", "text"),
          ("q_transaction_id", "text"), ("q_amount", "numeric"), ("q_currency", "text"),
          ("q_reason", "text"), ("q_requested_by", "text"), ("q_actor", "text"),
          ("q_now", "timestamptz"), ("q_token_hash", "text"), ("q_request_id", "text"))
_ACCEPT = f"""
    WITH asked AS (
        {{asked}}
    ), found AS (
        SELECT q.*, {', '.join(f'r.{name} AS r_{name}' for name in _REFUND_FIELDS)},
               m.merchant_id IS NOT NULL AS merchant_found, m.refund_mode, m.approval_threshold, m.rate_limit,
               p.transaction_id IS NOT NULL AS payment_found, p.amount AS paid_amount, p.refunded_amount,
               p.currency AS paid_currency, p.method, p.paid_at,
               COALESCE((SELECT w.days FROM unnest($window_methods::text[], $window_days::int[]) AS w (method, days)
                         WHERE w.method = p.method), {DEFAULT_WINDOW_DAYS}) AS window_days
        FROM asked AS q
        -- one index lookup per request: LIMIT keeps each a lookup (a plain join on unnest's
        -- guessed row count may hash whole tables), and each key is unique anyway
        LEFT JOIN LATERAL (SELECT * FROM refunds WHERE merchant_id = q.q_merchant_id
                                                   AND external_ref = q.q_external_ref LIMIT 1) r ON true
        LEFT JOIN LATERAL (SELECT * FROM merchants WHERE merchant_id = q.q_merchant_id LIMIT 1) m ON true
        LEFT JOIN LATERAL (SELECT * FROM payments WHERE merchant_id = q.q_merchant_id
                                                    AND transaction_id = q.q_transaction_id LIMIT 1) p ON true
    ), judged AS (
        SELECT found.*, CASE
            WHEN q_token_hash IS NOT NULL
                 AND NOT {ACTIVE_TOKEN_SQL.format(token_hash="q_token_hash", merchant_id="q_merchant_id")}
                THEN 'token_revoked'
            WHEN r_refund_id IS NOT NULL THEN 'replay'
            WHEN NOT merchant_found THEN 'unknown_merchant'
            WHEN refund_mode = 'off' THEN 'refunds_disabled'
            WHEN NOT payment_found THEN 'unknown_transaction'
            WHEN paid_currency <> q_currency THEN 'currency_mismatch'
            WHEN q_now > paid_at + make_interval(secs => window_days * 86400) THEN 'refund_window_closed'
            WHEN q_amount > paid_amount - refunded_amount THEN 'amount_over_refundable'
            WHEN (refund_mode = 'approval' OR q_amount > approval_threshold) AND q_requested_by IS NULL
                THEN 'requester_unnamed'
            WHEN refund_mode = 'approval' OR q_amount > approval_threshold THEN 'awaiting_approval'
            ELSE 'queued'
        END AS verdict
        FROM found
    ), inserted AS (
        INSERT INTO refunds (refund_id, merchant_id, external_ref, original_transaction_id, amount,
                             currency, reason, state, requested_by, request_id)
        SELECT q_refund_id, q_merchant_id, q_external_ref, q_transaction_id, q_amount, q_currency, q_reason,
               verdict, q_requested_by, q_request_id
        FROM judged WHERE verdict IN {ACCEPTED_STATES}
        ORDER BY q_merchant_id, q_transaction_id
        ON CONFLICT ON CONSTRAINT refunds_external_ref_unique DO NOTHING
        RETURNING {COLUMNS}
    ), audit AS (
        {first_events("SELECT i.refund_id, i.state, j.q_actor AS actor FROM inserted AS i"
                      " JOIN judged AS j ON j.q_refund_id = i.refund_id")}
    )
    SELECT judged.*, {', '.join(f'i.{name} AS i_{name}' for name in _REFUND_FIELDS)}
    FROM judged LEFT JOIN inserted AS i ON i.refund_id = judged.q_refund_id
    ORDER BY q_n"""
_ACCEPT_MANY = Statement(_ACCEPT.format(asked=(
    f"SELECT * FROM unnest({', '.join(f'${name}::{kind}[]' for name, kind in _ASKED)}) WITH ORDINALITY"
    f" AS q ({', '.join(name for name, _ in _ASKED)}, q_n)")))
_ACCEPT_ONE = Statement(_ACCEPT.format(
    asked=f"SELECT {', '.join(f'${name}::{kind} AS {name}' for name, kind in _ASKED)}, 1::bigint AS q_n"))


@dataclass(frozen=True)
class EnqueueResult:
    refund: Refund
    created: bool  # False: an identical earlier request (replay)
    rate_limit: Decimal | None = None  # the merchant's requests per second, for booking a new refund's slot

    @property
    def http_status(self) -> int:
        return 202 if self.created else 200

    def to_json(self) -> dict:
        return {"refund_id": str(self.refund.refund_id), "external_ref": self.refund.external_ref, "state": self.refund.state}


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
    courier: Courier | None = None,
) -> EnqueueResult:
    """Validate and accept one refund; deliver it to the workers after COMMIT (through ``courier``,
    which a caller accepting many refunds keeps: ``refunds.delivery.Courier``).

    Raises RefundRefused (422-like: nothing written) or IdempotencyConflict (409-like).
    A replay (same merchant, external_ref and terms) returns the first refund with
    ``created=False``, even if the payment has no room left for a new one.
    """
    result = await accept_refund(
        pool, merchant_id=merchant_id, original_transaction_id=original_transaction_id, amount=amount,
        currency=currency, external_ref=external_ref, reason=reason, requested_by=requested_by, now=now,
    )
    await hand_over(result, pool, courier)
    return result


async def accept_refund(
    pool: asyncpg.Pool | asyncpg.Connection, *, merchant_id, original_transaction_id, amount, currency,
    external_ref, reason=None, requested_by: str | None = None, now: datetime | None = None,
    token_hash: str | None = None, accept: "Callable[[Ask], Awaitable[EnqueueResult]] | None" = None,
) -> EnqueueResult:
    """``enqueue_refund`` without the delivery: for a caller that holds a pooled connection and
    hands the refund over (``hand_over``) once it has released it.

    ``token_hash``: the intake API token that asks; the statement re-checks that it is still
    active and scoped to the merchant, and raises TokenRevoked (nothing written) if not.

    ``accept``: how the request is accepted instead of alone on ``pool``; the intake passes
    ``producers.accept_batch.AcceptBatcher.accept``, which shares one statement with the
    requests awaited meanwhile, on its own connections, and answers as alone.
    """
    try:
        request = RefundRequest.parse(
            merchant_id=merchant_id, original_transaction_id=original_transaction_id, amount=amount,
            currency=currency, external_ref=external_ref, reason=reason,
        )
    except RefundRefused as refused:
        metrics.refunds_rejected_total.labels(refused.code).inc()
        raise
    return await accept_request(pool, request, requested_by=requested_by, now=now, token_hash=token_hash, accept=accept)


async def accept_request(
    pool: asyncpg.Pool | asyncpg.Connection, request: RefundRequest, *, requested_by: str | None = None,
    now: datetime | None = None, token_hash: str | None = None,
    accept: "Callable[[Ask], Awaitable[EnqueueResult]] | None" = None, request_id: str | None = None,
) -> EnqueueResult:
    """``accept_refund`` for a request validated already (the intake validates its body first);
    ``request_id``: the intake call's, kept on the refund for the workers' log lines."""
    ask = Ask(request, requested_by, now or datetime.now(timezone.utc), token_hash, request_id)
    try:
        result = await (accept(ask) if accept is not None else _accept(pool, ask))
    except RefundRefused as refused:
        metrics.refunds_rejected_total.labels(refused.code).inc()
        raise
    if result.created:
        metrics.refunds_accepted_total.labels(metrics.merchant_label(request.merchant_id)).inc()
    return result


async def hand_over(result: EnqueueResult, pool: asyncpg.Pool | asyncpg.Connection | None = None,
                    courier: Courier | None = None) -> bool:
    """Deliver a newly accepted, queued refund to the workers (it is committed already).

    With ``pool`` (or a connection the caller is not using meanwhile) the refund's slot is
    booked in its merchant's rate limit now, and its message waits for it in the delay
    queue; without, a worker books it (see ``refunds.delivery``).

    False when Redis is unreachable (the outbox sweep delivers it later) or when there is
    nothing to deliver: a replay was delivered the first time, and a refund awaiting
    approval is delivered when it is approved.
    """
    if result.created and result.refund.state == "queued":
        return await deliver_async(
            result.refund.refund_id, merchant_id=result.refund.merchant_id, rate_limit=result.rate_limit, pool=pool,
            courier=courier,
        )
    return False


@dataclass(frozen=True)
class Ask:
    """One request as the accepting statement takes it."""

    request: RefundRequest
    requested_by: str | None
    now: datetime
    token_hash: str | None = None
    request_id: str | None = None


async def _accept(pool, ask: Ask) -> EnqueueResult:
    if isinstance(pool, asyncpg.Connection):
        return await accept_alone(pool, ask)
    async with db.acquire(pool) as conn:
        return await accept_alone(conn, ask)


async def run_accept(conn: asyncpg.Connection, asks: list[Ask]) -> list[asyncpg.Record]:
    """``_ACCEPT`` for these requests, one row each in their order.

    Postgres errors (the CHECK, a deadlock, a value it refuses) fail it for all of them.
    """
    windows = get_settings().refund_window_days
    columns: dict[str, list] = {name: [] for name, _ in _ASKED}
    for ask in asks:
        request = ask.request
        for column, value in zip(columns.values(), (
            uuid.uuid4(), request.merchant_id, request.external_ref, request.original_transaction_id,
            request.amount, request.currency, request.reason, ask.requested_by, ask.requested_by or "producer",
            ask.now, ask.token_hash, ask.request_id,
        ), strict=True):
            column.append(value)
    if len(asks) == 1:
        statement, asked = _ACCEPT_ONE, {name: column[0] for name, column in columns.items()}
    else:
        statement, asked = _ACCEPT_MANY, columns
    return await conn.fetch(statement.text, *statement.args(
        **asked, window_methods=list(windows), window_days=list(windows.values())))


async def accept_alone(conn: asyncpg.Connection, ask: Ask) -> EnqueueResult:
    """One request in its own statement; the CHECK refusing it is phrased as over refundable."""
    request = ask.request
    try:
        [row] = await run_accept(conn, [ask])
    except asyncpg.CheckViolationError as exc:
        if exc.constraint_name != "refunds_within_paid_amount":
            raise
        left = await conn.fetchval(
            "SELECT amount - refunded_amount FROM payments WHERE merchant_id = $1 AND transaction_id = $2",
            request.merchant_id, request.original_transaction_id,
        )
        raise _over_refundable(request, left) from None
    return await judge(conn, request, row)


async def judge(conn: asyncpg.Connection, request: RefundRequest, row: asyncpg.Record) -> EnqueueResult:
    """The statement's row for this request as an answer: the result, or the error it raises."""
    verdict = row["verdict"]
    if verdict == "token_revoked":
        raise TokenRevoked("the token is unknown or revoked, or not scoped to this merchant")
    if verdict == "replay":
        return _replay(_refund(row, "r_"), request)
    if verdict not in ACCEPTED_STATES:
        raise _refusal(verdict, row, request)
    if row["i_refund_id"] is None:  # a concurrent request with the same external_ref committed first
        existing = await find_by_external_ref(conn, request.merchant_id, request.external_ref)
        assert existing is not None
        return _replay(existing, request)
    return EnqueueResult(_refund(row, "i_"), created=True, rate_limit=row["rate_limit"])


def _refund(row: asyncpg.Record, prefix: str) -> Refund:
    return Refund(**{name: row[prefix + name] for name in _REFUND_FIELDS})


def _replay(existing: Refund, request: RefundRequest) -> EnqueueResult:
    if existing.same_terms(
        original_transaction_id=request.original_transaction_id, amount=request.amount,
        currency=request.currency, reason=request.reason,
    ):
        return EnqueueResult(existing, created=False)
    raise IdempotencyConflict(
        f"external_ref {request.external_ref!r} was already used by this merchant for a different refund"
    )


def _over_refundable(request: RefundRequest, left: Decimal | None) -> RefundRefused:
    return RefundRefused(
        "amount_over_refundable",
        f"amount {request.amount} is over the {format_amount(left or Decimal(0))} still refundable on this payment",
        "amount",
    )


def _refusal(verdict: str, row: asyncpg.Record, request: RefundRequest) -> RefundRefused:
    """The statement's verdict in words, naming the field at fault."""
    if verdict == "unknown_merchant":
        return RefundRefused(verdict, f"merchant {request.merchant_id!r} does not exist", "merchant_id")
    if verdict == "refunds_disabled":
        return RefundRefused(verdict, f"refunds are switched off for merchant {request.merchant_id!r}", "merchant_id")
    if verdict == "unknown_transaction":
        return RefundRefused(
            verdict, f"transaction {request.original_transaction_id!r} is unknown or not paid for this merchant",
            "original_transaction_id",
        )
    if verdict == "currency_mismatch":
        return RefundRefused(
            verdict, f"currency {request.currency} differs from the payment's {row['paid_currency']}", "currency")
    if verdict == "refund_window_closed":
        closes = row["paid_at"] + timedelta(days=row["window_days"])
        return RefundRefused(
            verdict,
            f"the {row['window_days']}-day refund window for {row['method']} payments closed on {closes.date().isoformat()}",
            "original_transaction_id",
        )
    if verdict == "amount_over_refundable":
        return _over_refundable(request, row["paid_amount"] - row["refunded_amount"])
    if verdict == "requester_unnamed":  # four eyes: the approver must be someone else, so name the first pair
        return RefundRefused(
            verdict, "this refund needs a second person's approval: name who asks for it (requested_by)",
            "requested_by")
    raise AssertionError(f"unknown verdict {verdict!r}")
