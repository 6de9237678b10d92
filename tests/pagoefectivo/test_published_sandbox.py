"""The sandbox against PagoEfectivo's own examples ("Integración Api CIP – Documentación
Técnica 1.1", kept as JSON under tests/fixtures/pagoefectivo/, see its README), over real HTTP.

The sandbox is seeded with the document's own merchant (idService 913 and the keys of its
Postman script), so the document's bodies are sent as printed; only what must change for a
live gateway (a date in the past, the document's token) is replaced, and each test says so.
Requests are built from ``pagoefectivo.protocol`` and the fixtures alone, never the client.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pagoefectivo import protocol
from pagoefectivo.sandbox import create_app
from pagoefectivo.sandbox.seed import parse_seed
from tests.helpers import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "pagoefectivo"
KEY_PEM = (ROOT / "tests" / "fixtures" / "merchant_test_key.pem").read_bytes()
LIMA_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d-05:00")
MAX_CIP = Decimal("500.00")


def fixture(name: str):
    return protocol.loads((FIXTURES / name).read_bytes())


SCRIPT = fixture("authorization_script.json")
TEXTS = {row["code"]: row["message"] for row in fixture("codes.json")}  # the document's, not protocol.MESSAGES


def now() -> datetime:
    return datetime.now(timezone.utc)


# --- the gateway, seeded with the document's merchant ---------------------------------------

class Notes:
    """A notify URL that keeps every notification it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[dict, bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        return web.Response()


@pytest_asyncio.fixture
async def notes():
    keeper = Notes()
    app = web.Application()
    app.router.add_post("/notify", keeper.handle)
    async with TestServer(app) as server:
        keeper.url = str(server.make_url("/notify"))
        yield keeper


@pytest_asyncio.fixture
async def gateway(notes):
    seed = parse_seed({"merchants": [{
        "merchantId": "doc-913", "env": "sandbox", "serviceId": SCRIPT["servicio"], "accessKey": SCRIPT["accessKey"],
        "secretKey": SCRIPT["secretKey"], "publicKeyPem": protocol.public_key_pem(KEY_PEM), "notifyUrl": notes.url,
        "codeService": "SRV", "maxCipAmount": str(MAX_CIP)}]})
    async with TestClient(TestServer(create_app(seed=seed))) as client:
        yield client


async def send(client, method: str, path: str, body=None, *, headers=None, raw: bytes | None = None):
    """One request; returns the status, the headers and the JSON body (numbers as Decimal)."""
    data = raw if raw is not None else (None if body is None else protocol.dumps(body))
    response = await client.request(method, path, data=data, headers=headers or {})
    text = await response.read()
    assert response.content_type == "application/json", (response.status, text[:200])
    return response.status, response.headers, protocol.loads(text)


def signed_authorization(date_request: str, names=("accessKey", "idService", "dateRequest", "hashString")) -> dict:
    """The document's authorization body (p. 6) with ``date_request`` and its hash (p. 7's script)."""
    values = [SCRIPT["accessKey"], SCRIPT["servicio"], date_request,
              protocol.auth_hash(SCRIPT["servicio"], SCRIPT["accessKey"], SCRIPT["secretKey"], date_request)]
    return dict(zip(names, values))


async def token_of(client) -> str:
    status, _, payload = await send(client, "POST", "/v1/authorizations",
                                    signed_authorization(protocol.lima_timestamp(now())))
    assert status == 201, payload
    return payload["data"]["token"]


async def cip_headers(client) -> dict:
    """The document's CIP headers (p. 10) with a token of this gateway instead of the document's."""
    headers = fixture("cip_request_headers.json")
    headers["Authorization"] = f"Bearer {await token_of(client)}"
    return headers


def live_cip_body(**changes) -> dict:
    """The document's CIP body (pp. 10-11) with what a live gateway must refuse changed: its
    dateExpiry (2020, past) a year ahead, and its serviceId (11) the seeded merchant's (913)."""
    body = fixture("cip_request.json")
    body["dateExpiry"] = (now() + timedelta(days=365)).astimezone(protocol.LIMA).strftime("%Y-%m-%d %H:%M:%S-05:00")
    body["serviceId"] = SCRIPT["servicio"]
    body.update(changes)
    return {name: value for name, value in body.items() if value is not None}


def invalid(*fields: tuple[str, str]) -> dict:
    """The published 111 answer (p. 12) naming ``(code, field)`` pairs, with the document's texts."""
    return {"code": "111", "message": TEXTS["111"],
            "data": [{"code": code, "message": TEXTS[code], "field": field} for code, field in fields]}


# --- the document's codes and texts -------------------------------------------------------------

def test_the_codes_and_texts_are_the_documents():
    for row in fixture("codes.json"):
        assert protocol.MESSAGES[row["code"]] == row["message"], row["code"]


def test_the_printed_hash_is_of_2018_not_of_the_printed_2020():
    example = fixture("authorization_hash_example.json")

    def hashed(date: str) -> str:
        return protocol.auth_hash(example["idService"], example["accessKey"], example["secretKey"], date)

    assert hashed(example["dateRequestThatMatches"]) == example["hashString"]
    assert hashed(example["dateRequestAsPrinted"]) != example["hashString"]
    script = "{servicio}.{accessKey}.{secretKey}.{date}".format(**SCRIPT)  # p. 7: the Postman script
    assert hashlib.sha256(script.encode()).hexdigest() == fixture("authorization_request.json")["hashString"]


# --- authorization (§5.1.1) --------------------------------------------------------------------

async def test_the_documents_authorization_body_is_refused_only_for_its_2019_date(gateway):
    status, _, payload = await send(gateway, "POST", "/v1/authorizations", fixture("authorization_request.json"))
    assert (status, payload) == (400, invalid(("113", "dateRequest")))


async def test_authorization_answers_as_the_documents_example(gateway):
    example = fixture("authorization_response.json")
    status, _, payload = await send(gateway, "POST", "/v1/authorizations",
                                    signed_authorization(protocol.lima_timestamp(now())))
    assert status == 201  # "//Status: 201 Created"
    assert (payload["code"], payload["message"]) == (example["code"], example["message"])
    data = payload["data"]
    assert set(data) == set(example["data"])
    assert 200 <= len(data["token"]) <= 205 and 200 <= len(example["data"]["token"]) <= 205  # p. 7: [200 - 205]
    assert data["codeService"] == "SRV"  # the merchant's service code, as in the example; not the idService
    for name in ("tokenStart", "tokenExpires"):
        assert LIMA_TIME.fullmatch(data[name]) and LIMA_TIME.fullmatch(example["data"][name])

    def lifetime(answer):
        return protocol.parse_timestamp(answer["tokenExpires"]) - protocol.parse_timestamp(answer["tokenStart"])

    assert lifetime(data) == lifetime(example["data"]) == timedelta(hours=2)


async def test_pascal_case_names_as_the_csharp_demo_sends_them(gateway):
    body = signed_authorization(protocol.lima_timestamp(now()), ("AccessKey", "IdService", "DateRequest", "HashString"))
    status, _, payload = await send(gateway, "POST", "/v1/authorizations", body)
    assert (status, payload["code"]) == (201, "100")
    body = {**signed_authorization(protocol.lima_timestamp(now())), "ACCESSKEY": SCRIPT["accessKey"]}
    status, _, payload = await send(gateway, "POST", "/v1/authorizations", body)
    assert (status, payload) == (400, invalid(("113", "accessKey")))  # one name in two spellings


async def test_date_request_must_be_lima_time(gateway):
    moment = now().replace(microsecond=0)
    utc = moment.strftime("%Y-%m-%dT%H:%M:%S+00:00")  # the right instant, not in Lima time
    status, _, payload = await send(gateway, "POST", "/v1/authorizations", signed_authorization(utc))
    assert (status, payload) == (400, invalid(("113", "dateRequest")))
    compact = moment.astimezone(protocol.LIMA).strftime("%Y-%m-%dT%H:%M:%S-0500")  # "(+/-)zzzz", p. 5
    status, _, payload = await send(gateway, "POST", "/v1/authorizations", signed_authorization(compact))
    assert (status, payload["code"]) == (201, "100")


async def test_bad_credentials_are_508_at_400_with_the_published_text(gateway):
    body = {**signed_authorization(protocol.lima_timestamp(now())), "hashString": "0" * 64}
    status, _, payload = await send(gateway, "POST", "/v1/authorizations", body)
    assert status == 400
    assert (payload["code"], payload["message"]) == ("508", "Servicio asociado al token es inválido.")


# --- CIP creation (§5.1.2) ----------------------------------------------------------------------

async def test_the_documents_cip_request_is_refused_only_for_its_2020_expiry(gateway):
    status, _, payload = await send(gateway, "POST", "/v1/cips", fixture("cip_request.json"),
                                    headers=await cip_headers(gateway))
    assert (status, payload) == (400, invalid(("113", "dateExpiry")))


async def test_cip_is_created_as_the_documents_example(gateway):
    example = fixture("cip_response.json")
    body = live_cip_body()
    status, _, payload = await send(gateway, "POST", "/v1/cips", body, headers=await cip_headers(gateway))
    assert status == 201  # "//Status: 201 Createad"
    assert (payload["code"], payload["message"]) == (example["code"], example["message"]) == (100, "Solicitud exitosa.")
    data = payload["data"]
    assert set(data) == set(example["data"])
    assert isinstance(data["cip"], int) and 1 <= len(str(data["cip"])) <= protocol.MAX_CIP_DIGITS
    assert (data["currency"], data["amount"], data["transactionCode"]) == (
        example["data"]["currency"], example["data"]["amount"], example["data"]["transactionCode"])
    assert LIMA_TIME.fullmatch(data["dateExpiry"]) and LIMA_TIME.fullmatch(example["data"]["dateExpiry"])
    assert protocol.parse_timestamp(data["dateExpiry"]) == protocol.parse_timestamp(body["dateExpiry"])
    assert data["cipUrl"].endswith(".html")
    async with gateway.session.get(data["cipUrl"]) as response:  # the CIP's HTML document
        assert response.status == 200 and response.content_type == "text/html"
        assert str(data["cip"]) in await response.text()


async def test_cip_without_date_expiry_takes_the_default_term(gateway):
    status, _, payload = await send(gateway, "POST", "/v1/cips", live_cip_body(dateExpiry=None),
                                    headers=await cip_headers(gateway))
    assert status == 201
    assert protocol.parse_timestamp(payload["data"]["dateExpiry"]) > now() + timedelta(days=1)


async def test_a_missing_amount_is_answered_exactly_as_the_documents_example(gateway):
    status, _, payload = await send(gateway, "POST", "/v1/cips", live_cip_body(amount=None),
                                    headers=await cip_headers(gateway))
    assert (status, payload) == (400, fixture("validation_error.json"))


async def test_cip_field_rules_of_the_documents_table(gateway):
    headers = await cip_headers(gateway)
    bad = live_cip_body(currency="EUR", amount=Decimal("1.001"), transactionCode="x" * 37, userEmail="not-an-email",
                        userUbigeo="15011", userDocumentType="DNIE", userDocumentNumber="12A45",
                        userPhone="9" * 16, userCodeCountry="51-PE", userName="n" * 31)
    status, _, payload = await send(gateway, "POST", "/v1/cips", bad, headers=headers)
    assert status == 400 and payload["code"] == "111"
    assert {(d["code"], d["field"]) for d in payload["data"]} == {("113", name) for name in (
        "currency", "amount", "transactionCode", "userEmail", "userUbigeo", "userDocumentType", "userDocumentNumber",
        "userPhone", "userCodeCountry", "userName")}
    assert {d["message"] for d in payload["data"]} == {"Valor invalido."}
    missing = live_cip_body(currency=None, transactionCode=None, userEmail=None, userPhone=None, userCodeCountry=None)
    status, _, payload = await send(gateway, "POST", "/v1/cips", missing, headers=headers)
    assert (status, payload) == (400, invalid(*(("112", name) for name in (
        "currency", "transactionCode", "userEmail", "userPhone", "userCodeCountry"))))


async def test_cip_names_are_read_without_regard_to_case(gateway):
    body = {name[0].upper() + name[1:]: value for name, value in live_cip_body().items()}
    status, _, payload = await send(gateway, "POST", "/v1/cips", body, headers=await cip_headers(gateway))
    assert (status, payload["code"]) == (201, 100)


async def test_origin_is_mandatory_and_one_of_web_android_ios(gateway):
    headers = await cip_headers(gateway)
    del headers["Origin"]
    status, _, payload = await send(gateway, "POST", "/v1/cips", live_cip_body(), headers=headers)
    assert (status, payload) == (400, invalid(("112", "Origin")))
    status, _, payload = await send(gateway, "POST", "/v1/cips", live_cip_body(),
                                    headers={**headers, "Origin": "https://shop.example"})
    assert (status, payload) == (400, invalid(("113", "Origin")))
    for origin in protocol.ORIGINS:
        status, _, _ = await send(gateway, "POST", "/v1/cips", live_cip_body(), headers={**headers, "Origin": origin})
        assert status == 201, origin


async def test_508_for_a_token_or_service_that_is_not_valid(gateway):
    headers = await cip_headers(gateway)
    published = fixture("cip_request_headers.json")["Authorization"]  # the document's own token: not ours
    for changed_headers, body in [({**headers, "Authorization": published}, live_cip_body()),
                                  (headers, live_cip_body(serviceId=11))]:  # the example's serviceId, not 913
        status, _, payload = await send(gateway, "POST", "/v1/cips", body, headers=changed_headers)
        assert (status, payload["code"], payload["message"]) == (400, "508", "Servicio asociado al token es inválido.")


async def test_511_over_the_merchants_maximum(gateway):
    headers = await cip_headers(gateway)
    status, _, payload = await send(gateway, "POST", "/v1/cips", live_cip_body(amount=MAX_CIP + Decimal("0.01")),
                                    headers=headers)
    assert (status, payload["code"], payload["message"]) == (400, "511", TEXTS["511"])
    status, _, _ = await send(gateway, "POST", "/v1/cips", live_cip_body(amount=MAX_CIP), headers=headers)
    assert status == 201


async def test_166_at_500_with_the_published_text(gateway):
    headers = await cip_headers(gateway)
    status, _, config = await send(gateway, "POST", "/sandbox/chaos", {"error_rate": 1})
    assert status == 200 and config["error_rate"] == 1
    status, _, payload = await send(gateway, "POST", "/v1/cips", live_cip_body(), headers=headers)
    assert (status, payload) == (500, {"code": "166", "message": "Error interno del servidor.", "data": []})


@pytest.mark.parametrize("method, path, status, allow", [
    ("GET", "/v1/nothing-here", 404, None),
    ("GET", "/", 404, None),
    ("GET", "/v1/authorizations", 405, "POST"),
    ("PUT", "/v1/cips", 405, "POST"),
    ("DELETE", "/v1/refunds/R-1", 405, "GET,HEAD"),
])
async def test_unknown_routes_and_wrong_methods_answer_the_envelope(gateway, method, path, status, allow):
    got, headers, payload = await send(gateway, method, path)
    assert got == status
    assert set(payload) == {"code", "message", "data"} and payload["code"] == str(status) and payload["message"]
    assert headers.get("Allow") == allow


async def test_a_body_that_is_not_json_is_111(gateway):
    status, _, payload = await send(gateway, "POST", "/v1/authorizations", raw=b"{accessKey: 1")
    assert (status, payload) == (400, {"code": "111", "message": "Solicitud con datos inválidos.", "data": []})


# --- cip.paid (§5.2) --------------------------------------------------------------------------

async def test_cip_paid_has_the_documents_fields_types_and_lengths(gateway, notes):
    example = fixture("notification_cip_paid.json")
    assert protocol.dumps(example) == (FIXTURES / "notification_cip_paid.body").read_bytes()  # "sin indentación"
    for _ in range(2):
        status, _, _ = await send(gateway, "POST", "/sandbox/payments", {
            "merchantId": "doc-913", "transactionCode": "101", "amount": "22.05", "currency": "PEN"})
        assert status == 200
    for _ in range(200):
        if len(notes.received) == 2:
            break
        await asyncio.sleep(0.02)
    assert len(notes.received) == 2
    numbers = set()
    for headers, raw in notes.received:
        assert protocol.verify_notification(raw, headers[protocol.SIGNATURE_HEADER], SCRIPT["secretKey"])
        assert raw == protocol.dumps(json.loads(raw, parse_float=Decimal))  # compact, as the document's string
        body = protocol.loads(raw)
        assert body["eventType"] == example["eventType"]
        assert isinstance(body["operationNumber"], str) and len(body["operationNumber"]) <= protocol.MAX_OPERATION_NUMBER
        for name, value in example["data"].items():
            assert type(body["data"][name]) is type(value), name
        assert body["data"]["cip"].isdigit() and 1 <= len(body["data"]["cip"]) <= protocol.MAX_CIP_DIGITS
        assert (body["data"]["currency"], body["data"]["amount"]) == ("PEN", Decimal("22.05"))
        numbers.add(body["operationNumber"])
    assert len(numbers) == 2


async def test_a_marketplace_rehearses_create_pay_notify_refund(gateway, notes):
    """The whole flow against the sandbox: the document's CIP is created, the customer pays it
    (the sandbox's pay call), the merchant gets a signed cip.paid naming it, and it can then
    be refunded; paying twice or an unknown CIP is refused."""
    status, _, created = await send(gateway, "POST", "/v1/cips", live_cip_body(), headers=await cip_headers(gateway))
    assert status == 201
    cip = str(created["data"]["cip"])
    refund = {"merchantId": "doc-913", "originalTransactionId": cip, "refundAmount": Decimal("0.50"),
              "currency": created["data"]["currency"], "externalRef": "REH-1", "refundReason": "rehearsal",
              "notifyUrl": notes.url, "timestamp": protocol.lima_timestamp(now())}
    refund["signature"] = protocol.sign_fields(refund, protocol.load_private_key(KEY_PEM))
    headers = {**await cip_headers(gateway), protocol.ORIGIN_HEADER: "web"}
    status, _, unpaid = await send(gateway, "POST", "/v1/refunds", refund, headers=headers)
    assert (status, unpaid["code"]) == (400, protocol.TRANSACTION_UNKNOWN)  # not paid yet

    status, _, payment = await send(gateway, "POST", f"/sandbox/cips/{cip}/payment")
    assert status == 200 and payment["cip"] == cip
    for _ in range(250):
        if notes.received:
            break
        await asyncio.sleep(0.02)
    [(note_headers, raw)] = notes.received[:1]
    assert protocol.verify_notification(raw, note_headers[protocol.SIGNATURE_HEADER], SCRIPT["secretKey"])
    note = protocol.loads(raw)
    assert note["eventType"] == "cip.paid"
    assert (note["data"]["cip"], note["data"]["amount"], note["data"]["transactionCode"]) == (
        cip, created["data"]["amount"], created["data"]["transactionCode"])

    status, _, answer = await send(gateway, "POST", "/v1/refunds", refund, headers=headers)
    assert (status, answer["code"]) == (200, protocol.OK), answer
    status, _, again = await send(gateway, "POST", f"/sandbox/cips/{cip}/payment")
    assert (status, again["data"][0]["field"]) == (409, "cip")
    status, _, unknown = await send(gateway, "POST", "/sandbox/cips/99999999999999/payment")
    assert (status, unknown["code"]) == (404, protocol.TRANSACTION_UNKNOWN)
