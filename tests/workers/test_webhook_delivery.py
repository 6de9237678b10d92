"""Webhook deliveries to a real HTTP endpoint that fails, times out, redirects and recovers;
leases, the per-endpoint cap and the SSRF guard, against a real Postgres."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
import standardwebhooks
from aiohttp import web

from producers.enqueue import accept_refund
from refunds import db as dbmod, metrics, webhooks
from refunds.states import transition
from tests.helpers import paid
from tests.stack import serve
from workers.webhooks import deliver, webhook_session

LOCAL = webhooks.parse_networks("127.0.0.0/8")


class Endpoint:
    """A calling service's webhook endpoint: answers each request with the next planned answer."""

    def __init__(self) -> None:
        self.plan: list = []  # an HTTP status, or "hang" (never answers in time)
        self.received: list[tuple[dict, bytes]] = []
        self.in_flight = self.most_in_flight = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        await asyncio.sleep(0.01)
        answer = self.plan.pop(0) if self.plan else 200
        if answer == "hang":
            await asyncio.sleep(5)
        if answer == 302:
            raise web.HTTPFound("http://127.0.0.1:9/elsewhere")
        return web.Response(status=answer if isinstance(answer, int) else 200)


@pytest_asyncio.fixture
async def hook():
    endpoint = Endpoint()
    app = web.Application()
    app.router.add_post("/hooks", endpoint.handle)
    runner, url = await serve(app)
    endpoint.url = f"{url}/hooks"
    yield endpoint
    await runner.cleanup()


@pytest_asyncio.fixture
async def session():
    http = webhook_session(LOCAL, timeout=0.5)
    yield http
    await http.close()


async def subscribed(db, vault, url, *, name="checkout", allowed=LOCAL):
    return await webhooks.add_endpoint(db, vault, name=name, url=url, merchants=["m1"],
                                       event_types=list(webhooks.EVENT_TYPES), allowed_networks=allowed)


async def accepted(db, external_ref="R-1"):
    return (await accept_refund(db, merchant_id="m1", original_transaction_id="CIP-1", amount="1.00",
                                currency="PEN", external_ref=external_ref)).refund


async def send_due(db, session, vault, *, per_endpoint=4, allowed=LOCAL) -> list[str | None]:
    """One scheduler pass and the workers' sends, in process."""
    due = await webhooks.due_deliveries(db, per_endpoint=per_endpoint, limit=100)
    pool = _One(db)
    return [await deliver(pool, session, vault, event_id, endpoint_id, allowed_networks=allowed)
            for event_id, endpoint_id in due]


class _One:
    """A pool of one connection (deliver takes a pool)."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def acquire(self, timeout=None):
        conn = self.conn

        class _Held:
            async def __aenter__(self):
                return conn

            async def __aexit__(self, *exc):
                return False
        return _Held()


async def make_due(db) -> None:
    await db.execute("UPDATE webhook_deliveries SET next_attempt_at = now() WHERE state = 'pending'")


@pytest.mark.slow
async def test_retried_through_errors_timeouts_and_redirects_until_a_2xx_with_one_stable_id(
        db, vault, make_merchant, hook, session):
    await make_merchant("m1")
    await paid(db)
    endpoint, secret = await subscribed(db, vault, hook.url)
    await accepted(db)
    hook.plan = [500, "hang", 302, 204]
    counted = {result: metrics.refund_webhook_attempts_total.labels(result)._value.get()
               for result in ("retry", "delivered")}
    states = []
    for _ in range(4):
        states += await send_due(db, session, vault)
        await make_due(db)
    assert states == ["pending", "pending", "pending", "delivered"]
    assert metrics.refund_webhook_attempts_total.labels("retry")._value.get() - counted["retry"] == 3
    assert metrics.refund_webhook_attempts_total.labels("delivered")._value.get() - counted["delivered"] == 1
    attempts = await db.fetch("SELECT attempt, status, error FROM webhook_attempts ORDER BY attempt")
    assert [(a["attempt"], a["status"]) for a in attempts] == [(1, 500), (2, None), (3, 302), (4, 204)]
    assert attempts[1]["error"] == "timed out"
    assert len(hook.received) == 4 and all("elsewhere" not in h.get("Host", "") for h, _ in hook.received)
    ids = {headers["webhook-id"] for headers, _ in hook.received}
    assert len(ids) == 1  # the same event id on every attempt: receivers deduplicate on it
    headers, body = hook.received[-1]
    event = standardwebhooks.Webhook(secret).verify(body, headers)
    assert (event["type"], event["data"]["external_ref"], event["data"]["state"]) == ("refund.accepted", "R-1", "queued")
    assert await send_due(db, session, vault) == []  # delivered: nothing more


async def test_a_lost_delivery_goes_again_when_its_lease_runs_out(db, vault, make_merchant, hook, session):
    await make_merchant("m1")
    await paid(db)
    await subscribed(db, vault, hook.url)
    await accepted(db)
    leased = await webhooks.due_deliveries(db, per_endpoint=4, limit=100)  # handed to a worker that dies
    assert len(leased) == 1 and await webhooks.due_deliveries(db, per_endpoint=4, limit=100) == []
    await db.execute("UPDATE webhook_deliveries SET lease_until = now() - interval '1 second'")
    assert await send_due(db, session, vault) == ["delivered"]


async def test_one_endpoint_never_has_more_than_its_cap_in_flight(db, vault, make_merchant, hook):
    await make_merchant("m1")
    await paid(db, amount="100.00")
    slow, _ = await subscribed(db, vault, hook.url, name="slow")
    fast, _ = await subscribed(db, vault, hook.url.replace("/hooks", "/other"), name="fast")
    for n in range(5):
        await accepted(db, f"R-{n}")
    first = await webhooks.due_deliveries(db, per_endpoint=2, limit=100)
    per = {endpoint_id: sum(1 for _, e in first if e == endpoint_id) for endpoint_id in (slow.endpoint_id,
                                                                                       fast.endpoint_id)}
    assert per == {slow.endpoint_id: 2, fast.endpoint_id: 2}
    assert await webhooks.due_deliveries(db, per_endpoint=2, limit=100) == []  # both at their cap


async def test_a_name_that_resolves_to_a_private_address_is_refused_unless_allowed(db, vault, make_merchant, hook):
    await make_merchant("m1")
    await paid(db)
    port = hook.url.rsplit(":", 1)[1].split("/")[0]
    await subscribed(db, vault, f"http://localhost:{port}/hooks")  # a name: checked when resolved
    await accepted(db)
    guarded = webhook_session((), timeout=0.5)
    try:
        assert await send_due(db, guarded, vault, allowed=()) == ["pending"]
    finally:
        await guarded.close()
    error = await db.fetchval("SELECT error FROM webhook_attempts")
    assert "may not reach" in error and hook.received == []


async def test_disabling_an_endpoint_fails_what_it_had_not_received_and_replay_sends_again(
        db, vault, make_merchant, hook, session):
    await make_merchant("m1")
    await paid(db)
    endpoint, _ = await subscribed(db, vault, hook.url)
    refund = await accepted(db)
    await send_due(db, session, vault)
    await transition(db, refund.refund_id, "failed", actor="test", code="605", only_from=("queued",))
    await webhooks.disable_endpoint(db, endpoint.endpoint_id)
    assert await db.fetchval("SELECT state FROM webhook_deliveries d JOIN webhook_events e USING (event_id)"
                             " WHERE e.event_type = 'refund.failed'") == "failed"
    other, _ = await subscribed(db, vault, hook.url, name="new")
    assert await webhooks.replay(db, endpoint_id=other.endpoint_id) == 0  # it subscribed after those events
    assert await webhooks.replay(db, endpoint_id=endpoint.endpoint_id) == 0  # disabled: nothing replays


async def test_the_scheduler_exports_what_waits_and_for_how_long(db, vault, make_merchant, hook, database_url):
    from workers.scheduler import update_gauges

    await make_merchant("m1")
    await paid(db)
    await subscribed(db, vault, hook.url)
    await accepted(db)
    await db.execute("UPDATE webhook_events SET occurred_at = now() - interval '2 hours'")
    gauges = metrics.DatabaseGauges()
    pool = await dbmod.create_pool(database_url, max_size=2)
    try:
        await update_gauges(pool, gauges)
    finally:
        await pool.close()
    assert gauges.webhooks == {"pending": 1, "sending": 0}
    assert 7100 < gauges.webhook_undelivered_oldest < 7300  # the alert's threshold is an hour
    exported = {sample.name: sample.value for family in gauges.collect() for sample in family.samples
                if sample.name.startswith("refund_webhook")}
    assert exported["refund_webhook_undelivered_oldest_seconds"] == gauges.webhook_undelivered_oldest


async def test_an_endpoint_that_answers_gets_its_backlog_in_turn_within_its_cap(db, vault, make_merchant, hook,
                                                                               session, database_url):
    """A worker that delivered passes its slot on to the endpoint's next due delivery, so a
    backlog drains without waiting for the scheduler's next pass, never more than the cap at once;
    a failure ends the turn (the backoff takes over)."""
    from workers.webhooks import deliver_in_turn

    await make_merchant("m1")
    await paid(db, amount="100.00")
    await subscribed(db, vault, hook.url)
    for n in range(12):
        await accepted(db, f"R-{n}")
    leased = await webhooks.due_deliveries(db, per_endpoint=2, limit=100)  # one scheduler pass
    assert len(leased) == 2
    pool = await dbmod.create_pool(database_url, max_size=4)
    try:
        delivered = await asyncio.gather(*(deliver_in_turn(pool, session, vault, event_id, endpoint_id,
                                                           allowed_networks=LOCAL, lease_seconds=60)
                                           for event_id, endpoint_id in leased))
    finally:
        await pool.close()
    assert sum(delivered) == 12 and len(hook.received) == 12
    assert hook.most_in_flight == 2  # two turns at once, the cap, and never more
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'") == 12

    await accepted(db, "R-fail")
    hook.plan = [500]
    [(event_id, endpoint_id)] = await webhooks.due_deliveries(db, per_endpoint=2, limit=100)
    assert await deliver_in_turn(_One(db), session, vault, event_id, endpoint_id, allowed_networks=LOCAL,
                                 lease_seconds=60) == 0



async def test_a_slot_passed_on_is_never_seen_free_by_the_scheduler(db, vault, make_merchant, hook, session,
                                                                  database_url, monkeypatch):
    """Recording a delivery and leasing the endpoint's next one are one transaction: a scheduler
    pass between the two would find the slot free and lease another, over the cap."""
    from workers.webhooks import deliver_in_turn

    await make_merchant("m1")
    await paid(db, amount="100.00")
    await subscribed(db, vault, hook.url)
    for n in range(3):
        await accepted(db, f"R-{n}")
    [(event_id, endpoint_id)] = await webhooks.due_deliveries(db, per_endpoint=1, limit=100)
    real_next_due, leased_between = webhooks.next_due, []

    async def scheduler_pass_first(conn, endpoint, **kwargs):
        leased_between.extend(await webhooks.due_deliveries(db, per_endpoint=1, limit=100))  # its own connection
        return await real_next_due(conn, endpoint, **kwargs)

    monkeypatch.setattr(webhooks, "next_due", scheduler_pass_first)
    pool = await dbmod.create_pool(database_url, max_size=2)
    try:
        assert await deliver_in_turn(pool, session, vault, event_id, endpoint_id, allowed_networks=LOCAL,
                                     lease_seconds=60) == 3
    finally:
        await pool.close()
    assert leased_between == []
    assert hook.most_in_flight == 1 and len(hook.received) == 3
