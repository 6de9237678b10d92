"""Onboarding a merchant with a sandbox gateway: what a marketplace hands PagoEfectivo.

The sandbox keeps its own registry, as PagoEfectivo does, so the demo, the benchmarks and
the tests register each merchant on both sides: in our store (``refundctl merchants add``)
and with the gateway (``PUT /sandbox/merchants/{merchantId}``, docs/PROTOCOL.md). Payments
made before a run are recorded with the gateway the same way (``POST /sandbox/payments``).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from decimal import Decimal

import aiohttp

from pagoefectivo import protocol
from refunds import db
from refunds.merchants import Merchant, list_merchants
from refunds.service import Unavailable
from refunds.vault import Vault


def registration(merchant: Merchant, vault: Vault, *, receiver_url: str | None = None) -> dict:
    """What the merchant hands the gateway: service, access key, secret, public key, notify URL."""
    return {"env": merchant.env, "serviceId": merchant.service_id, "accessKey": merchant.access_key,
            "secretKey": merchant.secret_key(vault), "publicKeyPem": merchant.public_key_pem,
            "notifyUrl": merchant.notify_url_or(receiver_url)}


# A route only the sandbox gateway has (PagoEfectivo has no /sandbox/ routes): GET answers its fault
# knobs as a JSON object. Asked before a merchant's secret goes anywhere.
SANDBOX_PROBE = "/sandbox/chaos"


class NotSandbox(RuntimeError):
    """The URL answers, but not as the sandbox gateway: a wrong --sandbox-url or PAGOEFECTIVO_BASE_URL
    (the real PagoEfectivo host, say). A RuntimeError like the gateway's refusals: the same exit 2."""


async def _json_answer(response: aiohttp.ClientResponse, url: str):
    """The JSON a sandbox route answers; anything else (an HTML page, an empty body) named by URL
    and HTTP status: Unavailable for a 5xx (a proxy with the sandbox away: try again), else NotSandbox."""
    raw = await response.read()
    try:
        return protocol.loads(raw)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        pass
    said = f"{url} answered HTTP {response.status} ({response.content_type}, {len(raw)} bytes), not JSON"
    if response.status >= 500:
        raise Unavailable(f"sandbox gateway: {said}")
    raise NotSandbox(f"{said}: not a sandbox gateway (see --sandbox-url or PAGOEFECTIVO_BASE_URL)")


async def check_sandbox(http: aiohttp.ClientSession, sandbox_url: str) -> None:
    """Refuse ``sandbox_url`` unless it answers as the sandbox gateway does, before any secret is sent."""
    url = f"{sandbox_url.rstrip('/')}{SANDBOX_PROBE}"
    async with http.get(url, allow_redirects=False) as response:
        knobs = await _json_answer(response, url)
        if response.status >= 500:
            raise Unavailable(f"sandbox gateway: {url} answered HTTP {response.status}")
        if response.status != 200 or not isinstance(knobs, dict) or "error_rate" not in knobs:
            raise NotSandbox(f"{url} answered HTTP {response.status}, not the sandbox's fault knobs: not a sandbox"
                             " gateway (see --sandbox-url or PAGOEFECTIVO_BASE_URL)")


async def onboard(http: aiohttp.ClientSession, sandbox_url: str, merchant: Merchant, vault: Vault, *,
                  receiver_url: str | None = None) -> dict:
    """Register (or re-register, after a key rotation) ``merchant`` with the sandbox gateway. The
    secret goes only to a URL that answers as the sandbox does (``check_sandbox``), never followed
    through a redirect."""
    await check_sandbox(http, sandbox_url)
    url = f"{sandbox_url.rstrip('/')}/sandbox/merchants/{merchant.merchant_id}"
    body = protocol.dumps(registration(merchant, vault, receiver_url=receiver_url))
    async with http.put(url, data=body, headers={"Content-Type": "application/json"},
                        allow_redirects=False) as response:
        answer = await _json_answer(response, url)
        if response.status >= 500:
            raise Unavailable(f"sandbox gateway: {url} answered HTTP {response.status}: {answer}")
        if response.status not in (200, 201):
            raise RuntimeError(f"the sandbox refused merchant {merchant.merchant_id}: {answer}")
        return answer


async def record_paid(http: aiohttp.ClientSession, sandbox_url: str, *, merchant_id: str, transaction_id: str,
                      amount: Decimal, currency: str, method: str, paid_at: datetime, notify: bool = False) -> None:
    """Tell the gateway of a payment made before this run, under ``transaction_id``."""
    body = protocol.dumps({"merchantId": merchant_id, "transactionId": transaction_id,
                           "transactionCode": transaction_id, "amount": str(amount), "currency": currency,
                           "method": method, "paidAt": protocol.lima_timestamp(paid_at), "notify": notify})
    async with http.post(f"{sandbox_url.rstrip('/')}/sandbox/payments", data=body,
                         headers={"Content-Type": "application/json"}) as response:
        if response.status != 200:
            raise RuntimeError(f"the sandbox refused payment {merchant_id}/{transaction_id}: "
                               f"{(await response.read()).decode(errors='replace')}")


async def tell_of_store(database_url: str, vault: Vault, sandbox_url: str, *, receiver_url: str | None = None,
                        concurrency: int = 16) -> tuple[int, int]:
    """Onboard every sandbox merchant in our store with a freshly started sandbox gateway and
    record every payment we hold there, as if each had been made through it: the setup of runs
    whose store was seeded directly (benchmarks, whole-system tests). Returns (merchants, payments)."""
    conn = await db.connect(database_url)
    try:
        merchants = [m for m in await list_merchants(conn) if m.env == "sandbox"]
        known = {m.merchant_id for m in merchants}
        payments = [p for p in await conn.fetch(
            "SELECT merchant_id, transaction_id, amount, currency, method, paid_at FROM payments") if
            p["merchant_id"] in known]
    finally:
        await conn.close()
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as http:
        for merchant in merchants:
            await onboard(http, sandbox_url, merchant, vault, receiver_url=receiver_url)

        async def one(payment) -> None:
            async with gate:
                await record_paid(http, sandbox_url, **dict(payment))

        await asyncio.gather(*(one(p) for p in payments))
    return len(merchants), len(payments)

