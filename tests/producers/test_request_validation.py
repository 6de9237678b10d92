"""One validation of a refund request (refunds.requests) at every door, and the document made from it.

The same inputs go through the Python door (``producers.enqueue_refund``) and the HTTP door
(the intake app on a real port, over HTTP, against real Postgres and Redis) and must get
the same verdict: the same error code and field, or the same stored refund.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
import jsonschema_rs

from producers import enqueue_refund
from producers.approvals import decide
from producers.http import create_app, openapi_document
from refunds.errors import RefundRefused
from refunds.payments import record_payment
from refunds.requests import Accepted, Error, RefundRequest, RefundWithEvents
from refunds.tokens import create_token

REDIS_DB = 7  # module_redis_url: a Redis database of our own
NOT_SENT = object()

BASE = dict(merchant_id="m1", original_transaction_id="CIP-1", amount="10.00", currency="PEN",
            external_ref="R-1", reason="damaged")

# (overrides of BASE, the verdict at every door: "accepted" or (code, field))
CASES = [
    ({}, "accepted"),
    ({"amount": "7"}, "accepted"),
    ({"amount": "10.5"}, "accepted"),
    ({"amount": "007.10"}, "accepted"),
    ({"amount": "10.505"}, ("invalid_amount", "amount")),
    ({"amount": "0.00"}, ("invalid_amount", "amount")),
    ({"amount": "-5.00"}, ("invalid_amount", "amount")),
    ({"amount": "1e2"}, ("invalid_amount", "amount")),
    ({"amount": " 10.00"}, ("invalid_amount", "amount")),
    ({"amount": "10.00 "}, ("invalid_amount", "amount")),
    ({"amount": "10,00"}, ("invalid_amount", "amount")),
    ({"amount": ""}, ("invalid_amount", "amount")),
    ({"amount": "1234567890123.00"}, ("invalid_amount", "amount")),
    ({"amount": 10.5}, ("invalid_amount", "amount")),  # a float: never rounded into money
    ({"amount": 10}, ("invalid_amount", "amount")),  # an integer: soles or céntimos?
    ({"amount": True}, ("invalid_amount", "amount")),
    ({"amount": None}, ("missing_field", "amount")),
    ({"currency": "EUR"}, ("invalid_currency", "currency")),
    ({"currency": "pen"}, ("invalid_currency", "currency")),
    ({"currency": 604}, ("invalid_currency", "currency")),
    ({"merchant_id": " m1"}, ("invalid_field", "merchant_id")),  # surrounding spaces: refused, never stripped
    ({"merchant_id": "m1 "}, ("invalid_field", "merchant_id")),
    ({"merchant_id": "m 1"}, ("invalid_field", "merchant_id")),
    ({"merchant_id": ""}, ("invalid_field", "merchant_id")),
    ({"merchant_id": None}, ("missing_field", "merchant_id")),
    ({"merchant_id": ["m1"]}, ("invalid_field", "merchant_id")),
    ({"original_transaction_id": " CIP-1"}, ("invalid_field", "original_transaction_id")),
    ({"original_transaction_id": "CIP-1\t"}, ("invalid_field", "original_transaction_id")),
    ({"original_transaction_id": "CIP\n1"}, ("invalid_field", "original_transaction_id")),
    ({"original_transaction_id": "CIP\x001"}, ("invalid_field", "original_transaction_id")),
    ({"original_transaction_id": "C" * 65}, ("invalid_field", "original_transaction_id")),
    ({"original_transaction_id": ""}, ("invalid_field", "original_transaction_id")),
    ({"original_transaction_id": "NOPE"}, ("unknown_transaction", "original_transaction_id")),
    ({"external_ref": "a:b.c_d-E9"}, "accepted"),
    ({"external_ref": "R 1"}, ("invalid_field", "external_ref")),
    ({"external_ref": " R-1"}, ("invalid_field", "external_ref")),
    ({"external_ref": "R-1\n"}, ("invalid_field", "external_ref")),
    ({"external_ref": "ref/1"}, ("invalid_field", "external_ref")),
    ({"external_ref": "x" * 65}, ("invalid_field", "external_ref")),
    ({"external_ref": ""}, ("invalid_field", "external_ref")),
    ({"external_ref": None}, ("missing_field", "external_ref")),
    ({"reason": None}, "accepted"),
    ({"reason": ""}, "accepted"),  # stored as no reason
    ({"reason": "  kept as written  "}, "accepted"),  # free text: spaces are the caller's
    ({"reason": "line one\nline two\ttabbed\r\n"}, "accepted"),
    ({"reason": "ñandú dañado €"}, "accepted"),
    ({"reason": "x" * 255}, "accepted"),
    ({"reason": "x" * 256}, ("invalid_field", "reason")),
    ({"reason": "nul \x00 byte"}, ("invalid_field", "reason")),
    ({"reason": "escape \x1b[31m red"}, ("invalid_field", "reason")),
    ({"reason": "c1 \x85 control"}, ("invalid_field", "reason")),
    ({"reason": "lone \ud800 surrogate"}, ("invalid_field", "reason")),
    ({"reason": 5}, ("invalid_field", "reason")),
]


def case_id(case) -> str:
    overrides, _ = case
    return ",".join(f"{name}={value!r}"[:40] for name, value in overrides.items()) or "valid"


@pytest_asyncio.fixture
async def door(db, make_merchant, database_url, module_redis_url, queue):
    """Both doors on the same data: merchant m1, a paid CIP-1 of 100.00, a token for m1."""
    await make_merchant("m1")
    await record_payment(db, merchant_id="m1", transaction_id="CIP-1", amount=Decimal("100.00"), currency="PEN",
                         method="cash", paid_at=datetime.now(timezone.utc))
    headers = {"Authorization": f"Bearer {await create_token(db, 'alice', ['m1'])}"}
    async with TestClient(TestServer(create_app(database_url=database_url, redis_url=module_redis_url))) as http:
        yield http, headers


async def stored(db) -> tuple | None:
    row = await db.fetchrow("SELECT merchant_id, original_transaction_id, amount, currency, external_ref, reason"
                            " FROM refunds")
    return tuple(row) if row else None


async def forget_refunds(db) -> None:
    """No refund yet, so that the next door's request is judged afresh (not as a replay)."""
    await db.execute("TRUNCATE refund_events, refunds CASCADE")  # and the webhook events of those refunds
    await db.execute("UPDATE payments SET refunded_amount = 0")


async def through_python(db, fields: dict):
    try:
        result = await enqueue_refund(db, **fields)
    except RefundRefused as refused:
        return (refused.code, refused.field), None
    assert result.created
    return "accepted", await stored(db)


async def through_http(db, http, headers, fields: dict):
    response = await http.post("/v1/refunds", data=json.dumps(fields), headers=headers)
    text = await response.text()
    if response.status == 202:
        Accepted.model_validate_json(text)
        return "accepted", await stored(db)
    assert response.status in (409, 422), text
    error = Error.model_validate_json(text).error
    return (error.code, error.field), None


@pytest.mark.parametrize("case", CASES, ids=case_id)
async def test_every_door_gives_the_same_verdict(db, door, case):
    overrides, verdict = case
    fields = {**BASE, **overrides}
    http, headers = door
    by_python = await through_python(db, fields)
    await forget_refunds(db)
    by_http = await through_http(db, http, headers, fields)
    assert by_python[0] == by_http[0] == verdict, (by_python, by_http)
    assert by_python[1] == by_http[1]  # the same refund stored, to the cent and the character
    if verdict == "accepted":
        assert by_http[1][2] == RefundRequest.parse(**fields).amount
        assert by_http[1][5] == (fields["reason"] or None)


def test_the_document_refuses_what_every_door_refuses():
    """The published RefundRequest schema is never looser than the validation (what schemathesis
    checks by sampling, here on every case): a body it allows is refused only for its data."""
    schema = openapi_document()["components"]["schemas"]["RefundRequest"]
    # ECMA-262 patterns, as OpenAPI says and schemathesis checks with (in Python's re, $ also
    # matches before a final newline)
    validator = jsonschema_rs.validator_for(schema)
    # refused for what a JSON Schema cannot say: a payment we do not have, zero
    beyond_the_schema = ({"original_transaction_id": "NOPE"}, {"amount": "0.00"})
    for overrides, verdict in CASES:
        body = {**BASE, **overrides}
        if "\ud800" in str(body.get("reason")):
            continue  # a lone surrogate is not even UTF-8: no schema validator reads it
        if verdict == "accepted" or overrides in beyond_the_schema:
            assert validator.is_valid(body), overrides
        else:
            assert not validator.is_valid(body), overrides
    assert schema == RefundRequest.model_json_schema(ref_template="#/components/schemas/{model}")


async def test_unknown_fields_and_bodies_that_are_not_objects(door):
    http, headers = door
    for body, code, field in (({**BASE, "ammount": "10.00"}, "unknown_field", "ammount"),
                              ([BASE], "invalid_body", None), ("10.00", "invalid_body", None)):
        response = await http.post("/v1/refunds", data=json.dumps(body), headers=headers)
        assert response.status == 422
        error = Error.model_validate_json(await response.text()).error
        assert (error.code, error.field) == (code, field)
    with pytest.raises(TypeError):  # Python names its arguments: an unknown one never reaches validation
        await enqueue_refund(None, **{**BASE, "ammount": "10.00"})


async def test_answers_keep_to_their_models(db, door):
    """Served bodies validate against the answer models, which forbid unknown fields: the
    document cannot drift from what the handlers send."""
    http, headers = door
    accepted = Accepted.model_validate_json(await (await http.post("/v1/refunds", json=BASE, headers=headers)).text())
    shown = await http.get(f"/v1/refunds/{accepted.refund_id}", headers=headers)
    assert shown.status == 200
    refund = RefundWithEvents.model_validate_json(await shown.text())
    assert refund.amount == Decimal("10.00") and refund.events[0].from_state is None
    found = await http.get("/v1/refunds", params={"merchant_id": "m1", "external_ref": "R-1"}, headers=headers)
    assert RefundWithEvents.model_validate_json(await found.text()) == refund
    bad = await http.get("/v1/refunds", params={"merchant_id": " m1", "external_ref": "R-1"}, headers=headers)
    assert bad.status == 400
    assert Error.model_validate_json(await bad.text()).error.code == "invalid_parameter"


async def test_a_decision_note_has_the_same_rule_in_the_api_and_for_refundctl(db, make_merchant, door):
    http, headers = door
    await db.execute("UPDATE merchants SET refund_mode = 'approval' WHERE merchant_id = 'm1'")
    waiting = Accepted.model_validate_json(await (await http.post("/v1/refunds", json=BASE, headers=headers)).text())
    bob = {"Authorization": f"Bearer {await create_token(db, 'bob', ['m1'])}"}
    for note in ("escape \x1b[31m", "x" * 256, 5):
        answer = await http.post(f"/v1/refunds/{waiting.refund_id}/approve", json={"message": note}, headers=bob)
        assert answer.status == 422
        assert Error.model_validate_json(await answer.text()).error.field == "message"
        with pytest.raises(RefundRefused) as refused:  # refundctl refund approve --message
            await decide(db, waiting.refund_id, decision="approve", approver="bob", note=note)
        assert (refused.value.code, refused.value.field) == ("invalid_field", "message")
    assert await db.fetchval("SELECT state FROM refunds") == "awaiting_approval"
