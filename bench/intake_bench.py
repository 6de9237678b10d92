"""Intake throughput: accepted refunds per second through the HTTP API and the Python API.

Each figure comes with, measured in the same run against the same Redis, the rate of
raw dramatiq ``send()`` of a no-op message: the cost of merely putting a message on the
queue, which no refund intake (validate + store in Postgres + enqueue) can beat.

    .venv/bin/python bench/intake_bench.py [--refunds 10000] [--rounds 3] [--connections 64] [--json FILE]

* HTTP: ``python -m producers.http`` as its own process (as in the Procfile), and a
  separate load process on loopback holding ``--connections`` keep-alive connections,
  each POSTing distinct valid refunds back to back; counts the 202s per second.
* Python API: ``producers.enqueue_refund`` from ``--connections`` concurrent tasks on one
  asyncpg pool of 10 connections (as the intake's) in this process.
* Baseline: ``actor.send()`` of a no-op dramatiq actor in a loop, one thread.

The load process is a minimal keep-alive HTTP/1.1 client on asyncio (as wrk is), so that
it takes little of the two cores. Every figure is the median of ``--rounds`` rounds. Each
round also reports the CPU time per accepted refund of the intake (or producer) process,
of its Postgres backends, of Redis and of the load process, from /proc: unlike
throughput, it hardly moves when other jobs share the machine, and how many cores those
other jobs took during the measurement is printed too.

Uses DATABASE_URL / REDIS_URL when set, else the embedded default. Either way it works in
a scratch database it creates and drops, and in Redis database 15 (keys removed after), so
no worker on the real queue ever sees a benchmark refund.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import (KeepAliveConnection, create_database, drop_database, machine, machine_busy_seconds,
                           with_path)

BENCH_REDIS_DB = 15
NOOP_QUEUE = "bench_noop"
POOL_SIZE = 10  # the Python API's pool: the intake's default (refunds.database.Database)
REFUNDS_PER_PAYMENT = 4  # 4 x 10.00 on payments of 100.00: a realistic share of row-lock contention


# --- the load process ------------------------------------------------------------------------

async def _load(url: str, token: str, bodies: list[bytes], connections: int, warmup: int) -> dict:
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    head = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\n").encode()
    requests = [head + b"Content-Length: %d\r\n\r\n" % len(body) + body for body in bodies]
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    next_index = 0
    clients = [(await loop.create_connection(KeepAliveConnection, parts.hostname, parts.port))[1]
               for _ in range(connections)]

    async def worker(client: KeepAliveConnection, timed: bool, end: int) -> None:
        nonlocal next_index
        while next_index < end:
            request = requests[next_index]
            next_index += 1
            started = time.perf_counter()
            status = await client.send(request)
            if timed:
                latencies.append(time.perf_counter() - started)
                statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(worker(client, False, warmup) for client in clients))
    print("timed", flush=True)  # the orchestrator starts counting CPU now
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(client, True, len(requests)) for client in clients))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    for client in clients:
        client.transport.close()
    latencies.sort()
    return {
        "requests": len(requests) - warmup, "elapsed": elapsed, "statuses": statuses,
        "accepted_per_s": statuses.get(202, 0) / elapsed, "load_cpu_s": cpu,
        "p50_ms": 1000 * latencies[len(latencies) // 2], "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
    }


def load_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    bodies = [line.encode() for line in Path(spec["bodies"]).read_text().splitlines()]
    result = asyncio.run(_load(spec["url"], spec["token"], bodies, spec["connections"], spec["warmup"]))
    print(json.dumps(result))


# --- helpers ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_seconds(pids: list[int]) -> float:
    """user + system CPU time of these processes so far (0 for one that is gone)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _service_pids(database_url: str, redis_url: str) -> dict[str, list[int]]:
    """Local Postgres (postmaster and backends) and Redis processes serving these URLs, when visible."""
    found: dict[str, list[int]] = {}
    pg_port, redis_port = str(urlsplit(database_url).port or 5432), str(urlsplit(redis_url).port or 6379)
    processes = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            processes[int(entry.name)] = ([a.decode(errors="replace") for a in argv], ppid)
    for pid, (argv, _) in processes.items():
        if argv[0].endswith("postgres") and "-p" in argv and argv[argv.index("-p") + 1] == pg_port:
            found["postgres"] = [pid] + [child for child, (_, ppid) in processes.items() if ppid == pid]
        if "redis-server" in argv[0] and any(arg.endswith(f":{redis_port}") or arg == redis_port for arg in argv):
            found["redis"] = [pid]
    return found


def baseline_send(redis_url: str, count: int) -> float:
    """Raw dramatiq: messages per second that actor.send() of a no-op puts on Redis, one thread."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=redis_url)
    dramatiq.set_broker(broker)

    @dramatiq.actor(queue_name=NOOP_QUEUE, broker=broker)
    def noop() -> None:
        pass

    for _ in range(200):
        noop.send()
    started = time.perf_counter()
    for _ in range(count):
        noop.send()
    rate = count / (time.perf_counter() - started)
    broker.flush(NOOP_QUEUE)
    broker.client.close()
    return rate


def _flush_refund_queue(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter("dramatiq:*"):
        client.delete(key)
    client.close()


# --- setup -----------------------------------------------------------------------------------

async def _prepare(admin_url: str, name: str, merchant: str, payments: int) -> tuple[str, str]:
    """A scratch database with one merchant, its payments and a token; returns (url, token)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from pagoefectivo.protocol import public_key_pem
    from refunds import db as dbmod
    from refunds.merchants import add_merchant
    from refunds.settings import get_settings
    from refunds.tokens import create_token
    from refunds.vault import Vault

    await create_database(admin_url, name)
    url = with_path(admin_url, "/" + name)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    conn = await dbmod.connect(url)
    try:
        await add_merchant(
            conn, Vault(get_settings().master_key()), merchant_id=merchant, env="sandbox", service_id=1,
            access_key="AK", secret_key="bench-secret", private_key_pem=pem, public_key_pem=public_key_pem(pem),
            rate_limit=Decimal(1000),
        )
        paid_at = datetime.now(timezone.utc)
        await conn.copy_records_to_table(
            "payments", columns=["merchant_id", "transaction_id", "amount", "currency", "method", "paid_at"],
            records=[(merchant, f"CIP-{i}", Decimal("100.00"), "PEN", "cash", paid_at) for i in range(payments)],
        )
        token = await create_token(conn, "bench", [merchant])
    finally:
        await conn.close()
    return url, token


def _bodies(merchant: str, prefix: str, start: int, count: int) -> list[str]:
    return [
        json.dumps({"merchant_id": merchant, "original_transaction_id": f"CIP-{i // REFUNDS_PER_PAYMENT}",
                    "amount": "10.00", "currency": "PEN", "external_ref": f"{prefix}-{i}", "reason": "bench"})
        for i in range(start, start + count)
    ]


# --- the two measurements ----------------------------------------------------------------------

def bench_http(database_url: str, redis_url: str, token: str, bodies: list[str], connections: int, warmup: int,
               workdir: Path, profile: str | None = None) -> dict:
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "INTAKE_PORT": str(port),
           "INTAKE_HOST": "127.0.0.1"}
    log = open(workdir / "intake.log", "wb")
    command = [sys.executable, "-m", "producers.http"]
    if profile:  # py-spy (on PATH) samples the intake process; collapsed stacks go to the file
        command = ["py-spy", "record", "--format", "raw", "--rate", "200", "-o", profile, "--", *command]
    server = subprocess.Popen(command, cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=log)
    try:
        line = ""
        for _ in range(10):  # py-spy, when used, prints lines of its own first
            line = server.stdout.readline().decode()
            if "listening" in line or not line:
                break
        if "listening" not in line:
            raise SystemExit(f"intake did not start: {line!r} (see {workdir / 'intake.log'})")
        (workdir / "bodies.jsonl").write_text("\n".join(bodies))
        spec = workdir / "spec.json"
        spec.write_text(json.dumps({"url": f"http://127.0.0.1:{port}/v1/refunds", "token": token,
                                    "bodies": str(workdir / "bodies.jsonl"), "connections": connections,
                                    "warmup": warmup}))
        intake = int(Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()[0]) if profile \
            else server.pid
        load = subprocess.Popen([sys.executable, __file__, "--load-worker", str(spec)], stdout=subprocess.PIPE, text=True)
        if load.stdout.readline().strip() != "timed":
            raise SystemExit("the load process failed during warm-up")
        # after the warm-up: the intake's pool has opened its Postgres connections by now
        watched = {"intake": [intake], **_service_pids(database_url, redis_url)}
        before = {name: _cpu_seconds(pids) for name, pids in watched.items()}
        busy = machine_busy_seconds()
        result = json.loads(load.stdout.readline())
        busy = machine_busy_seconds() - busy
        after = {name: _cpu_seconds(pids) for name, pids in watched.items()}
        load.wait(30)
        result["cpu_s"] = {name: after[name] - before[name] for name in watched}
        result["cpu_s"]["load"] = result.pop("load_cpu_s")
        # what the rest of the machine (other jobs) took meanwhile, in cores
        result["other_cores"] = max(0.0, busy - sum(result["cpu_s"].values())) / result["elapsed"]
        return result
    finally:
        if profile:  # stop the sampled intake; py-spy then writes its file and exits
            children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
            for child in children:
                os.kill(int(child), 15)
        else:
            server.terminate()
        server.wait(60)
        log.close()


async def bench_python(database_url: str, merchant: str, prefix: str, start: int, count: int, connections: int,
                       warmup: int) -> dict:
    """enqueue_refund from concurrent tasks on one pool in this process; ``count`` includes ``warmup``."""
    from producers import enqueue_refund
    from refunds import db as dbmod
    from refunds.delivery import Courier

    pool = await dbmod.create_pool(database_url, min_size=POOL_SIZE, max_size=POOL_SIZE)
    courier = Courier()
    created = 0
    next_index = start

    async def worker(end: int) -> None:
        nonlocal next_index, created
        while next_index < end:
            i = next_index
            next_index += 1
            result = await enqueue_refund(
                pool, merchant_id=merchant, original_transaction_id=f"CIP-{i // REFUNDS_PER_PAYMENT}", amount="10.00",
                currency="PEN", external_ref=f"{prefix}-{i}", reason="bench", requested_by="bench", courier=courier,
            )
            created += result.created

    watched = _service_pids(database_url, os.environ["REDIS_URL"])
    try:
        await asyncio.gather(*(worker(start + warmup) for _ in range(connections)))
        created = 0
        before = {name: _cpu_seconds(pids) for name, pids in watched.items()}
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(start + count) for _ in range(connections)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        after = {name: _cpu_seconds(pids) for name, pids in watched.items()}
    finally:
        await courier.close()
        await pool.close()
    cpu_s = {"producer": cpu, **{name: after[name] - before[name] for name in watched}}
    return {"requests": count - warmup, "accepted": created, "elapsed": elapsed, "accepted_per_s": created / elapsed,
            "cpu_s": cpu_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refunds", type=int, default=10000, help="refunds per measurement (10%% more as warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each kind; the median is reported")
    parser.add_argument("--connections", type=int, default=64, help="concurrent keep-alive connections / tasks")
    parser.add_argument("--baseline-messages", type=int, default=20000)
    parser.add_argument("--skip-python", action="store_true")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    parser.add_argument("--profile-server", metavar="FILE", help="sample the intake process with py-spy (raw stacks)")
    parser.add_argument("--load-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_worker:
        load_main(args.load_worker)
        return 0

    from refundctl.embedded import provide_services
    from refunds.settings import get_settings
    from refunds.vault import generate_master_key

    os.environ.setdefault("REFUNDS_MASTER_KEY", generate_master_key())
    merchant = "bench-m1"
    name = f"refunds_bench_{secrets.token_hex(4)}"
    warmup = min(1000, args.refunds // 10)
    per_round = args.refunds + warmup
    rounds: list[dict] = []
    with provide_services() as services, tempfile.TemporaryDirectory(prefix="intake-bench-") as tmp:
        redis_url = with_path(services.redis_url, f"/{BENCH_REDIS_DB}")
        os.environ["REDIS_URL"] = redis_url
        get_settings.cache_clear()
        payments = (2 * args.rounds * per_round) // REFUNDS_PER_PAYMENT + 1
        database_url, token = asyncio.run(_prepare(services.database_url, name, merchant, payments))
        os.environ["DATABASE_URL"] = database_url
        get_settings.cache_clear()
        try:
            for index in range(args.rounds):
                figures: dict = {}
                first = 2 * index * per_round  # each round refunds its own payments
                if not args.skip_http:
                    _flush_refund_queue(redis_url)
                    figures["baseline_http"] = baseline_send(redis_url, args.baseline_messages)
                    bodies = _bodies(merchant, f"H{index}", first, per_round)
                    figures["http"] = bench_http(database_url, redis_url, token, bodies, args.connections, warmup,
                                                 Path(tmp), args.profile_server if index == 0 else None)
                if not args.skip_python:
                    _flush_refund_queue(redis_url)
                    figures["baseline_python"] = baseline_send(redis_url, args.baseline_messages)
                    figures["python"] = asyncio.run(bench_python(
                        database_url, merchant, f"P{index}", first + per_round, per_round, args.connections, warmup))
                rounds.append(figures)
                _report_round(index, figures)
        finally:
            _flush_refund_queue(redis_url)
            asyncio.run(drop_database(services.database_url, name))
    summary = _summary(rounds)
    print()
    print(f"machine: {machine()}")
    print(f"services: {'embedded Postgres + Redis' if services.embedded else 'DATABASE_URL / REDIS_URL'}")
    print(f"{args.rounds} rounds of {args.refunds} refunds (+{warmup} warm-up), {args.connections} connections/tasks;"
          " medians:")
    for kind, label in (("http", "HTTP intake"), ("python", "Python API ")):
        if kind in summary:
            figures = summary[kind]
            print(f"  {label} {figures['rate']:7.0f} accepted refunds/s {figures['all']}   dramatiq send() "
                  f"{figures['baseline']:7.0f} no-op msgs/s   ratio {figures['ratio']:.2f}   CPU/refund: {figures['cpu']}")
    if "http" in summary:
        print(f"  other jobs on the machine used {summary['http']['other_cores']:.2f} of its "
              f"{os.cpu_count()} cores during the HTTP measurements")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "args": vars(args), "rounds": rounds,
                                               "summary": summary}, indent=2, default=str))
    return 0


def _cpu_text(cpu_s: dict, count: int) -> str:
    return ", ".join(f"{name} {1e6 * seconds / max(1, count):.0f} us" for name, seconds in cpu_s.items())


def _report_round(index: int, figures: dict) -> None:
    if "http" in figures:
        http = figures["http"]
        accepted = http["statuses"].get("202", 0)
        print(f"round {index + 1}: HTTP {http['accepted_per_s']:.0f}/s (p50 {http['p50_ms']:.1f} ms, p99 "
              f"{http['p99_ms']:.1f} ms, {http['statuses']}), send() {figures['baseline_http']:.0f}/s; "
              f"CPU/refund {_cpu_text(http['cpu_s'], accepted)}; other jobs used {http['other_cores']:.2f} cores",
              flush=True)
    if "python" in figures:
        py = figures["python"]
        print(f"round {index + 1}: Python API {py['accepted_per_s']:.0f}/s, send() {figures['baseline_python']:.0f}/s; "
              f"CPU/refund {_cpu_text(py['cpu_s'], py['accepted'])}", flush=True)


def _summary(rounds: list[dict]) -> dict:
    import statistics

    summary = {}
    for kind in ("http", "python"):
        measured = [r for r in rounds if kind in r]
        if not measured:
            continue
        rate = statistics.median(r[kind]["accepted_per_s"] for r in measured)
        middle = min(measured, key=lambda r: abs(r[kind]["accepted_per_s"] - rate))
        count = middle[kind]["statuses"].get("202", 0) if kind == "http" else middle[kind]["accepted"]
        summary[kind] = {
            "rate": rate,
            "baseline": statistics.median(r[f"baseline_{kind}"] for r in measured),
            "ratio": statistics.median(r[kind]["accepted_per_s"] / r[f"baseline_{kind}"] for r in measured),
            "cpu": _cpu_text(middle[kind]["cpu_s"], count),
            "all": [round(r[kind]["accepted_per_s"]) for r in measured],
        }
        if kind == "http":
            summary[kind]["other_cores"] = statistics.median(r[kind]["other_cores"] for r in measured)
    return summary


if __name__ == "__main__":
    sys.exit(main())
