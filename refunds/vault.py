"""Envelope encryption of merchant secrets.

Each secret gets a fresh 256-bit data key; the secret is sealed with AES-256-GCM under
the data key, and the data key is wrapped by the master key. Both layers bind the
record's identity as associated data, so a ciphertext copied to another row or field
does not open.
"""

from __future__ import annotations

import base64
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import VaultError

VERSION = b"\x01"
NONCE = 12
WRAPPED_KEY = NONCE + 32 + 16


def generate_master_key() -> str:
    """A new master key as REFUNDS_MASTER_KEY wants it (32 random bytes, base64)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


class Vault:
    def __init__(self, master_key: bytes):
        if len(master_key) != 32:
            raise VaultError("the master key must be 32 bytes")
        self._master = AESGCM(master_key)

    def seal(self, plaintext: bytes, identity: str) -> bytes:
        aad = identity.encode()
        data_key = AESGCM.generate_key(bit_length=256)
        key_nonce, nonce = os.urandom(NONCE), os.urandom(NONCE)
        wrapped = key_nonce + self._master.encrypt(key_nonce, data_key, aad)
        return VERSION + wrapped + nonce + AESGCM(data_key).encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, identity: str) -> bytes:
        aad = identity.encode()
        if not sealed or sealed[:1] != VERSION or len(sealed) < 1 + WRAPPED_KEY + NONCE + 16:
            raise VaultError(f"sealed secret for {identity} is malformed")
        wrapped, rest = sealed[1 : 1 + WRAPPED_KEY], sealed[1 + WRAPPED_KEY :]
        try:
            data_key = self._master.decrypt(wrapped[:NONCE], wrapped[NONCE:], aad)
            return AESGCM(data_key).decrypt(rest[:NONCE], rest[NONCE:], aad)
        except InvalidTag:
            raise VaultError(f"sealed secret for {identity} does not open with this master key") from None
