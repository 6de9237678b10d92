"""Heartbeats for the Kubernetes probes of the worker and the scheduler.

Their /metrics is served by another thread or process, which keeps answering when the loop
that does the work hangs; so each loop touches a file of its own on every turn, and the
liveness probe (``python -m refunds.heartbeat worker|scheduler``) fails when one is stale.
``--ready`` checks instead that Postgres and Redis answer (the readiness probe).

A file is named by its process's pid and holds that process's start time, so a file left by
an earlier container (an emptyDir outlives it) or by a dead process is not mistaken for a live one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from refunds import service
from refunds.settings import get_settings

INTERVAL_SECONDS = 5.0
MAX_AGE_SECONDS = 120.0


def folder(kind: str) -> Path:
    """Where a service's processes beat: one folder per service and metrics port (several per host)."""
    settings = get_settings()
    port = settings.metrics_port if kind == "worker" else settings.scheduler_metrics_port
    return Path(tempfile.gettempdir()) / f"refunds-heartbeat-{kind}-{port}"


def _started(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def beat(where: Path) -> None:
    """This process is alive and its loop turning."""
    where.mkdir(parents=True, exist_ok=True)
    mine = where / str(os.getpid())
    mine.write_text(_started(os.getpid()) or "?")


def stop(where: Path) -> None:
    """This process is stopping on purpose: its silence is not a hang."""
    (where / str(os.getpid())).unlink(missing_ok=True)


async def beat_forever(where: Path, interval: float = INTERVAL_SECONDS) -> None:
    """Beat from an event loop: it stops beating when that loop is blocked."""
    while True:
        beat(where)
        await asyncio.sleep(interval)


def stale(where: Path, max_age: float = MAX_AGE_SECONDS) -> list[str] | None:
    """Live processes whose last beat is older than ``max_age``; None when no live process beats."""
    live, late = 0, []
    now = time.time()
    for path in where.glob("[0-9]*") if where.is_dir() else ():
        try:
            started, mtime = path.read_text(), path.stat().st_mtime
        except OSError:
            continue
        if started != _started(int(path.name)):
            continue  # that process is gone (or the pid is another's now)
        live += 1
        if now - mtime > max_age:
            late.append(f"pid {path.name}: last beat {now - mtime:.0f}s ago")
    return late if live else None


async def _reachable() -> None:
    """Postgres and Redis answer within a few seconds (raises otherwise)."""
    import redis.asyncio as aioredis

    from refunds import db

    settings = get_settings()
    conn = await asyncio.wait_for(db.connect(settings.require("database_url")), 5)
    try:
        await asyncio.wait_for(conn.fetchval("SELECT 1"), 5)
    finally:
        await conn.close()
    client = aioredis.from_url(settings.require("redis_url"), socket_connect_timeout=5, socket_timeout=5)
    try:
        await client.ping()
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refunds.heartbeat", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("worker", "scheduler"))
    parser.add_argument("--max-age", type=float, default=MAX_AGE_SECONDS, help="seconds a beat stays fresh")
    parser.add_argument("--ready", action="store_true", help="check that Postgres and Redis answer instead")
    args = parser.parse_args(argv)
    if args.ready:
        try:
            asyncio.run(_reachable())
        except Exception as exc:
            known = service.failure(exc)
            print(f"{args.kind}: not ready: {known[1] if known else type(exc).__name__}", file=sys.stderr)
            return service.UNAVAILABLE
        return service.OK
    late = stale(folder(args.kind), args.max_age)
    if late is None:
        print(f"{args.kind}: no process beats in {folder(args.kind)}", file=sys.stderr)
        return 1
    if late:
        print(f"{args.kind}: loop stuck: {'; '.join(late)}", file=sys.stderr)
        return 1
    return service.OK


if __name__ == "__main__":
    sys.exit(main())
