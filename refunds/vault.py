"""Envelope encryption of merchant secrets.

Each secret gets a fresh 256-bit data key; the secret is sealed with AES-256-GCM under
the data key, and the data key is wrapped by a key provider (the master key). Both layers
bind the record's identity as associated data, so a ciphertext copied to another row or
field does not open.

The provider is a two-method interface (``wrap``/``unwrap``): ``LocalKeyProvider`` uses
REFUNDS_MASTER_KEY; a cloud KMS or HashiCorp Vault adapter is one class calling the
service's encrypt/decrypt with the same associated data. Rotating the master key only
re-wraps data keys (``Vault.rewrap``); the sealed secrets themselves are not touched.

``refunds.rekey`` lists every table and column holding sealed values and re-wraps each of them,
so a master-key rotation leaves none behind.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import struct
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
