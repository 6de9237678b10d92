"""Receiver benchmark: the real ``python -m receiver`` against the least such a service can cost.

    .venv/bin/python bench/receiver_bench.py [--rounds 3] [--duration 5] [--concurrency 64] [--rate 1000]

What runs, each in its own process, all on loopback:

* the receiver (``python -m receiver``, logging one line per notification as in production);
* a baseline: a minimal aiohttp handler that stores the raw body with one asyncpg
  ``INSERT ... ON CONFLICT DO NOTHING`` (no signature, no parsing, no logging, no metrics);
* a load process (this file, ``_load``) with an aiohttp client and many connections.

The traffic is a realistic mix: 80% new notifications, 15% redeliveries of a notification
sent shortly before, and 5% bad signatures. New ones are ``cip.paid`` for new payments and,
``--refund-share`` of them (default 20%: refunds are a fraction of orders, every order is a
payment), ``refund.succeeded``/``refund.failed`` for refunds seeded in ``submitted``. Both
servers get the same bytes. Phases: closed loop at full speed (notifications/s, p50/p99;
rounds alternate which server goes first), then open loop at a fixed rate (latency measured
from the scheduled send time, so a stall is not hidden). CPU per notification of each
server, its Postgres backends and the client is read from /proc: on a shared machine it is
a steadier comparison than throughput.

Postgres is DATABASE_URL if set, else the embedded default; a throwaway database is made
and dropped. Numbers go to stdout; ``--json FILE`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import pickle
import platform
import random
import secrets
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NOTIFY = "/pagoefectivo/notifications/{}"
MIX = {"new": 0.80, "duplicate": 0.15, "bad_signature": 0.05}
REDELIVERY_DISTANCE = (200, 2000)  # a duplicate repeats a notification sent this many requests earlier


# --- the plan: every request, made before the clock starts ----------------------------------

def make_plan(tag: str, count: int, merchants: dict[str, str], seed: int, refund_share: float) -> tuple[list, int]:
    """``count`` requests (path, body, headers, kind); also how many refunds they need seeded."""
    from pagoefectivo.protocol import SIGNATURE_HEADER, dumps, notification_signature

    rng = random.Random(seed)
    ids = sorted(merchants)
    plan, news, refunds = [], [], 0
    for index in range(count):
        roll = rng.random()
        if roll < MIX["duplicate"] and len(news) > REDELIVERY_DISTANCE[0]:
            path, body, headers, _ = news[-min(len(news), rng.randint(*REDELIVERY_DISTANCE))]
            plan.append((path, body, headers, "duplicate"))
            continue
        merchant = ids[index % len(ids)]
        operation = f"{tag}-{index}"
        if rng.random() >= refund_share:
            payload = {"eventType": "cip.paid", "operationNumber": operation, "data": {
                "cip": f"CIP-{operation}", "currency": "PEN", "amount": Decimal("150.50"),
                "transactionCode": f"ORDER-{operation}", "paymentDate": "2026-01-15T10:15:00-05:00",
                "merchantId": merchant}}
        else:
            number = refunds
            refunds += 1
            failed = rng.random() < 0.1
            payload = {"eventType": "refund.failed" if failed else "refund.succeeded", "operationNumber": operation,
                       "data": {"refundId": f"PE-{tag}-{number}", "externalRef": f"R-{tag}-{number}",
                                "originalTransactionId": f"P-{tag}-{number}", "refundAmount": Decimal("40.00"),
                                "currency": "PEN", "merchantId": seed_merchant(ids, number),
                                "status": "failure" if failed else "success"}}
            merchant = seed_merchant(ids, number)
        body = dumps(payload)
        secret = merchants[merchant]
        bad = roll > 1 - MIX["bad_signature"]
        signature = notification_signature(body, secret + "-wrong" if bad else secret)
        request = (NOTIFY.format(merchant), body, {SIGNATURE_HEADER: signature, "Content-Type": "application/json"},
                   "bad_signature" if bad else "new")
        plan.append(request)
        if not bad:
            news.append(request)
    return plan, refunds


def seed_merchant(ids: list[str], number: int) -> str:
    return ids[number % len(ids)]


async def seed_refunds(conn, tag: str, count: int, ids: list[str]) -> None:
    """``count`` paid transactions, each with one refund in ``submitted``, as the plan expects."""
    if not count:
        return
    await conn.execute(
        """INSERT INTO payments (merchant_id, transaction_id, amount, currency, method, paid_at)
           SELECT ($3::text[])[1 + i % cardinality($3::text[])], 'P-' || $1 || '-' || i, 100, 'PEN', 'cash', now()
             FROM generate_series(0, $2 - 1) AS i""", tag, count, ids)
    await conn.execute(
        """INSERT INTO refunds (refund_id, merchant_id, external_ref, original_transaction_id, amount, currency, state)
           SELECT gen_random_uuid(), ($3::text[])[1 + i % cardinality($3::text[])], 'R-' || $1 || '-' || i,
                  'P-' || $1 || '-' || i, 40, 'PEN', 'submitted'
             FROM generate_series(0, $2 - 1) AS i""", tag, count, ids)


# --- the load process -----------------------------------------------------------------------

async def load(url: str, plan_file: str, concurrency: int, duration: float, rate: float | None) -> dict:
    import aiohttp

    with open(plan_file, "rb") as f:
        plan = pickle.load(f)
    latencies: list[float] = []
    statuses: dict[str, int] = {}  # "kind status" -> count
    errors = 0
    cpu_started = time.process_time()
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)

    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:
        async def send(request, since: float) -> None:
            nonlocal errors
            path, body, headers, kind = request
            try:
                async with session.post(path, data=body, headers=headers) as response:
                    await response.read()
                    key = f"{kind} {response.status}"
                    statuses[key] = statuses.get(key, 0) + 1
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
                return
            latencies.append(time.perf_counter() - since)

        started = time.perf_counter()
        deadline = started + duration
        if rate is None:  # closed loop: ``concurrency`` senders, each sends again once answered
            position = iter(range(len(plan)))

            async def sender() -> None:
                for index in position:
                    if time.perf_counter() >= deadline:
                        return
                    await send(plan[index], time.perf_counter())

            await asyncio.gather(*(sender() for _ in range(concurrency)))
        else:  # open loop: request i is due at started + i / rate, whether or not earlier ones returned
            tasks = set()
            for index in range(min(len(plan), int(rate * duration))):
                due = started + index / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(send(plan[index], due))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    latencies.sort()
    done = len(latencies)

    def pct(q: float) -> float:
        return round(latencies[min(done - 1, int(q * done))] * 1000, 2) if done else float("nan")

    return {"requests": done, "errors": errors, "seconds": round(elapsed, 3), "per_second": round(done / elapsed, 1),
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "max_ms": pct(1.0),
            "client_cpu_ms_per_request": round((time.process_time() - cpu_started) * 1000 / max(1, done), 3),
            "statuses": dict(sorted(statuses.items()))}


# --- the baseline server --------------------------------------------------------------------

BASELINE_TABLE = """CREATE TABLE IF NOT EXISTS bench_baseline (
    merchant_id text NOT NULL, operation_number text NOT NULL, body jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (merchant_id, operation_number))"""


def serve_baseline(port: int, dsn: str) -> None:
    import asyncpg
    from aiohttp import web

    async def notification(request: web.Request) -> web.Response:
        body = await request.read()
        await request.app["pool"].execute(
            """INSERT INTO bench_baseline (merchant_id, operation_number, body)
               VALUES ($1, ($2::jsonb)->>'operationNumber', $2::jsonb) ON CONFLICT DO NOTHING""",
            request.match_info["merchant_id"], body.decode())
        return web.json_response({"result": "ok"})

    async def start(app: web.Application) -> None:
        app["pool"] = await asyncpg.create_pool(dsn, min_size=1, max_size=10)
        await app["pool"].execute(BASELINE_TABLE)

    async def stop(app: web.Application) -> None:
        await app["pool"].close()

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_post("/pagoefectivo/notifications/{merchant_id}", notification)
    print(f"baseline listening on http://127.0.0.1:{port}", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# --- the driver -----------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(argv: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log)
    log.close()
    line = proc.stdout.readline().decode()
    if "listening" not in line:
        proc.kill()
        raise RuntimeError(f"{argv} did not start: {line!r}; see {log_path}")
    return proc


def run_load(url: str, plan: list, workdir: Path, concurrency: int, duration: float, rate: float | None) -> dict:
    plan_file = workdir / "plan.pickle"
    with open(plan_file, "wb") as f:
        pickle.dump(plan, f)
    argv = [sys.executable, __file__, "_load", "--url", url, "--plan", str(plan_file),
            "--concurrency", str(concurrency), "--duration", str(duration)]
    if rate:
        argv += ["--rate", str(rate)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=duration + 120)
    if done.returncode != 0:
        raise RuntimeError(f"load process failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def backends(database: str) -> list[int]:
    """Pids of the Postgres backends serving ``database`` (their title names it)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                title = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if title.startswith("postgres: ") and f" {database} " in title:
                found.append(int(entry))
    return found


def measured(url: str, plan: list, workdir: Path, concurrency: int, duration: float, rate: float | None,
             server: subprocess.Popen, database: str) -> dict:
    """run_load, plus the CPU the server process and its Postgres backends spent per request."""
    pids = backends(database)
    server_before, db_before = cpu_seconds([server.pid]), cpu_seconds(pids)
    result = run_load(url, plan, workdir, concurrency, duration, rate)
    server_cpu, db_cpu = cpu_seconds([server.pid]) - server_before, cpu_seconds(pids) - db_before
    result["server_cpu_ms_per_request"] = round(server_cpu * 1000 / max(1, result["requests"]), 3)
    result["postgres_cpu_ms_per_request"] = round(db_cpu * 1000 / max(1, result["requests"]), 3)
    return result


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


async def prepare(admin_url: str, name: str, merchants: dict[str, str], vault) -> str:
    import asyncpg
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from pagoefectivo.protocol import public_key_pem
    from refunds import db as dbmod
    from refunds.merchants import add_merchant

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = with_database(admin_url, name)
    await dbmod.migrate(url)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    conn = await dbmod.connect(url)
    try:
        for index, (merchant_id, secret) in enumerate(sorted(merchants.items())):
            await add_merchant(conn, vault, merchant_id=merchant_id, env="sandbox", service_id=1000 + index,
                               access_key=f"AK{index}", secret_key=secret, private_key_pem=pem,
                               public_key_pem=public_key_pem(pem), rate_limit=Decimal(100))
    finally:
        await conn.close()
    return url


async def seed(url: str, tag: str, count: int, ids: list[str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await seed_refunds(conn, tag, count, ids)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def counts(url: str) -> dict:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return {
            "notifications": await conn.fetchval("SELECT count(*) FROM notifications"),
            "refund_events": await conn.fetchval("SELECT count(*) FROM refund_events"),
            "by_result": {r["result"]: r["n"] for r in await conn.fetch(
                "SELECT result, count(*) AS n FROM notifications GROUP BY result ORDER BY result")},
        }
    finally:
        await conn.close()


async def drop(admin_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def check_receiver(result: dict, before: dict, after: dict) -> None:
    """Every new notification answered 200 left one row; duplicates 200 and no row; bad signatures 401."""
    statuses = result["statuses"]
    unexpected = {k: v for k, v in statuses.items()
                  if k not in ("new 200", "duplicate 200", "bad_signature 401")}
    added = after["notifications"] - before["notifications"]
    result["rows_added"] = added
    if unexpected or added != statuses.get("new 200", 0) or result["errors"]:
        print(f"!! receiver answers or rows are off: {statuses}, {added} rows added, {result['errors']} errors",
              flush=True)
        result["check"] = "FAILED"
    else:
        result["check"] = "ok"


def combine(runs: list[dict]) -> dict:
    """Several runs as one: totals, throughput over the summed time, per-request CPU weighted by requests."""
    requests = sum(r["requests"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    combined = {"requests": requests, "errors": sum(r["errors"] for r in runs), "seconds": round(seconds, 3),
                "per_second": round(requests / seconds, 1)}
    for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):  # of the whole: the worst round's (no raw samples kept)
        combined[key] = max(r[key] for r in runs)
    for key in ("server_cpu_ms_per_request", "postgres_cpu_ms_per_request", "client_cpu_ms_per_request"):
        combined[key] = round(sum(r[key] * r["requests"] for r in runs) / max(1, requests), 3)
    combined["statuses"] = {}
    for r in runs:
        for k, v in r["statuses"].items():
            combined["statuses"][k] = combined["statuses"].get(k, 0) + v
    return combined


def line(name: str, result: dict) -> str:
    return (f"{name:<28} {result['per_second']:>9.1f}/s  p50 {result['p50_ms']:>7.2f} ms  p99 {result['p99_ms']:>7.2f} ms"
            f"  n={result['requests']} err={result['errors']}  cpu/req: server"
            f" {result['server_cpu_ms_per_request']:.3f} ms, postgres {result['postgres_cpu_ms_per_request']:.3f} ms,"
            f" client {result['client_cpu_ms_per_request']:.3f} ms")


def main(args) -> int:
    from refundctl.embedded import provide_services
    from refunds.vault import Vault, generate_master_key

    master_key = generate_master_key()
    vault = Vault(base64.b64decode(master_key))
    merchants = {f"bench-{i}": secrets.token_urlsafe(24) for i in range(args.merchants)}
    ids = sorted(merchants)
    name = f"refunds_bench_{secrets.token_hex(4)}"
    results: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}",
                     "concurrency": args.concurrency, "duration_s": args.duration, "mix": MIX,
                     "refund_share": args.refund_share}

    with ExitStack() as stack:
        services = stack.enter_context(provide_services())
        results["postgres"] = "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded (pgserver)"
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="receiver-bench-")))
        url = asyncio.run(prepare(services.database_url, name, merchants, vault))
        stack.callback(lambda: asyncio.run(drop(services.database_url, name)))
        env = {**os.environ, "DATABASE_URL": url, "REFUNDS_MASTER_KEY": master_key, "RECEIVER_HOST": "127.0.0.1",
               "LOG_LEVEL": "INFO"}

        receiver_port, baseline_port = free_port(), free_port()
        receiver = start_server([sys.executable, "-m", "receiver"],
                                {**env, "RECEIVER_PORT": str(receiver_port),
                                 "RECEIVER_JOURNAL_DIR": str(workdir / "receiver-journal")},
                                workdir / "receiver.log")
        stack.callback(lambda: (receiver.terminate(), receiver.wait(30)))
        baseline = start_server([sys.executable, __file__, "_baseline", "--port", str(baseline_port)], env,
                                workdir / "baseline.log")
        stack.callback(lambda: (baseline.terminate(), baseline.wait(30)))
        receiver_url, baseline_url = f"http://127.0.0.1:{receiver_port}", f"http://127.0.0.1:{baseline_port}"

        def phase(tag: str, count: int, seed_: int) -> list:
            plan, refunds = make_plan(tag, count, merchants, seed_, args.refund_share)
            asyncio.run(seed(url, tag, refunds, ids))
            return plan

        print(f"# {results['machine']}; Postgres: {results['postgres']}; mix {MIX}, refund outcomes "
              f"{args.refund_share:.0%} of new; {args.concurrency} connections", flush=True)
        warm = phase("warm", 3000, 1)
        for target in (receiver_url, baseline_url):
            run_load(target, warm, workdir, args.concurrency, 3, None)

        # closed loop, full speed: rounds alternate which server goes first, so that load from
        # elsewhere on the machine hits both alike; each round gets fresh notifications (the
        # baseline keeps its rows in its own table, so both get the same bytes)
        rounds = {"receiver": [], "baseline": []}
        for number in range(args.rounds):
            plan = phase(f"peak{number}", int(args.max_rate * args.duration), 10 + number)
            order = [("receiver", receiver_url, receiver), ("baseline", baseline_url, baseline)]
            for label, target, server in (order if number % 2 == 0 else order[::-1]):
                before = asyncio.run(counts(url))
                result = measured(target, plan, workdir, args.concurrency, args.duration, None, server, name)
                if label == "receiver":
                    check_receiver(result, before, asyncio.run(counts(url)))
                rounds[label].append(result)
                print(line(f"{label} round {number + 1}", result), flush=True)
        for label in rounds:
            results[label] = combine(rounds[label])
            print(line(f"{label} (closed loop, all)", results[label]), flush=True)
        ratios = sorted(r["per_second"] / b["per_second"] for r, b in zip(rounds["receiver"], rounds["baseline"], strict=True))
        results["ratio_per_round"] = [round(r, 3) for r in ratios]
        results["ratio"] = round(results["receiver"]["per_second"] / results["baseline"]["per_second"], 3)
        cost = {label: sum(results[label][f"{part}_cpu_ms_per_request"] for part in ("server", "postgres"))
                for label in rounds}
        results["cpu_ratio"] = round(cost["baseline"] / cost["receiver"], 3)
        print(f"{'ratio receiver/baseline':<28} {results['ratio']:.3f} (rounds: {results['ratio_per_round']});"
              f" server+postgres CPU per notification: receiver {cost['receiver']:.3f} ms,"
              f" baseline {cost['baseline']:.3f} ms (ratio {results['cpu_ratio']:.3f})", flush=True)

        # open loop at a fixed rate
        steady = phase("steady", int(args.rate * args.rate_duration), 3)
        before = asyncio.run(counts(url))
        results["receiver_fixed_rate"] = measured(receiver_url, steady, workdir, 512, args.rate_duration, args.rate,
                                                  receiver, name)
        check_receiver(results["receiver_fixed_rate"], before, asyncio.run(counts(url)))
        print(line(f"receiver at {args.rate:g}/s", results["receiver_fixed_rate"]), flush=True)
        results["baseline_fixed_rate"] = measured(baseline_url, steady, workdir, 512, args.rate_duration, args.rate,
                                                  baseline, name)
        print(line(f"baseline at {args.rate:g}/s", results["baseline_fixed_rate"]), flush=True)
        results["rows_after"] = asyncio.run(counts(url))

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of each closed-loop run")
    parser.add_argument("--rounds", type=int, default=3, help="closed-loop rounds per server (alternating)")
    parser.add_argument("--concurrency", type=int, default=64, help="connections of the closed-loop runs")
    parser.add_argument("--rate", type=float, default=1000.0, help="notifications/s of the open-loop run")
    parser.add_argument("--rate-duration", type=float, default=10.0)
    parser.add_argument("--max-rate", type=float, default=5000.0,
                        help="requests prepared per second of closed loop (more than either server can do)")
    parser.add_argument("--merchants", type=int, default=10)
    parser.add_argument("--refund-share", type=float, default=0.2,
                        help="share of the new notifications that are refund outcomes (the rest: cip.paid)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    loader = sub.add_parser("_load")
    loader.add_argument("--url", required=True)
    loader.add_argument("--plan", required=True)
    loader.add_argument("--concurrency", type=int, required=True)
    loader.add_argument("--duration", type=float, required=True)
    loader.add_argument("--rate", type=float, default=None)
    base = sub.add_parser("_baseline")
    base.add_argument("--port", type=int, required=True)
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse(sys.argv[1:])
    if options.mode == "_load":
        print(json.dumps(asyncio.run(load(options.url, options.plan, options.concurrency, options.duration,
                                          options.rate))))
    elif options.mode == "_baseline":
        serve_baseline(options.port, os.environ["DATABASE_URL"])
    else:
        sys.exit(main(options))
