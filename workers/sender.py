"""Send one refund to the gateway, exactly once, and record what it answered.

The order of steps is what makes double refunds impossible:
its turn in the merchant's schedule → claim (a row lock decides who talks to the gateway) →
if a previous attempt may have reached the gateway, ask for its status first → room in the
merchant's window, counted as the request leaves → send → record.

A previous attempt may have reached the gateway unless it ended with nothing sent: its
refund request answered 429 (the gateway executed nothing) or a wait for the merchant's
window; then the next attempt sends at once. A status lookup that fails, whatever the
gateway answered it, says nothing about the refund: the attempt is retried later and the
next one asks again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import datetime, timezone
from uuid import UUID

import dramatiq

from pagoefectivo.client import Credentials, RefundAnswer, RefundOrder
from pagoefectivo.protocol import RATE_LIMITED
from pagoefectivo.errors import EnvironmentMismatch, GatewayError, OutcomeUnknown, PermanentError, RateLimited, TransientError
from refunds import db, logs, metrics
from refunds.delivery import send_refund_message
from refunds.merchants import Merchant
from refunds.records import Refund, find_refund, queued_since
from refunds.states import Move, release_claim

from .resources import Resources
from .retries import RETRY_HORIZON_SECONDS, RetryLater, in_attempt_retries, retry_delay_ms
from .status_schedule import next_check_delay

log = logging.getLogger(__name__)

ANSWER_STATES = {"success": "succeeded", "failure": "failed", "pending": "pending"}
# The codes an attempt releases its claim with when it sent nothing the gateway executed.
PAUSED = "rate_limit_paused"  # the merchant's requests were paused (a 429 elsewhere) as this one was to leave
NOTHING_SENT = frozenset({RATE_LIMITED, PAUSED})
# An attempt stopped because its claim could not be renewed (workers.claims); an earlier try of
# the same attempt may have reached the gateway, so the next one asks for status first.
CLAIM_RUNNING_OUT = "claim_running_out"
# The status lookup of a refund that may have reached the gateway failed: the next attempt asks again.
STATUS_UNAVAILABLE = "status_unavailable"
TAKEOVER_MARGIN_MS = 500  # after another worker's claim ends, before asking for the refund again


class _Paused(Exception):
    """The merchant is paused for longer than a window: this refund waits ``wait_ms``, unsent."""

    def __init__(self, wait_ms: int):
        super().__init__(wait_ms)
        self.wait_ms = wait_ms


async def process_refund(res: Resources, refund_id: UUID, slot_ms: int | None = None) -> None:
    """Handle one send_refund message. ``slot_ms``: a rate-limit slot this message already booked."""
    found = await res.load(refund_id)
    if found is None:
        log.warning("refund %s: no such refund, message dropped", refund_id)
        return
    refund, merchant = found
    with logs.context(refund_id=str(refund.refund_id), merchant=refund.merchant_id, external_ref=refund.external_ref,
                      request_id=refund.request_id):
        try:
            if refund.state == "pending":
                if refund.next_check_at is None or refund.next_check_at <= datetime.now(timezone.utc):
                    await check_status(res, refund, res.credentials(merchant))
            elif refund.state in ("queued", "submitted"):
                await _submit(res, refund, merchant, res.credentials(merchant), slot_ms)
            # any other state is settled: a duplicate or late message has nothing to do
        except RetryLater as exc:
            await _retry_later(res, refund, str(exc))


async def process_refunds(res: Resources, items: list[tuple[UUID, int | None]]) -> None:
    """Handle one send_refunds message: its refunds are in flight together, so their reads,
    claims and moves share statements (``Resources.load``/``claim``/``move``).

    Each refund runs to its end even if another fails; then the first failure is raised,
    and dramatiq's retry of the message finds the finished refunds settled (nothing to do).
    """
    outcomes = await asyncio.gather(*(process_refund(res, refund_id, slot_ms) for refund_id, slot_ms in items),
                                    return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


async def _submit(res: Resources, refund: Refund, merchant: Merchant, creds: Credentials, slot_ms: int | None) -> None:
    async with res.in_flight:  # one of this process's WORKER_IN_FLIGHT turns at the gateway
        asked = await _ask_gateway(res, refund, merchant, creds, slot_ms)
    if asked is not None:
        await record_answer(res, *asked)


async def _ask_gateway(res: Resources, refund: Refund, merchant: Merchant, creds: Credentials,
                       slot_ms: int | None) -> tuple[Refund, RefundAnswer] | None:
    """Rate-limit slot, claim, request: the claimed refund and the gateway's answer to record,
    or None when there is none (re-queued for later, claimed by another, or settled here)."""
    decision = await res.limiter.admit(merchant.merchant_id, merchant.rate_limit, slot_ms=slot_ms)
    if decision.wait_ms:
        await _defer(res, refund, decision.wait_ms, rate_limited=True, slot_ms=decision.slot_ms)
        return None
    asked_at = time.monotonic()
    claimed = await res.claim(refund.refund_id)
    if claimed is None:  # another worker holds the claim, or the refund moved on
        await _after_the_holder(refund)
        return None
    refund, claimed_from = claimed
    res.claims.hold(refund.refund_id, refund.claimed_until, asked_at)
    try:
        return await _attempt(res, refund, claimed_from, merchant, creds)
    except RetryLater as exc:  # the claim is released first, so that the delayed retry can take it
        async with db.acquire(res.pool) as conn:
            await release_claim(conn, refund.refund_id, code=exc.code, message=str(exc))
        raise
    finally:
        res.claims.drop(refund.refund_id)


async def _attempt(res: Resources, refund: Refund, claimed_from: str, merchant: Merchant,
                   creds: Credentials) -> tuple[Refund, RefundAnswer] | None:
    """One claimed attempt: the answer to record, or None when it was settled or deferred here;
    RetryLater when a transient fault outlived the attempt's retries."""
    if (claimed_from == "submitted" or refund.attempts > 1) and refund.provider_code not in NOTHING_SENT:
        # a previous attempt may have reached the gateway: settle it, never resend blind
        try:
            answer = await _status_with_retries(res, creds, refund.external_ref)
        except EnvironmentMismatch as exc:
            await _wrong_environment(res, refund, exc)
            return None
        if answer is not None:
            return refund, answer
    try:
        return refund, await _send(res, creds, merchant, refund)
    except RateLimited as exc:
        await res.limiter.pause(refund.merchant_id, exc.retry_after)
        await _wait_unsent(res, refund, int(exc.retry_after * 1000), code=RATE_LIMITED, message=exc.message)
    except _Paused as exc:
        await _wait_unsent(res, refund, exc.wait_ms, code=PAUSED, message="the merchant's requests are paused")
    except EnvironmentMismatch as exc:
        await _wrong_environment(res, refund, exc)
    except PermanentError as exc:
        await _settle(res, refund, "failed", code=exc.code, message=exc.message)
    except OutcomeUnknown as exc:
        answer = await _status_with_retries(res, creds, refund.external_ref)
        if answer is not None:
            return refund, answer
        raise RetryLater("outcome unknown and the gateway has no record of it yet", code=exc.code) from None
    except GatewayError as exc:
        raise RetryLater(exc.message, code=exc.code) from None
    return None


async def _after_the_holder(refund: Refund) -> None:
    """A refund another worker held as it was read comes back as its claim ends: that worker may
    have died with it (its messages come back within WORKER_DEAD_AFTER_SECONDS, before its claims
    end), and the outbox sweep would only find it a grace period later. A holder still at work
    renews its claim and the message waits again; one done with it has moved the refund on."""
    if refund.state != "submitted" or refund.claimed_until is None:
        return  # claimed just now by a live worker: nothing to wait for
    left_ms = (refund.claimed_until - datetime.now(timezone.utc)).total_seconds() * 1000
    if left_ms > 0:
        await asyncio.to_thread(requeue, refund.refund_id, delay_ms=int(left_ms) + TAKEOVER_MARGIN_MS, slot_ms=None)


async def _wait_unsent(res: Resources, refund: Refund, wait_ms: int, *, code: str, message: str | None) -> None:
    """Nothing was executed: release the claim with a code that says so, and come back later."""
    async with db.acquire(res.pool) as conn:
        await release_claim(conn, refund.refund_id, code=code, message=message)
    await _defer(res, refund, wait_ms, rate_limited=True)


async def _send(res: Resources, creds: Credentials, merchant: Merchant, refund: Refund) -> RefundAnswer:
    notify_url = merchant.notify_url_or(res.settings.refunds_notify_url)
    if notify_url is None:
        raise TransientError("no notify URL: set REFUNDS_NOTIFY_URL or the merchant's own")
    order = RefundOrder(
        merchant_id=refund.merchant_id, original_transaction_id=refund.original_transaction_id,
        amount=refund.amount, currency=refund.currency, external_ref=refund.external_ref,
        notify_url=notify_url, reason=refund.reason,
    )
    started = 0.0

    async def permit() -> None:
        """Counted in the merchant's window as the request leaves (token and signature ready),
        if the claim still holds for the whole request (workers.claims)."""
        nonlocal started
        if not res.claims.may_send(refund.refund_id):
            raise RetryLater("the claim on the refund could not be renewed", code=CLAIM_RUNNING_OUT)
        if wait_ms := await res.limiter.permit(merchant.merchant_id, merchant.rate_limit):
            raise _Paused(wait_ms)
        started = time.perf_counter()

    async for attempt in in_attempt_retries():
        with attempt:
            started = time.perf_counter()
            try:
                answer = await res.client.request_refund(creds, order, before_send=permit)
            except GatewayError as exc:
                metrics.refund_gateway_requests_total.labels(_outcome_of(exc)).inc()
                raise
            finally:
                metrics.refund_gateway_request_seconds.observe(time.perf_counter() - started)
            metrics.refund_gateway_requests_total.labels(answer.status if answer.status in ANSWER_STATES else "error").inc()
            return answer
    raise AssertionError("unreachable")


async def _status_with_retries(res: Resources, creds: Credentials, external_ref: str) -> RefundAnswer | None:
    """The gateway's record of the refund, or None when it has none.

    Any other answer (a 429, a refusal such as 607 from a worker whose address is not allowed,
    508, a fault) says nothing about the refund itself, which may have been executed: it is
    retried later (``STATUS_UNAVAILABLE``, so the next attempt asks again), never read as a
    refusal of the refund or as "nothing was sent". Credentials of the wrong environment raise
    EnvironmentMismatch, for manual review.
    """
    try:
        async for attempt in in_attempt_retries():
            with attempt:
                return await res.client.refund_status(creds, external_ref)
    except EnvironmentMismatch:
        raise
    except GatewayError as exc:
        code = f" (code {exc.code})" if exc.code else ""
        raise RetryLater(f"status of {external_ref} unavailable: {exc.message}{code}", code=STATUS_UNAVAILABLE) from None
    return None


async def record_answer(res: Resources, refund: Refund, answer: RefundAnswer) -> None:
    to_state = ANSWER_STATES.get(answer.status)
    if to_state is None:
        await _settle(res, refund, "manual_review", code="unknown_status", message=f"gateway status {answer.status!r}")
        return
    await _settle(res, refund, to_state, code=answer.code, message=answer.message, provider_refund_id=answer.refund_id)


async def check_status(res: Resources, refund: Refund, creds: Credentials) -> None:
    """Poll a pending refund that no notification settled; after the schedule, manual review."""
    async with res.in_flight:
        try:
            answer = await _status_with_retries(res, creds, refund.external_ref)
        except EnvironmentMismatch as exc:
            await _wrong_environment(res, refund, exc)
            return
    if answer is not None and answer.status in ("success", "failure"):
        await record_answer(res, refund, answer)
        return
    delay = next_check_delay(refund.status_checks + 1)
    async with db.acquire(res.pool) as conn:
        if delay is None:
            await _settle(res, refund, "manual_review", code="unsettled",
                          message=f"no final outcome after {refund.status_checks + 1} status checks")
            return
        await conn.execute(
            """UPDATE refunds SET status_checks = status_checks + 1,
                      next_check_at = now() + make_interval(secs => $2)
               WHERE refund_id = $1 AND state = 'pending'""",
            refund.refund_id, delay,
        )


async def _wrong_environment(res: Resources, refund: Refund, exc: EnvironmentMismatch) -> None:
    """Credentials of the other environment (sandbox against production): a person must look."""
    await _settle(res, refund, "manual_review", code="environment_mismatch", message=str(exc))


async def _settle(res: Resources, refund: Refund, to_state: str, **details) -> None:
    moved = await res.move(Move(refund.refund_id, to_state, **details))
    if moved is not None:
        metrics.observe_completion(moved, to_state)
        log.info("refund %s %s -> %s", refund.refund_id, refund.state, to_state,
                 extra={"refund_id": str(refund.refund_id), "merchant": refund.merchant_id})


async def _retry_later(res: Resources, refund: Refund, reason: str) -> None:
    """Delayed retry for longer outages (``workers.retries``).

    The message that failed ends here and a new delayed one replaces it, so retries do not
    multiply messages. (When dramatiq redelivers a pack because another of its refunds raised,
    this refund meets it beside its delayed message: the claim lets one of them through.)
    Past the retry horizon, counted from when the refund last entered ``queued`` (an approval
    or an operator's retry starts it again), it goes to manual review.
    """
    async with db.acquire(res.pool) as conn:
        current = await find_refund(conn, refund.refund_id)
        if current is None or current.state not in ("queued", "submitted", "pending"):
            return
        since = await queued_since(conn, refund.refund_id) or current.created_at
    if (datetime.now(timezone.utc) - since).total_seconds() > RETRY_HORIZON_SECONDS:
        await _settle(res, current, "manual_review", code="retries_exhausted", message=reason)
        return
    delay_ms = retry_delay_ms(current.attempts)
    log.warning("refund %s: retry in %.1fs (%s)", refund.refund_id, delay_ms / 1000, reason, extra={"cause": reason})
    await _defer(res, current, delay_ms, rate_limited=False)


async def _defer(res: Resources, refund: Refund, wait_ms: int, *, rate_limited: bool, slot_ms: int | None = None) -> None:
    """Re-queue with a delay; a rate-limit wait uses no retry budget.

    A message that booked a slot arrives exactly at it; other waits get jitter so that
    many refunds paused together do not come back together.
    """
    jitter = random.randint(0, max(10, wait_ms // 10)) if rate_limited and slot_ms is None else 0
    delay = wait_ms + jitter
    metrics.refund_requeues_total.labels("rate_limit" if rate_limited else "retry").inc()
    if rate_limited:
        metrics.refund_rate_limit_waits_total.labels(metrics.merchant_label(refund.merchant_id)).inc()
    async with db.acquire(res.pool) as conn:
        await conn.execute(
            "UPDATE refunds SET delivered_at = now() + make_interval(secs => $2) WHERE refund_id = $1",
            refund.refund_id, delay / 1000,
        )
    if not await asyncio.to_thread(requeue, refund.refund_id, delay_ms=delay, slot_ms=slot_ms):
        log.warning("refund %s: re-queue failed (Redis unreachable); the outbox sweep will deliver it",
                    refund.refund_id)


def requeue(refund_id: UUID, *, delay_ms: int, slot_ms: int | None) -> bool:
    """Put a send_refund message back with a delay; False if Redis is unreachable."""
    message = send_refund_message(refund_id, slot_ms=slot_ms)
    try:
        dramatiq.get_broker().enqueue(message, delay=delay_ms)
        return True
    except Exception as exc:  # the outbox sweep delivers it later
        log.warning("refund %s: re-queue failed: %s", refund_id, type(exc).__name__)
        return False


def _outcome_of(exc: GatewayError) -> str:
    if isinstance(exc, RateLimited):
        return "rate_limited"
    if isinstance(exc, OutcomeUnknown):
        return "timeout"
    return "error"
