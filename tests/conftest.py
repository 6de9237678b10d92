"""Shared fixtures: real Postgres and Redis (from DATABASE_URL/REDIS_URL, else embedded)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from dataclasses import dataclass
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from refunds import db as dbmod
from refunds.merchants import Merchant, add_merchant
from refunds.vault import Vault, generate_master_key
from pagoefectivo.protocol import public_key_pem

SERVICES = pytest.StashKey()
DATABASE_URL = pytest.StashKey()
TABLES = "notifications, refund_events, refunds, payments, api_tokens, merchants"


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


_session = contextlib.ExitStack()


def pytest_configure(config):
    """Start (or find) Postgres and Redis before collection: importing `workers` needs REDIS_URL."""
    from refunds.embedded import provide_services

    found = _session.enter_context(provide_services())
    os.environ.setdefault("REFUNDS_MASTER_KEY", generate_master_key())
    name = f"refunds_test_{secrets.token_hex(4)}"

    async def create():
        conn = await asyncpg.connect(found.database_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        await dbmod.migrate(_with_database(found.database_url, name))

    async def drop():
        conn = await asyncpg.connect(found.database_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(create())
    _session.callback(lambda: asyncio.run(drop()))
    config.stash[SERVICES] = found
    config.stash[DATABASE_URL] = _with_database(found.database_url, name)
    os.environ["DATABASE_URL"] = config.stash[DATABASE_URL]
    os.environ["REDIS_URL"] = found.redis_url


def pytest_unconfigure(config):
    _session.close()


@pytest.fixture(scope="session")
def services(pytestconfig):
    return pytestconfig.stash[SERVICES]


@pytest.fixture(scope="session")
def master_key() -> str:
    return os.environ["REFUNDS_MASTER_KEY"]


@pytest.fixture(scope="session")
def vault(master_key) -> Vault:
    import base64

    return Vault(base64.b64decode(master_key))


@pytest.fixture(scope="session")
def database_url(pytestconfig):
    """A fresh, migrated database for this test session (dropped at the end)."""
    from refunds.settings import get_settings

    get_settings.cache_clear()
    return pytestconfig.stash[DATABASE_URL]


@pytest.fixture(scope="session")
def redis_url(services):
    return services.redis_url


@pytest_asyncio.fixture
async def db(database_url):
    """A connection to a database emptied before each test."""
    conn = await dbmod.connect(database_url)
    await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    try:
        yield conn
    finally:
        await conn.close()


@dataclass(frozen=True)
class MerchantKeys:
    merchant: Merchant
    secret_key: str
    private_key_pem: bytes


@pytest.fixture(scope="session")
def rsa_private_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@pytest.fixture
def make_merchant(db, vault, rsa_private_pem):
    """Create a sandbox merchant with real credentials; returns MerchantKeys."""

    async def make(merchant_id: str = "m1", **overrides) -> MerchantKeys:
        secret = overrides.pop("secret_key", secrets.token_urlsafe(24))
        params = dict(
            merchant_id=merchant_id, env="sandbox", service_id=1000 + len(merchant_id), access_key=f"AK{merchant_id.upper()}",
            secret_key=secret, private_key_pem=rsa_private_pem, public_key_pem=public_key_pem(rsa_private_pem),
            rate_limit=Decimal(100),
        )
        params.update(overrides)
        merchant = await add_merchant(db, vault, **params)
        return MerchantKeys(merchant, secret, rsa_private_pem)

    return make
