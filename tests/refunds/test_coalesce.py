"""Refunds in flight together share statements: the coalescer, and the state machine's batch forms
against real Postgres."""

import asyncio
import random
import uuid

import pytest

from producers.enqueue import accept_refund
from refunds.coalesce import Coalescer
from refunds.errors import InvalidTransition
from refunds.states import Move, claim_many, transition, transition_many
from tests.producers.test_producers import request
from tests.helpers import paid


async def test_calls_awaited_together_share_a_batch_and_keep_their_own_results():
    batches = []

    async def double(items):
        batches.append(list(items))
        await asyncio.sleep(0.02)  # a statement in flight: calls that come meanwhile queue behind it
        return [item * 2 for item in items]

    coalescer = Coalescer(double, max_inflight=1)
    assert await asyncio.gather(*(coalescer(n) for n in range(10))) == [n * 2 for n in range(10)]
    alone = asyncio.create_task(coalescer(100))
    await asyncio.sleep(0.005)  # an idle coalescer runs it at once, without waiting for company
    assert batches[-1] == [100]
    assert await asyncio.gather(*(coalescer(n) for n in range(3))) == [0, 2, 4]
    assert await alone == 200
    assert batches == [list(range(10)), [100], [0, 1, 2]]


class WholeBatchUndone(Exception):
    """Stands for an error Postgres raises for a whole statement (a CHECK, a deadlock)."""


async def test_a_batch_undone_as_a_whole_runs_each_alone_and_only_the_culprit_fails(caplog):
    batches = []

    async def run(items):
        batches.append(list(items))
        if "bad" in items:
            raise WholeBatchUndone("the statement was undone")
        return [item.upper() for item in items]

    coalescer = Coalescer(run, max_inflight=1, alone_on=(WholeBatchUndone,), name="words")
    results = await asyncio.gather(*(coalescer(word) for word in ["a", "bad", "c"]), return_exceptions=True)
    assert results[0] == "A" and results[2] == "C" and isinstance(results[1], WholeBatchUndone)
    assert batches == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]  # the culprit is not run a third time
    assert any("a batch of 3 words failed as a whole (WholeBatchUndone); running each alone" in r.getMessage()
               for r in caplog.records)


async def test_a_lone_item_undone_once_gets_a_second_try_and_other_errors_fail_the_batch():
    calls = []

    async def deadlocks_once(items):
        calls.append(list(items))
        if len(calls) == 1:
            raise WholeBatchUndone("deadlock")
        return items

    assert await Coalescer(deadlocks_once, alone_on=(WholeBatchUndone,))("x") == "x"
    assert calls == [["x"], ["x"]]

    async def broken(items):
        raise KeyError("a bug")

    coalescer = Coalescer(broken, max_inflight=1, alone_on=(WholeBatchUndone,))
    results = await asyncio.gather(coalescer(1), coalescer(2), return_exceptions=True)
    assert all(isinstance(result, KeyError) for result in results)


async def test_one_key_is_never_twice_in_a_batch():
    batches = []

    async def run(items):
        batches.append(list(items))
        return items

    coalescer = Coalescer(run, keys=lambda item: (item[0],), max_inflight=1)
    await asyncio.gather(coalescer(("x", 0)), coalescer(("a", 1)), coalescer(("a", 2)), coalescer(("b", 3)))
    assert batches == [[("x", 0), ("a", 1), ("b", 3)], [("a", 2)]]


async def test_equal_items_never_share_a_batch_even_as_distinct_objects():
    """The default key is the item's value: one refund id read twice from Postgres is two
    equal UUID objects, and must not be claimed twice in one statement."""
    batches = []

    async def run(items):
        batches.append(list(items))
        return items

    refund_id = uuid.uuid4()
    coalescer = Coalescer(run, max_inflight=1)
    await asyncio.gather(coalescer(uuid.UUID(str(refund_id))), coalescer(uuid.UUID(str(refund_id))))
    assert batches == [[refund_id], [refund_id]]


async def test_a_failed_batch_fails_each_of_its_calls_and_the_next_batch_still_runs():
    async def run(items):
        if 1 in items:
            raise RuntimeError("statement refused")
        return items

    coalescer = Coalescer(run, max_inflight=1)
    outcomes = await asyncio.gather(coalescer(0), coalescer(1), coalescer(2), return_exceptions=True)
    assert all(isinstance(outcome, RuntimeError) for outcome in outcomes)  # one batch, one failure
    assert await coalescer(3) == 3


async def _queued(db, make_merchant, count):
    await make_merchant("m1")
    await paid(db, amount="1000.00")
    return [(await accept_refund(db, **request(external_ref=f"R-{n}"))).refund for n in range(count)]


async def test_claims_and_moves_of_several_refunds_are_one_statement_each_with_audit_rows(db, make_merchant):
    first, second, third = await _queued(db, make_merchant, 3)
    claimed = await claim_many(db, [first.refund_id, second.refund_id], actor="worker", claim_seconds=60)
    assert [(refund.refund_id, refund.state, refund.attempts, source) for refund, source in claimed] == [
        (first.refund_id, "submitted", 1, "queued"), (second.refund_id, "submitted", 1, "queued")]
    # a claim held by another worker is not taken again; the queued one is claimed
    again = await claim_many(db, [first.refund_id, third.refund_id], actor="worker", claim_seconds=60)
    assert again[0] is None
    assert (again[1][0].refund_id, again[1][0].state, again[1][1]) == (third.refund_id, "submitted", "queued")

    moved = await transition_many(db, [
        Move(first.refund_id, "succeeded", code="100", message="ok", provider_refund_id="P-1"),
        Move(second.refund_id, "pending"),
        Move(third.refund_id, "queued"),  # not a move the machine allows from submitted
    ], actor="worker")
    assert [None if refund is None else refund.state for refund in moved] == ["succeeded", "pending", None]
    assert moved[0].provider_refund_id == "P-1" and moved[0].completed_at is not None
    assert moved[1].next_check_at is not None and moved[1].claimed_until is None
    events = await db.fetch(
        "SELECT refund_id, from_state, to_state, actor, code, message FROM refund_events"
        " WHERE refund_id = ANY($1::uuid[]) AND to_state IN ('succeeded', 'pending') ORDER BY to_state",
        [first.refund_id, second.refund_id])
    assert [tuple(row) for row in events] == [
        (second.refund_id, "submitted", "pending", "worker", None, None),
        (first.refund_id, "submitted", "succeeded", "worker", "100", "ok"),
    ]
    # a late duplicate of the same move changes nothing and writes no audit row
    assert await transition(db, first.refund_id, "succeeded", actor="receiver") is None
    assert await db.fetchval("SELECT count(*) FROM refund_events WHERE refund_id = $1", first.refund_id) == 3


async def test_a_batch_with_an_unknown_state_writes_nothing(db, make_merchant):
    [refund] = await _queued(db, make_merchant, 1)
    with pytest.raises(InvalidTransition):
        await transition_many(db, [Move(refund.refund_id, "failed"), Move(refund.refund_id, "teleported")],
                              actor="worker")
    assert await db.fetchval("SELECT state FROM refunds WHERE refund_id = $1", refund.refund_id) == "queued"


async def test_the_worker_settles_refunds_in_flight_together_with_shared_statements(
        db, make_merchant, database_url, vault):
    """Through the worker's own Resources: 20 refunds claimed and moved concurrently take far fewer statements."""
    from refunds import db as dbmod
    from refunds.settings import get_settings
    from workers.resources import Resources

    refunds = await _queued(db, make_merchant, 20)
    pool = await dbmod.create_pool(database_url, max_size=4)
    statements = []
    try:
        # only what claims and moves use: no gateway, no Redis
        res = Resources(get_settings(), pool, session=None, client=None, vault=vault, redis=None, limiter=None)
        original = res.claim._run_batch

        async def counted(items):
            statements.append(len(items))
            return await original(items)

        res.claim._run_batch = counted
        claimed = await asyncio.gather(*(res.claim(refund.refund_id) for refund in refunds))
        assert all(c is not None and c[1] == "queued" for c in claimed)
        moved = await asyncio.gather(*(res.move(Move(refund.refund_id, "succeeded")) for refund in refunds))
        assert all(m is not None and m.state == "succeeded" for m in moved)
    finally:
        await pool.close()
    assert sum(statements) == 20 and len(statements) < 20
    assert await db.fetchval("SELECT count(*) FROM refunds WHERE state = 'succeeded'") == 20
    assert await db.fetchval("SELECT count(*) FROM refund_events WHERE to_state = 'succeeded'") == 20


async def test_a_refund_asked_for_twice_is_claimed_once(db, make_merchant, database_url, vault):
    """In one statement (claim_many given the id twice) and through the worker's Resources (two
    deliveries of one refund at the same moment, each with its own UUID object): one claim."""
    from refunds import db as dbmod
    from refunds.settings import get_settings
    from workers.resources import Resources

    first, second = await _queued(db, make_merchant, 2)
    claims = await claim_many(db, [first.refund_id, first.refund_id], actor="worker", claim_seconds=60)
    assert claims[0] is not None and claims[1] is None
    pool = await dbmod.create_pool(database_url, max_size=2)
    try:
        res = Resources(get_settings(), pool, session=None, client=None, vault=vault, redis=None, limiter=None)
        claims = await asyncio.gather(*(res.claim(uuid.UUID(str(second.refund_id))) for _ in range(2)))
    finally:
        await pool.close()
    assert sorted(claim is None for claim in claims) == [False, True]
    assert await db.fetchval("SELECT attempts FROM refunds WHERE refund_id = $1", second.refund_id) == 1


async def test_a_call_arriving_as_a_drain_ends_is_never_left_waiting():
    """A drain that saw the queue empty used to stay in the running set until its done callback,
    a turn later: a call in that turn found the set full, queued its item and waited for a drain
    that never came (a producer hung mid-import). Seed 2 of this interleaving hung every time."""
    for seed in range(5):
        rng = random.Random(seed)

        async def run(items):
            if rng.random() < 0.5:
                await asyncio.sleep(0)
            return items

        coalescer = Coalescer(run, max_inflight=1)

        async def caller(n):
            for i in range(200):
                assert await coalescer((n, i)) == (n, i)
                for _ in range(rng.randint(0, 2)):
                    await asyncio.sleep(0)

        await asyncio.wait_for(asyncio.gather(*(caller(n) for n in range(30))), 20)
