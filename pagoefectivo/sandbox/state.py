"""The gateway's own memory: tokens, the CIPs it created, refunds and the ledger.

The ledger is what exactly-once is judged against, so a refund is executed at most once
per (merchant, externalRef), ever. ``record_refund`` is synchronous on purpose: with no
``await`` inside, the idempotency re-check, the cap and the execution cannot interleave
with another request on the same event loop.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal

from pagoefectivo import protocol

from .wire import RefundOrder

DECLINE_CODE = "701"
DECLINE_REASON = "declined by issuer"
# A token is 200-205 characters (API CIP 1.1 §5.1.1, p. 7), JWT-shaped like the document's examples.
TOKEN_LENGTH = 203
_JWT_HEADER = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"  # {"alg":"HS256","typ":"JWT"}


def _token_key(token: str) -> str:
    """Tokens are kept by digest, so the store never holds a usable credential."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def new_token(code_service: str, service_id: int, expires: datetime) -> str:
    """A JWT-shaped token as in the document's examples (``sub`` the codeService, ``nameid``
    the idService), TOKEN_LENGTH long when the claims allow; its last part is random, so
    that nobody can forge one: the sandbox knows a token only by its digest."""
    claims = {"sub": code_service, "jti": str(uuid.uuid4()), "nameid": str(service_id),
              "exp": int(expires.timestamp())}
    head = f"{_JWT_HEADER}.{_b64url(json.dumps(claims, separators=(',', ':')).encode())}."
    random_part = secrets.token_urlsafe(64)  # 86 characters, 512 bits
    return head + random_part[:max(43, TOKEN_LENGTH - len(head))]


@dataclass(frozen=True)
class TokenGrant:
    merchant_id: str
    service_id: int
    start: datetime
    expires: datetime


@dataclass(frozen=True)
class Cip:
    """A CIP: created by ``POST /v1/cips`` (unpaid until ``POST /sandbox/cips/{cip}/payment``),
    or paid at once through ``POST /sandbox/payments`` or a seed file; ``cip`` is the
    transaction id refunds name."""

    cip: str
    merchant_id: str
    transaction_code: str
    amount: Decimal
    currency: str
    method: str
    paid_at: datetime | None
    date_expiry: datetime | None = None
    document_id: str | None = None  # the name of its HTML document (cipUrl)
    fields: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass
class RefundRecord:
    refund_id: str
    merchant_id: str
    external_ref: str
    original_transaction_id: str
    amount: Decimal
    currency: str
    reason: str | None
    status: str  # pending | success | failure; pending moves to success when its notification is due
    executed: bool
    recorded_at: datetime
    reason_code: str | None = None
    decline_reason: str | None = None

    def answer(self) -> dict:
        """The ``data`` of the synchronous answer and of the status lookup."""
        data = {"refundId": self.refund_id, "externalRef": self.external_ref, "status": self.status}
        if self.status == "failure":
            data.update(reasonCode=self.reason_code, reason=self.decline_reason)
        return data


@dataclass(frozen=True)
class LedgerEntry:
    merchant_id: str
    external_ref: str
    amount: Decimal
    currency: str
    executed_at: datetime

    def to_json(self) -> dict:
        return {"merchantId": self.merchant_id, "externalRef": self.external_ref, "refundAmount": self.amount,
                "currency": self.currency, "executedAt": protocol.lima_timestamp(self.executed_at)}


class Conflict(Exception):
    """The externalRef was used before with other parameters (604)."""


class OverRefundable(Exception):
    """The amount exceeds what is left of the payment (601)."""

    def __init__(self, available: Decimal):
        super().__init__(str(available))
        self.available = available


_SEQUENCE_EPOCH_NS = 1_577_836_800 * 10**9  # 2020-01-01T00:00:00Z
_SEQUENCE_TICK_NS = 100_000  # 100 µs


class _Sequence:
    """Numeric ids of at most 14 digits (the published length of a CIP and of an
    operationNumber, API CIP 1.1 pp. 11 and 14) that stay unique across restarts: the count
    of 100 µs ticks since 2020 (13 digits until the 2280s) plus a counter. The receiver
    deduplicates on operationNumber, so a restarted sandbox must not reuse one; it could only
    if the run before handed out more than 10,000 numbers a second on average."""

    def __init__(self) -> None:
        self._next = (time.time_ns() - _SEQUENCE_EPOCH_NS) // _SEQUENCE_TICK_NS

    def __call__(self) -> str:
        self._next += 1
        return str(self._next)


@dataclass
class SandboxState:
    tokens: dict[str, TokenGrant] = field(default_factory=dict)
    authorizations: Counter[str] = field(default_factory=Counter)  # tokens issued, per merchant
    cips: dict[tuple[str, str], Cip] = field(default_factory=dict)
    refunds: dict[tuple[str, str], RefundRecord] = field(default_factory=dict)
    ledger: list[LedgerEntry] = field(default_factory=list)
    executed: dict[tuple[str, str], Decimal] = field(default_factory=dict)
    next_cip: _Sequence = field(default_factory=_Sequence)
    next_operation_number: _Sequence = field(default_factory=_Sequence)

    # --- tokens ----------------------------------------------------------------------

    def issue_token(self, merchant_id: str, service_id: int, now: datetime, *,
                    code_service: str = "SBX") -> tuple[str, TokenGrant]:
        self._drop_expired_tokens(now)
        grant = TokenGrant(merchant_id, service_id, now, now + protocol.TOKEN_LIFETIME)
        token = new_token(code_service, service_id, grant.expires)
        self.tokens[_token_key(token)] = grant
        self.authorizations[merchant_id] += 1
        return token, grant

    def revoke_tokens(self, merchant_id: str | None = None) -> int:
        """Invalidate the tokens of one merchant (or all): their next call is answered 401/508."""
        doomed = [key for key, grant in self.tokens.items() if merchant_id in (None, grant.merchant_id)]
        for key in doomed:
            del self.tokens[key]
        return len(doomed)

    def token_grant(self, token: str, now: datetime) -> TokenGrant | None:
        grant = self.tokens.get(_token_key(token))
        return grant if grant is not None and grant.expires > now else None

    def _drop_expired_tokens(self, now: datetime) -> None:
        for key in [key for key, grant in self.tokens.items() if grant.expires <= now]:
            del self.tokens[key]

    # --- payments --------------------------------------------------------------------

    def add_cip(self, *, merchant_id: str, transaction_code: str, amount: Decimal, currency: str, method: str,
                paid_at: datetime | None, date_expiry: datetime | None = None, fields: dict | None = None,
                number: str | None = None) -> Cip:
        """A new CIP, numbered by the gateway unless ``number`` names a payment made before this
        run (a seed file's, or one recorded through ``POST /sandbox/payments``)."""
        cip = Cip(number or self.next_cip(), merchant_id, transaction_code, amount, currency, method, paid_at,
                  date_expiry=date_expiry, document_id=str(uuid.uuid4()).upper(), fields=dict(fields or {}))
        if (merchant_id, cip.cip) in self.cips:
            raise ValueError(f"{merchant_id} already has a payment {cip.cip}")
        self.cips[(merchant_id, cip.cip)] = cip
        return cip

    def cip(self, merchant_id: str, number: str) -> Cip | None:
        return self.cips.get((merchant_id, number))

    def pay(self, cip: Cip, now: datetime) -> Cip:
        """The customer pays an unpaid CIP (ValueError if it is paid or expired)."""
        if cip.paid_at is not None:
            raise ValueError(f"CIP {cip.cip} is already paid")
        if cip.date_expiry is not None and cip.date_expiry <= now:
            raise ValueError(f"CIP {cip.cip} expired at {protocol.lima_timestamp(cip.date_expiry)}")
        paid = self.cips[(cip.merchant_id, cip.cip)] = replace(cip, paid_at=now)
        return paid

    def cip_document(self, document_id: str) -> Cip | None:
        """The CIP whose HTML document (cipUrl) has this name."""
        return next((cip for cip in self.cips.values() if cip.document_id == document_id), None)

    # --- refunds ---------------------------------------------------------------------

    def refund(self, merchant_id: str, external_ref: str) -> RefundRecord | None:
        return self.refunds.get((merchant_id, external_ref))

    def replay(self, order: RefundOrder) -> RefundRecord | None:
        """The earlier refund with this externalRef, or None; Conflict if its parameters differ."""
        earlier = self.refund(order.merchant_id, order.external_ref)
        if earlier is not None and not order.same_parameters(
            earlier.original_transaction_id, earlier.amount, earlier.currency
        ):
            raise Conflict(order.external_ref)
        return earlier

    def executed_total(self, merchant_id: str, transaction_id: str) -> Decimal:
        return self.executed.get((merchant_id, transaction_id), Decimal("0.00"))

    def record_refund(self, order: RefundOrder, *, paid_amount: Decimal, status: str,
                      now: datetime) -> tuple[RefundRecord, bool]:
        """Record (and unless declined, execute) a refund; returns it and whether it is new.

        A concurrent request with the same externalRef may have finished while this one was
        looking things up, so idempotency is checked again here, before the cap.
        """
        earlier = self.replay(order)
        if earlier is not None:
            return earlier, False
        key = (order.merchant_id, order.original_transaction_id)
        available = paid_amount - self.executed_total(*key)
        if order.amount > available:
            raise OverRefundable(available)
        record = RefundRecord(
            refund_id=str(uuid.uuid4()), merchant_id=order.merchant_id, external_ref=order.external_ref,
            original_transaction_id=order.original_transaction_id, amount=order.amount, currency=order.currency,
            reason=order.reason, status=status, executed=status != "failure", recorded_at=now,
        )
        if record.executed:
            self.executed[key] = self.executed_total(*key) + order.amount
            self.ledger.append(LedgerEntry(order.merchant_id, order.external_ref, order.amount, order.currency, now))
        else:
            record.reason_code, record.decline_reason = DECLINE_CODE, DECLINE_REASON
        self.refunds[(order.merchant_id, order.external_ref)] = record
        return record, True

    def settle(self, record: RefundRecord) -> None:
        """A pending refund becomes final when its refund.succeeded notification is due."""
        if record.status == "pending":
            record.status = "success"
