"""The first steps of README's walkthrough, each alone: `refundctl db create` and `refundctl merchant keygen`."""

import json
import secrets
import stat
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from pagoefectivo.protocol import public_key_pem
from tests.refundctl.test_exits import run


@pytest.mark.slow
def test_keygen_keeps_the_private_key_to_its_owner_and_prints_the_public_key(tmp_path):
    key = tmp_path / "seller-1.pem"
    done = run("merchant", "keygen", str(key))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert done.stdout == public_key_pem(key.read_bytes())  # the pair: what the gateway verifies with

    again = run("merchant", "keygen", str(key), "--json")
    assert again.returncode == 2 and "never overwritten" in again.stderr and again.stdout == ""
    other = run("merchant", "keygen", str(tmp_path / "other.pem"), "--json")
    assert json.loads(other.stdout)["private_key_file"] == str(tmp_path / "other.pem")


@pytest.mark.slow
async def test_db_create_makes_the_database_once(database_url):
    name = f"refunds_create_{secrets.token_hex(4)}"
    url = urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))
    try:
        first = run("db", "create", "--json", DATABASE_URL=url)
        assert (first.returncode, json.loads(first.stdout)) == (0, {"database": name, "created": True}), first.stderr
        second = run("db", "create", DATABASE_URL=url)
        assert second.returncode == 0 and "exists already" in second.stdout
        assert run("db", "migrate", DATABASE_URL=url).returncode == 0
    finally:
        conn = await asyncpg.connect(database_url)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()
    nameless = run("db", "create", DATABASE_URL=urlunsplit(urlsplit(database_url)._replace(path="")))
    assert nameless.returncode == 2 and "names no database" in nameless.stderr
