"""Reading requests and writing answers in PagoEfectivo's shapes (CONTRACT §4).

Only ``pagoefectivo.protocol`` is used for formats, never the client, so that a bug in
the shared client cannot hide on both sides of the wire. Every refusal is a ``Refusal``
carrying its HTTP status and the published envelope ``{"code","message","data":[...]}``.

Field problems are told apart as the published codes suggest: 112 a required field is
missing, 111 a field has the wrong JSON type (a string where a number belongs, an object
where text belongs), 113 the type is right but the value is not allowed. One answer names
every problem; its envelope code is 111 if any field has the wrong type, else 113.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from pagoefectivo import protocol

CURRENCIES = ("PEN", "USD")
METHODS = ("cash", "bank_transfer")
CENT = Decimal("0.01")
MAX_AMOUNT = Decimal("999999999999.99")
MAX_IDENTIFIER = 64
MAX_REASON = 255
MAX_URL = 2048
RATE_LIMITED = "429"  # not a published code: the client goes by the HTTP status and Retry-After


class Refusal(Exception):
    """An error answer: HTTP status, envelope code and per-field details."""

    def __init__(self, status: int, code: str, details: list[dict] | None = None, *,
                 message: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(code)
        self.status = status
        self.code = code
        self.details = details or []
        self.message = message
        self.headers = headers or {}

    def response(self) -> web.Response:
        return json_response(protocol.envelope(self.code, self.details, self.message),
                             status=self.status, headers=self.headers)


def refusal(code: str, message: str, field: str | None = None, *, status: int = 400) -> Refusal:
    return Refusal(status, code, [protocol.error_detail(code, message, field)])


def token_refusal(message: str, field: str | None = "Authorization") -> Refusal:
    return refusal(protocol.TOKEN_INVALID, message, field, status=401)


def source_ip_refusal(remote: str | None) -> Refusal:
    return refusal(protocol.SOURCE_IP_NOT_ALLOWED, f"source IP {remote or 'unknown'} is not allowed", None,
                   status=403)


def json_response(payload: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=protocol.dumps(payload), status=status, headers=headers,
                        content_type="application/json")


async def read_object(request: web.Request) -> dict:
    """The JSON object body, numbers as Decimal; anything else is 111."""
    raw = await request.read()
    try:
        body = protocol.loads(raw)
    except (ValueError, RecursionError):
        raise refusal(protocol.INVALID_DATA, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise refusal(protocol.INVALID_DATA, "the body is not a JSON object")
    return body


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise token_refusal("missing Bearer token")
    return token.strip()


def _present(value: Any) -> bool:
    return value is not None and value != ""


def require(body: dict, names: tuple[str, ...]) -> None:
    missing = [name for name in names if not _present(body.get(name))]
    if missing:
        raise Refusal(400, protocol.REQUIRED,
                      [protocol.error_detail(protocol.REQUIRED, f"{name} is required", name) for name in missing])


class _Problems:
    """Collects 111/113 details so that one answer names every invalid field."""

    def __init__(self) -> None:
        self.details: list[dict] = []

    def add(self, field: str, message: str) -> None:
        """A value that is not allowed (113)."""
        self.details.append(protocol.error_detail(protocol.INVALID_VALUE, message, field))

    def wrong_type(self, field: str, message: str) -> None:
        """A value of the wrong JSON type (111)."""
        self.details.append(protocol.error_detail(protocol.INVALID_DATA, message, field))

    def raise_any(self) -> None:
        if self.details:
            codes = {detail["code"] for detail in self.details}
            raise Refusal(400, protocol.INVALID_DATA if protocol.INVALID_DATA in codes else protocol.INVALID_VALUE,
                          self.details)


def _identifier(problems: _Problems, body: dict, name: str, *, optional: bool = False) -> str | None:
    value = body.get(name)
    if optional and not _present(value):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        problems.wrong_type(name, f"{name} must be a string")
        return None
    text = str(value)
    if len(text) > MAX_IDENTIFIER or text != text.strip():
        problems.add(name, f"{name} must be at most {MAX_IDENTIFIER} characters without surrounding spaces")
        return None
    return text


def _amount(problems: _Problems, body: dict, name: str, *, strings: bool = False) -> Decimal | None:
    value = body.get(name)
    if isinstance(value, str) and strings:
        try:
            value = Decimal(value.strip())
        except ArithmeticError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        problems.wrong_type(name, f"{name} must be a JSON number such as 10.50")
        return None
    amount = Decimal(value)
    if not amount.is_finite() or amount <= 0 or amount > MAX_AMOUNT:
        problems.add(name, f"{name} must be greater than 0")
        return None
    if amount.as_tuple().exponent < -2:  # type: ignore[operator]
        problems.add(name, f"{name} must have at most 2 decimals")
        return None
    return amount.quantize(CENT)


def _currency(problems: _Problems, body: dict) -> str | None:
    value = body.get("currency")
    if not isinstance(value, str):
        problems.wrong_type("currency", f"currency must be a string, one of {', '.join(CURRENCIES)}")
        return None
    if value not in CURRENCIES:
        problems.add("currency", f"currency must be one of {', '.join(CURRENCIES)}")
        return None
    return value


# --- authorization ----------------------------------------------------------------

@dataclass(frozen=True)
class AuthRequest:
    access_key: str
    service_id: int
    date_request: str
    hash_string: str


def parse_authorization(body: dict) -> AuthRequest:
    require(body, ("accessKey", "idService", "dateRequest", "hashString"))
    problems = _Problems()
    service = body["idService"]
    if isinstance(service, str) and service.isdigit():
        service = int(service)
    if isinstance(service, bool) or not isinstance(service, int):
        problems.wrong_type("idService", "idService must be a number")
    elif service <= 0:
        problems.add("idService", "idService must be a positive number")
    for name in ("accessKey", "dateRequest", "hashString"):
        if not isinstance(body[name], str):
            problems.wrong_type(name, f"{name} must be a string")
    problems.raise_any()
    return AuthRequest(body["accessKey"], service, body["dateRequest"], body["hashString"])


# --- refund request ----------------------------------------------------------------

REFUND_REQUIRED = ("merchantId", "originalTransactionId", "refundAmount", "currency", "externalRef",
                   "notifyUrl", "timestamp", "signature")


@dataclass(frozen=True)
class RefundOrder:
    merchant_id: str
    original_transaction_id: str
    amount: Decimal
    currency: str
    reason: str | None
    external_ref: str
    notify_url: str
    timestamp: datetime
    signature: str
    fields: dict  # every field as received, for the signature's canonical string

    def same_parameters(self, original_transaction_id: str, amount: Decimal, currency: str) -> bool:
        """What makes a replay "the same refund": the money, not the wording or the notify URL."""
        return (self.original_transaction_id, self.amount, self.currency) == (original_transaction_id, amount, currency)


def parse_refund(body: dict) -> RefundOrder:
    """Required (112), then valid values (113); the timestamp's tolerance is checked later (606)."""
    require(body, REFUND_REQUIRED)
    problems = _Problems()
    merchant_id = _identifier(problems, body, "merchantId")
    transaction_id = _identifier(problems, body, "originalTransactionId")
    amount = _amount(problems, body, "refundAmount")
    currency = _currency(problems, body)
    external_ref = _identifier(problems, body, "externalRef")
    reason = body.get("refundReason")
    if _present(reason) and not isinstance(reason, str):
        problems.wrong_type("refundReason", "refundReason must be a string")
    elif _present(reason) and len(reason) > MAX_REASON:
        problems.add("refundReason", f"refundReason must be at most {MAX_REASON} characters")
    notify_url = body.get("notifyUrl")
    if not isinstance(notify_url, str):
        problems.wrong_type("notifyUrl", "notifyUrl must be a string")
    elif not _valid_url(notify_url):
        problems.add("notifyUrl", "notifyUrl must be an http(s) URL")
    timestamp = None
    if not isinstance(body["timestamp"], str):
        problems.wrong_type("timestamp", "timestamp must be a string")
    else:
        try:
            timestamp = protocol.parse_timestamp(body["timestamp"])
        except ValueError:
            problems.add("timestamp", "timestamp must be yyyy-MM-ddTHH:mm:ss-05:00")
    if not isinstance(body["signature"], str):
        problems.wrong_type("signature", "signature must be a base64 string")
    problems.raise_any()
    return RefundOrder(
        merchant_id=merchant_id, original_transaction_id=transaction_id, amount=amount,  # type: ignore[arg-type]
        currency=currency, reason=reason or None, external_ref=external_ref,  # type: ignore[arg-type]
        notify_url=notify_url, timestamp=timestamp, signature=body["signature"],  # type: ignore[arg-type]
        fields={name: value for name, value in body.items() if name != "signature"},
    )


def _valid_url(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > MAX_URL:
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


# --- sandbox payments ----------------------------------------------------------------

@dataclass(frozen=True)
class PaymentOrder:
    merchant_id: str
    transaction_code: str
    amount: Decimal
    currency: str
    method: str


def parse_payment(body: dict) -> PaymentOrder:
    require(body, ("merchantId", "transactionCode", "amount", "currency"))
    problems = _Problems()
    merchant_id = _identifier(problems, body, "merchantId")
    transaction_code = _identifier(problems, body, "transactionCode")
    amount = _amount(problems, body, "amount", strings=True)
    currency = _currency(problems, body)
    method = body.get("method") or "cash"
    if method not in METHODS:
        problems.add("method", f"method must be one of {', '.join(METHODS)}")
    problems.raise_any()
    return PaymentOrder(merchant_id, transaction_code, amount, currency, method)  # type: ignore[arg-type]
