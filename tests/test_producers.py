"""producers.enqueue_refund against real Postgres and Redis."""

import asyncio
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import asyncpg
import pytest
import redis

from producers import enqueue_refund
from refunds.errors import IdempotencyConflict, RefundRefused
from refunds.payments import find_payment, record_payment
from refunds.records import refund_events


@pytest.fixture
def queue(redis_url):
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter("dramatiq:refunds*"):
        client.delete(key)
    yield client
    client.close()


def queued_refund_ids(client) -> set[str]:
    import json

    ids = set()
    for raw in client.hgetall("dramatiq:refunds.msgs").values():
        ids.add(json.loads(raw)["args"][0])
    return ids


async def paid(db, merchant="m1", transaction="CIP-1", amount="100.00", days_ago=0, method="cash", currency="PEN"):
    payment, _ = await record_payment(
        db, merchant_id=merchant, transaction_id=transaction, amount=Decimal(amount), currency=currency,
        method=method, paid_at=datetime.now(timezone.utc) - timedelta(days=days_ago),
    )
    return payment


def request(**overrides):
    params = dict(merchant_id="m1", original_transaction_id="CIP-1", amount="10.00", currency="PEN",
                  external_ref="R-1", reason="damaged")
    params.update(overrides)
    return params


async def test_accepts_queues_after_commit_and_replays(db, make_merchant, queue):
    await make_merchant("m1")
    await paid(db)
    first = await enqueue_refund(db, **request(), requested_by="tester")
    assert first.created and first.http_status == 202 and first.refund.state == "queued"
    assert str(first.refund.refund_id) in queued_refund_ids(queue)
    again = await enqueue_refund(db, **request())
    assert not again.created and again.http_status == 200
    assert again.refund.refund_id == first.refund.refund_id
    assert (await find_payment(db, "m1", "CIP-1")).refunded_amount == Decimal("10.00")
    events = await refund_events(db, first.refund.refund_id)
    assert [(e["to_state"], e["actor"]) for e in events] == [("queued", "tester")]


async def test_same_external_ref_other_parameters_is_a_conflict(db, make_merchant, queue):
    await make_merchant("m1")
    await paid(db)
    await enqueue_refund(db, **request())
    with pytest.raises(IdempotencyConflict):
        await enqueue_refund(db, **request(amount="11.00"))
    assert await db.fetchval("SELECT count(*) FROM refunds") == 1


@pytest.mark.parametrize(
    "payment_kwargs, overrides, code, field",
    [
        ({}, {"original_transaction_id": "NOPE"}, "unknown_transaction", "original_transaction_id"),
        ({}, {"amount": "100.01"}, "amount_over_refundable", "amount"),
        ({"days_ago": 91}, {}, "refund_window_closed", "original_transaction_id"),
        ({"currency": "USD"}, {}, "currency_mismatch", "currency"),
        ({}, {"amount": "0"}, "invalid_amount", "amount"),
        ({}, {"amount": 5.5}, "invalid_amount", "amount"),
        ({}, {"currency": "EUR"}, "invalid_currency", "currency"),
        ({}, {"merchant_id": "ghost"}, "unknown_merchant", "merchant_id"),
        ({}, {"external_ref": ""}, "invalid_field", "external_ref"),
    ],
)
async def test_refusals_name_the_reason_and_write_nothing(db, make_merchant, queue, payment_kwargs, overrides, code, field):
    await make_merchant("m1")
    await paid(db, **payment_kwargs)
    with pytest.raises(RefundRefused) as refused:
        await enqueue_refund(db, **request(**overrides))
    assert (refused.value.code, refused.value.field) == (code, field)
    assert await db.fetchval("SELECT count(*) FROM refunds") == 0
    assert queued_refund_ids(queue) == set()


async def test_refund_window_is_per_method(db, make_merchant, queue, monkeypatch):
    from refunds.settings import get_settings

    await make_merchant("m1")
    await paid(db, transaction="BANK-1", method="bank_transfer", days_ago=40)
    monkeypatch.setitem(get_settings().refund_window_days, "bank_transfer", 30)
    with pytest.raises(RefundRefused) as refused:
        await enqueue_refund(db, **request(original_transaction_id="BANK-1"))
    assert refused.value.code == "refund_window_closed"


async def test_the_database_itself_caps_refunds_under_concurrency(db, database_url, make_merchant):
    """Bypass Python checks: 25 concurrent raw INSERTs of 10% each; the trigger lets exactly 10 in."""
    await make_merchant("m1")
    await paid(db)
    conns = [await asyncpg.connect(database_url) for _ in range(25)]

    async def insert(conn, index):
        try:
            await conn.execute(
                """INSERT INTO refunds (refund_id, merchant_id, external_ref, original_transaction_id, amount,
                                        currency, state) VALUES ($1, 'm1', $2, 'CIP-1', 10.00, 'PEN', 'queued')""",
                uuid.uuid4(), f"RAW-{index}",
            )
            return True
        except asyncpg.CheckViolationError as exc:
            assert exc.constraint_name == "refunds_within_paid_amount"
            return False

    try:
        results = await asyncio.gather(*(insert(c, i) for i, c in enumerate(conns)))
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    assert results.count(True) == 10
    assert await db.fetchval("SELECT sum(amount) FROM refunds") == Decimal("100.00")
    assert (await find_payment(db, "m1", "CIP-1")).refunded_amount == Decimal("100.00")


async def test_failed_refund_releases_its_amount_and_final_states_are_final(db, make_merchant, queue):
    from refunds.states import transition

    await make_merchant("m1")
    await paid(db)
    result = await enqueue_refund(db, **request(amount="100.00"))
    refund_id = result.refund.refund_id
    assert await transition(db, refund_id, "submitted", actor="test") is not None
    assert await transition(db, refund_id, "failed", actor="test", code="601") is not None
    assert (await find_payment(db, "m1", "CIP-1")).refunded_amount == Decimal("0.00")
    assert await transition(db, refund_id, "succeeded", actor="late") is None  # never backwards
    again = await enqueue_refund(db, **request(external_ref="R-2", amount="100.00"))
    assert again.created


async def test_operator_retry_reserves_again_and_refuses_what_cannot_succeed(db, make_merchant, queue):
    from refunds.errors import InvalidTransition
    from refunds.states import retry, transition

    await make_merchant("m1")
    await paid(db)
    declined = (await enqueue_refund(db, **request(amount="60.00"))).refund
    refused = (await enqueue_refund(db, **request(external_ref="R-2", amount="40.00"))).refund
    for refund, code in ((declined, "701"), (refused, "605")):
        await transition(db, refund.refund_id, "submitted", actor="test")
        await transition(db, refund.refund_id, "failed", actor="test", code=code)
    assert (await find_payment(db, "m1", "CIP-1")).refunded_amount == Decimal("0.00")
    with pytest.raises(InvalidTransition, match="605"):
        await retry(db, refused.refund_id, actor="ops")
    await enqueue_refund(db, **request(external_ref="R-3", amount="50.00"))  # room left: 50.00
    with pytest.raises(InvalidTransition, match="refundable"):
        await retry(db, declined.refund_id, actor="ops")  # 60.00 no longer fits
    assert (await find_payment(db, "m1", "CIP-1")).refunded_amount == Decimal("50.00")
    await db.execute("UPDATE payments SET amount = 200.00")
    again = await retry(db, declined.refund_id, actor="ops")
    assert again.state == "queued" and again.completed_at is None
    assert (await find_payment(db, "m1", "CIP-1")).refunded_amount == Decimal("110.00")
    history = [(e["from_state"], e["to_state"], e["actor"]) for e in await refund_events(db, declined.refund_id)]
    assert history[-1] == ("failed", "queued", "ops")
    with pytest.raises(InvalidTransition, match="queued"):
        await retry(db, declined.refund_id, actor="ops")
