"""The embedded default: real throwaway Postgres and Redis, and nothing left behind however we exit."""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import asyncpg
import pytest
import redis

from refundctl import embedded
from refundctl.embedded import embedded_postgres, embedded_redis, is_alive, processes_in, provide_services
from tests.helpers import ROOT

CLEANUP_DEADLINE = 10.0


@pytest.fixture(autouse=True)
def no_service_urls(monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)


def _run(coro):
    """Run a coroutine on a private loop, leaving pytest-asyncio's loop alone."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def describe(services) -> dict:
    """Ask the servers themselves who they are: pids, folders, ports (after SELECT 1 and PING)."""

    async def postgres() -> tuple[str, int]:
        conn = await asyncpg.connect(services.database_url)
        try:
            assert await conn.fetchval("SELECT 1") == 1
            assert await conn.fetchval("SELECT current_database()") == "refunds"
            data_dir = await conn.fetchval("SHOW data_directory")
            port = int(await conn.fetchval("SHOW port"))
        finally:
            await conn.close()
        return data_dir, port

    data_dir, pg_port = _run(postgres())
    pid_file = Path(data_dir, "postmaster.pid").read_text().splitlines()
    postmaster_pid, shmid = int(pid_file[0]), int(pid_file[6].split()[1])
    client = redis.Redis.from_url(services.redis_url)
    try:
        assert client.ping() is True
        redis_pid = int(client.info("server")["process_id"])
        redis_port = int(client.info("server")["tcp_port"])
        redis_dir = client.config_get("dir")["dir"]
    finally:
        client.close()
    return {
        "pg_dir": str(Path(data_dir).parent), "pg_pid": postmaster_pid, "pg_port": pg_port, "pg_shmid": shmid,
        "redis_dir": redis_dir, "redis_pid": redis_pid, "redis_port": redis_port,
    }


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def shm_exists(shmid: int) -> bool:
    lines = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return any(int(line.split()[1]) == shmid for line in lines)


def watchdogs_for(paths: list[str]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--watch" in argv and any(p.encode() in argv for p in paths) and is_alive(int(entry)):
            found.append(int(entry))
    return found


def leftovers(info: dict) -> list[str]:
    """Everything of one run that still exists; empty when the cleanup is complete."""
    paths = [info["pg_dir"], info["redis_dir"]]
    problems = [f"pid {info[k]} alive" for k in ("pg_pid", "redis_pid") if is_alive(info[k])]
    problems += [f"{p} exists" for p in paths if os.path.lexists(p)]
    problems += [f"port {info[k]} open" for k in ("pg_port", "redis_port") if port_open(info[k])]
    problems += [f"pids {sorted(pids)} in folders" for pids in [processes_in([Path(p) for p in paths])] if pids]
    problems += [f"watchdogs {w} alive" for w in [watchdogs_for(paths)] if w]
    if shm_exists(info["pg_shmid"]):
        problems.append(f"shared memory segment {info['pg_shmid']} exists")
    return problems


def wait_for_cleanup(info: dict, timeout: float = CLEANUP_DEADLINE) -> float:
    started = time.monotonic()
    while problems := leftovers(info):
        assert time.monotonic() - started < timeout, f"not cleaned up after {timeout}s: {problems}"
        time.sleep(0.05)
    return time.monotonic() - started


def assert_running(info: dict) -> None:
    temp = os.path.realpath(tempfile.gettempdir())
    assert Path(info["pg_dir"]).parent == Path(temp) and Path(info["pg_dir"]).name.startswith("refunds-pg-")
    assert Path(info["redis_dir"]).parent == Path(temp) and Path(info["redis_dir"]).name.startswith("refunds-redis-")
    assert is_alive(info["pg_pid"]) and is_alive(info["redis_pid"])
    assert port_open(info["pg_port"]) and port_open(info["redis_port"])
    assert len(watchdogs_for([info["pg_dir"]])) == 1 and len(watchdogs_for([info["redis_dir"]])) == 1


@pytest.mark.slow
def test_start_connect_and_clean_exit():
    started = time.monotonic()
    with provide_services() as services:
        start_time = time.monotonic() - started
        assert services.embedded is True
        assert services.database_url.startswith("postgresql://postgres@127.0.0.1:")
        assert services.database_url.endswith("/refunds")
        assert services.redis_url.startswith("redis://127.0.0.1:") and services.redis_url.endswith("/0")
        info = describe(services)
        assert_running(info)
        if os.geteuid() == 0:  # Postgres refuses root: it runs as the unprivileged account
            uids = Path(f"/proc/{info['pg_pid']}/status").read_text().split("Uid:")[1].split()
            assert uids[0] != "0" and Path(info["pg_dir"]).stat().st_uid == int(uids[0])
        stopping = time.monotonic()
    stop_time = time.monotonic() - stopping
    assert leftovers(info) == []
    assert start_time < 60 and stop_time < 20, (start_time, stop_time)  # neither hangs (typically 2-4 s and < 1 s)
    print(f"start {start_time:.2f}s, stop {stop_time:.2f}s")


@pytest.mark.slow
def test_exception_inside_context_cleans_up():
    with pytest.raises(ZeroDivisionError):
        with provide_services() as services:
            info = describe(services)
            1 / 0
    assert leftovers(info) == []


@pytest.mark.slow
def test_two_runs_in_a_row():
    seen = []
    for _ in range(2):
        with provide_services() as services:
            info = describe(services)
            assert_running(info)
            seen.append(info)
        assert leftovers(info) == []
    assert seen[0]["pg_dir"] != seen[1]["pg_dir"]


CHILD = textwrap.dedent("""
    import json, sys, threading, time
    from refundctl.embedded import provide_services
    from tests.refundctl.test_embedded import describe

    def run():
        with provide_services() as services:
            print(json.dumps(describe(services)), flush=True)
            time.sleep(120)

    if sys.argv[1] == "thread":  # forked off the main thread: no PDEATHSIG, the watchdog alone
        threading.Thread(target=run, daemon=True).start()
        time.sleep(120)
    else:
        run()
""")


def start_child(mode: str = "main") -> tuple[subprocess.Popen, dict]:
    """A Python process inside provide_services(); returns it and what its servers reported."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, mode], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stdin=subprocess.DEVNULL)
    ready, _, _ = select.select([child.stdout], [], [], 30)
    line = child.stdout.readline() if ready else b""
    if not line:
        child.kill()
        child.wait()
        child.stdout.close()
        pytest.fail(f"child did not start the services (exit code {child.returncode})")
    info = json.loads(line)
    assert_running(info)
    return child, info


def stop_child(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
    child.wait()
    child.stdout.close()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_parent_killed_leaves_nothing(sig):
    child, info = start_child()
    try:
        child.send_signal(sig)
        took = wait_for_cleanup(info)
        child.wait(CLEANUP_DEADLINE)
        print(f"{sig.name}: cleaned up in {took:.2f}s")
    finally:
        stop_child(child)


@pytest.mark.slow
def test_watchdog_alone_cleans_up_after_sigkill():
    """Servers started off the main thread get no PDEATHSIG; the watchdog must still kill them."""
    child, info = start_child("thread")
    try:
        child.kill()
        wait_for_cleanup(info)
    finally:
        stop_child(child)


@pytest.mark.slow
def test_servers_die_with_parent_without_watchdog():
    """PDEATHSIG alone: with the watchdogs gone, SIGKILL of the parent still takes the servers down."""
    child, info = start_child()
    paths = [Path(info["pg_dir"]), Path(info["redis_dir"])]
    try:
        for pid in watchdogs_for([str(p) for p in paths]):
            os.kill(pid, signal.SIGKILL)
        child.kill()
        deadline = time.monotonic() + CLEANUP_DEADLINE
        while is_alive(info["pg_pid"]) or is_alive(info["redis_pid"]) or processes_in(paths):
            assert time.monotonic() < deadline, "servers outlived their parent"
            time.sleep(0.05)
    finally:
        stop_child(child)
        embedded.clean_up_folders(paths)  # nobody else will now
    assert leftovers(info) == []


@pytest.mark.slow
def test_environment_urls_are_used(monkeypatch):
    temp = tempfile.gettempdir()
    with provide_services() as outer:
        monkeypatch.setenv("DATABASE_URL", outer.database_url)
        monkeypatch.setenv("REDIS_URL", outer.redis_url)
        before = set(os.listdir(temp))
        with provide_services() as inner:
            assert inner == embedded.Services(outer.database_url, outer.redis_url, embedded=False)
            assert set(os.listdir(temp)) == before  # no new server folders
            describe(inner)
        # Each independently: only REDIS_URL unset starts only a Redis.
        monkeypatch.delenv("REDIS_URL")
        with provide_services() as partial:
            assert partial.embedded is True and partial.database_url == outer.database_url
            assert partial.redis_url != outer.redis_url
            added = set(os.listdir(temp)) - before
            assert [name for name in added if name.startswith("refunds-")] and all(
                name.startswith("refunds-redis-") for name in added if name.startswith("refunds-"))
            describe(partial)
        info = describe(outer)  # the outer servers are untouched by the inner runs
    assert leftovers(info) == []


@pytest.mark.slow
@pytest.mark.parametrize("manager", [embedded_redis, embedded_postgres], ids=["redis", "postgres"])
def test_port_collision_retries_on_another_port(monkeypatch, manager):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    real_free_port = embedded._free_port
    offered = []

    def first_busy() -> int:
        offered.append(busy if not offered else real_free_port())
        return offered[-1]

    monkeypatch.setattr(embedded, "_free_port", first_busy)
    try:
        with manager() as url:
            port = int(url.split(":")[2].split("/")[0])
            assert port != busy and len(offered) == 2
    finally:
        taken.close()


def test_unrunnable_binaries_fail_clearly():
    before = set(os.listdir(tempfile.gettempdir()))
    locked = Path(tempfile.mkdtemp(prefix="refunds-test-bin-"))  # 0700: the server account cannot enter
    try:
        for name in ("initdb", "postgres"):
            (locked / name).write_text("#!/bin/sh\necho 'postgres (PostgreSQL) 16'\n")
            (locked / name).chmod(0o755 if os.geteuid() == 0 else 0o644)  # unreachable resp. not executable
        with pytest.raises(RuntimeError, match="cannot be run by user") as failure:
            with embedded_postgres(bin_dir=locked):
                pass
        assert str(locked) in str(failure.value) and "DATABASE_URL" in str(failure.value)
    finally:
        for child in locked.iterdir():
            child.unlink()
        locked.rmdir()
    assert set(os.listdir(tempfile.gettempdir())) <= before


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: Postgres then runs as another account")
def test_a_checkout_in_a_folder_others_cannot_enter_still_runs_postgres(tmp_path):
    """The project under root's 0700 home: the server account cannot reach the venv's binaries,
    so a copy it can reach is made (once) and used."""
    from refundctl.embedded import _postgres_bin_dir

    home = tmp_path / "root-home"
    home.mkdir(mode=0o700)
    site = home / "venv" / "site-packages"  # the wheel's layout: pgserver/pginstall beside pgserver.libs
    shipped = _postgres_bin_dir().parent
    shutil.copytree(shipped, site / "pgserver" / "pginstall", symlinks=True, ignore=shutil.ignore_patterns("include"))
    shutil.copytree(shipped.parent.parent / "pgserver.libs", site / "pgserver.libs", symlinks=True)
    with embedded_postgres(bin_dir=site / "pgserver" / "pginstall" / "bin") as url:
        assert asyncio.run(fetchval(url, "SELECT 1")) == 1


async def fetchval(url: str, sql: str):
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def test_sigterm_handler_installed_only_when_default():
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with embedded_redis():
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler)
            with pytest.raises(SystemExit):
                handler(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

        def ours(signum, frame):
            pass

        signal.signal(signal.SIGTERM, ours)
        with embedded_redis():
            assert signal.getsignal(signal.SIGTERM) is ours
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_folders_are_private_and_outside_home():
    with embedded_postgres() as dsn:
        async def data_dir() -> str:
            conn = await asyncpg.connect(dsn)
            try:
                return await conn.fetchval("SHOW data_directory")
            finally:
                await conn.close()

        root = Path(_run(data_dir())).parent
        assert not str(root).startswith(os.path.realpath(os.path.expanduser("~")) + "/")
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert not root.exists()


FORKING = textwrap.dedent("""
    import os, sys, redis
    from refundctl.embedded import embedded_redis

    with embedded_redis() as url:
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # unwinds the with block in the forked child
        os.waitpid(pid, 0)
        print(redis.Redis.from_url(url).ping(), flush=True)
""")


def test_forked_child_does_not_stop_the_servers():
    result = subprocess.run([sys.executable, "-c", FORKING], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
