"""Webhook endpoints and the outbox against a real Postgres; our signatures checked by an
independent implementation of Standard Webhooks (the ``standardwebhooks`` package)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta

import pytest
import standardwebhooks

from producers.enqueue import accept_refund
from refunds import webhooks
from refunds.errors import RefundRefused
from refunds.records import find_refund
from refunds.requests import refund_view
from refunds.states import Move, transition, transition_many
from tests.helpers import paid

LOCAL = webhooks.parse_networks("127.0.0.0/8")


async def endpoint(db, vault, *, merchants=("m1",), event_types=webhooks.EVENT_TYPES, name="checkout"):
    return await webhooks.add_endpoint(db, vault, name=name, url="http://127.0.0.1:9/hooks", merchants=list(merchants),
                                       event_types=list(event_types), allowed_networks=LOCAL)


async def events(db) -> list[tuple[str, str]]:
    rows = await db.fetch("SELECT event_type, data->>'state' AS state FROM webhook_events ORDER BY occurred_at, event_id")
    return [(row["event_type"], row["state"]) for row in rows]


async def accepted(db, external_ref="R-1", merchant="m1"):
    return (await accept_refund(db, merchant_id=merchant, original_transaction_id="CIP-1", amount="10.00",
                                currency="PEN", external_ref=external_ref)).refund


async def test_each_move_writes_its_event_for_each_subscribed_endpoint_in_its_transaction(db, vault, make_merchant):
    await make_merchant("m1")
    await make_merchant("m2")
    await paid(db, "m1")
    await paid(db, "m2")
    everything, _ = await endpoint(db, vault)
    finals, _ = await endpoint(db, vault, event_types=["refund.succeeded", "refund.failed"], name="support")
    await endpoint(db, vault, merchants=["m2"], name="other-seller")
    refund = await accepted(db)
    await transition(db, refund.refund_id, "submitted", actor="test")
    await transition(db, refund.refund_id, "pending", actor="test")
    await transition(db, refund.refund_id, "succeeded", actor="test", provider_refund_id="PE-1")
    assert await events(db) == [("refund.accepted", "queued"), ("refund.pending", "pending"),
                                ("refund.succeeded", "succeeded")]
    data = json.loads(await db.fetchval("SELECT data::text FROM webhook_events WHERE event_type = 'refund.succeeded'"))
    assert (data["refund_id"], data["amount"], data["external_ref"], data["provider_refund_id"]) == (
        str(refund.refund_id), "10.00", "R-1", "PE-1")
    # the refund as the intake API shows it (the trigger builds it in SQL: the two must not drift)
    api = refund_view(await find_refund(db, refund.refund_id))
    times = ("created_at", "updated_at", "completed_at")
    assert {k: v for k, v in data.items() if k not in times} == {k: v for k, v in api.items() if k not in times}
    assert [datetime.fromisoformat(data[k]) for k in times] == [datetime.fromisoformat(api[k]) for k in times]
    deliveries = await db.fetch("SELECT endpoint_id, count(*) FROM webhook_deliveries GROUP BY endpoint_id")
    assert {row["endpoint_id"]: row["count"] for row in deliveries} == {everything.endpoint_id: 3,
                                                                        finals.endpoint_id: 1}

    # a move rolled back invents no event
    other = await accepted(db, "R-2")
    before = len(await events(db))
    with pytest.raises(RuntimeError):
        async with db.transaction():
            await transition_many(db, [Move(other.refund_id, "failed", code="605")], actor="test")
            raise RuntimeError("rolled back")
    assert len(await events(db)) == before


async def test_one_statement_moving_many_refunds_writes_each_move_its_events(db, vault, make_merchant):
    """Workers and the receiver move refunds many to a statement; the outbox is written once per
    statement over all its audit rows: each move its event, each event its subscribed endpoints."""
    await make_merchant("m1")
    await make_merchant("m2")
    await paid(db, "m1", amount="100.00")
    await paid(db, "m2", amount="100.00")
    everything, _ = await endpoint(db, vault, merchants=["m1", "m2"])
    finals_m2, _ = await endpoint(db, vault, merchants=["m2"], event_types=["refund.failed"], name="m2-failures")
    refunds = [await accepted(db, f"R-{i}", merchant) for i, merchant in enumerate(["m1", "m1", "m2", "m2"])]
    await transition_many(db, [Move(r.refund_id, "submitted") for r in refunds], actor="test")  # no event
    await transition_many(db, [Move(refunds[0].refund_id, "succeeded", provider_refund_id="PE-0"),
                               Move(refunds[1].refund_id, "pending"),
                               Move(refunds[2].refund_id, "failed", code="605"),
                               Move(refunds[3].refund_id, "failed", code="605")], actor="test")
    rows = await db.fetch("SELECT refund_id, event_type, data->>'state' AS state, data->>'provider_code' AS code"
                          " FROM webhook_events WHERE event_type <> 'refund.accepted'")
    assert sorted((str(r["refund_id"]), r["event_type"], r["state"], r["code"]) for r in rows) == sorted([
        (str(refunds[0].refund_id), "refund.succeeded", "succeeded", None),
        (str(refunds[1].refund_id), "refund.pending", "pending", None),
        (str(refunds[2].refund_id), "refund.failed", "failed", "605"),
        (str(refunds[3].refund_id), "refund.failed", "failed", "605")])
    deliveries = await db.fetch("SELECT endpoint_id, count(*) FROM webhook_deliveries GROUP BY endpoint_id")
    assert {row["endpoint_id"]: row["count"] for row in deliveries} == {everything.endpoint_id: 4 + 4,
                                                                        finals_m2.endpoint_id: 2}


async def test_no_endpoint_no_event(db, make_merchant):
    await make_merchant("m1")
    await paid(db)
    await accepted(db)
    assert await db.fetchval("SELECT count(*) FROM webhook_events") == 0


async def test_signatures_verify_with_an_independent_implementation_and_rotation_signs_with_both(db, vault,
                                                                                             make_merchant):
    await make_merchant("m1")
    ep, secret = await endpoint(db, vault)
    assert secret.startswith("whsec_") and secret.encode() not in await db.fetchval(
        "SELECT secret_sealed FROM webhook_endpoints")
    body, timestamp = b'{"id":"evt_1","type":"refund.succeeded"}', int(time.time())
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(timestamp),
               "webhook-signature": webhooks.signature_header(ep.secrets(vault), "evt_1", timestamp, body)}
    assert standardwebhooks.Webhook(secret).verify(body, headers)["type"] == "refund.succeeded"

    rotated, new_secret = await webhooks.rotate_secret(db, vault, ep.endpoint_id, overlap=timedelta(hours=1))
    both = rotated.secrets(vault)
    assert both == [new_secret, secret]
    headers["webhook-signature"] = webhooks.signature_header(both, "evt_1", timestamp, body)
    for each in (secret, new_secret):  # a receiver with either secret accepts it during the overlap
        standardwebhooks.Webhook(each).verify(body, headers)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(webhooks.new_secret()).verify(body, headers)


@pytest.mark.parametrize("url, code", [
    ("ftp://example.com/hook", "invalid_url"),
    ("http://127.0.0.1:8080/hook", "url_not_allowed"),
    ("http://169.254.169.254/latest/meta-data", "url_not_allowed"),
    ("http://10.1.2.3/hook", "url_not_allowed"),
    ("http://[::1]/hook", "url_not_allowed"),
])
async def test_an_endpoint_must_be_a_public_http_url_unless_allowed(db, vault, make_merchant, url, code):
    await make_merchant("m1")
    with pytest.raises(RefundRefused) as caught:
        await webhooks.add_endpoint(db, vault, name="x", url=url, merchants=["m1"], event_types=["refund.failed"])
    assert caught.value.code == code
    assert await db.fetchval("SELECT count(*) FROM webhook_endpoints") == 0


async def test_unknown_event_types_and_merchants_are_refused(db, vault, make_merchant):
    await make_merchant("m1")
    with pytest.raises(RefundRefused, match="unknown: refund.exploded"):
        await endpoint(db, vault, event_types=["refund.exploded"])
    with pytest.raises(Exception, match="no merchant ghost"):
        await endpoint(db, vault, merchants=["m1", "ghost"])


def test_retries_back_off_exponentially_with_jitter_up_to_six_hours():
    assert 2.5 <= webhooks.retry_delay(1) <= 5
    assert 40 <= webhooks.retry_delay(5) <= 80
    assert 3 * 3600 <= webhooks.retry_delay(40) <= 6 * 3600
    assert len({webhooks.retry_delay(3) for _ in range(20)}) > 1


async def test_old_events_go_once_every_delivery_is_over_and_never_before_180_days(db, vault, make_merchant):
    from refunds.retention import MIN_AUDIT_DAYS, purge_webhook_events

    await make_merchant("m1")
    await paid(db)
    await endpoint(db, vault)
    done, busy, recent = (await accepted(db, "R-1")), (await accepted(db, "R-2")), (await accepted(db, "R-3"))
    await db.execute("UPDATE webhook_events SET occurred_at = now() - interval '200 days'"
                     " WHERE refund_id = ANY($1::uuid[])", [done.refund_id, busy.refund_id])
    await db.execute("UPDATE webhook_deliveries SET state = 'delivered' WHERE event_id IN"
                     " (SELECT event_id FROM webhook_events WHERE refund_id = ANY($1::uuid[]))",
                     [done.refund_id, recent.refund_id])
    assert await purge_webhook_events(db, MIN_AUDIT_DAYS) == 1  # old and delivered
    left = {row["refund_id"] for row in await db.fetch("SELECT refund_id FROM webhook_events")}
    assert left == {busy.refund_id, recent.refund_id}  # still being delivered; too recent
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries") == 2  # its delivery went with it
    with pytest.raises(ValueError, match="at least 180 days"):
        await purge_webhook_events(db, 30)


async def test_a_replay_is_announced_to_the_scheduler(db, vault, make_merchant, database_url):
    """Replayed deliveries are due at once: the replay notifies the channel the scheduler LISTENs
    on, as the outbox trigger does, instead of leaving them to its next pass."""
    import asyncio

    from refunds import db as dbmod

    await make_merchant("m1")
    await paid(db)
    await endpoint(db, vault)
    await accepted(db)
    await db.execute("UPDATE webhook_deliveries SET state = 'delivered', delivered_at = now()")
    listener = await dbmod.connect(database_url)
    heard = asyncio.Event()
    try:
        await listener.add_listener(webhooks.NOTIFY_CHANNEL, lambda *_: heard.set())
        event_id = await db.fetchval("SELECT event_id FROM webhook_events")
        assert await webhooks.replay(db, event_id=event_id) == 1
        await asyncio.wait_for(heard.wait(), 5)
    finally:
        await listener.close()
