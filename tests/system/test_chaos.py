"""Exactly-once through crashes, lost queues, outages and a misbehaving gateway.

Every service runs as a real process (as in the Procfile); faults are real signals,
a real FLUSHALL, a real loss of the Postgres connection. After each run: every refund is
final, the sandbox executed each succeeded refund exactly once, and nothing else.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from pagoefectivo.protocol import dumps, notification_signature
from producers import enqueue_refund
from refunds import db as dbmod
from refunds.payments import record_payment
from refundctl.onboarding import tell_of_store
from refundctl.processes import ServiceGroup, free_port
from refunds.settings import get_settings
from refunds.vault import vault_from_settings
from refunds.states import FINAL

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]


class TcpProxy:
    """A loopback TCP proxy to Postgres that can be cut (as if Postgres stopped) and restored."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        self._server.close()
        await self._server.wait_closed()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, up_writer})

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except asyncio.CancelledError:
            pass


class System:
    """The Procfile's services against the test database and Redis, with faults on demand."""

    def __init__(self, database_url: str, redis_url: str, work: Path):
        self.sandbox_url = f"http://127.0.0.1:{free_port()}"
        self.receiver_port = free_port()
        self.metrics_dir = work / "metrics"
        self.metrics_dir.mkdir()
        self.env = {
            **os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url,
            "PAGOEFECTIVO_ENV": "sandbox", "PAGOEFECTIVO_BASE_URL": self.sandbox_url,
            "REFUNDS_NOTIFY_URL": f"http://127.0.0.1:{self.receiver_port}",
            "RECEIVER_PORT": str(self.receiver_port), "RECEIVER_HOST": "127.0.0.1",
            "RECEIVER_JOURNAL_DIR": str(work / "receiver-journal"),
            # a 5 s claim needs a gateway timeout of at most 2.5 s (the local sandbox answers in milliseconds)
            "REFUND_CLAIM_SECONDS": "5", "PAGOEFECTIVO_TIMEOUT_SECONDS": "2.5",
            "REFUND_OUTBOX_GRACE_SECONDS": "3", "SCHEDULER_INTERVAL": "0.5",
        }
        self.group = ServiceGroup(env=self.env, log_dir=work)
        self.worker = None

    def start(self, *sandbox_args: str) -> None:
        port = self.sandbox_url.rsplit(":", 1)[1]
        sandbox = self.group.start("sandbox", "-m", "pagoefectivo.sandbox", "--port", port,
                                   "--notification-time-scale", "0.01", *sandbox_args)
        self.group.wait_healthy(sandbox, f"{self.sandbox_url}/healthz")
        # the gateway keeps its own records: tell it of the merchants and payments seeded in ours
        asyncio.run(tell_of_store(self.env["DATABASE_URL"], vault_from_settings(get_settings()), self.sandbox_url,
                                  receiver_url=self.env["REFUNDS_NOTIFY_URL"]))
        receiver = self.group.start("receiver", "-m", "receiver")
        self.start_worker()
        self.group.start("scheduler", "-m", "workers.scheduler")
        self.group.wait_healthy(receiver, f"{self.env['REFUNDS_NOTIFY_URL']}/healthz")

    def start_worker(self) -> None:
        self.worker = self.group.start("worker", "-m", "dramatiq", "workers", "--processes", "2", "--threads", "8",
                                       extra_env={"PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)})

    def kill_worker(self) -> None:
        """SIGKILL the worker's whole process group: no shutdown hook runs, messages stay unacked."""
        os.killpg(self.worker.process.pid, signal.SIGKILL)
        self.worker.process.wait()
        self.group.services.remove(self.worker)

    def worker_metric(self, name: str, **labels) -> float:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_dir))
        return sum(s.value for m in registry.collect() for s in m.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def stop_worker_gracefully(self, timeout: float = 90) -> int:
        """SIGTERM to the main process, as a deployment does; its exit status and log tail."""
        self.worker.process.send_signal(signal.SIGTERM)
        code = self.worker.process.wait(timeout)
        self.group.services.remove(self.worker)
        return code, self.worker.log_tail(40)

    def stop(self) -> None:
        self.group.stop()


@pytest_asyncio.fixture
async def system(db, database_url, redis_url):
    client = aioredis.from_url(redis_url)
    await client.flushdb()
    await client.aclose()
    with tempfile.TemporaryDirectory(prefix="refunds-chaos-") as work:
        running = System(database_url, redis_url, Path(work))
        try:
            yield running
        finally:
            running.stop()


async def seed(db, make_merchant, merchants: dict[str, int], per_merchant: int) -> list[dict]:
    """Merchants with their rate limits, payments of 300.00 and three refunds of up to 100.00 each."""
    requests = []
    now = datetime.now(timezone.utc)
    for merchant_id, rate in merchants.items():
        await make_merchant(merchant_id, rate_limit=Decimal(rate))
        for index in range(per_merchant):
            cip = f"{merchant_id}-CIP-{index // 3}"
            if index % 3 == 0:
                await record_payment(db, merchant_id=merchant_id, transaction_id=cip, amount=Decimal("300.00"),
                                     currency="PEN", method="cash", paid_at=now)
            requests.append(dict(merchant_id=merchant_id, original_transaction_id=cip,
                                 amount=f"{10 + index % 90}.{index % 100:02d}", currency="PEN",
                                 external_ref=f"{merchant_id}-R-{index:05d}"))
    return requests


async def enqueue_all(database_url: str, requests: list[dict]) -> list:
    pool = await dbmod.create_pool(database_url, max_size=8)
    try:
        results = []
        for start in range(0, len(requests), 100):
            batch = requests[start:start + 100]
            results += await asyncio.gather(*(enqueue_refund(pool, **r) for r in batch))
        return [r.refund.refund_id for r in results]
    finally:
        await pool.close()


async def final_count(db) -> int:
    return await db.fetchval("SELECT count(*) FROM refunds WHERE state = ANY($1::text[])", list(FINAL))


async def wait_all_final(db, total: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (done := await final_count(db)) < total:
        if time.monotonic() > deadline:
            states = dict(await db.fetch("SELECT state, count(*) FROM refunds GROUP BY state"))
            raise AssertionError(f"only {done} of {total} final after {timeout:.0f}s: {states}")
        await asyncio.sleep(0.5)


async def assert_exactly_once(db, sandbox_url: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sandbox_url}/sandbox/ledger") as response:
            ledger = await response.json()
    executions = Counter((e["merchantId"], e["externalRef"]) for e in ledger)
    assert [key for key, n in executions.items() if n > 1] == [], "a refund was executed twice"
    succeeded = {(r["merchant_id"], r["external_ref"]): r["amount"] for r in
                 await db.fetch("SELECT merchant_id, external_ref, amount FROM refunds WHERE state = 'succeeded'")}
    executed = {(e["merchantId"], e["externalRef"]): Decimal(str(e["refundAmount"])) for e in ledger}
    assert executed == succeeded
    not_final = await db.fetchval("SELECT count(*) FROM refunds WHERE NOT state = ANY($1::text[])", list(FINAL))
    assert not_final == 0
    over = await db.fetchval("SELECT count(*) FROM payments WHERE refunded_amount > amount")
    assert over == 0


async def test_worker_processes_killed_at_random_moments(db, make_merchant, database_url, system):
    requests = await seed(db, make_merchant, {"ka": 300, "kb": 300}, 1000)
    await asyncio.to_thread(system.start, "--sync-status-mix", '{"success": 1, "pending": 1}')
    await enqueue_all(database_url, requests)
    for pause in (1.5, 2.5, 1.0, 3.0):
        await asyncio.sleep(pause)
        system.kill_worker()
        await asyncio.sleep(0.5)
        await asyncio.to_thread(system.start_worker)
    await wait_all_final(db, len(requests), timeout=240)
    await assert_exactly_once(db, system.sandbox_url)


async def test_a_worker_started_with_a_backlog_works_it_without_a_failed_message(db, make_merchant, database_url,
                                                                              system):
    """The worker's resources open before its threads take messages. Opened after them, every
    message of a waiting backlog failed with a traceback on the pipe to dramatiq's parent, which
    filled it and stalled the boot until dramatiq's 30 s fork timeout."""
    requests = await seed(db, make_merchant, {"ba": 500}, 300)
    await enqueue_all(database_url, requests)  # no worker yet: the backlog waits in Redis
    await asyncio.to_thread(system.start, "--sync-status-mix", '{"success": 1}')
    await wait_all_final(db, len(requests), timeout=120)
    await assert_exactly_once(db, system.sandbox_url)
    log = system.worker.log_path.read_text(errors="replace")
    assert "worker resources open" in log
    assert "Failed to process message" not in log and "are not open" not in log


async def test_sigterm_lets_in_flight_refunds_finish_or_return_safely(db, make_merchant, database_url, system):
    requests = await seed(db, make_merchant, {"ta": 500}, 300)
    await asyncio.to_thread(system.start, "--latency-ms", "300", "--sync-status-mix", '{"success": 1}')
    await enqueue_all(database_url, requests)
    deadline = time.monotonic() + 30  # the signal lands while refunds are at the gateway, however slow the boot
    while not await db.fetchval("SELECT count(*) FROM refunds WHERE state = 'submitted'"):
        assert time.monotonic() < deadline, "no refund reached the gateway"
        await asyncio.sleep(0.05)
    code, log = await asyncio.to_thread(system.stop_worker_gracefully)
    assert code == 0, log
    stranded = await db.fetchval("SELECT count(*) FROM refunds WHERE state = 'submitted' AND claimed_until > now()")
    assert stranded == 0  # every in-flight refund finished before the worker exited
    await asyncio.to_thread(system.start_worker)
    await wait_all_final(db, len(requests), timeout=120)
    await assert_exactly_once(db, system.sandbox_url)


async def test_redis_loses_everything_mid_run(db, make_merchant, database_url, redis_url, system):
    # 50/s each: 600 refunds take at least 6 s by the merchants' own limits, so the flush at 1 s
    # lands mid-run however fast the machine (at 150/s a quiet one finished them all before it)
    requests = await seed(db, make_merchant, {"fa": 50, "fb": 50}, 300)
    await asyncio.to_thread(system.start)
    await enqueue_all(database_url, requests)
    await asyncio.sleep(1.0)
    client = aioredis.from_url(redis_url)
    await client.flushall()
    await client.aclose()
    assert await final_count(db) < len(requests)  # the flush really hit a run in progress
    await wait_all_final(db, len(requests), timeout=120)
    await assert_exactly_once(db, system.sandbox_url)


async def test_postgres_unreachable_for_ten_seconds(db, make_merchant, database_url, system, vault):
    from urllib.parse import urlsplit, urlunsplit

    requests = await seed(db, make_merchant, {"pa": 100}, 600)
    parts = urlsplit(database_url)
    proxy = TcpProxy(parts.hostname, parts.port)
    await proxy.start()
    proxied = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
    system.env["DATABASE_URL"] = proxied
    await asyncio.to_thread(system.start)
    await enqueue_all(database_url, requests)
    await asyncio.sleep(1.5)
    await proxy.cut()
    # while Postgres is away the receiver keeps a verified notification in its journal (200: PagoEfectivo
    # tries only once more) and applies it once Postgres is back
    body = dumps({"eventType": "cip.paid", "operationNumber": "outage-probe",
                  "data": {"cip": "OUTAGE-1", "currency": "PEN", "amount": Decimal("5.00")}})
    secret = (await db.fetchrow("SELECT * FROM merchants WHERE merchant_id = 'pa'"))
    from refunds.merchants import find_merchant

    merchant = await find_merchant(db, "pa")
    headers = {"PE-Signature": notification_signature(body, merchant.secret_key(vault)),
               "Content-Type": "application/json"}
    url = f"{system.env['REFUNDS_NOTIFY_URL']}/pagoefectivo/notifications/pa"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=body, headers=headers) as response:
            assert response.status == 200 and (await response.json())["result"] == "journalled"
        await asyncio.sleep(10)
        await proxy.start()
        await wait_all_final(db, len(requests), timeout=180)
        async with http.post(url, data=body, headers=headers) as response:
            assert response.status == 200
    assert secret is not None
    assert await db.fetchval("SELECT count(*) FROM payments WHERE transaction_id = 'OUTAGE-1'") == 1
    await assert_exactly_once(db, system.sandbox_url)


async def test_misbehaving_gateway(db, make_merchant, database_url, system):
    requests = await seed(db, make_merchant, {"ga": 200, "gb": 200}, 400)
    await asyncio.to_thread(system.start, "--error-rate", "0.1", "--timeout-after-commit-rate", "0.05", "--rate-limited-rate", "0.05",
                 "--notification-duplicate-rate", "1", "--notification-reorder-rate", "0.2")
    await enqueue_all(database_url, requests)
    await wait_all_final(db, len(requests), timeout=240)
    await assert_exactly_once(db, system.sandbox_url)
    assert system.worker_metric("refund_gateway_requests_total", outcome="error") > 0
    assert system.worker_metric("refund_gateway_requests_total", outcome="timeout") > 0
    assert system.worker_metric("refund_gateway_requests_total", outcome="rate_limited") > 0
    # every notification arrives twice (some after the refund was already settled by its sync
    # answer), and each is stored once
    deadline = time.monotonic() + 30
    while (stored := await db.fetchval(
            "SELECT count(*) FROM notifications WHERE event_type = 'refund.succeeded'")) < len(requests):
        assert time.monotonic() < deadline, f"{stored} of {len(requests)} notifications stored"
        await asyncio.sleep(0.5)
    assert stored == len(requests)


async def test_rate_limit_holds_and_one_backlog_does_not_delay_another_merchant(db, make_merchant, database_url, system):
    backlog = await seed(db, make_merchant, {"slow": 5}, 300)
    quick = await seed(db, make_merchant, {"quick": 50}, 20)
    await asyncio.to_thread(system.start, "--merchant-rate-limits", '{"slow": 5}', "--sync-status-mix", '{"success": 1}')
    await enqueue_all(database_url, backlog)
    await asyncio.sleep(0.5)
    started = time.monotonic()
    quick_ids = await enqueue_all(database_url, quick)
    while await db.fetchval("SELECT count(*) FROM refunds WHERE refund_id = ANY($1::uuid[]) AND state = 'succeeded'",
                            quick_ids) < len(quick):
        assert time.monotonic() - started < 8, "the other merchant waited behind the backlog"
        await asyncio.sleep(0.2)
    await asyncio.sleep(8)
    observed = time.monotonic() - started
    slow_done = await db.fetchval("SELECT count(*) FROM refunds WHERE merchant_id = 'slow' AND state = 'succeeded'")
    # the sandbox answers 429 above 5/s in any second: none means the limit held
    assert system.worker_metric("refund_gateway_requests_total", outcome="rate_limited") == 0
    assert slow_done >= 0.8 * 5 * observed - 5  # and the allowance was used
