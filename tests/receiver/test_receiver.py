"""The notify_url receiver against a real Postgres: signatures, limits, exactly-once application."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY, generate_latest

from pagoefectivo.protocol import SIGNATURE_HEADER, dumps, notification_signature
from receiver import MAX_BODY, create_app
from receiver import events as events_module
from receiver.batch import RefundOutcomeBatcher
from receiver.credentials import KeyCache, MerchantKeys, Secret, database_loader
from receiver.sources import SourcePolicy
from refunds import metrics
from refunds.database import Database
from refunds.payments import find_payment, record_payment
from refunds.records import find_by_external_ref, refund_events
from refunds.vault import Vault
from tests.helpers import ROOT

NOTIFY = "/pagoefectivo/notifications/{}"


# --- helpers ------------------------------------------------------------------------------

@pytest_asyncio.fixture
async def client(database_url, vault, db):
    app = create_app(database_url=database_url, vault=vault)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


@pytest_asyncio.fixture
async def merchant(make_merchant):
    return await make_merchant("m1")


async def post(client, merchant_id, payload, secret=None, *, signature=None, raw=None, headers=None):
    """POST a notification; signed with ``secret`` unless ``signature`` is given (or None)."""
    body = raw if raw is not None else dumps(payload)
    sent = {"Content-Type": "application/json", **(headers or {})}
    if signature is not None:
        sent[SIGNATURE_HEADER] = signature
    elif secret is not None:
        sent[SIGNATURE_HEADER] = notification_signature(body, secret)
    return await client.post(NOTIFY.format(merchant_id), data=body, headers=sent)


def counted(event_type: str, result: str) -> float:
    return REGISTRY.get_sample_value(
        "refund_notifications_total", {"event_type": event_type, "result": result}
    ) or 0.0


def contradictions(ours: str, gateway: str, merchant_id: str = "m1") -> float:
    return REGISTRY.get_sample_value(
        "refund_outcome_contradictions_total",
        {"merchant": metrics.merchant_label(merchant_id), "ours": ours, "gateway": gateway},
    ) or 0.0


def contradiction_errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "receiver.events"]


def cip_paid(operation_number="op-1", cip="10001", amount=Decimal("150.50"), **data):
    return {
        "eventType": "cip.paid",
        "operationNumber": operation_number,
        "data": {"cip": cip, "currency": "PEN", "amount": amount, "transactionCode": "ORDER-1",
                 "paymentDate": "2024-05-01T10:15:00-05:00", "merchantId": "m1", **data},
    }


def refund_event(event_type, refund, operation_number="op-r1", **overrides):
    data = {
        "refundId": "PE-R-1", "externalRef": refund["external_ref"],
        "originalTransactionId": refund["transaction_id"], "refundAmount": refund["amount"],
        "currency": "PEN", "merchantId": refund["merchant_id"],
        "status": "success" if event_type == "refund.succeeded" else "failure",
    }
    data.update(overrides)
    return {"eventType": event_type, "operationNumber": operation_number, "data": data}


async def make_refund(db, merchant_id="m1", *, amount=Decimal("40.00"), external_ref="R-1", state="submitted"):
    """A paid transaction and a refund of it in ``state`` (its amount reserved on the payment)."""
    transaction_id = f"CIP-{external_ref}"
    await record_payment(db, merchant_id=merchant_id, transaction_id=transaction_id, amount=Decimal("100.00"),
                         currency="PEN", method="cash", paid_at=datetime.now(timezone.utc))
    refund_id = uuid.uuid4()
    await db.execute(
        """INSERT INTO refunds (refund_id, merchant_id, external_ref, original_transaction_id, amount, currency, state)
           VALUES ($1, $2, $3, $4, $5, 'PEN', $6)""",
        refund_id, merchant_id, external_ref, transaction_id, amount, state,
    )
    return {"refund_id": refund_id, "merchant_id": merchant_id, "external_ref": external_ref,
            "transaction_id": transaction_id, "amount": amount}


async def notification_rows(db, merchant_id="m1"):
    return await db.fetch(
        "SELECT operation_number, event_type, result, body FROM notifications WHERE merchant_id = $1", merchant_id
    )


# --- refusals -----------------------------------------------------------------------------

async def test_wrong_signature_is_401_and_writes_nothing(client, db, merchant):
    before = counted("unknown", "invalid_signature")
    response = await post(client, "m1", cip_paid(), "not-the-secret")
    assert response.status == 401
    assert await notification_rows(db) == []
    assert await find_payment(db, "m1", "10001") is None
    assert counted("unknown", "invalid_signature") == before + 1


async def test_signature_over_other_bytes_is_401(client, db, merchant):
    body = dumps(cip_paid())
    signature = notification_signature(body + b" ", merchant.secret_key)
    response = await post(client, "m1", None, raw=body, signature=signature)
    assert response.status == 401
    assert await notification_rows(db) == []


async def test_non_ascii_signature_is_401_not_500(client, db, merchant):
    body = dumps(cip_paid())
    response = await client.post(NOTIFY.format("m1"), data=body,
                                 headers={SIGNATURE_HEADER: "é".encode().decode("latin-1")})
    assert response.status == 401


async def test_missing_signature_is_401(client, db, merchant):
    response = await post(client, "m1", cip_paid())
    assert response.status == 401
    assert await notification_rows(db) == []


@pytest.mark.parametrize("path", ["/pagoefectivo/notifications/m1", "/nowhere", "/healthz"])
async def test_an_expect_header_that_is_not_utf8_is_417_not_500(client, merchant, path):
    """Found by the fuzz test: aiohttp's own Expect handler fails on such a value."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n".encode()
                 + b"Expect: \xfe\xff\r\nConnection: close\r\n\r\n{}")
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] == b"417"


async def test_other_paths_and_methods_are_404(client):
    assert (await client.get("/pagoefectivo/notifications/m1")).status == 404
    assert (await client.post("/nowhere", data=b"{}")).status == 404


@pytest.mark.parametrize("merchant_id", ["nobody", "bad%20id", "x" * 65])
async def test_unknown_merchant_is_404_revealing_nothing(client, db, merchant, merchant_id):
    response = await post(client, merchant_id, cip_paid(), merchant.secret_key)
    assert response.status == 404
    error = (await response.json())["error"]
    assert (error["code"], error["request_id"]) == ("not_found", response.headers["X-Request-Id"])


async def test_body_over_64_kib_is_413(client, db, merchant):
    payload = cip_paid(padding="x" * MAX_BODY)
    response = await post(client, "m1", payload, merchant.secret_key)
    assert response.status == 413
    assert await notification_rows(db) == []


async def test_streamed_body_over_64_kib_is_413(client, db, merchant):
    async def chunks():
        for _ in range(20):
            yield b" " * 8192

    response = await client.post(NOTIFY.format("m1"), data=chunks(), headers={SIGNATURE_HEADER: "00"})
    assert response.status == 413


async def test_malformed_json_is_400(client, db, merchant):
    before = counted("unknown", "malformed")
    response = await post(client, "m1", None, merchant.secret_key, raw=b'{"eventType": "cip.paid",')
    assert response.status == 400
    assert await notification_rows(db) == []
    assert counted("unknown", "malformed") == before + 1


@pytest.mark.parametrize("payload", [
    {"operationNumber": "op-1", "data": {}},
    {"eventType": "cip.paid", "data": {}},
    {"eventType": "cip.paid", "operationNumber": "op-1"},
    {"eventType": "cip.paid", "operationNumber": "op-1", "data": "nope"},
    {"eventType": "cip.paid", "operationNumber": "op-1", "data": {"currency": "PEN", "amount": 10}},
    {"eventType": "cip.paid", "operationNumber": "op-1", "data": {"cip": "1", "currency": "EUR", "amount": 10}},
    {"eventType": "cip.paid", "operationNumber": "op-1", "data": {"cip": "1", "currency": "PEN", "amount": "1.001"}},
    {"eventType": "refund.failed", "operationNumber": "op-1", "data": {"refundAmount": 1, "currency": "PEN"}},
    {"eventType": "cip.paid", "operationNumber": "9" * 129, "data": {}},
    cip_paid(paymentDate="0001-01-01T00:00:00+14:00"),
    cip_paid(paymentDate="yesterday"),
    cip_paid(method="crypto"),
    ["not", "an", "object"],
], ids=["no-eventType", "no-operationNumber", "no-data", "data-not-object", "no-cip", "bad-currency",
        "three-decimals", "no-externalRef", "long-operationNumber", "ancient-date", "bad-date", "bad-method",
        "array"])
async def test_missing_or_invalid_fields_are_400(client, db, merchant, payload):
    response = await post(client, "m1", payload, merchant.secret_key)
    assert response.status == 400
    assert await notification_rows(db) == []


@pytest.mark.parametrize("raw", [
    b'{"eventType":"cip.paid","operationNumber":"op-nul","data":{"cip":"1\\u0000","currency":"PEN","amount":1}}',
    b'{"eventType":"x.y","operationNumber":"op-surrogate","data":{"note":"\\ud800"}}',
    b'{"eventType":"x.y","operationNumber":"op-huge","data":{"n":1e999999}}',
    b'{"eventType":"x.y","operationNumber":"op-nan","data":{"n":NaN}}',
], ids=["nul", "lone-surrogate", "huge-number", "nan"])
async def test_json_that_cannot_be_stored_is_400_not_500(client, db, merchant, raw):
    response = await post(client, "m1", None, merchant.secret_key, raw=raw)
    assert response.status == 400
    assert await notification_rows(db) == []


# --- cip.paid -----------------------------------------------------------------------------

async def test_cip_paid_records_the_payment_with_a_decimal_amount(client, db, merchant):
    before = counted("cip.paid", "applied")
    response = await post(client, "m1", cip_paid(amount=Decimal("150.50")), merchant.secret_key)
    assert response.status == 200
    payment = await find_payment(db, "m1", "10001")
    assert payment is not None
    assert payment.amount == Decimal("150.50") and isinstance(payment.amount, Decimal)
    assert payment.currency == "PEN" and payment.method == "cash"
    assert payment.transaction_code == "ORDER-1"
    assert payment.paid_at == datetime(2024, 5, 1, 15, 15, tzinfo=timezone.utc)
    [row] = await notification_rows(db)
    assert (row["operation_number"], row["event_type"], row["result"]) == ("op-1", "cip.paid", "applied")
    assert row["body"]["data"]["cip"] == "10001"
    assert counted("cip.paid", "applied") == before + 1


async def test_cip_paid_date_without_offset_is_lima_time(client, db, merchant):
    response = await post(client, "m1", cip_paid(paymentDate="2024-05-01T10:15:00"), merchant.secret_key)
    assert response.status == 200
    payment = await find_payment(db, "m1", "10001")
    assert payment.paid_at == datetime(2024, 5, 1, 15, 15, tzinfo=timezone.utc)


async def test_cip_paid_with_a_numeric_cip_and_no_date(client, db, merchant):
    payload = cip_paid(cip=20002, amount=Decimal("5"))
    del payload["data"]["paymentDate"]
    payload["data"]["method"] = "bank_transfer"
    response = await post(client, "m1", payload, merchant.secret_key)
    assert response.status == 200
    payment = await find_payment(db, "m1", "20002")
    assert payment.amount == Decimal("5.00") and payment.method == "bank_transfer"
    assert abs((datetime.now(timezone.utc) - payment.paid_at).total_seconds()) < 60


async def test_cip_paid_for_another_merchant_is_not_recorded(client, db, merchant, make_merchant):
    await make_merchant("m2")
    response = await post(client, "m1", cip_paid(merchantId="m2"), merchant.secret_key)
    assert response.status == 200
    assert await find_payment(db, "m1", "10001") is None
    assert await find_payment(db, "m2", "10001") is None
    [row] = await notification_rows(db)
    assert row["result"] == "mismatch"


async def test_cip_paid_again_with_other_terms_is_a_mismatch(client, db, merchant):
    assert (await post(client, "m1", cip_paid("op-1", "1", amount=Decimal("10.00")), merchant.secret_key)).status == 200
    assert (await post(client, "m1", cip_paid("op-2", "1", amount=Decimal("10.00")), merchant.secret_key)).status == 200
    assert (await post(client, "m1", cip_paid("op-3", "1", amount=Decimal("11.00")), merchant.secret_key)).status == 200
    results = {row["operation_number"]: row["result"] for row in await notification_rows(db)}
    assert results == {"op-1": "applied", "op-2": "already", "op-3": "mismatch"}
    assert (await find_payment(db, "m1", "1")).amount == Decimal("10.00")


async def test_concurrent_notifications_of_one_payment_record_it_once(client, db, merchant):
    """Several operationNumbers about the same cip at once: one applied, the others already."""
    responses = await asyncio.gather(*(
        post(client, "m1", cip_paid(f"op-{i}", "77", amount=Decimal("10.00")), merchant.secret_key) for i in range(6)))
    assert [r.status for r in responses] == [200] * 6
    results = sorted(row["result"] for row in await notification_rows(db))
    assert results == ["already"] * 5 + ["applied"]
    assert await db.fetchval("SELECT count(*) FROM payments WHERE transaction_id = '77'") == 1


async def test_a_refund_outcome_with_an_unstorable_reference_is_400(client, db, merchant):
    refund = await make_refund(db)
    payload = refund_event("refund.succeeded", {**refund, "external_ref": "R-1\u0000"})
    response = await post(client, "m1", payload, merchant.secret_key)
    assert response.status == 400
    assert await notification_rows(db) == []
    assert (await find_by_external_ref(db, "m1", "R-1")).state == "submitted"


# --- refund outcomes ----------------------------------------------------------------------

async def test_same_refund_succeeded_five_times_applies_once(client, db, merchant):
    refund = await make_refund(db)
    payload = refund_event("refund.succeeded", refund)
    before = counted("refund.succeeded", "duplicate")
    results = []
    for _ in range(5):
        response = await post(client, "m1", payload, merchant.secret_key)
        assert response.status == 200
        results.append((await response.json())["result"])
    assert results == ["applied"] + ["duplicate"] * 4
    assert len(await notification_rows(db)) == 1
    history = await refund_events(db, refund["refund_id"])
    assert [(e["from_state"], e["to_state"], e["actor"]) for e in history] == [("submitted", "succeeded", "notification")]
    stored = await find_by_external_ref(db, "m1", "R-1")
    assert stored.state == "succeeded" and stored.provider_refund_id == "PE-R-1"
    assert stored.completed_at is not None
    assert counted("refund.succeeded", "duplicate") == before + 4


async def test_refund_failed_releases_the_reserved_amount(client, db, merchant):
    refund = await make_refund(db, amount=Decimal("40.00"))
    assert (await find_payment(db, "m1", refund["transaction_id"])).refunded_amount == Decimal("40.00")
    payload = refund_event("refund.failed", refund, reason="cuenta cerrada", code="E42")
    response = await post(client, "m1", payload, merchant.secret_key)
    assert response.status == 200
    stored = await find_by_external_ref(db, "m1", "R-1")
    assert stored.state == "failed"
    assert stored.provider_message == "cuenta cerrada" and stored.provider_code == "E42"
    assert (await find_payment(db, "m1", refund["transaction_id"])).refunded_amount == Decimal("0.00")


async def test_refund_outcome_for_an_unknown_external_ref_is_kept_as_unknown(client, db, merchant):
    refund = {"external_ref": "NEVER-SEEN", "transaction_id": "X", "amount": Decimal("1.00"), "merchant_id": "m1"}
    response = await post(client, "m1", refund_event("refund.succeeded", refund), merchant.secret_key)
    assert response.status == 200
    [row] = await notification_rows(db)
    assert row["result"] == "unknown"


async def test_unknown_event_type_is_kept_not_applied(client, db, merchant):
    before = counted("other", "unknown")
    payload = {"eventType": "cip.expired", "operationNumber": "op-x", "data": {"cip": "1"}}
    response = await post(client, "m1", payload, merchant.secret_key)
    assert response.status == 200
    [row] = await notification_rows(db)
    assert (row["event_type"], row["result"]) == ("cip.expired", "unknown")
    assert counted("other", "unknown") == before + 1


async def test_refund_failed_after_succeeded_changes_nothing_and_is_a_contradiction(client, db, merchant, caplog):
    refund = await make_refund(db)
    ok = await post(client, "m1", refund_event("refund.succeeded", refund, "op-a"), merchant.secret_key)
    assert ok.status == 200
    duplicate, unknown = counted("refund.failed", "duplicate"), counted("refund.failed", "unknown")
    before = contradictions("succeeded", "failed")
    with caplog.at_level(logging.ERROR, logger="receiver.events"):
        late = await post(client, "m1", refund_event("refund.failed", refund, "op-b"), merchant.secret_key)
    assert late.status == 200
    stored = await find_by_external_ref(db, "m1", "R-1")
    assert stored.state == "succeeded"
    assert (await find_payment(db, "m1", refund["transaction_id"])).refunded_amount == Decimal("40.00")
    results = {row["operation_number"]: row["result"] for row in await notification_rows(db)}
    assert results == {"op-a": "applied", "op-b": "late"}
    assert len(await refund_events(db, refund["refund_id"])) == 1
    assert counted("refund.failed", "duplicate") == duplicate  # a contradiction is no duplicate
    assert counted("refund.failed", "unknown") == unknown + 1
    assert contradictions("succeeded", "failed") == before + 1
    assert len(contradiction_errors(caplog)) == 1


@pytest.mark.parametrize("ours, event_type", [
    ("failed", "refund.succeeded"),             # money out, its amount given back to the payment
    ("succeeded", "refund.failed"),             # we say refunded; the customer was not
    ("awaiting_approval", "refund.succeeded"),  # never sent by us
    ("rejected", "refund.failed"),
])
async def test_an_outcome_that_contradicts_our_state_is_received_kept_counted_and_logged_not_applied(
        client, db, merchant, caplog, ours, event_type):
    refund = await make_refund(db, state=ours)
    gateway = events_module.REFUND_TARGETS[event_type]
    reserved = Decimal("0.00") if ours in ("failed", "rejected") else Decimal("40.00")
    before = contradictions(ours, gateway)
    unknown, duplicate = counted(event_type, "unknown"), counted(event_type, "duplicate")
    payload = refund_event(event_type, refund, "op-x", code="E42", reason="from the gateway")
    with caplog.at_level(logging.ERROR, logger="receiver.events"):
        first = await post(client, "m1", payload, merchant.secret_key)
        again = await post(client, "m1", payload, merchant.secret_key)  # PagoEfectivo's second attempt
    # received (200: PagoEfectivo must not send it on and on), not applied
    assert (first.status, await first.json()) == (200, {"result": "late"})
    assert (again.status, await again.json()) == (200, {"result": "duplicate"})
    stored = await find_by_external_ref(db, "m1", "R-1")
    assert (stored.state, stored.provider_code, stored.provider_message) == (ours, None, None)
    assert await refund_events(db, refund["refund_id"]) == []
    assert (await find_payment(db, "m1", refund["transaction_id"])).refunded_amount == reserved
    assert [(row["operation_number"], row["result"]) for row in await notification_rows(db)] == [("op-x", "late")]

    # counted once, as a contradiction and as "unknown" (the redelivery is the duplicate)
    assert contradictions(ours, gateway) == before + 1
    assert counted(event_type, "unknown") == unknown + 1
    assert counted(event_type, "duplicate") == duplicate + 1
    [error] = contradiction_errors(caplog)
    assert error.getMessage() == (f"refund {refund['refund_id']} of merchant m1: PagoEfectivo says {gateway}, "
                                  f"we hold it {ours}; not applied, to reconcile by hand (notification op-x)")
    assert (error.refund_id, error.merchant, error.external_ref, error.ours, error.gateway) == (
        str(refund["refund_id"]), "m1", "R-1", ours, gateway)
    assert merchant.secret_key not in error.getMessage() and merchant.secret_key not in str(vars(error))


async def test_outcome_already_applied_by_the_worker_counts_as_applied(client, db, merchant):
    refund = await make_refund(db, state="succeeded")
    response = await post(client, "m1", refund_event("refund.succeeded", refund), merchant.secret_key)
    assert response.status == 200
    [row] = await notification_rows(db)
    assert row["result"] == "already"


async def test_refund_outcome_with_another_amount_is_not_applied(client, db, merchant):
    refund = await make_refund(db, amount=Decimal("40.00"))
    payload = refund_event("refund.succeeded", refund, refundAmount=Decimal("41.00"))
    response = await post(client, "m1", payload, merchant.secret_key)
    assert response.status == 200
    assert (await find_by_external_ref(db, "m1", "R-1")).state == "submitted"
    [row] = await notification_rows(db)
    assert row["result"] == "mismatch"


async def test_five_concurrent_deliveries_apply_once(client, db, merchant):
    refund = await make_refund(db)
    payload = refund_event("refund.succeeded", refund)
    responses = await asyncio.gather(*(post(client, "m1", payload, merchant.secret_key) for _ in range(5)))
    assert [r.status for r in responses] == [200] * 5
    results = sorted([(await r.json())["result"] for r in responses])
    assert results == ["applied"] + ["duplicate"] * 4
    assert len(await notification_rows(db)) == 1
    assert len(await refund_events(db, refund["refund_id"])) == 1


async def test_the_same_operation_number_of_two_merchants_are_two_notifications(client, db, merchant, make_merchant):
    other = await make_merchant("m2")
    assert (await post(client, "m1", cip_paid("op-1", "1"), merchant.secret_key)).status == 200
    assert (await post(client, "m2", cip_paid("op-1", "1", merchantId="m2"), other.secret_key)).status == 200
    assert await find_payment(db, "m1", "1") is not None
    assert await find_payment(db, "m2", "1") is not None


# --- secrets ------------------------------------------------------------------------------

class CountingVault(Vault):
    opened = 0

    def open(self, sealed, identity):
        self.opened += 1
        return super().open(sealed, identity)


async def test_secrets_are_decrypted_once_not_per_request(database_url, db, make_merchant, master_key):
    import base64

    merchant = await make_merchant("m1")
    vault = CountingVault(base64.b64decode(master_key))
    async with TestClient(TestServer(create_app(database_url=database_url, vault=vault))) as client:
        for index in range(5):
            response = await post(client, "m1", cip_paid(f"op-{index}", str(index)), merchant.secret_key)
            assert response.status == 200
    assert vault.opened == 1


async def test_a_rotated_secret_is_picked_up_after_the_cache_expires(database_url, db, vault, make_merchant):
    merchant = await make_merchant("m1", secret_key="old-secret")
    app = create_app(database_url=database_url, vault=vault, key_ttl=0.0)
    async with TestClient(TestServer(app)) as client:
        assert (await post(client, "m1", cip_paid("op-1", "1"), "old-secret")).status == 200
        await make_merchant("m1", secret_key="new-secret")
        assert (await post(client, "m1", cip_paid("op-2", "2"), "new-secret")).status == 200
        assert (await post(client, "m1", cip_paid("op-3", "3"), "old-secret")).status == 401
    assert merchant.secret_key == "old-secret"


# --- probes, metrics, outages -------------------------------------------------------------

async def test_probes_and_metrics(client, db, merchant):
    await post(client, "m1", cip_paid(), merchant.secret_key)
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    assert (await client.get("/metrics")).status == 404  # served on RECEIVER_METRICS_PORT (test_receiver_limits.py)
    text = generate_latest(REGISTRY).decode()
    assert 'refund_notifications_total{event_type="cip.paid",result="applied"}' in text
    assert "refund_notification_seconds_bucket" in text


@pytest.mark.slow
async def test_postgres_unreachable_is_503_so_the_sender_retries(vault):
    app = create_app(database_url="postgresql://postgres@127.0.0.1:1/x", vault=vault)
    async with TestClient(TestServer(app)) as client:  # starting must not fail
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 503
        response = await post(client, "m1", cip_paid(), "whatever")
        assert response.status == 503
        await asyncio.sleep(1.1)  # past the reconnect back-off: it really tries again
        assert (await post(client, "m1", cip_paid(), "whatever")).status == 503


@pytest.mark.parametrize("kind", ["cip.paid", "refund.succeeded"])
async def test_connection_lost_while_applying_is_503(client, db, merchant, monkeypatch, kind):
    async def lose_connection(*args):
        raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation")

    monkeypatch.setattr(events_module, "store_and_apply", lose_connection)        # other types
    monkeypatch.setattr(events_module, "store_payments", lose_connection)         # cip.paid, batched
    monkeypatch.setattr(events_module, "store_refund_outcomes", lose_connection)  # refund outcomes, batched
    if kind == "cip.paid":
        payload = cip_paid()
    else:
        payload = refund_event(kind, await make_refund(db))
    response = await post(client, "m1", payload, merchant.secret_key)
    assert response.status == 503


# --- the process ----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REFUNDS_MASTER_KEY", "REFUNDS_MASTER_KEY_FILE", "RECEIVER_PORT")}
    env.update(extra)
    return env


def test_missing_setting_stops_the_process_with_one_line(master_key):
    done = subprocess.run([sys.executable, "-m", "receiver"], cwd=ROOT, capture_output=True, text=True,
                          env=_env(REFUNDS_MASTER_KEY=master_key), timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "receiver: DATABASE_URL is not set"


async def test_the_process_serves_and_stops_on_sigterm(database_url, master_key, tmp_path):
    port = _free_port()
    env = _env(DATABASE_URL=database_url, REFUNDS_MASTER_KEY=master_key, RECEIVER_PORT=str(port),
               RECEIVER_HOST="127.0.0.1", RECEIVER_JOURNAL_DIR=str(tmp_path / "journal"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "receiver", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        assert line.decode().strip() == f"receiver listening on http://127.0.0.1:{port}"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status_line = await reader.readline()
        writer.close()
        assert b" 200 " in status_line
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- secret rotation overlap ----------------------------------------------------------------

def fixed_loader(*secrets):
    async def load(merchant_id):
        return secrets if merchant_id == "m1" else None

    return load


async def test_during_a_rotation_the_old_secret_verifies_until_the_overlap_ends(database_url, db, vault, make_merchant):
    await make_merchant("m1", secret_key="new-secret")
    ends = datetime.now(timezone.utc) + timedelta(hours=1)
    keys = KeyCache(fixed_loader(Secret("new-secret"), Secret("old-secret", ends)))
    async with TestClient(TestServer(create_app(database_url=database_url, vault=vault, keys=keys))) as client:
        assert (await post(client, "m1", cip_paid("op-1", "1"), "old-secret")).status == 200
        assert (await post(client, "m1", cip_paid("op-2", "2"), "new-secret")).status == 200
        assert (await post(client, "m1", cip_paid("op-3", "3"), "other-secret")).status == 401
        assert (await post(client, "nobody", cip_paid("op-4", "4"), "new-secret")).status == 404
    assert {row["operation_number"] for row in await notification_rows(db)} == {"op-1", "op-2"}


async def test_after_the_overlap_only_the_current_secret_verifies(database_url, db, vault, make_merchant):
    await make_merchant("m1", secret_key="new-secret")
    ended = datetime.now(timezone.utc) - timedelta(seconds=1)
    keys = KeyCache(fixed_loader(Secret("new-secret"), Secret("old-secret", ended)))
    async with TestClient(TestServer(create_app(database_url=database_url, vault=vault, keys=keys))) as client:
        assert (await post(client, "m1", cip_paid("op-1", "1"), "old-secret")).status == 401
        assert (await post(client, "m1", cip_paid("op-2", "2"), "new-secret")).status == 200


def test_the_overlap_end_is_checked_at_each_verification_not_at_load():
    ends = datetime(2026, 1, 1, tzinfo=timezone.utc)
    keys = MerchantKeys("m1", (Secret("new"), Secret("old", ends)), loaded_at=0.0)
    body = b'{"x":1}'
    old = notification_signature(body, "old")
    assert keys.verifies(body, old, now=ends - timedelta(microseconds=1))
    assert not keys.verifies(body, old, now=ends)
    assert keys.verifies(body, notification_signature(body, "new"), now=ends + timedelta(days=365))
    assert "old" not in repr(keys) and "new'" not in repr(keys)


async def test_a_rotation_in_the_database_keeps_the_old_secret_for_the_overlap(database_url, db, vault, make_merchant):
    from refunds.merchants import rotate_secret

    await make_merchant("m1", secret_key="old-secret")
    await make_merchant("m2", secret_key="old-secret-2")
    await rotate_secret(db, vault, "m1", "new-secret", overlap=timedelta(hours=1))
    await rotate_secret(db, vault, "m2", "new-secret-2", overlap=timedelta(seconds=-1))  # overlap already over
    async with TestClient(TestServer(create_app(database_url=database_url, vault=vault))) as client:
        assert (await post(client, "m1", cip_paid("op-1", "1"), "old-secret")).status == 200
        assert (await post(client, "m1", cip_paid("op-2", "2"), "new-secret")).status == 200
        assert (await post(client, "m2", cip_paid("op-1", "1", merchantId="m2"), "old-secret-2")).status == 401
        assert (await post(client, "m2", cip_paid("op-2", "2", merchantId="m2"), "new-secret-2")).status == 200
    database = Database(database_url)
    try:
        load = database_loader(database, vault)
        [current, previous] = await load("m1")
        assert await load("nobody") is None
    finally:
        await database.close()
    assert current == Secret("new-secret") and previous.value == "old-secret"
    assert previous.valid_until > datetime.now(timezone.utc) + timedelta(minutes=59)


# --- source allow list ----------------------------------------------------------------------

async def send_from(database_url, vault, merchant, sources, headers=None, operation="op-1"):
    app = create_app(database_url=database_url, vault=vault, sources=sources)
    async with TestClient(TestServer(app)) as client:  # the peer is 127.0.0.1
        return (await post(client, "m1", cip_paid(operation, operation), merchant.secret_key, headers=headers)).status


def refused_by_source() -> float:
    return REGISTRY.get_sample_value("refund_notifications_refused_total", {"reason": "source"}) or 0.0


async def test_a_sender_inside_the_allow_list_is_served(database_url, vault, db, merchant):
    policy = SourcePolicy.from_settings("10.0.0.0/8, 127.0.0.0/8", "")
    assert await send_from(database_url, vault, merchant, policy) == 200
    assert len(await notification_rows(db)) == 1


async def test_a_sender_outside_the_allow_list_is_403_and_nothing_is_read(database_url, vault, db, merchant):
    before = refused_by_source()
    policy = SourcePolicy.from_settings("10.0.0.0/8", "")
    assert await send_from(database_url, vault, merchant, policy) == 403
    assert await notification_rows(db) == []
    assert refused_by_source() == before + 1


async def test_behind_a_trusted_proxy_the_forwarded_address_decides(database_url, vault, db, merchant):
    policy = SourcePolicy.from_settings("203.0.113.0/24", "127.0.0.1")
    allowed = {"X-Forwarded-For": "203.0.113.9"}
    assert await send_from(database_url, vault, merchant, policy, allowed, "op-1") == 200
    assert await send_from(database_url, vault, merchant, policy, None, "op-2") == 403  # the proxy itself
    # the client wrote an allowed address first; our proxy appended the real one
    spoofed = {"X-Forwarded-For": "203.0.113.9, 198.51.100.7"}
    assert await send_from(database_url, vault, merchant, policy, spoofed, "op-3") == 403
    assert [row["operation_number"] for row in await notification_rows(db)] == ["op-1"]


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(database_url, vault, db, merchant):
    policy = SourcePolicy.from_settings("203.0.113.0/24", "10.0.0.1")
    spoofed = {"X-Forwarded-For": "203.0.113.9"}
    assert await send_from(database_url, vault, merchant, policy, spoofed) == 403
    assert await notification_rows(db) == []


@pytest.mark.parametrize("peer, forwarded, expected", [
    ("198.51.100.7", [], "198.51.100.7"),
    ("198.51.100.7", ["203.0.113.9"], "198.51.100.7"),                  # untrusted peer: header ignored
    ("10.0.0.1", ["203.0.113.9"], "203.0.113.9"),
    ("10.0.0.1", ["1.1.1.1, 203.0.113.9, 10.0.0.2"], "203.0.113.9"),   # right-most untrusted hop
    ("10.0.0.1", ["1.1.1.1", "203.0.113.9"], "203.0.113.9"),           # several headers are one list
    ("10.0.0.1", ["10.0.0.3, 10.0.0.2"], "10.0.0.3"),                  # proxies only: the first of them
    ("10.0.0.1", [], "10.0.0.1"),
    ("10.0.0.1", ["203.0.113.9:4711"], "203.0.113.9"),
    ("10.0.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
    ("10.0.0.1", ["unknown"], None),
    ("10.0.0.1", ["203.0.113.9, garbage"], None),                      # unreadable hop nearer than the client
    ("::ffff:10.0.0.1", ["203.0.113.9"], "203.0.113.9"),               # dual-stack socket
    ("", ["203.0.113.9"], None),
    (None, [], None),
])
def test_the_client_address(peer, forwarded, expected):
    policy = SourcePolicy.from_settings("0.0.0.0/0", "10.0.0.0/24")
    found = policy.client(peer, forwarded)
    assert (None if found is None else str(found)) == expected


def test_the_allow_list():
    policy = SourcePolicy.from_settings("203.0.113.0/24, 2001:db8::/32", "")
    assert policy.allows(policy.client("203.0.113.200")) and policy.allows(policy.client("2001:db8::5"))
    assert not policy.allows(policy.client("203.0.114.1")) and not policy.allows(None)
    assert SourcePolicy().allows(None)  # no list: everyone


@pytest.mark.slow
@pytest.mark.parametrize("name, value", [("RECEIVER_ALLOWED_CIDRS", "10.0.0.0/8, 300.1.2.3/8"),
                                         ("RECEIVER_TRUSTED_PROXIES", "proxy.internal")])
def test_a_malformed_network_stops_the_process_naming_it(database_url, master_key, name, value):
    done = subprocess.run([sys.executable, "-m", "receiver"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=_env(DATABASE_URL=database_url, REFUNDS_MASTER_KEY=master_key, **{name: value}))
    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"receiver: {name} is malformed")


# --- notifications for operators ------------------------------------------------------------

def refundctl(database_url, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refundctl", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "DATABASE_URL": database_url, "COLUMNS": "200"}, timeout=60)


@pytest.mark.slow
async def test_refundctl_lists_unknown_refund_notifications(client, db, merchant, make_merchant, database_url):
    other = await make_merchant("m2")
    refund = await make_refund(db)
    stranger = {"external_ref": "NEVER-SEEN", "transaction_id": "X", "amount": Decimal("12.30"), "merchant_id": "m1"}
    for merchant_id, secret, payload in [
        ("m1", merchant.secret_key, refund_event("refund.succeeded", refund, "op-ok")),
        ("m1", merchant.secret_key, refund_event("refund.succeeded", stranger, "op-unknown")),
        ("m2", other.secret_key, refund_event("refund.failed", {**stranger, "merchant_id": "m2"}, "op-unknown-2")),
    ]:
        assert (await post(client, merchant_id, payload, secret)).status == 200

    done = await asyncio.to_thread(refundctl, database_url, "notifications", "list", "--result", "unknown", "--json")
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)["notifications"]
    assert sorted(n["operation_number"] for n in listed) == ["op-unknown", "op-unknown-2"]
    first = next(n for n in listed if n["operation_number"] == "op-unknown")
    assert first["merchant_id"] == "m1" and first["event_type"] == "refund.succeeded" and first["result"] == "unknown"
    assert (first["reference"], first["amount"], first["currency"]) == ("NEVER-SEEN", "12.30", "PEN")
    assert datetime.fromisoformat(first["received_at"]).tzinfo is not None

    done = await asyncio.to_thread(refundctl, database_url, "notifications", "list", "--result", "unknown",
                                   "--merchant", "m2", "--json")
    assert [n["operation_number"] for n in json.loads(done.stdout)["notifications"]] == ["op-unknown-2"]

    done = await asyncio.to_thread(refundctl, database_url, "notifications", "list", "--result", "unknown")
    assert done.returncode == 0, done.stderr
    assert "op-unknown" in done.stdout and "NEVER-SEEN" in done.stdout and "op-ok" not in done.stdout

    done = await asyncio.to_thread(refundctl, database_url, "notifications", "list", "--result", "nonsense")
    assert done.returncode == 2


# --- Postgres going away in the middle of a run ---------------------------------------------

class TcpProxy:
    """A loopback TCP relay in front of Postgres that a test can cut and restore."""

    def __init__(self, host: str, port: int):
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Refuse new connections and cut every open one (both sides), like a crashed server."""
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    async def _relay(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()
            self._writers.discard(writer)


@pytest_asyncio.fixture
async def proxied(database_url):
    parts = urlsplit(database_url)
    proxy = TcpProxy(parts.hostname, parts.port)
    await proxy.start()
    proxy.url = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
    try:
        yield proxy
    finally:
        await proxy.stop()


async def deliver_until_accepted(client, payload, secret, attempts=20):
    """What PagoEfectivo does: retry any non-200."""
    for _ in range(attempts):
        response = await post(client, "m1", payload, secret)
        if response.status == 200:
            return await response.json()
        assert response.status == 503
        await asyncio.sleep(0.2)
    raise AssertionError("never accepted")


async def test_postgres_gone_then_back_503_then_applied_once(proxied, vault, db, merchant):
    refund = await make_refund(db)
    payload = refund_event("refund.succeeded", refund, "op-r1")
    async with TestClient(TestServer(create_app(database_url=proxied.url, vault=vault))) as client:
        assert (await post(client, "m1", cip_paid("op-1", "1"), merchant.secret_key)).status == 200  # pool is up

        await proxied.stop()
        assert (await post(client, "m1", payload, merchant.secret_key)).status == 503
        assert (await client.get("/readyz")).status == 503
        assert (await client.get("/healthz")).status == 200
        assert await notification_rows(db) != [] and (await find_by_external_ref(db, "m1", "R-1")).state == "submitted"

        await proxied.start()  # same port: Postgres is back
        assert await deliver_until_accepted(client, payload, merchant.secret_key) == {"result": "applied"}
        assert (await post(client, "m1", payload, merchant.secret_key)).status == 200
    assert (await find_by_external_ref(db, "m1", "R-1")).state == "succeeded"
    assert len(await refund_events(db, refund["refund_id"])) == 1
    assert sorted(row["operation_number"] for row in await notification_rows(db)) == ["op-1", "op-r1"]


async def test_postgres_lost_in_the_middle_of_applying_is_503_then_applied_once(proxied, vault, db, merchant, database_url):
    refund = await make_refund(db)
    payload = refund_event("refund.succeeded", refund, "op-r1")
    blocker = await asyncpg.connect(database_url)
    try:
        async with TestClient(TestServer(create_app(database_url=proxied.url, vault=vault))) as client:
            assert (await client.get("/readyz")).status == 200
            # hold the refund's row lock so the receiver's statement waits on it, then cut Postgres off
            lock = blocker.transaction()
            await lock.start()
            await blocker.execute("SELECT 1 FROM refunds WHERE refund_id = $1 FOR UPDATE", refund["refund_id"])
            in_flight = asyncio.create_task(post(client, "m1", payload, merchant.secret_key))
            for _ in range(200):
                waiting = await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()")
                if waiting:
                    break
                await asyncio.sleep(0.02)
            assert waiting, "the receiver never reached the refund row"

            await proxied.stop()
            assert (await in_flight).status == 503
            await lock.rollback()

            await proxied.start()
            # the move and the row are one statement: cut off from its client, the backend may still
            # finish it once the lock is free (then the redelivery is a duplicate) or not (applied now)
            again = await deliver_until_accepted(client, payload, merchant.secret_key)
            assert again in ({"result": "applied"}, {"result": "duplicate"})
            assert (await (await post(client, "m1", payload, merchant.secret_key)).json()) == {"result": "duplicate"}
    finally:
        await blocker.close()
    assert (await find_by_external_ref(db, "m1", "R-1")).state == "succeeded"
    assert len(await refund_events(db, refund["refund_id"])) == 1
    [row] = await notification_rows(db)
    assert (row["operation_number"], row["result"]) == ("op-r1", "applied")


# --- cip.paid stored in batches -------------------------------------------------------------

def parsed(payload) -> events_module.Notification:
    return events_module.parse(dumps(payload))


def batch_sizes(monkeypatch, store_many: str) -> list[int]:
    """The size of each batch the receiver stores with ``events.<store_many>`` (which still runs)."""
    sizes = []
    real = getattr(events_module, store_many)

    async def counting(conn, notes):
        sizes.append(len(notes))
        return await real(conn, notes)

    monkeypatch.setattr(events_module, store_many, counting)
    return sizes


async def test_concurrent_payments_are_stored_together_each_with_its_own_answer(client, db, merchant, monkeypatch):
    calls = batch_sizes(monkeypatch, "store_payments")
    first = [cip_paid(f"op-{i}", f"cip-{i}") for i in range(40)]
    responses = await asyncio.gather(*(post(client, "m1", p, merchant.secret_key) for p in first))
    assert [r.status for r in responses] == [200] * 40
    assert [(await r.json())["result"] for r in responses] == ["applied"] * 40
    # then, once the payments exist, concurrent redeliveries and other notifications about them
    later = [cip_paid("op-0", "cip-0")] * 3                                        # redeliveries
    later += [cip_paid(f"op-again-{i}", "cip-1") for i in range(3)]              # same payment, new notifications
    later += [cip_paid("op-other", "cip-2", amount=Decimal("1.00"))]             # same payment, other terms
    responses = await asyncio.gather(*(post(client, "m1", p, merchant.secret_key) for p in later))
    assert [r.status for r in responses] == [200] * len(later)
    answers = [(await r.json())["result"] for r in responses]
    assert answers == ["duplicate"] * 3 + ["already"] * 3 + ["mismatch"]
    assert await db.fetchval("SELECT count(*) FROM payments") == 40
    assert await db.fetchval("SELECT count(*) FROM notifications") == 44
    assert len(calls) < len(first) + len(later) and sum(calls) >= len(first)  # batched


async def test_a_body_postgres_refuses_fails_alone_in_its_batch(database_url, db, merchant):
    from receiver.batch import PaymentBatcher

    database = Database(database_url)
    batcher = PaymentBatcher(database, max_inflight=1)
    try:
        good = [parsed(cip_paid(f"op-{i}", f"cip-{i}")) for i in range(5)]
        bad = parsed(cip_paid("op-bad", "cip-bad", transactionCode="nul\u0000"))
        results = await asyncio.gather(*(batcher.store("m1", note) for note in [*good[:2], bad, *good[2:]]),
                                       return_exceptions=True)
    finally:
        await database.close()
    assert isinstance(results[2], events_module.Malformed)
    assert [r.result for i, r in enumerate(results) if i != 2] == ["applied"] * 5
    assert await db.fetchval("SELECT count(*) FROM notifications") == 5


async def test_when_postgres_is_unreachable_every_payment_of_the_batch_is_503(vault):
    from receiver.batch import PaymentBatcher
    from refunds.database import Unavailable

    database = Database("postgresql://postgres@127.0.0.1:1/x", connect_timeout=2)
    batcher = PaymentBatcher(database)
    try:
        results = await asyncio.gather(*(batcher.store("m1", parsed(cip_paid(f"op-{i}", str(i)))) for i in range(5)),
                                       return_exceptions=True)
    finally:
        await database.close()
    assert all(isinstance(r, Unavailable) for r in results)


# --- refund outcomes stored in batches --------------------------------------------------------

@pytest.fixture
def statements(monkeypatch):
    """The SQL each asyncpg connection sends about notifications (a spy: every statement still runs)."""
    sent: list[str] = []
    for name in ("execute", "fetch", "fetchrow", "fetchval"):
        real = getattr(asyncpg.connection.Connection, name)

        def spy(self, query, *args, _real=real, **kwargs):
            if " notifications" in query:  # the receiver's statements, not pool setup or secret loads
                sent.append(query)
            return _real(self, query, *args, **kwargs)

        monkeypatch.setattr(asyncpg.connection.Connection, name, spy)
    return sent


def completed(status: str) -> float:
    """Completions of this status, summed over the merchant label."""
    return sum(sample.value for family in REGISTRY.collect() if family.name == "refunds_completed"
               for sample in family.samples
               if sample.name == "refunds_completed_total" and sample.labels["status"] == status)


class RecordingRefundBatcher(RefundOutcomeBatcher):
    """The receiver's batcher (real statements) noting the operationNumbers of each batch it stores."""

    def __init__(self, database, **options):
        super().__init__(database, **options)
        self.batches: list[list[str]] = []

    async def store_many(self, conn, notes):
        self.batches.append([note.operation_number for _, note in notes])
        return await super().store_many(conn, notes)


async def test_concurrent_refund_outcomes_share_statements_each_with_its_own_answer(
        client, db, merchant, monkeypatch, statements):
    batches = batch_sizes(monkeypatch, "store_refund_outcomes")
    refunds = [await make_refund(db, external_ref=f"R-{i}") for i in range(41)]

    # idle: one notification is stored at once, alone, with one read and one statement
    alone = await post(client, "m1", refund_event("refund.succeeded", refunds[0], "op-alone"), merchant.secret_key)
    assert (await alone.json()) == {"result": "applied"}
    assert batches == [1] and len(statements) == 2

    statements.clear()
    batches.clear()
    succeeded, failed = completed("succeeded"), completed("failed")
    payloads = [refund_event("refund.succeeded" if i % 2 else "refund.failed", refund, f"op-{i}", code=f"C{i}")
                for i, refund in enumerate(refunds[1:], 1)]
    responses = await asyncio.gather(*(post(client, "m1", p, merchant.secret_key) for p in payloads))
    assert [r.status for r in responses] == [200] * 40
    assert [(await r.json())["result"] for r in responses] == ["applied"] * 40
    assert sum(batches) == 40 and len(batches) < 40
    assert len(statements) == 2 * len(batches) < 40  # a read and a statement a batch, not two per notification
    assert completed("succeeded") == succeeded + 20 and completed("failed") == failed + 20

    for i, refund in enumerate(refunds[1:], 1):
        stored = await find_by_external_ref(db, "m1", refund["external_ref"])
        assert stored.state == ("succeeded" if i % 2 else "failed") and stored.provider_code == f"C{i}"
        assert stored.completed_at is not None and stored.provider_refund_id == "PE-R-1"
        history = await refund_events(db, refund["refund_id"])
        assert [(e["from_state"], e["to_state"], e["actor"], e["code"]) for e in history] == [
            ("submitted", stored.state, "notification", f"C{i}")]
        payment = await find_payment(db, "m1", refund["transaction_id"])
        assert payment.refunded_amount == (Decimal("40.00") if i % 2 else Decimal("0.00"))
    results = {row["operation_number"]: row["result"] for row in await notification_rows(db)}
    assert results == {"op-alone": "applied", **{f"op-{i}": "applied" for i in range(1, 41)}}

    # redelivered together: each is a duplicate, found by the read alone; nothing is written
    statements.clear()
    batches.clear()
    responses = await asyncio.gather(*(post(client, "m1", p, merchant.secret_key) for p in payloads))
    assert [(await r.json())["result"] for r in responses] == ["duplicate"] * 40
    assert len(statements) == len(batches) < 40
    assert await db.fetchval("SELECT count(*) FROM refund_events") == 41


async def test_a_batch_of_refund_outcomes_decides_each_as_it_would_alone(database_url, db, merchant, caplog):
    first = await make_refund(db, external_ref="R-1")
    contradicted = await make_refund(db, external_ref="R-2")
    other = await make_refund(db, external_ref="R-3")
    stranger = {"external_ref": "NEVER-SEEN", "transaction_id": "X", "amount": Decimal("1.00"), "merchant_id": "m1"}
    notes = {
        "applied": refund_event("refund.succeeded", first, "op-a"),
        "redelivered": refund_event("refund.succeeded", first, "op-a"),
        "same refund, same outcome": refund_event("refund.succeeded", first, "op-b"),
        "same refund, other outcome": refund_event("refund.failed", first, "op-c"),
        "mismatch": refund_event("refund.succeeded", contradicted, "op-m", refundAmount=Decimal("41.00")),
        "unknown": refund_event("refund.succeeded", stranger, "op-u"),
        "another applied": refund_event("refund.failed", other, "op-o"),
    }
    database = Database(database_url)
    batcher = RecordingRefundBatcher(database, max_inflight=1)
    try:
        outcomes = await asyncio.gather(*(batcher.store("m1", parsed(p)) for p in notes.values()))
    finally:
        await database.close()

    assert dict(zip(notes, (o.result for o in outcomes))) == {
        "applied": "applied", "redelivered": "duplicate", "same refund, same outcome": "already",
        "same refund, other outcome": "late", "mismatch": "mismatch", "unknown": "unknown",
        "another applied": "applied",
    }
    # one statement for everything that did not name a refund already in the batch; the rest after it
    assert batcher.batches == [["op-a", "op-m", "op-u", "op-o"], ["op-a"], ["op-b"], ["op-c"]]
    assert [o.completed is not None for o in outcomes] == [True, False, False, False, False, False, True]
    assert outcomes[0].completed.state == "succeeded" and outcomes[-1].completed.state == "failed"

    assert (await find_by_external_ref(db, "m1", "R-1")).state == "succeeded"
    assert [(e["from_state"], e["to_state"]) for e in await refund_events(db, first["refund_id"])] == [
        ("submitted", "succeeded")]
    assert (await find_by_external_ref(db, "m1", "R-2")).state == "submitted"
    assert await refund_events(db, contradicted["refund_id"]) == []
    assert (await find_by_external_ref(db, "m1", "R-3")).state == "failed"
    assert len(await refund_events(db, other["refund_id"])) == 1
    results = {row["operation_number"]: row["result"] for row in await notification_rows(db)}
    assert results == {"op-a": "applied", "op-b": "already", "op-c": "late", "op-m": "mismatch", "op-u": "unknown",
                       "op-o": "applied"}
    warnings = [r.getMessage() for r in caplog.records if "contradicts our record" in r.getMessage()]
    assert warnings == [f"notification op-m for refund {contradicted['refund_id']} contradicts our record "
                        "(refundAmount): not applied"]
    assert [r.operation_number for r in contradiction_errors(caplog)] == ["op-c"]


@pytest.mark.parametrize("field, value", [("reason", "nul\u0000"), ("externalRef", "R-bad\u0000")],
                         ids=["refused-by-the-statement", "refused-by-the-read"])
async def test_a_refund_outcome_postgres_refuses_fails_alone_in_its_batch(database_url, db, merchant, field, value):
    refunds = [await make_refund(db, external_ref=f"R-{i}") for i in range(5)]
    bad_refund = await make_refund(db, external_ref="R-bad")
    bad = parsed(refund_event("refund.failed", bad_refund, "op-bad", **{field: value}))
    good = [parsed(refund_event("refund.succeeded", refund, f"op-{i}")) for i, refund in enumerate(refunds)]
    database = Database(database_url)
    batcher = RecordingRefundBatcher(database, max_inflight=1)
    try:
        results = await asyncio.gather(*(batcher.store("m1", note) for note in [*good[:2], bad, *good[2:]]),
                                       return_exceptions=True)
    finally:
        await database.close()
    assert isinstance(results[2], events_module.Malformed) and results[2].event_type == "refund.failed"
    assert [r.result for i, r in enumerate(results) if i != 2] == ["applied"] * 5
    assert batcher.batches[0] == ["op-0", "op-1", "op-bad", "op-2", "op-3", "op-4"]  # then one by one
    assert sorted(row["operation_number"] for row in await notification_rows(db)) == [f"op-{i}" for i in range(5)]
    assert (await find_by_external_ref(db, "m1", "R-bad")).state == "submitted"
    assert await refund_events(db, bad_refund["refund_id"]) == []
    assert await db.fetchval("SELECT count(*) FROM refund_events") == 5


async def test_a_refund_outcome_postgres_refuses_is_400_among_concurrent_ones(client, db, merchant):
    refunds = [await make_refund(db, external_ref=f"R-{i}") for i in range(6)]
    payloads = [refund_event("refund.succeeded", refund, f"op-{i}") for i, refund in enumerate(refunds)]
    payloads[3]["data"]["reason"] = "nul\u0000"
    responses = await asyncio.gather(*(post(client, "m1", p, merchant.secret_key) for p in payloads))
    assert [r.status for r in responses] == [200, 200, 200, 400, 200, 200]
    assert (await responses[3].json())["error"]["code"] == "malformed"
    assert sorted(row["operation_number"] for row in await notification_rows(db)) == [
        f"op-{i}" for i in (0, 1, 2, 4, 5)]
    assert (await find_by_external_ref(db, "m1", "R-3")).state == "submitted"


@pytest.mark.slow
async def test_a_batch_of_refund_outcomes_that_deadlocks_is_stored_one_by_one(database_url, db, merchant, caplog):
    refunds = sorted([await make_refund(db, external_ref=f"R-{i}") for i in range(2)], key=lambda r: r["refund_id"])
    low, high = refunds
    database = Database(database_url)
    batcher = RecordingRefundBatcher(database, max_inflight=1)
    blocker = await asyncpg.connect(database_url)
    try:
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute("SELECT 1 FROM refunds WHERE refund_id = $1 FOR UPDATE", high["refund_id"])
        # the batch locks the lower id, then waits for the higher one, which the blocker holds
        stored = asyncio.gather(*(batcher.store("m1", parsed(refund_event("refund.succeeded", refund, f"op-{i}")))
                                  for i, refund in enumerate(refunds)))
        for _ in range(200):
            if await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                 " AND datname = current_database()"):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the batch never waited for the refund row")
        # the blocker now waits for the lower id: a cycle, and Postgres undoes the batch's statement
        await blocker.execute("SELECT 1 FROM refunds WHERE refund_id = $1 FOR UPDATE", low["refund_id"])
        await lock.rollback()
        outcomes = await stored
    finally:
        await blocker.close()
        await database.close()
    assert [o.result for o in outcomes] == ["applied", "applied"]
    assert batcher.batches == [["op-0", "op-1"], ["op-0"], ["op-1"]]
    assert any("refund outcome notifications failed as a whole (DeadlockDetectedError); running each alone"
               in r.getMessage() for r in caplog.records)
    for refund in refunds:
        assert (await find_by_external_ref(db, "m1", refund["external_ref"])).state == "succeeded"
        assert len(await refund_events(db, refund["refund_id"])) == 1
    assert len(await notification_rows(db)) == 2
