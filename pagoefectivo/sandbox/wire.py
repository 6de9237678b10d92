"""Reading requests and writing answers in PagoEfectivo's shapes (docs/PROTOCOL.md).

Only ``pagoefectivo.protocol`` is used for formats, never the client, so that a bug in
the shared client cannot hide on both sides of the wire. Every refusal is a ``Refusal``
carrying its HTTP status and the published envelope ``{"code","message","data":[...]}``.

Field problems are answered as "Integración Api CIP – Documentación Técnica 1.1" shows
("Respuesta de validaciones", p. 12): HTTP 400, top-level code 111 "Solicitud con datos
inválidos.", and in ``data`` one item per field: 112 "Requerido." for a missing one, 113
"Valor invalido." for one whose value (or JSON type) is not allowed. One answer names every
problem. Published codes always carry their published text; why a value was refused goes
to the sandbox's log (``Refusal.reasons``), not to the wire.

JSON field names are matched without regard to case (``AccessKey`` is ``accessKey``), as
PagoEfectivo's own C# demo sends PascalCase names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
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
RATE_LIMITED = protocol.RATE_LIMITED  # not a published code: the client goes by the HTTP status and Retry-After
# Published codes answer with their published text; the modelled ones (601-607) explain themselves.
PUBLISHED_CODES = frozenset({protocol.OK, protocol.INVALID_DATA, protocol.REQUIRED, protocol.INVALID_VALUE,
                             protocol.INTERNAL_ERROR, protocol.TOKEN_INVALID, protocol.CIP_AMOUNT_OVER_MAXIMUM})


class Refusal(Exception):
    """An error answer: HTTP status, envelope code and per-field details; ``reasons`` say why, for the log."""

    def __init__(self, status: int, code: str, details: list[dict] | None = None, *,
                 message: str | None = None, headers: dict[str, str] | None = None, reasons: Iterable[str] = ()):
        super().__init__(code)
        self.status = status
        self.code = code
        self.details = details or []
        self.message = message
        self.headers = headers or {}
        self.reasons = list(reasons)

    def response(self) -> web.Response:
        return json_response(protocol.envelope(self.code, self.details, self.message),
                             status=self.status, headers=self.headers)


def refusal(code: str, message: str, field: str | None = None, *, status: int = 400) -> Refusal:
    """A refusal with one detail. A published code carries its published text (``message`` is
    logged); a modelled one carries ``message``. A field's 112 or 113 answers as 111 (p. 12)."""
    text = None if code in PUBLISHED_CODES else message
    detail = protocol.error_detail(code, text, field)
    top = protocol.INVALID_DATA if code in (protocol.REQUIRED, protocol.INVALID_VALUE) else code  # p. 12
    return Refusal(status, top, [detail], reasons=[f"{field or '-'}: {message}"])


def operator_refusal(message: str, field: str | None, *, status: int = 400) -> Refusal:
    """111 (113) for the sandbox's own calls (onboarding, payments, chaos): they are not the
    published API, so the detail says what is wrong instead of the published text."""
    return Refusal(status, protocol.INVALID_DATA, [protocol.error_detail(protocol.INVALID_VALUE, message, field)],
                   reasons=[f"{field or '-'}: {message}"])


def token_refusal(message: str, field: str | None = "Authorization") -> Refusal:
    """508 at HTTP 400, where the document lists it (p. 13)."""
    return refusal(protocol.TOKEN_INVALID, message, field, status=400)


def source_ip_refusal(remote: str | None) -> Refusal:
    return refusal(protocol.SOURCE_IP_NOT_ALLOWED, f"source IP {remote or 'unknown'} is not allowed", None,
                   status=403)


def json_response(payload: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=protocol.dumps(payload), status=status, headers=headers,
                        content_type="application/json")


def invalid_request(reason: str) -> Refusal:
    """111 with no field to name (the body as a whole cannot be read)."""
    return Refusal(400, protocol.INVALID_DATA, [], reasons=[reason])


async def read_object(request: web.Request, names: Iterable[str] = ()) -> dict:
    """The JSON object body, numbers as Decimal; anything else is 111. Keys that match one of
    ``names`` without regard to case are renamed to it (a name sent twice in two cases is 113)."""
    raw = await request.read()
    try:
        body = protocol.loads(raw)
    except (ValueError, RecursionError):
        raise invalid_request("the body is not JSON") from None
    if not isinstance(body, dict):
        raise invalid_request("the body is not a JSON object")
    return canonical_names(body, names)


def canonical_names(body: Mapping[str, Any], names: Iterable[str]) -> dict:
    """``body`` with every key spelled as in ``names`` when it matches one without regard to case."""
    spelled = {name.lower(): name for name in names}
    result: dict[str, Any] = {}
    problems = Problems()
    for key, value in body.items():
        name = spelled.get(key.lower(), key)
        if name in result:
            problems.invalid(name, f"{name} is sent twice, in two spellings")
        result[name] = value
    problems.raise_any()
    return result


def check_origin(problems: "Problems", headers: Mapping[str, str]) -> None:
    """``Origin`` is mandatory and one of web/android/ios (API CIP 1.1 §5.1.2, p. 8)."""
    origin = headers.get(protocol.ORIGIN_HEADER, "").strip()
    if not origin:
        problems.missing(protocol.ORIGIN_HEADER)
    elif origin not in protocol.ORIGINS:
        problems.invalid(protocol.ORIGIN_HEADER, f"Origin must be one of {', '.join(protocol.ORIGINS)}, not {origin!r}")


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise token_refusal("missing Bearer token")
    return token.strip()


def _present(value: Any) -> bool:
    return value is not None and value != ""


class Problems:
    """Collects 112/113 details so that one 111 answer names every missing or invalid field."""

    def __init__(self) -> None:
        self.details: list[dict] = []
        self.reasons: list[str] = []

    def missing(self, field: str) -> None:
        """A required field that is absent, null or empty (112 "Requerido.")."""
        self.details.append(protocol.error_detail(protocol.REQUIRED, None, field))
        self.reasons.append(f"{field}: required")

    def invalid(self, field: str, reason: str) -> None:
        """A value, or a JSON type, that is not allowed (113 "Valor invalido.")."""
        self.details.append(protocol.error_detail(protocol.INVALID_VALUE, None, field))
        self.reasons.append(f"{field}: {reason}")

    def require(self, body: Mapping[str, Any], names: Iterable[str]) -> set[str]:
        """Record every absent name; returns them, so that their other checks are skipped."""
        absent = {name for name in names if not _present(body.get(name))}
        for name in names:
            if name in absent:
                self.missing(name)
        return absent

    def raise_any(self) -> None:
        if self.details:
            raise Refusal(400, protocol.INVALID_DATA, self.details, reasons=self.reasons)


def require(body: dict, names: tuple[str, ...]) -> None:
    """111 naming each absent field (112), before anything else is looked at."""
    problems = Problems()
    problems.require(body, names)
    problems.raise_any()


def _identifier(problems: Problems, body: dict, name: str, *, optional: bool = False) -> str | None:
    value = body.get(name)
    if optional and not _present(value):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        problems.invalid(name, f"{name} must be a string")
        return None
    text = str(value)
    if len(text) > MAX_IDENTIFIER or text != text.strip():
        problems.invalid(name, f"{name} must be at most {MAX_IDENTIFIER} characters without surrounding spaces")
        return None
    return text


def _amount(problems: Problems, body: dict, name: str, *, strings: bool = False) -> Decimal | None:
    value = body.get(name)
    if isinstance(value, str) and strings:
        try:
            value = Decimal(value.strip())
        except ArithmeticError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        problems.invalid(name, f"{name} must be a JSON number such as 10.50")
        return None
    amount = Decimal(value)
    if not amount.is_finite() or amount <= 0 or amount > MAX_AMOUNT:
        problems.invalid(name, f"{name} must be greater than 0")
        return None
    if amount.as_tuple().exponent < -2:  # type: ignore[operator]
        problems.invalid(name, f"{name} must have at most 2 decimals")
        return None
    return amount.quantize(CENT)


def _currency(problems: Problems, body: dict) -> str | None:
    value = body.get("currency")
    if not isinstance(value, str):
        problems.invalid("currency", f"currency must be a string, one of {', '.join(CURRENCIES)}")
        return None
    if value not in CURRENCIES:
        problems.invalid("currency", f"currency must be one of {', '.join(CURRENCIES)}")
        return None
    return value


# --- authorization ----------------------------------------------------------------

@dataclass(frozen=True)
class AuthRequest:
    access_key: str
    service_id: int
    date_request: str
    hash_string: str


AUTHORIZATION_FIELDS = ("accessKey", "idService", "dateRequest", "hashString")  # API CIP 1.1 §5.1.1, pp. 5-6


def parse_authorization(body: dict) -> AuthRequest:
    require(body, AUTHORIZATION_FIELDS)
    problems = Problems()
    service = body["idService"]
    if isinstance(service, str) and service.isdigit():
        service = int(service)
    if isinstance(service, bool) or not isinstance(service, int):
        problems.invalid("idService", "idService must be a number")
    elif service <= 0:
        problems.invalid("idService", "idService must be a positive number")
    for name in ("accessKey", "dateRequest", "hashString"):
        if not isinstance(body[name], str):
            problems.invalid(name, f"{name} must be a string")
    problems.raise_any()
    return AuthRequest(body["accessKey"], service, body["dateRequest"], body["hashString"])


# --- refund request ----------------------------------------------------------------

REFUND_REQUIRED = ("merchantId", "originalTransactionId", "refundAmount", "currency", "externalRef",
                   "notifyUrl", "timestamp", "signature")
REFUND_FIELDS = REFUND_REQUIRED + ("refundReason",)


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


def parse_refund(body: dict, headers: Mapping[str, str]) -> RefundOrder:
    """The Origin header and required fields (112), then valid values (113), each answer as 111;
    the timestamp's tolerance is checked later (606)."""
    problems = Problems()
    check_origin(problems, headers)
    if problems.require(body, REFUND_REQUIRED):
        problems.raise_any()
    merchant_id = _identifier(problems, body, "merchantId")
    transaction_id = _identifier(problems, body, "originalTransactionId")
    amount = _amount(problems, body, "refundAmount")
    currency = _currency(problems, body)
    external_ref = _identifier(problems, body, "externalRef")
    reason = body.get("refundReason")
    if _present(reason) and not isinstance(reason, str):
        problems.invalid("refundReason", "refundReason must be a string")
    elif _present(reason) and len(reason) > MAX_REASON:
        problems.invalid("refundReason", f"refundReason must be at most {MAX_REASON} characters")
    notify_url = body.get("notifyUrl")
    if not isinstance(notify_url, str):
        problems.invalid("notifyUrl", "notifyUrl must be a string")
    elif not _valid_url(notify_url):
        problems.invalid("notifyUrl", "notifyUrl must be an http(s) URL")
    timestamp = None
    if not isinstance(body["timestamp"], str):
        problems.invalid("timestamp", "timestamp must be a string")
    else:
        try:
            timestamp = protocol.parse_lima_timestamp(body["timestamp"])
        except ValueError:
            problems.invalid("timestamp", "timestamp must be Lima time, yyyy-MM-ddTHH:mm:ss-05:00")
    if not isinstance(body["signature"], str):
        problems.invalid("signature", "signature must be a base64 string")
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
    transaction_id: str | None = None  # a payment made before this run, under this id
    paid_at: datetime | None = None  # when it was made (now when absent)
    notify: bool = True  # send cip.paid to the merchant


PAYMENT_FIELDS = ("merchantId", "transactionCode", "amount", "currency", "method", "transactionId", "paidAt",
                  "notify")


def parse_payment(body: dict, now: datetime) -> PaymentOrder:
    require(body, ("merchantId", "transactionCode", "amount", "currency"))
    problems = Problems()
    merchant_id = _identifier(problems, body, "merchantId")
    transaction_code = _identifier(problems, body, "transactionCode")
    amount = _amount(problems, body, "amount", strings=True)
    currency = _currency(problems, body)
    method = body.get("method") or "cash"
    if method not in METHODS:
        problems.invalid("method", f"method must be one of {', '.join(METHODS)}")
    transaction_id = _identifier(problems, body, "transactionId", optional=True)
    paid_at = None
    if _present(body.get("paidAt")):
        try:
            paid_at = protocol.parse_timestamp(str(body["paidAt"]))
        except ValueError:
            problems.invalid("paidAt", "paidAt must be ISO-8601 with its offset, e.g. 2026-11-20T10:00:00-05:00")
        else:
            if paid_at > now:
                problems.invalid("paidAt", "paidAt must not be in the future")
    notify = body.get("notify", True)
    if not isinstance(notify, bool):
        problems.invalid("notify", "notify must be true or false")
    problems.raise_any()
    return PaymentOrder(merchant_id, transaction_code, amount, currency, method,  # type: ignore[arg-type]
                        transaction_id, paid_at, notify)


# --- CIP creation (API CIP 1.1 §5.1.2, pp. 8-12) -----------------------------------------

CIP_REQUIRED = ("currency", "amount", "transactionCode", "userEmail", "userPhone", "userCodeCountry")
# name: (longest length, "AN" text | "N" digits); the document's "Longitud" column (p. 9)
CIP_TEXT = {
    "transactionCode": (36, "AN"), "paymentConcept": (50, "AN"), "additionalData": (200, "AN"),
    "adminEmail": (100, "AN"), "userEmail": (100, "AN"), "userId": (100, "AN"), "userName": (30, "AN"),
    "userLastName": (30, "AN"), "userCountry": (20, "AN"), "userCodeCountry": (5, "AN"),
    "userDocumentNumber": (14, "N"), "userPhone": (15, "N"),
}
CIP_FIELDS = ("currency", "amount", "transactionCode", "dateExpiry", "userDocumentType", "userUbigeo",
              "serviceId") + tuple(CIP_TEXT)
DOCUMENT_TYPES = ("DNI", "PAR", "PAS", "LMI", "NAN")
MAX_CIP_AMOUNT = Decimal("9999999999999999.99")  # "16 dígitos numéricos, 2 dígitos decimales"
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_COUNTRY_CODE = re.compile(r"\+?[0-9]{1,4}")


@dataclass(frozen=True)
class CipOrder:
    currency: str
    amount: Decimal
    transaction_code: str
    date_expiry: datetime | None  # None: the sandbox's default term
    service_id: int | None  # the body's serviceId (in the document's example, not in its table)
    fields: dict  # every text field as received, for the CIP document


def parse_cip(body: dict, headers: Mapping[str, str], now: datetime) -> CipOrder:
    """Headers and body of ``POST /v1/cips``: 112 for what is missing, 113 for what is not
    allowed, all in one 111 answer."""
    problems = Problems()
    check_origin(problems, headers)
    absent = problems.require(body, CIP_REQUIRED)
    currency = _currency(problems, body) if "currency" not in absent else None
    amount = None
    if "amount" not in absent:
        amount = _amount(problems, body, "amount", strings=True)
        if amount is not None and amount > MAX_CIP_AMOUNT:
            problems.invalid("amount", "amount has more than 16 integer digits")
            amount = None
    texts: dict[str, str] = {}
    for name, (longest, kind) in CIP_TEXT.items():
        value = body.get(name)
        if name in absent or not _present(value):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and (kind == "N" or name == "userId"):
            value = str(value)
        if not isinstance(value, str):
            problems.invalid(name, f"{name} must be a string")
        elif len(value) > longest:
            problems.invalid(name, f"{name} must be at most {longest} characters")
        elif kind == "N" and not value.isdigit():
            problems.invalid(name, f"{name} must be digits")
        else:
            texts[name] = value
    for name in ("adminEmail", "userEmail"):
        if name in texts and not _EMAIL.fullmatch(texts[name]):
            problems.invalid(name, f"{name} must be an email address")
    if "userCodeCountry" in texts and not _COUNTRY_CODE.fullmatch(texts["userCodeCountry"]):
        problems.invalid("userCodeCountry", "userCodeCountry must be a country calling code such as +51")
    ubigeo = body.get("userUbigeo")
    if _present(ubigeo):
        if isinstance(ubigeo, str) and len(ubigeo) == 6 and ubigeo.isdigit():
            texts["userUbigeo"] = ubigeo
        else:
            problems.invalid("userUbigeo", "userUbigeo must be 6 digits (INEI), such as \"150115\"")
    document_type = body.get("userDocumentType")
    if _present(document_type):
        if document_type in DOCUMENT_TYPES:
            texts["userDocumentType"] = document_type
        else:
            problems.invalid("userDocumentType", f"userDocumentType must be one of {', '.join(DOCUMENT_TYPES)}")
    date_expiry = None
    if _present(body.get("dateExpiry")):
        date_expiry = _date_expiry(problems, body["dateExpiry"], now)
    service_id = None
    if _present(body.get("serviceId")):
        service = body["serviceId"]
        if isinstance(service, str) and service.isdigit():
            service = int(service)
        if isinstance(service, bool) or not isinstance(service, int) or service <= 0:
            problems.invalid("serviceId", "serviceId must be a positive number")
        else:
            service_id = service
    problems.raise_any()
    return CipOrder(currency, amount, texts["transactionCode"], date_expiry, service_id,  # type: ignore[arg-type]
                    texts)


def _date_expiry(problems: Problems, value: Any, now: datetime) -> datetime | None:
    """``yyyy-mm-ddThh:mm:ss(+/-)zzzz``, any offset (p. 9); the document's own example writes a
    space for the ``T`` (p. 10), so both are read. It must be in the future."""
    if not isinstance(value, str):
        problems.invalid("dateExpiry", "dateExpiry must be a string")
        return None
    try:
        moment = protocol.parse_timestamp(value.strip())
    except ValueError:
        problems.invalid("dateExpiry", "dateExpiry must be yyyy-mm-ddThh:mm:ss-05:00")
        return None
    if moment <= now:
        problems.invalid("dateExpiry", "dateExpiry is not in the future")
        return None
    return moment
