"""The intake API's conventions of payment APIs over real HTTP, Postgres and Redis: request ids,
Idempotency-Key, replays marked as such, and a merchant's refunds a page at a time."""

from __future__ import annotations

import io
import json
import logging

from aiohttp.test_utils import TestClient, TestServer

from producers.http import create_app
from refunds import logs
from refunds.http_api import AccessLog
from tests.helpers import paid
from tests.producers.test_intake import MISSING, bearer, client  # noqa: F401  (client: the fixture)
from tests.producers.test_intake import body as intake_body

REDIS_DB = 12  # module_redis_url: a Redis database of our own


def body(**changes) -> dict:
    """test_intake's body, with ``None`` for a field left out."""
    return intake_body(**{name: MISSING if value is None else value for name, value in changes.items()})


async def test_every_answer_names_its_request_and_the_log_joins_it_to_the_refund(db, make_merchant, database_url,
                                                                                 module_redis_url, queue):
    """One access line a request, as the intake process writes it (``AccessLog``): its request id,
    and for a refund accepted, the refund."""
    await make_merchant("m1")
    await paid(db)
    headers = await bearer(db)
    stream = io.StringIO()  # formatted as the services format
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    access_log = logging.getLogger("aiohttp.access")
    access_log.addHandler(handler)
    level, access_log.level = access_log.level, logging.INFO
    server = TestServer(create_app(database_url=database_url))
    await server.start_server(access_log_class=AccessLog)  # as the intake's main() serves it
    try:
        async with TestClient(server) as client:
            given = await client.post("/v1/refunds", json=body(), headers={**headers, "X-Request-Id": "checkout-42"})
            refund_id = (await given.json())["refund_id"]
            replayed = await client.post("/v1/refunds", json=body(), headers=headers)
            await _checks_of_request_ids(client, headers, refund_id)
    finally:
        access_log.removeHandler(handler)
        access_log.setLevel(level)
    assert given.status == 202 and given.headers["X-Request-Id"] == "checkout-42" and replayed.status == 200
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["first_request_line"].split("?")[0], line["response_status"]) for line in lines] == [
        ("POST /v1/refunds HTTP/1.1", 202), ("POST /v1/refunds HTTP/1.1", 200),
        (f"GET /v1/refunds/{refund_id} HTTP/1.1", 200), ("POST /v1/refunds HTTP/1.1", 422),
        ("GET /v1/nowhere HTTP/1.1", 404)]
    accepted, again = lines[0], lines[1]
    assert (accepted["request_id"], accepted["refund_id"], accepted["merchant"], accepted["external_ref"],
            accepted["result"]) == ("checkout-42", refund_id, "m1", "R-1", "accepted")
    assert (again["refund_id"], again["result"], again["request_id"]) == (
        refund_id, "replayed", replayed.headers["X-Request-Id"])
    assert all(line["request_id"] for line in lines) and "refund_id" not in lines[3]  # refused: no refund named
    # kept on the refund: the workers tag their lines for it with the same id (tests/workers/test_worker.py)
    assert await db.fetchval("SELECT request_id FROM refunds WHERE refund_id = $1::uuid", refund_id) == "checkout-42"


async def _checks_of_request_ids(client, headers, refund_id):
    made = await client.get(f"/v1/refunds/{refund_id}", headers={**headers, "X-Request-Id": "bad id with spaces"})
    assert made.status == 200 and len(made.headers["X-Request-Id"]) == 32  # unusable: a new one is made

    refused = await client.post("/v1/refunds", json=body(amount="10.001"), headers=headers)
    error = (await refused.json())["error"]
    assert refused.status == 422 and error["request_id"] == refused.headers["X-Request-Id"]
    unknown = await client.get("/v1/nowhere", headers={"X-Request-Id": "probe-1"})
    assert unknown.status == 404 and (await unknown.json())["error"]["request_id"] == "probe-1"


async def test_idempotency_key_stands_for_external_ref_and_a_replay_is_marked(db, make_merchant, client, queue):
    await make_merchant("m1")
    await paid(db)
    headers = await bearer(db)
    first = await client.post("/v1/refunds", json=body(external_ref=None),
                              headers={**headers, "Idempotency-Key": "order-7-refund-1"})
    assert first.status == 202 and "Idempotent-Replayed" not in first.headers
    accepted = await first.json()
    assert accepted["external_ref"] == "order-7-refund-1"

    again = await client.post("/v1/refunds", json=body(external_ref="order-7-refund-1"), headers=headers)
    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert await again.json() == accepted

    both = await client.post("/v1/refunds", json=body(external_ref="order-7-refund-1"),
                             headers={**headers, "Idempotency-Key": "order-7-refund-1"})
    assert both.status == 200 and both.headers["Idempotent-Replayed"] == "true"

    differ = await client.post("/v1/refunds", json=body(external_ref="R-9"),
                               headers={**headers, "Idempotency-Key": "R-10"})
    error = (await differ.json())["error"]
    assert (differ.status, error["code"], error["field"]) == (422, "idempotency_key_mismatch", "external_ref")
    bad_key = await client.post("/v1/refunds", json=body(external_ref=None),
                                headers={**headers, "Idempotency-Key": "no spaces allowed"})
    assert bad_key.status == 422 and (await bad_key.json())["error"]["field"] == "external_ref"
    assert await db.fetchval("SELECT count(*) FROM refunds") == 1


async def test_a_merchants_refunds_come_a_page_at_a_time_oldest_first(db, make_merchant, client, queue):
    await make_merchant("m1")
    await make_merchant("m2")
    await paid(db, "m1", "CIP-1", "100.00")
    await paid(db, "m2", "CIP-2", "100.00")
    headers = await bearer(db, merchants=("m1", "m2"))
    for n in range(5):
        assert (await client.post("/v1/refunds", json=body(external_ref=f"R-{n}", amount="1.00"),
                                  headers=headers)).status == 202
    assert (await client.post("/v1/refunds", json=body(merchant_id="m2", original_transaction_id="CIP-2",
                                                       external_ref="OTHER"), headers=headers)).status == 202

    seen, cursor = [], None
    while True:
        params = {"merchant_id": "m1", "limit": "2", **({"after": cursor} if cursor else {})}
        page = await client.get("/v1/refunds", params=params, headers=headers)
        assert page.status == 200, await page.text()
        listed = await page.json()
        assert set(listed) == {"refunds", "next_cursor"} and len(listed["refunds"]) <= 2
        assert all("events" not in refund for refund in listed["refunds"])
        seen += [refund["external_ref"] for refund in listed["refunds"]]
        cursor = listed["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"R-{n}" for n in range(5)]  # each once, oldest first, no other merchant's

    await db.execute("UPDATE refunds SET state = 'failed' WHERE external_ref = 'R-3'")
    failed = await (await client.get("/v1/refunds", params={"merchant_id": "m1", "state": "failed"},
                                     headers=headers)).json()
    assert [r["external_ref"] for r in failed["refunds"]] == ["R-3"] and failed["next_cursor"] is None

    for params, field in (({"merchant_id": "m1", "state": "bogus"}, "state"),
                          ({"merchant_id": "m1", "limit": "0"}, "limit"),
                          ({"merchant_id": "m1", "limit": "101"}, "limit"),
                          ({"merchant_id": "m1", "after": "bm90LWEtY3Vyc29y"}, "after")):
        refused = await client.get("/v1/refunds", params=params, headers=headers)
        error = (await refused.json())["error"]
        assert (refused.status, error["code"], error["field"]) == (400, "invalid_parameter", field), params
    outsider = await client.get("/v1/refunds", params={"merchant_id": "m1"}, headers=await bearer(db, "bob", ("m2",)))
    assert outsider.status == 403
