"""The PagoEfectivo wire protocol, shared by the client and the sandbox gateway.

Published in "Integración Api CIP – Documentación Técnica 1.1" (cited as "API CIP 1.1 §x,
p. n"): the authorization hashString, Lima-time ``dateRequest``, the ``Origin`` header, CIP
creation, the response envelope and its codes with their messages, and HMAC-signed
notifications. Modelled on it (the document has no refund API): the refund request and
its RSA signature, the refund status lookup and codes 601-607. Only this module knows these
formats, so that the real refund specification can replace them in one place.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import simplejson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

LIMA = timezone(timedelta(hours=-5), "America/Lima")
MAX_CLOCK_SKEW = timedelta(minutes=5)
TOKEN_LIFETIME = timedelta(hours=2)
SIGNATURE_HEADER = "PE-Signature"
MERCHANT_HEADER = "PE-Merchant-Id"

# Headers of every call after the authorization (API CIP 1.1 §5.1.2, p. 8): Origin is mandatory
# and one of ORIGINS; Accept-Language is optional, es-PE or en-US.
ORIGIN_HEADER = "Origin"
ORIGINS = ("web", "android", "ios")
SERVER_ORIGIN = "web"  # what a merchant's server sends (the document's own example, p. 10)
LANGUAGE_HEADER = "Accept-Language"
LANGUAGES = ("es-PE", "en-US")

# Response codes (API CIP 1.1 "Respuesta de validaciones", pp. 12-13): 100, 111, 112, 113,
# 166, 508 and 511 are published; 601-607 are modelled for the refund API.
OK = "100"
INVALID_DATA = "111"
REQUIRED = "112"
INVALID_VALUE = "113"
INTERNAL_ERROR = "166"
TOKEN_INVALID = "508"
CIP_AMOUNT_OVER_MAXIMUM = "511"
AMOUNT_OVER_REFUNDABLE = "601"
REFUND_WINDOW_CLOSED = "602"
TRANSACTION_UNKNOWN = "603"
EXTERNAL_REF_REUSED = "604"
SIGNATURE_INVALID = "605"
TIMESTAMP_OUT_OF_TOLERANCE = "606"
SOURCE_IP_NOT_ALLOWED = "607"
RATE_LIMITED = "429"  # modelled, not a code of the document: HTTP 429 with Retry-After decides

# The published texts verbatim ("Valor invalido." without its accent, as printed on p. 13).
MESSAGES = {
    OK: "Solicitud exitosa.",
    INVALID_DATA: "Solicitud con datos inválidos.",
    REQUIRED: "Requerido.",
    INVALID_VALUE: "Valor invalido.",
    INTERNAL_ERROR: "Error interno del servidor.",
    TOKEN_INVALID: "Servicio asociado al token es inválido.",
    CIP_AMOUNT_OVER_MAXIMUM: ("Usted ha generado un Código CIP que excede el valor máximo permitido en este comercio."
                              " Por favor intente con un importe de menor cuantía."),
    AMOUNT_OVER_REFUNDABLE: "El monto excede lo reembolsable.",
    REFUND_WINDOW_CLOSED: "El plazo de reembolso ha vencido.",
    TRANSACTION_UNKNOWN: "Transacción original desconocida o no pagada.",
    EXTERNAL_REF_REUSED: "externalRef ya usado con otros parámetros.",
    SIGNATURE_INVALID: "Firma inválida.",
    TIMESTAMP_OUT_OF_TOLERANCE: "timestamp fuera de tolerancia.",
    SOURCE_IP_NOT_ALLOWED: "IP de origen no permitida.",
}

AMOUNT_FIELDS = frozenset({"refundAmount", "amount"})


# --- time -------------------------------------------------------------------------

# Published lengths: CIP 1-14 digits (§5.1.2, p. 11; notification data.cip, p. 14) and
# operationNumber 0-14 characters (§5.2, p. 14).
MAX_CIP_DIGITS = 14
MAX_OPERATION_NUMBER = 14


def lima_timestamp(moment: datetime) -> str:
    """Format an aware datetime as Lima time, ``yyyy-MM-ddTHH:mm:ss-05:00``."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: time must be timezone-aware")
    return moment.astimezone(LIMA).strftime("%Y-%m-%dT%H:%M:%S-05:00")


def parse_timestamp(text: str) -> datetime:
    """Parse a wire timestamp; it must carry its offset."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no UTC offset")
    return moment


def parse_lima_timestamp(text: str) -> datetime:
    """Parse a time the document requires in Lima time (``dateRequest``, §5.1.1 p. 5: "(GTM-5)
    Hora Lima"): ``yyyy-mm-ddThh:mm:ss`` with the offset ``-05:00`` (or ``-0500``, as its
    format line ``(+/-)zzzz`` reads); any other offset is refused, even for the same instant."""
    moment = parse_timestamp(text)
    if moment.utcoffset() != LIMA.utcoffset(None):
        raise ValueError(f"timestamp {text!r} is not Lima time (-05:00)")
    return moment


def within_tolerance(text: str, now: datetime) -> bool:
    """A Lima-time timestamp within ``MAX_CLOCK_SKEW`` of ``now``."""
    try:
        return abs(parse_lima_timestamp(text) - now) <= MAX_CLOCK_SKEW
    except ValueError:
        return False


# --- authorization (published) ----------------------------------------------------

AUTHORIZATIONS_PATH = "/v1/authorizations"


def auth_hash(id_service: int | str, access_key: str, secret_key: str, date_request: str) -> str:
    """hashString = hex SHA-256 of idService.accessKey.secretKey.dateRequest (UTF-8)."""
    text = f"{id_service}.{access_key}.{secret_key}.{date_request}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- refund request signature (modelled) --------------------------------------------

def _canonical_value(name: str, value: Any) -> str:
    if name in AMOUNT_FIELDS:
        return f"{Decimal(str(value)):.2f}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def canonical_string(fields: Mapping[str, Any]) -> str:
    """Every field but ``signature`` with a non-empty value, sorted by name, as name=value joined by &."""
    parts = [
        f"{name}={_canonical_value(name, value)}"
        for name, value in sorted(fields.items())
        if name != "signature" and value is not None and value != ""
    ]
    return "&".join(parts)


def load_private_key(pem: bytes, *, validated: bool = False) -> rsa.RSAPrivateKey:
    """Load an RSA key. ``validated``: the key was checked before (e.g. when the merchant was
    added) and comes back from authenticated storage, so the costly RSA consistency check
    (about 30 ms, on every refund otherwise) is skipped."""
    key = serialization.load_pem_private_key(pem, password=None, unsafe_skip_rsa_key_validation=validated)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("the private key is not an RSA key")
    return key


def public_key_pem(private_pem: bytes) -> str:
    """The PEM public key (SubjectPublicKeyInfo) that the gateway verifies with."""
    return load_private_key(private_pem).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def sign_fields(fields: Mapping[str, Any], private_key: rsa.RSAPrivateKey) -> str:
    """base64 RSA PKCS#1 v1.5 SHA-256 signature of the canonical string."""
    data = canonical_string(fields).encode("utf-8")
    return base64.b64encode(private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())).decode()


def verify_fields(fields: Mapping[str, Any], signature: str, public_pem: str | bytes) -> bool:
    key = serialization.load_pem_public_key(public_pem.encode() if isinstance(public_pem, str) else public_pem)
    if not isinstance(key, rsa.RSAPublicKey):
        return False
    try:
        raw = base64.b64decode(signature, validate=True)
        key.verify(raw, canonical_string(fields).encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


# --- refund request, answer and status lookup (modelled) --------------------------------

REFUNDS_PATH = "/v1/refunds"
REFUND_STATUSES = ("success", "pending", "failure")
CENT = Decimal("0.01")


def refund_status_path(external_ref: str) -> str:
    """``GET /v1/refunds/{externalRef}``; the reference is percent-encoded (it may hold ``/``)."""
    return f"{REFUNDS_PATH}/{quote(external_ref, safe='')}"


def signed_refund_request(*, merchant_id: str, original_transaction_id: str, amount: Decimal, currency: str,
                          external_ref: str, notify_url: str, reason: str | None, moment: datetime,
                          private_key: rsa.RSAPrivateKey) -> dict:
    """The JSON body of ``POST /v1/refunds``: the fields with a value, plus their signature."""
    fields = {
        "merchantId": merchant_id,
        "originalTransactionId": original_transaction_id,
        "refundAmount": amount.quantize(CENT),
        "currency": currency,
        "refundReason": reason,
        "externalRef": external_ref,
        "notifyUrl": notify_url,
        "timestamp": lima_timestamp(moment),
    }
    fields = {name: value for name, value in fields.items() if value is not None and value != ""}
    fields["signature"] = sign_fields(fields, private_key)
    return fields


def refund_answer(data: Mapping[str, Any]) -> dict:
    """The ``data`` of a refund answer (sync or status) in the client's terms."""
    return {
        "status": str(data.get("status", "")),
        "refund_id": data.get("refundId"),
        "external_ref": str(data.get("externalRef", "")),
        "code": data.get("reasonCode"),
        "message": data.get("reason"),
    }


# --- notifications (published form) -------------------------------------------------

def notification_signature(body: bytes, secret_key: str) -> str:
    """PE-Signature: lowercase hex HMAC-SHA256 of the raw body with the merchant's secretKey."""
    return hmac.new(secret_key.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify_notification(body: bytes, signature: str | None, secret_key: str) -> bool:
    if not signature or not signature.isascii():
        return False
    return hmac.compare_digest(notification_signature(body, secret_key), signature.strip().lower())


# --- JSON ---------------------------------------------------------------------------

def dumps(obj: Any) -> bytes:
    """JSON with Decimal amounts written as numbers, never through float."""
    return simplejson.dumps(obj, use_decimal=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def loads(raw: bytes | str) -> Any:
    """JSON with every non-integer number parsed as Decimal."""
    return json.loads(raw, parse_float=Decimal)


def envelope(code: str, data: Any = None, message: str | None = None) -> dict:
    """The published response envelope ``{"code","message","data"}``."""
    return {"code": code, "message": message or MESSAGES.get(code, ""), "data": data}


def error_detail(code: str, message: str | None = None, field: str | None = None) -> dict:
    """One item of an error envelope's ``data``; the message defaults to the code's published text."""
    return {"code": code, "message": message or MESSAGES.get(code, ""), "field": field}
