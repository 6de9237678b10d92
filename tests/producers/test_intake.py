"""The intake API (producers.http) over real HTTP, Postgres and Redis."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from decimal import Decimal

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY, generate_latest

from producers.http import MAX_BODY, create_app
from refunds.payments import find_payment
from refunds.requests import RefundRequest
from refunds.tokens import TokenError, authenticate, create_token, list_tokens, revoke_token
from tests.producers.test_producers import accept_batches, queued_refunds
from tests.helpers import ROOT, paid

REDIS_DB = 11  # module_redis_url: a Redis database of our own, no other test or worker touches these messages
MISSING = object()


# --- fixtures --------------------------------------------------------------------------------

@pytest_asyncio.fixture
async def client(db, database_url, module_redis_url):
    async with TestClient(TestServer(create_app(database_url=database_url))) as http:
        yield http


async def bearer(db, name: str = "alice", merchants=("m1",)) -> dict:
    return {"Authorization": f"Bearer {await create_token(db, name, list(merchants))}"}



def body(**overrides) -> dict:
    fields = dict(merchant_id="m1", original_transaction_id="CIP-1", amount="10.00", currency="PEN",
                  external_ref="R-1", reason="damaged")
    fields.update(overrides)
    return {name: value for name, value in fields.items() if value is not MISSING}


async def error_of(response, status: int) -> dict:
    assert response.status == status, await response.text()
    payload = await response.json()
    assert set(payload) == {"error"} and {"code", "message", "request_id"} <= set(payload["error"])
    assert payload["error"]["request_id"] == response.headers["X-Request-Id"]
    return payload["error"]


# --- tokens ----------------------------------------------------------------------------------

async def test_tokens_are_stored_hashed_scoped_and_revocable(db, make_merchant):
    await make_merchant("m1")
    await make_merchant("m2")
    token = await create_token(db, "alice", ["m1", "m2", "m1"])
    assert token.startswith("rfd_") and len(token) > 40
    row = await db.fetchrow("SELECT token_hash, merchants FROM api_tokens WHERE name = 'alice'")
    assert row["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert row["merchants"] == ["m1", "m2"]
    found = await authenticate(db, token)
    assert found.name == "alice" and found.merchants == frozenset({"m1", "m2"})
    assert await authenticate(db, token + "x") is None
    assert await authenticate(db, "") is None

    with pytest.raises(TokenError, match="already exists"):
        await create_token(db, "alice", ["m1"])
    with pytest.raises(TokenError, match="'ghost'"):
        await create_token(db, "bob", ["m1", "ghost"])
    assert await db.fetchval("SELECT count(*) FROM api_tokens WHERE name = 'bob'") == 0

    listed = await list_tokens(db)
    assert [t["name"] for t in listed] == ["alice"]
    assert not any("hash" in key or "token" == key for key in listed[0])
    assert token not in json.dumps(listed)

    assert await revoke_token(db, "alice") is True
    assert await revoke_token(db, "alice") is False
    assert await authenticate(db, token) is None
    rotated = await create_token(db, "alice", ["m1"])  # a revoked name may be reused
    assert (await authenticate(db, rotated)).merchants == frozenset({"m1"})


# --- POST /v1/refunds ------------------------------------------------------------------------

async def test_accepts_queues_and_replays(db, make_merchant, client, queue):
    await make_merchant("m1")
    await paid(db)
    headers = await bearer(db)
    first = await client.post("/v1/refunds", json=body(), headers=headers)
    assert first.status == 202, await first.text()
    accepted = await first.json()
    assert set(accepted) == {"refund_id", "external_ref", "state"}
    assert accepted["external_ref"] == "R-1" and accepted["state"] == "queued"
    assert queued_refunds(queue) == [accepted["refund_id"]]
    assert await db.fetchval("SELECT requested_by FROM refunds") == "alice"

    again = await client.post("/v1/refunds", json=body(), headers=headers)
    assert again.status == 200
    assert await again.json() == accepted
    assert await db.fetchval("SELECT count(*) FROM refunds") == 1
    assert len(queued_refunds(queue)) == 1  # a replay is not delivered twice


async def test_same_external_ref_other_terms_is_409(db, make_merchant, client, queue):
    await make_merchant("m1")
    await paid(db)
    headers = await bearer(db)
    assert (await client.post("/v1/refunds", json=body(), headers=headers)).status == 202
    error = await error_of(await client.post("/v1/refunds", json=body(amount="11.00"), headers=headers), 409)
    assert error["code"] == "external_ref_conflict" and error["field"] == "external_ref"
    assert await db.fetchval("SELECT count(*) FROM refunds") == 1


@pytest.mark.parametrize(
    "payment_kwargs, overrides, code, field",
    [
        ({}, {"amount": 10.5}, "invalid_amount", "amount"),  # a JSON float: refused, never rounded
        ({}, {"amount": 10}, "invalid_amount", "amount"),  # a JSON integer is a number too
        ({}, {"amount": "10.505"}, "invalid_amount", "amount"),
        ({}, {"amount": "0.00"}, "invalid_amount", "amount"),
        ({}, {"amount": "0"}, "invalid_amount", "amount"),
        ({}, {"amount": "-5.00"}, "invalid_amount", "amount"),
        ({}, {"amount": "1e2"}, "invalid_amount", "amount"),
        ({}, {"currency": "EUR"}, "invalid_currency", "currency"),
        ({}, {"original_transaction_id": "NOPE"}, "unknown_transaction", "original_transaction_id"),
        ({}, {"amount": "100.01"}, "amount_over_refundable", "amount"),
        ({"days_ago": 100}, {}, "refund_window_closed", "original_transaction_id"),
        ({"currency": "USD"}, {}, "currency_mismatch", "currency"),
        ({}, {"external_ref": MISSING}, "missing_field", "external_ref"),
        ({}, {"amount": None}, "missing_field", "amount"),
        ({}, {"external_ref": "R-1\n"}, "invalid_field", "external_ref"),
        ({}, {"reason": "x" * 256}, "invalid_field", "reason"),
        ({}, {"ammount": "10.00"}, "unknown_field", "ammount"),
        ({}, {"reason": "nul \x00 byte"}, "invalid_field", "reason"),  # Postgres cannot store it: not a 500
        ({}, {"reason": "lone \ud800 surrogate"}, "invalid_field", "reason"),  # nor UTF-8 encode it
        ({}, {"original_transaction_id": "CIP\x00"}, "invalid_field", "original_transaction_id"),
    ],
)
async def test_refusals_are_422_naming_the_field(db, make_merchant, client, queue, payment_kwargs, overrides, code, field):
    await make_merchant("m1")
    await paid(db, **payment_kwargs)
    response = await client.post("/v1/refunds", json=body(**overrides), headers=await bearer(db))
    error = await error_of(response, 422)
    assert (error["code"], error.get("field")) == (code, field), error
    assert await db.fetchval("SELECT count(*) FROM refunds") == 0
    assert queued_refunds(queue) == []


async def test_malformed_and_oversized_bodies(db, make_merchant, client):
    await make_merchant("m1")
    await paid(db)
    headers = await bearer(db)
    not_json = await client.post("/v1/refunds", data=b"{amount: 10", headers=headers)
    assert (await error_of(not_json, 400))["code"] == "malformed_json"
    duplicated = b'{"merchant_id": "m1", "amount": "1.00", "amount": "100.00"}'
    assert (await error_of(await client.post("/v1/refunds", data=duplicated, headers=headers), 400))["code"] == "malformed_json"
    array = await client.post("/v1/refunds", json=[body()], headers=headers)
    assert "JSON object" in (await error_of(array, 422))["message"]
    big = body(reason="x" * (MAX_BODY + 1))
    too_big = await error_of(await client.post("/v1/refunds", json=big, headers=headers), 413)
    assert too_big["code"] == "body_too_large"

    async def chunks():  # no Content-Length: the cap must hold while reading
        yield json.dumps(big).encode()

    chunked = await client.post("/v1/refunds", data=chunks(), headers=headers)
    assert (await error_of(chunked, 413))["code"] == "body_too_large"
    assert await db.fetchval("SELECT count(*) FROM refunds") == 0


async def test_tokens_and_merchant_scope(db, make_merchant, client, queue):
    await make_merchant("m1")
    await make_merchant("m2")
    await paid(db, merchant="m2", transaction="CIP-2")
    headers = await bearer(db, "alice", ["m1"])

    missing = await client.post("/v1/refunds", json=body())
    assert (await error_of(missing, 401))["code"] == "unauthorized"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    bad = await client.post("/v1/refunds", json=body(), headers={"Authorization": "Bearer rfd_not-a-token"})
    await error_of(bad, 401)
    basic = await client.post("/v1/refunds", json=body(), headers={"Authorization": "Basic YWxpY2U6eA=="})
    await error_of(basic, 401)

    other = await client.post(
        "/v1/refunds", json=body(merchant_id="m2", original_transaction_id="CIP-2"), headers=headers,
    )
    error = await error_of(other, 403)
    assert (error["code"], error["field"]) == ("merchant_not_allowed", "merchant_id")
    assert await db.fetchval("SELECT count(*) FROM refunds") == 0
    assert (await find_payment(db, "m2", "CIP-2")).refunded_amount == Decimal("0.00")
    assert queued_refunds(queue) == []

    await revoke_token(db, "alice")
    await error_of(await client.post("/v1/refunds", json=body(), headers=headers), 401)


async def test_a_token_revoked_after_use_gets_only_401_and_writes_nothing(db, make_merchant, client, queue):
    """The intake remembers tokens it has seen (one query less per refund): revocation still acts at once."""
    await make_merchant("m1")
    await make_merchant("m2")
    await paid(db)
    headers = await bearer(db, "alice", ["m1"])
    assert (await client.post("/v1/refunds", json=body(), headers=headers)).status == 202  # now remembered
    await revoke_token(db, "alice")
    for attempt in (body(external_ref="R-2"), body(external_ref="R-1"), body(amount="1e2"), body(merchant_id="m2"),
                    body(external_ref="R-1", amount="11.00")):
        response = await client.post("/v1/refunds", json=attempt, headers=headers)
        assert (await error_of(response, 401))["code"] == "unauthorized", attempt
    assert await db.fetchval("SELECT count(*) FROM refunds") == 1
    fresh = {"Authorization": f"Bearer {await create_token(db, 'alice', ['m1'])}"}  # the name, rotated
    assert (await client.post("/v1/refunds", json=body(external_ref="R-3"), headers=fresh)).status == 202
    await error_of(await client.post("/v1/refunds", json=body(external_ref="R-4"), headers=headers), 401)


async def test_concurrent_requests_never_refund_more_than_paid(db, make_merchant, client, queue):
    """25 concurrent requests of 10.00 against a 100.00 payment: exactly 10 get in."""
    await make_merchant("m1")
    await paid(db, amount="100.00")
    headers = await bearer(db)

    async def post(index: int):
        response = await client.post("/v1/refunds", json=body(external_ref=f"C-{index}"), headers=headers)
        return response.status, await response.json()

    answers = await asyncio.gather(*(post(index) for index in range(25)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [202] * 10 + [422] * 15, answers
    assert {a["error"]["code"] for status, a in answers if status == 422} == {"amount_over_refundable"}
    assert await db.fetchval("SELECT refunded_amount FROM payments WHERE transaction_id = 'CIP-1'") == Decimal("100.00")
    assert await db.fetchval("SELECT sum(amount) FROM refunds") == Decimal("100.00")
    assert await db.fetchval("SELECT count(*) FROM refunds") == 10
    accepted = {a["refund_id"] for status, a in answers if status == 202}
    assert sorted(queued_refunds(queue)) == sorted(accepted)  # each delivered once


async def test_fifty_identical_requests_at_once_make_exactly_one_refund(db, make_merchant, client, queue):
    await make_merchant("m1")
    await paid(db)
    headers = await bearer(db)

    async def post():
        response = await client.post("/v1/refunds", json=body(amount="60.00"), headers=headers)
        return response.status, await response.json()

    answers = await asyncio.gather(*(post() for _ in range(50)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * 49 + [202], answers
    assert len({answer["refund_id"] for _, answer in answers}) == 1
    assert await db.fetchval("SELECT count(*) FROM refunds") == 1
    assert await db.fetchval("SELECT count(*) FROM refund_events") == 1
    # 60.00 of 100.00: a late replay is still a replay, never "over the refundable amount"
    assert (await find_payment(db, "m1", "CIP-1")).refunded_amount == Decimal("60.00")
    assert queued_refunds(queue) == [answers[0][1]["refund_id"]]


async def test_fifty_different_requests_for_one_payment_never_exceed_it(db, make_merchant, client, queue):
    """And none is refused while the payment still had room for it."""
    await make_merchant("m1")
    await paid(db, amount="100.00")
    headers = await bearer(db)
    amounts = [Decimal(a) for a in ("3.00", "7.50", "12.25", "1.01", "20.00", "0.99", "9.90", "15.00", "4.35", "30.00")]

    async def post(index: int):
        amount = amounts[index % len(amounts)]
        response = await client.post(
            "/v1/refunds", json=body(external_ref=f"D-{index}", amount=str(amount)), headers=headers)
        return amount, response.status, await response.json()

    answers = await asyncio.gather(*(post(index) for index in range(50)))
    assert {status for _, status, _ in answers} <= {202, 422}
    accepted = sum(amount for amount, status, _ in answers if status == 202)
    refused = [amount for amount, status, _ in answers if status == 422]
    assert accepted <= Decimal("100.00") and refused
    assert {answer["error"]["code"] for _, status, answer in answers if status == 422} == {"amount_over_refundable"}
    room = Decimal("100.00") - accepted
    assert all(amount > room for amount in refused), (room, refused)
    assert (await find_payment(db, "m1", "CIP-1")).refunded_amount == accepted
    assert await db.fetchval("SELECT sum(amount) FROM refunds") == accepted
    assert len(queued_refunds(queue)) == sum(1 for _, status, _ in answers if status == 202)


async def test_concurrent_requests_share_the_accepting_statement(db, make_merchant, client, queue, monkeypatch):
    await make_merchant("m1")
    for index in range(41):
        await paid(db, transaction=f"CIP-{index}")
    headers = await bearer(db)
    statements = accept_batches(monkeypatch)

    # idle: a request is accepted at once, alone, with one statement
    alone = await client.post("/v1/refunds", json=body(external_ref="S-0", original_transaction_id="CIP-0"), headers=headers)
    assert alone.status == 202 and statements == [1]

    statements.clear()

    async def post(index: int):
        response = await client.post(
            "/v1/refunds", json=body(external_ref=f"S-{index}", original_transaction_id=f"CIP-{index}"), headers=headers)
        return response.status, await response.json()

    answers = await asyncio.gather(*(post(index) for index in range(1, 41)))
    assert [status for status, _ in answers] == [202] * 40, answers
    assert [answer["external_ref"] for _, answer in answers] == [f"S-{index}" for index in range(1, 41)]
    assert sum(statements) == 40 and len(statements) < 40, statements  # shared, and no fallback
    assert await db.fetchval("SELECT count(*) FROM refunds") == 41
    assert await db.fetchval("SELECT count(*) FROM refund_events") == 41
    assert await db.fetchval("SELECT count(DISTINCT refunded_amount) FROM payments") == 1
    assert await db.fetchval("SELECT min(refunded_amount) FROM payments") == Decimal("10.00")
    stored = await db.fetch("SELECT refund_id::text, external_ref, original_transaction_id, requested_by FROM refunds")
    assert all(row["original_transaction_id"] == "CIP-" + row["external_ref"][2:] for row in stored)
    assert {row["requested_by"] for row in stored} == {"alice"}
    accepted = {answer["refund_id"] for _, answer in answers} | {(await alone.json())["refund_id"]}
    assert accepted == {row["refund_id"] for row in stored}
    assert sorted(queued_refunds(queue)) == sorted(accepted)  # each delivered once


async def test_concurrent_mix_gets_the_answers_each_would_get_alone(db, make_merchant, client, queue, monkeypatch):
    await make_merchant("m1")
    await paid(db, transaction="CIP-1")
    await paid(db, transaction="CIP-2")
    headers = await bearer(db)
    earlier = await client.post("/v1/refunds", json=body(external_ref="R-0", amount="5.00"), headers=headers)
    assert earlier.status == 202
    statements = accept_batches(monkeypatch)
    mix = [
        body(external_ref="R-1", amount="10.00"),                                    # valid
        body(external_ref="R-1", amount="10.00"),                                    # an identical request
        body(external_ref="R-0", amount="5.00"),                                     # replay of the earlier one
        body(external_ref="R-0", amount="6.00"),                                     # same external_ref, other terms
        body(external_ref="R-2", original_transaction_id="CIP-2", amount="60.00"),   # these two together
        body(external_ref="R-3", original_transaction_id="CIP-2", amount="60.00"),   # exceed CIP-2
        body(external_ref="R-4", original_transaction_id="NOPE"),                    # unknown transaction
    ]

    async def post(payload: dict):
        response = await client.post("/v1/refunds", json=payload, headers=headers)
        answer = await response.json()
        if "error" in answer:  # each answer names its own request
            assert answer["error"].pop("request_id") == response.headers["X-Request-Id"]
        return response.status, answer

    answers = await asyncio.gather(*(post(payload) for payload in mix))
    assert sum(statements) >= len(mix)

    assert sorted(status for status, _ in answers[:2]) == [200, 202] and answers[0][1] == answers[1][1]
    assert answers[0][1]["external_ref"] == "R-1" and answers[0][1]["state"] == "queued"
    assert answers[2] == (200, await earlier.json())
    assert answers[3] == (409, {"error": {
        "code": "external_ref_conflict", "field": "external_ref",
        "message": "external_ref 'R-0' was already used by this merchant for a different refund"}})
    assert sorted(status for status, _ in answers[4:6]) == [202, 422], answers[4:6]
    refused_index = 4 if answers[4][0] == 422 else 5
    assert answers[refused_index][1] == {"error": {
        "code": "amount_over_refundable", "field": "amount",
        "message": "amount 60.00 is over the 40.00 still refundable on this payment"}}
    assert answers[6] == (422, {"error": {
        "code": "unknown_transaction", "field": "original_transaction_id",
        "message": "transaction 'NOPE' is unknown or not paid for this merchant"}})

    assert (await find_payment(db, "m1", "CIP-1")).refunded_amount == Decimal("15.00")
    assert (await find_payment(db, "m1", "CIP-2")).refunded_amount == Decimal("60.00")
    assert await db.fetchval("SELECT count(*) FROM refunds") == 3  # and one of CIP-2
    assert await db.fetchval("SELECT count(*) FROM refund_events") == 3
    created = {answer["refund_id"] for status, answer in answers if status == 202}
    assert len(created) == 2 and set(queued_refunds(queue)) == created | {(await earlier.json())["refund_id"]}

    # and each, asked again alone, gets the same answer (a created refund now as its replay)
    for index, payload in enumerate(mix):
        status, answer = answers[index]
        assert await post(payload) == ((200 if status == 202 else status), answer), payload


async def test_gradual_rollout_off_then_approval_then_auto(db, make_merchant, client, queue):
    """refund_mode per merchant: off refuses, approval holds every refund, auto sends them on."""
    await make_merchant("m1", refund_mode="off")
    await paid(db, amount="100.00")
    headers = await bearer(db, "checkout", ["m1"])

    off = await client.post("/v1/refunds", json=body(external_ref="OFF-1", amount="0.01"), headers=headers)
    error = await error_of(off, 422)
    assert (error["code"], error["field"]) == ("refunds_disabled", "merchant_id")
    assert await db.fetchval("SELECT count(*) FROM refunds") == 0

    await make_merchant("m1", refund_mode="approval")  # the same seller, switched on behind four eyes
    held = await client.post("/v1/refunds", json=body(external_ref="APP-1", amount="0.01"), headers=headers)
    assert held.status == 202 and (await held.json())["state"] == "awaiting_approval"
    assert queued_refunds(queue) == []  # even a cent waits for a second person

    await make_merchant("m1", refund_mode="auto")
    sent = await client.post("/v1/refunds", json=body(external_ref="AUTO-1", amount="0.01"), headers=headers)
    assert sent.status == 202 and (await sent.json())["state"] == "queued"
    assert queued_refunds(queue) == [(await sent.json())["refund_id"]]
    assert await db.fetchval("SELECT state FROM refunds WHERE external_ref = 'APP-1'") == "awaiting_approval"

    await make_merchant("m1", refund_mode="off")  # switched off again: what is waiting stays as it is
    await error_of(await client.post("/v1/refunds", json=body(external_ref="OFF-2"), headers=headers), 422)
    replay = await client.post("/v1/refunds", json=body(external_ref="AUTO-1", amount="0.01"), headers=headers)
    assert replay.status == 200  # a replay of an accepted refund still answers with it


# --- reading refunds ---------------------------------------------------------------------------

async def test_get_by_id_and_by_external_ref_with_events(db, make_merchant, client, queue):
    await make_merchant("m1")
    await make_merchant("m2")
    await paid(db)
    headers = await bearer(db, "alice", ["m1"])
    outsider = await bearer(db, "mallory", ["m2"])
    accepted = await (await client.post("/v1/refunds", json=body(), headers=headers)).json()
    refund_id = accepted["refund_id"]

    by_id = await client.get(f"/v1/refunds/{refund_id}", headers=headers)
    assert by_id.status == 200
    shown = await by_id.json()
    assert shown["refund_id"] == refund_id and shown["amount"] == "10.00" and shown["state"] == "queued"
    assert shown["requested_by"] == "alice"
    assert [(e["from_state"], e["to_state"], e["actor"]) for e in shown["events"]] == [(None, "queued", "alice")]

    by_ref = await client.get("/v1/refunds", params={"merchant_id": "m1", "external_ref": "R-1"}, headers=headers)
    assert by_ref.status == 200 and await by_ref.json() == shown

    # another merchant's token cannot even learn that the refund exists
    assert (await error_of(await client.get(f"/v1/refunds/{refund_id}", headers=outsider), 404))["code"] == "not_found"
    other_ref = await client.get("/v1/refunds", params={"merchant_id": "m1", "external_ref": "R-1"}, headers=outsider)
    await error_of(other_ref, 403)
    await error_of(await client.get("/v1/refunds/00000000-0000-0000-0000-000000000000", headers=headers), 404)
    assert (await error_of(await client.get("/v1/refunds/not-a-uuid", headers=headers), 400))["field"] == "refund_id"
    unknown_ref = await client.get("/v1/refunds", params={"merchant_id": "m1", "external_ref": "R-404"}, headers=headers)
    await error_of(unknown_ref, 404)
    no_merchant = await client.get("/v1/refunds", params={"external_ref": "R-1"}, headers=headers)
    assert (await error_of(no_merchant, 400))["field"] == "merchant_id"
    await error_of(await client.get(f"/v1/refunds/{refund_id}"), 401)


def cursor(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode("ascii")


async def test_a_cursor_whose_time_postgres_cannot_take_is_400_naming_after(db, make_merchant, client, queue):
    """A crafted cursor of the right shape whose instant is outside the years 1-9999 in UTC (the driver
    sends it in UTC) is refused like any other bad cursor, not answered 500; its neighbours within
    range page as usual."""
    await make_merchant("m1")
    await paid(db)
    headers = await bearer(db, "alice", ["m1"])
    accepted = await (await client.post("/v1/refunds", json=body(), headers=headers)).json()
    refund_id = accepted["refund_id"]

    def page(after: str):
        return client.get("/v1/refunds", params={"merchant_id": "m1", "after": after}, headers=headers)

    for raw in (f"0001-01-01T00:00:00+14:00|{refund_id}", f"0001-01-01T13:59:59.999999+14:00|{refund_id}",
                f"9999-12-31T23:59:59-14:00|{refund_id}", f"9999-12-31T12:00:00-12:00|{refund_id}",
                f"2026-12-07T00:00:00|{refund_id}", "2026-12-07T00:00:00+00:00|not-a-uuid", "no time at all"):
        error = await error_of(await page(cursor(raw)), 400)
        assert (error["code"], error["field"]) == ("invalid_parameter", "after"), (raw, error)
    error = await error_of(await page("nope"), 400)
    assert (error["code"], error["field"]) == ("invalid_parameter", "after")

    for raw, found in ((f"0001-01-01T14:00:00+14:00|{refund_id}", [refund_id]),  # the first instant in range
                       (f"0001-01-01T00:00:00-14:00|{refund_id}", [refund_id]),
                       (f"9999-12-31T23:59:59+14:00|{refund_id}", [])):
        answer = await page(cursor(raw))
        assert answer.status == 200, (raw, await answer.text())
        assert [r["refund_id"] for r in (await answer.json())["refunds"]] == found


# --- approvals ---------------------------------------------------------------------------------

async def test_approve_and_reject_by_someone_other_than_the_requester(db, make_merchant, client, queue):
    await make_merchant("m1", approval_threshold=Decimal("50"))
    await make_merchant("m2")
    await paid(db, amount="200.00")
    alice = await bearer(db, "alice", ["m1"])
    bob = await bearer(db, "bob", ["m1"])
    carol = await bearer(db, "carol", ["m2"])

    big = await client.post("/v1/refunds", json=body(external_ref="BIG-1", amount="60.00"), headers=alice)
    assert big.status == 202
    waiting = await big.json()
    assert waiting["state"] == "awaiting_approval"
    assert queued_refunds(queue) == []  # nothing reaches the workers before approval
    approve = f"/v1/refunds/{waiting['refund_id']}/approve"

    assert (await error_of(await client.post(approve, headers=alice), 403))["code"] == "same_person"
    await error_of(await client.post(approve, headers=carol), 404)
    await error_of(await client.post(approve), 401)
    assert await db.fetchval("SELECT state FROM refunds WHERE external_ref = 'BIG-1'") == "awaiting_approval"

    approved = await client.post(approve, json={"message": "checked with the buyer"}, headers=bob)
    assert approved.status == 200, await approved.text()
    decided = await approved.json()
    assert decided["state"] == "queued"
    assert decided["events"][-1]["actor"] == "approver:bob"
    assert "checked with the buyer" in decided["events"][-1]["message"]
    assert queued_refunds(queue) == [waiting["refund_id"]]
    assert (await error_of(await client.post(approve, headers=bob), 409))["code"] == "not_awaiting_approval"

    other = await (await client.post("/v1/refunds", json=body(external_ref="BIG-2", amount="70.00"), headers=alice)).json()
    assert (await find_payment(db, "m1", "CIP-1")).refunded_amount == Decimal("130.00")
    rejected = await client.post(f"/v1/refunds/{other['refund_id']}/reject", headers=bob)
    assert rejected.status == 200
    assert (await rejected.json())["state"] == "rejected"
    assert (await find_payment(db, "m1", "CIP-1")).refunded_amount == Decimal("60.00")  # released
    assert len(queued_refunds(queue)) == 1

    small = await (await client.post("/v1/refunds", json=body(external_ref="SMALL-1"), headers=alice)).json()
    assert small["state"] == "queued"
    await error_of(await client.post(f"/v1/refunds/{small['refund_id']}/approve", headers=bob), 409)
    bad_note = await client.post(f"/v1/refunds/{small['refund_id']}/reject", json={"message": 5}, headers=bob)
    assert (await error_of(bad_note, 422))["field"] == "message"


# --- the document, probes and metrics -----------------------------------------------------------

async def test_openapi_document_describes_the_validated_fields(client):
    response = await client.get("/openapi.json")
    assert response.status == 200
    document = json.loads(await response.text())
    assert document["openapi"].startswith("3.")
    for path in ("/v1/refunds", "/v1/refunds/{refund_id}", "/v1/refunds/{refund_id}/approve",
                 "/v1/refunds/{refund_id}/reject", "/healthz", "/readyz"):
        assert path in document["paths"], path
    assert "/metrics" not in document["paths"]  # on INTAKE_METRICS_PORT, not the API's port
    assert {"post", "get"} <= set(document["paths"]["/v1/refunds"])
    request = document["components"]["schemas"]["RefundRequest"]
    assert list(request["properties"]) == list(RefundRequest.model_fields)
    assert request["required"] == ["merchant_id", "original_transaction_id", "amount", "currency", "external_ref"]
    assert request["properties"]["amount"]["type"] == "string"


async def test_probes_and_metrics(client):
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200, await ready.text()
    await error_of(await client.get("/metrics"), 404)  # served on INTAKE_METRICS_PORT (tests/producers/test_http_limits.py)
    assert "refunds_accepted_total" in generate_latest(REGISTRY).decode()
    await error_of(await client.get("/nowhere"), 404)
    await error_of(await client.delete("/v1/refunds"), 405)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_outages_answer_503_with_the_error_body(db, database_url, module_redis_url):
    dead_postgres = f"postgresql://postgres@127.0.0.1:{_closed_port()}/nothing"
    async with TestClient(TestServer(create_app(database_url=dead_postgres))) as http:
        assert (await http.get("/healthz")).status == 200
        ready = await http.get("/readyz")
        assert ready.status == 503 and (await ready.json())["down"] == ["postgres"]
        response = await http.post("/v1/refunds", json=body(), headers={"Authorization": "Bearer rfd_x"})
        assert (await error_of(response, 503))["code"] == "unavailable"
        assert "Traceback" not in await response.text()
    dead_redis = f"redis://127.0.0.1:{_closed_port()}/0"
    async with TestClient(TestServer(create_app(database_url=database_url, redis_url=dead_redis))) as http:
        ready = await http.get("/readyz")
        assert ready.status == 503 and (await ready.json())["down"] == ["redis"]


async def test_postgres_unreachable_fails_every_request_of_a_batch_alike():
    """Unavailable for each (the middleware's 503), as a request alone gets it."""
    from producers.accept_batch import AcceptBatcher
    from refunds.database import Database, Unavailable
    from tests.producers.test_producers import ask

    database = Database(f"postgresql://postgres@127.0.0.1:{_closed_port()}/nothing")
    batcher = AcceptBatcher(database.connection, max_inflight=1)
    try:
        answers = await asyncio.gather(*(batcher.accept(ask(index)) for index in range(3)), return_exceptions=True)
    finally:
        await database.close()
    assert [type(answer) for answer in answers] == [Unavailable] * 3, answers


# --- python -m producers.http -------------------------------------------------------------------

def _env(**values) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "INTAKE_PORT", "INTAKE_HOST")}
    env.update(values)
    return env


def test_module_refuses_to_start_without_settings():
    done = subprocess.run([sys.executable, "-m", "producers.http"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "intake: DATABASE_URL is not set"


@pytest.mark.slow
def test_a_database_url_asyncpg_refuses_stops_the_intake_naming_it(database_url, module_redis_url):
    """A DSN that no retry can mend (here a bad sslmode, which only asyncpg checks) stops the process
    at start (exit 2), where an outage is retried on demand."""
    from refunds.vault import generate_master_key

    done = subprocess.run([sys.executable, "-m", "producers.http"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=_env(DATABASE_URL=f"{database_url}?sslmode=bogus", REDIS_URL=module_redis_url,
                                               INTAKE_PORT=str(_closed_port()), REFUNDS_MASTER_KEY=generate_master_key()))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("intake: DATABASE_URL is malformed: `sslmode`"), done.stderr
    assert "Traceback" not in done.stderr


async def test_module_serves_until_sigterm(database_url, module_redis_url):
    import aiohttp

    port = _closed_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "producers.http", cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=_env(DATABASE_URL=database_url, REDIS_URL=module_redis_url, INTAKE_PORT=str(port), INTAKE_HOST="127.0.0.1"),
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.decode().strip() == f"intake listening on http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                assert response.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_body_that_never_finishes_is_408_and_logged_not_a_database_outage(db, client, make_merchant,
                                                                                 monkeypatch, caplog):
    """A client that sends its headers and part of its body, then stalls: 408 once the body
    timeout passes, logged as what it is (a TimeoutError is also an OSError, which once made it
    a 503 'refund store unavailable' and a false database outage in the log)."""
    import logging

    from producers import http as intake

    monkeypatch.setattr(intake, "BODY_TIMEOUT", 0.3)
    await make_merchant("m1")
    headers = await bearer(db)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(("POST /v1/refunds HTTP/1.1\r\nHost: intake\r\nContent-Type: application/json\r\n"
                      f"Authorization: {headers['Authorization']}\r\nContent-Length: 200\r\n\r\n"
                      '{"merchant_id": "m1", ').encode())
        await writer.drain()
        with caplog.at_level(logging.WARNING, logger="producers.http"):
            status_line = await asyncio.wait_for(reader.readline(), timeout=10)
            answer = await asyncio.wait_for(reader.read(4096), timeout=10)
    finally:
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 408"), status_line
    assert b'"request_timeout"' in answer
    messages = [r.getMessage() for r in caplog.records]
    assert any("did not arrive within" in m for m in messages)
    assert not any("database unavailable" in m for m in messages)
