"""Merchant notification secrets, decrypted once and kept in memory for a short time.

Opening a sealed secret costs two AES-GCM operations and a database read; doing that for
every notification would put the vault on the hot path. Secrets are cached per merchant
for ``ttl`` seconds, so a rotated secret is picked up within that time (sooner: a
signature that fails against a cached secret reloads it once, at most every
``min_reload`` seconds per merchant, so a flood of bad signatures cannot hammer the
database or the vault).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pagoefectivo.protocol import verify_notification
from refunds.merchants import find_merchant
from refunds.vault import Vault

from refunds.database import Database


@dataclass(frozen=True)
class MerchantKeys:
    merchant_id: str
    # Every secret a notification may be signed with. Today one; during a secret rotation
    # overlap the old one would be added here (the merchants table does not keep it yet).
    secrets: tuple[str, ...] = field(repr=False)
    loaded_at: float

    def verifies(self, body: bytes, signature: str | None) -> bool:
        # check every candidate (no early exit) so timing does not tell which one matched
        results = [verify_notification(body, signature, secret) for secret in self.secrets]
        return any(results)


class KeyCache:
    def __init__(self, database: Database, vault: Vault, *, ttl: float = 60.0, min_reload: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self._database = database
        self._vault = vault
        self._ttl = ttl
        self._min_reload = min_reload
        self._clock = clock
        self._entries: dict[str, MerchantKeys] = {}

    async def get(self, merchant_id: str) -> MerchantKeys | None:
        """The merchant's keys, or None when there is no such merchant (not cached).

        Raises ``Unavailable`` when it must ask the database and cannot, and
        ``refunds.errors.VaultError`` when a sealed secret does not open.
        """
        entry = self._entries.get(merchant_id)
        if entry is not None and self._clock() - entry.loaded_at < self._ttl:
            return entry
        return await self._load(merchant_id)

    async def reload_if_stale(self, merchant_id: str) -> MerchantKeys | None:
        """Reload after a signature mismatch, unless the cached keys are very fresh."""
        entry = self._entries.get(merchant_id)
        if entry is not None and self._clock() - entry.loaded_at < self._min_reload:
            return None
        return await self._load(merchant_id)

    def forget(self, merchant_id: str | None = None) -> None:
        if merchant_id is None:
            self._entries.clear()
        else:
            self._entries.pop(merchant_id, None)

    async def _load(self, merchant_id: str) -> MerchantKeys | None:
        async with self._database.connection() as conn:
            merchant = await find_merchant(conn, merchant_id)
        if merchant is None:
            self._entries.pop(merchant_id, None)
            return None
        entry = MerchantKeys(merchant_id, (merchant.secret_key(self._vault),), self._clock())
        self._entries[merchant_id] = entry
        return entry
