"""producers.enqueue_refund against real Postgres and Redis."""

import asyncio
import os
import uuid
from datetime import datetime, timezone
from decimal import Decimal

import asyncpg
import pytest
import redis

from producers import enqueue as enqueue_module, enqueue_refund
from producers.enqueue import Ask, EnqueueResult, RefundRequest
from refunds.errors import IdempotencyConflict, RefundRefused
from refunds.payments import find_payment
from refunds.records import refund_events
from tests.helpers import ROOT, paid


@pytest.fixture
def queue(redis_url):
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter("dramatiq:refunds*"):
        client.delete(key)
    yield client
    client.close()


def queued_refunds(client) -> list[str]:
    """Refund ids in the messages waiting in Redis, ready or delayed to their rate-limit slot
    (a send_refunds message names several)."""
    import json

    from refunds.delivery import SEND_REFUNDS

    ids = []
    for messages in ("dramatiq:refunds.msgs", "dramatiq:refunds.DQ.msgs"):
        for raw in client.hgetall(messages).values():
            message = json.loads(raw)
            if message["actor_name"] == SEND_REFUNDS:
                ids.extend(refund_id for refund_id, _ in message["args"][0])
            else:
                ids.append(message["args"][0])
    return ids


def queued_refund_ids(client) -> set[str]:
    return set(queued_refunds(client))



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


async def test_a_refund_that_needs_approval_must_name_who_asks_for_it(db, make_merchant, queue):
    """Four eyes need to know the first pair: above the approval threshold, a request without
    ``requested_by`` is refused (nothing written); named, it waits for approval; below, it goes."""
    await make_merchant("m1", approval_threshold=Decimal("50"))
    await paid(db)
    with pytest.raises(RefundRefused) as refused:
        await enqueue_refund(db, **request(amount="60.00"))
    assert (refused.value.code, refused.value.field) == ("requester_unnamed", "requested_by")
    assert await db.fetchval("SELECT count(*) FROM refunds") == 0
    waiting = await enqueue_refund(db, **request(amount="60.00"), requested_by="alice")
    assert (waiting.refund.state, waiting.refund.requested_by) == ("awaiting_approval", "alice")
    small = await enqueue_refund(db, **request(amount="10.00", external_ref="R-small"))
    assert small.refund.state == "queued"


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


# --- the Python API from synchronous code and from other programs ------------------------------

async def test_refund_producer_from_threads_shares_one_loop_and_pool(db, database_url, make_merchant, queue):
    """Synchronous callers on many threads get enqueue_refund's exact results."""
    from producers import RefundProducer

    await make_merchant("m1")
    await paid(db, amount="1000.00")
    producer = RefundProducer(database_url, pool_size=3)

    def sync_caller(index: int) -> list:
        results = []
        for n in range(5):
            result = producer.enqueue(**request(external_ref=f"T-{index}-{n}"), requested_by=f"thread-{index}")
            results.append((result.created, result.refund.state, str(result.refund.refund_id)))
        results.append(producer.enqueue(**request(external_ref=f"T-{index}-0")).created)  # a replay
        try:
            producer.enqueue(**request(external_ref=f"T-{index}-x", amount="5000.00"))
        except RefundRefused as refused:
            results.append(refused.code)
        return results

    try:
        answers = await asyncio.gather(*(asyncio.to_thread(sync_caller, index) for index in range(8)))
        loop_thread = producer._thread
        assert producer._pool is not None
    finally:
        await asyncio.to_thread(producer.close)
    for answer in answers:
        assert [a[:2] for a in answer[:5]] == [(True, "queued")] * 5
        assert answer[5:] == [False, "amount_over_refundable"]
    assert await db.fetchval("SELECT count(*) FROM refunds") == 40
    assert len(queued_refund_ids(queue)) == 40
    assert not loop_thread.is_alive()
    with RefundProducer(database_url) as again:  # usable again after close, also as a context manager
        assert (await asyncio.to_thread(again.enqueue, **request(external_ref="T-0-0"))).created is False


async def test_sync_api_called_inside_a_running_event_loop(db, database_url, make_merchant, queue, monkeypatch):
    """enqueue_refund_sync from a coroutine (a sync library used by async code): it blocks, but works."""
    import producers.sync
    from producers import enqueue_refund_sync

    await make_merchant("m1")
    await paid(db)
    monkeypatch.setattr(producers.sync, "_default", None)
    try:
        result = enqueue_refund_sync(**request(), requested_by="inside-a-loop")  # no await: on purpose
        assert result.created and result.refund.requested_by == "inside-a-loop"
        assert enqueue_refund_sync(**request()).created is False
        with pytest.raises(RefundRefused) as refused:
            enqueue_refund_sync(**request(external_ref="R-2", currency="USD"))
        assert refused.value.code == "currency_mismatch"
    finally:
        await asyncio.to_thread(producers.sync.default_producer().close)
    assert str(result.refund.refund_id) in queued_refund_ids(queue)


OTHER_PROGRAM = """
import asyncio, json, os
from producers import enqueue_refund, enqueue_refund_sync, RefundProducer
from refunds import db
from refunds.errors import RefundRefused

def terms(ref, **more):
    return dict(merchant_id="m1", original_transaction_id="CIP-1", amount="10.00", currency="PEN",
                external_ref=ref, **more)

out = {}
first = enqueue_refund_sync(**terms("SYNC-1"), requested_by="script")  # plain synchronous code
out["sync"] = [str(first.refund.refund_id), first.created, first.http_status]
out["sync_replay"] = enqueue_refund_sync(**terms("SYNC-1")).created
try:
    enqueue_refund_sync(**terms("SYNC-1", reason="other terms"))
except RefundRefused as refused:
    out["conflict"] = refused.code

async def main():  # another asyncio program, with its own pool
    pool = await db.create_pool(os.environ["DATABASE_URL"])
    try:
        result = await enqueue_refund(pool, **terms("ASYNC-1"), requested_by="async-script")
        return [str(result.refund.refund_id), result.created, result.refund.state]
    finally:
        await pool.close()

out["async"] = asyncio.run(main())
print(json.dumps(out))
"""


async def test_python_api_from_another_program(db, database_url, redis_url, make_merchant, queue):
    import json
    import os
    import subprocess
    import sys

    await make_merchant("m1")
    await paid(db)
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url}
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", OTHER_PROGRAM], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["sync"][1:] == [True, 202] and out["sync_replay"] is False
    assert out["conflict"] == "external_ref_conflict"
    assert out["async"][1:] == [True, "queued"]
    rows = {r["external_ref"]: r["requested_by"] for r in await db.fetch("SELECT external_ref, requested_by FROM refunds")}
    assert rows == {"SYNC-1": "script", "ASYNC-1": "async-script"}
    assert queued_refund_ids(queue) == {out["sync"][0], out["async"][0]}


async def test_async_delivery_writes_exactly_what_dramatiq_enqueue_writes(queue):
    """A courier runs dramatiq's dispatch script itself (batched); a dramatiq consumer must not
    see any difference from RedisBroker.enqueue (deliver). Guards against a dramatiq upgrade."""
    from refunds.delivery import QUEUE, SEND_REFUND, SEND_REFUNDS, Courier, deliver, producer_broker

    by_dramatiq = str(uuid.uuid4())
    batched = [str(uuid.uuid4()) for _ in range(3)]
    assert deliver(by_dramatiq)
    async with Courier() as courier:
        assert await courier.deliver(batched[0])  # alone in its write: a send_refund message
        assert await asyncio.gather(*(courier.deliver(refund_id) for refund_id in batched[1:])) == [True] * 2
    assert queue.llen("dramatiq:refunds") == 3  # the two handed over together share one message
    consumer = producer_broker().consume(QUEUE, prefetch=10, timeout=500)
    try:
        received = []
        for message in consumer:
            if message is None:
                break
            received.append(message)
            consumer.ack(message)
    finally:
        consumer.close()
    assert [(m.actor_name, m.args) for m in received] == [  # in order, all of them
        (SEND_REFUND, (by_dramatiq,)), (SEND_REFUND, (batched[0],)),
        (SEND_REFUNDS, ([[batched[1], None], [batched[2], None]],)),
    ]
    shape = {(m.queue_name, m.kwargs == {}, tuple(sorted(m.options))) for m in received}
    assert shape == {(QUEUE, True, ("redis_message_id",))}
    assert len({m.options["redis_message_id"] for m in received}) == 3
    assert queue.hlen("dramatiq:refunds.msgs") == 0 and queue.llen("dramatiq:refunds") == 0  # acked: gone


async def test_async_delivery_reports_redis_away_without_raising(monkeypatch, redis_url):
    """Redis unreachable: False for each refund of the batch (the outbox sweep delivers them later)."""
    import socket

    from refunds.delivery import Courier, producer_broker
    from refunds.settings import get_settings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/0")
    get_settings.cache_clear()
    producer_broker.cache_clear()
    try:
        async with Courier() as courier:
            results = await asyncio.gather(*(courier.deliver(str(uuid.uuid4())) for _ in range(5)))
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        producer_broker.cache_clear()
    assert results == [False] * 5


def _own_tcp_ports() -> set[int]:
    """The local ports of this process's open TCP sockets (/proc: its descriptors' socket inodes)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def test_a_courier_leaves_nothing_behind_when_its_owner_closes_it(queue):
    """The courier is its owner's: closed, it keeps no Redis connection and no task on the loop
    (no per-loop registry, no task waiting for the loop's end)."""
    from refunds.delivery import Courier

    def connections() -> int:
        """Redis clients on a socket this process holds (other processes of the suite come and go)."""
        ports = _own_tcp_ports()
        return sum(1 for client in queue.client_list()
                   if client["cmd"] != "client|list" and int(client["addr"].rsplit(":", 1)[1]) in ports)

    before, tasks_before = connections(), len(asyncio.all_tasks())
    async with Courier() as courier:
        assert await asyncio.gather(*(courier.deliver(str(uuid.uuid4())) for _ in range(3))) == [True] * 3
        assert connections() == before + 1  # one client, shared by the batch
    assert connections() == before
    assert len(asyncio.all_tasks()) == tasks_before
    assert queue.llen("dramatiq:refunds") == 1  # the three went together, in one send_refunds message


# --- requests accepted together (producers.accept_batch) ------------------------------------------

def accept_batches(monkeypatch) -> list[int]:
    """The size of each accepting statement (``enqueue.run_accept``, which still runs)."""
    sizes = []
    real = enqueue_module.run_accept

    async def counting(conn, asks):
        sizes.append(len(asks))
        return await real(conn, asks)

    monkeypatch.setattr(enqueue_module, "run_accept", counting)
    return sizes


def ask(index: int, **overrides):
    fields = dict(merchant_id="m1", original_transaction_id=f"CIP-{index}", amount=Decimal("10.00"), currency="PEN",
                  external_ref=f"B-{index}")
    fields.update(overrides)
    # unvalidated on purpose: these requests go straight to the statement, one with a value only Postgres refuses
    return Ask(RefundRequest.model_construct(**fields), "alice", datetime.now(timezone.utc))


async def paid_batcher(db, database_url, make_merchant, monkeypatch, payments: int):
    """Payments CIP-0.. of 10.00 refunds each, a batcher with one flush at a time, and its statement sizes."""
    from producers.accept_batch import AcceptBatcher
    from refunds.database import Database

    await make_merchant("m1")
    for index in range(payments):
        await paid(db, transaction=f"CIP-{index}")
    sizes = accept_batches(monkeypatch)
    database = Database(database_url)
    return sizes, database, AcceptBatcher(database.connection, max_inflight=1)


async def test_a_batch_whose_payment_is_used_meanwhile_is_accepted_one_by_one(db, database_url, make_merchant,
                                                                               monkeypatch):
    """The CHECK refuses one row of the shared statement: only that request is refused, as it would be alone."""
    sizes, database, batcher = await paid_batcher(db, database_url, make_merchant, monkeypatch, 5)
    other = await asyncpg.connect(database_url)
    try:
        # another transaction takes 95.00 of CIP-2 and holds the row until the batch has read its snapshot
        meanwhile = other.transaction()
        await meanwhile.start()
        await other.execute("UPDATE payments SET refunded_amount = 95.00 WHERE transaction_id = 'CIP-2'")
        answers = asyncio.gather(*(batcher.accept(ask(index)) for index in range(5)), return_exceptions=True)
        for _ in range(200):
            if await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the batch never waited for the payment row")
        await meanwhile.commit()
        results = await answers
    finally:
        await other.close()
        await database.close()

    assert sizes == [5, 1, 1, 1, 1, 1]  # the shared statement, then each alone
    refused = results[2]
    assert isinstance(refused, RefundRefused) and (refused.code, refused.field) == ("amount_over_refundable", "amount")
    assert refused.message == "amount 10.00 is over the 5.00 still refundable on this payment"
    for index in (0, 1, 3, 4):
        assert isinstance(results[index], EnqueueResult) and results[index].created, results[index]
        assert results[index].refund.external_ref == f"B-{index}" and results[index].refund.state == "queued"
        assert (await find_payment(db, "m1", f"CIP-{index}")).refunded_amount == Decimal("10.00")
    assert (await find_payment(db, "m1", "CIP-2")).refunded_amount == Decimal("95.00")
    assert await db.fetchval("SELECT count(*) FROM refunds") == 4
    assert await db.fetchval("SELECT count(*) FROM refund_events") == 4


async def test_a_value_postgres_refuses_fails_alone_in_its_batch(db, database_url, make_merchant, monkeypatch):
    sizes, database, batcher = await paid_batcher(db, database_url, make_merchant, monkeypatch, 3)
    try:
        # a NUL byte: RefundRequest.parse refuses it, so only a door that skipped parsing could send one
        asks = [ask(0), ask(1, reason="nul \x00 byte"), ask(2)]
        results = await asyncio.gather(*(batcher.accept(a) for a in asks), return_exceptions=True)
    finally:
        await database.close()
    assert sizes == [3, 1, 1, 1]
    assert isinstance(results[1], asyncpg.DataError)
    assert all(isinstance(results[i], EnqueueResult) and results[i].created for i in (0, 2)), results
    assert await db.fetchval("SELECT array_agg(external_ref ORDER BY external_ref) FROM refunds") == ["B-0", "B-2"]
