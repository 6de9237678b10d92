"""REFUND_CLAIM_SECONDS and PAGOEFECTIVO_TIMEOUT_SECONDS (refunds/settings.py): a request leaves
only while half its claim is left, so the settings refuse a claim shorter than twice the gateway
client's timeout, and the workers' client has that timeout."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from refunds.errors import ConfigError
from refunds.settings import Settings, get_settings


@pytest.fixture
def env(monkeypatch):
    """The two settings unset, and settings read again from the environment while a test sets them."""
    monkeypatch.delenv("REFUND_CLAIM_SECONDS", raising=False)
    monkeypatch.delenv("PAGOEFECTIVO_TIMEOUT_SECONDS", raising=False)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_the_defaults_keep_a_claim_twice_the_gateway_timeout(env):
    defaults = Settings(_env_file=None)
    assert (defaults.refund_claim_seconds, defaults.pagoefectivo_timeout_seconds) == (20, 10)


def test_a_claim_shorter_than_twice_the_gateway_timeout_is_refused(env):
    with pytest.raises(ValidationError, match="REFUND_CLAIM_SECONDS"):
        Settings(_env_file=None, refund_claim_seconds=19)
    with pytest.raises(ValidationError, match="PAGOEFECTIVO_TIMEOUT_SECONDS"):
        Settings(_env_file=None, refund_claim_seconds=20, pagoefectivo_timeout_seconds=10.5)
    # exactly twice is enough
    assert Settings(_env_file=None, refund_claim_seconds=5, pagoefectivo_timeout_seconds=2.5).refund_claim_seconds == 5

    # what a service meets at start: one line naming both settings and their values (then exit 2)
    env.setenv("REFUND_CLAIM_SECONDS", "5")
    with pytest.raises(ConfigError) as refused:
        get_settings()
    assert str(refused.value) == ("REFUND_CLAIM_SECONDS (5) must be at least twice PAGOEFECTIVO_TIMEOUT_SECONDS (10), "
                                  "so that a request ends before its claim does")
    env.setenv("PAGOEFECTIVO_TIMEOUT_SECONDS", "2.5")
    get_settings.cache_clear()
    assert get_settings().pagoefectivo_timeout_seconds == 2.5


@pytest.mark.parametrize("value", ["0", "-1", "61", "soon"])
def test_a_gateway_timeout_out_of_range_is_malformed(env, value):
    env.setenv("PAGOEFECTIVO_TIMEOUT_SECONDS", value)
    with pytest.raises(ConfigError, match="^PAGOEFECTIVO_TIMEOUT_SECONDS is malformed"):
        get_settings()


async def test_the_workers_gateway_client_has_the_configured_timeout(env, database_url):
    """The worker's own path: the environment, its settings, Resources.open (as its boot hook calls it)."""
    from workers.resources import Resources

    env.setenv("REFUND_CLAIM_SECONDS", "5")
    env.setenv("PAGOEFECTIVO_TIMEOUT_SECONDS", "2.5")
    get_settings.cache_clear()
    res = await Resources.open(pool_size=2)
    try:
        assert res.client._timeout.total == 2.5
        assert res.claims.claim_seconds == 5
    finally:
        await res.close()


@pytest.mark.parametrize(("name", "value", "why"), [
    ("DATABASE_URL", "notaurl", "must be a URL starting with postgresql:// or postgres://"),
    ("DATABASE_URL", "postgresql://refunds:s3cret@127.0.0.1:99999/refunds", "its port must be a number from 0 to 65535"),
    ("DATABASE_URL", "postgresql://refunds@[::1/refunds", "Invalid IPv6 URL"),
    ("REDIS_URL", "127.0.0.1:6379", "must be a URL starting with redis:// or rediss:// or unix://"),
])
def test_a_malformed_service_url_is_named_and_never_repeated(env, name, value, why):
    """Found when the settings are read, not at the first connection; the URL (it may carry a
    password) is not in the message."""
    env.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        get_settings()
    assert str(refused.value) == f"{name} is malformed: {why}"


def test_a_database_url_with_several_hosts_is_left_to_asyncpg(env):
    env.setenv("DATABASE_URL", "postgresql://refunds@db-1:5432,db-2:5432/refunds?target_session_attrs=read-write")
    assert get_settings().database_url.startswith("postgresql://refunds@db-1:5432,db-2:5432/")
