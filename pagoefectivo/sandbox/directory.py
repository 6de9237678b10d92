"""Merchants and paid transactions, read from the project's database on lookup.

The sandbox stands in for PagoEfectivo's own registry: what a merchant registered with the
gateway (service id, access key, secret, public key, notify URL) is the merchants table.
Lookups go to the database every time, except that a found merchant is cached for a couple
of seconds; nothing negative is cached, so merchants and payments added after the sandbox
started are found at once. Only ``sandbox`` merchants exist here: production credentials
are unknown to a sandbox gateway, as they would be to the real one.
"""

from __future__ import annotations

import time

import asyncpg

from refunds import db as dbmod
from refunds.merchants import Merchant, find_merchant
from refunds.payments import Payment, find_payment
from refunds.vault import Vault

ENVIRONMENT = "sandbox"


class Directory:
    def __init__(self, database_url: str, vault: Vault, *, ttl: float = 2.0):
        self._database_url = database_url
        self._vault = vault
        self._ttl = ttl
        self._pool: asyncpg.Pool | None = None
        self._cache: dict[str, tuple[float, Merchant]] = {}

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

    async def merchant(self, merchant_id: str, *, fresh: bool = False) -> Merchant | None:
        """The merchant as registered; ``fresh`` skips the cache (after a key may have rotated)."""
        cached = self._cache.get(merchant_id)
        if cached is not None and not fresh and cached[0] > time.monotonic():
            return cached[1]
        async with self.pool.acquire() as conn:
            merchant = await find_merchant(conn, merchant_id)
        if merchant is None or merchant.env != ENVIRONMENT:
            self._cache.pop(merchant_id, None)
            return None
        self._cache[merchant_id] = (time.monotonic() + self._ttl, merchant)
        return merchant

    async def merchants_by_credentials(self, access_key: str, service_id: int) -> list[Merchant]:
        """The merchants an authorization request may name (read fresh: tokens are rare).

        Usually one; if two merchants share an access key and service, the hashString,
        which includes the secret, tells them apart.
        """
        async with self.pool.acquire() as conn:
            ids = await conn.fetch(
                "SELECT merchant_id FROM merchants WHERE access_key = $1 AND service_id = $2 AND env = $3"
                " ORDER BY merchant_id",
                access_key, service_id, ENVIRONMENT,
            )
        found = [await self.merchant(row["merchant_id"], fresh=True) for row in ids]
        return [merchant for merchant in found if merchant is not None]

    async def payment(self, merchant_id: str, transaction_id: str) -> Payment | None:
        async with self.pool.acquire() as conn:
            return await find_payment(conn, merchant_id, transaction_id)

    def secret_key(self, merchant: Merchant) -> str:
        return merchant.secret_key(self._vault)
