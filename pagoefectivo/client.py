"""PagoEfectivo client: authorization tokens, signed refund requests, refund status.

One client per process, shared by all merchants; an aiohttp session is passed in so
that its owner (the worker's boot hook) opens and closes it on the right event loop.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import aiohttp
from prometheus_client import Gauge

from . import protocol
from .errors import (
    ClockSkew, EnvironmentMismatch, GatewayError, OutcomeUnknown, PermanentError, RateLimited, TransientError,
)

log = logging.getLogger(__name__)

TOKEN_REFRESH_MARGIN = timedelta(minutes=5)
TRANSIENT_HTTP = frozenset({500, 502, 503, 504})

refund_clock_skew_seconds = Gauge(
    "refund_clock_skew_seconds", "Local clock minus the gateway's Date header", multiprocess_mode="max"
)


@dataclass(frozen=True)
class Credentials:
    merchant_id: str
    env: str
    service_id: int
    access_key: str
    secret_key: str = field(repr=False)
    private_key_pem: bytes = field(repr=False)


@dataclass(frozen=True)
class RefundOrder:
    merchant_id: str
    original_transaction_id: str
    amount: Decimal
    currency: str
    external_ref: str
    notify_url: str
    reason: str | None = None


@dataclass(frozen=True)
class RefundAnswer:
    status: str  # success | pending | failure
    refund_id: str | None
    external_ref: str
    code: str | None = None
    message: str | None = None


@dataclass
class _Token:
    value: str
    expires: datetime


class PagoEfectivoClient:
    def __init__(self, session: aiohttp.ClientSession, *, base_url: str, env: str, timeout: float = 10.0):
        if env not in ("sandbox", "production"):
            raise ValueError(f"unknown environment {env!r}")
        self._session = session
        self.base_url = base_url.rstrip("/")
        self.env = env
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 3.0))
        self._tokens: dict[str, _Token] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.skew = timedelta(0)

    # --- authorization -------------------------------------------------------------

    async def token(self, creds: Credentials) -> str:
        """A cached token, refreshed 5 minutes before expiry; one refresh per merchant at a time."""
        self._check_environment(creds)
        if (cached := self._fresh_token(creds.merchant_id)) is not None:
            return cached
        async with self._locks.setdefault(creds.merchant_id, asyncio.Lock()):
            if (cached := self._fresh_token(creds.merchant_id)) is not None:
                return cached
            fresh = await self._authorize(creds)
            self._tokens[creds.merchant_id] = fresh
            return fresh.value

    def _fresh_token(self, merchant_id: str) -> str | None:
        cached = self._tokens.get(merchant_id)
        if cached and cached.expires - TOKEN_REFRESH_MARGIN > _now():
            return cached.value
        return None

    def drop_token(self, merchant_id: str) -> None:
        self._tokens.pop(merchant_id, None)

    async def _authorize(self, creds: Credentials) -> _Token:
        date_request = protocol.lima_timestamp(_now())
        body = {
            "accessKey": creds.access_key,
            "idService": creds.service_id,
            "dateRequest": date_request,
            "hashString": protocol.auth_hash(creds.service_id, creds.access_key, creds.secret_key, date_request),
        }
        status, payload = await self._call("POST", "/v1/authorizations", json_body=body, sending=False)
        if status != 201 or payload.get("code") != protocol.OK:
            raise _error_from(status, payload, default=PermanentError)
        data = payload["data"]
        return _Token(value=data["token"], expires=protocol.parse_timestamp(data["tokenExpires"]))

    # --- refunds -------------------------------------------------------------------

    def signed_refund_body(self, creds: Credentials, order: RefundOrder) -> dict:
        fields = {
            "merchantId": order.merchant_id,
            "originalTransactionId": order.original_transaction_id,
            "refundAmount": order.amount.quantize(Decimal("0.01")),
            "currency": order.currency,
            "refundReason": order.reason,
            "externalRef": order.external_ref,
            "notifyUrl": order.notify_url,
            "timestamp": protocol.lima_timestamp(_now()),
        }
        fields = {name: value for name, value in fields.items() if value is not None and value != ""}
        # validated when the merchant was added; the vault's AES-GCM proves it is unchanged
        key = protocol.load_private_key(creds.private_key_pem, validated=True)
        fields["signature"] = protocol.sign_fields(fields, key)
        return fields

    async def request_refund(self, creds: Credentials, order: RefundOrder) -> RefundAnswer:
        """Send one signed refund request. Raises a GatewayError subclass on anything but an answer."""
        if self.skew and abs(self.skew) > protocol.MAX_CLOCK_SKEW:
            raise ClockSkew(f"local clock is {self.skew.total_seconds():.0f}s off the gateway's; refusing to sign")
        return await self._authorized(
            creds, lambda token: self._call(
                "POST", "/v1/refunds", json_body=self.signed_refund_body(creds, order), token=token, sending=True,
            ),
        )

    async def refund_status(self, creds: Credentials, external_ref: str) -> RefundAnswer | None:
        """The gateway's view of a refund, or None when it never saw this externalRef."""
        try:
            return await self._authorized(
                creds, lambda token: self._call(
                    "GET", f"/v1/refunds/{external_ref}", token=token, sending=False,
                    headers={protocol.MERCHANT_HEADER: creds.merchant_id},
                ),
            )
        except PermanentError as exc:
            if exc.code == protocol.TRANSACTION_UNKNOWN or exc.http_status == 404:
                return None
            raise

    async def _authorized(self, creds: Credentials, call) -> RefundAnswer:
        token = await self.token(creds)
        status, payload = await call(token)
        if status == 401 or payload.get("code") == protocol.TOKEN_INVALID:
            self.drop_token(creds.merchant_id)
            status, payload = await call(await self.token(creds))
        if status == 200 and payload.get("code") == protocol.OK:
            data = payload.get("data") or {}
            return RefundAnswer(
                status=data.get("status", ""), refund_id=data.get("refundId"), external_ref=data.get("externalRef", ""),
                code=data.get("reasonCode"), message=data.get("reason"),
            )
        raise _error_from(status, payload, default=PermanentError)

    # --- transport -----------------------------------------------------------------

    async def _call(self, method: str, path: str, *, json_body=None, token=None, headers=None, sending: bool):
        """One HTTP exchange. ``sending``: whether a lost answer leaves the outcome unknown."""
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        data = protocol.dumps(json_body) if json_body is not None else None
        try:
            async with self._session.request(
                method, self.base_url + path, data=data, headers=all_headers, timeout=self._timeout
            ) as response:
                self._observe_date(response.headers.get("Date"))
                raw = await response.read()
                if response.status == 429:
                    retry_after = _retry_after(response.headers.get("Retry-After"))
                    raise RateLimited("gateway rate limit", retry_after=retry_after, http_status=429)
                try:
                    payload = protocol.loads(raw) if raw else {}
                except ValueError:
                    payload = {}
                if not isinstance(payload, dict):
                    payload = {}
                return response.status, payload
        except GatewayError:
            raise
        except aiohttp.ClientConnectorError as exc:
            raise TransientError(f"cannot connect to the gateway: {exc.os_error or exc}") from None
        except (asyncio.TimeoutError, aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                aiohttp.ClientOSError) as exc:
            cls = OutcomeUnknown if sending else TransientError
            raise cls(f"no answer from the gateway ({type(exc).__name__})") from None

    def _observe_date(self, header: str | None) -> None:
        if not header:
            return
        try:
            theirs = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError):
            return
        if theirs.tzinfo is None:
            return
        self.skew = _now() - theirs
        refund_clock_skew_seconds.set(self.skew.total_seconds())

    def _check_environment(self, creds: Credentials) -> None:
        if creds.env != self.env:
            raise EnvironmentMismatch(
                f"merchant {creds.merchant_id} has {creds.env} credentials; this worker talks to {self.env}"
            )


def _error_from(status: int, payload: dict, *, default: type[GatewayError]) -> GatewayError:
    code = str(payload.get("code")) if payload.get("code") is not None else None
    message = payload.get("message") or f"HTTP {status}"
    details = payload.get("data") if isinstance(payload.get("data"), list) else []
    field_name = next((d.get("field") for d in details if isinstance(d, dict) and d.get("field")), None)
    if details and isinstance(details[0], dict) and details[0].get("message"):
        message = f"{message} {details[0]['message']}".strip()
    if status in TRANSIENT_HTTP or code == protocol.INTERNAL_ERROR:
        return TransientError(message, code=code, http_status=status)
    return default(message, code=code, field=field_name, http_status=status)


def _retry_after(header: str | None) -> float:
    try:
        return max(0.0, float(header)) if header else 1.0
    except ValueError:
        return 1.0


def _now() -> datetime:
    return datetime.now(timezone.utc)
