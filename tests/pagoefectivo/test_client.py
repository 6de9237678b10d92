"""The PagoEfectivo client against the running sandbox (and, for what the sandbox never
answers, a tiny HTTP server): what each answer becomes in ``pagoefectivo.errors``, and what
the worker then does with the refund (``workers.sender.process_refund``).

``workers`` is imported lazily: importing it sets up the dramatiq broker, which needs
REDIS_URL (set by the ``database_url`` fixture).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import re
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.abc import AbstractResolver
from prometheus_client import REGISTRY

from pagoefectivo import client as client_module
from pagoefectivo import protocol
from pagoefectivo.client import Credentials, PagoEfectivoClient, RefundOrder
from pagoefectivo.errors import (
    ClockSkew, EnvironmentMismatch, GatewayError, OutcomeUnknown, PermanentError, RateLimited, TransientError,
)
from refunds.payments import find_payment
from refundctl.processes import free_port
from refunds.records import find_refund, refund_events
from refunds.settings import DEFAULT_BASE_URLS
from tests.stack import CLIENT_TIMEOUT as TIMEOUT
from tests.stack import RunningStack, chaos, process_refund, serve, start_stack
from refundctl.onboarding import record_paid
from tests.helpers import FIXTURES, paid


class RequestCounter:
    """Counts the requests an aiohttp session actually writes (a TraceConfig): one that timed out
    waiting for a connection was never sent, and the client may send it again."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.trace = aiohttp.TraceConfig()
        self.trace.on_request_headers_sent.append(self._sent)

    async def _sent(self, session, context, params) -> None:
        self.requests.append((params.method, params.url.path))

    def count(self, method: str, path_prefix: str) -> int:
        return sum(1 for m, p in self.requests if m == method and p.startswith(path_prefix))


@dataclass
class Stack:
    res: object  # workers.resources.Resources
    sandbox_url: str
    http: aiohttp.ClientSession
    app: web.Application
    sent: RequestCounter
    running: RunningStack

    async def paid(self, db, *args, **kwargs):
        return await self.running.paid(db, *args, **kwargs)

    @property
    def client(self) -> PagoEfectivoClient:
        return self.res.client

    @property
    def sandbox(self):
        from pagoefectivo.sandbox import SANDBOX

        return self.app[SANDBOX]

    async def chaos(self, **knobs) -> None:
        await chaos(self.http, self.sandbox_url, **knobs)

    async def ledger(self) -> list[dict]:
        async with self.http.get(f"{self.sandbox_url}/sandbox/ledger") as response:
            return protocol.loads(await response.read())


@pytest_asyncio.fixture
async def stack(db, database_url, redis_url, vault, monkeypatch):
    """The shared stack (tests/stack.py), with every request of the worker's client counted."""
    sent = RequestCounter()
    async with start_stack(database_url, redis_url, vault, monkeypatch, trace_configs=[sent.trace]) as running:
        yield Stack(running.res, running.sandbox_url, running.http, running.sandbox_app, sent, running)


@pytest.fixture
def make_merchant(make_merchant, stack):
    """Merchants made in these tests are onboarded with the sandbox gateway too."""
    return stack.running.onboarded(make_merchant)


@pytest_asyncio.fixture
async def merchant(make_merchant):
    """m1 with a rate limit high enough that the worker's own limiter never interferes."""
    return await make_merchant("m1", rate_limit=Decimal(1000))


def creds_of(keys) -> Credentials:
    m = keys.merchant
    return Credentials(merchant_id=m.merchant_id, env=m.env, service_id=m.service_id, access_key=m.access_key,
                       secret_key=keys.secret_key, private_key_pem=keys.private_key_pem)



def order(stack: Stack, external_ref="R-1", amount="25.00", **overrides) -> RefundOrder:
    fields = dict(merchant_id="m1", original_transaction_id="CIP-9", amount=Decimal(amount), currency="PEN",
                  external_ref=external_ref, notify_url=f"{stack.res.settings.refunds_notify_url}/n/m1",
                  reason="returned")
    fields.update(overrides)
    return RefundOrder(**fields)


async def accepted_refund(stack: Stack | None, db, external_ref="R-1", amount="25.00"):
    """A refund of CIP-9, accepted; the payment known to both parties, or to ours alone
    without a ``stack``."""
    from producers import enqueue_refund

    await (stack.paid if stack is not None else paid)(db, transaction="CIP-9")
    result = await enqueue_refund(db, merchant_id="m1", original_transaction_id="CIP-9", amount=amount,
                                  currency="PEN", external_ref=external_ref)
    return result.refund


async def assert_failed_with(db, stack: Stack, refund_id, code: str) -> None:
    refund = await find_refund(db, refund_id)
    assert (refund.state, refund.provider_code) == ("failed", code), refund
    assert (await find_payment(db, "m1", "CIP-9")).refunded_amount == Decimal("0.00")  # the amount is free again
    assert [e for e in await stack.ledger() if e["externalRef"] == refund.external_ref] == []


async def assert_worker_fails_a_refund_with(db, stack: Stack, code: str) -> None:
    """The worker's side of a malformed request: a refund accepted now, once processed, is failed with ``code``."""
    refund = await accepted_refund(stack, db)
    await process_refund(stack.res, refund.refund_id)
    await assert_failed_with(db, stack, refund.refund_id, code)


async def assert_retry_scheduled(db, refund_id, *, at_least_s: float = 0.0) -> None:
    refund = await find_refund(db, refund_id)
    assert refund.state == "submitted" and refund.claimed_until is None, refund
    assert refund.delivered_at > datetime.now(timezone.utc) + timedelta(seconds=at_least_s)


def change_orders(stack: Stack, monkeypatch, **changes) -> None:
    """Make the worker's client sign and send orders with ``changes`` (what the gateway will see)."""
    original = stack.client.request_refund

    async def changed(creds, refund_order, **options):
        return await original(creds, dataclasses.replace(refund_order, **changes), **options)

    monkeypatch.setattr(stack.client, "request_refund", changed)


def corrupt_requests(stack: Stack, monkeypatch, change) -> None:
    """Make the worker's client send refund bodies changed by ``change`` (a client bug)."""
    original = stack.client.signed_refund_body

    def corrupted(creds, refund_order):
        body = original(creds, refund_order)
        change(body)
        return body

    monkeypatch.setattr(stack.client, "signed_refund_body", corrupted)


# --- tokens -------------------------------------------------------------------------------------

async def test_twenty_concurrent_callers_share_one_authorization(stack, merchant):
    creds = creds_of(merchant)
    tokens = await asyncio.gather(*(stack.client.token(creds) for _ in range(20)))
    assert len(set(tokens)) == 1
    assert stack.sandbox.state.authorizations["m1"] == 1
    assert await stack.client.token(creds) == tokens[0]  # cached
    assert stack.sandbox.state.authorizations["m1"] == 1


async def test_token_is_refreshed_five_minutes_before_expiry(stack, merchant):
    creds = creds_of(merchant)
    first = await stack.client.token(creds)
    cached = stack.client._tokens["m1"]
    assert timedelta(hours=1, minutes=59) < cached.expires - datetime.now(timezone.utc) <= timedelta(hours=2)
    cached.expires = datetime.now(timezone.utc) + timedelta(minutes=6)  # time passes...
    assert await stack.client.token(creds) == first  # 6 minutes left: still used
    cached.expires = datetime.now(timezone.utc) + timedelta(minutes=4)
    assert await stack.client.token(creds) != first  # 4 minutes left: refreshed
    assert stack.sandbox.state.authorizations["m1"] == 2


async def test_508_drops_the_token_refreshes_once_and_retries_once(db, stack, merchant):
    await stack.paid(db, transaction="CIP-9")
    await stack.chaos(sync_status_mix={"success": 1})
    creds = creds_of(merchant)
    await stack.client.token(creds)
    assert stack.sandbox.state.revoke_tokens("m1") == 1
    answer = await stack.client.request_refund(creds, order(stack))
    assert answer.status == "success"
    assert stack.sandbox.state.authorizations["m1"] == 2
    assert stack.sent.count("POST", "/v1/refunds") == 2  # the refused one and the retry
    assert len(await stack.ledger()) == 1


async def test_concurrent_callers_refused_with_the_same_token_share_one_refresh(db, stack, merchant):
    creds = creds_of(merchant)
    await stack.client.token(creds)
    stack.sandbox.state.revoke_tokens()
    answers = await asyncio.gather(*(stack.client.refund_status(creds, f"R-{i}") for i in range(8)))
    assert answers == [None] * 8  # never seen: None, not an error
    assert stack.sandbox.state.authorizations["m1"] == 2


async def test_508_that_survives_the_refresh_is_permanent_and_fails_the_refund(db, stack, merchant, monkeypatch):
    refund = await accepted_refund(stack, db)
    monkeypatch.setattr(stack.sandbox.state, "token_grant", lambda token, now: None)  # every token refused
    with pytest.raises(PermanentError) as caught:
        await stack.client.request_refund(creds_of(merchant), order(stack, external_ref="R-direct"))
    assert (caught.value.code, caught.value.http_status) == ("508", 400)  # at 400, as the document lists it
    assert stack.sandbox.state.authorizations["m1"] == 2  # one refresh
    assert stack.sent.count("POST", "/v1/refunds") == 2  # one retry
    await process_refund(stack.res, refund.refund_id)
    await assert_failed_with(db, stack, refund.refund_id, "508")


async def test_bad_credentials_are_508_at_authorization(stack, merchant):
    wrong = Credentials(**{**creds_of(merchant).__dict__, "secret_key": "not-the-secret"})
    with pytest.raises(PermanentError) as caught:
        await stack.client.token(wrong)
    assert (caught.value.code, caught.value.field) == ("508", "hashString")


# --- 111 with 112 / 113 inside: the request is malformed ------------------------------------------

async def test_111_wrong_type(db, stack, merchant, monkeypatch):
    await stack.paid(db, transaction="CIP-9")
    with pytest.raises(PermanentError) as caught:
        await stack.client.request_refund(creds_of(merchant), order(stack, reason=["not", "text"]))
    assert (caught.value.code, caught.value.field, caught.value.http_status) == ("111", "refundReason", 400)
    assert caught.value.message == "Solicitud con datos inválidos. refundReason: Valor invalido."
    corrupt_requests(stack, monkeypatch, lambda body: body.update(refundAmount="25.00"))
    await assert_worker_fails_a_refund_with(db, stack, "111")


async def test_112_required(db, stack, merchant, monkeypatch):
    await stack.paid(db, transaction="CIP-9")
    with pytest.raises(PermanentError) as caught:
        await stack.client.request_refund(creds_of(merchant), order(stack, notify_url=""))
    assert (caught.value.code, caught.value.field) == ("111", "notifyUrl")
    assert caught.value.details == [{"code": "112", "message": "Requerido.", "field": "notifyUrl"}]
    corrupt_requests(stack, monkeypatch, lambda body: body.pop("originalTransactionId"))
    await assert_worker_fails_a_refund_with(db, stack, "111")


async def test_113_invalid_value(db, stack, merchant, monkeypatch):
    await stack.paid(db, transaction="CIP-9")
    with pytest.raises(PermanentError) as caught:
        await stack.client.request_refund(creds_of(merchant), order(stack, currency="EUR"))
    assert (caught.value.code, caught.value.field) == ("111", "currency")
    assert caught.value.details == [{"code": "113", "message": "Valor invalido.", "field": "currency"}]
    change_orders(stack, monkeypatch, currency="USD")  # not what was paid
    await assert_worker_fails_a_refund_with(db, stack, "111")


# --- 601-607 -------------------------------------------------------------------------------------

async def test_601_amount_over_refundable(db, stack, merchant):
    refund = await accepted_refund(stack, db, amount="25.00")
    await stack.chaos(sync_status_mix={"success": 1})
    creds = creds_of(merchant)
    await stack.client.request_refund(creds, order(stack, external_ref="ELSEWHERE", amount="80.00"))
    with pytest.raises(PermanentError) as caught:
        await stack.client.request_refund(creds, order(stack, external_ref="R-direct", amount="20.01"))
    assert (caught.value.code, caught.value.field) == ("601", "refundAmount")
    await process_refund(stack.res, refund.refund_id)
    await assert_failed_with(db, stack, refund.refund_id, "601")


async def test_602_refund_window_closed(db, stack, merchant):
    """The gateway's record says paid 100 days ago; ours says today (the two parties disagree)."""
    await record_paid(stack.http, stack.sandbox_url, merchant_id="m1", transaction_id="CIP-9", amount=Decimal("100.00"),
                      currency="PEN", method="cash", paid_at=datetime.now(timezone.utc) - timedelta(days=100))
    refund = await accepted_refund(stack, db)
    with pytest.raises(PermanentError) as caught:
        await stack.client.request_refund(creds_of(merchant), order(stack, external_ref="R-direct"))
    assert (caught.value.code, caught.value.field) == ("602", "originalTransactionId")
    await process_refund(stack.res, refund.refund_id)
    await assert_failed_with(db, stack, refund.refund_id, "602")


async def test_603_transaction_unknown_to_the_gateway(db, stack, merchant):
    """We hold a payment the gateway never recorded."""
    refund = await accepted_refund(None, db)  # ours alone
    with pytest.raises(PermanentError) as caught:
        await stack.client.request_refund(creds_of(merchant), order(stack, external_ref="R-direct"))
    assert (caught.value.code, caught.value.field) == ("603", "originalTransactionId")
    await process_refund(stack.res, refund.refund_id)
    await assert_failed_with(db, stack, refund.refund_id, "603")


async def test_604_external_ref_reused_with_other_parameters(db, stack, merchant):
    refund = await accepted_refund(stack, db, external_ref="R-1", amount="25.00")
    await stack.chaos(sync_status_mix={"success": 1})
    creds = creds_of(merchant)
    first = await stack.client.request_refund(creds, order(stack, external_ref="R-1", amount="30.00"))
    again = await stack.client.request_refund(creds, order(stack, external_ref="R-1", amount="30.00"))
    assert again == first  # the same parameters: the first answer again
    with pytest.raises(PermanentError) as caught:
        await stack.client.request_refund(creds, order(stack, external_ref="R-1", amount="25.00"))
    assert (caught.value.code, caught.value.field) == ("604", "externalRef")
    await process_refund(stack.res, refund.refund_id)
    failed = await find_refund(db, refund.refund_id)
    assert (failed.state, failed.provider_code) == ("failed", "604")
    assert [e["refundAmount"] for e in await stack.ledger()] == [Decimal("30.00")]  # only the other one


async def test_605_signature_invalid(db, stack, merchant, monkeypatch):
    refund = await accepted_refund(stack, db)
    corrupt_requests(stack, monkeypatch, lambda body: body.update(refundReason="changed after signing"))
    with pytest.raises(PermanentError) as caught:
        await stack.client.request_refund(creds_of(merchant), order(stack, external_ref="R-direct"))
    assert (caught.value.code, caught.value.field) == ("605", "signature")
    await process_refund(stack.res, refund.refund_id)
    await assert_failed_with(db, stack, refund.refund_id, "605")


@pytest.mark.slow
async def test_606_timestamp_off_is_a_clock_skew_retried_later(db, stack, merchant, monkeypatch):
    """A 606 with the gateway's Date header showing the skew is ClockSkew (transient): the
    refund waits for the clock to be fixed instead of failing."""
    refund = await accepted_refund(stack, db)
    creds = creds_of(merchant)
    await stack.client.token(creds)  # the clock was right when the token was issued
    real_now = client_module._now
    monkeypatch.setattr(client_module, "_now", lambda: real_now() + timedelta(minutes=10))
    with pytest.raises(ClockSkew) as caught:
        await stack.client.request_refund(creds, order(stack, external_ref="R-direct"))
    assert (caught.value.code, caught.value.http_status) == ("606", 400)
    assert 595 <= caught.value.skew_seconds <= 605
    assert re.match(r"local clock is (599|600|601)s ahead of the gateway's", caught.value.message)
    posts = stack.sent.count("POST", "/v1/refunds")
    with pytest.raises(ClockSkew):  # refused locally now: nothing is sent
        await stack.client.request_refund(creds, order(stack, external_ref="R-direct"))
    assert stack.sent.count("POST", "/v1/refunds") == posts

    await process_refund(stack.res, refund.refund_id)
    await assert_retry_scheduled(db, refund.refund_id)
    assert stack.sent.count("POST", "/v1/refunds") == posts  # the worker sent nothing either
    assert await stack.ledger() == []

    monkeypatch.setattr(client_module, "_now", real_now)  # NTP fixed the clock
    monkeypatch.setattr(client_module, "SKEW_RECHECK_SECONDS", 0.0)  # and the refusal's minute is over
    await stack.chaos(sync_status_mix={"success": 1})
    await process_refund(stack.res, refund.refund_id)
    assert (await find_refund(db, refund.refund_id)).state == "succeeded"
    assert len(await stack.ledger()) == 1


async def test_607_source_ip_not_allowed(db, stack, merchant):
    refund = await accepted_refund(stack, db)
    creds = creds_of(merchant)
    await stack.client.token(creds)
    await stack.chaos(merchant_allowed_ips={"m1": ["10.0.0.0/8"]})
    with pytest.raises(PermanentError) as caught:
        await stack.client.request_refund(creds, order(stack, external_ref="R-direct"))
    assert (caught.value.code, caught.value.http_status) == ("607", 403)
    await stack.chaos(merchant_allowed_ips={}, allowed_ips=["10.0.0.0/8"])
    stack.client.drop_token("m1")
    with pytest.raises(PermanentError) as caught:  # the authorization is refused too
        await stack.client.token(creds)
    assert caught.value.code == "607"
    await process_refund(stack.res, refund.refund_id)
    await assert_failed_with(db, stack, refund.refund_id, "607")


# --- transient faults ------------------------------------------------------------------------------

@pytest.mark.slow
async def test_500_166_is_transient_and_the_worker_retries_later(db, stack, merchant):
    refund = await accepted_refund(stack, db)
    await stack.chaos(error_rate=1.0)
    with pytest.raises(TransientError) as caught:
        await stack.client.request_refund(creds_of(merchant), order(stack, external_ref="R-direct"))
    assert type(caught.value) is TransientError
    assert (caught.value.code, caught.value.http_status) == ("166", 500)
    await process_refund(stack.res, refund.refund_id)
    await assert_retry_scheduled(db, refund.refund_id)
    assert await stack.ledger() == []
    await stack.chaos(error_rate=0.0, sync_status_mix={"success": 1})
    await process_refund(stack.res, refund.refund_id)  # the retry: status first, then send
    assert (await find_refund(db, refund.refund_id)).state == "succeeded"
    assert len(await stack.ledger()) == 1


async def test_429_is_rate_limited_with_retry_after_and_the_worker_waits(db, stack, merchant):
    refund = await accepted_refund(stack, db)
    await stack.chaos(rate_limited_rate=1.0, retry_after_s=7)
    with pytest.raises(RateLimited) as caught:
        await stack.client.request_refund(creds_of(merchant), order(stack, external_ref="R-direct"))
    assert (caught.value.retry_after, caught.value.http_status) == (7.0, 429)
    await process_refund(stack.res, refund.refund_id)
    waiting = await find_refund(db, refund.refund_id)
    assert waiting.state in ("submitted", "queued") and waiting.claimed_until is None
    assert waiting.delivered_at >= datetime.now(timezone.utc) + timedelta(seconds=6)
    assert waiting.state != "failed" and await stack.ledger() == []


@pytest.mark.slow
async def test_after_a_429_the_next_attempt_sends_without_asking_for_status(db, stack, merchant):
    """A 429 means nothing was executed: the retry need not ask the gateway what became of it."""
    refund = await accepted_refund(stack, db)
    await stack.chaos(rate_limited_rate=1.0, retry_after_s=1)
    await process_refund(stack.res, refund.refund_id)
    assert stack.sent.count("POST", "/v1/refunds") == 1
    await stack.chaos(rate_limited_rate=0.0, sync_status_mix={"success": 1})
    await asyncio.sleep(1.1)  # the merchant's pause (Retry-After) is over
    await process_refund(stack.res, refund.refund_id)
    assert (await find_refund(db, refund.refund_id)).state == "succeeded"
    assert stack.sent.count("POST", "/v1/refunds") == 2
    assert stack.sent.count("GET", "/v1/refunds/") == 0
    assert len(await stack.ledger()) == 1


async def test_merchant_rate_limit_429_carries_the_wait(db, stack, merchant):
    await stack.paid(db, transaction="CIP-9")
    await stack.chaos(merchant_rate_limits={"m1": 0.5}, sync_status_mix={"success": 1})
    creds = creds_of(merchant)
    await stack.client.request_refund(creds, order(stack, external_ref="R-a", amount="1.00"))
    with pytest.raises(RateLimited) as caught:
        await stack.client.request_refund(creds, order(stack, external_ref="R-b", amount="1.00"))
    assert 1 <= caught.value.retry_after <= 2


@pytest.mark.slow
async def test_connection_refused_is_transient_and_the_worker_retries_later(db, stack, merchant):
    refund = await accepted_refund(stack, db)
    dead = PagoEfectivoClient(stack.res.session, base_url=f"http://127.0.0.1:{free_port()}", env="sandbox",
                              timeout=TIMEOUT)
    with pytest.raises(TransientError) as caught:
        await dead.request_refund(creds_of(merchant), order(stack))
    assert type(caught.value) is TransientError and "cannot connect" in caught.value.message
    stack.res.client = dead
    await process_refund(stack.res, refund.refund_id)
    await assert_retry_scheduled(db, refund.refund_id)


# --- unknown outcomes --------------------------------------------------------------------------------

@pytest.mark.slow
async def test_read_timeout_after_commit_is_outcome_unknown_settled_by_status(db, stack, merchant):
    refund = await accepted_refund(stack, db)
    await stack.chaos(timeout_after_commit_rate=1.0, timeout_hold_s=TIMEOUT + 1, sync_status_mix={"success": 1})
    with pytest.raises(OutcomeUnknown) as caught:
        await stack.client.request_refund(creds_of(merchant), order(stack, external_ref="R-direct"))
    assert "timed out" in caught.value.message
    answer = await stack.client.refund_status(creds_of(merchant), "R-direct")
    assert answer is not None and answer.status == "success"  # it was executed
    await process_refund(stack.res, refund.refund_id)
    settled = await find_refund(db, refund.refund_id)
    assert settled.state == "succeeded" and settled.attempts == 1
    assert sorted(e["externalRef"] for e in await stack.ledger()) == ["R-1", "R-direct"]


async def executed_by_a_worker_that_died(db, stack: Stack, merchant, refund) -> None:
    """``refund`` claimed by a worker that sent it (the gateway executed it) and died before it
    recorded the answer; its claim has run out, so the next attempt must settle it by status."""
    from refunds.states import claim_many

    await claim_many(db, [refund.refund_id], actor="worker-that-died", claim_seconds=0)
    await stack.chaos(sync_status_mix={"success": 1})
    await stack.client.request_refund(creds_of(merchant), order(stack, external_ref=refund.external_ref, reason=None))
    assert len(await stack.ledger()) == 1


async def test_a_refused_status_lookup_never_fails_a_refund_the_gateway_may_have_executed(db, stack, merchant):
    """A 607 (this worker's address not allowed) to the status lookup says nothing of the refund:
    it is asked again later, never failed with its amount released (it was executed)."""
    refund = await accepted_refund(stack, db)
    await executed_by_a_worker_that_died(db, stack, merchant, refund)
    await stack.chaos(merchant_allowed_ips={"m1": ["10.0.0.0/8"]})
    await process_refund(stack.res, refund.refund_id)
    await assert_retry_scheduled(db, refund.refund_id)
    assert (await find_refund(db, refund.refund_id)).provider_code == "status_unavailable"
    assert (await find_payment(db, "m1", "CIP-9")).refunded_amount == Decimal("25.00")  # still held
    await stack.chaos(merchant_allowed_ips={})
    await process_refund(stack.res, refund.refund_id)  # the retry asks again, and settles it
    assert (await find_refund(db, refund.refund_id)).state == "succeeded"
    assert stack.sent.count("POST", "/v1/refunds") == 1 and len(await stack.ledger()) == 1


async def test_a_status_lookup_answered_429_is_not_taken_for_nothing_sent(db, stack, merchant):
    """Only a refund request answered 429 executed nothing; a status lookup answered 429 leaves
    the refund as unknown as before, so the next attempt asks again instead of sending blind."""
    refund = await accepted_refund(stack, db)
    await executed_by_a_worker_that_died(db, stack, merchant, refund)
    await stack.chaos(rate_limited_rate=1.0, retry_after_s=1)
    await process_refund(stack.res, refund.refund_id)
    await assert_retry_scheduled(db, refund.refund_id)
    assert (await find_refund(db, refund.refund_id)).provider_code == "status_unavailable"
    await stack.chaos(rate_limited_rate=0.0)
    await process_refund(stack.res, refund.refund_id)
    assert (await find_refund(db, refund.refund_id)).state == "succeeded"
    assert stack.sent.count("POST", "/v1/refunds") == 1  # the dead worker's alone: nothing resent


async def test_a_pending_refund_whose_status_lookup_is_refused_is_asked_again_later(db, stack, merchant, monkeypatch):
    """The status poll of a pending refund that gets 607 re-queues it for later: the message ends,
    instead of raising for dramatiq to redeliver (and the poll's schedule never moving on)."""
    from workers import sender

    refund = await accepted_refund(stack, db)
    await stack.chaos(sync_status_mix={"pending": 1})
    await process_refund(stack.res, refund.refund_id)
    assert (await find_refund(db, refund.refund_id)).state == "pending"
    await db.execute("UPDATE refunds SET next_check_at = now() - interval '1 second' WHERE refund_id = $1",
                     refund.refund_id)
    await stack.chaos(merchant_allowed_ips={"m1": ["10.0.0.0/8"]})
    requeued = []
    monkeypatch.setattr(sender, "requeue", lambda refund_id, **how: requeued.append(refund_id) or True)
    await process_refund(stack.res, refund.refund_id)
    assert requeued == [refund.refund_id]
    assert (await find_refund(db, refund.refund_id)).state == "pending"


async def test_connection_dropped_after_sending_is_outcome_unknown(db, stack, merchant):
    await stack.paid(db, transaction="CIP-9")
    await stack.chaos(timeout_after_commit_rate=1.0, sync_status_mix={"pending": 1})
    with pytest.raises(OutcomeUnknown) as caught:
        await stack.client.request_refund(creds_of(merchant), order(stack))
    assert "lost" in caught.value.message
    assert len(await stack.ledger()) == 1
    answer = await stack.client.refund_status(creds_of(merchant), "R-1")
    assert answer is not None and answer.status in ("pending", "success")


async def test_every_first_attempt_lost_after_commit_still_executes_each_refund_once(db, stack, merchant):
    """timeout_after_commit_rate=1 loses the answer of every new execution (replays and
    status lookups are answered): 20 refunds, each executed exactly once, all succeeded."""
    await stack.chaos(timeout_after_commit_rate=1.0, sync_status_mix={"success": 1})
    refunds = [await accepted_refund(stack, db, external_ref=f"R-{i:02d}", amount="5.00") for i in range(20)]
    ids = [refund.refund_id for refund in refunds]
    # every message twice at once (duplicates), then again for those the worker deferred (its
    # own rate limiter), as dramatiq would redeliver them
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        open_ids = [rid for rid in ids if (await find_refund(db, rid)).state in ("queued", "submitted")]
        if not open_ids or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.gather(*(process_refund(stack.res, rid) for rid in open_ids + open_ids))
        await asyncio.sleep(0.05)
    entries = await stack.ledger()
    assert sorted(e["externalRef"] for e in entries) == [f"R-{i:02d}" for i in range(20)]  # each exactly once
    for rid in ids:
        refund = await find_refund(db, rid)
        assert (refund.state, refund.attempts) == ("succeeded", 1), refund
        assert [e["to_state"] for e in await refund_events(db, rid)] == ["queued", "submitted", "succeeded"]
    assert stack.sent.count("POST", "/v1/refunds") == 20  # never resent: the status settled each one
    assert (await find_payment(db, "m1", "CIP-9")).refunded_amount == Decimal("100.00")


async def test_status_lookup_of_a_refund_the_gateway_never_saw_is_none(stack, merchant):
    assert await stack.client.refund_status(creds_of(merchant), "R/ñ never sent") is None


async def test_status_lookup_quotes_the_external_ref(db, stack, merchant):
    await stack.paid(db, transaction="CIP-9")
    await stack.chaos(sync_status_mix={"success": 1})
    creds = creds_of(merchant)
    sent = await stack.client.request_refund(creds, order(stack, external_ref="R/1 ñ?#"))
    assert (await stack.client.refund_status(creds, "R/1 ñ?#")) == sent


# --- environment guard -------------------------------------------------------------------------------

class LoopbackResolver(AbstractResolver):
    """Resolves every host name to 127.0.0.1, so PagoEfectivo's host names reach a local server."""

    async def resolve(self, host, port=0, family=socket.AF_INET):
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]

    async def close(self):
        return None


@pytest_asyncio.fixture
async def counting_gateway():
    """A local server counting every request it receives, reached under any host name."""
    hits: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        hits.append(f"{request.method} {request.host}{request.path}")
        now = datetime.now(timezone.utc)
        return web.json_response({"code": "100", "message": "ok", "data": {
            "token": "t", "tokenStart": protocol.lima_timestamp(now),
            "tokenExpires": protocol.lima_timestamp(now + timedelta(hours=2))}}, status=201)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner, url = await serve(app)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=LoopbackResolver()))
    try:
        yield hits, int(url.rsplit(":", 1)[1]), session
    finally:
        await session.close()
        await runner.cleanup()


def sandbox_creds(env="sandbox") -> Credentials:
    return Credentials(merchant_id="m1", env=env, service_id=1, access_key="AK", secret_key="s",
                       private_key_pem=b"unused")


async def test_environment_guard_refuses_before_any_request(counting_gateway):
    hits, port, session = counting_gateway
    # control: a sandbox client aimed at PagoEfectivo's pre-production host does reach the server
    control = PagoEfectivoClient(session, base_url=f"http://pre1a.services.pagoefectivo.pe:{port}", env="sandbox")
    await control.token(sandbox_creds())
    assert hits == [f"POST pre1a.services.pagoefectivo.pe:{port}/v1/authorizations"]

    for env, base_url in [
        ("sandbox", f"http://services.pagoefectivo.pe:{port}"),
        ("sandbox", DEFAULT_BASE_URLS["production"]),
        ("sandbox", f"http://api.pagoefectivo.pe:{port}"),  # any other PagoEfectivo host is production
        ("production", f"https://pre1a.services.pagoefectivo.pe:{port}"),
        ("production", DEFAULT_BASE_URLS["sandbox"]),
        ("production", f"http://services.pagoefectivo.pe:{port}"),  # production only over https
    ]:
        with pytest.raises(EnvironmentMismatch) as caught:
            PagoEfectivoClient(session, base_url=base_url, env=env)
        assert env in caught.value.message
    # credentials of the other environment: refused per call, before the network
    with pytest.raises(EnvironmentMismatch):
        await control.token(sandbox_creds(env="production"))
    with pytest.raises(EnvironmentMismatch):
        await control.request_refund(sandbox_creds(env="production"), RefundOrder(
            "m1", "CIP", Decimal("1.00"), "PEN", "R", "https://example.test/n"))
    assert len(hits) == 1


def test_environment_defaults_match_their_environment():
    for env, base_url in DEFAULT_BASE_URLS.items():
        client_module.check_gateway_url(env, base_url)  # no error
        assert client_module.gateway_environment(base_url) == env
    assert client_module.gateway_environment("http://127.0.0.1:8090") is None


async def test_environment_mismatch_sends_the_refund_to_manual_review(db, stack, make_merchant):
    await make_merchant("m1", env="production", rate_limit=Decimal(1000))
    refund = await accepted_refund(None, db)  # a sandbox gateway knows no production merchant
    await process_refund(stack.res, refund.refund_id)
    refund = await find_refund(db, refund.refund_id)
    assert (refund.state, refund.provider_code) == ("manual_review", "environment_mismatch")
    assert stack.sent.requests == []


# --- answers the sandbox never gives: a tiny gateway -------------------------------------------------

@pytest_asyncio.fixture
async def tiny_gateway():
    """Answers each request with the next (status, body, headers) queued for its path."""
    queued: dict[str, list[tuple[int, bytes, dict]]] = {}
    hits: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        hits.append(f"{request.method} {request.path}")
        status, body, headers = queued[request.path].pop(0)
        return web.Response(status=status, body=body, headers=headers, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner, url = await serve(app)
    session = aiohttp.ClientSession()
    try:
        yield queued, hits, PagoEfectivoClient(session, base_url=url, env="sandbox", timeout=TIMEOUT)
    finally:
        await session.close()
        await runner.cleanup()


def token_answer(date_header: str | None = None) -> tuple[int, bytes, dict]:
    now = datetime.now(timezone.utc)
    body = protocol.dumps(protocol.envelope("100", {
        "token": "tok", "codeService": "1", "tokenStart": protocol.lima_timestamp(now),
        "tokenExpires": protocol.lima_timestamp(now + timedelta(hours=2))}))
    return 201, body, ({"Date": date_header} if date_header else {})


def refund_creds() -> Credentials:

    pem = (FIXTURES / "merchant_test_key.pem").read_bytes()
    return Credentials(merchant_id="m1", env="sandbox", service_id=1, access_key="AK", secret_key="s",
                       private_key_pem=pem)


TINY_ORDER = RefundOrder("m1", "CIP-1", Decimal("10.00"), "PEN", "R-1", "https://example.test/n")


@pytest.mark.parametrize("status, on_a_refund", [(500, OutcomeUnknown), (502, OutcomeUnknown), (503, TransientError),
                                                 (504, OutcomeUnknown)])
async def test_a_proxys_5xx_after_a_refund_request_may_have_been_executed(tiny_gateway, status, on_a_refund):
    """A proxy's 500, 502 or 504 (not the gateway's envelope) can come after it forwarded the
    request: the outcome is unknown and the worker asks for status. A 503 took nothing in; and a
    lookup changes nothing, so there each is transient."""
    queued, _, client = tiny_gateway
    queued["/v1/authorizations"] = [token_answer()]
    queued["/v1/refunds"] = [(status, b"<html>bad gateway</html>", {})]
    queued["/v1/refunds/R-1"] = [(status, b"<html>bad gateway</html>", {})]
    with pytest.raises(GatewayError) as caught:
        await client.request_refund(refund_creds(), TINY_ORDER)
    assert type(caught.value) is on_a_refund and caught.value.http_status == status
    with pytest.raises(GatewayError) as caught:
        await client.refund_status(refund_creds(), "R-1")
    assert type(caught.value) is TransientError and caught.value.http_status == status


async def test_answers_that_are_not_the_envelope(tiny_gateway):
    queued, _, client = tiny_gateway
    queued["/v1/authorizations"] = [token_answer()]
    queued["/v1/refunds"] = [(403, b"<html>proxy says no</html>", {}), (200, b"<html>", {})]
    queued["/v1/refunds/R-1"] = [(200, b"not json", {})]
    with pytest.raises(TransientError):  # not the gateway speaking: nothing was executed
        await client.request_refund(refund_creds(), TINY_ORDER)
    with pytest.raises(OutcomeUnknown):  # a 200 that cannot be read: it may have been executed
        await client.request_refund(refund_creds(), TINY_ORDER)
    with pytest.raises(TransientError):  # the same on a lookup changes nothing
        await client.refund_status(refund_creds(), "R-1")


async def test_retry_after_as_an_http_date(tiny_gateway):
    queued, _, client = tiny_gateway
    queued["/v1/authorizations"] = [token_answer()]
    now = datetime.now(timezone.utc)
    queued["/v1/refunds"] = [(429, b"", {"Date": email.utils.format_datetime(now, usegmt=True),
                                         "Retry-After": email.utils.format_datetime(now + timedelta(seconds=30),
                                                                                    usegmt=True)})]
    with pytest.raises(RateLimited) as caught:
        await client.request_refund(refund_creds(), TINY_ORDER)
    assert 29 <= caught.value.retry_after <= 31


async def test_clock_skew_from_the_date_header_refuses_to_send(tiny_gateway):
    queued, hits, client = tiny_gateway
    gateway_time = datetime.now(timezone.utc) + timedelta(minutes=10)  # our clock is 10 minutes behind
    skewed = email.utils.format_datetime(gateway_time, usegmt=True)
    queued["/v1/authorizations"] = [(400, protocol.dumps(protocol.envelope("113", [protocol.error_detail(
        "113", "dateRequest out of tolerance", "dateRequest")])), {"Date": skewed})]
    with pytest.raises(ClockSkew) as caught:
        await client.request_refund(refund_creds(), TINY_ORDER)
    assert re.match(r"local clock is (599|600|601)s behind the gateway's .*fix the host's time", caught.value.message)
    assert -605 <= REGISTRY.get_sample_value("refund_clock_skew_seconds") <= -595
    assert -605 <= client.skew.total_seconds() <= -595
    with pytest.raises(ClockSkew):  # the next one does not leave the process
        await client.request_refund(refund_creds(), TINY_ORDER)
    assert hits == ["POST /v1/authorizations"]


async def test_small_skew_is_measured_and_tolerated(tiny_gateway):
    queued, _, client = tiny_gateway
    behind = email.utils.format_datetime(datetime.now(timezone.utc) - timedelta(minutes=2), usegmt=True)
    queued["/v1/authorizations"] = [token_answer(behind)]
    queued["/v1/refunds"] = [(200, protocol.dumps(protocol.envelope("100", {
        "refundId": "X", "externalRef": "R-1", "status": "pending"})), {"Date": behind})]
    answer = await client.request_refund(refund_creds(), TINY_ORDER)
    assert answer.status == "pending"
    assert 115 <= REGISTRY.get_sample_value("refund_clock_skew_seconds") <= 125
