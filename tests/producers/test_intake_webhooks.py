"""Webhook subscriptions through the intake API: a calling service manages its own endpoints, within
the same merchant scope as its refunds."""

from __future__ import annotations

import uuid

from refunds import db as dbmod, webhooks
from refunds.tokens import create_token, revoke_token
from tests.producers.test_intake import bearer, client, error_of  # noqa: F401  (client: the fixture)

REDIS_DB = 10  # module_redis_url: a Redis database of our own

URL = "https://checkout.example.com/hooks"


async def test_a_service_registers_lists_rotates_and_disables_its_endpoints(db, make_merchant, client, queue):
    await make_merchant("m1")
    await make_merchant("m2")
    checkout = await bearer(db, "checkout", ("m1",))
    support = await bearer(db, "support", ("m1", "m2"))

    created = await client.post("/v1/webhooks", json={"url": URL, "merchants": ["m1"],
                                                      "event_types": ["refund.succeeded"]}, headers=checkout)
    assert created.status == 201, await created.text()
    endpoint = await created.json()
    assert endpoint["name"] == "checkout" and endpoint["secret"].startswith("whsec_")
    assert endpoint["event_types"] == ["refund.succeeded"] and endpoint["disabled_at"] is None
    both = await (await client.post("/v1/webhooks", json={"url": URL, "merchants": ["m1", "m2"]},
                                    headers=support)).json()
    assert len(both["event_types"]) == 6  # all by default

    listed = (await (await client.get("/v1/webhooks", headers=checkout)).json())["webhooks"]
    assert [e["endpoint_id"] for e in listed] == [endpoint["endpoint_id"]]  # not the one that also covers m2
    assert all("secret" not in e for e in listed)
    listed = (await (await client.get("/v1/webhooks", headers=support)).json())["webhooks"]
    assert [e["endpoint_id"] for e in listed] == [both["endpoint_id"]]  # its own, not checkout's

    rotated = await client.post(f"/v1/webhooks/{endpoint['endpoint_id']}/rotate-secret", json={"overlap_hours": 2},
                                headers=checkout)
    assert rotated.status == 200
    rotated = await rotated.json()
    assert rotated["secret"] != endpoint["secret"] and rotated["previous_secret_valid_until"] is not None

    hidden = await client.post(f"/v1/webhooks/{both['endpoint_id']}/disable", headers=checkout)
    assert hidden.status == 404  # support's, and it covers m2, which checkout may not act for
    disabled = await client.post(f"/v1/webhooks/{endpoint['endpoint_id']}/disable", headers=checkout)
    assert disabled.status == 200 and (await disabled.json())["disabled_at"] is not None


async def test_scope_url_and_fields_are_checked_before_anything_is_written(db, make_merchant, client, queue):
    await make_merchant("m1")
    await make_merchant("m2")
    checkout = await bearer(db, "checkout", ("m1",))
    for body, status, code in (
            ({"url": URL, "merchants": ["m1", "m2"]}, 403, "merchant_not_allowed"),
            ({"url": "http://127.0.0.1:8080/hooks", "merchants": ["m1"]}, 422, "url_not_allowed"),
            ({"url": "ftp://example.com/hooks", "merchants": ["m1"]}, 422, "invalid_url"),
            ({"url": URL, "merchants": []}, 422, "invalid_field"),
            ({"url": URL, "merchants": ["m1"], "event_types": ["refund.exploded"]}, 422, "invalid_field"),
            ({"url": URL, "merchants": ["m1"], "extra": 1}, 422, "unknown_field")):
        answer = await client.post("/v1/webhooks", json=body, headers=checkout)
        error = (await answer.json())["error"]
        assert (answer.status, error["code"]) == (status, code), (body, error)
    assert await db.fetchval("SELECT count(*) FROM webhook_endpoints") == 0
    assert (await client.post("/v1/webhooks/not-a-uuid/disable", headers=checkout)).status == 400
    assert (await client.get("/v1/webhooks")).status == 401


async def test_a_malformed_url_is_422_naming_the_field_never_500(db, make_merchant, client, queue):
    """URLs of the http(s) shape that urllib or the HTTP client cannot take: refused by the request
    model (invalid_url, field url) before anything is written, not a 500 from the address check."""
    await make_merchant("m1")
    checkout = await bearer(db, "checkout", ("m1",))
    for url in ("http://[::1", "https://[::1]x/hooks", "https://checkout.example.com:99999/hooks",
                "https://checkout.example.com:https/hooks", "https://user@/hooks"):
        error = await error_of(await client.post("/v1/webhooks", json={"url": url, "merchants": ["m1"]},
                                                 headers=checkout), 422)
        assert (error["code"], error["field"]) == ("invalid_url", "url"), (url, error)
        assert error["message"].startswith("url must be an http(s) URL with a host"), error
    assert await db.fetchval("SELECT count(*) FROM webhook_endpoints") == 0


async def test_an_endpoint_is_managed_only_by_the_service_that_registered_it(db, make_merchant, client, queue):
    """support may act for seller m1 too, but checkout's endpoint for m1 is not support's: listing leaves
    it out, and rotating or disabling it answers 404 exactly as for an endpoint that does not exist
    (as a refund of a merchant outside a token's scope does), with its secret and its state untouched."""
    await make_merchant("m1")
    checkout = await bearer(db, "checkout", ("m1",))
    support = await bearer(db, "support", ("m1",))
    created = await client.post("/v1/webhooks", json={"url": URL, "merchants": ["m1"]}, headers=checkout)
    assert created.status == 201, await created.text()
    endpoint_id = (await created.json())["endpoint_id"]
    assert await db.fetchval("SELECT owner FROM webhook_endpoints WHERE endpoint_id = $1::uuid",
                             endpoint_id) == "checkout"
    before = await db.fetchrow("SELECT secret_sealed, previous_secret_sealed, disabled_at FROM webhook_endpoints")

    assert (await (await client.get("/v1/webhooks", headers=support)).json()) == {"webhooks": []}
    for action, body in (("rotate-secret", {"overlap_hours": 1}), ("disable", None)):
        for target in (endpoint_id, str(uuid.uuid4())):  # checkout's, and none at all: the same answer
            error = await error_of(await client.post(f"/v1/webhooks/{target}/{action}", json=body, headers=support),
                                   404)
            assert (error["code"], error["message"]) == ("not_found", f"no webhook endpoint {target}")
            assert "secret" not in error["message"]
    assert await db.fetchrow("SELECT secret_sealed, previous_secret_sealed, disabled_at FROM webhook_endpoints") \
        == before

    # the token's name is the caller's identity: checkout's token rotated (revoked, made again) keeps its endpoint
    assert await revoke_token(db, "checkout")
    checkout = {"Authorization": f"Bearer {await create_token(db, 'checkout', ['m1'])}"}
    assert [e["endpoint_id"] for e in (await (await client.get("/v1/webhooks", headers=checkout)).json())["webhooks"]] \
        == [endpoint_id]
    rotated = await client.post(f"/v1/webhooks/{endpoint_id}/rotate-secret", headers=checkout)
    assert rotated.status == 200 and (await rotated.json())["secret"].startswith("whsec_")


async def test_an_operator_endpoint_is_not_seen_through_the_intake(db, vault, make_merchant, client, queue):
    """refundctl webhooks add makes an endpoint without an owner: even named after a service, for its
    merchants, the intake neither lists it nor lets that service rotate or disable it."""
    await make_merchant("m1")
    checkout = await bearer(db, "checkout", ("m1",))
    operators, _ = await webhooks.add_endpoint(db, vault, name="checkout", url=URL, merchants=["m1"],
                                               event_types=list(webhooks.EVENT_TYPES))
    assert operators.owner is None
    assert (await (await client.get("/v1/webhooks", headers=checkout)).json()) == {"webhooks": []}
    for action in ("rotate-secret", "disable"):
        error = await error_of(await client.post(f"/v1/webhooks/{operators.endpoint_id}/{action}", headers=checkout),
                               404)
        assert error["code"] == "not_found"
    assert (await webhooks.get_endpoint(db, operators.endpoint_id)).disabled_at is None
    assert [e.endpoint_id for e in await webhooks.list_endpoints(db)] == [operators.endpoint_id]  # refundctl's view


async def test_the_owner_column_is_added_to_an_existing_database_its_endpoints_left_to_operators(
        db, vault, database_url, make_merchant, client, queue):
    """A database from before the owner column: migrating adds it, and its endpoints get no owner
    (who made them was never recorded), so they stay refundctl's, not any caller's."""
    await make_merchant("m1")
    checkout = await bearer(db, "checkout", ("m1",))
    await db.execute("ALTER TABLE webhook_endpoints DROP COLUMN owner")
    try:
        endpoint_id = uuid.uuid4()
        await db.execute(
            """INSERT INTO webhook_endpoints (endpoint_id, name, url, merchants, event_types, secret_sealed)
               VALUES ($1, 'checkout', $2, '{m1}', $3, $4)""",
            endpoint_id, URL, list(webhooks.EVENT_TYPES), vault.seal(b"whsec_AAAA", f"webhook:{endpoint_id}:secret"))
    finally:
        await dbmod.migrate(database_url)  # schema.sql, as refundctl db migrate applies it
    assert await db.fetchval("SELECT owner FROM webhook_endpoints WHERE endpoint_id = $1", endpoint_id) is None
    assert (await (await client.get("/v1/webhooks", headers=checkout)).json()) == {"webhooks": []}
    assert (await client.post(f"/v1/webhooks/{endpoint_id}/disable", headers=checkout)).status == 404
    await dbmod.migrate(database_url)  # and again: nothing changes
    assert await db.fetchval("SELECT owner FROM webhook_endpoints WHERE endpoint_id = $1", endpoint_id) is None
