"""PagoEfectivo client: authorization tokens, signed refund requests, refund status.

One client per process, shared by all merchants; an aiohttp session is passed in so
that its owner (the worker's boot hook) opens and closes it on the right event loop.

What it guarantees before anything leaves the process:
- the base URL belongs to the client's environment (sandbox credentials never reach
  ``services.pagoefectivo.pe``, production ones never reach ``pre1a``), checked at
  construction, and each merchant's credentials belong to it too, checked per call;
- the local clock agrees with the gateway's ``Date`` header within 5 minutes, because a
  request signed with a wrong clock is refused (606) or, worse, looks like a new request.

Every answer that is not a success becomes one class of ``pagoefectivo.errors``.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from functools import cached_property
from urllib.parse import urlsplit

import aiohttp
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import Gauge

from . import protocol
from .errors import (
    ClockSkew, EnvironmentMismatch, GatewayError, OutcomeUnknown, PermanentError, RateLimited, TransientError,
)

log = logging.getLogger(__name__)

TOKEN_REFRESH_MARGIN = timedelta(minutes=5)
TRANSIENT_HTTP = frozenset({500, 502, 503, 504})
# Answers to a refund request, without the gateway's envelope, after which it may have been executed.
SERVER_ERRORS_IN_FLIGHT = frozenset({500, 502, 504})
# Sent on every call: Origin is mandatory after the authorization (API CIP 1.1 §5.1.2, p. 8) and our
# refund calls follow those rules; Accept-Language is optional there and asks for the published texts.
STANDARD_HEADERS = {
    "Content-Type": "application/json",
    protocol.ORIGIN_HEADER: protocol.SERVER_ORIGIN,
    protocol.LANGUAGE_HEADER: "es-PE",
}
# A skew measurement refuses requests for this long; then one request may go out and measure again.
SKEW_RECHECK_SECONDS = 60.0
DEFAULT_RETRY_AFTER = 1.0
PAGOEFECTIVO_DOMAIN = "pagoefectivo.pe"

refund_clock_skew_seconds = Gauge(
    "refund_clock_skew_seconds", "Local clock minus the gateway's Date header", multiprocess_mode="max"
)

Answer = tuple[int, dict | None]  # HTTP status, and the envelope (None when the body is not one)


@dataclass(frozen=True)
class Credentials:
    merchant_id: str
    env: str
    service_id: int
    access_key: str
    secret_key: str = field(repr=False)
    private_key_pem: bytes = field(repr=False)

    @cached_property
    def signing_key(self) -> rsa.RSAPrivateKey:
        """The parsed private key, once per Credentials: parsing costs as much as signing. Not
        re-validated: it was validated when the merchant was added, and the vault's AES-GCM
        proves it is unchanged."""
        return protocol.load_private_key(self.private_key_pem, validated=True)


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
    value: str = field(repr=False)
    expires: datetime  # local clock


def gateway_environment(base_url: str) -> str | None:
    """``production`` or ``sandbox`` for PagoEfectivo's own hosts, None for any other host.

    PagoEfectivo's pre-production hosts start with ``pre`` (``pre1a.services.pagoefectivo.pe``);
    every other host under ``pagoefectivo.pe`` is taken as production, so that an unknown
    production host can never receive sandbox credentials.
    """
    host = (urlsplit(base_url).hostname or "").rstrip(".").lower()
    if host == PAGOEFECTIVO_DOMAIN or host.endswith("." + PAGOEFECTIVO_DOMAIN):
        return "sandbox" if host.split(".")[0].startswith("pre") else "production"
    return None


def check_gateway_url(env: str, base_url: str) -> None:
    """Refuse a base URL of the other environment (EnvironmentMismatch), before any network call.

    A ``sandbox`` client may talk to PagoEfectivo's pre-production or to any other host (a
    local sandbox gateway); a ``production`` client only over https, and never to a
    pre-production host.
    """
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the gateway base URL must be an http(s) URL, not {base_url!r}")
    found = gateway_environment(base_url)
    if env == "sandbox" and found == "production":
        raise EnvironmentMismatch(
            f"this client is configured for sandbox but {parts.hostname} is PagoEfectivo production;"
            " set PAGOEFECTIVO_ENV=production or point PAGOEFECTIVO_BASE_URL at the sandbox")
    if env == "production" and found == "sandbox":
        raise EnvironmentMismatch(
            f"this client is configured for production but {parts.hostname} is PagoEfectivo's sandbox;"
            " set PAGOEFECTIVO_ENV=sandbox or point PAGOEFECTIVO_BASE_URL at production")
    if env == "production" and parts.scheme != "https":
        raise EnvironmentMismatch(
            f"production credentials go only over https, not to {parts.scheme}://{parts.hostname}")


# Called after each exchange as hook(method, path, request body, status, response body, headers=...):
# the owner decides whether and how bodies are logged (redacted); the client logs no bodies itself.
ExchangeHook = Callable[..., None]


class PagoEfectivoClient:
    def __init__(self, session: aiohttp.ClientSession, *, base_url: str, env: str, timeout: float = 10.0,
                 on_exchange: ExchangeHook | None = None):
        if env not in ("sandbox", "production"):
            raise ValueError(f"unknown environment {env!r}")
        check_gateway_url(env, base_url)
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._env = env
        self._on_exchange = on_exchange
        connect = min(timeout, 3.0)
        # connect/sock_connect: a timeout there means nothing was sent (transient); any other is unknown
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=connect, sock_connect=connect)
        self._tokens: dict[str, _Token] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._skew: timedelta | None = None
        self._skew_measured_at = 0.0  # monotonic

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def env(self) -> str:
        return self._env

    @property
    def skew(self) -> timedelta:
        """Local clock minus the gateway's, from the last answer's Date header (0 before any)."""
        return self._skew or timedelta(0)

    # --- authorization -------------------------------------------------------------

    async def token(self, creds: Credentials) -> str:
        """A cached token, refreshed 5 minutes before expiry; one refresh per merchant at a time."""
        self._check_environment(creds)
        if (cached := self._fresh_token(creds.merchant_id)) is not None:
            return cached
        async with self._locks.setdefault(creds.merchant_id, asyncio.Lock()):
            if (cached := self._fresh_token(creds.merchant_id)) is not None:
                return cached  # another caller refreshed it while this one waited
            fresh = await self._authorize(creds)
            self._tokens[creds.merchant_id] = fresh
            return fresh.value

    def _fresh_token(self, merchant_id: str) -> str | None:
        cached = self._tokens.get(merchant_id)
        if cached and cached.expires - TOKEN_REFRESH_MARGIN > _now():
            return cached.value
        return None

    def drop_token(self, merchant_id: str, token: str | None = None) -> None:
        """Forget a merchant's token; with ``token``, only if it is still that one (so that
        callers refused with the same old token share a single refresh)."""
        cached = self._tokens.get(merchant_id)
        if cached is not None and (token is None or cached.value == token):
            del self._tokens[merchant_id]

    async def _authorize(self, creds: Credentials) -> _Token:
        asked_at = _now()
        date_request = protocol.lima_timestamp(asked_at)
        body = {
            "accessKey": creds.access_key,
            "idService": creds.service_id,
            "dateRequest": date_request,
            "hashString": protocol.auth_hash(creds.service_id, creds.access_key, creds.secret_key, date_request),
        }
        status, payload = await self._call("POST", protocol.AUTHORIZATIONS_PATH, json_body=body, sending=False,
                                           timed=True)
        if status not in (200, 201) or payload is None or payload.get("code") != protocol.OK:
            raise _error_from(status, payload, sending=False)
        data = payload.get("data")
        try:
            if not isinstance(data, dict):
                raise ValueError("no data")
            expires = protocol.parse_timestamp(data["tokenExpires"])
            start = protocol.parse_timestamp(data["tokenStart"]) if data.get("tokenStart") else None
            value = data["token"]
            if not isinstance(value, str) or not value:
                raise ValueError("no token")
        except (KeyError, TypeError, ValueError):
            raise TransientError("the authorization answer has no readable token", http_status=status) from None
        # the lifetime, measured on the gateway's clock, is counted from the local moment of asking
        expires_local = asked_at + (expires - start) if start is not None else expires + self.skew
        return _Token(value=value, expires=expires_local)

    # --- refunds -------------------------------------------------------------------

    def signed_refund_body(self, creds: Credentials, order: RefundOrder) -> dict:
        """The signed body, timestamped now (the modelled format lives in ``protocol``)."""
        return protocol.signed_refund_request(
            merchant_id=order.merchant_id, original_transaction_id=order.original_transaction_id,
            amount=order.amount, currency=order.currency, external_ref=order.external_ref,
            notify_url=order.notify_url, reason=order.reason, moment=_now(),
            private_key=creds.signing_key,
        )

    async def request_refund(self, creds: Credentials, order: RefundOrder, *,
                             before_send: Callable[[], Awaitable[None]] | None = None) -> RefundAnswer:
        """Send one signed refund request. Raises a GatewayError subclass on anything but an answer.

        ``before_send`` is awaited once the request is ready (token, signature), just before it
        leaves, for each request sent: the caller's rate limit counts the request there, so that
        the time spent getting ready never bunches requests at the gateway. What it raises
        propagates; nothing was sent."""
        return await self._authorized(
            creds, lambda token: self._call(
                "POST", protocol.REFUNDS_PATH, json_body=lambda: self.signed_refund_body(creds, order), token=token,
                sending=True, timed=True, before_send=before_send,
            ),
            sending=True,
        )

    async def refund_status(self, creds: Credentials, external_ref: str) -> RefundAnswer | None:
        """The gateway's view of a refund, or None when it never saw this externalRef."""
        try:
            return await self._authorized(
                creds, lambda token: self._call(
                    "GET", protocol.refund_status_path(external_ref), token=token, sending=False, timed=False,
                    headers={protocol.MERCHANT_HEADER: creds.merchant_id},
                ),
                sending=False,
            )
        except PermanentError as exc:
            if exc.code == protocol.TRANSACTION_UNKNOWN:
                return None
            raise

    async def _authorized(self, creds: Credentials, call: Callable[[str], Awaitable[Answer]], *,
                          sending: bool) -> RefundAnswer:
        """``call`` with the merchant's token; a 401/508 drops it, refreshes once and retries once."""
        token = await self.token(creds)
        status, payload = await call(token)
        if status == 401 or (payload is not None and payload.get("code") == protocol.TOKEN_INVALID):
            self.drop_token(creds.merchant_id, token)
            status, payload = await call(await self.token(creds))
        if 200 <= status < 300 and payload is not None and payload.get("code") == protocol.OK:
            data = payload.get("data")
            if isinstance(data, dict):
                return RefundAnswer(**protocol.refund_answer(data))
        raise _error_from(status, payload, sending=sending)

    # --- transport -----------------------------------------------------------------

    async def _call(self, method: str, path: str, *, json_body=None, token: str | None = None,
                    headers: dict | None = None, sending: bool, timed: bool,
                    before_send: Callable[[], Awaitable[None]] | None = None) -> Answer:
        """One HTTP exchange.

        ``sending``: a lost answer leaves the outcome unknown (the request changes something).
        ``timed``: the body carries a signed time, so a known clock skew refuses it here, and
        an error answer while the skew shows is reported as ClockSkew. ``json_body`` may be a
        callable, so that the body is signed only after the clock check.
        """
        if timed:
            self._refuse_if_skewed()
        if callable(json_body):
            json_body = json_body()
        all_headers = {**STANDARD_HEADERS, **(headers or {})}
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        data = protocol.dumps(json_body) if json_body is not None else None
        if before_send is not None:
            await before_send()
        try:
            async with self._session.request(
                method, self._base_url + path, data=data, headers=all_headers, timeout=self._timeout
            ) as response:
                gateway_now = self._observe_date(response.headers.get("Date"))
                raw = await response.read()
                status = response.status
                payload = _envelope(raw)
                if self._on_exchange is not None:
                    self._on_exchange(method, path, json_body, status, payload, headers=all_headers)
                if timed and not 200 <= status < 300 and self._skewed():
                    raise self._clock_skew(code=payload.get("code") if payload else None, http_status=status)
                if status == 429:
                    retry_after = _retry_after(response.headers.get("Retry-After"), gateway_now)
                    raise RateLimited(f"over the merchant's rate at the gateway; retry after {retry_after:g}s",
                                      retry_after=retry_after, http_status=429,
                                      code=payload.get("code") if payload else None)
                return status, payload
        except GatewayError:
            raise
        except aiohttp.ClientConnectorError as exc:  # refused, DNS, TLS: nothing was sent
            raise TransientError(f"cannot connect to the gateway: {exc.os_error or exc}") from None
        except aiohttp.ConnectionTimeoutError:
            raise TransientError("timed out connecting to the gateway") from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            # read timeout, dropped connection, reset: the request may have been written
            kind = "timed out" if isinstance(exc, asyncio.TimeoutError) else f"lost ({type(exc).__name__})"
            if sending:
                raise OutcomeUnknown(f"the gateway's answer {kind} after the request was sent") from None
            raise TransientError(f"the gateway's answer {kind}") from None

    # --- clock skew ----------------------------------------------------------------

    def _observe_date(self, header: str | None) -> datetime | None:
        """Measure the skew from the gateway's Date header; returns the gateway's time."""
        if not header:
            return None
        try:
            theirs = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError, IndexError):
            return None
        if theirs.tzinfo is None:
            return None
        was_skewed = self._skewed()
        self._skew = _now() - theirs
        self._skew_measured_at = time.monotonic()
        refund_clock_skew_seconds.set(self._skew.total_seconds())
        if self._skewed() and not was_skewed:
            log.error("local clock is %+.0fs off the gateway's (Date header); signed requests are refused"
                      " until it is within %ds", self._skew.total_seconds(), protocol.MAX_CLOCK_SKEW.total_seconds())
        elif was_skewed and not self._skewed():
            log.warning("local clock agrees with the gateway's again (%+.0fs)", self._skew.total_seconds())
        return theirs

    def _skewed(self) -> bool:
        return self._skew is not None and abs(self._skew) > protocol.MAX_CLOCK_SKEW

    def _refuse_if_skewed(self) -> None:
        if self._skewed() and time.monotonic() - self._skew_measured_at < SKEW_RECHECK_SECONDS:
            raise self._clock_skew()

    def _clock_skew(self, *, code: str | None = None, http_status: int | None = None) -> ClockSkew:
        seconds = self.skew.total_seconds()
        direction = "ahead of" if seconds > 0 else "behind"
        return ClockSkew(
            f"local clock is {abs(seconds):.0f}s {direction} the gateway's (its Date header); signed requests"
            f" are refused beyond {protocol.MAX_CLOCK_SKEW.total_seconds():.0f}s: fix the host's time (NTP)",
            skew_seconds=seconds, code=code, http_status=http_status,
        )

    def _check_environment(self, creds: Credentials) -> None:
        if creds.env != self._env:
            raise EnvironmentMismatch(
                f"merchant {creds.merchant_id} has {creds.env} credentials; this worker talks to {self._env}"
            )


def _envelope(raw: bytes) -> dict | None:
    """The published envelope, or None when the body is not one (a proxy's page, an empty body)."""
    try:
        payload = protocol.loads(raw) if raw else None
    except (ValueError, RecursionError):
        return None
    if not isinstance(payload, dict) or payload.get("code") in (None, ""):
        return None
    payload["code"] = str(payload["code"])
    return payload


# What each code means, whatever the HTTP status it arrives with (``pagoefectivo.errors``
# explains the classes). A code not in the table is judged by the HTTP status alone.
CODE_CLASSES: dict[str, type[GatewayError]] = {
    # success, yet not read as one (a non-2xx status, or no data): it may have been executed
    protocol.OK: OutcomeUnknown,
    protocol.INVALID_DATA: PermanentError,
    protocol.REQUIRED: PermanentError,
    protocol.INVALID_VALUE: PermanentError,
    protocol.INTERNAL_ERROR: TransientError,
    protocol.TOKEN_INVALID: PermanentError,  # raised once it survived one refresh and one retry
    protocol.CIP_AMOUNT_OVER_MAXIMUM: PermanentError,
    protocol.AMOUNT_OVER_REFUNDABLE: PermanentError,
    protocol.REFUND_WINDOW_CLOSED: PermanentError,
    protocol.TRANSACTION_UNKNOWN: PermanentError,
    protocol.EXTERNAL_REF_REUSED: PermanentError,
    protocol.SIGNATURE_INVALID: PermanentError,
    protocol.TIMESTAMP_OUT_OF_TOLERANCE: PermanentError,  # ClockSkew instead when the Date header shows one
    protocol.SOURCE_IP_NOT_ALLOWED: PermanentError,
    protocol.RATE_LIMITED: RateLimited,
}


def _error_from(status: int, payload: dict | None, *, sending: bool) -> GatewayError:
    """The error class for an answer that is not a success (see ``pagoefectivo.errors``)."""
    if payload is None:
        if 200 <= status < 300:
            cls = OutcomeUnknown if sending else TransientError
            return cls(f"HTTP {status} with an unreadable body", http_status=status)
        if sending and status in SERVER_ERRORS_IN_FLIGHT:
            # a proxy that forwarded the request and lost or timed out on the answer, or the
            # gateway failing before its envelope: the request may have been executed
            return OutcomeUnknown(f"HTTP {status} without the gateway's envelope after the request was sent",
                                  http_status=status)
        # not the gateway speaking (a proxy's refusal, a wrong URL, 503 unavailable): nothing was executed
        return TransientError(f"HTTP {status} without the gateway's envelope", http_status=status)
    code = payload["code"]
    data = payload.get("data")
    details = [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []
    message = str(payload.get("message") or f"HTTP {status}")
    explained = "; ".join(_explained(d) for d in details if d.get("message") or d.get("field"))
    if explained:
        message = f"{message} {explained}"
    field_name = next((str(d["field"]) for d in details if d.get("field")), None)
    kwargs = {"code": code, "field": field_name, "http_status": status, "details": details}
    cls = CODE_CLASSES.get(code)
    if cls is None:
        cls = TransientError if status in TRANSIENT_HTTP else PermanentError
    if cls is OutcomeUnknown:
        cls = OutcomeUnknown if sending else TransientError
        return cls(f"HTTP {status} code {code} without a readable success: {message}", **kwargs)
    if cls is RateLimited:
        return RateLimited(message, retry_after=DEFAULT_RETRY_AFTER, **kwargs)
    return cls(message, **kwargs)


def _explained(detail: dict) -> str:
    """One item of the envelope's data as ``field: message``."""
    text = str(detail.get("message") or detail.get("code") or "")
    return f"{detail['field']}: {text}" if detail.get("field") else text


def _retry_after(header: str | None, gateway_now: datetime | None) -> float:
    """Retry-After as seconds or as an HTTP date (counted on the gateway's clock)."""
    if not header:
        return DEFAULT_RETRY_AFTER
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError, IndexError):
        return DEFAULT_RETRY_AFTER
    if when.tzinfo is None:
        return DEFAULT_RETRY_AFTER
    return max(0.0, (when - (gateway_now or _now())).total_seconds())


def _now() -> datetime:
    return datetime.now(timezone.utc)
