"""Secrets at rest (merchants', webhook endpoints'): sealed, bound to their row, and re-wrappable without downtime."""

import asyncio
import base64
import os
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal

import pytest

from refundctl.embedded import _postgres_bin_dir
from refunds.errors import VaultError
from pagoefectivo.protocol import public_key_pem
from refunds import webhooks
from refunds.merchants import add_merchant, find_merchant, rotate_secret
from refunds.rekey import rewrap_all, sealed_tables
from refunds.vault import LocalKeyProvider, Vault, generate_master_key
from tests.helpers import FIXTURES, ROOT
from tests.stack import start_stack

SECRET = "Nfybo8h0yN7CFN1ycX+XaG99pj/y3Vt25urt1LUR"
KEY_PEM = (FIXTURES / "merchant_test_key.pem").read_bytes()


def pem_body(pem: bytes) -> str:
    """The base64 body of a PEM key: what a thief would look for in a dump."""
    return "".join(line for line in pem.decode().splitlines() if not line.startswith("-----"))


async def test_a_stolen_dump_reveals_no_secret(db, database_url, make_merchant):
    keys = await make_merchant("m1", secret_key=SECRET)
    dump = subprocess.run([str(_postgres_bin_dir() / "pg_dump"), "--data-only", database_url],
                          capture_output=True, check=True).stdout.decode()
    assert "COPY public.merchants" in dump  # the dump really holds the merchants table
    assert SECRET not in dump
    body = pem_body(keys.private_key_pem)
    assert body[:64] not in dump.replace("\n", "")
    assert base64.b64encode(SECRET.encode()).decode() not in dump


async def test_a_ciphertext_moved_to_another_row_does_not_open(db, vault, make_merchant):
    await make_merchant("m1", secret_key=SECRET)
    await make_merchant("m2", secret_key="other-secret")
    await db.execute("""UPDATE merchants SET secret_key_sealed = (SELECT secret_key_sealed FROM merchants
                        WHERE merchant_id = 'm1') WHERE merchant_id = 'm2'""")
    stolen = await find_merchant(db, "m2")
    with pytest.raises(VaultError):
        stolen.secret_key(vault)
    with pytest.raises(VaultError):  # nor as another field of the same row
        vault.open((await find_merchant(db, "m1")).secret_key_sealed, "merchant:m1:private_key")


async def test_secret_rotation_keeps_the_old_secret_for_the_overlap(db, vault, make_merchant):
    await make_merchant("m1", secret_key=SECRET)
    await rotate_secret(db, vault, "m1", "brand-new-secret", overlap=timedelta(hours=1))
    merchant = await find_merchant(db, "m1")
    assert merchant.secret_key(vault) == "brand-new-secret"
    assert merchant.notification_secrets(vault) == ("brand-new-secret", SECRET)
    later = merchant.previous_secret_valid_until + timedelta(seconds=1)
    assert merchant.notification_secrets(vault, later) == ("brand-new-secret",)
    with pytest.raises(ValueError):
        await rotate_secret(db, vault, "m1", "brand-new-secret", overlap=timedelta(hours=1))


NEW_MASTER_KEY = base64.b64decode(generate_master_key())


@pytest.fixture
def rotating_vault():
    """What every process runs with during a rotation: the new key current, the old one still opening."""
    return Vault(provider=LocalKeyProvider(NEW_MASTER_KEY, (base64.b64decode(os.environ["REFUNDS_MASTER_KEY"]),)))


@pytest.mark.slow
async def test_master_key_rotation_under_load_loses_nothing(db, database_url, vault, rotating_vault, redis_url,
                                                            monkeypatch):
    """Refunds go through the worker, sandbox and receiver while every data key is re-wrapped."""
    from tests.workers import test_worker
    for index in range(4):
        await add_merchant(db, vault, merchant_id=f"r{index}", env="sandbox", service_id=100 + index,
                           access_key=f"AKR{index}", secret_key=f"secret-{index}", private_key_pem=KEY_PEM,
                           public_key_pem=public_key_pem(KEY_PEM), rate_limit=Decimal(1000))
    async with start_stack(database_url, redis_url, rotating_vault, monkeypatch) as stack:
        res, sandbox_url, http = stack.res, stack.sandbox_url, stack.http
        await test_worker.chaos(http, sandbox_url, sync_status_mix={"success": 1})
        ids = [(await test_worker.accepted_refund(stack, db, external_ref=f"K-{i}", amount="1.00", merchant=f"r{i % 4}"))
               .refund_id for i in range(60)]

        async def rotate():
            return await rewrap_all(db, rotating_vault)

        rotated, _ = await asyncio.gather(rotate(), test_worker.settle_all(res, db, ids))
        assert rotated == {"merchants": 4, "webhook_endpoints": 0}
        states = [r["state"] for r in await db.fetch("SELECT state FROM refunds")]
        assert states == ["succeeded"] * 60
        assert len(await test_worker.ledger(http, sandbox_url)) == 60
    after = Vault(NEW_MASTER_KEY)  # the old key is gone now
    for index in range(4):
        merchant = await find_merchant(db, f"r{index}")
        assert merchant.secret_key(after) == f"secret-{index}"
        assert merchant.private_key_pem(after) == KEY_PEM
        with pytest.raises(VaultError):
            merchant.secret_key(vault)


async def test_master_key_rotation_rewraps_merchant_and_webhook_secrets_current_and_previous(
        db, vault, rotating_vault, make_merchant):
    """Sealed under the old key: a merchant and a webhook endpoint, each with a current and a
    previous secret (a rotation's overlap). After the re-wrap under the new key, the new key
    alone opens every one of them (the old key is dropped), and the old key alone opens none."""
    await make_merchant("m1", secret_key=SECRET)
    await rotate_secret(db, vault, "m1", "brand-new-secret", overlap=timedelta(hours=1))
    endpoint, first = await webhooks.add_endpoint(db, vault, name="orders", url="https://hooks.example.com/refunds",
                                                  merchants=["m1"], event_types=["refund.succeeded"])
    _, second = await webhooks.rotate_secret(db, vault, endpoint.endpoint_id, overlap=timedelta(hours=1))

    assert await rewrap_all(db, rotating_vault) == {"merchants": 1, "webhook_endpoints": 1}

    after = Vault(NEW_MASTER_KEY)  # the old key is gone now
    merchant = await find_merchant(db, "m1")
    assert merchant.notification_secrets(after) == ("brand-new-secret", SECRET)
    assert merchant.private_key_pem(after).startswith(b"-----BEGIN")
    endpoint = await webhooks.get_endpoint(db, endpoint.endpoint_id)
    assert endpoint.secrets(after) == [second, first]
    for sealed, identity in ((merchant.secret_key_sealed, "merchant:m1:secret_key"),
                             (merchant.previous_secret_key_sealed, "merchant:m1:previous_secret_key"),
                             (endpoint.secret_sealed, f"webhook:{endpoint.endpoint_id}:secret"),
                             (endpoint.previous_secret_sealed, f"webhook:{endpoint.endpoint_id}:previous_secret")):
        with pytest.raises(VaultError):
            vault.open(sealed, identity)


async def test_the_rewrap_covers_every_sealed_column_of_the_schema(db):
    """Every bytea column of the schema is a sealed value: each is in ``sealed_tables`` (which
    ``rewrap_all`` re-wraps), and each listed one exists."""
    in_schema = {(r["table_name"], r["column_name"]) for r in await db.fetch(
        """SELECT table_name, column_name FROM information_schema.columns
           WHERE table_schema = current_schema() AND (data_type = 'bytea' OR column_name LIKE '%\\_sealed')""")}
    listed = {(spec.table, column) for spec in sealed_tables() for column in spec.columns}
    assert in_schema == listed
    keys = {(spec.table, spec.key) for spec in sealed_tables()}
    assert keys <= {(r["table_name"], r["column_name"]) for r in await db.fetch(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema()")}


async def test_a_rewrap_that_meets_a_secret_it_cannot_open_names_it_and_what_it_did(db, vault, make_merchant):
    await make_merchant("m1", secret_key=SECRET)
    endpoint, _ = await webhooks.add_endpoint(db, vault, name="orders", url="https://hooks.example.com/refunds",
                                              merchants=["m1"], event_types=["refund.succeeded"])
    stranger = Vault(base64.b64decode(generate_master_key()))  # neither the current key nor a previous one
    await db.execute("UPDATE webhook_endpoints SET secret_sealed = $1",
                     stranger.seal(b"whsec_x", f"webhook:{endpoint.endpoint_id}:secret"))
    with pytest.raises(VaultError) as raised:
        await rewrap_all(db, vault)
    assert str(raised.value) == (
        f"webhook:{endpoint.endpoint_id}:secret (webhook_endpoints.secret_sealed): sealed with a master key this"
        " process does not have; re-wrapped before it: 1 merchants, 0 webhook_endpoints (running it again is safe)")


async def test_adding_a_merchant_again_drops_its_previous_secret(db, database_url, vault, make_merchant):
    """Added again with other credentials (sandbox to production, say) during a rotation's
    overlap: the previous secret goes, so the receiver no longer verifies a notification signed
    with it."""
    from pagoefectivo.protocol import notification_signature
    from receiver.credentials import MerchantKeys, database_loader
    from refunds.database import Database

    await make_merchant("m1", secret_key="sandbox-old")
    await rotate_secret(db, vault, "m1", "sandbox-new", overlap=timedelta(hours=24))
    assert (await find_merchant(db, "m1")).notification_secrets(vault) == ("sandbox-new", "sandbox-old")

    await make_merchant("m1", env="production", secret_key="production-secret")
    merchant = await find_merchant(db, "m1")
    assert (merchant.previous_secret_key_sealed, merchant.previous_secret_valid_until) == (None, None)
    assert merchant.notification_secrets(vault) == ("production-secret",)
    database = Database(database_url)
    try:
        loaded = await database_loader(database, vault)("m1")  # what the receiver verifies with
    finally:
        await database.close()
    keys = MerchantKeys("m1", loaded, loaded_at=0.0)
    body = b'{"operationNumber":"op-1"}'
    assert keys.verifies(body, notification_signature(body, "production-secret"))
    for old in ("sandbox-old", "sandbox-new"):
        assert not keys.verifies(body, notification_signature(body, old)), old


@pytest.mark.slow
@pytest.mark.parametrize("name, module", [("intake", "producers.http"), ("receiver", "receiver")])
def test_a_service_that_opens_the_vault_does_not_start_without_the_master_key(name, module):
    """The intake seals webhook endpoints' secrets, the receiver opens merchants' secrets: without
    a master key each stops at start with one line naming it (exit 2), never a 500 later."""
    env = {k: v for k, v in os.environ.items() if k not in ("REFUNDS_MASTER_KEY", "REFUNDS_MASTER_KEY_FILE")}
    done = subprocess.run([sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stderr.strip()) == \
        (2, f"{name}: REFUNDS_MASTER_KEY is not set (nor REFUNDS_MASTER_KEY_FILE)")


@pytest.mark.slow
@pytest.mark.parametrize("name, module", [("intake", "producers.http"), ("receiver", "receiver")])
def test_a_malformed_previous_master_key_stops_a_service_at_start_with_one_line(name, module):
    env = {**os.environ, "REFUNDS_PREVIOUS_MASTER_KEYS": "not-a-key"}
    done = subprocess.run([sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"{name}: REFUNDS_PREVIOUS_MASTER_KEYS"), line
