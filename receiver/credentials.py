"""Merchant notification secrets, decrypted once and kept in memory for a short time.

Opening a sealed secret costs two AES-GCM operations and a database read; doing that for
every notification would put the vault on the hot path. Secrets are cached per merchant
for ``ttl`` seconds, so a rotated secret is picked up within that time (sooner: a
signature that fails against a cached secret reloads it once, at most every
``min_reload`` seconds per merchant, so a flood of bad signatures cannot hammer the
database or the vault). While Postgres cannot answer, a merchant's expired entry keeps being
used, so that a notification it signs can still be verified and journalled (``journal``).

During a secret rotation PagoEfectivo may still sign with the old secret for a while, so a
merchant has up to two secrets: the current one, and the previous one with the moment its
overlap ends. The end is checked on every verification (wall clock), not only when the
cache is filled, so the old secret stops working on time even while it is cached.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pagoefectivo.protocol import verify_notification
from refunds.database import Database, Unavailable
from refunds.merchants import find_merchant
from refunds.vault import Vault


@dataclass(frozen=True)
class Secret:
    value: str = field(repr=False)
    valid_until: datetime | None = None  # None: the current secret; else the end of a rotation overlap

    def usable(self, now: datetime) -> bool:
        return self.valid_until is None or now < self.valid_until


# merchant id -> every secret a notification may be signed with (current first), or None: no such merchant
Loader = Callable[[str], Awaitable["tuple[Secret, ...] | None"]]


@dataclass(frozen=True)
class MerchantKeys:
    merchant_id: str
    secrets: tuple[Secret, ...] = field(repr=False)
    loaded_at: float

    def verifies(self, body: bytes, signature: str | None, now: datetime | None = None) -> bool:
        now = now or datetime.now(timezone.utc)
        # check every usable candidate (no early exit) so timing does not tell which one matched
        results = [verify_notification(body, signature, secret.value) for secret in self.secrets if secret.usable(now)]
        return any(results)


class KeyCache:
    def __init__(self, loader: Loader, *, ttl: float = 60.0, min_reload: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self._loader = loader
        self._ttl = ttl
        self._min_reload = min_reload
        self._clock = clock
        self._entries: dict[str, MerchantKeys] = {}

    @classmethod
    def from_database(cls, database: Database, vault: Vault, **options) -> KeyCache:
        return cls(database_loader(database, vault), **options)

    async def get(self, merchant_id: str) -> MerchantKeys | None:
        """The merchant's keys, or None when there is no such merchant (not cached).

        Past ``ttl`` they are read again; while the database cannot answer, the expired ones
        are used. Raises ``Unavailable`` when it must ask the database, cannot, and has none; and
        ``refunds.errors.VaultError`` when a sealed secret does not open.
        """
        entry = self._entries.get(merchant_id)
        if entry is not None and self._clock() - entry.loaded_at < self._ttl:
            return entry
        try:
            return await self._load(merchant_id)
        except Unavailable:
            if entry is None:
                raise
            return entry  # Postgres is away: the secrets we had still verify (and the journal keeps it)

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
        secrets = await self._loader(merchant_id)
        if secrets is None:
            self._entries.pop(merchant_id, None)
            return None
        entry = MerchantKeys(merchant_id, tuple(secrets), self._clock())
        self._entries[merchant_id] = entry
        return entry


def database_loader(database: Database, vault: Vault) -> Loader:
    """Secrets from the merchants table (the previous one while its overlap lasts), opened with the vault."""

    async def load(merchant_id: str) -> tuple[Secret, ...] | None:
        async with database.connection() as conn:
            merchant = await find_merchant(conn, merchant_id)
        if merchant is None:
            return None
        current, *previous = merchant.notification_secrets(vault)
        return (Secret(current), *(Secret(value, merchant.previous_secret_valid_until) for value in previous))

    return load
