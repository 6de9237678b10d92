"""Who is registered with the gateway: the sandbox's own record of merchants.

PagoEfectivo keeps its own registry of what each merchant handed it when it signed up
(service id, access key, secret, public key, notify URL, allowed IPs); the sandbox keeps
its own too, so that a credential mismatch between a merchant and the gateway shows in a
rehearsal as it would in production. It is filled from a seed file at start and by the
onboarding call ``PUT /sandbox/merchants/{merchantId}`` (docs/PROTOCOL.md), never from
the merchant's own systems.

Only ``sandbox`` merchants exist here: production credentials are unknown to a sandbox
gateway, as they would be to the real one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

ENVIRONMENT = "sandbox"
NOTIFY_PATH = "/pagoefectivo/notifications/{merchant_id}"  # README: the receiver's path per merchant
# Modelled (511, p. 13, names no figure): the largest CIP a merchant may create, unless it registered one.
DEFAULT_MAX_CIP_AMOUNT = Decimal("30000.00")


@dataclass(frozen=True)
class Registration:
    """A merchant as the gateway knows it."""

    merchant_id: str
    env: str
    service_id: int
    access_key: str
    public_key_pem: str
    secret_key: str = field(repr=False)
    notify_url: str | None = None
    allowed_ips: tuple[str, ...] = ()
    code_service: str | None = None  # codeService (3-5 characters, p. 7); made from merchantId when absent
    max_cip_amount: Decimal = DEFAULT_MAX_CIP_AMOUNT

    def notify_url_or(self, receiver_base_url: str | None) -> str | None:
        """Its own notify URL, else the receiver's path for this merchant under ``receiver_base_url``."""
        if self.notify_url:
            return self.notify_url
        if receiver_base_url:
            return receiver_base_url.rstrip("/") + NOTIFY_PATH.format(merchant_id=self.merchant_id)
        return None

    @property
    def service_code(self) -> str:
        """The registered codeService, else one made from the merchantId (``seller-1`` → ``SELLE``,
        ``m1`` → ``M1X``)."""
        if self.code_service:
            return self.code_service
        return re.sub(r"[^A-Z0-9]", "", self.merchant_id.upper())[:5].ljust(3, "X")

    def to_json(self) -> dict:
        """As the onboarding call answers it: everything but the secret."""
        return {"merchantId": self.merchant_id, "env": self.env, "serviceId": self.service_id,
                "accessKey": self.access_key, "publicKeyPem": self.public_key_pem, "notifyUrl": self.notify_url,
                "allowedIps": list(self.allowed_ips), "codeService": self.service_code,
                "maxCipAmount": self.max_cip_amount}


@dataclass(frozen=True)
class PaidTransaction:
    """A payment the gateway knew of before this run (a seed file's ``payments``)."""

    merchant_id: str
    transaction_id: str
    amount: Decimal
    currency: str
    method: str
    paid_at: datetime


class Registry:
    """The registered merchants, by id; a registration replaces the one before (a key rotation)."""

    def __init__(self, merchants: list[Registration] = ()):
        self._merchants: dict[str, Registration] = {}
        for merchant in merchants:
            self.register(merchant)

    def register(self, merchant: Registration) -> None:
        """Keep ``merchant``, replacing its earlier registration. Production merchants are refused."""
        if merchant.env != ENVIRONMENT:
            raise ValueError("the sandbox registers sandbox merchants only")
        self._merchants[merchant.merchant_id] = merchant

    def merchant(self, merchant_id: str) -> Registration | None:
        return self._merchants.get(merchant_id)

    def merchants_by_credentials(self, access_key: str, service_id: int) -> list[Registration]:
        """The merchants an authorization request may name; the hashString tells them apart."""
        return [m for m in self._merchants.values() if m.access_key == access_key and m.service_id == service_id]
