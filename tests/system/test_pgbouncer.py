"""Behind a real PgBouncer in transaction mode (issue 21): Debian's package, 1.18 on Debian 12,
which keeps no prepared statements per client. Its own ini, a free port, in front of the
session's Postgres (bench/pgbouncer_bench.py's ``PgBouncer``).

With DATABASE_POOLER=transaction every refundctl command works however often it runs and the
whole demo (every service, the migration, the seeding) ends with every refund final and the
sandbox ledger agreeing; with the default (none) a process refuses to start, in one line.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from datetime import date, timedelta
from urllib.parse import urlsplit

import asyncpg
import pytest
import yaml

from bench.pgbouncer_bench import PGBOUNCER, PgBouncer, pgbouncer_version
from refunds import db as dbmod
from refunds.states import FINAL
from tests.conftest import _with_database, redis_db_url
from tests.helpers import ROOT

REDIS_DB = 15  # the demo's queue, apart from every other test's
COMPONENT = ROOT / "deploy" / "kubernetes" / "pgbouncer"
SERVICES = {"refunds-intake", "refunds-receiver", "refunds-worker", "refunds-scheduler"}


@pytest.fixture(scope="module")
def bouncer(services):
    if not os.access(PGBOUNCER, os.X_OK):  # CI installs it (.ci/run): missing is a failure, never a skip
        pytest.fail(f"{PGBOUNCER} missing: apt-get install -y pgbouncer", pytrace=False)
    with PgBouncer(services.database_url, pool_size=5) as running:
        yield running


@pytest.fixture
def fresh_database(services, bouncer):
    """A database of the test's own on the session's server; yields (direct URL, URL through PgBouncer)."""
    name = f"refunds_pgb_{secrets.token_hex(4)}"
    asyncio.run(_on_server(services.database_url, f'CREATE DATABASE "{name}"'))
    direct = _with_database(services.database_url, name)
    try:
        yield direct, bouncer.url(direct)
    finally:  # FORCE: PgBouncer still holds server connections to it
        asyncio.run(_on_server(services.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _on_server(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def refundctl(database_url: str, *args: str, pooler: str | None = "transaction",
              timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": database_url}
    env.pop("DATABASE_POOLER", None)
    if pooler is not None:
        env["DATABASE_POOLER"] = pooler
    return subprocess.run([sys.executable, "-m", "refundctl", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_refundctl_commands_run_twice_in_a_row_through_pgbouncer(fresh_database):
    """Before: the second command met the first one's named statements on the shared server
    connection (DuplicatePreparedStatementError). The pool has 5 server connections."""
    _, pooled = fresh_database
    today = date.today()
    period = ["--from", (today - timedelta(days=1)).isoformat(), "--to", (today + timedelta(days=1)).isoformat()]
    commands = [["db", "migrate"], ["merchant", "list"], ["token", "list"], ["refund", "list"],
                ["notifications", "list"], ["report", "refunds", *period]]
    for command in commands:
        for attempt in (1, 2):
            run = refundctl(pooled, *command)
            assert run.returncode == 0, f"{command} #{attempt}: {run.stderr[-2000:]}"


@pytest.mark.slow
def test_with_the_default_setting_a_pooler_is_refused_in_one_line(fresh_database):
    direct, pooled = fresh_database
    assert refundctl(direct, "db", "migrate", pooler=None).returncode == 0  # directly: no pooler, no complaint
    for _ in range(2):
        run = refundctl(pooled, "merchant", "list", pooler=None)
        assert run.returncode == 2, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and "DATABASE_POOLER=transaction" in lines[0], run.stderr
        assert "Traceback" not in run.stderr and "DuplicatePreparedStatement" not in run.stderr


@pytest.mark.slow
def test_a_service_refuses_to_start_behind_a_pooler_with_the_default_setting(fresh_database, tmp_path):
    """The scheduler opens its pool first thing: it stops (exit 2, one line) instead of running against it."""
    direct, pooled = fresh_database
    assert refundctl(direct, "db", "migrate").returncode == 0
    env = {**os.environ, "DATABASE_URL": pooled, "SCHEDULER_METRICS_PORT": "0"}
    env.pop("DATABASE_POOLER", None)
    run = subprocess.run([sys.executable, "-m", "workers.scheduler"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2, run.stderr[-2000:]
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("scheduler: ") and "DATABASE_POOLER=transaction" in line, line


@pytest.mark.slow
def test_the_whole_demo_through_pgbouncer_every_refund_final_and_the_ledger_agrees(fresh_database, bouncer,
                                                                                  redis_url):
    direct, pooled = fresh_database
    env = {**os.environ, "DATABASE_URL": pooled, "DATABASE_POOLER": "transaction",
           "REDIS_URL": redis_db_url(redis_url, REDIS_DB)}
    run = subprocess.run([sys.executable, "-m", "refundctl", "demo", "--refunds", "300", "--merchants", "3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "every accepted refund is final and the ledger agrees" in run.stdout, run.stdout[-4000:]
    states = asyncio.run(_states(direct))
    assert sum(states.values()) >= 290 and set(states) <= set(FINAL), states
    assert f"db={direct.rsplit('/', 1)[1]}" in bouncer.log()  # the services did log in through it
    # and a reconciliation export of them, through PgBouncer, twice
    today = date.today()
    period = ["--from", (today - timedelta(days=1)).isoformat(), "--to", (today + timedelta(days=1)).isoformat()]
    for _ in range(2):
        report = refundctl(pooled, "report", "refunds", *period, "--format", "csv")
        assert report.returncode == 0, report.stderr[-2000:]
        assert len(report.stdout.strip().splitlines()) == sum(states.values()) + 1


async def _states(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return dict(await conn.fetch("SELECT state, count(*) FROM refunds GROUP BY state"))
    finally:
        await conn.close()


def test_the_kubernetes_component_validates_and_points_the_services_at_pgbouncer(tmp_path):
    files = sorted(str(p) for p in COMPONENT.glob("*.json"))
    run = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", *files],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ERROR" not in run.stdout + run.stderr, run.stdout + run.stderr
    kubectl = shutil.which("kubectl")
    if kubectl is None:  # the schemas above still ran; kustomize comes with kubectl
        return
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(COMPONENT.parent, overlay)], "components": [os.path.relpath(COMPONENT, overlay)]}))
    run = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    if run.returncode != 0 and "unknown command" in run.stderr:
        return
    assert run.returncode == 0, run.stderr
    built = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(run.stdout) if d}
    assert built[("ConfigMap", "refunds-config")]["data"]["DATABASE_POOLER"] == "transaction"
    assert {("Deployment", "refunds-pgbouncer"), ("Service", "refunds-pgbouncer"),
            ("ConfigMap", "refunds-pgbouncer")} <= set(built)
    workloads = {name: d for (kind, name), d in built.items() if kind in ("Deployment", "StatefulSet")}
    for name in SERVICES:
        (container,) = workloads[name]["spec"]["template"]["spec"]["containers"]
        (url,) = [e for e in container["env"] if e["name"] == "DATABASE_URL"]
        assert url["valueFrom"]["secretKeyRef"] == {"name": "refunds-secrets", "key": "DATABASE_URL_POOLED"}, name


class ShippedPgBouncer(PgBouncer):
    """This machine's PgBouncer with the component's pgbouncer.ini: its Secret's two files written
    here (a database named ``refunds`` on the session's server, a user with a password)."""

    def __init__(self, server_url: str, database: str):
        super().__init__(server_url)
        self.database = database

    def _ini(self) -> str:
        ini = json.loads((COMPONENT / "configmap.json").read_text())["data"]["pgbouncer.ini"]
        secret = self.folder / "secret"
        secret.mkdir()
        (secret / "databases.ini").write_text(
            f"[databases]\nrefunds = host={self.server.hostname} port={self.server.port or 5432} dbname={self.database}\n")
        (secret / "userlist.txt").write_text(f'"{self.server.username or "postgres"}" "s3cret-for-test"\n')
        ini = ini.replace("/etc/pgbouncer/secret", str(secret)).replace("listen_addr = 0.0.0.0", "listen_addr = 127.0.0.1")
        ini = ini.replace("listen_port = 6432", f"listen_port = {self.port}")
        major, minor = map(int, re.search(r"(\d+)\.(\d+)", pgbouncer_version()).groups())
        if (major, minor) < (1, 21):  # as the ini says: 1.18-1.20 refuse the setting
            ini = re.sub(r"(?m)^max_prepared_statements.*$", "", ini)
        return ini


async def test_the_shipped_pgbouncer_ini_runs_and_carries_the_services_statements(services, database_url):
    """The ConfigMap's ini, as it is, on this machine's PgBouncer (1.18 on Debian 12)."""
    user = urlsplit(database_url).username or "postgres"
    with ShippedPgBouncer(services.database_url, database_url.rsplit("/", 1)[1]) as bouncer:
        url = f"postgresql://{user}:s3cret-for-test@127.0.0.1:{bouncer.port}/refunds"
        for _ in range(2):
            conn = await dbmod.connect(url, pooler="transaction")
            try:
                assert await conn.fetchval("SELECT current_database()") == database_url.rsplit("/", 1)[1]
                assert await conn.fetchval("SELECT count(*) FROM merchants WHERE merchant_id = $1", "none") == 0
            finally:
                await conn.close()
        with pytest.raises(asyncpg.PostgresError, match="authentication failed"):  # the userlist's password, not trust
            await asyncpg.connect(f"postgresql://{user}:wrong@127.0.0.1:{bouncer.port}/refunds")
