"""README's "Running the services against your own Redis and Postgres" works verbatim: its
walkthrough's commands, taken from README.md between the walkthrough comments, run as written
by bash, against a database of their own on this machine's Postgres and a Redis database of
their own, until a refund succeeded through the sandbox gateway."""

import asyncio
import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from refundctl.processes import free_port
from tests.conftest import redis_db_url

ROOT = Path(__file__).resolve().parents[2]
REDIS_DB = 3  # the walkthrough's services' own Redis database

pytestmark = pytest.mark.slow


def walkthrough() -> str:
    """The shell commands of README's walkthrough block."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- walkthrough -->\n```sh\n(.*?)```\n<!-- /walkthrough -->", readme, re.S)
    assert found, "README.md has no walkthrough block"
    return found.group(1)


def test_the_readme_procfile_block_is_the_procfile():
    readme = (ROOT / "README.md").read_text()
    assert "```\n" + (ROOT / "Procfile").read_text() + "```" in readme


@pytest.mark.timeout(300)
def test_the_walkthrough_takes_a_refund_to_succeeded(services, tmp_path):
    database = f"refunds_walkthrough_{secrets.token_hex(4)}"
    server = urlsplit(services.database_url)
    ports = {name: str(free_port()) for name in (
        "INTAKE_PORT", "RECEIVER_PORT", "SANDBOX_PORT", "METRICS_PORT", "SCHEDULER_METRICS_PORT",
        "INTAKE_METRICS_PORT", "RECEIVER_METRICS_PORT")}
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("REFUNDS_", "PAGOEFECTIVO_", "DATABASE_", "VIRTUAL_ENV"))}
    env.update(ports, TMPDIR=str(tmp_path), DATABASE_URL=urlunsplit(server._replace(path=f"/{database}")),
               REDIS_URL=redis_db_url(services.redis_url, REDIS_DB))
    # the walkthrough runs in the checkout: here a folder with the checkout's virtualenv and Procfile
    for name in (".venv", "Procfile"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "walkthrough.sh").write_text(walkthrough())
    shell = subprocess.Popen(["bash", "-e", "walkthrough.sh"], cwd=tmp_path, env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = shell.communicate(timeout=240)
        logs = "".join(f"\n--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(tmp_path.glob("*.log")))
        assert shell.returncode == 0, out + logs
        assert asyncio.run(_states(env["DATABASE_URL"])) == [("order-1001-refund-1", "succeeded")], out + logs
        assert "succeeded" in out and (tmp_path / "seller-1.pem").stat().st_mode & 0o777 == 0o600
    finally:
        _stop(shell.pid)
        asyncio.run(_drop(services.database_url, database))


async def _states(database_url: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(database_url)
    try:
        return [tuple(row) for row in await conn.fetch("SELECT external_ref, state FROM refunds")]
    finally:
        await conn.close()


def _stop(group: int) -> None:
    """The services the walkthrough started in the background: its process group, ours alone."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, signum)
        except ProcessLookupError:
            return
        for _ in range(100):
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


async def _drop(server_url: str, database: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await conn.close()
