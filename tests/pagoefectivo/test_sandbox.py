"""The sandbox gateway over real HTTP and a real Postgres, with a real notify-URL receiver.

Requests are built from ``pagoefectivo.protocol`` alone (never the client), so these tests
check the sandbox against the published and modelled formats, not against our own client.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pagoefectivo import protocol
from pagoefectivo.sandbox import SANDBOX, create_app
from refundctl.onboarding import registration
from refundctl.processes import free_port
from tests.helpers import ROOT

NOTIFY = "/pagoefectivo/notifications/{}"


# --- a notify URL that records what it receives --------------------------------------------

@dataclass(frozen=True)
class Received:
    path: str
    headers: dict
    body: bytes

    @property
    def json(self) -> dict:
        return protocol.loads(self.body)


class Receiver:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.answers: list[int] = []  # statuses to answer before 200s
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(Received(request.path, dict(request.headers), await request.read()))
        return web.Response(status=self.answers.pop(0) if self.answers else 200)

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.received) < count:
            assert asyncio.get_running_loop().time() < deadline, f"only {len(self.received)} of {count} arrived"
            await asyncio.sleep(0.02)
        return self.received


@pytest_asyncio.fixture
async def receiver():
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", rec.handle)
    async with TestServer(app) as server:
        rec.url = str(server.make_url("")).rstrip("/")
        yield rec


@pytest_asyncio.fixture
async def gateway(receiver):
    """A sandbox gateway that knows nobody yet; merchants come through onboarding."""
    async with TestClient(TestServer(create_app(notify_base_url=receiver.url))) as client:
        yield client


@pytest.fixture
def make_merchant(make_merchant, gateway, vault):
    """A merchant in our store (for its keys) that is then onboarded with the gateway."""
    async def make(*args, **kwargs):
        keys = await make_merchant(*args, **kwargs)
        response, payload = await call(gateway, "PUT", f"/sandbox/merchants/{keys.merchant.merchant_id}",
                                       registration(keys.merchant, vault))
        assert response.status == 201, payload
        return keys
    return make


@pytest_asyncio.fixture
async def keys(make_merchant):
    """Merchant m1, onboarded after the gateway started."""
    return await make_merchant("m1")


async def record_paid(gateway, transaction: str, amount: str, *, days_ago: float = 1, merchant: str = "m1") -> None:
    """A payment made before this run, recorded with the gateway (no cip.paid)."""
    response, payload = await call(gateway, "POST", "/sandbox/payments", {
        "merchantId": merchant, "transactionId": transaction, "transactionCode": f"ORDER-{transaction}",
        "amount": amount, "currency": "PEN", "paidAt": protocol.lima_timestamp(now() - timedelta(days=days_ago)),
        "notify": False})
    assert response.status == 200, payload


@pytest_asyncio.fixture
async def paid(gateway, keys):
    """A paid 100.00 PEN cash transaction CIP-1 of m1, known to the gateway."""
    await record_paid(gateway, "CIP-1", "100.00")
    return "CIP-1"


# --- helpers --------------------------------------------------------------------------------

def now() -> datetime:
    return datetime.now(timezone.utc)


async def call(client, method: str, path: str, body=None, *, token=None, headers=None):
    sent = {"Content-Type": "application/json", protocol.ORIGIN_HEADER: "web", **(headers or {})}
    if token:
        sent["Authorization"] = f"Bearer {token}"
    response = await client.request(method, path, data=None if body is None else protocol.dumps(body), headers=sent)
    raw = await response.read()
    return response, (protocol.loads(raw) if raw else None)


def auth_body(keys, *, date_request=None, secret=None) -> dict:
    merchant = keys.merchant
    date_request = date_request or protocol.lima_timestamp(now())
    return {"accessKey": merchant.access_key, "idService": merchant.service_id, "dateRequest": date_request,
            "hashString": protocol.auth_hash(merchant.service_id, merchant.access_key, secret or keys.secret_key,
                                             date_request)}


async def token_for(client, keys) -> str:
    response, payload = await call(client, "POST", "/v1/authorizations", auth_body(keys))
    assert response.status == 201, payload
    return payload["data"]["token"]


def refund_body(keys, receiver, *, sign=True, tamper=None, **overrides) -> dict:
    """A signed refund request; ``tamper`` changes fields after signing."""
    fields = {
        "merchantId": keys.merchant.merchant_id, "originalTransactionId": "CIP-1",
        "refundAmount": Decimal("10.50"), "currency": "PEN", "refundReason": "customer returned the item",
        "externalRef": "R-1", "notifyUrl": f"{receiver.url}/refunds", "timestamp": protocol.lima_timestamp(now()),
    }
    fields.update(overrides)
    if sign:
        fields["signature"] = protocol.sign_fields(fields, protocol.load_private_key(keys.private_key_pem))
    fields.update(tamper or {})
    return fields


async def refund(client, token, body):
    return await call(client, "POST", "/v1/refunds", body, token=token)


async def set_chaos(client, **knobs):
    response, payload = await call(client, "POST", "/sandbox/chaos", knobs)
    assert response.status == 200, payload
    return payload


async def ledger(client) -> list[dict]:
    response, payload = await call(client, "GET", "/sandbox/ledger")
    assert response.status == 200
    return payload


def error_fields(payload) -> list[tuple[str, str]]:
    return [(d["code"], d["field"]) for d in payload["data"]]


def assert_signed(note: Received, secret: str) -> None:
    assert note.headers["Content-Type"].startswith("application/json")
    assert protocol.verify_notification(note.body, note.headers[protocol.SIGNATURE_HEADER], secret)


# --- 4.1 authorization --------------------------------------------------------------------

async def test_authorization_issues_a_two_hour_token(gateway, keys):
    response, payload = await call(gateway, "POST", "/v1/authorizations", auth_body(keys))
    assert response.status == 201
    assert (payload["code"], payload["message"]) == ("100", "Solicitud exitosa.")
    data = payload["data"]
    assert 200 <= len(data["token"]) <= 205 and data["codeService"] == "M1X"  # made from merchantId m1
    start, expires = protocol.parse_timestamp(data["tokenStart"]), protocol.parse_timestamp(data["tokenExpires"])
    assert expires - start == timedelta(hours=2)
    assert data["tokenStart"].endswith("-05:00")


async def test_authorization_refuses_bad_hash_stale_date_and_missing_fields(gateway, keys):
    response, payload = await call(gateway, "POST", "/v1/authorizations", auth_body(keys, secret="not-the-secret"))
    assert (response.status, payload["code"]) == (400, "508")

    stale = protocol.lima_timestamp(now() - timedelta(minutes=10))
    response, payload = await call(gateway, "POST", "/v1/authorizations", auth_body(keys, date_request=stale))
    assert (response.status, payload["code"], error_fields(payload)) == (400, "111", [("113", "dateRequest")])

    response, payload = await call(gateway, "POST", "/v1/authorizations", {"accessKey": "AKM1"})
    assert (response.status, payload["code"]) == (400, "111")
    assert {field for _, field in error_fields(payload)} == {"idService", "dateRequest", "hashString"}


# --- 4.2 refunds --------------------------------------------------------------------------

async def test_refund_is_executed_once_and_notified_with_a_valid_signature(gateway, keys, paid, receiver):
    await set_chaos(gateway, sync_status_mix={"success": 1})
    token = await token_for(gateway, keys)
    response, payload = await refund(gateway, token, refund_body(keys, receiver))
    assert response.status == 200, payload
    assert payload["code"] == "100"
    assert payload["data"]["externalRef"] == "R-1" and payload["data"]["status"] == "success"
    refund_id = payload["data"]["refundId"]

    entries = await ledger(gateway)
    assert [(e["merchantId"], e["externalRef"], e["refundAmount"], e["currency"]) for e in entries] == [
        ("m1", "R-1", Decimal("10.50"), "PEN")]
    assert protocol.parse_timestamp(entries[0]["executedAt"])

    [note] = await receiver.wait_for(1)
    assert note.path == "/refunds"
    assert_signed(note, keys.secret_key)
    body = note.json
    assert body["eventType"] == "refund.succeeded" and body["operationNumber"]
    assert body["data"] == {"refundId": refund_id, "externalRef": "R-1", "originalTransactionId": "CIP-1",
                            "refundAmount": Decimal("10.50"), "currency": "PEN", "merchantId": "m1",
                            "status": "success"}


async def test_bad_signature_is_605(gateway, keys, paid, receiver):
    token = await token_for(gateway, keys)
    body = refund_body(keys, receiver, tamper={"refundAmount": Decimal("99.00")})
    response, payload = await refund(gateway, token, body)
    assert (response.status, payload["code"], error_fields(payload)) == (400, "605", [("605", "signature")])
    assert await ledger(gateway) == []


async def test_timestamp_ten_minutes_off_is_606(gateway, keys, paid, receiver):
    token = await token_for(gateway, keys)
    body = refund_body(keys, receiver, timestamp=protocol.lima_timestamp(now() - timedelta(minutes=10)))
    response, payload = await refund(gateway, token, body)
    assert (response.status, payload["code"]) == (400, "606")


async def test_missing_and_invalid_fields_are_112_and_113(gateway, keys, paid, receiver):
    token = await token_for(gateway, keys)
    body = refund_body(keys, receiver)
    del body["notifyUrl"]
    response, payload = await refund(gateway, token, body)
    assert (response.status, payload["code"], error_fields(payload)) == (400, "111", [("112", "notifyUrl")])
    body = refund_body(keys, receiver, refundAmount=Decimal("-1.00"), currency="EUR")
    response, payload = await refund(gateway, token, body)
    assert (response.status, payload["code"]) == (400, "111")
    assert {field for _, field in error_fields(payload)} == {"refundAmount", "currency"}


async def test_unknown_transaction_is_603(gateway, keys, paid, receiver):
    token = await token_for(gateway, keys)
    response, payload = await refund(gateway, token, refund_body(keys, receiver, originalTransactionId="NOPE"))
    assert (response.status, payload["code"]) == (400, "603")


async def test_currency_mismatch_is_113_currency(gateway, keys, paid, receiver):
    token = await token_for(gateway, keys)
    response, payload = await refund(gateway, token, refund_body(keys, receiver, currency="USD"))
    assert (response.status, payload["code"], error_fields(payload)) == (400, "111", [("113", "currency")])


async def test_refund_window_closed_is_602(gateway, keys, receiver):
    await record_paid(gateway, "OLD-1", "50.00", days_ago=100)
    token = await token_for(gateway, keys)
    response, payload = await refund(gateway, token, refund_body(keys, receiver, originalTransactionId="OLD-1"))
    assert (response.status, payload["code"]) == (400, "602")
    assert await ledger(gateway) == []


async def test_refunds_over_the_paid_amount_are_601(gateway, keys, paid, receiver):
    await set_chaos(gateway, sync_status_mix={"success": 1, "pending": 1})
    token = await token_for(gateway, keys)
    first = refund_body(keys, receiver, externalRef="R-1", refundAmount=Decimal("60.00"))
    assert (await refund(gateway, token, first))[0].status == 200
    second = refund_body(keys, receiver, externalRef="R-2", refundAmount=Decimal("40.01"))
    response, payload = await refund(gateway, token, second)
    assert (response.status, payload["code"], error_fields(payload)) == (400, "601", [("601", "refundAmount")])
    last = refund_body(keys, receiver, externalRef="R-3", refundAmount=Decimal("40.00"))
    assert (await refund(gateway, token, last))[0].status == 200  # exactly the rest still fits
    assert [e["externalRef"] for e in await ledger(gateway)] == ["R-1", "R-3"]


async def test_replay_returns_the_first_answer_and_other_parameters_are_604(gateway, keys, paid, receiver):
    await set_chaos(gateway, sync_status_mix={"success": 1})
    token = await token_for(gateway, keys)
    _, first = await refund(gateway, token, refund_body(keys, receiver))
    await asyncio.sleep(0.01)
    response, again = await refund(gateway, token, refund_body(keys, receiver))  # re-signed, new timestamp
    assert response.status == 200 and again["data"] == first["data"]
    assert len(await ledger(gateway)) == 1

    response, payload = await refund(gateway, token, refund_body(keys, receiver, refundAmount=Decimal("11.00")))
    assert (response.status, payload["code"], error_fields(payload)) == (400, "604", [("604", "externalRef")])
    assert len(await ledger(gateway)) == 1
    await receiver.wait_for(1)
    await asyncio.sleep(0.1)
    assert len(receiver.received) == 1  # one execution, one notification


async def test_pending_settles_by_notification_and_status_follows(gateway, keys, paid, receiver):
    await set_chaos(gateway, sync_status_mix={"pending": 1})
    token = await token_for(gateway, keys)
    _, payload = await refund(gateway, token, refund_body(keys, receiver))
    assert payload["data"]["status"] == "pending"
    assert len(await ledger(gateway)) == 1  # pending is executed
    [note] = await receiver.wait_for(1)
    assert note.json["eventType"] == "refund.succeeded" and note.json["data"]["status"] == "success"
    _, status = await call(gateway, "GET", "/v1/refunds/R-1", token=token, headers={protocol.MERCHANT_HEADER: "m1"})
    assert status["data"]["status"] == "success"


async def test_decline_is_not_executed_and_is_notified_as_failed(gateway, keys, paid, receiver):
    await set_chaos(gateway, sync_status_mix={"failure": 1})
    token = await token_for(gateway, keys)
    body = refund_body(keys, receiver, refundAmount=Decimal("100.00"))
    response, payload = await refund(gateway, token, body)
    assert response.status == 200
    assert payload["data"]["status"] == "failure" and payload["data"]["reasonCode"] == "701"
    assert payload["data"]["reason"]
    assert await ledger(gateway) == []
    [note] = await receiver.wait_for(1)
    assert_signed(note, keys.secret_key)
    assert note.json["eventType"] == "refund.failed"
    assert (note.json["data"]["status"], note.json["data"]["code"]) == ("failure", "701")
    await set_chaos(gateway, sync_status_mix={"success": 1})
    other = refund_body(keys, receiver, externalRef="R-2", refundAmount=Decimal("100.00"))
    assert (await refund(gateway, token, other))[0].status == 200  # a decline reserves nothing


async def test_token_of_another_merchant_is_508(gateway, make_merchant, keys, paid, receiver):
    other = await make_merchant("m2")
    token = await token_for(gateway, other)
    response, payload = await refund(gateway, token, refund_body(keys, receiver))
    assert (response.status, payload["code"]) == (400, "508")
    response, payload = await refund(gateway, "not-a-token", refund_body(keys, receiver))
    assert (response.status, payload["code"]) == (400, "508")


# --- 4.3 status ---------------------------------------------------------------------------

async def test_status_lookup_finds_the_refund_or_answers_404(gateway, keys, paid, receiver):
    await set_chaos(gateway, sync_status_mix={"success": 1})
    token = await token_for(gateway, keys)
    _, sent = await refund(gateway, token, refund_body(keys, receiver))
    response, payload = await call(gateway, "GET", "/v1/refunds/R-1", token=token,
                                   headers={protocol.MERCHANT_HEADER: "m1"})
    assert response.status == 200 and payload["data"] == sent["data"]
    response, payload = await call(gateway, "GET", "/v1/refunds/R-404", token=token,
                                   headers={protocol.MERCHANT_HEADER: "m1"})
    assert (response.status, payload["code"]) == (404, "603")
    response, payload = await call(gateway, "GET", "/v1/refunds/R-1", token=token,
                                   headers={protocol.MERCHANT_HEADER: "m2"})
    assert (response.status, payload["code"]) == (400, "508")


# --- 4.5 sandbox payments, chaos ------------------------------------------------------------

async def test_sandbox_payment_sends_a_signed_cip_paid_and_can_be_refunded(gateway, keys, receiver):
    response, payload = await call(gateway, "POST", "/sandbox/payments", {
        "merchantId": "m1", "transactionCode": "ORDER-1", "amount": Decimal("150.50"), "currency": "PEN"})
    assert response.status == 200
    cip = payload["cip"]
    assert isinstance(cip, str) and cip.isdigit()
    [note] = await receiver.wait_for(1)
    assert note.path == NOTIFY.format("m1")
    assert_signed(note, keys.secret_key)
    body = note.json
    assert body["eventType"] == "cip.paid" and body["operationNumber"]
    data = body["data"]
    assert (data["cip"], data["amount"], data["currency"], data["transactionCode"], data["merchantId"],
            data["method"]) == (cip, Decimal("150.50"), "PEN", "ORDER-1", "m1", "cash")
    assert abs(protocol.parse_timestamp(data["paymentDate"]) - now()) < timedelta(minutes=1)

    _, second = await call(gateway, "POST", "/sandbox/payments", {
        "merchantId": "m1", "transactionCode": "ORDER-2", "amount": Decimal("5.00"), "currency": "PEN"})
    assert second["cip"] != cip
    token = await token_for(gateway, keys)  # the CIP is known to the gateway, not (yet) to the database
    response, payload = await refund(gateway, token, refund_body(keys, receiver, originalTransactionId=cip))
    assert response.status == 200, payload


async def test_chaos_errors_execute_nothing(gateway, keys, paid, receiver):
    token = await token_for(gateway, keys)
    await set_chaos(gateway, error_rate=1.0)
    body = refund_body(keys, receiver)
    response, payload = await refund(gateway, token, body)
    assert (response.status, payload["code"]) == (500, "166")
    assert await ledger(gateway) == []
    response, _ = await call(gateway, "GET", "/v1/refunds/R-1", token=token, headers={protocol.MERCHANT_HEADER: "m1"})
    assert response.status == 500
    await set_chaos(gateway, error_rate=0, sync_status_mix={"success": 1})
    assert (await refund(gateway, token, body))[0].status == 200  # the retry goes through, once
    assert len(await ledger(gateway)) == 1


async def test_merchant_rate_limit_is_429_with_retry_after(gateway, keys, paid, receiver):
    token = await token_for(gateway, keys)
    await set_chaos(gateway, merchant_rate_limits={"m1": 2}, sync_status_mix={"success": 1})
    statuses = []
    for index in range(3):
        response, _ = await refund(gateway, token, refund_body(keys, receiver, externalRef=f"R-{index}",
                                                               refundAmount=Decimal("1.00")))
        statuses.append(response.status)
        retry_after = response.headers.get("Retry-After")
    assert statuses == [200, 200, 429]
    assert retry_after is not None and int(retry_after) >= 1
    assert len(await ledger(gateway)) == 2


async def test_random_rate_limit_uses_retry_after_s(gateway, keys, paid, receiver):
    token = await token_for(gateway, keys)
    await set_chaos(gateway, rate_limited_rate=1, retry_after_s=7)
    response, _ = await refund(gateway, token, refund_body(keys, receiver))
    assert (response.status, response.headers["Retry-After"]) == (429, "7")


async def test_lost_answer_after_commit(gateway, keys, paid, receiver):
    token = await token_for(gateway, keys)
    await set_chaos(gateway, timeout_after_commit_rate=1, sync_status_mix={"success": 1})
    with pytest.raises(aiohttp.ClientError):
        await refund(gateway, token, refund_body(keys, receiver))
    assert len(await ledger(gateway)) == 1
    response, payload = await call(gateway, "GET", "/v1/refunds/R-1", token=token,
                                   headers={protocol.MERCHANT_HEADER: "m1"})
    assert response.status == 200 and payload["data"]["status"] == "success"
    await receiver.wait_for(1)


async def test_chaos_merges_keys_and_refuses_unknown_ones(gateway):
    response, config = await call(gateway, "GET", "/sandbox/chaos")
    assert response.status == 200
    assert config["error_rate"] == 0 and config["sync_status_mix"] == {"success": 1, "pending": 1}
    merged = await set_chaos(gateway, latency_ms=5, merchant_rate_limits={"m1": 5})
    assert (merged["latency_ms"], merged["merchant_rate_limits"], merged["error_rate"]) == (5, {"m1": 5}, 0)
    response, payload = await call(gateway, "POST", "/sandbox/chaos", {"no_such_knob": 1})
    assert (response.status, error_fields(payload)) == (400, [("113", "no_such_knob")])
    response, payload = await call(gateway, "POST", "/sandbox/chaos", {"error_rate": 2})
    assert response.status == 400
    _, after = await call(gateway, "GET", "/sandbox/chaos")
    assert after == merged


async def test_by_default_a_notification_gets_one_second_attempt_as_published(gateway, keys, paid, receiver):
    notifier = gateway.app[SANDBOX].notifier
    await set_chaos(gateway, sync_status_mix={"success": 1}, notification_time_scale=0.001)
    assert notifier.retry_delays() == pytest.approx([0.01])  # 10 s after the first, at this scale
    receiver.answers = [503] * 10
    token = await token_for(gateway, keys)
    assert (await refund(gateway, token, refund_body(keys, receiver)))[0].status == 200
    first, second = await receiver.wait_for(2, timeout=5)
    assert (first.body, first.headers[protocol.SIGNATURE_HEADER]) == (second.body, second.headers[protocol.SIGNATURE_HEADER])
    deadline = asyncio.get_running_loop().time() + 5
    while notifier.abandoned == 0 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)
    assert (notifier.abandoned, notifier.delivered, notifier.attempts, len(receiver.received)) == (1, 0, 2, 2)


async def test_notifications_are_retried_until_answered_200(gateway, keys, paid, receiver):
    receiver.answers = [503, 503]
    await set_chaos(gateway, sync_status_mix={"success": 1}, notification_time_scale=0.001, notification_retries=11)
    token = await token_for(gateway, keys)
    assert (await refund(gateway, token, refund_body(keys, receiver)))[0].status == 200
    notes = await receiver.wait_for(3, timeout=5)
    assert len({(n.body, n.headers[protocol.SIGNATURE_HEADER]) for n in notes}) == 1  # the same bytes each time
    assert_signed(notes[-1], keys.secret_key)
    await asyncio.sleep(0.3)
    assert len(receiver.received) == 3 and gateway.app[SANDBOX].notifier.in_flight == 0


async def test_chaos_duplicate_resends_the_same_notification(gateway, keys, paid, receiver):
    await set_chaos(gateway, sync_status_mix={"success": 1}, notification_duplicate_rate=1)
    token = await token_for(gateway, keys)
    await refund(gateway, token, refund_body(keys, receiver))
    first, second = await receiver.wait_for(2)
    assert first.body == second.body
    assert len(await ledger(gateway)) == 1


# --- the process --------------------------------------------------------------------------

async def test_module_serves_until_sigterm():
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REFUNDS_MASTER_KEY")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pagoefectivo.sandbox", "--port", str(port), "--sync-status-mix",
        '{"success": 1, "pending": 3}', cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=15)
        assert line.decode().strip() == f"sandbox listening on http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
            async with http.get(f"http://127.0.0.1:{port}/sandbox/chaos") as response:
                assert (await response.json())["sync_status_mix"] == {"success": 1, "pending": 3}
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(proc.wait(), timeout=10)
        stderr = (await proc.stderr.read()).decode()
    assert returncode == 0, stderr
    assert "Traceback" not in stderr, stderr


# --- field types, tokens ----------------------------------------------------------------------

async def test_wrong_json_types_are_113_in_one_111_answer_naming_every_field(gateway, keys, paid, receiver):
    token = await token_for(gateway, keys)
    body = refund_body(keys, receiver, refundAmount="10.50", refundReason={"text": "x"}, currency="EUR")
    response, payload = await refund(gateway, token, body)
    assert (response.status, payload["code"]) == (400, "111")
    assert sorted(error_fields(payload)) == [("113", "currency"), ("113", "refundAmount"), ("113", "refundReason")]
    response, payload = await call(gateway, "POST", "/v1/authorizations", {**auth_body(keys), "idService": [1]})
    assert (response.status, payload["code"], error_fields(payload)) == (400, "111", [("113", "idService")])


async def test_authorizations_are_counted_and_tokens_can_be_revoked(gateway, keys, paid, receiver):
    state = gateway.app[SANDBOX].state
    token = await token_for(gateway, keys)
    assert state.authorizations["m1"] == 1
    assert state.revoke_tokens("m1") == 1
    response, payload = await refund(gateway, token, refund_body(keys, receiver))
    assert (response.status, payload["code"]) == (400, "508")


# --- notification retry schedule ----------------------------------------------------------

@pytest.mark.slow
async def test_the_long_schedule_knob_retries_over_days_then_abandons(gateway, keys, paid, receiver):
    from pagoefectivo.sandbox.notifier import RETRY_SCHEDULE_S

    notifier = gateway.app[SANDBOX].notifier
    assert RETRY_SCHEDULE_S[0] == 10 and list(RETRY_SCHEDULE_S) == sorted(RETRY_SCHEDULE_S)  # growing delays
    assert sum(RETRY_SCHEDULE_S) > 2 * 86400  # days, as real providers do
    await set_chaos(gateway, sync_status_mix={"success": 1}, notification_time_scale=0.00001, notification_retries=11)
    assert notifier.retry_delays() == pytest.approx([d * 0.00001 for d in RETRY_SCHEDULE_S])
    assert (await call(gateway, "POST", "/sandbox/chaos", {"notification_retries": 12}))[0].status == 400
    receiver.answers = [503] * 100
    token = await token_for(gateway, keys)
    assert (await refund(gateway, token, refund_body(keys, receiver)))[0].status == 200
    attempts = 1 + len(RETRY_SCHEDULE_S)
    notes = await receiver.wait_for(attempts, timeout=10)
    deadline = asyncio.get_running_loop().time() + 5
    while (notifier.abandoned == 0 or notifier.in_flight) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    assert (notifier.abandoned, notifier.delivered, notifier.in_flight) == (1, 0, 0)
    await asyncio.sleep(0.1)
    assert len(receiver.received) == attempts == notifier.attempts
    assert len({(n.body, n.headers[protocol.SIGNATURE_HEADER]) for n in notes}) == 1


# --- source-IP allow list (607) -------------------------------------------------------------

async def test_global_allow_list_answers_607_outside_it(gateway, keys, paid, receiver):
    token = await token_for(gateway, keys)
    await set_chaos(gateway, allowed_ips="10.0.0.0/8, 192.168.1.7")
    config = (await call(gateway, "GET", "/sandbox/chaos"))[1]
    assert config["allowed_ips"] == ["10.0.0.0/8", "192.168.1.7/32"]
    response, payload = await refund(gateway, token, refund_body(keys, receiver))
    assert (response.status, payload["code"]) == (403, "607")
    response, payload = await call(gateway, "POST", "/v1/authorizations", auth_body(keys))
    assert (response.status, payload["code"]) == (403, "607")
    response, payload = await call(gateway, "GET", "/v1/refunds/R-1", token=token,
                                   headers={protocol.MERCHANT_HEADER: "m1"})
    assert (response.status, payload["code"]) == (403, "607")
    assert await ledger(gateway) == []
    await set_chaos(gateway, allowed_ips=["127.0.0.0/8", "::1"], sync_status_mix={"success": 1})
    response, payload = await refund(gateway, token, refund_body(keys, receiver))
    assert response.status == 200, payload
    response, payload = await call(gateway, "POST", "/sandbox/chaos", {"allowed_ips": ["10.0.0.300/8"]})
    assert (response.status, error_fields(payload)) == (400, [("113", "allowed_ips")])


async def test_merchant_allow_list_applies_to_that_merchant_only(gateway, make_merchant, keys, paid, receiver):
    other = await make_merchant("m2")
    await set_chaos(gateway, merchant_allowed_ips={"m1": ["10.0.0.0/8"]})
    response, payload = await call(gateway, "POST", "/v1/authorizations", auth_body(keys))
    assert (response.status, payload["code"], error_fields(payload)) == (403, "607", [("607", None)])
    assert (await call(gateway, "POST", "/v1/authorizations", auth_body(other)))[0].status == 201
    await set_chaos(gateway, merchant_allowed_ips={"m1": ["127.0.0.1/32"]})
    assert (await call(gateway, "POST", "/v1/authorizations", auth_body(keys)))[0].status == 201


def test_allowed_ips_flag_takes_cidrs():
    from pagoefectivo.sandbox.cli import build_parser, chaos_from_args

    parser = build_parser()
    args = parser.parse_args(["--allowed-ips", "10.0.0.0/8,127.0.0.1", "--notification-time-scale", "0.001",
                              "--merchant-allowed-ips", '{"m1": ["192.168.0.0/16"]}'])
    config = chaos_from_args(parser, args)
    assert config.allowed_ips == ("10.0.0.0/8", "127.0.0.1/32")
    assert config.merchant_allowed_ips == {"m1": ("192.168.0.0/16",)}
    assert config.notification_time_scale == 0.001
    with pytest.raises(SystemExit):
        chaos_from_args(parser, parser.parse_args(["--allowed-ips", "not-an-ip"]))


def test_allow_list_matching():
    from pagoefectivo.sandbox.allowlist import parse_cidrs, permits

    cidrs = parse_cidrs(["10.0.0.0/8", "2001:db8::/32"])
    assert permits((), None) and permits((), "203.0.113.9")
    assert permits(cidrs, "10.1.2.3") and permits(cidrs, "::ffff:10.1.2.3") and permits(cidrs, "2001:db8::1")
    assert not permits(cidrs, "11.0.0.1") and not permits(cidrs, None) and not permits(cidrs, "garbage")


# --- no chaos, no cost ------------------------------------------------------------------------

async def test_knobs_at_zero_never_sleep(gateway, keys, paid, receiver, monkeypatch):
    """With every fault knob at zero the request path and deliveries do not sleep at all."""
    real_sleep = asyncio.sleep
    sleeps = []

    async def recording_sleep(delay, *args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("pagoefectivo.sandbox"):
            sleeps.append((caller, delay))
        return await real_sleep(delay, *args, **kwargs)

    await set_chaos(gateway, sync_status_mix={"success": 1})
    monkeypatch.setattr(asyncio, "sleep", recording_sleep)
    token = await token_for(gateway, keys)
    for index in range(3):
        response, _ = await refund(gateway, token, refund_body(keys, receiver, externalRef=f"R-{index}",
                                                               refundAmount=Decimal("1.00")))
        assert response.status == 200
    await call(gateway, "GET", "/v1/refunds/R-1", token=token, headers={protocol.MERCHANT_HEADER: "m1"})
    await receiver.wait_for(3)
    assert sleeps == []


# --- seed file --------------------------------------------------------------------------------

KEY_PEM = (ROOT / "tests" / "fixtures" / "merchant_test_key.pem").read_bytes()


def seed_document(notify_url: str) -> dict:
    return {
        "merchants": [
            {"merchantId": "s1", "env": "sandbox", "serviceId": 4001, "accessKey": "AKS1", "secretKey": "seed-secret",
             "publicKeyPem": protocol.public_key_pem(KEY_PEM), "notifyUrl": notify_url},
            {"merchantId": "p1", "env": "production", "serviceId": 4002, "accessKey": "AKP1",
             "secretKey": "prod-secret", "publicKeyPem": protocol.public_key_pem(KEY_PEM)},
        ],
        "payments": [
            {"merchantId": "s1", "transactionId": "CIP-1", "amount": "100.00", "currency": "PEN",
             "paidAt": protocol.lima_timestamp(now() - timedelta(days=1))},
            {"merchantId": "s1", "transactionId": "CIP-OLD", "amount": 20, "currency": "USD",
             "method": "bank_transfer", "paidAt": "2020-01-01T10:00:00-05:00"},
        ],
    }


def seed_keys(merchant_id="s1", service_id=4001, access_key="AKS1", secret="seed-secret"):
    from types import SimpleNamespace

    return SimpleNamespace(merchant=SimpleNamespace(merchant_id=merchant_id, service_id=service_id,
                                                    access_key=access_key),
                           secret_key=secret, private_key_pem=KEY_PEM)


async def test_seeded_sandbox_needs_no_database(receiver, tmp_path):
    from pagoefectivo.sandbox import load_seed

    path = tmp_path / "seed.json"
    path.write_bytes(protocol.dumps(seed_document(f"{receiver.url}/hooks/s1")))
    keys = seed_keys()
    app = create_app(seed=load_seed(path))
    async with TestClient(TestServer(app)) as gateway:
        await set_chaos(gateway, sync_status_mix={"success": 1})
        token = await token_for(gateway, keys)
        response, payload = await refund(gateway, token, refund_body(keys, receiver, merchantId="s1"))
        assert response.status == 200, payload
        [note] = await receiver.wait_for(1)
        assert note.path == "/refunds" and note.json["data"]["merchantId"] == "s1"
        assert_signed(note, "seed-secret")
        response, payload = await refund(gateway, token, refund_body(
            keys, receiver, merchantId="s1", externalRef="R-2", originalTransactionId="CIP-OLD", currency="USD"))
        assert (response.status, payload["code"]) == (400, "602")
        response, payload = await refund(gateway, token, refund_body(
            keys, receiver, merchantId="s1", externalRef="R-3", originalTransactionId="NOPE"))
        assert (response.status, payload["code"]) == (400, "603")
        # a production merchant in the seed is not known to a sandbox gateway
        prod = seed_keys("p1", 4002, "AKP1", "prod-secret")
        response, payload = await call(gateway, "POST", "/v1/authorizations", auth_body(prod))
        assert (response.status, payload["code"]) == (400, "508")
        # cip.paid goes to the seeded notify URL
        _, paid_payload = await call(gateway, "POST", "/sandbox/payments", {
            "merchantId": "s1", "transactionCode": "O-1", "amount": "5.00", "currency": "PEN"})
        notes = await receiver.wait_for(2)
        assert notes[1].path == "/hooks/s1" and notes[1].json["data"]["cip"] == paid_payload["cip"]


async def test_seeded_merchant_allow_list(receiver):
    from pagoefectivo.sandbox.seed import parse_seed

    document = seed_document(f"{receiver.url}/hooks/s1")
    document["merchants"][0]["allowedIps"] = ["10.9.0.0/16"]
    async with TestClient(TestServer(create_app(seed=parse_seed(document)))) as gateway:
        response, payload = await call(gateway, "POST", "/v1/authorizations", auth_body(seed_keys()))
        assert (response.status, payload["code"]) == (403, "607")


@pytest.mark.parametrize("change, place", [
    (lambda d: d["merchants"][0].update(serviceId=-1), "merchants[0].serviceId"),
    (lambda d: d["merchants"][0].update(publicKeyPem="nope"), "merchants[0].publicKeyPem"),
    (lambda d: d["merchants"][0].pop("secretKey"), "merchants[0].secretKey"),
    (lambda d: d["merchants"][1].update(env="staging"), "merchants[1].env"),
    (lambda d: d["merchants"][1].update(merchantId="s1"), "merchants[1].merchantId"),
    (lambda d: d["merchants"][0].update(allowedIps=["300.1.1.1"]), "merchants[0].allowedIps"),
    (lambda d: d["payments"][0].update(amount="10.005"), "payments[0].amount"),
    (lambda d: d["payments"][0].update(merchantId="ghost"), "payments[0].merchantId"),
    (lambda d: d["payments"][1].update(paidAt="2020-01-01T10:00:00"), "payments[1].paidAt"),
    (lambda d: d["payments"][1].update(transactionId="CIP-1", currency="PEN"), "payments[1].transactionId"),
    (lambda d: d.update(extra=[]), "unknown key"),
])
def test_seed_errors_name_their_place(change, place):
    from pagoefectivo.sandbox.seed import SeedError, parse_seed

    document = seed_document("https://example.test/n")
    change(document)
    with pytest.raises(SeedError, match=place.replace("[", r"\[").replace("]", r"\]")):
        parse_seed(document)


async def test_module_serves_a_seed_without_database_or_master_key(tmp_path):
    seed_file = tmp_path / "seed.json"
    seed_file.write_bytes(protocol.dumps(seed_document("https://example.test/n")))
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REFUNDS_MASTER_KEY", "REFUNDS_MASTER_KEY_FILE")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pagoefectivo.sandbox", "--port", str(port), "--seed", str(seed_file),
        "--allowed-ips", "127.0.0.1/32", cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=15)
        assert line.decode().strip() == f"sandbox listening on http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/sandbox/chaos") as response:
                assert (await response.json())["allowed_ips"] == ["127.0.0.1/32"]
            async with http.post(f"http://127.0.0.1:{port}/v1/authorizations",
                                 data=protocol.dumps(auth_body(seed_keys())),
                                 headers={"Content-Type": "application/json"}) as response:
                assert response.status == 201
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(proc.wait(), timeout=10)
        stderr = (await proc.stderr.read()).decode()
    assert returncode == 0, stderr
    assert "seed-secret" not in stderr


def test_module_reports_a_bad_seed_in_one_line(tmp_path):
    import subprocess

    seed_file = tmp_path / "seed.json"
    seed_file.write_text('{"merchants": [{"merchantId": "s1"}]}')
    run = subprocess.run([sys.executable, "-m", "pagoefectivo.sandbox", "--seed", str(seed_file)], cwd=ROOT,
                         capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "merchants[0].env" in run.stderr, run.stderr


# --- onboarding: the gateway's own registry ----------------------------------------------------

async def test_a_merchant_unknown_to_the_gateway_cannot_authorize_until_onboarded(gateway, merchant_maker, vault):
    """Ours alone is not enough: the gateway has its own registry, so a merchant we created
    but never onboarded is refused, as PagoEfectivo would refuse it."""
    keys = await merchant_maker("m1")
    response, payload = await call(gateway, "POST", "/v1/authorizations", auth_body(keys))
    assert (response.status, payload["code"]) == (400, "508")
    response, payload = await call(gateway, "PUT", "/sandbox/merchants/m1", registration(keys.merchant, vault))
    assert response.status == 201, payload
    assert "secretKey" not in payload and payload["serviceId"] == keys.merchant.service_id
    assert (await call(gateway, "GET", "/sandbox/merchants/m1"))[1] == payload
    assert (await call(gateway, "POST", "/v1/authorizations", auth_body(keys)))[0].status == 201


async def test_re_registering_rotates_the_secret_and_ends_tokens_issued_under_the_old_one(gateway, keys, vault,
                                                                                          paid, receiver):
    old_token = await token_for(gateway, keys)
    changed = {**registration(keys.merchant, vault), "secretKey": "rotated-secret"}
    response, _ = await call(gateway, "PUT", "/sandbox/merchants/m1", changed)
    assert response.status == 200
    response, payload = await refund(gateway, old_token, refund_body(keys, receiver))
    assert payload["code"] == "508"
    response, payload = await call(gateway, "POST", "/v1/authorizations", auth_body(keys))
    assert payload["code"] == "508"  # the old secret no longer authorizes
    response, payload = await call(gateway, "POST", "/v1/authorizations", auth_body(keys, secret="rotated-secret"))
    assert response.status == 201, payload


@pytest.mark.parametrize("change, field", [
    ({"env": "production"}, "sandbox merchants only"),
    ({"publicKeyPem": "nope"}, "merchant.publicKeyPem"),
    ({"serviceId": 0}, "merchant.serviceId"),
    ({"merchantId": "other"}, "merchant.merchantId"),
    ({"notifyUrl": "ftp://x"}, "merchant.notifyUrl"),
    ({"surprise": 1}, "unknown key"),
])
async def test_onboarding_refuses_a_bad_registration_naming_what_is_wrong(gateway, merchant_maker, vault, change,
                                                                          field):
    keys = await merchant_maker("m1")
    response, payload = await call(gateway, "PUT", "/sandbox/merchants/m1",
                                   {**registration(keys.merchant, vault), **change})
    assert (response.status, payload["code"]) == (400, "111")
    assert field in payload["data"][0]["message"]
    assert (await call(gateway, "GET", "/sandbox/merchants/m1"))[0].status == 404  # nothing half-registered


async def test_a_payment_recorded_with_its_id_is_told_once_and_a_different_one_is_refused(gateway, keys, receiver):
    body = {"merchantId": "m1", "transactionId": "PAST-1", "transactionCode": "O-1", "amount": "40.00",
            "currency": "PEN", "paidAt": protocol.lima_timestamp(now() - timedelta(days=3))}
    first = await call(gateway, "POST", "/sandbox/payments", body)
    again = await call(gateway, "POST", "/sandbox/payments", body)
    assert first[1] == again[1] == {"cip": "PAST-1"}
    [note] = await receiver.wait_for(1)  # one cip.paid, for the first
    assert note.json["data"]["cip"] == "PAST-1"
    await asyncio.sleep(0.1)
    assert len(receiver.received) == 1
    response, payload = await call(gateway, "POST", "/sandbox/payments", {**body, "amount": "41.00"})
    assert (response.status, error_fields(payload)) == (400, [("113", "transactionId")])
    response, payload = await call(gateway, "POST", "/sandbox/payments",
                                   {**body, "transactionId": "FUTURE", "paidAt": protocol.lima_timestamp(
                                       now() + timedelta(days=1))})
    assert (response.status, error_fields(payload)) == (400, [("113", "paidAt")])


@pytest.mark.slow
async def test_refundctl_sandbox_serve_closes_a_half_sent_request_at_the_header_deadline():
    """`refundctl sandbox serve` runs on the services' guarded server: a request line that never
    ends is closed at HTTP_HEADER_TIMEOUT, and the gateway keeps answering others."""
    from tests.served import half_sent_is_closed, once, process

    port = free_port()
    env = {**os.environ, "HTTP_HEADER_TIMEOUT": "1"}
    async with process("refundctl", env, "sandbox", "serve", "--port", str(port)):
        await half_sent_is_closed(port)  # fails if the server never closes it
        assert b" 200 " in (await once(port, "/healthz")).split(b"\r\n", 1)[0]


async def test_a_notification_waiting_for_its_turn_has_not_timed_out():
    """Attempts beyond the notifier's connections wait their turn; each attempt's timeout runs
    from its start. Eight notifications at once through one connection to a receiver that takes
    0.1 s each: the last starts after 0.7 s, past its 0.5 s timeout, and is delivered first time."""
    from pagoefectivo.sandbox.chaos import Chaos
    from pagoefectivo.sandbox.notifier import Notifier

    started = []

    async def slow(request):
        started.append(asyncio.get_running_loop().time())
        await request.read()
        await asyncio.sleep(0.1)
        return web.json_response({"result": "applied"})

    app = web.Application()
    app.router.add_post("/notify", slow)
    async with TestServer(app) as server:
        notifier = Notifier(Chaos(), attempt_timeout=0.5, connections=1)
        await notifier.start()
        try:
            for n in range(8):
                notifier.send(str(server.make_url("/notify")), "m1",
                              {"eventType": "refund.succeeded", "operationNumber": f"op-{n}"}, "secret")
            deadline = asyncio.get_running_loop().time() + 5
            while notifier.delivered + notifier.abandoned < 8 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
        finally:
            await notifier.close()
    assert (notifier.delivered, notifier.abandoned, notifier.attempts) == (8, 0, 8)
    assert started[-1] - started[0] >= 0.65  # one at a time: the last waited past its timeout, unsent
