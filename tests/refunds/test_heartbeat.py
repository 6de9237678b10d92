"""Liveness that fails when the loop hangs, though /metrics (another thread or process) still answers."""

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from tests.helpers import ROOT
from refunds import heartbeat


@pytest.fixture
def tmp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_fresh_beat_passes_a_stale_one_fails_and_dead_processes_do_not_count(tmp_path):
    where = tmp_path / "beats"
    assert heartbeat.stale(where) is None  # nobody beats yet
    (where).mkdir()
    (where / "999999999").write_text("1")  # a process of an earlier container
    assert heartbeat.stale(where) is None
    heartbeat.beat(where)
    assert heartbeat.stale(where, max_age=60) == []
    old = time.time() - 61
    os.utime(where / str(os.getpid()), (old, old))
    assert heartbeat.stale(where, max_age=60) == [f"pid {os.getpid()}: last beat 61s ago"]
    heartbeat.stop(where)
    assert heartbeat.stale(where) is None


@pytest.mark.slow
def test_a_blocked_event_loop_stops_the_beats(tmp_path):
    where = tmp_path / "beats"
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    beats = asyncio.run_coroutine_threadsafe(heartbeat.beat_forever(where, interval=0.05), loop)
    try:
        time.sleep(0.3)
        assert heartbeat.stale(where, max_age=0.5) == []
        loop.call_soon_threadsafe(time.sleep, 1.5)  # sync code hogging the loop every refund runs on
        time.sleep(1.2)
        assert heartbeat.stale(where, max_age=0.5)
        time.sleep(0.8)
        assert heartbeat.stale(where, max_age=0.5) == []  # the loop turns again
    finally:
        beats.cancel()
        time.sleep(0.1)  # the cancellation reaches the task before the loop stops
        loop.call_soon_threadsafe(loop.stop)


@pytest.mark.slow
async def test_a_hung_scheduler_pass_stops_its_beats(tmp_dir, database_url, monkeypatch):
    from workers import scheduler

    hang = asyncio.Event()

    async def sweep(pool, **_):
        if hang.is_set():
            await asyncio.Event().wait()  # a query that never returns

    async def nothing(*args, **kwargs):
        return None

    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setattr(scheduler, "sweep_once", sweep)
    monkeypatch.setattr(scheduler, "update_gauges", nothing)
    monkeypatch.setattr(scheduler, "purge_expired", nothing)
    monkeypatch.setattr(scheduler, "ask_redis", nothing)
    where = heartbeat.folder("scheduler")
    task = asyncio.create_task(scheduler.run(interval=0.05))
    try:
        deadline = time.monotonic() + 10  # the scheduler's first beats, however slow its start
        while heartbeat.stale(where, max_age=0.4) != []:
            assert time.monotonic() < deadline, heartbeat.stale(where, max_age=0.4)
            await asyncio.sleep(0.05)
        hang.set()
        await asyncio.sleep(1)
        assert heartbeat.stale(where, max_age=0.4)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.slow
def test_the_probe_command(tmp_path, database_url, redis_url):
    env = {**os.environ, "TMPDIR": str(tmp_path), "DATABASE_URL": database_url, "REDIS_URL": redis_url,
           "SCHEDULER_METRICS_PORT": "9999"}

    def probe(*args, **extra):
        return subprocess.run([sys.executable, "-m", "refunds.heartbeat", *args], cwd=ROOT,
                              env={**env, **extra}, capture_output=True, text=True, timeout=60)

    run = probe("scheduler")
    assert run.returncode == 1 and "no process beats" in run.stderr
    where = tmp_path / "refunds-heartbeat-scheduler-9999"
    heartbeat.beat(where)  # this test's process stands for a live scheduler
    assert probe("scheduler").returncode == 0
    old = time.time() - 300
    os.utime(where / str(os.getpid()), (old, old))
    run = probe("scheduler", "--max-age", "120")
    assert run.returncode == 1 and "loop stuck" in run.stderr
    assert probe("worker", "--ready").returncode == 0
    run = probe("worker", "--ready", REDIS_URL="redis://127.0.0.1:1/0")
    assert run.returncode == 3 and "not ready" in run.stderr


def test_the_probe_leaves_nothing_in_the_workers_metrics_folder(tmp_path, database_url, redis_url):
    """Kubernetes runs the probes beside a worker whose PROMETHEUS_MULTIPROC_DIR its /metrics sums:
    the probe must not load the worker (its broker, actors and metrics), or every run leaves
    files there for every later scrape to read."""
    metrics = tmp_path / "worker-metrics"
    metrics.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path), "DATABASE_URL": database_url, "REDIS_URL": redis_url,
           "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
    for args in (["worker"], ["worker", "--ready"]):
        subprocess.run([sys.executable, "-m", "refunds.heartbeat", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert list(metrics.iterdir()) == []
