"""``--seed FILE``: merchants and payments the gateway knows from the start.

The sandbox keeps its own records, filled by onboarding calls (docs/PROTOCOL.md); a seed
file fills them at start instead, for merchants and payments that exist before a run::

    {"merchants": [{"merchantId", "env", "serviceId", "accessKey", "secretKey",
                    "publicKeyPem", "notifyUrl"?, "allowedIps"?, "codeService"?, "maxCipAmount"?}],
     "payments":  [{"merchantId", "transactionId", "amount", "currency",
                    "method"?, "paidAt"?}]}

The file holds secretKeys in the clear: it is a sandbox file, keep it out of version control.
Every problem is reported at load with its place in the file (``merchants[2].serviceId``).
docs/PROTOCOL.md describes the format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pagoefectivo import protocol

from .allowlist import parse_cidrs
from .registry import ENVIRONMENT, PaidTransaction, Registration
from .wire import CURRENCIES, MAX_IDENTIFIER, METHODS

ENVIRONMENTS = ("sandbox", "production")


class SeedError(ValueError):
    """The seed file cannot be used; the message names the place and the problem."""


@dataclass(frozen=True)
class Seed:
    merchants: list[Registration]
    payments: list[PaidTransaction]


def load_seed(path: str | Path, *, now: datetime | None = None) -> Seed:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SeedError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    try:
        document = protocol.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise SeedError(f"{path}: not JSON: {exc}") from None
    return parse_seed(document, now=now)


def parse_seed(document: Any, *, now: datetime | None = None) -> Seed:
    if not isinstance(document, dict):
        raise SeedError('the seed must be a JSON object {"merchants": [...], "payments": [...]}')
    unknown = set(document) - {"merchants", "payments"}
    if unknown:
        raise SeedError(f"unknown key(s) {', '.join(sorted(unknown))}; use merchants and payments")
    items = _list(document, "merchants")
    merchants = [parse_merchant(item, f"merchants[{i}]") for i, item in enumerate(items)]
    seen: set[str] = set()
    for i, merchant in enumerate(merchants):
        if merchant.merchant_id in seen:
            raise SeedError(f"merchants[{i}].merchantId: {merchant.merchant_id!r} appears twice")
        seen.add(merchant.merchant_id)
    paid_at_default = now or datetime.now(timezone.utc)
    payments = [_payment(f"payments[{i}]", item, seen, paid_at_default)
                for i, item in enumerate(_list(document, "payments"))]
    keys: set[tuple[str, str]] = set()
    for i, payment in enumerate(payments):
        key = (payment.merchant_id, payment.transaction_id)
        if key in keys:
            raise SeedError(f"payments[{i}].transactionId: {payment.transaction_id!r} appears twice for"
                            f" {payment.merchant_id!r}")
        keys.add(key)
    return Seed(merchants, payments)


def _list(document: dict, name: str) -> list:
    value = document.get(name, [])
    if not isinstance(value, list):
        raise SeedError(f"{name}: must be a list")
    return value


def _object(where: str, item: Any, allowed: set[str]) -> dict:
    if not isinstance(item, dict):
        raise SeedError(f"{where}: must be an object")
    unknown = set(item) - allowed
    if unknown:
        raise SeedError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    return item


def _text(where: str, item: dict, name: str, *, required: bool = True, identifier: bool = False) -> str | None:
    value = item.get(name)
    if value is None or value == "":
        if required:
            raise SeedError(f"{where}.{name}: is required")
        return None
    if identifier and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise SeedError(f"{where}.{name}: must be a string")
    if identifier and (len(value) > MAX_IDENTIFIER or value != value.strip()):
        raise SeedError(f"{where}.{name}: at most {MAX_IDENTIFIER} characters, no surrounding spaces")
    return value


_MERCHANT_KEYS = {"merchantId", "env", "serviceId", "accessKey", "secretKey", "publicKeyPem", "notifyUrl",
                  "allowedIps", "codeService", "maxCipAmount"}
_SERVICE_CODE = re.compile(r"[A-Za-z0-9]{3,5}")  # codeService: AN, 3-5 (API CIP 1.1 §5.1.1, p. 7)


def parse_merchant(item: Any, where: str, *, merchant_id: str | None = None) -> Registration:
    """A merchant's registration, from a seed file or the onboarding call (which names the
    merchant in its path and may leave ``env`` out)."""
    item = _object(where, item, _MERCHANT_KEYS)
    if merchant_id is None:  # a seed file names the merchant and its environment
        merchant_id = _text(where, item, "merchantId", identifier=True)
        env = _text(where, item, "env")
    else:  # the onboarding call names it in its path; sandbox unless said
        if item.get("merchantId") not in (None, merchant_id):
            raise SeedError(f"{where}.merchantId: must be the merchant named in the path, {merchant_id!r}")
        env = _text(where, item, "env", required=False) or ENVIRONMENT
    if env not in ENVIRONMENTS:
        raise SeedError(f"{where}.env: must be one of {', '.join(ENVIRONMENTS)}")
    service_id = item.get("serviceId")
    if isinstance(service_id, str) and service_id.isdigit():
        service_id = int(service_id)
    if isinstance(service_id, bool) or not isinstance(service_id, int) or service_id <= 0:
        raise SeedError(f"{where}.serviceId: must be a positive number")
    access_key = _text(where, item, "accessKey")
    secret_key = _text(where, item, "secretKey")
    public_pem = _text(where, item, "publicKeyPem")
    try:
        key = serialization.load_pem_public_key(public_pem.encode())  # type: ignore[union-attr]
    except (ValueError, TypeError):
        raise SeedError(f"{where}.publicKeyPem: not a PEM public key (-----BEGIN PUBLIC KEY-----)") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise SeedError(f"{where}.publicKeyPem: must be an RSA public key")
    notify_url = _text(where, item, "notifyUrl", required=False)
    if notify_url is not None:
        parts = urlsplit(notify_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SeedError(f"{where}.notifyUrl: must be an http(s) URL")
    try:
        allowed_ips = parse_cidrs(item.get("allowedIps") or [])
    except ValueError as exc:
        raise SeedError(f"{where}.allowedIps: {exc}") from None
    code_service = _text(where, item, "codeService", required=False)
    if code_service is not None and not _SERVICE_CODE.fullmatch(code_service):
        raise SeedError(f"{where}.codeService: 3 to 5 letters or digits, such as \"SRV\"")
    extra = {}
    if item.get("maxCipAmount") not in (None, ""):
        extra["max_cip_amount"] = _amount(where, item["maxCipAmount"], "maxCipAmount")
    return Registration(
        merchant_id=merchant_id, env=env, service_id=service_id, access_key=access_key,  # type: ignore[arg-type]
        public_key_pem=public_pem, secret_key=secret_key, notify_url=notify_url,  # type: ignore[arg-type]
        allowed_ips=allowed_ips, code_service=code_service, **extra,
    )


_PAYMENT_KEYS = {"merchantId", "transactionId", "amount", "currency", "method", "paidAt"}


def _payment(where: str, item: Any, merchants: set[str], paid_at_default: datetime) -> PaidTransaction:
    item = _object(where, item, _PAYMENT_KEYS)
    merchant_id = _text(where, item, "merchantId", identifier=True)
    if merchant_id not in merchants:
        raise SeedError(f"{where}.merchantId: {merchant_id!r} is not among the seed's merchants")
    transaction_id = _text(where, item, "transactionId", identifier=True)
    amount = _amount(where, item.get("amount"))
    currency = item.get("currency")
    if currency not in CURRENCIES:
        raise SeedError(f"{where}.currency: must be one of {', '.join(CURRENCIES)}")
    method = item.get("method") or "cash"
    if method not in METHODS:
        raise SeedError(f"{where}.method: must be one of {', '.join(METHODS)}")
    paid_at_text = _text(where, item, "paidAt", required=False)
    try:
        paid_at = protocol.parse_timestamp(paid_at_text) if paid_at_text else paid_at_default
    except ValueError:
        raise SeedError(f"{where}.paidAt: must be ISO-8601 with its offset, e.g. 2026-11-20T10:00:00-05:00") from None
    return PaidTransaction(merchant_id, transaction_id, amount, currency, method, paid_at)  # type: ignore[arg-type]


def _amount(where: str, value: Any, name: str = "amount") -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise SeedError(f"{where}.{name}: must be a decimal such as \"100.00\"")
    try:
        amount = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise SeedError(f"{where}.{name}: {value!r} is not a decimal") from None
    if not amount.is_finite() or amount <= 0:
        raise SeedError(f"{where}.{name}: must be greater than 0")
    if amount.as_tuple().exponent < -2:  # type: ignore[operator]
        raise SeedError(f"{where}.{name}: at most 2 decimals")
    return amount.quantize(Decimal("0.01"))
