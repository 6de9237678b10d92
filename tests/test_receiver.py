"""The notify_url receiver against a real Postgres: signatures, limits, exactly-once application."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from pagoefectivo.protocol import SIGNATURE_HEADER, dumps, notification_signature
from receiver import MAX_BODY, create_app
from receiver import events as events_module
from refunds.payments import find_payment, record_payment
from refunds.records import find_by_external_ref, refund_events
from refunds.vault import Vault

ROOT = Path(__file__).resolve().parent.parent
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


@pytest.mark.parametrize("merchant_id", ["nobody", "bad%20id", "x" * 65])
async def test_unknown_merchant_is_404_revealing_nothing(client, db, merchant, merchant_id):
    response = await post(client, merchant_id, cip_paid(), merchant.secret_key)
    assert response.status == 404
    assert await response.json() == {"error": "not found"}


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


async def test_late_refund_failed_after_succeeded_changes_nothing(client, db, merchant):
    refund = await make_refund(db)
    ok = await post(client, "m1", refund_event("refund.succeeded", refund, "op-a"), merchant.secret_key)
    assert ok.status == 200
    before = counted("refund.failed", "duplicate")
    late = await post(client, "m1", refund_event("refund.failed", refund, "op-b"), merchant.secret_key)
    assert late.status == 200
    stored = await find_by_external_ref(db, "m1", "R-1")
    assert stored.state == "succeeded"
    assert (await find_payment(db, "m1", refund["transaction_id"])).refunded_amount == Decimal("40.00")
    results = {row["operation_number"]: row["result"] for row in await notification_rows(db)}
    assert results == {"op-a": "applied", "op-b": "late"}
    assert len(await refund_events(db, refund["refund_id"])) == 1
    assert counted("refund.failed", "duplicate") == before + 1


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
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert 'refund_notifications_total{event_type="cip.paid",result="applied"}' in text
    assert "refund_notification_seconds_bucket" in text


async def test_postgres_unreachable_is_503_so_the_sender_retries(vault):
    app = create_app(database_url="postgresql://postgres@127.0.0.1:1/x", vault=vault)
    async with TestClient(TestServer(app)) as client:  # starting must not fail
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 503
        response = await post(client, "m1", cip_paid(), "whatever")
        assert response.status == 503
        await asyncio.sleep(1.1)  # past the reconnect back-off: it really tries again
        assert (await post(client, "m1", cip_paid(), "whatever")).status == 503


async def test_connection_lost_while_applying_is_503(client, db, merchant, monkeypatch):
    async def lose_connection(conn, merchant_id, note):
        raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation")

    monkeypatch.setattr(events_module, "store_and_apply", lose_connection)
    response = await post(client, "m1", cip_paid(), merchant.secret_key)
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


async def test_the_process_serves_and_stops_on_sigterm(database_url, master_key):
    port = _free_port()
    env = _env(DATABASE_URL=database_url, REFUNDS_MASTER_KEY=master_key, RECEIVER_PORT=str(port),
               RECEIVER_HOST="127.0.0.1")
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
