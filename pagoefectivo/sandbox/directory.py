"""Who is registered with the gateway: merchants and their paid transactions.

The sandbox stands in for PagoEfectivo's own registry: what a merchant registered with the
gateway (service id, access key, secret, public key, notify URL, allowed IPs). It comes from
one of two places:

- ``DatabaseDirectory``: the project's ``merchants`` and ``payments`` tables, read on lookup
  (a found merchant is cached for a couple of seconds; nothing negative is cached, so
  merchants and payments added after the sandbox started are found at once);
- ``SeedDirectory``: a seed file (``pagoefectivo.sandbox.seed``), for a sandbox that runs
  beside a deployment with its own database and must not read it.

Only ``sandbox`` merchants exist here: production credentials are unknown to a sandbox
gateway, as they would be to the real one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Protocol

import asyncpg

from refunds import db as dbmod
from refunds.merchants import find_merchant
from refunds.coalesce import Coalescer
from refunds.payments import Payment, find_payments
from refunds.vault import Vault

ENVIRONMENT = "sandbox"
NOTIFY_PATH = "/pagoefectivo/notifications/{merchant_id}"  # README: the receiver's path per merchant


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

    def notify_url_or(self, receiver_base_url: str | None) -> str | None:
        """Its own notify URL, else the receiver's path for this merchant under ``receiver_base_url``."""
        if self.notify_url:
            return self.notify_url
        if receiver_base_url:
            return receiver_base_url.rstrip("/") + NOTIFY_PATH.format(merchant_id=self.merchant_id)
        return None


@dataclass(frozen=True)
class PaidTransaction:
    merchant_id: str
    transaction_id: str
    amount: Decimal
    currency: str
    method: str
    paid_at: datetime


class Directory(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def merchant(self, merchant_id: str, *, fresh: bool = False) -> Registration | None:
        """The merchant as registered; ``fresh`` skips any cache (after a key may have rotated)."""

    async def merchants_by_credentials(self, access_key: str, service_id: int) -> list[Registration]:
        """The merchants an authorization request may name; the hashString tells them apart."""

    async def payment(self, merchant_id: str, transaction_id: str) -> PaidTransaction | None: ...


MAX_KNOWN_PAYMENTS = 200_000  # paid transactions the sandbox keeps in memory


class SeedDirectory:
    """Merchants and payments from a seed file, fixed for the life of the process."""

    def __init__(self, merchants: list[Registration], payments: list[PaidTransaction]):
        self._merchants = {m.merchant_id: m for m in merchants if m.env == ENVIRONMENT}
        self._payments = {(p.merchant_id, p.transaction_id): p for p in payments}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def merchant(self, merchant_id: str, *, fresh: bool = False) -> Registration | None:
        return self._merchants.get(merchant_id)

    async def merchants_by_credentials(self, access_key: str, service_id: int) -> list[Registration]:
        return [m for m in self._merchants.values() if m.access_key == access_key and m.service_id == service_id]

    async def payment(self, merchant_id: str, transaction_id: str) -> PaidTransaction | None:
        return self._payments.get((merchant_id, transaction_id))


class DatabaseDirectory:
    """Merchants and payments from the project's database (secrets opened with the vault)."""

    def __init__(self, database_url: str, vault: Vault, *, ttl: float = 2.0):
        self._database_url = database_url
        self._vault = vault
        self._ttl = ttl
        self._pool: asyncpg.Pool | None = None
        self._cache: dict[str, tuple[float, Registration]] = {}
        self._payments: dict[tuple[str, str], PaidTransaction] = {}
        # the refunds arriving together look up their payments in one statement
        self._lookups: Coalescer[tuple[str, str], Payment | None] = Coalescer(self._find_payments)

    async def start(self) -> None:
        self._pool = await dbmod.create_pool(self._database_url, min_size=1, max_size=5)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the sandbox directory is not started")
        return self._pool

    async def merchant(self, merchant_id: str, *, fresh: bool = False) -> Registration | None:
        cached = self._cache.get(merchant_id)
        if cached is not None and not fresh and cached[0] > time.monotonic():
            return cached[1]
        async with self.pool.acquire() as conn:
            merchant = await find_merchant(conn, merchant_id)
        if merchant is None or merchant.env != ENVIRONMENT:
            self._cache.pop(merchant_id, None)
            return None
        registration = Registration(
            merchant_id=merchant.merchant_id, env=merchant.env, service_id=merchant.service_id,
            access_key=merchant.access_key, public_key_pem=merchant.public_key_pem,
            secret_key=merchant.secret_key(self._vault), notify_url=merchant.notify_url,
        )
        self._cache[merchant_id] = (time.monotonic() + self._ttl, registration)
        return registration

    async def merchants_by_credentials(self, access_key: str, service_id: int) -> list[Registration]:
        """Read fresh: authorizations are rare, and a rotated secret must work at once."""
        async with self.pool.acquire() as conn:
            ids = await conn.fetch(
                "SELECT merchant_id FROM merchants WHERE access_key = $1 AND service_id = $2 AND env = $3"
                " ORDER BY merchant_id",
                access_key, service_id, ENVIRONMENT,
            )
        found = [await self.merchant(row["merchant_id"], fresh=True) for row in ids]
        return [merchant for merchant in found if merchant is not None]

    async def payment(self, merchant_id: str, transaction_id: str) -> PaidTransaction | None:
        """A paid transaction never changes, so one found is kept (a missing one is asked again:
        it may be paid later). The gateway owns its own records; this spares our database."""
        key = (merchant_id, transaction_id)
        known = self._payments.get(key)
        if known is not None:
            return known
        payment = await self._lookups(key)
        if payment is None:
            return None
        if len(self._payments) >= MAX_KNOWN_PAYMENTS:
            self._payments.clear()
        known = self._payments[key] = PaidTransaction(payment.merchant_id, payment.transaction_id, payment.amount,
                                                      payment.currency, payment.method, payment.paid_at)
        return known

    async def _find_payments(self, keys: list[tuple[str, str]]) -> list[Payment | None]:
        async with self.pool.acquire() as conn:
            return await find_payments(conn, keys)
