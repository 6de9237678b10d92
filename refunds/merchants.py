"""Marketplace sellers and their PagoEfectivo credentials (sealed by the vault)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import asyncpg

from .errors import NotFound
from .vault import Vault

ENVIRONMENTS = ("sandbox", "production")
REFUND_MODES = ("auto", "approval", "off")
NOTIFY_PATH = "/pagoefectivo/notifications/{merchant_id}"


def sealed_identity(merchant_id: str, what: str) -> str:
    """What a sealed value of this merchant is bound to (the vault's associated data), so a value
    copied to another merchant or field does not open; refunds.rekey re-wraps by it."""
    return f"merchant:{merchant_id}:{what}"


@dataclass(frozen=True)
class Merchant:
    merchant_id: str
    env: str
    service_id: int
    access_key: str
    public_key_pem: str
    rate_limit: Decimal
    approval_threshold: Decimal | None
    refund_mode: str
    notify_url: str | None
    secret_key_sealed: bytes = field(repr=False)
    private_key_sealed: bytes = field(repr=False)
    previous_secret_key_sealed: bytes | None = field(default=None, repr=False)
    previous_secret_valid_until: datetime | None = None

    @classmethod
    def from_row(cls, row: Mapping) -> "Merchant":
        """From a merchants row, or the row as a composite value (``SELECT m FROM merchants m``)."""
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})

    def secret_key(self, vault: Vault) -> str:
        return vault.open(self.secret_key_sealed, sealed_identity(self.merchant_id, "secret_key")).decode()

    def notification_secrets(self, vault: Vault, now: datetime | None = None) -> tuple[str, ...]:
        """Secrets a notification may be signed with: the current one, and the previous one
        until the rotation overlap ends."""
        secrets_ = [self.secret_key(vault)]
        now = now or datetime.now(timezone.utc)
        if self.previous_secret_key_sealed and self.previous_secret_valid_until and now < self.previous_secret_valid_until:
            secrets_.append(vault.open(self.previous_secret_key_sealed,
                                       sealed_identity(self.merchant_id, "previous_secret_key")).decode())
        return tuple(secrets_)

    def private_key_pem(self, vault: Vault) -> bytes:
        return vault.open(self.private_key_sealed, sealed_identity(self.merchant_id, "private_key"))

    def gateway_credentials(self, vault: Vault) -> dict:
        """The fields of the gateway client's ``Credentials``, secrets opened now (the caller
        builds the provider's type, so the core does not depend on the provider)."""
        return {"merchant_id": self.merchant_id, "env": self.env, "service_id": self.service_id,
                "access_key": self.access_key, "secret_key": self.secret_key(vault),
                "private_key_pem": self.private_key_pem(vault)}

    def notify_url_or(self, receiver_base_url: str | None) -> str | None:
        """The merchant's own notify URL, else the receiver's path for this merchant."""
        if self.notify_url:
            return self.notify_url
        if receiver_base_url:
            return receiver_base_url.rstrip("/") + NOTIFY_PATH.format(merchant_id=self.merchant_id)
        return None

    def public_view(self) -> dict:
        return {
            "merchant_id": self.merchant_id,
            "env": self.env,
            "service_id": self.service_id,
            "access_key": self.access_key,
            "rate_limit": str(self.rate_limit),
            "approval_threshold": None if self.approval_threshold is None else str(self.approval_threshold),
            "refund_mode": self.refund_mode,
            "notify_url": self.notify_url,
        }


_COLUMNS = (
    "merchant_id, env, service_id, access_key, public_key_pem, rate_limit, approval_threshold,"
    " refund_mode, notify_url, secret_key_sealed, private_key_sealed, previous_secret_key_sealed,"
    " previous_secret_valid_until"
)


async def add_merchant(
    conn: asyncpg.Connection,
    vault: Vault,
    *,
    merchant_id: str,
    env: str,
    service_id: int,
    access_key: str,
    secret_key: str,
    private_key_pem: bytes,
    public_key_pem: str,
    rate_limit: Decimal = Decimal(10),
    approval_threshold: Decimal | None = None,
    refund_mode: str = "auto",
    notify_url: str | None = None,
) -> Merchant:
    """Insert or update a merchant; secrets are sealed before they reach the database.

    Adding a merchant again replaces its credentials (moving it from sandbox to production, say):
    a previous secret left by a rotation (``rotate_secret``) goes too, so the old credentials
    verify nothing more."""
    row = await conn.fetchrow(
        f"""INSERT INTO merchants ({_COLUMNS})
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, NULL, NULL)
            ON CONFLICT (merchant_id) DO UPDATE SET
              env = EXCLUDED.env, service_id = EXCLUDED.service_id, access_key = EXCLUDED.access_key,
              public_key_pem = EXCLUDED.public_key_pem, rate_limit = EXCLUDED.rate_limit,
              approval_threshold = EXCLUDED.approval_threshold, refund_mode = EXCLUDED.refund_mode,
              notify_url = EXCLUDED.notify_url, secret_key_sealed = EXCLUDED.secret_key_sealed,
              private_key_sealed = EXCLUDED.private_key_sealed,
              previous_secret_key_sealed = NULL, previous_secret_valid_until = NULL, updated_at = now()
            RETURNING {_COLUMNS}""",
        merchant_id, env, service_id, access_key, public_key_pem, rate_limit, approval_threshold,
        refund_mode, notify_url,
        vault.seal(secret_key.encode(), sealed_identity(merchant_id, "secret_key")),
        vault.seal(private_key_pem, sealed_identity(merchant_id, "private_key")),
    )
    return Merchant(**row)


async def find_merchant(conn: asyncpg.Connection, merchant_id: str) -> Merchant | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM merchants WHERE merchant_id = $1", merchant_id)
    return Merchant(**row) if row else None


async def get_merchant(conn: asyncpg.Connection, merchant_id: str) -> Merchant:
    merchant = await find_merchant(conn, merchant_id)
    if merchant is None:
        raise NotFound(f"merchant {merchant_id!r} does not exist")
    return merchant


async def list_merchants(conn: asyncpg.Connection) -> list[Merchant]:
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM merchants ORDER BY merchant_id")
    return [Merchant(**row) for row in rows]


async def rotate_secret(
    conn: asyncpg.Connection, vault: Vault, merchant_id: str, new_secret: str, *, overlap: timedelta
) -> datetime:
    """Make ``new_secret`` current; the old one keeps verifying notifications for ``overlap``."""
    if not new_secret:
        raise ValueError("the new secret is empty")
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT secret_key_sealed FROM merchants WHERE merchant_id = $1 FOR UPDATE", merchant_id)
        if row is None:
            raise NotFound(f"merchant {merchant_id!r} does not exist")
        old = vault.open(row["secret_key_sealed"], sealed_identity(merchant_id, "secret_key"))
        if old.decode() == new_secret:
            raise ValueError("the new secret is the same as the current one")
        valid_until = await conn.fetchval(
            """UPDATE merchants SET secret_key_sealed = $2, previous_secret_key_sealed = $3,
                      previous_secret_valid_until = now() + $4, updated_at = now()
               WHERE merchant_id = $1 RETURNING previous_secret_valid_until""",
            merchant_id, vault.seal(new_secret.encode(), sealed_identity(merchant_id, "secret_key")),
            vault.seal(old, sealed_identity(merchant_id, "previous_secret_key")), overlap,
        )
    return valid_until
