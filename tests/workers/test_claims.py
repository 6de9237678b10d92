"""A worker's claims against a real Postgres: renewed while held, never renewed once another
worker took the refund over, and no request leaves on a claim whose renewals fail."""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio

from producers.enqueue import accept_refund
from refunds import db as dbmod
from refunds.states import claim_many, release_claim
from tests.helpers import paid
from workers.claims import Claims

CLAIM_SECONDS = 2  # renewed every 0.5 s; a request may leave while 1 s of it is left


@pytest_asyncio.fixture
async def pool(database_url):
    pool = await dbmod.create_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


async def claimed(db, make_merchant, *, actor="worker-a"):
    await make_merchant("m1")
    await paid(db)
    refund = (await accept_refund(db, merchant_id="m1", original_transaction_id="CIP-1", amount="10.00",
                                  currency="PEN", external_ref="R-1")).refund
    asked_at = time.monotonic()
    [(refund, _)] = await claim_many(db, [refund.refund_id], actor=actor, claim_seconds=CLAIM_SECONDS)
    return refund, asked_at


async def claim_left(db, refund_id) -> float:
    return await db.fetchval("SELECT extract(epoch FROM claimed_until - now()) FROM refunds WHERE refund_id = $1",
                             refund_id)


@pytest.mark.slow
async def test_a_claim_held_is_renewed_for_as_long_as_the_worker_works_on_it(db, pool, make_merchant):
    refund, asked_at = await claimed(db, make_merchant)
    claims = Claims(pool, CLAIM_SECONDS)
    claims.hold(refund.refund_id, refund.claimed_until, asked_at)
    try:
        for _ in range(8):  # 4 s: twice the claim's length
            await asyncio.sleep(0.5)
            assert claims.may_send(refund.refund_id)
            assert await claim_left(db, refund.refund_id) > CLAIM_SECONDS / 2
        # no other worker may take it meanwhile
        assert await claim_many(db, [refund.refund_id], actor="worker-b", claim_seconds=CLAIM_SECONDS) == [None]
        claims.drop(refund.refund_id)  # the attempt is over: no more renewals
        await asyncio.sleep(CLAIM_SECONDS + 0.2)
        assert await claim_left(db, refund.refund_id) < 0
    finally:
        await claims.close()


@pytest.mark.slow
async def test_a_claim_another_worker_took_over_is_never_renewed_by_the_one_that_lost_it(db, pool, make_merchant):
    refund, asked_at = await claimed(db, make_merchant)
    claims = Claims(pool, CLAIM_SECONDS)
    claims.hold(refund.refund_id, refund.claimed_until, asked_at)
    await claims.close()  # this worker stalls: its claim expires
    await asyncio.sleep(CLAIM_SECONDS + 0.2)
    [(taken, _)] = await claim_many(db, [refund.refund_id], actor="worker-b", claim_seconds=CLAIM_SECONDS)
    await claims.renew()  # it wakes up and renews what it believes it holds
    until = await db.fetchval("SELECT claimed_until FROM refunds WHERE refund_id = $1", refund.refund_id)
    assert until == taken.claimed_until  # worker-b's claim, untouched
    assert not claims.may_send(refund.refund_id)  # and the stalled worker may not send


@pytest.mark.slow
async def test_no_request_leaves_on_a_claim_whose_renewals_fail(db, database_url, make_merchant):
    refund, asked_at = await claimed(db, make_merchant)
    gone = await dbmod.create_pool(database_url, min_size=1, max_size=1)
    await gone.close()  # every renewal fails
    claims = Claims(gone, CLAIM_SECONDS)
    claims.hold(refund.refund_id, refund.claimed_until, asked_at)
    try:
        assert claims.may_send(refund.refund_id)
        await asyncio.sleep(CLAIM_SECONDS / 2 + 0.1)
        assert not claims.may_send(refund.refund_id)
        # the claim itself still has time left: a request sent just before would end under it
        assert await claim_left(db, refund.refund_id) > 0
    finally:
        await claims.close()


@pytest.mark.slow
async def test_renewals_go_on_after_any_failure(db, pool, make_merchant, monkeypatch):
    """The renewal loop alone keeps a process's claims: an error it did not foresee (here asyncpg's
    InternalClientError) costs one renewal, never the rest."""
    import asyncpg

    from workers import claims as claims_module

    real, failures = claims_module.renew_claims, []

    async def failing_once(*args, **kwargs):
        if not failures:
            failures.append(True)
            raise asyncpg.InternalClientError("cannot switch to state 12")
        return await real(*args, **kwargs)

    monkeypatch.setattr(claims_module, "renew_claims", failing_once)
    refund, asked_at = await claimed(db, make_merchant)
    claims = Claims(pool, CLAIM_SECONDS)
    claims.hold(refund.refund_id, refund.claimed_until, asked_at)
    try:
        await asyncio.sleep(CLAIM_SECONDS * 1.5)
        assert failures and claims.may_send(refund.refund_id)
        assert await claim_left(db, refund.refund_id) > CLAIM_SECONDS / 2
    finally:
        await claims.close()


async def test_a_release_says_how_this_attempt_ended_never_what_an_earlier_one_said(db, make_merchant):
    """An attempt that ended in a 429 released with "nothing was sent"; the next one, which may
    have reached the gateway, releases without a code: the refund must not keep the 429, or the
    attempt after would send without asking for status (workers.sender.NOTHING_SENT)."""
    refund, _ = await claimed(db, make_merchant)
    await release_claim(db, refund.refund_id, code="429", message="over the merchant's rate")
    [(refund, _)] = await claim_many(db, [refund.refund_id], actor="worker-a", claim_seconds=CLAIM_SECONDS)
    assert refund.provider_code == "429"  # what the next attempt reads: nothing was sent
    await release_claim(db, refund.refund_id, code=None, message="the gateway's answer timed out")
    [(refund, _)] = await claim_many(db, [refund.refund_id], actor="worker-a", claim_seconds=CLAIM_SECONDS)
    assert refund.provider_code is None
