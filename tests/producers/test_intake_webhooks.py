"""Webhook subscriptions through the intake API, with the same token scopes as refunds."""

from __future__ import annotations

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
    assert len((await (await client.get("/v1/webhooks", headers=support)).json())["webhooks"]) == 2

    rotated = await client.post(f"/v1/webhooks/{endpoint['endpoint_id']}/rotate-secret", json={"overlap_hours": 2},
                                headers=checkout)
    assert rotated.status == 200
    rotated = await rotated.json()
    assert rotated["secret"] != endpoint["secret"] and rotated["previous_secret_valid_until"] is not None

    hidden = await client.post(f"/v1/webhooks/{both['endpoint_id']}/disable", headers=checkout)
    assert hidden.status == 404  # it covers m2, which checkout may not act for
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

