"""The client against PagoEfectivo's own examples ("Integración Api CIP – Documentación
Técnica 1.1", tests/fixtures/pagoefectivo/): a small gateway on a real port answers with the
document's bodies, and every published code is classified the same whatever the HTTP status.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from pagoefectivo import protocol
from pagoefectivo.client import Credentials, PagoEfectivoClient, RefundOrder
from pagoefectivo.errors import OutcomeUnknown, PermanentError, RateLimited, TransientError
from tests.stack import serve
from tests.helpers import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "pagoefectivo"
CODES = protocol.loads((FIXTURES / "codes.json").read_bytes())
ORDER = RefundOrder("m1", "2523136", Decimal("1.00"), "PEN", "R-1", "https://example.test/n")


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def creds() -> Credentials:
    script = protocol.loads(fixture("authorization_script.json"))
    return Credentials(merchant_id="m1", env="sandbox", service_id=script["servicio"], access_key=script["accessKey"],
                       secret_key=script["secretKey"],
                       private_key_pem=(ROOT / "tests" / "fixtures" / "merchant_test_key.pem").read_bytes())


class Gateway:
    """Answers each path with the next queued (status, body); the document's authorization
    answer when none is queued for it. Keeps every request's method, path and headers."""

    def __init__(self) -> None:
        self.queued: dict[str, list[tuple[int, bytes]]] = {}
        self.requests: list[tuple[str, str, dict]] = []

    async def answer(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, dict(request.headers)))
        queue = self.queued.get(request.path)
        status, body = queue.pop(0) if queue else (201, fixture("authorization_response.json"))
        return web.Response(status=status, body=body, content_type="application/json")


@pytest_asyncio.fixture
async def gateway():
    gateway = Gateway()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", gateway.answer)
    runner, url = await serve(app)
    session = aiohttp.ClientSession()
    try:
        yield gateway, PagoEfectivoClient(session, base_url=url, env="sandbox", timeout=5.0)
    finally:
        await session.close()
        await runner.cleanup()


def refund_answer(code=protocol.OK) -> bytes:
    return protocol.dumps({"code": code, "message": "Solicitud exitosa.",
                           "data": {"refundId": "X-1", "externalRef": "R-1", "status": "pending"}})


async def test_the_documents_authorization_answer_gives_a_two_hour_token(gateway):
    """The example's dates are of 2019: the lifetime is read on the gateway's clock (2 hours)
    and counted from the moment of asking, so the token is not taken as long expired."""
    server, client = gateway
    example = protocol.loads(fixture("authorization_response.json"))
    asked = datetime.now(timezone.utc)
    assert await client.token(creds()) == example["data"]["token"]
    expires = client._tokens["m1"].expires
    assert asked + timedelta(hours=2) <= expires <= datetime.now(timezone.utc) + timedelta(hours=2)
    method, path, headers = server.requests[0]
    assert (method, path, headers["Content-Type"]) == ("POST", "/v1/authorizations", "application/json")


async def test_every_call_carries_the_mandatory_headers(gateway):
    """Origin (mandatory, web/android/ios), Accept-Language (es-PE) and ``Bearer <token>`` with
    one space, as in the document's CIP request (§5.1.2, pp. 8 and 10)."""
    server, client = gateway
    token = protocol.loads(fixture("authorization_response.json"))["data"]["token"]
    server.queued["/v1/refunds"] = [(200, refund_answer())]
    server.queued["/v1/refunds/R-1"] = [(200, refund_answer())]
    await client.request_refund(creds(), ORDER)
    await client.refund_status(creds(), "R-1")
    documented = protocol.loads(fixture("cip_request_headers.json"))
    for method, path, headers in server.requests:
        assert headers["Origin"] == documented["Origin"] == "web", path
        assert headers["Accept-Language"] == documented["Accept-Language"], path
        assert headers["Content-Type"] == documented["Content-Type"], path
    for method, path, headers in server.requests[1:]:
        assert headers["Authorization"] == f"Bearer {token}", path
    assert [(m, p) for m, p, _ in server.requests] == [
        ("POST", "/v1/authorizations"), ("POST", "/v1/refunds"), ("GET", "/v1/refunds/R-1")]


async def test_a_numeric_code_as_in_the_cip_example_is_read(gateway):
    """The CIP example (p. 12) writes ``"code": 100``, a number; the others a string."""
    server, client = gateway
    assert protocol.loads(fixture("cip_response.json"))["code"] == 100
    server.queued["/v1/refunds"] = [(201, refund_answer(code=100))]
    answer = await client.request_refund(creds(), ORDER)
    assert (answer.status, answer.refund_id) == ("pending", "X-1")


async def test_the_documents_validation_answer(gateway):
    server, client = gateway
    server.queued["/v1/refunds"] = [(400, fixture("validation_error.json"))]
    with pytest.raises(PermanentError) as caught:
        await client.request_refund(creds(), ORDER)
    error = caught.value
    assert type(error) is PermanentError
    assert (error.code, error.field, error.http_status) == ("111", "amount", 400)
    assert error.details == protocol.loads(fixture("validation_error.json"))["data"]
    assert error.message == "Solicitud con datos inválidos. amount: Requerido."


# Each published (and modelled) code, and what it is whatever the HTTP status it comes with.
EXPECTED = {
    "111": PermanentError, "112": PermanentError, "113": PermanentError, "508": PermanentError,
    "511": PermanentError, "166": TransientError, "601": PermanentError, "602": PermanentError,
    "603": PermanentError, "604": PermanentError, "605": PermanentError, "606": PermanentError,
    "607": PermanentError, "429": RateLimited,
}
STATUSES = (200, 400, 401, 403, 404, 500, 503)


def test_every_code_of_the_document_is_in_the_table():
    assert {row["code"] for row in CODES} - {protocol.OK} <= set(EXPECTED)


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("code", sorted(EXPECTED))
async def test_each_code_is_one_class_whatever_the_http_status(gateway, code, status):
    server, client = gateway
    body = protocol.dumps(protocol.envelope(code, [protocol.error_detail(code, None, "amount")]))
    # 508, or any answer at HTTP 401: one token refresh and one retry first
    attempts = 2 if code == protocol.TOKEN_INVALID or status == 401 else 1
    server.queued["/v1/refunds"] = [(status, body)] * attempts
    with pytest.raises(EXPECTED[code]) as caught:
        await client.request_refund(creds(), ORDER)
    assert type(caught.value) is EXPECTED[code]
    assert (caught.value.code, caught.value.http_status) == (code, status)
    assert [p for _, p, _ in server.requests].count("/v1/refunds") == attempts


@pytest.mark.parametrize("status", (400, 404, 500, 503))  # 401 refreshes the token first
async def test_success_code_at_an_error_status_is_an_unknown_outcome(gateway, status):
    """100 at a non-2xx status contradicts itself: the refund may have been executed, so the
    worker asks for its status instead of failing it or sending it again; on the lookup it is
    transient."""
    server, client = gateway
    server.queued["/v1/refunds"] = [(status, refund_answer())]
    with pytest.raises(OutcomeUnknown):
        await client.request_refund(creds(), ORDER)
    server.queued["/v1/refunds/R-1"] = [(status, refund_answer())]
    with pytest.raises(TransientError) as caught:
        await client.refund_status(creds(), "R-1")
    assert type(caught.value) is TransientError


@pytest.mark.parametrize("status, expected", [(400, PermanentError), (404, PermanentError), (500, TransientError),
                                              (503, TransientError)])
async def test_a_code_outside_the_table_goes_by_the_http_status(gateway, status, expected):
    server, client = gateway
    server.queued["/v1/refunds"] = [(status, protocol.dumps(protocol.envelope("999", [], "¿?")))]
    with pytest.raises(expected) as caught:
        await client.request_refund(creds(), ORDER)
    assert type(caught.value) is expected


async def test_an_unknown_route_is_not_a_lookup_miss(gateway):
    """The sandbox answers an unknown route 404 with code "404"; only 603 means "never saw
    this externalRef" (None), so a wrong base path can never make the worker send blind."""
    server, client = gateway
    server.queued["/v1/refunds/R-1"] = [(404, protocol.dumps(protocol.envelope("404", [], "Recurso no encontrado.")))]
    with pytest.raises(PermanentError):
        await client.refund_status(creds(), "R-1")
    server.queued["/v1/refunds/R-1"] = [(404, protocol.dumps(protocol.envelope("603", [], "x")))]
    assert await client.refund_status(creds(), "R-1") is None
