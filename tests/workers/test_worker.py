"""The worker's sender against a real sandbox gateway and a real receiver, over real HTTP."""

import asyncio
import time
import uuid
from decimal import Decimal
from datetime import datetime, timezone

import pytest
import pytest_asyncio

from producers.enqueue import accept_refund
from refunds.payments import find_payment
from refunds.records import find_refund, refund_events
from tests.helpers import paid
from tests.stack import chaos, process_refund, start_stack


@pytest_asyncio.fixture
async def stack(db, database_url, redis_url, vault, monkeypatch):
    """The shared stack (tests/stack.py)."""
    async with start_stack(database_url, redis_url, vault, monkeypatch) as running:
        yield running


@pytest.fixture
def make_merchant(make_merchant, stack):
    """Merchants made in these tests are onboarded with the sandbox gateway too."""
    return stack.onboarded(make_merchant)


async def ledger(http, sandbox_url) -> list[dict]:
    async with http.get(f"{sandbox_url}/sandbox/ledger") as response:
        return await response.json()


async def accepted_refund(stack, db, external_ref="R-1", amount="25.00", merchant="m1"):
    """A refund of CIP-9 (paid 100.00), accepted; the payment is known to both parties, or to
    ours alone when no ``stack`` runs."""
    await (stack.paid if stack is not None else paid)(db, merchant, "CIP-9", "100.00")
    # accepted only: the tests hand it to the worker themselves (process_refund), as an unbooked message would
    result = await accept_refund(db, merchant_id=merchant, original_transaction_id="CIP-9", amount=amount,
                                 currency="PEN", external_ref=external_ref)
    return result.refund


async def settle_all(res, db, refund_ids, passes: int = 40):
    """Process refunds until none is left queued: the ones the rate limit deferred come back,
    as their re-queued messages would."""
    await asyncio.gather(*(process_refund(res, rid) for rid in refund_ids))
    for _ in range(passes):
        waiting = [r["refund_id"] for r in await db.fetch(
            "SELECT refund_id FROM refunds WHERE state = 'queued' AND refund_id = ANY($1::uuid[])", refund_ids)]
        if not waiting:
            return
        await asyncio.sleep(0.05)
        await asyncio.gather(*(process_refund(res, rid) for rid in waiting))
    raise AssertionError("refunds still queued after every pass")


async def wait_state(db, refund_id, states, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        refund = await find_refund(db, refund_id)
        if refund.state in states or asyncio.get_running_loop().time() > deadline:
            return refund
        await asyncio.sleep(0.05)


async def test_refund_is_signed_sent_and_settled_by_notification(db, make_merchant, stack):
    res, sandbox_url, http = stack.res, stack.sandbox_url, stack.http
    await make_merchant("m1")
    await chaos(http, sandbox_url, sync_status_mix={"pending": 1})
    refund = await accepted_refund(stack, db)
    await process_refund(res, refund.refund_id)
    assert (await find_refund(db, refund.refund_id)).state in ("pending", "succeeded")
    settled = await wait_state(db, refund.refund_id, {"succeeded"})
    assert settled.state == "succeeded" and settled.provider_refund_id
    assert [e["to_state"] for e in await refund_events(db, refund.refund_id)] == [
        "queued", "submitted", "pending", "succeeded"]
    entries = await ledger(http, sandbox_url)
    assert [(e["merchantId"], e["externalRef"], Decimal(str(e["refundAmount"]))) for e in entries] == [
        ("m1", "R-1", Decimal("25.00"))]


async def test_duplicate_deliveries_reach_the_gateway_once(db, make_merchant, stack):
    res, sandbox_url, http = stack.res, stack.sandbox_url, stack.http
    await make_merchant("m1")
    await chaos(http, sandbox_url, sync_status_mix={"success": 1})
    refund = await accepted_refund(stack, db)
    await asyncio.gather(*(process_refund(res, refund.refund_id) for _ in range(5)))
    await process_refund(res, refund.refund_id)  # a late duplicate message
    assert (await find_refund(db, refund.refund_id)).state == "succeeded"
    assert len(await ledger(http, sandbox_url)) == 1



@pytest.mark.slow
async def test_a_refund_another_worker_holds_comes_back_as_its_claim_ends(db, make_merchant, stack, monkeypatch):
    """A worker that died with a claim: a message for its refund waits for the claim's end and
    then settles it (asking for status first), instead of waiting for the outbox sweep's grace."""
    from refunds.states import claim_many
    from workers import sender

    await make_merchant("m1")
    await chaos(stack.http, stack.sandbox_url, sync_status_mix={"success": 1})
    refund = await accepted_refund(stack, db)
    [(held, _)] = await claim_many(db, [refund.refund_id], actor="worker-that-died", claim_seconds=5)
    requeued = []
    monkeypatch.setattr(sender, "requeue", lambda refund_id, **how: requeued.append((refund_id, how)) or True)
    await process_refund(stack.res, refund.refund_id)
    [(refund_id, how)] = requeued
    wait_s = how["delay_ms"] / 1000
    left_s = (held.claimed_until - datetime.now(timezone.utc)).total_seconds()
    assert refund_id == refund.refund_id and left_s < wait_s <= left_s + 1 and how["slot_ms"] is None
    await asyncio.sleep(wait_s)  # the re-queued message arrives
    await process_refund(stack.res, refund.refund_id)
    assert (await find_refund(db, refund.refund_id)).state == "succeeded"
    assert len(await ledger(stack.http, stack.sandbox_url)) == 1


async def test_refunds_handed_over_together_are_carried_as_one_and_each_settles_once(db, make_merchant, stack):
    """A send_refunds message: its refunds run together (a duplicate among them included) and
    one failing does not stop the others; the message's retry finds the rest settled."""
    from workers.sender import process_refunds

    res, sandbox_url, http = stack.res, stack.sandbox_url, stack.http
    await make_merchant("m1", rate_limit=Decimal(1000))
    await chaos(http, sandbox_url, sync_status_mix={"success": 1})
    ids = [(await accepted_refund(stack, db, external_ref=f"P-{n}", amount="5.00")).refund_id for n in range(6)]
    missing = uuid.uuid4()  # no such refund: dropped with a log line, the others go on
    slot = int(time.time() * 1000)  # booked at hand-over, as the courier does for refunds due now
    await process_refunds(res, [(rid, slot) for rid in ids] + [(ids[0], slot), (missing, slot)])
    assert {(await find_refund(db, rid)).state for rid in ids} == {"succeeded"}
    assert len(await ledger(http, sandbox_url)) == 6
    await process_refunds(res, [(rid, slot) for rid in ids])  # a redelivery: nothing to do
    assert len(await ledger(http, sandbox_url)) == 6
    events = await db.fetchval("SELECT count(*) FROM refund_events WHERE to_state = 'succeeded'")
    assert events == 6

async def test_a_worker_process_has_at_most_worker_in_flight_gateway_requests_at_once(
        db, merchant_maker, database_url, redis_url, vault, monkeypatch):
    """WORKER_IN_FLIGHT caps the refunds at the gateway together, whatever the messages carry;
    the others wait their turn and all settle."""
    import aiohttp

    from workers.sender import process_refunds

    at_gateway, most = 0, 0

    async def started(session, context, params):
        nonlocal at_gateway, most
        at_gateway += 1
        most = max(most, at_gateway)

    async def ended(session, context, params):
        nonlocal at_gateway
        at_gateway -= 1

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(started)
    trace.on_request_end.append(ended)
    trace.on_request_exception.append(ended)
    monkeypatch.setenv("WORKER_IN_FLIGHT", "3")
    async with start_stack(database_url, redis_url, vault, monkeypatch, trace_configs=[trace]) as running:
        await running.onboarded(merchant_maker)("m1", rate_limit=Decimal(1000))
        await chaos(running.http, running.sandbox_url, sync_status_mix={"success": 1}, latency_ms=50)
        ids = [(await accepted_refund(running, db, external_ref=f"F-{n}", amount="5.00")).refund_id for n in range(12)]
        slot = int(time.time() * 1000)
        # two messages of six, carried by two threads at once
        await asyncio.gather(process_refunds(running.res, [(rid, slot) for rid in ids[:6]]),
                             process_refunds(running.res, [(rid, slot) for rid in ids[6:]]))
        assert len(await ledger(running.http, running.sandbox_url)) == 12
    assert most == 3  # the cap was reached and never passed (the token request counts too)
    assert {(await find_refund(db, rid)).state for rid in ids} == {"succeeded"}


async def test_signature_refused_is_a_permanent_failure_that_releases_the_amount(db, make_merchant, stack):
    from pagoefectivo.protocol import public_key_pem
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    res, sandbox_url, http = stack.res, stack.sandbox_url, stack.http
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    await make_merchant("m1", public_key_pem=public_key_pem(other))  # gateway knows another key
    refund = await accepted_refund(stack, db)
    await process_refund(res, refund.refund_id)
    failed = await find_refund(db, refund.refund_id)
    assert (failed.state, failed.provider_code) == ("failed", "605")
    assert (await find_payment(db, "m1", "CIP-9")).refunded_amount == Decimal("0.00")
    assert await ledger(http, sandbox_url) == []


async def test_lost_answer_is_settled_by_status_not_resent(db, make_merchant, stack):
    res, sandbox_url, http = stack.res, stack.sandbox_url, stack.http
    await make_merchant("m1")
    await chaos(http, sandbox_url, timeout_after_commit_rate=1.0, sync_status_mix={"success": 1})
    refund = await accepted_refund(stack, db)
    await process_refund(res, refund.refund_id)  # times out after the gateway executed it
    settled = await find_refund(db, refund.refund_id)
    assert settled.state in ("succeeded", "pending")
    assert len(await ledger(http, sandbox_url)) == 1


@pytest.mark.slow
async def test_transient_errors_leave_the_refund_for_a_later_retry(db, make_merchant, stack):
    res, sandbox_url, http = stack.res, stack.sandbox_url, stack.http
    await make_merchant("m1")
    await chaos(http, sandbox_url, error_rate=1.0)
    refund = await accepted_refund(stack, db)
    await process_refund(res, refund.refund_id)
    waiting = await find_refund(db, refund.refund_id)
    assert waiting.state == "submitted" and waiting.claimed_until is None
    assert waiting.delivered_at > datetime.now(timezone.utc)  # a delayed retry is scheduled
    await chaos(http, sandbox_url, error_rate=0.0, sync_status_mix={"success": 1})
    await process_refund(res, refund.refund_id)  # the retry: status first, then send
    assert (await find_refund(db, refund.refund_id)).state == "succeeded"
    assert len(await ledger(http, sandbox_url)) == 1


@pytest.mark.slow
async def test_a_failed_status_lookup_releases_the_claim_for_the_delayed_retry(db, make_merchant, stack):
    """The retry of a refund whose earlier attempt may have landed asks for its status first; when
    that lookup fails too, the claim is released at once (else the next retry finds it held and
    the refund waits for the claim to expire)."""
    res, sandbox_url, http = stack.res, stack.sandbox_url, stack.http
    await make_merchant("m1")
    await chaos(http, sandbox_url, error_rate=1.0)
    refund = await accepted_refund(stack, db)
    await process_refund(res, refund.refund_id)  # attempt 1: the POST fails
    await process_refund(res, refund.refund_id)  # attempt 2: the status lookup fails
    waiting = await find_refund(db, refund.refund_id)
    assert (waiting.state, waiting.attempts) == ("submitted", 2)
    assert waiting.claimed_until is None and waiting.delivered_at > datetime.now(timezone.utc)
    await chaos(http, sandbox_url, error_rate=0.0, sync_status_mix={"success": 1})
    await process_refund(res, refund.refund_id)  # attempt 3 takes the claim at once: status, then send
    settled = await find_refund(db, refund.refund_id)
    assert (settled.state, settled.attempts) == ("succeeded", 3)
    assert len(await ledger(http, sandbox_url)) == 1


async def test_the_workers_lines_for_a_refund_carry_the_request_id_of_the_call_that_made_it(db, make_merchant, stack):
    """The intake's X-Request-Id is kept on the refund; whichever worker takes it (after any
    re-queue, a Redis loss or the outbox sweep) tags its lines with it."""
    import io
    import json
    import logging

    from producers.enqueue import accept_request
    from refunds import logs
    from refunds.requests import RefundRequest

    await make_merchant("m1")
    await chaos(stack.http, stack.sandbox_url, sync_status_mix={"success": 1})
    await stack.paid(db, "m1", "CIP-9", "100.00")
    request = RefundRequest.parse(merchant_id="m1", original_transaction_id="CIP-9", amount="25.00",
                                  currency="PEN", external_ref="R-1")
    refund = (await accept_request(db, request, request_id="checkout-77")).refund
    assert refund.request_id == "checkout-77"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    worker_log = logging.getLogger("workers")
    worker_log.addHandler(handler)
    level = worker_log.level
    worker_log.setLevel(logging.INFO)
    try:
        await process_refund(stack.res, refund.refund_id)
    finally:
        worker_log.removeHandler(handler)
        worker_log.setLevel(level)
    assert (await find_refund(db, refund.refund_id)).state == "succeeded"
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines  # at least its move to succeeded
    assert {(line["refund_id"], line["request_id"]) for line in lines} == {(str(refund.refund_id), "checkout-77")}


async def test_no_refund_is_sent_on_a_claim_that_could_not_be_renewed(db, make_merchant, stack, monkeypatch):
    """workers.claims: a claim whose renewals failed holds no request; it is released, and the
    next attempt asks for status first."""
    await make_merchant("m1")
    await chaos(stack.http, stack.sandbox_url, sync_status_mix={"success": 1})
    refund = await accepted_refund(stack, db)
    monkeypatch.setattr(stack.res.claims, "may_send", lambda refund_id: False)
    await process_refund(stack.res, refund.refund_id)
    kept = await find_refund(db, refund.refund_id)
    assert (kept.state, kept.claimed_until, kept.provider_code) == ("submitted", None, "claim_running_out")
    assert await ledger(stack.http, stack.sandbox_url) == []  # nothing reached the gateway


async def test_gateway_exchanges_are_logged_redacted_when_asked(db, make_merchant, stack, monkeypatch, caplog):
    """REFUNDS_LOG_BODIES=1: the worker's client logs each exchange through the core's redacting logger."""
    import json
    import logging

    from refunds import logs

    res, sandbox_url, http = stack.res, stack.sandbox_url, stack.http
    await make_merchant("m1")
    await chaos(http, sandbox_url, sync_status_mix={"success": 1})
    monkeypatch.setenv("REFUNDS_LOG_BODIES", "1")
    refund = await accepted_refund(stack, db)
    with caplog.at_level(logging.INFO, logger="pagoefectivo.client"):
        await process_refund(res, refund.refund_id)
    assert (await find_refund(db, refund.refund_id)).state == "succeeded"
    exchanges = [r for r in caplog.records if getattr(r, "event", None) == "gateway_exchange"]
    assert [r.path for r in exchanges][:2] == ["/v1/authorizations", "/v1/refunds"]
    authorization = json.dumps(exchanges[0].request_body)
    assert logs.REDACTED in authorization and "hashString" in authorization


async def test_merchant_rate_limit_defers_instead_of_sending(db, make_merchant, stack):
    res, sandbox_url, http = stack.res, stack.sandbox_url, stack.http
    await make_merchant("m1", rate_limit=Decimal("1"))
    await chaos(http, sandbox_url, sync_status_mix={"success": 1})
    ids = []
    for index in range(4):
        ids.append((await accepted_refund(stack, db, external_ref=f"R-{index}", amount="5.00")).refund_id)
    for refund_id in ids:
        await process_refund(res, refund_id)
    states = [(await find_refund(db, rid)).state for rid in ids]
    assert states.count("succeeded") == 1  # the other three booked later slots
    assert states.count("queued") == 3
    assert len(await ledger(http, sandbox_url)) == 1
    deferred = [await find_refund(db, rid) for rid in ids[1:]]
    assert all(r.delivered_at > datetime.now(timezone.utc) for r in deferred)


async def test_pending_refund_is_polled_then_sent_to_manual_review(db, make_merchant, stack):
    from workers.status_schedule import SCHEDULE_SECONDS, next_check_delay

    assert next_check_delay(1) == 300 and next_check_delay(6) == 3600 and next_check_delay(len(SCHEDULE_SECONDS) + 1) is None
    assert sum(SCHEDULE_SECONDS) >= 24 * 3600  # hourly for a day after the five-minute checks
    res, sandbox_url, http = stack.res, stack.sandbox_url, stack.http
    await make_merchant("m1")
    # the gateway accepts but its notification would take far longer than this test
    await chaos(http, sandbox_url, sync_status_mix={"pending": 1}, notification_delay_ms=600_000)
    refund = await accepted_refund(stack, db)
    await process_refund(res, refund.refund_id)
    pending = await find_refund(db, refund.refund_id)
    assert pending.state == "pending" and pending.next_check_at > datetime.now(timezone.utc)
    await process_refund(res, refund.refund_id)  # a stray message before the check is due: nothing
    assert (await find_refund(db, refund.refund_id)).status_checks == 0
    await db.execute("UPDATE refunds SET next_check_at = now() - interval '1 second' WHERE refund_id = $1",
                     refund.refund_id)
    await process_refund(res, refund.refund_id)  # first check: still pending at the gateway
    checked = await find_refund(db, refund.refund_id)
    assert checked.state == "pending" and checked.status_checks == 1
    assert 290 < (checked.next_check_at - datetime.now(timezone.utc)).total_seconds() <= 300
    await db.execute("""UPDATE refunds SET status_checks = $2, next_check_at = now() - interval '1 second'
                        WHERE refund_id = $1""", refund.refund_id, len(SCHEDULE_SECONDS))
    await process_refund(res, refund.refund_id)  # the schedule is over
    review = await find_refund(db, refund.refund_id)
    assert (review.state, review.provider_code) == ("manual_review", "unsettled")
    assert len(await ledger(http, sandbox_url)) == 1


@pytest.mark.slow
def test_a_worker_opens_its_resources_before_any_thread_takes_a_message(monkeypatch, redis_url):
    """A message waiting when the worker boots finds the worker's resources open, even when
    opening them is slow (a loaded Postgres): the threads start only after they are open."""
    import dramatiq
    from dramatiq import Worker

    from workers import resources
    from workers.broker import setup_broker

    slow_open = resources.Resources.open

    async def open_slowly(*args, **kwargs):
        await asyncio.sleep(0.5)
        return await slow_open(*args, **kwargs)

    monkeypatch.setattr(resources.Resources, "open", open_slowly)
    broker = setup_broker()
    queue = f"boot-probe-{uuid.uuid4().hex[:8]}"
    seen = []

    def probe():
        seen.append(resources._current is not None)

    dramatiq.actor(probe, broker=broker, queue_name=queue, actor_name=queue, max_retries=0)
    broker.actors[queue].send()  # waiting before the worker boots
    worker = Worker(broker, queues={queue}, worker_threads=2)
    policy = asyncio.get_event_loop_policy()  # the worker's boot makes uvloop's the process's policy
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        worker.stop()
        broker.close()
        asyncio.set_event_loop_policy(policy)  # for the tests after this one (subprocesses need its child watcher)
    assert seen == [True]


@pytest.mark.slow
async def test_a_slow_claim_between_admission_and_request_never_pushes_the_gateway_over_the_limit(
        db, make_merchant, stack, monkeypatch):
    """The limit is counted when the request leaves, not when the refund was admitted: refunds
    whose claims take different times (a loaded Postgres) still reach the gateway at most
    ``rate_limit`` in any second, so it never answers 429."""
    import random

    from refunds import metrics
    from workers.sender import process_refunds

    res, sandbox_url, http = stack.res, stack.sandbox_url, stack.http
    await make_merchant("m1", rate_limit=Decimal(5))
    await chaos(http, sandbox_url, sync_status_mix={"success": 1}, merchant_rate_limits={"m1": 5})
    real_claim = res.claim

    async def slow_claim(refund_id):
        await asyncio.sleep(random.uniform(0, 0.4))
        return await real_claim(refund_id)

    monkeypatch.setattr(res, "claim", slow_claim)
    refused = metrics.refund_gateway_requests_total.labels("rate_limited")
    before = refused._value.get()
    ids = [(await accepted_refund(stack, db, external_ref=f"L-{n}", amount="2.00")).refund_id for n in range(15)]
    booking = await res.limiter.book("m1", Decimal(5), len(ids))  # as the courier books at hand-off

    async def deliver(refund_id, slot_ms):  # each message arrives at its slot, as dramatiq delays it
        await asyncio.sleep(max(0, slot_ms - booking.now_ms) / 1000)
        await process_refunds(res, [(refund_id, slot_ms)])

    await asyncio.gather(*(deliver(rid, slot) for rid, slot in zip(ids, booking.slots_ms)))
    assert {(await find_refund(db, rid)).state for rid in ids} == {"succeeded"}
    assert refused._value.get() - before == 0  # the gateway never saw more than 5 in a second
    assert len(await ledger(http, sandbox_url)) == 15


@pytest.mark.parametrize("operator_retried", [True, False])
async def test_the_retry_horizon_counts_from_when_the_refund_last_entered_queued(db, make_merchant, stack, monkeypatch,
                                                                                operator_retried):
    """A refund requested 30 h ago and retried by an operator now gets its delayed retries; one
    queued 30 h ago and failing since goes to manual review (workers.retries.RETRY_HORIZON_SECONDS)."""
    from refunds.states import retry, transition
    from workers import sender

    await make_merchant("m1")
    refund = await accepted_refund(stack, db)
    await db.execute("UPDATE refunds SET created_at = now() - interval '30 hours' WHERE refund_id = $1", refund.refund_id)
    await db.execute("UPDATE refund_events SET occurred_at = now() - interval '30 hours' WHERE refund_id = $1",
                     refund.refund_id)
    if operator_retried:
        await transition(db, refund.refund_id, "manual_review", actor="worker", code="retries_exhausted")
        await retry(db, refund.refund_id, actor="operator")
    requeued = []
    monkeypatch.setattr(sender, "requeue", lambda refund_id, **how: requeued.append(refund_id) or True)
    await sender._retry_later(stack.res, await find_refund(db, refund.refund_id), "the gateway is away")
    current = await find_refund(db, refund.refund_id)
    if operator_retried:
        assert (current.state, requeued) == ("queued", [refund.refund_id])
    else:
        assert (current.state, current.provider_code, requeued) == ("manual_review", "retries_exhausted", [])
