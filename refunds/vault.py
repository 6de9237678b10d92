"""Envelope encryption of merchant secrets.

Each secret gets a fresh 256-bit data key; the secret is sealed with AES-256-GCM under
the data key, and the data key is wrapped by a key provider (the master key). Both layers
bind the record's identity as associated data, so a ciphertext copied to another row or
field does not open.

The provider is a two-method interface (``wrap``/``unwrap``): ``LocalKeyProvider`` uses
REFUNDS_MASTER_KEY; a cloud KMS or HashiCorp Vault adapter is one class calling the
service's encrypt/decrypt with the same associated data. Rotating the master key only
re-wraps data keys (``Vault.rewrap``); the sealed secrets themselves are not touched.

``sealed_tables`` lists every table and column holding sealed values (merchants' secrets and
private keys, webhook endpoints' secrets, current and previous alike), and ``rewrap_all``
re-wraps each of them, so a master-key rotation leaves none behind.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import VaultError

VERSION = b"\x02"
NONCE = 12
KEY_ID = 4


def generate_master_key() -> str:
    """A new master key as REFUNDS_MASTER_KEY wants it (32 random bytes, base64)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


class KeyProvider(Protocol):
    """Wraps and unwraps data keys. Implement this to keep the master key in a KMS."""

    def wrap(self, data_key: bytes, aad: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes: ...


class LocalKeyProvider:
    """Master keys held in memory: the current one wraps, any of them unwraps (during a rotation)."""

    def __init__(self, current: bytes, previous: tuple[bytes, ...] = ()):
        for key in (current, *previous):
            if len(key) != 32:
                raise VaultError("a master key must be 32 bytes")
        self._current_id = _key_id(current)
        self._keys = {_key_id(key): AESGCM(key) for key in (*previous, current)}

    def wrap(self, data_key: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return self._current_id + nonce + self._keys[self._current_id].encrypt(nonce, data_key, aad)

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        key = self._keys.get(wrapped[:KEY_ID])
        if key is None:
            raise VaultError("sealed with a master key this process does not have")
        return key.decrypt(wrapped[KEY_ID:KEY_ID + NONCE], wrapped[KEY_ID + NONCE:], aad)

    def is_current(self, wrapped: bytes) -> bool:
        return wrapped[:KEY_ID] == self._current_id


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"refunds-master-key-id:" + key).digest()[:KEY_ID]


class Vault:
    def __init__(self, master_key: bytes | None = None, *, provider: KeyProvider | None = None):
        if provider is None:
            if master_key is None:
                raise VaultError("a vault needs a master key or a key provider")
            provider = LocalKeyProvider(master_key)
        self.provider = provider

    def seal(self, plaintext: bytes, identity: str) -> bytes:
        aad = identity.encode()
        data_key = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(NONCE)
        return _pack(self.provider.wrap(data_key, aad), nonce + AESGCM(data_key).encrypt(nonce, plaintext, aad))

    def open(self, sealed: bytes, identity: str) -> bytes:
        aad = identity.encode()
        wrapped, body = _unpack(sealed, identity)
        try:
            data_key = self.provider.unwrap(wrapped, aad)
            return AESGCM(data_key).decrypt(body[:NONCE], body[NONCE:], aad)
        except InvalidTag:
            raise VaultError(f"sealed secret for {identity} does not open with this master key") from None

    def rewrap(self, sealed: bytes, identity: str) -> bytes:
        """The same secret with its data key wrapped by the current master key."""
        aad = identity.encode()
        wrapped, body = _unpack(sealed, identity)
        try:
            data_key = self.provider.unwrap(wrapped, aad)
        except InvalidTag:
            raise VaultError(f"sealed secret for {identity} does not open with this master key") from None
        return _pack(self.provider.wrap(data_key, aad), body)


def _pack(wrapped: bytes, body: bytes) -> bytes:
    return VERSION + struct.pack(">H", len(wrapped)) + wrapped + body


def _unpack(sealed: bytes, identity: str) -> tuple[bytes, bytes]:
    if not sealed or sealed[:1] != VERSION or len(sealed) < 3:
        raise VaultError(f"sealed secret for {identity} is malformed")
    (length,) = struct.unpack(">H", sealed[1:3])
    wrapped, body = sealed[3:3 + length], sealed[3 + length:]
    if len(wrapped) != length or len(body) < NONCE + 16:
        raise VaultError(f"sealed secret for {identity} is malformed")
    return wrapped, body


def vault_from_settings(settings) -> Vault:
    """The vault of this process: REFUNDS_MASTER_KEY, plus REFUNDS_PREVIOUS_MASTER_KEYS during a rotation."""
    return Vault(provider=LocalKeyProvider(settings.master_key(), settings.previous_master_keys()))


# --- every sealed value in the database ------------------------------------------------------------

@dataclass(frozen=True)
class SealedColumns:
    """Where one table keeps values sealed by the vault: its key column, and its sealed columns.
    A value of column ``<field>_sealed`` is bound to ``identity(key, "<field>")``."""

    table: str
    key: str
    columns: tuple[str, ...]
    identity: Callable[[object, str], str]

    def identity_of(self, key, column: str) -> str:
        return self.identity(key, column.removesuffix("_sealed"))


def sealed_tables() -> tuple[SealedColumns, ...]:
    """Every table holding sealed values, each with its sealed columns: what a master-key rotation
    re-wraps. A new sealed column belongs here (tests/refunds/test_vault.py compares this list with
    the schema's ``*_sealed`` columns)."""
    from . import merchants, webhooks  # both import this module: their identities, bound as they seal

    return (
        SealedColumns("merchants", "merchant_id",
                      ("secret_key_sealed", "private_key_sealed", "previous_secret_key_sealed"), merchants._identity),
        SealedColumns("webhook_endpoints", "endpoint_id", ("secret_sealed", "previous_secret_sealed"),
                      webhooks._identity),
    )


async def rewrap_all(conn, vault: Vault) -> dict[str, int]:
    """Re-wrap the data key of every sealed value in the database with the current master key.

    Each table of ``sealed_tables()``, one short transaction per row (its sealed columns, current
    and previous secrets alike, together), so the services keep working meanwhile. Returns the
    number of rows re-wrapped per table. A value that does not open raises VaultError naming it
    and what was re-wrapped before it; running it again is safe (the current key re-wraps its own).
    """
    done: dict[str, int] = {}
    for spec in sealed_tables():
        done[spec.table] = 0
        columns = ", ".join(spec.columns)
        assignments = ", ".join(f"{column} = ${n}" for n, column in enumerate(spec.columns, 2))
        keys = [r[0] for r in await conn.fetch(f"SELECT {spec.key} FROM {spec.table} ORDER BY {spec.key}")]
        for key in keys:
            async with conn.transaction():
                row = await conn.fetchrow(f"SELECT {columns} FROM {spec.table} WHERE {spec.key} = $1 FOR UPDATE", key)
                if row is None:  # deleted since the list was read
                    continue
                values = []
                for column in spec.columns:
                    identity = spec.identity_of(key, column)
                    try:
                        values.append(None if row[column] is None else vault.rewrap(row[column], identity))
                    except VaultError as exc:
                        so_far = ", ".join(f"{count} {table}" for table, count in done.items())
                        raise VaultError(f"{identity} ({spec.table}.{column}): {exc}; re-wrapped before it:"
                                         f" {so_far} (running it again is safe)") from None
                await conn.execute(f"UPDATE {spec.table} SET {assignments} WHERE {spec.key} = $1", key, *values)
            done[spec.table] += 1
    return done
