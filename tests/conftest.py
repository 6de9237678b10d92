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
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from refunds import db as dbmod
from refunds.merchants import Merchant, add_merchant
from refunds.vault import Vault, generate_master_key
from pagoefectivo.protocol import public_key_pem

pytest_plugins = ["tests.timing", "pytester"]  # tests.timing names unmarked slow tests at the end of a run

SERVICES = pytest.StashKey()
DATABASE_URL = pytest.StashKey()
TABLES = "webhook_endpoints, notifications, refund_events, refunds, payments, api_tokens, merchants"


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


_session = contextlib.ExitStack()


def pytest_configure(config):
    """Start (or find) Postgres and Redis before collection: importing `workers` needs REDIS_URL."""
    from refundctl.embedded import provide_services

    found = _session.enter_context(provide_services())
    os.environ.setdefault("REFUNDS_MASTER_KEY", generate_master_key())
    name = f"refunds_test_{secrets.token_hex(4)}"

    async def on_server(sql: str) -> None:
        """Run ``sql`` on the server's own database: the test database does not exist yet, or is being dropped."""
        conn = await asyncpg.connect(found.database_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def create():
        await on_server(f'CREATE DATABASE "{name}"')
        await dbmod.migrate(_with_database(found.database_url, name))

    asyncio.run(create())
    _session.callback(lambda: asyncio.run(on_server(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')))
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


def redis_db_url(url: str, db: int) -> str:
    """The same Redis server, another database (so tests' deliveries never meet)."""
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss"):
        return urlunsplit(parts._replace(path=f"/{db}"))
    return urlunsplit(parts._replace(query=f"db={db}"))


@pytest.fixture(scope="module")
def module_redis_url(request, database_url, redis_url):
    """Point REDIS_URL (and so refunds.delivery) at the test module's own Redis database, its
    ``REDIS_DB``: no other test or worker touches the messages its refunds deliver."""
    from refunds.delivery import producer_broker
    from refunds.settings import get_settings

    number = getattr(request.module, "REDIS_DB", None)
    if number is None:
        pytest.fail(f"{request.module.__name__} uses module_redis_url but sets no REDIS_DB", pytrace=False)
    url = redis_db_url(redis_url, number)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REDIS_URL", url)
        get_settings.cache_clear()
        producer_broker.cache_clear()
        yield url
    get_settings.cache_clear()
    producer_broker.cache_clear()


@pytest.fixture
def queue(module_redis_url):
    """The module's own Redis database, empty before and after each test (so a test sees only what it queued)."""
    client = redis.Redis.from_url(module_redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


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
def make_merchant(merchant_maker):
    """Create a sandbox merchant with real credentials; returns MerchantKeys. Test modules that
    run a sandbox gateway override it to onboard the merchant there too (tests/stack.py)."""
    return merchant_maker


@pytest.fixture
def merchant_maker(db, vault, rsa_private_pem):
    """``make_merchant`` in our store alone, whatever a module overrides."""

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
