"""Property tests: whatever arrives at the notify URL, the receiver never fails (5xx) and never
keeps a notification whose signature it did not verify.

The real application runs on a real socket and a real Postgres, in its own thread and event
loop, and hypothesis sends it random bodies, headers, paths and signatures, including
validly signed random JSON, over plain HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from decimal import Decimal
from urllib.parse import quote

import pytest
import simplejson
from aiohttp import web
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from pagoefectivo.protocol import SIGNATURE_HEADER, dumps, notification_signature, public_key_pem, verify_notification
from receiver import MAX_BODY, create_app
from refunds import db as dbmod
from refunds.merchants import add_merchant

SECRET = "fuzz-secret-0123456789"
TABLES = "notifications, refund_events, refunds, payments, api_tokens, merchants"
FUZZ = settings(max_examples=500, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Server:
    """The receiver on 127.0.0.1 in a background event loop, and a connection to its database."""

    def __init__(self, database_url: str, vault, private_pem: bytes):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="receiver-under-fuzz", daemon=True)
        self.thread.start()
        self.conn, self.runner, self.port = self.run(self._start(database_url, vault, private_pem))
        self.signed_ok: set[str] = set()  # operation numbers answered 200 to a valid signature

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self, database_url, vault, private_pem):
        conn = await dbmod.connect(database_url)
        await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
        await add_merchant(conn, vault, merchant_id="m1", env="sandbox", service_id=1, access_key="AK",
                           secret_key=SECRET, private_key_pem=private_pem, public_key_pem=public_key_pem(private_pem))
        runner = web.AppRunner(create_app(database_url=database_url, vault=vault), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return conn, runner, runner.addresses[0][1]

    def rows(self) -> int:
        return self.run(self.conn.fetchval("SELECT count(*) FROM notifications"))

    def stored(self, operation_number: str) -> bool:
        return self.run(self.conn.fetchval(
            "SELECT count(*) FROM notifications WHERE merchant_id = 'm1' AND operation_number = $1",
            operation_number)) == 1

    def post(self, path: str, body: bytes, headers: dict[str, bytes]) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    def close(self) -> None:
        self.run(self.runner.cleanup())
        self.run(self.conn.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def server(database_url, vault, rsa_private_pem):
    running = Server(database_url, vault, rsa_private_pem)
    try:
        yield running
        # the invariant over the whole run: every kept row was delivered with a valid signature
        kept = running.run(running.conn.fetch("SELECT merchant_id, operation_number FROM notifications"))
        assert {(r["merchant_id"], r["operation_number"]) for r in kept} <= {("m1", op) for op in running.signed_ok}
    finally:
        running.close()


# --- strategies ---------------------------------------------------------------------------

def encode(value) -> bytes:
    """JSON as a careless sender may write it: NaN, Infinity and lone surrogates included."""
    return simplejson.dumps(value, use_decimal=True, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=80)
identifiers = st.one_of(st.text(max_size=20), st.integers(), st.none(), st.booleans(), st.floats(),
                        st.text(min_size=120, max_size=140), st.lists(st.integers(), max_size=2))
amounts = st.one_of(st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-10**6, max_value=10**6),
                    st.decimals(allow_nan=True, allow_infinity=True), st.integers(), st.floats(),
                    st.text(max_size=12), st.none())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
notification_data = st.fixed_dictionaries({}, optional={
    "cip": identifiers, "amount": amounts, "refundAmount": amounts,
    "currency": st.sampled_from(["PEN", "USD", "EUR", "", "pen"]) | st.text(max_size=4),
    "paymentDate": st.sampled_from(["2024-05-01T10:15:00-05:00", "2024-05-01T10:15:00", "0001-01-01T00:00:00Z",
                                    "9999-12-31T23:59:59+14:00"]) | st.text(max_size=30),
    "method": st.sampled_from(["cash", "bank_transfer", "crypto"]) | json_values,
    "transactionCode": identifiers, "merchantId": st.sampled_from(["m1", "m2"]) | identifiers,
    "externalRef": identifiers, "originalTransactionId": identifiers, "refundId": identifiers,
    "status": st.sampled_from(["success", "failure"]), "reason": st.text(max_size=30) | json_values,
    "code": identifiers, "extra": json_values,
})
notifications = st.fixed_dictionaries(
    {"eventType": st.sampled_from(["cip.paid", "refund.succeeded", "refund.failed", "cip.expired"]) | st.text(max_size=70),
     "operationNumber": st.one_of(st.uuids().map(str), identifiers)},
    optional={"data": notification_data | json_values},
)
# mostly well-formed, so that many reach the database: amounts, currencies and ids that pass, plus noise
plausible_notifications = st.fixed_dictionaries({
    "eventType": st.sampled_from(["cip.paid", "refund.succeeded", "refund.failed"]),
    "operationNumber": st.uuids().map(str) | st.integers(min_value=0),
    "data": st.fixed_dictionaries({
        "cip": st.uuids().map(str), "externalRef": st.text(min_size=1, max_size=20),
        "amount": st.decimals(min_value=Decimal("0.01"), max_value=Decimal("99999.99"), places=2),
        "refundAmount": st.decimals(min_value=Decimal("0.01"), max_value=Decimal("99999.99"), places=2),
        "currency": st.sampled_from(["PEN", "USD"]),
    }, optional={"paymentDate": st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
                 "merchantId": st.sampled_from(["m1", "m2"]), "transactionCode": st.text(max_size=20),
                 "note": json_values}),
})
bodies = st.one_of(
    notifications.map(encode),
    plausible_notifications.map(encode),
    json_values.map(encode),
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.integers(MAX_BODY - 2, MAX_BODY + 2048).map(lambda size: b'{"p":"' + b"x" * (size - 8) + b'"}'),
)


@st.composite
def signatures(draw, body: bytes) -> str | None:
    """A header value: none, garbage, another secret's, other bytes', or valid (in several spellings)."""
    valid = notification_signature(body, SECRET)
    kind = draw(st.sampled_from(["valid", "valid", "valid-upper", "none", "garbage", "other-secret", "other-body",
                                 "truncated"]))
    if kind == "garbage":
        return draw(header_text)
    return {
        "valid": valid, "valid-upper": f"  {valid.upper()} ", "none": None, "truncated": valid[:-1],
        "other-secret": notification_signature(body, SECRET + "x"),
        "other-body": notification_signature(body + b" ", SECRET),
    }[kind]


@st.composite
def deliveries(draw):
    body = draw(bodies)
    merchant = draw(st.one_of(st.just("m1"), st.just("m1"), st.just("m1"), st.sampled_from(["m2", "M1", "m1 "]),
                              st.text(min_size=1, max_size=70)))
    headers: dict[str, bytes] = {}
    signature = draw(signatures(body))
    if signature is not None:
        headers[SIGNATURE_HEADER] = signature.encode("latin-1")
    if draw(st.booleans()):
        headers["Content-Type"] = draw(st.sampled_from([b"application/json", b"text/plain", b"", b"multipart/form-data"])
                                       | header_text.map(lambda t: t.encode("latin-1")))
    names = ["X-Forwarded-For", "Accept", "X-Whatever"] + (["Expect"] if draw(st.integers(0, 9)) == 0 else [])
    for name, value in draw(st.dictionaries(st.sampled_from(names), header_text, max_size=2)).items():
        headers[name] = value.encode("latin-1")
    return merchant, body, headers


# --- properties ---------------------------------------------------------------------------

def check(server: Server, merchant: str, body: bytes, headers: dict[str, bytes]) -> None:
    before = server.rows()
    path = "/pagoefectivo/notifications/" + quote(merchant, safe="")
    status = server.post(path, body, headers)
    if currently_in_test_context():
        event(f"status {status}")  # shown by --hypothesis-show-statistics
    assert status < 500, f"{status} for {body[:200]!r}"
    signature = headers.get(SIGNATURE_HEADER)
    valid = (merchant == "m1" and len(body) <= MAX_BODY
             and verify_notification(body, None if signature is None else signature.decode("latin-1"), SECRET))
    if not valid:
        assert status in (400, 401, 404, 405, 413, 417), status
        assert server.rows() == before, "a row was kept without a valid signature"
        if merchant == "m1" and len(body) <= MAX_BODY and not headers.get("Expect"):
            assert status == 401
        return
    assert status in (200, 400, 417), status
    if status == 200:
        operation_number = str(json.loads(body)["operationNumber"])
        assert server.stored(operation_number)
        server.signed_ok.add(operation_number)
    else:
        assert server.rows() == before


@pytest.mark.slow
@FUZZ
@given(deliveries())
def test_random_deliveries_never_fail_and_never_keep_an_unverified_row(server, delivery):
    check(server, *delivery)


@pytest.mark.slow
@FUZZ
@given(notifications | plausible_notifications, st.booleans())
def test_validly_signed_random_notifications_are_200_or_400_never_5xx(server, payload, redeliver):
    body = encode(payload)
    headers = {SIGNATURE_HEADER: notification_signature(body, SECRET).encode()}
    check(server, "m1", body, headers)
    if redeliver:  # a duplicate is answered the same way, and keeps a single row
        check(server, "m1", body, headers)


def test_a_valid_cip_paid_is_applied(server):
    """The strategies above reach the happy path too; this pins one such example."""
    body = dumps({"eventType": "cip.paid", "operationNumber": "fuzz-pinned",
                  "data": {"cip": "F-1", "amount": Decimal("10.00"), "currency": "PEN"}})
    check(server, "m1", body, {SIGNATURE_HEADER: notification_signature(body, SECRET).encode()})
    assert server.stored("fuzz-pinned")
